"""`ovlt` console script. Sub-commands are loaded lazily so `ovlt --help` is instant.

Each entry maps a sub-command to `module:function`; the function takes the remaining argv
and returns an exit code. An exception it lets through ends the command as
`ovlt.distributed.report_error` says: one line for bad input, a traceback for a bug.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("ovlt.models.qwen2_5_vl.convert_cli:main", "hf2mcore / mcore2hf checkpoint conversion"),
    "parity": ("ovlt.models.qwen2_5_vl.parity:main", "logit parity of the mcore model vs HF transformers"),
    "data": ("ovlt.data.cli:main", "synth (synthetic visual math) / check (validate files)"),
    "sft": ("launchers.sft:main", "supervised fine-tuning (same as torchrun launchers/sft.py)"),
    "grpo": ("launchers.grpo:main", "GRPO training (same as torchrun launchers/grpo.py)"),
    "eval": ("ovlt.eval.cli:main", "run / score / report on MathVista, MathVerse, MathVision"),
    "iterate": ("launchers.iterate:main", "the whole self-improvement loop, round by round"),
    "config": ("ovlt.config_cli:main", "print the merged, validated config"),
}


def _usage() -> str:
    lines = ["usage: ovlt <command> [args...]", "", "commands:"]
    for name, (_, help_) in COMMANDS.items():
        lines.append(f"  {name:<9} {help_}")
    lines.append("")
    lines.append("run `ovlt <command> --help` for the command's own options")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from ovlt import __version__
        print(__version__)
        return 0
    name = argv.pop(0)
    if name not in COMMANDS:
        print(f"ovlt: unknown command {name!r}; choose from: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    target = COMMANDS[name][0]
    mod_name, fn_name = target.split(":")
    fn = getattr(importlib.import_module(mod_name), fn_name)
    try:
        rc = fn(argv)
    except Exception as e:  # noqa: BLE001 - what a sub-command did not handle itself
        from ovlt.distributed import report_error
        return report_error(e, f"ovlt {name}")
    return int(rc or 0)


if __name__ == "__main__":
    raise SystemExit(main())
