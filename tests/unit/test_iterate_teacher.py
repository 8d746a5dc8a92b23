"""Teachers: the OpenAI-compatible client against a local fake server (http.server in a thread):
request body, n handling, reasoning_content, retries on 503 / timeouts, no retry on 400; the
synthetic teacher's candidates."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ovlt.iterate.teacher import (OpenAITeacher, SyntheticTeacher, TeacherError, TeacherItem,
                                  teacher_prompt)


class FakeOpenAI:
    """Chat-completions server; `script` is a list of behaviours consumed one per request:
    "ok", "503", "400", "slow" (sleeps past the client timeout), "cap1" (answers only 1 choice)."""

    def __init__(self, script=None, reasoning=False):
        self.script = list(script or [])
        self.requests: list[dict] = []
        self.reasoning = reasoning
        fake = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "body": body,
                                      "auth": self.headers.get("Authorization")})
                mode = fake.script.pop(0) if fake.script else "ok"
                if mode in ("503", "400"):
                    self.send_response(int(mode))
                    self.end_headers()
                    self.wfile.write(b'{"error": "nope"}')
                    return
                if mode == "slow":
                    time.sleep(1.0)
                n = 1 if mode == "cap1" else body.get("n", 1)
                q = body["messages"][0]["content"]
                choices = []
                for i in range(n):
                    msg = {"role": "assistant", "content": f"answer {i} to [{q[-20:]}] \\boxed{{{i}}}"}
                    if fake.reasoning:
                        msg = {"role": "assistant", "content": f"\\boxed{{{i}}}",
                               "reasoning_content": f"thinking {i}"}
                    choices.append({"index": i, "message": msg, "finish_reason": "stop"})
                data = json.dumps({"id": "x", "object": "chat.completion", "choices": choices}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *a):
        self.server.shutdown()
        self.server.server_close()


ITEMS = [TeacherItem("p1", "<image>What is the value of bar A?", caption="A bar chart; bar A is 7."),
         TeacherItem("p2", "How many circles?", caption="Three circles.")]


def test_openai_teacher_request_and_answers(monkeypatch):
    with FakeOpenAI() as srv:
        t = OpenAITeacher(srv.url, "QwQ-32B", max_tokens=123, temperature=0.6, top_p=0.9,
                          timeout_s=5, retries=0, concurrency=2, api_key="sk-test")
        out = t.answer(ITEMS, n=3)
    assert [len(o) for o in out] == [3, 3]
    assert out[0][2].endswith("\\boxed{2}")
    assert len(srv.requests) == 2
    r = sorted(srv.requests, key=lambda r: r["body"]["messages"][0]["content"])[0]
    assert r["path"] == "/v1/chat/completions" and r["auth"] == "Bearer sk-test"
    b = r["body"]
    assert (b["model"], b["n"], b["max_tokens"], b["temperature"], b["top_p"]) == \
        ("QwQ-32B", 3, 123, 0.6, 0.9)
    # The prompt carries the caption and the question without the image placeholder.
    prompts = {x["body"]["messages"][0]["content"] for x in srv.requests}
    assert teacher_prompt(ITEMS[0]) in prompts
    assert "A bar chart; bar A is 7." in teacher_prompt(ITEMS[0])
    assert "<image>" not in teacher_prompt(ITEMS[0])


def test_openai_teacher_fills_up_when_server_caps_n_and_reads_reasoning():
    with FakeOpenAI(script=["cap1", "cap1"], reasoning=True) as srv:
        t = OpenAITeacher(srv.url, "m", timeout_s=5, retries=0, concurrency=1)
        out = t.answer(ITEMS[:1], n=3)
    assert [x["body"]["n"] for x in srv.requests] == [3, 2, 1]
    assert out[0][0] == "<think>\nthinking 0\n</think>\n\\boxed{0}"
    assert len(out[0]) == 3


def test_openai_teacher_retries_503_and_timeout_then_succeeds():
    with FakeOpenAI(script=["503", "slow", "ok"]) as srv:
        t = OpenAITeacher(srv.url, "m", timeout_s=0.3, retries=2, backoff_s=0.01, concurrency=1)
        out = t.answer(ITEMS[:1], n=2)
    assert len(out[0]) == 2
    assert t.stats["retries"] == 2 and t.stats["requests"] == 3


def test_openai_teacher_gives_up_per_item_after_retries():
    with FakeOpenAI(script=["503"] * 3) as srv:
        t = OpenAITeacher(srv.url, "m", timeout_s=2, retries=2, backoff_s=0.01, concurrency=1)
        out = t.answer(ITEMS, n=2)
    # item 1 exhausted its 3 attempts and is skipped (counted); item 2 then succeeded
    assert out[0] == [] and len(out[1]) == 2
    assert t.stats["failed_items"] == 1


def test_openai_teacher_400_is_a_clear_error_without_retry():
    with FakeOpenAI(script=["400"]) as srv:
        t = OpenAITeacher(srv.url, "m", timeout_s=2, retries=3, backoff_s=0.01)
        with pytest.raises(TeacherError, match="HTTP 400"):
            t.answer(ITEMS[:1], n=1)
    assert len(srv.requests) == 1


def test_openai_teacher_unreachable():
    t = OpenAITeacher("http://127.0.0.1:9/v1", "m", timeout_s=0.5, retries=1, backoff_s=0.01)
    with pytest.raises(TeacherError):
        t._one(ITEMS[0], 1)


def test_synthetic_teacher_candidates():
    item = TeacherItem("s1", "q", answer="7",
                       solution="<think>\nBar A is 7.\n</think>\n<answer>7</answer>")
    t = SyntheticTeacher(seed=3, wrong=1)
    (cands,) = t.answer([item], n=6)
    assert len(cands) == 6
    assert sum("<answer>8</answer>" in c for c in cands) == 1  # one wrong answer (7 + 1)
    assert sum("<answer>7</answer>" in c for c in cands) == 5
    assert t.answer([item], n=6) == [cands]                     # deterministic
    with pytest.raises(TeacherError, match="no reference solution"):
        t.answer([TeacherItem("x", "q")], n=2)


def test_engine_teacher_prompts_and_sampling():
    from ovlt.data.chat_template import encode_prompt
    from ovlt.iterate.teacher import EngineTeacher
    from ovlt.rollout.base import Completion

    class Recorder:
        def __init__(self):
            self.calls = []

        def generate(self, reqs, params):
            self.calls.append((reqs, params))
            return [[Completion(r.request_id, [1], [0.0], f"{r.request_id}-{j}", "stop")
                     for j in range(params.n)] for r in reqs]

    eng = Recorder()
    t = EngineTeacher(eng, max_tokens=77, temperature=0.6, top_p=0.9, seed=5, batch_size=1)
    out = t.answer(ITEMS, n=2)
    assert out == [["p1-0", "p1-1"], ["p2-0", "p2-1"]]
    assert len(eng.calls) == 2  # batch_size=1
    req, params = eng.calls[0][0][0], eng.calls[0][1]
    assert req.prompt_ids == encode_prompt(teacher_prompt(ITEMS[0]))  # text-only chat prompt
    assert req.pixel_values is None
    assert (params.n, params.max_new_tokens, params.temperature, params.top_p, params.seed) == \
        (2, 77, 0.6, 0.9, 5)
