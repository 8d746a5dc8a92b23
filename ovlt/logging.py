"""Rank-tagged logging: rank 0 logs to the console, every rank to its own file when asked."""
from __future__ import annotations

import logging
import os
import sys

_CONFIGURED = False
_ONCE: set[str] = set()


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted, so a redirect installed
    after setup (a test's capture, a launcher's tee) is honoured and a closed one never is."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def setup_logging(log_dir: str | None = None, level: int = logging.INFO) -> None:
    """Rank 0 prints INFO to stderr; other ranks print WARNING+; with log_dir every rank also
    writes `rank{r}.log` there."""
    global _CONFIGURED
    rank = _rank()
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
                            "%H:%M:%S")
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_ovlt", False):
            root.removeHandler(h)
    console = _CurrentStderrHandler()
    console.setLevel(level if rank == 0 else logging.WARNING)
    console.setFormatter(fmt)
    console._ovlt = True
    root.addHandler(console)
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        fh = logging.FileHandler(os.path.join(log_dir, f"rank{rank}.log"))
        fh.setFormatter(fmt)
        fh.setLevel(level)
        fh._ovlt = True
        root.addHandler(fh)
    root.setLevel(level)
    # The grader's LaTeX parser logs every tolerated parse error of a model's answer at INFO:
    # thousands of lines a GRPO step, none of them the run's news.
    logging.getLogger("pylatexenc").setLevel(max(level, logging.WARNING))
    _CONFIGURED = True


def get_logger(name: str) -> logging.Logger:
    if not _CONFIGURED and not logging.getLogger().handlers:
        setup_logging()
    return logging.getLogger(name)


def log_once(logger: logging.Logger, key: str, msg: str, *args, level: int = logging.INFO) -> None:
    """Log a message once per process (e.g. which optional backend is in use)."""
    if key in _ONCE:
        return
    _ONCE.add(key)
    logger.log(level, msg, *args)
