"""What a GRPO step holds in device memory between its phases.

The gradient buffers (mcore DDP's fp32 `grad_data`, 4 bytes per trained parameter: 12 GB for
an 8-layer 7B-shaped LLM, 30 GB for the whole 7B) carry nothing from the end of one update
phase to the start of the next (the update zeroes or overwrites them first), yet they would
sit beside the rollout's KV cache and vision activations and the log-prob passes. A step frees
them after its updates and takes them back before the next update (`release_grads` /
`restore_grads`: mcore's own `offload_grad_buffers` / `restore_grad_buffers`, which resize
the storage to 0 and back, so every `main_grad` view stays valid). No host sync and no copy:
the storage is freed to the caching allocator behind the queued optimizer step (stream order)
and comes back zeroed.
"""
from __future__ import annotations


def _buffers(chunks):
    return [b for c in chunks for b in (getattr(c, "buffers", []) +
                                         getattr(c, "expert_parallel_buffers", []))]


def grads_released(chunks) -> bool:
    """Whether every grad buffer of `chunks` is released (and there is at least one)."""
    bufs = _buffers(chunks)
    return bool(bufs) and all(b.grad_data.untyped_storage().size() == 0 for b in bufs)


def release_grads(chunks) -> int:
    """Free the grad buffers of the mcore DDP `chunks` (idempotent); returns the bytes freed."""
    freed = 0
    for c in chunks:
        if not hasattr(c, "offload_grad_buffers"):
            continue
        freed += sum(b.grad_data.untyped_storage().size() for b in _buffers([c]))
        c.offload_grad_buffers(synchronize=False, empty_cache=False)
    return freed


def restore_grads(chunks) -> None:
    """Give the grad buffers of `chunks` their storage back, zeroed (idempotent)."""
    for c in chunks:
        if hasattr(c, "restore_grad_buffers"):
            c.restore_grad_buffers(synchronize=False)
