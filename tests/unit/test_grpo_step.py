"""The GRPO step as a whole on the tiny Qwen2.5-VL (CPU, fp32, one gloo process): nothing a step
creates outlives it, rewards streamed from the engine equal batch-scored ones, the first
update's skipped old-log-prob pass changes neither loss nor gradients, the forward-only passes
run no torch.compile'd fusion, and model.fp8 puts FP8 GEMMs into the update."""
import gc
import threading
import time
import weakref
from types import SimpleNamespace

import pytest
import torch

from tests.unit import test_grpo_invariants as invariants
from tests.unit.test_grpo_invariants import _rollout_batches, synth_rl

dist1 = invariants.dist1  # the one gloo process, a module-scoped fixture


@pytest.fixture(scope="module")
def rl_file(tmp_path_factory):
    return synth_rl(tmp_path_factory, n=12, seed=5)


def _cfg(tmp_path, hf_dir, rl_file, *over):
    return invariants._cfg(tmp_path, hf_dir, rl_file, "grpo.filter_zero_advantage=false",
                           "grpo.prompts_per_step=2", "grpo.samples_per_prompt=3", *over)


@pytest.fixture(scope="module")
def trainer(dist1, tiny_hf_dir, rl_file, tmp_path_factory):
    """Two updates per step (6 samples, 3 per update), KL 0.01 against a swapped reference."""
    from ovlt.grpo.train import GRPOTrainer
    cfg = _cfg(tmp_path_factory.mktemp("grpo"), tiny_hf_dir, rl_file, "grpo.kl_coef=0.01",
               "grpo.ref_mode=swap", "grpo.train.global_batch_size=3")
    tr = GRPOTrainer(cfg)
    tr.setup(0)
    yield tr
    tr.pool.close()


def _live_tensor_storage() -> tuple[int, int]:
    """(number, bytes) of the distinct tensor storages Python objects hold right now."""
    gc.collect()
    seen = {}
    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor) and not o.is_meta:
                st = o.untyped_storage()
                seen[(st.data_ptr(), st.nbytes())] = st.nbytes()
        except Exception:  # noqa: BLE001 - a half-built object in gc's list
            pass
    return len(seen), sum(seen.values())


def test_step_leaves_nothing_behind_and_streams_rewards(trainer, monkeypatch):
    """Weak references to what a step creates (its micro-batches and their log-prob tensors,
    its completions, its reward stream) are dead once step() has returned and its result is
    dropped; the live tensor storage after step 2 equals that after step 3 (step 1 creates the
    optimizer's moments); the grad buffers are released between steps. The step's rewards came
    through the stream and equal the batch grading of its rollouts; the old-log-prob pass ran
    on the second update's micro-batches only."""
    from ovlt.grpo import train as grpo_mod
    from ovlt.grpo.advantages import score
    from ovlt.grpo.data import PromptPosition
    from ovlt.grpo.memory import grads_released

    refs, old_pass = [], []
    real_pack, real_lp = grpo_mod.pack_rollouts, grpo_mod.queue_logprob_pass

    def pack(*a, **k):
        mbs = real_pack(*a, **k)
        refs.extend(weakref.ref(mb) for mb in mbs)
        refs.extend(weakref.ref(mb.input_ids) for mb in mbs)
        return mbs

    def lp(chunks, mbs, field, *a, **k):
        out = real_lp(chunks, mbs, field, *a, **k)
        refs.extend(weakref.ref(getattr(mb, field)) for mb in mbs)
        if field == "old_logprobs":
            old_pass.append([mb.num_tokens for mb in mbs])
        return out

    real_gen = trainer.engine.generate

    def gen(reqs, sp, on_complete=None):
        out = real_gen(reqs, sp, on_complete=on_complete)
        refs.extend(weakref.ref(c) for cs in out for c in cs)
        return out

    real_stream = grpo_mod.RewardStream

    def stream(*a, **k):
        s = real_stream(*a, **k)
        refs.append(weakref.ref(s))
        return s

    monkeypatch.setattr(grpo_mod, "pack_rollouts", pack)
    monkeypatch.setattr(grpo_mod, "queue_logprob_pass", lp)
    monkeypatch.setattr(trainer.engine, "generate", gen)
    monkeypatch.setattr(grpo_mod, "RewardStream", stream)

    pos, live = PromptPosition(), []
    for step in range(3):
        refs.clear()
        old_pass.clear()
        rec, pos, rollouts = trainer.step(step, pos)
        assert rec["updates"] == 2 and rec["samples"] == 6 and rec["reward_batches"] >= 1
        # the streamed rewards are the batch grading of the same texts
        want, _ = score(trainer.pool, rollouts, trainer.cfg.rewards)
        assert [r.reward for r in rollouts] == want
        # old log-probs only for the second update's micro-batches (the first is on-policy)
        assert len(old_pass) == 1 and sum(old_pass[0]) == rec["logprob_old_tokens"]
        assert rec["logprob_old_tokens"] < rec["logprob_ref_tokens"]
        assert rec["first_update_approx_kl"] == 0.0 and rec["kl"] >= 0.0
        assert rec["torch_compiles"] == 0
        assert grads_released(trainer.bundle.chunks)
        assert len(refs) > 10
        del rec, rollouts
        gc.collect()
        alive = [r() for r in refs if r() is not None]
        assert not alive, f"{len(alive)} objects of step {step} outlive it: {alive[:3]}"
        live.append(_live_tensor_storage())
    assert live[1] == live[2], live


class _Pool:
    """RewardPool's interface in process (the grading function is the real one); records
    when each call ran."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def score(self, responses, gts, **kw):
        self.calls.append((time.monotonic(), len(responses)))
        return [self.fn(r, g) for r, g in zip(responses, gts)]

    def map(self, calls):
        self.calls.append((time.monotonic(), len(calls)))
        return [self.fn(*a, **k) for a, k in calls]


def test_streamed_rewards_equal_batch_rewards():
    """Completions arriving from two threads in scrambled order, some texts twice, while the
    'engine' is still running: every (prompt, text) gets the batch-scored reward, grading starts
    before the last completion arrives, and a grader failure surfaces in results()."""
    from ovlt.config import RewardConfig
    from ovlt.grpo.advantages import score
    from ovlt.grpo.reward_stream import RewardStream
    from ovlt.rewards.math_reward import math_reward

    rcfg = RewardConfig(format_weight=0.25)
    texts = ["<think>2+2</think> <answer>4</answer>", "the answer is 5", "<answer>4</answer>",
             "<think>x</think><answer>\\frac{8}{2}</answer>", "", "<answer>3</answer>"]
    items = [(i % 3, t, ["4", "5", "3"][i % 3]) for i, t in enumerate(texts * 2)]
    pool = _Pool(math_reward)
    st = RewardStream(pool, rcfg)
    order = list(range(len(items)))[::-1]
    first_half_graded = threading.Event()

    def feed(idx):
        for k in idx:
            i, t, a = items[k]
            st.submit((i, t), t, a)

    t1 = threading.Thread(target=feed, args=(order[::2],))
    t1.start()
    t1.join()
    for _ in range(200):  # the first arrivals are graded while the rest is still "decoding"
        if pool.calls:
            first_half_graded.set()
            break
        time.sleep(0.01)
    feed(order[1::2])
    got = st.results()
    assert first_half_graded.is_set()
    rolls = [SimpleNamespace(text=t, answer=a) for _, t, a in items]
    want_r, want_a = score(_Pool(math_reward), rolls, rcfg)
    for (i, t, _), wr, wa in zip(items, want_r, want_a):
        assert got[(i, t)] == (wr, wa)
    assert len(got) == len({(i, t) for i, t, _ in items})  # duplicates graded once
    assert sum(n for _, n in pool.calls) == len(got)

    def boom(*a, **k):
        raise ValueError("grader down")
    st = RewardStream(_Pool(boom), rcfg)
    st.submit((0, "x"), "x", "1")
    with pytest.raises(RuntimeError, match="grader down"):
        st.results()


def test_skipping_the_on_policy_old_pass_keeps_loss_and_grads(trainer):
    """One update over sampled micro-batches, once with old log-probs from the forward-only
    pass and once without (the update's own detached log-prob): same loss, same gradients,
    and the update stores old log-probs equal to the pass's."""
    from ovlt.grpo.passes import logprob_pass, update
    cpu = torch.device("cpu")
    rolls, mbs = _rollout_batches(trainer, n_prompts=2)
    g = trainer.cfg.grpo
    model = trainer.bundle.module
    with trainer.ref.weights_in(trainer.bundle.chunks) as rc:
        logprob_pass(rc, mbs, "ref_logprobs", 1.0, cpu)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the policy off the reference, so the KL term has a gradient
        for n, p in model.named_parameters():
            if n.startswith("language_model.") and p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen) * p.abs().mean())
    lr = [grp["lr"] for o in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
          for grp in o.param_groups]
    for o in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        for grp in o.param_groups:
            grp["lr"] = 0.0  # the two updates see the same weights
    try:
        from ovlt.grpo.memory import restore_grads
        restore_grads(trainer.bundle.chunks)
        model.train()
        logprob_pass(trainer.bundle.chunks, mbs, "old_logprobs", 1.0, cpu)
        old = [mb.old_logprobs.clone() for mb in mbs]
        a = update(trainer.bundle.chunks, trainer.optimizer, mbs, g, 1.0, cpu)
        params = [p for p in model.parameters() if p.requires_grad]
        grads_a = [p.main_grad.clone() for p in params]
        for mb in mbs:
            mb.old_logprobs = None
        b = update(trainer.bundle.chunks, trainer.optimizer, mbs, g, 1.0, cpu)
        grads_b = [p.main_grad.clone() for p in params]
    finally:
        model.eval()
        it = iter(lr)
        for o in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
            for grp in o.param_groups:
                grp["lr"] = next(it)
    assert a.stats["kl_loss"] > 1e-6 and abs(a.stats["approx_kl"]) < 1e-10  # ratio 1 both ways
    assert b.stats["approx_kl"] == 0.0
    assert abs(a.loss - b.loss) < 1e-6 * max(1.0, abs(a.loss))
    for x, y in zip(grads_a, grads_b):
        assert torch.allclose(x, y, atol=1e-6, rtol=1e-5)
    assert sum(float(x.abs().sum()) for x in grads_a) > 0
    for o, mb in zip(old, mbs):
        assert mb.old_logprobs is not None
        assert (o - mb.old_logprobs).abs().max().item() < 1e-5


@pytest.fixture(scope="module")
def fp8_trainer(dist1, tiny_hf_dir, rl_file, tmp_path_factory):
    """model.fp8 = per-tensor scaled_mm, reference held in memory (a second model)."""
    from ovlt.grpo.train import GRPOTrainer
    cfg = _cfg(tmp_path_factory.mktemp("grpo_fp8"), tiny_hf_dir, rl_file, "grpo.kl_coef=0.01",
               "grpo.ref_mode=memory", "grpo.train.global_batch_size=6",
               "model.fp8=scaled_mm_tensor", "model.transformer_impl=local")
    tr = GRPOTrainer(cfg)
    tr.setup(0)
    yield tr
    tr.pool.close()


def test_forward_only_passes_run_no_compiled_fusion(fp8_trainer, monkeypatch):
    """With mcore's compiled fusions switched on for the trained layers (as the CUDA fast
    paths do), the old and reference passes call neither the compiled bias-dropout-add nor the
    compiled SwiGLU, compile nothing, and leave the switches as they were; the memory
    reference runs the policy's switches. A plain eval forward outside the passes does ask for
    the fused bias-dropout-add (the check can fail)."""
    from megatron.core.transformer import mlp
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from ovlt.grpo.passes import copy_kernel_switches, logprob_pass, transformer_configs
    from ovlt.grpo.train import torch_compiles
    tr = fp8_trainer
    cfgs = transformer_configs(tr.bundle.chunks)
    for c in cfgs:
        monkeypatch.setattr(c, "bias_dropout_fusion", True)
        monkeypatch.setattr(c, "bias_activation_fusion", True)
    copy_kernel_switches(tr.ref.model, tr.bundle.module)
    assert [(c.bias_dropout_fusion, c.bias_activation_fusion)
            for c in transformer_configs(tr.ref.model)] == [(True, True)] * len(cfgs)

    from megatron.core.fusions.fused_bias_dropout import bias_dropout_add_unfused
    fused_asked = []

    def recording(training, fused):
        fused_asked.append(fused)
        return bias_dropout_add_unfused(training)  # never the compiled one here
    layers = [m for model in (tr.bundle.module, tr.ref.model) for m in model.modules()
              if isinstance(m, TransformerLayer)]
    for layer in layers:
        monkeypatch.setattr(layer, "self_attn_bda", recording)
        monkeypatch.setattr(layer, "mlp_bda", recording)
    swiglu_calls = []

    def counting_swiglu(y, bias, *a, **k):  # mcore's compiled SwiGLU, written out (no compile)
        swiglu_calls.append(1)
        g, u = torch.chunk(y if bias is None else y + bias, 2, -1)
        return torch.nn.functional.silu(g) * u
    monkeypatch.setattr(mlp, "bias_swiglu_impl", counting_swiglu)

    rolls, mbs = _rollout_batches(tr, n_prompts=2)
    fused_asked.clear()  # the rollout's image embedding ran the tower's layers
    swiglu_calls.clear()
    c0 = torch_compiles()
    cpu = torch.device("cpu")
    logprob_pass(tr.bundle.chunks, mbs, "old_logprobs", 1.0, cpu)
    with tr.ref.weights_in(tr.bundle.chunks) as rc:
        logprob_pass(rc, mbs, "ref_logprobs", 1.0, cpu)
    assert fused_asked and not any(fused_asked)
    assert not swiglu_calls and torch_compiles() == c0
    assert all(c.bias_dropout_fusion and c.bias_activation_fusion for c in cfgs)
    # same weights, same kernels: the reference pass gives the policy's log-probs
    for mb in mbs:
        assert (mb.old_logprobs - mb.ref_logprobs).abs().max().item() < 1e-5
    fused_asked.clear()
    from ovlt.grpo.passes import rl_forward
    with torch.no_grad():
        rl_forward(tr.bundle.module, mbs[0])
    assert fused_asked and all(fused_asked) and swiglu_calls


def test_fp8_update_runs_fp8_gemms(fp8_trainer, monkeypatch):
    """model.fp8 set: one GRPO step's update runs its linears through the FP8 GEMM
    (`ovlt.fp8.linear.scaled_mm`), forward and backward, and trains (finite loss, grad norm)."""
    from ovlt.fp8 import linear as fp8_linear
    from ovlt.grpo import train as grpo_mod
    from ovlt.grpo.data import PromptPosition
    from megatron.core.tensor_parallel import ColumnParallelLinear
    qkv = fp8_trainer.bundle.module.language_model.decoder.layers[0].self_attention.linear_qkv
    assert isinstance(qkv, ColumnParallelLinear) and "Fp8" in type(qkv).__name__
    calls = {"update": 0, "other": 0}
    phase = {"now": "other"}
    real_mm, real_q = fp8_linear.scaled_mm, grpo_mod.queue_update

    def mm(*a, **k):
        calls[phase["now"]] += 1
        return real_mm(*a, **k)

    def q(*a, **k):
        phase["now"] = "update"
        try:
            return real_q(*a, **k)
        finally:
            phase["now"] = "other"
    monkeypatch.setattr(fp8_linear, "scaled_mm", mm)
    monkeypatch.setattr(grpo_mod, "queue_update", q)
    rec, _, _ = fp8_trainer.step(0, PromptPosition())
    assert rec["updates"] == 1 and "logprob_old_s" not in rec  # one update: no old pass
    n_lin = sum(isinstance(m, fp8_linear.Fp8LinearMixin)
                for m in fp8_trainer.bundle.module.language_model.modules())
    assert calls["update"] >= 2 * n_lin  # every LLM linear: forward + backward GEMMs
    assert torch.isfinite(torch.tensor(rec["loss"])) and rec["grad_norm"] > 0


def test_on_policy_loss_kernel_equals_explicit_old():
    """fused_grpo_loss with old_logprobs=None (on-policy) gives the loss, gradients and metrics
    of the same call with old = the forward's own log-probs (from `fused_logprob`), and
    returns those log-probs."""
    from ovlt.kernels import fused_grpo_loss, fused_logprob
    g = torch.Generator().manual_seed(3)
    T, H, V = 37, 16, 50
    hidden = torch.randn(T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.3
    targets = torch.randint(0, V, (T,), generator=g)
    targets[::7] = -100
    adv = torch.randn(T, generator=g)
    ref = torch.randn(T, generator=g) * 0.1 - 4.0
    mask = (targets >= 0).float()
    with torch.no_grad():
        old = fused_logprob(hidden, weight, targets)
    outs = []
    for o in (old, None):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        loss, m, lp = fused_grpo_loss(h, w, targets, o, ref, adv, mask, kl_coef=0.01,
                                      return_logprobs=True)
        loss.backward()
        outs.append((loss.detach(), m, lp, h.grad, w.grad))
    (la, ma, lpa, gha, gwa), (lb, mb_, lpb, ghb, gwb) = outs
    assert torch.allclose(la, lb, atol=1e-7) and abs(float(la)) > 1e-4
    assert torch.allclose(gha, ghb, atol=1e-6) and torch.allclose(gwa, gwb, atol=1e-6)
    assert float(gha.abs().sum()) > 0
    assert torch.allclose(lpb, old, atol=1e-6) and torch.allclose(lpa, lpb)
    for k in ("pg_loss", "kl_loss", "entropy", "clip_frac"):
        assert torch.allclose(ma[k], mb_[k], atol=1e-6), k
    assert float(mb_["approx_kl"]) == 0.0 and float(mb_["ppo_kl"]) == 0.0
