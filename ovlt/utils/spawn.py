"""Spawn N local worker processes with a torchrun-like environment (gloo on CPU).

Used by the parity CLI outside torchrun and by the multi-process tests. Every rank's failure is
reported with its rank; a hung rank is killed after `timeout`.
"""
from __future__ import annotations

import os
import socket
import traceback
from typing import Optional

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, threads, fn, args, queue):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch
        torch.set_num_threads(threads)
    try:
        queue.put((rank, True, fn(rank, world, *args)))
    except BaseException:  # noqa: BLE001 - reported, tagged with the rank
        queue.put((rank, False, traceback.format_exc()))


def run_workers(fn, world: int, *args, timeout: float = 900.0,
                threads: Optional[int] = None) -> list:
    """Run `fn(rank, world, *args)` in `world` processes; return the results by rank.
    `fn` must be a module-level (picklable) function."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, threads, fn, args, q))
             for r in range(world)]
    for p in procs:
        p.start()
    out, err = {}, None
    try:
        for _ in range(world):
            rank, ok, payload = q.get(timeout=timeout)
            if not ok:
                err = f"[rank {rank}/{world}] failed:\n{payload}"
                break
            out[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=5 if err else 60)
            if p.is_alive():
                p.kill()
    if err:
        raise RuntimeError(err)
    return [out[r] for r in range(world)]
