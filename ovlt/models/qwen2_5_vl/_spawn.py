"""Spawn N local gloo worker processes with a torchrun-like environment (parity CLI on CPU)."""
from __future__ import annotations

import os
import socket
import traceback

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, queue):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    try:
        queue.put((rank, True, fn(rank, world, *args)))
    except BaseException:  # noqa: BLE001 - reported, tagged with the rank
        queue.put((rank, False, traceback.format_exc()))


def run_workers(fn, world: int, *args, timeout: float = 900.0) -> list:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, q)) for r in range(world)]
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
