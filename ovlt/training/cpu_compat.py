"""Run megatron-core's *training* path (DDP buffers, DistributedOptimizer, grad clipping,
schedules, dist-checkpointing) on a CPU-only torch build.

`ovlt/compat/mcore_cpu.py` (the project's one mcore shim) covers model construction and the RNG
tracker. The optimizer/schedule code of mcore 0.16.1 additionally hard-codes CUDA:
`torch.tensor(..., device='cuda')` (found_inf, overflow buffers, token counters),
`param.type() == 'torch.cuda.FloatTensor'` checks, `tensor.cuda()` in the optimizer-state gather,
and `torch.cuda.synchronize()` in the checkpoint writer. Rather than patching mcore modules,
the trainer runs those calls inside `cuda_free_mode()`: a scoped `TorchFunctionMode` that maps
CUDA devices to the CPU and answers `Tensor.type()` with the CUDA spelling mcore compares
against. It is a no-op when CUDA is available. (Candidate to fold into `mcore_cpu.apply()`.)
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode


def _cpu(dev):
    return "cpu" if dev is not None and str(dev).startswith("cuda") else dev


class _CudaToCpuMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)  # e.g. torch.FloatTensor -> torch.cuda.FloatTensor
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple(_cpu(a) if isinstance(a, (str, torch.device)) else a for a in args)
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_free_mode():
    """Context in which mcore's CUDA-only training code runs on the CPU (no-op on GPU)."""
    if torch.cuda.is_available():
        yield
        return
    saved_sync = torch.cuda.synchronize
    torch.cuda.synchronize = lambda *a, **k: None  # nothing to wait for on the CPU
    try:
        with _CudaToCpuMode():
            yield
    finally:
        torch.cuda.synchronize = saved_sync
