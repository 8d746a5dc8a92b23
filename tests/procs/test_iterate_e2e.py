"""The real loop end to end on CPU (tiny model, real stage programs and launchers, minimal sizes):
2 rounds of data -> SFT -> GRPO -> eval, then a SIGKILL inside round 2's SFT and a resume that
repeats no finished stage. Checks wiring and bookkeeping, not learning (the demo reports that)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

OVERRIDES = [
    "iterate.name=e2e", "iterate.rounds=2",
    "iterate.prepare.synth_n=12", "iterate.prepare.heldout_n=6",
    "iterate.prepare.curriculum_epochs=[0.1,0.1]",
    "iterate.caption.max_new_tokens=4", "iterate.teacher.samples=3",
    "iterate.self_answer.samples=2", "iterate.self_answer.max_new_tokens=12",
    "iterate.heldout_max_new_tokens=12", "iterate.sft_examples_per_round=8",
    "sft.train.max_steps=2", "sft.train.global_batch_size=4",
    "rollout.max_new_tokens=12", "grpo.prompts_per_step=2", "grpo.samples_per_prompt=2",
    "grpo.train.global_batch_size=4", "iterate.stage_env=[OMP_NUM_THREADS=1]",
    # a 2-step SFT model solves nothing: round 2 keeps round 1's chains for unsolved problems
    "iterate.self_answer.carry_over_unsolved=true",
]


def _run(out: Path, *extra, env=None):
    bench = out.parent / "mathvista"
    if not bench.exists():  # a 2-item MathVista in its released layout (the eval tests' fixture)
        from tests.unit.test_eval_tiny_model import write_mathvista
        write_mathvista(bench)
    extra = (f"eval.benchmarks=[{{name: mathvista, data: {bench}}}]", "eval.max_new_tokens=4") + extra
    return subprocess.Popen([sys.executable, "launchers/iterate.py", "--config",
                             "configs/iterate/tiny_cpu.yaml", f"iterate.out_dir={out}",
                             *OVERRIDES, *extra], cwd=REPO, env=env or dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_real_tiny_loop_kill_and_resume(tmp_path):
    out = tmp_path / "runs"
    run_dir = out / "e2e"
    man_path = run_dir / "manifest.json"
    proc = _run(out)
    # Kill the orchestrator once round 2's SFT is under way.
    t0 = time.time()
    while time.time() - t0 < 1200:
        if proc.poll() is not None:
            raise AssertionError("loop ended before r2.sft:\n" + proc.stdout.read()[-5000:])
        try:
            st = json.loads(man_path.read_text())["stages"].get("r2.sft", {})
        except (OSError, json.JSONDecodeError):
            st = {}
        if st.get("status") == "running" and (run_dir / "r2.sft" / "stage.log").exists():
            time.sleep(3)
            break
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = json.loads(man_path.read_text())["stages"]
    assert before["r2.sft"]["status"] == "running"

    proc = _run(out, "--resume")
    text, _ = proc.communicate(timeout=1200)
    assert proc.returncode == 0, text[-5000:]
    m = json.loads(man_path.read_text())["stages"]
    order = ["r0.prepare", "r0.eval", "r1.data", "r1.sft", "r1.grpo", "r1.eval",
             "r2.data", "r2.sft", "r2.grpo", "r2.eval"]
    assert list(m) == order and all(m[s]["status"] == "done" for s in order)
    for s in order:  # finished stages were not repeated; the killed one ran twice
        assert m[s]["attempts"] == (2 if s == "r2.sft" else 1), s
        if s != "r2.sft" and before.get(s, {}).get("status") == "done":
            assert m[s]["started"] == before[s]["started"]
    # round 1 data from the synthetic teacher: every problem has a correct candidate
    assert m["r1.data"]["metrics"]["source"] == "teacher:synthetic"
    assert m["r1.data"]["metrics"]["kept"] == 8
    assert m["r1.data"]["metrics"]["candidate_accuracy"] == pytest.approx(2 / 3)
    assert m["r2.data"]["metrics"]["source"] == "previous GRPO model"
    assert m["r2.data"]["inputs"]["model"].endswith("r1.grpo/ckpt/final_hf")
    r2 = m["r2.data"]["metrics"]
    assert r2["kept"] == r2["solved_problems"] + r2["carried_over"] and r2["kept"] > 0
    # the trainers ran and logged; GRPO followed the two-stage curriculum
    assert m["r1.sft"]["metrics"]["steps"] == 2 and m["r1.sft"]["metrics"]["loss_first"] > 0
    assert m["r1.grpo"]["metrics"]["steps"] >= 2
    for s in ("r0.eval", "r1.eval", "r2.eval"):
        ev = m[s]["metrics"]
        assert ev["n"] == 6 and 0.0 <= ev["accuracy"] <= 1.0
        assert sum(ev["n_by_difficulty"].values()) == 6
        # the configured benchmark went through `ovlt eval run` (2 items)
        assert 0.0 <= ev["benchmarks"]["mathvista"] <= 100.0
        assert (run_dir / s / "benchmarks" / "mathvista" / "scores.json").exists()
    report = (run_dir / "report.md").read_text()
    assert "| mathvista |" in report
    assert "| 0 (base) |" in report and "\n| 2 | " in report
    summary = json.loads((run_dir / "summary.json").read_text())
    for r in summary["rounds"][1:]:  # the probe ran on both models of every round
        assert 0.0 <= r["probe_reward_before"] <= 1.0 and 0.0 <= r["probe_reward_after"] <= 1.0
        assert r["probe_se"] >= 0.0 and r["sft_kept"] > 0
        assert 0.0 <= r["heldout_acc_sft"] <= 1.0  # the round's SFT model, before its GRPO
    for png in ("probe_reward.png", "accuracy_per_round.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
