"""The CUDA caching allocator's settings for a trainer process, and its counters per step.

Why: when a `cudaMalloc` fails, PyTorch's caching allocator waits for the whole device, frees
every cached block it holds and tries again; a step that lives near the memory limit (the 7B
SFT step with fp32 master weights and Adam states: ~104 GiB of an H200's ~140 GiB) can pay
that flush, and the host stall behind it, every step. Expandable segments
(`expandable_segments:True`) grow one mapping per stream instead of carving fixed segments, so
freed memory stays usable for any later size: the usual setting of large trainers (torchtitan's
launch script sets it).

`train.cuda_alloc_conf` (one string, PyTorch's `PYTORCH_CUDA_ALLOC_CONF` syntax
`key:value,key:value`):
- "auto" (default): `expandable_segments:True` in the SFT trainer; PyTorch's default in the GRPO
  trainer, whose process hosts a rollout engine: vLLM's sleep mode allocates from a CUDA memory
  pool, which PyTorch cannot back with expandable segments (pytorch#147851; vLLM asserts on
  it), and the built-in engine captures CUDA graphs into private pools (not yet run under
  expandable segments on a GPU here).
- "": PyTorch's default, untouched.
- anything else: applied as given (validated when the config loads).
Settings in the environment (`PYTORCH_ALLOC_CONF` / `PYTORCH_CUDA_ALLOC_CONF`) win over the
config: the process was started with them on purpose.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

from ovlt.logging import get_logger, log_once

log = get_logger(__name__)

EXPANDABLE = "expandable_segments:True"
ENV_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
# The keys of PyTorch's CUDA allocator documentation (notes/cuda.rst, "Optimizing memory
# usage with PYTORCH_CUDA_ALLOC_CONF"): torch's parser lets an unknown key through on some
# builds, so a misspelt one is refused here instead of silently doing nothing.
KNOWN_KEYS = frozenset({
    "backend", "max_split_size_mb", "max_non_split_rounding_mb", "roundup_power2_divisions",
    "garbage_collection_threshold", "expandable_segments", "release_lock_on_cudamalloc",
    "pinned_use_cuda_host_register", "pinned_num_register_threads",
    "pinned_use_background_threads", "pinned_reserve_segment_size_mb",
    "per_process_memory_fraction", "graph_capture_record_stream_reuse",
    "throw_on_cudamalloc_oom"})
_BOOL_KEYS = frozenset({"expandable_segments", "release_lock_on_cudamalloc",
                        "pinned_use_cuda_host_register", "pinned_use_background_threads",
                        "graph_capture_record_stream_reuse", "throw_on_cudamalloc_oom"})


def parse_alloc_conf(text: str) -> dict[str, str]:
    """`key:value,key:value` -> {key: value}; ValueError naming the bad item. "auto" and ""
    are not settings (see the module docstring) and parse to {}."""
    if text.strip() in ("", "auto"):
        return {}
    out: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = (s.strip() for s in item.partition(":"))
        if not sep or not key or not value:
            raise ValueError(f"{item.strip()!r} is not key:value")
        if key not in KNOWN_KEYS:
            raise ValueError(f"unknown key {key!r}; known: {', '.join(sorted(KNOWN_KEYS))}")
        if key in _BOOL_KEYS and value not in ("True", "False"):
            raise ValueError(f"{key} takes True or False, got {value!r}")
        if key == "backend" and value not in ("native", "cudaMallocAsync"):
            raise ValueError(f"backend takes native or cudaMallocAsync, got {value!r}")
        if key in out:
            raise ValueError(f"{key} given twice")
        out[key] = value
    return out


def may_host_vllm(trainer: str, rollout_engine: str) -> bool:
    """Whether a trainer process may start a vLLM engine (GRPO with engine vllm, or auto with
    vLLM installed): found without importing vLLM."""
    if trainer != "grpo" or rollout_engine == "builtin":
        return False
    return rollout_engine == "vllm" or importlib.util.find_spec("vllm") is not None


def resolve_alloc_conf(conf: str, trainer: str = "sft", hosts_vllm: bool = False) -> str:
    """The settings string `conf` stands for in a `trainer` ("sft" / "grpo") process ("" =
    PyTorch's default); ValueError for expandable segments where vLLM may run."""
    conf = conf.strip()
    if conf == "auto":
        return EXPANDABLE if trainer == "sft" else ""
    if parse_alloc_conf(conf).get("expandable_segments") == "True" and hosts_vllm:
        raise ValueError("expandable_segments:True cannot be used in a process that hosts a "
                         "vLLM engine: its sleep mode allocates from a CUDA memory pool, which "
                         "PyTorch cannot back with expandable segments (pytorch#147851); use "
                         "rollout.engine=builtin or drop expandable_segments")
    return conf


def set_allocator_settings(conf: str) -> None:
    """Apply `conf` to the caching allocator now; it governs the memory the allocator reserves
    from here on (call `torch.cuda.empty_cache()` first to have it govern all of it)."""
    import torch
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is None:  # torch < 2.9
        setter = torch.cuda.memory._set_allocator_settings
    setter(conf)


def apply_alloc_conf(conf: str, trainer: str = "sft", hosts_vllm: bool = False
                     ) -> Optional[str]:
    """Resolve and apply `train.cuda_alloc_conf` for this process before its first CUDA
    allocation; returns the settings in effect (None on a machine without CUDA). Logs once."""
    import torch
    if not torch.cuda.is_available():
        return None
    env = {k: os.environ[k] for k in ENV_VARS if os.environ.get(k)}
    if env:
        log_once(log, "cuda-alloc", "CUDA allocator: settings from the environment %s "
                 "(train.cuda_alloc_conf=%r not applied)", env, conf)
        return ",".join(env.values())
    resolved = resolve_alloc_conf(conf, trainer, hosts_vllm)
    if resolved:
        set_allocator_settings(resolved)
    log_once(log, "cuda-alloc", "CUDA allocator: %s (%s.train.cuda_alloc_conf=%r)",
             resolved or "PyTorch's default settings", trainer, conf)
    return resolved


class AllocatorMeter:
    """Per-interval allocator figures for the step log: the peak reserved memory and the
    number of `cudaMalloc` retries (each one a cache flush that waits for the device) since
    the previous `read()` (the first one: since the meter was made or, with
    `from_process_start`, since the process started). Warns once when retries happen."""

    def __init__(self, device, stats=None, from_process_start: bool = False):
        import torch
        self.device = device
        self._stats = stats or (lambda: torch.cuda.memory_stats(device))
        self._retries = 0 if from_process_start else int(self._stats().get("num_alloc_retries", 0))
        self._warned = False

    def read(self) -> dict:
        st = self._stats()
        retries = int(st.get("num_alloc_retries", 0))
        new, self._retries = retries - self._retries, retries
        if new > 0 and not self._warned:
            self._warned = True
            log.warning("CUDA allocator: %d cudaMalloc retries since the last log line (each "
                        "frees the allocator's cache after waiting for the device): memory is "
                        "fragmented or nearly full; expandable_segments:True "
                        "(train.cuda_alloc_conf) or recomputation (train.recompute) helps; "
                        "`alloc_retries` in metrics.jsonl counts them per step", new)
        return {"mem_reserved_gb": round(st.get("reserved_bytes.all.peak", 0) / 2 ** 30, 3),
                "alloc_retries": new}


COUNTERS = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams",
            "num_ooms")


def allocator_counters(device) -> dict:
    """The caching allocator's cumulative event counters on `device` ({} off CUDA): cudaMalloc
    retries (cache flushes), device allocations and frees, whole-device event syncs."""
    import torch
    if torch.device(device).type != "cuda":
        return {}
    st = torch.cuda.memory_stats(device)
    return {k: int(st.get(k, 0)) for k in COUNTERS}
