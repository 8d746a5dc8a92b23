"""Token sampling: greedy / temperature / top-k / top-p, seeded, with the policy log-prob.

The returned log-prob is log softmax(logits / T) of the chosen token over the *whole*
vocabulary (no top-k/top-p renormalisation): that is the policy probability GRPO's ratio and
the trainer's recomputation use (T = 1 for greedy). Sampling uses the exponential-race
trick (argmax p / E, E ~ Exp(1)), which draws exactly from p, needs no sort or cumsum
beyond the top-p filter, and is driven by one `torch.Generator` so a seed reproduces it.
"""
from __future__ import annotations

from typing import Optional

import torch

from ovlt.rollout.nucleus import fused_sample


def filter_logits(scaled: torch.Tensor, top_k: int = -1, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every token outside the top-k and outside the smallest set whose
    probability reaches top_p (the most likely token is always kept)."""
    V = scaled.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_l, order = torch.sort(scaled, dim=-1, descending=True)
        probs = sorted_l.softmax(-1)
        # Mass strictly before each token; a token is kept while that mass is < top_p.
        before = probs.cumsum(-1) - probs
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


def sample(logits: torch.Tensor, temperature: float, top_k: int = -1, top_p: float = 1.0,
           generator: Optional[torch.Generator] = None,
           banned: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] fp32 -> (tokens [B] int64, logprobs [B] fp32). `banned` token ids are
    never drawn (a filter like top-k: the log-prob stays that of the full distribution)."""
    ban = banned is not None and banned.numel() > 0
    if temperature <= 0:
        tok = (logits.index_fill(-1, banned, float("-inf")) if ban else logits).argmax(-1)
        return tok, logits.log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1)
    scaled = logits / temperature
    logp = scaled.log_softmax(-1)
    if ban:  # after logp: the ban filters the draw, not the policy log-prob
        scaled.index_fill_(-1, banned, float("-inf"))
    kept = filter_logits(scaled, top_k, top_p)
    probs = kept.softmax(-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator).clamp_min_(1e-30)
    tok = (probs / race).argmax(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


# ---------------------------------------------------------------- per-row seeded sampling
# The engines decode many sequences together, each with its own seed: a sequence's tokens must
# not depend on its batch. One torch.Generator cannot give that (its stream is shared by the
# rows), so each row draws its uniforms from a counter-based hash of (row seed, token index):
# splitmix64 in wrapping int64 arithmetic (the same on CPU and CUDA), no generator state, no
# host sync, capturable in a CUDA graph. A uniform per row, token and rejection round drives
# an inverse-CDF draw (`ovlt.rollout.nucleus`; a scan instead of a [B, V] noise tensor).
_M64 = 1 << 64


def _s64(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return c - _M64 if c >= 1 << 63 else c


_GOLDEN, _C1, _C2 = _s64(0x9E3779B97F4A7C15), _s64(0xBF58476D1CE4E5B9), _s64(0x94D049BB133111EB)


def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic on signed ints)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (bit-identical to `ovlt.rollout.base.splitmix64`)."""
    x = x + _GOLDEN
    x = (x ^ _srl(x, 30)) * _C1
    x = (x ^ _srl(x, 27)) * _C2
    return x ^ _srl(x, 31)


def row_uniform(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One uniform in [0, 1) (24 random bits, exact in fp32) per row: a hash of the row's seed
    and counter (int64 tensors of one shape)."""
    h = mix64(mix64(seeds) ^ counters)
    return _srl(h, 40).float() * (1.0 / (1 << 24))


def sample_rows(logits: torch.Tensor, temperature: float, top_k: int = -1, top_p: float = 1.0,
                seeds: Optional[torch.Tensor] = None, counters: Optional[torch.Tensor] = None,
                banned: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample` with a seed and a token counter per row instead of a shared generator:
    logits [B, V] fp32, seeds / counters [B] int64 -> (tokens [B], logprobs [B]). Row b's
    draw depends only on its logits, seeds[b] and counters[b]. The log-prob is the policy's,
    as in `sample`. Top-p draws from the nucleus by rejection (`ovlt.rollout.nucleus`: no
    sort of the vocabulary, one fused kernel on a GPU; tokens tied at the nucleus threshold
    are all kept, where `filter_logits` keeps them in sort order)."""
    ban = banned is not None and banned.numel() > 0
    if temperature <= 0:
        tok = (logits.index_fill(-1, banned, float("-inf")) if ban else logits).argmax(-1)
        return tok, logits.gather(-1, tok[:, None]).squeeze(-1) - logits.logsumexp(-1)
    if seeds is None or counters is None:
        raise ValueError("sample_rows at temperature > 0 needs seeds and counters")
    return fused_sample(logits, temperature, top_p, seeds, counters, banned, top_k)
