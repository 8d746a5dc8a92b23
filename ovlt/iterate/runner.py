"""How a stage's processes are started: a small interface with a local and a SLURM runner.

A `StageLaunch` says what to run (a script path or `-m module` plus its args), how wide
(`nnodes` x `nproc`), where its log goes and which environment it gets. Every stage runs under
`torchrun` (`python -m torch.distributed.run`) so each stage picks its own world size:
  - LocalRunner: one node, `--standalone` rendezvous.
  - SlurmRunner: inside an allocation, `srun` one task per node on the first `nnodes` hosts of
    SLURM_JOB_NODELIST, torchrun's c10d rendezvous at the first host.
Each launch carries a token in its environment (OVLT_STAGE_TOKEN) so that processes left over by
a killed orchestrator can be found and ended before the stage is run again.
"""
from __future__ import annotations

import ctypes
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ovlt.logging import get_logger

log = get_logger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
TOKEN_ENV = "OVLT_STAGE_TOKEN"


@dataclass
class StageLaunch:
    sid: str
    program: str                 # "path/to/script.py" (relative to the repo) or "-m module"
    args: list[str]
    nproc: int = 1
    nnodes: int = 1
    log_path: Path = Path("stage.log")
    env: dict = field(default_factory=dict)
    token: str = ""
    port: int = 29400


def program_argv(program: str) -> list[str]:
    parts = shlex.split(program)
    if not parts:
        raise ValueError("empty stage program")
    if parts[0] == "-m":
        return parts
    path = Path(parts[0])
    if not path.is_absolute():
        path = REPO_ROOT / path
    return [str(path)] + parts[1:]


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run"]


def _die_with_parent() -> None:
    """preexec: the stage's launcher gets SIGKILL when the orchestrator dies (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Runner:
    def command(self, launch: StageLaunch) -> list[str]:
        raise NotImplementedError

    def run(self, launch: StageLaunch) -> int:
        cmd = self.command(launch)
        env = dict(os.environ)
        env.update(launch.env)
        env[TOKEN_ENV] = launch.token
        # The repo must be importable by `-m ovlt...` programs wherever the loop was started.
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        launch.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(launch.log_path, "ab") as f:
            f.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
            f.flush()
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                    preexec_fn=_die_with_parent)  # cwd: the user's, like paths in the config
            try:
                return proc.wait()
            except BaseException:
                # Interrupted (Ctrl-C, SIGTERM from a scheduler): let torchrun stop its workers,
                # then make sure nothing of this attempt survives.
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                kill_token(launch.token)
                raise


class LocalRunner(Runner):
    def command(self, launch: StageLaunch) -> list[str]:
        if launch.nnodes != 1:
            raise ValueError(f"stage {launch.sid}: nnodes={launch.nnodes} needs the SLURM "
                             "launcher (iterate.launcher=slurm, via sbatch launchers/iterate.sh)")
        return _torchrun() + ["--standalone", "--nnodes=1", f"--nproc-per-node={launch.nproc}",
                              "--max-restarts=0"] + program_argv(launch.program) + launch.args


def expand_nodelist(text: str) -> list[str]:
    """SLURM hostlist syntax -> host names: "n[01-03,7],gpu-a[1-2]-ib" ->
    [n01, n02, n03, n7, gpu-a1-ib, gpu-a2-ib]."""
    hosts: list[str] = []
    for item in _split_top(text.strip()):
        hosts += _expand_one(item)
    if not hosts:
        raise ValueError(f"empty SLURM node list {text!r}")
    return hosts


def _split_top(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if depth != 0:
        raise ValueError(f"unbalanced brackets in SLURM node list {text!r}")
    if cur:
        out.append(cur)
    return [o for o in out if o]


def _expand_one(item: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if not m:
        return [item]
    head, tail = item[:m.start()], item[m.end():]
    names = []
    for part in m.group(1).split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            width = len(lo)
            names += [f"{i:0{width}d}" for i in range(int(lo), int(hi) + 1)]
        else:
            names.append(part)
    return [h for n in names for h in _expand_one(head + n + tail)]


class SlurmRunner(Runner):
    """srun + torchrun c10d rendezvous; reads the allocation from SLURM_* variables."""

    def __init__(self, environ: dict | None = None):
        env = os.environ if environ is None else environ
        if "SLURM_JOB_NODELIST" not in env and "SLURM_NODELIST" not in env:
            raise ValueError("iterate.launcher=slurm but SLURM_JOB_NODELIST is not set: run it "
                             "inside an allocation (sbatch launchers/iterate.sh)")
        self.hosts = expand_nodelist(env.get("SLURM_JOB_NODELIST") or env["SLURM_NODELIST"])
        self.job_id = env.get("SLURM_JOB_ID", "0")
        # srun no longer inherits sbatch's --cpus-per-task (Slurm >= 22.05): pass it on.
        self.cpus_per_task = env.get("SLURM_CPUS_PER_TASK")

    def command(self, launch: StageLaunch) -> list[str]:
        n = launch.nnodes
        if n > len(self.hosts):
            raise ValueError(f"stage {launch.sid}: nnodes={n} but the allocation has "
                             f"{len(self.hosts)} node(s): {','.join(self.hosts)}")
        hosts = self.hosts[:n]
        return [
            "srun", f"--nodes={n}", f"--ntasks={n}", "--ntasks-per-node=1",
            f"--nodelist={','.join(hosts)}", "--kill-on-bad-exit=1", "--export=ALL",
            f"--job-name=ovlt-{launch.sid}",
        ] + ([f"--cpus-per-task={self.cpus_per_task}"] if self.cpus_per_task else []) + _torchrun() + [
            f"--nnodes={n}", f"--nproc-per-node={launch.nproc}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={hosts[0]}:{launch.port}", f"--rdzv-id={self.job_id}-{launch.sid}",
            "--max-restarts=0",
        ] + program_argv(launch.program) + launch.args


def make_runner(kind: str) -> Runner:
    if kind == "local":
        return LocalRunner()
    if kind == "slurm":
        return SlurmRunner()
    raise ValueError(f"iterate.launcher: {kind!r} not allowed; allowed values: 'local', 'slurm'")


# ---------------------------------------------------------------------- stale processes
def find_token_pids(token: str) -> list[int]:
    """Pids of this user's processes whose environment carries OVLT_STAGE_TOKEN=token."""
    if not token:
        return []
    needle = f"{TOKEN_ENV}={token}\0".encode()
    pids = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (d / "environ").read_bytes() + b"\0":
                pids.append(int(d.name))
        except (OSError, ValueError):
            continue
    return [p for p in pids if p != os.getpid()]


def kill_token(token: str, timeout_s: float = 10.0) -> int:
    """SIGKILL every leftover process of a stage attempt; returns how many were found."""
    pids = find_token_pids(token)
    found = len(pids)
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.time() + timeout_s
    while pids and time.time() < deadline:
        pids = [p for p in pids if Path(f"/proc/{p}").exists() and not _is_zombie(p)]
        time.sleep(0.05)
    if pids:
        log.warning("stale processes of %s still alive after SIGKILL: %s", token, pids)
    return found


def _is_zombie(pid: int) -> bool:
    try:
        return ") Z" in Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
