"""One optimizer step over a list of packed micro-batches, with mcore's pipeline schedules.

`train_step` is loss-agnostic so SFT and GRPO share it: `forward_fn(model, batch)` runs the
model, `loss_fn(batch, output) -> (loss_sum, num_tokens, stats)` returns the *sum* of the
per-token loss of the micro-batch and its token count. mcore (with
`calculate_per_token_loss=True`, set in `model_setup.wrap_model`) sums the token counts over
micro-batches and data-parallel ranks and scales the gradients by 1 / total once, so the update
is the gradient of the per-token mean over the whole global batch, independent of how the batch
is split into micro-batches, DP ranks or TP shards.
`train_step_async` only queues the step: its numbers come back through pinned memory when
asked for (`PendingStep.result()`), so a trainer that reads step k after queueing step k+1 keeps
the GPU busy across the step boundary (the host prepares the next step while the GPU still runs
this one's optimizer update); `train_step` queues a step and reads it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist

from ovlt.compat.mcore_cpu import cuda_free_mode
from ovlt.fp8.linear import fp8_weight_cache
from ovlt.engine.grad_routing import zero_grad_buffers
from ovlt.engine.vision_prefetch import prefetch_image_features
from ovlt.utils.device import HostCopy, StepClock, default_device, to_device_async


@dataclass
class StepResult:
    loss: float            # per-token mean over the global batch
    tokens: int            # loss tokens in the global batch
    grad_norm: float
    skipped: bool
    time_s: float          # the step's GPU time (see `StepClock`); wall time on the CPU
    stats: dict = field(default_factory=dict)  # other sums from loss_fn, reduced like the loss
    totals: dict = field(default_factory=dict)  # `host_stats` summed over data-parallel ranks


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


def reduce_stats(stores: list[dict], device, host_stats: dict | None = None):
    """(keys, device vector): the per-micro-batch stats summed, then over DP ranks (PP: sent
    from the last stage), with `host_stats` (plain numbers, counted once per model replica)
    among them. No host sync: host-side values go up through pinned memory, device ones are
    summed where they are."""
    from megatron.core import parallel_state as ps

    pp = ps.get_pipeline_model_parallel_world_size()
    last_stage = pp == 1 or ps.is_pipeline_last_stage()
    host_stats = dict(host_stats or {}) if last_stage else {}
    keys = sorted({k for s in stores for k in s} | set(host_stats))
    if pp > 1:
        # Only the last stage has stats; the key set is fixed by the loss contract.
        keys = sorted(set(keys) | {"loss_sum", "tokens"})
        obj = [keys]
        dist.broadcast_object_list(obj, src=ps.get_pipeline_model_parallel_last_rank(),
                                   group=ps.get_pipeline_model_parallel_group())
        keys = obj[0]
    on_host = dict.fromkeys(keys, 0.0)
    on_device: dict = {}
    for s in list(stores) + [host_stats]:
        for k, v in s.items():
            if torch.is_tensor(v) and v.device.type != "cpu":
                v = v.detach().to(torch.float64).reshape(())
                on_device[k] = v if k not in on_device else on_device[k] + v
            else:
                on_host[k] += float(v)
    vec = torch.tensor([on_host[k] for k in keys], dtype=torch.float64)
    vec = to_device_async(vec, device)
    if on_device:
        zero = vec.new_zeros(())
        vec = vec + torch.stack([on_device.get(k, zero) for k in keys])
    if pp > 1:
        dist.all_reduce(vec, group=ps.get_pipeline_model_parallel_group())
    if ps.get_data_parallel_world_size() > 1:  # a 1-rank NCCL call only costs host time
        dist.all_reduce(vec, group=ps.get_data_parallel_group())
    return keys, vec


class PendingStep:
    """A step whose work is queued but whose numbers may still be on the GPU. `result()` reads
    them (waiting for this step's work only, not for anything queued after it), so a loop that
    issues step k+1 before reading step k never leaves the GPU idle at step boundaries."""

    def __init__(self, keys, values: HostCopy, skipped: bool, clock: StepClock,
                 host_keys):
        self._keys, self._values, self._clock = keys, values, clock
        self._host_keys, self.skipped = set(host_keys), skipped
        self._result = None

    def result(self) -> StepResult:
        if self._result is None:
            vals = self._values.tolist()
            tot = dict(zip(self._keys, vals[:len(self._keys)]))
            tokens = tot.pop("tokens", 0.0)
            loss_sum = tot.pop("loss_sum", 0.0)
            totals = {k: tot.pop(k) for k in self._host_keys if k in tot}
            self._result = StepResult(
                loss=loss_sum / max(tokens, 1.0), tokens=int(tokens), grad_norm=vals[-1],
                skipped=self.skipped, time_s=self._clock.seconds(),
                stats={k: v / max(tokens, 1.0) for k, v in tot.items()}, totals=totals)
        return self._result


def train_step_async(chunks: list, optimizer, micro_batches: list, forward_fn: Callable,
                     loss_fn: Callable, device=None, forward_only: bool = False,
                     prefetch=None, host_stats: dict | None = None) -> PendingStep:
    """Queue forward/backward over `micro_batches` (this rank's share of the global batch) and
    one optimizer step (none when `forward_only`), without waiting for the GPU. `prefetch`: the
    next step's first micro-batch, whose frozen-tower image features are computed between this
    step's backward and its update (see `ovlt.engine.vision_prefetch`). `host_stats`: plain
    numbers of this rank's batch (e.g. its FLOPs) to sum over DP ranks with the loss
    (`StepResult.totals`)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = device or default_device()
    clock = StepClock(device).start()
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
        gn, skipped = None, False
        if not forward_only:
            if prefetch is not None:
                prefetch_image_features(chunks, prefetch)
            ok, gn, _ = optimizer.step()
            skipped = not ok
    keys, vec = reduce_stats(stores, device, host_stats)
    # the grad norm (global already) rides along: one copy to the host for the whole step
    norm = gn.detach().to(vec).reshape(1) if torch.is_tensor(gn) else \
        vec.new_full((1,), float("nan") if gn is None else float(gn))
    values = HostCopy(torch.cat([vec, norm]))
    clock.stop()
    return PendingStep(keys, values, skipped, clock, (host_stats or {}).keys())


def train_step(*args, **kwargs) -> StepResult:
    """`train_step_async` (same arguments), then its numbers: waits for the step to finish."""
    return train_step_async(*args, **kwargs).result()
