"""SFT data for the trainer: records from `data.sft_files` -> `SFTDataset` -> per-step packed
micro-batches for this DP rank, resumable at any (epoch, step) without decoding the skipped
steps' images."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from ovlt.data.fingerprint import fingerprint, image_key
from ovlt.logging import get_logger

log = get_logger(__name__)


def build_sft_dataset(data_cfg):
    """The usable SFT samples of `data.sft_files` plus the registry's SFT sources."""
    from ovlt.data.datasets import SFTDataset, read_records
    from ovlt.data.formats import SkipReport

    report = SkipReport(strict=data_cfg.strict)
    ds = SFTDataset(read_records(data_cfg, "sft", report=report), max_length=data_cfg.max_length,
                    min_pixels=data_cfg.min_pixels, max_pixels=data_cfg.max_pixels,
                    report=report)
    if report.num_skipped:
        log.warning("SFT data: %d records skipped: %s", report.num_skipped, report.summary())
    log.info("SFT data: %d usable samples from %d file(s)%s", len(ds), len(data_cfg.sft_files),
             f" and {data_cfg.registry}" if data_cfg.registry else "")
    return ds


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
