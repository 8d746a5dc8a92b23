"""Compare the per-layout SFT metrics written by multi_gpu_sft.sh: loss curves vs the first
layout (max abs / relative difference), median tokens/s and MFU; writes summary.json."""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--ngpu", type=int, required=True)
    args = ap.parse_args()
    res = Path(args.results)
    runs = {}
    for f in sorted(res.glob("metrics_*.jsonl")):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "loss" in r]
        if rows:
            runs[f.stem.removeprefix("metrics_")] = rows
    if not runs:
        raise SystemExit(f"no metrics in {res}")
    base_name = "1x1" if "1x1" in runs else next(iter(runs))
    base = [r["loss"] for r in runs[base_name]]
    summary = {"ngpu": args.ngpu, "baseline": base_name, "layouts": {}}
    for name, rows in runs.items():
        loss = [r["loss"] for r in rows]
        n = min(len(loss), len(base))
        diff = [abs(a - b) for a, b in zip(loss[:n], base[:n])]
        steady = rows[2:] or rows  # skip warm-up steps
        summary["layouts"][name] = {
            "steps": len(rows), "loss_first": loss[0], "loss_last": loss[-1],
            "max_abs_loss_diff_vs_baseline": max(diff) if diff else None,
            "max_rel_loss_diff_vs_baseline": max(d / abs(b) for d, b in zip(diff, base)) if diff else None,
            "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in steady),
            "mfu_median": statistics.median((r.get("mfu") or 0.0) for r in steady),
            "step_time_s_median": statistics.median(r["step_time_s"] for r in steady),
        }
    (res / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
