"""Zeroing mcore's gradient buffers at the start of a step, minus the weights the step
overwrites.

Every backward adds into the fp32 `main_grad` buffers, so mcore zeroes them whole before each
step (19 GB and ~4 ms at 4.8 B trained parameters on an H200). Weights whose gradient GEMM
writes main_grad itself (`ovlt_overwrites_main_grad`: the transformer layers' linears under
the CUDA fast paths' wgrad fusion, per-tensor FP8 linears included) overwrite it on their first
gradient of the step, while mcore's `grad_added_to_main_grad` is still False, and accumulate
after; their slices need no zeroing. A marked weight that got no gradient in a step is zeroed
before the gradients are reduced (`zero_unwritten`, from `finalize_grads`), so no stale
gradient can reach the optimizer.
"""
from __future__ import annotations

import torch


def _overwriting(ddp) -> list:
    """The parameters of `ddp` whose first gradient of a step overwrites main_grad (cached)."""
    got = getattr(ddp, "_ovlt_overwriting", None)
    if got is None:
        got = [p for p in ddp.params_with_grad if getattr(p, "ovlt_overwrites_main_grad", False)]
        ddp._ovlt_overwriting = got
    return got


def _zero_views(ddp) -> list[torch.Tensor]:
    """The slices of `ddp`'s grad buffers to zero each step: everything but the overwriting
    parameters' ranges (padding and the other parameters), as few contiguous views as the
    layout allows (cached)."""
    views = getattr(ddp, "_ovlt_zero_views", None)
    if views is None:
        skip_params = set(_overwriting(ddp))
        views = []
        for buf in ddp.buffers + ddp.expert_parallel_buffers:
            n = buf.grad_data.numel()
            skip = sorted(buf.param_index_map[p][:2] for p in buf.params if p in skip_params)
            pos = 0
            for start, end in skip + [(n, n)]:
                if start > pos:
                    views.append(buf.grad_data[pos:start])
                pos = max(pos, end)
        ddp._ovlt_zero_views = views
    return views


def forget_marks(ddp) -> None:
    """Drop the cached layout of `ddp`: call after marking more weights
    `ovlt_overwrites_main_grad`."""
    for cache in ("_ovlt_overwriting", "_ovlt_zero_views"):
        ddp.__dict__.pop(cache, None)


def zero_grad_buffers(chunks: list) -> None:
    """mcore's `DistributedDataParallel.zero_grad_buffer` for every chunk, except that the
    overwriting parameters' slices are left as they are."""
    for ddp in chunks:
        if not hasattr(ddp, "buffers") or not hasattr(ddp, "params_with_grad"):
            ddp.zero_grad_buffer()  # not mcore's DDP: its own method
            continue
        if getattr(ddp.config, "cuda_graph_impl", "none") != "transformer_engine":
            for p in ddp.params_with_grad:  # as mcore (TE's CUDA graphs keep the flags)
                p.grad_added_to_main_grad = False
        views = _zero_views(ddp)
        if views:
            torch._foreach_zero_(views)
        for group in ddp.bucket_groups + ddp.expert_parallel_bucket_groups:
            group.reset()


def zero_unwritten(chunks: list) -> None:
    """Zero the main_grad of every overwriting parameter that got no gradient this step."""
    for ddp in chunks:
        if hasattr(ddp, "params_with_grad"):
            for p in _overwriting(ddp):
                if not p.grad_added_to_main_grad:
                    p.main_grad.zero_()
