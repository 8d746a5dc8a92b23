"""Contract between the adapter and the real mcore model at TP=2 x PP=2 (gloo, CPU).

Each rank builds `provider.build_model` for its stage; the adapter's rank-local state dict must
have exactly the model's parameter names and shapes, load strictly, and the reshard path fed
with the *model's own* `state_dict()` (mcore parallel_state groups) must give back every HF
tensor bit-exactly.
"""
from __future__ import annotations

import pytest

from tests.dist_utils import run_distributed

pytestmark = pytest.mark.slow


def _worker(rank, world_size, hf_dir):
    import torch
    from ovlt.config import CONFIG_ROOT, ParallelConfig, load_config
    from ovlt.distributed import destroy_distributed, init_distributed
    from ovlt.models.qwen2_5_vl import state_dict_adapter as sda
    from ovlt.models.qwen2_5_vl.checkpoint_io import HFCheckpointReader
    from ovlt.models.qwen2_5_vl.provider import build_model, load_mcore_state_dict
    from ovlt.rollout.reshard import ReshardGroups, iter_hf_weight_buckets

    info = init_distributed(ParallelConfig(tensor_parallel=2, pipeline_parallel=2, timeout_minutes=3))
    try:
        cfg = load_config(CONFIG_ROOT / "model" / "tiny.yaml").model
        model = build_model(cfg)
        g = ReshardGroups.from_parallel_state()
        hf = HFCheckpointReader(hf_dir)
        local = sda.hf_to_mcore(hf, cfg, g.tp_rank, 2, g.pp_rank, 2)
        own = {k: tuple(v.shape) for k, v in model.state_dict().items()
               if not k.endswith("._extra_state")}
        mine = {k: tuple(v.shape) for k, v in local.items()}
        diff = {"model_only": sorted(set(own) - set(mine)), "adapter_only": sorted(set(mine) - set(own)),
                "shape": sorted(k for k in own if k in mine and own[k] != mine[k])}
        load_mcore_state_dict(model, local, strict=True)
        got = {}
        for bucket in iter_hf_weight_buckets(model.state_dict(), cfg, g, bucket_mb=1, timeout_s=120):
            got.update((n, t.clone()) for n, t in bucket)
        bad = [n for n in hf if n not in got or not torch.equal(got[n], hf[n])]
        return {"diff": diff, "bad": bad, "n": len(got), "stage": (info.rank, g.tp_rank, g.pp_rank)}
    finally:
        destroy_distributed()


def test_adapter_names_shapes_and_reshard_match_built_model(tiny_hf_dir):
    res = run_distributed(_worker, 4, str(tiny_hf_dir), timeout=600)
    for r, out in enumerate(res):
        assert out["diff"] == {"model_only": [], "adapter_only": [], "shape": []}, (r, out["diff"])
        assert out["bad"] == [] and out["n"] == 104, (r, out["bad"][:5])
