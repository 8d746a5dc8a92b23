"""CPU tests of `benchmarks/sft_throughput.py`: `--repeats` (the ABBA order, the pooled figures),
the allocator settings per variant, and the GPU telemetry plumbing (`_gpu_telemetry.py`, with a
stand-in nvidia-smi)."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


@pytest.mark.slow
def test_gc_pause_counts_timed_steps_collections_and_writes_results(tmp_path):
    """`gc_pause.py` on CPU: under the trainer's schedule the timed steps see no automatic
    collection (its interval is not reached in 4 steps) and the loop's objects start frozen;
    the file is written through `write_results` (date, device)."""
    spec = importlib.util.spec_from_file_location(
        "gc_pause", os.path.join(ROOT, "benchmarks", "gc_pause.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "gc.json"
    assert mod.main(["--tiny", "--llm-layers", "1", "--vision-layers", "1", "--warmup", "1",
                     "--iters", "3", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["date"] and res["cpu_cores"] == os.cpu_count()
    auto, sched = res["modes"]["automatic"], res["modes"]["scheduled"]
    assert auto["gc_interval"] == 0 and sched["gc_interval"] == 50
    assert sched["collections_by_generation"] == {"0": 0, "1": 0, "2": 0}
    assert sched["collection_ms_total"] == 0.0 and sched["frozen_objects"] > 0
    assert sched["tracked_objects"] < auto["tracked_objects"]
    for r in (auto, sched):
        assert r["step_ms_min"] <= r["step_ms_median"] and r["host_queue_ms"] > 0


def _result(llm, vision, steps_ms, peaks_gib, seq=2048):
    return {"config": {"llm_layers": llm, "vision_layers": vision, "samples": 4, "seq": seq,
                       "image": 448, "recompute": "none", "tiny": False, "iters": 8,
                       "variants": ",".join(steps_ms), "out": "x.json"},
            "variants": {n: {"step_s": ms / 1e3, "peak_mem_gib": peaks_gib[n]}
                         for n, ms in steps_ms.items()}}


def test_depth_cost_gives_added_cost_per_layer_and_refuses_other_differences(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "depth_cost", os.path.join(ROOT, "benchmarks", "depth_cost.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    shallow = _result(4, 8, {"hf": 190.0, "ovlt_bf16": 114.0, "ovlt_fp8_delayed": 87.0},
                      {"hf": 32.0, "ovlt_bf16": 40.0, "ovlt_fp8_delayed": 42.0})
    deep = _result(16, 32, {"hf": 550.0, "ovlt_bf16": 384.0, "ovlt_fp8_delayed": 276.0},
                   {"hf": 70.0, "ovlt_bf16": 100.0, "ovlt_fp8_delayed": 102.0})
    res = mod.depth_cost(shallow, deep)
    assert res["added_llm_layers"] == 12 and res["added_vision_layers"] == 24
    bf16 = res["variants"]["ovlt_bf16"]
    assert bf16["added_ms"] == pytest.approx(270.0)          # 384 - 114
    assert bf16["ms_per_llm_layer"] == pytest.approx(22.5)   # 270 / 12
    assert bf16["gib_per_llm_layer"] == pytest.approx(5.0)   # (100 - 40) / 12
    assert bf16["fixed_gib"] == pytest.approx(20.0)          # 40 - 4 * 5
    assert res["ratios"]["hf / ovlt_bf16"] == pytest.approx(360 / 270, abs=1e-3)
    assert res["ratios"]["ovlt_bf16 / ovlt_fp8_delayed"] == pytest.approx(270 / 189, abs=1e-3)
    with pytest.raises(ValueError, match="seq"):
        mod.depth_cost(shallow, _result(16, 32, {"hf": 1.0}, {"hf": 1.0}, seq=4096))
    with pytest.raises(ValueError, match="LLM layers"):
        mod.depth_cost(deep, shallow)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(shallow))
    b.write_text(json.dumps(deep))
    assert mod.main([str(a), str(b)]) == 0
    assert json.loads(capsys.readouterr().out)["variants"]["hf"]["added_ms"] == 360.0
    b.write_text(json.dumps({"variants": {}}))
    assert mod.main([str(a), str(b)]) == 2
    assert "no field 'config'" in capsys.readouterr().err
