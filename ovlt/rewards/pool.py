"""Reward computation in worker processes, with a hard per-item timeout.

sympy (inside math-verify) can hang or grind for minutes in C code that a signal cannot
interrupt, so every item runs in a worker process; an item that exceeds `timeout_s` gets its
worker SIGKILLed and replaced, scores 0 and is counted in `stats.timeouts`. A worker that dies
for another reason (OOM killer, a stray `kill`) is replaced too; its item is retried once and then
scores 0 (`stats.crashes`). A grader exception scores 0 (`stats.errors`). Workers are started
with the "spawn" method (no forked copy of a trainer's threads or CUDA state) and are all
stopped by `close()` / the context manager / interpreter exit, so the pool leaks no processes.

    with RewardPool(num_workers=2, timeout_s=5.0) as pool:
        rewards = pool.score(responses, ground_truths, partial_credit=0.5)

    # from the job config (accuracy + weighted format reward in `rewards.style`):
    with RewardPool.from_config(cfg.rewards) as pool:
        rewards = pool.score(responses, ground_truths, **reward_kwargs(cfg.rewards))
"""
from __future__ import annotations

import importlib
import multiprocessing as mp
import time
import weakref
from collections import deque
from dataclasses import asdict, dataclass
from multiprocessing.connection import wait
from typing import Callable, Optional, Sequence

from ovlt.logging import get_logger

logger = get_logger(__name__)

DEFAULT_FN = "ovlt.rewards.math_reward:math_reward"
STARTUP_TIMEOUT_S = 300.0  # importing sympy on a loaded machine can take a while


@dataclass
class PoolStats:
    items: int = 0        # items scored (including the zeros below)
    timeouts: int = 0     # items whose grader ran past timeout_s
    errors: int = 0       # items whose grader raised
    crashes: int = 0      # items lost twice to a worker that died
    restarts: int = 0     # workers started to replace a killed or dead one

    def as_dict(self) -> dict:
        return asdict(self)


def _resolve(fn_spec: str) -> Callable:
    mod, name = fn_spec.split(":")
    return getattr(importlib.import_module(mod), name)


def _worker_main(conn, fn_spec: str) -> None:
    """Worker loop: import and warm up the grader, say "ready", then receive
    (index, args, kwargs) and send (index, ok, value)."""
    try:
        fn = _resolve(fn_spec)
        warmup = getattr(importlib.import_module(fn_spec.split(":")[0]), "warmup", None)
        if callable(warmup):
            warmup()  # lazy imports (sympy, latex parser) must not eat the first item's timeout
    except Exception as e:
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if msg is None:
            return
        idx, args, kwargs = msg
        try:
            conn.send((idx, True, float(fn(*args, **kwargs))))
        except Exception as e:  # the grader's bug must not kill the worker
            conn.send((idx, False, f"{type(e).__name__}: {e}"))


def accuracy_kwargs(reward_cfg) -> dict:
    """`math_reward` keyword arguments from `RewardConfig` (style and its options)."""
    return {"partial_credit": reward_cfg.partial_credit, "fallback": reward_cfg.fallback,
            "style": reward_cfg.style}


def reward_kwargs(reward_cfg) -> dict:
    """`total_reward` keyword arguments from `RewardConfig`."""
    return {**accuracy_kwargs(reward_cfg), "format_weight": reward_cfg.format_weight}


class _Worker:
    def __init__(self, ctx, fn_spec: str):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, fn_spec), daemon=True)
        self.proc.start()
        child.close()
        self.task: Optional[int] = None   # index of the item in flight
        self.started = 0.0
        self.ready = False                 # imported and warmed up; item timers start after

    def wait_ready(self, timeout: float) -> None:
        """Block until the worker has started (start-up is not charged to any item)."""
        if self.ready:
            return
        if not self.conn.poll(timeout):
            self.kill()
            raise RuntimeError(f"reward worker pid {self.proc.pid} did not start in {timeout:.0f}s")
        try:
            status, detail = self.conn.recv()
        except (EOFError, OSError):
            status, detail = "failed", f"exited with code {self.proc.exitcode}"
        if status != "ready":
            self.kill()
            raise RuntimeError(f"reward worker failed to start: {detail}")
        self.ready = True

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


def _shutdown(workers: list) -> None:
    for w in workers:
        try:
            if w.proc.is_alive():
                w.conn.send(None)
        except (OSError, BrokenPipeError):
            pass
    deadline = time.monotonic() + 2.0
    for w in workers:
        w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
        w.kill()
    workers.clear()


class RewardPool:
    """`num_workers` processes computing `fn(*args, **kwargs) -> float` with a per-item timeout.

    `fn` is a "module:function" string (default: `math_reward`) so that spawned workers can
    import it."""

    def __init__(self, num_workers: int = 2, timeout_s: float = 5.0, fn: str = DEFAULT_FN):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        _resolve(fn)  # fail here, not in a worker, on a bad name
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.fn = fn
        self.stats = PoolStats()
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = [_Worker(self._ctx, fn) for _ in range(num_workers)]
        self._closed = False
        # Stops the workers on close(), on garbage collection, or at interpreter exit
        # (finalize runs at exit by default) even if the caller forgets close().
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)

    @classmethod
    def from_config(cls, reward_cfg) -> "RewardPool":
        """From `RewardConfig` (num_workers, timeout_s); pair with `reward_kwargs(reward_cfg)`."""
        return cls(num_workers=reward_cfg.num_workers, timeout_s=reward_cfg.timeout_s,
                   fn="ovlt.rewards.math_reward:total_reward")

    # ------------------------------------------------------------------ public API
    def score(self, responses: Sequence[str], ground_truths: Sequence[str], **kwargs) -> list[float]:
        """Default-function convenience: `fn(response, ground_truth, **kwargs)` per pair."""
        if len(responses) != len(ground_truths):
            raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
        return self.map([((r, g), kwargs) for r, g in zip(responses, ground_truths)])

    def map(self, calls: Sequence[tuple[tuple, dict]]) -> list[float]:
        """Run `fn(*args, **kwargs)` for each (args, kwargs); results in input order."""
        if self._closed:
            raise RuntimeError("RewardPool is closed")
        results: list[float] = [0.0] * len(calls)
        attempts = [0] * len(calls)
        todo = deque(range(len(calls)))
        remaining = len(calls)
        while remaining:
            self._ensure_workers()
            for w in self._workers:
                if w.task is None and todo:
                    i = todo.popleft()
                    attempts[i] += 1
                    w.task, w.started = i, time.monotonic()
                    args, kwargs = calls[i]
                    try:
                        w.conn.send((i, tuple(args), dict(kwargs)))
                    except (BrokenPipeError, OSError):
                        # died since _ensure_workers looked; the crash branch below retries it
                        w.proc.join(timeout=5)
            busy = [w for w in self._workers if w.task is not None]
            next_deadline = min(w.started for w in busy) + self.timeout_s
            ready = wait([w.conn for w in busy] + [w.proc.sentinel for w in busy],
                         timeout=max(0.0, next_deadline - time.monotonic()))
            now = time.monotonic()
            for w in busy:
                if w.conn in ready or w.conn.poll():
                    try:
                        idx, ok, value = w.conn.recv()
                    except (EOFError, OSError):
                        ok = None  # died mid-send; handled as a crash below
                    else:
                        results[idx] = value if ok else 0.0
                        if not ok:
                            self.stats.errors += 1
                            logger.warning("reward item %d raised in worker: %s", idx, value)
                        self.stats.items += 1
                        remaining -= 1
                        w.task = None
                        continue
                if not w.proc.is_alive():
                    i = w.task
                    w.task = None
                    if attempts[i] < 2:
                        todo.appendleft(i)
                        logger.warning("reward worker pid %s died; retrying item %d", w.proc.pid, i)
                    else:
                        self.stats.crashes += 1
                        self.stats.items += 1
                        remaining -= 1
                        logger.warning("reward worker died twice on item %d; scored 0", i)
                elif now - w.started >= self.timeout_s:
                    logger.warning("reward item %d exceeded %.1fs; worker pid %s killed, scored 0",
                                   w.task, self.timeout_s, w.proc.pid)
                    w.kill()
                    w.task = None
                    self.stats.timeouts += 1
                    self.stats.items += 1
                    remaining -= 1
        return results

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._finalizer()

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _ensure_workers(self) -> None:
        """Replace dead workers (timed out, crashed, or killed from outside between calls) and
        wait until every worker is ready."""
        for k, w in enumerate(self._workers):
            if not w.proc.is_alive() and w.task is None:
                w.kill()
                self._workers[k] = _Worker(self._ctx, self.fn)
                self.stats.restarts += 1
        for w in self._workers:
            w.wait_ready(STARTUP_TIMEOUT_S)
