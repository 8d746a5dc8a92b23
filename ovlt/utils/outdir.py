"""Output directories that a command builds and may later replace — only ever its own.

A command builds its output in `<out>.partial` (marked as ovlt's by a `.ovlt-output.json`
inside) and renames it into place when complete. It deletes nothing it did not write:
  * an existing `<out>` is replaced (with --force) only when it is an earlier output of the
    same kind (the marker, or `looks_like_ours` for outputs written before markers existed);
  * an existing `<out>.partial` is removed only when it carries the marker (a killed run's);
  * an output that overlaps an input (the same directory, one inside the other) is refused.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

from ovlt.errors import InputError

MARKER = ".ovlt-output.json"


class OutputDirError(InputError):
    """The output directory would overwrite or delete something ovlt did not write."""


def overlaps(a, b) -> bool:
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a in b.parents or b in a.parents


def check_separate(out, out_name: str, inputs: dict) -> None:
    """`inputs`: {option name: path}. Refuse an output that is, holds or lies in an input."""
    partial = partial_of(Path(out))
    for name, inp in inputs.items():
        if inp is None:
            continue
        for o in (Path(out), partial):
            if overlaps(o, inp):
                raise OutputDirError(f"{out_name} {o} overlaps {name} {inp}: the output would "
                                     f"replace the input; choose an {out_name} outside it")


def partial_of(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def is_own(d: Path, kind: str, looks_like_ours: Optional[Callable[[Path], bool]] = None) -> bool:
    """`d` is an output of `kind` that ovlt wrote (its marker; or, without one, it looks like
    one by `looks_like_ours`)."""
    m = d / MARKER
    if m.is_file():
        try:
            return json.loads(m.read_text(encoding="utf-8")).get("kind") == kind
        except (ValueError, UnicodeDecodeError, AttributeError):
            return False
    return looks_like_ours is not None and looks_like_ours(d)


def _is_empty_dir(d: Path) -> bool:
    return d.is_dir() and not any(d.iterdir())


def mark(d: Path, kind: str) -> None:
    (d / MARKER).write_text(json.dumps({"kind": kind, "written_by": "ovlt"}) + "\n")


def stage(out, kind: str, force: bool, out_name: str = "--out",
          looks_like_ours: Optional[Callable[[Path], bool]] = None) -> Path:
    """Check that `out` may be written (absent, empty, or with `force` an earlier output of
    `kind`) and return a fresh, marked `<out>.partial` to build it in."""
    out = Path(out)
    if out.exists() and not _is_empty_dir(out):
        if not out.is_dir():
            raise OutputDirError(f"{out_name} {out} is a file, not a directory; remove it or "
                                 "choose another path")
        if not force:
            raise OutputDirError(f"{out_name} {out} exists and is not empty (pass --force to "
                                 "replace an earlier output of this command)")
        if not is_own(out, kind, looks_like_ours):
            raise OutputDirError(f"{out_name} {out} holds files this command did not write "
                                 f"(no {MARKER}); --force replaces only its own earlier output: "
                                 "choose another path or remove it yourself")
    tmp = partial_of(out)
    if tmp.exists() or tmp.is_symlink():
        if not tmp.is_dir() or tmp.is_symlink() or not (
                is_own(tmp, kind) or _is_empty_dir(tmp)):
            raise OutputDirError(f"{tmp} exists and was not left by an interrupted ovlt run; "
                                 "rename or remove it (it is where the output is built)")
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    mark(tmp, kind)
    return tmp


def commit(tmp: Path, out) -> None:
    """Move the finished `tmp` into place, replacing `out` (already checked by `stage`)."""
    out = Path(out)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
