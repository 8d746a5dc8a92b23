"""`launchers/grpo.py` end to end as the iterate loop runs it (a subprocess with overrides):
outputs, a resumed run equal to an uninterrupted one (model, optimizer, RNG, prompts), and a
resume on other prompts refused."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(hf_dir, rl, out, steps, ok=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "launchers" / "grpo.py"), "--config",
           str(ROOT / "configs" / "grpo" / "tiny_cpu.yaml"), f"model.hf_path={hf_dir}",
           f"data.rl_files=[{rl}]", f"grpo.train.save_dir={out}", f"grpo.train.max_steps={steps}",
           "grpo.overlong=none", "rollout.max_new_tokens=4", "data.max_pixels=3136",
           "grpo.prompts_per_step=2", "grpo.samples_per_prompt=4", "grpo.train.global_batch_size=4",
           "grpo.reward_fn=tests.unit.test_grpo_invariants:hash_reward", "grpo.train.save_interval=1"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if not ok:
        return p
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_launcher_outputs_and_resume(tiny_hf_dir, tmp_path):
    from ovlt.data import synth
    from ovlt.utils.io import read_jsonl
    synth.generate(tmp_path / "synth", n=8, seed=4)
    rl = tmp_path / "synth" / "rl.parquet"
    full = _run(tiny_hf_dir, rl, tmp_path / "a", 3)
    assert full["start_step"] == 0 and Path(full["final_hf"], "config.json").is_file()
    assert _run(tiny_hf_dir, rl, tmp_path / "b", 2)["start_step"] == 0
    resumed = _run(tiny_hf_dir, rl, tmp_path / "b", 3)
    assert resumed["start_step"] == 2
    a, b = read_jsonl(tmp_path / "a" / "metrics.jsonl"), read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    assert a[2]["updates"] >= 1
    for k in ("reward_mean", "response_length_mean", "loss", "grad_norm", "prompt_position"):
        assert a[2][k] == pytest.approx(b[2][k], rel=1e-5, abs=1e-7) if k != "prompt_position" \
            else a[2][k] == b[2][k], k
    rolls = read_jsonl(tmp_path / "a" / "rollouts.jsonl")
    assert {r["step"] for r in rolls} == {1, 2, 3} and all("response" in r for r in rolls)

    # Other prompts into the same save_dir: refused in one line, the run's files untouched.
    synth.generate(tmp_path / "other", n=8, seed=5)
    p = _run(tiny_hf_dir, tmp_path / "other" / "rl.parquet", tmp_path / "b", 4, ok=False)
    line = [ln for ln in p.stderr.splitlines() if "error" in ln][-1]
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert (f"{tmp_path / 'b'}: its checkpoint (step 3) was trained on different GRPO prompts"
            in line and str(tmp_path / "other" / "rl.parquet") in line), line
    assert read_jsonl(tmp_path / "b" / "metrics.jsonl") == b
