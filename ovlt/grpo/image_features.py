"""The frozen vision tower's output, once per prompt of a GRPO step.

A step's n samples of a prompt carry the same images, and each sample goes through the
policy's old log-prob pass, the reference pass and an update: run per micro-batch, the tower
would encode every image about 3n times a step. While the tower is frozen its features do not change
within a step, so `StepImages` encodes the step's images at first use, keeps them on the device
for the step (64 prompts x 324 tokens x 3584 x bf16 = 0.15 GB), and hands each micro-batch the
concatenation in its samples' order. Every prompt of a step goes through an update, so all of
them are encoded then, many images per tower call (up to `patch_budget` patches): one image a
call launches the tower's ~900 kernels for ~1K patches, and the GPU waits on the host. A
trainable tower (a curriculum stage that trains it) gets None: the model then runs the tower
itself, with gradients.

One instance per set of weights: the reference pass gets its own (its tower may differ from
the policy's; in `swap` mode it is the policy's modules holding other weights).
"""
from __future__ import annotations

from typing import Optional

import torch

from ovlt.utils.device import pinned, to_device_async


def frozen_tower(net) -> bool:
    """Whether `net` (an unwrapped Qwen2.5-VL chunk) runs a vision tower that is not trained."""
    tower = getattr(net, "vision_model", None)
    return tower is not None and getattr(net, "pre_process", False) and \
        not any(p.requires_grad for p in tower.parameters())


class StepImages:
    def __init__(self, rollouts, pin: bool = False, patch_budget: int = 65536):
        # group -> (pixel_values, image_grid_thw) of its first sample with images; pinned on a
        # GPU run, so copying them in does not drain the stream
        self.pixels: dict = {}
        for r in rollouts:
            if r.pixel_values is not None and r.group not in self.pixels:
                pv = pinned(r.pixel_values) if pin else r.pixel_values
                self.pixels[r.group] = (pv, torch.as_tensor(r.image_grid_thw).view(-1, 3))
        self._features: dict = {}
        self.patch_budget = patch_budget
        self.encoded = 0  # prompts whose images went through the tower (tests, metrics)
        self.tower_calls = 0

    def for_other_weights(self) -> "StepImages":
        """An empty cache over the same (already pinned) pixels, for another set of weights."""
        other = StepImages([], patch_budget=self.patch_budget)
        other.pixels = self.pixels
        return other

    def _encode(self, tower, dev, groups: list) -> None:
        """Encode `groups` (not yet cached), as many per tower call as `patch_budget` allows
        (a group bigger than the budget gets a call of its own)."""
        def patches(g):
            return int(self.pixels[g][1].prod(dim=1).sum())

        chunk, n = [], 0
        for g in groups + [None]:
            if chunk and (g is None or n + patches(g) > self.patch_budget):
                pv = torch.cat([to_device_async(self.pixels[c][0], dev) for c in chunk])
                grid = torch.cat([self.pixels[c][1] for c in chunk])
                with torch.no_grad():
                    out = tower(pv, grid)
                merged = [patches(c) // tower.merge ** 2 for c in chunk]
                self._features.update(zip(chunk, out.split(merged)))
                self.encoded += len(chunk)
                self.tower_calls += 1
                chunk, n = [], 0
            if g is not None:
                chunk.append(g)
                n += patches(g)

    def features(self, net, image_groups: list) -> Optional[torch.Tensor]:
        """The tower's features of `image_groups`' images, concatenated in that order, or None
        when `net` runs no frozen tower here (a later pipeline stage, a trained tower)."""
        if not image_groups or not frozen_tower(net):
            return None
        tower = net.vision_model
        if any(g not in self._features for g in image_groups):
            # this call's groups first, then the rest of the step's
            todo = [g for g in dict.fromkeys(image_groups) if g not in self._features]
            todo += [g for g in self.pixels if g not in self._features and g not in todo]
            self._encode(tower, next(tower.parameters()).device, todo)
        out = [self._features[g] for g in image_groups]
        return torch.cat(out) if len(out) > 1 else out[0]
