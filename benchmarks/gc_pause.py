"""Host pauses from Python's garbage collector during SFT steps: automatic collection vs the
trainer's schedule (`train.gc_interval`, `ovlt.engine.gc_schedule`).

Runs ovlt's SFT step (`sft_throughput.run_ovlt`: tiny widths on CPU with --tiny, 7B widths on a
GPU) twice in one process, with Python's automatic collection and under the trainer's schedule,
and records every collection the interpreter runs during the timed steps (`gc.callbacks`): its
generation and how long it held the host. Also times one full collection with the model alive,
right after the steps. A pause longer than the host's lead over the GPU (a step's GPU time
minus the host time to queue it) leaves the GPU idle for the rest of the pause.

    python benchmarks/gc_pause.py --tiny --out benchmarks/results/gc_pause_cpu.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sft_throughput as st  # noqa: E402  (puts the repo root on sys.path)
from _bench_util import write_results  # noqa: E402


class CollectionLog:
    """A `gc.callbacks` entry: (generation, ms, objects collected) of every collection."""

    def __init__(self):
        self.events, self._t0 = [], 0.0

    def __call__(self, phase, info):
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.events.append((info["generation"], (time.perf_counter() - self._t0) * 1e3,
                                info["collected"]))


def run_mode(args, m, samples, dev, name: str, gc_interval: int) -> dict:
    log, extra = CollectionLog(), {}
    orig = st.timed

    def timed_logged(*a, **k):  # only the timed steps' collections, not the model build's
        gc.callbacks.append(log)
        try:
            return orig(*a, **k)
        finally:
            gc.callbacks.remove(log)
            extra["tracked_objects"] = len(gc.get_objects())
            extra["frozen_objects"] = gc.get_freeze_count()
            t0 = time.perf_counter()
            gc.collect()  # what an automatic full collection costs here, model alive
            extra["full_collection_ms"] = (time.perf_counter() - t0) * 1e3
    st.timed = timed_logged
    try:
        med, best, _, _ = st.run_ovlt(args, m, samples, dev, name, gc_interval=gc_interval)
    finally:
        st.timed = orig
    ms = [e[1] for e in log.events]
    by_gen = {g: sum(1 for e in log.events if e[0] == g) for g in (0, 1, 2)}
    return {"gc_interval": gc_interval, "step_ms_median": med * 1e3, "step_ms_min": best * 1e3,
            "host_queue_ms": st.HOST[name]["queue_s"] * 1e3,
            "collections_by_generation": by_gen, "collection_ms_total": sum(ms),
            "collection_ms_max": max(ms, default=0.0),
            "objects_freed": sum(e[2] for e in log.events),
            "gen2_ms": [round(e[1], 2) for e in log.events if e[0] == 2], **extra}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    st.add_shape_args(ap, iters=30)
    ap.add_argument("--gc-interval", type=int, default=50)
    ap.add_argument("--tiny", action="store_true", help="tiny widths (CPU)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.tiny:
        args.seq, args.image = min(args.seq, 128), min(args.image, 112)
    args.recompute, args.profile_dir, args.profile_variants = "none", None, None
    args.sync_probe = False  # its step would fall inside the logged window (timed_logged)

    from ovlt.distributed import init_distributed
    dev = init_distributed().device
    m = st.model_cfg(args)
    samples = st.make_samples(args, m)
    res = {"python": platform.python_version(), "cpu_cores": os.cpu_count(), "config": vars(args),
           "modes": {}}
    for name, interval in (("automatic", 0), ("scheduled", args.gc_interval)):
        r = run_mode(args, m, samples, dev, f"ovlt_bf16_gc_{name}", interval)
        res["modes"][name] = r
        print(name, json.dumps(r), flush=True)
        gc.collect()
    out = os.path.abspath(args.out)
    write_results(os.path.dirname(out), os.path.basename(out), res)  # adds date, device, torch
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
