"""CPU test of `benchmarks/rollout.py`'s recipe-like length mix (--tiny): the stated law, exact
per-request lengths, the static baseline's step count, continuous batching's."""
import importlib.util
import json
import math
import os
from statistics import NormalDist

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench():
    spec = importlib.util.spec_from_file_location("bench_rollout", os.path.join(ROOT, "benchmarks", "rollout.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_lognormal_lengths_are_the_stated_quantiles():
    qs = _bench().lognormal_lengths(64, 500.0, 0.6, 2048, seed=17)
    s = sorted(qs)
    want = [min(2048, round(500 * math.exp(0.6 * NormalDist().inv_cdf((k + 0.5) / 64)))) for k in range(64)]
    assert s == want
    assert s[31] <= 500 <= s[32] and max(s) <= 2048
    assert 560 < sum(s) / 64 < 640          # mean of lognormal(ln 500, 0.6) is 500 e^0.18 = 599
    assert qs != s                          # shuffled (seeded)


@pytest.mark.slow
def test_tiny_mix_runs_and_reports(tmp_path):
    b = _bench()
    out = tmp_path / "r.json"
    assert b.main(["--tiny", "--mix-only", "--out", str(out)]) == 0
    mix = json.loads(out.read_text())["recipe_mix"]
    assert mix["prompts"] == 6 and mix["samples_per_prompt"] == 3
    caps = [c for c in b.lognormal_lengths(6, 8.0, 0.6, 20, 17) for _ in range(3)]
    assert mix["new_tokens"] == sum(caps)
    v = mix["variants"]
    assert set(v) == {"static@4", "continuous@4", "continuous@8"}
    # static: batches of 4 samples in queue order, each as long as its longest cap (check every
    # 8 steps, but never past what the longest remaining cap needs)
    assert v["static@4"]["steps"] == sum(max(caps[i:i + 4]) for i in range(0, len(caps), 4))
    assert v["continuous@4"]["steps"] < v["static@4"]["steps"]
    for r in v.values():
        assert r["prefill_prompts"] == 6 and r["steps"] >= r["min_steps_at_full_occupancy"]
        assert 0 < r["slot_occupancy"] <= 1 and r["tokens_per_s"] > 0
    assert v["static@4"]["narrowed_tail"] == 0 and v["continuous@8"]["narrowed_tail"] >= 1
    assert v["continuous@8"]["slot_steps_run"] < 8 * v["continuous@8"]["steps"]
    assert "speedup_best_continuous_vs_static@4" in mix
