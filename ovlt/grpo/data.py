"""RL prompts for GRPO: curriculum stages of parquet files, a resumable position, encoding.

Stages come from `grpo.curriculum` (e.g. medium then hard, each with its own files, epochs
and vision freezing; a stage without files takes the records of its difficulty from
`data.rl_files` and `data.registry`) or, when empty, one stage over `data.rl_files` and the
registry's RL sources. Each stage is shuffled per epoch with `data.seed + epoch`; the position
(stage, epoch, index) is saved in checkpoints so a resumed run draws exactly the prompts the
uninterrupted run would have, and with it the prompts' fingerprint (`PromptStream.fingerprint`):
a resume on other prompts is refused. Every DP rank takes a strided slice of the global prompt
batch.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

from ovlt.config import CurriculumStage
from ovlt.logging import get_logger

log = get_logger(__name__)


@dataclass
class PromptPosition:
    stage: int = 0
    epoch: int = 0
    index: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def _of_difficulty(records: list, stage: str) -> list:
    """A curriculum stage without files of its own: the records of its difficulty."""
    from ovlt.data.formats import DataError
    picked = [r for r in records if r.difficulty == stage]
    if records and not picked:
        raise DataError(f"grpo curriculum stage {stage!r} has no rl_files and none of the "
                        f"{len(records)} records of data.rl_files / data.registry has difficulty "
                        f"{stage!r} (found: {sorted({str(r.difficulty) for r in records})})")
    return picked


class PromptStream:
    def __init__(self, cfg, prompts_per_step: int):
        from ovlt.data.datasets import skips_in_brief
        from ovlt.data.formats import DataError, SkipReport, read_rl
        g, d = cfg.grpo, cfg.data
        # no curriculum: one stage of data.rl_files and the registry's RL sources
        stages = list(g.curriculum) or [CurriculumStage(name="all", epochs=cfg.grpo.train.epochs,
                                                        freeze_vision="vision" in g.train.freeze)]
        # what a stage without files of its own reads (once, however many stages do)
        self._shared = list(d.rl_files) + ([d.registry] if d.registry else [])
        shared = None
        self.stages, self.records = [], []
        for st in stages:
            report = SkipReport(strict=d.strict)
            if st.rl_files:
                recs = [r for f in st.rl_files
                        for r in read_rl(f, image_root=d.image_root, report=report, source=st.name)]
            else:
                if shared is None:
                    shared = self._read_shared(d, st.name, report)
                recs = _of_difficulty(shared, st.name) if g.curriculum else shared
            if report.num_skipped:
                log.warning("stage %s: %s", st.name, report.summary())
            if not recs:
                where = ", ".join(map(str, st.rl_files or self._shared))
                raise DataError(f"grpo stage {st.name!r}: no usable records in "
                                f"{where}{skips_in_brief(report)}")
            self.stages.append(st)
            self.records.append(recs)
        self.n = prompts_per_step
        self.seed = d.seed

    @staticmethod
    def _read_shared(d, stage: str, report) -> list:
        from ovlt.data.datasets import read_records
        from ovlt.data.formats import DataError
        if not (d.rl_files or d.registry):
            raise DataError(f"grpo stage {stage!r}: no rl_files (set data.rl_files, "
                            "data.registry or grpo.curriculum[i].rl_files)")
        return read_records(d, "rl", report=report)

    def fingerprint(self) -> dict:
        """What a GRPO checkpoint records of its prompts (`ovlt.data.fingerprint`): every
        stage's name and records (id, problem, answer, image file names) in order."""
        from ovlt.data.fingerprint import fingerprint, image_key
        return fingerprint([st.name, r.id, r.problem, r.answer, [image_key(x) for x in r.images]]
                           for st, recs in zip(self.stages, self.records) for r in recs)

    def sources(self) -> str:
        """Where the stages' prompts come from, for messages."""
        return "; ".join(f"{st.name}: {', '.join(map(str, st.rl_files or self._shared))}"
                         for st in self.stages)

    def steps_in_stage(self, s: int) -> int:
        per_epoch = max(1, len(self.records[s]) // self.n)
        return max(1, int(math.ceil(self.stages[s].epochs * per_epoch)))

    @property
    def total_steps(self) -> int:
        return sum(self.steps_in_stage(s) for s in range(len(self.stages)))

    def stage_of_step(self, step: int) -> int:
        for s in range(len(self.stages)):
            step -= self.steps_in_stage(s)
            if step < 0:
                return s
        return len(self.stages) - 1

    def _order(self, stage: int, epoch: int) -> list[int]:
        idx = list(range(len(self.records[stage])))
        random.Random(self.seed + 1000 * stage + epoch).shuffle(idx)
        return idx

    def next_batch(self, pos: PromptPosition, step: int, dp_rank: int, dp: int):
        """(records for this DP rank, next position). Moves to the next stage when the step
        count of the current one is reached; an epoch ends when fewer than n prompts remain."""
        stage = self.stage_of_step(step)
        if stage != pos.stage:
            pos = PromptPosition(stage, 0, 0)
        recs = self.records[stage]
        n = min(self.n, len(recs))
        if pos.index + n > len(recs):
            pos = PromptPosition(stage, pos.epoch + 1, 0)
        order = self._order(stage, pos.epoch)
        chosen = [recs[i] for i in order[pos.index: pos.index + n]]
        return chosen[dp_rank::dp], PromptPosition(stage, pos.epoch, pos.index + n)


def encode_record(rec, tokenizer, image_loader, suffix: str, merge_size: int, style: str = "ovlt"):
    """(prompt ids, pixel_values | None, grid_thw | None) of one RL record; the prompt text is
    `ovlt.rewards.rl_prompt` of the reward style (`suffix` = rollout.prompt_suffix)."""
    import torch

    from ovlt.data.chat_template import encode_prompt
    from ovlt.rewards.prompts import rl_prompt
    imgs = image_loader.load(rec.images) if rec.images else []
    grids = [tuple(int(x) for x in g) for _, g in imgs]
    ids = encode_prompt(rl_prompt(rec.problem, style, suffix), grids, merge_size=merge_size,
                        tokenizer=tokenizer)
    if not imgs:
        return ids, None, None
    return ids, torch.cat([pv for pv, _ in imgs]), torch.tensor(grids, dtype=torch.long)


def build_requests(recs, cfg, tokenizer, image_loader, engine, skipped: list | None = None) -> list:
    """One `GenerationRequest` per record, as the GRPO trainer samples them: the prompt encoded
    by `encode_record`, cut from the left to `rollout.max_prompt_length` (logged), resized images
    for an engine with its own weights (vLLM). A record whose image cannot be used (truncated,
    corrupt, missing) is a logged skip, left out and appended to `skipped`; every record
    unusable is a DataError naming them."""
    from ovlt.data.formats import DataError
    from ovlt.data.image_loader import ImageError
    from ovlt.rollout.base import GenerationRequest
    rc = cfg.rollout
    out, bad = [], []
    for rec in recs:
        try:
            ids, pv, grid = encode_record(rec, tokenizer, image_loader, rc.prompt_suffix,
                                          cfg.model.vision.spatial_merge_size, cfg.rewards.style)
        except (ImageError, OSError) as e:
            log.warning("skipping prompt %s (%s: record %d): unusable image: %s", rec.id,
                        rec.file, rec.index, e)
            bad.append((rec, e))
            continue
        if len(ids) > rc.max_prompt_length:
            log.warning("prompt %s (%s:%d) has %d tokens > rollout.max_prompt_length=%d; "
                        "truncated from the left", rec.id, rec.file, rec.index, len(ids),
                        rc.max_prompt_length)
            ids = ids[-rc.max_prompt_length:]
        images = None
        if pv is not None and not engine.shares_trainer_weights:  # vLLM: resized images
            from PIL import Image

            from ovlt.data.image_loader import open_image
            from ovlt.data.image_processing import resize_rgb
            images = [Image.fromarray(resize_rgb(open_image(src), cfg.data.min_pixels,
                                                 cfg.data.max_pixels)) for src in rec.images]
        out.append(GenerationRequest(prompt_ids=ids, pixel_values=pv, image_grid_thw=grid,
                                     images=images, request_id=rec.id))
    if bad and not out:
        raise DataError("no usable prompt in this step's batch: " + "; ".join(
            f"{r.file}: record {r.index}: {e}" for r, e in bad[:4]))
    if skipped is not None:
        skipped += [r for r, _ in bad]
    return out
