"""CPU tests of `benchmarks/grpo_recipe.py`: the response-length law, the exact-length engine
wrapper (per-request caps, EOS ignored, per-sample seeds), the 8xH100 extrapolation against
hand-computed numbers, and (slow) the whole --tiny run and its results file."""
import importlib.util
import json
import math
import os
import statistics
import sys
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench():
    spec = importlib.util.spec_from_file_location(
        "grpo_recipe", os.path.join(ROOT, "benchmarks", "grpo_recipe.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_response_lengths_follow_the_capped_lognormal():
    b = _bench()
    n = 640
    lens = b.lognormal_lengths(n, 500.0, 0.6, 2048, seed=17)
    assert lens == b.lognormal_lengths(n, 500.0, 0.6, 2048, seed=17)  # the same draw every time
    assert lens != sorted(lens) and max(lens) <= 2048 and min(lens) >= 1
    assert abs(statistics.median(lens) - 500) <= 3
    # mean of the capped law: 500 e^(s^2/2) minus what the cap removes (~1 % above 2048)
    assert 585 < sum(lens) / n < 600
    p95 = sorted(lens)[int(0.95 * n)]
    assert abs(p95 - 500 * math.exp(0.6 * 1.6449)) < 25
    # P(X > 2048) = 1 - Phi(ln(2048 / 500) / 0.6) = 0.0094: those responses sit at the cap
    assert abs(sum(x == 2048 for x in lens) - n * 0.0094) <= 1.5


class _FakeEngine:
    """Completions of exactly each request's cap (as an engine that honours it), or of the
    call's cap (`per_request=False`: one that ignores per-request caps)."""

    def __init__(self, per_request=True):
        self.calls, self.per_request = [], per_request

    def generate(self, requests, params, on_complete=None):
        from ovlt.rollout.base import Completion
        self.calls.append((requests, params))
        out = []
        for i, r in enumerate(requests):
            cap = r.max_new_tokens if self.per_request else params.max_new_tokens
            out.append([Completion(request_id=r.request_id, token_ids=[7] * cap,
                                   logprobs=[0.0] * cap, text="x", finish_reason="length",
                                   index=j) for j in range(params.n)])
            for c in out[-1]:
                if on_complete:
                    on_complete(i, c)
        return out


def _reqs(k):
    from ovlt.rollout.base import GenerationRequest
    return [GenerationRequest(prompt_ids=[1, 2, 3], request_id=f"p{i}") for i in range(k)]


def test_exact_lengths_per_prompt_and_per_sample():
    from ovlt.rollout.base import SamplingParams, request_seeds
    b = _bench()
    lengths = [[5, 5], [9, 9], [3, 3]]
    eng = _FakeEngine()
    w = b.ExactLengths(eng, lengths, "prompt")
    seen = []
    sp = SamplingParams(n=2, max_new_tokens=50, seed=11)
    out = eng.generate(_reqs(3), sp, on_complete=lambda i, c: seen.append((i, len(c.token_ids))))
    reqs, params = eng.calls[-1]
    assert [r.max_new_tokens for r in reqs] == [5, 9, 3] and params.ignore_eos and params.n == 2
    assert [[len(c.token_ids) for c in cs] for cs in out] == lengths and w.mismatches == 0
    assert sorted(seen) == sorted((i, lengths[i][0]) for i in range(3) for _ in range(2))

    lengths = [[4, 6], [8, 2]]
    eng = _FakeEngine()
    w = b.ExactLengths(eng, lengths, "sample")
    seen = []
    out = eng.generate(_reqs(2), sp, on_complete=lambda i, c: seen.append((i, c.index)))
    reqs, params = eng.calls[-1]
    base = request_seeds(_reqs(2), sp)
    assert params.n == 1 and params.ignore_eos
    assert [r.max_new_tokens for r in reqs] == [4, 6, 8, 2]
    assert [r.seed for r in reqs] == [base[0], base[0] + 1, base[1], base[1] + 1]
    assert [[len(c.token_ids) for c in cs] for cs in out] == lengths
    assert [[c.index for c in cs] for cs in out] == [[0, 1], [0, 1]]
    assert sorted(seen) == [(0, 0), (0, 1), (1, 0), (1, 1)] and w.mismatches == 0
    assert w.truncated == 0

    eng = _FakeEngine(per_request=False)  # decodes everything to the largest length
    w = b.ExactLengths(eng, lengths, "sample")
    seen = []
    out = eng.generate(_reqs(2), sp, on_complete=lambda i, c: seen.append(len(c.token_ids)))
    assert eng.calls[-1][1].max_new_tokens == 8
    assert [[len(c.token_ids) for c in cs] for cs in out] == lengths
    assert sorted(seen) == [2, 4, 6, 8] and w.truncated == 3 and w.mismatches == 0


def test_extrapolation_at_full_depth_is_measured_plus_communication():
    """Measured at 28 layers on an H100: every scaling ratio is 1, so the estimate is the
    measured phases plus the DP reduce-scatter / all-gather, computed here by hand."""
    b = _bench()
    args = SimpleNamespace(engine_slots=0, recipe_gpus=8, nccl_busbw=340.0, update_samples=80,
                           easyr1_step_s=145.0)
    prep = {"prompt_tokens_mean": 450.0, "lengths": [[600] * 5] * 64, "image_grid": [1, 36, 36],
            "response_tokens_mean": 600.0}
    summ = {"phases": {"rollout": 20.0, "reward": 0.5, "logprob": 6.0, "update": 15.0,
                       "sync": 0.0}}
    e = b.extrapolate(args, prep, summ, "NVIDIA H100 80GB HBM3", 28)
    h, f, v, kv = 3584, 18944, 152064, 512
    params = 28 * (h * (h + 2 * kv) + h * h + 3 * h * f) + 2 * v * h
    comm = 4 * 6 * params * 7 / 8 / 340e9
    assert e["phases_s"]["dp_grad_reduce_scatter_param_all_gather"] == pytest.approx(comm)
    assert e["step_s_8xh100"] == pytest.approx(41.5 + comm)
    assert e["ratio"] == pytest.approx((41.5 + comm) / 145.0)
    for k in ("rollout_bytes_ratio", "logprob_flops_ratio", "update_flops_ratio"):
        assert e["factors"][k] == pytest.approx(1.0)
    # at 8 layers every depth-scaled phase grows, by less than 28 / 8 (fixed LM head, tower)
    e8 = b.extrapolate(args, prep, summ, "NVIDIA H100 80GB HBM3", 8)
    for k in ("rollout_bytes_ratio", "logprob_flops_ratio", "update_flops_ratio"):
        assert 1.5 < e8["factors"][k] < 3.5
    eh = b.extrapolate(args, prep, summ, "NVIDIA H200", 8)
    assert eh["phases_s"]["rollout"] == pytest.approx(e8["phases_s"]["rollout"] * 4.8 / 3.35)

    # a rollout measured with all 28 layers replaces the scaled one (bandwidth still applies)
    full = {"llm_layers": 28, "rollout_s": 33.0}
    ef = b.extrapolate(args, prep, summ, "NVIDIA H100 80GB HBM3", 8, full)
    assert ef["rollout_measured_at_28_layers"] and ef["factors"]["rollout_bytes_ratio"] is None
    assert ef["phases_s"]["rollout"] == pytest.approx(33.0)
    others = sum(x for k, x in e8["phases_s"].items() if k != "rollout")
    assert ef["step_s_8xh100"] == pytest.approx(33.0 + others)
    assert b.extrapolate(args, prep, summ, "NVIDIA H200", 8, full)["phases_s"]["rollout"] == \
        pytest.approx(33.0 * 4.8 / 3.35)
    # the tower's cost counts the images it encoded in each phase: with none (all cached, or
    # no images), the update's forward + backward and the log-prob passes scale alike
    # (3 F / 3 F, k F / k F), whatever the log-prob passes' share of the tokens
    tok = 600 * 5 * 64 + 450 * 320
    none = dict(summ, total_tokens=tok, logprob_old_tokens=tok * 3 // 4, logprob_ref_tokens=tok,
                vision_encodes_logprob=0, vision_encodes_update=0)
    en = b.extrapolate(args, prep, none, "NVIDIA H100 80GB HBM3", 8)["factors"]
    assert en["logprob_passes"] == pytest.approx(1.75)
    assert en["logprob_flops_ratio"] == pytest.approx(en["update_flops_ratio"])
    assert en["logprob_flops_ratio"] > e8["factors"]["logprob_flops_ratio"]
    some = dict(none, vision_encodes_logprob=128, vision_encodes_update=16)
    es = b.extrapolate(args, prep, some, "NVIDIA H100 80GB HBM3", 8)["factors"]
    assert es["vision_encodes"] == {"logprob": 128, "update": 16}
    assert e8["factors"]["logprob_flops_ratio"] < es["logprob_flops_ratio"] < en["logprob_flops_ratio"]
    # a side that ran fewer layers (a smoke run) is not taken as the full depth
    assert not b.extrapolate(args, prep, summ, "NVIDIA H100 80GB HBM3", 8,
                             {"llm_layers": 4, "rollout_s": 1.0})["rollout_measured_at_28_layers"]

@pytest.mark.slow
def test_tiny_run_writes_every_variant(tmp_path):
    out = tmp_path / "r.json"
    assert _bench().main(["--tiny", "--device", "cpu", "--steps", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    v = res["variants"]
    assert set(v) == {"ovlt_builtin", "ovlt_vllm", "trl_vllm"}
    b = v["ovlt_builtin"]
    assert "error" not in b and len(b["steps"]) == 2 and b["step_s"] > 0
    assert set(b["phases"]) == {"rollout", "reward", "logprob", "update", "sync"}
    assert len(b["per_step_peak_mem_gib"]) == 2 and b["tokens_per_s_per_gpu"] > 0
    for s in b["steps"]:
        assert s["updates"] == 2 and s["length_mismatches"] == 0
        assert s["generated_tokens"] == res["prep"]["response_tokens_per_step"]
        assert 0 < s["logprob_old_tokens"] < s["logprob_ref_tokens"]
        # the frozen tower encodes each prompt once per set of weights (policy, reference)
        assert s["vision_encodes_logprob"] + s["vision_encodes_update"] == 2 * res["config"]["prompts"]
    for k in ("ovlt_vllm", "trl_vllm"):  # no vLLM / TRL here: recorded, with the reason
        assert "not run" in v[k].get("skipped", "") or "error" in v[k] or v[k].get("step_s")
    assert "grpo.ref_mode=offload" in b["config_overrides"]  # what fits 28 layers on 80 GB
    e = res["recipe_extrapolation"]
    assert {"step_s_8xh100", "easyr1_step_s", "ratio", "formula"} <= set(e)
    full = res["ovlt_builtin_rollout_28_layers"]  # the engine alone (at the tiny depth here)
    assert full["rc"] == 0 and full["summary"]["rollout_s"] > 0
    assert full["summary"]["generated_tokens"] == res["prep"]["response_tokens_per_step"]
    assert not e["rollout_measured_at_28_layers"]  # 4 layers are not the recipe's 28


def test_rollout_full_depth_summary_times_steps_after_the_first():
    b = _bench()
    side = {"llm_layers": 28, "steps": [
        {"step": 1, "rollout_s": 90.0, "generated_tokens": 10, "engine_stats": {}},
        {"step": 2, "rollout_s": 30.0, "generated_tokens": 10, "engine_stats": {"steps": 5}},
        {"step": 3, "rollout_s": 34.0, "generated_tokens": 10, "engine_stats": {"steps": 5}}]}
    s = b.rollout_full_depth_summary(side)
    assert s["rollout_s"] == pytest.approx(32.0) and s["first_rollout_s"] == 90.0
    assert s["timed_steps"] == [2, 3] and s["llm_layers"] == 28
    assert b.rollout_full_depth_summary({"steps": []}) is None


def test_kernel_classes_of_the_post_rollout_profile():
    from benchmarks._grpo_bench import kernel_class
    assert kernel_class("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT") == "gemm"
    assert kernel_class("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "gemm"
    assert kernel_class("void flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128>>") == "attention"
    assert kernel_class("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, "
                        "64, 4, false, false, cutlass::bfloat16_t>>") == "attention"
    assert kernel_class("_fused_grpo_loss_fn") == "other"
    assert kernel_class("triton_poi_fused_add_mul_0") == "inductor"
    assert kernel_class("Memcpy DtoD (Device -> Device)") == "copy"
    assert kernel_class("void at::native::vectorized_elementwise_kernel<4, ...>") == "other"


def test_profile_regions_split_kernels_and_idle_time_at_the_markers():
    from benchmarks._grpo_bench import region_summary
    spin = "void at::cuda::(anonymous namespace)::spin_kernel(long)"
    # (start, end, name) in us: "old" holds a nested "tower"; a kernel outside every region
    kern = [(0, 10, "k_before"),
            (20, 21, spin), (25, 35, "nvjet_gemm_a"),          # + old, 4 us idle
            (35, 36, spin), (36, 46, "vit_kernel"),            # + tower, no gap
            (50, 51, spin), (60, 80, "nvjet_gemm_a"),          # - tower, 9 us idle (old)
            (80, 81, spin),                                    # - old
            (100, 101, spin), (101, 111, "flash_fwd"), (111, 112, spin)]   # + ref ... - ref
    marks = [("+", "old"), ("+", "tower"), ("-", "tower"), ("-", "old"), ("+", "ref"),
             ("-", "ref")]
    r = region_summary(kern, marks)
    assert set(r) == {"other", "old", "tower", "ref"}
    assert r["old"]["kernels"] == 2 and r["old"]["gpu_busy_s"] == pytest.approx(30e-6)
    assert r["old"]["idle_s"] == pytest.approx(13e-6)  # 21 -> 25 and 51 -> 60
    assert r["old"]["by_class_ms"] == {"gemm": {"ms": pytest.approx(0.03), "count": 2}}
    assert r["tower"]["kernels"] == 1 and r["tower"]["idle_s"] == 0.0
    assert r["ref"]["by_class_ms"]["attention"]["count"] == 1
    assert r["other"]["kernels"] == 1 and r["other"]["idle_s"] == 0.0
    # markers on the GPU that do not match the ones queued: no regions rather than wrong ones
    assert region_summary(kern, marks[:-1]) == {}


def test_timed_steps_leave_out_the_first_and_the_profiled_one():
    from benchmarks._grpo_bench import finished_steps
    steps = [{"step": i, "step_s": 10.0 + i} for i in (1, 2, 3, 4)]
    steps[2]["profile_after_rollout"] = {"wall_s": 20.0}
    steps.append({"step": 5, "error": "boom"})
    done, timed = finished_steps({"steps": steps})
    assert [s["step"] for s in done] == [1, 2, 3, 4] and [s["step"] for s in timed] == [2, 4]
    assert [s["step"] for s in finished_steps({"steps": steps[:1]})[1]] == [1]
    # steps 1 and a profiled 3 only: the profiled step is all there is to time
    assert [s["step"] for s in finished_steps({"steps": [steps[0], steps[2]]})[1]] == [3]


def test_memory_sites_group_live_blocks_by_the_projects_innermost_frame():
    from benchmarks._grpo_bench import live_by_site, site_growth

    def block(size, state="active_allocated", files=()):
        return {"size": size, "state": state,
                "frames": [{"filename": f, "line": ln, "name": n} for f, ln, n in files]}
    torch_frame = ("/usr/lib/python3/site-packages/torch/nn/functional.py", 10, "linear")
    engine = ("/repo/ovlt/rollout/builtin.py", 269, "_decode_state")
    snap = {"segments": [
        {"blocks": [block(100, files=[torch_frame, engine]), block(50, "inactive", [engine])]},
        {"blocks": [block(30, files=[torch_frame]), block(7)]}]}
    sites = live_by_site(snap)
    assert sites == {"ovlt/rollout/builtin.py:269 _decode_state": 100,
                     "/usr/lib/python3/site-packages/torch/nn/functional.py:10 linear": 30,
                     "?": 7}
    later = dict(sites, **{"ovlt/rollout/builtin.py:269 _decode_state": 100 + 3 * 2 ** 20,
                           "?": 2})
    assert site_growth(sites, later) == [
        {"site": "ovlt/rollout/builtin.py:269 _decode_state", "mib": 3.0}]


def test_merge_results_unites_variants_run_one_per_run(tmp_path):
    b = _bench()
    cfg = {k: 1 for k in b.WORKLOAD_ARGS}

    def run(name, variants, **extra):
        r = {"date": "2026-12-07", "device": "NVIDIA H100", "config": dict(cfg), "prep":
             {"response_tokens_per_step": 190235}, "variants": variants, **extra}
        p = tmp_path / name
        p.write_text(json.dumps(r))
        return p

    ext = lambda s: {"step_s_8xh100": s, "ratio": s / 145.0, "easyr1_step_s": 145.0}  # noqa: E731

    def side(rollout_s):  # the engine alone at full depth, one timed rollout
        return {"steps": [{"step": 1, "rollout_s": rollout_s, "generated_tokens": 190235}],
                "summary": {"rollout_s": rollout_s}}
    a = run("a.json", {"ovlt_builtin": {"step_s": 20.0, "tokens_per_s_per_gpu": 300.0,
                                        "recipe_extrapolation": ext(75.0)},
                       "ovlt_vllm": {"skipped": "no vllm"}, "trl_vllm": {"skipped": "no trl"}},
            ovlt_builtin_rollout_28_layers=side(34.0))
    v = run("v.json", {"ovlt_vllm": {"step_s": 18.0, "tokens_per_s_per_gpu": 330.0,
                                     "recipe_extrapolation": ext(70.0)},
                       "ovlt_builtin": {"skipped": "budget"}},
            ovlt_vllm_rollout_28_layers=side(25.0))
    cut = run("c.json", {"trl_vllm": {"rc": "timeout", "wall_seconds": 419.0, "log_tail": "..."}})
    assert "rc=timeout after 419 s" in b.merge_results([a, cut])["variants"]["trl_vllm"]["not_timed"]
    t = run("t.json", {"trl_vllm": {"step_s": 60.0, "tokens_per_s_per_gpu": 100.0}})
    res = b.merge_results([a, v, t])
    assert res["variants"]["ovlt_builtin"]["step_s"] == 20.0       # a skip never replaces a run
    assert res["variants"]["ovlt_vllm"]["step_s"] == 18.0          # a run replaces a skip
    assert res["variants"]["trl_vllm"]["step_s"] == 60.0
    assert res["ovlt_builtin_rollout_28_layers"]["summary"]["rollout_s"] == 34.0
    assert res["ovlt_vllm_rollout_28_layers"]["summary"]["rollout_s"] == 25.0
    assert res["recipe_extrapolation"]["from_variant"] == "ovlt_vllm"
    assert res["recipe_extrapolation"]["step_s_8xh100"] == 70.0
    assert res["comparison_vs_trl_vllm"] == {"ovlt_builtin": {"tokens_per_s_ratio": 3.0},
                                             "ovlt_vllm": {"tokens_per_s_ratio": 3.3}}
    assert [m["file"] for m in res["merged_from"]] == ["a.json", "v.json", "t.json"]
    merged = tmp_path / "m.json"
    merged.write_text(json.dumps(res))
    later = run("b2.json", {"ovlt_builtin": {"step_s": 19.0, "tokens_per_s_per_gpu": 310.0}})
    again = b.merge_results([merged, later])  # a merge merged again lists the original runs
    assert [m["file"] for m in again["merged_from"]] == ["a.json", "v.json", "t.json", "b2.json"]
    assert again["variants"]["ovlt_builtin"]["step_s"] == 19.0
    assert again["variants"]["trl_vllm"]["step_s"] == 60.0
    # a later run whose vLLM variant finished its first step only, and whose full-depth side
    # timed out before a rollout: the step is flagged, the earlier side's rollout is kept
    cold = run("v2.json", {"ovlt_vllm": {"step_s": 93.0, "timed_steps": [1],
                                         "tokens_per_s_per_gpu": 100.0}},
               ovlt_vllm_rollout_28_layers={"rc": "timeout", "wall_seconds": 143.0})
    res2 = b.merge_results([merged, cold])
    assert "only the first step finished" in res2["variants"]["ovlt_vllm"]["NOTE"]
    assert "NOTE" not in res2["variants"]["ovlt_builtin"]
    assert res2["ovlt_vllm_rollout_28_layers"]["summary"]["rollout_s"] == 25.0
    later_side = run("v3.json", {"ovlt_vllm": {"skipped": "budget"}},
                     ovlt_vllm_rollout_28_layers=side(30.0))
    assert b.merge_results([merged, later_side])["ovlt_vllm_rollout_28_layers"] == side(30.0)
    other = run("o.json", {"trl_vllm": {"step_s": 1.0}})
    r = json.loads(other.read_text())
    r["config"]["llm_layers"] = 16
    other.write_text(json.dumps(r))
    with pytest.raises(SystemExit, match="llm_layers"):
        b.merge_results([a, other])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SystemExit, match="bad.json: not a readable results file"):
        b.merge_results([a, tmp_path / "bad.json"])
    (tmp_path / "other.json").write_text(json.dumps({"steps": []}))
    with pytest.raises(SystemExit, match="other.json: not a grpo_recipe results file"):
        b.merge_results([tmp_path / "other.json"])
    with pytest.raises(SystemExit, match="missing.json: not a readable"):
        b.merge_results([tmp_path / "missing.json"])


def test_hf_dirs_carry_the_image_processor_vllm_builds_from(tmp_path):
    """The config-only directory (ovlt's vLLM engine) and the weights directory (TRL's vLLM)
    both hold preprocessor_config.json with the run's pixel bounds."""
    b = _bench()
    args = SimpleNamespace(tiny=True, device="cpu", min_pixels=3136, max_pixels=12544)
    info = b.write_hf(args, tmp_path, weights=True)
    assert info["params"] > 0
    for d in ("hf_config", "hf"):
        pp = json.loads((tmp_path / d / "preprocessor_config.json").read_text())
        assert (pp.get("min_pixels"), pp.get("max_pixels")) == (3136, 12544) or \
            pp["size"] == {"shortest_edge": 3136, "longest_edge": 12544}, pp
        assert (tmp_path / d / "config.json").exists() and (tmp_path / d / "tokenizer.json").exists()


def test_full_depth_vllm_reads_a_28_layer_config_directory(tmp_path):
    """vLLM's 28-layer rollout loads dummy weights of the shape its directory states: the
    recipe's depth and the 7B widths, with the tokenizer and the image processor beside."""
    import dataclasses
    b = _bench()
    args = b.main.__globals__["argparse"].Namespace(
        tiny=False, llm_layers=8, vision_layers=32, device="cpu", min_pixels=3136,
        max_pixels=262144)
    m = dataclasses.replace(b.model_cfg(args), num_layers=28)
    b.write_config_dir(args, m, tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    assert text["num_hidden_layers"] == 28 and text["hidden_size"] == 3584
    pre = json.loads((tmp_path / "d" / "preprocessor_config.json").read_text())
    assert pre["size"] == {"longest_edge": 262144, "shortest_edge": 3136}
    assert (tmp_path / "d" / "tokenizer_config.json").exists()


def test_full_depth_vllm_rollouts_stay_awake_and_drop_caches(tmp_path, monkeypatch):
    """vLLM's rollout alone (here a recording stand-in for `vllm.LLM` that decodes each request
    to its cap): every rep decodes the step's exact lengths, the engine is never put to a
    level-2 sleep (which would discard its dummy weights) and its prefix / encoder caches are
    dropped after each rep, as a weight update drops them in the trainer."""
    import types

    from tests.unit.test_vllm_engine_unit import _FakeLLM, _FakeSP, _Logprob

    class CappedLLM(_FakeLLM):
        made = []

        def __init__(self, **kw):
            super().__init__(**kw)
            CappedLLM.made.append(self)

        def generate(self, prompts, sps, use_tqdm=True):
            self.calls.append(("generate", len(prompts)))
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(
                index=j, token_ids=[7] * sp.kw["max_tokens"], text="x", finish_reason="length",
                logprobs=[{7: _Logprob(-1.0)}] * sp.kw["max_tokens"]) for j in range(sp.kw["n"])])
                for sp in sps]

    mod = types.ModuleType("vllm")
    mod.__version__, mod.LLM, mod.SamplingParams = "0.26.0", CappedLLM, _FakeSP
    monkeypatch.setitem(sys.modules, "vllm", mod)
    import ovlt.rollout as rollout_mod
    monkeypatch.setattr(rollout_mod, "vllm_available", lambda: True)
    monkeypatch.setattr(rollout_mod, "_VLLM_ENGINES", {})
    b = _bench()
    wd, out = tmp_path / "wd", tmp_path / "r.json"
    base = ["--tiny", "--device", "cpu", "--workdir", str(wd), "--keep-workdir", "--out", str(out)]
    assert b.main(base + ["--variants", ""]) == 0  # the workload only
    side = b.FULL_DEPTH["ovlt_vllm"]
    assert b.main(base + ["--variant", side, "--llm-layers", "4", "--rollout-reps", "2"]) == 0
    res = json.loads((wd / f"variant_{side}.json").read_text())
    prep = json.loads((wd / "prep.json").read_text())
    assert [s["step"] for s in res["steps"]] == [1, 2]
    for s in res["steps"]:
        assert s["generated_tokens"] == prep["response_tokens_per_step"]
        assert s["length_mismatches"] == 0 and s["lengths_truncated_by_benchmark"] == 0
    (llm,) = CappedLLM.made
    assert llm.kw["gpu_memory_utilization"] == 0.6
    names = [c[0] for c in llm.calls]
    assert "sleep" not in names
    assert names == ["generate", "reset_prefix_cache", "reset_encoder_cache"] * 2
    cfg = json.loads((wd / "hf_config_4_layers" / "config.json").read_text())
    assert cfg.get("text_config", cfg)["num_hidden_layers"] == 4


def test_sampler_vs_trainer_gap_from_ovlt_steps_and_trl_logs():
    b = _bench()
    timed = [{"engine_logprob_diff_mean": 0.01, "engine_logprob_diff_max": 0.5},
             {"engine_logprob_diff_mean": 0.03, "engine_logprob_diff_max": 0.2},
             {"engine_logprob_diff_mean": 0.02, "engine_logprob_diff_max": 0.9}]
    assert b.sampler_trainer_gap({}, timed) == {"sampler_vs_trainer": {
        "logprob_diff_mean": 0.02, "logprob_diff_max": 0.9}}
    trl = {"trl_logs": [
        {"loss": 0.0, "sampling/sampling_logp_difference/mean": 1.5,
         "sampling/sampling_logp_difference/max": 8.0,
         "sampling/importance_sampling_ratio/mean": 0.0},
        {"loss": 0.0, "step_time": 25.0},  # an optimizer step without a generation
        {"sampling/sampling_logp_difference/mean": 1.7, "sampling/sampling_logp_difference/max": 9.0}]}
    gap = b.sampler_trainer_gap(trl, [])["sampler_vs_trainer"]
    assert gap["logprob_diff_mean"] == pytest.approx(1.6) and gap["logprob_diff_max"] == 9.0
    assert gap["trl_importance_sampling_ratio_mean"] == 0.0
    assert b.sampler_trainer_gap({}, [{}]) == {}
    assert b.as_number("1e-06") == 1e-6 and b.as_number(3) == 3.0
    assert b.as_number("abc") is None and b.as_number(True) is None


def test_device_used_peak_keeps_the_largest_reading_between_start_and_stop():
    """The sampler thread's peak over readings that rise and fall (a stand-in for the NVML
    reading, which needs a GPU): the highest one, in GiB."""
    import time

    from benchmarks._grpo_bench import DeviceUsedPeak
    readings = iter([1, 5, 9, 3] + [2] * 10_000)

    class Scripted(DeviceUsedPeak):
        def _used(self):
            return next(readings) * 2 ** 30

    d = Scripted(period_s=0.001)
    d.start()
    time.sleep(0.05)
    assert d.stop() == 9.0
    assert d._thread is None

    class NoNvml(DeviceUsedPeak):  # a machine without the NVML library: no reading, no thread
        def _used(self):
            raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    d = NoNvml()
    d.start()
    assert d._thread is None and d.stop() is None


def test_trl_step_from_its_own_log_when_the_run_is_cut_short():
    """TRL's optimizer-step log (as the H100 run cut at 419 s logged it, then a second
    generation): a step = the last generation's optimizer step + 3 updates at the median."""
    b = _bench()
    gen = lambda t: {"step_time": t, "completions/mean_length": 594.5, "loss": 0.0}  # noqa: E731
    upd = lambda t: {"step_time": t, "loss": 0.0}  # noqa: E731
    side = {"trl_logs": [gen(107.6), upd(25.33), upd(26.31), upd(26.0), gen(60.0)]}
    est = b.trl_step_from_logs(side, 4)
    assert est["step_s"] == pytest.approx(60.0 + 3 * 26.0) and est["warm"]
    prep = {"response_tokens_per_step": 1000, "lengths": [[5, 5], [5, 5]], "prompt_tokens_mean": 10.0}
    out = b.summarize(side, prep, 4)
    assert out["step_s"] == pytest.approx(138.0)
    assert out["tokens_per_s_per_gpu"] == pytest.approx((1000 + 4 * 10.0) / 138.0)
    # one generation only: its (cold) step, used since no step finished at all
    cold = {"trl_logs": side["trl_logs"][:3]}
    assert b.summarize(cold, prep, 4)["step_s"] == pytest.approx(107.6 + 3 * 25.82)
    assert est["step_s_lower_bound"] == pytest.approx(4 * 26.0)  # 4 updates, no generation
    assert b.trl_step_from_logs({"trl_logs": [upd(1.0)]}, 4) is None
    assert b.summarize({}, prep, 4) is None


def test_a_cut_trl_run_read_back_from_its_printed_log_tail(tmp_path):
    """A TRL run saved before its logs were kept one by one: the merge reads its optimizer
    steps from the console lines in `log_tail` (literals only) and compares against them."""
    b = _bench()
    tail = ("Capturing CUDA graphs ...\n"
            "{'loss': '0', 'completions/mean_length': '594.5', 'step_time': '107.6', 'epoch': '0.125'}\n"
            "{'loss': '0', 'grad_norm': '0', 'step_time': '25.33', 'epoch': '0.25'}\n"
            "{'loss': '0', 'step_time': __import__('os').getpid()}\n"   # not a literal: skipped
            "{'loss': '0', 'grad_norm': '0', 'step_time': '26.31', 'epoch': '0.375'}\n"
            "Terminated")
    logs = b.trl_logs_from_text(tail)
    assert [x["step_time"] for x in logs] == [107.6, 25.33, 26.31]
    assert logs[0]["completions/mean_length"] == 594.5
    cfg = {k: 1 for k in b.WORKLOAD_ARGS}
    cfg.update(prompts=64, samples=5, update_samples=80)   # 4 updates a step
    prep = {"response_tokens_per_step": 1000, "lengths": [[5, 5], [5, 5]], "prompt_tokens_mean": 10.0}

    def run(name, variants):
        p = tmp_path / name
        p.write_text(json.dumps({"date": "2026-12-07", "device": "NVIDIA H100", "config": cfg,
                                 "prep": prep, "variants": variants}))
        return p

    a = run("a.json", {"ovlt_builtin": {"step_s": 20.0, "tokens_per_s_per_gpu": 52.0}})
    t = run("t.json", {"trl_vllm": {"rc": "timeout", "wall_seconds": 419.0, "log_tail": tail}})
    res = b.merge_results([a, t])
    trl = res["variants"]["trl_vllm"]
    step = 107.6 + 3 * (25.33 + 26.31) / 2
    assert trl["step_s"] == pytest.approx(step) and "not_timed" not in trl
    assert trl["tokens_per_s_per_gpu"] == pytest.approx(1040 / step)
    cmp = res["comparison_vs_trl_vllm"]["ovlt_builtin"]
    assert cmp["tokens_per_s_ratio"] == pytest.approx(52.0 / (1040 / step))
    low = 4 * (25.33 + 26.31) / 2
    assert cmp["tokens_per_s_ratio_vs_trl_lower_bound"] == pytest.approx(52.0 / (1040 / low))


def test_memory_at_28_layers_from_the_measured_phase_peaks():
    """The per-GPU memory of the recipe's step at 28 layers, DP=8, from phase peaks measured at
    8 layers on one GPU: Qwen2.5-VL-7B's parameter counts, then each phase by hand."""
    b = _bench()
    layer, trained28, tower = b.param_counts(b.recipe_model_cfg())
    assert (layer, trained28, tower) == (233_046_016, 7_615_283_200, 676_034_560)  # 7B: 0.68B tower
    G = 2.0 ** 30
    trained8 = 8 * layer + 2 * 152064 * 3584
    model8, model28 = 2 * (trained8 + tower), 2 * (trained28 + tower)
    step = {"phase_peak_mem_gib": {"rollout": 64.0, "logprob": 51.0, "update": 70.0},
            "mem_after_step_gib": 47.0}
    res = {"config": {"llm_layers": 8, "recipe_gpus": 8, "micro_batch_tokens": 8192},
           "gpu_memory_gib": 80.0,
           "variants": {"ovlt_builtin": {"llm_layers": 8, "config_overrides": ["grpo.ref_mode=memory"],
                                         "steps": [{"step": 1}, dict(step, step=2)]}},
           "ovlt_builtin_rollout_28_layers": {"steps": [{"peak_mem_gib": 60.0}, {"peak_mem_gib": 64.5}]}}
    m = b.memory_at_full_depth(res, "ovlt_builtin")
    other = 47 * G - (model8 + 12 * trained8 + model8)
    act = (70 * G - 47 * G - 4 * trained8) * 28 / 8
    kv = 64.5 * G - model28
    base = {"memory": model28 + 12 * trained28 / 8 + other + model28,
            "offload": model28 + 12 * trained28 / 8 + other}
    for mode in ("memory", "offload"):
        got = m[f"ref_{mode}"]
        assert got["peak_gib"]["update"] == pytest.approx((base[mode] + 4 * trained28 + act) / G)
        assert got["peak_gib"]["rollout"] == pytest.approx((base[mode] + kv) / G)
        # the reference is on the device for its pass in both modes
        assert got["peak_gib"]["logprob"] == pytest.approx(
            (base["memory"] + 51 * G - 47 * G) / G)
        room = 0.97 * 80 * G - base[mode] - 4 * trained28
        assert got["update_micro_batch_tokens_that_fit"] == int(room / act * 8192)
    assert not m["ref_memory"]["fits"]                      # 7B's reference + KV: over 80 GB
    assert m["ref_memory"]["headroom_gib"] == pytest.approx(
        80 - max(m["ref_memory"]["peak_gib"].values()))
    assert m["ref_offload"]["peak_gib"]["rollout"] < 80 < m["ref_offload"]["peak_gib"]["update"]
    # measured with the reference offloaded: its weights are not in the step's resident memory
    res["variants"]["ovlt_builtin"]["config_overrides"].append("grpo.ref_mode=offload")
    m2 = b.memory_at_full_depth(res, "ovlt_builtin")
    assert m2["measured_ref_mode"] == "offload"
    assert m2["ref_offload"]["peak_gib"]["update"] == pytest.approx(
        m["ref_offload"]["peak_gib"]["update"] + model8 / G)
    assert b.memory_at_full_depth({"variants": {}}, "ovlt_builtin") is None


def test_merge_keeps_trl_across_the_ovlt_only_arguments(tmp_path):
    """Runs before `--ref-mode` existed held the reference in memory. New ovlt runs (reference
    offloaded, smaller micro-batches) replace the old ovlt variants; the old TRL variant (which
    reads neither argument) stays; an old ovlt variant left over is refused by name."""
    b = _bench()
    old_cfg = {k: 1 for k in b.WORKLOAD_ARGS if k != "ref_mode"}
    old_cfg["micro_batch_tokens"] = 8192
    new_cfg = dict(old_cfg, micro_batch_tokens=4096, ref_mode="offload")

    def run(name, cfg, variants):
        p = tmp_path / name
        p.write_text(json.dumps({"date": "2026-12-07", "device": "NVIDIA H100", "config": cfg,
                                 "prep": {"response_tokens_per_step": 190235}, "variants": variants}))
        return p

    old = run("old.json", old_cfg, {"ovlt_builtin": {"step_s": 26.0, "tokens_per_s_per_gpu": 300.0},
                                    "ovlt_vllm": {"step_s": 36.0, "tokens_per_s_per_gpu": 200.0},
                                    "trl_vllm": {"step_s": 185.0, "tokens_per_s_per_gpu": 40.0}})
    nb = run("nb.json", new_cfg, {"ovlt_builtin": {"step_s": 27.0, "tokens_per_s_per_gpu": 290.0}})
    with pytest.raises(SystemExit, match="ovlt_vllm of .*old.json is not the workload of .*nb.json"):
        b.merge_results([old, nb])
    nv = run("nv.json", new_cfg, {"ovlt_vllm": {"step_s": 35.0, "tokens_per_s_per_gpu": 210.0}})
    res = b.merge_results([old, nb, nv])
    assert {k: s["step_s"] for k, s in res["variants"].items()} == \
        {"ovlt_builtin": 27.0, "ovlt_vllm": 35.0, "trl_vllm": 185.0}
    assert res["config"]["ref_mode"] == "offload" and res["config"]["micro_batch_tokens"] == 4096
    # TRL is still held to the rest of the workload
    other = run("o.json", dict(old_cfg, llm_layers=16), {"trl_vllm": {"step_s": 1.0}})
    with pytest.raises(SystemExit, match="trl_vllm of .*o.json.*llm_layers"):
        b.merge_results([nb, nv, other])
