"""Shared timing / memory helpers for the kernel benchmarks (CUDA only)."""
import json
import os
import sys
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

GiB = float(1 << 30)


def cuda_time(fn, iters=50, warmup=5):
    """Mean ms per call of `fn` over `iters` calls, timed with CUDA events after `warmup`."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / iters


def measure(fn, params, warmup=2, iters=5):
    """fn() runs fwd+bwd. Returns ms per call (median of CUDA-event timings) and extra peak
    memory: the peak during one call above what was allocated before it, minus the bytes of
    the gradients it leaves on `params` (those are the outputs, not overhead). Returns None
    for ms on CUDA OOM."""
    def clear():
        for p in params:
            p.grad = None
    try:
        for _ in range(warmup):
            clear()
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            clear()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        clear()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        clear()
        times.sort()
        return {"ms": times[len(times) // 2], "ms_min": times[0],
                "peak_over_inputs_gib": peak / GiB, "extra_gib": (peak - grads) / GiB}
    except torch.cuda.OutOfMemoryError:
        clear()
        torch.cuda.empty_cache()
        return {"ms": None, "error": "OOM"}


def with_host_syncs(fn, sink: list, *a, **k):
    """`fn(*a, **k)` under torch's sync debug mode: each CUDA call in it that makes the host
    wait for the GPU (.item(), nonzero, a copy from pageable memory, a stream sync) is appended
    to `sink` as "file:line: message". A cache flush of the caching allocator is no torch op
    and does not show here: `ovlt.utils.cuda_alloc.allocator_counters` counts those."""
    if not torch.cuda.is_available():
        return fn(*a, **k)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            return fn(*a, **k)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            sink.extend(f"{os.path.relpath(w.filename, ROOT)}:{w.lineno}: {str(w.message)[:120]}"
                        for w in caught if "synchroniz" in str(w.message))


def device_name():
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def write_results(out_dir, name, payload):
    os.makedirs(out_dir, exist_ok=True)
    payload = dict(payload, device=device_name(), torch=torch.__version__,
                   date=time.strftime("%Y-%m-%d", time.gmtime()))
    path = os.path.join(out_dir, name)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)
    print(f"wrote {path}")


def wall_time(fn):
    """(seconds, fn()) of one call, the GPU synchronised before and after (one-shot phases
    like a whole generate call, where CUDA events inside would miss host work)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t, out
