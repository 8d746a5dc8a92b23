"""Bad input through `ovlt eval score / report / run` (the real entry points, in process): each
case exits 2 with one message naming the file, line/record and field - no traceback, no score
over nothing, no other model's predictions scored."""
import io
import json

import pytest
from PIL import Image

from ovlt.cli import main as ovlt
from ovlt.eval.cli import main as eval_main
from ovlt.rollout.base import Completion, GenerationRequest, RolloutEngine

# pid -> (answer, response); by hand: 1 right, 2 wrong (8 != 7), 3 right
ITEMS = {"1": ("4", "<answer>4</answer>"), "2": ("7", "The answer is 8."),
         "3": ("10", "\\boxed{10}")}


def _record(pid, answer):
    return {"pid": pid, "question": f"q{pid}", "image": f"images/{pid}.png", "choices": None,
            "unit": None, "precision": None, "answer": answer, "question_type": "free_form",
            "answer_type": "integer", "metadata": {"task": "math word problem",
                                                   "skills": ["arithmetic reasoning"]},
            "query": f"Question: q{pid}"}


def _data():
    return {pid: _record(pid, a) for pid, (a, _) in ITEMS.items()}


def _preds():
    return [{"pid": pid, "response": r} for pid, (_, r) in ITEMS.items()]


def _write(tmp_path, data=None, preds=None, data_name="testmini.json"):
    """Benchmark data (image files deliberately absent: scoring must not need them) and a
    predictions file; either may be given as raw bytes/str."""
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    data = _data() if data is None else data
    raw = data if isinstance(data, (bytes, str)) else json.dumps(data)
    (d / data_name).write_bytes(raw.encode() if isinstance(raw, str) else raw)
    preds = _preds() if preds is None else preds
    p = tmp_path / "preds.jsonl"
    raw = preds if isinstance(preds, (bytes, str)) else "".join(json.dumps(x) + "\n" for x in preds)
    p.write_bytes(raw.encode() if isinstance(raw, str) else raw)
    return d / data_name, p


def _score(tmp_path, data_file, preds, *extra):
    return ["eval", "score", "--benchmark", "mathvista", "--data", str(data_file),
            "--predictions", str(preds), "--out", str(tmp_path / "out"), *extra]


def _run_ovlt(argv, capsys):
    rc = ovlt(argv)
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def test_score_does_not_need_the_images(tmp_path, capsys):
    data, preds = _write(tmp_path)
    assert not (data.parent / "images").exists()
    rc, out = _run_ovlt(_score(tmp_path, data, preds), capsys)
    assert rc == 0, out
    assert "accuracy 66.67% (2/3)" in out


def _with(pid, **fields):
    d = _data()
    d[pid].update(fields)
    return d


# name -> (data, predictions, data file name, expected message parts); data/preds None = valid
SCORE_CASES = {
    "answer_dict": (_with("2", answer={"value": 7}), None, "testmini.json",
                    ["testmini.json: record 1 (id=2): field 'answer' is a dict"]),
    "answer_list": (_with("1", answer=[4]), None, "testmini.json",
                    ["record 0 (id=1): field 'answer' is a list"]),
    "choices_number": (_with("1", question_type="multi_choice", choices=5), None,
                       "testmini.json", ["record 0 (id=1): field 'choices' is an int (5)"]),
    "choices_objects": (_with("3", question_type="multi_choice", choices=[{"a": 1}, "b"]), None,
                        "testmini.json", ["record 2 (id=3): field 'choices': option 0 is a dict"]),
    "metadata_bad_json": (_with("2", metadata="{task: oops"), None, "testmini.json",
                          ["record 1 (id=2): field 'metadata' is not valid JSON"]),
    "metadata_list": (_with("2", metadata=["a"]), None, "testmini.json",
                      ["record 1 (id=2): field 'metadata' is a list"]),
    "skills_str": (_with("1", metadata={"skills": "arith"}), None, "testmini.json",
                   ["record 0 (id=1): field 'metadata.skills' is 'arith'"]),
    "question_type_unknown": (_with("1", question_type="essay"), None, "testmini.json",
                              ["record 0 (id=1): field 'question_type' is 'essay'"]),
    "answer_type_unknown": (_with("1", answer_type="complex"), None, "testmini.json",
                            ["record 0 (id=1): field 'answer_type' is 'complex'"]),
    "data_not_utf8": (b'{"1": {"pid": "1", "question": "caf\xe9"}}', None, "testmini.json",
                      ["testmini.json: line 1: not UTF-8 text (byte 0xe9"]),
    "data_bad_json": ('{"1": {"pid": ', None, "testmini.json",
                      ["testmini.json: not valid JSON: Expecting value at column 15"]),
    "data_jsonl_bad_line": ("\n".join(json.dumps(r) for r in _data().values()).replace(
        '"pid": "2"', '"pid": 2,,'), None, "testmini.jsonl",
        ["testmini.jsonl: line 2: not valid JSON"]),
    "data_dict_of_non_records": ({"1": 5}, None, "testmini.json",
                                 ["testmini.json: key '1': expected a record (object), got int"]),
    "data_empty": ({}, None, "testmini.json", ["testmini.json: no mathvista records"]),
    "data_corrupt_parquet": (b"PAR1 this is not parquet PAR1", None, "testmini.parquet",
                             ["testmini.parquet: unreadable parquet"]),
    "preds_bare_number": (None, '{"pid": "1", "response": "4"}\n5\n', "testmini.json",
                          ["preds.jsonl: line 2: a prediction is a JSON object", "got int"]),
    "preds_bad_json_mid": (None, '{"pid": "1", "response": "4"}\n{"pid": \n'
                           '{"pid": "3", "response": "10"}\n', "testmini.json",
                           ["preds.jsonl: line 2: not valid JSON"]),
    "preds_corrupt_last_line": (None, '{"pid": "1", "response": "<answer>4</answer>"}\n'
                                '{"pid": "3", "response": "\\\\boxed{10}"}\n{"pid": "2", "resp\n',
                                "testmini.json", ["preds.jsonl: line 3: not valid JSON"]),
    "preds_response_dict": (None, [{"pid": "1", "response": {"text": "4"}}], "testmini.json",
                            ["preds.jsonl: line 1 (id=1): field 'response' is a dict"]),
    "preds_response_list": (None, [{"pid": "1", "response": ["4"]}], "testmini.json",
                            ["preds.jsonl: line 1 (id=1): field 'response' is a list"]),
    "preds_id_object": (None, [{"pid": {"x": 1}, "response": "4"}], "testmini.json",
                        ["preds.jsonl: line 1: field 'pid' is a dict"]),
    "preds_not_utf8": (None, b'{"pid": "1", "response": "\xff"}\n', "testmini.json",
                       ["preds.jsonl: line 1: not UTF-8 text"]),
    "preds_empty": (None, "", "testmini.json",
                    ["no prediction matches an item of the mathvista data (0 predictions, "
                     "3 items"]),
    "preds_other_ids": (None, [{"pid": "900", "response": "4"}], "testmini.json",
                        ["no prediction matches", "prediction ids e.g. ['900']"]),
}


@pytest.mark.parametrize("case", list(SCORE_CASES))
def test_eval_score_bad_input(tmp_path, capsys, case):
    data, preds, name, expect = SCORE_CASES[case]
    data_file, pred_file = _write(tmp_path, data, preds, name)
    rc, out = _run_ovlt(_score(tmp_path, data_file, pred_file), capsys)
    assert rc == 2 and "Traceback" not in out, (case, rc, out)
    assert out.startswith("ovlt eval score: "), out
    for e in expect:
        assert e in out, (case, out)
    assert not (tmp_path / "out" / "scores.json").exists()


@pytest.mark.parametrize("limit", ["-1", "x"])
def test_eval_score_bad_limit(tmp_path, capsys, limit):
    data, preds = _write(tmp_path)
    with pytest.raises(SystemExit) as e:
        ovlt(_score(tmp_path, data, preds, "--limit", limit))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --limit" in err and limit in err


def test_eval_score_predictions_is_a_directory(tmp_path, capsys):
    data, _ = _write(tmp_path)
    rc, out = _run_ovlt(_score(tmp_path, data, tmp_path), capsys)
    assert rc == 2 and f"{tmp_path}: is a directory" in out, out


# ----------------------------------------------------------------------------- eval report
def _scores(**over):
    s = {"benchmark": "mathvista", "n": 3, "correct": 2, "accuracy": 66.67,
         "by": {"task": {"math word problem": {"n": 3, "correct": 2, "accuracy": 66.67}}}}
    s.update(over)
    return json.dumps(s)


REPORT_CASES = {
    "accuracy_text": (_scores(accuracy="high"), ["'accuracy' is 'high', expected a percentage"]),
    "accuracy_over_100": (_scores(accuracy=250.0), ["'accuracy' is 250.0"]),
    "n_text": (_scores(n="3"), ["'n' is '3', expected a count"]),
    "bad_json": ('{"benchmark": "mathvista", ', ["scores.json: not valid JSON"]),
    "not_utf8": (b'{"benchmark": "math\xe9"}', ["scores.json: line 1: not UTF-8 text"]),
    "a_list": ("[1, 2]", ["scores.json: not an ovlt scores.json"]),
    "by_group_bad": (_scores(by={"task": {"x": {"n": 1, "accuracy": "?"}}}),
                     ["scores.json: by.task.x is"]),
}


@pytest.mark.parametrize("case", list(REPORT_CASES))
def test_eval_report_bad_scores(tmp_path, capsys, case):
    content, expect = REPORT_CASES[case]
    f = tmp_path / "s" / "scores.json"
    f.parent.mkdir()
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    rc, out = _run_ovlt(["eval", "report", "--scores", str(tmp_path / "s"), "--out",
                         str(tmp_path / "r")], capsys)
    assert rc == 2 and "Traceback" not in out, out
    assert out.startswith(f"ovlt eval report: {f}: "), out
    for e in expect:
        assert e in out, (case, out)


# ----------------------------------------------------------------------------- eval run --out
class Engine(RolloutEngine):
    def __init__(self):
        self.calls = []

    def generate(self, requests, params):
        self.calls.append([r.request_id for r in requests])
        out = []
        for r in requests:
            text = ITEMS[r.request_id][1]
            out.append([Completion(r.request_id, [1], [0.0], text, "stop")])
        return out

    def update_weights(self, named_tensors):
        pass


def _builder(item):
    return GenerationRequest(prompt_ids=[1, 2], prompt_text=item.prompt, request_id=item.id)


def _png():
    b = io.BytesIO()
    Image.new("RGB", (8, 6)).save(b, "PNG")
    return b.getvalue()


def _eval_run(tmp_path, model, out, engine, *extra):
    return eval_main(["run", "--benchmark", "mathvista", "--data", str(tmp_path / "data"),
                      "--model", str(model), "--out", str(out), "--no-progress", *extra],
                     engine=engine, request_builder=_builder)


def test_eval_run_refuses_an_out_with_other_predictions(tmp_path, capsys):
    _write(tmp_path)
    (tmp_path / "data" / "images").mkdir()
    for pid in ITEMS:
        (tmp_path / "data" / "images" / f"{pid}.png").write_bytes(_png())
    model_a, model_b = tmp_path / "model_a", tmp_path / "model_b"
    for m, fill in ((model_a, b"\x01"), (model_b, b"\x02")):
        m.mkdir()
        (m / "config.json").write_text("{}")
        (m / "model.safetensors").write_bytes(fill * 100_000)
    out = tmp_path / "out"
    eng = Engine()
    assert _eval_run(tmp_path, model_a, out, eng, "--limit", "2") == 0
    preds = (out / "predictions.jsonl").read_text()
    capsys.readouterr()

    # another model's run into the same --out: refused before generating, predictions kept
    eng_b = Engine()
    assert _eval_run(tmp_path, model_b, out, eng_b) == 2
    err = capsys.readouterr().err
    assert f"ovlt eval run: {out}: holds predictions made by another model" in err, err
    assert str(model_a) in err and "model_fingerprint" in err, err
    assert eng_b.calls == [] and (out / "predictions.jsonl").read_text() == preds

    # the same model with other generation settings: refused, naming the setting
    assert _eval_run(tmp_path, model_a, out, Engine(), "--max-new-tokens", "7") == 2
    err = capsys.readouterr().err
    assert "max_new_tokens: 2048 there, 7 now" in err, err

    # the same model and settings resume (only the missing item is generated)
    eng_a = Engine()
    assert _eval_run(tmp_path, model_a, out, eng_a) == 0
    assert eng_a.calls == [["3"]]

    # predictions of unknown origin (no generation.json): refused
    other = tmp_path / "other_out"
    other.mkdir()
    (other / "predictions.jsonl").write_text(preds)
    assert _eval_run(tmp_path, model_a, other, Engine()) == 2
    err = capsys.readouterr().err
    assert f"{other}: holds a predictions.jsonl that `ovlt eval run` did not record" in err, err


def test_eval_run_still_needs_the_images(tmp_path, capsys):
    _write(tmp_path)  # no image files
    (tmp_path / "m").mkdir()
    assert _eval_run(tmp_path, tmp_path / "m", tmp_path / "out", Engine()) == 2
    err = capsys.readouterr().err
    assert "record 0 (id=1): field 'image': image file 'images/1.png' not found" in err, err
