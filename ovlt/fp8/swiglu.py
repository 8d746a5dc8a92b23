"""SwiGLU fused with the FP8 casts around it, for the delayed-scaling FP8 MLP (`mlp.py`).

With FP8 linears the MLP's SwiGLU output exists only to be cast to fc2's FP8 input (and its
transpose, for fc2's dW), and the SwiGLU backward's output only to be cast to fc1's FP8 output
gradient (and its transpose, for fc1's dW). Under delayed scaling the scale is known before the
values, so one kernel computes the SwiGLU (or its backward) and writes the FP8 tensors directly:
at 8192 tokens of a 7B layer that skips writing and re-reading a bf16 [8192, 18944] forward and
a bf16 [8192, 37888] backward (1.9 GB of traffic per layer).

Each result is bit-for-bit what the two-kernel path gives, `cast_transpose(swiglu_forward(h))`
and `cast_transpose(swiglu_backward(h, d))`: the same fp32 formulas, rounded to h's dtype (bf16)
before scaling, and the same amax recorded in the history. That two-kernel path is also what runs
when there is no scale to start from (no history, or its first cast), for dtypes other than bf16
(and fp32 in Triton's interpreter), and where Triton does not run.
"""
from __future__ import annotations

import torch

from ovlt.kernels.rounding import to_bf16_rne  # noqa: F401 - a device function of the kernels
from ovlt.kernels.triton_ops import Kernel, device_fn, tl, use_triton
from ovlt.kernels.swiglu import swiglu_backward, swiglu_forward
from ovlt.fp8.cast import (  # noqa: F401 - _fp8_*: device functions
    FP8_HELPERS, FP8_SLOT_ARGS, AmaxHistory, _fp8_record, _fp8_scale, _fp8_store, cast_transpose,
    fp8_outputs, launch_args, needs_int64, scale_source)

# Tile of one program and its warps: on an H200 (`benchmarks/sft_parts.py --parts fp8_swiglu`,
# 8192 x 2 x 18944) 64 x 64 / 8 warps takes 0.297 ms forward / 0.517 backward, 32 x 64 / 4
# 0.306 / 0.493, 7 other tiles are slower; in the 4+8 step 64 x 64 / 8 was fastest too.
TILE = {"rows": 64, "cols": 64, "num_warps": 8}


@device_fn
def _gate_up(h_ptr, stride_h, R, F, IDX64: tl.constexpr, BLOCK_R: tl.constexpr,
             BLOCK_C: tl.constexpr):
    # this program's [BLOCK_R, BLOCK_C] tile of the gate and up halves of h, in fp32; int64
    # offsets only where an operand has 2^31 elements or more (they cost registers and ALU)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if IDX64:
        rows, cols = rows.to(tl.int64), cols.to(tl.int64)
    mask = (rows[:, None] < R) & (cols[None, :] < F)
    p = h_ptr + rows[:, None] * stride_h + cols[None, :]
    g = tl.load(p, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(p + F, mask=mask, other=0.0).to(tl.float32)
    return rows, cols, mask, g, u


def _fwd_fn(h_ptr, q_ptr, qt_ptr, src_ptr, dq_ptr, hist_ptr, R, F, stride_h, n_src, skip0,
            skip1, cur, nxt, FMAX: tl.constexpr, WRITE_Q: tl.constexpr, WRITE_QT: tl.constexpr,
            ROUND_BF16: tl.constexpr, RECORD: tl.constexpr, NSRC: tl.constexpr,
            LANES: tl.constexpr, IDX64: tl.constexpr, BLOCK_R: tl.constexpr,
            BLOCK_C: tl.constexpr):
    first = (tl.program_id(0) == 0) & (tl.program_id(1) == 0)
    s = _fp8_scale(src_ptr, dq_ptr, n_src, skip0, skip1, first, FMAX, NSRC, LANES)
    rows, cols, mask, g, u = _gate_up(h_ptr, stride_h, R, F, IDX64, BLOCK_R, BLOCK_C)
    o = g / (1.0 + tl.exp(-g)) * u  # ovlt/kernels/swiglu.py's forward, term for term
    if ROUND_BF16:
        o = to_bf16_rne(o).to(tl.float32)
    amax = _fp8_store(q_ptr, qt_ptr, o, s, rows, cols, R, F, mask, FMAX, WRITE_Q, WRITE_QT)
    if RECORD:
        _fp8_record(hist_ptr, amax, cur, nxt, first, LANES)


def _bwd_fn(h_ptr, d_ptr, q_ptr, qt_ptr, src_ptr, dq_ptr, hist_ptr, R, F, stride_h, stride_d,
            n_src, skip0, skip1, cur, nxt, FMAX: tl.constexpr, WRITE_Q: tl.constexpr,
            WRITE_QT: tl.constexpr, ROUND_BF16: tl.constexpr, RECORD: tl.constexpr,
            NSRC: tl.constexpr, LANES: tl.constexpr, IDX64: tl.constexpr,
            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    first = (tl.program_id(0) == 0) & (tl.program_id(1) == 0)
    s = _fp8_scale(src_ptr, dq_ptr, n_src, skip0, skip1, first, FMAX, NSRC, LANES)
    rows, cols, mask, g, u = _gate_up(h_ptr, stride_h, R, F, IDX64, BLOCK_R, BLOCK_C)
    d = tl.load(d_ptr + rows[:, None] * stride_d + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    sg = 1.0 / (1.0 + tl.exp(-g))  # ovlt/kernels/swiglu.py's backward, term for term
    dg = d * sg * (1 + g * (1 - sg)) * u
    du = d * g * sg
    if ROUND_BF16:
        dg, du = to_bf16_rne(dg).to(tl.float32), to_bf16_rne(du).to(tl.float32)
    a_g = _fp8_store(q_ptr, qt_ptr, dg, s, rows, cols, R, 2 * F, mask, FMAX, WRITE_Q, WRITE_QT)
    a_u = _fp8_store(q_ptr, qt_ptr, du, s, rows, cols + F, R, 2 * F, mask, FMAX, WRITE_Q,
                     WRITE_QT)
    if RECORD:
        _fp8_record(hist_ptr, tl.maximum(a_g, a_u), cur, nxt, first, LANES)


_HELPERS = (*FP8_HELPERS, "to_bf16_rne", "_gate_up")
_fwd_kernel = Kernel(_fwd_fn, _HELPERS, FP8_SLOT_ARGS)
_bwd_kernel = Kernel(_bwd_fn, _HELPERS, FP8_SLOT_ARGS)


def _check(h: torch.Tensor) -> torch.Tensor:
    if h.dim() != 2 or h.shape[1] % 2:
        raise ValueError(f"FP8 SwiGLU takes h = [gate; up] as [rows, 2F], got {tuple(h.shape)}")
    return h if h.stride(1) == 1 else h.contiguous()


def _fused(h: torch.Tensor, history: AmaxHistory | None) -> bool:
    # fp32 runs fused only in the interpreter: compiled (triton 3.6, H200) the backward with
    # both outputs wrote wrong values for fp32 inputs (bf16, what training uses, is bitwise
    # right there); not understood yet, so fp32 takes the two-kernel path on the GPU.
    ok_dtypes = (torch.bfloat16,) if h.is_cuda else (torch.bfloat16, torch.float32)
    return history is not None and history.calls > 0 and use_triton(h) and h.dtype in ok_dtypes


def _launch(kernel, h, d, n_cols, dtype, want_q, want_qt, history):
    R, F = h.shape[0], h.shape[1] // 2
    src, n_src, skip0, skip1, cur, nxt = scale_source(h, history)  # the history's slots only
    q, qt, dq = fp8_outputs(R, n_cols, dtype, h.device, want_q, want_qt)
    br, bc = TILE["rows"], TILE["cols"]
    grid = ((R + br - 1) // br, (F + bc - 1) // bc)
    inputs, strides = ((h,), (h.stride(0),)) if d is None else ((h, d), (h.stride(0), d.stride(0)))
    kernel.on(h)[grid](
        *inputs, q if want_q else qt, qt if want_qt else q, src, dq, history.hist, R, F,
        *strides, n_src, skip0, skip1, cur, nxt, FMAX=torch.finfo(dtype).max, WRITE_Q=want_q,
        WRITE_QT=want_qt, ROUND_BF16=h.dtype == torch.bfloat16,
        IDX64=needs_int64(R, n_cols, *strides), BLOCK_R=br, BLOCK_C=bc,
        **launch_args(history, n_src), **({"num_warps": TILE["num_warps"]} if h.is_cuda else {}))
    return q, qt, dq


def swiglu_cast_transpose(h: torch.Tensor, dtype, want_q: bool = True, want_qt: bool = False,
                          history: AmaxHistory | None = None):
    """silu(g) * u of h = [g, u] [R, 2F] cast to FP8: (q [R, F] or None, q^T [F, R] or None,
    dequant scale), exactly `cast_transpose(swiglu_forward(h), ...)`."""
    h = _check(h.detach())
    if not _fused(h, history):
        return cast_transpose(swiglu_forward(h), dtype, want_q, want_qt, history)
    return _launch(_fwd_kernel, h, None, h.shape[1] // 2, dtype, want_q, want_qt, history)


def swiglu_grad_cast_transpose(h: torch.Tensor, d: torch.Tensor, dtype, want_q: bool = True,
                               want_qt: bool = False, history: AmaxHistory | None = None):
    """The gradient of silu(g) * u with respect to h = [g, u] [R, 2F], given d [R, F], cast to
    FP8: (q [R, 2F] or None, q^T [2F, R] or None, dequant scale), exactly
    `cast_transpose(swiglu_backward(h, d), ...)`."""
    h = _check(h.detach())
    if tuple(d.shape) != (h.shape[0], h.shape[1] // 2):
        raise ValueError(f"FP8 SwiGLU backward: d {tuple(d.shape)} does not match h "
                         f"{tuple(h.shape)}")
    if not _fused(h, history):
        return cast_transpose(swiglu_backward(h, d), dtype, want_q, want_qt, history)
    d = d.detach() if d.stride(1) == 1 else d.detach().contiguous()
    return _launch(_bwd_kernel, h, d, h.shape[1], dtype, want_q, want_qt, history)
