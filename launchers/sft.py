"""SFT launcher: `torchrun --nproc-per-node N launchers/sft.py --config configs/sft/X.yaml
[key=value ...]` (also `ovlt sft ...`; without torchrun it runs as one process).

Writes under `sft.train.save_dir`: metrics.jsonl, logs/, checkpoints (resumed automatically),
final_hf/. `--profile 3,4` records a torch profiler trace of those optimizer steps.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by torchrun: make `ovlt` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _steps(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--profile expects step numbers like 3,4; got {text!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ovlt sft", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML config (e.g. configs/sft/tiny_cpu.yaml)")
    ap.add_argument("--profile", type=_steps, nargs="?", const=[2, 3], default=None,
                    help="profile these optimizer steps (default 2,3)")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = ap.parse_intermixed_args(sys.argv[1:] if argv is None else argv)  # overrides before or after the options

    from launchers._job import run_job

    def run(cfg):
        from ovlt.sft.train import run_sft
        return run_sft(cfg, profile_steps=args.profile)
    return run_job("sft", args.config, args.overrides, run)


if __name__ == "__main__":
    raise SystemExit(main())
