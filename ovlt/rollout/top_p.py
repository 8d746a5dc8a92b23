"""Top-p (nucleus) threshold per row without sorting the vocabulary.

The nucleus of a distribution p is kept as {i : p_i >= tau} with
    tau = the largest value v such that sum(p_j for p_j >= v) >= top_p * sum(p)
(ties at tau are all kept, whatever their order). Sorting [rows, 152k] probabilities every
decode step costs milliseconds on a GPU; here tau is found by a radix search on the bits of the
fp32 probabilities (non-negative floats order as their bit patterns): 8 passes over the row,
each settling 4 bits by summing the mass at or above 16 candidate thresholds at once.

Triton on CUDA (or under TRITON_INTERPRET=1); elsewhere the same tau from a sort.
"""
from __future__ import annotations

import torch

from ovlt.kernels.triton_ops import ADD_COMBINE, MAX_COMBINE, Kernel, tl, use_triton


def _threshold_fn(P, stride, TAU, top_p, V: tl.constexpr, BLOCK: tl.constexpr):
    # one program per row; V (the vocabulary, fixed per run) is a constexpr: Triton's
    # interpreter passes plain int arguments as arrays, which range() refuses
    row = tl.program_id(0)
    base = P + row.to(tl.int64) * stride
    ks = tl.arange(0, 16)
    cols = tl.arange(0, BLOCK)
    prefix = tl.full([1], 0, tl.int32)
    target = tl.full([1], 0.0, tl.float32)
    # bits 30..28 first (bit 31, the sign, is 0), then 4 bits per pass down to bit 0
    for i in range(8):
        shift = 28 - 4 * i
        cand = prefix + (ks << shift)                                  # [16] int32
        mass = tl.full([16], 0.0, tl.float32)
        for start in range(0, V, BLOCK):
            idx = start + cols
            p = tl.load(base + idx, mask=idx < V, other=0.0)
            bits = p.to(tl.int32, bitcast=True)
            ge = bits[None, :] >= cand[:, None]                         # [16, BLOCK]
            mass += tl.reduce(tl.where(ge, p[None, :], 0.0), 1, ADD_COMBINE)
        if i == 0:  # candidate 0 is threshold 0: the whole row's mass
            target = tl.reduce(tl.where(ks == 0, mass, 0.0), 0, ADD_COMBINE) * top_p + target
        ok = (mass >= target) & (ks < tl.where(i == 0, 8, 16))
        best = tl.reduce(tl.where(ok, ks, 0), 0, MAX_COMBINE)
        prefix = prefix + (best << shift)
    tl.store(TAU + row + tl.arange(0, 1), prefix.to(tl.float32, bitcast=True))


_threshold = Kernel(_threshold_fn)


def top_p_threshold_reference(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """tau per row from a descending sort: the value at the first position where the running
    mass reaches top_p * the row's mass."""
    s = probs.sort(dim=-1, descending=True).values
    c = s.cumsum(-1)
    j = (c < top_p * c[:, -1:]).sum(-1, keepdim=True).clamp_max(probs.shape[-1] - 1)
    return s.gather(-1, j)


def top_p_threshold(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs [B, V] fp32 >= 0 (unit stride on V) -> tau [B, 1]; keep probs >= tau."""
    B, V = probs.shape
    if not (use_triton(probs) and probs.dtype == torch.float32 and probs.stride(-1) == 1):
        return top_p_threshold_reference(probs, top_p)
    tau = torch.empty(B, 1, dtype=torch.float32, device=probs.device)
    block = 1024 if probs.is_cuda else 4096
    kw = {"num_warps": 8} if probs.is_cuda else {}
    _threshold.on(probs)[(B,)](probs, probs.stride(0), tau, float(top_p), V=V, BLOCK=block, **kw)
    return tau
