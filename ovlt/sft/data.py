"""SFT data for the trainer: records from `data.sft_files` -> `SFTDataset` -> per-step packed
micro-batches for this DP rank, resumable at any (epoch, step) without decoding the skipped
steps' images."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator


from ovlt.logging import get_logger

log = get_logger(__name__)


def build_sft_dataset(data_cfg):
    from ovlt.data.datasets import SFTDataset
    from ovlt.data.formats import SkipReport, read_sft

    if not data_cfg.sft_files:
        raise ValueError("data.sft_files is empty: give at least one SFT .json/.jsonl file "
                         "(e.g. data.sft_files=[runs/synth/sft.jsonl])")
    report = SkipReport(strict=data_cfg.strict)
    records = []
    for f in data_cfg.sft_files:
        records.extend(read_sft(f, image_root=data_cfg.image_root, report=report,
                                strict=data_cfg.strict))
    ds = SFTDataset(records, max_length=data_cfg.max_length, min_pixels=data_cfg.min_pixels,
                    max_pixels=data_cfg.max_pixels, report=report)
    if report.num_skipped:
        log.warning("SFT data: %d records skipped: %s", report.num_skipped, report.summary())
    log.info("SFT data: %d usable samples from %d file(s)", len(ds), len(data_cfg.sft_files))
    return ds


def data_fingerprint(ds) -> dict:
    """What a checkpoint records of the data it was trained on: the usable samples (ids,
    conversations, image file names, token lengths) hashed in order, and the count. The step
    plan is a function of these, so a different fingerprint means the saved data position no
    longer points into the same data. Image paths enter by file name only, so the same data
    read from another working directory or mount point keeps its fingerprint."""
    import hashlib
    import json
    import os

    h = hashlib.sha256()
    for r, n in zip(ds.records, ds.lengths):
        imgs = [os.path.basename(x) if isinstance(x, str) else hashlib.sha256(
            x if isinstance(x, (bytes, bytearray)) else json.dumps(x, default=str).encode()
        ).hexdigest() for x in r.images]
        h.update(json.dumps([r.id, r.messages, imgs, n], ensure_ascii=False,
                            default=str).encode("utf-8", "surrogatepass"))
        h.update(b"\n")
    return {"samples": len(ds.records), "sha256": h.hexdigest()}


def check_same_data(saved_state: dict, now: dict, save_dir, files) -> None:
    """Refuse to resume (or to call finished) a run whose checkpoint was trained on other data:
    its epoch / step position would index a different sample order. Checkpoints without a
    fingerprint are accepted as they are."""
    from ovlt.data.formats import DataError
    was = saved_state.get("data")
    if not isinstance(was, dict) or "sha256" not in was or was["sha256"] == now["sha256"]:
        return
    raise DataError(
        f"{save_dir}: its checkpoint (step {saved_state.get('step')}) was trained on different "
        f"SFT data ({was.get('samples')} usable samples, fingerprint {was['sha256'][:12]}) "
        f"than data.sft_files={list(files)} holds now ({now['samples']} samples, fingerprint "
        f"{now['sha256'][:12]}); resuming would continue a data order that no longer exists. "
        f"Use a new sft.train.save_dir to train on this data, or restore the data the "
        f"checkpoint was trained on")


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
