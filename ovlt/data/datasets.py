"""Datasets and loaders: records -> samples (decoded in DataLoader worker processes) ->
packed micro-batches for SFT (GRPO reads its prompts in `ovlt.grpo.data`).

Lengths are known before any image is decoded (tokenise with grids from the image headers),
so the per-step plan - which samples go to which DP rank and micro-batch - is computed
identically on every rank from (seed, epoch) with no communication.
Bad records found while building (missing/corrupt header, mismatch, over-length) are counted
skips in `dataset.report`; a decode failure later in a worker drops that sample from its
micro-batch and is recorded in `PackedBatch.skipped` (the trainer adds it to its report).
"""
from __future__ import annotations

import random
from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ovlt.data import image_processing as ip
from ovlt.data.batch import PackedBatch
from ovlt.data.chat_template import encode_sft
from ovlt.data.formats import DataError, SFTRecord, SkipReport, read_rl, read_sft
from ovlt.data.image_loader import ImageError, image_size, load_image_pil
from ovlt.data.packing import balanced_plan, collate, empty_batch, make_sample
from ovlt.data.tokenizer import load_tokenizer
from ovlt.logging import get_logger

log = get_logger(__name__)


def _header_grids(images, min_pixels, max_pixels):
    grids = []
    for src in images:
        w, h = image_size(src)
        try:
            grids.append(ip.grid_for_size(h, w, min_pixels, max_pixels))
        except ValueError as e:
            raise ImageError(f"unusable image: {e}") from None
    return grids


def _load_images(images, min_pixels, max_pixels):
    pvs, grids = [], []
    for src in images:
        pv, g = load_image_pil(src, min_pixels, max_pixels)
        pvs.append(pv)
        grids.append(g)
    return (torch.cat(pvs) if pvs else None), grids


def skips_in_brief(report: Optional[SkipReport], n: int = 3) -> str:
    """"; N skipped, e.g. <file: record i: reason>; ..." for a one-line error ('' if none)."""
    if report is None or not report.skips:
        return ""
    first = "; ".join(str(s) for s in report.skips[:n])
    return f"; {report.num_skipped} skipped, e.g. {first}"


def _report_for(records: Sequence, report: Optional[SkipReport]) -> SkipReport:
    """The caller's report, or a new one where records read elsewhere count as valid until
    rejected here."""
    if report is None:
        report = SkipReport()
        report.valid = len(records)
    return report


class SFTDataset(Dataset):
    """Item i -> `Sample` (tokenised conversation + decoded images), or a skip tuple
    (id, file, index, reason) when decoding fails in the worker."""

    def __init__(self, records: Sequence[SFTRecord], max_length: int = 2048,
                 min_pixels: int = 3136, max_pixels: int = 262144,
                 report: Optional[SkipReport] = None):
        self.tok = load_tokenizer()
        self.min_pixels, self.max_pixels, self.max_length = min_pixels, max_pixels, max_length
        self.report = _report_for(records, report)
        self.records: list[SFTRecord] = []
        self.lengths: list[int] = []
        for r in records:
            try:
                grids = _header_grids(r.images, min_pixels, max_pixels)
                ids, mask = encode_sft(r.messages, grids, tokenizer=self.tok)
            except (ImageError, ValueError) as e:
                self.report.reject(r.file, r.index, str(e))
                continue
            if len(ids) > max_length:
                self.report.reject(r.file, r.index,
                                 f"over-length: {len(ids)} tokens > max_length {max_length}")
                continue
            if not any(mask):
                self.report.reject(r.file, r.index, "empty answer: no trained tokens")
                continue
            self.records.append(r)
            self.lengths.append(len(ids))

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        r = self.records[i]
        try:
            pv, grids = _load_images(r.images, self.min_pixels, self.max_pixels)
        except ImageError as e:
            return (r.id, r.file, r.index, str(e))
        ids, mask = encode_sft(r.messages, grids, tokenizer=self.tok)
        return make_sample(ids, mask, pv, grids, r.id)


class _MicroBatches(Dataset):
    """Item k = one planned micro-batch (list of SFTDataset indices), loaded and packed by a
    worker."""

    def __init__(self, ds: SFTDataset, plan: list[list[int]], pad_to_multiple: int):
        self.ds, self.plan, self.pad = ds, plan, pad_to_multiple

    def __len__(self):
        return len(self.plan)

    def __getitem__(self, k) -> PackedBatch:
        samples, skipped = [], []
        for i in self.plan[k]:
            s = self.ds[i]
            (skipped if isinstance(s, tuple) else samples).append(s)
        batch = collate(samples, self.pad) if samples else empty_batch()
        batch.skipped = skipped
        return batch


def step_plans(lengths: Sequence[int], global_batch_size: int, dp_size: int,
               token_budget: int, seed: int, epoch: int) -> list[list[list[list[int]]]]:
    """plans[step][rank][micro_batch] -> dataset indices, for one epoch (a seeded shuffle;
    the last partial global batch is dropped)."""
    order = list(range(len(lengths)))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    plans = []
    for s in range(len(order) // global_batch_size):
        idx = order[s * global_batch_size:(s + 1) * global_batch_size]
        plan = balanced_plan([lengths[i] for i in idx], dp_size, token_budget)
        plans.append([[[idx[j] for j in mb] for mb in rank] for rank in plan])
    return plans


def _identity(x):
    return x


class SFTLoader:
    """Iterate one epoch: yields, per optimizer step, this rank's list of PackedBatch
    micro-batches (same count on every rank). Decoding runs in `num_workers` processes."""

    def __init__(self, dataset: SFTDataset, global_batch_size: int, token_budget: int,
                 dp_rank: int = 0, dp_size: int = 1, num_workers: int = 2, seed: int = 0,
                 pad_to_multiple: int = 1):
        if global_batch_size < dp_size:
            raise ValueError(f"global_batch_size {global_batch_size} < dp_size {dp_size}")
        if pad_to_multiple > 1 and token_budget % pad_to_multiple:
            raise ValueError(f"token budget {token_budget} is not a multiple of "
                             f"pad_to_multiple {pad_to_multiple}")
        if len(dataset) < global_batch_size:
            raise DataError(f"dataset has {len(dataset)} usable samples, fewer than one global "
                            f"batch ({global_batch_size}){skips_in_brief(dataset.report)}")
        self.ds, self.gbs, self.budget = dataset, global_batch_size, token_budget
        self.rank, self.dp, self.workers, self.seed = dp_rank, dp_size, num_workers, seed
        self.pad = pad_to_multiple
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def steps_per_epoch(self) -> int:
        return len(self.ds) // self.gbs

    def __len__(self):
        return self.steps_per_epoch()

    def __iter__(self) -> Iterator[list[PackedBatch]]:
        return self.iter_epoch(self.epoch)

    def iter_epoch(self, epoch: int, first_step: int = 0) -> Iterator[list[PackedBatch]]:
        """Steps `first_step`.. of `epoch` (resuming mid-epoch decodes nothing before it)."""
        plans = step_plans(self.ds.lengths, self.gbs, self.dp, self.budget, self.seed, epoch)
        mine = [plan[self.rank] for plan in plans][first_step:]
        flat = [mb for step in mine for mb in step]
        loader = DataLoader(_MicroBatches(self.ds, flat, self.pad), batch_size=None,
                            shuffle=False, num_workers=self.workers, collate_fn=_identity,
                            persistent_workers=False,
                            prefetch_factor=4 if self.workers > 0 else None,
                            pin_memory=torch.cuda.is_available())
        it = iter(loader)
        for step in mine:
            yield [next(it) for _ in step]


# --------------------------------------------------------------------------- from config
def read_records(data_cfg, kind: str, files: Optional[Sequence[str]] = None,
                 report: Optional[SkipReport] = None) -> list:
    """Records of `kind` ('sft' | 'rl') named by the config: `files` if given (e.g. a GRPO
    curriculum stage's rl_files), else data.{sft,rl}_files plus the registry's sources; the
    readers' skips go to `report`."""
    from ovlt.data.formats import read_registry
    report = report if report is not None else SkipReport(strict=data_cfg.strict)
    paths = list(files) if files is not None else list(
        data_cfg.sft_files if kind == "sft" else data_cfg.rl_files)
    reader = read_sft if kind == "sft" else read_rl
    recs = [r for p in paths for r in reader(p, image_root=data_cfg.image_root, report=report)]
    if data_cfg.registry and files is None:
        recs += read_registry(data_cfg.registry, kind, report, seed=data_cfg.seed)
    if not paths and not (data_cfg.registry and files is None):
        raise DataError(f"no {kind} data: set data.{kind}_files or data.registry")
    return recs  # all skipped: the dataset's "0 usable samples" error names the skips


def build_sft_dataset(data_cfg):
    """The usable SFT samples of `data.sft_files` plus the registry's SFT sources."""
    report = SkipReport(strict=data_cfg.strict)
    ds = SFTDataset(read_records(data_cfg, "sft", report=report), max_length=data_cfg.max_length,
                    min_pixels=data_cfg.min_pixels, max_pixels=data_cfg.max_pixels,
                    report=report)
    if report.num_skipped:
        log.warning("SFT data: %d records skipped: %s", report.num_skipped, report.summary())
    log.info("SFT data: %d usable samples from %d file(s)%s", len(ds), len(data_cfg.sft_files),
             f" and {data_cfg.registry}" if data_cfg.registry else "")
    return ds


def build_sft_loader(data_cfg, global_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                     pad_to_multiple: int = 1) -> SFTLoader:
    """SFT loader from the `data:` config section (token budget data.pack_tokens or
    data.max_length). The dataset's SkipReport is `loader.ds.report`."""
    return SFTLoader(build_sft_dataset(data_cfg), global_batch_size,
                     data_cfg.pack_tokens or data_cfg.max_length, dp_rank, dp_size,
                     data_cfg.num_workers, data_cfg.seed, pad_to_multiple)
