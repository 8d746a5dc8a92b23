"""One full GRPO step on one GPU: the ovlt trainer vs TRL's `GRPOTrainer`, same weights/prompts/settings.

    python benchmarks/grpo_vs_trl.py --out benchmarks/results/grpo_vs_trl_h100.json      # H100
    python benchmarks/grpo_vs_trl.py --tiny --device cpu --out /tmp/grpo_step_tiny.json   # CPU smoke

What runs (the parent process prepares the inputs, then runs each side in its own subprocess,
one after the other, so each gets the whole GPU and a crash or hang of one leaves the other's
numbers; each side writes its JSON after every step):
- model: Qwen2.5-VL with the 7B widths (hidden 3584, 28 heads / 4 KV groups, FFN 18944, vocab
  152064 untied, vision 1280 wide) cut to `--llm-layers` LLM and `--vision-layers` vision layers,
  random init (std 0.02, norms 1, biases 0), bf16, written ONCE as an HF directory through the
  project's own export path (state-dict adapter `mcore_to_hf` -> `HFCheckpointWriter`, HF config
  from `to_hf_config`, ovlt's offline tokenizer). Both sides load that directory.
- data: `--prompts` x `--steps` distinct prompts, each one `--image` px random-noise PNG + a short
  math question + the recipe's prompt suffix, written as an RL parquet (`problem`, `answer`,
  `images`) that ovlt reads with `read_rl`; TRL gets the same rows as a `datasets.Dataset`
  (`prompt` conversational + `image` column, TRL's VLM format). Prompt token ids are identical
  on both sides (checked on CPU: ovlt `encode_prompt` == HF processor's chat template).
- settings (both): `--prompts` prompts x `--samples` samples per step, `--new` new tokens with EOS
  suppressed (ovlt: `SamplingParams.ignore_eos`; TRL: `min_new_tokens=--new`), so every response
  has exactly `--new` tokens and both sides do equal work; vision placeholders are never
  sampled (ovlt's engine bans them, TRL suppresses image_token_id itself); temperature 1.0, top-p 0.99, one
  optimizer update per step over all P x n samples in micro-batches of `--micro-batch` samples,
  token-mean loss, clip 0.2 (both sides), no dual clip, KL (k3) coefficient 0.01 against a
  reference model held in GPU memory, AdamW lr 1e-6 constant, wd 0.01, grad clip 1.0, vision
  tower + merger frozen, activation recompute off (`--recompute full` turns it on for both), reward
  = `ovlt.rewards.math_reward` against a fixed answer (0 for every response of a random model)
  + a deterministic hash of the response text in [0, 1) (`bench_reward`), so advantages are
  non-zero and the weights change between steps on both sides; ovlt grades in its RewardPool
  worker processes, TRL in-process (each trainer's own way).
- ovlt: the real trainer (`ovlt.grpo.train.GRPOTrainer`, built-in rollout engine sharing the
  weights, CUDA-graph decode, fused log-prob / GRPO-loss kernels, mcore DDP + distributed
  optimizer with fp32 master weights), driven step by step as `GRPOTrainer.run` does (without
  checkpointing/export). Its own per-phase timers: rollout / reward / logprob / update / sync,
  and each log-prob pass's own GPU time and tokens (old vs reference cost per token). One
  update per step: the update is on-policy, so ovlt runs no old-log-prob pass (as TRL).
  Per step also: peak allocated memory per phase and over the step, what stays allocated after
  it, torch.compile graphs built, host syncs inside the log-prob and update phases.
- TRL: `trl.GRPOTrainer` (HF `generate` path, `use_vllm=False`), bf16 params with torch AdamW
  (no fp32 master copy: TRL's/HF Trainer's usual bf16 set-up), `per_device_train_batch_size =
  --micro-batch`, `gradient_accumulation_steps = P*n / micro-batch` (one generation per optimizer
  step, so TRL computes no separate old log-probs). Phases are timed by wrapping its methods
  (`_generate`, `_calculate_rewards`, `_get_per_token_logps_and_entropies` without grad = ref /
  old log-probs, `_generate_and_score_completions`); `update` = step - generate_and_score.
A step = one optimizer step including its rollout, wall time with a device sync at both ends
(ovlt: around `GRPOTrainer.step`; TRL: between consecutive `on_step_end` callbacks). Step 1
includes compilation / CUDA-graph capture / lazy init; the summary is the median of steps 2..N.
The JSON also holds an explicitly labelled ESTIMATE for the recipe (7B, 512 prompts x 5, 8 GPUs)
vs EasyR1's published ~145 s per step; the formula is written next to the numbers.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ANSWER = "42"
PROBLEM = ("Problem {i}: The figure shows several coloured regions. Count the regions, multiply the "
           "count by the number of corners of the largest one, and give the result.")


# ---------------------------------------------------------------------------------- shared helpers
def _now():
    return time.perf_counter()


def _sync(dev):
    import torch
    if dev == "cuda" or (hasattr(dev, "type") and dev.type == "cuda"):
        torch.cuda.synchronize()


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:1500] + "\n" + traceback.format_exc()[-3000:]


def _write(path, obj):
    tmp = str(path) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


class PhaseMemory:
    """Peak allocated GPU memory per phase of a trainer step (the functions a phase calls are
    wrapped with `wrap`) and over the whole step. torch's peak counter is reset around each
    wrapped call, so the step's own peak is kept here: the largest of the phase peaks, what
    accrued between them, and the trainer's own meter (`mem_gb`: it resets the counter at the
    step's end). `end_step` also reads what the step left allocated (the caller drops the
    step's result first). Nothing on the CPU."""

    def __init__(self, dev: str):
        self.on = dev == "cuda"
        self.peaks: dict = {}
        self.between = 0.0

    def _read_reset(self) -> float:
        import torch
        v = torch.cuda.max_memory_allocated() / 2 ** 30
        torch.cuda.reset_peak_memory_stats()
        return v

    def start_step(self) -> None:
        self.peaks, self.between = {}, 0.0
        if self.on:
            self._read_reset()

    def wrap(self, name: str, fn):
        if not self.on:
            return fn

        def wrapped(*a, **k):
            self.between = max(self.between, self._read_reset())
            try:
                return fn(*a, **k)
            finally:
                self.peaks[name] = max(self.peaks.get(name, 0.0), self._read_reset())
        return wrapped

    def end_step(self, trainer_peak_gib=None) -> dict:
        if not self.on:
            return {}
        import gc

        import torch
        gc.collect()
        tail = self._read_reset()
        peak = max([tail, self.between, trainer_peak_gib or 0.0, *self.peaks.values()])
        return {"peak_mem_gib": peak, "phase_peak_mem_gib": dict(self.peaks),
                "mem_after_step_gib": torch.cuda.memory_allocated() / 2 ** 30}


def steady_state(per_step_peaks: list) -> dict:
    """Whether per-step peak memory holds from step 2 on: each step's peak within 2 % of the
    step before it."""
    later = [p for p in per_step_peaks[1:] if p]
    if len(later) < 2:
        return {}
    return {"steady_state_peak_spread": (max(later) - min(later)) / min(later),
            "steady_state_within_2pct": all(abs(b - a) <= 0.02 * a
                                            for a, b in zip(later, later[1:]))}


def model_cfg(args):
    from ovlt.config import CONFIG_ROOT, load_config
    m = load_config(CONFIG_ROOT / "model" / ("tiny.yaml" if args.tiny else "qwen2_5_vl_7b.yaml")).model
    if not args.tiny:
        m.num_layers = args.llm_layers
        m.vision.depth = args.vision_layers
        # the real tower has full attention every 8th layer; keep at least one full layer
        m.vision.fullatt_block_indexes = ([i for i in range(args.vision_layers) if i % 8 == 7]
                                          or [args.vision_layers - 1])
    m.transformer_impl = "local"
    m.params_dtype = "bf16" if args.device == "cuda" else "fp32"
    return m


def recipe_model_cfg():
    from ovlt.config import CONFIG_ROOT, load_config
    return load_config(CONFIG_ROOT / "model" / "qwen2_5_vl_7b.yaml").model


def _suffix():
    from ovlt.config import RolloutConfig
    return RolloutConfig().prompt_suffix


# ---------------------------------------------------------------------------------- preparation
def write_hf_dir(m, out: Path, device: str) -> dict:
    """Random-init weights of `m` streamed through the project's export path into an HF dir."""
    import torch

    from ovlt.data.tokenizer import save_hf_tokenizer
    from ovlt.models.qwen2_5_vl.checkpoint_io import HFCheckpointWriter
    from ovlt.models.qwen2_5_vl.hf_config import to_hf_config
    from ovlt.models.qwen2_5_vl.state_dict_adapter import mcore_shapes, mcore_to_hf

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    sd, n = {}, 0
    for name, shape in mcore_shapes(m, 1, 1, 0).items():
        if len(shape) == 1:
            val = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
            t = torch.full(shape, val, dtype=dtype, device=device)
        else:
            t = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=gen)
        sd[name] = t
        n += t.numel()
    writer = HFCheckpointWriter(out)
    for hf_name, full in mcore_to_hf({(0, 0): sd}, m, 1, 1):
        writer.add(hf_name, full)
    writer.close()
    del sd
    if device == "cuda":
        torch.cuda.empty_cache()
    cfg = to_hf_config(m)
    cfg.dtype = "bfloat16" if dtype == torch.bfloat16 else "float32"
    cfg.save_pretrained(out)
    save_hf_tokenizer(out)
    return {"params": n, "dtype": str(dtype)}


def prepare(args, wd: Path) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from ovlt.data.chat_template import encode_prompt
    from ovlt.data.image_processing import preprocess

    wd.mkdir(parents=True, exist_ok=True)
    m = model_cfg(args)
    t0 = _now()
    info = write_hf_dir(m, wd / "hf", args.device)
    info["hf_dir_seconds"] = _now() - t0
    img_dir = wd / "images"
    img_dir.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    n = args.prompts * args.steps
    rows = {"problem": [], "answer": [], "images": [], "id": [], "source": []}
    lens = []
    for i in range(n):
        arr = (rng.random((args.image, args.image, 3)) * 255).astype("uint8")
        p = img_dir / f"img_{i:04d}.png"
        Image.fromarray(arr).save(p)
        prob = PROBLEM.format(i=i)
        rows["problem"].append(prob)
        rows["answer"].append(ANSWER)
        rows["images"].append([str(p)])
        rows["id"].append(f"p{i}")
        rows["source"].append("bench")
        _, grid = preprocess(Image.open(p).convert("RGB"), args.min_pixels, args.max_pixels)
        lens.append(len(encode_prompt(prob + _suffix(), [grid], merge_size=m.vision.spatial_merge_size)))
    pq.write_table(pa.table(rows), wd / "rl.parquet")
    info.update(prompt_tokens_min=min(lens), prompt_tokens_max=max(lens),
                prompt_tokens_mean=sum(lens) / len(lens), image_grid=list(grid), n_prompts=n)
    return info


# ---------------------------------------------------------------------------------- ovlt side
def run_ovlt(args, wd: Path, res: dict, save):
    from ovlt.config import load_config
    from ovlt.distributed import destroy_distributed, init_distributed
    from ovlt.logging import setup_logging

    dev = args.device
    meta = json.loads((wd / "prep.json").read_text())
    budget = args.micro_batch * (meta["prompt_tokens_max"] + args.new)
    gbs = args.prompts * args.samples
    base = ROOT / "configs" / "grpo" / ("tiny_cpu.yaml" if args.tiny else "openvlthinker_7b.yaml")
    m = model_cfg(args)
    prec = "bf16" if dev == "cuda" else "fp32"
    ov = [f"model.hf_path={wd / 'hf'}", "model.transformer_impl=local", f"model.params_dtype={prec}",
          "parallel.tensor_parallel=1", "parallel.pipeline_parallel=1",
          f"data.rl_files=[{wd / 'rl.parquet'}]", f"data.min_pixels={args.min_pixels}",
          f"data.max_pixels={args.max_pixels}", "data.num_workers=0",
          "grpo.curriculum=[]", "grpo.train.freeze=[vision, merger]",
          f"grpo.train.recompute={args.recompute}", f"grpo.train.global_batch_size={gbs}",
          f"grpo.train.max_steps={args.steps}", f"grpo.train.save_dir={wd / 'ovlt_run'}",
          f"grpo.train.precision={prec}", "grpo.train.export_hf=false", "grpo.train.save_interval=0",
          f"grpo.optimizer.lr={args.lr}", "grpo.optimizer.weight_decay=0.01",
          "grpo.optimizer.clip_grad=1.0", "grpo.optimizer.lr_schedule=constant",
          "grpo.optimizer.warmup_ratio=0.0",
          f"grpo.prompts_per_step={args.prompts}", f"grpo.samples_per_prompt={args.samples}",
          f"grpo.clip_low={args.clip}", f"grpo.clip_high={args.clip}", "grpo.dual_clip=0",
          f"grpo.kl_coef={args.kl}", "grpo.kl_type=k3", "grpo.loss_agg=token_mean",
          "grpo.ref_mode=memory", "grpo.filter_zero_advantage=false", "grpo.overlong=none",
          f"grpo.max_tokens_per_micro_batch={budget}", "grpo.rollout_log_samples=0",
          "rollout.engine=builtin", f"rollout.temperature={args.temperature}",
          f"rollout.top_p={args.top_p}", "rollout.top_k=-1", f"rollout.max_new_tokens={args.new}",
          "rollout.tensor_parallel=1", f"rollout.max_batch_size={gbs}",
          f"rollout.cuda_graphs={'true' if dev == 'cuda' else 'false'}",
          f"rewards.num_workers={args.reward_workers}", "grpo.reward_fn=benchmarks.grpo_vs_trl:bench_reward"]
    if not args.tiny:
        ov += [f"model.num_layers={m.num_layers}", f"model.vision.depth={m.vision.depth}",
               f"model.vision.fullatt_block_indexes={m.vision.fullatt_block_indexes}"]
    cfg = load_config(base, ov, world_size=1, trainers=("grpo",))
    res["config_overrides"] = ov
    setup_logging(str(wd / "ovlt_run" / "logs"))
    init_distributed(cfg.parallel, seed=cfg.grpo.train.seed)
    trainer = None
    try:
        import ovlt.grpo.train as grpo_mod
        from benchmarks._bench_util import with_host_syncs
        from ovlt.grpo.train import GRPOTrainer
        from ovlt.grpo.data import PromptPosition

        host_syncs: dict = {}  # phase -> messages of the synchronizing CUDA calls it made

        def counting_syncs(phase, fn):
            """`fn` with every call that makes the host wait for the GPU recorded against
            `phase` (`with_host_syncs`)."""
            if dev != "cuda":
                return fn
            return lambda *a, **k: with_host_syncs(fn, host_syncs.setdefault(phase, []), *a, **k)

        mem = PhaseMemory(dev)
        # the log-prob passes and the updates are queued: a host sync inside them is one
        # inside the phase (each phase reads its numbers once, at its end, outside these)
        grpo_mod.queue_logprob_pass = mem.wrap("logprob", counting_syncs(
            "logprob", grpo_mod.queue_logprob_pass))
        grpo_mod.queue_update = mem.wrap("update", counting_syncs("update", grpo_mod.queue_update))

        t0 = _now()
        trainer = GRPOTrainer(cfg)
        trainer.setup(0)
        trainer.sync_weights()
        real_generate = trainer.engine.generate

        def generate(reqs, sp, on_complete=None):  # every response exactly --new tokens
            return real_generate(reqs, dataclasses.replace(sp, ignore_eos=True),
                                 on_complete=on_complete)
        trainer.engine.generate = mem.wrap("rollout", generate)
        _sync(dev)
        res["init_seconds"] = _now() - t0
        res["engine"] = type(trainer.engine).__name__
        res["ref_mode"] = trainer.ref.mode if trainer.ref else None
        pos = PromptPosition()
        res["steps"] = []
        for step in range(args.steps):
            host_syncs.clear()
            mem.start_step()
            try:
                _sync(dev)
                t = _now()
                rec, pos, rollouts = trainer.step(step, pos)
                _sync(dev)
                dt = _now() - t
            except Exception as e:  # noqa: BLE001
                res["steps"].append({"step": step + 1, "error": _err(e)})
                save()
                break
            gen = sum(len(r.response_ids) for r in rollouts)
            tot = sum(r.length for r in rollouts)
            n = len(rollouts)
            del rollouts  # what the step leaves allocated is read without it
            phases = {k[5:]: v for k, v in rec.items() if k.startswith("time/")}
            # each pass's own GPU time (the trainer's StepClock): old vs reference per token
            phases["old_logprob"] = rec.get("logprob_old_s")
            phases["ref_logprob"] = rec.get("logprob_ref_s")
            s_sync = {k: {"count": len(v), "first": v[:3]} for k, v in host_syncs.items()}
            s = {"step": step + 1, "step_s": dt, "phases": phases, "generated_tokens": gen,
                 "total_tokens": tot, "prompt_tokens": tot - gen, "samples": n,
                 "samples_trained": rec.get("samples_trained"), "updates": rec.get("updates"),
                 "response_length_mean": rec.get("response_length_mean"),
                 "loss": rec.get("loss"), "kl": rec.get("kl"), "grad_norm": rec.get("grad_norm"),
                 "reward_mean": rec.get("reward_mean"), "trainer_step_time_s": rec.get("step_time_s"),
                 "logprob_old_tokens": rec.get("logprob_old_tokens"),
                 "logprob_ref_tokens": rec.get("logprob_ref_tokens"),
                 "torch_compiles": rec.get("torch_compiles"),
                 "reward_batches": rec.get("reward_batches"),
                 "host_syncs": s_sync}
            for k in ("old", "ref"):
                if rec.get(f"logprob_{k}_s") and rec.get(f"logprob_{k}_tokens"):
                    s[f"logprob_{k}_us_per_token"] = \
                        1e6 * rec[f"logprob_{k}_s"] / rec[f"logprob_{k}_tokens"]
            s.update(mem.end_step(rec.get("mem_gb")))
            res["steps"].append(s)
            print("ovlt step", json.dumps(s), flush=True)
            save()
    finally:
        if trainer is not None:
            trainer.pool.close()
        destroy_distributed()


# ---------------------------------------------------------------------------------- TRL side
def make_processor(hf_dir, min_pixels, max_pixels):
    """Qwen2.5-VL processor from ovlt's tokenizer + HF's image processor. The video processor
    needs torchvision, which the device lacks; no video is ever processed, so it is left out."""
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor, Qwen2VLImageProcessor

    from ovlt.data.chat_template import QWEN2_5_VL_CHAT_TEMPLATE

    class Processor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor" and arg is None:
                return None
            return super().check_argument_for_proper_class(name, arg)

    tok = AutoTokenizer.from_pretrained(hf_dir, padding_side="left")
    ip = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    return Processor(image_processor=ip, tokenizer=tok, video_processor=None,
                     chat_template=QWEN2_5_VL_CHAT_TEMPLATE)


def bench_reward(response: str, ground_truth: str, **kwargs) -> float:
    """The reward of both sides: ovlt's math reward (the real grading work; 0 for a random
    model) + a deterministic hash of the text in [0, 1), so groups are not flat, advantages are
    non-zero and the weights actually change from step to step on both sides."""
    import zlib

    from ovlt.rewards.math_reward import math_reward
    return float(math_reward(response, ground_truth, **kwargs)) + \
        (zlib.crc32(response.encode("utf-8", "replace")) % 1000) / 1000.0


def warmup() -> None:
    """Called by RewardPool workers before their first item (math-verify's lazy imports)."""
    from ovlt.rewards.math_reward import warmup as w
    w()


def math_reward_fn(completions, answer, **kwargs):
    """`bench_reward` in TRL's reward-function signature (in-process, as TRL runs rewards)."""
    out = []
    for c, a in zip(completions, answer):
        text = c[-1]["content"] if isinstance(c, list) else c
        out.append(bench_reward(text, a))
    return out


def run_trl(args, wd: Path, res: dict, save):
    import pyarrow.parquet as pq
    import torch
    import transformers
    import trl
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration, TrainerCallback

    dev = args.device
    res["versions"] = {"trl": trl.__version__, "transformers": transformers.__version__}
    try:
        import datasets
        res["versions"]["datasets"] = datasets.__version__
    except Exception as e:  # noqa: BLE001
        res["datasets_error"] = _err(e)
        raise
    hf_dir = str(wd / "hf")
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    torch.manual_seed(0)
    t0 = _now()
    proc = make_processor(hf_dir, args.min_pixels, args.max_pixels)
    tab = pq.read_table(wd / "rl.parquet").to_pylist()
    rows = [{"prompt": [{"role": "user", "content": r["problem"] + _suffix()}],
             "image": Image.open(r["images"][0]).convert("RGB"), "answer": r["answer"]} for r in tab]
    ds = datasets.Dataset.from_list(rows)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        hf_dir, dtype=dtype, attn_implementation="sdpa", device_map=dev)
    visual = getattr(model, "visual", None) or model.model.visual
    visual.requires_grad_(False)  # vision tower + merger frozen, as on the ovlt side
    gbs = args.prompts * args.samples
    if gbs % args.micro_batch:
        raise ValueError(f"prompts x samples = {gbs} must be a multiple of --micro-batch")
    cfg = trl.GRPOConfig(
        output_dir=str(wd / "trl_run"), per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=gbs // args.micro_batch, num_generations=args.samples,
        max_completion_length=args.new, temperature=args.temperature, top_p=args.top_p, top_k=0,
        generation_kwargs={"min_new_tokens": args.new}, learning_rate=args.lr, weight_decay=0.01,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, beta=args.kl,
        epsilon=args.clip, loss_type="dapo", scale_rewards="group", num_iterations=1,
        use_vllm=False, bf16=dev == "cuda", use_cpu=dev == "cpu",
        gradient_checkpointing=args.recompute != "none", max_steps=args.steps, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
        dataloader_num_workers=0, remove_unused_columns=False, mask_truncated_completions=False)

    cur: dict = {}
    state = {"last": None}
    res["steps"] = []

    def close_step(global_step, step_s):
        ph = dict(cur)
        cur.clear()
        gen, prm = ph.pop("_generated_tokens", 0), ph.pop("_prompt_tokens", 0)
        n = ph.pop("_samples", 0)
        gs = ph.get("generate_and_score", 0.0)
        lp = (ph.get("old_logprob") or 0.0) + (ph.get("ref_logprob") or 0.0)
        ph["logprob"] = lp
        ph["other_prep"] = gs - ph.get("rollout", 0.0) - ph.get("reward", 0.0) - lp
        ph["update"] = step_s - gs
        ph["sync"] = 0.0  # HF generate runs on the training model: nothing to sync
        st = {"step": global_step, "step_s": step_s, "phases": ph, "generated_tokens": gen,
              "prompt_tokens": prm, "total_tokens": gen + prm, "samples": n}
        if dev == "cuda":
            st["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
            torch.cuda.reset_peak_memory_stats()
        res["steps"].append(st)
        print("trl step", json.dumps(st), flush=True)
        save()  # after every step: a timeout later still leaves the finished steps

    class StepTimer(TrainerCallback):
        def on_train_begin(self, a, s, c, **kw):
            _sync(dev)
            state["last"] = _now()

        def on_step_end(self, a, s, c, **kw):
            _sync(dev)
            now = _now()
            close_step(s.global_step, now - state["last"])
            state["last"] = now

    trainer = trl.GRPOTrainer(model=model, reward_funcs=[math_reward_fn], args=cfg, train_dataset=ds,
                              processing_class=proc, callbacks=[StepTimer()])
    _sync(dev)
    res["init_seconds"] = _now() - t0
    res["eos_token_ids"] = list(trainer.eos_token_ids)

    def wrap(name, key_fn, post=None):
        orig = getattr(trainer, name)

        def w(*a, **k):
            _sync(dev)
            t = _now()
            out = orig(*a, **k)
            _sync(dev)
            key = key_fn(a, k)
            if key:
                cur[key] = cur.get(key, 0.0) + _now() - t
            if post:
                post(out)
            return out
        setattr(trainer, name, w)

    def count_tokens(out):
        prompt_ids, completion_ids = out[0], out[1]
        cur["_prompt_tokens"] = cur.get("_prompt_tokens", 0) + sum(len(p) for p in prompt_ids)
        cur["_generated_tokens"] = cur.get("_generated_tokens", 0) + sum(len(c) for c in completion_ids)
        cur["_samples"] = cur.get("_samples", 0) + len(completion_ids)

    def lp_key(a, k):
        if torch.is_grad_enabled():
            return None  # the training forward: part of the update
        mdl = a[0] if a else k.get("model")
        return "ref_logprob" if mdl is trainer.ref_model else "old_logprob"

    wrap("_generate", lambda a, k: "rollout", count_tokens)
    wrap("_calculate_rewards", lambda a, k: "reward")
    wrap("_get_per_token_logps_and_entropies", lp_key)
    wrap("_generate_and_score_completions", lambda a, k: "generate_and_score")

    trainer.train()
    res["log_history"] = trainer.state.log_history[-args.steps - 1:]
    save()


# ---------------------------------------------------------------------------------- summary
def summarize(side: dict) -> dict | None:
    steps = [s for s in side.get("steps", []) if "error" not in s and s.get("step_s")]
    if not steps:
        return None
    timed = steps[1:] if len(steps) > 1 else steps
    med = lambda xs: statistics.median(xs)  # noqa: E731
    keys = sorted({k for s in timed for k, v in s["phases"].items() if isinstance(v, (int, float))})
    out = {"timed_steps": [s["step"] for s in timed], "first_step_s": steps[0]["step_s"],
           "step_s": med([s["step_s"] for s in timed]),
           "phases_s": {k: med([s["phases"].get(k) or 0.0 for s in timed]) for k in keys},
           "generated_tokens": med([s["generated_tokens"] for s in timed]),
           "total_tokens": med([s["total_tokens"] for s in timed])}
    out["generated_tokens_per_s"] = out["generated_tokens"] / out["step_s"]
    out["total_tokens_per_s"] = out["total_tokens"] / out["step_s"]
    if out["phases_s"].get("rollout"):
        out["rollout_generated_tokens_per_s"] = out["generated_tokens"] / out["phases_s"]["rollout"]
    mem = [s.get("peak_mem_gib") for s in timed if s.get("peak_mem_gib")]
    if mem:
        out["peak_mem_gib"] = max(mem)
    out["per_step_peak_mem_gib"] = [s.get("peak_mem_gib") for s in steps]
    out.update(steady_state(out["per_step_peak_mem_gib"]))
    for k in ("old", "ref"):
        v = [s[f"logprob_{k}_us_per_token"] for s in timed if s.get(f"logprob_{k}_us_per_token")]
        if v:
            out[f"logprob_{k}_us_per_token"] = med(v)
    comp = [s.get("torch_compiles") for s in timed if s.get("torch_compiles") is not None]
    if comp:
        out["torch_compiles_after_step_1"] = sum(comp)
    return out


def extrapolate(args, prep: dict, summ: dict) -> dict:
    """Recipe estimate from one side's measured phases (see `formula`)."""
    from ovlt.engine.flops import train_step_flops
    m, rm = model_cfg(args), recipe_model_cfg()
    R, P = args.recipe_response, int(round(prep["prompt_tokens_mean"]))
    grid = tuple(prep["image_grid"])
    per_gpu = args.recipe_prompts * args.recipe_samples // args.recipe_gpus
    n_bench = args.prompts * args.samples
    fz = ["vision", "merger"]
    bench_len = int(round(summ["total_tokens"] / n_bench))
    f_bench = train_step_flops(m, [bench_len] * n_bench, [grid] * n_bench, fz).total
    f_recipe = train_step_flops(rm, [P + R] * per_gpu, [grid] * per_gpu, fz).total
    flops_ratio = f_recipe / f_bench
    tok_ratio = per_gpu * R / summ["generated_tokens"]
    layer_ratio = rm.num_layers / m.num_layers
    ph = summ["phases_s"]
    est = {"rollout": ph.get("rollout", 0.0) * tok_ratio * layer_ratio,
           "reward": ph.get("reward", 0.0) * per_gpu / n_bench,
           "logprob": ph.get("logprob", 0.0) * flops_ratio,
           "update": ph.get("update", 0.0) * flops_ratio,
           "sync": ph.get("sync", 0.0),
           "other_prep": ph.get("other_prep", 0.0) * per_gpu / n_bench}
    total = sum(est.values())
    return {"ESTIMATE": True, "phases_s": est, "step_s": total,
            "vs_easyr1_step_s": args.easyr1_step_s, "ratio_easyr1_over_estimate": args.easyr1_step_s / total,
            "assumptions": {"recipe": f"Qwen2.5-VL-7B (28 LLM + 32 vision layers), {args.recipe_prompts} "
                                      f"prompts x {args.recipe_samples} samples on {args.recipe_gpus} GPUs "
                                      f"= {per_gpu} samples per GPU",
                            "mean_response_tokens": R, "prompt_tokens": P, "image_grid": list(grid),
                            "flops_ratio_recipe_per_gpu_over_bench": flops_ratio,
                            "generated_token_ratio": tok_ratio, "layer_ratio": layer_ratio},
            "formula": ("rollout_est = rollout_meas x (samples_per_gpu x R / generated_meas) x (28 / L); "
                        "logprob_est, update_est = meas x train_step_flops(recipe, per GPU) / "
                        "train_step_flops(bench) (ovlt.engine.flops, vision frozen); "
                        "reward_est, other_est = meas x samples_per_gpu / samples_meas; sync_est = meas. "
                        "Crude: decode time is taken as proportional to generated tokens and layer count "
                        "(ignores the LM-head/sampling share that does not scale with layers -> over-"
                        "estimate; ignores the longer KV cache at R tokens and TP=2 / batching "
                        "differences -> under-estimate); update and log-prob assume the same MFU at 7B "
                        "scale and DP=8 with no communication cost. Not a measurement.")}


def side_main(args) -> int:
    wd = Path(args.workdir)
    out = wd / f"side_{args.side}.json"
    res: dict = {"side": args.side}
    save = lambda: _write(out, res)  # noqa: E731
    try:
        (run_ovlt if args.side == "ovlt" else run_trl)(args, wd, res, save)
    except BaseException as e:  # noqa: BLE001 - recorded; the parent reads it
        res["error"] = _err(e)
        print(res["error"], file=sys.stderr, flush=True)
    save()
    return 0 if "error" not in res else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model / batch (CPU smoke run)")
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"])
    ap.add_argument("--llm-layers", type=int, default=4)
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--image", type=int, default=448)
    ap.add_argument("--min-pixels", type=int, default=3136)
    ap.add_argument("--max-pixels", type=int, default=262144)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--micro-batch", type=int, default=8, help="samples per fwd/bwd micro-batch")
    ap.add_argument("--recompute", default="none", choices=["none", "full"])
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--kl", type=float, default=0.01)
    ap.add_argument("--clip", type=float, default=0.2)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.99)
    ap.add_argument("--reward-workers", type=int, default=4)
    ap.add_argument("--sides", default="ovlt,trl")
    ap.add_argument("--side-timeout", type=float, default=300.0, help="max seconds per side subprocess")
    ap.add_argument("--time-budget", type=float, default=320.0,
                    help="whole run (prep + both sides) is cut here: the last side is killed and "
                         "its finished steps are kept")
    ap.add_argument("--recipe-prompts", type=int, default=512)
    ap.add_argument("--recipe-samples", type=int, default=5)
    ap.add_argument("--recipe-gpus", type=int, default=8)
    ap.add_argument("--recipe-response", type=int, default=1024,
                    help="assumed mean response length of the recipe (max 2048)")
    ap.add_argument("--easyr1-step-s", type=float, default=145.0)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep-workdir", action="store_true")
    ap.add_argument("--side", default=None, choices=["ovlt", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--out", default="benchmarks/results/grpo_vs_trl_h100.json")
    args = ap.parse_args(argv)
    import torch
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tiny:
        args.prompts, args.samples, args.new = min(args.prompts, 4), min(args.samples, 2), min(args.new, 8)
        args.image, args.micro_batch, args.reward_workers = min(args.image, 56), 4, 1
        args.llm_layers = 4
    if args.device == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.side:
        return side_main(args)

    import shutil
    import tempfile
    start = _now()
    wd = Path(args.workdir or tempfile.mkdtemp(prefix="ovlt_grpo_bench_"))
    res = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "torch": torch.__version__,
           "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
           "config": vars(args), "what": __doc__, "sides": {},
           "notes": [
               "Equal work: same HF weights, same prompt token ids and pixels, every response exactly "
               "--new tokens (EOS suppressed on both sides), same P x n, one optimizer update per step.",
               "Differences that are part of each trainer: ovlt keeps fp32 master weights + fp32 grads "
               "+ fp32 Adam moments (mcore distributed optimizer); TRL/HF Trainer trains bf16 params "
               "with bf16 Adam moments. Neither side runs an old-log-prob pass here (one "
               "generation feeds exactly one optimizer step: the update is on-policy). ovlt "
               "recaptures its decode CUDA graph every step (the engine sleeps to free memory for "
               "the update). ovlt grades rewards in worker processes as they stream from the "
               "engine, TRL in-process.",
               "step 1 includes compilation / graph capture / lazy init; summaries are medians of "
               "steps 2..N; phases are each trainer's own timers (TRL: wrapped methods)."]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save = lambda: _write(out, res)  # noqa: E731
    try:
        t0 = _now()
        res["prep"] = prepare(args, wd)
        res["prep"]["seconds"] = _now() - t0
        _write(wd / "prep.json", res["prep"])
        print("prep", json.dumps(res["prep"]), flush=True)
    except Exception as e:  # noqa: BLE001
        res["prep_error"] = _err(e)
        print(res["prep_error"], file=sys.stderr)
        save()
        return 1
    save()
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    for side in [s for s in args.sides.split(",") if s]:
        cmd = [sys.executable, str(Path(__file__).resolve()), *passthrough, "--side", side,
               "--workdir", str(wd), "--device", args.device]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        t0 = _now()
        log_path = wd / f"side_{side}.log"
        rc = None
        with open(log_path, "w") as log:
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
            try:
                left = args.time_budget - (_now() - start) - 3.0
                rc = p.wait(timeout=max(5.0, min(args.side_timeout, left)))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                rc = "timeout"
        sj = wd / f"side_{side}.json"
        side_res = json.loads(sj.read_text()) if sj.exists() else {}
        side_res["rc"], side_res["wall_seconds"] = rc, _now() - t0
        tail = log_path.read_text()[-4000:]
        if rc != 0:
            side_res["log_tail"] = tail
        print(f"---- {side} (rc={rc}, {side_res['wall_seconds']:.1f} s), log tail:\n{tail[-2500:]}", flush=True)
        try:
            side_res["summary"] = summarize(side_res)
            if side_res["summary"]:
                side_res["recipe_estimate"] = extrapolate(args, res["prep"], side_res["summary"])
                if args.tiny:
                    side_res["recipe_estimate"]["NOTE"] = "tiny smoke run: meaningless numbers"
        except Exception as e:  # noqa: BLE001
            side_res["summary_error"] = _err(e)
        res["sides"][side] = side_res
        save()
    so, st = (res["sides"].get(k, {}).get("summary") for k in ("ovlt", "trl"))
    if so and st:
        res["comparison"] = {
            "step_s_trl_over_ovlt": st["step_s"] / so["step_s"],
            "total_tokens_per_s_ovlt_over_trl": so["total_tokens_per_s"] / st["total_tokens_per_s"],
            "generated_tokens_per_s_ovlt_over_trl": so["generated_tokens_per_s"] / st["generated_tokens_per_s"],
            "phase_s_trl_over_ovlt": {k: (st["phases_s"].get(k, 0.0) / v if v else None)
                                      for k, v in so["phases_s"].items()
                                      if k in ("rollout", "reward", "logprob", "update")},
            "equal_work": {"generated_tokens": [so["generated_tokens"], st["generated_tokens"]],
                           "total_tokens": [so["total_tokens"], st["total_tokens"]]}}
    save()
    print(json.dumps({k: res[k] for k in ("comparison",) if k in res}, indent=1))
    for k in ("ovlt", "trl"):
        s = res["sides"].get(k, {})
        print(k, json.dumps(s.get("summary")), "error:" if s.get("error") else "",
              (s.get("error") or "")[:300])
    print(f"wrote {out}")
    if not args.keep_workdir:
        shutil.rmtree(wd, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
