"""Who writes each weight's fp32 `main_grad` in a step, and how: one typed record per weight.

mcore's DDP gives every trained weight a `main_grad` view of a flat fp32 buffer and adds each
`.grad` into it from a backward hook. ovlt routes some weights' gradients past that hook:

    Writer.DDP_HOOK     autograd's `.grad`, added by mcore's hook (every weight by default)
    Writer.WGRAD_GEMM   the linear's weight-gradient GEMM writes main_grad (the CUDA fast
                        paths' fused wgrad, ovlt's FP8 linears)
    Writer.LOSS_KERNEL  the fused LM-head loss adds dW during the forward (SFT, untied head:
                        `ovlt.kernels.fused_nll_loss(dw_into=)`)
    Writer.EMBEDDING    the embedding backward index-adds its rows

`GradRoute.overwrites`: the weight's first write of a step replaces main_grad instead of
adding, so `zero_grad_buffers` skips its slice (19 GB and ~4 ms a step at 4.8 B trained
parameters on an H200). Whether a weight was written yet this step is mcore's own flag,
`grad_added_to_main_grad` (reset when the step zeroes the buffers; its hook skips the add when
set): it is read and set here only (`written_this_step`, `note_written`). A marked weight that
got no gradient in a step is zeroed before the gradients are reduced (`zero_unwritten`, from
`finalize_grads`), so no stale gradient reaches the optimizer.

The per-token gradient scale 1/N that `finalize_grads` leaves for the optimizer step is
recorded here too (`set_pending_scale` / `take_pending_scale`).

This module imports torch only: the layers that write main_grad (kernels, FP8 linears, the
model's embedding, the CUDA fast paths) ask it without pulling in the trainers.
"""
from __future__ import annotations

import enum
import weakref
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary


class Writer(enum.Enum):
    DDP_HOOK = "ddp_hook"
    WGRAD_GEMM = "wgrad_gemm"
    LOSS_KERNEL = "loss_kernel"
    EMBEDDING = "embedding"


@dataclass
class GradRoute:
    writer: Writer = Writer.DDP_HOOK
    overwrites: bool = False


_DEFAULT = GradRoute()
_routes: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> GradRoute
# main_grad -> weak reference to its weight: a wgrad GEMM is handed main_grad alone (a strong
# reference would tie the weight and its buffer view in a cycle that outlives the model)
_weights: WeakIdKeyDictionary = WeakIdKeyDictionary()
_pending_scale: WeakIdKeyDictionary = WeakIdKeyDictionary()  # DDP chunk -> 1/N tensor
_layout: WeakIdKeyDictionary = WeakIdKeyDictionary()  # DDP chunk -> (overwriting, zero views)


# ----------------------------------------------------------------------- the record
def route(weight: torch.Tensor) -> GradRoute:
    """The weight's route (the default, DDP's hook, when none was set)."""
    return _routes.get(weight, _DEFAULT)


def set_writer(weight: torch.Tensor, writer: Writer) -> None:
    got = _routes.get(weight)
    if got is None:
        _routes[weight] = GradRoute(writer=writer)
    else:
        got.writer = writer


def mark_overwrites(weight: torch.Tensor) -> None:
    """The weight's first write of a step replaces main_grad (its slice is not zeroed). Call
    `forget_layout` on the weight's DDP chunk afterwards if it zeroed buffers already."""
    got = _routes.setdefault(weight, GradRoute())
    got.overwrites = True
    _weights[weight.main_grad] = weakref.ref(weight)


def weight_of(main_grad: torch.Tensor):
    """The overwriting weight whose main_grad this is, or None."""
    ref = _weights.get(main_grad)
    return ref() if ref is not None else None


# ----------------------------------------------------------------------- within a step
def written_this_step(weight: torch.Tensor) -> bool:
    """Whether main_grad already holds a gradient of this step (mcore's flag)."""
    return bool(getattr(weight, "grad_added_to_main_grad", False))


def note_written(weight: torch.Tensor) -> None:
    """main_grad holds this step's gradient from now on: mcore's hook skips its add."""
    weight.grad_added_to_main_grad = True


def reset_written(weight: torch.Tensor) -> None:
    weight.grad_added_to_main_grad = False


def first_write_replaces(weight: torch.Tensor) -> bool:
    """The next write must replace main_grad: the weight overwrites and has no gradient yet."""
    return route(weight).overwrites and not written_this_step(weight)


def set_pending_scale(chunk, scale: torch.Tensor) -> None:
    _pending_scale[chunk] = scale


def take_pending_scale(chunks: list):
    """The per-token gradient scale 1/N left for `chunks` by `finalize_grads` (None if none);
    it is consumed."""
    scale = None
    for c in chunks:
        s = _pending_scale.pop(c, None)
        scale = s if s is not None else scale
    return scale


# ----------------------------------------------------------------------- grad buffers
def _overwriting(ddp) -> list:
    return _layout_of(ddp)[0]


def zero_views(ddp) -> list[torch.Tensor]:
    """The slices of `ddp`'s grad buffers that `zero_grad_buffers` zeroes (cached)."""
    return _layout_of(ddp)[1]


def _layout_of(ddp) -> tuple[list, list[torch.Tensor]]:
    """(the overwriting parameters of `ddp`, the slices of its grad buffers to zero each step:
    everything but those parameters' ranges, as few contiguous views as the layout allows)."""
    got = _layout.get(ddp)
    if got is None:
        over = [p for p in ddp.params_with_grad if route(p).overwrites]
        skip_params = set(over)
        views = []
        for buf in ddp.buffers + ddp.expert_parallel_buffers:
            n = buf.grad_data.numel()
            skip = sorted(buf.param_index_map[p][:2] for p in buf.params if p in skip_params)
            pos = 0
            for start, end in skip + [(n, n)]:
                if start > pos:
                    views.append(buf.grad_data[pos:start])
                pos = max(pos, end)
        got = _layout[ddp] = (over, views)
    return got


def forget_layout(ddp) -> None:
    """Drop the cached buffer layout of `ddp`: call after marking more of its weights."""
    _layout.pop(ddp, None)


def zero_grad_buffers(chunks: list) -> None:
    """mcore's `DistributedDataParallel.zero_grad_buffer` for every chunk, except that the
    overwriting parameters' slices are left as they are."""
    for ddp in chunks:
        if not hasattr(ddp, "buffers") or not hasattr(ddp, "params_with_grad"):
            ddp.zero_grad_buffer()  # not mcore's DDP: its own method
            continue
        if getattr(ddp.config, "cuda_graph_impl", "none") != "transformer_engine":
            for p in ddp.params_with_grad:  # as mcore (TE's CUDA graphs keep the flags)
                reset_written(p)
        views = _layout_of(ddp)[1]
        if views:
            torch._foreach_zero_(views)
        for group in ddp.bucket_groups + ddp.expert_parallel_bucket_groups:
            group.reset()


def zero_unwritten(chunks: list) -> None:
    """Zero the main_grad of every overwriting parameter that got no gradient this step."""
    for ddp in chunks:
        if hasattr(ddp, "params_with_grad"):
            for p in _overwriting(ddp):
                if not written_this_step(p):
                    p.main_grad.zero_()
