"""Top-p (nucleus) threshold per row without sorting the vocabulary.

The nucleus of a distribution p is kept as {i : p_i >= tau} with
    tau = the largest value v such that sum(p_j for p_j >= v) >= top_p * sum(p)
(ties at tau are all kept, whatever their order). Sorting [rows, 152k] probabilities every
decode step costs milliseconds on a GPU; here tau is found by a radix search on the bits of the
fp32 probabilities (non-negative floats order as their bit patterns): 8 passes over the row,
each settling 4 bits by summing the mass at or above 16 candidate thresholds at once. A pass is
two kernels: partial masses per (row, chunk of the row), then one program per row adds them
and settles the bits, so a handful of rows still spreads over the whole GPU.

Triton on CUDA (or under TRITON_INTERPRET=1); elsewhere the same tau from a sort.
"""
from __future__ import annotations

import torch

from ovlt.kernels.triton_ops import ADD_COMBINE, MAX_COMBINE, Kernel, tl, use_triton


def _mass_fn(P, stride, PREFIX, MASS, shift, V: tl.constexpr, CHUNK: tl.constexpr,
             BLOCK: tl.constexpr):
    # program (row, chunk): the mass at or above each of 16 candidate thresholds, prefix +
    # (k << shift) for k = 0..15, over the chunk's columns [chunk * CHUNK, + CHUNK)
    row = tl.program_id(0)
    c = tl.program_id(1)
    nchunk = tl.num_programs(1)
    base = P + row.to(tl.int64) * stride
    ks = tl.arange(0, 16)
    cols = tl.arange(0, BLOCK)
    cand = tl.load(PREFIX + row) + (ks << shift)                      # [16] int32
    mass = tl.full([16], 0.0, tl.float32)
    for start in range(0, CHUNK, BLOCK):
        idx = c * CHUNK + start + cols
        p = tl.load(base + idx, mask=idx < V, other=0.0)
        bits = p.to(tl.int32, bitcast=True)
        ge = bits[None, :] >= cand[:, None]                            # [16, BLOCK]
        mass += tl.reduce(tl.where(ge, p[None, :], 0.0), 1, ADD_COMBINE)
    tl.store(MASS + (row * nchunk + c) * 16 + ks, mass)


def _settle_fn(MASS, PREFIX, TARGET, top_p, shift, FIRST: tl.constexpr, NCHUNK: tl.constexpr):
    # program (row): the chunks' masses summed; the largest candidate whose mass still reaches
    # the target settles the next 4 bits (bits 30..28 first: bit 31, the sign, is 0)
    row = tl.program_id(0)
    ks = tl.arange(0, 16)
    ci = tl.arange(0, NCHUNK)
    m = tl.load(MASS + (row * NCHUNK + ci[:, None]) * 16 + ks[None, :])
    mass = tl.reduce(m, 0, ADD_COMBINE)                                 # [16]
    if FIRST:  # candidate 0 is threshold 0: the whole row's mass
        target = tl.reduce(tl.where(ks == 0, mass, 0.0), 0, ADD_COMBINE) * top_p
        tl.store(TARGET + row + tl.arange(0, 1), tl.full([1], 0.0, tl.float32) + target)
        limit = 8
    else:
        target = tl.load(TARGET + row)
        limit = 16
    ok = (mass >= target) & (ks < limit)
    best = tl.reduce(tl.where(ok, ks, 0), 0, MAX_COMBINE)
    tl.store(PREFIX + row, tl.load(PREFIX + row) + (best << shift))


def _pow2(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


_mass = Kernel(_mass_fn)
_settle = Kernel(_settle_fn)


def top_p_threshold_reference(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """tau per row from a descending sort: the value at the first position where the running
    mass reaches top_p * the row's mass."""
    s = probs.sort(dim=-1, descending=True).values
    c = s.cumsum(-1)
    j = (c < top_p * c[:, -1:]).sum(-1, keepdim=True).clamp_max(probs.shape[-1] - 1)
    return s.gather(-1, j)


def top_p_threshold(probs: torch.Tensor, top_p: float, programs: int = 2048) -> torch.Tensor:
    """probs [B, V] fp32 >= 0 (unit stride on V) -> tau [B, 1]; keep probs >= tau.
    `programs`: about how many (row, chunk) programs each pass runs (the GPU stays busy
    whatever the row count: a few rows of a decode tail are cut into many chunks)."""
    B, V = probs.shape
    if not (use_triton(probs) and probs.dtype == torch.float32 and probs.stride(-1) == 1):
        return top_p_threshold_reference(probs, top_p)
    block = 1024 if probs.is_cuda else 4096
    blocks = -(-V // block)
    # each row cut into chunks so that about `programs` programs run even for a few rows
    nchunk = min(_pow2(-(-programs // B)), _pow2(blocks))
    chunk = -(-blocks // nchunk) * block
    prefix = torch.zeros(B, dtype=torch.int32, device=probs.device)
    target = torch.empty(B, dtype=torch.float32, device=probs.device)
    mass = torch.empty(B, nchunk, 16, dtype=torch.float32, device=probs.device)
    kw = {"num_warps": 8} if probs.is_cuda else {}
    for i in range(8):
        shift = 28 - 4 * i
        _mass.on(probs)[(B, nchunk)](probs, probs.stride(0), prefix, mass, shift, V=V,
                                     CHUNK=chunk, BLOCK=block, **kw)
        _settle.on(probs)[(B,)](mass, prefix, target, float(top_p), shift, FIRST=i == 0,
                                NCHUNK=nchunk)
    return prefix.view(torch.float32).view(B, 1)
