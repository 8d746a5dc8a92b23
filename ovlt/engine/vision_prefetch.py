"""The frozen vision tower, run one optimizer step ahead.

With the tower frozen (the recipe's default), a micro-batch's image features do not depend on
the step that trains on them. The tower's kernels are small (at 7B widths, 4096 patches, each
layer's work is ~0.5 ms on an H200) and the host cannot launch them as fast as the GPU runs
them, so at the start of a step, when the GPU has nothing else queued, the GPU idles (~20 ms of a
16 + 32 layer step). Launched instead between the backward and the optimizer update of the
step before, while the GPU still works through the backward, the same launches cost no GPU
time. `train_step(prefetch=mb)` calls `prefetch_image_features` for the next step's first
micro-batch; the forward then takes `mb.image_features` instead of running the tower. Later
micro-batches of a step need none of this: their tower launches queue behind the previous
micro-batch's backward anyway.
"""
from __future__ import annotations

import torch

from ovlt.engine.lm_head import unwrap
from ovlt.utils.device import to_device_async


def prefetch_image_features(chunks: list, batch) -> bool:
    """Run the vision tower on `batch`'s images now and keep the result on the batch
    (`batch.image_features`). Only on the first pipeline stage, only for a frozen tower and a
    batch with images; returns whether it ran."""
    net = unwrap(chunks[0])
    tower = getattr(net, "vision_model", None)
    grids = getattr(batch, "image_grid_thw", None)
    if tower is None or not getattr(net, "pre_process", False) or grids is None \
            or len(grids) == 0 or getattr(batch, "pixel_values", None) is None:
        return False
    if net._vision_trainable():
        return False  # a trained tower's features depend on this step's update
    dev = next(tower.parameters()).device
    with torch.no_grad():
        batch.image_features = tower(to_device_async(batch.pixel_values, dev), grids)
    return True
