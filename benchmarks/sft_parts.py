"""Parts of an SFT step at 7B widths, each timed alone against its alternatives (CUDA only).

    python benchmarks/sft_parts.py --out benchmarks/results/sft_parts_h200.json

  wgrad       dW of one fc1 GEMM (8192 tokens, 3584 -> 2 x 18944): bf16 GEMM + add into the fp32
              main_grad (mcore without apex) vs one GEMM accumulating into fp32
              (`ovlt.compat.cuda_fastpaths`), and the same GEMM overwriting main_grad (a
              weight's first gradient of the step)
  swiglu      the LLM MLP's SwiGLU over [8192, 2 x 18944] bf16, fwd+bwd and bwd alone:
              mcore's torch.compile'd version vs `ovlt.kernels.fused_swiglu`
  vision_fc2  the vision MLP's fc2 GEMM (4096 patches, 3420 -> 1280, bf16): as is (rows of
              6840 bytes: cuBLAS's sm80 align-2 kernel), both operands as views of rows
              padded to 3424, and K zero-padded to 3424 (what the forward-only tower runs)
  rmsnorm     fwd+bwd of RMSNorm over [8192, 3584] bf16: torch.nn.RMSNorm vs torch.compile
  attention   causal GQA attention fwd+bwd, 4 x 2048 tokens, 28 q / 4 kv heads: SDPA backends
  adam        the optimizer update of 2.0 B fp32 master params: fused AdamW + bf16 copy, and
              the grad-norm via foreach vs mcore's per-tensor fallback vs one reduction over
              the flat buffer the grads live in
  rope        RoPE of one 7B layer's q (28 heads, contiguous) and k (4 heads, a strided view of
              the fused qkv output) at 8192 tokens, forward + backward: the Triton kernel's
              token-tile / warp choices, and mcore's unfused version
  fp8_swiglu  the FP8 MLP's SwiGLU at 8192 tokens: SwiGLU + FP8 cast-transpose kernels vs the
              fused kernel of `ovlt.fp8.swiglu` (forward and backward), over its tile choices
  fp8         the FP8 forward GEMMs of one 7B layer at 8192 tokens with and without fast
              accumulation, and the FP8 cast-transpose kernel's tile / warp choices on the
              step's tensor shapes (delayed scaling: one launch per cast)
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._bench_util import cuda_time, write_results  # noqa: E402


def bench_wgrad(res):
    from ovlt.compat.cuda_fastpaths import TorchWgradAccum
    t, k, n = 8192, 3584, 2 * 18944
    x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(t, n, device="cuda", dtype=torch.bfloat16)
    acc = torch.zeros(n, k, device="cuda")
    ref = acc.clone()

    def unfused():
        ref.add_(g.t().matmul(x))

    def fused():
        TorchWgradAccum.wgrad_gemm_accum_fp32(x, g, acc)
    a, b = cuda_time(unfused, 20, 3), cuda_time(fused, 20, 3)
    err = ((acc - ref).norm() / ref.norm()).item()
    from ovlt.engine import grad_routing
    fresh = torch.empty(n, k, device="cuda")
    weight = torch.nn.Parameter(torch.empty(0))
    weight.main_grad = fresh
    grad_routing.mark_overwrites(weight)
    grad_routing.reset_written(weight)  # stays unwritten: every call overwrites
    c = cuda_time(lambda: TorchWgradAccum.wgrad_gemm_accum_fp32(x, g, fresh), 20, 3)
    err_o = ((fresh - g.float().t() @ x.float()).norm() / fresh.norm()).item()
    flops = 2 * t * k * n
    res["wgrad"] = {"unfused_ms": a, "fused_ms": b, "rel_err": err,
                    "fused_tflops": flops / b / 1e9, "overwrite_ms": c,
                    "overwrite_tflops": flops / c / 1e9, "overwrite_rel_err": err_o}


def bench_swiglu(res):
    from megatron.core.fusions.fused_bias_swiglu import SwiGLUFunction

    from ovlt.kernels.swiglu import fused_swiglu, swiglu_backward
    y = torch.randn(8192, 2 * 18944, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    d = torch.randn(8192, 18944, device="cuda", dtype=torch.bfloat16)

    def run(f):
        def go():
            f(y).backward(d)
        return go
    mcore = run(lambda t: SwiGLUFunction.apply(t, False, False))
    ours = run(fused_swiglu)
    out = {"mcore_fwd_bwd_ms": cuda_time(mcore, 20, 5), "ovlt_fwd_bwd_ms": cuda_time(ours, 20, 5)}
    from megatron.core.fusions.fused_bias_swiglu import swiglu_back
    yd = y.detach()
    out["mcore_bwd_ms"] = cuda_time(lambda: swiglu_back(d, yd), 20, 5)
    out["ovlt_bwd_ms"] = cuda_time(lambda: swiglu_backward(yd, d), 20, 5)
    out["bwd_min_bytes_GB"] = 3 * y.numel() * 2 / 2 / 1e9 + y.numel() * 2 / 1e9
    out["ovlt_bwd_TBps"] = out["bwd_min_bytes_GB"] / out["ovlt_bwd_ms"]
    ref, mine = swiglu_back(d, yd), swiglu_backward(yd, d)
    out["bwd_max_ulp_diff_frac"] = (ref != mine).float().mean().item()
    res["swiglu"] = out


def bench_vision_fc2(res):
    import torch.nn.functional as F
    m, k, n, kp = 4096, 3420, 1280, 3424
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    a_p = torch.zeros(m, kp, device="cuda", dtype=torch.bfloat16)
    a_p[:, :k] = a
    w_p = torch.zeros(n, kp, device="cuda", dtype=torch.bfloat16)
    w_p[:, :k] = w
    ref = F.linear(a, w, b)
    out = {"as_is_ms": cuda_time(lambda: F.linear(a, w, b), 50, 5),
           "strided_views_ms": cuda_time(lambda: F.linear(a_p[:, :k], w_p[:, :k], b), 50, 5),
           "k_padded_ms": cuda_time(lambda: F.linear(a_p, w_p, b), 50, 5)}
    out["k_padded_max_diff"] = (F.linear(a_p, w_p, b) - ref).abs().max().item()
    out["tflops_as_is"] = 2 * m * k * n / out["as_is_ms"] / 1e9
    out["tflops_k_padded"] = 2 * m * k * n / out["k_padded_ms"] / 1e9
    res["vision_fc2"] = out


def bench_rmsnorm(res):
    x = torch.randn(8192, 3584, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    norm = torch.nn.RMSNorm(3584, eps=1e-6, device="cuda", dtype=torch.bfloat16)
    gy = torch.randn_like(x)
    comp = torch.compile(norm)

    def run(f):
        def go():
            y = f(x)
            y.backward(gy)
        return go
    res["rmsnorm"] = {"torch_ms": cuda_time(run(norm), 20, 3),
                      "compiled_ms": cuda_time(run(comp), 20, 5)}


def bench_attention(res):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(4, 28, 2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(4, 4, 2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    out = {}

    def run(backend, expand):
        def go():
            kk, vv = (k.repeat_interleave(7, 1), v.repeat_interleave(7, 1)) if expand else (k, v)
            ctx = sdpa_kernel(backend) if backend is not None else torch.enable_grad()
            with ctx:
                o = F.scaled_dot_product_attention(q, kk, vv, is_causal=True,
                                                   enable_gqa=not expand)
            o.sum().backward()
        return go
    for name, be, ex in [("default_gqa", None, False), ("flash_gqa", SDPBackend.FLASH_ATTENTION, False),
                         ("cudnn_gqa", SDPBackend.CUDNN_ATTENTION, False),
                         ("default_expanded", None, True), ("flash_expanded", SDPBackend.FLASH_ATTENTION, True),
                         ("cudnn_expanded", SDPBackend.CUDNN_ATTENTION, True),
                         ("efficient_expanded", SDPBackend.EFFICIENT_ATTENTION, True)]:
        try:
            out[name + "_ms"] = cuda_time(run(be, ex), 10, 2)
        except Exception as e:  # noqa: BLE001 - a backend may refuse these inputs
            out[name + "_ms"] = f"{type(e).__name__}: {str(e)[:100]}"
    res["attention"] = out


def bench_adam(res, n_params=2.0e9):
    from megatron.core.utils import local_multi_tensor_l2_norm

    from ovlt.compat.cuda_fastpaths import multi_tensor_l2norm
    # 4 layers of 7B shape + untied embedding and head: a few big tensors, like the real model
    shapes = [(152064, 3584), (152064, 3584)] + [(4608, 3584), (3584, 3584), (37888, 3584),
                                                 (3584, 18944)] * 4
    params = [torch.randn(s, device="cuda") * 0.02 for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    model = [p.bfloat16() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    grads = [p.grad for p in params]

    def step():
        opt.step()
        torch._foreach_copy_(model, params)
    n = sum(p.numel() for p in params)
    out = {"params": n, "adam_plus_copy_ms": cuda_time(step, 10, 2),
           "norm_foreach_ms": cuda_time(lambda: multi_tensor_l2norm(0, None, [grads], False), 10, 2),
           "norm_mcore_local_ms": cuda_time(
               lambda: local_multi_tensor_l2_norm(0, None, [grads], False), 5, 1),
           "scale_foreach_ms": cuda_time(lambda: torch._foreach_mul_(grads, 0.999), 10, 2)}
    flat = torch.cat([g.reshape(-1) for g in grads])
    params = grads = model = opt = None  # freed (not `del`: the closures read these names)
    torch.cuda.empty_cache()
    out["norm_flat_ms"] = cuda_time(lambda: torch.linalg.vector_norm(flat), 10, 2)
    out["norm_flat_GBps"] = n * 4 / 1e9 / out["norm_flat_ms"] * 1e3
    out["norm_foreach_GBps"] = n * 4 / 1e9 / out["norm_foreach_ms"] * 1e3
    gb = n * (4 * 7 + 2) / 1e9  # adam r/w + bf16 write
    out["adam_plus_copy_GBps"] = gb / out["adam_plus_copy_ms"] * 1e3
    res["adam"] = out


def bench_rope(res):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from ovlt.kernels import rope
    t, hd = 8192, 128
    mixed = torch.randn(t, 1, 4, 9 * hd, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(t, 1, 28, hd, device="cuda", dtype=torch.bfloat16)
    k = mixed[..., 7 * hd:8 * hd]
    f = torch.randn(t, 1, 1, hd, device="cuda") * 3
    moved = 4 * (q.numel() + k.numel()) * 2  # q and k read + written, fwd and bwd
    out = {"mcore_unfused_ms": cuda_time(lambda: [_apply_rotary_pos_emb_bshd(x, f)
                                                  for x in (q, k, q, k)], 10, 2)}
    old = dict(rope.TILE)
    ref = [rope.apply_rope(x, f, bw) for x in (q, k) for bw in (False, True)]
    try:
        for tokens, heads, nw in itertools.product((1, 2, 4, 8), (8, 32), (2, 4, 8)):
            rope.TILE.update(tokens=tokens, heads=heads, num_warps=nw)
            got = [rope.apply_rope(x, f, bw) for x in (q, k) for bw in (False, True)]
            ms = cuda_time(lambda: [rope.apply_rope(x, f, bw) for x in (q, k)
                                    for bw in (False, True)], 20, 3)
            out[f"t{tokens}_h{heads}_w{nw}"] = {"ms": ms, "GBps": moved / ms / 1e6,
                                                "equal": all(torch.equal(a, b)
                                                             for a, b in zip(got, ref))}
    finally:
        rope.TILE.clear()
        rope.TILE.update(old)
    res["rope"] = out


def bench_fp8(res):
    from ovlt.fp8 import cast as fp8_cast
    from ovlt.fp8.linear import E4M3, E5M2
    t, h, ffn, qkv = 8192, 3584, 18944, 4608
    out = {"fprop": {}, "cast": {}}
    for name, n, k in (("qkv", qkv, h), ("proj", h, h), ("fc1", 2 * ffn, h), ("fc2", h, ffn)):
        x = torch.randn(t, k, device="cuda").to(E4M3)
        w = torch.randn(n, k, device="cuda").to(E4M3)
        one = torch.ones((), device="cuda")
        r = {}
        for fast in (False, True):
            ms = cuda_time(lambda: torch._scaled_mm(x, w.t(), scale_a=one, scale_b=one,
                                                    out_dtype=torch.bfloat16,
                                                    use_fast_accum=fast), 20, 3)
            r["fast_ms" if fast else "promoted_ms"] = ms
            r["fast_tflops" if fast else "promoted_tflops"] = 2 * t * n * k / ms / 1e9
        out["fprop"][name] = r
    tiles = [(64, 64, 4), (64, 64, 8), (128, 64, 4), (128, 64, 8), (64, 128, 4), (64, 128, 8),
             (128, 128, 8), (32, 128, 4)]
    shapes = {"x_3584": (t, h), "fc1_grad": (t, 2 * ffn), "fc2_in": (t, ffn),
              "fc1_weight": (2 * ffn, h)}
    old = dict(fp8_cast.TILE)
    try:
        for name, shape in shapes.items():
            src = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
            hist = fp8_cast.AmaxHistory(16, "cuda")
            fp8_cast.cast_transpose(src, E5M2, True, True, history=hist)
            ref = fp8_cast.cast_transpose(src, E5M2, True, True, history=hist)
            r = {}
            for br, bc, nw in tiles:
                fp8_cast.TILE.update(rows=br, cols=bc, num_warps=nw)
                got = fp8_cast.cast_transpose(src, E5M2, True, True, history=hist)
                same = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                           for a, b in zip(got[:2], ref[:2]))
                ms = cuda_time(lambda: fp8_cast.cast_transpose(src, E5M2, True, True,
                                                               history=hist), 20, 3)
                r[f"{br}x{bc}_w{nw}"] = {"ms": ms, "GBps": src.numel() * 4 / ms / 1e6,
                                         "equal": same}
            out["cast"][name] = r
    finally:
        fp8_cast.TILE.clear()
        fp8_cast.TILE.update(old)
    res["fp8"] = out


def bench_fp8_swiglu(res):
    """The delayed-scaling FP8 MLP's SwiGLU at 7B widths, 8192 tokens: SwiGLU kernel + FP8
    cast-transpose kernel vs one fused kernel (forward: fc2's input; backward: fc1's output
    gradient), over the fused kernels' tile choices; `equal`: bitwise against the two kernels."""
    from ovlt.kernels.swiglu import swiglu_backward, swiglu_forward
    from ovlt.fp8 import swiglu as fp8_swiglu
    from ovlt.fp8.linear import E4M3, E5M2
    from ovlt.fp8.cast import AmaxHistory, cast_transpose
    t, ffn = 8192, 18944
    h = torch.randn(t, 2 * ffn, device="cuda", dtype=torch.bfloat16)
    d = torch.randn(t, ffn, device="cuda", dtype=torch.bfloat16)
    hf, hb = AmaxHistory(16, "cuda"), AmaxHistory(16, "cuda")  # every slot: the same amax

    def two_fwd():
        return cast_transpose(swiglu_forward(h), E4M3, True, True, history=hf)

    def two_bwd():
        return cast_transpose(swiglu_backward(h, d), E5M2, True, True, history=hb)

    def one_fwd():
        return fp8_swiglu.swiglu_cast_transpose(h, E4M3, True, True, history=hf)

    def one_bwd():
        return fp8_swiglu.swiglu_grad_cast_transpose(h, d, E5M2, True, True, history=hb)
    # the fused kernels' traffic: h (+ d) read in bf16, q and q^T written in FP8
    fwd_gb = (h.numel() * 2 + h.numel()) / 1e9
    bwd_gb = (h.numel() * 2 + d.numel() * 2 + 2 * h.numel()) / 1e9

    def timing(f, b):  # warm-up over a whole history cycle (16 casts) first
        tf, tb = cuda_time(f, 32, 17), cuda_time(b, 32, 17)
        return {"fwd_ms": tf, "bwd_ms": tb, "fwd_TBps": fwd_gb / tf, "bwd_TBps": bwd_gb / tb}
    clone_ms = cuda_time(lambda: h.clone(), 32, 5)
    out = {"two_kernels": timing(two_fwd, two_bwd), "fused": {}, "h_clone_ms": clone_ms,
           "h_clone_TBps": 2 * h.numel() * 2 / 1e9 / clone_ms}
    ref_f, ref_b = two_fwd(), two_bwd()
    old = dict(fp8_swiglu.TILE)
    try:
        for br, bc, nw in [(64, 64, 8), (64, 64, 4), (64, 128, 4), (64, 128, 8), (128, 64, 8),
                           (128, 128, 8), (32, 128, 4), (32, 64, 4), (128, 64, 4)]:
            fp8_swiglu.TILE.update(rows=br, cols=bc, num_warps=nw)
            got_f, got_b = one_fwd(), one_bwd()
            same = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                       for a, b in zip(got_f[:2] + got_b[:2], ref_f[:2] + ref_b[:2]))
            out["fused"][f"{br}x{bc}_w{nw}"] = dict(timing(one_fwd, one_bwd), equal=same)
    finally:
        fp8_swiglu.TILE.clear()
        fp8_swiglu.TILE.update(old)
    res["fp8_swiglu"] = out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", default="wgrad,swiglu,vision_fc2,rmsnorm,attention,adam")
    args = ap.parse_args(argv)
    res = {}
    for part in args.parts.split(","):
        try:
            globals()[f"bench_{part}"](res)
        except Exception as e:  # noqa: BLE001 - record and go on
            res[part] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(part, res[part], flush=True)
        torch.cuda.empty_cache()
    write_results(os.path.dirname(os.path.abspath(args.out)), os.path.basename(args.out), res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
