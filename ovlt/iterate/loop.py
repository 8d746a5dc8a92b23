"""The round loop: run the planned stages in order, each once, surviving kills.

On every start the manifest is checked against the current config:
  - a finished stage whose config slice changed is refused (naming the changed keys) unless
    `--force-from` points at it or an earlier stage;
  - `--force-from S` resets S and every later stage (their directories are removed);
  - a stage left "running" or "failed" (killed or crashed) is run again from a clean directory,
    after ending any process of the killed attempt still alive (found by its token).
One orchestrator per run directory (an flock on `.lock`; the OS drops it when the process dies).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import re
import shutil
import time
from pathlib import Path
from typing import Optional

from ovlt.config import JobConfig, save_config, to_dict
from ovlt.iterate import metrics as metrics_mod
from ovlt.iterate.manifest import DONE, FAILED, PENDING, RUNNING, Manifest, config_hash, diff_keys
from ovlt.iterate.runner import Runner, StageLaunch, kill_token
from ovlt.iterate.stages import StagePlan, build_plan, parse_stage_id, stage_config
from ovlt.logging import get_logger
from ovlt.utils.io import atomic_write_json

log = get_logger(__name__)


class IterateError(RuntimeError):
    """A refusal or a failed stage; the message says what to do."""


def run_dir_of(cfg: JobConfig) -> Path:
    return Path(cfg.iterate.out_dir) / cfg.iterate.name


def _lock(run_dir: Path):
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / ".lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise IterateError(f"{run_dir}: another `ovlt iterate` is running on this run "
                           "directory") from None
    return f


def check_manifest(man: Manifest, plans: list[StagePlan], force_from: Optional[str]) -> list[str]:
    """Refuse changed finished stages; return the stage ids to reset."""
    order = [p.sid for p in plans]
    start = order.index(force_from) if force_from else len(order)
    changed = []
    for i, p in enumerate(plans):
        st = man.get(p.sid)
        if st.get("status") != DONE or i >= start:
            continue
        if st.get("config_hash") != config_hash(p.slice):
            keys = [k for k in diff_keys(st.get("config", {}), p.slice)
                    if not _new_default_key(st.get("config", {}), p.slice, k)]
            if keys:
                changed.append(f"{p.sid} (changed: {', '.join(keys[:8])})")
    if changed:
        raise IterateError(
            "the config of finished stage(s) changed: " + "; ".join(changed) +
            f". Pass --force-from {changed[0].split()[0]} (or an earlier stage) to rerun from "
            "there, or restore the config.")
    return order[start:]


_MISSING = object()


def _lookup(d, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return _MISSING
        d = d[part]
    return d


def _new_default_key(old: dict, new: dict, key: str) -> bool:
    """A config field added to ovlt after the stage ran, at its default value: not a change
    (so upgrading ovlt does not invalidate finished stages)."""
    if _lookup(old, key) is not _MISSING:
        return False
    default = _lookup(to_dict(JobConfig()), key)
    return default is not _MISSING and default == _lookup(new, key)


def _stage_token(run_dir: Path, sid: str, attempt: int) -> str:
    h = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:12]
    return f"{h}:{sid}:{attempt}"


# torchrun's own report of a failed worker ("E1207 23:08:27.44 1594 .../api.py:1002] failed
# (exitcode: 1) ...") and everything after it: its traceback and summary, not the stage's words
_TORCHRUN_FAILED = re.compile(r"^[EW]\d{4} [\d:.]+ +\d+ .*\] failed \(exitcode")
_OURS = re.compile(r"^ovlt [\w .-]+: (internal )?error: ")


def stage_error(log_text: str) -> str:
    """The line that says why a stage failed: the program's own `ovlt ...: error:` line, else
    the last line it wrote before torchrun reported the failure."""
    lines = [ln.strip() for ln in log_text.splitlines()]
    ours = [ln for ln in lines if _OURS.match(ln)]
    if ours:
        return ours[-1]
    end = next((i for i, ln in enumerate(lines) if _TORCHRUN_FAILED.match(ln)), len(lines))
    before = [ln for ln in lines[:end] if ln]
    return before[-1] if before else "(the log is empty)"


def run_stage(plan: StagePlan, cfg: JobConfig, man: Manifest, runner: Runner, port: int,
              run_dir: Path) -> None:
    prev = man.get(plan.sid)
    if prev.get("status") in (RUNNING, FAILED):
        n = kill_token(prev.get("token", ""))
        log.info("%s: was %s (attempt %s); %d leftover process(es) ended; starting clean",
                 plan.sid, prev["status"], prev.get("attempts"), n)
    keep = (plan.stage in ("sft", "grpo") and cfg.iterate.resume_trainers
            and prev.get("status") in (RUNNING, FAILED)
            and prev.get("config_hash") == config_hash(plan.slice))
    if keep:  # the trainer resumes from its last checkpoint under save_dir
        log.info("%s: keeping %s so the trainer resumes from its last checkpoint", plan.sid,
                 plan.dir)
    elif plan.dir.exists():
        shutil.rmtree(plan.dir)
    plan.dir.mkdir(parents=True, exist_ok=True)
    scfg = stage_config(cfg, plan)
    save_config(scfg, plan.config_path)
    atomic_write_json(plan.stage_json, {"sid": plan.sid, "round": plan.round, "stage": plan.stage,
                                        "inputs": plan.inputs, "outputs": plan.outputs})
    attempt = int(prev.get("attempts", 0)) + 1
    token = _stage_token(run_dir, plan.sid, attempt)
    man.mark_running(plan.sid, round_=plan.round, stage=plan.stage, config=plan.slice,
                     inputs=plan.inputs, outputs=plan.outputs, log=str(plan.log_path), token=token)
    env = dict(kv.split("=", 1) for kv in cfg.iterate.stage_env)
    args = ["--config", str(plan.config_path)]
    if plan.stage not in ("sft", "grpo"):  # the trainers' launchers take only --config
        args += ["--stage", str(plan.stage_json)]
    launch = StageLaunch(plan.sid, plan.program, args, plan.nproc, plan.nnodes,
                         plan.log_path, env, token, port)
    log.info("%s: starting (%d node(s) x %d proc, log %s)", plan.sid, plan.nnodes, plan.nproc,
             plan.log_path)
    t0 = time.time()
    rc = runner.run(launch)
    if rc != 0:
        man.mark_failed(plan.sid, f"exit code {rc}")
        try:
            text = plan.log_path.read_text(errors="replace")
        except OSError:
            text = ""
        raise IterateError(f"stage {plan.sid} failed with exit code {rc}: {stage_error(text)} "
                           f"(log {plan.log_path}); fix it and rerun with --resume")
    missing = [p for p in plan.required if not Path(p).exists()]
    if missing:
        man.mark_failed(plan.sid, f"missing outputs {missing}")
        raise IterateError(f"stage {plan.sid} exited 0 but did not write {', '.join(missing)}; "
                           f"log {plan.log_path}")
    m = metrics_mod.collect(plan.stage, plan.outputs)
    man.mark_done(plan.sid, m)
    log.info("%s: done in %.1fs %s", plan.sid, time.time() - t0, json.dumps(m, default=str)[:300])


def run_loop(cfg: JobConfig, runner: Runner, resume: bool = False,
             force_from: Optional[str] = None, stop_after: Optional[str] = None,
             on_stage_done=None) -> Manifest:
    run_dir = run_dir_of(cfg)
    lock = _lock(run_dir)
    try:
        plans = build_plan(cfg, run_dir)
        for p in plans:  # every stage's config and width is checked before anything runs
            stage_config(cfg, p)
            runner.command(StageLaunch(p.sid, p.program, [], p.nproc, p.nnodes))
        man_path = run_dir / "manifest.json"
        if man_path.exists():
            man = Manifest.load(man_path)
            if not resume and not force_from and any(
                    s.get("status") != PENDING for s in man.stages.values()):
                raise IterateError(f"{man_path} exists: pass --resume to continue this run, "
                                   "--force-from STAGE to redo part of it, or choose another "
                                   "iterate.name")
        else:
            man = Manifest(man_path)
            man.data.update({"name": cfg.iterate.name, "created": time.time()})
        fsid = parse_stage_id(force_from, cfg.iterate.rounds) if force_from else None
        if fsid and fsid not in [p.sid for p in plans]:
            raise IterateError(f"--force-from {force_from}: stage {fsid} is not part of this "
                               "run's plan")
        for sid in check_manifest(man, plans, fsid):
            if man.status(sid) != PENDING:
                log.info("%s: reset by --force-from %s", sid, fsid)
                man.reset(sid)
                d = run_dir / sid
                if d.exists():
                    shutil.rmtree(d)
        man.data["plan"] = [p.sid for p in plans]
        man.save()
        save_config(cfg, run_dir / "config.yaml")
        for i, p in enumerate(plans):
            if man.status(p.sid) == DONE:
                log.info("%s: done already, skipped", p.sid)
            else:
                run_stage(p, cfg, man, runner, cfg.iterate.master_port + i, run_dir)
                if on_stage_done:
                    on_stage_done(man, p)
            if stop_after and p.sid == stop_after:
                break
        return man
    finally:
        lock.close()
