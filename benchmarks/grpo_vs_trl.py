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
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._grpo_bench import (device_sync, error_text, finished_steps, gpu_info,  # noqa: E402
                                    logprob_and_compile_stats, model_cfg, noise_images, now,
                                    prompt_tokens, recipe_model_cfg, record_prep, result_header,
                                    run_child, run_ovlt_steps, run_recorded, steady_state,
                                    trl_inputs, write_hf_dir, write_json, write_rl_parquet)


# ---------------------------------------------------------------------------------- preparation
def prepare(args, wd: Path) -> dict:
    from PIL import Image

    from ovlt.data.image_processing import preprocess

    wd.mkdir(parents=True, exist_ok=True)
    m = model_cfg(args)
    t0 = now()
    info = write_hf_dir(m, wd / "hf", args.device)
    info["hf_dir_seconds"] = now() - t0
    n = args.prompts * args.steps
    paths = noise_images(wd / "images", n, args.image, digits=4)
    write_rl_parquet(wd / "rl.parquet", n, paths)
    lens = []
    for i, p in enumerate(paths):
        _, grid = preprocess(Image.open(p).convert("RGB"), args.min_pixels, args.max_pixels)
        lens.append(prompt_tokens(i, grid, m.vision.spatial_merge_size))
    info.update(prompt_tokens_min=min(lens), prompt_tokens_max=max(lens),
                prompt_tokens_mean=sum(lens) / len(lens), image_grid=list(grid), n_prompts=n)
    return info


# ---------------------------------------------------------------------------------- ovlt side
def run_ovlt(args, wd: Path, res: dict, save):
    from ovlt.config import load_config

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

    def on_ready(trainer):
        real_generate = trainer.engine.generate

        def generate(reqs, sp, on_complete=None):  # every response exactly --new tokens
            return real_generate(reqs, dataclasses.replace(sp, ignore_eos=True),
                                 on_complete=on_complete)
        trainer.engine.generate = generate
        return {"ref_mode": trainer.ref.mode if trainer.ref else None}

    def step_fields(rec, s):
        # each pass's own GPU time (the trainer's StepClock): old vs reference per token
        s["phases"].update(old_logprob=rec.get("logprob_old_s"),
                           ref_logprob=rec.get("logprob_ref_s"))
        s.update(prompt_tokens=s["total_tokens"] - s["generated_tokens"],
                 samples_trained=rec.get("samples_trained"),
                 response_length_mean=rec.get("response_length_mean"),
                 trainer_step_time_s=rec.get("step_time_s"))

    run_ovlt_steps(cfg, dev, res, save, steps=args.steps, log_dir=wd / "ovlt_run" / "logs",
                   label="ovlt", on_ready=on_ready, step_fields=step_fields,
                   isolate_passes=bool(args.isolate_passes))


# ---------------------------------------------------------------------------------- TRL side
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
    import torch
    import transformers
    import trl
    from transformers import TrainerCallback

    dev = args.device
    res["versions"] = {"trl": trl.__version__, "transformers": transformers.__version__}
    try:
        import datasets
        res["versions"]["datasets"] = datasets.__version__
    except Exception as e:  # noqa: BLE001
        res["datasets_error"] = error_text(e)
        raise
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    torch.manual_seed(0)
    t0 = now()
    proc, ds, model = trl_inputs(args, wd, dtype)
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
            device_sync(dev)
            state["last"] = now()

        def on_step_end(self, a, s, c, **kw):
            device_sync(dev)
            t = now()
            close_step(s.global_step, t - state["last"])
            state["last"] = t

    trainer = trl.GRPOTrainer(model=model, reward_funcs=[math_reward_fn], args=cfg, train_dataset=ds,
                              processing_class=proc, callbacks=[StepTimer()])
    device_sync(dev)
    res["init_seconds"] = now() - t0
    res["eos_token_ids"] = list(trainer.eos_token_ids)

    def wrap(name, key_fn, post=None):
        orig = getattr(trainer, name)

        def w(*a, **k):
            device_sync(dev)
            t = now()
            out = orig(*a, **k)
            device_sync(dev)
            key = key_fn(a, k)
            if key:
                cur[key] = cur.get(key, 0.0) + now() - t
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
    steps, timed = finished_steps(side)
    if not steps:
        return None
    med = statistics.median
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
    out.update(logprob_and_compile_stats(timed))
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
    body = run_ovlt if args.side == "ovlt" else run_trl
    return run_recorded(Path(args.workdir) / f"side_{args.side}.json", {"side": args.side},
                        lambda res, save: body(args, Path(args.workdir), res, save))


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
    ap.add_argument("--isolate-passes", type=int, default=1,
                    help="sync before each log-prob pass so old and reference start alike")
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
    start = now()
    wd = Path(args.workdir or tempfile.mkdtemp(prefix="ovlt_grpo_bench_"))
    res = dict(result_header(args, gpu_info()[0] if args.device == "cuda" else "cpu",
                             __doc__), sides={}, notes=[
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
               "steps 2..N; phases are each trainer's own timers (TRL: wrapped methods)."])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save = lambda: write_json(out, res)  # noqa: E731
    if not record_prep(res, wd, save, lambda: prepare(args, wd)):
        return 1
    save()
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    for side in [s for s in args.sides.split(",") if s]:
        left = args.time_budget - (now() - start) - 3.0
        side_res = run_child(Path(__file__).resolve(),
                             [*passthrough, "--side", side, "--workdir", str(wd),
                              "--device", args.device],
                             wd, f"side_{side}", side, max(5.0, min(args.side_timeout, left)), 2500)
        try:
            side_res["summary"] = summarize(side_res)
            if side_res["summary"]:
                side_res["recipe_estimate"] = extrapolate(args, res["prep"], side_res["summary"])
                if args.tiny:
                    side_res["recipe_estimate"]["NOTE"] = "tiny smoke run: meaningless numbers"
        except Exception as e:  # noqa: BLE001
            side_res["summary_error"] = error_text(e)
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
