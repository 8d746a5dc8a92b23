"""Run a test function in N gloo processes on CPU (torchrun-like env), propagating failures."""
from __future__ import annotations

from ovlt.utils.spawn import free_port, run_workers  # noqa: F401  (free_port re-exported)


def run_distributed(fn, world_size: int, *args, timeout: float = 600.0) -> list:
    """Run `fn(rank, world_size, *args)` in `world_size` single-threaded processes; return
    results by rank. `fn` must be a module-level function (picklable)."""
    return run_workers(fn, world_size, *args, timeout=timeout, threads=1)
