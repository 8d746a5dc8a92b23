"""Sequence packing: tokenised samples -> THD `PackedBatch`es within a token budget, and a
balanced plan that gives every DP rank the same number of micro-batches of similar size.

Per sample, inside a packed row:
- position ids are the sample's own MRoPE ids (restarting at 0), from `rope_index_1d`;
- labels[t] = input_ids[t + 1] where token t + 1 is trained (assistant), else -100; the last
  token of each sample has no label (nothing crosses a sample boundary);
- loss_mask = (labels != -100) as float32;
- images: `pixel_values` rows / `image_grid_thw` rows in the order the samples are packed,
  which is the order their `<|image_pad|>` runs appear in `input_ids`.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ovlt.data.batch import PackedBatch
from ovlt.models.qwen2_5_vl.rope_index import rope_index_1d

PAD_ID = 151643


@dataclass
class Sample:
    """One tokenised training sample (what a DataLoader worker produces)."""
    input_ids: torch.Tensor                      # [L] int64
    token_mask: torch.Tensor                     # [L] int64 0/1: token is trained on
    pixel_values: Optional[torch.Tensor] = None  # [N, 1176] float32
    image_grid_thw: Optional[torch.Tensor] = None  # [n, 3] int64
    id: str = ""
    position_ids: Optional[torch.Tensor] = None  # [3, L]; computed when None

    def __len__(self) -> int:
        return int(self.input_ids.numel())

    def positions(self) -> torch.Tensor:
        if self.position_ids is None:
            self.position_ids, _ = rope_index_1d(self.input_ids, self.image_grid_thw)
        return self.position_ids


def make_sample(ids, token_mask, pixel_values=None, grids=None, id: str = "") -> Sample:
    ids_t = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    mask_t = torch.as_tensor(token_mask, dtype=torch.long).reshape(-1)
    if ids_t.shape != mask_t.shape:
        raise ValueError(f"sample {id}: {ids_t.numel()} ids but {mask_t.numel()} mask values")
    g = None if grids is None or len(grids) == 0 else torch.as_tensor(grids, dtype=torch.long).reshape(-1, 3)
    n_rows = 0 if g is None else int(g.prod(-1).sum())
    got = 0 if pixel_values is None else int(pixel_values.shape[0])
    if got != n_rows:
        raise ValueError(f"sample {id}: {got} pixel_values rows but the grids need {n_rows}")
    return Sample(ids_t, mask_t, pixel_values, g, id)


def collate(samples: Sequence[Sample], pad_to_multiple: int = 1) -> PackedBatch:
    """Concatenate samples into one THD row. With pad_to_multiple > 1 a padding segment (its
    own cu_seqlens entry, id "<pad>", no loss) rounds the length up (TP sequence parallel)."""
    if not samples:
        return empty_batch()
    ids, pos, labels, lens, pvs, grids = [], [], [], [], [], []
    for s in samples:
        L = len(s)
        lab = torch.full((L,), -100, dtype=torch.long)
        nxt_trained = s.token_mask[1:].bool()
        lab[:-1] = torch.where(nxt_trained, s.input_ids[1:], torch.full_like(s.input_ids[1:], -100))
        ids.append(s.input_ids)
        pos.append(s.positions())
        labels.append(lab)
        lens.append(L)
        if s.image_grid_thw is not None:
            if s.pixel_values is None:
                raise ValueError(f"sample {s.id}: image grids without pixel_values")
            pvs.append(s.pixel_values)
            grids.append(s.image_grid_thw)
    sample_ids = [s.id for s in samples]
    total = sum(lens)
    pad = (-total) % pad_to_multiple if pad_to_multiple > 1 else 0
    if pad:
        ids.append(torch.full((pad,), PAD_ID, dtype=torch.long))
        pos.append(torch.arange(pad).expand(3, -1))
        labels.append(torch.full((pad,), -100, dtype=torch.long))
        lens.append(pad)
        sample_ids.append("<pad>")
    input_ids = torch.cat(ids).unsqueeze(0)
    lab = torch.cat(labels).unsqueeze(0)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    return PackedBatch(
        input_ids=input_ids, position_ids=torch.cat(pos, dim=1).unsqueeze(1).long(),
        cu_seqlens=cu, labels=lab, loss_mask=(lab != -100).float(),
        pixel_values=torch.cat(pvs) if pvs else None,
        image_grid_thw=torch.cat(grids) if grids else None, sample_ids=sample_ids)


def empty_batch() -> PackedBatch:
    """A one-token batch with no loss: keeps every DP rank at the same micro-batch count."""
    return PackedBatch(input_ids=torch.full((1, 1), PAD_ID, dtype=torch.long),
                       position_ids=torch.zeros(3, 1, 1, dtype=torch.long),
                       cu_seqlens=torch.tensor([0, 1], dtype=torch.int32),
                       labels=torch.full((1, 1), -100, dtype=torch.long),
                       loss_mask=torch.zeros(1, 1), sample_ids=["<pad>"])


def first_fit_decreasing(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Bins of indices whose lengths sum to <= budget (longest first)."""
    for i, L in enumerate(lengths):
        if L > budget:
            raise ValueError(f"sample {i} has {L} tokens, over the packing budget {budget}")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        for b, r in enumerate(room):
            if lengths[i] <= r:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(budget - lengths[i])
    return bins


def pack_samples(samples: Sequence[Sample], token_budget: int,
                 pad_to_multiple: int = 1) -> list[PackedBatch]:
    """Pack samples into as few PackedBatches of <= token_budget tokens as first-fit-decreasing
    finds; within a batch samples keep their input order."""
    bins = first_fit_decreasing([len(s) for s in samples], token_budget)
    return [collate([samples[i] for i in sorted(b)], pad_to_multiple) for b in bins]


def _lpt(lengths: Sequence[int], idx: Sequence[int], k: int) -> list[list[int]]:
    """Longest-processing-time: each index (longest first) to the currently lightest of k bins."""
    heap = [(0, b) for b in range(k)]
    bins: list[list[int]] = [[] for _ in range(k)]
    for i in sorted(idx, key=lambda j: (-lengths[j], j)):
        load, b = heapq.heappop(heap)
        bins[b].append(i)
        heapq.heappush(heap, (load + lengths[i], b))
    return bins


def balanced_plan(lengths: Sequence[int], dp_size: int, token_budget: int) -> list[list[list[int]]]:
    """Split one global batch (sample indices 0..n-1 with `lengths`) over `dp_size` ranks:
    returns plan[rank][micro_batch] = sorted sample indices. Every rank gets the same number of
    micro-batches (empty ones are possible when a rank has fewer samples; use `empty_batch`),
    each within `token_budget`, with token counts balanced by LPT at both levels."""
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")
    for i, L in enumerate(lengths):
        if L > token_budget:
            raise ValueError(f"sample {i} has {L} tokens, over the packing budget {token_budget}")
    per_rank = _lpt(lengths, range(len(lengths)), dp_size)
    loads = [sum(lengths[i] for i in r) for r in per_rank]
    n_mb = max(1, max(-(-ld // token_budget) for ld in loads))
    while True:
        plan = [_lpt(lengths, r, n_mb) for r in per_rank]
        if all(sum(lengths[i] for i in mb) <= token_budget for r in plan for mb in r):
            return [[sorted(mb) for mb in r] for r in plan]
        n_mb += 1


def per_sample_mean(values: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Mean of `values` [1, T] over each sample's trained tokens -> [num_samples] (0 for a
    sample with no trained token)."""
    v = (values * batch.loss_mask).reshape(-1)
    m = batch.loss_mask.reshape(-1)
    seg = torch.repeat_interleave(torch.arange(batch.num_samples),
                                  (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long())
    sums = torch.zeros(batch.num_samples, dtype=v.dtype).index_add_(0, seg, v)
    cnt = torch.zeros(batch.num_samples, dtype=m.dtype).index_add_(0, seg, m)
    return torch.where(cnt > 0, sums / cnt.clamp_min(1), torch.zeros_like(sums))
