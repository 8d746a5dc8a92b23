"""Training checkpoints: model + DistributedOptimizer state as mcore sharded state dicts in
safetensors + JSON (`engine.sharded_store`: reshardable, save at TP=2, load at TP=1), plus the
trainer state (step, data position, LR schedule) and every rank's RNG streams. No file of a
checkpoint is a pickle, and loading one never unpickles anything: a checkpoint is a file users
pass around.

Layout of `<save_dir>`:
    step_0000030/
        state/                model + optimizer (`sharded_store`: common.json, r*.safetensors)
        trainer_state.json    step, consumed samples, epoch position, schedule, parallel sizes
        rng/rank00003.json    python / numpy RNG of rank 3
        rng/rank00003.safetensors   torch CPU (+CUDA) RNG and mcore's TP-RNG tracker states
    latest                    "step_0000030": the newest complete checkpoint

Atomicity: everything is written into `.tmp-step_XXXXXXX/`; only after all ranks finished
(barrier) does rank 0 rename it to `step_XXXXXXX/` and then atomically rewrite `latest`. A kill
at any point leaves either the old or the new checkpoint complete; `find_latest` never returns a
`.tmp-*` directory. Old checkpoints beyond `keep_last` are deleted after the commit.

A checkpoint of torch's DCP format (`dist/.metadata`, a pickle) is refused, unread.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ovlt.logging import get_logger
from ovlt.compat.mcore_cpu import cuda_free_mode
from ovlt.engine import sharded_store
from ovlt.engine.optimizer import ensure_optimizer_state
from ovlt.engine.sharded_store import CheckpointError
from ovlt.utils.io import atomic_write_json, atomic_write_text

log = get_logger(__name__)

_STEP_RE = re.compile(r"^step_(\d{7})$")
OPTIM_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


# --------------------------------------------------------------------------- RNG
def _rng_save(dirpath: Path, rank: int) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state().cpu()
    for name, st in get_cuda_rng_tracker().get_states().items():
        tensors[f"tracker.{name}"] = st.cpu() if torch.is_tensor(st) else torch.as_tensor(st)
    save_file(tensors, str(dirpath / f"rank{rank:05d}.safetensors"))
    py = random.getstate()
    npst = np.random.get_state()
    atomic_write_json(dirpath / f"rank{rank:05d}.json", {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])]})


def _rng_load(dirpath: Path, rank: int) -> bool:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    st_path, js_path = dirpath / f"rank{rank:05d}.safetensors", dirpath / f"rank{rank:05d}.json"
    if not st_path.exists() or not js_path.exists():
        return False
    try:
        t = load_file(str(st_path))
    except Exception as e:  # noqa: BLE001 - SafetensorError: truncated / not safetensors
        raise CheckpointError(f"{st_path}: unreadable (truncated or not a safetensors file: "
                              f"{e})") from None
    torch.set_rng_state(t["torch_cpu"])
    if torch.cuda.is_available() and "torch_cuda" in t:
        torch.cuda.set_rng_state(t["torch_cuda"])
    tracker = {k[len("tracker."):]: v for k, v in t.items() if k.startswith("tracker.")}
    if tracker:
        get_cuda_rng_tracker().set_states(tracker)
    try:
        j = json.loads(js_path.read_text(encoding="utf-8"))
        random.setstate((j["python"][0], tuple(j["python"][1]), j["python"][2]))
        n = j["numpy"]
        np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{js_path}: not a valid RNG state ({e!r})") from None
    return True


# --------------------------------------------------------------------------- find / prune
def list_checkpoints(save_dir) -> list[Path]:
    """Complete checkpoints (committed `step_*` dirs with a trainer state), oldest first."""
    d = Path(save_dir)
    if not d.is_dir():
        return []
    out = [p for p in d.iterdir() if p.is_dir() and _STEP_RE.match(p.name)
           and (p / "trainer_state.json").is_file()]
    return sorted(out, key=lambda p: int(_STEP_RE.match(p.name).group(1)))


def find_latest(save_dir) -> Optional[Path]:
    """The checkpoint named by `latest` if complete, else the newest complete one, else None."""
    d = Path(save_dir)
    ptr = d / "latest"
    if ptr.is_file():
        name = ptr.read_text(encoding="utf-8", errors="replace").strip()
        cand = d / name
        if _STEP_RE.match(name) and (cand / "trainer_state.json").is_file():
            return cand
        log.warning("%s names %r, which is not a complete checkpoint in %s; scanning", ptr,
                    name[:80], d)
    ckpts = list_checkpoints(d)
    return ckpts[-1] if ckpts else None


def _prune(save_dir: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for old in list_checkpoints(save_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
        log.info("removed old checkpoint %s (keep_last=%d)", old, keep_last)


# --------------------------------------------------------------------------- save / load
def _sharded_state(chunks: list, optimizer, is_loading: bool) -> dict:
    model = chunks[0].module
    model_sd = model.sharded_state_dict()
    if is_loading:
        ensure_optimizer_state(optimizer)
    return {"model": model_sd,
            "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                      metadata=dict(OPTIM_FORMAT))}


def save_checkpoint(save_dir, step: int, chunks: list, optimizer, trainer_state: dict,
                    keep_last: int = 2,
                    _before_commit: Optional[Callable[[Path], None]] = None) -> Path:
    """Collective: every rank calls it. Returns the committed directory."""
    save_dir = Path(save_dir)
    rank = _rank()
    final = save_dir / step_dir_name(step)
    tmp = save_dir / f".tmp-{step_dir_name(step)}"
    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        for stale in save_dir.glob(".tmp-step_*"):  # leftovers of a killed save
            shutil.rmtree(stale, ignore_errors=True)
        (tmp / "state").mkdir(parents=True)
        (tmp / "rng").mkdir()
    _barrier()
    with cuda_free_mode():
        state = _sharded_state(chunks, optimizer, is_loading=False)
        sharded_store.save(state, tmp / "state")
    _rng_save(tmp / "rng", rank)
    _barrier()
    if rank == 0:
        atomic_write_json(tmp / "trainer_state.json", dict(trainer_state, step=step))
        if _before_commit is not None:
            _before_commit(tmp)  # tests: simulate a kill between writing and committing
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            trash = save_dir / f".old-{final.name}"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(save_dir)
        atomic_write_text(save_dir / "latest", final.name + "\n")
        _prune(save_dir, keep_last)
        log.info("saved checkpoint %s", final)
    _barrier()
    return final


def _load_optimizer(optimizer, state) -> None:
    """`optimizer.load_state_dict` for our `fully_reshardable` format, done in its two parts.
    mcore 0.16.1 keeps torch Adam's per-param `step` out of the saved parameter state but then
    copies into *every* key of the live per-param state (KeyError 'step' without apex/TE's
    fused Adam, whose step lives in the param groups). The step itself is restored by the
    non-parameter part, so it is set aside while the parameter state is copied in. (torch Adam
    is the CPU path; GPUs with TE use its fused Adam, which never reaches this quirk.)"""
    from ovlt.engine.optimizer import inner_optimizers
    inner = inner_optimizers(optimizer)
    parts = [state] if len(inner) == 1 else [v for _, v in sorted(state.items())]
    for o, sd in zip(inner, parts):
        sd = dict(sd)
        param_state = sd.pop("param_state", None)
        kind = sd.pop("param_state_sharding_type", None)
        o.load_state_dict(sd)  # param groups, step, grad scaler
        if param_state is None:
            continue
        if kind != OPTIM_FORMAT["distrib_optim_sharding_type"]:
            raise ValueError(f"optimizer state of type {kind!r}; ovlt writes "
                             f"{OPTIM_FORMAT['distrib_optim_sharding_type']!r}")
        torch_state = o.optimizer.state
        steps = {p: st.pop("step") for p, st in torch_state.items() if "step" in st}
        try:
            o.load_parameter_state_from_fully_reshardable(param_state)
        finally:
            # mcore hands every param the *same* step tensor, which torch Adam would then
            # increment once per param per step: give each param its own copy.
            for p, st in steps.items():
                torch_state[p]["step"] = st.clone()


def read_trainer_state(path) -> dict:
    """The `trainer_state.json` of checkpoint `path` (CheckpointError naming the file when it
    is missing or not a JSON object with an integer step)."""
    ts_path = Path(path) / "trainer_state.json"
    if not ts_path.is_file():
        raise CheckpointError(f"{ts_path}: missing (not a complete ovlt checkpoint)")
    try:
        st = json.loads(ts_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{ts_path}: not valid JSON ({e})") from None
    if not isinstance(st, dict) or not isinstance(st.get("step"), int) or st["step"] < 0:
        raise CheckpointError(f"{ts_path}: expected a JSON object with a non-negative integer "
                              "'step'")
    return st


def load_checkpoint(path, chunks: list, optimizer, load_optimizer: bool = True,
                    load_rng: bool = True) -> dict:
    """Collective. Loads model (+ optimizer) state, resharding to the current TP/PP/DP as
    needed, restores this rank's RNG when the world size is unchanged, returns the trainer
    state dict. A missing, corrupt or foreign checkpoint is a CheckpointError naming the
    file."""
    path = Path(path)
    trainer_state = read_trainer_state(path)
    store = path / "state"
    if not store.is_dir():
        old = path / "dist" / ".metadata"
        if old.exists():
            raise CheckpointError(f"{old}: a torch DCP checkpoint, whose metadata is a pickle; "
                                  "ovlt does not load pickles (checkpoints are safetensors + "
                                  "JSON); start the run afresh or from an HF export")
        raise CheckpointError(f"{store}: missing (not a complete ovlt checkpoint)")
    with cuda_free_mode():
        if load_optimizer:
            state = _sharded_state(chunks, optimizer, is_loading=True)
        else:
            state = {"model": chunks[0].module.sharded_state_dict()}
        loaded = sharded_store.load(state, store)
        chunks[0].module.load_state_dict(loaded["model"], strict=True)
        if load_optimizer:
            _load_optimizer(optimizer, loaded["optimizer"])
    world = dist.get_world_size() if dist.is_initialized() else 1
    if load_rng:
        if trainer_state.get("world_size") == world and _rng_load(path / "rng", _rank()):
            pass
        else:
            log.warning("checkpoint %s was written by %s ranks, now %d: RNG streams are "
                        "re-seeded, not restored", path, trainer_state.get("world_size"), world)
    log.info("loaded checkpoint %s (step %s)", path, trainer_state.get("step"))
    return trainer_state
