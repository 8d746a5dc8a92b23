"""Fused FP8 cast (+ transpose) Triton kernel for the per-tensor FP8 linears on CUDA.

`torch._scaled_mm` (cuBLASLt FP8) only takes "TN" operands: both K-major. So dX = dY W needs W
transposed and dW = dY^T X needs dY and X transposed. Casting to FP8 and then transposing the
1-byte tensor is slow in torch (a separate, poorly coalesced copy: ~1 ms for a 7B fc1 weight on
an H100); this kernel reads each 64x64 tile of the bf16 tensor once and writes the scaled FP8
tile and/or its transpose, like TE's cast-transpose. Scales are per tensor (amax computed by
the caller). CPU or no Triton: `cast_transpose` falls back to torch ops with the same result.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - optional
    triton = None

if triton is not None:
    @triton.jit
    def _cast_t_kernel(x_ptr, q_ptr, qt_ptr, scale_ptr, R, C, stride_r, stride_c,
                       FMAX: tl.constexpr, WRITE_Q: tl.constexpr, WRITE_QT: tl.constexpr,
                       BLOCK: tl.constexpr):
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        rows = pid_r * BLOCK + tl.arange(0, BLOCK)
        cols = pid_c * BLOCK + tl.arange(0, BLOCK)
        mask = (rows[:, None] < R) & (cols[None, :] < C)
        x = tl.load(x_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask,
                    other=0.0).to(tl.float32)
        s = tl.load(scale_ptr)
        y = tl.minimum(tl.maximum(x * s, -FMAX), FMAX).to(q_ptr.dtype.element_ty)
        if WRITE_Q:
            tl.store(q_ptr + rows[:, None] * C + cols[None, :], y, mask=mask)
        if WRITE_QT:
            tl.store(qt_ptr + cols[None, :] * R + rows[:, None], y, mask=mask)


def _amax_scale(t: torch.Tensor, dtype):
    fmax = torch.finfo(dtype).max
    amax = torch.linalg.vector_norm(t.detach(), float("inf")).float().clamp(min=1e-12)
    qscale = fmax / amax  # fp32: multiply to quantize
    return qscale, qscale.reciprocal()


def cast_transpose(t: torch.Tensor, dtype, want_q: bool = True, want_qt: bool = False):
    """Per-tensor FP8 cast of a 2-D tensor. Returns (q [R,C] row-major or None,
    qt [C,R] row-major (= t^T) or None, dequant scale)."""
    if t.dim() != 2:
        raise ValueError(f"cast_transpose takes 2-D tensors, got {tuple(t.shape)}")
    qscale, dq = _amax_scale(t, dtype)
    fmax = torch.finfo(dtype).max
    R, C = t.shape
    if triton is None or not (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        y = (t.detach().float() * qscale).clamp(-fmax, fmax).to(dtype)
        return (y.contiguous() if want_q else None,
                y.t().contiguous() if want_qt else None, dq)
    q = torch.empty(R, C, dtype=dtype, device=t.device) if want_q else None
    qt = torch.empty(C, R, dtype=dtype, device=t.device) if want_qt else None
    BLOCK = 64
    grid = (triton.cdiv(R, BLOCK), triton.cdiv(C, BLOCK))
    _cast_t_kernel[grid](t, q if want_q else qt, qt if want_qt else q, qscale.reshape(1), R, C,
                         t.stride(0), t.stride(1), FMAX=fmax, WRITE_Q=want_q, WRITE_QT=want_qt,
                         BLOCK=BLOCK)
    return q, qt, dq
