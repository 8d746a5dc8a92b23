"""Decode attention over per-slot KV buffers of different valid lengths (flash-decoding).

One query token per slot: q [B, Hq, D] attends keys / values [0, lengths[b]) of its slot's
cache rows k, v [B, G, L, D] (GQA: query head h reads kv group h // (Hq / G)). The buffers
are sized for the longest sequence a slot may hold (L), but a slot is usually far shorter:
the Triton kernel reads only the valid keys, so a step costs what the live tokens cost, not
what the buffers reserve. Work is split along the keys (`split` keys per program, all query
heads of one group per program so each key is read once; a program past its slot's length
returns at once), then a second kernel combines the partial softmax sums. Shapes are static
(grid = B x G x ceil(L / split)), so the decode step stays one CUDA graph whatever the lengths.

Triton on CUDA (or under TRITON_INTERPRET=1); elsewhere `F.scaled_dot_product_attention` with
a length mask (the same result; it reads all L keys).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ovlt.kernels.rounding import to_bf16_rne  # noqa: F401 - a device function of _combine
from ovlt.kernels.triton_ops import ADD_COMBINE, MAX_COMBINE, Kernel, tl, triton, use_triton

BLOCK_N = 64           # keys per inner iteration
TARGET_PROGRAMS = 1024  # enough (slot, group, split) programs to fill an H100 a few times over


def choose_split(B: int, G: int, L: int, block: int = BLOCK_N,
                 target_programs: int = TARGET_PROGRAMS) -> int:
    """Keys per program: a whole slot when slots x groups already fill the GPU (many slots),
    else the keys cut so that about `target_programs` programs run (few slots, long ones)."""
    per = max(1, -(-target_programs // (B * G)))
    split = -(-L // per)
    return max(block, -(-split // block) * block)


def _partial_fn(Q, K, V, LENS, ACC, M, LS, sq_b, sq_h, sk_b, sk_g, sk_l, sv_b, sv_g, sv_l,
                scale, H, NSPLIT: tl.constexpr, QPG: tl.constexpr, BLOCK_Q: tl.constexpr,
                D: tl.constexpr, SPLIT_N: tl.constexpr, BLOCK: tl.constexpr,
                UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # program (slot b, kv group g, split s): online softmax over the keys
    # [s*SPLIT_N, s*SPLIT_N + SPLIT_N) that are < lengths[b], for the QPG query heads of group
    # g (rows padded to BLOCK_Q). A split past the slot's length does nothing (the combine
    # kernel skips it), and a split's loop stops at the length: no work on dead keys.
    b = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.program_id(2)
    start = s * SPLIT_N
    n_here = tl.minimum(tl.load(LENS + b) - start, SPLIT_N)
    if n_here > 0:
        qi = tl.arange(0, BLOCK_Q)
        d = tl.arange(0, D)
        qm = qi < QPG
        heads = g * QPG + qi
        q = tl.load(Q + b.to(tl.int64) * sq_b + heads[:, None] * sq_h + d[None, :],
                    mask=qm[:, None], other=0.0)
        if UPCAST:  # Triton's CPU interpreter multiplies bf16 wrongly in tl.dot
            q = q.to(tl.float32)
        m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        lsum = tl.full([BLOCK_Q], 0.0, tl.float32)  # not tl.zeros: a jit function, see triton_ops
        acc = tl.full([BLOCK_Q, D], 0.0, tl.float32)
        kbase = K + b.to(tl.int64) * sk_b + g.to(tl.int64) * sk_g + start.to(tl.int64) * sk_l
        vbase = V + b.to(tl.int64) * sv_b + g.to(tl.int64) * sv_g + start.to(tl.int64) * sv_l
        for off in range(0, n_here, BLOCK):
            kv = off + tl.arange(0, BLOCK)
            km = kv < n_here
            k = tl.load(kbase + kv[:, None].to(tl.int64) * sk_l + d[None, :], mask=km[:, None],
                        other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            if IEEE:  # fp32 caches: full-precision products (not TF32)
                sc = tl.dot(q, tl.trans(k), input_precision="ieee").to(tl.float32) * scale
            else:
                sc = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
            sc = tl.where(km[None, :], sc, float("-inf"))
            # every block has a live key (off < n_here), so m_new is finite
            m_new = tl.maximum(m, tl.reduce(sc, 1, MAX_COMBINE))
            alpha = tl.exp(m - m_new)
            p = tl.exp(sc - m_new[:, None])
            lsum = lsum * alpha + tl.reduce(p, 1, ADD_COMBINE)
            v = tl.load(vbase + kv[:, None].to(tl.int64) * sv_l + d[None, :], mask=km[:, None],
                        other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv.to(tl.float32)
            m = m_new
        part = (b.to(tl.int64) * H + heads) * NSPLIT + s  # index into [B, Hq, NSPLIT]
        tl.store(M + part, m, mask=qm)
        tl.store(LS + part, lsum, mask=qm)
        tl.store(ACC + part[:, None] * D + d[None, :], acc, mask=qm[:, None])


def _combine_fn(ACC, M, LS, LENS, OUT, so_b, so_h, H, NSPLIT: tl.constexpr,
                BLOCK_S: tl.constexpr, SPLIT_N: tl.constexpr, D: tl.constexpr,
                OUT_BF16: tl.constexpr):
    # program (slot b, head h): the live splits' partial sums, each weighted by
    # exp(m_s - max m)
    b = tl.program_id(0)
    h = tl.program_id(1)
    live = (tl.load(LENS + b) + SPLIT_N - 1) // SPLIT_N
    si = tl.arange(0, BLOCK_S)
    sm = si < live
    d = tl.arange(0, D)
    base = (b.to(tl.int64) * H + h) * NSPLIT
    m = tl.load(M + base + si, mask=sm, other=float("-inf"))
    mx = tl.reduce(m, 0, MAX_COMBINE)
    w = tl.where(sm, tl.exp(m - mx), 0.0)
    ls = tl.load(LS + base + si, mask=sm, other=0.0)
    acc = tl.load(ACC + (base + si)[:, None] * D + d[None, :], mask=sm[:, None], other=0.0)
    o = tl.reduce(acc * w[:, None], 0, ADD_COMBINE) / tl.reduce(ls * w, 0, ADD_COMBINE)
    if OUT_BF16:  # to nearest even, as torch rounds (a plain cast may truncate)
        o = to_bf16_rne(o)
    tl.store(OUT + b.to(tl.int64) * so_b + h * so_h + d, o.to(OUT.dtype.element_ty))


_partial = Kernel(_partial_fn)
_combine = Kernel(_combine_fn, helpers=("to_bf16_rne",))


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               lengths: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """The torch path: SDPA over all L keys with the keys >= lengths[b] masked out."""
    B, Hq, D = q.shape
    G, L = k.shape[1], k.shape[2]
    mask = (torch.arange(L, device=q.device)[None, :] < lengths[:, None]).view(B, 1, 1, L)
    out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask, scale=scale,
                                         enable_gqa=G != Hq)
    return out[:, :, 0, :]


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                     scale: Optional[float] = None, split: Optional[int] = None,
                     block: int = BLOCK_N) -> torch.Tensor:
    """q [B, Hq, D]; k, v [B, G, L, D] (unit stride on D); lengths [B] int (1 <= len <= L):
    the attention output [B, Hq, D] in q's dtype. Triton when it can run (CUDA, or the CPU
    interpreter), else `decode_attention_reference`. `split`: keys per program (a multiple
    of `block`; default `choose_split`)."""
    B, Hq, D = q.shape
    G, L = k.shape[1], k.shape[2]
    if Hq % G:
        raise ValueError(f"decode_attention: {Hq} query heads are not a multiple of {G} kv groups")
    scale = D ** -0.5 if scale is None else float(scale)
    pow2 = D >= 16 and D & (D - 1) == 0
    if not (use_triton(q) and pow2 and k.stride(-1) == 1 and v.stride(-1) == 1):
        return decode_attention_reference(q, k, v, lengths, scale)
    if split is None:
        split = choose_split(B, G, L, block)
    if split % block:
        raise ValueError(f"decode_attention: split {split} is not a multiple of block {block}")
    q = q.contiguous()
    qpg = Hq // G
    nsplit = triton.cdiv(L, split)
    acc = torch.empty(B, Hq, nsplit, D, dtype=torch.float32, device=q.device)
    m = torch.empty(B, Hq, nsplit, dtype=torch.float32, device=q.device)
    ls = torch.empty_like(m)
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    lengths = lengths.to(torch.int32)
    kw = {"num_warps": 4} if q.is_cuda else {}
    _partial.on(q)[(B, G, nsplit)](
        q, k, v, lengths, acc, m, ls, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        k.stride(2), v.stride(0), v.stride(1), v.stride(2), scale, Hq, NSPLIT=nsplit, QPG=qpg,
        BLOCK_Q=max(16, triton.next_power_of_2(qpg)), D=D, SPLIT_N=split, BLOCK=block,
        UPCAST=not q.is_cuda, IEEE=q.dtype == torch.float32, **kw)
    _combine.on(q)[(B, Hq)](acc, m, ls, lengths, out, out.stride(0), out.stride(1), Hq,
                            NSPLIT=nsplit, BLOCK_S=max(2, triton.next_power_of_2(nsplit)),
                            SPLIT_N=split, D=D, OUT_BF16=out.dtype == torch.bfloat16, **kw)
    return out
