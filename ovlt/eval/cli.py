"""`ovlt eval {run,score,report}`.

  ovlt eval run    --benchmark B --data PATH --model DIR [--engine auto|vllm|builtin] [--limit N] --out DIR
  ovlt eval score  --benchmark B --data PATH --predictions FILE --out DIR [--judge-url URL]
                   [--style ovlt|official|openvlthinker] [--split testmini|test]
  ovlt eval report --scores DIR [DIR ...] --out DIR [--model-name NAME]
`run` generates (resumable), then scores like `score`. Both print the overall accuracy in
`--style` (ovlt: ovlt's grader; official: each benchmark's own rule scorer, for comparing with
published numbers; openvlthinker: OpenVLThinker's evaluation script) and beside it the other
styles' (all are in scores.json). Under `run`, --style openvlthinker also asks MathVision with
OpenVLThinker's prompt.
`score` never opens the benchmark's images (they need not be present). `run` refuses an --out
whose predictions another model (or other settings) made. Bad input exits 2 with one line
naming the file, line/record and field.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from ovlt.config import ConfigError
from ovlt.eval.readers import BENCHMARKS, SPLITS, BenchmarkError, load_benchmark, prompt_for
from ovlt.eval.scoring import STYLES
from ovlt.logging import get_logger

logger = get_logger(__name__)


def _limit(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = all items), got {n}")
    return n


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    p.add_argument("--data", required=True, help="benchmark file (parquet/json/jsonl) or directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--limit", type=_limit, default=0, help="first N items only (0 = all)")
    p.add_argument("--image-root", default=None, help="extra directory to resolve image paths in")
    p.add_argument("--judge-url", default=None,
                   help="OpenAI-compatible endpoint for LLM answer extraction (off by default)")
    p.add_argument("--judge-model", default="gpt-4o-mini")
    p.add_argument("--judge-mode", choices=("fallback", "always"), default="fallback",
                   help="fallback: only when the rules find no answer")
    p.add_argument("--style", choices=STYLES, default="ovlt",
                   help="scoring reported as the accuracy (every style is computed)")
    p.add_argument("--split", choices=SPLITS, default=None,
                   help="split to read when --data holds both testmini and test")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ovlt eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="generate greedily with a model, then score")
    _common(run)
    run.add_argument("--model", required=True, help="model directory (HF or ovlt mcore checkpoint)")
    run.add_argument("--engine", choices=("auto", "vllm", "builtin"), default="auto")
    run.add_argument("--config", default=None, help="ovlt YAML (model/data/rollout sections)")
    run.add_argument("--max-new-tokens", type=int, default=2048)
    run.add_argument("--batch-size", type=int, default=32)
    run.add_argument("--prompt-suffix", default="", help="text appended to every prompt")
    run.add_argument("--no-progress", action="store_true")
    score = sub.add_parser("score", help="score a predictions JSONL")
    _common(score)
    score.add_argument("--predictions", required=True,
                       help='JSONL of {"<id field>": ..., "response": ...}')
    rep = sub.add_parser("report", help="report.md + bar chart from scores.json files")
    rep.add_argument("--scores", nargs="+", required=True, help="scores.json files or their dirs")
    rep.add_argument("--out", required=True)
    rep.add_argument("--model-name", default="ours")
    rep.add_argument("--title", default="ovlt evaluation")
    return ap


def _judge(args):
    if not args.judge_url:
        return None
    from ovlt.eval.judge import LLMJudge
    return LLMJudge(args.judge_url, model=args.judge_model)


def _job_config(path: Optional[str]):
    from ovlt.config import JobConfig, load_config
    return load_config(path) if path else JobConfig()


def _print_scores(scores: dict, out: Path) -> None:
    others = "".join(f" | {s} {v['accuracy']:.2f}%" for s, v in scores.get("styles", {}).items()
                     if s != scores.get("style"))
    print(f"{scores['benchmark']}: accuracy {scores['accuracy']:.2f}% "
          f"({scores['correct']}/{scores['n']}) -> {out / 'scores.json'}"
          + (f" [{scores.get('style', 'ovlt')}{others}]" if others else ""))


def main(argv: Optional[list[str]] = None, *, engine=None, request_builder=None) -> int:
    """`engine` / `request_builder` may be injected (tests); otherwise built from the args."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from ovlt.eval import score_report as rpt
    if args.cmd == "report":
        try:
            scores = rpt.load_scores(args.scores)
            md, png = rpt.write_report(scores, args.out, model_name=args.model_name,
                                       title=args.title)
        except (OSError, ValueError) as e:
            print(f"ovlt eval report: {e}", file=sys.stderr)
            return 2
        for b, s in scores.items():
            print(f"{b}: {s['accuracy']:.2f}%")
        print(f"wrote {md} and {png}")
        return 0

    from ovlt.eval.runner import (ChatRequestBuilder, is_writer, load_predictions,
                                  run_generation, score_predictions)
    out = Path(args.out)
    try:
        items = load_benchmark(args.benchmark, args.data, limit=args.limit or None,
                               image_root=args.image_root, images=args.cmd == "run",
                               split=args.split)
        if args.cmd == "run":
            for it in items:
                it.prompt = prompt_for(it, args.style)
            cfg = _job_config(args.config)
            from ovlt.eval.runner import claim_out_dir, model_fingerprint
            claim_out_dir(out, {  # before the engine is built: a refusal costs nothing
                "model": str(Path(args.model).resolve()),
                "model_fingerprint": model_fingerprint(args.model),
                "benchmark": args.benchmark, "max_new_tokens": args.max_new_tokens,
                "prompt_suffix": args.prompt_suffix, "prompt_style": args.style,
                "min_pixels": cfg.data.min_pixels, "max_pixels": cfg.data.max_pixels})
            if engine is None:
                from ovlt.eval.engine import build_engine
                engine = build_engine(args.model, args.engine, cfg)
            if request_builder is None:
                request_builder = ChatRequestBuilder(cfg.data.min_pixels, cfg.data.max_pixels,
                                                     prompt_suffix=args.prompt_suffix)
            pred_path = run_generation(args.benchmark, items, engine, out, request_builder,
                                       max_new_tokens=args.max_new_tokens,
                                       batch_size=args.batch_size,
                                       progress=not args.no_progress and is_writer())
        else:
            pred_path = Path(args.predictions)
        if not is_writer():
            return 0
        predictions = load_predictions(args.benchmark, pred_path)
        if out.exists() and not out.is_dir():
            raise BenchmarkError(f"--out {out} is a file, expected a directory")
        scores = score_predictions(args.benchmark, items, predictions, out, judge=_judge(args),
                                   judge_mode=args.judge_mode, source=str(pred_path),
                                   style=args.style)
    except (BenchmarkError, ConfigError, OSError) as e:
        print(f"ovlt eval {args.cmd}: {e}", file=sys.stderr)
        return 2
    _print_scores(scores, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
