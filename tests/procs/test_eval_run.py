"""`ovlt eval run` end to end with a fake RolloutEngine; resume; request building; LLM judge."""
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch
from PIL import Image

from ovlt.eval.readers import load_benchmark
from ovlt.eval.cli import main
from ovlt.eval.judge import LLMJudge
from ovlt.eval.runner import ChatRequestBuilder
from ovlt.eval.scoring import judge_response
from ovlt.rollout.base import Completion, GenerationRequest, RolloutEngine


def png_bytes(size=(8, 6)):
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


# pid -> (answer, response the fake model gives); 5 of 7 right by hand (RIGHT).
ITEMS = {
    "1": ("4", "<think>count</think><answer>4</answer>"),
    "2": ("2.5", "<answer>2.54</answer>"),           # precision 1 -> right
    "3": ("7", "The answer is 8."),
    "4": ("10", "\\boxed{10}"),
    "5": ("3", "no idea"),
    "6": ("6", "<answer>6.0</answer>"),
    "7": ("9", "<answer>(B) 9</answer>"),            # free form: the option label is dropped
}
RIGHT = {"1", "2", "4", "6", "7"}


def write_mathvista(tmp_path):
    (tmp_path / "images").mkdir(parents=True)
    data = {}
    for pid, (ans, _) in ITEMS.items():
        (tmp_path / "images" / f"{pid}.png").write_bytes(png_bytes())
        atype = "float" if pid == "2" else "integer"
        data[pid] = {"pid": pid, "question": f"q{pid}", "image": f"images/{pid}.png",
                     "choices": None, "unit": None, "precision": 1 if pid == "2" else None,
                     "answer": ans, "question_type": "free_form", "answer_type": atype,
                     "metadata": {"task": "math word problem", "skills": ["arithmetic reasoning"]},
                     "query": f"Hint: answer.\nQuestion: q{pid}"}
    (tmp_path / "testmini.json").write_text(json.dumps(data))
    return tmp_path


class FakeEngine(RolloutEngine):
    """Answers from a table keyed by request_id; records every call; can fail after k batches."""

    def __init__(self, fail_after_batches=None):
        self.calls = []
        self.fail_after = fail_after_batches

    def generate(self, requests, params):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls.append(([r.request_id for r in requests], params))
        out = []
        for r in requests:
            text = ITEMS[r.request_id][1]
            ids = [ord(c) % 1000 for c in text][:params.max_new_tokens]
            out.append([Completion(r.request_id, ids, [0.0] * len(ids), text, "stop")])
        return out

    def update_weights(self, named_tensors):
        pass


def simple_builder(item):
    assert item.images and item.load_images()[0].size == (8, 6)
    return GenerationRequest(prompt_ids=[1, 2, 3], prompt_text=item.prompt, request_id=item.id)


def _run(tmp_path, data, engine, *extra):
    return main(["run", "--benchmark", "mathvista", "--data", str(data), "--model", "unused",
                 "--out", str(tmp_path / "out"), "--batch-size", "3", "--max-new-tokens", "64",
                 "--no-progress", *extra], engine=engine, request_builder=simple_builder)


def test_eval_run_end_to_end_with_fake_engine(tmp_path, capsys):
    data = write_mathvista(tmp_path / "d")
    eng = FakeEngine()
    assert _run(tmp_path, data, eng) == 0
    # batched by 3, greedy, max_new_tokens passed through
    assert [ids for ids, _ in eng.calls] == [["1", "2", "3"], ["4", "5", "6"], ["7"]]
    p = eng.calls[0][1]
    assert p.temperature == 0.0 and p.max_new_tokens == 64 and p.n == 1
    preds = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [x["pid"] for x in preds] == list(ITEMS)
    assert preds[0]["response"] == ITEMS["1"][1] and preds[0]["finish_reason"] == "stop"
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert scores["correct"] == len(RIGHT) and scores["n"] == 7
    assert scores["accuracy"] == round(100 * 5 / 7, 2)
    assert "mathvista: accuracy 71.43% (5/7)" in capsys.readouterr().out
    judged = (tmp_path / "out" / "judgements.jsonl").read_text().splitlines()
    js = {j["id"]: j["correct"] for j in map(json.loads, judged)}
    assert {k for k, v in js.items() if v} == RIGHT
    # scoring the same predictions with `eval score` gives the same numbers
    assert main(["score", "--benchmark", "mathvista", "--data", str(data), "--predictions",
                 str(tmp_path / "out" / "predictions.jsonl"), "--out", str(tmp_path / "s")]) == 0
    assert json.loads((tmp_path / "s" / "scores.json").read_text()) == scores


def test_eval_run_resumes_after_a_crash_and_a_torn_line(tmp_path):
    data = write_mathvista(tmp_path / "d")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path, data, FakeEngine(fail_after_batches=1))
    pred = tmp_path / "out" / "predictions.jsonl"
    assert [json.loads(line)["pid"] for line in pred.read_text().splitlines()] == ["1", "2", "3"]
    with open(pred, "a") as f:
        f.write('{"pid": "4", "resp')  # a kill in the middle of a write
    eng = FakeEngine()
    assert _run(tmp_path, data, eng) == 0
    assert [ids for ids, _ in eng.calls] == [["4", "5", "6"], ["7"]]  # done ids skipped
    pids = [json.loads(line)["pid"] for line in pred.read_text().splitlines()]
    assert pids == list(ITEMS)  # each exactly once, torn line gone
    # a third run generates nothing
    eng3 = FakeEngine()
    assert _run(tmp_path, data, eng3) == 0 and eng3.calls == []


def test_eval_run_limit(tmp_path):
    data = write_mathvista(tmp_path / "d")
    eng = FakeEngine()
    assert _run(tmp_path, data, eng, "--limit", "2") == 0
    assert [ids for ids, _ in eng.calls] == [["1", "2"]]
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert (scores["n"], scores["correct"]) == (2, 2)


def test_chat_request_builder_matches_hand_rendered_prompt(tmp_path):
    from ovlt.data.image_processing import preprocess
    from ovlt.data.tokenizer import load_tokenizer
    data = write_mathvista(tmp_path / "d")
    item = load_benchmark("mathvista", data, limit=1)[0]
    req = ChatRequestBuilder(min_pixels=3136, max_pixels=262144, prompt_suffix=" Think first.")(item)
    t, h, w = req.image_grid_thw[0].tolist()
    assert req.image_grid_thw.shape == (1, 3) and t == 1
    assert req.pixel_values.shape == (t * h * w, 1176)
    ref_pv, ref_grid = preprocess(Image.open(data / "images" / "1.png").convert("RGB"), 3136, 262144)
    assert tuple(ref_grid) == (t, h, w) and torch.equal(req.pixel_values, ref_pv)
    n_pad = t * h * w // 4
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            "<|vision_start|>" + "<|image_pad|>" * n_pad + "<|vision_end|>\n"
            "Hint: answer.\nQuestion: q1 Think first.<|im_end|>\n<|im_start|>assistant\n")
    assert req.prompt_ids == list(load_tokenizer().encode(text))
    assert req.prompt_ids.count(151655) == n_pad and req.request_id == "1"


# ----------------------------------------------------------------------------- LLM judge
class _Handler(BaseHTTPRequestHandler):
    replies: list = []
    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Handler.seen.append((self.path, self.headers.get("Authorization"), body))
        reply = _Handler.replies.pop(0) if _Handler.replies else "NONE"
        if reply == 500:
            self.send_response(500)
            self.end_headers()
            return
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture
def judge_server():
    srv = HTTPServer(("127.0.0.1", 0), _Handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    _Handler.replies, _Handler.seen = [], []
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()
    th.join(timeout=5)


def test_llm_judge_extracts_when_rules_find_nothing(tmp_path, judge_server):
    data = write_mathvista(tmp_path / "d")
    items = {it.id: it for it in load_benchmark("mathvista", data)}
    judge = LLMJudge(judge_server, model="fake-judge", api_key="k", retries=0)
    _Handler.replies = ["3"]
    j = judge_response(items["5"], "no idea, maybe three", judge=judge)  # rules: no number
    assert j["correct"] and j["source"] == "llm_judge" and j["extracted"] == "3"
    path, auth, body = _Handler.seen[0]
    assert path == "/v1/chat/completions" and auth == "Bearer k"
    assert body["model"] == "fake-judge" and body["temperature"] == 0
    assert "q5" in body["messages"][0]["content"] and "maybe three" in body["messages"][0]["content"]
    # fallback mode: a response the rules can read never reaches the judge
    assert judge_response(items["1"], "<answer>4</answer>", judge=judge)["source"] == "answer_tag"
    assert len(_Handler.seen) == 1
    # always mode: the judge's extraction replaces the rules' (and is still rule-scored)
    _Handler.replies = ["5"]
    j = judge_response(items["1"], "<answer>4</answer>", judge=judge, judge_mode="always")
    assert j["extracted"] == "5" and not j["correct"]
    # server error: no extraction, counted
    _Handler.replies = [500]
    assert not judge_response(items["5"], "nothing", judge=judge)["correct"]
    assert judge.failures == 1 and judge.calls == 3


def test_judge_via_cli_flag(tmp_path, judge_server):
    data = write_mathvista(tmp_path / "d")
    pred = tmp_path / "p.jsonl"
    pred.write_text(json.dumps({"pid": "5", "response": "it is three"}) + "\n")
    _Handler.replies = ["3"]
    assert main(["score", "--benchmark", "mathvista", "--data", str(data), "--predictions",
                 str(pred), "--out", str(tmp_path / "o"), "--judge-url", judge_server]) == 0
    s = json.loads((tmp_path / "o" / "scores.json").read_text())
    assert (s["n"], s["correct"], s["n_missing_predictions"]) == (1, 1, 6)


def test_run_benchmarks_from_config(tmp_path):
    from ovlt.config import EvalBenchmark, EvalConfig
    from ovlt.eval.runner import run_benchmarks
    data = write_mathvista(tmp_path / "d")
    cfg = EvalConfig(benchmarks=[EvalBenchmark(name="mathvista", data=str(data), limit=4)],
                     max_new_tokens=32, batch_size=2)
    eng = FakeEngine()
    res = run_benchmarks(cfg, eng, tmp_path / "ev", simple_builder, progress=False)
    assert [ids for ids, _ in eng.calls] == [["1", "2"], ["3", "4"]]
    assert eng.calls[0][1].max_new_tokens == 32
    assert (res["mathvista"]["n"], res["mathvista"]["correct"]) == (4, 3)  # 1, 2, 4 right; 3 wrong
    assert "| **ours** | **75.0** (n=4) |" in (tmp_path / "ev" / "report.md").read_text()
    assert (tmp_path / "ev" / "accuracy.png").stat().st_size > 8000


def test_only_rank0_writes(tmp_path, monkeypatch):
    data = write_mathvista(tmp_path / "d")
    monkeypatch.setenv("RANK", "1")  # a TP peer under torchrun: generates, records nothing
    eng = FakeEngine()
    assert _run(tmp_path, data, eng) == 0
    assert len(eng.calls) == 3 and not (tmp_path / "out" / "predictions.jsonl").exists()
    assert not (tmp_path / "out" / "scores.json").exists()
