"""One GPU doing one eighth of an OpenVLThinker GRPO step (512 prompts x 5 samples on 8 GPUs),
end to end, with the recipe's shapes; variants side by side, and the 8xH100 step extrapolated.

    python3 benchmarks/grpo_recipe.py                                      # GPU: all variants
    python3 benchmarks/grpo_recipe.py --tiny --device cpu --out /tmp/r.json  # CPU smoke run

The workload (every variant the same):
- 64 prompts x 5 samples per step, one image per prompt at the recipe's max_pixels (a 512x512
  noise PNG, smart-resized to 504x504: 324 image tokens), a short math question + the recipe's
  prompt suffix; distinct questions every step, the 64 images reused (the vision tower's cost
  does not depend on the pixels).
- response lengths: lognormal with median 500 tokens and sigma 0.6 (mean ~600, p95 ~1340),
  capped at 2048 (the recipe's max response). Why: R1-style chains of a 7B VLM early in GRPO
  average ~400-700 tokens with a long right tail, and the cap binds for ~1 % of responses.
  Drawn stratified (the 64 quantiles (k+0.5)/64 of the capped law, assigned to the prompts in
  a seeded random order), the same assignment every step, so steps do equal work and per-step
  peak memory is a steady-state check. One cap per request (the n=5 samples of a prompt share
  it and their prefill, as the recipe's requests do; `--length-unit sample` gives every
  sample its own request and length). Decoded to exactly that length: per-request
  `max_new_tokens`, `SamplingParams.ignore_eos`, so random weights give the real workload.
- model: Qwen2.5-VL-7B widths and vocab (hidden 3584, 28 heads / 4 KV groups, FFN 18944, vocab
  152064 untied; vision 32 layers x 1280, frozen with the merger as in the recipe's first
  stage), random init (std 0.02), bf16, with `--llm-layers` LLM layers: by default 8 on an
  80 GB GPU, 16 on a 141 GB one (what fits beside fp32 grads + fp32 Adam master/moments, the
  reference model and the rollout's KV cache; the file records which).
- recipe settings: temperature 1.0, top-p 0.99; update batch 128 prompts x 5 = 640 samples on
  8 GPUs = 80 per GPU, so a step has 320 / 80 = 4 optimizer updates (old log-probs needed for
  updates 2-4); AdamW lr 1e-6, wd 0.01, clip 1.0; PPO clip 0.2 / 0.3, dual clip 3; low-var KL
  0.01 to a reference offloaded to host memory but for its pass (`--ref-mode`); token-mean
  loss; selective recompute; micro-batches packed to `--micro-batch-tokens` (4096) without
  padding. Both are what lets the step fit an 80 GB card at 28 layers
  (`recipe_extrapolation.memory_28_layers`). Every response ends at its cap, so the
  overlong mask is off (`grpo.overlong=none`). Reward: `grpo_vs_trl.bench_reward` (the math
  grader + a hash of the text: non-flat groups, so the weights change every step).

Variants (each in its own subprocess, one after the other, same data and model):
- `ovlt_builtin`: the real trainer (`GRPOTrainer.step`) with the built-in engine (continuous
  batching, weights shared with the trainer);
- `ovlt_vllm`: the same trainer with vLLM colocated (sleep / wake, weights from the reshard
  stream each step);
- `trl_vllm`: TRL's `GRPOTrainer`, vLLM colocated (`vllm_mode="colocate"`, sleep mode), bf16,
  4 optimizer steps per generation (`steps_per_generation`), per-request lengths passed to
  vLLM as per-prompt `SamplingParams` (max_tokens, ignore_eos). Its weights come from an HF
  directory written through the project's export path (only when this variant can run).
A variant whose packages are missing is recorded with the reason and not started.

Per step: wall time (device synced at both ends), the trainer's phases (rollout, reward, logprob,
update, sync; the old and reference passes' own GPU times and tokens), peak allocated memory
(per phase and per step: the proof that steps 2..N hold a steady state), memory left allocated
after the step, torch.compile graphs built, host syncs inside the log-prob and update phases.
Summary: medians of steps 2..N. `recipe_extrapolation`: the 8xH100 recipe step from the
measured phases (see its `formula`).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import json
import math
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._grpo_bench import (device_sync, error_text, finished_steps,  # noqa: E402
                                    gpu_info, lognormal_lengths, logprob_and_compile_stats, model_cfg,
                                    noise_images, now, prompt_tokens, recipe_model_cfg,
                                    record_prep, result_header, run_child, run_ovlt_steps,
                                    run_recorded, steady_state, trl_inputs, write_hf_config,
                                    write_hf_dir, write_json, write_rl_parquet)
from ovlt.config import GRPOConfig, allowed_values  # noqa: E402

VARIANTS = ("ovlt_builtin", "ovlt_vllm", "trl_vllm")
# a side of each ovlt variant: its engine's rollout alone at the recipe's 28 layers
FULL_DEPTH = {"ovlt_builtin": "ovlt_builtin_rollout_28_layers",
              "ovlt_vllm": "ovlt_vllm_rollout_28_layers"}
GiB = float(1 << 30)


# ---------------------------------------------------------------------------------- workload
def default_llm_layers(device: str, total_gib: float | None = None) -> int:
    """LLM layers that fit one GPU beside the trainer's state and the engine (see docstring)."""
    if device != "cuda":
        return 4
    total = total_gib if total_gib is not None else gpu_info()[1]
    return 16 if total > 120 else 8


def prepare(args, wd: Path) -> dict:
    """Images, the RL parquet (steps x prompts distinct questions) and the length table."""
    from PIL import Image

    from ovlt.data.image_processing import preprocess

    wd.mkdir(parents=True, exist_ok=True)
    paths = noise_images(wd / "images", args.prompts, args.image, digits=3)
    m = model_cfg(args)
    _, grid = preprocess(Image.open(paths[0]).convert("RGB"), args.min_pixels, args.max_pixels)
    write_rl_parquet(wd / "rl.parquet", args.prompts * args.steps, paths)
    lens = [prompt_tokens(i, grid, m.vision.spatial_merge_size) for i in range(args.prompts)]
    per = args.prompts if args.length_unit == "prompt" else args.prompts * args.samples
    caps = lognormal_lengths(per, args.len_median, args.len_sigma, args.len_cap, seed=17)
    if args.length_unit == "prompt":
        caps = [[c] * args.samples for c in caps]
    else:
        caps = [caps[i * args.samples:(i + 1) * args.samples] for i in range(args.prompts)]
    flat = [c for cs in caps for c in cs]
    return {"image_grid": [int(x) for x in grid], "prompt_tokens_mean": sum(lens) / len(lens),
            "prompt_tokens_max": max(lens), "lengths": caps,
            "response_tokens_per_step": sum(flat), "response_tokens_mean": sum(flat) / len(flat),
            "response_tokens_max": max(flat),
            "response_tokens_median": statistics.median(flat)}


# ---------------------------------------------------------------------------------- exact lengths
class ExactLengths:
    """Wraps an engine's `generate` so prompt i of a step decodes exactly its drawn lengths:
    per-request `max_new_tokens` and `ignore_eos` (unit "prompt": the request keeps its n
    samples; unit "sample": one request per sample, seed s + j as vLLM's n would give).
    A completion longer than its length (an engine that ignores per-request caps decodes to
    the largest) is cut to it before anyone sees it, and counted in `truncated` (the work is
    then not the workload: the results say so); one shorter (EOS honoured anyway) is counted
    in `mismatches`."""

    def __init__(self, engine, lengths, unit: str, tokenizer=None):
        self.engine, self.lengths, self.unit, self.tok = engine, lengths, unit, tokenizer
        self.real = engine.generate
        self.mismatches = self.truncated = 0
        engine.generate = self.generate

    def _fit(self, c, cap):
        if len(c.token_ids) <= cap:
            self.mismatches += len(c.token_ids) < cap
            return c
        self.truncated += 1
        ids = list(c.token_ids[:cap])
        text = self.tok.decode(ids, skip_special_tokens=True) if self.tok is not None else c.text
        return dataclasses.replace(c, token_ids=ids, logprobs=list(c.logprobs[:cap]), text=text,
                                   finish_reason="length")

    def generate(self, requests, params, on_complete=None):
        from ovlt.rollout.base import request_seeds
        P, n = len(self.lengths), params.n
        params = dataclasses.replace(params, ignore_eos=True,
                                     max_new_tokens=max(c for cs in self.lengths for c in cs))
        if self.unit == "prompt":
            caps = [[self.lengths[i % P][0]] * n for i in range(len(requests))]
            reqs = [dataclasses.replace(r, max_new_tokens=caps[i][0])
                    for i, r in enumerate(requests)]

            def cb(i, c):
                if on_complete is not None:
                    on_complete(i, self._fit(c, caps[i][0]))
            got = self.real(reqs, params, on_complete=cb)
            self.mismatches = self.truncated = 0  # counted again on the returned lists
            return [[self._fit(c, caps[i][0]) for c in cs] for i, cs in enumerate(got)]
        caps = [self.lengths[i % P][:n] for i in range(len(requests))]
        seeds = request_seeds(requests, params)
        reqs = [dataclasses.replace(r, max_new_tokens=caps[i][j], seed=seeds[i] + j)
                for i, r in enumerate(requests) for j in range(n)]

        def cb1(k, c):
            if on_complete is not None:
                on_complete(k // n, self._fit(dataclasses.replace(c, index=k % n),
                                              caps[k // n][k % n]))
        flat = self.real(reqs, dataclasses.replace(params, n=1), on_complete=cb1)
        self.mismatches = self.truncated = 0
        return [[self._fit(dataclasses.replace(flat[i * n + j][0], index=j), caps[i][j])
                 for j in range(n)] for i in range(len(requests))]


# ---------------------------------------------------------------------------------- ovlt variants
def ovlt_overrides(args, wd: Path, engine: str) -> list[str]:
    dev = args.device
    prec = "bf16" if dev == "cuda" else "fp32"
    m = model_cfg(args)
    n = args.prompts * args.samples
    ov = ["model.hf_path=", "model.transformer_impl=local", f"model.params_dtype={prec}",
          "parallel.tensor_parallel=1", "parallel.pipeline_parallel=1",
          f"data.rl_files=[{wd / 'rl.parquet'}]", f"data.min_pixels={args.min_pixels}",
          f"data.max_pixels={args.max_pixels}", "data.num_workers=0",
          "grpo.curriculum=[]", "grpo.train.freeze=[vision, merger]",
          f"grpo.train.recompute={args.recompute}",
          f"grpo.train.global_batch_size={args.update_samples}",
          f"grpo.train.max_steps={args.steps}", f"grpo.train.save_dir={wd / ('run_' + engine)}",
          f"grpo.train.precision={prec}", "grpo.train.export_hf=false", "grpo.train.save_interval=0",
          "grpo.optimizer.lr=1e-6", "grpo.optimizer.weight_decay=0.01",
          "grpo.optimizer.clip_grad=1.0", "grpo.optimizer.lr_schedule=constant",
          "grpo.optimizer.warmup_ratio=0.0",
          f"grpo.prompts_per_step={args.prompts}", f"grpo.samples_per_prompt={args.samples}",
          "grpo.clip_low=0.2", "grpo.clip_high=0.3", "grpo.dual_clip=3.0",
          f"grpo.kl_coef={args.kl}", "grpo.kl_type=low_var_kl", "grpo.loss_agg=token_mean",
          f"grpo.ref_mode={args.ref_mode}", "grpo.filter_zero_advantage=false", "grpo.overlong=none",
          f"grpo.max_tokens_per_micro_batch={args.micro_batch_tokens}",
          "grpo.rollout_log_samples=0", f"rollout.engine={engine}", "rollout.temperature=1.0",
          "rollout.top_p=0.99", "rollout.top_k=-1", f"rollout.max_new_tokens={args.len_cap}",
          "rollout.tensor_parallel=1", f"rollout.max_batch_size={n}",
          f"rollout.gpu_memory_utilization={args.vllm_mem}",
          f"rollout.cuda_graphs={'true' if dev == 'cuda' else 'false'}",
          f"rewards.num_workers={args.reward_workers}",
          "grpo.reward_fn=benchmarks.grpo_vs_trl:bench_reward"]
    if not args.tiny:
        ov += [f"model.num_layers={m.num_layers}", f"model.vision.depth={m.vision.depth}",
               f"model.vision.fullatt_block_indexes={m.vision.fullatt_block_indexes}"]
    return ov + list(args.override)


def ovlt_config(args, wd: Path, engine: str, *extra: str):
    """(the GRPO JobConfig of an ovlt variant, its overrides): the recipe's config (the tiny
    one with --tiny) with `ovlt_overrides` and `extra` applied."""
    from ovlt.config import CONFIG_ROOT, load_config
    base = CONFIG_ROOT / "grpo" / ("tiny_cpu.yaml" if args.tiny else "openvlthinker_7b.yaml")
    ov = ovlt_overrides(args, wd, engine) + list(extra)
    return load_config(base, ov, world_size=1, trainers=("grpo",)), ov


def run_ovlt(args, wd: Path, res: dict, save, engine: str):
    dev = args.device
    prep = json.loads((wd / "prep.json").read_text())
    cfg, ov = ovlt_config(args, wd, engine)
    res["config_overrides"] = ov
    if engine == "vllm":  # vLLM reads config + tokenizer from a directory, weights come
        import ovlt.rollout as rollout_mod
        hf_dir = wd / "hf_config"  # from the trainer (load_format dummy)
        real_make = rollout_mod.make_engine
        rollout_mod.make_engine = lambda *a, **k: real_make(*a, **dict(k, hf_dir=str(hf_dir)))
    lengths = None

    def on_ready(trainer):
        nonlocal lengths
        lengths = ExactLengths(trainer.engine, prep["lengths"], args.length_unit, trainer.tok)
        return {"llm_layers": cfg.model.num_layers, "vision_layers": cfg.model.vision.depth}

    def step_fields(rec, s):
        s.update(logprob_old_gpu_s=rec.get("logprob_old_s"),
                 logprob_ref_gpu_s=rec.get("logprob_ref_s"),
                 length_mismatches=lengths.mismatches,
                 lengths_truncated_by_benchmark=lengths.truncated)

    run_ovlt_steps(cfg, dev, res, save, steps=args.steps, log_dir=wd / f"run_{engine}" / "logs",
                   label=engine, count_syncs=bool(args.count_syncs), torch_seed=0,
                   on_ready=on_ready, step_fields=step_fields,
                   isolate_passes=bool(args.isolate_passes), profile_step=args.profile_step,
                   profile_trace=(f"{args.profile_trace}.{engine}.json.gz"
                                  if args.profile_trace else None),
                   memory_sites=bool(args.memory_sites))


def run_rollout_full_depth(args, wd: Path, res: dict, save, engine: str):
    """The variant's engine alone with the recipe's 28 LLM layers (bf16, no optimizer, no
    reference: what a trainer's 8 layers leave room for is not the question here) on the
    trainer's own requests and sampling for steps 1..`--rollout-reps`: the rollout phase
    measured at full depth, not scaled from the trainer's run. Timed like the trainer's
    phase: requests built, generate, engine asleep. vLLM gets random weights of its own
    (`load_format="dummy"`, a 28-layer config directory) and `--full-depth-vllm-mem` of the
    GPU: room for every sequence's KV at once, as the built-in engine's slots have. It stays
    awake between rollouts (its level-2 sleep discards weights, and these come from no
    trainer), its prefix and encoder caches dropped after each as a weight update drops
    them; the trainer's runs time its sleep (~0.3 s) in their rollout phase."""
    import torch

    from ovlt.distributed import destroy_distributed, init_distributed
    from ovlt.engine.model_setup import build_vl_model
    from ovlt.grpo.data import PromptPosition
    from ovlt.grpo.train import GRPOTrainer
    from ovlt.logging import setup_logging
    from ovlt.rollout import make_engine

    dev = args.device
    prep = json.loads((wd / "prep.json").read_text())
    layers = args.llm_layers if args.tiny else recipe_model_cfg().num_layers
    extra = [f"model.num_layers={layers}"]
    if engine == "vllm":
        extra.append(f"rollout.gpu_memory_utilization={args.full_depth_vllm_mem}")
    cfg, _ = ovlt_config(args, wd, engine, *extra)
    setup_logging(str(wd / f"run_rollout_full_depth_{engine}" / "logs"))
    init_distributed(cfg.parallel, seed=cfg.grpo.train.seed)
    trainer = None
    try:
        torch.manual_seed(0)
        trainer = GRPOTrainer(cfg)  # its tokenizer, images and prompt stream; no model
        if engine == "vllm":
            hf_dir = wd / f"hf_config_{layers}_layers"
            write_config_dir(args, dataclasses.replace(model_cfg(args), num_layers=layers), hf_dir)
            eng = make_engine(cfg, tokenizer=trainer.tok, hf_dir=str(hf_dir), load_format="dummy")
        else:
            model = build_vl_model(cfg, cfg.grpo.train.precision).eval()
            eng = make_engine(cfg, model=model, tokenizer=trainer.tok)
        trainer.engine = eng
        lengths = ExactLengths(eng, prep["lengths"], args.length_unit, trainer.tok)
        res.update(llm_layers=layers, engine=type(eng).__name__, steps=[])
        pos = PromptPosition()
        for step in range(args.rollout_reps):
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            device_sync(dev)
            t = now()
            batch = trainer.step_requests(step, pos)
            comps = eng.generate(batch.requests, batch.params)
            if engine != "vllm":
                eng.sleep()
            device_sync(dev)
            pos = batch.next_position
            rec = {"step": step + 1, "rollout_s": now() - t,
                   "generated_tokens": sum(len(c.token_ids) for cs in comps for c in cs),
                   "length_mismatches": lengths.mismatches,
                   "lengths_truncated_by_benchmark": lengths.truncated,
                   "engine_stats": dict(getattr(eng, "last_stats", {}) or {})}
            if dev == "cuda":
                rec["peak_mem_gib"] = torch.cuda.max_memory_allocated() / GiB
            if engine == "vllm":
                eng.reset_caches()
            res["steps"].append(rec)
            save()
    finally:
        if trainer is not None:
            trainer.pool.close()  # its reward workers (unused here)
        destroy_distributed()


def rollout_full_depth_summary(side: dict) -> dict | None:
    """Median rollout seconds of the full-depth side's steps 2..N (step 1 compiles and
    captures)."""
    steps = [s for s in side.get("steps", []) if s.get("rollout_s")]
    timed = steps[1:] if len(steps) > 1 else steps
    if not timed:
        return None
    return {"llm_layers": side.get("llm_layers"), "timed_steps": [s["step"] for s in timed],
            "rollout_s": statistics.median(s["rollout_s"] for s in timed),
            "first_rollout_s": steps[0]["rollout_s"],
            "generated_tokens": timed[-1]["generated_tokens"],
            "engine_stats": timed[-1].get("engine_stats")}


# ---------------------------------------------------------------------------------- TRL + vLLM
def as_number(v):
    """A logged value as a float (printing callbacks may have made it a string), else None."""
    if isinstance(v, bool):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def trl_logs_from_text(text: str) -> list[dict]:
    """TRL's per-optimizer-step log dicts as its console printed them (`{'loss': '0', ...,
    'step_time': '25.33', ...}`), read back from a log tail: the numbers of a run from before
    `trl_logs` were saved as they came. Literals only (`ast.literal_eval`), never code."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not (line.startswith("{") and line.endswith("}") and "step_time" in line):
            continue
        try:
            d = ast.literal_eval(line)
        except (ValueError, SyntaxError):
            continue
        if isinstance(d, dict):
            out.append({k: n for k, n in ((k, as_number(v)) for k, v in d.items()) if n is not None})
    return out


def run_trl_vllm(args, wd: Path, res: dict, save):
    """TRL's GRPOTrainer, vLLM colocated (TRL's documented fast set-up for one node), on the
    same HF weights, prompts and lengths. A TRL step = one generation of 320 samples and its
    4 optimizer steps (timed between generations)."""
    import torch
    import transformers
    import trl
    from transformers import TrainerCallback

    from benchmarks.grpo_vs_trl import math_reward_fn

    dev = args.device
    prep = json.loads((wd / "prep.json").read_text())
    res["versions"] = {"trl": trl.__version__, "transformers": transformers.__version__}
    t0 = now()
    proc, ds, model = trl_inputs(args, wd, torch.bfloat16)
    res["inputs_seconds"] = now() - t0
    save()
    n_gen = args.prompts * args.samples
    micro = args.trl_micro_batch
    if args.update_samples % micro:
        raise ValueError(f"--update-samples {args.update_samples} must be a multiple of "
                         f"--trl-micro-batch {micro}")
    cfg = trl.GRPOConfig(
        output_dir=str(wd / "trl_run"), per_device_train_batch_size=micro,
        gradient_accumulation_steps=args.update_samples // micro,
        # one generation of all the step's samples, consumed by n_gen / update_samples
        # optimizer steps (TRL counts `steps_per_generation` in micro-batches)
        generation_batch_size=n_gen, num_generations=args.samples,
        max_completion_length=args.len_cap, temperature=1.0, top_p=0.99, top_k=0,
        learning_rate=1e-6, weight_decay=0.01, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=1.0, beta=args.kl, epsilon=0.2, epsilon_high=0.3, loss_type="dapo",
        scale_rewards="group", num_iterations=1, use_vllm=True, vllm_mode="colocate",
        vllm_gpu_memory_utilization=args.vllm_mem, vllm_enable_sleep_mode=True,
        bf16=True, gradient_checkpointing=args.recompute != "none",
        max_steps=args.steps * (n_gen // args.update_samples), logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
        dataloader_num_workers=0, remove_unused_columns=False, mask_truncated_completions=False)
    res["steps"] = []
    cur: dict = {"gen_start": None}

    class StepTimer(TrainerCallback):
        def on_train_begin(self, a, s, c, **kw):
            device_sync(dev)
            torch.cuda.reset_peak_memory_stats()

        def on_log(self, a, s, c, logs=None, **kw):
            # TRL's own numbers per optimizer step, as it logs them (step_time, loss,
            # grad_norm, its vLLM-vs-trainer log-prob gap and importance-sampling ratio):
            # saved as they come, so a run cut short still shows how far it got
            res.setdefault("trl_logs", []).append(
                {k: n for k, n in ((k, as_number(v)) for k, v in (logs or {}).items())
                 if n is not None})
            save()

    trainer = trl.GRPOTrainer(model=model, reward_funcs=[math_reward_fn], args=cfg,
                              train_dataset=ds, processing_class=proc, callbacks=[StepTimer()])
    res["init_seconds"] = now() - t0
    save()
    flat = [c for cs in prep["lengths"] for c in cs]
    gen_backend = getattr(trainer, "vllm_generation", None)  # TRL >= 1.x keeps vLLM there
    llm = gen_backend.llm if gen_backend is not None else trainer.llm
    res["trl_vllm_llm_kwargs"] = {"max_num_seqs": getattr(gen_backend, "max_num_seqs", None)}
    real_gen = llm.generate

    def gen(prompts, sampling_params=None, **kw):
        """Each prompt entry its drawn length, EOS ignored (the entries are the prompts
        repeated num_generations times, in order)."""
        sps = [dataclasses.replace(sampling_params) if dataclasses.is_dataclass(sampling_params)
               else sampling_params.clone() for _ in prompts]
        for k, sp in enumerate(sps):
            sp.max_tokens = flat[k % len(flat)]
            sp.ignore_eos = True
            sp.min_tokens = 0
        return real_gen(prompts, sampling_params=sps, **kw)
    llm.generate = gen

    def close_generation(t_end):
        if cur["gen_start"] is None:
            return
        st = {"step": len(res["steps"]) + 1, "step_s": t_end - cur["gen_start"],
              "phases": {k: v for k, v in cur.items() if k not in ("gen_start",)},
              "peak_mem_gib": torch.cuda.max_memory_allocated() / GiB}
        torch.cuda.reset_peak_memory_stats()
        res["steps"].append(st)
        print("trl step", json.dumps(st), flush=True)
        save()

    def wrap(name):
        orig = getattr(trainer, name)

        def w(*a, **k):
            device_sync(dev)
            t = now()
            if name == "_generate_and_score_completions":
                close_generation(t)
                cur.clear()
                cur["gen_start"] = t
            out = orig(*a, **k)
            device_sync(dev)
            cur[name] = cur.get(name, 0.0) + now() - t
            return out
        setattr(trainer, name, w)
    for name in ("_generate_and_score_completions", "_generate", "_calculate_rewards"):
        wrap(name)
    trainer.train()
    device_sync(dev)
    close_generation(now())
    for st in res["steps"]:  # TRL's phases in the trainer's names
        ph = st["phases"]
        gs = ph.pop("_generate_and_score_completions", 0.0)
        ph["rollout"] = ph.pop("_generate", 0.0)
        ph["reward"] = ph.pop("_calculate_rewards", 0.0)
        ph["logprob"] = max(0.0, gs - ph["rollout"] - ph["reward"])
        ph["update"] = st["step_s"] - gs
        ph["sync"] = 0.0  # inside TRL's generate (vLLM weight load): counted in rollout
    save()


# ---------------------------------------------------------------------------------- summary
def trl_step_from_logs(side: dict, updates_per_step: int) -> dict | None:
    """A TRL step from its own per-optimizer-step log (`step_time`): its last generation's
    optimizer step (the generation + the first update; the first generation's only when it is
    the one logged, warm-up in) + the rest of the step's updates at the median of the updates
    logged without a generation. For a run cut short before its second step ends (TRL's start
    and first step take most of a 10-minute device call)."""
    logs = [x for x in side.get("trl_logs", []) if "step_time" in x]
    gen = [x["step_time"] for x in logs if "completions/mean_length" in x]
    upd = [x["step_time"] for x in logs if "completions/mean_length" not in x]
    if not gen or (updates_per_step > 1 and not upd):
        return None
    rest = statistics.median(upd) if upd else 0.0
    # a step has updates_per_step updates, the first after the generation: it cannot be
    # shorter than that many updates, whatever the generation costs warm
    return {"step_s": gen[-1] + (updates_per_step - 1) * rest, "generation_steps_logged": len(gen),
            "generation_step_s": gen, "update_step_s_median": rest,
            "step_s_lower_bound": updates_per_step * rest if upd else None,
            "warm": len(gen) > 1}


def workload_tokens(prep: dict) -> tuple[float, float]:
    """(generated, total) tokens of one step of the workload: what a side that does not count
    its own (TRL) ran, with the same prompts and lengths."""
    gen = prep["response_tokens_per_step"]
    return gen, gen + sum(len(x) for x in prep["lengths"]) * prep["prompt_tokens_mean"]


def summarize(side: dict, prep: dict, updates_per_step: int = 4) -> dict | None:
    steps, timed = finished_steps(side)
    est = trl_step_from_logs(side, updates_per_step) if len(steps) < 2 else None
    if est is not None and (not steps or est["warm"]):
        out = {"step_s": est["step_s"], "step_s_from_trl_logs": est,
               "NOTE": "fewer than 2 steps finished inside the run's time: the step is TRL's "
                       "own log of its optimizer steps (see step_s_from_trl_logs)"}
        out["total_tokens"] = workload_tokens(prep)[1]
        out["tokens_per_s_per_gpu"] = out["total_tokens"] / out["step_s"]
        out.update(sampler_trainer_gap(side, []))
        return out
    if not steps:
        return None
    med = statistics.median
    keys = ("rollout", "reward", "logprob", "update", "sync")
    out = {"timed_steps": [s["step"] for s in timed], "first_step_s": steps[0]["step_s"],
           "step_s": med([s["step_s"] for s in timed]),
           "phases": {k: med([s["phases"].get(k) or 0.0 for s in timed]) for k in keys}}
    tot = [s.get("total_tokens") for s in timed if s.get("total_tokens")]
    gen = [s.get("generated_tokens") for s in timed if s.get("generated_tokens")]
    if not tot:  # TRL: the same prompts and lengths
        gen, tot = ([x] for x in workload_tokens(prep))
    out["generated_tokens"], out["total_tokens"] = med(gen), med(tot)
    out["tokens_per_s_per_gpu"] = out["total_tokens"] / out["step_s"]
    out["generated_tokens_per_s_per_gpu"] = out["generated_tokens"] / out["step_s"]
    if out["phases"]["rollout"]:
        out["rollout_generated_tokens_per_s"] = out["generated_tokens"] / out["phases"]["rollout"]
    per_step = [s.get("peak_mem_gib") for s in steps]
    out["per_step_peak_mem_gib"] = per_step
    later = [p for p in per_step[1:] if p]
    if later:
        out["peak_mem_gib"] = max(later)
    out.update(steady_state(per_step))
    used = [s.get("device_used_peak_gib") for s in steps[1:] if s.get("device_used_peak_gib")]
    if used:  # the GPU's own: torch's peak counts a colocated vLLM's sleeping pool too
        out["device_used_peak_gib"] = max(used)
    out.update(logprob_and_compile_stats(timed))
    for k in ("logprob_old_tokens", "logprob_ref_tokens", "vision_encodes_logprob",
              "vision_encodes_update"):
        vals = [s[k] for s in timed if s.get(k) is not None]
        if vals:
            out[k] = med(vals)
    if out.get("logprob_old_us_per_token") and out.get("logprob_ref_us_per_token"):
        out["logprob_old_over_ref_per_token"] = \
            out["logprob_old_us_per_token"] / out["logprob_ref_us_per_token"]
    out.update(sampler_trainer_gap(side, timed))
    cut = sum(s.get("lengths_truncated_by_benchmark") or 0 for s in steps)
    if cut:
        out["WARNING"] = (f"{cut} completions were longer than their drawn length (the engine "
                          "ignores per-request max_new_tokens) and were cut by the benchmark: "
                          "the rollout decoded more than the workload")
    return out


TRL_GAP_KEYS = {"sampling/sampling_logp_difference/mean": "logprob_diff_mean",
                "sampling/sampling_logp_difference/max": "logprob_diff_max",
                "sampling/importance_sampling_ratio/mean": "trl_importance_sampling_ratio_mean"}


def sampler_trainer_gap(side: dict, timed: list) -> dict:
    """How far the engine's log-probs of its own samples are from the trainer's (the same
    weights: only numerics should part them), as `sampler_vs_trainer`: ovlt's steps report
    |trainer - engine| per loss token (median over the timed steps; max = the largest); TRL
    logs its own at each generation (mean over them)."""
    ours = [s["engine_logprob_diff_mean"] for s in timed if s.get("engine_logprob_diff_mean") is not None]
    if ours:
        return {"sampler_vs_trainer": {
            "logprob_diff_mean": statistics.median(ours),
            "logprob_diff_max": max(s.get("engine_logprob_diff_max") or 0.0 for s in timed)}}
    logs = [x for x in side.get("trl_logs", []) if TRL_GAP_KEYS.keys() & x.keys()]
    if not logs:
        return {}
    gap = {}
    for k, name in TRL_GAP_KEYS.items():
        vals = [x[k] for x in logs if k in x]
        if vals:
            gap[name] = max(vals) if name.endswith("_max") else statistics.fmean(vals)
    return {"sampler_vs_trainer": gap}


def extrapolate(args, prep: dict, summ: dict, device: str, layers: int,
                rollout_full: dict | None = None) -> dict:
    """The 8xH100 recipe step from one GPU's eighth (see `formula`). `rollout_full`: the
    rollout measured with all 28 LLM layers (`rollout_full_depth_summary`), used as it is
    instead of the trainer's rollout scaled by bytes."""
    from ovlt.engine.flops import llm_forward_flops, vision_forward_flops
    rm = recipe_model_cfg()
    L, R = layers, rm.num_layers
    h, v = rm.hidden_size, rm.vocab_size
    kv = rm.num_query_groups * (h // rm.num_attention_heads)
    P = prep["prompt_tokens_mean"]
    lens = [int(round(P)) + c for cs in prep["lengths"] for c in cs]
    resp = sum(c for cs in prep["lengths"] for c in cs)
    n = len(lens)
    # forward FLOPs of one pass over every sample: per LLM layer over all tokens; LM head over
    # response tokens (the fused kernels apply it to the loss rows only). The log-prob phase
    # runs `lp_passes` such passes (old + reference tokens over all tokens); the frozen tower
    # runs once per image it encoded in the phase (the trainer's vision_encodes_*: each
    # prompt once per set of weights), else once per sample and pass.
    one = dataclasses.replace(rm, num_layers=1)
    mm1, att1 = llm_forward_flops(one, lens)
    layer_f = (mm1 - 2 * h * v * sum(lens)) + att1
    head_f = 2 * h * v * resp
    pe, vmm, vatt, mg = vision_forward_flops(rm.vision, h, [prep["image_grid"]])
    image_f = pe + vmm + vatt + mg
    tokens = summ.get("total_tokens") or sum(lens)
    lp_tok = (summ.get("logprob_old_tokens") or 0) + (summ.get("logprob_ref_tokens") or 0)
    lp_passes = lp_tok / tokens if lp_tok else 2.0
    vis_lp = image_f * summ.get("vision_encodes_logprob", lp_passes * n)
    vis_up = image_f * summ.get("vision_encodes_update", n)
    r_lp = (vis_lp + lp_passes * (head_f + R * layer_f)) / (vis_lp + lp_passes * (head_f + L * layer_f))
    r_up = (vis_up + 3 * head_f + 3 * R * layer_f) / (vis_up + 3 * head_f + 3 * L * layer_f)
    # decode: bytes read per step; per layer its weights + the live KV of every slot
    slots = min(n, args.engine_slots or n)
    ctx = P + prep["response_tokens_mean"] / 2
    layer_p, params_R, _ = param_counts(rm)  # trained: the LLM
    params_L = params_R - (R - L) * layer_p
    layer_b = 2 * layer_p + slots * ctx * 2 * kv * 2
    head_b = 2 * h * v + slots * v * 4
    r_ro = (head_b + R * layer_b) / (head_b + L * layer_b)
    bw = 1.0
    if "H200" in device:  # decode is memory-bound: H100 HBM3 3.35 TB/s vs H200 HBM3e 4.8 TB/s
        bw = 4.8 / 3.35
    ph = summ["phases"]
    n_gpu = args.recipe_gpus
    updates = math.ceil(n / args.update_samples)  # n: the workload's samples
    comm = updates * (4 + 2) * params_R * (n_gpu - 1) / n_gpu / (args.nccl_busbw * 1e9)
    full = rollout_full is not None and rollout_full.get("llm_layers") == R
    rollout = rollout_full["rollout_s"] if full else ph["rollout"] * r_ro
    est = {"rollout": rollout * bw, "reward": ph["reward"],
           "logprob": ph["logprob"] * r_lp, "update": ph["update"] * r_up,
           "sync": ph["sync"] * params_R / params_L,
           "dp_grad_reduce_scatter_param_all_gather": comm}
    total = sum(est.values())
    return {
        "ESTIMATE": True, "step_s_8xh100": total, "phases_s": est,
        "easyr1_step_s": args.easyr1_step_s, "ratio": total / args.easyr1_step_s,
        "target_ratio": 0.5, "measured_on": device, "measured_llm_layers": L,
        "rollout_measured_at_28_layers": full,
        "factors": {"rollout_bytes_ratio": None if full else r_ro,
                    "rollout_h200_to_h100_bandwidth": bw,
                    "logprob_flops_ratio": r_lp, "update_flops_ratio": r_up,
                    "logprob_passes": lp_passes,
                    "vision_encodes": {"logprob": vis_lp / image_f, "update": vis_up / image_f},
                    "updates_per_step": updates, "trained_params_28_layers": params_R,
                    "nccl_busbw_gbs": args.nccl_busbw, "gpus": n_gpu},
        "formula": (
            "step_8xh100 = rollout(28) x bw + reward "
            "+ logprob x (F_vis,lp + k (F_head + 28 F_layer)) / (F_vis,lp + k (F_head + L F_layer)) "
            "+ update x (F_vis,up + 3 F_head + 3x28 F_layer) / (F_vis,up + 3 F_head + 3 L F_layer) "
            "+ sync x params(28) / params(L) + updates x (4 + 2) bytes x params(28) x (N-1)/N / "
            "busbw. The recipe's 512 x 5 samples on 8 GPUs give each GPU exactly this run's 320 "
            "samples, so only depth and communication are scaled. rollout(28) = the variant's "
            "engine's rollout measured alone with all 28 layers on the same requests "
            "(rollout_measured_at_28_layers), else the trainer's rollout x (B_head + 28 B_layer) "
            "/ (B_head + L B_layer), B_layer = one layer's bf16 weights + the KV of every decode "
            "slot at the mean context (prompt + half the mean response), B_head = LM head "
            "weights + the fp32 logits of every slot (bytes read per decode step: an upper bound "
            "where fixed per-step costs dominate at L); F_head, F_layer = forward FLOPs of one "
            "pass over the measured samples (layer over all tokens, LM head over response tokens "
            "only); k = the log-prob passes' tokens / the step's tokens (old + reference); "
            "F_vis,lp / F_vis,up = the frozen tower's forward FLOPs for the images it encoded in "
            "that phase (vision_encodes_*: each prompt once per set of weights; without them, "
            "once per sample and pass); 3x = forward + backward of the trained LLM; bw = "
            "4.8/3.35 when measured "
            "on an H200 (HBM bandwidth, decode only; compute phases taken as equal). DP: a ZeRO-1 "
            "reduce-scatter of fp32 grads (4 B/param) and an all-gather of bf16 params "
            "(2 B/param) per optimizer update at the stated NCCL bus bandwidth (2-8 H100s "
            "measured ~330-360 GB/s), not overlapped. Assumes TP=1 x DP=8, the same MFU at 28 "
            "layers as at L, and the reward tail unchanged (same samples per GPU).")}


def updates_per_step(cfg: dict) -> int:
    """Optimizer updates in a step of the workload `cfg` (the run's arguments)."""
    return math.ceil(cfg["prompts"] * cfg["samples"] / cfg["update_samples"])


def param_counts(m) -> tuple[int, int, int]:
    """(one LLM layer's weights, the trained LLM's at m.num_layers: layers + embedding + LM head,
    the frozen tower + merger's) of a Qwen2.5-VL config, norms left out."""
    h, f, v = m.hidden_size, m.ffn_hidden_size, m.vocab_size
    kv = m.num_query_groups * (h // m.num_attention_heads)
    layer = h * (h + 2 * kv) + h * h + 3 * h * f
    vc = m.vision
    hv, merged = vc.hidden_size, vc.hidden_size * vc.spatial_merge_size ** 2
    tower = (vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2 * hv
             + vc.depth * (3 * hv * hv + hv * hv + 3 * hv * vc.intermediate_size)
             + merged * merged + merged * h)
    return layer, m.num_layers * layer + 2 * v * h, tower


def memory_at_full_depth(res: dict, variant: str) -> dict | None:
    """Per-GPU device memory of the recipe's step at 28 LLM layers (DP = recipe_gpus, ZeRO-1:
    Adam's fp32 master + moments sharded, fp32 grads whole), per phase, from the variant's
    phase peaks measured at L layers on one GPU: the weights, grads and Adam state counted;
    what else the run held (workspaces, caches) kept as measured; the update's activations
    scaled by layers (their fixed part too: an upper bound); the rollout's KV + decode work
    from the 28-layer rollout side (its peak minus the bf16 model), else scaled by layers.
    For the reference in device memory (`memory`) and in host memory but for its pass
    (`offload`); `update_micro_batch_tokens_that_fit`: the token budget under which the update
    fits 97 % of the card."""
    side = res.get("variants", {}).get(variant) or {}
    steps = [s for s in (side.get("steps") or [])[1:]
             if s.get("phase_peak_mem_gib") and s.get("mem_after_step_gib")]
    card = res.get("gpu_memory_gib")
    if not steps or not card:
        return None
    cfg, gib, med = res["config"], 2.0 ** 30, statistics.median
    rm = recipe_model_cfg()
    L, R, N = side.get("llm_layers") or cfg["llm_layers"], rm.num_layers, cfg["recipe_gpus"]
    layer, trained_R, tower = param_counts(rm)

    def trained(n):
        return trained_R - (R - n) * layer

    def model(n):  # bf16 weights, tower included
        return 2 * (trained(n) + tower)

    ref_modes = [o.split("=", 1)[1] for o in side.get("config_overrides", [])
                 if o.startswith("grpo.ref_mode=")]
    ref_measured = (ref_modes or ["memory"])[-1] == "memory"
    peak = {k: med(s["phase_peak_mem_gib"][k] for s in steps) * gib
            for k in ("rollout", "logprob", "update")}
    resident = med(s["mem_after_step_gib"] for s in steps) * gib
    other = resident - (model(L) + 12 * trained(L) + (model(L) if ref_measured else 0))
    act = (peak["update"] - resident - 4 * trained(L)) * R / L
    full = res.get(FULL_DEPTH.get(variant, ""), {})
    full_peaks = [s.get("peak_mem_gib") for s in full.get("steps", []) if s.get("peak_mem_gib")]
    kv = (max(full_peaks) * gib - model(R)) if full_peaks else (peak["rollout"] - resident) * R / L
    lp = peak["logprob"] - resident - (0 if ref_measured else model(L))
    out = {"ESTIMATE": True, "card_gib": card, "llm_layers": R, "dp": N,
           "measured_at_llm_layers": L, "measured_ref_mode": "memory" if ref_measured else "offload",
           "update_activations_gib": act / gib, "rollout_kv_and_work_gib": kv / gib,
           "rollout_from_28_layer_side": bool(full_peaks),
           "measured_micro_batch_tokens": cfg.get("micro_batch_tokens")}
    for mode in ("memory", "offload"):
        base = model(R) + 12 * trained(R) / N + other + (model(R) if mode == "memory" else 0)
        ph = {"rollout": base + kv, "logprob": base + lp + (model(R) if mode == "offload" else 0),
              "update": base + 4 * trained(R) + act}
        room = 0.97 * card * gib - base - 4 * trained(R)
        out[f"ref_{mode}"] = {
            "peak_gib": {k: v / gib for k, v in ph.items()},
            "fits": all(v <= card * gib for v in ph.values()),
            "headroom_gib": card - max(ph.values()) / gib,
            "update_micro_batch_tokens_that_fit": max(0, int(room / act * cfg["micro_batch_tokens"]))
            if act > 0 and cfg.get("micro_batch_tokens") else None}
    return out


# ---------------------------------------------------------------------------------- driver
def unavailable(variant: str, device: str) -> str | None:
    """Why `variant` cannot run here (None: it can)."""
    need = {"ovlt_builtin": [], "ovlt_vllm": ["vllm"],
            "trl_vllm": ["trl", "vllm", "datasets"]}[variant]
    missing = [p for p in need if importlib.util.find_spec(p) is None]
    if missing:
        return (f"not run: {', '.join(missing)} not installed on this machine (the GPU image "
                f"has none of vllm / trl / datasets; they must be carried as wheels)")
    if need and device != "cuda":
        return "not run: vLLM needs a CUDA device"
    return None


def side_main(args) -> int:
    wd = Path(args.workdir)

    def body(res, save):
        if args.variant == "trl_vllm":
            run_trl_vllm(args, wd, res, save)
        elif args.variant in FULL_DEPTH.values():
            engine = "vllm" if args.variant == FULL_DEPTH["ovlt_vllm"] else "builtin"
            run_rollout_full_depth(args, wd, res, save, engine)
        else:
            run_ovlt(args, wd, res, save, "builtin" if args.variant == "ovlt_builtin" else "vllm")
    return run_recorded(wd / f"variant_{args.variant}.json", {"variant": args.variant}, body)


def write_image_processor(args, d: Path) -> None:
    """vLLM (ours and TRL's) builds its processor from the directory's preprocessor_config.json."""
    from transformers import Qwen2VLImageProcessor
    Qwen2VLImageProcessor(min_pixels=args.min_pixels, max_pixels=args.max_pixels).save_pretrained(d)


def write_config_dir(args, m, d: Path) -> None:
    """An HF directory without weights (vLLM's dummy load): config, tokenizer, preprocessor."""
    d.mkdir(parents=True, exist_ok=True)
    write_hf_config(m, d, args.device)
    write_image_processor(args, d)


def write_hf(args, wd: Path, weights: bool) -> dict:
    """The model as an HF directory: config + tokenizer + preprocessor always, random bf16
    weights through the project's export path only when a variant loads them (TRL)."""
    m = model_cfg(args)
    write_config_dir(args, m, wd / "hf_config")
    info = {}
    if weights:
        t0 = now()
        info = write_hf_dir(m, wd / "hf", args.device)
        info["seconds"] = now() - t0
        write_image_processor(args, wd / "hf")
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model and workload (CPU smoke run)")
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--llm-layers", type=int, default=None,
                    help="default: 8 on an 80 GB GPU, 16 on a 141 GB one")
    ap.add_argument("--vision-layers", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--image", type=int, default=512)
    ap.add_argument("--min-pixels", type=int, default=3136)
    ap.add_argument("--max-pixels", type=int, default=262144)
    ap.add_argument("--len-median", type=float, default=500.0)
    ap.add_argument("--len-sigma", type=float, default=0.6)
    ap.add_argument("--len-cap", type=int, default=2048)
    ap.add_argument("--length-unit", default="prompt", choices=["prompt", "sample"])
    ap.add_argument("--update-samples", type=int, default=80,
                    help="samples per optimizer update on this GPU (recipe: 128 prompts x 5 / 8)")
    ap.add_argument("--micro-batch-tokens", type=int, default=4096,
                    help="update / log-prob micro-batch token budget (8192 does not fit 28 layers)")
    ap.add_argument("--ref-mode", default="offload", choices=allowed_values(GRPOConfig, "ref_mode"),
                    help="grpo.ref_mode (memory does not fit 28 layers on 80 GB)")
    ap.add_argument("--recompute", default="selective", choices=["none", "selective", "full"])
    ap.add_argument("--kl", type=float, default=0.01)
    ap.add_argument("--reward-workers", type=int, default=8)
    ap.add_argument("--vllm-mem", type=float, default=0.3,
                    help="vLLM gpu_memory_utilization (weights + KV) beside the trainer")
    ap.add_argument("--trl-micro-batch", type=int, default=4)
    ap.add_argument("--engine-slots", type=int, default=0,
                    help="decode slots for the extrapolation's KV estimate (0: every sample)")
    ap.add_argument("--count-syncs", type=int, default=1)
    ap.add_argument("--isolate-passes", type=int, default=1,
                    help="sync before each log-prob pass so old and reference start alike")
    ap.add_argument("--profile-step", type=int, default=0,
                    help="ovlt variants: profile this step's kernels after its rollout (1-based; "
                         "0: none) into the step's profile_after_rollout")
    ap.add_argument("--profile-trace", default=None,
                    help="with --profile-step: that step's Chrome trace, written here per ovlt "
                         "variant as <path>.<variant>.json.gz")
    ap.add_argument("--memory-sites", type=int, default=0,
                    help="ovlt variants, CUDA: 1 = record a stack per live allocation and list, "
                         "per step, the sites whose live memory grew (memory_growth_sites)")
    ap.add_argument("--recipe-gpus", type=int, default=8)
    ap.add_argument("--nccl-busbw", type=float, default=340.0, help="GB/s")
    ap.add_argument("--easyr1-step-s", type=float, default=145.0)
    ap.add_argument("--variant-timeout", type=float, default=420.0)
    ap.add_argument("--time-budget", type=float, default=570.0,
                    help="the whole run is cut here (the running variant is killed, its "
                         "finished steps kept)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep-workdir", action="store_true")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for the ovlt variants (repeatable), e.g. "
                         "rollout.compile_decode=false")
    ap.add_argument("--rollout-reps", type=int, default=2,
                    help="with ovlt_builtin / ovlt_vllm: rollouts of its engine alone at 28 LLM "
                         "layers, for the extrapolation (step 1 compiles; 0: scale the trainer's "
                         "rollout)")
    ap.add_argument("--full-depth-vllm-mem", type=float, default=0.6,
                    help="vLLM's gpu_memory_utilization in its 28-layer rollout (weights 16.6 GB "
                         "+ every sequence's KV at once: ~18 GB at the default workload)")
    ap.add_argument("--variant", default=None, choices=(*VARIANTS, *FULL_DEPTH.values()),
                    help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None,
                    help="default: benchmarks/results/grpo_recipe_<device>.json")
    ap.add_argument("--merge", nargs="+", default=None, metavar="RESULTS_JSON",
                    help="write --out from these runs' results (same workload and device, "
                         "variants run one per run) instead of running anything")
    args = ap.parse_args(argv)
    if args.merge:
        if not args.out:
            raise SystemExit("--merge needs --out")
        res = merge_results([Path(p) for p in args.merge])
        write_json(Path(args.out), res)
        print_summary(res)
        print(f"wrote {args.out}")
        return 0
    import torch
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    dev_name, dev_gib = gpu_info() if args.device == "cuda" else ("cpu", None)
    if args.llm_layers is None:
        args.llm_layers = default_llm_layers(args.device, dev_gib)
    if args.tiny:
        args.prompts, args.samples = min(args.prompts, 4), min(args.samples, 2)
        args.len_median, args.len_cap = min(args.len_median, 6.0), min(args.len_cap, 12)
        args.image, args.reward_workers = min(args.image, 56), 1
        args.max_pixels, args.update_samples = min(args.max_pixels, 3136), min(args.update_samples, 4)
        args.micro_batch_tokens, args.llm_layers = min(args.micro_batch_tokens, 1024), 4
        args.recompute = "none"
    if args.device == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.variant:
        return side_main(args)

    import shutil
    import tempfile
    start = now()
    tag = "h200" if "H200" in dev_name else "h100" if "H100" in dev_name else \
        ("cpu" if args.device == "cpu" else "gpu")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"grpo_recipe_{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    wd = Path(args.workdir or tempfile.mkdtemp(prefix="ovlt_grpo_recipe_"))
    res = dict(result_header(args, dev_name, __doc__), variants={})
    if dev_gib:
        res["gpu_memory_gib"] = dev_gib
    if args.tiny:
        res["NOTE"] = "tiny smoke run: meaningless numbers"
    save = lambda: write_json(out, res)  # noqa: E731
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"--variants: unknown {v!r}; one of {', '.join(VARIANTS)}")
    why = {v: unavailable(v, args.device) for v in variants}
    if not record_prep(res, wd, save, lambda: prepare(args, wd),
                       lambda: write_hf(args, wd, weights=why.get("trl_vllm", "x") is None),
                       hidden=("lengths",)):
        return 1
    save()
    passthrough = list(argv if argv is not None else sys.argv[1:])
    for v in variants:
        if why[v]:
            res["variants"][v] = {"skipped": why[v]}
            print(f"---- {v}: {why[v]}", flush=True)
            save()
            continue
        left = args.time_budget - (now() - start) - 5.0
        if left < 30:
            res["variants"][v] = {"skipped": f"not run: the time budget ({args.time_budget:.0f} s) "
                                             "was spent by the variants before it"}
            save()
            continue
        side = run_child(Path(__file__).resolve(),
                         [*passthrough, "--variant", v, "--workdir", str(wd), "--device",
                          args.device, "--llm-layers", str(args.llm_layers)],
                         wd, f"variant_{v}", v, max(5.0, min(args.variant_timeout, left)), 2000)
        summ = full = None
        try:
            summ = summarize(side, res["prep"], updates_per_step(vars(args)))
        except Exception as e:  # noqa: BLE001
            side["summary_error"] = error_text(e)
        left = args.time_budget - (now() - start) - 5.0
        if v in FULL_DEPTH and summ and args.rollout_reps > 0 and left >= 30:
            fd = run_child(Path(__file__).resolve(),
                           [*passthrough, "--variant", FULL_DEPTH[v], "--workdir", str(wd),
                            "--device", args.device, "--llm-layers", str(args.llm_layers)],
                           wd, f"variant_{FULL_DEPTH[v]}", FULL_DEPTH[v],
                           max(5.0, min(args.variant_timeout, left)), 2000)
            full = rollout_full_depth_summary(fd)
            res[FULL_DEPTH[v]] = dict(fd, summary=full)
        if summ:
            side.update(summ)
            if v.startswith("ovlt"):
                try:
                    side["recipe_extrapolation"] = extrapolate(args, res["prep"], summ, dev_name,
                                                               side.get("llm_layers") or args.llm_layers,
                                                               full)
                except Exception as e:  # noqa: BLE001
                    side["extrapolation_error"] = error_text(e)
        res["variants"][v] = side
        save()
    compare_variants(res)
    save()
    print_summary(res)
    print(f"wrote {out}")
    if not args.keep_workdir:
        shutil.rmtree(wd, ignore_errors=True)
    return 0


def compare_variants(res: dict) -> None:
    """The run's `recipe_extrapolation` (its fastest variant's) and `comparison_vs_trl_vllm`,
    from `res["variants"]`."""
    ext = [(k, s["recipe_extrapolation"]) for k, s in res["variants"].items()
           if s.get("recipe_extrapolation")]
    res.pop("recipe_extrapolation", None)
    res.pop("comparison_vs_trl_vllm", None)
    if ext:
        best, e = min(ext, key=lambda kv: kv[1]["step_s_8xh100"])
        res["recipe_extrapolation"] = dict(e, from_variant=best)
        mem = memory_at_full_depth(res, best)
        if mem:  # does the step it extrapolates fit the card at 28 layers?
            res["recipe_extrapolation"]["memory_28_layers"] = mem
        if res["config"].get("tiny"):
            res["recipe_extrapolation"]["NOTE"] = "tiny smoke run: meaningless numbers"
    updates = updates_per_step(res["config"]) if res.get("config") else 4
    for s in res["variants"].values():
        if not s.get("step_s") and not s.get("skipped") and not s.get("trl_logs") \
                and s.get("log_tail") and res.get("prep"):
            # a TRL run cut short before its logs were saved one by one: its printed log
            logs = trl_logs_from_text(s["log_tail"])
            summ = summarize(dict(s, trl_logs=logs), res["prep"], updates) if logs else None
            if summ:
                s.update(summ, trl_logs=logs)
                s.pop("not_timed", None)
    for s in res["variants"].values():
        if s.get("timed_steps") == [1] and not s.get("NOTE"):
            s["NOTE"] = ("only the first step finished inside the run's time: its warm-up "
                         "(compilation, CUDA-graph capture) is in it; not a steady-state step")
    for s in res["variants"].values():  # a variant that ran without a timed step says why
        if not s.get("step_s") and not s.get("skipped") and "rc" in s:
            s["not_timed"] = (f"no step finished and none could be taken from its logs: the run "
                              f"ended with rc={s['rc']} after {s.get('wall_seconds') or 0:.0f} s "
                              "(see error / log_tail)")
    done = {k: s for k, s in res["variants"].items() if s.get("step_s")}
    if "trl_vllm" in done:
        trl = done["trl_vllm"]
        res["comparison_vs_trl_vllm"] = {
            k: {"tokens_per_s_ratio": s["tokens_per_s_per_gpu"] / trl["tokens_per_s_per_gpu"]}
            for k, s in done.items() if k != "trl_vllm"}
        low = (trl.get("step_s_from_trl_logs") or {}).get("step_s_lower_bound")
        if low:  # TRL's step from its log of a cut run: the ratio were it as fast as its updates
            for k, c in res["comparison_vs_trl_vllm"].items():
                c["tokens_per_s_ratio_vs_trl_lower_bound"] = c["tokens_per_s_ratio"] * low / trl["step_s"]


# the arguments that define the workload: runs merged into one file must agree on them
WORKLOAD_ARGS = ("tiny", "device", "llm_layers", "vision_layers", "prompts", "samples", "image",
                 "min_pixels", "max_pixels", "len_median", "len_sigma", "len_cap", "length_unit",
                 "update_samples", "micro_batch_tokens", "ref_mode", "recompute", "kl", "recipe_gpus",
                 "nccl_busbw", "easyr1_step_s")


# arguments TRL's variant does not read (its own micro-batch and reference): its run may differ
# in them from the ovlt variants' runs it is merged with
OVLT_ONLY_ARGS = ("micro_batch_tokens", "ref_mode")
OLD_RUN_DEFAULTS = {"ref_mode": "memory"}  # what runs from before an argument existed used


def merge_results(paths: list[Path]) -> dict:
    """One results file from runs of the same workload on the same device, each of which ran
    some of the variants (the device's per-run time limit fits one variant a run): a variant
    run in a later file replaces an earlier one, a skipped one never replaces a run one. Every
    variant kept must come from a run of the workload of the ovlt variants' (TRL's may differ
    in `OVLT_ONLY_ARGS`); the file's config is theirs."""
    runs = []
    for p in paths:
        try:
            runs.append(json.loads(Path(p).read_text()))
        except (OSError, ValueError) as e:
            raise SystemExit(f"--merge: {p}: not a readable results file ({e})") from None
        if not isinstance(runs[-1].get("variants"), dict) or "config" not in runs[-1]:
            raise SystemExit(f"--merge: {p}: not a grpo_recipe results file (no config / variants)")
    kept: dict = {}  # variant -> (run index, its record)
    for i, r in enumerate(runs):
        for k, s in r["variants"].items():
            if not s.get("skipped") or k not in kept:
                kept[k] = (i, s)
    ran = {k: i for k, (i, s) in kept.items() if not s.get("skipped")}
    base_i = max([i for k, i in ran.items() if k.startswith("ovlt")], default=0)
    base = runs[base_i]

    def arg(r, k):
        return r["config"].get(k, OLD_RUN_DEFAULTS.get(k))

    for k, i in ran.items():
        r = runs[i]
        diff = {a: (arg(base, a), arg(r, a)) for a in WORKLOAD_ARGS
                if (k.startswith("ovlt") or a not in OVLT_ONLY_ARGS) and arg(base, a) != arg(r, a)}
        if r.get("device") != base.get("device"):
            diff["device name"] = (base.get("device"), r.get("device"))
        tok = [x.get("prep", {}).get("response_tokens_per_step") for x in (base, r)]
        if tok[0] != tok[1]:
            diff["prep.response_tokens_per_step"] = tuple(tok)
        if diff:
            raise SystemExit(f"--merge: {k} of {paths[i]} is not the workload of {paths[base_i]}: "
                             f"{diff}")
    # a file that is itself a merge lists its own sources, not itself
    sources = [src for p, r in zip(paths, runs) for src in r.get("merged_from") or [
        {"file": Path(p).name, "date": r.get("date"), "variants": sorted(r.get("variants", {}))}]]
    res = dict(base, variants={k: s for k, (i, s) in kept.items()}, merged_from=sources)
    for r in runs:  # the rollout alone at full depth: a later one with a timed rollout replaces
        for side in FULL_DEPTH.values():
            if r.get(side) and (rollout_full_depth_summary(r[side]) or not res.get(side)):
                res[side] = r[side]
    compare_variants(res)
    return res


def print_summary(res: dict) -> None:
    for k, s in res["variants"].items():
        print(k, json.dumps({x: s.get(x) for x in ("skipped", "step_s", "phases",
                                                      "tokens_per_s_per_gpu", "peak_mem_gib",
                                                      "per_step_peak_mem_gib", "device_used_peak_gib")
                             if s.get(x) is not None}), (s.get("error") or "")[:300])
    if res.get("recipe_extrapolation"):
        e = res["recipe_extrapolation"]
        print(f"recipe step on 8xH100 (estimate): {e['step_s_8xh100']:.1f} s = "
              f"{e['ratio']:.2f} x EasyR1's {e['easyr1_step_s']:.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())
