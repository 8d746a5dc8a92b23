"""torch.distributed + megatron-core `parallel_state` initialisation.

`init_distributed(parallel_cfg)` reads the launcher's environment (torchrun: RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT; SLURM srun: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, ...),
falls back to a single process when neither is set, picks nccl on GPU / gloo on CPU, puts
`parallel.timeout_minutes` on every process group (the world group and all of mcore's), builds
mcore's TP/PP/CP/DP groups and seeds python/numpy/torch plus mcore's tensor-parallel RNG
tracker. Failures are re-raised tagged with the rank, so a hang or crash in a 64-process job
says which process it was.

`report_error(exc, prog)` is how a command ends on an exception (launchers, `ovlt` CLI):
  * bad user input (`ovlt.errors.is_input_error`: a config key, a missing / corrupt file, a bad
    record or checkpoint) prints ONE line, `prog: error: <what and where>`, no traceback;
  * anything else is a bug: the traceback is printed;
  * either way every rank's log file (`<save_dir>/logs/rank<r>.log`) gets the full traceback,
    and torchrun's failure summary shows the line (its error file is written).
Under torchrun rank 0 reports at once and says so in the process group's store; another rank
with an error waits up to `OVLT_ERROR_GRACE_S` (10 s) for that word and then exits quietly; only
when rank 0 has not reported (the error was that rank's alone) does it print its line, tagged
`[rank R/W]`. An error raised before the process groups exist (config, input files: the same on
every rank) ends the other ranks at once, silently.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ovlt.logging import get_logger

log = get_logger(__name__)


class DistributedError(RuntimeError):
    """A distributed set-up failure; the message starts with `[rank R/W]`."""


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    cp: int
    dp: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist such as `gpu[003-005,9],cpu1` -> `gpu003`."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise DistributedError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def read_launch_env(env: Optional[dict] = None) -> LaunchEnv:
    """Where this process sits, from torchrun or SLURM variables (torchrun wins)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        try:
            return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]),
                             int(env.get("LOCAL_RANK", 0)), env.get("MASTER_ADDR", "127.0.0.1"),
                             int(env.get("MASTER_PORT", 29500)), "torchrun")
        except ValueError as e:
            raise DistributedError(f"bad torchrun environment: {e}") from None
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        try:
            addr = env.get("MASTER_ADDR") or first_slurm_host(
                env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1")))
            # A job-specific default port so two jobs sharing a node don't collide.
            port = int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000))
            return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                             int(env.get("SLURM_LOCALID", 0)), addr, port, "slurm")
        except ValueError as e:
            raise DistributedError(f"bad SLURM environment: {e}") from None
    return LaunchEnv(0, 1, 0, "127.0.0.1", 0, "single")


def _backend(requested: str) -> str:
    if requested in ("nccl", "gloo"):
        if requested == "nccl" and not torch.cuda.is_available():
            raise DistributedError("parallel.backend=nccl but no CUDA device is visible")
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def set_seed(seed: int, tp_rng: bool = True) -> None:
    """Seed python, numpy, torch and (after parallel_state exists) mcore's TP RNG tracker:
    the same default stream on every TP rank, a TP-rank-dependent stream for TP-split dropout."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    if tp_rng:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
        if parallel_state.model_parallel_is_initialized():
            model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def init_distributed(parallel_cfg=None, seed: int = 1234) -> DistInfo:
    """Initialise torch.distributed and mcore parallel_state; see the module docstring.
    `parallel_cfg`: `ovlt.config.ParallelConfig` (None = all sizes 1)."""
    from ovlt.config import ParallelConfig
    p = parallel_cfg or ParallelConfig()
    le = read_launch_env()
    tag = f"[rank {le.rank}/{le.world_size}]"
    mp = p.tensor_parallel * p.pipeline_parallel * p.context_parallel
    if le.world_size % mp:
        raise DistributedError(f"{tag} world size {le.world_size} is not divisible by "
                               f"tensor_parallel x pipeline_parallel x context_parallel = {mp}")
    backend = _backend(p.backend)
    if not torch.cuda.is_available():
        from ovlt.compat import mcore_cpu
        mcore_cpu.apply()
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", le.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    timeout = timedelta(minutes=p.timeout_minutes)
    try:
        if not dist.is_initialized():
            if le.source == "single":
                # No launcher: a private in-process store, no port to pick or collide on.
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                        timeout=timeout)
            else:
                dist.init_process_group(
                    backend, init_method=f"tcp://{le.master_addr}:{le.master_port}",
                    rank=le.rank, world_size=le.world_size, timeout=timeout)
        from megatron.core import parallel_state
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=p.tensor_parallel,
            pipeline_model_parallel_size=p.pipeline_parallel,
            context_parallel_size=p.context_parallel,
            distributed_timeout_minutes=p.timeout_minutes,
            # With gloo the main groups are gloo already: don't build a second copy of each.
            create_gloo_process_groups=backend == "nccl")
        set_seed(seed)
    except DistributedError:
        raise
    except Exception as e:  # tag the rank: the interesting failure is usually on one process
        raise DistributedError(f"{tag} distributed init failed ({le.source}, backend={backend}, "
                               f"master={le.master_addr}:{le.master_port}): {e}") from e
    info = DistInfo(rank=le.rank, world_size=le.world_size, local_rank=le.local_rank,
                    tp=p.tensor_parallel, pp=p.pipeline_parallel, cp=p.context_parallel,
                    dp=le.world_size // mp, device=device)
    log.info("distributed: %s via %s, backend=%s, tp=%d pp=%d cp=%d dp=%d, timeout=%.1f min",
             le.world_size, le.source, backend, info.tp, info.pp, info.cp, info.dp,
             p.timeout_minutes)
    return info


def has_gloo_group_copies() -> bool:
    """Whether `init_distributed` built gloo copies of mcore's groups (it does beside NCCL
    groups only: with gloo the main groups serve). What `use_gloo_process_groups` of mcore's
    optimizer must say: the backend decides, not whether a GPU is visible (gloo on a GPU
    machine is allowed)."""
    return dist.is_initialized() and dist.get_backend() == "nccl"


def destroy_distributed(barrier: bool = False) -> None:
    """Tear down mcore's groups and the default process group (safe to call twice).
    `barrier=True` first waits for every rank: rank 0 hosts the TCP store, so a rank that
    finishes early must not tear down while others still talk to it."""
    from megatron.core import parallel_state
    if barrier and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- error reporting
def log_to_files(text: str) -> None:
    """`text` into the rank's log file(s) only (not the console)."""
    root = logging.getLogger()
    rec = logging.LogRecord("ovlt.error", logging.ERROR, __file__, 0, text, None, None)
    for h in root.handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(rec)


def _elastic_error_file(line: str) -> None:
    """torchrun's per-rank error file: its failure summary then shows `line`."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as f:
            json.dump({"message": {"message": line, "extraInfo": {
                "py_callstack": line, "timestamp": str(int(time.time()))}}}, f)
    except OSError:
        pass


ERROR_REPORTED_KEY = "ovlt/error_reported"  # set in the store by the rank that reported


def error_store():
    """The default process group's key-value store (None without one)."""
    if not dist.is_initialized():
        return None
    try:
        from torch.distributed import distributed_c10d
        return distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store: fall back to reporting from every rank
        return None


def _rank0_reported(store, grace_s: float) -> bool:
    """Whether rank 0 says (within `grace_s`) that it reported an error. A store that is gone
    means rank 0 has exited: it reported, or torchrun shows why it died."""
    if store is None:
        return False
    end = time.monotonic() + grace_s
    while True:
        try:
            if store.check([ERROR_REPORTED_KEY]):
                return True
        except Exception:  # noqa: BLE001 - rank 0 (the store's host) is gone
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.1)


def report_error(exc: BaseException, prog: str, same_on_all_ranks: bool = False) -> int:
    """Report `exc` as the module docstring says; returns the exit code (2: config error,
    1: anything else). `same_on_all_ranks`: the error cannot differ between ranks (raised
    before any rank-specific work), so only rank 0 says anything."""
    from ovlt.config import ConfigError
    from ovlt.errors import error_line, is_input_error

    try:
        le = read_launch_env()
        rank, world = le.rank, le.world_size
    except DistributedError:
        rank, world = 0, 1
    user = is_input_error(exc)
    code = 2 if isinstance(exc, ConfigError) else 1
    what = "error" if user else f"internal error ({type(exc).__name__})"
    tag = f"[rank {rank}/{world}] " if rank else ""
    line = f"{tag}{prog}: {what}: {error_line(exc)}"
    tb = "".join(traceback.format_exception(exc))
    log_to_files(f"{line}\n{tb}")
    _elastic_error_file(line)
    store = error_store()
    if rank == 0 and store is not None:
        try:
            store.set(ERROR_REPORTED_KEY, "1")
        except Exception:  # noqa: BLE001 - nobody to tell
            pass
    if rank != 0 and (same_on_all_ranks or not dist.is_initialized() or _rank0_reported(
            store, float(os.environ.get("OVLT_ERROR_GRACE_S", "10")))):
        return code
    if not user:
        sys.stderr.write(tb)
    print(line, file=sys.stderr, flush=True)
    return code
