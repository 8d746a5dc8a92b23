"""Readers for the released OpenVLThinker data formats, with counted skips for bad records.

- SFT: sharegpt JSON (a list) or JSONL: {"messages": [{"role", "content"}...], "images": [...]}
  with one `<image>` per image in the user text; image paths relative to `image_root` if given,
  else to the file's folder. The turns are an optional first system message, then user and
  assistant alternating, starting with user and ending with assistant; any other order is a
  skip ("wrong role order"), as an assistant turn would otherwise be trained on a context that
  never occurs at inference.
- RL: parquet with `problem` (text with `<image>`), `answer`, `images` (list of paths or of
  {"bytes", "path"} structs; a single path/struct is accepted too); optional `source`,
  `difficulty`, `id` columns.
- Registry: YAML listing sources with mixing weights and caps (see `load_registry`).

Reading checks structure (cheap). `validate_*` checks what needs the images and the tokenizer
(decode, size, token length). Every problem is either a skip recorded in a `SkipReport`
(file, record index, reason; logged) or, with strict=True, a `DataError` with the same text.
A problem with a whole file (unreadable, not JSON, empty, wrong top-level shape) is one skip
with record index -1.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from ovlt.data.chat_template import IMAGE_PLACEHOLDER
from ovlt.logging import get_logger

log = get_logger(__name__)


class DataError(ValueError):
    """A bad record in strict mode; the message names file, record and reason."""


@dataclass
class Skip:
    file: str
    index: int
    reason: str

    def __str__(self):
        if self.index < 0:  # the whole file
            return f"{self.file}: {self.reason}"
        return f"{self.file}: record {self.index}: {self.reason}"


@dataclass
class SkipReport:
    """Counts every skipped record with where and why; strict=True raises instead."""
    strict: bool = False
    skips: list[Skip] = field(default_factory=list)
    valid: int = 0
    max_logged: int = 20

    def skip(self, file, index: int, reason: str) -> None:
        s = Skip(str(file), int(index), reason)
        if self.strict:
            raise DataError(str(s))
        self.skips.append(s)
        if len(self.skips) <= self.max_logged:
            log.warning("skipping %s", s)
        elif len(self.skips) == self.max_logged + 1:
            log.warning("more skipped records; see the final data report")

    def reject(self, file, index: int, reason: str) -> None:
        """Skip a record that reading had already counted as valid (failed a later check)."""
        self.valid -= 1
        self.skip(file, index, reason)

    @property
    def num_skipped(self) -> int:
        return len(self.skips)

    def by_reason(self) -> dict[str, int]:
        # Group by the reason's kind (text before the first ':'), e.g. "image file not found".
        return dict(Counter(s.reason.split(":")[0] for s in self.skips))

    def merge(self, other: "SkipReport") -> None:
        self.skips += other.skips
        self.valid += other.valid

    def summary(self) -> str:
        lines = [f"{self.valid} valid, {self.num_skipped} skipped"]
        lines += [f"  {n} x {r}" for r, n in sorted(self.by_reason().items())]
        return "\n".join(lines)


@dataclass
class SFTRecord:
    messages: list[dict]
    images: list           # resolved paths (str) or bytes
    id: str
    source: str = ""
    file: str = ""
    index: int = 0


@dataclass
class RLRecord:
    problem: str
    answer: str
    images: list           # resolved paths (str), bytes, or {"bytes", "path"} structs
    id: str
    source: str = ""
    difficulty: str = ""
    file: str = ""
    index: int = 0


_SURROGATE = re.compile("[\ud800-\udfff]")


def _bad_text(obj) -> Optional[str]:
    """Why a string in `obj` cannot be encoded as UTF-8 (the tokenizer would fail on it), or
    None: non-UTF-8 bytes (decoded with surrogateescape) or a lone surrogate escape such as
    "\\ud800" in the JSON. Iterative: records may nest deeply."""
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, str):
            m = _SURROGATE.search(o)
            if m:
                if "\udc80" <= m.group() <= "\udcff":
                    return "non-UTF-8 text"
                return f"invalid text: a lone surrogate \\u{ord(m.group()):04x} (a JSON " \
                       "escape that is not a character)"
        elif isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
    return None


def _json(text: str):
    """json.loads whose failures are a one-line reason (None when it parsed): the JSON
    error's position, or nesting too deep for the parser."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}"
    except RecursionError:
        return None, "invalid JSON: nested too deeply to parse (over ~1000 levels)"


def _resolve(p: str, base: Path, image_root: Optional[str]) -> str:
    if os.path.isabs(p):
        return p
    return str(Path(image_root) / p if image_root else base / p)


_SFT_SHAPE = ("expected sharegpt records {'messages': [{'role', 'content'}, ...], "
              "'images': [...]}")


def _raw_sft_records(path: Path, report: SkipReport) -> Iterator[tuple[int, Any]]:
    try:
        data = path.read_bytes()
    except OSError as e:
        what = "a directory, not a file" if path.is_dir() else (e.strerror or str(e))
        report.skip(path, -1, f"unreadable: {what}")
        return
    text = data.decode("utf-8", errors="surrogateescape")
    if path.suffix == ".jsonl":
        n = 0
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            n += 1
            obj, why = _json(line)
            if why:
                report.skip(path, i, why.replace(" at line 1 column", " at column"))
            else:
                yield i, obj
        if n == 0:
            report.skip(path, -1, "no records: the file is empty")
        return
    obj, why = _json(text)
    if why:
        report.skip(path, -1, why)
        return
    if isinstance(obj, dict):
        if "messages" not in obj and "conversations" not in obj and obj and \
                all(isinstance(v, dict) for v in obj.values()):
            keys = ", ".join(repr(k) for k in list(obj)[:3])
            report.skip(path, -1, f"wrong shape: top level is an object of {len(obj)} records "
                        f"keyed by id ({keys}{', ...' if len(obj) > 3 else ''}); expected a "
                        f"JSON list of records (or JSONL, one record a line); {_SFT_SHAPE}")
            return
        obj = [obj]
    if not isinstance(obj, list):
        report.skip(path, -1, f"wrong type: top level is {type(obj).__name__}, expected a list "
                    f"of records; {_SFT_SHAPE}")
        return
    if not obj:
        report.skip(path, -1, "no records: the JSON list is empty")
        return
    yield from enumerate(obj)


_ROLE = {"human": "user", "gpt": "assistant"}


def _role_order(roles: list[str]) -> Optional[str]:
    """Why the turn order is unusable, or None: an optional first system turn, then user /
    assistant alternating, starting with user and ending with assistant."""
    start = 1 if roles[0] == "system" else 0
    for j, r in enumerate(roles):
        if r == "system" and j > 0:
            return f"wrong role order: messages[{j}] is a system turn; only the first may be"
    if start == len(roles):
        return "empty answer: no assistant message"
    if roles[start] != "user":
        return f"wrong role order: messages[{start}] is {roles[start]!r}; a conversation " \
               "starts with a user turn"
    for j in range(start + 1, len(roles)):
        if roles[j] == roles[j - 1]:
            return f"wrong role order: messages[{j - 1}] and messages[{j}] are both " \
                   f"{roles[j]!r}; user and assistant turns alternate"
    if roles[-1] != "assistant":
        return f"wrong role order: the last turn, messages[{len(roles) - 1}], is 'user' " \
               "and has no answer to train on"
    return None


def check_sft_obj(obj) -> Optional[str]:
    """Why a parsed sharegpt record is unusable, or None."""
    if not isinstance(obj, dict):
        return f"wrong type: record is {type(obj).__name__}, expected an object; {_SFT_SHAPE}"
    why = _bad_text(obj)
    if why:
        return why
    msgs = obj.get("messages", obj.get("conversations"))
    if msgs is None:
        keys = sorted(map(str, obj))[:8]
        if "problem" in obj and "answer" in obj:
            return (f"looks like an RL record (keys {keys}), not SFT: SFT records need "
                    f"'messages'; RL data is read from .parquet files")
        return f"missing 'messages': the record has keys {keys}; {_SFT_SHAPE}"
    if not isinstance(msgs, list) or not msgs:
        return (f"wrong type: 'messages' is {type(msgs).__name__}"
                f"{' (empty)' if isinstance(msgs, list) else ''}, expected a non-empty list "
                "of {'role', 'content'}")
    n_ph = 0
    has_assistant = False
    roles = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            return f"wrong type: messages[{j}] is {type(m).__name__}"
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if role not in ("system", "user", "assistant", "human", "gpt"):
            return f"unknown role: messages[{j}] has role {role!r}"
        roles.append(_ROLE.get(role, role))
        if not isinstance(content, str):
            return f"wrong type: messages[{j}].content is {type(content).__name__}, expected str"
        if role in ("assistant", "gpt"):
            has_assistant = True
            if not content.strip():
                return f"empty answer: messages[{j}] (assistant) is empty"
        n_ph += content.count(IMAGE_PLACEHOLDER)
    if not has_assistant:
        return "empty answer: no assistant message"
    why = _role_order(roles)
    if why:
        return why
    images = obj.get("images", [])
    if images is None:
        images = []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, (str, dict)) for p in images):
        return "wrong type: 'images' must be a list of paths"
    if n_ph != len(images):
        return f"placeholder/image count mismatch: {n_ph} <image> but {len(images)} images"
    return None


def read_sft(path, image_root: Optional[str] = None, report: Optional[SkipReport] = None,
             strict: bool = False, source: str = "") -> Iterator[SFTRecord]:
    """Yield valid SFT records of a .json/.jsonl file; bad ones go to `report`."""
    path = Path(path)
    report = report if report is not None else SkipReport(strict=strict)
    base = path.parent
    for i, obj in _raw_sft_records(path, report):
        why = check_sft_obj(obj)
        if why:
            report.skip(path, i, why)
            continue
        msgs = obj.get("messages", obj.get("conversations"))
        msgs = [{"role": _ROLE.get(m.get("role", m.get("from")), m.get("role", m.get("from"))),
                 "content": m.get("content", m.get("value"))} for m in msgs]
        if isinstance(obj.get("system"), str) and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": obj["system"]})  # LLaMA-Factory column
        imgs = obj.get("images") or []
        imgs = [imgs] if isinstance(imgs, str) else imgs
        imgs = [_resolve(p, base, image_root) if isinstance(p, str) else p for p in imgs]
        report.valid += 1
        yield SFTRecord(messages=msgs, images=imgs, id=str(obj.get("id", f"{path.name}:{i}")),
                        source=source or str(obj.get("source", path.stem)), file=str(path), index=i)


def _image_list(v) -> Optional[list]:
    if v is None:
        return []
    if isinstance(v, (str, dict, bytes)):
        v = [v]
    if not isinstance(v, list):
        return None
    for x in v:
        if isinstance(x, dict):
            if not (isinstance(x.get("bytes"), (bytes, type(None))) and
                    isinstance(x.get("path"), (str, type(None))) and
                    (x.get("bytes") or x.get("path"))):
                return None
        elif not isinstance(x, (str, bytes)):
            return None
    return v


def read_rl(path, image_root: Optional[str] = None, report: Optional[SkipReport] = None,
            strict: bool = False, source: str = "", batch_rows: int = 256) -> Iterator[RLRecord]:
    """Yield valid RL records of a parquet file; bad ones go to `report`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    report = report if report is not None else SkipReport(strict=strict)
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        report.skip(path, -1, f"unreadable parquet: {type(e).__name__}: {e}")
        return
    if pf.metadata.num_rows == 0:
        report.skip(path, -1, "no records: the parquet file has 0 rows")
        return
    names = pf.schema_arrow.names
    img_col = "images" if "images" in names else ("image" if "image" in names else None)
    for col in ("problem", "answer"):
        if col not in names:
            report.skip(path, -1, f"missing column: {col!r} (columns: {names})")
            return
    for col in ("problem", "answer"):
        t = pf.schema_arrow.field(col).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
                or pa.types.is_floating(t)):
            for i in range(pf.metadata.num_rows):
                report.skip(path, i, f"wrong column type: {col!r} is {t}, expected string")
            return
    base = path.parent
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows):
        cols = {}
        for name in batch.schema.names:
            arr = batch.column(name)
            try:
                cols[name] = arr.to_pylist()
            except Exception:  # invalid UTF-8 in a string column: convert row by row
                vals = []
                for k in range(len(arr)):
                    try:
                        vals.append(arr[k].as_py())
                    except Exception:
                        vals.append(_BadUTF8)
                cols[name] = vals
        for k in range(batch.num_rows):
            i = row + k
            rec = {n: cols[n][k] for n in cols}
            if any(v is _BadUTF8 for v in rec.values()) or _bad_text(
                    [rec.get("problem"), rec.get("answer")]):
                report.skip(path, i, "non-UTF-8 text")
                continue
            problem, answer = rec.get("problem"), rec.get("answer")
            if isinstance(answer, float) and not math.isfinite(answer):
                report.skip(path, i, f"empty answer: the answer is {answer} (a missing value "
                            "in a numeric column)")
                continue
            if isinstance(answer, (int, float)) and not isinstance(answer, bool):
                answer = str(answer)
            if not isinstance(problem, str) or not problem.strip():
                report.skip(path, i, "empty problem" if isinstance(problem, str) or problem is None
                            else f"wrong type: problem is {type(problem).__name__}")
                continue
            if not isinstance(answer, str) or not answer.strip():
                report.skip(path, i, "empty answer")
                continue
            imgs = _image_list(rec.get(img_col)) if img_col else []
            if imgs is None:
                report.skip(path, i, f"wrong type: {img_col!r} must be paths or "
                            "{bytes, path} structs")
                continue
            n_ph = problem.count(IMAGE_PLACEHOLDER)
            if n_ph and n_ph != len(imgs):
                report.skip(path, i, f"placeholder/image count mismatch: {n_ph} <image> but "
                            f"{len(imgs)} images")
                continue
            resolved = []
            for x in imgs:
                if isinstance(x, dict) and not x.get("bytes"):
                    x = x["path"]
                resolved.append(_resolve(x, base, image_root) if isinstance(x, str) else x)
            report.valid += 1
            yield RLRecord(problem=problem, answer=answer.strip(), images=resolved,
                           id=str(rec.get("id") or f"{path.name}:{i}"),
                           source=source or str(rec.get("source") or path.stem),
                           difficulty=str(rec.get("difficulty") or ""), file=str(path), index=i)
        row += batch.num_rows


class _BadUTF8:
    pass


# --------------------------------------------------------------------------- validation
def validate_images(images, min_pixels: int, max_pixels: int) -> tuple[Optional[str], list]:
    """Decode every image; (reason, []) on the first bad one, else (None, grids)."""
    from ovlt.data.image_loader import ImageError, open_image
    from ovlt.data.image_processing import grid_for_size
    grids = []
    for src in images:
        try:
            img = open_image(src)
            w, h = img.size
            grids.append(grid_for_size(h, w, min_pixels, max_pixels))
        except ImageError as e:
            return str(e), []
        except ValueError as e:
            return f"unusable image: {e}", []
    return None, grids


def validate_sft(rec: SFTRecord, max_length: int, min_pixels: int, max_pixels: int,
                 tokenizer=None) -> Optional[str]:
    """Why the record can't be trained on (images, length), or None."""
    from ovlt.data.chat_template import encode_sft
    why, grids = validate_images(rec.images, min_pixels, max_pixels)
    if why:
        return why
    ids, mask = encode_sft(rec.messages, grids, tokenizer=tokenizer)
    if len(ids) > max_length:
        return f"over-length: {len(ids)} tokens > max_length {max_length}"
    if not any(mask):
        return "empty answer: no trained tokens"
    return None


def validate_rl(rec: RLRecord, max_prompt_length: int, min_pixels: int, max_pixels: int,
                tokenizer=None) -> Optional[str]:
    from ovlt.data.chat_template import encode_prompt
    why, grids = validate_images(rec.images, min_pixels, max_pixels)
    if why:
        return why
    n = len(encode_prompt(rec.problem, grids, tokenizer=tokenizer))
    if n > max_prompt_length:
        return f"over-length: prompt of {n} tokens > {max_prompt_length}"
    return None


# --------------------------------------------------------------------------- registry
@dataclass
class Source:
    name: str
    files: list[str]
    kind: str                 # "sft" | "rl"
    weight: float = 1.0       # expected copies of each record per epoch (0.5 = half, 2 = twice)
    max_samples: int = 0      # cap after weighting; 0 = none
    image_root: Optional[str] = None
    difficulty: str = ""


def load_registry(path) -> list[Source]:
    """A YAML registry:

        sources:
          - name: chartqa
            kind: sft                  # or rl
            files: [chartqa.jsonl]     # relative to this YAML file
            weight: 1.0
            max_samples: 3000
            image_root: images/        # optional
            difficulty: medium         # optional (RL curriculum)
    """
    import yaml
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else " ".join(str(e).split())
        raise DataError(f"{path}: not a readable YAML registry: {why}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("sources"), list):
        raise DataError(f"{path}: a registry needs a top-level 'sources:' list")
    if not doc["sources"]:
        raise DataError(f"{path}: 'sources:' is empty; list at least one data source")
    out = []
    allowed = {"name", "kind", "files", "weight", "max_samples", "image_root", "difficulty"}
    for k, s in enumerate(doc["sources"]):
        where = f"{path}: sources[{k}]"
        if not isinstance(s, dict):
            raise DataError(f"{where}: expected a mapping")
        extra = set(s) - allowed
        if extra:
            raise DataError(f"{where}: unknown keys {sorted(extra)} (allowed: {sorted(allowed)})")
        files = s.get("files")
        files = [files] if isinstance(files, str) else files
        if not files or not all(isinstance(f, str) for f in files):
            raise DataError(f"{where}: 'files' must be a path or a list of paths")
        kind = s.get("kind") or ("rl" if files[0].endswith(".parquet") else "sft")
        if kind not in ("sft", "rl"):
            raise DataError(f"{where}: kind must be sft or rl, got {kind!r}")
        weight = s.get("weight", 1.0)
        cap = s.get("max_samples", 0)
        if not isinstance(weight, (int, float)) or weight < 0:
            raise DataError(f"{where}: weight must be a number >= 0, got {weight!r}")
        if not isinstance(cap, int) or cap < 0:
            raise DataError(f"{where}: max_samples must be an integer >= 0, got {cap!r}")
        root = s.get("image_root")
        out.append(Source(
            name=str(s.get("name") or Path(files[0]).stem), kind=kind, weight=float(weight),
            files=[str(path.parent / f) if not os.path.isabs(f) else f for f in files],
            max_samples=cap, difficulty=str(s.get("difficulty") or ""),
            image_root=(str(path.parent / root) if root and not os.path.isabs(root) else root)))
    return out


def mix(per_source: list[tuple[Source, list]], seed: int) -> list:
    """Apply weights and caps: each source contributes floor/ceil(weight * n) records (whole
    copies, then a seeded random remainder), capped at max_samples; the result is shuffled."""
    rng = random.Random(seed)
    out = []
    for src, recs in per_source:
        whole, frac = divmod(src.weight, 1.0)
        taken = list(recs) * int(whole)
        part = list(recs)
        rng.shuffle(part)
        taken += part[:int(round(frac * len(recs)))]
        if src.max_samples and len(taken) > src.max_samples:
            rng.shuffle(taken)
            taken = taken[:src.max_samples]
        out += taken
    rng.shuffle(out)
    return out


def read_registry(path, kind: str, report: Optional[SkipReport] = None, strict: bool = False,
                  seed: int = 0) -> list:
    """All records of the registry's sources of `kind` ('sft' | 'rl'), mixed by `mix`."""
    report = report if report is not None else SkipReport(strict=strict)
    per_source = []
    for src in load_registry(path):
        if src.kind != kind:
            continue
        recs = []
        for f in src.files:
            reader = read_sft if kind == "sft" else read_rl
            for r in reader(f, image_root=src.image_root, report=report, source=src.name):
                if kind == "rl" and src.difficulty and not r.difficulty:
                    r.difficulty = src.difficulty
                recs.append(r)
        per_source.append((src, recs))
    return mix(per_source, seed)
