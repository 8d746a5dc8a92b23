"""The embedded demo's first round, run as README command 1 runs it (only shortened to one
round, without the base model's eval): its GRPO raises the reward of the loop's fixed probe set
far outside the probe's sampling noise, and its model answers the held-out split well above
the best constant answer.

Everything is the real loop (`launchers/iterate.py --config configs/iterate/tiny_cpu.yaml`):
synthetic colour-sum problems, the synthetic teacher, SFT from the random base model, GRPO
(medium -> hard, vision frozen), the eval stage's greedy held-out accuracy and its probe (the
same held-out prompts and sampling seed for the SFT model and the GRPO model, scored as the
trainer scores rollouts; `ovlt.iterate.probe`). Numbers come from `summary.json`. The run is
seeded end to end; measured on 2 cores: probe 0.669 -> 0.693 over 149 prompts x 8 samples (+5.3 se,
samples paired by seed; +2.6 se unpaired), held-out 74 % against the constant answer's 15 %.
About 5-9 min on 2 cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def test_demo_round_one_grpo_raises_probe_reward(tmp_path):
    out = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "launchers/iterate.py", "--config", "configs/iterate/tiny_cpu.yaml",
         f"iterate.out_dir={out}", "iterate.rounds=1", "iterate.eval_round0=false"],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="2"), capture_output=True, text=True,
        timeout=1100)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    summary = json.loads((out / "tiny_cpu" / "summary.json").read_text())
    r1 = next(r for r in summary["rounds"] if r["round"] == 1)
    before, after, se = r1["probe_reward_before"], r1["probe_reward_after"], r1["probe_se"]
    msg = (f"probe {before:.3f} -> {after:.3f} (se of the rise {se:.4f}); held-out "
           f"{r1['heldout_acc']:.3f} (SFT model {r1['heldout_acc_sft']:.3f}); constant answer "
           f"{summary['baselines']['constant_answer_acc']:.3f}")
    assert r1["probe_prompts"] >= 40 and r1["probe_samples_per_prompt"] >= 8, msg
    assert after - before > 2 * se and after - before > 0.01, msg
    assert r1["heldout_acc"] >= 2 * summary["baselines"]["constant_answer_acc"], msg
    assert r1["format_rate"] > 0.9 and r1["sft_kept"] > 0, msg
