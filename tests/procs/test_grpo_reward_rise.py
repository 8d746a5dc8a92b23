"""GRPO invariant: on synthetic visual data, a few GRPO steps raise the mean reward of a task
the SFT model half-solves (CPU tiny model, fixed seeds, the real trainers end to end).

The task (`colour_problem`): a 56x56 image filled with a jittered red or blue; the question
"Red (1) or blue (2)?"; the answer, graded by the project's own `math_reward` (`<answer>` tag
required, no fallback), is 1 or 2 - it depends on the image only (the text is the same for
every prompt). Data go through `ovlt.data.synth.write_problems`, the writer of `ovlt data synth`,
so SFT and GRPO read them through their normal data paths.

How the SFT model half-solves it: its SFT data come from a teacher that names the right colour
but, for half the problems, without the answer tags ("The answer is 2.": worth 0 under the
verifiable reward). A short real SFT (`launchers/sft.py`, configs/sft/tiny_cpu.yaml, 100 steps
of 4 samples, cosine LR) learns the image -> digit mapping and copies the teacher's mix of
formats, so sampling at temperature 1 earns about half the reward (the tagged half). GRPO
(`launchers/grpo.py`, configs/grpo/tiny_cpu.yaml, kl_coef 0, built-in engine, the default math
reward) has to find that only tagged answers with the image's digit pay.

Evidence: the mean reward of a FIXED probe set (16 held-out images x 16 samples, one sampling
seed) from the exported SFT model vs the exported GRPO model, measured by the loop's own probe
(`ovlt.iterate.probe`: `ovlt.eval.engine.build_engine`'s built-in engine, prompts encoded like
the trainer's, scored with the trainer's reward path). The rise must exceed 4 standard errors
of the difference (binomial sampling noise per prompt) and 0.15 absolute. Measured on CPU:
0.44 -> 0.78 (8.4 se); lr=0 gives a rise of exactly 0 and a flipped advantage sign a fall,
both fail. About 60 s on 2 cores. `gpu_bf16` (CUDA only): the same on the GPU paths.
"""
from __future__ import annotations

import logging
import math
import random

import pytest
import torch

from ovlt.config import CONFIG_ROOT, load_config

pytestmark = pytest.mark.slow

COLOURS = ((220, 40, 40), (40, 80, 220))   # red -> answer 1, blue -> answer 2
QUESTION = "Red (1) or blue (2)?"
RL_PROMPTS, PROBE_PROMPTS, PROBE_SAMPLES, PROBE_SEED = 16, 16, 16, 1234
SFT_STEPS, GRPO_STEPS, MAX_NEW_TOKENS = 100, 4, 8


def colour_problem(seed: int, i: int, untagged: bool = False) -> dict:
    """Problem i of a set: a solid image of colour i % 2 (each channel jittered by +-25)."""
    from PIL import Image
    rng = random.Random(seed * 1_000_003 + i)
    c = i % len(COLOURS)
    rgb = tuple(max(0, min(255, v + rng.randint(-25, 25))) for v in COLOURS[c])
    ans = str(c + 1)
    return {"id": f"colour-{seed}-{i:04d}", "task": "colour", "difficulty": "easy",
            "image": Image.new("RGB", (56, 56), rgb), "question": QUESTION, "answer": ans,
            "solution": f"The answer is {ans}." if untagged else f"<answer>{ans}</answer>"}


@pytest.fixture(autouse=True)
def _restore_logging():
    """The launchers run in this process and re-point the root logger (console + a log file in
    their save_dir): put the handlers back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """sft/sft.jsonl (64; every other pair untagged), rl/rl.parquet (16), probe/rl.parquet (16),
    half of each red: three seeds, so the probe images are never trained on."""
    from ovlt.data.synth import write_problems
    root = tmp_path_factory.mktemp("colour_task")
    write_problems(root / "sft", (colour_problem(1, i, untagged=(i // 2) % 2 == 1)
                                  for i in range(64)), prompt_suffix="")
    write_problems(root / "rl", (colour_problem(2, i) for i in range(RL_PROMPTS)), prompt_suffix="")
    write_problems(root / "probe", (colour_problem(3, i) for i in range(PROBE_PROMPTS)),
                   prompt_suffix="")
    return root


def _launch(main, config: str, overrides: list[str]) -> None:
    """A launcher's `main` in this process (single-process gloo; it inits and tears down)."""
    rc = main(["--config", str(CONFIG_ROOT / config)] + overrides)
    assert rc == 0, rc


def probe_reward(model_dir, probe_file) -> dict:
    """The loop's probe (`ovlt.iterate.probe.probe_reward`) on the exported HF model: mean
    reward over the probe prompts x PROBE_SAMPLES samples at temperature 1 (built-in engine,
    the trainer's prompt encoding and reward) and its standard error given the prompt set."""
    from ovlt.data.formats import read_rl
    from ovlt.distributed import destroy_distributed
    from ovlt.eval.engine import build_engine
    from ovlt.iterate.probe import probe_reward as loop_probe

    cfg = load_config(CONFIG_ROOT / "grpo" / "tiny_cpu.yaml", [
        "data.max_pixels=3136", "rollout.prompt_suffix=''",
        f"iterate.probe.samples={PROBE_SAMPLES}", f"iterate.probe.seed={PROBE_SEED}",
        f"iterate.probe.max_new_tokens={MAX_NEW_TOKENS}"])
    recs = list(read_rl(probe_file))
    destroy_distributed()
    try:
        return loop_probe(cfg, build_engine(str(model_dir), "builtin", cfg), recs)
    finally:
        destroy_distributed()


# The same task on the GPU paths (bf16 weights and training, NCCL, the Triton LM-head
# kernels, CUDA-graph decoding): GRPO must learn it there as it does on the CPU.
GPU_BF16 = ["parallel.backend=nccl", "model.params_dtype=bf16"]
PATHS = {"default": ([], []),
         "gpu_bf16": (GPU_BF16 + ["sft.train.precision=bf16"],
                      GPU_BF16 + ["grpo.train.precision=bf16", "rollout.cuda_graphs=true"])}


@pytest.mark.parametrize("paths", [
    "default",
    pytest.param("gpu_bf16", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_grpo_raises_mean_reward_on_half_solved_task(tiny_hf_dir, task, tmp_path, paths):
    sft_extra, grpo_extra = PATHS[paths]
    from launchers.grpo import main as grpo_main
    from launchers.sft import main as sft_main
    from ovlt.utils.io import read_jsonl

    # 1. A short real SFT on the task's (half untagged) teacher data.
    sft_dir = tmp_path / "sft"
    _launch(sft_main, "sft/tiny_cpu.yaml", [
        f"model.hf_path={tiny_hf_dir}", f"data.sft_files=[{task / 'sft' / 'sft.jsonl'}]",
        f"sft.train.save_dir={sft_dir}", f"sft.train.max_steps={SFT_STEPS}",
        "sft.train.global_batch_size=4", "sft.optimizer.lr=5e-3", "sft.optimizer.min_lr=5e-4",
        "sft.optimizer.lr_schedule=cosine", "sft.optimizer.warmup_ratio=0.0",
        "sft.train.save_final=false", "data.max_pixels=3136", "data.max_length=256",
        "data.pack_tokens=1024", *sft_extra])
    before = probe_reward(sft_dir / "final_hf", task / "probe" / "rl.parquet")
    assert 0.2 < before["mean"] < 0.7, before  # half-solved

    # 2. A few real GRPO steps from the SFT model (kl 0, built-in engine, math reward). Every
    # step samples all RL prompts (8 per colour): no step's batch leans to one answer.
    grpo_dir = tmp_path / "grpo"
    _launch(grpo_main, "grpo/tiny_cpu.yaml", [
        f"model.hf_path={sft_dir / 'final_hf'}", f"data.rl_files=[{task / 'rl' / 'rl.parquet'}]",
        f"grpo.train.save_dir={grpo_dir}", f"grpo.train.max_steps={GRPO_STEPS}",
        f"grpo.prompts_per_step={RL_PROMPTS}", "grpo.samples_per_prompt=4",
        "grpo.train.global_batch_size=64", "grpo.optimizer.lr=2e-3", "grpo.kl_coef=0.0",
        "rollout.engine=builtin", f"rollout.max_new_tokens={MAX_NEW_TOKENS}",
        "rollout.prompt_suffix=''", "data.max_pixels=3136", *grpo_extra])
    steps = read_jsonl(grpo_dir / "metrics.jsonl")
    assert [r["step"] for r in steps] == list(range(1, GRPO_STEPS + 1))
    assert steps[0]["samples_trained"] > 0 and steps[0]["grad_norm"] > 0, steps[0]
    after = probe_reward(grpo_dir / "final_hf", task / "probe" / "rl.parquet")

    # 3. The probe's mean reward rose far outside its sampling noise.
    rise = after["mean"] - before["mean"]
    noise = math.hypot(before["se"], after["se"])
    train = [round(r["reward_mean"], 3) for r in steps]
    gap = [r.get("engine_logprob_diff_mean") for r in steps]
    msg = (f"[{paths}] probe reward {before['mean']:.3f} (se {before['se']:.3f}) -> {after['mean']:.3f} "
           f"(se {after['se']:.3f}); rise {rise:.3f} = {rise / max(noise, 1e-9):.1f} se; "
           f"GRPO training reward per step {train}; sampler-trainer log-prob gap {gap}; "
           f"samples before {before['examples']} "
           f"after {after['examples']}")
    logging.getLogger(__name__).info(msg)
    assert rise > 4 * noise and rise > 0.15, msg
