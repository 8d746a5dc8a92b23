"""`eval run`: greedy generation over a benchmark through a `RolloutEngine`, resumable, then scoring.

Predictions are appended to `<out>/predictions.jsonl` one line per item as soon as its batch
finishes (`{<id field>: ..., "response": ..., "finish_reason": ..., "num_tokens": ...}`), so a
killed run loses at most one batch; a rerun skips the ids already there. Scoring reads the
same file (`score_predictions`), so `eval score` on it gives the same numbers.
`<out>/generation.json` records what made the predictions (benchmark, a fingerprint of the
model's files, generation settings); a rerun into an `--out` whose predictions came from
another model or other settings, or from an unknown source, is refused rather than resumed.
Predictions files are read strictly: every line one JSON object with the id and a text
`response` (only `eval run`'s own resume repairs a torn last line, before reading).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

from ovlt.eval.readers import ID_FIELD, BenchmarkError, EvalItem, kind, parse_json, read_text
from ovlt.eval.scoring import Judge, aggregate, judge_response
from ovlt.logging import get_logger
from ovlt.rollout.base import GenerationRequest, RolloutEngine, SamplingParams
from ovlt.utils.io import append_jsonl, atomic_write_json, atomic_write_text

logger = get_logger(__name__)

RequestBuilder = Callable[[EvalItem], GenerationRequest]
IMAGE_PLACEHOLDER = "<image>"


class ChatRequestBuilder:
    """Benchmark prompt -> chat-templated prompt ids + preprocessed images (ovlt.data).

    The user turn is one `<image>` placeholder per image, a newline, then the benchmark's own
    prompt and the optional `prompt_suffix` (e.g. the RL think/answer instruction)."""

    def __init__(self, min_pixels: int = 3136, max_pixels: int = 262144,
                 prompt_suffix: str = "", system: Optional[str] = None):
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.prompt_suffix, self.system = prompt_suffix, system

    def text(self, item: EvalItem) -> str:
        return IMAGE_PLACEHOLDER * len(item.images) + ("\n" if item.images else "") + \
            item.prompt + self.prompt_suffix

    def __call__(self, item: EvalItem) -> GenerationRequest:
        import torch
        from ovlt.data.chat_template import encode_prompt
        from ovlt.data.image_processing import preprocess
        images = item.load_images()
        pixel_values, grids = [], []
        for img in images:
            pv, thw = preprocess(img, self.min_pixels, self.max_pixels)
            pixel_values.append(pv)
            grids.append(tuple(int(x) for x in thw))
        text = self.text(item)
        ids = encode_prompt(text, grids, system=self.system)
        return GenerationRequest(
            prompt_ids=list(ids),
            pixel_values=torch.cat(pixel_values) if pixel_values else None,
            image_grid_thw=torch.tensor(grids, dtype=torch.long) if grids else None,
            images=images, prompt_text=text, request_id=item.id)


def is_writer() -> bool:
    """Only global rank 0 writes predictions and scores (every rank generates: the engine's
    collectives need all of them)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0


def _repair_torn_tail(path: Path) -> None:
    """A kill mid-write leaves a partial last line; cut it so later appends stay valid JSONL."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        cut = data.rfind(b"\n") + 1
        f.truncate(cut)
    logger.warning("%s: dropped a torn last line (%d bytes) left by an interrupted run",
                   path, len(data) - cut)


def prediction_id(benchmark: str, rec: dict, where: str) -> str:
    for key in (ID_FIELD[benchmark], "id"):
        if key in rec and rec[key] is not None:
            v = rec[key]
            if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                raise BenchmarkError(f"{where}: field {key!r} is {kind(v)}, expected "
                                     f"the item's id (text or a number)")
            return str(v)
    raise BenchmarkError(f"{where}: prediction has no {ID_FIELD[benchmark]!r} (or 'id') field")


def load_predictions(benchmark: str, path: str | os.PathLike) -> dict[str, str]:
    """id -> response text of a predictions JSONL; any malformed line (not JSON, not an object,
    no id, a response that is not text) is a BenchmarkError naming the file and line."""
    preds: dict[str, str] = {}
    p = Path(path)
    if not p.exists():
        raise BenchmarkError(f"{p}: predictions file not found")
    if p.is_dir():
        raise BenchmarkError(f"{p}: is a directory, expected a predictions .jsonl file")
    for n, line in enumerate(read_text(p, "predictions file").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}: line {n}"
        rec = parse_json(line, where)
        if not isinstance(rec, dict):
            raise BenchmarkError(f"{where}: a prediction is a JSON object "
                                 f'{{"{ID_FIELD[benchmark]}": ..., "response": ...}}, got '
                                 f"{type(rec).__name__} {line.strip()[:40]!r}")
        pid = prediction_id(benchmark, rec, where)
        if "response" not in rec:
            raise BenchmarkError(f"{where} (id={pid}): missing field 'response'")
        resp = rec["response"]
        if resp is not None and (isinstance(resp, bool) or
                                 not isinstance(resp, (str, int, float))):
            raise BenchmarkError(f"{where} (id={pid}): field 'response' is "
                                 f"{kind(resp)}, expected the model's text")
        if pid in preds:
            logger.warning("%s: duplicate prediction for id %s; the later one is used", where, pid)
        preds[pid] = "" if resp is None else str(resp)
    return preds


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """Identifies a model directory's weights without reading them all: per file (up to two
    levels deep) its name, size and 16 samples of 4 KiB spread over it. A path that is not a
    directory is identified by its resolved path."""
    root = Path(model_dir)
    if not root.is_dir():
        return f"path:{root.resolve()}"
    h = hashlib.sha256()
    files = sorted(p for p in list(root.glob("*")) + list(root.glob("*/*"))
                   if p.is_file() and not p.name.startswith("."))
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(root)}:{size}\n".encode())
        with open(f, "rb") as fh:
            for k in range(16):
                fh.seek(size * k // 16)
                h.update(fh.read(4096))
    return h.hexdigest()


def claim_out_dir(out: Path, identity: dict) -> None:
    """Check that the predictions already in `out` came from the same model and settings
    (`identity`: model path and fingerprint, benchmark, generation settings), then record them
    in `generation.json` (rank 0). Refuses, naming what differs, when they did not or when
    their source is unknown; the model's path may change (a moved directory), its files not."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BenchmarkError(f"--out {out} is a file, expected a directory")
    out.mkdir(parents=True, exist_ok=True)
    pred_path, meta_path = out / "predictions.jsonl", out / "generation.json"
    has_preds = pred_path.exists() and pred_path.stat().st_size > 0
    if has_preds:
        if not meta_path.is_file():
            raise BenchmarkError(
                f"{out}: holds a predictions.jsonl that `ovlt eval run` did not record a model "
                f"for (no generation.json): it may be another model's. Use a new --out (or "
                f"score that file with `ovlt eval score --predictions {pred_path}`)")
        was = parse_json(read_text(meta_path, "generation record"), str(meta_path))
        if not isinstance(was, dict):
            raise BenchmarkError(f"{meta_path}: expected a JSON object, got {type(was).__name__}")
        diff = [k for k in identity if k != "model" and was.get(k) != identity[k]]
        if diff:
            what = "; ".join(
                f"{k}: {_short(was.get(k))} there, {_short(identity[k])} now" for k in diff)
            raise BenchmarkError(
                f"{out}: holds predictions made by another model or other settings (model "
                f"{was.get('model')!r}; {what}); resuming would mix them. Use a new --out, or "
                f"remove {pred_path} to start over")
    if is_writer():
        atomic_write_json(meta_path, identity)


def _short(v, n: int = 40) -> str:
    t = repr(v)
    return t if len(t) <= n else t[:n] + "..."


def run_generation(benchmark: str, items: Sequence[EvalItem], engine: RolloutEngine,
                   out_dir: str | os.PathLike, build_request: RequestBuilder,
                   max_new_tokens: int = 2048, batch_size: int = 32,
                   progress: bool = True) -> Path:
    """Generate greedily for the items not yet in `<out_dir>/predictions.jsonl`; returns its path.
    (`claim_out_dir` first checks that predictions already there are this model's.)"""
    from tqdm import tqdm
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BenchmarkError(f"--out {out} is a file, expected a directory")
    out.mkdir(parents=True, exist_ok=True)
    pred_path = out / "predictions.jsonl"
    if is_writer():
        _repair_torn_tail(pred_path)
    done = set(load_predictions(benchmark, pred_path)) if pred_path.exists() else set()
    todo = [it for it in items if it.id not in done]
    logger.info("%s: %d items, %d already predicted, %d to generate", benchmark, len(items),
                len(items) - len(todo), len(todo))
    params = SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, max_new_tokens=max_new_tokens,
                            n=1, seed=0, logprobs=False)
    id_key = ID_FIELD[benchmark]
    with tqdm(total=len(items), initial=len(items) - len(todo), desc=f"eval {benchmark}",
              disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            requests = [build_request(it) for it in batch]
            outputs = engine.generate(requests, params)
            if len(outputs) != len(batch):
                raise RuntimeError(f"engine returned {len(outputs)} results for {len(batch)} requests")
            if not is_writer():
                continue  # TP/PP peers under torchrun run the same batches; rank 0 records
            for it, comps in zip(batch, outputs):
                c = comps[0]
                append_jsonl(pred_path, {id_key: it.id, "response": c.text,
                                         "finish_reason": c.finish_reason,
                                         "num_tokens": len(c.token_ids)})
            bar.update(len(batch))
    return pred_path


def score_predictions(benchmark: str, items: Sequence[EvalItem], predictions: dict[str, str],
                      out_dir: str | os.PathLike, judge: Optional[Judge] = None,
                      judge_mode: str = "fallback", source: str = "", style: str = "ovlt") -> dict:
    """Judge every item that has a prediction; write `scores.json` and `judgements.jsonl`
    (`style`: the scoring reported as `accuracy`; every style's is in `styles`).
    Predictions matching no item (none at all, or ids from another benchmark / split) are an
    error naming `source` (the predictions file), not an accuracy over zero items."""
    by_id = {it.id: it for it in items}
    unknown = [pid for pid in predictions if pid not in by_id]
    if not any(it.id in predictions for it in items):
        raise BenchmarkError(
            (f"{source}: " if source else "") + f"no prediction matches an item of the "
            f"{benchmark} data ({len(predictions)} predictions, {len(items)} items"
            + (f"; prediction ids e.g. {unknown[:3]}, item ids e.g. {[it.id for it in items[:3]]}"
               if predictions else "") + "): nothing to score")
    if unknown:
        logger.warning("%d predictions have ids not in the benchmark data (skipped), e.g. %s",
                       len(unknown), unknown[:5])
    judgements = [judge_response(it, predictions[it.id], judge=judge, judge_mode=judge_mode,
                                 style=style) for it in items if it.id in predictions]
    missing = len(items) - len(judgements)
    if missing:
        logger.warning("%d of %d items have no prediction; accuracy is over the %d predicted",
                       missing, len(items), len(judgements))
    scores = aggregate(benchmark, judgements, n_items=len(items))
    scores["n_unknown_predictions"] = len(unknown)
    out = Path(out_dir)
    atomic_write_text(out / "judgements.jsonl",
                      "".join(json.dumps(j, default=str) + "\n" for j in judgements))
    atomic_write_json(out / "scores.json", scores)
    return scores


def run_benchmarks(eval_cfg, engine: RolloutEngine, out_dir: str | os.PathLike,
                   build_request: RequestBuilder, model_name: str = "ours",
                   progress: bool = True) -> dict[str, dict]:
    """Every benchmark of `eval_cfg.benchmarks` (config `EvalConfig`): generate into
    `<out_dir>/<name>/`, score, and write `<out_dir>/report.md` + `accuracy.png`.
    Returns benchmark -> scores (the iterate loop feeds the accuracies to `plot_rounds`)."""
    from ovlt.eval.readers import load_benchmark
    from ovlt.eval.score_report import write_report
    results = {}
    for b in eval_cfg.benchmarks:
        items = load_benchmark(b.name, b.data, limit=b.limit or None)
        sub = Path(out_dir) / b.name
        pred = run_generation(b.name, items, engine, sub, build_request,
                              max_new_tokens=eval_cfg.max_new_tokens,
                              batch_size=eval_cfg.batch_size, progress=progress)
        results[b.name] = score_predictions(b.name, items, load_predictions(b.name, pred), sub)
    if results:
        write_report(results, out_dir, model_name=model_name)
    return results
