"""`ovlt data synth` (synthetic visual-math data) and `ovlt data check` (validate files).

`synth --out DIR` never overwrites a file it did not write: it refuses when DIR already holds
`sft.jsonl`, `rl.parquet` or anything under `images/` that is not listed in DIR's
`.ovlt_synth.json` (the list of files an earlier `ovlt data synth` wrote there); files an
earlier run wrote are replaced only with `--force`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SYNTH_MANIFEST = ".ovlt_synth.json"
SYNTH_OUTPUTS = ("sft.jsonl", "rl.parquet")


def _synth_outputs_present(out: Path) -> list[Path]:
    """Files in `out` that `ovlt data synth` would write over (or add beside)."""
    found = [out / f for f in SYNTH_OUTPUTS if (out / f).exists()]
    if (out / "images").is_dir():
        found += sorted(p for p in (out / "images").rglob("*") if not p.is_dir())
    return found


def _synth_written_before(out: Path) -> set[str]:
    try:
        doc = json.loads((out / SYNTH_MANIFEST).read_text(encoding="utf-8"))
        return {str(f) for f in doc.get("files", [])}
    except (OSError, ValueError, AttributeError, TypeError):
        return set()


def _synth(args) -> int:
    from ovlt.data.synth import generate
    from ovlt.utils.io import atomic_write_json
    out = Path(args.out)
    if args.n <= 0:
        print(f"ovlt data synth: --n must be a positive number of problems, got {args.n}",
              file=sys.stderr)
        return 2
    if out.exists() and not out.is_dir():
        print(f"ovlt data synth: --out {out} is a file, expected a directory", file=sys.stderr)
        return 2
    present = _synth_outputs_present(out) if out.is_dir() else []
    if present:
        ours = _synth_written_before(out)
        foreign = [p for p in present if str(p.relative_to(out)) not in ours]
        if foreign:
            print(f"ovlt data synth: {out} already holds {len(foreign)} file(s) that ovlt data "
                  f"synth did not write there (e.g. {foreign[0]}); refusing to overwrite them: "
                  f"choose a new --out directory", file=sys.stderr)
            return 2
        if not args.force:
            print(f"ovlt data synth: {out} holds the output of an earlier ovlt data synth "
                  f"({len(present)} files); pass --force to replace it, or choose a new --out",
                  file=sys.stderr)
            return 2
        for p in present:  # a smaller --n must not leave the earlier run's extra images
            if p.parent == out / "images":
                p.unlink()
    try:
        summary = generate(out, args.n, args.seed)
    except (OSError, ValueError) as e:
        print(f"ovlt data synth: {e}", file=sys.stderr)
        return 1
    files = sorted(str(p.relative_to(out)) for p in _synth_outputs_present(out))
    atomic_write_json(out / SYNTH_MANIFEST, {"written_by": "ovlt data synth", "n": args.n,
                                             "seed": args.seed, "files": files})
    print(json.dumps(summary, indent=2))
    return 0


def _check(args) -> int:
    from ovlt.data.formats import (DataError, SkipReport, load_registry, read_rl, read_sft,
                                   validate_rl, validate_sft)
    from ovlt.data.tokenizer import load_tokenizer
    report = SkipReport(strict=args.strict)
    p = Path(args.path)
    if not p.exists():
        print(f"ovlt data check: {p}: no such file", file=sys.stderr)
        return 2
    if p.is_dir():
        print(f"ovlt data check: {p}: is a directory; give a .json, .jsonl, .parquet or .yaml "
              "registry file", file=sys.stderr)
        return 2
    if p.suffix in (".yaml", ".yml"):
        try:
            jobs = [(src.kind, f, src.image_root) for src in load_registry(p) for f in src.files]
        except DataError as e:
            print(f"ovlt data check: invalid registry: {e}", file=sys.stderr)
            return 2
    elif p.suffix == ".parquet":
        jobs = [("rl", str(p), args.image_root)]
    elif p.suffix in (".json", ".jsonl"):
        jobs = [("sft", str(p), args.image_root)]
    else:
        print(f"ovlt data check: {p}: expected .json, .jsonl, .parquet or a .yaml registry",
              file=sys.stderr)
        return 2
    tok = load_tokenizer()
    try:
        for kind, f, root in jobs:
            sub = SkipReport(strict=args.strict)
            reader = read_sft if kind == "sft" else read_rl
            for rec in reader(f, image_root=root, report=sub):
                if kind == "sft":
                    why = validate_sft(rec, args.max_length, args.min_pixels, args.max_pixels, tok)
                else:
                    why = validate_rl(rec, args.max_prompt_length, args.min_pixels,
                                      args.max_pixels, tok)
                if why:
                    sub.reject(rec.file, rec.index, why)
            report.merge(sub)
    except DataError as e:
        print(f"ovlt data check: invalid record (strict): {e}", file=sys.stderr)
        return 1
    print(report.summary())
    for s in report.skips:
        print(f"SKIP {s}")
    return 0 if report.num_skipped == 0 else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ovlt data")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="draw synthetic verifiable visual-math problems")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--n", type=int, default=1000, help="number of problems")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true",
                   help="replace the output of an earlier `ovlt data synth` in --out (files "
                        "it did not write are never replaced)")
    c = sub.add_parser("check", help="validate SFT (.json/.jsonl), RL (.parquet) or registry (.yaml)")
    c.add_argument("path")
    c.add_argument("--strict", action="store_true", help="stop at the first bad record")
    c.add_argument("--image-root", default=None)
    c.add_argument("--max-length", type=int, default=2048, help="SFT sample token limit")
    c.add_argument("--max-prompt-length", type=int, default=6144, help="RL prompt token limit")
    c.add_argument("--min-pixels", type=int, default=3136)
    c.add_argument("--max-pixels", type=int, default=262144)
    args = ap.parse_args(argv)
    return _synth(args) if args.cmd == "synth" else _check(args)


if __name__ == "__main__":
    raise SystemExit(main())
