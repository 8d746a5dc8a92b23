"""Checkpoints: bit-exact resume (6 steps == 3 + save + resume + 3, through the launcher),
atomic commit (a kill between writing and committing leaves the previous checkpoint loadable,
and resuming from it reproduces the killed run's next step bit for bit), keep-last-K, and
resharding (saved at TP=2, loaded at TP=1: same losses before and after one more step)."""
import itertools
import multiprocessing as mp
import os

import numpy as np
import pytest
import torch

from tests.sft_testlib import (TINY_SFT, base_overrides, hf_tensors, losses, make_synth,
                               run_sft)


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    return make_synth(tmp_path_factory.mktemp("ckpt_synth"), n=16)


# ----------------------------------------------------------------------- building blocks
def _setup(sft_file, tp=1, world=1, recompute="none"):
    from ovlt.config import load_config
    from ovlt.distributed import init_distributed
    from ovlt.engine.model_setup import build_vl_model, wrap_model
    from ovlt.engine.optimizer import build_optimizer
    from ovlt.sft.data import Position, SFTStream, build_sft_dataset
    from megatron.core import parallel_state as ps

    cfg = load_config(TINY_SFT, base_overrides(sft_file, "/nonexistent",
                                               **{"parallel.tensor_parallel": tp,
                                                  "sft.train.recompute": recompute}),
                      world_size=world)
    init_distributed(cfg.parallel, seed=7)
    bundle = wrap_model(build_vl_model(cfg, "fp32"), cfg.sft.train)
    opt = build_optimizer(bundle.chunks, cfg.sft.optimizer, "fp32")
    stream = SFTStream(build_sft_dataset(cfg.data), 4, 512, ps.get_data_parallel_rank(),
                       ps.get_data_parallel_world_size(), seed=0, num_workers=0)
    batches = [mbs for _, mbs in itertools.islice(stream.iterate(Position()), 4)]
    return bundle, opt, batches


def _step(bundle, opt, mbs, forward_only=False):
    from ovlt.sft.train import sft_forward, sft_loss
    from ovlt.engine.train_step import train_step
    return train_step(bundle.chunks, opt, mbs, sft_forward, sft_loss,
                      forward_only=forward_only).loss


def _params(bundle):
    """Weights as numpy arrays: pickled by value across processes (torch tensors would travel
    as shared-memory handles that die with the worker)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in bundle.module.state_dict().items()
            if not k.endswith("_extra_state")}


def _killed_child(sft_file, save_dir, queue):
    # Same thread count as the resume worker (run_distributed uses 1): CPU matmul reduction
    # order, hence the bits, depends on it. torch is already imported here, so set it directly.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    from ovlt.engine.checkpoint import save_checkpoint
    bundle, opt, batches = _setup(sft_file)
    _step(bundle, opt, batches[0])
    save_checkpoint(save_dir, 1, bundle.chunks, opt, {"world_size": 1}, keep_last=5)
    _step(bundle, opt, batches[1])
    queue.put(_params(bundle))  # what step 2 produced
    save_checkpoint(save_dir, 2, bundle.chunks, opt, {"world_size": 1}, keep_last=5,
                    _before_commit=lambda tmp: os._exit(3))  # killed mid-save


def _resume_worker(rank, world, sft_file, save_dir):
    from ovlt.engine.checkpoint import (find_latest, list_checkpoints, load_checkpoint,
                                          save_checkpoint)
    bundle, opt, batches = _setup(sft_file)
    latest = find_latest(save_dir)
    st = load_checkpoint(latest, bundle.chunks, opt)
    _step(bundle, opt, batches[1])
    after = _params(bundle)
    for s in (2, 3, 4):
        save_checkpoint(save_dir, s, bundle.chunks, opt, {"world_size": 1}, keep_last=2)
    kept = [p.name for p in list_checkpoints(save_dir)]
    return latest.name, st["step"], after, kept, sorted(os.listdir(save_dir))


def test_kill_during_save_keeps_last_good_and_resume_is_exact(sft_file, tmp_path):
    from tests.dist_utils import run_distributed
    save = tmp_path / "ckpt"
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_killed_child, args=(sft_file, save, q))
    p.start()
    expected = q.get(timeout=600)
    p.join(timeout=600)
    assert p.exitcode == 3
    assert (save / ".tmp-step_0000002").is_dir()       # the torn save is still there...
    assert (save / "latest").read_text().strip() == "step_0000001"  # ...but not committed
    latest, step, after, kept, listing = run_distributed(_resume_worker, 1, sft_file, save)[0]
    assert latest == "step_0000001" and step == 1
    assert after.keys() == expected.keys()
    for k in expected:  # resume from step 1 + the same batch == the killed run's step 2
        assert np.array_equal(after[k], expected[k]), k
    assert kept == ["step_0000003", "step_0000004"]      # keep_last=2
    assert not any(n.startswith(".tmp-") for n in listing)  # stale tmp cleaned up
    assert (save / "latest").read_text().strip() == "step_0000004"


# ----------------------------------------------------------------------- launcher resume
def test_resume_through_launcher_is_bit_exact(sft_file, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_sft(1, base_overrides(sft_file, a, **{"sft.train.max_steps": 6}))
    run_sft(1, base_overrides(sft_file, b, **{"sft.train.max_steps": 6,
                                              "sft.train.exit_interval": 3}))
    assert losses(b) == losses(a)[:3] and not (b / "final_hf").exists()
    run_sft(1, base_overrides(sft_file, b, **{"sft.train.max_steps": 6}))  # resumes at 3
    assert losses(b) == losses(a)  # steps 4-6 identical to the uninterrupted run
    ta, tb = hf_tensors(a / "final_hf"), hf_tensors(b / "final_hf")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


# ----------------------------------------------------------------------- resharding
def _reshard_save(rank, world, sft_file, save_dir):
    from ovlt.engine.checkpoint import save_checkpoint
    bundle, opt, batches = _setup(sft_file, tp=2, world=2)
    _step(bundle, opt, batches[0])
    save_checkpoint(save_dir, 1, bundle.chunks, opt, {"world_size": 2}, keep_last=2)
    fwd = _step(bundle, opt, batches[1], forward_only=True)
    _step(bundle, opt, batches[1])
    return fwd, _step(bundle, opt, batches[2], forward_only=True)


def _reshard_load(rank, world, sft_file, save_dir):
    from ovlt.engine.checkpoint import find_latest, load_checkpoint
    bundle, opt, batches = _setup(sft_file, tp=1, world=1)
    load_checkpoint(find_latest(save_dir), bundle.chunks, opt)
    fwd = _step(bundle, opt, batches[1], forward_only=True)
    _step(bundle, opt, batches[1])
    return fwd, _step(bundle, opt, batches[2], forward_only=True)


@pytest.mark.slow
def test_save_tp2_load_tp1(sft_file, tmp_path):
    from tests.dist_utils import run_distributed
    save = tmp_path / "ckpt"
    tp2 = run_distributed(_reshard_save, 2, sft_file, save)[0]
    tp1 = run_distributed(_reshard_load, 1, sft_file, save)[0]
    # Same weights after load (first loss) and same Adam state (loss after one more step).
    assert tp1[0] == pytest.approx(tp2[0], rel=1e-5, abs=1e-5)
    assert tp1[1] == pytest.approx(tp2[1], rel=1e-5, abs=1e-5)
