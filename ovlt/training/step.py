"""One optimizer step over a list of packed micro-batches, with mcore's pipeline schedules.

`train_step` is loss-agnostic so SFT and GRPO share it: `forward_fn(model, batch)` runs the
model, `loss_fn(batch, output) -> (loss_sum, num_tokens, stats)` returns the *sum* of the
per-token loss of the micro-batch and its token count. mcore (with
`calculate_per_token_loss=True`, set in `model_setup.wrap_model`) sums the token counts over
micro-batches and data-parallel ranks and scales the gradients by 1 / total once, so the update
is the gradient of the per-token mean over the whole global batch, independent of how the batch
is split into micro-batches, DP ranks or TP shards.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist

from ovlt.compat.mcore_cpu import cuda_free_mode
from ovlt.models.qwen2_5_vl.fp8 import fp8_weight_cache
from ovlt.training.grad_buffers import zero_grad_buffers
from ovlt.training.vision_prefetch import prefetch_image_features


@dataclass
class StepResult:
    loss: float            # per-token mean over the global batch
    tokens: int            # loss tokens in the global batch
    grad_norm: float
    skipped: bool
    time_s: float
    stats: dict = field(default_factory=dict)  # other sums from loss_fn, reduced like the loss


def _fwd_step(forward_fn, loss_fn, data_iterator, model):
    batch = next(data_iterator)
    out = forward_fn(model, batch)
    return out, partial(_loss_wrapper, loss_fn, batch)


def _loss_wrapper(loss_fn, batch, output):
    loss_sum, n_tokens, stats = loss_fn(batch, output)
    n = n_tokens if torch.is_tensor(n_tokens) else torch.tensor(n_tokens)
    reported = {"loss_sum": loss_sum.detach().float(), "tokens": n.detach().float()}
    for k, v in (stats or {}).items():
        reported[k] = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
    return loss_sum, n.to(torch.int), reported


def reduce_stats(stores: list[dict], device) -> dict[str, float]:
    """Sum the per-micro-batch stats, then over DP ranks; PP: sent from the last stage."""
    from megatron.core import parallel_state as ps

    keys = sorted({k for s in stores for k in s})
    if ps.get_pipeline_model_parallel_world_size() > 1:
        # Only the last stage has stats; the key set is fixed by the loss contract.
        keys = sorted(set(keys) | {"loss_sum", "tokens"})
        obj = [keys]
        dist.broadcast_object_list(obj, src=ps.get_pipeline_model_parallel_last_rank(),
                                   group=ps.get_pipeline_model_parallel_group())
        keys = obj[0]
    vec = torch.zeros(len(keys), dtype=torch.float64, device=device)
    for s in stores:
        for i, k in enumerate(keys):
            if k in s:
                vec[i] += s[k].to(device=device, dtype=torch.float64)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(vec, group=ps.get_pipeline_model_parallel_group())
    if ps.get_data_parallel_world_size() > 1:  # a 1-rank NCCL call only costs host time
        dist.all_reduce(vec, group=ps.get_data_parallel_group())
    return dict(zip(keys, vec.tolist()))


def train_step(chunks: list, optimizer, micro_batches: list, forward_fn: Callable,
               loss_fn: Callable, device=None, forward_only: bool = False,
               prefetch=None) -> StepResult:
    """Forward/backward over `micro_batches` (this rank's share of the global batch) and one
    optimizer step (skipped when `forward_only`). `prefetch`: the next step's first
    micro-batch, whose frozen-tower image features are computed between this step's backward
    and its update (see `ovlt.training.vision_prefetch`)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    with cuda_free_mode():
        if not forward_only:
            zero_grad_buffers(chunks)
            optimizer.zero_grad()
        seq_len = max(int(b.input_ids.shape[-1]) for b in micro_batches)
        with fp8_weight_cache(chunks, enabled=not forward_only):  # weights fixed until the update
            stores = get_forward_backward_func()(
                forward_step_func=partial(_fwd_step, forward_fn, loss_fn),
                data_iterator=iter(micro_batches), model=chunks,
                num_microbatches=len(micro_batches), seq_length=seq_len, micro_batch_size=1,
                forward_only=forward_only)
        grad_norm, skipped = float("nan"), False
        if not forward_only:
            if prefetch is not None:
                prefetch_image_features(chunks, prefetch)
            ok, gn, _ = optimizer.step()
            skipped = not ok
            grad_norm = float(gn) if gn is not None else float("nan")
    tot = reduce_stats(stores, device)
    tokens = tot.pop("tokens", 0.0)
    loss_sum = tot.pop("loss_sum", 0.0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return StepResult(loss=loss_sum / max(tokens, 1.0), tokens=int(tokens), grad_norm=grad_norm,
                      skipped=skipped, time_s=time.perf_counter() - t0,
                      stats={k: v / max(tokens, 1.0) for k, v in tot.items()})
