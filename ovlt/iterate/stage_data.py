"""Stage rK.data: this round's SFT data (sft.jsonl, sharegpt) + stats.json.

Round 1: the base model captions each image (greedy), the teacher answers from caption +
question (`iterate.teacher.samples` chains each). Round K > 1: round K-1's GRPO model answers
from the image (`iterate.self_answer.samples` each). Either way: verify with math_reward, keep
the shortest verified chain, cut at the first "Wait," after a correct answer
(`ovlt.iterate.filter`). Ranks split the problems; rank 0 merges in pool order.
"""
from __future__ import annotations

import json
import random
import sys
from collections import Counter
from pathlib import Path

from ovlt.iterate.filter import select_chain
from ovlt.iterate.stage_common import parse_stage_args
from ovlt.logging import get_logger, setup_logging
from ovlt.utils.io import atomic_write_json, atomic_write_text, read_jsonl

log = get_logger(__name__)


def _solutions(path: str) -> dict[str, str]:
    out = {}
    p = Path(path)
    if p.is_file():
        for rec in read_jsonl(p):
            msgs = rec.get("messages") or []
            if rec.get("id") is not None and msgs and msgs[-1].get("role") == "assistant":
                out[str(rec["id"])] = msgs[-1]["content"]
    return out


def _image_files(rec, sdir: Path) -> list[str]:
    """Paths of a record's images (bytes are written under the stage's images/)."""
    out = []
    for j, src in enumerate(rec.images):
        if isinstance(src, dict):  # {bytes, path} struct from parquet
            src = src.get("bytes") or src.get("path")
        if isinstance(src, (bytes, bytearray)):
            p = sdir / "images" / f"{rec.id.replace('/', '_')}_{j}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(bytes(src))
            out.append(str(p))
        else:
            out.append(str(Path(src).resolve()))
    return out


def _subsample(records: list, n: int, seed: int) -> list:
    """`n` of `records` drawn with `seed`, in their order (all of them when n is 0 or >= len)."""
    if not n or n >= len(records):
        return records
    keep = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in keep]


def main(argv=None) -> int:
    cfg, info, sdir = parse_stage_args("ovlt.iterate.stage_data", argv)
    from ovlt.data.formats import SkipReport, read_rl
    from ovlt.iterate import generation as gen
    from ovlt.rewards import format_reward, math_reward, rl_prompt
    it, rnd = cfg.iterate, int(info["round"])
    dist = gen.init_dp(cfg)
    setup_logging(str(sdir / "logs"))
    report = SkipReport()
    records = list(read_rl(info["inputs"]["pool"], report=report))
    if report.num_skipped:
        log.warning("pool: %s", report.summary())
    base = cfg.data.seed * 1000 + rnd  # one seed per draw and round
    records = _subsample(records, it.prepare.pool_per_round, base)
    if rnd == 1:
        records = _subsample(records, it.teacher.problems, base + 400)
    else:
        records = _subsample(records, it.self_answer.problems, base + 500)
    order = {r.id: i for i, r in enumerate(records)}
    mine = gen.shard(records, dist.rank, dist.world_size)
    seed = cfg.data.seed + 7919 * rnd + dist.rank
    suffix = cfg.rollout.prompt_suffix

    if rnd == 1:
        from ovlt.iterate.teacher import TeacherItem, make_teacher
        captions = [""] * len(mine)
        if it.caption.enabled and mine:
            engine = gen.open_engine(cfg, info["inputs"]["model"])
            reqs = [gen.make_request("<image>" * len(r.images) + it.caption.prompt,
                                     gen.load_images(r.images), cfg, r.id) for r in mine]
            captions = [c[0] for c in gen.generate_texts(
                engine, reqs, 1, 0.0, 1.0, it.caption.max_new_tokens, seed,
                it.self_answer.batch_size)]
            del engine
        sols = _solutions(info["inputs"]["solutions"]) if it.teacher.kind == "synthetic" else {}
        items = [TeacherItem(r.id, r.problem, captions[i], r.answer, sols.get(r.id))
                 for i, r in enumerate(mine)]
        teacher = make_teacher(it.teacher, seed=cfg.data.seed,
                               engine_factory=lambda path: gen.open_engine(cfg, path))
        cands = teacher.answer(items, it.teacher.samples) if items else []
    else:
        captions = [""] * len(mine)
        engine = gen.open_engine(cfg, info["inputs"]["model"])
        sa = it.self_answer
        reqs = [gen.make_request(rl_prompt(r.problem, cfg.rewards.style, suffix),
                                 gen.load_images(r.images), cfg, r.id) for r in mine]
        cands = gen.generate_texts(engine, reqs, sa.samples, sa.temperature, sa.top_p,
                                   sa.max_new_tokens, seed, sa.batch_size)

    verify = lambda resp, gt: math_reward(resp, gt, fallback=cfg.rewards.fallback) >= 1.0  # noqa
    rows = []
    for r, cap, cs in zip(mine, captions, cands):
        res = select_chain(cs, r.answer, verify, it.filter.cut_at_wait, it.filter.cut_marker,
                           it.filter.min_verified)
        row = {"id": r.id, "difficulty": r.difficulty, "n": len(cs), "verified": res.n_verified,
               "format": sum(format_reward(c) for c in cs), "cut": res.was_cut,
               "caption": cap[:2000]}
        if res.chain is not None:
            row["sft"] = {"id": r.id,
                          "messages": [{"role": "user", "content": r.problem + suffix},
                                       {"role": "assistant", "content": res.chain}],
                          "images": _image_files(r, sdir), "difficulty": r.difficulty,
                          "answer": r.answer, "source": r.source}
        rows.append(row)
    part = sdir / f"part-{dist.rank:04d}.jsonl"
    atomic_write_text(part, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows))
    if dist.world_size > 1:
        import torch.distributed as tdist
        tdist.barrier()
    if dist.rank == 0:
        allrows = []
        for p in sorted(sdir.glob("part-*.jsonl")):
            allrows += read_jsonl(p)
        allrows.sort(key=lambda x: order[x["id"]])
        carried = 0
        if rnd > 1 and it.self_answer.carry_over_unsolved:
            prev = {str(r["id"]): r for r in read_jsonl(info["inputs"]["prev_sft"])}
            for x in allrows:
                if "sft" not in x and x["id"] in prev:
                    x["sft"], x["carried"] = prev[x["id"]], True
                    carried += 1
        kept = [x["sft"] for x in allrows if "sft" in x]
        cap = it.sft_examples_per_round
        if cap and len(kept) > cap:
            kept = kept[:cap]
        if not kept:
            raise SystemExit(f"round {rnd}: no verified chain for any of {len(allrows)} problems; "
                             "nothing to fine-tune on (check the teacher / model outputs in "
                             f"{sdir}/part-*.jsonl)")
        atomic_write_text(info["outputs"]["sft"],
                          "".join(json.dumps(k, ensure_ascii=False) + "\n" for k in kept))
        n_c = sum(x["n"] for x in allrows)
        stats = {
            "source": ("teacher:" + it.teacher.kind) if rnd == 1 else "previous GRPO model",
            "problems": len(allrows), "candidates": n_c,
            "verified_candidates": sum(x["verified"] for x in allrows),
            "candidate_accuracy": sum(x["verified"] for x in allrows) / max(1, n_c),
            "candidate_format": sum(x["format"] for x in allrows) / max(1, n_c),
            "solved_problems": sum(1 for x in allrows if x["verified"]),
            "solved_fraction": sum(1 for x in allrows if x["verified"]) / max(1, len(allrows)),
            "kept": len(kept), "carried_over": carried,
            "cut_at_wait": sum(1 for x in allrows if x["cut"] and "sft" in x),
            "mean_chain_chars": sum(len(k["messages"][1]["content"]) for k in kept) / len(kept),
            "kept_by_difficulty": dict(sorted(Counter(k["difficulty"] for k in kept).items())),
        }
        atomic_write_json(info["outputs"]["stats"], stats)
        print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
