"""`eval run`: greedy generation over a benchmark through a `RolloutEngine`, resumable, then scoring.

Predictions are appended to `<out>/predictions.jsonl` one line per item as soon as its batch
finishes (`{<id field>: ..., "response": ..., "finish_reason": ..., "num_tokens": ...}`), so a
killed run loses at most one batch; a rerun skips the ids already there. Scoring reads the
same file (`score_predictions`), so `eval score` on it gives the same numbers.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

from ovlt.eval.readers import ID_FIELD, BenchmarkError, EvalItem
from ovlt.eval.scoring import Judge, aggregate, judge_response
from ovlt.logging import get_logger
from ovlt.rollout.base import GenerationRequest, RolloutEngine, SamplingParams
from ovlt.utils.io import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl

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
            return str(rec[key])
    raise BenchmarkError(f"{where}: prediction has no {ID_FIELD[benchmark]!r} (or 'id') field")


def load_predictions(benchmark: str, path: str | os.PathLike) -> dict[str, str]:
    preds: dict[str, str] = {}
    p = Path(path)
    if not p.exists():
        raise BenchmarkError(f"{p}: predictions file not found")
    for n, rec in enumerate(read_jsonl(p), 1):
        where = f"{p}: line {n}"
        pid = prediction_id(benchmark, rec, where)
        if "response" not in rec:
            raise BenchmarkError(f"{where} (id={pid}): missing field 'response'")
        if pid in preds:
            logger.warning("%s: duplicate prediction for id %s; the later one is used", where, pid)
        preds[pid] = str(rec["response"] if rec["response"] is not None else "")
    return preds


def run_generation(benchmark: str, items: Sequence[EvalItem], engine: RolloutEngine,
                   out_dir: str | os.PathLike, build_request: RequestBuilder,
                   max_new_tokens: int = 2048, batch_size: int = 32,
                   progress: bool = True) -> Path:
    """Generate greedily for the items not yet in `<out_dir>/predictions.jsonl`; returns its path."""
    from tqdm import tqdm
    out = Path(out_dir)
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
                      judge_mode: str = "fallback") -> dict:
    """Judge every item that has a prediction; write `scores.json` and `judgements.jsonl`."""
    by_id = {it.id: it for it in items}
    unknown = [pid for pid in predictions if pid not in by_id]
    if unknown:
        logger.warning("%d predictions have ids not in the benchmark data (skipped), e.g. %s",
                       len(unknown), unknown[:5])
    judgements = [judge_response(it, predictions[it.id], judge=judge, judge_mode=judge_mode)
                  for it in items if it.id in predictions]
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
