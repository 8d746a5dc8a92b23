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
