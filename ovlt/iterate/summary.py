"""`runs/<name>/summary.json`: the run's numbers in one record, built from the manifest.

    {"name", "rounds": [{"round", "heldout_acc", "heldout_n", "acc_by_level", "format_rate",
                         "sft_kept", "probe_reward_before", "probe_reward_after", "probe_se",
                         "heldout_acc_sft", "acc_by_level_sft", ...}],
     "baselines": {"constant_answer_acc", "constant_answer", "base_model_acc", ...},
     "stage_seconds": {stage_id: seconds, ..., "total": seconds}}

Round 0 is the base model (held-out only). `heldout_acc_sft` is the round's SFT model on the
same split (before its GRPO; `heldout_acc` is after). `probe_se` is the standard error of
probe_reward_after - probe_reward_before over samples paired by seed (`ovlt.iterate.probe`);
`probe_se_independent` treats the two runs as unpaired; the before/after errors are there too.
Written atomically after every finished stage; the report and its plots read it.
"""
from __future__ import annotations

from pathlib import Path

from ovlt.iterate.manifest import DONE, Manifest
from ovlt.utils.io import atomic_write_json

LEVEL_ORDER = ("easy", "medium", "hard")


def _done(man: Manifest, sid: str) -> dict:
    st = man.get(sid)
    return st if st.get("status") == DONE else {}


def _rounds(man: Manifest) -> list[int]:
    return sorted({int(s["round"]) for s in man.stages.values() if "round" in s})


def _levels(by: dict) -> dict:
    order = [d for d in LEVEL_ORDER if d in by] + sorted(d for d in by if d not in LEVEL_ORDER)
    return {d: by[d] for d in order}


def round_record(man: Manifest, r: int) -> dict:
    data, sft, grpo, ev = (_done(man, f"r{r}.{s}").get("metrics", {})
                           for s in ("data", "sft", "grpo", "eval"))
    probe = ev.get("probe") or {}
    sft_model = ev.get("sft_model") or {}
    rec = {
        "round": r,
        "heldout_acc": ev.get("accuracy"),
        "heldout_n": ev.get("n"),
        "acc_by_level": _levels(ev.get("by_difficulty") or {}),
        "n_by_level": _levels(ev.get("n_by_difficulty") or {}),
        "format_rate": ev.get("format"),
        "sft_kept": data.get("kept"),
        "heldout_acc_sft": sft_model.get("accuracy"),
        "acc_by_level_sft": _levels(sft_model.get("by_difficulty") or {}),
        "probe_reward_before": probe.get("before"),
        "probe_reward_after": probe.get("after"),
        "probe_se": probe.get("se_rise"),
        "probe_se_independent": probe.get("se_rise_independent"),
        "probe_se_before": probe.get("se_before"),
        "probe_se_after": probe.get("se_after"),
        "probe_prompts": probe.get("prompts"),
        "probe_samples_per_prompt": probe.get("samples_per_prompt"),
    }
    if data:
        rec["data"] = {k: data.get(k) for k in ("source", "problems", "solved_problems",
                                                "candidate_accuracy", "candidate_format",
                                                "carried_over", "kept_by_difficulty")}
    if sft:
        rec["sft"] = {k: sft.get(k) for k in ("steps", "loss_first", "loss_last")}
    if grpo:  # the trainer's own per-step rewards (each step on other prompts)
        rec["grpo"] = {k: grpo.get(k) for k in ("steps", "reward_before", "reward_after")}
    if ev.get("benchmarks"):
        rec["benchmarks"] = ev["benchmarks"]
    return rec


def build_summary(man: Manifest) -> dict:
    rounds = []
    for r in _rounds(man):
        rec = round_record(man, r)
        if r == 0 and rec["heldout_acc"] is None:
            continue
        rounds.append(rec)
    baselines: dict = {}
    for r in _rounds(man):  # the held-out split is the same every round: the first eval says
        ev = _done(man, f"r{r}.eval").get("metrics", {})
        if ev.get("constant_baseline") is not None:
            baselines["constant_answer_acc"] = ev["constant_baseline"]
            baselines["constant_answer"] = ev.get("constant_answer")
            break
    base = _done(man, "r0.eval").get("metrics", {})
    if base:
        baselines["base_model_acc"] = base.get("accuracy")
        baselines["base_model_format"] = base.get("format")
    seconds = {sid: round(float(st["seconds"]), 1) for sid, st in man.stages.items()
               if st.get("status") == DONE and st.get("seconds") is not None}
    seconds["total"] = round(sum(seconds.values()), 1)
    return {"name": man.data.get("name", ""), "rounds": rounds, "baselines": baselines,
            "stage_seconds": seconds}


def write_summary(man: Manifest, run_dir: str | Path) -> dict:
    summary = build_summary(man)
    atomic_write_json(Path(run_dir) / "summary.json", summary)
    return summary
