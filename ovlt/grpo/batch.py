"""Rollouts -> packed THD micro-batches with the per-token tensors the GRPO loss needs.

A sample is prompt + response in one row; position i predicts token i+1, so the response
tokens are the targets of positions [P-1, L-2]. Everything else has target -100 (the fused
kernels give it log-prob 0 and no gradient) and loss-mask 0. Samples are packed first-fit
decreasing into micro-batches of at most `max_tokens` tokens (dynamic batch size by token
count); a sample longer than the budget gets a micro-batch of its own.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from ovlt.utils.device import pinned, to_device_async


@dataclass
class Rollout:
    prompt_ids: list
    response_ids: list
    group: int                        # prompt index: advantages are normalised per group
    pixel_values: Optional[torch.Tensor] = None
    image_grid_thw: Optional[torch.Tensor] = None
    engine_logprobs: list = field(default_factory=list)
    finish_reason: str = "stop"
    reward: float = 0.0
    advantage: float = 0.0
    train: bool = True                # False: kept out of the loss (overlong masking, padding)
    source: str = ""
    answer: str = ""
    text: str = ""

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class RLMicroBatch:
    input_ids: torch.Tensor          # [1, T]
    position_ids: torch.Tensor       # [3, 1, T]
    cu_seqlens: torch.Tensor         # [n + 1] int32
    targets: torch.Tensor            # [1, T] int64, -100 = not a response token
    loss_mask: torch.Tensor          # [1, T] float32
    advantages: torch.Tensor         # [1, T] float32
    pixel_values: Optional[torch.Tensor] = None
    image_grid_thw: Optional[torch.Tensor] = None
    old_logprobs: Optional[torch.Tensor] = None   # [1, T], filled by the log-prob pass
    ref_logprobs: Optional[torch.Tensor] = None
    # [1, T] the rollout engine's log-prob of each target, NaN where it gave none (read by
    # the engine-vs-trainer gap metric only, not by the loss)
    engine_logprobs: Optional[torch.Tensor] = None
    rollout_ids: list = field(default_factory=list)
    image_groups: list = field(default_factory=list)  # the group of each sample with images

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[-1])

    def pin_memory(self) -> "RLMicroBatch":
        """A copy with its host tensors in pinned memory: every pass's `to(cuda)` then copies
        without staging (the log-prob passes and the update each move the micro-batch)."""
        return RLMicroBatch(**{k: pinned(v) for k, v in self.__dict__.items()})

    def to(self, device) -> "RLMicroBatch":
        """A copy on `device`; host tensors go through pinned memory (a copy from pageable
        memory would drain the stream first: a hidden sync per micro-batch)."""
        def mv(t):
            return to_device_async(t, device) if isinstance(t, torch.Tensor) else t
        return RLMicroBatch(**{k: mv(v) for k, v in self.__dict__.items()})


def _positions(r: Rollout, rope_fn) -> torch.Tensor:
    ids = torch.as_tensor(r.prompt_ids + r.response_ids, dtype=torch.long)
    return rope_fn(ids, r.image_grid_thw)


def make_micro_batch(rollouts: list[Rollout], ids: list[int], rope_fn) -> RLMicroBatch:
    inp, pos, tgt, mask, adv, pvs, grids, groups, cu = [], [], [], [], [], [], [], [], [0]
    eng = []
    for r in rollouts:
        seq = torch.as_tensor(r.prompt_ids + r.response_ids, dtype=torch.long)
        L, P = seq.numel(), len(r.prompt_ids)
        t = torch.full((L,), -100, dtype=torch.long)
        t[P - 1: L - 1] = seq[P:]
        m = torch.zeros(L)
        if r.train:
            m[P - 1: L - 1] = 1.0
        inp.append(seq)
        pos.append(_positions(r, rope_fn))
        tgt.append(t)
        mask.append(m)
        adv.append(torch.full((L,), float(r.advantage)))
        e = torch.full((L,), float("nan"))
        if r.engine_logprobs and len(r.engine_logprobs) == L - P:
            e[P - 1: L - 1] = torch.as_tensor(r.engine_logprobs, dtype=torch.float32)
        eng.append(e)
        if r.pixel_values is not None:
            pvs.append(r.pixel_values)
            grids.append(torch.as_tensor(r.image_grid_thw).view(-1, 3))
            groups.append(r.group)
        cu.append(cu[-1] + L)
    return RLMicroBatch(
        input_ids=torch.cat(inp)[None], position_ids=torch.cat(pos, dim=1)[:, None],
        cu_seqlens=torch.tensor(cu, dtype=torch.int32), targets=torch.cat(tgt)[None],
        loss_mask=torch.cat(mask)[None], advantages=torch.cat(adv)[None],
        pixel_values=torch.cat(pvs) if pvs else None,
        image_grid_thw=torch.cat(grids).long() if grids else None, rollout_ids=list(ids),
        image_groups=groups,
        engine_logprobs=torch.cat(eng)[None] if any(r.engine_logprobs for r in rollouts) else None)


def pack_rollouts(rollouts: list[Rollout], max_tokens: int, rope_fn) -> list[RLMicroBatch]:
    """First-fit decreasing into bins of `max_tokens`; bins keep the input order inside."""
    order = sorted(range(len(rollouts)), key=lambda i: -rollouts[i].length)
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        L = rollouts[i].length
        for b in range(len(bins)):
            if room[b] >= L:
                bins[b].append(i)
                room[b] -= L
                break
        else:
            bins.append([i])
            room.append(max_tokens - L)
    return [make_micro_batch([rollouts[i] for i in sorted(b)], sorted(b), rope_fn) for b in bins]


def split_updates(kept: list[Rollout], n_updates: int, filler: Rollout | None) -> list[list[Rollout]]:
    """`n_updates` chunks (the same count on every DP rank); an empty chunk gets a masked
    filler sample so every rank runs the same collectives."""
    per = max(1, math.ceil(len(kept) / n_updates)) if kept else 1
    chunks = [kept[i * per:(i + 1) * per] for i in range(n_updates)]
    for c in chunks:
        if not c:
            c.append(dataclasses.replace(filler, train=False))
    return chunks
