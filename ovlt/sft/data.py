"""SFT data for the trainer: records from `data.sft_files` and `data.registry` -> `SFTDataset`
(`build_sft_dataset`, owned by `ovlt.data.datasets`) -> per-step packed micro-batches for this
DP rank, resumable at any (epoch, step) without decoding the skipped steps' images."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from ovlt.data.datasets import build_sft_dataset  # noqa: F401 - the trainer's entry point
from ovlt.data.fingerprint import fingerprint, image_key


def data_fingerprint(ds) -> dict:
    """What an SFT checkpoint records of its data (`ovlt.data.fingerprint`): the usable samples
    (ids, conversations, image file names, token lengths) hashed in order, and the count."""
    return fingerprint([r.id, r.messages, [image_key(x) for x in r.images], n]
                       for r, n in zip(ds.records, ds.lengths))


@dataclass
class Position:
    epoch: int = 0
    step_in_epoch: int = 0


class SFTStream:
    """Yields (position_after, micro_batches) for optimizer steps starting at `start`."""

    def __init__(self, dataset, global_batch_size: int, token_budget: int, dp_rank: int,
                 dp_size: int, seed: int, num_workers: int, pad_to_multiple: int = 1):
        from ovlt.data.datasets import SFTLoader
        self.loader = SFTLoader(dataset, global_batch_size, token_budget, dp_rank=dp_rank,
                                dp_size=dp_size, num_workers=num_workers, seed=seed,
                                pad_to_multiple=pad_to_multiple)

    @property
    def steps_per_epoch(self) -> int:
        return self.loader.steps_per_epoch()

    def _epoch_iter(self, epoch: int, first_step: int) -> Iterator[list]:
        return self.loader.iter_epoch(epoch, first_step)

    def iterate(self, start: Position) -> Iterator[tuple[Position, list]]:
        epoch, step = start.epoch, start.step_in_epoch
        while True:
            for mbs in self._epoch_iter(epoch, step):
                step += 1
                yield Position(epoch, step), mbs
            epoch, step = epoch + 1, 0
