"""The run manifest: one JSON file, rewritten atomically after every state change.

{"name", "created", "stages": {stage_id: {status, round, stage, config_hash, config,
 inputs, outputs, metrics, started, finished, seconds, attempts, log, token}}}

status: pending -> running -> done | failed. A kill leaves a stage "running"; the next
`--resume` treats it as unfinished and runs it again. A finished stage's recorded `config`
(the stage-relevant slice of the job config) is compared with the current one on resume.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Optional

from ovlt.utils.io import atomic_write_json

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"


def config_hash(obj: Any) -> str:
    """Stable hash of a JSON-able config slice (key order does not matter)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (for refusal messages)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += diff_keys(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if old == new else [prefix or "<root>"]


class Manifest:
    def __init__(self, path: str | Path, data: Optional[dict] = None):
        self.path = Path(path)
        self.data = data if data is not None else {"version": 1, "stages": {}}

    # ------------------------------------------------------------------ io
    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: manifest is not valid JSON ({e}); it is written "
                             "atomically, so this file was edited by hand") from None
        if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
            raise ValueError(f"{path}: manifest has no 'stages' mapping")
        return cls(path, data)

    def save(self) -> None:
        atomic_write_json(self.path, self.data)

    # ------------------------------------------------------------------ stages
    @property
    def stages(self) -> dict[str, dict]:
        return self.data["stages"]

    def get(self, sid: str) -> dict:
        return self.stages.get(sid) or {"status": PENDING}

    def status(self, sid: str) -> str:
        return self.get(sid).get("status", PENDING)

    def mark_running(self, sid: str, *, round_: int, stage: str, config: dict, inputs: dict,
                     outputs: dict, log: str, token: str) -> None:
        prev = self.stages.get(sid, {})
        self.stages[sid] = {
            "status": RUNNING, "round": round_, "stage": stage,
            "config_hash": config_hash(config), "config": config,
            "inputs": inputs, "outputs": outputs, "metrics": {},
            "started": time.time(), "finished": None, "seconds": None,
            "attempts": int(prev.get("attempts", 0)) + 1, "log": log, "token": token,
        }
        self.save()

    def mark_done(self, sid: str, metrics: dict) -> None:
        st = self.stages[sid]
        st["status"] = DONE
        st["metrics"] = metrics
        st["finished"] = time.time()
        st["seconds"] = round(st["finished"] - st["started"], 3)
        self.save()

    def mark_failed(self, sid: str, error: str) -> None:
        st = self.stages[sid]
        st["status"] = FAILED
        st["error"] = error
        st["finished"] = time.time()
        st["seconds"] = round(st["finished"] - st["started"], 3)
        self.save()

    def reset(self, sid: str) -> None:
        """Forget a stage (for --force-from); its attempt count is kept for the record."""
        if sid in self.stages:
            attempts = self.stages[sid].get("attempts", 0)
            self.stages[sid] = {"status": PENDING, "attempts": attempts}
