"""The batch contract between the data pipeline, the model and the trainers.

A packed micro-batch is THD: all samples concatenated into one row of T tokens, with
`cu_seqlens` marking sample boundaries (attention never crosses them) and per-sample MRoPE
position ids. Images travel with their samples: `pixel_values` rows are the flattened
14x14x2 patches of the images, in the order their `<|image_pad|>` runs appear in `input_ids`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ovlt.utils.device import pinned


@dataclass
class PackedBatch:
    input_ids: torch.Tensor              # [1, T] int64
    position_ids: torch.Tensor           # [3, 1, T] int64 (MRoPE t/h/w)
    cu_seqlens: torch.Tensor             # [n_samples + 1] int32, cumulative lengths, starts at 0
    labels: torch.Tensor                 # [1, T] int64: next token at each position, -100 = none
    loss_mask: torch.Tensor              # [1, T] float32: 1 where the label is trained on
    pixel_values: Optional[torch.Tensor] = None   # [n_patches, 3*2*14*14] float32
    image_grid_thw: Optional[torch.Tensor] = None  # [n_images, 3] int64
    sample_ids: list = field(default_factory=list)  # ids of the packed records, for logging
    # (id, file, record index, reason) of samples dropped from this micro-batch because their
    # images failed to decode in the worker; the trainer adds them to its skip report.
    skipped: list = field(default_factory=list)
    # [n_image_tokens, H] the frozen vision tower's output for `pixel_values`, already on the
    # device (`ovlt.engine.vision_prefetch`): the model then does not run the tower.
    image_features: Optional[torch.Tensor] = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[-1])

    @property
    def num_samples(self) -> int:
        return int(self.cu_seqlens.numel() - 1)

    def pin_memory(self) -> "PackedBatch":
        """Page-locked copies (DataLoader(pin_memory=True) calls this): the H2D copy of `to`
        then runs asynchronously instead of blocking the host."""
        return PackedBatch(**{k: pinned(v) for k, v in self.__dict__.items()})

    def to(self, device) -> "PackedBatch":
        """A copy on `device`. `pixel_values` stay where they are when the batch already
        carries its `image_features`: the model does not read them then (at 4 x 448^2 images
        that skips a ~20 MB host-to-device copy per micro-batch)."""
        def mv(k, t):
            if not isinstance(t, torch.Tensor) or \
                    (k == "pixel_values" and self.image_features is not None):
                return t
            return t.to(device, non_blocking=True)
        return PackedBatch(**{k: mv(k, v) for k, v in self.__dict__.items()})
