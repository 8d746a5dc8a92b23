"""Hand-judged items per benchmark in the released field layouts, scored through `ovlt eval score`.

Each row: (record fields, response, correct?) — the expected judgement is worked out by hand from
the rules in ovlt/eval/{extract,scoring}.py (letter beats option text, precision rounding, ...).
"""
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ovlt.eval.readers import BenchmarkError, load_benchmark
from ovlt.eval.cli import main


def png_bytes(color=(200, 30, 30), size=(8, 6)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def run_score(tmp_path, bench, data_path, preds):
    pred_file = tmp_path / "preds.jsonl"
    pred_file.write_text("".join(json.dumps(p) + "\n" for p in preds))
    out = tmp_path / "out"
    rc = main(["score", "--benchmark", bench, "--data", str(data_path),
               "--predictions", str(pred_file), "--out", str(out)])
    assert rc == 0
    judgements = {j["id"]: j for j in map(json.loads, (out / "judgements.jsonl").read_text().splitlines())}
    return json.loads((out / "scores.json").read_text()), judgements


# ----------------------------------------------------------------------------- MathVista
C345 = ["3", "4", "5"]
ANG = ["145°", "155°", "165°", "175°"]
YN = ["Yes", "No"]
C234 = ["2", "3", "4"]
# (question_type, answer_type, answer, choices, precision, task, skills, response, correct)
MATHVISTA = [
    ("multi_choice", "text", "4", C345, None, "geometry problem solving", ["geometry reasoning"],
     "<answer>B</answer>", True),
    ("multi_choice", "text", "4", C345, None, "geometry problem solving", ["geometry reasoning"],
     "<answer>(B) 4</answer>", True),
    ("multi_choice", "text", "4", C345, None, "geometry problem solving", ["geometry reasoning"],
     "<answer>(B) 3</answer>", True),  # letter wins
    ("multi_choice", "text", "4", C345, None, "figure question answering", ["arithmetic reasoning"],
     "<answer>4</answer>", True),  # option text
    ("multi_choice", "text", "4", C345, None, "figure question answering", ["arithmetic reasoning"],
     "<answer>3</answer>", False),
    ("multi_choice", "text", "4", C345, None, "figure question answering", ["arithmetic reasoning"],
     "Thus the answer is C.", False),
    ("multi_choice", "text", "4", C345, None, "math word problem", ["arithmetic reasoning"],
     "so the correct option is (B).", True),
    ("multi_choice", "text", "145°", ANG, None, "geometry problem solving",
     ["geometry reasoning", "algebraic reasoning"], "\\boxed{145^\\circ}", True),
    ("multi_choice", "text", "Yes", YN, None, "figure question answering", ["logical reasoning"],
     "<answer>no</answer>", False),
    ("multi_choice", "text", "No", YN, None, "figure question answering", ["logical reasoning"],
     "<answer>No</answer>", True),
    ("free_form", "integer", "3", None, None, "visual question answering", ["numeric commonsense"],
     "<answer>3.0</answer>", True),
    ("free_form", "integer", "3", None, None, "visual question answering", ["numeric commonsense"],
     "<answer>3.5</answer>", False),
    ("free_form", "integer", "12", None, None, "textbook question answering", ["arithmetic reasoning"],
     "The answer is 12 cm.", True),
    ("free_form", "integer", "1000", None, None, "textbook question answering", ["arithmetic reasoning"],
     "\\boxed{1,000}", True),
    ("free_form", "float", "3.0", None, 1, "figure question answering", ["statistical reasoning"],
     "<answer>3</answer>", True),
    ("free_form", "float", "2.5", None, 1, "figure question answering", ["statistical reasoning"],
     "<answer>2.54</answer>", True),
    ("free_form", "float", "2.54", None, 2, "figure question answering", ["statistical reasoning"],
     "<answer>2.5</answer>", False),
    ("free_form", "float", "0.5", None, 1, "math word problem", ["arithmetic reasoning"],
     "<answer>\\frac{1}{2}</answer>", True),
    ("free_form", "float", "1.33", None, 2, "math word problem", ["arithmetic reasoning"],
     "<answer>4/3</answer>", True),
    ("free_form", "float", "3.0", None, 1, "math word problem", ["arithmetic reasoning"],
     "<answer>2.96</answer>", True),
    ("free_form", "list", "[1, 2, 3]", None, None, "figure question answering", ["statistical reasoning"],
     "<answer>[1, 2, 3]</answer>", True),
    ("free_form", "list", "[1, 2, 3]", None, None, "figure question answering", ["statistical reasoning"],
     "<answer>1, 2, 3</answer>", True),
    ("free_form", "list", "[1, 2, 3]", None, None, "figure question answering", ["statistical reasoning"],
     "<answer>[3, 2, 1]</answer>", False),
    ("free_form", "list", "[1, 2, 3]", None, None, "figure question answering", ["statistical reasoning"],
     "<answer>[1, 2]</answer>", False),
    ("free_form", "text", "cube", None, None, "visual question answering", ["logical reasoning"],
     "<answer>Cube.</answer>", True),
    ("free_form", "text", "cube", None, None, "visual question answering", ["logical reasoning"],
     "<answer>sphere</answer>", False),
    ("free_form", "integer", "7", None, None, "visual question answering", ["numeric commonsense"],
     "<think>Counting the dots gives 7.</think>", True),  # only in thinking, nothing after
    ("free_form", "integer", "7", None, None, "visual question answering", ["numeric commonsense"],
     "<think>it is 7</think> The answer is 8", False),
    ("free_form", "integer", "2", None, None, "visual question answering", ["numeric commonsense"],
     "I cannot tell from the image.", False),
    ("free_form", "integer", "5", None, None, "geometry problem solving", ["geometry reasoning"],
     "\\boxed{5\\text{ m}}", True),
    ("free_form", "integer", "50", None, None, "math word problem", ["arithmetic reasoning"],
     "<answer>50\\%</answer>", True),
    ("free_form", "integer", "-2", None, None, "math word problem", ["algebraic reasoning"],
     "<answer>\u22122</answer>", True),
    ("multi_choice", "text", "3", C234, None, "math word problem", ["algebraic reasoning"],
     "<answer>(B) 3</answer>", True),
    ("multi_choice", "text", "3", C234, None, "math word problem", ["algebraic reasoning"],
     "<answer>(C) 3</answer>", False),  # C is "4"
    ("free_form", "float", "1.5", None, 1, "geometry problem solving", ["geometry reasoning"],
     "The area is approximately 1.5 square units", True),
    ("free_form", "integer", "3", None, None, "geometry problem solving", ["geometry reasoning"],
     "\\boxed{3} ... wait, recount: \\boxed{4}", False),
    ("free_form", "integer", "12", None, None, "math word problem", ["arithmetic reasoning"],
     "The answer is 12 because 3 × 4 = 12.", True),
    ("free_form", "integer", "12", None, None, "math word problem", ["arithmetic reasoning"],
     "Final answer: about 13 apples", False),
]


def mathvista_record(pid, row, image_path):
    qtype, atype, answer, choices, precision, task, skills, _, _ = row
    q = f"Question {pid}?"
    query = "Hint: Please answer the question and provide the final answer at the end.\n" + \
        f"Question: {q}" + ("\nChoices:\n" + "\n".join(f"({'ABCD'[i]}) {c}" for i, c in enumerate(choices))
                            if choices else "")
    return {"pid": pid, "question": q, "image": image_path, "decoded_image": None,
            "choices": choices, "unit": None, "precision": precision, "answer": answer,
            "question_type": qtype, "answer_type": atype,
            "metadata": {"split": "testmini", "source": "synthetic", "task": task,
                         "category": "math-targeted-vqa", "context": "geometry diagram",
                         "grade": "high school", "language": "english", "skills": skills},
            "query": query}


def test_mathvista_hand_judged_json_dict_layout(tmp_path):
    assert len(MATHVISTA) >= 30
    (tmp_path / "images").mkdir()
    data = {}
    for k, row in enumerate(MATHVISTA):
        pid = str(k + 1)
        (tmp_path / "images" / f"{pid}.png").write_bytes(png_bytes())
        data[pid] = mathvista_record(pid, row, f"images/{pid}.png")
    (tmp_path / "testmini.json").write_text(json.dumps(data))  # released layout: {pid: record}
    preds = [{"pid": str(k + 1), "response": row[7]} for k, row in enumerate(MATHVISTA)]
    scores, js = run_score(tmp_path, "mathvista", tmp_path, preds)
    wrong = [(k + 1, row[7], js[str(k + 1)]["extracted"]) for k, row in enumerate(MATHVISTA)
             if js[str(k + 1)]["correct"] != row[8]]
    assert wrong == []
    n_true = sum(r[8] for r in MATHVISTA)
    assert scores["correct"] == n_true and scores["n"] == len(MATHVISTA)
    assert scores["accuracy"] == round(100 * n_true / len(MATHVISTA), 2)
    # per task and per skill, counted by hand from the table
    geo = scores["by"]["task"]["geometry problem solving"]
    assert (geo["n"], geo["correct"]) == (7, 6)  # rows 1,2,3,8,30,35 right; 36 wrong
    alg = scores["by"]["skills"]["algebraic reasoning"]  # rows 8, 32, 33, 34
    assert (alg["n"], alg["correct"]) == (4, 3)


def test_mathvista_parquet_with_embedded_images(tmp_path):
    rows = MATHVISTA[:6]
    recs = []
    for k, row in enumerate(rows):
        r = mathvista_record(str(k + 1), row, f"images/{k + 1}.jpg")  # path does not exist...
        r["decoded_image"] = {"bytes": png_bytes(), "path": f"{k + 1}.png"}  # ...bytes win
        r["metadata"] = json.dumps(r["metadata"])
        recs.append(r)
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "testmini.parquet")
    items = load_benchmark("mathvista", tmp_path)
    assert [it.id for it in items] == [str(k + 1) for k in range(6)]
    img = items[0].load_images()[0]
    assert img.size == (8, 6) and img.getpixel((0, 0)) == (200, 30, 30)
    assert items[0].prompt.startswith("Hint:") and items[0].choices == C345
    scores, js = run_score(tmp_path, "mathvista", tmp_path / "testmini.parquet",
                           [{"pid": str(k + 1), "response": r[7]} for k, r in enumerate(rows)])
    assert [js[str(k + 1)]["correct"] for k in range(6)] == [r[8] for r in rows]


# ----------------------------------------------------------------------------- MathVerse
CH = "Choices:\nA:30°\nB:40°\nC:50°\nD:60°"
TD, TL, VI, VD, VO = "Text Dominant", "Text Lite", "Vision Intensive", "Vision Dominant", "Vision Only"
# (version, question_type, answer, question, response, correct)
MATHVERSE = [
    (TD, "multi-choice", "B", "Find angle 1. " + CH, "<answer>B</answer>", True),
    (TD, "multi-choice", "B", "Find angle 1. " + CH, "<answer>40°</answer>", True),       # option text
    (TD, "multi-choice", "B", "Find angle 1. " + CH, "<answer>(B) 40°</answer>", True),
    (TD, "multi-choice", "B", "Find angle 1. " + CH, "<answer>A</answer>", False),
    (TL, "multi-choice", "B", "Find angle 1. " + CH, "Therefore, the answer is B: 40°.", True),
    (TL, "multi-choice", "B", "Find angle 1. " + CH, "\\boxed{C}", False),
    (TL, "multi-choice", "B", "Find angle 1. " + CH, "<answer>50^\\circ</answer>", False),  # that is C
    (TL, "multi-choice", "D", "Find angle 2. " + CH, "...so we choose option D", True),
    (VI, "multi-choice", "A", "Find angle 3. " + CH, "<think>so the answer is A</think>", True),  # only in thinking
    (VI, "multi-choice", "C", "Find angle 3. " + CH, "<answer>c</answer>", True),
    (VI, "multi-choice", "B", "Find angle 3. " + CH, "Answer: B", True),
    (VI, "multi-choice", "A", "Find angle 3. " + CH, "**Answer:** (A)", True),
    (VO, "multi-choice", "B", "", "<answer>B</answer>", True),
    (VO, "multi-choice", "B", "", "<answer>40°</answer>", False),   # options only in the image
    (TD, "free-form", "5", "Find x.", "<answer>5</answer>", True),
    (TD, "free-form", "5", "Find x.", "<answer>5.0</answer>", True),
    (TD, "free-form", "\\frac{3}{2}", "Find the ratio.", "<answer>1.5</answer>", True),
    (TL, "free-form", "2\\sqrt{3}", "Find AB.", "<answer>\\sqrt{12}</answer>", True),
    (TL, "free-form", "2\\sqrt{3}", "Find AB.", "<answer>3.46</answer>", False),
    (TL, "free-form", "60°", "Find the angle.", "\\boxed{60}", True),
    (VI, "free-form", "y=2x+1", "Find the line.", "<answer>y = 2x + 1</answer>", True),
    (VI, "free-form", "12", "Find the length.", "The answer is 12 cm", True),
    (VI, "free-form", "12", "Find the length.", "The answer is 13.", False),
    (VD, "free-form", "(1,2)", "Find the vertex.", "<answer>(1, 2)</answer>", True),
    (VD, "free-form", "8", "Find the area.", "I think it's roughly 8 or 9", False),  # last number 9
    (VD, "free-form", "0.25", "Find p.", "<answer>25\\%</answer>", True),
    (VD, "free-form", "3", "Find n.", "<answer> </answer> \\boxed{3}", True),  # empty tag skipped
    (VD, "free-form", "3", "Find n.", "<answer>3</answer><answer>4</answer>", False),  # last tag counts
    (VO, "free-form", "\\frac{1}{3}", "", "<answer>0.33</answer>", False),
    (VO, "free-form", "10", "", "<answer>10 cm^2</answer>", True),
    (VO, "free-form", "4\\pi", "", "<answer>4π</answer>", True),
    (VO, "multi-choice", "A", "", "The answer is (A) 30°.", True),
]


def test_mathverse_hand_judged_json_list_layout(tmp_path):
    assert len(MATHVERSE) >= 30
    imgdir = tmp_path / "images_version_1-4"
    imgdir.mkdir()
    recs, preds = [], []
    for k, (ver, qt, ans, q, resp, _) in enumerate(MATHVERSE):
        (imgdir / f"image_{k}.png").write_bytes(png_bytes())
        recs.append({"sample_index": str(k + 1), "problem_index": str(k // 5 + 1),
                     "problem_version": ver, "question": q, "image": f"images_version_1-4/image_{k}.png",
                     "answer": ans, "question_type": qt,
                     "metadata": {"split": "testmini", "source": "GeoQA", "subject": "Plane Geometry",
                                  "subfield": "Angle"},
                     "query_wo": q, "query_cot": f"According to the question shown in the image, please "
                                                  f"first conduct reasoning, and then answer. {q}",
                     "question_for_eval": q})
        preds.append({"sample_index": k + 1, "response": resp})  # int ids in predictions are fine
    (tmp_path / "testmini.json").write_text(json.dumps(recs))
    scores, js = run_score(tmp_path, "mathverse", tmp_path / "testmini.json", preds)
    wrong = [(k + 1, r[4], js[str(k + 1)]["extracted"], js[str(k + 1)]["prediction"])
             for k, r in enumerate(MATHVERSE) if js[str(k + 1)]["correct"] != r[5]]
    assert wrong == []
    n_true = sum(r[5] for r in MATHVERSE)
    assert scores["correct"] == n_true
    by_v = scores["by"]["problem_version"]
    for ver in (TD, TL, VI, VD, VO):  # per-version counts, from the table
        rows = [r for r in MATHVERSE if r[0] == ver]
        assert (by_v[ver]["n"], by_v[ver]["correct"]) == (len(rows), sum(r[5] for r in rows))
    assert (by_v[TD]["n"], by_v[TD]["correct"]) == (7, 6)  # rows 1-4, 15-17; row 4 wrong
    assert (by_v[VO]["n"], by_v[VO]["correct"]) == (6, 4)  # rows 13,14,29-32; 14, 29 wrong


# ----------------------------------------------------------------------------- MathVision
O5 = ["2", "4", "6", "8", "10"]
OL = ["A", "B", "C", "D", "E"]
O13 = ["1", "2", "3", "4", "5"]
# (options, answer, subject, level, response, correct)
MATHVISION = [
    (O5, "B", "arithmetic", 1, "<answer>B</answer>", True),
    (O5, "B", "arithmetic", 1, "<answer>4</answer>", True),
    (O5, "B", "arithmetic", 1, "<answer>(B) 4</answer>", True),
    (O5, "B", "arithmetic", 1, "<answer>(D) 4</answer>", False),  # letter wins
    (O5, "E", "arithmetic", 2, "\\boxed{E}", True),
    (O5, "A", "arithmetic", 2, "The answer is C.", False),
    (O5, "A", "arithmetic", 2, "<answer>12</answer>", False),     # not an option
    ([], "7", "counting", 1, "<answer>7</answer>", True),
    ([], "7", "counting", 1, "<answer>7.0</answer>", True),
    ([], "\\frac{1}{2}", "metric geometry - area", 3, "<answer>0.5</answer>", True),
    ([], "2\\sqrt{2}", "metric geometry - length", 4, "<answer>\\sqrt{8}</answer>", True),
    ([], "45", "metric geometry - angle", 3, "\\boxed{45^\\circ}", True),
    ([], "17", "counting", 2, "the answer is 71", False),
    ([], "3", "counting", 2, "<think>the answer is 3</think>", True),   # only in thinking
    ([], "3", "counting", 2, "<think>3</think>\n<answer>4</answer>", False),
    ([], "1000", "arithmetic", 5, "<answer>1 000</answer>", True),
    (OL, "C", "combinatorial geometry", 3, "<answer>C</answer>", True),
    (OL, "C", "combinatorial geometry", 3, "<answer>(C)</answer>", True),
    ([], "-1", "algebra", 4, "<answer>\u22121</answer>", True),
    ([], "24", "metric geometry - area", 4, "The final answer: 24 cm^2", True),
    ([], "x^2+1", "algebra", 5, "\\boxed{1+x^2}", True),
    ([], "\\frac{5}{4}", "algebra", 5, "<answer>1.25</answer>", True),
    ([], "\\frac{5}{4}", "algebra", 5, "<answer>1.2</answer>", False),
    (O5, "B", "logic", 1, "<answer>b</answer>", True),
    (O13, "C", "logic", 1, "<answer>3</answer>", True),
    (O13, "C", "logic", 1, "<answer>C. 3</answer>", True),
    (O13, "C", "logic", 1, "\\boxed{\\text{C}}", True),
    ([], "12", "counting", 1, "", False),
    ([], "6", "counting", 1, "The answer is \\boxed{6}", True),
    (O13, "E", "logic", 2, "I'll go with E", True),
    (O13, "A", "logic", 2, "A rectangle has 4 sides, so B", False),
    ([], "(2,3)", "analytic geometry", 3, "<answer>(2, 3)</answer>", True),
    ([], "6", "arithmetic", 2, "The answer is 6 since 2 + 4 = 6.", True),
]


def test_mathvision_hand_judged_parquet_and_jsonl(tmp_path):
    assert len(MATHVISION) >= 30
    recs = [{"id": str(k + 1), "question": f"Problem {k + 1}. <image1>", "options": opts,
             "image": f"images/{k + 1}.jpg", "decoded_image": {"bytes": png_bytes(), "path": None},
             "answer": ans, "solution": None, "level": lvl, "subject": subj}
            for k, (opts, ans, subj, lvl, _, _) in enumerate(MATHVISION)]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "test.parquet")
    preds = [{"id": str(k + 1), "response": r[4]} for k, r in enumerate(MATHVISION)]
    scores, js = run_score(tmp_path, "mathvision", tmp_path / "test.parquet", preds)
    wrong = [(k + 1, r[4], js[str(k + 1)]["extracted"], js[str(k + 1)]["prediction"])
             for k, r in enumerate(MATHVISION) if js[str(k + 1)]["correct"] != r[5]]
    assert wrong == []
    assert scores["correct"] == sum(r[5] for r in MATHVISION)
    logic = scores["by"]["subject"]["logic"]
    assert (logic["n"], logic["correct"]) == (6, 5)  # rows 24-27, 30, 31; 31 wrong
    lvl5 = scores["by"]["level"]["5"]
    assert (lvl5["n"], lvl5["correct"]) == (4, 3)
    # the JSONL release layout with relative image paths scores identically
    (tmp_path / "j" / "images").mkdir(parents=True)
    for r in recs:
        (tmp_path / "j" / "images" / f"{r['id']}.jpg").write_bytes(png_bytes())
        del r["decoded_image"]
    (tmp_path / "j" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    scores2, _ = run_score(tmp_path / "j", "mathvision", tmp_path / "j", preds)
    assert scores2["correct"] == scores["correct"] and scores2["by"] == scores["by"]
    item = load_benchmark("mathvision", tmp_path / "j", limit=1)[0]
    assert item.prompt == "Problem 1.\nOptions:\n(A) 2\n(B) 4\n(C) 6\n(D) 8\n(E) 10"


# ----------------------------------------------------------------------------- errors
def test_missing_field_error_names_file_record_and_field(tmp_path):
    recs = [{"id": "1", "question": "q", "options": [], "image": "a.png", "answer": "1",
             "level": 1, "subject": "s"},
            {"id": "2", "question": "q", "options": [], "image": "a.png", "level": 1, "subject": "s"}]
    (tmp_path / "a.png").write_bytes(png_bytes())
    f = tmp_path / "test.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(BenchmarkError, match=r"test\.jsonl: record 1 \(id=2\): missing field 'answer'"):
        load_benchmark("mathvision", f)


def test_missing_image_error_names_the_path(tmp_path):
    rec = {"sample_index": "9", "problem_index": "1", "problem_version": "Vision Only", "question": "",
           "image": "images_version_5/image_9.png", "answer": "B", "question_type": "multi-choice",
           "query_cot": "q"}
    (tmp_path / "testmini.json").write_text(json.dumps([rec]))
    with pytest.raises(BenchmarkError, match=r"record 0 \(id=9\): field 'image': image file "
                                             r"'images_version_5/image_9.png' not found"):
        load_benchmark("mathverse", tmp_path)
    rec["image"] = ""
    (tmp_path / "testmini.json").write_text(json.dumps([rec]))
    with pytest.raises(BenchmarkError, match="missing image"):
        load_benchmark("mathverse", tmp_path)
    rec["problem_version"] = "Text Only"  # the text-only version legitimately has no image
    (tmp_path / "testmini.json").write_text(json.dumps([rec]))
    assert load_benchmark("mathverse", tmp_path)[0].images == []


def test_prediction_without_response_and_unknown_benchmark(tmp_path, capsys):
    (tmp_path / "1.png").write_bytes(png_bytes())
    rec = {"id": "1", "question": "q", "options": [], "image": "1.png",
           "answer": "1", "level": 1, "subject": "s"}
    (tmp_path / "test.jsonl").write_text(json.dumps(rec) + "\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "1", "text": "x"}) + "\n")
    rc = main(["score", "--benchmark", "mathvision", "--data", str(tmp_path), "--predictions",
               str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "line 1 (id=1): missing field 'response'" in capsys.readouterr().err
    with pytest.raises(BenchmarkError, match="unknown benchmark"):
        load_benchmark("mmmu", tmp_path)


def test_hf_sharded_layout_needs_a_split_when_both_are_there(tmp_path):
    d = tmp_path / "MathVision" / "data"
    d.mkdir(parents=True)

    def shard(name, ids):
        recs = [{"id": i, "question": "q", "options": [], "image": None,
                 "decoded_image": {"bytes": png_bytes(), "path": None}, "answer": "1",
                 "level": 1, "subject": "s"} for i in ids]
        pq.write_table(pa.Table.from_pylist(recs), d / name)

    shard("testmini-00000-of-00002-aa.parquet", ["1", "2"])
    shard("testmini-00001-of-00002-bb.parquet", ["3"])
    shard("test-00000-of-00001-cc.parquet", ["100", "101"])
    # both splits there: MathVision's published numbers name one, so it is never picked silently
    with pytest.raises(BenchmarkError, match="holds both the testmini and the test split.*--split"):
        load_benchmark("mathvision", tmp_path / "MathVision")
    root = tmp_path / "MathVision"
    assert [it.id for it in load_benchmark("mathvision", root, split="testmini")] == ["1", "2", "3"]
    assert [it.id for it in load_benchmark("mathvision", root, split="test")] == ["100", "101"]
    assert [it.id for it in load_benchmark("mathvision", root, limit=2, split="testmini")] == ["1", "2"]
    assert [it.id for it in load_benchmark("mathvision", d / "test-00000-of-00001-cc.parquet")] == ["100", "101"]
    (d / "test-00000-of-00001-cc.parquet").rename(d / "only.parquet.bak")
    assert [it.id for it in load_benchmark("mathvision", root)] == ["1", "2", "3"]  # one split: fine
    with pytest.raises(BenchmarkError, match="no test split here"):
        load_benchmark("mathvision", root, split="test")
    (d / "only.parquet.bak").rename(d / "test-00000-of-00001-cc.parquet")
    (d / "extra.json").write_text("[]")
    (d / "other.jsonl").write_text("")
    for f in d.glob("test*.parquet"):
        f.unlink()
    with pytest.raises(BenchmarkError, match="expected one of"):  # two candidates: ambiguous
        load_benchmark("mathvision", tmp_path / "MathVision")
