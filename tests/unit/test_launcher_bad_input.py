"""Bad inputs the trainer launchers catch before any process group or model exists: one line
naming the key and the file, exit code 2, nothing written. (Errors found later, under
torchrun, are tests/procs/test_launcher_errors_torchrun.py.)"""
from __future__ import annotations

import json

import pytest

from ovlt.cli import main as ovlt_main
from ovlt.config import CONFIG_ROOT

SFT = str(CONFIG_ROOT / "sft" / "tiny_cpu.yaml")
GRPO = str(CONFIG_ROOT / "grpo" / "tiny_cpu.yaml")


def _run(capsys, trainer, *overrides):
    cfg = SFT if trainer == "sft" else GRPO
    rc = ovlt_main([trainer, "--config", cfg, *overrides])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return rc, lines[0]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from ovlt.data.synth import generate
    d = tmp_path_factory.mktemp("synth")
    generate(d, n=4, seed=0)
    return d


def test_missing_and_wrong_inputs(synth, tmp_path, capsys, tiny_hf_dir):
    out = tmp_path / "run"
    sft_ok = f"data.sft_files=[{synth / 'sft.jsonl'}]"
    save = f"sft.train.save_dir={out}"
    rc, line = _run(capsys, "sft", sft_ok, save, f"model.hf_path={tmp_path / 'nope'}")
    assert rc == 2 and line.startswith(
        f"ovlt sft: error: model.hf_path: {tmp_path / 'nope'} does not exist (a Hugging Face "
        "Qwen2.5-VL folder: a downloaded one, or the one an SFT run exports to")
    # a missing data file: the line names the command that makes it, in the file's folder
    rc, line = _run(capsys, "sft", f"data.sft_files=[{tmp_path / 'd' / 'sft.jsonl'}]", save)
    assert rc == 2 and line == (
        f"ovlt sft: error: data.sft_files[0]: {tmp_path / 'd' / 'sft.jsonl'} does not exist "
        f"(`ovlt data synth --out {tmp_path / 'd'} --n 64` writes synthetic "
        f"{tmp_path / 'd' / 'sft.jsonl'} and {tmp_path / 'd' / 'rl.parquet'}; `ovlt data check "
        "FILE` validates your own)")
    rc, line = _run(capsys, "grpo", f"data.rl_files=[{tmp_path / 'gone.parquet'}]",
                    f"grpo.train.save_dir={out}")
    assert rc == 2 and f"data.rl_files[0]: {tmp_path / 'gone.parquet'} does not exist " \
        "(`ovlt data synth --out DIR --n 64` writes synthetic DIR/sft.jsonl" in line
    # no data at all (the tiny configs as they ship): the key, the example, the command
    for trainer, key, example in (("sft", "data.sft_files", "runs/synth/sft.jsonl"),
                                  ("grpo", "data.rl_files", "runs/synth/rl.parquet")):
        rc, line = _run(capsys, trainer, f"{trainer}.train.save_dir={out}")
        assert rc == 2 and line.startswith(
            f"ovlt {trainer}: error: {key} is empty: this job needs"), line
        assert f"{key}=[{example}] or data.registry=REGISTRY.yaml; `ovlt data synth --out " \
            "runs/synth --n 64` writes" in line, line
    # a registry is checked like the files: its YAML, then each of its sources' files
    reg = tmp_path / "reg.yaml"
    reg.write_text("sources: [\n")
    rc, line = _run(capsys, "sft", f"data.registry={reg}", save)
    assert rc == 2 and line.startswith(f"ovlt sft: error: data.registry: {reg}: not a readable "
                                       "YAML registry"), line
    reg.write_text("sources:\n  - {name: mine, kind: sft, files: [d/sft.jsonl]}\n")
    rc, line = _run(capsys, "sft", f"data.registry={reg}", save)
    assert rc == 2 and line.startswith(
        f"ovlt sft: error: data.registry {reg}: source 'mine': {tmp_path / 'd' / 'sft.jsonl'} "
        f"does not exist (`ovlt data synth --out {tmp_path / 'd'} --n 64`"), line
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rc, line = _run(capsys, "sft", f"data.sft_files=[{empty}]", save)
    assert rc == 2 and f"data.sft_files[0]: {empty} is empty" in line
    rc, line = _run(capsys, "grpo", f"data.rl_files=[{synth / 'sft.jsonl'}]",
                    f"grpo.train.save_dir={out}")
    assert rc == 2 and f"data.rl_files[0]: {synth / 'sft.jsonl'} is not a .parquet file" in line
    # a Llama (or any non-Qwen2.5-VL) config.json in model.hf_path is refused, naming both
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps(
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000}))
    rc, line = _run(capsys, "sft", sft_ok, save, f"model.hf_path={llama}")
    assert rc == 2 and f"{llama / 'config.json'}: model_type 'llama' (LlamaForCausalLM) is not " \
        "Qwen2.5-VL" in line
    assert not out.exists()


def test_export_would_replace_input_or_foreign_folder(synth, tmp_path, capsys, tiny_hf_dir):
    import shutil
    out = tmp_path / "run"
    base = out / "final_hf"
    shutil.copytree(tiny_hf_dir, base)
    rc, line = _run(capsys, "sft", f"data.sft_files=[{synth / 'sft.jsonl'}]",
                    f"sft.train.save_dir={out}", f"model.hf_path={base}")
    assert rc == 2 and f"model.hf_path {base} overlaps {base}" in line
    shutil.rmtree(base)
    (base / "notes").mkdir(parents=True)
    rc, line = _run(capsys, "sft", f"data.sft_files=[{synth / 'sft.jsonl'}]",
                    f"sft.train.save_dir={out}")
    assert rc == 2 and f"{base} holds files ovlt did not write" in line
    assert (base / "notes").is_dir()


def test_eval_run_on_pickle_only_model_names_it(tmp_path, capsys, tiny_hf_dir):
    """`ovlt eval run` on a directory holding only `pytorch_model.bin`: refused before any
    model is built or any pickle is read."""
    import shutil
    from tests.procs.test_eval_run import write_mathvista
    model = tmp_path / "binonly"
    model.mkdir()
    shutil.copy(tiny_hf_dir / "config.json", model / "config.json")
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    bench = write_mathvista(tmp_path / "mv")
    rc = ovlt_main(["eval", "run", "--benchmark", "mathvista", "--data",
                    str(bench / "testmini.json"), "--out", str(tmp_path / "ev"), "--model",
                    str(model), "--engine", "builtin", "--limit", "1"])
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err
    line = [ln for ln in err.splitlines() if "error" in ln][-1]
    assert f"{model}: only pickle (*.bin / *.pt) weights found" in line


def test_export_never_replaces_a_folder_it_did_not_write(tmp_path):
    """The HF export at the end of training: an earlier export is replaced, a user's folder
    (or a user's `<out>.partial`) is left alone and the export goes next to it."""
    from ovlt.engine.hf_io import free_export_dir
    from ovlt.utils.outdir import commit, stage
    out = tmp_path / "final_hf"
    assert free_export_dir(out) == out  # absent
    done = stage(out, "hf_model", force=True)
    commit(done, out)
    assert free_export_dir(out) == out  # an earlier export: replaced
    (tmp_path / "mine" / "sub").mkdir(parents=True)
    assert free_export_dir(tmp_path / "mine") == tmp_path / "mine-1"
    (tmp_path / "x.partial").mkdir()
    (tmp_path / "x.partial" / "draft").write_text("keep")
    assert free_export_dir(tmp_path / "x") == tmp_path / "x-1"
    assert (tmp_path / "x.partial" / "draft").read_text() == "keep"


def test_process_group_that_cannot_start_is_one_line(capsys, monkeypatch):
    """A distributed set-up failure (here: the launcher's environment) is the user's to fix:
    one line naming the rank and the cause, exit code 1, the traceback only in the log files."""
    from ovlt.distributed import DistributedError, report_error
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    try:
        raise DistributedError("[rank 0/2] distributed init failed (torchrun, backend=gloo, "
                               "master=node1:29500): The server socket has failed to listen")
    except DistributedError as e:
        code = report_error(e, "ovlt sft")
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert err.strip() == ("ovlt sft: error: [rank 0/2] distributed init failed (torchrun, "
                           "backend=gloo, master=node1:29500): The server socket has failed to "
                           "listen")
