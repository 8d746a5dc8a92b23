"""Rollout throughput: ovlt built-in engine vs HF `generate`, the recipe-like length mix
(static batches vs continuous batching), and trainer -> engine weight update.

    python benchmarks/rollout.py --layers 28 --new 512 --out benchmarks/results/rollout_h100.json
    python benchmarks/rollout.py --tiny --out /tmp/rollout_tiny.json        # CPU smoke run

Same random-init model for both engines: Qwen2.5-VL with the 7B LLM shape cut to `--layers`
layers (the vision tower is irrelevant to text decoding and kept tiny), bf16. Prompts: `--batch`
random token sequences of `--prompt` tokens; `--new` tokens sampled at temperature 1.0 /
top-p 0.99 with EOS disabled, so every sequence decodes the full length in both engines.
The built-in engine reads the mcore-named parameters produced by the state-dict adapter from
the HF weights (the same tensors the trainer's model would hold).

Weight update: a full 7B-shaped mcore state dict (LLM + vision, bf16, on the GPU) streamed as
HF names through `mcore_to_hf` (the resharding path at TP=1) into `BuiltinEngine.update_weights`
(adapter -> in-place copy). In the trainer the built-in engine shares the parameters, so its
per-step sync is zero; this number is for loading weights from elsewhere.

Recipe-like length mix (`recipe_mix` in the results; `--mix-only` runs just this): one GPU's
share of an OpenVLThinker GRPO step, 64 prompts x 5 samples (temperature 1.0, top-p 0.99).
Response lengths: lognormal with median 500 tokens and sigma 0.6 (mean ~600, p95 ~1340),
capped at 2048 (the recipe's max response): R1-style chains of a 7B VLM early in GRPO
average ~400-700 tokens with a long right tail; drawn stratified (the quantiles
(k + 0.5) / 64, in a seeded order), one per prompt (the 5 samples of a prompt share it and
their prefill; `--length-unit sample` gives every sample its own request and length), the
same law as benchmarks/grpo_recipe.py. Each request decodes exactly its length (per-request
`max_new_tokens`, `ignore_eos`), so random weights give the real workload. Prompts: random
text of `--mix-prompt` tokens (448: the recipe's 324 image tokens at max_pixels + ~120 text;
the vision tower's cost is not measured here). Variants, same model and requests:
`static@S` (S slots, a batch waits for its longest sequence: the engine's old schedule) and
`continuous@S` (a finished sample's slot takes the next waiting one at once, and the tail runs
narrower steps once nothing waits); each reports new tokens/s, decode steps, ms per step, slot
occupancy, slot-steps run and peak memory. The KV cache and
the CUDA graph are set up before the timed call (`BuiltinEngine.reserve`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when imported (tests)
from _bench_util import wall_time  # noqa: E402
from _grpo_bench import lognormal_lengths  # noqa: E402  (the recipe's length law)


def build_hf(cfg, device):
    from transformers import Qwen2_5_VLForConditionalGeneration
    from ovlt.models.qwen2_5_vl.hf_config import to_hf_config
    hf_cfg = to_hf_config(cfg)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(hf_cfg, dtype=torch.bfloat16)
    with torch.no_grad():  # std 0.02 keeps bf16 activations sane through the layers
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
            else:
                p.fill_(1.0) if "norm" in name else p.zero_()
    return model.eval()


def model_cfg(args, layers=None):
    """The 7B shape cut to `layers` LLM layers (vision tower tiny: text decoding only), or
    the tiny test model with --tiny."""
    from ovlt.config import CONFIG_ROOT, load_config
    if args.tiny:
        return load_config(CONFIG_ROOT / "model" / "tiny.yaml").model
    cfg = load_config(CONFIG_ROOT / "model" / "qwen2_5_vl_7b.yaml").model
    if layers is not None:
        cfg.num_layers = layers
        cfg.vision.depth, cfg.vision.hidden_size, cfg.vision.intermediate_size = 1, 64, 128
        cfg.vision.num_heads, cfg.vision.fullatt_block_indexes = 1, [0]
    return cfg


def build_models(args):
    """(HF model, mcore-named module of its LLM weights, config): the same tensors."""
    from ovlt.models.qwen2_5_vl.state_dict_adapter import hf_to_mcore
    from ovlt.rollout.kv_decoder import params_module
    cfg = model_cfg(args, args.layers)
    hf = build_hf(cfg, args.device)
    sd = {k: v for k, v in hf.state_dict().items()}
    named = hf_to_mcore(sd, cfg, 0, 1, 0, 1)
    named = {k: v.contiguous() for k, v in named.items() if k.startswith("language_model.")}
    return hf, params_module(named), cfg


def bench_generate(args, res, hf, module, cfg):
    from ovlt.rollout.base import GenerationRequest, SamplingParams
    from ovlt.rollout.builtin import BuiltinEngine

    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 150000, (args.batch, args.prompt), generator=g)
    eos_never = 151645  # suppressed by min_new_tokens; sampled runs decode full length
    reqs = [GenerationRequest(prompt_ids=p.tolist()) for p in prompts]
    sp = SamplingParams(temperature=1.0, top_p=0.99, max_new_tokens=args.new, seed=0)
    for graphs in (True, False):
        eng = BuiltinEngine(module, cfg, eos_token_ids=[], max_batch_size=args.batch, cuda_graphs=graphs,
                            check_every=args.check_every)
        t_first, _ = wall_time(lambda: eng.generate(reqs, sp))  # includes graph capture
        dt, outs = wall_time(lambda: eng.generate(reqs, sp))
        n = sum(len(c.token_ids) for o in outs for c in o)
        key = "builtin_cuda_graphs" if graphs else "builtin_eager"
        res[key] = {"seconds": dt, "first_call_seconds": t_first, "new_tokens": n, "tokens_per_s": n / dt,
                    "ms_per_step": 1000 * dt / args.new}
        print(key, res[key], flush=True)
        if graphs:  # sampling's share: the same run with greedy decoding (no top-p sort)
            greedy = SamplingParams(temperature=0.0, max_new_tokens=args.new)
            dt, _ = wall_time(lambda: eng.generate(reqs, greedy))
            res["builtin_cuda_graphs_greedy"] = {"seconds": dt, "tokens_per_s": n / dt,
                                                 "ms_per_step": 1000 * dt / args.new}
            print("greedy", res["builtin_cuda_graphs_greedy"], flush=True)
    # Greedy agreement on the first tokens (bf16: long greedy runs may diverge on near-ties).
    eng = BuiltinEngine(module, cfg, eos_token_ids=[], max_batch_size=args.batch)
    g_ours = eng.generate(reqs[:4], SamplingParams(temperature=0.0, max_new_tokens=8))
    if not args.skip_hf:
        ids = prompts.to(args.device)
        hf.model.rope_deltas = None  # HF caches it across generate calls
        with torch.no_grad():
            g_hf = hf.generate(ids[:4], attention_mask=torch.ones_like(ids[:4]), do_sample=False,
                               max_new_tokens=8, eos_token_id=eos_never, pad_token_id=0)
        res["greedy_first8_match"] = [o[0].token_ids == g_hf[i, args.prompt:].tolist()
                                      for i, o in enumerate(g_ours)]
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_p=0.99,
                  max_new_tokens=args.new, min_new_tokens=args.new, eos_token_id=eos_never,
                  pad_token_id=0)
        with torch.no_grad():
            hf.model.rope_deltas = None
            hf.generate(ids[:8], **{**kw, "max_new_tokens": 8, "min_new_tokens": 8,
                                     "attention_mask": torch.ones_like(ids[:8])})
            hf.model.rope_deltas = None
            dt, out = wall_time(lambda: hf.generate(ids, **kw))
        n = (out.shape[1] - args.prompt) * args.batch
        res["hf_generate"] = {"seconds": dt, "new_tokens": n, "tokens_per_s": n / dt,
                              "ms_per_step": 1000 * dt / args.new}
        print("hf_generate", res["hf_generate"], flush=True)
        res["speedup_vs_hf"] = res["builtin_cuda_graphs"]["tokens_per_s"] / res["hf_generate"]["tokens_per_s"]


# ---------------------------------------------------------------------------------- one step
def bench_step(args, res, module, cfg):
    """One decode step by part, at several slot widths, every slot attending the mix's mean
    context (prompt + 300 tokens): the decode step (layers + LM head, one CUDA graph) with its
    pointwise work eager vs compiled (`LLMDecoder(compile=...)`), and the sampler at T=1 /
    top-p as the engine runs it. The top kernels of one step (outside
    a graph, so the profiler sees each launch) go in `top_kernels`."""
    from _bench_util import cuda_time
    from ovlt.rollout.kv_decoder import LLMDecoder
    from ovlt.rollout.sampling import sample_rows
    ctx = args.mix_prompt + 300
    widths = [int(w) for w in args.step_widths.split(",")]
    out = {"context_tokens": ctx, "top_p": args.mix_top_p, "widths": {}, "top_kernels": {}}
    for compile_decode in (False, True):
        d = LLMDecoder(module, cfg, compile=compile_decode)
        key = "compiled" if compile_decode else "eager"
        for w in widths:
            cache = d.new_cache(w, ctx + 16)
            tok = torch.randint(0, 150000, (w,), device=d.device)
            pos = torch.full((w,), ctx, dtype=torch.long, device=d.device)
            seeds = torch.arange(w, device=d.device)
            ctr = torch.zeros(w, dtype=torch.long, device=d.device)
            for _ in range(2):
                d.decode(tok, pos, pos, cache)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = d.decode(tok, pos, pos, cache)
            r = out["widths"].setdefault(str(w), {})
            r[f"ms_decode_graph_{key}"] = cuda_time(graph.replay, iters=20)
            if not compile_decode:
                r["ms_sample"] = cuda_time(lambda lg=logits: sample_rows(
                    lg, 1.0, top_p=args.mix_top_p, seeds=seeds, counters=ctr), iters=20)
            if w == max(widths):
                from torch.profiler import ProfilerActivity, profile
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    d.decode(tok, pos, pos, cache)
                    sample_rows(logits, 1.0, top_p=args.mix_top_p, seeds=seeds, counters=ctr)
                    torch.cuda.synchronize()
                ev = [e for e in prof.key_averages() if e.self_device_time_total > 0]
                ev.sort(key=lambda e: -e.self_device_time_total)
                out["top_kernels"][key] = {
                    "kernels": sum(e.count for e in ev),
                    "total_ms": sum(e.self_device_time_total for e in ev) / 1000,
                    "top": [{"name": e.key[:90], "count": e.count,
                             "ms": e.self_device_time_total / 1000} for e in ev[:14]]}
            del graph, cache, logits
            print("decode_step", w, r, flush=True)
        del d
        torch.cuda.empty_cache()
    res["decode_step"] = out


# ---------------------------------------------------------------------------------- sampling
def bench_sampling(args, res):
    """One decode step's sampling at T=1 / top-p 0.99 over [slots, vocab] fp32 logits, with
    the engine's banned ids: the engine's sampler (one fused kernel: the nucleus drawn by
    rejection, `ovlt.rollout.nucleus`) vs a draw after a sort-based top-p filter
    (`filter_logits`; vLLM's torch sampler sorts too)."""
    from ovlt.rollout.sampling import filter_logits, row_uniform, sample_rows
    V = 152064 if not args.tiny else 4096
    out = {"vocab": V, "top_p": 0.99}
    banned = torch.tensor([151652, 151653, 151655, 151656] if not args.tiny else [0],
                          device=args.device)
    for S in ([32, 64, 192, 320] if not args.tiny else [4]):
        g = torch.Generator(device=args.device).manual_seed(0)
        logits = torch.randn(S, V, device=args.device, generator=g) * 2
        seeds = torch.arange(S, device=args.device)
        ctr = torch.zeros(S, dtype=torch.long, device=args.device)

        def ours():
            return sample_rows(logits, 1.0, top_p=0.99, seeds=seeds, counters=ctr, banned=banned)

        def sorted_filter():
            kept = filter_logits(logits.clone(), top_p=0.99)
            cdf = kept.softmax(-1).cumsum_(-1)
            u = row_uniform(seeds, ctr)[:, None] * cdf[:, -1:]
            return torch.searchsorted(cdf, u, right=True)

        if args.device == "cuda":
            from _bench_util import cuda_time
            t_ours, t_sort = cuda_time(ours, iters=20), cuda_time(sorted_filter, iters=20)
        else:
            t_ours = 1000 * wall_time(ours)[0]
            t_sort = 1000 * wall_time(sorted_filter)[0]
        out[f"slots_{S}"] = {"ms_fused_top_p": t_ours, "ms_sort_top_p": t_sort,
                             "ms_greedy": (cuda_time(lambda: logits.argmax(-1), iters=20)
                                           if args.device == "cuda" else None)}
        print("sampling", S, out[f"slots_{S}"], flush=True)
    res["sampling_step"] = out


# ---------------------------------------------------------------------------------- length mix
def mix_requests(args):
    """(requests, n per request, caps per sample) of the recipe-like mix."""
    from ovlt.rollout.base import GenerationRequest
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, 150000, (args.mix_prompts, args.mix_prompt), generator=g).tolist()
    if args.length_unit == "prompt":
        caps = lognormal_lengths(args.mix_prompts, args.len_median, args.len_sigma, args.len_cap, 17)
        reqs = [GenerationRequest(prompt_ids=p, max_new_tokens=c, request_id=f"p{i}")
                for i, (p, c) in enumerate(zip(prompts, caps))]
        return reqs, args.mix_samples, [c for c in caps for _ in range(args.mix_samples)]
    caps = lognormal_lengths(args.mix_prompts * args.mix_samples, args.len_median, args.len_sigma,
                             args.len_cap, 17)
    reqs = [GenerationRequest(prompt_ids=prompts[k // args.mix_samples], max_new_tokens=c,
                              request_id=f"p{k // args.mix_samples}s{k % args.mix_samples}")
            for k, c in enumerate(caps)]
    return reqs, 1, caps


def bench_mix(args, res, module, cfg, save=lambda: None):
    from ovlt.rollout.base import SamplingParams
    from ovlt.rollout.builtin import BuiltinEngine
    reqs, n, caps = mix_requests(args)
    total = sum(caps)
    sp = SamplingParams(temperature=1.0, top_p=args.mix_top_p, n=n, seed=0, ignore_eos=True,
                        max_new_tokens=max(caps))
    out = {"prompts": args.mix_prompts, "samples_per_prompt": args.mix_samples,
           "prompt_tokens": args.mix_prompt, "length_unit": args.length_unit,
           "lengths": {"law": "lognormal, capped", "median": args.len_median,
                       "sigma": args.len_sigma, "cap": args.len_cap,
                       "mean": total / len(caps), "max": max(caps),
                       "p95": sorted(caps)[int(0.95 * (len(caps) - 1))],
                       "capped_fraction": sum(c == args.len_cap for c in caps) / len(caps)},
           "new_tokens": total, "sampling": {"temperature": 1.0, "top_p": args.mix_top_p},
           "check_every": args.check_every, "variants": {}}
    for v in args.mix_variants.split(","):
        v, _, mode = v.partition(":")  # ":eager": the decode step's pointwise work not compiled
        schedule, slots = v.split("@")
        slots = int(slots)
        v = v + (":eager" if mode == "eager" else "")
        eng = BuiltinEngine(module, cfg, max_batch_size=slots, schedule=schedule,
                            check_every=args.check_every, min_width=args.min_width,
                            compile_decode=False if mode == "eager" else None)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        used = eng.reserve(len(caps), args.mix_prompt + max(caps))
        dt, outs = wall_time(lambda e=eng: e.generate(reqs, sp))
        got = [len(c.token_ids) for o in outs for c in o]
        if got != caps:
            raise RuntimeError(f"{v}: completions of {sum(got)} tokens, the caps ask {total} "
                               "(ignore_eos / per-request caps not honoured)")
        st = eng.last_stats
        r = {"schedule": schedule, "slots": used, "compiled_decode": eng.decoder.compiled,
             "seconds": dt, "tokens_per_s": total / dt,
             "steps": st["steps"], "ms_per_step": 1000 * dt / max(1, st["steps"]),
             "slot_occupancy": st["slot_steps_busy"] / max(1, st["steps"] * used),
             "min_steps_at_full_occupancy": -(-total // used),
             "slot_steps_run": st["slot_steps_run"], "narrowed_tail": st["compactions"],
             "prefills": st["prefills"],
             "prefill_prompts": st["prefill_prompts"], "kv_copies": st["kv_copies"],
             "host_syncs": st["syncs"]}
        if torch.cuda.is_available():
            r["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["variants"][v] = r
        res["recipe_mix"] = out
        save()  # a run cut short keeps its finished variants
        print("recipe_mix", v, r, flush=True)
        eng.sleep()
        del eng, outs
    vs = out["variants"]
    stat = [k for k in vs if k.startswith("static")]
    cont = [k for k in vs if k.startswith("continuous")]
    if stat and cont:
        best = max(cont, key=lambda k: vs[k]["tokens_per_s"])
        out["best_continuous"] = best
        out["speedup_best_continuous_vs_" + stat[0]] = vs[best]["tokens_per_s"] / vs[stat[0]]["tokens_per_s"]
    res["recipe_mix"] = out


def bench_update(args, res):
    from ovlt.models.qwen2_5_vl.state_dict_adapter import mcore_shapes, mcore_to_hf
    from ovlt.rollout.builtin import BuiltinEngine
    from ovlt.rollout.kv_decoder import params_module

    cfg = model_cfg(args)  # the full 7B (the tiny model with --tiny)
    shapes = mcore_shapes(cfg, 1, 1, 0)
    sd = {n: torch.empty(s, dtype=torch.bfloat16, device=args.device).normal_(0, 0.02) for n, s in shapes.items()}
    n_params = sum(t.numel() for t in sd.values())
    module = params_module(sd)
    eng = BuiltinEngine(module, cfg)
    src = {n: t.clone() for n, t in sd.items()}   # "the trainer's" shards
    for _ in range(2):
        dt, _ = wall_time(lambda: eng.update_weights(mcore_to_hf({(0, 0): src}, cfg, 1, 1)))
    ok = all(torch.equal(sd[n], src[n]) for n in sd)
    key = "weight_update_tiny" if args.tiny else "weight_update_7b"
    res[key] = {"params": n_params, "bytes": 2 * n_params, "seconds": dt,
                "GB_per_s": 2 * n_params / dt / 1e9, "roundtrip_exact": ok,
                "path": "mcore_to_hf (TP=1) -> BuiltinEngine.update_weights",
                "trainer_sync_seconds_shared": 0.0}
    print("weight_update", n_params, "params", dt, "s", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--check-every", type=int, default=8, help="decode steps between host checks")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-update", action="store_true")
    ap.add_argument("--skip-mix", action="store_true")
    ap.add_argument("--skip-sampling", action="store_true")
    ap.add_argument("--mix-only", action="store_true", help="only the recipe-like length mix")
    ap.add_argument("--mix-prompts", type=int, default=64)
    ap.add_argument("--mix-samples", type=int, default=5)
    ap.add_argument("--mix-prompt", type=int, default=448, help="prompt tokens per request")
    ap.add_argument("--mix-variants", default="static@64,continuous@64,continuous@128,continuous@192",
                    help="comma-separated schedule@slots[:eager] (:eager: the decode step's "
                         "pointwise work not compiled)")
    ap.add_argument("--mix-top-p", type=float, default=0.99)
    ap.add_argument("--step-widths", default="",
                    help="comma-separated slot widths: the decode step by part (GPU only)")
    ap.add_argument("--min-width", type=int, default=8,
                    help="narrowest decode step of a call's tail (continuous batching)")
    ap.add_argument("--len-median", type=float, default=500.0)
    ap.add_argument("--len-sigma", type=float, default=0.6)
    ap.add_argument("--len-cap", type=int, default=2048)
    ap.add_argument("--length-unit", choices=("prompt", "sample"), default="prompt")
    ap.add_argument("--tiny", action="store_true",
                    help="CPU smoke run: the tiny model, a few short requests")
    ap.add_argument("--out", default="benchmarks/results/rollout.json")
    args = ap.parse_args(argv)
    if args.tiny:
        args.device = "cpu"
        args.batch, args.prompt, args.new = 4, 16, 8
        args.mix_prompts, args.mix_samples, args.mix_prompt = 6, 3, 24
        args.len_median, args.len_cap = 8.0, 20
        args.mix_variants = "static@4,continuous@4,continuous@8"
        args.min_width = 1
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny (CPU) or on a GPU")
    res = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
           "config": vars(args)}
    import transformers
    res["transformers"] = transformers.__version__
    hf, module, cfg = build_models(args)
    if not args.mix_only:
        bench_generate(args, res, hf, module, cfg)
    del hf
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    from ovlt.utils.io import atomic_write_json
    if args.step_widths and args.device == "cuda":
        bench_step(args, res, module, cfg)
        atomic_write_json(args.out, res)
    if not args.skip_sampling:
        bench_sampling(args, res)
    if not args.skip_mix:
        bench_mix(args, res, module, cfg, save=lambda: atomic_write_json(args.out, res))
    del module
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if not (args.skip_update or args.mix_only):
        bench_update(args, res)
    atomic_write_json(args.out, res)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
