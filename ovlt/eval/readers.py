"""Read MathVista / MathVerse / MathVision from their released layouts into `EvalItem`s.

Accepted inputs (`--data PATH`): a parquet, JSON or JSONL file, or a directory holding one
(the first of `testmini.parquet`, `test.parquet`, `testmini.json`, `test.jsonl`, ..., else the
shards of the testmini split, else of test, as HF stores them: `data/testmini-00000-of-00001-x.parquet`,
else the only data file under it). JSON may be a list of records or a dict mapping id ->
record (MathVista's `testmini.json`). Images may be embedded (`{"bytes": ..., "path": ...}`
structs as HF parquet stores them, or raw bytes) or relative paths, resolved against the data
file's directory, its parent, and `image_root` when given.

Field layouts (the released ones):
  MathVista : pid, question, image / decoded_image, choices, unit, precision, answer,
              question_type (multi_choice | free_form), answer_type (integer|float|text|list),
              metadata{task, category, skills, ...}, query (the prompt)
  MathVerse : sample_index, problem_index, problem_version, question, image, answer,
              question_type (multi-choice | free-form), query_cot (the prompt)
  MathVision: id, question, options, image / decoded_image, answer, level, subject
A missing field or image raises `BenchmarkError` naming the file, record number, id and field.
"""
from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ovlt.logging import get_logger, log_once

logger = get_logger(__name__)

BENCHMARKS = ("mathvista", "mathverse", "mathvision")
ID_FIELD = {"mathvista": "pid", "mathverse": "sample_index", "mathvision": "id"}
DATA_NAMES = ("testmini.parquet", "test.parquet", "testmini.jsonl", "test.jsonl", "testmini.json",
              "test.json")
LETTERS = "ABCDEFGH"


class BenchmarkError(ValueError):
    """A benchmark file is malformed; the message names file, record and field."""


@dataclass
class ImageRef:
    """One image: embedded bytes or a resolved file path."""
    data: Optional[bytes] = None
    path: Optional[str] = None

    def open(self):
        from PIL import Image
        src = io.BytesIO(self.data) if self.data is not None else self.path
        img = Image.open(src)
        img.load()
        return img.convert("RGB")


@dataclass
class EvalItem:
    id: str
    benchmark: str
    prompt: str                      # the benchmark's own prompt
    answer: str
    question: str
    images: list[ImageRef]
    question_type: str               # "multi_choice" | "free_form" (normalised spelling)
    choices: Optional[list[str]] = None
    answer_type: Optional[str] = None
    precision: Optional[int] = None
    unit: Optional[str] = None
    categories: dict[str, Any] = field(default_factory=dict)  # group name -> label or labels
    source: str = ""                 # "file#record" for error messages

    def load_images(self) -> list:
        out = []
        for k, ref in enumerate(self.images):
            try:
                out.append(ref.open())
            except Exception as e:
                raise BenchmarkError(f"{self.source} (id={self.id}): image {k} "
                                     f"({ref.path or 'embedded bytes'}) cannot be decoded: {e}") from e
        return out


# --------------------------------------------------------------------------- files
def find_data_files(path: str | os.PathLike) -> list[Path]:
    """The data file(s) of a benchmark: `path` itself, or in a directory (and `data/`) the first
    of DATA_NAMES, else the shards of the `testmini` split, else of `test` (HF layout
    `data/testmini-00000-of-00001-*.parquet`), else the only data file there is."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise BenchmarkError(f"{p}: no such file or directory")
    for name in DATA_NAMES:
        for cand in (p / name, p / "data" / name):
            if cand.is_file():
                return [cand]
    found = sorted(q for q in p.rglob("*") if q.suffix in (".parquet", ".json", ".jsonl")
                   and q.is_file())
    for split in ("testmini", "test"):
        shards = [q for q in found if re.match(rf"{split}[-_.]", q.name)]
        if shards and len({q.suffix for q in shards}) == 1:
            return shards
    if len(found) == 1:
        return found
    raise BenchmarkError(f"{p}: expected one of {', '.join(DATA_NAMES)}, testmini-*/test-* "
                         f"shards or a single parquet/json/jsonl file, found "
                         f"{[str(f) for f in found][:10]}")


def read_records(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        out = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise BenchmarkError(f"{path}: line {n} is not valid JSON: {e}") from None
        return out
    if path.suffix == ".json":
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
        if isinstance(obj, dict):  # MathVista: {pid: record}
            return [dict(v) for v in obj.values()]
        if isinstance(obj, list):
            return obj
        raise BenchmarkError(f"{path}: expected a JSON list or dict of records")
    raise BenchmarkError(f"{path}: unsupported file type {path.suffix!r} (parquet, json, jsonl)")


# --------------------------------------------------------------------------- fields
class _Rec:
    """Field access with errors that name the file, record and id."""

    def __init__(self, rec: dict, where: str, id_field: str):
        if not isinstance(rec, dict):
            raise BenchmarkError(f"{where}: record is {type(rec).__name__}, not an object")
        self.rec, self.where = rec, where
        self.id = str(rec.get(id_field, "?"))

    def req(self, name: str):
        if name not in self.rec or self.rec[name] is None:
            raise BenchmarkError(f"{self.where} (id={self.id}): missing field {name!r}")
        return self.rec[name]

    def opt(self, name: str, default=None):
        v = self.rec.get(name)
        return default if v is None else v

    def fail(self, msg: str):
        raise BenchmarkError(f"{self.where} (id={self.id}): {msg}")


def _image_ref(r: _Rec, value, fname: str, roots: list[Path]) -> Optional[ImageRef]:
    if value is None or value == "" or value == {}:
        return None
    if isinstance(value, (bytes, bytearray)):
        return ImageRef(data=bytes(value))
    if isinstance(value, dict):
        if value.get("bytes"):
            return ImageRef(data=bytes(value["bytes"]))
        value = value.get("path")
        if not value:
            return None
    if isinstance(value, str):
        cand = [Path(value)] if os.path.isabs(value) else [root / value for root in roots]
        for c in cand:
            if c.is_file():
                return ImageRef(path=str(c))
        r.fail(f"field {fname!r}: image file {value!r} not found (looked in "
               f"{', '.join(str(c.parent) for c in cand)})")
    r.fail(f"field {fname!r}: unsupported image value of type {type(value).__name__}")


def _images(r: _Rec, fields: tuple[str, ...], roots: list[Path], required: bool) -> list[ImageRef]:
    present = [f for f in fields if r.opt(f) not in (None, "", {})]
    for f in present:  # embedded bytes first (decoded_image), then paths
        ref = _image_ref(r, r.rec[f], f, roots)
        if ref is not None:
            return [ref]
    if required:
        r.fail(f"missing image (fields {' / '.join(fields)} are empty)")
    return []


def _as_list(v) -> Optional[list[str]]:
    if v is None:
        return None
    if isinstance(v, str):
        v = v.strip()
        if not v:
            return None
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            return [v]
    return [str(x) for x in v] if len(v) else None


def _qtype(v: str) -> str:
    v = str(v).strip().lower().replace("-", "_").replace(" ", "_")
    if v in ("multi_choice", "multiple_choice", "choice"):
        return "multi_choice"
    if v in ("free_form", "open", "free"):
        return "free_form"
    return v


_INLINE_CHOICE_RE = re.compile(r"(?:^|\n)\s*\(?([A-H])\)?\s*[:.)]\s*(.+?)\s*(?=\n\s*\(?[A-H]\)?\s*[:.)]|\Z)",
                               re.DOTALL)


def parse_inline_choices(question: str) -> Optional[list[str]]:
    """Options written inside the question text ("Choices:\\nA:30°\\nB:40°"), as MathVerse does."""
    i = question.rfind("Choices")
    if i < 0:
        i = question.rfind("Options")
    if i < 0:
        return None
    found = _INLINE_CHOICE_RE.findall(question[i:])
    if len(found) < 2 or [l for l, _ in found] != list(LETTERS[:len(found)]):
        return None
    return [t.strip() for _, t in found]


def _precision(r: _Rec, v) -> Optional[int]:
    if v in (None, ""):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        r.fail(f"field 'precision': {v!r} is not a number")
    return None if f != f else int(f)  # parquet stores "no precision" as NaN


# --------------------------------------------------------------------------- per benchmark
def _mathvista(r: _Rec, roots: list[Path]) -> EvalItem:
    qtype = _qtype(r.req("question_type"))
    choices = _as_list(r.opt("choices"))
    if qtype == "multi_choice" and not choices:
        r.fail("field 'choices' is empty for a multi_choice question")
    meta = r.opt("metadata", {}) or {}
    if isinstance(meta, str):
        meta = json.loads(meta)
    prompt = r.opt("query")
    if not prompt:
        log_once(logger, "mathvista-query", "MathVista records lack 'query'; building the prompt "
                 "from question + choices")
        prompt = r.req("question")
        if choices:
            prompt += "\nChoices:\n" + "\n".join(f"({LETTERS[k]}) {c}" for k, c in enumerate(choices))
    precision = r.opt("precision")
    return EvalItem(
        id=str(r.req("pid")), benchmark="mathvista", prompt=str(prompt), answer=str(r.req("answer")),
        question=str(r.req("question")),
        images=_images(r, ("decoded_image", "image"), roots, required=True),
        question_type=qtype, choices=choices,
        answer_type=str(r.req("answer_type")) if qtype == "free_form" else r.opt("answer_type"),
        precision=_precision(r, precision),
        unit=r.opt("unit") or None,
        categories={"task": meta.get("task"), "category": meta.get("category"),
                    "skills": list(meta.get("skills") or []), "question_type": qtype})


def _mathverse(r: _Rec, roots: list[Path]) -> EvalItem:
    version = str(r.req("problem_version"))
    qtype = _qtype(r.req("question_type"))
    question = str(r.req("question"))
    meta = r.opt("metadata", {}) or {}
    return EvalItem(
        id=str(r.req("sample_index")), benchmark="mathverse", prompt=str(r.req("query_cot")),
        answer=str(r.req("answer")), question=question,
        images=_images(r, ("image",), roots, required=version.lower() != "text only"),
        question_type=qtype,
        choices=parse_inline_choices(question) if qtype == "multi_choice" else None,
        categories={"problem_version": version, "question_type": qtype,
                    "subject": meta.get("subject") if isinstance(meta, dict) else None,
                    "problem_index": str(r.opt("problem_index", ""))})


def mathvision_prompt(question: str, options: Optional[list[str]]) -> str:
    """MathVision has no prompt field: the question, then the options as "(A) ...", one a line."""
    q = re.sub(r"<image\d*>", "", question).strip()
    if options:
        q += "\nOptions:\n" + "\n".join(f"({LETTERS[k]}) {o}" for k, o in enumerate(options))
    return q


def _mathvision(r: _Rec, roots: list[Path]) -> EvalItem:
    options = _as_list(r.opt("options"))
    question = str(r.req("question"))
    return EvalItem(
        id=str(r.req("id")), benchmark="mathvision", prompt=mathvision_prompt(question, options),
        answer=str(r.req("answer")), question=question,
        images=_images(r, ("decoded_image", "image"), roots, required=True),
        question_type="multi_choice" if options else "free_form", choices=options,
        categories={"subject": str(r.req("subject")), "level": str(r.req("level"))})


_PARSERS = {"mathvista": _mathvista, "mathverse": _mathverse, "mathvision": _mathvision}


def load_benchmark(name: str, path: str | os.PathLike, limit: Optional[int] = None,
                   image_root: Optional[str] = None) -> list[EvalItem]:
    """All items of benchmark `name` from `path` (file or directory), in file order."""
    if name not in _PARSERS:
        raise BenchmarkError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    files = find_data_files(path)
    items, seen = [], set()
    for f in files:
        if limit and len(items) >= limit:
            break
        roots = [f.parent, f.parent.parent] + ([Path(image_root)] if image_root else [])
        for n, rec in enumerate(read_records(f)):
            if limit and len(items) >= limit:
                break
            r = _Rec(rec, f"{f}: record {n}", ID_FIELD[name])
            item = _PARSERS[name](r, roots)
            item.source = r.where
            if item.id in seen:
                r.fail(f"duplicate {ID_FIELD[name]} {item.id!r}")
            seen.add(item.id)
            items.append(item)
    logger.info("loaded %d %s items from %s", len(items), name, ", ".join(map(str, files)))
    return items
