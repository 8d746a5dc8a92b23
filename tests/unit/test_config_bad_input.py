"""Bad config values through the real commands (`ovlt config`, `ovlt iterate --plan`, the SFT
launcher): exit code 2 and one line naming the key (or the file and line), no traceback."""
from __future__ import annotations

import pytest

from ovlt.cli import main as ovlt_main
from ovlt.config import CONFIG_ROOT

SFT = str(CONFIG_ROOT / "sft" / "tiny_cpu.yaml")
ITERATE = str(CONFIG_ROOT / "iterate" / "tiny_cpu.yaml")


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("override,fragment", [
    ("data.max_length=0", "data.max_length=0: must be >= 1"),
    ("data.pack_tokens=-5", "data.pack_tokens=-5: must be >= 0"),
    ("data.num_workers=-1", "data.num_workers=-1: must be >= 0"),
    ("sft.optimizer.lr=-0.001", "sft.optimizer.lr=-0.001: must be >= 0"),
    ("sft.optimizer.lr=.nan", "sft.optimizer.lr: expected a number, got NaN"),
    ("grpo.optimizer.lr=.inf", "grpo.optimizer.lr=inf: must be >= 0 (a finite number)"),
    ("rollout.max_new_tokens=0", "rollout.max_new_tokens=0: must be >= 1"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens=0: must be >= 1"),
    ("sft.train.epochs=-1", "sft.train.epochs=-1.0: must be >= 0"),
    ("data.min_pixels=-3136", "data.min_pixels=-3136: must be >= 1"),
    ("data.max_pixels=-1", "data.max_pixels=-1: must be >= 1"),
    ("data={min_pixels: 100, max_pixels: 100}", "data.max_pixels=100: must be >= 784"),
    ("iterate.nproc_sft=0", "iterate.nproc_sft=0: must be >= 1"),
    ("iterate.rounds=-1", "iterate.rounds=-1: must be >= 1"),
    ("iterate.probe.samples=0", "iterate.probe.samples=0: must be >= 1"),
    ("iterate.prepare.synth_tasks=[colour_sum, pie]",
     "iterate.prepare.synth_tasks: ['pie'] not allowed; allowed values: ['bar_chart', "),
    ("iterate.prepare={curriculum_difficulties: [medium, hard], curriculum_epochs: [1.0]}",
     "iterate.prepare.curriculum_epochs: 1 entries for 2 iterate.prepare.curriculum_difficulties"),
    ("iterate.prepare={curriculum_difficulties: [medium], curriculum_freeze_vision: [true, false]}",
     "iterate.prepare.curriculum_freeze_vision: 2 entries for 1 iterate.prepare.curriculum_diff"),
    ("rollout.top_p=0", "rollout.top_p=0"),
    ("sft.optimizer.min_lr=0.1", "sft.optimizer.min_lr=0.1 exceeds sft.optimizer.lr"),
    ("grpo.train.epochs=0", "grpo.train.epochs=0 with grpo.train.max_steps=0: nothing to train"),
    ("data={a: 1, a: 2}", "found duplicate key 'a'"),
])
def test_bad_value_through_config_command(capsys, override, fragment):
    rc = ovlt_main(["config", "--config", SFT, override])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and fragment in line, line


def test_duplicate_yaml_key_names_file_and_lines(tmp_path, capsys):
    p = tmp_path / "dup.yaml"
    p.write_text("sft:\n  optimizer:\n    lr: 1.0e-5\n    weight_decay: 0.0\n    lr: 1.0e-3\n")
    rc = ovlt_main(["config", "--config", str(p)])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and str(p) in line and "found duplicate key 'lr' (first on line 3)" in line
    assert "line 5" in line


def test_latin1_byte_names_the_file(tmp_path, capsys):
    p = tmp_path / "latin1.yaml"
    p.write_bytes(b"# r\xe9sum\xe9 run\nsft:\n  train: {epochs: 1}\n")
    rc = ovlt_main(["config", "--config", str(p)])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and f"{p}: not UTF-8 text (byte 0xe9 on line 1)" in line


@pytest.mark.parametrize("override,fragment", [
    ("iterate.rounds=-1", "iterate.rounds=-1: must be >= 1"),
    ("iterate.nproc_sft=0", "iterate.nproc_sft=0: must be >= 1"),
])
def test_iterate_plan_refuses(capsys, override, fragment):
    rc = ovlt_main(["iterate", "--config", ITERATE, "--plan", override])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and "ovlt iterate: error:" in line and fragment in line, line


def test_iterate_overrides_on_both_sides_of_the_options(capsys):
    """`--config C a=1 --plan b=2` (overrides before and after an option) applies both."""
    rc = ovlt_main(["iterate", "--config", ITERATE, "iterate.rounds=1", "--plan",
                    "iterate.eval_round0=false"])
    stages = [ln.split()[0] for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert rc == 0 and stages == ["r0.prepare", "r1.data", "r1.sft", "r1.grpo", "r1.eval"]


def test_sft_launcher_config_error_is_one_line(capsys, tmp_path):
    rc = ovlt_main(["sft", "--config", SFT, "data.num_workers=-1",
                    f"sft.train.save_dir={tmp_path / 'run'}"])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and line == "ovlt sft: error: data.num_workers=-1: must be >= 0"
    assert not (tmp_path / "run").exists()
