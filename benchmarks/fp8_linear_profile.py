"""Where the time of one ovlt FP8 linear goes (H100): one 7B fc1-shaped GEMM (M=4096 tokens,
K=3584, N=2*18944) fwd+bwd in bf16 vs ovlt FP8, and its parts (casts, each _scaled_mm).
    python benchmarks/fp8_linear_profile.py  ->  benchmarks/results/fp8_linear_profile.json"""
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from ovlt.fp8 import linear as F8  # noqa: E402
from _bench_util import cuda_time  # noqa: E402


def bench(fn):
    return cuda_time(fn, iters=20, warmup=3)


def main():
    M, K, N = 4096, 3584, 37888
    dev = "cuda"
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02).requires_grad_()
    g = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
    res = {"shape": [M, K, N]}

    def bf16_step():
        (x @ w.t()).backward(g)
    res["bf16_fwd_bwd_ms"] = bench(bf16_step)
    res["bf16_fwd_ms"] = bench(lambda: x @ w.t())
    for rowwise in (False, True):
        for comp in ("0", "1"):
            os.environ["OVLT_FP8_COMPILE"] = comp
            tag = ("rowwise" if rowwise else "tensor") + ("_compiled" if comp == "1" else "")
            res[f"fp8_{tag}_fwd_bwd_ms"] = bench(
                lambda: F8.fp8_linear(x, w, None, rowwise=rowwise).backward(g))
            res[f"fp8_{tag}_fwd_ms"] = bench(lambda: F8.fp8_linear(x.detach(), w.detach(), None,
                                                                   rowwise=rowwise))
    os.environ["OVLT_FP8_COMPILE"] = "0"
    xq, sx = F8.quantize(x, F8.E4M3)
    wq, sw = F8.quantize(w, F8.E4M3)
    gq, sg = F8.quantize(g, F8.E5M2)
    res["cast_x_ms"] = bench(lambda: F8.quantize(x, F8.E4M3))
    res["cast_w_ms"] = bench(lambda: F8.quantize(w, F8.E4M3))
    res["cast_g_e5m2_ms"] = bench(lambda: F8.quantize(g, F8.E5M2))
    res["colmajor_copy_w_ms"] = bench(lambda: F8.col_major(wq))
    res["scaled_mm_fwd_ms"] = bench(lambda: F8.scaled_mm(xq, sx, wq.t(), sw, torch.bfloat16))
    wq_cm = F8.col_major(wq)
    res["scaled_mm_dgrad_ms"] = bench(lambda: torch._scaled_mm(gq, wq_cm, scale_a=sg, scale_b=sw,
                                                              out_dtype=torch.bfloat16))
    gqt = gq.t().contiguous()
    xq_cm = F8.col_major(xq)
    res["scaled_mm_wgrad_ms"] = bench(lambda: torch._scaled_mm(gqt, xq_cm, scale_a=sg, scale_b=sx,
                                                              out_dtype=torch.bfloat16))
    gq4, sg4 = F8.quantize(g, F8.E4M3)
    res["scaled_mm_dgrad_e4m3_ms"] = bench(lambda: torch._scaled_mm(gq4, wq_cm, scale_a=sg4,
                                                                   scale_b=sw, out_dtype=torch.bfloat16))
    from ovlt.fp8.cast import cast_transpose
    res["cast_transpose_w_both_ms"] = bench(lambda: cast_transpose(w, F8.E4M3, True, True))
    res["cast_transpose_g_both_ms"] = bench(lambda: cast_transpose(g, F8.E5M2, True, True))
    # bitwise check of the Triton kernel against torch's cast of the same scaled values
    ok = True
    for t, dt in ((w, F8.E4M3), (g, F8.E5M2), (x[:1000, :777], F8.E4M3)):
        q, qt, dq = cast_transpose(t, dt, True, True)
        fmax = torch.finfo(dt).max
        ref = (t.detach().float() * (fmax / t.detach().float().abs().max())).clamp(-fmax, fmax).to(dt)
        ok &= torch.equal(q.view(torch.uint8), ref.view(torch.uint8))
        ok &= torch.equal(qt.view(torch.uint8), ref.t().contiguous().view(torch.uint8))
    res["cast_transpose_bitwise_equal_torch"] = bool(ok)
    for k, v in res.items():
        print(k, round(v, 3) if isinstance(v, float) else v)
    out = os.path.join(os.environ.get("OUT", os.path.join(ROOT, "benchmarks", "results")),
                       "fp8_linear_profile.json")
    with open(out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
