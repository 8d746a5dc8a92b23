"""`ovlt convert` on bad input: it never deletes what it did not write (the input, a sibling
of the input, a user's `<out>.partial` or foreign `--out`), and every unusable input is one line
naming the file and the reason (exit code 1), never a traceback."""
from __future__ import annotations

import json
import shutil

import pytest

from ovlt.cli import main as ovlt_main
from ovlt.models.qwen2_5_vl.checkpoint_io import INDEX_NAME


def _convert(capsys, *argv):
    rc = ovlt_main(["convert", *argv])
    err = capsys.readouterr().err
    return rc, err


def _listing(d):
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture()
def src(tiny_hf_dir, tmp_path):
    d = tmp_path / "coll" / "tiny"
    shutil.copytree(tiny_hf_dir, d)
    return d


def test_output_overlapping_the_input_is_refused(src, capsys):
    before = _listing(src)
    rc, err = _convert(capsys, "hf2mcore", "--hf", str(src), "--out", str(src), "--force")
    assert rc == 1 and "overlaps --hf" in _one_line(err)
    assert _listing(src) == before  # the source weights are all there
    sibling = src.parent / "other_model"
    sibling.mkdir()
    (sibling / "weights.safetensors").write_text("user data")
    rc, err = _convert(capsys, "hf2mcore", "--hf", str(src), "--out", str(src.parent), "--force")
    assert rc == 1 and "overlaps --hf" in _one_line(err)
    assert (sibling / "weights.safetensors").read_text() == "user data" and _listing(src) == before
    # mcore2hf: an --out inside the mcore input
    m = src.parent.parent / "m"
    assert ovlt_main(["convert", "hf2mcore", "--hf", str(src), "--out", str(m)]) == 0
    rc, err = _convert(capsys, "mcore2hf", "--mcore", str(m), "--out", str(m / "hf"), "--force")
    assert rc == 1 and "overlaps --mcore" in _one_line(err)
    assert (m / "hf" / "config.json").is_file()


def test_force_replaces_only_its_own_output(src, tmp_path, capsys):
    foreign = tmp_path / "mine"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "sub" / "notes.txt").write_text("keep")
    rc, err = _convert(capsys, "hf2mcore", "--hf", str(src), "--out", str(foreign), "--force")
    assert rc == 1 and f"--out {foreign} holds files this command did not write" in _one_line(err)
    assert (foreign / "sub" / "notes.txt").read_text() == "keep"
    out = tmp_path / "m"
    assert ovlt_main(["convert", "hf2mcore", "--hf", str(src), "--out", str(out)]) == 0
    rc, err = _convert(capsys, "hf2mcore", "--hf", str(src), "--out", str(out))
    assert rc == 1 and "--force" in _one_line(err)
    assert ovlt_main(["convert", "hf2mcore", "--hf", str(src), "--out", str(out), "--tp", "2",
                      "--force"]) == 0  # an earlier hf2mcore output: replaced
    assert json.loads((out / "meta.json").read_text())["tp"] == 2
    assert (out / "mp_rank_01_000").is_dir()
    # an HF export written by mcore2hf is replaced by the next mcore2hf --force
    hf = tmp_path / "hf"
    assert ovlt_main(["convert", "mcore2hf", "--mcore", str(out), "--out", str(hf)]) == 0
    assert ovlt_main(["convert", "mcore2hf", "--mcore", str(out), "--out", str(hf), "--force"]) == 0
    assert (hf / "config.json").is_file()


def test_user_partial_folder_is_never_deleted(src, tmp_path, capsys):
    out = tmp_path / "out"
    user = tmp_path / "out.partial"
    user.mkdir()
    (user / "draft.txt").write_text("mine")
    rc, err = _convert(capsys, "hf2mcore", "--hf", str(src), "--out", str(out))
    assert rc == 1 and f"{user} exists and was not left by an interrupted ovlt run" in _one_line(err)
    assert (user / "draft.txt").read_text() == "mine" and not out.exists()
    # a partial left by an interrupted conversion (it carries ovlt's marker) is cleaned up
    shutil.rmtree(user)
    from ovlt.utils.outdir import stage
    leftover = stage(out, "mcore_dir", force=False)
    (leftover / "mp_rank_00_000").mkdir()
    assert ovlt_main(["convert", "hf2mcore", "--hf", str(src), "--out", str(out)]) == 0
    assert not user.exists() and (out / "meta.json").is_file()


def _shard(d):
    return d / json.loads((d / INDEX_NAME).read_text())["weight_map"]["model.embed_tokens.weight"]


@pytest.mark.parametrize("case", ["truncated", "not_safetensors", "index_list", "index_bad_json",
                                  "config_bad_json", "config_latin1", "bert", "llama",
                                  "config_missing_field"])
def test_unusable_input_is_one_line_naming_the_file(src, tmp_path, capsys, case):
    named = src / "config.json"
    cfg = json.loads(named.read_text())
    if case == "truncated":
        named = _shard(src)
        named.write_bytes(named.read_bytes()[:5000])
        why = "not a readable safetensors file"
    elif case == "not_safetensors":
        named = _shard(src)
        named.write_text("<html>rate limited</html>")
        why = "not a readable safetensors file"
    elif case == "index_list":
        named = src / INDEX_NAME
        named.write_text("[]")
        why = "not a safetensors index"
    elif case == "index_bad_json":
        named = src / INDEX_NAME
        named.write_text('{"weight_map": {')
        why = "not valid JSON"
    elif case == "config_bad_json":
        named.write_text('{"model_type": "qwen2_5_vl",')
        why = "not valid JSON"
    elif case == "config_latin1":
        named.write_bytes(b'{"model_type": "qwen2_5_vl", "_name_or_path": "caf\xe9"}')
        why = "not UTF-8"
    elif case in ("bert", "llama"):
        arch = {"bert": ("bert", "BertModel"), "llama": ("llama", "LlamaForCausalLM")}[case]
        named.write_text(json.dumps({"model_type": arch[0], "architectures": [arch[1]],
                                     "hidden_size": 64, "vocab_size": 1000}))
        why = f"model_type '{arch[0]}' ({arch[1]}) is not Qwen2.5-VL"
    else:
        del cfg["text_config"]["vocab_size"]
        cfg.pop("vocab_size", None)
        named.write_text(json.dumps(cfg))
        why = "missing field 'vocab_size'"
    before = _listing(src)
    rc, err = _convert(capsys, "hf2mcore", "--hf", str(src), "--out", str(tmp_path / "o"))
    line = _one_line(err)
    assert rc == 1 and str(named) in line and why in line, line
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    assert _listing(src) == before
