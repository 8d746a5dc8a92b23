"""Activation recomputation changes memory, not math: two optimizer steps with
`train.recompute` = selective / full give the same losses and weights as without."""
import numpy as np

from tests.dist_utils import run_distributed
from tests.sft_testlib import make_synth


def _worker(rank, world, sft_file, mode):
    from tests.procs.test_checkpoint import _params, _setup, _step
    bundle, opt, batches = _setup(sft_file, recompute=mode)
    cfg = bundle.config
    flags = (cfg.recompute_granularity, sum(getattr(m, "checkpoint_core_attention", False)
                                            for m in bundle.module.modules()))
    losses = [_step(bundle, opt, batches[0]), _step(bundle, opt, batches[1]),
              _step(bundle, opt, batches[2], forward_only=True)]
    return losses, _params(bundle), flags


def test_recompute_same_math(tmp_path):
    sft_file = make_synth(tmp_path / "synth", n=16)
    ref_l, ref_p, ref_f = run_distributed(_worker, 1, sft_file, "none")[0]
    assert ref_f == (None, 0)
    for mode in ("selective", "full"):
        losses, p, f = run_distributed(_worker, 1, sft_file, mode)[0]
        assert f[0] == mode and (f[1] > 0 if mode == "selective" else True)
        assert losses == ref_l, mode  # recomputation replays the same fp32 ops
        for k in ref_p:
            assert np.array_equal(p[k], ref_p[k]), (mode, k)
