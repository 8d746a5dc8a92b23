"""The GRPO trainer: rollout -> rewards -> group advantages -> old/ref log-probs -> policy
updates with the fused GRPO loss -> weight sync, per step; curriculum, checkpoints, metrics.

Outputs under `grpo.train.save_dir`: `metrics.jsonl` (one record per step), `rollouts.jsonl`
(a few decoded samples per step), `logs/`, `step_*/` checkpoints + `latest`, `final_hf/`.
Re-running the same command resumes from `latest` (model, optimizer, RNG, prompt position; a
resume on other prompts is refused, `PromptStream.fingerprint`); the reference policy is always
the *initial* weights (taken before the checkpoint is loaded).

One step with P prompts x n samples on this DP rank: the engine samples, and each completion
goes to the reward workers (processes with timeouts) as it finishes (`RewardStream`), so
grading overlaps decoding; `ovlt.kernels.grpo_advantages` normalises per prompt group; groups
whose rewards are all equal carry no signal and are dropped (`filter_zero_advantage`);
responses cut at `max_new_tokens` are masked out of the loss or penalised (`overlong`). The
kept samples are split into ceil(N / global_batch_size) optimizer updates (the same count on
every DP rank), each packed into token-budget micro-batches without padding. The first update
runs exactly at the sampling policy: its own detached log-prob is its old one (ratio 1), so the
old-log-prob pass covers the later updates' samples only (none with one update per step); the
reference pass covers every micro-batch. Each phase queues its GPU work and reads it once at
its end. The grad buffers are released from the end of the updates to the start of the next
(`ovlt.grpo.memory`), so the rollout and the log-prob passes have that memory too.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from ovlt.config import ConfigError
from ovlt.data.fingerprint import check_same_data
from ovlt.logging import get_logger
from ovlt.models.qwen2_5_vl.rope_index import rope_positions_fn
from ovlt.rollout.base import GenerationRequest, SamplingParams
from ovlt.engine.gc_schedule import GCSchedule
from ovlt.engine.lm_head import unwrap
from ovlt.engine.loop import TrainLoop
from ovlt.engine.metrics_logger import memory_gb
from ovlt.grpo.advantages import assign_advantages
from ovlt.grpo.batch import Rollout, pack_rollouts, split_updates
from ovlt.grpo.data import PromptPosition, PromptStream, build_requests
from ovlt.grpo.image_features import StepImages, frozen_tower
from ovlt.grpo.memory import release_grads, restore_grads
from ovlt.grpo.passes import (Reference, engine_logprob_gap, kl_to_reference, queue_logprob_pass,
                              queue_update)
from ovlt.grpo.reward_stream import RewardStream
from ovlt.utils.device import default_device
from ovlt.utils.io import append_jsonl

log = get_logger(__name__)


def stage_freeze(base: list[str], stage) -> list[str]:
    out = [f for f in base if f != "vision"]
    return out + ["vision"] if stage.freeze_vision else out


def cut_at_vision_tokens(ids: list, lps: list, model_cfg) -> tuple[list, list]:
    """A response must not hold vision placeholders (the model would look for image features
    that do not exist): cut it before the first one. The built-in engine never samples them;
    an external engine (vLLM, a teacher endpoint) might."""
    m = model_cfg
    bad = {m.image_token_id, m.video_token_id, m.vision_start_token_id, m.vision_end_token_id}
    for i, t in enumerate(ids):
        if t in bad:
            return list(ids[:i]), list(lps[:i])
    return ids, lps


def torch_compiles() -> int:
    """Graphs torch.compile has built in this process so far (dynamo's counter): a step that
    compiles after the first shows up in its `torch_compiles` metric."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - torch without dynamo
        return 0
    return int(counters["stats"]["unique_graphs"])


def _entropy(old_pass, first_update) -> float | None:
    """Mean entropy of the sampling policy over the loss tokens: the old-log-prob pass's
    samples and the first update's (whose forward is at the sampling policy), token-weighted."""
    parts = [(r.stats.get("entropy"), r.tokens) for r in (old_pass, first_update)
             if r is not None and r.tokens and r.stats.get("entropy") is not None]
    n = sum(t for _, t in parts)
    return sum(e * t for e, t in parts) / n if n else None


class StepPrompts(NamedTuple):
    records: list
    requests: list[GenerationRequest]
    params: SamplingParams
    next_position: PromptPosition
    skipped: int


class GRPOTrainer:
    def __init__(self, cfg):
        from megatron.core import parallel_state as ps

        from ovlt.data.image_loader import ImageLoader
        from ovlt.data.tokenizer import load_tokenizer
        from ovlt.rewards.pool import RewardPool

        self.cfg = cfg
        g, t = cfg.grpo, cfg.grpo.train
        if g.loss_agg != "token_mean":
            raise ConfigError(f"grpo.loss_agg={g.loss_agg!r}: the trainer normalises over the "
                              "global batch's tokens; only 'token_mean' is supported")
        if cfg.parallel.sequence_parallel:
            raise ConfigError("parallel.sequence_parallel is not supported by the GRPO trainer")
        self.save_dir = Path(t.save_dir)
        self.rank = dist.get_rank()
        self.device = default_device()
        self.dp, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.tok = load_tokenizer()
        self.images = ImageLoader(cfg.data.min_pixels, cfg.data.max_pixels, "pil")
        self.stream = PromptStream(cfg, g.prompts_per_step)
        self.total_steps = t.max_steps or self.stream.total_steps
        pool_kw = {"fn": g.reward_fn} if g.reward_fn else {}
        self._vision_cuts = 0  # responses cut at a vision placeholder, this step
        self.pool = RewardPool(num_workers=cfg.rewards.num_workers, timeout_s=cfg.rewards.timeout_s,
                               **pool_kw)
        self.ref = None
        self.freeze = None

    # ------------------------------------------------------------------ model / engine
    def setup(self, step: int = 0) -> None:
        """The model, optimizer and engine for the curriculum stage of `step`, and the
        reference policy (the weights as they are now: call before loading a checkpoint)."""
        stage = self.stream.stages[self.stream.stage_of_step(step)]
        self.build(stage_freeze(list(self.cfg.grpo.train.freeze), stage))
        self.ref = self.make_reference()

    def build(self, freeze: list[str], from_module=None):
        from ovlt.rollout import make_engine
        from ovlt.engine.lr_schedule import LRSchedule
        from ovlt.engine.model_setup import build_vl_model, configure_fp8, wrap_model
        from ovlt.engine.optimizer import build_optimizer, unallocated_state_bytes

        t, o = self.cfg.grpo.train, self.cfg.grpo.optimizer
        model = build_vl_model(self.cfg, t.precision)
        configure_fp8(model, self.cfg.model)  # model.fp8: FP8 GEMMs in the passes and update
        if from_module is not None:  # curriculum boundary: carry the current weights over
            model.load_state_dict(from_module.state_dict(), strict=False)
        self.bundle = wrap_model(model, dataclasses.replace(t, freeze=freeze),
                                 o.use_distributed_optimizer)
        self.optimizer = build_optimizer(self.bundle.chunks, o, t.precision)
        self.sched = LRSchedule(o, self.total_steps)
        self.freeze = freeze
        from megatron.core import parallel_state as ps
        tp_group = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
        # An engine with its own memory sized from what is free now must leave room for what
        # the trainer allocates later: Adam moments (first update), the reference copy.
        pending = unallocated_state_bytes(self.optimizer)
        # (offload: the reference is built after the engine, on the device for a moment)
        if self.ref is None and self.needs_reference() and self.cfg.grpo.ref_mode in ("memory", "offload"):
            pending += sum(p.numel() * p.element_size() for p in model.parameters())
        self.engine = make_engine(self.cfg, model=self.bundle.module, tokenizer=self.tok,
                                  tp_group=tp_group, pending_bytes=pending)

    def needs_reference(self) -> bool:
        return self.cfg.grpo.kl_coef != 0 or self.cfg.grpo.track_kl

    def make_reference(self):
        g = self.cfg.grpo
        if not self.needs_reference():
            return None
        from ovlt.engine.model_setup import build_vl_model
        return Reference(g.ref_mode, self.bundle.module,
                         build_fn=lambda: build_vl_model(self.cfg, self.cfg.grpo.train.precision))

    # ------------------------------------------------------------------ one step
    def build_requests(self, recs, skipped: Optional[list] = None) -> list[GenerationRequest]:
        """This trainer's requests for `recs` (`ovlt.grpo.data.build_requests`)."""
        return build_requests(recs, self.cfg, self.tok, self.images, self.engine, skipped)

    def step_requests(self, step: int, pos: PromptPosition) -> StepPrompts:
        """The prompts of `step` on this rank, their requests and the step's sampling
        parameters (records whose image cannot be used are left out, logged, counted)."""
        g, rc = self.cfg.grpo, self.cfg.rollout
        recs, pos = self.stream.next_batch(pos, step, self.dp_rank, self.dp)
        skipped: list = []
        reqs = self.build_requests(recs, skipped)
        if skipped:  # keep recs aligned with reqs
            recs = [r for r in recs if all(r is not b for b in skipped)]
        sp = SamplingParams(temperature=rc.temperature, top_p=rc.top_p, top_k=rc.top_k,
                            max_new_tokens=rc.max_new_tokens, stop=list(rc.stop),
                            n=g.samples_per_prompt,
                            seed=g.train.seed * 1_000_003 + step * 9973 + self.dp_rank)
        return StepPrompts(recs, reqs, sp, pos, len(skipped))

    def step(self, step: int, pos: PromptPosition):
        """One GRPO step; returns (metrics record, next prompt position, rollouts). Nothing the
        step puts in device memory outlives it (the caller's rollouts hold host tensors only;
        the grad buffers are released from the end of the updates to the next update)."""
        cfg, g, rc = self.cfg, self.cfg.grpo, self.cfg.rollout
        chunks, temp = self.bundle.chunks, rc.temperature or 1.0
        tm = {}
        compiles0 = torch_compiles()
        release_grads(chunks)  # the first step's: later steps release them after the update
        t0 = time.perf_counter()
        recs, reqs, sp, pos, n_skipped = self.step_requests(step, pos)
        self.bundle.module.eval()
        # Completions stream into the reward pool as they finish: grading overlaps decoding.
        rewards = RewardStream(self.pool, cfg.rewards)
        try:
            def on_complete(i, c):
                text = self._graded(c)[2]
                rewards.submit((i, text), text, recs[i].answer)
            comps = self.engine.generate(reqs, sp, on_complete=on_complete)
            # Free the engine's GPU memory for the update (vLLM: weights + KV cache; built-in:
            # its KV cache and CUDA graph, recaptured at the next rollout).
            self.engine.sleep()
            tm["rollout"] = time.perf_counter() - t0

            t1 = time.perf_counter()
            scores = rewards.results()  # the grading left after the last completion
        finally:
            rewards.close()
        rollouts, acc, self._vision_cuts = [], [], 0
        for gi, (rec, req, cs) in enumerate(zip(recs, reqs, comps)):
            for c in cs:
                ids, lps, text = self._graded(c)
                self._vision_cuts += len(ids) < len(c.token_ids)
                rw, a = scores[(gi, text)]
                rollouts.append(Rollout(prompt_ids=req.prompt_ids, response_ids=ids or [self.tok.eos_id],
                                        group=gi, pixel_values=req.pixel_values,
                                        image_grid_thw=req.image_grid_thw,
                                        engine_logprobs=lps, finish_reason=c.finish_reason,
                                        source=rec.source, answer=rec.answer, text=text,
                                        reward=rw))
                acc.append(a)
        adv_stats = assign_advantages(rollouts, g)
        tm["reward"] = time.perf_counter() - t1

        # ---- old / reference log-probs
        t2 = time.perf_counter()
        kept = [r for r in rollouts if r.train]
        n_kept = torch.tensor([len(kept)], dtype=torch.float64, device=self.device)
        dist.all_reduce(n_kept, group=self._dp_group())
        gbs = max(1, g.train.global_batch_size)
        n_kept = n_kept.item()  # one read: it sizes the updates
        n_updates = max(1, math.ceil(n_kept / gbs))
        # Token budget per micro-batch: grpo.max_tokens_per_micro_batch, else the data's
        # packing budget (a longer sample gets a micro-batch of its own). No padding.
        budget = (g.max_tokens_per_micro_batch or cfg.data.pack_tokens
                  or max(cfg.data.max_length, max(r.length for r in rollouts)))
        rope = rope_positions_fn(self.cfg.model)
        mb_per_update = [pack_rollouts(c, budget, rope)
                         for c in split_updates(kept, n_updates, rollouts[0])]
        # A frozen tower encodes each prompt's images once per set of weights (policy,
        # reference), not once per sample and pass; the micro-batches then need no pixels.
        on_gpu = self.device.type == "cuda"
        step_images = StepImages(rollouts, pin=on_gpu)
        if frozen_tower(unwrap(chunks[0])):
            mb_per_update = [[dataclasses.replace(mb, pixel_values=None) for mb in u]
                             for u in mb_per_update]
        if on_gpu:  # pinned once for the passes that move them
            mb_per_update = [[mb.pin_memory() for mb in u] for u in mb_per_update]
        all_mbs = [mb for u in mb_per_update for mb in u]
        # The first update runs at the sampling policy: its own forward gives its old
        # log-probs (ratio exactly 1), so only the later updates' samples need this pass.
        need_old = [mb for u in mb_per_update[1:] for mb in u] if n_kept > 0 else all_mbs
        passes = {}
        if self.ref is not None:  # offload: the reference's weights come in behind the old pass
            self.ref.prefetch()
        if need_old:
            passes["old"] = queue_logprob_pass(chunks, need_old, "old_logprobs", temp,
                                               self.device, step_images)
        ref_images = step_images.for_other_weights()
        if self.ref is not None:
            with self.ref.weights_in(chunks) as ref_chunks:
                passes["ref"] = queue_logprob_pass(ref_chunks, all_mbs, "ref_logprobs", temp,
                                                   self.device, ref_images)
        passes = {k: p.result() for k, p in passes.items()}  # one read for both passes
        lp_tokens = {"old": sum(mb.num_tokens for mb in need_old),
                     "ref": sum(mb.num_tokens for mb in all_mbs) if self.ref else 0}
        # prompts whose images went through the frozen tower, per phase (0 with a trained tower)
        encodes = {"logprob": step_images.encoded + ref_images.encoded}
        tm["logprob"] = time.perf_counter() - t2

        # ---- policy updates
        t3 = time.perf_counter()
        restore_grads(chunks)
        self.bundle.module.train()
        lr = self.sched.apply(self.optimizer, step)
        # Nothing to learn from on any rank (every group flat): skip the update, whose
        # per-token normalisation would divide by zero.
        queued = [queue_update(chunks, self.optimizer, mbs, g, temp, self.device, step_images)
                  for mbs in mb_per_update] if n_kept > 0 else []
        release_grads(chunks)  # behind the queued optimizer steps (stream order)
        ups = [q.result() for q in queued]  # read once all are queued: no sync in between
        self.bundle.module.eval()
        tm["update"] = time.perf_counter() - t3
        encodes["update"] = step_images.encoded + ref_images.encoded - encodes["logprob"]

        # ---- weight sync (the built-in engine reads the trainer's parameters: nothing to do)
        t4 = time.perf_counter()
        self.sync_weights()
        tm["sync"] = time.perf_counter() - t4
        # KL at the sampling policy, now that the first update has written its old log-probs
        kl = kl_to_reference(all_mbs) if self.ref is not None else None
        lp_stats = {"entropy": _entropy(passes.get("old"), ups[0] if ups else None),
                    "kl": kl, "passes": passes, "tokens": lp_tokens, "encodes": encodes,
                    "engine_gap": engine_logprob_gap(all_mbs)}
        rec = self._metrics(rollouts, acc, adv_stats, lp_stats, ups, tm, lr)
        rec["prompt_position"] = pos.as_dict()
        rec["skipped_prompts"] = n_skipped
        rec["torch_compiles"] = torch_compiles() - compiles0
        rec["reward_batches"] = rewards.batches
        return rec, pos, rollouts

    def _engine_gap(self, tot, mx, n) -> dict:
        """Mean and max |trainer - engine| log-prob over the DP ranks' loss tokens (every rank
        joins both reductions, with zeros where it has no engine log-probs)."""
        z = torch.zeros((), dtype=torch.float64, device=self.device)
        sums = torch.stack([z if tot is None else tot.to(self.device, torch.float64).reshape(()),
                            torch.tensor(n, dtype=torch.float64, device=self.device)])
        top = z.clone() if mx is None else mx.to(self.device, torch.float64).reshape(()).clone()
        dist.all_reduce(sums, group=self._dp_group())
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self._dp_group())
        s, cnt, m = torch.cat([sums, top.reshape(1)]).tolist()  # one read for the three
        if cnt == 0:
            return {}
        return {"engine_logprob_diff_mean": s / cnt, "engine_logprob_diff_max": m}

    def _graded(self, c) -> tuple[list, list, str]:
        """(token ids, log-probs, text) of a completion as it is trained and graded: cut
        before any vision placeholder, the text decoded again where cut."""
        ids, lps = cut_at_vision_tokens(c.token_ids, c.logprobs, self.cfg.model)
        text = c.text if len(ids) == len(c.token_ids) else \
            self.tok.decode(ids, skip_special_tokens=True)
        return ids, lps, text

    def _dp_group(self):
        from megatron.core import parallel_state as ps
        return ps.get_data_parallel_group()

    def sync_weights(self):
        """The trainer's weights into an engine that holds its own copy (resharded to HF
        names, streamed in buckets); nothing for one that shares them."""
        if self.engine.shares_trainer_weights:
            return
        from megatron.core import parallel_state as ps

        from ovlt.rollout.reshard import ReshardGroups, iter_hf_weights
        local = {k: v for k, v in self.bundle.module.state_dict().items()
                 if not k.endswith("._extra_state")}
        self.engine.wake()
        self.engine.update_weights(iter_hf_weights(local, self.cfg.model,
                                                   ReshardGroups.from_parallel_state(),
                                                   bucket_mb=self.cfg.rollout.weight_bucket_mb))
        del ps

    def _metrics(self, rollouts, acc, adv_stats, lp_stats, ups, tm, lr) -> dict:
        """Sums over DP ranks of per-rank sums, then means."""
        lens = [len(r.response_ids) for r in rollouts]
        mine = sorted({r.source for r in rollouts})
        every = [None] * self.dp  # the union over DP ranks: every rank reduces the same keys
        dist.all_gather_object(every, mine, group=self._dp_group())
        sources = sorted({s for lst in every for s in lst})
        keys = ["n", "reward", "reward_sq", "acc", "len", "clipped", "dropped", "tokens",
                "kept", "vision_cut"] + [f"{s}:{k}" for s in sources for k in ("n", "reward", "reward_sq", "acc")]
        vals = {k: 0.0 for k in keys}
        vals.update(n=len(rollouts), reward=sum(r.reward for r in rollouts),
                    reward_sq=sum(r.reward ** 2 for r in rollouts), acc=sum(acc), len=sum(lens),
                    clipped=adv_stats["clipped"], dropped=adv_stats["groups_dropped"],
                    tokens=sum(r.length for r in rollouts), kept=sum(r.train for r in rollouts),
                    vision_cut=self._vision_cuts)
        for r, a in zip(rollouts, acc):
            vals[f"{r.source}:n"] += 1
            vals[f"{r.source}:reward"] += r.reward
            vals[f"{r.source}:reward_sq"] += r.reward ** 2
            vals[f"{r.source}:acc"] += a
        vec = torch.tensor([vals[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(vec, group=self._dp_group())
        v = dict(zip(keys, vec.tolist()))
        mx = torch.tensor([max(lens) if lens else 0], dtype=torch.float64, device=self.device)
        dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=self._dp_group())
        n = max(v["n"], 1.0)
        mean = v["reward"] / n
        rec = {"reward_mean": mean, "reward_std": math.sqrt(max(v["reward_sq"] / n - mean ** 2, 0.0)),
               "accuracy": v["acc"] / n, "response_length_mean": v["len"] / n,
               "response_length_max": int(mx.item()), "clipped_frac": v["clipped"] / n,
               "groups_dropped": int(v["dropped"]), "samples": int(v["n"]),
               "samples_trained": int(v["kept"]), "lr": lr,
               "responses_cut_at_vision_token": int(v["vision_cut"])}
        for s in sources:
            ns = max(v[f"{s}:n"], 1.0)
            ms = v[f"{s}:reward"] / ns
            rec[f"reward_mean/{s}"] = ms
            rec[f"reward_std/{s}"] = math.sqrt(max(v[f"{s}:reward_sq"] / ns - ms ** 2, 0.0))
            rec[f"accuracy/{s}"] = v[f"{s}:acc"] / ns
        rec["entropy"] = lp_stats.get("entropy")
        if lp_stats.get("kl") is not None:
            kl_sum, kl_n = lp_stats["kl"]
            kv = torch.stack([kl_sum.to(self.device, torch.float64).reshape(()) if kl_sum is not None
                              else torch.zeros((), dtype=torch.float64, device=self.device),
                              torch.tensor(kl_n, dtype=torch.float64, device=self.device)])
            dist.all_reduce(kv, group=self._dp_group())
            kv = kv.tolist()
            rec["kl"] = kv[0] / max(kv[1], 1.0)
        if "engine_gap" in lp_stats:
            rec.update(self._engine_gap(*lp_stats["engine_gap"]))
        for k, res in lp_stats.get("passes", {}).items():
            # each pass's own GPU time (its StepClock) and the tokens it ran: the cost per
            # token of the old and the reference pass, side by side
            rec[f"logprob_{k}_s"] = res.time_s
            rec[f"logprob_{k}_tokens"] = lp_stats["tokens"][k]
        for k, n in lp_stats.get("encodes", {}).items():
            rec[f"vision_encodes_{k}"] = n
        if ups:
            rec["loss"] = sum(u.loss for u in ups) / len(ups)
            rec["grad_norm"] = sum(u.grad_norm for u in ups) / len(ups)
            rec["updates"] = len(ups)
            for k in ("clip_frac", "clip_frac_lower", "kl_loss", "approx_kl", "ppo_kl", "pg_loss"):
                vals_k = [u.stats.get(k) for u in ups if k in u.stats]
                if vals_k:
                    rec[k] = sum(vals_k) / len(vals_k)
            rec["first_update_ppo_kl"] = ups[0].stats.get("ppo_kl")
            rec["first_update_clip_frac"] = ups[0].stats.get("clip_frac")
            rec["first_update_approx_kl"] = ups[0].stats.get("approx_kl")
        total = sum(tm.values())
        rec.update({f"time/{k}": s for k, s in tm.items()})
        rec["step_time_s"] = total
        rec["tokens_per_s"] = v["tokens"] / total if total > 0 else None
        rec["reward_timeouts"] = self.pool.stats.timeouts if hasattr(self.pool, "stats") else None
        rec.update(memory_gb(self.device))  # this rank's peak over the step (rollout + update)
        return rec

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        from ovlt.engine.metrics_logger import MetricsLogger

        g, t = self.cfg.grpo, self.cfg.grpo.train
        loop = TrainLoop(t, self.save_dir, self.total_steps)
        prompts = self.stream.fingerprint()
        check_same_data(loop.saved_state, prompts, loop.save_dir, kind="GRPO prompts",
                        source=f"the curriculum ({self.stream.sources()})",
                        save_key="grpo.train.save_dir")
        start_step, pos = loop.start_step, PromptPosition()
        self.setup(start_step)  # the reference: initial weights, before a checkpoint is loaded
        st = loop.resume(self.bundle.chunks, self.optimizer,
                         jsonl_files=("metrics.jsonl", "rollouts.jsonl"), is_writer=self.rank == 0)
        if st is not None:
            pos = PromptPosition(**st["prompt_position"])
        self.sync_weights()  # an engine with its own weights starts from the trainer's
        logger = MetricsLogger(self.save_dir, self.rank == 0, self.total_steps,
                               tensorboard=t.tensorboard, wandb=t.wandb, run_name="grpo",
                               start_step=start_step)
        log.info("GRPO: %d steps (start %d), %d stages, %d prompts x %d samples per step, "
                 "engine %s, ref %s", self.total_steps, start_step, len(self.stream.stages),
                 g.prompts_per_step, g.samples_per_prompt, type(self.engine).__name__,
                 self.ref.mode if self.ref else None)

        def state(step):
            return {"step": step, "prompt_position": pos.as_dict(), "total_steps": self.total_steps,
                    "stage": self.stream.stage_of_step(max(step - 1, 0)),
                    "world_size": dist.get_world_size(), "dp": self.dp, "data": prompts}

        def summary(steps, final_hf=None, exited_early=False):
            return {"steps": steps, "start_step": start_step, "save_dir": str(self.save_dir),
                    "final_hf": str(final_hf) if final_hf else None,
                    "final_reward_mean": last.get("reward_mean"), "exited_early": exited_early}

        last = {}
        with GCSchedule(t.gc_interval) as gc_sched:
            for step in range(start_step, self.total_steps):
                stage = self.stream.stages[self.stream.stage_of_step(step)]
                want = stage_freeze(list(t.freeze), stage)
                if want != self.freeze:
                    log.warning("curriculum stage %s: freeze %s -> %s; rebuilding the model "
                                "wrapper (optimizer moments restart)", stage.name, self.freeze,
                                want)
                    self.build(want, from_module=self.bundle.module)
                    loop.rebind(self.bundle.chunks, self.optimizer)
                    gc_sched.refreeze()  # the old wrapper's grad buffers: freed, not frozen
                    self.sync_weights()
                rec, pos, rollouts = self.step(step, pos)
                rec["stage"] = stage.name
                if (step + 1) % t.log_interval == 0 or step + 1 == self.total_steps:
                    logger.log(step + 1, rec)
                if self.rank == 0 and g.rollout_log_samples:
                    self._log_rollouts(step + 1, rollouts[: g.rollout_log_samples])
                del rollouts  # not held through the next step
                last = rec
                if loop.save_due(step + 1):
                    loop.save(step + 1, state(step + 1))
                gc_sched.tick(step + 1)
                if loop.exit_due(step + 1):
                    loop.save_unless_saved(step + 1, state(step + 1))
                    logger.close()
                    log.info("train.exit_interval=%d: exiting at step %d; re-run to resume",
                             t.exit_interval, step + 1)
                    return summary(step + 1, exited_early=True)
        logger.close()
        hf_dir = loop.finish(state(self.total_steps), self.bundle.module, self.cfg.model)
        self.pool.close()
        return summary(self.total_steps, final_hf=hf_dir)

    def _log_rollouts(self, step: int, rollouts: list[Rollout]) -> None:
        for r in rollouts:
            append_jsonl(self.save_dir / "rollouts.jsonl", {
                "step": step, "source": r.source, "answer": r.answer,
                "prompt": self.tok.decode(r.prompt_ids[-200:], skip_special_tokens=True),
                "response": r.text, "reward": r.reward, "advantage": r.advantage,
                "finish_reason": r.finish_reason, "trained": r.train})


def run_grpo(cfg) -> dict:
    """Train; expects `init_distributed` done."""
    trainer = GRPOTrainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.pool.close()  # idempotent; also on failure, so no reward worker outlives us
