"""GRPO trainer invariants on the tiny Qwen2.5-VL (CPU, fp32, one gloo process).

References are independent of the trainer's fused path: plain-torch logits from the model's
own forward (`return_hidden=False`), `log_softmax`, and the PPO/GRPO formulas written out.
"""
import zlib

import pytest
import torch

from ovlt.config import CONFIG_ROOT, load_config
from ovlt.models.qwen2_5_vl.rope_index import rope_positions_fn


def hash_reward(response: str, ground_truth: str, **_) -> float:
    """A cheap reward for the mechanics tests: 1 for half of all strings (stable hash). The
    reward-rise evidence on a real task is tests/procs/test_grpo_reward_rise.py."""
    return float(zlib.crc32(response.encode()) % 2 == 0)


@pytest.fixture(scope="module")
def dist1():
    from ovlt.config import ParallelConfig
    from ovlt.distributed import destroy_distributed, init_distributed
    destroy_distributed()
    init_distributed(ParallelConfig(backend="gloo"), seed=1)
    yield
    destroy_distributed()


def synth_rl(tmp_path_factory, n: int, seed: int):
    """The parquet of `n` synthetic visual-math RL records (with images)."""
    from ovlt.data import synth
    out = tmp_path_factory.mktemp("synth")
    synth.generate(out, n=n, seed=seed)
    return out / "rl.parquet"


@pytest.fixture(scope="module")
def rl_file(tmp_path_factory):
    """A few synthetic visual-math RL records (with images)."""
    return synth_rl(tmp_path_factory, n=8, seed=3)


def _cfg(tmp_path, hf_dir, rl_file, *over):
    return load_config(CONFIG_ROOT / "grpo" / "tiny_cpu.yaml", [
        f"model.hf_path={hf_dir}", f"data.rl_files=[{rl_file}]",
        f"grpo.train.save_dir={tmp_path}/out", "grpo.optimizer.use_distributed_optimizer=false",
        "rollout.max_new_tokens=6", "grpo.overlong=none", "data.max_pixels=3136",
        "grpo.reward_fn=tests.unit.test_grpo_invariants:hash_reward", *over])


def _trainer(cfg):
    from ovlt.grpo.train import GRPOTrainer
    tr = GRPOTrainer(cfg)
    tr.setup(0)
    return tr


def _plain_logprobs(model, mb, temperature=1.0):
    """log p(target) from the model's full logits (no fused kernel)."""
    logits = model(input_ids=mb.input_ids, position_ids=mb.position_ids,
                   pixel_values=mb.pixel_values, image_grid_thw=mb.image_grid_thw,
                   packed_seq_params=mb.cu_seqlens)[0].float() / temperature
    tg = mb.targets[0]
    lp = logits.log_softmax(-1).gather(-1, tg.clamp(min=0)[:, None]).squeeze(-1)
    return torch.where(tg >= 0, lp, torch.zeros_like(lp))


def _rollout_batches(tr, n_prompts=2):
    """Sampled rollouts of the first prompts, advantages from the hash reward, packed."""
    from ovlt.rollout.base import SamplingParams
    from ovlt.grpo.batch import Rollout, pack_rollouts
    recs = tr.stream.records[0][:n_prompts]
    reqs = tr.build_requests(recs)
    comps = tr.engine.generate(reqs, SamplingParams(temperature=1.0, max_new_tokens=6, n=3, seed=0))
    g = torch.Generator().manual_seed(0)
    rolls = [Rollout(prompt_ids=q.prompt_ids, response_ids=c.token_ids, group=i,
                     pixel_values=q.pixel_values, image_grid_thw=q.image_grid_thw,
                     advantage=float(torch.randn(1, generator=g)))
             for i, (q, cs) in enumerate(zip(reqs, comps)) for c in cs]
    return rolls, pack_rollouts(rolls, 100000, rope_positions_fn(tr.cfg.model))  # one bin: engine order


def test_first_update_ratio_one_and_kl_zero(dist1, tiny_hf_dir, rl_file, tmp_path):
    """Step 1: every token's PPO ratio is 1 (approx KL = mean 0.5 (logp - old)^2 = 0) and the
    KL to the reference (= the policy) is 0; step 2 (after an update) has KL > 0."""
    cfg = _cfg(tmp_path, tiny_hf_dir, rl_file, "grpo.kl_coef=0.0", "grpo.track_kl=true",
               "grpo.ref_mode=swap", "grpo.filter_zero_advantage=false",
               "grpo.train.global_batch_size=4", "grpo.prompts_per_step=2",
               "grpo.samples_per_prompt=4")
    from ovlt.grpo.data import PromptPosition
    tr = _trainer(cfg)
    rec, pos, rollouts = tr.step(0, PromptPosition())
    assert rec["updates"] == 2 and rec["samples"] == 8
    assert rec["first_update_approx_kl"] < 1e-12
    assert abs(rec["first_update_ppo_kl"]) < 1e-7
    assert rec["first_update_clip_frac"] == 0.0
    assert rec["kl"] == 0.0
    assert rec["grad_norm"] > 0
    # the step's own check of that invariant: its samples' engine log-probs vs the trainer's
    assert rec["engine_logprob_diff_max"] < 1e-4
    assert 0.0 <= rec["engine_logprob_diff_mean"] <= rec["engine_logprob_diff_max"]
    # Engine log-probs equal the trainer's recomputation (the invariant the ratio relies on),
    # with the current (already updated) weights on fresh samples.
    from ovlt.grpo.passes import logprob_pass
    rolls, mbs = _rollout_batches(tr)
    logprob_pass(tr.bundle.chunks, mbs, "old_logprobs", 1.0, torch.device("cpu"))
    from ovlt.rollout.base import SamplingParams
    reqs = tr.build_requests(tr.stream.records[0][:2])
    outs = tr.engine.generate(reqs, SamplingParams(temperature=1.0, max_new_tokens=6, n=3, seed=0))
    eng = torch.tensor([lp for o in outs for c in o for lp in c.logprobs])
    got = torch.cat([mb.old_logprobs[0][mb.loss_mask[0] > 0] for mb in mbs])
    assert eng.numel() == got.numel()
    assert (eng - got).abs().max().item() < 1e-4
    rec2, _, _ = tr.step(1, pos)
    assert rec2["kl"] > 1e-6
    tr.pool.close()


def test_kl_and_loss_match_plain_torch(dist1, tiny_hf_dir, rl_file, tmp_path):
    """Perturbed policy: the KL metric equals plain-torch k3; the update's loss and gradients
    equal a plain-torch GRPO loss (PPO clip 0.2/0.3, dual clip 3, low-var KL 0.01)."""
    from ovlt.grpo.passes import kl_to_reference, logprob_pass, update
    cfg = _cfg(tmp_path, tiny_hf_dir, rl_file, "grpo.kl_coef=0.01", "grpo.ref_mode=swap",
               "grpo.optimizer.lr=0.0", "grpo.optimizer.clip_grad=0.0")
    tr = _trainer(cfg)
    model = tr.bundle.module
    rolls, mbs = _rollout_batches(tr)
    cpu = torch.device("cpu")
    with tr.ref.weights_in(tr.bundle.chunks) as rc:
        logprob_pass(rc, mbs, "ref_logprobs", 1.0, cpu)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # perturb the policy's LLM weights
        for n, p in model.named_parameters():
            if n.startswith("language_model.") and p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g) * p.abs().mean())
    logprob_pass(tr.bundle.chunks, mbs, "old_logprobs", 1.0, cpu)
    with torch.no_grad():
        plain = [_plain_logprobs(model, mb) for mb in mbs]
    masks = [mb.loss_mask[0] for mb in mbs]
    for lp, mb in zip(plain, mbs):
        assert (lp - mb.old_logprobs[0]).abs().max().item() < 1e-4
    refs = [mb.ref_logprobs[0] for mb in mbs]
    d = torch.cat([(r - lp)[m > 0] for r, lp, m in zip(refs, plain, masks)]).double()
    k3 = (torch.exp(d) - d - 1).mean().item()
    s, n = kl_to_reference(mbs)
    assert k3 > 1e-5 and abs(s / n - k3) < 1e-6 * max(1.0, k3) + 1e-9

    # Old log-probs off the current policy (as after earlier updates) so clipping engages.
    for mb in mbs:
        mb.old_logprobs = mb.old_logprobs + 0.4 * torch.randn(mb.old_logprobs.shape, generator=g)
    res = update(tr.bundle.chunks, tr.optimizer, mbs, cfg.grpo, 1.0, cpu)
    params = [p for p in model.parameters() if p.requires_grad]
    fused_grads = [p.main_grad.clone() for p in params]

    tot, cnt = 0.0, 0.0
    for mb, m in zip(mbs, masks):
        logp = _plain_logprobs(model, mb)
        old, ref, adv = mb.old_logprobs[0], mb.ref_logprobs[0], mb.advantages[0]
        ratio = torch.exp(logp - old)
        pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.3))
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * 3.0), pg)
        dr = ref - logp
        kl = (torch.exp(dr) - dr - 1).clamp(-10, 10)
        tot = tot + ((pg + 0.01 * kl) * m).sum()
        cnt += float(m.sum())
    loss = tot / cnt
    grads = torch.autograd.grad(loss, params)
    assert abs(res.loss - loss.item()) < 1e-5
    assert res.stats["clip_frac"] > 0.05  # clipping really engaged
    for gp, gf in zip(grads, fused_grads):
        assert torch.allclose(gp.float(), gf.float(), atol=2e-5, rtol=1e-3)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    tr.pool.close()


def test_curriculum_freezes_vision_in_first_stage_only(dist1, tiny_hf_dir, rl_file, tmp_path):
    """Two stages (medium: vision frozen, hard: vision trained), one step each, through the
    trainer's own loop: the vision tower is unchanged after stage 1 and changed after stage 2;
    the merger (train.freeze) never changes; outputs for the iterate loop exist."""
    from ovlt.grpo import train as grpo_mod
    stages = (f"grpo.curriculum=[{{name: medium, rl_files: [{rl_file}], epochs: 1.0, "
              f"freeze_vision: true}}, {{name: hard, rl_files: [{rl_file}], epochs: 1.0, "
              f"freeze_vision: false}}]")
    cfg = _cfg(tmp_path, tiny_hf_dir, rl_file, stages, "grpo.kl_coef=0.0",
               "grpo.prompts_per_step=8", "grpo.samples_per_prompt=2",
               "grpo.train.global_batch_size=16", "grpo.optimizer.lr=0.01",
               "grpo.filter_zero_advantage=false", "grpo.train.max_steps=0")
    snaps = []  # vision weights before step 0, after step 0, after step 1
    orig = grpo_mod.GRPOTrainer.step

    def vision(self):
        return {k: v.detach().clone() for k, v in self.bundle.module.state_dict().items()
                if k.startswith("vision_model.") and not k.endswith("_extra_state")}

    def step(self, i, pos):
        if not snaps:
            snaps.append(vision(self))
        out = orig(self, i, pos)
        snaps.append(vision(self))
        return out

    grpo_mod.GRPOTrainer.step = step
    try:
        tr = grpo_mod.GRPOTrainer(cfg)
        assert tr.total_steps == 2
        summary = tr.run()
    finally:
        grpo_mod.GRPOTrainer.step = orig
    init, snaps = snaps[0], snaps[1:]
    blocks = [k for k in init if k.startswith("vision_model.decoder.")]
    merger = [k for k in init if k.startswith("vision_model.merger.")]
    assert blocks and merger
    assert all(torch.equal(snaps[0][k], init[k]) for k in init)           # stage 1: frozen
    assert any(not torch.equal(snaps[1][k], init[k]) for k in blocks)     # stage 2: trained
    assert all(torch.equal(snaps[1][k], init[k]) for k in merger)         # merger: frozen
    from ovlt.utils.io import read_jsonl
    recs = read_jsonl(tmp_path / "out" / "metrics.jsonl")
    assert [r["stage"] for r in recs] == ["medium", "hard"]
    assert (tmp_path / "out" / "final_hf" / "config.json").is_file() and summary["steps"] == 2


def test_frozen_tower_encodes_each_prompt_once(dist1, tiny_hf_dir, rl_file, tmp_path):
    """`StepImages`: over micro-batches that split a prompt's samples, the frozen tower encodes
    each prompt's images once per set of weights, the step's prompts in one tower call (one per
    prompt under a patch budget smaller than an image), and the log-probs equal the pass that
    runs the tower inside every micro-batch; a trainable tower is never served from it."""
    import dataclasses

    from ovlt.grpo.batch import pack_rollouts
    from ovlt.grpo.image_features import StepImages
    from ovlt.grpo.passes import logprob_pass
    tr = _trainer(_cfg(tmp_path, tiny_hf_dir, rl_file, "grpo.kl_coef=0.0"))
    rolls, _ = _rollout_batches(tr, n_prompts=2)
    budget = max(r.length for r in rolls) + 1  # about one sample per micro-batch
    mbs = pack_rollouts(rolls, budget, rope_positions_fn(tr.cfg.model))
    assert len(mbs) >= 4 and all(len(mb.image_groups) >= 1 for mb in mbs)
    tower = tr.bundle.module.vision_model
    images_seen = []
    hook = tower.register_forward_hook(lambda m, a, o: images_seen.append(len(a[1])))
    cpu = torch.device("cpu")
    try:
        logprob_pass(tr.bundle.chunks, mbs, "old_logprobs", 1.0, cpu)
        per_mb = sum(images_seen)
        images_seen.clear()
        cached = [dataclasses.replace(mb, pixel_values=None) for mb in mbs]
        imgs = StepImages(rolls)
        logprob_pass(tr.bundle.chunks, cached, "old_logprobs", 1.0, cpu, imgs)
        one_per_call = [dataclasses.replace(mb) for mb in cached]
        small = StepImages(rolls, patch_budget=1)
        logprob_pass(tr.bundle.chunks, one_per_call, "old_logprobs", 1.0, cpu, small)
    finally:
        hook.remove()
    assert per_mb == len(rolls) and imgs.encoded == 2 and sum(images_seen) == 4
    assert imgs.tower_calls == 1 and small.tower_calls == 2 and small.encoded == 2
    for a, b, c in zip(mbs, cached, one_per_call):
        assert torch.allclose(a.old_logprobs, b.old_logprobs, atol=1e-5)
        assert torch.allclose(a.old_logprobs, c.old_logprobs, atol=1e-5)
    for p in tower.parameters():
        p.requires_grad_(True)
    try:
        assert StepImages(rolls).features(tr.bundle.module, mbs[0].image_groups) is None
    finally:
        for p in tower.parameters():
            p.requires_grad_(False)
    tr.pool.close()


def test_offload_reference_equals_memory_and_leaves_the_device(dist1, tiny_hf_dir, rl_file, tmp_path):
    """ref_mode=offload: the reference's weights sit in host memory except during its pass
    (no device storage after a step, the host copy's values during it), and two steps give
    the KL, loss and gradient norm of ref_mode=memory (the same second model, kept on the
    device); the KL is nonzero once an update has moved the policy."""
    from ovlt.grpo.data import PromptPosition
    over = ("grpo.kl_coef=0.01", "grpo.prompts_per_step=2", "grpo.samples_per_prompt=4",
            "grpo.train.global_batch_size=4", "grpo.filter_zero_advantage=false",
            "grpo.optimizer.lr=0.01")
    recs = {}
    for mode in ("memory", "offload"):
        torch.manual_seed(0)
        tr = _trainer(_cfg(tmp_path / mode, tiny_hf_dir, rl_file, f"grpo.ref_mode={mode}", *over))
        ref_params = list(tr.ref.model.parameters())
        if mode == "offload":
            assert not tr.ref.on_device
            assert all(p.untyped_storage().size() == 0 for p in ref_params)
            with tr.ref.weights_in(tr.bundle.chunks) as chunks:
                assert chunks == [tr.ref.model]
                assert all(torch.equal(p, h) for p, h in tr.ref.host)
                assert all(torch.equal(p, q) for p, q in
                           zip(ref_params, tr.bundle.module.parameters()))  # = the initial policy
            assert all(p.untyped_storage().size() == 0 for p in ref_params)
        pos, got = PromptPosition(), []
        for i in range(2):
            rec, pos, _ = tr.step(i, pos)
            got.append(rec)
            if mode == "offload":
                assert all(p.untyped_storage().size() == 0 for p in ref_params)
        recs[mode] = got
        tr.pool.close()
    for a, b in zip(recs["memory"], recs["offload"]):
        for k in ("kl", "loss", "grad_norm", "reward_mean"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), (k, a[k], b[k])
    assert recs["offload"][0]["kl"] == 0.0 and recs["offload"][1]["kl"] > 1e-6
