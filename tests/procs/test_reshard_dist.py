"""Resharding across processes (gloo, CPU): mcore TP=2 x PP=2 shards -> full HF tensors -> vLLM."""
from __future__ import annotations

import datetime
import time

import pytest
import torch

from tests.dist_utils import run_distributed

pytestmark = pytest.mark.slow
BUCKET_MB = 0.25


def _init(rank, world_size, tp, timeout_s=120):
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    pp = world_size // tp
    # megatron-core order: TP ranks adjacent (rank = tp_rank + tp * pp_rank)
    tp_groups = [dist.new_group([s * tp + t for t in range(tp)]) for s in range(pp)]
    pp_groups = [dist.new_group([s * tp + t for s in range(pp)]) for t in range(tp)]
    from ovlt.rollout.reshard import ReshardGroups
    return ReshardGroups.from_groups(tp_groups[rank // tp], pp_groups[rank % tp])


def _reshard_worker(rank, world_size, hf_dir):
    import torch.distributed as dist
    from ovlt.models.qwen2_5_vl import state_dict_adapter as sda
    from ovlt.models.qwen2_5_vl.checkpoint_io import HFCheckpointReader
    from ovlt.models.qwen2_5_vl.hf_config import from_hf_config
    from ovlt.rollout.reshard import iter_hf_weight_buckets, vllm_rank_state

    g = _init(rank, world_size, tp=2)
    cfg = from_hf_config(hf_dir)
    hf = HFCheckpointReader(hf_dir)
    local = sda.hf_to_mcore(hf, cfg, g.tp_rank, g.tp_size, g.pp_rank, g.pp_size)
    names, bucket_bytes, got = [], [], {}
    for bucket in iter_hf_weight_buckets(local, cfg, g, bucket_mb=BUCKET_MB, timeout_s=120):
        bucket_bytes.append((len(bucket), sum(t.numel() * t.element_size() for _, t in bucket)))
        for n, t in bucket:
            names.append(n)
            got[n] = t.clone()
    mismatched = [n for n in hf if n not in got or got[n].dtype != hf[n].dtype
                  or got[n].shape != hf[n].shape or not torch.equal(got[n], hf[n])]
    extra = sorted(set(got) - set(hf))
    # vLLM TP=2 shards of this rank's tp_rank, checked against plain slicing of the HF tensors
    st = vllm_rank_state(got.items(), cfg, g.tp_rank, 2)
    r = g.tp_rank
    ch = lambda n, dim=0: hf[n].chunk(2, dim=dim)[r]  # noqa: E731
    a, m, vb = "model.layers.3.self_attn.", "model.layers.3.mlp.", "visual.blocks.2."
    expect = {
        "language_model.model.layers.3.self_attn.qkv_proj.weight":
            torch.cat([ch(a + "q_proj.weight"), ch(a + "k_proj.weight"), ch(a + "v_proj.weight")]),
        "language_model.model.layers.3.self_attn.qkv_proj.bias":
            torch.cat([ch(a + "q_proj.bias"), ch(a + "k_proj.bias"), ch(a + "v_proj.bias")]),
        "language_model.model.layers.3.self_attn.o_proj.weight": ch(a + "o_proj.weight", 1),
        "language_model.model.layers.3.mlp.gate_up_proj.weight":
            torch.cat([ch(m + "gate_proj.weight"), ch(m + "up_proj.weight")]),
        "language_model.model.layers.3.mlp.down_proj.weight": ch(m + "down_proj.weight", 1),
        "language_model.model.embed_tokens.weight": ch("model.embed_tokens.weight"),  # 151936 % 128 == 0
        "language_model.model.norm.weight": hf["model.norm.weight"],
        vb + "attn.qkv.weight": torch.cat(
            [p.chunk(2)[r] for p in hf[vb + "attn.qkv.weight"].chunk(3)]),
        vb + "attn.proj.weight": ch(vb + "attn.proj.weight", 1),
        vb + "attn.proj.bias": hf[vb + "attn.proj.bias"],
        vb + "mlp.gate_up_proj.bias": torch.cat([ch(vb + "mlp.gate_proj.bias"), ch(vb + "mlp.up_proj.bias")]),
        "visual.merger.mlp.0.weight": ch("visual.merger.mlp.0.weight"),
        "visual.merger.mlp.2.weight": ch("visual.merger.mlp.2.weight", 1),
        "visual.merger.mlp.2.bias": hf["visual.merger.mlp.2.bias"],
    }
    vllm_bad = [k for k, v in expect.items() if not torch.equal(st[k], v)]
    dist.destroy_process_group()
    return {"names": names, "buckets": bucket_bytes, "mismatched": mismatched, "extra": extra,
            "n": len(got), "vllm_bad": vllm_bad, "vllm_n": len(st)}


def test_tp2_pp2_to_full_hf_and_vllm_tp2(tiny_hf_dir):
    from ovlt.models.qwen2_5_vl.checkpoint_io import HFCheckpointReader
    res = run_distributed(_reshard_worker, 4, str(tiny_hf_dir), timeout=600)
    n_hf = len(HFCheckpointReader(tiny_hf_dir))
    limit = BUCKET_MB * 2 ** 20
    for r, out in enumerate(res):
        assert out["mismatched"] == [] and out["extra"] == [], (r, out["mismatched"][:3], out["extra"][:3])
        assert out["n"] == n_hf == 104
        assert out["names"] == res[0]["names"]  # same order on every rank
        assert out["vllm_bad"] == [], (r, out["vllm_bad"])
        assert len(out["buckets"]) > 4  # really bucketed
        for count, nbytes in out["buckets"]:
            assert count == 1 or nbytes <= limit  # only a lone oversized tensor may exceed it
    assert any(nbytes > limit for _, nbytes in res[0]["buckets"])  # the embedding, alone


def _timeout_worker(rank, world_size):
    g = _init(rank, world_size, tp=2, timeout_s=60)
    from ovlt.config import CONFIG_ROOT, load_config
    from ovlt.models.qwen2_5_vl import state_dict_adapter as sda
    from ovlt.rollout.reshard import iter_hf_weight_buckets

    cfg = load_config(CONFIG_ROOT / "model" / "tiny.yaml").model
    cfg.vocab_size = 256
    hf = {n: torch.zeros(s) for n, s in sda.hf_shapes(cfg).items()}
    local = sda.hf_to_mcore(hf, cfg, g.tp_rank, 2, 0, 1)
    if rank == 1:  # never joins the collective
        time.sleep(8)
        return "skipped"
    for _ in iter_hf_weight_buckets(local, cfg, g, timeout_s=2):
        pass
    return "finished"


def test_collective_timeout_is_rank_tagged():
    with pytest.raises(RuntimeError, match=r"\[rank 0 tp 0/2 pp 0/1\] reshard: all_gather of "
                                           r"vision_model\.\S+ on the TP group"):
        run_distributed(_timeout_worker, 2, timeout=120)
