"""Seeded draw from the top-p nucleus by rejection, fused with the log-prob: one kernel per step.

The nucleus of a row's kept distribution p (banned / top-k tokens have p = 0) is
N = {i : p_i >= tau}, tau the largest value whose mass at or above reaches top_p (ties at tau
all kept). A token x is in N exactly when the mass strictly above p_x is below top_p (if
p_x >= tau, every token above it is above tau too, and that mass falls short of top_p; if
p_x < tau, the tokens at or above tau are above x and reach top_p). So tau is never needed:

    S = all kept tokens
    repeat: x = inverse-CDF draw from p restricted to S (one uniform per round)
            if mass{p > p_x} < top_p * mass(p): accept x
            else: S = {p > p_x}      (x is below tau, so N stays inside S)

Each round draws from p on a superset of N, so an accepted x is distributed as p on N: the
draw is exactly the nucleus distribution. A round costs a scan to the draw and one pass for
the mass above it, and the first round is accepted with probability ~top_p; after `ROUNDS`
rejected rounds (probability ~(1 - top_p)^ROUNDS) the row takes its most likely kept token,
which is always in N. Round k's uniform hashes (seed + k * ROUND_STEP, counter): round 0 is
`row_uniform(seeds, counters)`, the draw a sampler without top-p makes.

The kernel (Triton on CUDA, or under TRITON_INTERPRET=1) runs one program per row: a pass for
the row's max and sums (the policy log-prob's log-sum-exp over the whole vocabulary, the kept
mass) and then the rounds, reading the logits in place: no [B, V] temporaries, where the torch
path (`draw_torch`, the reference and the CPU path) materialises probabilities and a cumsum.
"""
from __future__ import annotations

import torch

from ovlt.kernels.triton_ops import ADD_COMBINE, MAX_COMBINE, Kernel, tl, use_triton

ROUNDS = 4
ROUND_STEP = 0x5851F42D4C957F2D  # odd, < 2^63 (a valid int64): round k hashes seed + k * it


def round_uniforms(seeds: torch.Tensor, counters: torch.Tensor, rounds: int) -> torch.Tensor:
    """[B, rounds] uniforms in [0, 1): column k = row_uniform(seeds + k * ROUND_STEP, counters)
    (wrapping int64 arithmetic, the same on CPU and CUDA)."""
    from ovlt.rollout.sampling import row_uniform  # (sampling imports this module)
    ks = torch.arange(rounds, device=seeds.device, dtype=torch.int64)
    return row_uniform(seeds[:, None] + ks[None, :] * ROUND_STEP,
                       counters[:, None].expand(-1, rounds).contiguous())


def kept_probs(logits: torch.Tensor, temperature: float, banned: torch.Tensor | None = None):
    """(e [B, V] = the kept tokens' unnormalised probabilities exp(logits / T - max), 0 at
    banned ids; lse [B] = the log-sum-exp of logits / T over the whole vocabulary, banned ids
    included: the policy log-prob is not renormalised by the ban). One [B, V] buffer."""
    e = logits.float() / temperature
    peak = e.amax(-1, keepdim=True)
    e.sub_(peak).exp_()
    lse = (peak + e.sum(-1, keepdim=True).log()).squeeze(-1)
    if banned is not None and banned.numel():
        e.index_fill_(-1, banned, 0.0)
    return e, lse


def draw_torch(logits: torch.Tensor, e: torch.Tensor, top_p: float,
               us: torch.Tensor) -> torch.Tensor:
    """The rejection draw in torch: logits [B, V] (any temperature: only their order counts),
    e [B, V] the kept tokens' unnormalised probabilities (0 elsewhere; overwritten), us [B, R]
    round uniforms -> tokens [B]."""
    V = e.shape[-1]

    def inverse_cdf(cdf, k):
        total = cdf[:, -1:]
        # u * total < total strictly, so the draw lands on a token of positive probability
        # (a filtered token has a zero-width interval: searchsorted(right) skips it)
        u = torch.minimum(us[:, k:k + 1] * total, torch.nextafter(total, torch.zeros_like(total)))
        return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_max_(V - 1)

    if top_p >= 1.0:
        return inverse_cdf(e.cumsum_(-1), 0)
    fallback = e.argmax(-1)
    kept_mass = e.sum(-1)
    tok = fallback
    pending = torch.ones_like(fallback, dtype=torch.bool)
    w = e
    for k in range(us.shape[1]):
        x = inverse_cdf(w.cumsum(-1), k)
        w = e * (logits > logits.gather(-1, x[:, None]))
        accept = pending & (w.sum(-1) < top_p * kept_mass)
        tok = torch.where(accept, x, tok)
        pending &= ~accept
        if not e.is_cuda and not bool(pending.any()):  # no host sync on a GPU (graph capture)
            break
    return torch.where(pending, fallback, tok)


def _sample_fn(X, stride, BANNED, U, TOK, LP, V: tl.constexpr, temperature, top_p,
               NB: tl.constexpr, R: tl.constexpr, TOP_P: tl.constexpr, BLOCK: tl.constexpr):
    # one program per row: pass 1 = max, log-sum-exp over all tokens, mass of the kept ones
    # (not banned) and their argmax; then the rejection rounds (see the module docstring)
    row = tl.program_id(0)
    base = X + row.to(tl.int64) * stride
    cols = tl.arange(0, BLOCK)
    bi = tl.arange(0, NB)
    bids = tl.load(BANNED + bi)                          # NB >= 1 (padded with -1)
    neg = float("-inf")
    m = tl.reduce(tl.full([1], neg, tl.float32), 0, MAX_COMBINE)   # fp32 / int32 scalars
    s_all = tl.reduce(tl.full([1], 0.0, tl.float32), 0, ADD_COMBINE)
    s_kept = s_all
    best_z = m
    best_i = tl.reduce(tl.full([1], 0, tl.int32), 0, ADD_COMBINE)
    for start in range(0, V, BLOCK):
        idx = start + cols
        z = tl.load(base + idx, mask=idx < V, other=neg).to(tl.float32) / temperature
        ban = tl.reduce((idx[:, None] == bids[None, :]).to(tl.int32), 1, MAX_COMBINE) > 0
        m_new = tl.maximum(m, tl.reduce(z, 0, MAX_COMBINE))
        scale = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        s_all = s_all * scale + tl.reduce(e, 0, ADD_COMBINE)
        s_kept = s_kept * scale + tl.reduce(tl.where(ban, 0.0, e), 0, ADD_COMBINE)
        zk = tl.where(ban, neg, z)
        bz = tl.reduce(zk, 0, MAX_COMBINE)
        bidx = -tl.reduce(tl.where(zk == bz, -idx, -V), 0, MAX_COMBINE)   # first max
        take = bz > best_z
        best_i = tl.where(take, bidx, best_i)
        best_z = tl.maximum(best_z, bz)
        m = m_new
    lse = m + tl.log(s_all)

    tok = best_i
    pivot = m - m + neg            # round k draws from the kept tokens with z > pivot
    total = s_kept
    k = 0
    todo = 1
    while todo > 0:
        u = tl.load(U + row * R + k) * total
        acc = total - total
        found = best_i * 0 + V   # V, as an int32 tensor (loop-carried)
        last = best_i
        start = 0
        while (start < V) & (found == V):          # scan to the block holding the draw
            idx = start + cols
            z = tl.load(base + idx, mask=idx < V, other=neg).to(tl.float32) / temperature
            ban = tl.reduce((idx[:, None] == bids[None, :]).to(tl.int32), 1, MAX_COMBINE) > 0
            e = tl.where((z > pivot) & (~ban) & (idx < V), tl.exp(z - m), 0.0)
            bs = tl.reduce(e, 0, ADD_COMBINE)
            if acc + bs > u:
                c = tl.associative_scan(e, 0, ADD_COMBINE) + acc
                found = -tl.reduce(tl.where((c > u) & (e > 0), -idx, -V), 0, MAX_COMBINE)
            last = tl.where(bs > 0, tl.reduce(tl.where(e > 0, idx, -1), 0, MAX_COMBINE), last)
            acc += bs
            start += BLOCK
        x = tl.where(found < V, found, last)       # rounding left u past the scanned mass
        zx = tl.load(base + x).to(tl.float32) / temperature
        todo = 0
        if TOP_P:
            above = total - total
            for start2 in range(0, V, BLOCK):
                idx = start2 + cols
                z = tl.load(base + idx, mask=idx < V, other=neg).to(tl.float32) / temperature
                ban = tl.reduce((idx[:, None] == bids[None, :]).to(tl.int32), 1,
                                MAX_COMBINE) > 0
                above += tl.reduce(tl.where((z > zx) & (~ban), tl.exp(z - m), 0.0), 0,
                                   ADD_COMBINE)
            if above < top_p * s_kept:
                tok = x
            else:
                pivot = zx
                total = above
                k += 1
                todo = tl.where(k < R, 1, 0)
        else:
            tok = x
    ztok = tl.load(base + tok).to(tl.float32) / temperature
    tl.store(TOK + row, tok.to(tl.int64))
    tl.store(LP + row, ztok - lse)


_sample = Kernel(_sample_fn)


def _pow2(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


def fused_sample(logits: torch.Tensor, temperature: float, top_p: float, seeds: torch.Tensor,
                 counters: torch.Tensor, banned: torch.Tensor | None = None, top_k: int = -1):
    """logits [B, V] (unit stride on V), temperature > 0 -> (tokens [B] int64, log-probs [B]
    fp32 of log softmax(logits / T) over the whole vocabulary). The kernel when Triton runs
    on the tensor's device and there is no top-k filter, else the torch path (same draws;
    banned ids do not count towards k)."""
    B, V = logits.shape
    dev = logits.device
    us = round_uniforms(seeds, counters, ROUNDS if top_p < 1.0 else 1)
    has_top_k = 0 < top_k < V
    if has_top_k or not (use_triton(logits) and logits.stride(-1) == 1):
        e, lse = kept_probs(logits, temperature, banned)
        if has_top_k:
            allowed = logits.index_fill(-1, banned, float("-inf")) \
                if banned is not None and banned.numel() else logits
            e.masked_fill_(allowed < torch.topk(allowed, top_k, dim=-1).values[..., -1:], 0.0)
        tok = draw_torch(logits, e, top_p, us)
        return tok, logits.gather(-1, tok[:, None]).squeeze(-1).float() / temperature - lse
    nb = 0 if banned is None else banned.numel()
    bids = torch.full((_pow2(nb),), -1, dtype=torch.int32, device=dev)
    if nb:
        bids[:nb] = banned.to(torch.int32)
    tok = torch.empty(B, dtype=torch.int64, device=dev)
    lp = torch.empty(B, dtype=torch.float32, device=dev)
    if B == 0:
        return tok, lp
    block = 2048 if logits.is_cuda else 4096
    kw = {"num_warps": 8} if logits.is_cuda else {}
    _sample.on(logits)[(B,)](logits, logits.stride(0), bids, us.contiguous(), tok, lp, V,
                             float(temperature), float(top_p), NB=bids.numel(), R=us.shape[1],
                             TOP_P=top_p < 1.0, BLOCK=block, **kw)
    return tok, lp
