"""fused_adamw_: one AdamW step over an fp32 master tensor in a single pass.

Reads grad, param, exp_avg, exp_avg_sq (fp32) and writes param, exp_avg, exp_avg_sq and,
optionally, the bf16/fp16 model copy of the param: 30 bytes per element instead of the ~50 of
mcore-without-apex's separate passes (grad scaling by 1/tokens, clip scaling, Adam, fp32 ->
bf16 copy). The gradient is multiplied on the way in by `grad_coeff`, a 1-element fp32 device
tensor (the per-token 1/N times the clip coefficient), so no pass over the grads and no host
sync is needed for either.

Semantics are torch.optim.AdamW's (decoupled weight decay, no amsgrad):
    g = grad * coeff;  p *= 1 - lr * wd;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
Triton on CUDA (or under TRITON_INTERPRET=1); the same arithmetic in torch ops elsewhere.
Without weight decay, a block of elements that no gradient has reached yet (g = m = v = 0: the
embedding rows of tokens not seen so far) is left as it is, which is what the update would do
to it, after reading only g, m and v; its model copy is not rewritten either (it holds the
param's rounding already: mcore builds and loads the two consistently).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .rounding import to_bf16_rne  # noqa: F401 - a device function of the kernels
from .triton_ops import MAX_COMBINE, Kernel, tl, use_triton

BLOCK = 4096
SKIP_IDLE_BLOCKS = True  # leave blocks no gradient has reached (see above); off: an A/B switch


def _adamw_kernel_fn(p_ptr, g_ptr, m_ptr, v_ptr, out_ptr, coeff_ptr, n,
                     decay, beta1, beta2, step_size, inv_sqrt_bc2, eps,
                     HAS_OUT: tl.constexpr, OUT_BF16: tl.constexpr, SKIP_IDLE: tl.constexpr,
                     BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    c = tl.load(coeff_ptr)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * c
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    if SKIP_IDLE:
        # without weight decay an element that no gradient has reached yet (g = m = v = 0)
        # keeps its value: a block of only such elements (embedding rows of tokens not seen
        # so far) reads 12 bytes per element instead of 30 and writes none. `!= 0` is true
        # for NaN: a NaN gradient or coefficient still reaches every element.
        busy = (g != 0.0) | (m != 0.0) | (v != 0.0)
        any_busy = tl.reduce(busy.to(tl.int32), 0, MAX_COMBINE) + tl.full([BLOCK], 0, tl.int32)
        mask = mask & (any_busy > 0)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    p = p * decay
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    denom = tl.sqrt(v) * inv_sqrt_bc2 + eps
    p = p - step_size * (m / denom)
    tl.store(p_ptr + offs, p, mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    if HAS_OUT:
        if OUT_BF16:  # as torch's copy_ (which this replaces) rounds
            q = to_bf16_rne(p)
        else:
            q = p.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs, q, mask=mask)


_adamw_kernel = Kernel(_adamw_kernel_fn, helpers=("to_bf16_rne",))


@torch.no_grad()
def fused_adamw_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                 exp_avg_sq: torch.Tensor, grad_coeff: torch.Tensor, *, step: int, lr: float,
                 beta1: float, beta2: float, eps: float, weight_decay: float,
                 out: Optional[torch.Tensor] = None) -> None:
    """In-place AdamW step on contiguous fp32 `param`, `exp_avg`, `exp_avg_sq` (`step` = the
    step number after increment, >= 1); `out` (any float dtype, same numel) receives the
    updated param."""
    for name, t in (("param", param), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"fused_adamw_: {name} must be contiguous fp32, got {t.dtype}")
    n = param.numel()
    if grad.numel() != n or exp_avg.numel() != n or exp_avg_sq.numel() != n or \
            (out is not None and out.numel() != n):
        raise ValueError("fused_adamw_: param, grad, states and out must have the same numel")
    decay = 1.0 - lr * weight_decay
    step_size = lr / (1.0 - beta1 ** step)
    inv_sqrt_bc2 = 1.0 / math.sqrt(1.0 - beta2 ** step)
    if n == 0:
        return
    if use_triton(param):
        grid = (-(-n // BLOCK),)
        _adamw_kernel.on(param)[grid](
            param, grad.contiguous(), exp_avg, exp_avg_sq, out if out is not None else param,
            grad_coeff.reshape(1), n, decay, beta1, beta2, step_size, inv_sqrt_bc2, eps,
            HAS_OUT=out is not None, OUT_BF16=out is not None and out.dtype == torch.bfloat16,
            SKIP_IDLE=SKIP_IDLE_BLOCKS and decay == 1.0, BLOCK=BLOCK, num_warps=8)
        return
    g = grad.float() * grad_coeff.float()
    param.mul_(decay)
    exp_avg.mul_(beta1).add_(g, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    denom = exp_avg_sq.sqrt().mul_(inv_sqrt_bc2).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)
    if out is not None:
        out.copy_(param.view(out.shape))
