"""What the layers added between two `sft_throughput.py` results cost each variant.

Given a shallow and a deep result of the same code and batch on one machine, the difference of
their step times is what the added layers cost: fixed per-step work (embedding, LM head,
loss, data) cancels. The ratio of two variants' added costs is where their speed ratio goes
as layers are added; the results' own ratios mix it with the fixed savings.

    python benchmarks/depth_cost.py benchmarks/results/sft_throughput_h200_4x8.json \
        benchmarks/results/sft_throughput_h200_16x32.json
"""
from __future__ import annotations

import argparse
import json
import sys

PAIRS = (("hf", "ovlt_bf16"), ("ovlt_bf16", "ovlt_fp8_delayed"))


def depth_cost(shallow: dict, deep: dict) -> dict:
    """Per variant in both results: added ms per step, per added LLM layer (with its share of
    vision layers) and added peak GiB per added LLM layer; per pair in `PAIRS`, the ratio of
    the added costs (first / second: > 1 means the second is faster per added layer)."""
    def layers(res):
        c = res["config"]
        return c["llm_layers"], c["vision_layers"]
    (l0, v0), (l1, v1) = layers(shallow), layers(deep)
    keep = {k: v for k, v in shallow["config"].items()
            if k not in ("llm_layers", "vision_layers", "variants", "out", "iters", "warmup",
                         "repeats", "profile_dir", "profile_variants", "telemetry_ms",
                         "sync_probe")}
    differs = [k for k in keep if deep["config"].get(k) != keep[k]]
    if differs:
        raise ValueError(f"the two results differ in more than depth: {differs}")
    if l1 <= l0:
        raise ValueError(f"the deep result has {l1} LLM layers, the shallow one {l0}")
    added = l1 - l0
    out = {"added_llm_layers": added, "added_vision_layers": v1 - v0, "variants": {}, "ratios": {}}
    for name in [n for n in shallow["variants"] if n in deep["variants"]]:
        a, b = shallow["variants"][name], deep["variants"][name]
        ms = (b["step_s"] - a["step_s"]) * 1e3
        out["variants"][name] = {
            "added_ms": round(ms, 2), "ms_per_llm_layer": round(ms / added, 3),
            "gib_per_llm_layer": round((b["peak_mem_gib"] - a["peak_mem_gib"]) / added, 3),
            "fixed_gib": round(a["peak_mem_gib"]
                               - l0 * (b["peak_mem_gib"] - a["peak_mem_gib"]) / added, 2)}
    for slow, fast in PAIRS:
        v = out["variants"]
        if slow in v and fast in v:
            out["ratios"][f"{slow} / {fast}"] = round(v[slow]["added_ms"] / v[fast]["added_ms"], 3)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("shallow")
    ap.add_argument("deep")
    args = ap.parse_args(argv)
    with open(args.shallow) as f:
        shallow = json.load(f)
    with open(args.deep) as f:
        deep = json.load(f)
    try:
        res = depth_cost(shallow, deep)
    except KeyError as e:
        print(f"depth_cost: {args.shallow} vs {args.deep}: no field {e} (not an "
              "sft_throughput.py result?)", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"depth_cost: {args.shallow} vs {args.deep}: {e}", file=sys.stderr)
        return 2
    json.dump(res, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
