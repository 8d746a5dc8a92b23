"""The device a process trains on, the dtype of a precision name, and host -> device copies
that do not stall the GPU stream."""
from __future__ import annotations

import time

import torch

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dtype_of(precision: str) -> torch.dtype:
    """The torch dtype of a config precision name ("bf16", "fp16", "fp32")."""
    return PRECISION_DTYPES[precision]


def default_device() -> torch.device:
    """This process's current CUDA device (set by `init_distributed` from LOCAL_RANK), else
    the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def pinned(t):
    """`t` in page-locked host memory when it is a CPU tensor not there yet (a copy); anything
    else as it is. Batches' `pin_memory` methods map it over their fields."""
    if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not t.is_pinned():
        return t.pin_memory()
    return t


def to_device_async(t: torch.Tensor, device) -> torch.Tensor:
    """`t` on `device`; from host memory to a GPU through a pinned copy with non_blocking (a
    copy from pageable memory makes the stream drain first: a hidden sync)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return pinned(t).to(device, non_blocking=True)
    return t.to(device)


class HostCopy:
    """Device values read on the host later without draining the stream: made with a
    non-blocking copy into pinned memory and an event behind it, so `tolist()` waits for the
    work queued before the copy only, not for whatever the host has queued since (the next
    training step, say). On the CPU the values are simply held."""

    def __init__(self, t: torch.Tensor):
        t = t.detach().reshape(-1)
        self._event = None
        if t.device.type == "cuda":
            self._host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self._host.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = t.clone()

    def tolist(self) -> list:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


class StepClock:
    """Duration of a span of queued GPU work, on the GPU's clock: `start()` and `stop()` record
    events as the host begins and ends queueing it, `seconds()` (blocking) is the time between
    them as the GPU ran them. The start event runs once the work before it is done, or when the
    host records it if the GPU was idle, so an idle GPU waiting for the host is counted, work
    queued earlier is not. On the CPU: wall time between the two calls."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self._t = [None, None]

    def _mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def start(self) -> "StepClock":
        self._t[0] = self._mark()
        return self

    def stop(self) -> "StepClock":
        self._t[1] = self._mark()
        return self

    def seconds(self, until: "StepClock | None" = None) -> float:
        """Seconds from `start()` to `stop()`, or to `until`'s start (back-to-back spans)."""
        a, b = self._t[0], (until._t[0] if until is not None else self._t[1])
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b) / 1e3
        return b - a
