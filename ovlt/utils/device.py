"""Host -> device copies that do not stall the GPU stream."""
from __future__ import annotations

import torch


def to_device_async(t: torch.Tensor, device) -> torch.Tensor:
    """`t` on `device`; from host memory to a GPU through a pinned copy with non_blocking (a
    copy from pageable memory makes the stream drain first: a hidden sync)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
    return t.to(device)
