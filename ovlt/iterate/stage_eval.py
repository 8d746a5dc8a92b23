"""Stage rK.eval: greedy held-out accuracy per difficulty (heldout.json) + configured benchmarks.

Held-out: the prepare stage's split, prompted as GRPO prompts it (`ovlt.rewards.rl_prompt` of
rewards.style), greedy, `iterate.heldout_max_new_tokens`; accuracy by math_reward and the format
rate by format_reward in rewards.style, overall and per `difficulty`. Rounds > 0 score the
round's SFT model the same way (heldout.json's "sft_model": what the round's GRPO changed) and
run the probe (`ovlt.iterate.probe`). Benchmarks: `ovlt eval run` for each `eval.benchmarks`
entry into benchmarks/<name>/ (scores.json).
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from ovlt.iterate.stage_common import parse_stage_args
from ovlt.logging import get_logger, setup_logging
from ovlt.utils.io import atomic_write_json, atomic_write_text, read_jsonl

log = get_logger(__name__)


def summarize(rows: list[dict]) -> dict:
    by = defaultdict(list)
    for r in rows:
        by[r["difficulty"] or "all"].append(r)
    n = max(1, len(rows))
    return {
        "accuracy": sum(r["reward"] for r in rows) / n if rows else None,
        "format": sum(r["format"] for r in rows) / n if rows else None,
        "by_difficulty": {d: sum(r["reward"] for r in rs) / len(rs) for d, rs in sorted(by.items())},
        "n_by_difficulty": {d: len(rs) for d, rs in sorted(by.items())},
        "mean_response_chars": sum(len(r["response"]) for r in rows) / n if rows else None,
        "n": len(rows),
    }


def greedy_rows(cfg, engine, records) -> list[dict]:
    """Each record answered greedily on `engine`, graded: one row per record."""
    from ovlt.iterate import generation as gen
    from ovlt.rewards import format_reward, math_reward, rl_prompt
    from ovlt.rewards.pool import accuracy_kwargs
    reqs = [gen.make_request(rl_prompt(r.problem, cfg.rewards.style, cfg.rollout.prompt_suffix),
                             gen.load_images(r.images), cfg, r.id) for r in records]
    outs = gen.generate_texts(engine, reqs, 1, 0.0, 1.0, cfg.iterate.heldout_max_new_tokens,
                              cfg.data.seed, cfg.eval.batch_size)
    return [{"id": r.id, "difficulty": r.difficulty, "answer": r.answer, "response": resp,
             "reward": math_reward(resp, r.answer, **accuracy_kwargs(cfg.rewards)),
             "format": format_reward(resp, cfg.rewards.style)}
            for r, (resp,) in zip(records, outs)]


def main(argv=None) -> int:
    cfg, info, sdir = parse_stage_args("ovlt.iterate.stage_eval", argv)
    from ovlt.data.formats import SkipReport, read_rl
    from ovlt.iterate import generation as gen
    dist = gen.init_dp(cfg)
    setup_logging(str(sdir / "logs"))
    report = SkipReport()
    records = list(read_rl(info["inputs"]["heldout"], report=report))
    if report.num_skipped:
        log.warning("held-out: %s", report.summary())
    mine = gen.shard(records, dist.rank, dist.world_size)
    engine = None
    rows = []
    if mine:
        engine = gen.open_engine(cfg, info["inputs"]["model"])
        rows = greedy_rows(cfg, engine, mine)
    atomic_write_text(sdir / f"heldout-part-{dist.rank:04d}.jsonl",
                      "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows))
    if dist.world_size > 1:
        import torch.distributed as tdist
        tdist.barrier()
    if dist.rank != 0:
        return 0
    allrows = []
    for p in sorted(sdir.glob("heldout-part-*.jsonl")):
        allrows += read_jsonl(p)
    summary = summarize(allrows)
    # Chance level for "learned something": the best single constant answer, picked with
    # hindsight on the held-out split itself (an upper bound on any answer-prior strategy).
    if allrows:
        from collections import Counter
        ans, cnt = Counter(r["answer"] for r in allrows).most_common(1)[0]
        summary["constant_answer"] = ans
        summary["constant_baseline"] = cnt / len(allrows)

    # Benchmarks through the eval harness (rank 0; the harness batches on its own).
    for b in cfg.eval.benchmarks:
        if not b.data:
            log.warning("eval.benchmarks: %s has no data path; skipped", b.name)
            continue
        from ovlt.eval import cli as eval_cli
        bdir = Path(info["outputs"]["benchmarks"]) / b.name
        args = ["run", "--benchmark", b.name, "--data", b.data, "--model", info["inputs"]["model"],
                "--out", str(bdir), "--engine", cfg.eval.engine, "--config", str(sdir / "config.yaml"),
                "--max-new-tokens", str(cfg.eval.max_new_tokens),
                "--batch-size", str(cfg.eval.batch_size), "--no-progress"]
        if cfg.rewards.style == "openvlthinker":  # its evaluation: its prompts, no suffix
            args += ["--style", "openvlthinker"]
        else:
            args += ["--prompt-suffix", cfg.rollout.prompt_suffix]
        if b.limit:
            args += ["--limit", str(b.limit)]
        rc = eval_cli.main(args, engine=engine)
        if rc != 0:
            raise SystemExit(f"ovlt eval run {b.name} failed with exit code {rc}")
    sft_engine = None
    if info["inputs"].get("sft_model") and records:
        # the round's SFT model on the same split (rank 0, all records): before its GRPO
        sft_engine = gen.open_engine(cfg, info["inputs"]["sft_model"])
        sft_rows = greedy_rows(cfg, sft_engine, records)
        atomic_write_text(sdir / "heldout-sft-model.jsonl",
                          "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in sft_rows))
        s = summarize(sft_rows)
        summary["sft_model"] = {k: s[k] for k in ("accuracy", "format", "by_difficulty", "n")}
        log.info("held-out accuracy: SFT model %.3f, after GRPO %.3f", s["accuracy"],
                 summary["accuracy"])
    if info["outputs"].get("probe"):
        probe = run_probe(cfg, info, records, engine, sft_engine)
        atomic_write_json(info["outputs"]["probe"], probe)
        if probe["prompts"]:
            log.info("probe reward (%d prompts x %d samples): before GRPO %.3f (se %.3f), "
                     "after %.3f (se %.3f)", probe["prompts"], probe["samples_per_prompt"],
                     probe["before"]["mean"], probe["before"]["se"], probe["after"]["mean"],
                     probe["after"]["se"])
    atomic_write_json(info["outputs"]["heldout"], summary)
    print(json.dumps(summary))
    return 0


def run_probe(cfg, info, records, engine_after, engine_before=None) -> dict:
    """The probe reward of this round's SFT model (before GRPO) and GRPO model (after): same
    prompts, same sampling seed (`ovlt.iterate.probe`). Engines not given are opened here."""
    from ovlt.iterate import generation as gen
    from ovlt.iterate.probe import (diff_se, paired_rise, probe_records, probe_reward,
                                    reward_pool)
    recs = probe_records(records, cfg.iterate.probe.prompts, cfg.iterate.probe.difficulties)
    if not recs:
        log.warning("probe: no held-out problem of difficulty %s; skipped",
                    cfg.iterate.probe.difficulties or "any")
        return {"prompts": 0}
    pool = reward_pool(cfg)
    try:
        after = probe_reward(cfg, engine_after or gen.open_engine(cfg, info["inputs"]["model"]),
                             recs, pool)
        before = probe_reward(cfg, engine_before or gen.open_engine(cfg, info["inputs"]["sft_model"]),
                              recs, pool)
    finally:
        pool.close()
    independent = diff_se(before["se"], after["se"])
    paired = paired_rise(before["rewards"], after["rewards"])
    return {"prompts": len(recs), "samples_per_prompt": cfg.iterate.probe.samples,
            "seed": cfg.iterate.probe.seed, "before": before, "after": after,
            "rise": after["mean"] - before["mean"],
            "se_rise": paired["se"] if paired else independent,
            "se_rise_paired": paired is not None, "se_rise_independent": independent,
            "models": {"before": info["inputs"]["sft_model"], "after": info["inputs"]["model"]}}


if __name__ == "__main__":
    sys.exit(main())
