"""Per-step metrics: a log line, `metrics.jsonl` (rank 0), optional TensorBoard / W&B, tqdm.

The JSONL is the machine-readable record the iterate loop and the plots read: one object per
logged step with `step`, `loss`, `grad_norm`, `lr`, `tokens`, `tokens_per_s`, `tflops`
(achieved model TFLOP/s per GPU), `mfu` (null on CPU), `mem_gb` (on GPUs also
`mem_reserved_gb` and `alloc_retries`), `step_time_s`, plus extras.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Optional

import torch

from ovlt.logging import get_logger, log_once
from ovlt.utils.cuda_alloc import AllocatorMeter
from ovlt.utils.io import append_jsonl, atomic_write_text, read_jsonl

log = get_logger(__name__)


_ALLOC_METERS: dict = {}


def trim_jsonl(path: Path, last_step: int) -> None:
    """On resume, drop the records of steps after the restored checkpoint (`step` is 1-based:
    the record of step k is written after k steps, which a checkpoint at k includes)."""
    if path.exists():
        keep = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def memory_gb(device: torch.device) -> dict:
    """Peak allocated GPU memory since the last call (GB), with the peak reserved memory and
    the allocator's cudaMalloc retries over the same interval; the process RSS on CPU."""
    if device.type == "cuda":
        meter = _ALLOC_METERS.get(device)
        if meter is None:
            # Made at the first log line: counting from the process start puts the retries of
            # the model build and the steps before that line into it instead of dropping them.
            meter = _ALLOC_METERS[device] = AllocatorMeter(device, from_process_start=True)
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
        rec = {"mem_gb": round(peak, 3), **meter.read()}
        torch.cuda.reset_peak_memory_stats(device)
        return rec
    try:
        import psutil
        return {"mem_gb": round(psutil.Process(os.getpid()).memory_info().rss / 2 ** 30, 3)}
    except ImportError:
        return {"mem_gb": None}


class MetricsLogger:
    """Writes metrics on rank 0 only; every rank may call `log` (others return quietly)."""

    def __init__(self, out_dir: str | os.PathLike, is_main: bool, total_steps: int,
                 tensorboard: bool = False, wandb: bool = False, run_name: str = "sft",
                 start_step: int = 0, config: Optional[dict] = None):
        self.is_main = is_main
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = self._wandb = self._bar = None
        if not is_main:
            return
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))
            except ImportError:
                log_once(log, "tb-missing", "train.tensorboard=true but tensorboard is not "
                         "installed; continuing without it")
        if wandb:
            try:
                import wandb as _wandb
                self._wandb = _wandb.init(project="ovlt", name=run_name, config=config,
                                          dir=str(out_dir), resume="allow")
            except ImportError:
                log_once(log, "wandb-missing", "train.wandb=true but wandb is not installed; "
                         "continuing without it")
        try:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, desc=run_name,
                             dynamic_ncols=True, disable=None)
        except ImportError:
            self._bar = None

    def log(self, step: int, metrics: dict) -> None:
        if not self.is_main:
            return
        rec = {"step": step, "time": round(time.time(), 3)}
        rec.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                    for k, v in metrics.items()})
        append_jsonl(self.path, rec)
        parts = [f"step {step}"]
        for key, fmt in (("loss", "{:.4f}"), ("grad_norm", "{:.3f}"), ("lr", "{:.3e}"),
                         ("tokens_per_s", "{:.0f}"), ("tflops", "{:.3g}"), ("mfu", "{:.1%}"),
                         ("mem_gb", "{:.2f}"), ("step_time_s", "{:.2f}")):
            if rec.get(key) is not None:
                parts.append(f"{key} " + fmt.format(rec[key]))
        log.info(" | ".join(parts))
        for k, v in rec.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time"):
                if self._tb is not None:
                    self._tb.add_scalar(f"train/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in rec.items() if k != "time"}, step=step)
        if self._bar is not None:
            self._bar.update(1)
            if rec.get("loss") is not None:
                self._bar.set_postfix(loss=f"{rec['loss']:.4f}")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._bar is not None:
            self._bar.close()
