"""Stage r0.prepare: the question pool, the held-out split, curriculum files, the base model.

  pool/rl.parquet + pool/sft.jsonl    user pool files (merged, images embedded as bytes) or
                                      `ovlt data synth` output (solutions for the synthetic teacher)
  heldout/rl.parquet                  iterate.heldout_files or a synthetic split with another seed
  curriculum/<difficulty>.parquet     the pool split by its `difficulty` column
  base_model/                         only when model.hf_path is unset: a random-init model of
                                      the configured shape (the embedded demo's "base model")
"""
from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

from ovlt.iterate.stage_common import parse_stage_args
from ovlt.logging import get_logger, setup_logging
from ovlt.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text

log = get_logger(__name__)
COLUMNS = ("id", "problem", "answer", "images", "source", "difficulty")


def _write_rl(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    img_type = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    tbl = pa.table({c: pa.array([r[c] for r in rows], type=img_type if c == "images" else pa.string())
                    for c in COLUMNS})
    buf = pa.BufferOutputStream()
    pq.write_table(tbl, buf)
    atomic_write_bytes(path, buf.getvalue().to_pybytes())


def _merge_rl(files: list[str], out: Path) -> int:
    """Read RL parquet files with the data pipeline's reader (counted skips) and write one file
    with images embedded, so relative image paths survive the move."""
    from ovlt.data.formats import SkipReport, read_rl
    rows, report = [], SkipReport()
    for f in files:
        for r in read_rl(f, report=report):
            imgs = []
            for src in r.images:
                if isinstance(src, dict):  # {bytes, path} struct from parquet
                    src = src.get("bytes") or src.get("path")
                data = src if isinstance(src, (bytes, bytearray)) else Path(src).read_bytes()
                imgs.append({"bytes": bytes(data), "path": None if isinstance(src, (bytes, bytearray))
                             else Path(src).name})
            rows.append({"id": r.id, "problem": r.problem, "answer": r.answer, "images": imgs,
                         "source": r.source, "difficulty": r.difficulty})
    if report.num_skipped:
        log.warning("pool/held-out files: %s", report.summary())
    if not rows:
        raise SystemExit(f"no usable records in {files}")
    _write_rl(out, rows)
    return len(rows)


def _read_rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq
    return pq.read_table(path).to_pylist()


def main(argv=None) -> int:
    cfg, info, sdir = parse_stage_args("ovlt.iterate.stage_prepare", argv)
    setup_logging()
    out, p = info["outputs"], cfg.iterate.prepare
    pool = Path(out["pool"])
    pool.parent.mkdir(parents=True, exist_ok=True)
    from ovlt.data import synth
    if p.pool_files:
        n_pool = _merge_rl(p.pool_files, pool)
        sols = [Path(f).read_text(encoding="utf-8").strip() for f in p.solution_files]
        atomic_write_text(out["solutions"], "\n".join(s for s in sols if s) + "\n")
    elif p.synth_n > 0:
        n_pool = synth.generate(pool.parent, p.synth_n, p.synth_seed,
                                prompt_suffix=cfg.rollout.prompt_suffix,
                                tasks=p.synth_tasks or None)["n"]
    else:
        raise SystemExit("iterate.prepare: set pool_files (RL parquet) or synth_n > 0")

    held = Path(out["heldout"])
    if cfg.iterate.heldout_files:
        n_held = _merge_rl(cfg.iterate.heldout_files, held)
    elif p.heldout_n > 0:
        if p.pool_files == [] and p.heldout_seed == p.synth_seed:
            raise SystemExit("iterate.prepare.heldout_seed must differ from synth_seed "
                             "(else the held-out split equals the training pool)")
        n_held = synth.generate(held.parent, p.heldout_n, p.heldout_seed,
                                prompt_suffix=cfg.rollout.prompt_suffix,
                                tasks=p.synth_tasks or None)["n"]
    else:
        _write_rl(held, [])
        n_held = 0
        log.warning("no held-out split (iterate.heldout_files / prepare.heldout_n): eval stages "
                    "report benchmarks only")

    rows = _read_rows(pool)
    by_diff = Counter(r.get("difficulty") or "" for r in rows)
    cur = {}
    for d in p.curriculum_difficulties:
        sel = [r for r in rows if r.get("difficulty") == d]
        if not sel:
            raise SystemExit(f"iterate.prepare.curriculum_difficulties: no pool problem has "
                             f"difficulty {d!r} (pool has {dict(by_diff)})")
        _write_rl(Path(out[f"curriculum.{d}"]), [{c: r.get(c) for c in COLUMNS} for r in sel])
        cur[d] = len(sel)

    if cfg.model.hf_path is None:
        from ovlt.models.qwen2_5_vl.hf_config import save_tiny_hf_model
        tmp = Path(out["base_model"] + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_tiny_hf_model(tmp, cfg.model, seed=cfg.data.seed)
        tmp.rename(out["base_model"])
    elif not Path(cfg.model.hf_path).exists():
        raise SystemExit(f"model.hf_path={cfg.model.hf_path} does not exist")

    stats = {"pool": n_pool, "heldout": n_held, "pool_by_difficulty": dict(sorted(by_diff.items())),
             "curriculum": cur}
    atomic_write_json(out["stats"], stats)
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
