"""CPU smoke of `benchmarks/sft_throughput.py --repeats`: the ABBA order and the pooled figures."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location(
        "sft_throughput", os.path.join(ROOT, "benchmarks", "sft_throughput.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_repeats_alternate_order_and_pool_every_timed_step(tmp_path):
    out = tmp_path / "r.json"
    assert _bench().main(["--tiny", "--variants", "ovlt_bf16,hf", "--warmup", "1", "--iters",
                          "3", "--repeats", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["run_order"] == ["ovlt_bf16", "hf", "hf", "ovlt_bf16"]
    for v in ("ovlt_bf16", "hf"):
        r = res["variants"][v]
        reps = r["repeats"]
        assert len(reps) == 2 and all(len(x["step_ms"]) == 3 for x in reps)
        pool = sorted(t for x in reps for t in x["step_ms"])
        assert r["step_s"] == pytest.approx(pool[len(pool) // 2] / 1e3)
        assert r["step_s_min"] == pytest.approx(pool[0] / 1e3)
        assert r["tokens_per_s"] == pytest.approx(res["tokens_per_step"] / r["step_s"])
        for x in reps:  # each repeat's median is its own middle step
            assert x["step_s"] == pytest.approx(sorted(x["step_ms"])[1] / 1e3, abs=1e-6)
    sp = res["speedups"]["ovlt_bf16 vs hf"]
    ovlt, hf = res["variants"]["ovlt_bf16"]["repeats"], res["variants"]["hf"]["repeats"]
    assert sp["per_repeat"] == pytest.approx([h["step_s"] / o["step_s"] for o, h in zip(ovlt, hf)])
    assert sp["pooled"] == pytest.approx(res["variants"]["hf"]["step_s"]
                                         / res["variants"]["ovlt_bf16"]["step_s"])
    # every repeat builds its variant afresh from the same init: the same loss curve
    assert ovlt[0]["losses"] == pytest.approx(ovlt[1]["losses"], rel=1e-6)
    assert hf[0]["losses"] == pytest.approx(hf[1]["losses"], rel=1e-6)


def test_repeats_below_one_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _bench().main(["--tiny", "--repeats", "0", "--out", str(tmp_path / "x.json")])
    assert "--repeats must be >= 1, got 0" in capsys.readouterr().err
