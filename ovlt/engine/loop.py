"""The decisions around a training loop that SFT and GRPO make the same way, in one place:
where a run starts (the latest checkpoint under `save_dir`), when to save
(`train.save_interval`), when to leave early (`train.exit_interval`, for a scheduler's time
limit), and how a run ends (a final checkpoint unless the last step was just saved, then the
HF export). A trainer's loop reads

    loop = TrainLoop(train_cfg, save_dir, total_steps)
    state = loop.resume(chunks, optimizer)            # None on a fresh start
    for step in range(loop.start_step, total_steps):
        ...one step...
        if loop.save_due(step + 1): loop.save(step + 1, trainer_state)
        if loop.exit_due(step + 1): loop.save_unless_saved(...); return
    loop.finish(trainer_state, module, model_cfg)     # final checkpoint + export
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ovlt.engine.checkpoint import (find_latest, load_checkpoint, read_trainer_state,
                                    save_checkpoint)
from ovlt.engine.metrics_logger import trim_jsonl
from ovlt.logging import get_logger
from ovlt.utils.device import dtype_of

log = get_logger(__name__)


class TrainLoop:
    def __init__(self, train_cfg, save_dir, total_steps: int):
        self.t = train_cfg
        self.save_dir = Path(save_dir)
        self.total_steps = total_steps
        self.latest = find_latest(self.save_dir)
        self.start_step = 0
        # the trainer state of the latest checkpoint ({} on a fresh start)
        self.saved_state: dict = {}
        if self.latest is not None:
            self.saved_state = read_trainer_state(self.latest)  # a clear error if corrupt
            self.start_step = int(self.saved_state["step"])
        # the last step a checkpoint holds (-1: none); a resumed run holds its start
        self.saved_at = self.start_step if self.latest is not None else -1
        self._chunks = self._optimizer = None
        if self.nothing_to_train:
            log.warning(
                "%s holds a finished run (checkpoint %s at step %d; this run plans %d steps): "
                "nothing to train%s. To train longer raise train.max_steps or train.epochs; "
                "to train anew (e.g. on other data) use a new save_dir", self.save_dir,
                self.latest.name, self.start_step, total_steps,
                "" if (self.save_dir / "final_hf").is_dir() or not train_cfg.export_hf
                else ", exporting final_hf/ only")

    @property
    def nothing_to_train(self) -> bool:
        """A checkpoint at or past the last planned step: the loop runs no step."""
        return self.latest is not None and self.start_step >= self.total_steps

    @property
    def resumed(self) -> bool:
        return self.latest is not None

    def resume(self, chunks: list, optimizer, jsonl_files=("metrics.jsonl",),
               is_writer: bool = True) -> Optional[dict]:
        """Load the latest checkpoint into `chunks` / `optimizer` (None when there is none)
        and drop the records of `jsonl_files` past it (a killed run may have logged steps its
        last checkpoint does not hold). Returns the saved trainer state."""
        self._chunks, self._optimizer = chunks, optimizer
        st = None
        if self.latest is not None:
            st = load_checkpoint(self.latest, chunks, optimizer)
            log.info("resumed from %s at step %d", self.latest, self.start_step)
        if is_writer:
            for name in jsonl_files:
                trim_jsonl(self.save_dir / name, self.start_step)
        return st

    def rebind(self, chunks: list, optimizer) -> None:
        """The model wrapper and optimizer to save from now on (a trainer that rebuilt them)."""
        self._chunks, self._optimizer = chunks, optimizer

    # ------------------------------------------------------------------ within the loop
    def save_due(self, step: int) -> bool:
        return bool(self.t.save_interval) and step % self.t.save_interval == 0

    def exit_due(self, step: int) -> bool:
        """`train.exit_interval` steps done in this process and more to go."""
        return bool(self.t.exit_interval) and (step - self.start_step) % self.t.exit_interval == 0 \
            and step < self.total_steps

    def save(self, step: int, trainer_state: dict) -> None:
        from ovlt.engine.optimizer import ensure_optimizer_state
        ensure_optimizer_state(self._optimizer)  # a run whose steps all skipped the update
        save_checkpoint(self.save_dir, step, self._chunks, self._optimizer, trainer_state,
                        keep_last=self.t.keep_last)
        self.saved_at = step

    def save_unless_saved(self, step: int, trainer_state: dict) -> None:
        if self.saved_at != step:
            self.save(step, trainer_state)

    # ------------------------------------------------------------------ the end
    def finish(self, trainer_state: dict, module, model_cfg) -> Optional[Path]:
        """The final checkpoint (`train.save_final`, unless just saved) and the HF export
        (`train.export_hf`; a resumed run that had finished and exported does not redo it).
        Returns the HF directory, or None. A run that trained nothing saves nothing: its
        model is the checkpoint's, which may lie past `total_steps` (a lowered max_steps)."""
        if self.t.save_final and not self.nothing_to_train:
            self.save_unless_saved(self.total_steps, trainer_state)
        out = self.save_dir / "final_hf"
        if not self.t.export_hf or (self.nothing_to_train and out.is_dir()):
            return None
        from ovlt.engine.hf_io import export_hf
        return export_hf(module, model_cfg, out, dtype=dtype_of(self.t.precision))
