"""The iterate loop with fast fake stages (tests/iterate_fakes/fake_stage.py) under real torchrun:
kill -9 mid-stage + --resume gives the same manifest as an uninterrupted run, config changes of
finished stages are refused, --force-from reruns exactly the stages from there on."""
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
FAKE = "tests/iterate_fakes/fake_stage.py"
pytestmark = pytest.mark.slow  # every test starts several torchrun processes


def write_cfg(tmp: Path, out_dir: Path, rounds: int = 2, extra: str = "") -> Path:
    cfg = tmp / "cfg.yaml"
    cfg.write_text(f"""defaults: [model/tiny.yaml]
iterate:
  name: fake
  out_dir: {out_dir}
  rounds: {rounds}
  program_prepare: {FAKE} prepare
  program_data: {FAKE} data
  program_sft: {FAKE} sft
  program_grpo: {FAKE} grpo
  program_eval: {FAKE} eval
  stage_env: [OMP_NUM_THREADS=1]
  prepare: {{curriculum_difficulties: [medium, hard], curriculum_epochs: [1.0, 2.0]}}
{extra}""")
    return cfg


def env_with(**kw) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.update({k: str(v) for k, v in kw.items()})
    return env


def iterate(cfg: Path, *args: str, env=None, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "launchers/iterate.py", "--config", str(cfg), *args],
                       cwd=REPO, env=env or env_with(), capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"iterate failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return p


def calls(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [json.loads(x)["sid"] for x in path.read_text().splitlines() if x.strip()]


def comparable(manifest: Path) -> dict:
    """The manifest minus what legitimately differs between runs (times, attempts, tokens) and
    with the run directory replaced by a placeholder."""
    run_dir = str(manifest.parent.resolve())
    text = manifest.read_text().replace(run_dir, "<RUN>")
    data = json.loads(text)
    for st in data["stages"].values():
        for k in ("started", "finished", "seconds", "attempts", "token"):
            st.pop(k, None)
    data.pop("created", None)
    return data


def wait_for(pred, timeout=120.0, what=""):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def stage_status(manifest: Path, sid: str):
    try:
        return json.loads(manifest.read_text())["stages"].get(sid, {}).get("status")
    except (OSError, json.JSONDecodeError):
        return None


def test_sigkill_mid_stage_then_resume_matches_clean_run(tmp_path):
    # Reference: an uninterrupted run.
    (tmp_path / "ref").mkdir()
    ref_dir = tmp_path / "ref" / "runs"
    ref_cfg = write_cfg(tmp_path / "ref", ref_dir)
    iterate(ref_cfg, env=env_with(OVLT_FAKE_CALLS=tmp_path / "ref_calls.jsonl"))
    ref_calls = calls(tmp_path / "ref_calls.jsonl")
    plan = ["r0.prepare", "r0.eval", "r1.data", "r1.sft", "r1.grpo", "r1.eval",
            "r2.data", "r2.sft", "r2.grpo", "r2.eval"]
    assert ref_calls == plan

    # Killed run: r1.grpo sleeps; SIGKILL the orchestrator while it is in there.
    (tmp_path / "kill").mkdir()
    out = tmp_path / "kill" / "runs"
    cfg = write_cfg(tmp_path / "kill", out)
    log = tmp_path / "calls.jsonl"
    man = out / "fake" / "manifest.json"
    proc = subprocess.Popen([sys.executable, "launchers/iterate.py", "--config", str(cfg)],
                            cwd=REPO, env=env_with(OVLT_FAKE_CALLS=log, OVLT_FAKE_SLEEP="r1.grpo=300"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: "r1.grpo" in calls(log), what="r1.grpo to start")
        assert stage_status(man, "r1.grpo") == "running"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    token = json.loads(man.read_text())["stages"]["r1.grpo"]["token"]
    assert stage_status(man, "r1.sft") == "done" and stage_status(man, "r1.grpo") == "running"

    # Without --resume an existing run is refused; with it, the run continues.
    p = iterate(cfg, check=False)
    assert p.returncode == 1 and "--resume" in p.stderr
    iterate(cfg, "--resume", env=env_with(OVLT_FAKE_CALLS=log))

    # Every finished stage ran once; only the killed one twice; nothing of the killed attempt
    # is left running.
    got = calls(log)
    assert got == plan[:5] + plan[4:], got
    from ovlt.iterate.runner import find_token_pids
    assert find_token_pids(token) == []
    m = json.loads(man.read_text())
    assert m["stages"]["r1.grpo"]["attempts"] == 2
    assert all(m["stages"][s]["attempts"] == 1 for s in plan if s != "r1.grpo")
    assert comparable(man) == comparable(ref_dir / "fake" / "manifest.json")
    # And the report of the resumed run has its rounds.
    report = (out / "fake" / "report.md").read_text()
    assert "| 2 | 12 | 0.200 → 0.300 (+0.100 ± 0.036) | 50.0% | 33.3% |" in report
    assert (out / "fake" / "probe_reward.png").stat().st_size > 1000
    summary = json.loads((out / "fake" / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    assert summary["rounds"][2]["probe_reward_after"] == pytest.approx(0.3)
    assert summary["rounds"][2]["heldout_acc_sft"] == pytest.approx(0.5)
    assert "round 1 25.0% → 21.7%; round 2 50.0% → 33.3%" in report
    assert set(summary["stage_seconds"]) == set(plan) | {"total"}

    # A second --resume of a finished run runs nothing.
    iterate(cfg, "--resume", env=env_with(OVLT_FAKE_CALLS=log))
    assert calls(log) == got


def test_config_change_refused_then_force_from(tmp_path):
    out = tmp_path / "runs"
    cfg = write_cfg(tmp_path, out, rounds=1)
    log = tmp_path / "calls.jsonl"
    env = env_with(OVLT_FAKE_CALLS=log)
    iterate(cfg, env=env)
    man = out / "fake" / "manifest.json"
    before = json.loads(man.read_text())["stages"]
    assert calls(log) == ["r0.prepare", "r0.eval", "r1.data", "r1.sft", "r1.grpo", "r1.eval"]

    # A changed SFT learning rate: finished r1.sft is refused, naming the key.
    p = iterate(cfg, "--resume", "sft.optimizer.lr=3e-5", env=env, check=False)
    assert p.returncode == 1
    assert "r1.sft" in p.stderr and "sft.optimizer.lr" in p.stderr and "--force-from" in p.stderr
    assert len(calls(log)) == 6  # nothing ran
    # --force-from a later stage does not cover the change either.
    p = iterate(cfg, "--force-from", "r1.grpo", "sft.optimizer.lr=3e-5", env=env, check=False)
    assert p.returncode == 1 and "r1.sft" in p.stderr

    # --force-from r1.sft reruns r1.sft and everything after it, nothing before.
    iterate(cfg, "--force-from", "r1.sft", "sft.optimizer.lr=3e-5", env=env)
    assert calls(log)[6:] == ["r1.sft", "r1.grpo", "r1.eval"]
    after = json.loads(man.read_text())["stages"]
    for sid in ("r0.prepare", "r0.eval", "r1.data"):
        assert after[sid]["started"] == before[sid]["started"]
    assert after["r1.sft"]["config_hash"] != before["r1.sft"]["config_hash"]
    assert after["r1.sft"]["config"]["sft"]["optimizer"]["lr"] == 3e-5
    # The fake SFT's loss depends on its config: the metric changed with the lr.
    assert after["r1.sft"]["metrics"]["loss_first"] != before["r1.sft"]["metrics"]["loss_first"]
    # GRPO trained from the new SFT export (its config file names it).
    import yaml
    gcfg = yaml.safe_load((out / "fake" / "r1.grpo" / "config.yaml").read_text())
    assert gcfg["model"]["hf_path"] == str((out / "fake" / "r1.sft" / "ckpt" / "final_hf").resolve())
    assert [c["name"] for c in gcfg["grpo"]["curriculum"]] == ["medium", "hard"]
    assert [c["epochs"] for c in gcfg["grpo"]["curriculum"]] == [1.0, 2.0]
    assert [c["freeze_vision"] for c in gcfg["grpo"]["curriculum"]] == [True, False]
    # SFT always starts from the base model.
    scfg = yaml.safe_load((out / "fake" / "r1.sft" / "config.yaml").read_text())
    assert scfg["model"]["hf_path"] == str((out / "fake" / "r0.prepare" / "base_model").resolve())

    # More rounds on a finished run: only the new round's stages run.
    iterate(cfg, "--resume", "sft.optimizer.lr=3e-5", "iterate.rounds=2", env=env)
    assert calls(log)[9:] == ["r2.data", "r2.sft", "r2.grpo", "r2.eval"]
    r2 = yaml.safe_load((out / "fake" / "r2.data" / "config.yaml").read_text())
    assert r2["model"]["hf_path"] == str((out / "fake" / "r1.grpo" / "ckpt" / "final_hf").resolve())


def test_failed_stage_reports_log_and_resumes(tmp_path):
    out = tmp_path / "runs"
    cfg = write_cfg(tmp_path, out, rounds=1, extra="  nproc_sft: 2\n")
    log = tmp_path / "calls.jsonl"
    p = iterate(cfg, env=env_with(OVLT_FAKE_CALLS=log, OVLT_FAKE_FAIL="r1.sft"), check=False)
    assert p.returncode == 1
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("ovlt iterate: error:")]
    assert errors == [f"ovlt iterate: error: stage r1.sft failed with exit code 1: fake failure "
                      f"in r1.sft (log {out / 'fake' / 'r1.sft' / 'stage.log'}); fix it and "
                      "rerun with --resume"], p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    man = out / "fake" / "manifest.json"
    assert stage_status(man, "r1.sft") == "failed"
    iterate(cfg, "--resume", env=env_with(OVLT_FAKE_CALLS=log))
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    # nproc_sft=2: torchrun started two ranks of the SFT stage with world size 2. (In the failing
    # attempt torchrun stops the other rank once one fails, maybe before it logged.)
    sft = [(r["token"].rsplit(":", 1)[1], r["rank"], r["world"]) for r in rows
           if r["sid"] == "r1.sft"]
    assert sorted(x for x in sft if x[0] == "2") == [("2", 0, 2), ("2", 1, 2)]
    assert 1 <= len([x for x in sft if x[0] == "1"]) <= 2
    assert [r["sid"] for r in rows if r["rank"] == 0].count("r1.data") == 1
    assert stage_status(man, "r1.eval") == "done"


def test_sigterm_stops_the_stage_and_its_workers(tmp_path):
    out = tmp_path / "runs"
    cfg = write_cfg(tmp_path, out, rounds=1, extra="  nproc_sft: 2\n")
    log = tmp_path / "calls.jsonl"
    man = out / "fake" / "manifest.json"
    proc = subprocess.Popen([sys.executable, "launchers/iterate.py", "--config", str(cfg)],
                            cwd=REPO, env=env_with(OVLT_FAKE_CALLS=log, OVLT_FAKE_SLEEP="r1.sft=300"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: calls(log).count("r1.sft") == 2, what="both SFT ranks to start")
        token = json.loads(man.read_text())["stages"]["r1.sft"]["token"]
        from ovlt.iterate.runner import find_token_pids
        assert len(find_token_pids(token)) >= 3  # torchrun + 2 workers
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    assert find_token_pids(token) == []
    assert stage_status(man, "r1.sft") == "running"  # a later --resume runs it again
