"""Forward+backward throughput and peak memory of 7B-shaped Qwen2.5-VL LLM layers:
HF transformers (sdpa) vs ovlt (mcore, local spec) vs ovlt FP8 (`torch._scaled_mm`), plus the
FP8 recipes' loss closeness to bf16 over a few optimizer steps on the same weights/batch.

    python benchmarks/model_forward.py --layers 28 --seq 4096        # on the H100
    python benchmarks/model_forward.py --tiny                         # CPU smoke run

Every variant: the same layer shapes (hidden 3584, 28 heads / 4 KV groups, FFN 18944, MRoPE),
a 1024-token vocab (so the decoder layers dominate), bf16 weights, one sequence of `--seq`
tokens (ovlt also as 4 packed THD samples), loss = mean(h^2) of the final hidden states.
The ovlt variants use the local spec (`transformer_impl=local`); the Transformer Engine spec is
not one of them. Results: benchmarks/results/model_forward*.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPE_7B = dict(hidden_size=3584, num_attention_heads=28, num_query_groups=4,
                ffn_hidden_size=18944, mrope_section=[16, 24, 24])
SHAPE_TINY = dict(hidden_size=64, num_attention_heads=4, num_query_groups=2,
                  ffn_hidden_size=128, mrope_section=[2, 3, 3])
VOCAB = 1024


def model_cfg(shape, layers, fp8="none"):
    from ovlt.config import ModelConfig, VisionConfig
    return ModelConfig(vocab_size=VOCAB, num_layers=layers, tie_word_embeddings=False,
                       transformer_impl="local", fp8=fp8, params_dtype="bf16",
                       # a token vision tower: it is frozen and never run here
                       vision=VisionConfig(depth=1, hidden_size=32, num_heads=2,
                                           intermediate_size=64, fullatt_block_indexes=[0]),
                       **shape)


def build_hf(shape, layers, device):
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel
    import transformers
    kw = dict(vocab_size=VOCAB, hidden_size=shape["hidden_size"], num_hidden_layers=layers,
              num_attention_heads=shape["num_attention_heads"],
              num_key_value_heads=shape["num_query_groups"],
              intermediate_size=shape["ffn_hidden_size"], rms_norm_eps=1e-6,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if int(transformers.__version__.split(".")[0]) >= 5:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": shape["mrope_section"]}
    else:  # transformers 4.x spelling
        kw.update(rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": shape["mrope_section"]})
    cfg = Qwen2_5_VLTextConfig(**kw)
    cfg._attn_implementation = "sdpa"
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16: no fp32 copy of 7B-shaped layers
    try:
        with torch.device(device):
            m = Qwen2_5_VLTextModel(cfg).to(torch.bfloat16)
    finally:
        torch.set_default_dtype(old)
    return m.train()


def build_ovlt(shape, layers, fp8="none"):
    from ovlt.models.qwen2_5_vl.provider import build_model
    m = build_model(model_cfg(shape, layers, fp8))
    m.freeze(vision=True, merger=True)
    return m.train()


def inputs(seq, device, n_pack=4):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (1, seq), generator=g).to(device)
    pos = torch.arange(seq, device=device).view(1, 1, seq).expand(3, 1, seq).contiguous()
    # packed: n_pack samples, positions restart per sample
    per = seq // n_pack
    ppos = (torch.arange(seq, device=device) % per).view(1, 1, seq).expand(3, 1, seq).contiguous()
    cu = torch.arange(0, seq + 1, per, dtype=torch.int32, device=device)
    return ids, pos, ppos, cu


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(step, params, device, warmup, iters):
    """ms per fwd+bwd (median), peak memory (GiB, everything allocated incl. weights)."""
    def clear():
        for p in params:
            p.grad = None
    try:
        for _ in range(warmup):
            clear()
            step()
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(iters):
            clear()
            t0 = time.perf_counter()
            step()
            sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
        clear()
        times.sort()
        return {"ms": times[len(times) // 2], "ms_min": times[0], "peak_gib": peak}
    except torch.cuda.OutOfMemoryError:
        clear()
        return {"ms": None, "error": "OOM"}


def free(*objs):
    for o in objs:
        del o
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def throughput(shape, layers, seq, device, warmup, iters, log):
    ids, pos, ppos, cu = inputs(seq, device)
    rows = {}

    hf = build_hf(shape, layers, device)

    def hf_step():
        h = hf(input_ids=ids, position_ids=pos).last_hidden_state
        h.float().pow(2).mean().backward()
    rows["hf_sdpa"] = measure(hf_step, list(hf.parameters()), device, warmup, iters)
    log("hf_sdpa", rows["hf_sdpa"])
    free(hf)
    hf = None
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None

    for name, fp8, packed in (("ovlt_local", "none", False), ("ovlt_local_thd4", "none", True),
                              ("ovlt_fp8_tensor", "scaled_mm_tensor", False),
                              ("ovlt_fp8_tensor_compiled", "scaled_mm_tensor", False),
                              ("ovlt_fp8_rowwise", "scaled_mm_rowwise", False)):
        if name.endswith("_compiled") and device.type != "cuda":
            continue
        os.environ["OVLT_FP8_COMPILE"] = "1" if name.endswith("_compiled") else "0"
        m = build_ovlt(shape, layers, fp8)

        def step(m=m, packed=packed):
            h = m(ids, ppos if packed else pos, packed_seq_params=cu if packed else None,
                  return_hidden=True)
            h.float().pow(2).mean().backward()
        rows[name] = measure(step, [p for p in m.parameters() if p.requires_grad], device,
                             warmup, iters)
        log(name, rows[name])
        del m, step
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    for r in rows.values():
        if r.get("ms"):
            r["tokens_per_s"] = seq / (r["ms"] / 1e3)
    return rows


def fp8_closeness(shape, layers, seq, steps, device, log, lr=1e-5):
    """Same init, same batch (random next-token labels), Adam: loss curves of FP8 vs bf16,
    and step-0 weight-gradient error of bf16 and FP8 against an fp32 copy of the model."""
    ids, pos, _, _ = inputs(seq, device)
    labels = torch.randint(0, VOCAB, ids.shape, generator=torch.Generator().manual_seed(1)).to(device)
    ref_state = None
    curves, grads = {}, {}
    probe = ("language_model.decoder.layers.0.mlp.linear_fc1.weight",
             f"language_model.decoder.layers.{layers - 1}.mlp.linear_fc2.weight",
             "language_model.decoder.layers.0.self_attention.linear_qkv.weight")
    for name, fp8, dtype in (("fp32", "none", "fp32"), ("bf16", "none", "bf16"),
                             ("fp8_tensor", "scaled_mm_tensor", "bf16"),
                             ("fp8_rowwise", "scaled_mm_rowwise", "bf16")):
        os.environ["OVLT_FP8_COMPILE"] = "0"
        torch.manual_seed(0)
        cfg = model_cfg(shape, layers, fp8)
        cfg.params_dtype = dtype
        from ovlt.models.qwen2_5_vl.provider import build_model
        m = build_model(cfg)
        m.freeze(vision=True, merger=True)
        m.train()
        if ref_state is None:
            ref_state = {k: v.detach().clone() for k, v in m.state_dict().items()
                         if isinstance(v, torch.Tensor)}
        else:
            m.load_state_dict(ref_state, strict=False)  # same weights (cast to this dtype)
        named = dict(m.named_parameters())
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr)
        losses = []
        for i in range(steps if name != "fp32" else 1):
            opt.zero_grad(set_to_none=True)
            loss = m(ids, pos, labels=labels).float().mean()
            loss.backward()
            if i == 0:
                grads[name] = {k: named[k].grad.detach().float().clone() for k in probe}
            opt.step()
            losses.append(float(loss.detach()))
        curves[name] = losses
        log(f"loss {name}", [round(x, 4) for x in losses])
        del m, opt, params, named
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    ref = curves["bf16"]
    out = {"steps": steps, "layers": layers, "seq": seq, "lr": lr, "curves": curves,
           "step0_grad_rel_err_vs_fp32": {}}
    for k in ("fp8_tensor", "fp8_rowwise"):
        out[k + "_max_rel_loss_diff_vs_bf16"] = max(abs(a - b) / abs(b) for a, b in zip(curves[k], ref))
    for k in ("bf16", "fp8_tensor", "fp8_rowwise"):
        out["step0_grad_rel_err_vs_fp32"][k] = {
            p.split("decoder.")[-1]: float((grads[k][p] - grads["fp32"][p]).norm()
                                           / grads["fp32"][p].norm()) for p in probe}
    log("grad rel err vs fp32", out["step0_grad_rel_err_vs_fp32"])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--fp8-layers", type=int, default=4)
    ap.add_argument("--fp8-steps", type=int, default=10)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (smoke test)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "model_forward.json"))
    a = ap.parse_args(argv)
    from ovlt.config import ParallelConfig
    from ovlt.distributed import init_distributed
    info = init_distributed(ParallelConfig())
    device = info.device
    shape = SHAPE_TINY if a.tiny else SHAPE_7B
    if a.tiny:
        a.layers, a.seq, a.fp8_layers, a.fp8_steps, a.iters, a.warmup = 2, 64, 2, 3, 2, 1

    def log(k, v):
        print(f"{k}: {v}", flush=True)

    res = {"shape": shape, "layers": a.layers, "seq": a.seq, "vocab": VOCAB,
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d", time.gmtime()),
           "te": "not measured: the ovlt variants use the local spec"}
    import transformers
    res["transformers"] = transformers.__version__
    res["throughput"] = throughput(shape, a.layers, a.seq, device, a.warmup, a.iters, log)
    res["fp8_loss_closeness"] = fp8_closeness(shape, a.fp8_layers, min(a.seq, 2048),
                                              a.fp8_steps, device, log)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=2)
    os.replace(tmp, a.out)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
