"""Rollout throughput: ovlt built-in engine vs HF `generate`, and trainer -> engine weight update.

    python benchmarks/rollout.py --out benchmarks/results/rollout_h100.json

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
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _bench_util import wall_time  # noqa: E402


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


def mcore_module(named: dict) -> torch.nn.Module:
    root = torch.nn.Module()
    for name, t in named.items():
        *path, leaf = name.split(".")
        mod = root
        for p in path:
            if not hasattr(mod, p):
                mod.add_module(p, torch.nn.Module())
            mod = getattr(mod, p)
        mod.register_parameter(leaf, torch.nn.Parameter(t, requires_grad=False))
    return root


def bench_generate(args, res):
    from ovlt.config import CONFIG_ROOT, load_config
    from ovlt.models.qwen2_5_vl.state_dict_adapter import hf_to_mcore
    from ovlt.rollout.base import GenerationRequest, SamplingParams
    from ovlt.rollout.builtin import BuiltinEngine

    cfg = load_config(CONFIG_ROOT / "model" / "qwen2_5_vl_7b.yaml").model
    cfg.num_layers = args.layers
    cfg.vision.depth, cfg.vision.hidden_size, cfg.vision.intermediate_size = 1, 64, 128
    cfg.vision.num_heads, cfg.vision.fullatt_block_indexes = 1, [0]
    hf = build_hf(cfg, args.device)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 150000, (args.batch, args.prompt), generator=g)
    eos_never = 151645  # suppressed by min_new_tokens; sampled runs decode full length

    sd = {k: v for k, v in hf.state_dict().items()}
    named = hf_to_mcore(sd, cfg, 0, 1, 0, 1)
    named = {k: v.contiguous() for k, v in named.items() if k.startswith("language_model.")}
    module = mcore_module(named)
    reqs = [GenerationRequest(prompt_ids=p.tolist()) for p in prompts]
    sp = SamplingParams(temperature=1.0, top_p=0.99, max_new_tokens=args.new, seed=0)
    for graphs in (True, False):
        eng = BuiltinEngine(module, cfg, eos_token_ids=[], max_batch_size=args.batch, cuda_graphs=graphs)
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
    del hf, module, named, sd
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_update(args, res):
    from ovlt.config import CONFIG_ROOT, load_config
    from ovlt.models.qwen2_5_vl.state_dict_adapter import mcore_shapes, mcore_to_hf
    from ovlt.rollout.builtin import BuiltinEngine

    cfg = load_config(CONFIG_ROOT / "model" / "qwen2_5_vl_7b.yaml").model
    shapes = mcore_shapes(cfg, 1, 1, 0)
    sd = {n: torch.empty(s, dtype=torch.bfloat16, device=args.device).normal_(0, 0.02) for n, s in shapes.items()}
    n_params = sum(t.numel() for t in sd.values())
    module = mcore_module(sd)
    eng = BuiltinEngine(module, cfg)
    src = {n: t.clone() for n, t in sd.items()}   # "the trainer's" shards
    for _ in range(2):
        dt, _ = wall_time(lambda: eng.update_weights(mcore_to_hf({(0, 0): src}, cfg, 1, 1)))
    ok = all(torch.equal(sd[n], src[n]) for n in sd)
    res["weight_update_7b"] = {"params": n_params, "bytes": 2 * n_params, "seconds": dt,
                               "GB_per_s": 2 * n_params / dt / 1e9, "roundtrip_exact": ok,
                               "path": "mcore_to_hf (TP=1) -> BuiltinEngine.update_weights",
                               "trainer_sync_seconds_shared": 0.0}
    print("weight_update_7b", res["weight_update_7b"], flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-update", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/rollout.json")
    args = ap.parse_args(argv)
    res = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
           "config": vars(args)}
    import transformers
    res["transformers"] = transformers.__version__
    bench_generate(args, res)
    if not args.skip_update:
        bench_update(args, res)
    from ovlt.utils.io import atomic_write_json
    atomic_write_json(args.out, res)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
