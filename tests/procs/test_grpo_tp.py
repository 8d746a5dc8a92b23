"""TP=2 (gloo, 2 processes) gives the same GRPO loss, KL and built-in-engine greedy tokens as
TP=1 on the same fixed rollouts of the tiny model."""
import pytest
import torch

from tests.dist_utils import run_distributed


def _worker(rank, world, hf_dir, rl, out):
    from ovlt.config import ParallelConfig
    from ovlt.distributed import destroy_distributed, init_distributed
    from ovlt.rollout.base import SamplingParams
    from ovlt.grpo.batch import Rollout, pack_rollouts
    from ovlt.grpo.passes import kl_to_reference, logprob_pass, update
    from ovlt.models.qwen2_5_vl.rope_index import rope_positions_fn
    from tests.unit.test_grpo_invariants import _cfg, _trainer
    init_distributed(ParallelConfig(tensor_parallel=world, backend="gloo"), seed=1)
    try:
        cfg = _cfg(out, hf_dir, rl, f"parallel.tensor_parallel={world}", "grpo.kl_coef=0.01",
                   "grpo.ref_mode=swap", "grpo.optimizer.lr=0.0", "grpo.optimizer.clip_grad=0.0")
        tr = _trainer(cfg)
        reqs = tr.build_requests(tr.stream.records[0][:2])
        greedy = tr.engine.generate(reqs, SamplingParams(temperature=0.0, max_new_tokens=5))
        g = torch.Generator().manual_seed(0)
        rolls = [Rollout(prompt_ids=q.prompt_ids, group=i, pixel_values=q.pixel_values,
                         image_grid_thw=q.image_grid_thw,
                         response_ids=torch.randint(0, 150000, (5,), generator=g).tolist(),
                         advantage=float(torch.randn(1, generator=g)))
                 for i, q in enumerate(reqs) for _ in range(3)]
        mbs = pack_rollouts(rolls, 100000, rope_positions_fn(tr.cfg.model))
        cpu = torch.device("cpu")
        with tr.ref.weights_in(tr.bundle.chunks) as rc:
            logprob_pass(rc, mbs, "ref_logprobs", 1.0, cpu)
        with torch.no_grad():  # a policy away from the reference, the same on every rank
            for n, p in tr.bundle.module.named_parameters():
                if n.endswith("final_layernorm.weight"):
                    p.mul_(1.3)
        logprob_pass(tr.bundle.chunks, mbs, "old_logprobs", 1.0, cpu)
        kl = kl_to_reference(mbs)
        for mb in mbs:
            mb.old_logprobs = mb.old_logprobs + 0.3 * torch.randn(mb.old_logprobs.shape, generator=g)
        res = update(tr.bundle.chunks, tr.optimizer, mbs, cfg.grpo, 1.0, cpu)
        tr.pool.close()
        return {"loss": res.loss, "kl": float(kl[0]) / kl[1], "clip": res.stats["clip_frac"],
                "greedy": [o[0].token_ids for o in greedy]}
    finally:
        destroy_distributed()


@pytest.mark.slow
def test_tp2_matches_tp1(tiny_hf_dir, tmp_path):
    from ovlt.data import synth
    synth.generate(tmp_path / "synth", n=4, seed=5)
    rl = tmp_path / "synth" / "rl.parquet"
    one = run_distributed(_worker, 1, str(tiny_hf_dir), str(rl), str(tmp_path / "o1"))[0]
    two = run_distributed(_worker, 2, str(tiny_hf_dir), str(rl), str(tmp_path / "o2"))
    assert two[0] == two[1] or abs(two[0]["loss"] - two[1]["loss"]) < 1e-7
    assert one["clip"] > 0 and one["kl"] > 1e-6
    assert abs(two[0]["loss"] - one["loss"]) < 1e-5
    assert abs(two[0]["kl"] - one["kl"]) < 1e-6
    assert two[0]["greedy"] == one["greedy"]
