"""Read MathVista / MathVerse / MathVision from their released layouts into `EvalItem`s.

Accepted inputs (`--data PATH`): a parquet, JSON or JSONL file, or a directory holding one split:
`testmini.parquet|jsonl|json` / `test.*`, or the split's shards as HF stores them
(`data/testmini-00000-of-00001-x.parquet`), else the only data file under it. A directory with
both splits needs `--split` (MathVista reads testmini: its test answers are not public).
JSON may be a list of records or a dict mapping id -> record (MathVista's `testmini.json`).
Images may be embedded (`{"bytes": ..., "path": ...}` structs as HF parquet stores them, or raw
bytes) or relative paths, resolved against the data file's directory, its parent, and
`image_root` when given.

Field layouts (the released ones):
  MathVista : pid, question, image / decoded_image, choices, unit, precision, answer,
              question_type (multi_choice | free_form), answer_type (integer|float|text|list),
              metadata{task, category, skills, ...}, query (the prompt)
  MathVerse : sample_index, problem_index, problem_version, question, image, answer,
              question_type (multi-choice | free-form), query_cot (the prompt)
  MathVision: id, question, options, image / decoded_image, answer, level, subject
Prompts (`prompt_for`): the benchmark's own (MathVista's `query`, or MathVista's query builder
when records lack it; MathVerse's `query_cot`); MathVision has none: the question and its
options, or under the openvlthinker style OpenVLThinker's "correct option letter" hint.
A missing field or image raises `BenchmarkError` naming the file, record number, id and field;
so do an unreadable file (not UTF-8, not JSON, corrupt parquet), a file without records and a
field of the wrong type (an answer that is a list or an object, choices that are not a list,
metadata that is not a JSON object). `load_benchmark(..., images=False)` (scoring) neither
opens nor looks for the image files.
"""
from __future__ import annotations

import io
import json
import math
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
SPLITS = ("testmini", "test")


def find_data_files(path: str | os.PathLike, split: Optional[str] = None,
                    default_split: Optional[str] = None) -> list[Path]:
    """The data file(s) of a benchmark: `path` itself, or in a directory (and `data/`) a split's
    file (`testmini.parquet|jsonl|json`, `test.*`) or its shards (HF layout
    `data/testmini-00000-of-00001-*.parquet`), else the only data file there is. A directory
    holding both splits needs `split` (or a `default_split`): they are different benchmarks'
    worth of items and published numbers name one."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise BenchmarkError(f"{p}: no such file or directory")
    if split is not None and split not in SPLITS:
        raise BenchmarkError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    found = sorted(q for q in p.rglob("*") if q.suffix in (".parquet", ".json", ".jsonl")
                   and q.is_file())
    by_split: dict[str, list[Path]] = {}
    for sp in SPLITS:
        named = [c for ext in (".parquet", ".jsonl", ".json")
                 for c in (p / f"{sp}{ext}", p / "data" / f"{sp}{ext}") if c.is_file()]
        shards = [q for q in found if re.match(rf"{sp}[-_.]", q.name)]
        if named:
            by_split[sp] = named[:1]
        elif shards and len({q.suffix for q in shards}) == 1:
            by_split[sp] = shards
    if split is not None:
        if split not in by_split:
            raise BenchmarkError(f"{p}: no {split} split here (found splits: "
                                 f"{', '.join(by_split) or 'none'})")
        return by_split[split]
    if len(by_split) > 1:
        if default_split in by_split:
            log_once(logger, f"split-{p}", "%s holds the testmini and test splits; reading %s",
                     p, default_split)
            return by_split[default_split]
        raise BenchmarkError(
            f"{p}: holds both the testmini and the test split ("
            + "; ".join(f"{sp}: {', '.join(q.name for q in fs[:2])}" for sp, fs in by_split.items())
            + "); choose one with --split testmini|test, or pass the file itself")
    if by_split:
        return next(iter(by_split.values()))
    if len(found) == 1:
        return found
    raise BenchmarkError(f"{p}: expected one of {', '.join(DATA_NAMES)}, testmini-*/test-* "
                         f"shards or a single parquet/json/jsonl file, found "
                         f"{[str(f) for f in found][:10]}")


def read_text(path: Path, what: str = "file") -> str:
    """A UTF-8 text file; a read or decode failure is a BenchmarkError naming the file (and the
    line of the first bad byte)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BenchmarkError(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise BenchmarkError(f"{path}: line {line}: not UTF-8 text (byte {data[e.start]:#04x} "
                             f"at offset {e.start}); save the {what} as UTF-8") from None


def parse_json(text: str, where: str):
    """json.loads, its failures (syntax, nesting too deep) a BenchmarkError naming `where`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        msg = e.msg[:-3] if e.msg.endswith(" at") else e.msg  # "starting at" + "at column"
        at = f"column {e.colno}" if "\n" not in text else f"line {e.lineno} column {e.colno}"
        raise BenchmarkError(f"{where}: not valid JSON: {msg} at {at}") from None
    except RecursionError:
        raise BenchmarkError(f"{where}: not valid JSON: nested too deeply") from None


def read_records(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            return pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError, ValueError) as e:
            raise BenchmarkError(f"{path}: unreadable parquet: {' '.join(str(e).split())[:300]}"
                                 ) from None
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(read_text(path, "benchmark file").splitlines(), 1):
            if line.strip():
                out.append(parse_json(line, f"{path}: line {n}"))
        return out
    if path.suffix == ".json":
        obj = parse_json(read_text(path, "benchmark file"), str(path))
        if isinstance(obj, dict):  # MathVista: {pid: record}
            bad = [k for k, v in obj.items() if not isinstance(v, dict)]
            if bad:
                raise BenchmarkError(f"{path}: key {bad[0]!r}: expected a record (object), got "
                                     f"{type(obj[bad[0]]).__name__}; a JSON file holds a list "
                                     f"of records or a dict mapping id -> record")
            return [dict(v) for v in obj.values()]
        if isinstance(obj, list):
            return obj
        raise BenchmarkError(f"{path}: expected a JSON list or dict of records, got "
                             f"{type(obj).__name__}")
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

    def text(self, name: str, required: bool = True) -> Optional[str]:
        """A text field (numbers are accepted and written as text; NaN counts as missing)."""
        v = self.req(name) if required else self.opt(name)
        if v is None:
            return None
        if isinstance(v, float) and not math.isfinite(v):
            if required:
                self.fail(f"field {name!r} is {v} (a missing value)")
            return None
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            self.fail(f"field {name!r} is {kind(v)} ({_short(v)}), expected text "
                      f"or a number")
        return str(v)

    def opt(self, name: str, default=None):
        v = self.rec.get(name)
        return default if v is None else v

    def fail(self, msg: str):
        raise BenchmarkError(f"{self.where} (id={self.id}): {msg}")


def _short(v, n: int = 60) -> str:
    t = repr(v)
    return t if len(t) <= n else t[:n] + "..."


def kind(v) -> str:
    """'a dict', 'an int': the type of `v` for messages."""
    name = type(v).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _image_ref(r: _Rec, value, fname: str, roots: Optional[list[Path]]) -> Optional[ImageRef]:
    """roots=None: do not look for image files (scoring never opens them)."""
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
    if isinstance(value, str) and roots is None:
        return ImageRef(path=value)
    if isinstance(value, str):
        cand = [Path(value)] if os.path.isabs(value) else [root / value for root in roots]
        for c in cand:
            if c.is_file():
                return ImageRef(path=str(c))
        r.fail(f"field {fname!r}: image file {value!r} not found (looked in "
               f"{', '.join(str(c.parent) for c in cand)})")
    r.fail(f"field {fname!r}: unsupported image value of type {type(value).__name__}")


def _images(r: _Rec, fields: tuple[str, ...], roots: Optional[list[Path]],
            required: bool) -> list[ImageRef]:
    present = [f for f in fields if r.opt(f) not in (None, "", {})]
    for f in present:  # embedded bytes first (decoded_image), then paths
        ref = _image_ref(r, r.rec[f], f, roots)
        if ref is not None:
            return [ref]
    if required and roots is not None:
        r.fail(f"missing image (fields {' / '.join(fields)} are empty)")
    return []


def _as_list(r: _Rec, name: str) -> Optional[list[str]]:
    """An options field: a list of texts / numbers, or a string holding a JSON list."""
    v = r.opt(name)
    if isinstance(v, float) and not math.isfinite(v):
        return None  # parquet's "no options"
    if isinstance(v, str):
        v = v.strip()
        if not v:
            return None
        try:
            v = json.loads(v)
        except (json.JSONDecodeError, RecursionError):
            return [v]
        if isinstance(v, str):
            return [v]
    if v is None:
        return None
    if not isinstance(v, (list, tuple)):
        r.fail(f"field {name!r} is {kind(v)} ({_short(v)}), expected a list of "
               f"options")
    for k, x in enumerate(v):
        if isinstance(x, bool) or not isinstance(x, (str, int, float)):
            r.fail(f"field {name!r}: option {k} is {kind(x)} ({_short(x)}), "
                   f"expected text or a number")
    return [str(x) for x in v] if len(v) else None


def _metadata(r: _Rec) -> dict:
    """The optional `metadata` object (a dict, or a string holding a JSON object)."""
    meta = r.opt("metadata", {}) or {}
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except (json.JSONDecodeError, RecursionError) as e:
            r.fail(f"field 'metadata' is not valid JSON ({getattr(e, 'msg', 'nested too deeply')}"
                   f"): {_short(meta)}")
    if not isinstance(meta, dict):
        r.fail(f"field 'metadata' is {kind(meta)} ({_short(meta)}), expected an "
               f"object")
    skills = meta.get("skills")
    if skills is not None and not (isinstance(skills, (list, tuple)) and
                                   all(isinstance(x, str) for x in skills)):
        r.fail(f"field 'metadata.skills' is {_short(skills)}, expected a list of texts")
    return meta


def _known_qtype(r: _Rec) -> str:
    q = _qtype(r.text("question_type"))
    if q not in ("multi_choice", "free_form"):
        r.fail(f"field 'question_type' is {r.rec['question_type']!r}, expected multi_choice or "
               f"free_form (or their spellings multi-choice / free-form)")
    return q


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
    i = question.rfind("Choice")  # "Choices:" and "Choice:" both occur in MathVerse
    if i < 0:
        i = question.rfind("Option")
    if i < 0:
        return None
    found = _INLINE_CHOICE_RE.findall(question[i:])
    if len(found) < 2 or [k for k, _ in found] != list(LETTERS[:len(found)]):
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
def _mathvista(r: _Rec, roots: Optional[list[Path]]) -> EvalItem:
    qtype = _known_qtype(r)
    choices = _as_list(r, "choices")
    if qtype == "multi_choice" and not choices:
        r.fail("field 'choices' is empty for a multi_choice question")
    meta = _metadata(r)
    prompt = r.text("query", required=False)
    if not prompt:
        log_once(logger, "mathvista-query", "MathVista records lack 'query'; building MathVista's "
                 "own query (hint, question, unit, choices)")
        prompt = mathvista_query(r.text("question"), r.text("unit", required=False), choices, qtype,
                                 r.text("answer_type", required=False),
                                 _precision(r, r.opt("precision")))
    precision = r.opt("precision")
    answer_type = r.text("answer_type", required=qtype == "free_form")
    if qtype == "free_form" and answer_type.lower() not in ("integer", "float", "text", "list"):
        r.fail(f"field 'answer_type' is {answer_type!r}, expected integer, float, text or list")
    return EvalItem(
        id=r.text("pid"), benchmark="mathvista", prompt=str(prompt), answer=r.text("answer"),
        question=r.text("question"),
        images=_images(r, ("decoded_image", "image"), roots, required=True),
        question_type=qtype, choices=choices, answer_type=answer_type,
        precision=_precision(r, precision),
        unit=r.text("unit", required=False) or None,
        categories={"task": meta.get("task"), "category": meta.get("category"),
                    "skills": list(meta.get("skills") or []), "question_type": qtype})


def _mathverse(r: _Rec, roots: Optional[list[Path]]) -> EvalItem:
    version = r.text("problem_version")
    qtype = _known_qtype(r)
    question = r.text("question")
    meta = _metadata(r)
    return EvalItem(
        id=r.text("sample_index"), benchmark="mathverse", prompt=r.text("query_cot"),
        answer=r.text("answer"), question=question,
        images=_images(r, ("image",), roots, required=version.lower() != "text only"),
        question_type=qtype,
        choices=parse_inline_choices(question) if qtype == "multi_choice" else None,
        categories={"problem_version": version, "question_type": qtype,
                    "subject": meta.get("subject"),
                    "problem_index": str(r.opt("problem_index", ""))})


def mathvision_prompt(question: str, options: Optional[list[str]]) -> str:
    """MathVision has no prompt field: the question, then the options as "(A) ...", one a line."""
    q = re.sub(r"<image\d*>", "", question).strip()
    if options:
        q += "\nOptions:\n" + "\n".join(f"({LETTERS[k]}) {o}" for k, o in enumerate(options))
    return q


_MATHVISTA_FLOAT_PLACES = {1: ("one decimal place", "1.2, 1.3, 1.4"),
                           2: ("two decimal places", "1.23, 1.34, 1.45"),
                           3: ("three decimal places", "1.234, 1.345, 1.456")}


def mathvista_hint(question_type: str, answer_type: Optional[str], precision: Optional[int]) -> str:
    """The task instruction MathVista's released `query` starts with (its README's table)."""
    if question_type == "multi_choice":
        return ("Hint: Please answer the question and provide the correct option letter, e.g., "
                "A, B, C, D, at the end.")
    atype = (answer_type or "").lower()
    if atype == "integer":
        return ("Hint: Please answer the question requiring an integer answer and provide the "
                "final value, e.g., 1, 2, 3, at the end.")
    if atype == "float" and precision in _MATHVISTA_FLOAT_PLACES:
        places, examples = _MATHVISTA_FLOAT_PLACES[precision]
        return (f"Hint: Please answer the question requiring a floating-point number with {places} "
                f"and provide the final value, e.g., {examples}, at the end.")
    if atype == "list":
        return ("Hint: Please answer the question requiring a Python list as an answer and provide "
                "the final list, e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end.")
    return "Hint: Please answer the question and provide the final answer at the end."


def mathvista_query(question: str, unit: Optional[str], choices: Optional[list[str]],
                    question_type: str, answer_type: Optional[str], precision: Optional[int]) -> str:
    """MathVista's zero-shot query as its `query` field holds it: the hint, "Question: ..." with
    "(Unit: ...)", then "Choices:" and "(A) ..." lines."""
    lines = [mathvista_hint(question_type, answer_type, precision),
             f"Question: {question}" + (f" (Unit: {unit})" if unit else "")]
    if choices:
        lines += ["Choices:"] + [f"({chr(ord('A') + k)}) {c}" for k, c in enumerate(choices)]
    return "\n".join(lines)


def openvlthinker_mathvision_prompt(question: str, options: Optional[list[str]]) -> str:
    """OpenVLThinker's MathVision instruction (evaluation/eval_openvlthinker.py): the "correct
    option letter" hint with the options as "(A) ..." lines, else the "requiring an answer" hint;
    the question verbatim."""
    if options:
        return ("Hint: Please answer the question and provide the correct option letter, e.g., "
                f"A, B, C, D, E, at the end.\nQuestion: {question}\nChoices:\n"
                + "\n".join(f"({chr(65 + k)}) {o}" for k, o in enumerate(options)))
    return f"Hint: Please answer the question requiring an answer.\nQuestion: {question}"


PROMPT_STYLES = ("ovlt", "official", "openvlthinker")


def prompt_for(item: "EvalItem", style: str = "ovlt") -> str:
    """The item's prompt under a scoring style: the benchmark's own prompt (MathVista's query,
    MathVerse's query_cot, ovlt's MathVision layout), except that the openvlthinker style asks
    MathVision with OpenVLThinker's hint."""
    if style not in PROMPT_STYLES:
        raise BenchmarkError(f"unknown prompt style {style!r}; choose from {', '.join(PROMPT_STYLES)}")
    if style == "openvlthinker" and item.benchmark == "mathvision":
        return openvlthinker_mathvision_prompt(item.question, item.choices)
    return item.prompt


def _mathvision(r: _Rec, roots: Optional[list[Path]]) -> EvalItem:
    options = _as_list(r, "options")
    question = r.text("question")
    return EvalItem(
        id=r.text("id"), benchmark="mathvision", prompt=mathvision_prompt(question, options),
        answer=r.text("answer"), question=question,
        images=_images(r, ("decoded_image", "image"), roots, required=True),
        question_type="multi_choice" if options else "free_form", choices=options,
        categories={"subject": r.text("subject"), "level": r.text("level")})


_PARSERS = {"mathvista": _mathvista, "mathverse": _mathverse, "mathvision": _mathvision}


# MathVista's test split has no public answers: a directory with both splits means testmini.
DEFAULT_SPLIT = {"mathvista": "testmini"}


def load_benchmark(name: str, path: str | os.PathLike, limit: Optional[int] = None,
                   image_root: Optional[str] = None, images: bool = True,
                   split: Optional[str] = None) -> list[EvalItem]:
    """All items of benchmark `name` from `path` (file or directory), in file order (the first
    `limit` when given). images=False: image paths are kept as written, not looked up (for
    scoring, which never opens them). A file set without any record is an error. `split`
    (testmini | test) picks one where `path` holds both (`find_data_files`)."""
    if name not in _PARSERS:
        raise BenchmarkError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    if limit is not None and limit < 0:
        raise BenchmarkError(f"limit must be >= 0 (0 or None = all items), got {limit}")
    files = find_data_files(path, split, DEFAULT_SPLIT.get(name))
    items, seen = [], set()
    for f in files:
        if limit and len(items) >= limit:
            break
        roots = None if not images else \
            [f.parent, f.parent.parent] + ([Path(image_root)] if image_root else [])
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
    if not items:
        raise BenchmarkError(f"{', '.join(map(str, files))}: no {name} records in the file")
    logger.info("loaded %d %s items from %s", len(items), name, ", ".join(map(str, files)))
    return items
