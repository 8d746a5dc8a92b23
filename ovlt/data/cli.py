"""`ovlt data synth` (synthetic visual-math data) and `ovlt data check` (validate files)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _synth(args) -> int:
    from ovlt.data.synth import generate
    summary = generate(args.out, args.n, args.seed)
    print(json.dumps(summary, indent=2))
    return 0


def _check(args) -> int:
    from ovlt.data.formats import (DataError, SkipReport, load_registry, read_rl, read_sft,
                                   validate_rl, validate_sft)
    from ovlt.data.tokenizer import load_tokenizer
    tok = load_tokenizer()
    report = SkipReport(strict=args.strict)
    p = Path(args.path)
    if not p.exists():
        print(f"ovlt data check: {p}: no such file", file=sys.stderr)
        return 2
    if p.suffix in (".yaml", ".yml"):
        jobs = [(src.kind, f, src.image_root) for src in load_registry(p) for f in src.files]
    elif p.suffix == ".parquet":
        jobs = [("rl", str(p), args.image_root)]
    elif p.suffix in (".json", ".jsonl"):
        jobs = [("sft", str(p), args.image_root)]
    else:
        print(f"ovlt data check: {p}: expected .json, .jsonl, .parquet or a .yaml registry",
              file=sys.stderr)
        return 2
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
