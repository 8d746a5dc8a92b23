"""Learning-rate schedule: linear warmup from 0, then cosine / linear decay to `min_lr`, or constant.

Step `s` (0-based, the optimizer step about to run) gets:
  warmup (s < W):   lr * (s + 1) / W
  cosine:           min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * p)),  p = (s - W) / max(1, T - W)
  linear:           min_lr + (lr - min_lr) * (1 - p)
  constant:         lr
Stateless apart from the step counter, which the checkpoint stores.
"""
from __future__ import annotations

import math


class LRSchedule:
    def __init__(self, opt_cfg, total_steps: int):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.base_lr = opt_cfg.lr
        self.min_lr = opt_cfg.min_lr
        self.kind = opt_cfg.lr_schedule
        self.total_steps = total_steps
        self.warmup_steps = (opt_cfg.warmup_steps if opt_cfg.warmup_steps > 0
                             else int(math.ceil(opt_cfg.warmup_ratio * total_steps)))
        self.warmup_steps = min(self.warmup_steps, total_steps)

    def lr_at(self, step: int) -> float:
        w, t = self.warmup_steps, self.total_steps
        if w > 0 and step < w:
            return self.base_lr * (step + 1) / w
        if self.kind == "constant":
            return self.base_lr
        p = min(1.0, max(0.0, (step - w) / max(1, t - w)))
        if self.kind == "cosine":
            return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
        if self.kind == "linear":
            return self.min_lr + (self.base_lr - self.min_lr) * (1.0 - p)
        raise ValueError(f"optimizer.lr_schedule: unknown schedule {self.kind!r}")

    def apply(self, optimizer, step: int) -> float:
        """Set the LR of every param group of an mcore (or torch) optimizer for `step`."""
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        return lr

    def state_dict(self) -> dict:
        return {"base_lr": self.base_lr, "min_lr": self.min_lr, "kind": self.kind,
                "total_steps": self.total_steps, "warmup_steps": self.warmup_steps}
