"""fused_rope: rotary position embedding (non-interleaved halves) in one pass, forward and
backward, for megatron-core's `fused_apply_rotary_pos_emb` slot (sbhd layout).

    y[..., :D/2] = x1 * cos1 - x2 * sin1        y[..., D/2:] = x2 * cos2 + x1 * sin2
with cos/sin of `freqs` [S, B or 1, 1, D] (fp32 angles; MRoPE's per-token t/h/w angles arrive
already interleaved by section, so this is plain RoPE to the kernel). mcore's unfused version
runs ~8 elementwise passes plus two concatenations per call (q and k of every layer); here
one read and one write of x, angles read and turned into cos/sin once per token. For bf16 x,
cos/sin are rounded to bf16 first as mcore and HF do for the LLM; the products are summed in
fp32 and rounded once (to nearest even).
Backward: dx1 = dy1 cos1 + dy2 sin2, dx2 = dy2 cos2 - dy1 sin1.
Triton on CUDA (or under TRITON_INTERPRET=1), the same formula in torch elsewhere.
"""
from __future__ import annotations

import torch

from .rounding import to_bf16_rne  # noqa: F401 - a device function of the kernels
from .triton_ops import Kernel, tl, triton, use_triton

# token rows and heads per program (cos/sin computed once per row and program) and its warps;
# `benchmarks/sft_parts.py --parts rope` sweeps them
TILE = {"tokens": 4, "heads": 32, "num_warps": 4}


def _rope_kernel_fn(x_ptr, f_ptr, y_ptr, T, B, H, sx_s, sx_b, sx_h, sy_s, sy_b, sy_h, sf_s,
                    sf_b, HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                    BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr, ROUND_TRIG: tl.constexpr,
                    OUT_BF16: tl.constexpr):
    # a [BLOCK_T token rows (s * B + b), BLOCK_H heads, half D] tile; cos/sin of a row's
    # angles are computed once and broadcast over its heads
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    s = rows // B
    b = rows % B
    ds = tl.arange(0, BLOCK_D)
    fm = (rows < T)[:, None] & (ds < HALF)[None, :]
    fo = f_ptr + (s * sf_s + b * sf_b)[:, None] + ds[None, :]
    f1 = tl.load(fo, mask=fm, other=0.0).to(tl.float32)
    f2 = tl.load(fo + HALF, mask=fm, other=0.0).to(tl.float32)
    c1, s1, c2, s2 = tl.cos(f1), tl.sin(f1), tl.cos(f2), tl.sin(f2)
    if ROUND_TRIG:  # to x's dtype, as mcore does (bf16 here)
        c1, s1 = to_bf16_rne(c1).to(tl.float32), to_bf16_rne(s1).to(tl.float32)
        c2, s2 = to_bf16_rne(c2).to(tl.float32), to_bf16_rne(s2).to(tl.float32)
    c1, s1, c2, s2 = c1[:, None, :], s1[:, None, :], c2[:, None, :], s2[:, None, :]
    m = fm[:, None, :] & (hs < H)[None, :, None]
    xo = x_ptr + (s * sx_s + b * sx_b)[:, None, None] + hs[None, :, None] * sx_h \
        + ds[None, None, :]
    x1 = tl.load(xo, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(xo + HALF, mask=m, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    if OUT_BF16:
        y1, y2 = to_bf16_rne(y1), to_bf16_rne(y2)
    yo = y_ptr + (s * sy_s + b * sy_b)[:, None, None] + hs[None, :, None] * sy_h \
        + ds[None, None, :]
    tl.store(yo, y1.to(y_ptr.dtype.element_ty), mask=m)
    tl.store(yo + HALF, y2.to(y_ptr.dtype.element_ty), mask=m)


_rope_kernel = Kernel(_rope_kernel_fn, helpers=("to_bf16_rne",))


def _rope_torch(x, freqs, backward: bool):
    half = x.shape[-1] // 2
    c, s = torch.cos(freqs), torch.sin(freqs)
    if x.dtype == torch.bfloat16:
        c, s = c.to(x.dtype), s.to(x.dtype)
    c, s, xf = c.float(), s.float(), x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    c1, c2, s1, s2 = c[..., :half], c[..., half:], s[..., :half], s[..., half:]
    if backward:
        y = torch.cat([x1 * c1 + x2 * s2, x2 * c2 - x1 * s1], dim=-1)
    else:
        y = torch.cat([x1 * c1 - x2 * s1, x2 * c2 + x1 * s2], dim=-1)
    return y.to(x.dtype)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor, backward: bool) -> torch.Tensor:
    """One pass of `fused_rope` without autograd: x [S, B, H, D] rotated by freqs (the
    backward's inverse rotation with `backward=True`); Triton where it runs, else torch."""
    S, B, H, D = x.shape
    if not use_triton(x) or x.stride(-1) != 1:
        return _rope_torch(x, freqs, backward)
    f = freqs.float()
    if f.stride(-1) != 1:
        f = f.contiguous()
    y = torch.empty((S, B, H, D), dtype=x.dtype, device=x.device)
    half = D // 2
    block_h = min(TILE["heads"], triton.next_power_of_2(H))
    grid = (triton.cdiv(S * B, TILE["tokens"]), triton.cdiv(H, block_h))
    sf_b = f.stride(1) if f.shape[1] > 1 else 0
    _rope_kernel.on(x)[grid](
        x, f, y, S * B, B, H, x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1),
        y.stride(2), f.stride(0), sf_b, HALF=half, BLOCK_T=TILE["tokens"], BLOCK_H=block_h,
        BLOCK_D=triton.next_power_of_2(half), BACKWARD=backward,
        ROUND_TRIG=x.dtype == torch.bfloat16, OUT_BF16=x.dtype == torch.bfloat16,
        num_warps=TILE["num_warps"])
    return y


class _FusedRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, freqs):
        ctx.save_for_backward(freqs)
        return apply_rope(x, freqs, backward=False)

    @staticmethod
    def backward(ctx, dy):
        (freqs,) = ctx.saved_tensors
        return apply_rope(dy, freqs, backward=True), None


def fused_rope(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """RoPE on t [S, B, H, D] with angles freqs [S, B or 1, 1, D] (mcore's signature)."""
    if interleaved:
        raise NotImplementedError("fused_rope: interleaved rotary layout is not supported")
    if t.dim() != 4 or freqs.dim() != 4 or freqs.shape[-1] != t.shape[-1] or \
            freqs.shape[0] != t.shape[0] or freqs.shape[1] not in (1, t.shape[1]) or \
            t.shape[-1] % 2:
        raise ValueError(f"fused_rope: t [S,B,H,D] with freqs [S,B|1,1,D] and even D expected, "
                         f"got {tuple(t.shape)} and {tuple(freqs.shape)}")
    return _FusedRope.apply(t, freqs)
