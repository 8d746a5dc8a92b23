"""Read a finished stage's numbers from its outputs into the manifest.

Trainers write per-step JSONL logs under their save dir; the loop's own stage programs write a
JSON of stats. Only small summaries go into the manifest (the report reads curves from disk).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ovlt.utils.io import read_jsonl

# Per-step metric names as trainers spell them (first match wins).
REWARD_KEYS = ("reward_mean", "reward/mean", "rewards/mean", "reward", "mean_reward")
ACC_KEYS = ("accuracy", "acc", "reward_accuracy", "rollout/accuracy")
LOSS_KEYS = ("loss", "lm_loss", "train/loss")


def _first_key(rec: dict, keys) -> Optional[float]:
    for k in keys:
        v = rec.get(k)
        if isinstance(v, (int, float)):
            return float(v)
    return None


def step_log_files(save_dir: str | Path) -> list[Path]:
    """Per-step JSONL logs a trainer wrote under `save_dir` (sorted, rollouts excluded)."""
    root = Path(save_dir)
    if not root.exists():
        return []
    return sorted(p for p in root.rglob("*.jsonl")
                  if "rollout" not in p.name and "sample" not in p.name)


def step_series(save_dir: str | Path, keys) -> list[float]:
    out: list[float] = []
    for f in step_log_files(save_dir):
        for rec in read_jsonl(f):
            v = _first_key(rec, keys)
            if v is not None:
                out.append(v)
    return out


def _read_json(path: str | Path) -> dict:
    p = Path(path)
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}


def collect(stage: str, outputs: dict) -> dict:
    if stage in ("prepare", "data"):
        return _read_json(outputs["stats"])
    if stage == "sft":
        loss = step_series(outputs["save_dir"], LOSS_KEYS)
        return {"steps": len(loss), "loss_first": loss[0] if loss else None,
                "loss_last": loss[-1] if loss else None}
    if stage == "grpo":
        rew = step_series(outputs["save_dir"], REWARD_KEYS)
        acc = step_series(outputs["save_dir"], ACC_KEYS)
        k = max(1, min(3, len(rew) // 3)) if rew else 0
        ka = max(1, min(3, len(acc) // 3)) if acc else 0
        return {"steps": len(rew),
                "reward_first": rew[0] if rew else None,
                "reward_last": rew[-1] if rew else None,
                # means of the first / last few steps: less noisy than single steps
                "reward_before": sum(rew[:k]) / k if rew else None,
                "reward_after": sum(rew[-k:]) / k if rew else None,
                "accuracy_before": sum(acc[:ka]) / ka if acc else None,
                "accuracy_after": sum(acc[-ka:]) / ka if acc else None}
    if stage == "eval":
        out = _read_json(outputs["heldout"])
        bench = {}
        root = Path(outputs["benchmarks"])
        if root.is_dir():
            for scores in sorted(root.glob("*/scores.json")):
                s = _read_json(scores)
                bench[scores.parent.name] = s.get("overall", s.get("accuracy"))
        if bench:
            out["benchmarks"] = bench
        probe = _read_json(outputs["probe"]) if outputs.get("probe") else {}
        if probe.get("prompts"):
            out["probe"] = {"before": probe["before"]["mean"], "after": probe["after"]["mean"],
                            "se_before": probe["before"]["se"], "se_after": probe["after"]["se"],
                            "se_rise": probe["se_rise"], "prompts": probe["prompts"],
                            "se_rise_independent": probe.get("se_rise_independent"),
                            "samples_per_prompt": probe["samples_per_prompt"]}
        return out
    return {}
