"""Bad input through `ovlt data check` / `ovlt data synth` (the real `ovlt` entry point, in
process): every case exits non-zero with a message naming the file, record and reason - no
traceback, no silent pass, no overwritten user file."""
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ovlt.cli import main as ovlt


def _png(w=40, h=30, color=(200, 30, 30)):
    b = io.BytesIO()
    Image.new("RGB", (w, h), color).save(b, "PNG")
    return b.getvalue()


def _msgs(*roles):
    text = {"system": "Be brief.", "user": "<image>How many?", "assistant": "<answer>3</answer>"}
    return [{"role": r, "content": text[r]} for r in roles]


def _rec(*roles):
    n_img = sum(r == "user" for r in roles)
    return {"messages": _msgs(*roles), "images": ["ok.png"] * n_img}


def _jsonl(*objs):
    return "".join(json.dumps(o) + "\n" for o in objs)


def _run(argv, capsys):
    rc = ovlt(argv)
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


# name -> (file name, content (str | bytes | callable(path)), expected substrings)
SFT_CASES = {
    "assistant_first": ("a.jsonl", _jsonl(_rec("user", "assistant"), _rec("assistant", "user")),
                        ["record 1: wrong role order: messages[0] is 'assistant'",
                         "1 valid, 1 skipped"]),
    "two_user_turns": ("a.jsonl", _jsonl(_rec("user", "user", "assistant")),
                       ["record 0: wrong role order: messages[0] and messages[1] are both 'user'"]),
    "trailing_user": ("a.jsonl", _jsonl(_rec("user", "assistant", "user")),
                      ["record 0: wrong role order: the last turn, messages[2], is 'user'"]),
    "system_mid": ("a.jsonl", _jsonl(_rec("user", "system", "assistant")),
                   ["record 0: wrong role order: messages[1] is a system turn"]),
    "two_assistants": ("a.jsonl", _jsonl(_rec("system", "user", "assistant", "assistant")),
                       ["messages[2] and messages[3] are both 'assistant'"]),
    "empty_jsonl": ("e.jsonl", "\n\n", ["e.jsonl: no records: the file is empty"]),
    "empty_json_list": ("e.json", "[]", ["e.json: no records: the JSON list is empty"]),
    "nested_200k": ("deep.json", "[" * 200_000 + "]" * 200_000,
                    ["deep.json: invalid JSON: nested too deeply"]),
    "nested_200k_jsonl": ("deep.jsonl", "[" * 200_000 + "]" * 200_000 + "\n",
                          ["deep.jsonl: record 0: invalid JSON: nested too deeply"]),
    "nested_900": ("deep.jsonl", json.dumps({"messages": _msgs("user", "assistant"),
                                             "images": ["ok.png"],
                                             "x": json.loads("[" * 900 + "]" * 900)}) + "\n",
                   ["1 valid, 0 skipped"]),  # deep but parseable: no RecursionError after
    "lone_surrogate": ("s.jsonl", '{"messages": [{"role": "user", "content": "<image>\\ud800"}, '
                       '{"role": "assistant", "content": "x"}], "images": ["ok.png"]}\n',
                       ["s.jsonl: record 0: invalid text: a lone surrogate \\ud800"]),
    "dict_of_records": ("d.json", json.dumps({"r1": _rec("user", "assistant"),
                                              "r2": _rec("user", "assistant")}),
                        ["d.json: wrong shape: top level is an object of 2 records keyed by id "
                         "('r1', 'r2')", "expected a JSON list of records"]),
    "rl_records_as_sft": ("rl.jsonl", _jsonl({"problem": "<image>q", "answer": "3",
                                              "images": ["ok.png"]}),
                          ["rl.jsonl: record 0: looks like an RL record (keys ['answer', "
                           "'images', 'problem']), not SFT", ".parquet"]),
    "no_messages": ("n.jsonl", _jsonl({"prompt": "q", "response": "a"}),
                    ["n.jsonl: record 0: missing 'messages': the record has keys ['prompt', "
                     "'response']", "'role', 'content'"]),
    "messages_str": ("m.jsonl", _jsonl({"messages": "hi"}),
                     ["m.jsonl: record 0: wrong type: 'messages' is str"]),
    "top_level_number": ("t.json", "3", ["t.json: wrong type: top level is int"]),
    "dir_named_json": (
        "x.json", lambda p: p.mkdir(), ["x.json: is a directory"]),
}


@pytest.mark.parametrize("case", list(SFT_CASES))
def test_data_check_sft_bad_input(tmp_path, capsys, case):
    name, content, expect = SFT_CASES[case]
    (tmp_path / "ok.png").write_bytes(_png())
    f = tmp_path / name
    if callable(content):
        content(f)
    elif isinstance(content, bytes):
        f.write_bytes(content)
    else:
        f.write_text(content, encoding="utf-8")
    rc, out = _run(["data", "check", str(f)], capsys)
    assert "Traceback" not in out
    for e in expect:
        assert e in out, (case, out)
    assert rc == (0 if case == "nested_900" else 1 if name != "x.json" else 2), out


def _parquet(path, cols, schema=None):
    pq.write_table(pa.table(cols, schema=schema), path)


RL_CASES = {
    "nan_answer": (lambda p: _parquet(p, {"problem": ["<image>q", "<image>q"],
                                          "answer": [float("nan"), 2.0],
                                          "images": [["ok.png"], ["ok.png"]]}),
                   ["r.parquet: record 0: empty answer: the answer is nan", "1 valid, 1 skipped"]),
    "zero_rows": (lambda p: _parquet(p, {"problem": pa.array([], pa.string()),
                                         "answer": pa.array([], pa.string())}),
                  ["r.parquet: no records: the parquet file has 0 rows"]),
    "corrupt": (lambda p: p.write_bytes(b"PAR1 not really"), ["r.parquet: unreadable parquet"]),
}


@pytest.mark.parametrize("case", list(RL_CASES))
def test_data_check_rl_bad_input(tmp_path, capsys, case):
    make, expect = RL_CASES[case]
    (tmp_path / "ok.png").write_bytes(_png())
    f = tmp_path / "r.parquet"
    make(f)
    rc, out = _run(["data", "check", str(f)], capsys)
    assert rc == 1 and "Traceback" not in out
    for e in expect:
        assert e in out, (case, out)


REGISTRY_CASES = {
    "unknown_key": ("sources:\n  - {files: a.jsonl, wieght: 2}\n", 2,
                    ["reg.yaml: sources[0]: unknown keys ['wieght']"]),
    "bad_yaml": ("sources: [\n", 2, ["reg.yaml: not a readable YAML registry"]),
    "no_sources": ("sources: []\n", 2, ["reg.yaml: 'sources:' is empty"]),
    "missing_file": ("sources:\n  - {files: gone.jsonl}\n", 1,
                     ["gone.jsonl: unreadable: No such file or directory"]),
    "bad_kind": ("sources:\n  - {files: a.jsonl, kind: dpo}\n", 2,
                 ["reg.yaml: sources[0]: kind must be sft or rl, got 'dpo'"]),
}


@pytest.mark.parametrize("case", list(REGISTRY_CASES))
def test_data_check_registry_errors(tmp_path, capsys, case):
    text, want_rc, expect = REGISTRY_CASES[case]
    reg = tmp_path / "reg.yaml"
    reg.write_text(text)
    rc, out = _run(["data", "check", str(reg)], capsys)
    assert rc == want_rc and "Traceback" not in out, out
    for e in expect:
        assert e in out, (case, out)


def test_data_check_valid_multi_turn_passes(tmp_path, capsys):
    (tmp_path / "ok.png").write_bytes(_png())
    f = tmp_path / "ok.jsonl"
    f.write_text(_jsonl(_rec("system", "user", "assistant", "user", "assistant"),
                        {**_rec("user", "assistant"), "system": "Be brief."},
                        {"conversations": [{"from": "human", "value": "<image>q"},
                                           {"from": "gpt", "value": "a"}], "images": ["ok.png"]}))
    rc, out = _run(["data", "check", str(f)], capsys)
    assert rc == 0 and "3 valid, 0 skipped" in out, out


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    """A 16-bit grayscale PNG decodes like its 8-bit version (value >> 8), not clipped to 255."""
    from ovlt.data.image_loader import load_image_pil
    a16 = (np.arange(56 * 56, dtype=np.uint32).reshape(56, 56) * 20).astype(np.uint16)
    p16 = tmp_path / "g16.png"
    Image.fromarray(a16).save(p16)
    assert Image.open(p16).mode.startswith("I")
    p8 = tmp_path / "g8.png"
    Image.fromarray((a16 >> 8).astype(np.uint8)).convert("RGB").save(p8)
    pv16, g16 = load_image_pil(str(p16), 3136, 12544)
    pv8, g8 = load_image_pil(str(p8), 3136, 12544)
    assert g16 == g8
    torch.testing.assert_close(pv16, pv8, rtol=0, atol=0)
    assert pv16.std() > 0.3  # a gradient, not a white sheet


# ----------------------------------------------------------------------------- synth --out
def test_synth_never_overwrites_user_files(tmp_path, capsys):
    out = tmp_path / "d"
    out.mkdir()
    mine = out / "sft.jsonl"
    mine.write_text("my own data\n")
    rc, msg = _run(["data", "synth", "--out", str(out), "--n", "2"], capsys)
    assert rc == 2 and f"{mine}" in msg and "did not write" in msg, msg
    rc, msg = _run(["data", "synth", "--out", str(out), "--n", "2", "--force"], capsys)
    assert rc == 2 and "did not write" in msg, msg
    assert mine.read_text() == "my own data\n"
    # a user's image in images/ is protected the same way
    other = tmp_path / "o"
    (other / "images").mkdir(parents=True)
    (other / "images" / "cat.png").write_bytes(_png())
    rc, msg = _run(["data", "synth", "--out", str(other), "--n", "2", "--force"], capsys)
    assert rc == 2 and "cat.png" in msg, msg


def test_synth_rerun_needs_force_and_replaces_only_its_own(tmp_path, capsys):
    out = tmp_path / "d"
    assert _run(["data", "synth", "--out", str(out), "--n", "3"], capsys)[0] == 0
    first = (out / "sft.jsonl").read_text()
    assert len(first.splitlines()) == 3
    rc, msg = _run(["data", "synth", "--out", str(out), "--n", "2", "--seed", "1"], capsys)
    assert rc == 2 and "--force" in msg and (out / "sft.jsonl").read_text() == first, msg
    rc, msg = _run(["data", "synth", "--out", str(out), "--n", "2", "--seed", "1", "--force"],
                   capsys)
    assert rc == 0, msg
    assert len((out / "sft.jsonl").read_text().splitlines()) == 2
    assert len(list((out / "images").iterdir())) == 2  # the earlier run's 3 images replaced


@pytest.mark.parametrize("n", ["0", "-3"])
def test_synth_n_must_be_positive(tmp_path, capsys, n):
    rc, msg = _run(["data", "synth", "--out", str(tmp_path / "d"), "--n", n], capsys)
    assert rc == 2 and "--n must be a positive number" in msg and "Traceback" not in msg
    assert not (tmp_path / "d").exists()


# ----------------------------------------------------------------------------- mcore meta.json
@pytest.mark.parametrize("meta,expect", [
    ("{not json", "meta.json: not valid JSON"),
    ("[1, 2]", "meta.json: expected a JSON object, got list"),
    (b'{"format": "\xff"}', "meta.json: not valid JSON"),
    ('{"format": "ovlt-mcore-v1", "tp": "two", "pp": 1}',
     "meta.json: 'tp' and 'pp' must be whole numbers, got 'two' and 1"),
])
def test_convert_mcore2hf_invalid_meta_json_names_the_file(tmp_path, capsys, meta, expect):
    from ovlt.config import CONFIG_ROOT
    d = tmp_path / "mc"
    d.mkdir()
    (d / "meta.json").write_bytes(meta if isinstance(meta, bytes) else meta.encode())
    (d / "config.yaml").write_text((CONFIG_ROOT / "model" / "tiny.yaml").read_text())
    rc, out = _run(["convert", "mcore2hf", "--mcore", str(d), "--out", str(tmp_path / "hf")],
                   capsys)
    assert rc != 0 and "Traceback" not in out, out
    assert f"{d / 'meta.json'}" in out and expect in out, out
