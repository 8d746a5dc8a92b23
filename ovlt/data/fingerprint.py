"""What a checkpoint records of the data it was trained on, and the check a resume makes.

A trainer's step plan (sample order per epoch, position in it) is a function of its records in
order, so a checkpoint stores their hash (`fingerprint`) and a resume on different data is
refused (`check_same_data`): its saved position would index records that no longer exist.
Images enter by file name only, so the same data read from another working directory or mount
point keeps its fingerprint; checkpoints written without a fingerprint are accepted as they are.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable

from ovlt.data.formats import DataError


def image_key(image) -> str:
    """An image as the fingerprint sees it: a path's file name, else a hash of the bytes/struct."""
    if isinstance(image, str):
        return os.path.basename(image)
    raw = image if isinstance(image, (bytes, bytearray)) else json.dumps(image, default=str).encode()
    return hashlib.sha256(raw).hexdigest()


def fingerprint(rows: Iterable[list]) -> dict:
    """{"samples": count, "sha256": hash of the JSON rows in order}."""
    h, n = hashlib.sha256(), 0
    for row in rows:
        h.update(json.dumps(row, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass"))
        h.update(b"\n")
        n += 1
    return {"samples": n, "sha256": h.hexdigest()}


def check_same_data(saved_state: dict, now: dict, save_dir, *, kind: str, source: str,
                    save_key: str) -> None:
    """DataError when the checkpoint's fingerprint (`saved_state["data"]`) differs from `now`.
    `kind` names the data ("SFT data"), `source` the keys that gave it ("data.sft_files=[...]"),
    `save_key` the setting to change to train anew."""
    was = saved_state.get("data")
    if not isinstance(was, dict) or "sha256" not in was or was["sha256"] == now["sha256"]:
        return
    raise DataError(
        f"{save_dir}: its checkpoint (step {saved_state.get('step')}) was trained on different "
        f"{kind} ({was.get('samples')} usable samples, fingerprint {was['sha256'][:12]}) "
        f"than {source} holds now ({now['samples']} samples, fingerprint "
        f"{now['sha256'][:12]}); resuming would continue a data order that no longer exists. "
        f"Use a new {save_key} to train on this data, or restore the data the "
        f"checkpoint was trained on")
