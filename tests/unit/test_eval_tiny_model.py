"""`ovlt eval run` on the tiny Qwen2.5-VL with the built-in engine, against HF `generate`.

The runs go through the real pieces: benchmark loader (each benchmark's released layout) ->
chat template + image processing -> `ovlt.rollout.make_engine` (built-in engine on the mcore model
loaded from the HF directory) -> predictions -> scores. The reference is HF transformers' greedy
`generate` on the same prompt.
"""
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ovlt.eval.cli import main

IMG = 151655
MAX_NEW = 6


def _png(size, color):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


IMAGES = {"1": ((8, 6), (255, 0, 0)), "2": ((40, 30), (0, 90, 200))}


def write_mathvista(root):  # testmini.json {pid: record}, relative image paths
    (root / "images").mkdir(parents=True)
    data = {}
    for pid, (size, color) in IMAGES.items():
        (root / "images" / f"{pid}.png").write_bytes(_png(size, color))
        data[pid] = {"pid": pid, "question": f"How many shapes? ({pid})", "image": f"images/{pid}.png",
                     "choices": None, "unit": None, "precision": None, "answer": "3",
                     "question_type": "free_form", "answer_type": "integer",
                     "metadata": {"task": "figure question answering", "skills": ["arithmetic reasoning"]},
                     "query": f"Question: How many shapes? ({pid})"}
    (root / "testmini.json").write_text(json.dumps(data))


def write_mathverse(root):  # testmini.json [records], images_version_1-4/ paths
    (root / "images_version_1-4").mkdir(parents=True)
    recs = []
    for sid, (size, color) in IMAGES.items():
        (root / "images_version_1-4" / f"image_{sid}.png").write_bytes(_png(size, color))
        recs.append({"sample_index": sid, "problem_index": "1", "problem_version": "Vision Only",
                     "question": "", "image": f"images_version_1-4/image_{sid}.png", "answer": "B",
                     "question_type": "multi-choice", "query_cot": "Please directly answer the question "
                     "shown in the image and provide the correct option letter."})
    (root / "testmini.json").write_text(json.dumps(recs))


def write_mathvision(root):  # test.parquet with decoded_image byte structs
    root.mkdir(parents=True)
    recs = [{"id": i, "question": f"<image1>Which shape is red? ({i})", "options": ["A", "B", "C", "D", "E"],
             "image": f"images/{i}.jpg", "decoded_image": {"bytes": _png(size, color), "path": f"{i}.jpg"},
             "answer": "A", "solution": None, "level": 2, "subject": "logic"}
            for i, (size, color) in IMAGES.items()]
    pq.write_table(pa.Table.from_pylist(recs), root / "test.parquet")


WRITERS = {"mathvista": write_mathvista, "mathverse": write_mathverse, "mathvision": write_mathvision}
ID_KEY = {"mathvista": "pid", "mathverse": "sample_index", "mathvision": "id"}


@pytest.fixture(scope="module")
def hf_model(tiny_hf_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()


def check_against_hf(hf, bench, data, out):
    from ovlt.data.tokenizer import load_tokenizer
    from ovlt.eval.readers import load_benchmark
    from ovlt.eval.runner import ChatRequestBuilder
    preds = {str(p[ID_KEY[bench]]): p
             for p in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
    assert set(preds) == set(IMAGES)
    assert json.loads((out / "scores.json").read_text())["n"] == len(IMAGES)
    tok = load_tokenizer()
    build = ChatRequestBuilder()  # the config defaults the runs use
    for item in load_benchmark(bench, data):
        req = build(item)
        ids = torch.tensor([req.prompt_ids])
        assert int((ids == IMG).sum()) == int(req.image_grid_thw.prod()) // 4
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), pixel_values=req.pixel_values,
                          image_grid_thw=req.image_grid_thw, mm_token_type_ids=(ids == IMG).int(),
                          max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=[151645, 151643],
                          pad_token_id=151643)[0, ids.shape[1]:].tolist()
        got = preds[item.id]
        assert got["num_tokens"] == len(ref), (bench, item.id)
        assert got["response"] == tok.decode(ref, skip_special_tokens=True), (bench, item.id)


def test_eval_run_cli_builds_builtin_engine_from_hf_dir(tmp_path, tiny_hf_dir, hf_model, monkeypatch):
    from ovlt.distributed import destroy_distributed
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    write_mathvista(tmp_path / "d")
    try:
        rc = main(["run", "--benchmark", "mathvista", "--data", str(tmp_path / "d"),
                   "--model", str(tiny_hf_dir), "--engine", "builtin", "--out", str(tmp_path / "out"),
                   "--max-new-tokens", str(MAX_NEW), "--batch-size", "2", "--no-progress"])
    finally:
        destroy_distributed()
    assert rc == 0
    check_against_hf(hf_model, "mathvista", tmp_path / "d", tmp_path / "out")


def test_eval_run_every_layout_with_one_engine(tmp_path, tiny_hf_dir, hf_model, monkeypatch):
    from ovlt.distributed import destroy_distributed
    from ovlt.eval.engine import build_engine
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        engine = build_engine(str(tiny_hf_dir), "builtin")
        for bench in ("mathverse", "mathvision"):
            d = tmp_path / bench
            WRITERS[bench](d)
            rc = main(["run", "--benchmark", bench, "--data", str(d), "--model", str(tiny_hf_dir),
                       "--out", str(tmp_path / f"out_{bench}"), "--max-new-tokens", str(MAX_NEW),
                       "--batch-size", "2", "--no-progress"], engine=engine)
            assert rc == 0
            check_against_hf(hf_model, bench, d, tmp_path / f"out_{bench}")
    finally:
        destroy_distributed()
