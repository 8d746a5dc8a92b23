"""fused_swiglu: SwiGLU over a fused [gate; up] projection, one pass forward and one backward,
for megatron-core's `bias_swiglu_impl` slot (the MLP of every LLM layer) and the frozen vision
tower's forward.

    y = [g, u] (last dim 2F)      out = silu(g) * u
    backward:  dg = dout * u * s * (1 + g (1 - s)),  du = dout * silu(g),  s = sigmoid(g)
Computed in fp32 and rounded once (to nearest even for bf16), as mcore's torch.compile'd
version does. That version writes [dg, du] through a `torch.cat`, and its kernel reads the
inputs once per output half (~2.4 GB per 7B layer at 8192 tokens, 0.7 ms on an H200); here each
program reads g, u and dout once and writes dg and du (1.55 GB).
`out=` lets the forward write into a strided view (the vision tower's K-padded fc2 input).
Triton on CUDA (or under TRITON_INTERPRET=1), the same formula in torch elsewhere. The kernels
use Triton builtins only (no `tl.sigmoid`, itself a jit function that Triton's interpreter
cannot call when TRITON_INTERPRET was set after triton was imported).
"""
from __future__ import annotations

from typing import Optional

import torch

from .rounding import to_bf16_rne  # noqa: F401 - a device function of the kernels
from .triton_ops import Kernel, tl, use_triton

BLOCK = 1024


def _swiglu_fwd_kernel_fn(y_ptr, o_ptr, F, sy, so, BLOCK: tl.constexpr, OUT_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < F
    g = tl.load(y_ptr + row * sy + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(y_ptr + row * sy + F + cols, mask=m, other=0.0).to(tl.float32)
    o = g / (1.0 + tl.exp(-g)) * u
    if OUT_BF16:
        o = to_bf16_rne(o)
    tl.store(o_ptr + row * so + cols, o.to(o_ptr.dtype.element_ty), mask=m)


def _swiglu_bwd_kernel_fn(y_ptr, d_ptr, dy_ptr, F, sy, sd, sdy, BLOCK: tl.constexpr,
                          OUT_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < F
    g = tl.load(y_ptr + row * sy + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(y_ptr + row * sy + F + cols, mask=m, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + row * sd + cols, mask=m, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    dg = d * s * (1 + g * (1 - s)) * u
    du = d * g * s
    if OUT_BF16:
        dg, du = to_bf16_rne(dg), to_bf16_rne(du)
    tl.store(dy_ptr + row * sdy + cols, dg.to(dy_ptr.dtype.element_ty), mask=m)
    tl.store(dy_ptr + row * sdy + F + cols, du.to(dy_ptr.dtype.element_ty), mask=m)


_swiglu_fwd_kernel = Kernel(_swiglu_fwd_kernel_fn, helpers=("to_bf16_rne",))
_swiglu_bwd_kernel = Kernel(_swiglu_bwd_kernel_fn, helpers=("to_bf16_rne",))


def _torch_fwd(y: torch.Tensor) -> torch.Tensor:
    g, u = y.float().chunk(2, dim=-1)
    return (g * torch.sigmoid(g) * u).to(y.dtype)


def _torch_bwd(y: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    g, u = y.float().chunk(2, dim=-1)
    d = d.float()
    s = torch.sigmoid(g)
    return torch.cat([d * s * (1 + g * (1 - s)) * u, d * g * s], dim=-1).to(y.dtype)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., C] -> [M, C] with unit stride along C (a view when possible)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def swiglu_forward(y: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """silu(g) * u for y = [g, u] [..., 2F] -> [..., F] (no autograd). `out`: an [M, F] view
    with unit column stride to write into (any row stride)."""
    if y.shape[-1] % 2:
        raise ValueError(f"fused_swiglu: last dim must be even ([gate; up]), got {tuple(y.shape)}")
    lead, f = y.shape[:-1], y.shape[-1] // 2
    y2 = _rows(y)
    if out is None:
        out = torch.empty((y2.shape[0], f), dtype=y.dtype, device=y.device)
    elif out.shape != (y2.shape[0], f) or out.stride(-1) != 1 or out.dtype != y.dtype:
        raise ValueError(f"fused_swiglu: out must be [{y2.shape[0]}, {f}] {y.dtype} with unit "
                         f"column stride, got {tuple(out.shape)} {out.dtype} {out.stride()}")
    if y2.shape[0] == 0:
        return out.view(*lead, f) if out.is_contiguous() else out
    if use_triton(y2):
        grid = (y2.shape[0], -(-f // BLOCK))
        _swiglu_fwd_kernel.on(y2)[grid](y2, out, f, y2.stride(0), out.stride(0), BLOCK=BLOCK,
                                        OUT_BF16=y.dtype == torch.bfloat16, num_warps=4)
    else:
        out.copy_(_torch_fwd(y2))
    return out.view(*lead, f) if out.is_contiguous() else out


def swiglu_backward(y: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """d(silu(g) * u)/d[g, u] given dout [..., F] -> [..., 2F] like y."""
    f = y.shape[-1] // 2
    y2, d2 = _rows(y), _rows(dout)
    if d2.shape != (y2.shape[0], f):
        raise ValueError(f"fused_swiglu: dout {tuple(dout.shape)} does not match y {tuple(y.shape)}")
    if not use_triton(y2):
        return _torch_bwd(y2, d2).view(y.shape)
    dy = torch.empty((y2.shape[0], 2 * f), dtype=y.dtype, device=y.device)
    if y2.shape[0]:
        grid = (y2.shape[0], -(-f // BLOCK))
        _swiglu_bwd_kernel.on(y2)[grid](y2, d2, dy, f, y2.stride(0), d2.stride(0),
                                        dy.stride(0), BLOCK=BLOCK,
                                        OUT_BF16=y.dtype == torch.bfloat16, num_warps=4)
    return dy.view(y.shape)


class _FusedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        ctx.save_for_backward(y)
        return swiglu_forward(y)

    @staticmethod
    def backward(ctx, dout):
        (y,) = ctx.saved_tensors
        return swiglu_backward(y, dout)


def fused_swiglu(y: torch.Tensor) -> torch.Tensor:
    """silu(g) * u for y = [g, u] [..., 2F], differentiable (keeps only y for backward;
    `swiglu_forward` checks the shape)."""
    return _FusedSwiGLU.apply(y)
