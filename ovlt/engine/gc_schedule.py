"""Python garbage collection at fixed training steps instead of whenever allocations trip it.

An automatic collection pauses one rank at a moment of its own (tens of ms with a model's
worth of live objects); in a multi-rank job every other rank then waits for it at the next
collective. Inside `GCSchedule(interval)` automatic collection is off and every rank collects
at the same steps (`tick`), as Megatron's `--manual-gc` and torchtitan's `gc_freq` do. The
objects alive when the schedule starts (model, optimizer, data) are frozen out of later
collections, which then only walk what the training loop made since (a loop that replaces
such objects calls `refreeze`). Leaving the block (also through an error) restores the
collector as it was.
"""
from __future__ import annotations

import gc
import time

from ovlt.logging import get_logger

log = get_logger(__name__)


class GCSchedule:
    """`with GCSchedule(n) as sched: ... sched.tick(step)`: a full collection whenever `step` is
    a multiple of `n`; `n = 0` leaves Python's automatic collection as it is."""

    def __init__(self, interval: int):
        if interval < 0:
            raise ValueError(f"gc interval must be >= 0 (0 = automatic collection), got {interval}")
        self.interval = interval
        self._was_enabled = None
        self.collections = 0

    def __enter__(self) -> GCSchedule:
        if self.interval:
            self._was_enabled = gc.isenabled()
            gc.collect()
            gc.freeze()  # the long-lived objects: never walked again until the block ends
            gc.disable()
            log.info("garbage collection: every %d steps on every rank (automatic off)",
                     self.interval)
        return self

    def tick(self, step: int) -> None:
        """Call once per finished step (1-based step number)."""
        if self.interval and step % self.interval == 0:
            t0 = time.perf_counter()
            found = gc.collect()
            self.collections += 1
            log.debug("step %d: gc found %d objects in %.1f ms", step, found,
                      (time.perf_counter() - t0) * 1e3)

    def refreeze(self) -> None:
        """After the loop replaced long-lived objects (e.g. a rebuilt model wrapper): free the
        old ones' reference cycles, which the freeze at entry hid from every collection, and
        freeze what is alive now."""
        if self.interval:
            gc.unfreeze()
            gc.collect()
            gc.freeze()

    def __exit__(self, *exc) -> None:
        if self.interval:
            gc.unfreeze()
            if self._was_enabled:
                gc.enable()
