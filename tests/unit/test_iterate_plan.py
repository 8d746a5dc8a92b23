"""The plan (stage order, wiring, per-stage configs) and the manifest checks, in process."""
from __future__ import annotations

import pytest

from ovlt.config import CONFIG_ROOT, ConfigError, load_config
from ovlt.iterate.loop import IterateError, check_manifest
from ovlt.iterate.manifest import Manifest, config_hash, diff_keys
from ovlt.iterate.runner import LocalRunner, StageLaunch
from ovlt.iterate.stages import build_plan, parse_stage_id, stage_config


def _cfg(*ov):
    return load_config(CONFIG_ROOT / "iterate" / "tiny_cpu.yaml", list(ov))


def test_plan_order_and_wiring(tmp_path):
    cfg = _cfg("iterate.rounds=3")
    plans = build_plan(cfg, tmp_path)
    assert [p.sid for p in plans] == ["r0.prepare", "r0.eval"] + [
        f"r{k}.{s}" for k in (1, 2, 3) for s in ("data", "sft", "grpo", "eval")]
    by = {p.sid: p for p in plans}
    base = str(tmp_path.resolve() / "r0.prepare" / "base_model")
    for k in (1, 2, 3):
        # SFT always from the base model, GRPO from this round's SFT, data from the last GRPO
        assert by[f"r{k}.sft"].overrides["model.hf_path"] == base
        assert by[f"r{k}.grpo"].overrides["model.hf_path"] == by[f"r{k}.sft"].outputs["model"]
        assert by[f"r{k}.eval"].inputs["model"] == by[f"r{k}.grpo"].outputs["model"]
        prev = base if k == 1 else by[f"r{k - 1}.grpo"].outputs["model"]
        assert by[f"r{k}.data"].inputs["model"] == prev
        assert by[f"r{k}.sft"].overrides["data.sft_files"] == [by[f"r{k}.data"].outputs["sft"]]
    assert by["r0.eval"].inputs["model"] == base
    # the curriculum: medium then hard; the demo keeps its tiny vision tower frozen in both
    # stages, the recipe's default (no curriculum_freeze_vision) trains it from the second on
    cur = by["r1.grpo"].overrides["grpo.curriculum"]
    assert [(c["name"], c["freeze_vision"]) for c in cur] == [("medium", True), ("hard", True)]
    recipe = {p.sid: p for p in build_plan(_cfg("iterate.prepare.curriculum_freeze_vision=[]"),
                                           tmp_path)}
    assert [c["freeze_vision"] for c in recipe["r1.grpo"].overrides["grpo.curriculum"]] == \
        [True, False]
    scfg = stage_config(cfg, by["r2.sft"])
    assert scfg.sft.train.save_dir == str(tmp_path.resolve() / "r2.sft" / "ckpt")
    assert scfg.model.hf_path == base


def test_slices_are_stage_specific(tmp_path):
    a = {p.sid: p for p in build_plan(_cfg(), tmp_path)}
    b = {p.sid: p for p in build_plan(_cfg("grpo.optimizer.lr=1e-3"), tmp_path)}
    changed = sorted(s for s in a if config_hash(a[s].slice) != config_hash(b[s].slice))
    assert changed == ["r1.grpo", "r2.grpo"]
    c = {p.sid: p for p in build_plan(_cfg("iterate.teacher.samples=8"), tmp_path)}
    assert sorted(s for s in a if config_hash(a[s].slice) != config_hash(c[s].slice)) == ["r1.data"]
    d = {p.sid: p for p in build_plan(_cfg("iterate.nproc_sft=2"), tmp_path)}
    assert sorted(s for s in a if config_hash(a[s].slice) != config_hash(d[s].slice)) == \
        ["r1.sft", "r2.sft"]
    assert diff_keys(a["r1.sft"].slice, d["r1.sft"].slice) == ["resources.nproc"]


def test_check_manifest_refuses_and_force_from(tmp_path):
    plans = build_plan(_cfg(), tmp_path)
    man = Manifest(tmp_path / "m.json")
    for p in plans[:4]:
        man.stages[p.sid] = {"status": "done", "config_hash": config_hash(p.slice),
                             "config": p.slice}
    assert check_manifest(man, plans, None) == []
    plans2 = build_plan(_cfg("sft.optimizer.lr=2e-2"), tmp_path)
    with pytest.raises(IterateError, match=r"r1\.sft \(changed: sft\.optimizer\.lr\)"):
        check_manifest(man, plans2, None)
    with pytest.raises(IterateError, match="r1.sft"):
        check_manifest(man, plans2, "r1.grpo")
    assert check_manifest(man, plans2, "r1.sft") == [p.sid for p in plans2[3:]]
    # A field ovlt added later, at its default value, is not a change.
    del man.stages["r1.sft"]["config"]["sft"]["optimizer"]["adam_eps"]
    man.stages["r1.sft"]["config_hash"] = "stale"
    assert check_manifest(man, plans, None) == []


def test_parse_stage_id():
    assert parse_stage_id("r2.sft", 3) == "r2.sft"
    assert parse_stage_id("2:grpo", 3) == "r2.grpo"
    assert parse_stage_id("data", 3) == "r1.data"
    assert parse_stage_id("prepare", 3) == "r0.prepare"
    with pytest.raises(ValueError, match="not one of"):
        parse_stage_id("r1.train", 3)
    with pytest.raises(ValueError, match="round 4"):
        parse_stage_id("r4.sft", 3)


def test_stage_batch_divisibility_names_the_stage(tmp_path):
    cfg = _cfg("iterate.nproc_sft=3")
    plans = {p.sid: p for p in build_plan(cfg, tmp_path)}
    with pytest.raises(ConfigError, match=r"r1\.sft: sft\.train\.global_batch_size=8 .* "
                                          r"data-parallel size 3"):
        stage_config(cfg, plans["r1.sft"])
    stage_config(cfg, plans["r1.grpo"])  # GRPO's world size is still 1


def test_local_runner_command():
    cmd = LocalRunner().command(StageLaunch("r1.sft", "launchers/sft.py", ["--config", "c.yaml"],
                                            nproc=4))
    i = cmd.index("torch.distributed.run")
    assert cmd[i + 1:i + 5] == ["--standalone", "--nnodes=1", "--nproc-per-node=4",
                                "--max-restarts=0"]
    assert cmd[i + 5].endswith("/launchers/sft.py") and cmd[-2:] == ["--config", "c.yaml"]
    cmd = LocalRunner().command(StageLaunch("r1.data", "-m ovlt.iterate.stage_data", []))
    assert cmd[-2:] == ["-m", "ovlt.iterate.stage_data"]
    with pytest.raises(ValueError, match="SLURM"):
        LocalRunner().command(StageLaunch("r1.grpo", "x.py", [], nnodes=2))
