"""What the GRPO step benchmarks (`grpo_vs_trl.py`, `grpo_recipe.py`) share: the workload's
pieces (the math prompt, noise images, the RL parquet, the recipe's response-length law, the
model shape and its HF directory, TRL's inputs), the ovlt trainer driven step by step with its
per-phase memory and host syncs, and the parent's one-subprocess-per-side runner.

Nothing here imports more than the standard library at import time: reward workers import the
benchmark modules, and the parent process never creates a CUDA context.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ANSWER = "42"
PROBLEM = ("Problem {i}: The figure shows several coloured regions. Count the regions, multiply the "
           "count by the number of corners of the largest one, and give the result.")


# ---------------------------------------------------------------------------------- small helpers
def now() -> float:
    return time.perf_counter()


def device_sync(dev) -> None:
    import torch
    if dev == "cuda" or (hasattr(dev, "type") and dev.type == "cuda"):
        torch.cuda.synchronize()


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:1500] + "\n" + traceback.format_exc()[-3000:]


def write_json(path, obj) -> None:
    tmp = str(path) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def result_header(args, device: str, doc: str) -> dict:
    """The first keys of a results file: when, on what, with which arguments, and what ran."""
    import torch
    return {"date": time.strftime("%Y-%m-%d", time.gmtime()), "torch": torch.__version__,
            "device": device, "config": vars(args), "what": doc}


# ---------------------------------------------------------------------------------- workload
def lognormal_lengths(n: int, median: float, sigma: float, cap: int, seed: int) -> list[int]:
    """`n` lengths of lognormal(log median, sigma) capped at `cap`: the quantiles (k + 0.5) / n
    of the capped law, in a seeded random order (every run decodes the same work)."""
    from statistics import NormalDist
    z = NormalDist()
    qs = [min(cap, max(1, int(round(median * math.exp(sigma * z.inv_cdf((k + 0.5) / n))))))
          for k in range(n)]
    random.Random(seed).shuffle(qs)
    return qs


def prompt_suffix() -> str:
    from ovlt.config import RolloutConfig
    return RolloutConfig().prompt_suffix


def prompt_tokens(i: int, grid, merge_size: int) -> int:
    """Tokens of prompt `i` (the question, the recipe's suffix, one image of `grid`)."""
    from ovlt.data.chat_template import encode_prompt
    return len(encode_prompt(PROBLEM.format(i=i) + prompt_suffix(), [grid], merge_size=merge_size))


def noise_images(img_dir: Path, count: int, size: int, digits: int) -> list[Path]:
    """`count` seeded random-noise PNGs of size x size (the vision tower's cost does not depend
    on the pixels), named img_<i, `digits` wide>.png."""
    import numpy as np
    from PIL import Image
    img_dir.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        p = img_dir / f"img_{i:0{digits}d}.png"
        Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(p)
        paths.append(p)
    return paths


def write_rl_parquet(path: Path, n: int, images: list[Path]) -> None:
    """`n` distinct questions (`PROBLEM`, answer `ANSWER`), question i with image i mod len."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = {"problem": [], "answer": [], "images": [], "id": [], "source": []}
    for i in range(n):
        rows["problem"].append(PROBLEM.format(i=i))
        rows["answer"].append(ANSWER)
        rows["images"].append([str(images[i % len(images)])])
        rows["id"].append(f"p{i}")
        rows["source"].append("bench")
    pq.write_table(pa.table(rows), path)


def model_cfg(args):
    """The 7B widths cut to `--llm-layers` / `--vision-layers` (the tiny test model with
    --tiny), local layers, bf16 on CUDA."""
    from ovlt.config import CONFIG_ROOT, load_config
    m = load_config(CONFIG_ROOT / "model" / ("tiny.yaml" if args.tiny else "qwen2_5_vl_7b.yaml")).model
    if not args.tiny:
        m.num_layers = args.llm_layers
        m.vision.depth = args.vision_layers
        # the real tower has full attention every 8th layer; keep at least one full layer
        m.vision.fullatt_block_indexes = ([i for i in range(args.vision_layers) if i % 8 == 7]
                                          or [args.vision_layers - 1])
    m.transformer_impl = "local"
    m.params_dtype = "bf16" if args.device == "cuda" else "fp32"
    return m


def gpu_info() -> tuple[str, float]:
    """(name, total GiB) of GPU 0 from nvidia-smi, so the parent process never creates a CUDA
    context (it would hold GPU memory while the variants run); torch as the fallback."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total",
                              "--format=csv,noheader,nounits", "-i", "0"], capture_output=True,
                             text=True, timeout=30, check=True).stdout.strip().splitlines()[0]
        name, mib = out.rsplit(",", 1)
        return name.strip(), float(mib) / 1024
    except Exception:  # noqa: BLE001 - no nvidia-smi: ask torch
        import torch
        return torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory / 2 ** 30


def recipe_model_cfg():
    """Qwen2.5-VL-7B as the recipe trains it (all layers)."""
    from ovlt.config import CONFIG_ROOT, load_config
    return load_config(CONFIG_ROOT / "model" / "qwen2_5_vl_7b.yaml").model


def write_hf_config(m, out: Path, device: str) -> None:
    """HF config (bf16 on CUDA) and ovlt's tokenizer of `m` into `out`."""
    from ovlt.data.tokenizer import save_hf_tokenizer
    from ovlt.models.qwen2_5_vl.hf_config import to_hf_config
    cfg = to_hf_config(m)
    cfg.dtype = "bfloat16" if device == "cuda" else "float32"
    cfg.save_pretrained(out)
    save_hf_tokenizer(out)


def write_hf_dir(m, out: Path, device: str) -> dict:
    """Random-init weights of `m` streamed through the project's export path into an HF dir
    (bf16 when the run is on CUDA). On CUDA they are drawn on the GPU in a process of their
    own: the CPU draw took 115 s for 3.6 B bf16 values on the GPU machine, and the parent that
    starts the sides must hold no GPU memory while they run (a 7B-wide embedding left cached
    there took 2.6 GiB from the side's card; a CUDA context alone ~0.5 GiB)."""
    if device == "cuda":
        import concurrent.futures
        import multiprocessing
        with concurrent.futures.ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn")) as ex:
            return ex.submit(_write_hf_dir, m, out, device, "cuda").result()
    return _write_hf_dir(m, out, device, "cpu")


def _write_hf_dir(m, out: Path, device: str, draw_on: str) -> dict:
    import torch

    from ovlt.models.qwen2_5_vl.checkpoint_io import HFCheckpointWriter
    from ovlt.models.qwen2_5_vl.state_dict_adapter import mcore_shapes, mcore_to_hf

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator(device=draw_on).manual_seed(0)
    t0 = time.perf_counter()
    sd, n = {}, 0
    for name, shape in mcore_shapes(m, 1, 1, 0).items():
        if len(shape) == 1:
            val = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
            t = torch.full(shape, val, dtype=dtype)
        else:
            t = torch.empty(shape, dtype=dtype, device=draw_on).normal_(0.0, 0.02, generator=gen).cpu()
        sd[name] = t
        n += t.numel()
    t1 = time.perf_counter()
    writer = HFCheckpointWriter(out)
    for hf_name, full in mcore_to_hf({(0, 0): sd}, m, 1, 1):
        writer.add(hf_name, full)
    writer.close()
    write_hf_config(m, out, device)
    return {"params": n, "dtype": str(dtype), "drawn_on": draw_on, "draw_s": t1 - t0,
            "convert_and_write_s": time.perf_counter() - t1}


# ---------------------------------------------------------------------------------- TRL inputs
def make_processor(hf_dir, min_pixels, max_pixels):
    """Qwen2.5-VL processor from ovlt's tokenizer + HF's image processor. The video processor
    needs torchvision, which the device lacks; no video is ever processed, so it is left out."""
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor, Qwen2VLImageProcessor

    from ovlt.data.chat_template import QWEN2_5_VL_CHAT_TEMPLATE

    class Processor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor" and arg is None:
                return None
            return super().check_argument_for_proper_class(name, arg)

    tok = AutoTokenizer.from_pretrained(hf_dir, padding_side="left")
    ip = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    return Processor(image_processor=ip, tokenizer=tok, video_processor=None,
                     chat_template=QWEN2_5_VL_CHAT_TEMPLATE)


def trl_inputs(args, wd: Path, dtype):
    """(processor, dataset, model) for TRL from what the parent prepared in `wd`: the HF
    directory `wd/hf`, the RL parquet's rows in TRL's VLM format (conversational `prompt` +
    `image` column) and the model on `args.device` with its vision tower + merger frozen, as
    on the ovlt side."""
    import datasets
    import pyarrow.parquet as pq
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf_dir = str(wd / "hf")
    proc = make_processor(hf_dir, args.min_pixels, args.max_pixels)
    tab = pq.read_table(wd / "rl.parquet").to_pylist()
    ds = datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": r["problem"] + prompt_suffix()}],
         "image": Image.open(r["images"][0]).convert("RGB"), "answer": r["answer"]} for r in tab])
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        hf_dir, dtype=dtype, attn_implementation="sdpa", device_map=args.device)
    (getattr(model, "visual", None) or model.model.visual).requires_grad_(False)
    return proc, ds, model


# ---------------------------------------------------------------------------------- memory
KERNEL_CLASSES = (  # (class, name fragments), first match wins; lower-case names
    # attention first: torch's flash kernels name cutlass types in their template arguments
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitk")),
    ("inductor", ("triton_",)),   # torch.compile's kernels (ovlt's own Triton kernels: "other")
    ("nccl", ("nccl",)),
    ("copy", ("memcpy", "memset", "copy", "cat")),
)


def kernel_class(name: str) -> str:
    low = name.lower()
    for cls, frags in KERNEL_CLASSES:
        if any(f in low for f in frags):
            return cls
    return "other"


MARKER_KERNEL = "spin_kernel"  # `torch.cuda._sleep`'s kernel: a region's boundary on the GPU


class PostRolloutProfile:
    """CUDA kernels of one step from the rollout's end to the step's end (rewards, log-prob
    passes, updates) under torch.profiler: GPU-busy time (the union of kernel intervals) against
    the wall time, time and count per kernel class and the top kernels. `start` after the
    rollout, `stop` after the step (both sync the device).

    Regions: `region(label)` wraps a queueing function so that its GPU work is told apart. The
    passes queue work without waiting for it, so host-side ranges say nothing of where their
    kernels ran; instead a ~1 us marker kernel is queued at each boundary (one stream: the
    i-th marker on the GPU is the i-th boundary queued) and every kernel, and every idle gap,
    between two markers goes to the innermost open region (`regions` in `stop`'s record:
    busy and idle seconds, kernels, time per class and the region's top kernels)."""

    def __init__(self):
        self.prof, self.t0 = None, 0.0
        self.marks: list = []  # ("+" | "-", label) in the order the markers were queued

    def start(self) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile
        torch.cuda.synchronize()
        self.marks = []
        self.prof = profile(activities=[ProfilerActivity.CUDA])
        self.prof.__enter__()
        self.t0 = now()

    def _mark(self, kind: str, label: str) -> None:
        if self.prof is not None:
            import torch
            torch.cuda._sleep(1)
            self.marks.append((kind, label))

    def region(self, label, fn):
        """`fn` with its queued GPU work marked as region `label` (a str, or a function of
        fn's arguments giving one) while profiling."""
        def wrapped(*a, **k):
            name = label(*a, **k) if callable(label) else label
            self._mark("+", name)
            try:
                return fn(*a, **k)
            finally:
                self._mark("-", name)
        return wrapped

    def stop(self, trace_path=None) -> dict:
        import torch
        torch.cuda.synchronize()
        wall = now() - self.t0
        self.prof.__exit__(None, None, None)
        if trace_path:
            self.prof.export_chrome_trace(str(trace_path))
        kern = sorted((e.time_range.start, e.time_range.end, e.name) for e in self.prof.events()
                      if e.device_type == torch.autograd.DeviceType.CUDA)
        self.prof = None
        rec = {"wall_s": wall, **kernel_summary(kern)}
        rec["regions"] = region_summary(kern, self.marks)
        return rec


def kernel_summary(kern: list) -> dict:
    """GPU-busy seconds (the union of the [start, end) intervals, us), kernel count, time and
    count per kernel class, top kernels, of `kern` = sorted (start, end, name)."""
    busy, end = 0.0, None
    by_class, by_name = {}, {}
    for a, b, name in kern:
        busy += max(0.0, b - max(a, end if end is not None else a))
        end = b if end is None else max(end, b)
        c = by_class.setdefault(kernel_class(name), {"ms": 0.0, "count": 0})
        c["ms"] += (b - a) / 1e3
        c["count"] += 1
        by_name[name] = by_name.get(name, 0.0) + (b - a) / 1e3
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:25]
    return {"gpu_busy_s": busy / 1e6, "kernels": len(kern), "by_class_ms": by_class,
            "top_kernels_ms": [{"name": k[:100], "ms": v} for k, v in top]}


def region_summary(kern: list, marks: list) -> dict:
    """Per region label: the kernels of `kern` (sorted (start, end, name), us) between its
    markers, nested regions excluded, summarised (`kernel_summary`, top 8) with `idle_s`, the
    gaps between consecutive kernels inside the region (the GPU waiting for the host). Kernels
    outside every region go to "other". An empty dict when the markers on the GPU do not match
    the ones queued (another stream's markers, a lost event)."""
    ticks = [k for k in kern if MARKER_KERNEL in k[2]]
    if len(ticks) != len(marks):
        return {}
    per: dict = {}
    idle: dict = {}
    stack, m, last_end = [], 0, None
    for a, b, name in kern:
        if MARKER_KERNEL in name:
            kind, label = marks[m]
            m += 1
            if kind == "+":
                stack.append(label)
            elif stack and stack[-1] == label:
                stack.pop()
            last_end = b
            continue
        label = stack[-1] if stack else "other"
        per.setdefault(label, []).append((a, b, name))
        if last_end is not None and a > last_end:
            idle[label] = idle.get(label, 0.0) + (a - last_end)
        last_end = b if last_end is None else max(last_end, b)
    out = {}
    for label, ks in per.items():
        s = kernel_summary(ks)
        s["top_kernels_ms"] = s["top_kernels_ms"][:8]
        out[label] = {"idle_s": idle.get(label, 0.0) / 1e6, **s}
    return out


def allocator_counts(dev: str) -> dict:
    """The caching allocator's cumulative retries (a failed cudaMalloc: cached blocks freed,
    the device drained) and device mallocs / frees; empty off CUDA."""
    if dev != "cuda":
        return {}
    import torch
    st = torch.cuda.memory_stats()
    return {"alloc_retries": st.get("num_alloc_retries", 0),
            "device_mallocs": st.get("num_device_alloc", 0),
            "device_frees": st.get("num_device_free", 0)}


def live_by_site(snapshot: dict, roots=("ovlt/", "benchmarks/")) -> dict:
    """Bytes of the live blocks ("active_allocated") of a `torch.cuda.memory._snapshot()` per
    allocation site: the innermost stack frame in the project's code ("file:line function"),
    else the innermost frame, "?" for a block recorded without a stack."""
    out: dict = {}
    for seg in snapshot.get("segments", []):
        for b in seg.get("blocks", []):
            if b.get("state") != "active_allocated":
                continue
            frames = b.get("frames") or []
            mine = [f for f in frames if any(r in f.get("filename", "") for r in roots)]
            f = (mine or frames or [None])[0]
            site = "?"
            if f is not None:
                path = f.get("filename", "")
                at = min((i for i in (path.rfind(r) for r in roots) if i >= 0), default=0)
                site = f"{path[at:]}:{f.get('line')} {f.get('name', '')}"
            out[site] = out.get(site, 0) + b.get("size", 0)
    return out


def site_growth(before: dict, after: dict, top: int = 12) -> list:
    """The allocation sites whose live bytes grew from `before` to `after` (`live_by_site`),
    largest growth first."""
    grown = sorted(((k, v - before.get(k, 0)) for k, v in after.items()
                    if v > before.get(k, 0)), key=lambda kv: -kv[1])
    return [{"site": k, "mib": d / 2 ** 20} for k, d in grown[:top]]


class _NvmlMemory(ctypes.Structure):  # NVML's nvmlMemory_t
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong),
                ("used", ctypes.c_ulonglong)]


class DeviceUsedPeak:
    """The GPU's own used memory (every process and allocator), sampled every `period_s` from
    a thread between `start` and `stop`: torch's counters miss memory outside its allocator
    and count vLLM's sleeping pool (its tensors stay allocated to torch while their physical
    memory is released), so a colocated vLLM needs this reading too. Read through NVML, not
    the CUDA runtime: a runtime query from another thread while the built-in engine captures
    its decode graphs would break the capture (global capture mode). None where NVML is not
    there."""

    def __init__(self, period_s: float = 0.02):
        self.period_s, self.peak, self._stop, self._thread = period_s, 0, None, None
        self._nvml = None
        self.unavailable = None  # why there is no reading (said once)

    @staticmethod
    def _open_nvml():
        """(NVML library, handle of this process's current CUDA device, found by PCI id)."""
        import torch
        lib = ctypes.CDLL("libnvidia-ml.so.1")
        if lib.nvmlInit_v2() != 0:
            raise OSError("nvmlInit failed")
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        bus = f"{p.pci_domain_id:08X}:{p.pci_bus_id:02X}:{p.pci_device_id:02X}.0".encode()
        handle = ctypes.c_void_p()
        if lib.nvmlDeviceGetHandleByPciBusId_v2(bus, ctypes.byref(handle)) != 0:
            raise OSError(f"NVML has no device at PCI {bus.decode()}")
        return lib, handle

    def _used(self) -> int:
        if self._nvml is None:
            self._nvml = self._open_nvml()
        lib, handle = self._nvml
        m = _NvmlMemory()
        if lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(m)) != 0:
            raise OSError("nvmlDeviceGetMemoryInfo failed")
        return int(m.used)

    def start(self) -> None:
        import threading
        self._thread = None
        if self.unavailable is not None:
            return
        try:
            self.peak = self._used()
        except (OSError, AttributeError) as e:  # no NVML library / device: no reading
            self.unavailable = str(e)
            print(f"device memory via NVML unavailable: {e}", flush=True)
            return
        self._stop = threading.Event()

        def poll():
            while not self._stop.wait(self.period_s):
                self.peak = max(self.peak, self._used())
        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()

    def stop(self) -> float | None:
        """The peak in GiB since `start` (None: no reading)."""
        if self._thread is None:
            return None
        self._stop.set()
        self._thread.join()
        self._thread = None
        return max(self.peak, self._used()) / 2 ** 30


class PhaseMemory:
    """Peak allocated GPU memory per phase of a trainer step (the functions a phase calls are
    wrapped with `wrap`) and over the whole step. torch's peak counter is reset around each
    wrapped call, so the step's own peak is kept here: the largest of the phase peaks, what
    accrued between them, and the trainer's own meter (`mem_gb`: it resets the counter at the
    step's end). `end_step` also reads what the step left allocated (the caller drops the
    step's result first) and the device's own used peak (`DeviceUsedPeak`). Nothing on the
    CPU."""

    def __init__(self, dev: str):
        self.on = dev == "cuda"
        self.peaks: dict = {}
        self.between = 0.0
        self.device_used = DeviceUsedPeak()

    def _read_reset(self) -> float:
        import torch
        v = torch.cuda.max_memory_allocated() / 2 ** 30
        torch.cuda.reset_peak_memory_stats()
        return v

    def start_step(self) -> None:
        self.peaks, self.between = {}, 0.0
        if self.on:
            self._read_reset()
            self.device_used.start()

    def wrap(self, name: str, fn):
        if not self.on:
            return fn

        def wrapped(*a, **k):
            self.between = max(self.between, self._read_reset())
            try:
                return fn(*a, **k)
            finally:
                self.peaks[name] = max(self.peaks.get(name, 0.0), self._read_reset())
        return wrapped

    def end_step(self, trainer_peak_gib=None) -> dict:
        if not self.on:
            return {}
        import gc

        import torch
        gc.collect()
        tail = self._read_reset()
        peak = max([tail, self.between, trainer_peak_gib or 0.0, *self.peaks.values()])
        return {"peak_mem_gib": peak, "phase_peak_mem_gib": dict(self.peaks),
                "mem_after_step_gib": torch.cuda.memory_allocated() / 2 ** 30,
                "device_used_peak_gib": self.device_used.stop()}


def steady_state(per_step_peaks: list) -> dict:
    """Whether per-step peak memory holds from step 2 on: each step's peak within 2 % of the
    step before it."""
    later = [p for p in per_step_peaks[1:] if p]
    if len(later) < 2:
        return {}
    return {"steady_state_peak_spread": (max(later) - min(later)) / min(later),
            "steady_state_within_2pct": all(abs(b - a) <= 0.02 * a
                                            for a, b in zip(later, later[1:]))}


# ---------------------------------------------------------------------------------- ovlt side
def run_ovlt_steps(cfg, dev: str, res: dict, save, *, steps: int, log_dir, label: str,
                   count_syncs: bool = True, torch_seed: int | None = None, on_ready=None,
                   step_fields=None, isolate_passes: bool = True,
                   profile_step: int = 0, profile_trace=None, memory_sites: bool = False) -> None:
    """The real trainer (`GRPOTrainer`, built from `cfg` in this process) driven step by step
    as `GRPOTrainer.run` does, without checkpointing or export. Into `res`: `init_seconds`,
    `engine`, what `on_ready` returns, and `steps`, one record per step (written with `save`
    after each): wall time with the device synced at both ends, the trainer's phase timers,
    tokens, its metrics, the log-prob passes' GPU time per token (the trainer's StepClock: old
    vs reference), peak memory per phase (rollout, log-prob passes, updates) and over the step,
    what the step leaves allocated, and the host syncs inside the log-prob and update phases
    (CUDA only; `count_syncs` off skips them). Step `profile_step` (1-based; CUDA; 0: none) also
    gets `profile_after_rollout` (`PostRolloutProfile`: the log-prob passes, the updates and
    the frozen tower's encodes as regions), and its Chrome trace is written to `profile_trace`
    when given (".gz": compressed). Each step records the caching allocator's retries and
    device mallocs / frees (`allocator`): cudaFree drains the device. `memory_sites` (CUDA):
    the allocator records a Python stack per live block, and each step from the second lists
    the allocation sites whose live memory grew since the step before (`memory_growth_sites`,
    `site_growth`): where memory that outlives a step comes from.

    `isolate_passes`: the device is synced before each log-prob pass is queued, so the old and
    the reference pass both start on an idle GPU and their per-token times compare like with
    like (queued back to back, the first pass's clock also counts the GPU waiting for the host
    to queue its first kernels while the second's starts on a busy GPU). It costs the host's
    lead-in of the second pass, a few milliseconds.

    `on_ready(trainer)` runs after setup and the first weight sync: it may replace
    `trainer.engine.generate` (the rollout's memory is read around what it leaves) and returns
    more fields for `res`. `step_fields(rec, s)` adds a script's own fields to a step's record
    `s` from the trainer's `rec`. A step that raises is recorded and ends the run."""
    from ovlt.distributed import destroy_distributed, init_distributed
    from ovlt.logging import setup_logging

    setup_logging(str(log_dir))
    init_distributed(cfg.parallel, seed=cfg.grpo.train.seed)
    trainer = None
    try:
        import torch

        import ovlt.grpo.train as grpo_mod
        from benchmarks._bench_util import with_host_syncs
        from ovlt.grpo.data import PromptPosition
        from ovlt.grpo.train import GRPOTrainer

        host_syncs: dict = {}  # phase -> messages of the synchronizing CUDA calls it made

        def counting_syncs(phase, fn):
            """`fn` with every call that makes the host wait for the GPU recorded against
            `phase` (`with_host_syncs`)."""
            if dev != "cuda" or not count_syncs:
                return fn
            return lambda *a, **k: with_host_syncs(fn, host_syncs.setdefault(phase, []), *a, **k)

        mem = PhaseMemory(dev)
        profiler = PostRolloutProfile() if profile_step and dev == "cuda" else None
        region = profiler.region if profiler is not None else (lambda label, fn: fn)
        # the log-prob passes and the updates are queued: a host sync inside them is one
        # inside the phase (each phase reads its numbers once, at its end, outside these)
        lp_pass = counting_syncs("logprob", grpo_mod.queue_logprob_pass)
        if isolate_passes and dev == "cuda":
            def lp_pass(*a, _counted=lp_pass, **k):
                torch.cuda.synchronize()  # before the pass: not one of its host syncs
                return _counted(*a, **k)
        lp_pass = region(lambda chunks, mbs, field, *a, **k: "logprob_" + field.split("_")[0],
                         lp_pass)
        grpo_mod.queue_logprob_pass = mem.wrap("logprob", lp_pass)
        grpo_mod.queue_update = mem.wrap("update", region("update", counting_syncs(
            "update", grpo_mod.queue_update)))
        if profiler is not None:  # the frozen tower's encodes, inside the passes above
            from ovlt.grpo.image_features import StepImages
            StepImages.features = region("tower", StepImages.features)

        prev_sites = None
        if memory_sites and dev == "cuda":  # before the trainer: every block gets its stack
            torch.cuda.memory._record_memory_history(enabled="state", stacks="python")
        t0 = now()
        if torch_seed is not None:
            torch.manual_seed(torch_seed)
        trainer = GRPOTrainer(cfg)
        trainer.setup(0)
        trainer.sync_weights()
        extra = on_ready(trainer) if on_ready is not None else {}
        trainer.engine.generate = mem.wrap("rollout", trainer.engine.generate)
        if profiler is not None:
            def generate_then_profile(*a, _gen=trainer.engine.generate, **k):
                out = _gen(*a, **k)
                if profiling:
                    profiler.start()
                return out
            trainer.engine.generate = generate_then_profile
        profiling = False
        device_sync(dev)
        res["init_seconds"] = now() - t0
        res["engine"] = type(trainer.engine).__name__
        res.update(extra)
        res["steps"] = []
        pos = PromptPosition()
        for step in range(steps):
            host_syncs.clear()
            mem.start_step()
            profiling = profiler is not None and step + 1 == profile_step
            try:
                device_sync(dev)
                alloc0 = allocator_counts(dev)
                t = now()
                rec, pos, rollouts = trainer.step(step, pos)
                device_sync(dev)
                dt = now() - t
                alloc = {k: v - alloc0[k] for k, v in allocator_counts(dev).items()}
                prof_rec = profiler.stop(profile_trace) \
                    if profiling and profiler.prof is not None else None
            except Exception as e:  # noqa: BLE001
                res["steps"].append({"step": step + 1, "error": error_text(e)})
                save()
                break
            gen = sum(len(r.response_ids) for r in rollouts)
            tot = sum(r.length for r in rollouts)
            n = len(rollouts)
            del rollouts  # what the step leaves allocated is read without it
            s = {"step": step + 1, "step_s": dt,
                 "phases": {k[5:]: v for k, v in rec.items() if k.startswith("time/")},
                 "generated_tokens": gen, "total_tokens": tot, "samples": n,
                 "updates": rec.get("updates"), "loss": rec.get("loss"), "kl": rec.get("kl"),
                 "grad_norm": rec.get("grad_norm"), "reward_mean": rec.get("reward_mean"),
                 "logprob_old_tokens": rec.get("logprob_old_tokens"),
                 "logprob_ref_tokens": rec.get("logprob_ref_tokens"),
                 "vision_encodes_logprob": rec.get("vision_encodes_logprob"),
                 "vision_encodes_update": rec.get("vision_encodes_update"),
                 "torch_compiles": rec.get("torch_compiles"),
                 "reward_batches": rec.get("reward_batches"),
                 "engine_logprob_diff_mean": rec.get("engine_logprob_diff_mean"),
                 "engine_logprob_diff_max": rec.get("engine_logprob_diff_max")}
            if alloc:
                s["allocator"] = alloc
            if prof_rec is not None:
                s["profile_after_rollout"] = prof_rec
            if step_fields is not None:
                step_fields(rec, s)
            s["host_syncs"] = {k: {"count": len(v), "first": v[:3]} for k, v in host_syncs.items()}
            for k in ("old", "ref"):
                if rec.get(f"logprob_{k}_s") and rec.get(f"logprob_{k}_tokens"):
                    s[f"logprob_{k}_us_per_token"] = \
                        1e6 * rec[f"logprob_{k}_s"] / rec[f"logprob_{k}_tokens"]
            s.update(mem.end_step(rec.get("mem_gb")))
            if memory_sites and dev == "cuda":
                sites = live_by_site(torch.cuda.memory._snapshot())
                if prev_sites is not None:
                    s["memory_growth_sites"] = site_growth(prev_sites, sites)
                prev_sites = sites
            res["steps"].append(s)
            print(f"{label} step", json.dumps(s), flush=True)
            save()
    finally:
        if trainer is not None:
            trainer.pool.close()
        destroy_distributed()


# ---------------------------------------------------------------------------------- summaries
def finished_steps(side: dict) -> tuple[list, list]:
    """(the steps that finished, the timed ones: steps 2..N but a profiled one (the profiler
    slows it), or step 1 when it is alone)."""
    steps = [s for s in side.get("steps", []) if "error" not in s and s.get("step_s")]
    timed = [s for s in steps[1:] if "profile_after_rollout" not in s]
    return steps, (timed or steps[1:] or steps)


def logprob_and_compile_stats(timed: list) -> dict:
    """Medians of the log-prob passes' GPU time per token (old, reference), and the
    torch.compile graphs built in the timed steps."""
    out = {}
    for k in ("old", "ref"):
        v = [s.get(f"logprob_{k}_us_per_token") for s in timed if s.get(f"logprob_{k}_us_per_token")]
        if v:
            out[f"logprob_{k}_us_per_token"] = statistics.median(v)
    comp = [s.get("torch_compiles") for s in timed if s.get("torch_compiles") is not None]
    if comp:
        out["torch_compiles_after_step_1"] = sum(comp)
    return out


# ---------------------------------------------------------------------------------- processes
def run_recorded(out: Path, res: dict, body) -> int:
    """A side's process: `body(res, save)` with `res` written to `out` at the end (and whenever
    `save` is called); an exception is recorded in res["error"] for the parent to read."""
    save = lambda: write_json(out, res)  # noqa: E731
    try:
        body(res, save)
    except BaseException as e:  # noqa: BLE001 - recorded; the parent reads it
        res["error"] = error_text(e)
        print(res["error"], file=sys.stderr, flush=True)
    save()
    return 0 if "error" not in res else 1


def record_prep(res: dict, wd: Path, save, *parts, hidden=()) -> bool:
    """res["prep"] from each of `parts` in turn (the first's dict updated with the others'),
    timed, written to wd/prep.json for the sides and printed (without `hidden` keys). False,
    with res["prep_error"] saved, when one raises."""
    try:
        t0 = now()
        res["prep"] = parts[0]()
        for part in parts[1:]:
            res["prep"].update(part())
        res["prep"]["seconds"] = now() - t0
        write_json(wd / "prep.json", res["prep"])
        print("prep", json.dumps({k: v for k, v in res["prep"].items() if k not in hidden}),
              flush=True)
    except Exception as e:  # noqa: BLE001
        res["prep_error"] = error_text(e)
        print(res["prep_error"], file=sys.stderr)
        save()
        return False
    return True


def run_child(script, argv: list, wd: Path, name: str, label: str, timeout: float,
              shown_tail: int) -> dict:
    """`script` with `argv` in a subprocess (the repository on its PYTHONPATH, its output in
    wd/<name>.log), killed after `timeout` s. Returns what it wrote to wd/<name>.json with its
    `rc` ("timeout" when killed), `wall_seconds` and, when it failed, `log_tail`; prints the
    last `shown_tail` characters of its log."""
    cmd = [sys.executable, str(script), *argv]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    t0 = now()
    log_path = wd / f"{name}.log"
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            rc = "timeout"
    rj = wd / f"{name}.json"
    side = json.loads(rj.read_text()) if rj.exists() else {}
    side["rc"], side["wall_seconds"] = rc, now() - t0
    tail = log_path.read_text()[-4000:]
    if rc != 0:
        side["log_tail"] = tail
    print(f"---- {label} (rc={rc}, {side['wall_seconds']:.1f} s), log tail:\n{tail[-shown_tail:]}",
          flush=True)
    return side
