"""`--profile`: a torch profiler trace (Chrome JSON) covering chosen optimizer steps."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch

from ovlt.logging import get_logger

log = get_logger(__name__)


class StepProfiler:
    """Call `step_begin(step)` before and `step_end(step)` after every optimizer step; steps in
    `steps` are recorded into `<out_dir>/profile/rank{r}_steps{a}-{b}.json`."""

    def __init__(self, steps: Iterable[int], out_dir: str | os.PathLike, rank: int = 0):
        self.steps = sorted(set(int(s) for s in steps))
        self.out_dir = Path(out_dir) / "profile"
        self.rank = rank
        self._prof = None

    def step_begin(self, step: int) -> None:
        if self._prof is None and self.steps and step == self.steps[0]:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=acts, record_shapes=True,
                                                with_stack=False, profile_memory=True)
            self._prof.__enter__()

    def step_end(self, step: int) -> None:
        if self._prof is None or step != self.steps[-1]:
            return
        self._prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank{self.rank}_steps{self.steps[0]}-{self.steps[-1]}.json"
        self._prof.export_chrome_trace(str(path))
        log.info("profiler trace for steps %s written to %s", self.steps, path)
        self._prof = None
        self.steps = []
