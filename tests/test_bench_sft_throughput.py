"""CPU tests of `benchmarks/sft_throughput.py`: `--repeats` (the ABBA order, the pooled figures),
the allocator settings per variant, and the GPU telemetry plumbing (`_gpu_telemetry.py`, with a
stand-in nvidia-smi)."""
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


def test_allocator_settings_per_variant_and_pooled_allocator_events():
    """ovlt variants run under the trainer's allocator settings, HF under PyTorch's default,
    the A/B variants swapped; pooled allocator events are the repeats' sums."""
    b = _bench()
    assert b.alloc_conf("ovlt_bf16") == b.alloc_conf("ovlt_fp8_delayed") == \
        "expandable_segments:True"
    for v in ("hf", "ovlt_bf16_noexpand", "ovlt_fp8_delayed_noexpand"):
        assert b.alloc_conf(v) == "expandable_segments:False"
    assert b.alloc_conf("hf_expandable") == "expandable_segments:True"
    run = {"step_ms": [10.0, 12.0], "update_s": 0.001, "loss": 1.0, "losses": [1.0],
           "host": {}, "peak_mem_gib": 3.0, "peak_reserved_gib": 4.0,
           "alloc_conf": "expandable_segments:True"}
    runs = [dict(run, step_s=0.011, alloc_events={"num_alloc_retries": 2, "num_device_free": 5}),
            dict(run, step_s=0.012, peak_reserved_gib=4.5,
                 alloc_events={"num_alloc_retries": 1, "num_device_free": 0})]
    p = b.pooled(runs, tokens=100, flops=1e9, peak=None)
    assert p["alloc_events"] == {"num_alloc_retries": 3, "num_device_free": 5}
    assert p["peak_reserved_gib"] == 4.5 and p["alloc_conf"] == "expandable_segments:True"
    assert [r["alloc_events"]["num_alloc_retries"] for r in p["repeats"]] == [2, 1]


def test_gpu_telemetry_parsing_and_per_step_means():
    import sys
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from _gpu_telemetry import parse_sample, per_step
    assert parse_sample("1980, 512.34, 41\n") == (1980.0, 512.34, 41.0)
    assert parse_sample("1980, [N/A], 41") is None and parse_sample("") is None
    samples = [(0.05, 1980.0, 600.0, 40.0), (0.15, 1800.0, 700.0, 42.0),
               (0.18, 1600.0, 690.0, 44.0), (0.35, 1980.0, 500.0, 43.0)]
    # steps: (0, 0.1], (0.1, 0.2], (0.2, 0.3]
    got = per_step(samples, [0.0, 0.1, 0.2, 0.3])
    assert got["samples"] == [1, 2, 0]
    assert got["sm_mhz"] == [1980.0, 1700.0, None]
    assert got["power_w"] == [600.0, 695.0, None]
    assert got["temp_c"] == [40.0, 43.0, None]


def _telemetry_from_fake_smi(tmp_path, monkeypatch, lines: str, device_uuid: str, n: int):
    """GpuTelemetry over a stand-in nvidia-smi that prints `lines` every 20 ms until killed,
    closed once `n` samples came in."""
    import sys
    import time
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from _gpu_telemetry import GpuTelemetry
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\nwhile true; do printf '{lines}'; sleep 0.02; done\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    tel = GpuTelemetry(device_uuid, period_ms=20)
    t0 = time.time()
    while len(tel.samples) < n and time.time() - t0 < 10:
        time.sleep(0.02)
    tel.close()
    return tel


def test_gpu_telemetry_reads_a_sampler_in_the_background(tmp_path, monkeypatch):
    import time

    from _gpu_telemetry import GpuTelemetry
    # two GPUs; the one followed is given without nvidia-smi's "GPU-" prefix, as torch spells it
    tel = _telemetry_from_fake_smi(tmp_path, monkeypatch, "GPU-cc33-d4, 345, 80.0, 30\\n"
                                   "GPU-aa11-b2, 1755, 612.5, 47\\n", "AA11-B2", 3)
    n = len(tel.samples)
    assert n >= 3 and all(s[1:] == (1755.0, 612.5, 47.0) for s in tel.samples)
    assert all(a[0] <= b[0] for a, b in zip(tel.samples, tel.samples[1:]))  # host-stamped
    time.sleep(0.1)
    assert len(tel.samples) == n  # closed: nothing arrives any more
    assert GpuTelemetry("aa11-b2", period_ms=0).samples == []  # off


def test_gpu_telemetry_takes_the_only_gpu_whatever_its_uuid_spelling(tmp_path, monkeypatch):
    tel = _telemetry_from_fake_smi(tmp_path, monkeypatch, "GPU-ee55, 1980, 700.0, 50\\n",
                                   "UUID('not-the-same-spelling')", 2)
    assert len(tel.samples) >= 2 and tel.samples[0][1:] == (1980.0, 700.0, 50.0)
