"""The plan of a run: which stages, in which order, with which inputs, outputs and config.

  r0.prepare   question pool + held-out split + curriculum files + the base model directory
  r0.eval      the base model on the held-out split (the baseline), if iterate.eval_round0
  rK.data      SFT data of round K (round 1: caption + teacher; K > 1: round K-1's GRPO model)
  rK.sft       SFT from the *base* model on rK.data
  rK.grpo      GRPO from rK.sft's model, with the curriculum
  rK.eval      held-out accuracy per difficulty + configured benchmarks, greedy; for K > 0 also
               rK.sft's model's held-out accuracy and the probe reward of rK.sft's and rK.grpo's
               models (did this round's GRPO raise them?)

Each stage's config file is the job config with the stage's paths filled in; the part of the job
config a stage depends on (its `slice`) is hashed into the manifest so a changed config is
detected on resume. Paths in a slice are the user's, not the run's, so moving nothing changes it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ovlt.config import ConfigError, JobConfig, from_dict, set_path, to_dict, validate

STAGE_NAMES = ("prepare", "data", "sft", "grpo", "eval")


@dataclass
class StagePlan:
    sid: str
    round: int
    stage: str
    dir: Path
    program: str
    nproc: int
    nnodes: int
    slice: dict                       # config the stage depends on (hashed)
    overrides: dict[str, Any]         # dotted job-config keys set for this stage
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    # Outputs that must exist after the stage (files or directories).
    required: list[str] = field(default_factory=list)

    @property
    def config_path(self) -> Path:
        return self.dir / "config.yaml"

    @property
    def stage_json(self) -> Path:
        return self.dir / "stage.json"

    @property
    def log_path(self) -> Path:
        return self.dir / "stage.log"


def _get(d: dict, dotted: str) -> Any:
    for p in dotted.split("."):
        d = d[p]
    return d


def _pick(d: dict, keys: list[str]) -> dict:
    return {k: copy.deepcopy(_get(d, k)) for k in keys}


def _without_files(data: dict) -> dict:
    data = dict(data)
    for k in ("sft_files", "rl_files"):
        data.pop(k, None)
    return data


def parse_stage_id(text: str, rounds: int) -> str:
    """"r2.sft", "2.sft", "2:sft" -> "r2.sft"; "sft" -> round 1's; "prepare" -> "r0.prepare"."""
    t = text.strip().lower().replace(":", ".")
    if "." in t:
        r, name = t.split(".", 1)
        r = r[1:] if r.startswith("r") else r
        if not r.isdigit():
            raise ValueError(f"--force-from {text!r}: expected ROUND.STAGE like r2.sft")
        rnd = int(r)
    else:
        name, rnd = t, (0 if t == "prepare" else 1)
    if name not in STAGE_NAMES:
        raise ValueError(f"--force-from {text!r}: stage {name!r} not one of {', '.join(STAGE_NAMES)}")
    if rnd > rounds:
        raise ValueError(f"--force-from {text!r}: round {rnd} > iterate.rounds={rounds}")
    return f"r{rnd}.{name}"


def build_plan(cfg: JobConfig, run_dir: Path) -> list[StagePlan]:
    it = cfg.iterate
    d = to_dict(cfg)
    run_dir = Path(run_dir).resolve()

    def plan(sid, rnd, stage, slice_, overrides, inputs, outputs, required):
        # prepare is one process; the others' widths come from iterate.nproc_/nnodes_<stage>.
        nproc = getattr(it, f"nproc_{stage}", 1)
        nnodes = getattr(it, f"nnodes_{stage}", 1)
        program = getattr(it, f"program_{stage}")
        # The resources of a stage are part of its config (a changed world size is a change).
        res = {"program": program, "nproc": nproc, "nnodes": nnodes,
               "stage_env": list(it.stage_env)}
        return StagePlan(sid, rnd, stage, run_dir / sid, program, nproc, nnodes,
                         {**slice_, "resources": res}, overrides, inputs, outputs, required)

    plans: list[StagePlan] = []
    prep = run_dir / "r0.prepare"
    base_model = cfg.model.hf_path or str(prep / "base_model")
    curriculum = {dname: str(prep / "curriculum" / f"{dname}.parquet")
                  for dname in it.prepare.curriculum_difficulties}
    pool = str(prep / "pool" / "rl.parquet")
    solutions = str(prep / "pool" / "sft.jsonl")
    heldout = str(prep / "heldout" / "rl.parquet")
    prep_out = {"pool": pool, "solutions": solutions, "heldout": heldout,
                "base_model": base_model, "stats": str(prep / "prepare.json"),
                **{f"curriculum.{k}": v for k, v in curriculum.items()}}
    plans.append(plan("r0.prepare", 0, "prepare",
                      _pick(d, ["model", "iterate.prepare", "iterate.heldout_files", "data.seed"]),
                      {}, {}, prep_out, list(prep_out.values())))

    def eval_plan(rnd, model_dir, before_grpo=None):
        sid = f"r{rnd}.eval"
        out = {"heldout": str(run_dir / sid / "heldout.json"),
               "benchmarks": str(run_dir / sid / "benchmarks")}
        keys = ["eval", "rewards", "rollout.prompt_suffix", "iterate.heldout_max_new_tokens",
                "iterate.heldout_files"]
        inputs = {"model": model_dir, "heldout": heldout}
        if before_grpo:  # the round's SFT model is scored too: did its GRPO help?
            inputs["sft_model"] = before_grpo
        if before_grpo and it.probe.prompts > 0:
            # the probe samples the SFT model and the GRPO model like the trainer's rollouts
            keys += ["iterate.probe", "rollout", "grpo.reward_fn", "data.min_pixels",
                     "data.max_pixels"]
            out["probe"] = str(run_dir / sid / "probe.json")
        return plan(sid, rnd, "eval", _pick(d, keys), {"model.hf_path": model_dir}, inputs,
                    out, [out["heldout"]] + ([out["probe"]] if "probe" in out else []))

    if it.eval_round0:
        plans.append(eval_plan(0, base_model))

    prev_model = base_model
    for k in range(1, it.rounds + 1):
        rdir = lambda s: run_dir / f"r{k}.{s}"  # noqa: E731
        # -- data
        keys = ["iterate.filter", "iterate.sft_examples_per_round", "iterate.prepare.pool_per_round",
                "rewards", "data.min_pixels", "data.max_pixels", "rollout.prompt_suffix"]
        keys += (["iterate.teacher", "iterate.caption"] if k == 1
                 else ["iterate.self_answer", "data.seed"])
        data_out = {"sft": str(rdir("data") / "sft.jsonl"), "stats": str(rdir("data") / "stats.json")}
        data_in = {"model": prev_model, "pool": pool, "solutions": solutions}
        if k > 1:
            data_in["prev_sft"] = str(run_dir / f"r{k - 1}.data" / "sft.jsonl")
        plans.append(plan(f"r{k}.data", k, "data", _pick(d, keys),
                          {"model.hf_path": prev_model}, data_in,
                          data_out, list(data_out.values())))
        # -- SFT from the base model
        sft_save = rdir("sft") / "ckpt"
        sft_hf = str(sft_save / it.hf_export_subdir)
        plans.append(plan(
            f"r{k}.sft", k, "sft",
            {**_pick(d, ["model", "parallel", "sft"]), "data": _without_files(d["data"])},
            {"model.hf_path": base_model, "data.sft_files": [data_out["sft"]],
             "sft.train.save_dir": str(sft_save)},
            {"model": base_model, "sft": data_out["sft"]},
            {"save_dir": str(sft_save), "model": sft_hf}, [sft_hf]))
        # -- GRPO from the SFT model
        grpo_save = rdir("grpo") / "ckpt"
        grpo_hf = str(grpo_save / it.hf_export_subdir)
        ov: dict[str, Any] = {"model.hf_path": sft_hf, "grpo.train.save_dir": str(grpo_save)}
        if curriculum:
            # lengths checked at config load (`ovlt.config.validate`)
            epochs = list(it.prepare.curriculum_epochs) or [1.0] * len(curriculum)
            frozen = (list(it.prepare.curriculum_freeze_vision)
                      or [i == 0 for i in range(len(curriculum))])  # the recipe's
            ov["grpo.curriculum"] = [
                {"name": n, "rl_files": [p], "epochs": e, "freeze_vision": f}
                for (n, p), e, f in zip(curriculum.items(), epochs, frozen)]
            ov["data.rl_files"] = [curriculum[n] for n in curriculum]
        elif not cfg.data.rl_files and not cfg.grpo.curriculum:
            ov["data.rl_files"] = [pool]
        plans.append(plan(
            f"r{k}.grpo", k, "grpo",
            {**_pick(d, ["model", "parallel", "grpo", "rollout", "rewards", "iterate.prepare"]),
             "data": _without_files(d["data"]),
             "user_rl_files": list(cfg.data.rl_files)},
            ov, {"model": sft_hf},
            {"save_dir": str(grpo_save), "model": grpo_hf}, [grpo_hf]))
        prev_model = grpo_hf
        plans.append(eval_plan(k, grpo_hf, before_grpo=sft_hf))
    return plans


def stage_config(cfg: JobConfig, plan: StagePlan) -> JobConfig:
    """The job config with the stage's overrides applied, validated for its world size."""
    d = to_dict(cfg)
    for key, value in plan.overrides.items():
        set_path(d, key.split("."), copy.deepcopy(value))
    scfg = from_dict(JobConfig, d)
    validate(scfg)
    if plan.stage in ("sft", "grpo"):
        # Batch divisibility for this trainer's own world size (each stage has its own).
        p, ws = scfg.parallel, plan.nproc * plan.nnodes
        mp = p.tensor_parallel * p.pipeline_parallel * p.context_parallel
        t = getattr(scfg, plan.stage).train
        key = f"iterate.nproc_{plan.stage} x nnodes_{plan.stage}"
        if ws % mp:
            raise ConfigError(f"{plan.sid}: world size {ws} ({key}) is not divisible by "
                              f"tensor x pipeline x context parallel = {mp}")
        if t.global_batch_size % (t.micro_batch_size * (ws // mp)):
            raise ConfigError(
                f"{plan.sid}: {plan.stage}.train.global_batch_size={t.global_batch_size} must be "
                f"a multiple of {plan.stage}.train.micro_batch_size={t.micro_batch_size} x "
                f"data-parallel size {ws // mp} ({key} = {ws})")
    return scfg
