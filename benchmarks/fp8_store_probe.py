"""Probe (H200): where the fused FP8 SwiGLU / cast-transpose kernels lose bandwidth.

Variants of the backward (h [R, 2F], d [R, F] bf16 -> q [R, 2F], q^T [2F, R] fp8) and forward
(h -> q [R, F], q^T [F, R]) with the same arithmetic as `ovlt.fp8.swiglu` (scale from a device
scalar, tile amax atomically maxed into 32 lanes): which stores (q, q^T, both), how q^T is
stored (pointer tile, explicit tl.trans, TMA descriptor), streaming cache hints, tiles.
Writes JSON (ms, TB/s of the kernel's own traffic) to --out.
"""
import argparse
import os
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._bench_util import cuda_time as _cuda_time, write_results  # noqa: E402



@triton.jit
def to_bf16_rne(x):  # as ovlt.kernels.rounding's
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _round(x, HW: tl.constexpr):
    if HW:
        return x.to(tl.bfloat16, fp_downcast_rounding="rtne").to(tl.float32)
    return to_bf16_rne(x).to(tl.float32)


@triton.jit
def _store_tile(y, q_ptr, qt_ptr, q_desc, qt_desc, rows, cols, n_rows, n_cols, mask, row0, col0,
                MODE_Q: tl.constexpr, MODE_QT: tl.constexpr, STREAM: tl.constexpr):
    cm: tl.constexpr = ".cs" if STREAM else ""
    if MODE_Q == 1:
        tl.store(q_ptr + rows[:, None] * n_cols + cols[None, :], y, mask=mask, cache_modifier=cm)
    if MODE_Q == 2:
        q_desc.store([row0, col0], y)
    if MODE_QT == 1:
        tl.store(qt_ptr + cols[None, :] * n_rows + rows[:, None], y, mask=mask,
                 cache_modifier=cm)
    if MODE_QT == 3:
        tl.store(qt_ptr + cols[:, None] * n_rows + rows[None, :], tl.trans(y),
                 mask=tl.trans(mask), cache_modifier=cm)
    if MODE_QT == 2:
        qt_desc.store([col0, row0], tl.trans(y))


@triton.jit
def _tile_amax(v):
    return tl.max(tl.max(tl.abs(v), 1), 0)


@triton.jit
def _record_amax(amax_ptr, amax):
    # as the real kernels: atomic max into one of 32 lanes by program id
    lane = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) % 32
    tl.atomic_max(amax_ptr + lane, amax)


@triton.jit
def _gate_up(h_ptr, R, F, stride_h, STREAM: tl.constexpr, BLOCK_R: tl.constexpr,
             BLOCK_C: tl.constexpr):
    ev: tl.constexpr = "evict_first" if STREAM else ""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < F)
    p = h_ptr + rows[:, None] * stride_h + cols[None, :]
    g = tl.load(p, mask=mask, other=0.0, eviction_policy=ev).to(tl.float32)
    u = tl.load(p + F, mask=mask, other=0.0, eviction_policy=ev).to(tl.float32)
    return rows, cols, mask, g, u


@triton.jit
def _bwd_probe(h_ptr, d_ptr, q_ptr, qt_ptr, qg_desc, qu_desc, tg_desc, tu_desc, s_ptr, amax_ptr,
               R, F, stride_h, stride_d, FMAX: tl.constexpr, MODE_Q: tl.constexpr,
               MODE_QT: tl.constexpr, STREAM: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_C: tl.constexpr, HW: tl.constexpr):
    ev: tl.constexpr = "evict_first" if STREAM else ""
    rows, cols, mask, g, u = _gate_up(h_ptr, R, F, stride_h, STREAM, BLOCK_R, BLOCK_C)
    d = tl.load(d_ptr + rows[:, None] * stride_d + cols[None, :], mask=mask, other=0.0,
                eviction_policy=ev).to(tl.float32)
    s = tl.load(s_ptr)
    sg = 1.0 / (1.0 + tl.exp(-g))
    dg = _round(d * sg * (1 + g * (1 - sg)) * u, HW)
    du = _round(d * g * sg, HW)
    yg = tl.minimum(tl.maximum(dg * s, -FMAX), FMAX).to(q_ptr.dtype.element_ty)
    yu = tl.minimum(tl.maximum(du * s, -FMAX), FMAX).to(q_ptr.dtype.element_ty)
    row0 = tl.program_id(0) * BLOCK_R
    col0 = tl.program_id(1) * BLOCK_C
    _store_tile(yg, q_ptr, qt_ptr, qg_desc, tg_desc, rows, cols, R, 2 * F, mask, row0, col0,
                MODE_Q, MODE_QT, STREAM)
    _store_tile(yu, q_ptr, qt_ptr, qu_desc, tu_desc, rows, cols + F, R, 2 * F, mask, row0,
                col0, MODE_Q, MODE_QT, STREAM)
    _record_amax(amax_ptr, tl.maximum(_tile_amax(dg), _tile_amax(du)))


@triton.jit
def _fwd_probe(h_ptr, q_ptr, qt_ptr, q_desc, qt_desc, s_ptr, amax_ptr, R, F, stride_h,
               FMAX: tl.constexpr, MODE_Q: tl.constexpr, MODE_QT: tl.constexpr,
               STREAM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
               HW: tl.constexpr):
    rows, cols, mask, g, u = _gate_up(h_ptr, R, F, stride_h, STREAM, BLOCK_R, BLOCK_C)
    s = tl.load(s_ptr)
    o = _round(g / (1.0 + tl.exp(-g)) * u, HW)
    y = tl.minimum(tl.maximum(o * s, -FMAX), FMAX).to(q_ptr.dtype.element_ty)
    _store_tile(y, q_ptr, qt_ptr, q_desc, qt_desc, rows, cols, R, F, mask,
                tl.program_id(0) * BLOCK_R, tl.program_id(1) * BLOCK_C, MODE_Q, MODE_QT, STREAM)
    _record_amax(amax_ptr, _tile_amax(o))


@triton.jit
def _cast_probe(x_ptr, q_ptr, qt_ptr, q_desc, qt_desc, s_ptr, amax_ptr, R, C,
                FMAX: tl.constexpr, MODE_Q: tl.constexpr, MODE_QT: tl.constexpr,
                STREAM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    ev: tl.constexpr = "evict_first" if STREAM else ""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    x = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0,
                eviction_policy=ev).to(tl.float32)
    s = tl.load(s_ptr)
    y = tl.minimum(tl.maximum(x * s, -FMAX), FMAX).to(q_ptr.dtype.element_ty)
    _store_tile(y, q_ptr, qt_ptr, q_desc, qt_desc, rows, cols, R, C, mask,
                tl.program_id(0) * BLOCK_R, tl.program_id(1) * BLOCK_C, MODE_Q, MODE_QT, STREAM)
    _record_amax(amax_ptr, _tile_amax(x))


def cuda_time(fn):
    if not torch.cuda.is_available():  # a CPU (interpreter) run checks the kernels only
        fn()
        return 1.0
    return _cuda_time(fn, 30, 3)


def desc(t, block):
    return TensorDescriptor.from_tensor(t, block)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--ffn", type=int, default=18944)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    R, F = args.rows, args.ffn
    dev = args.device
    h = torch.randn(R, 2 * F, device=dev, dtype=torch.bfloat16)
    d = torch.randn(R, F, device=dev, dtype=torch.bfloat16)
    x = torch.randn(R, 2 * F, device=dev, dtype=torch.bfloat16)
    s = torch.tensor(10.0, device=dev)
    amax = torch.zeros(32, device=dev)
    e5, e4 = torch.float8_e5m2, torch.float8_e4m3fn
    res = {"triton": triton.__version__,
           "h_clone_ms": cuda_time(lambda: h.clone()), "bwd": {}, "fwd": {}, "cast": {}}
    res["h_clone_TBps"] = 2 * h.numel() * 2 / 1e9 / res["h_clone_ms"]
    tiles = [(64, 64, 8), (32, 64, 4), (64, 64, 4), (64, 128, 8), (128, 64, 8), (32, 128, 4)]
    modes = [(1, 1, 0, 0), (1, 1, 1, 0), (1, 3, 0, 0), (1, 2, 0, 0), (2, 2, 0, 0), (1, 2, 1, 0),
             (1, 0, 0, 0), (0, 1, 0, 0), (0, 2, 0, 0), (1, 1, 0, 1), (1, 2, 0, 1), (2, 2, 0, 1)]
    cast_modes = [(1, 1, 0, 0), (1, 1, 1, 0), (1, 2, 0, 0), (2, 2, 0, 0), (1, 2, 1, 0)]
    ref = {}
    for kind in ("bwd", "fwd", "cast"):
        ncols = F if kind == "fwd" else 2 * F
        dt = e5 if kind == "bwd" else e4
        q = torch.empty(R, ncols, device=dev, dtype=dt)
        qt = torch.empty(ncols, R, device=dev, dtype=dt)
        rd = {"bwd": h.numel() * 2 + d.numel() * 2, "fwd": h.numel() * 2,
              "cast": x.numel() * 2}[kind]
        for mq, mqt, stream, hw in (cast_modes if kind == "cast" else modes):
            for br, bc, nw in tiles:
                key = f"q{mq}_qt{mqt}_s{stream}_hw{hw}_{br}x{bc}_w{nw}"
                try:
                    q.zero_()
                    qt.zero_()
                    if kind == "bwd":
                        hf = F
                        dq = (desc(q[:, :hf], [br, bc]), desc(q[:, hf:], [br, bc])) \
                            if mq == 2 else (None, None)
                        dqt = (desc(qt[:hf], [bc, br]), desc(qt[hf:], [bc, br])) \
                            if mqt == 2 else (None, None)
                        grid = (triton.cdiv(R, br), triton.cdiv(F, bc))

                        def go():
                            _bwd_probe[grid](h, d, q, qt, *dq, *dqt, s, amax, R, F, h.stride(0),
                                             d.stride(0), FMAX=torch.finfo(dt).max, MODE_Q=mq,
                                             MODE_QT=mqt, STREAM=stream, BLOCK_R=br,
                                             BLOCK_C=bc, HW=hw, num_warps=nw)
                    elif kind == "fwd":
                        dq = desc(q, [br, bc]) if mq == 2 else None
                        dqt = desc(qt, [bc, br]) if mqt == 2 else None
                        grid = (triton.cdiv(R, br), triton.cdiv(F, bc))

                        def go():
                            _fwd_probe[grid](h, q, qt, dq, dqt, s, amax, R, F, h.stride(0),
                                             FMAX=torch.finfo(dt).max, MODE_Q=mq, MODE_QT=mqt,
                                             STREAM=stream, BLOCK_R=br, BLOCK_C=bc,
                                             HW=hw, num_warps=nw)
                    else:
                        dq = desc(q, [br, bc]) if mq == 2 else None
                        dqt = desc(qt, [bc, br]) if mqt == 2 else None
                        grid = (triton.cdiv(R, br), triton.cdiv(2 * F, bc))

                        def go():
                            _cast_probe[grid](x, q, qt, dq, dqt, s, amax, R, 2 * F,
                                              FMAX=torch.finfo(dt).max, MODE_Q=mq, MODE_QT=mqt,
                                              STREAM=stream, BLOCK_R=br, BLOCK_C=bc,
                                              num_warps=nw)
                    go()
                    if dev == "cuda":
                        torch.cuda.synchronize()
                    sig = (q.view(torch.uint8).float().sum().item() if mq else None,
                           qt.view(torch.uint8).float().sum().item() if mqt else None)
                    ms = cuda_time(go)
                    wr = (q.numel() if mq else 0) + (qt.numel() if mqt else 0)
                    r = {"ms": ms, "TBps": (rd + wr) / 1e9 / ms}
                    # outputs equal the pointer-store version's (checksums per output)
                    for i, nm in ((0, "q"), (1, "qt")):
                        if sig[i] is not None:
                            ref.setdefault((kind, nm), sig[i])
                            r[f"{nm}_same"] = sig[i] == ref[(kind, nm)]
                    res[kind][key] = r
                except Exception as e:  # noqa: BLE001
                    res[kind][key] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                print(kind, key, res[kind][key], flush=True)
    write_results(os.path.dirname(os.path.abspath(args.out)), os.path.basename(args.out), res)
    for kind in ("bwd", "fwd", "cast"):
        ok = {k: v for k, v in res[kind].items() if "ms" in v}
        best = sorted(ok.items(), key=lambda kv: kv[1]["ms"])[:8]
        print("BEST", kind, [(k, round(v["ms"], 4), round(v["TBps"], 2)) for k, v in best])


if __name__ == "__main__":
    main()
