"""Teachers: who writes round 1's reasoning chains from an image caption + the question.

`Teacher.answer(items, n) -> list[list[str]]` (n candidate chains per item, in item order).
  - OpenAITeacher: an OpenAI-compatible chat endpoint (`vllm serve Qwen/QwQ-32B`,
    `.../v1/chat/completions`), with a timeout per request, retries with backoff on connection
    errors / 429 / 5xx, a clear error on other HTTP errors, and a bounded thread pool.
  - EngineTeacher: an in-process rollout engine on a (Qwen2.5-VL) model directory, text only.
  - SyntheticTeacher: the synthetic generator's step-by-step solutions, plus deterministic
    distractors (a wrong final answer, a "Wait," self-check tail) so the verify-and-shortest
    filter has real work to do — the embedded demo's teacher, no model needed.
"""
from __future__ import annotations

import json
import os
import random
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

from ovlt.logging import get_logger

log = get_logger(__name__)

PROMPT_TEMPLATE = (
    "You are given a detailed description of an image and a question about the image.\n\n"
    "Image description:\n{caption}\n\nQuestion: {question}\n\n"
    "Reason step by step, then give the final answer inside \\boxed{{}}.")


@dataclass
class TeacherItem:
    id: str
    question: str                      # without the <image> placeholder
    caption: str = ""
    answer: Optional[str] = None       # ground truth (only the synthetic teacher looks at it)
    solution: Optional[str] = None     # reference solution (synthetic teacher)


class TeacherError(RuntimeError):
    pass


class Teacher:
    def answer(self, items: list[TeacherItem], n: int) -> list[list[str]]:
        raise NotImplementedError


def teacher_prompt(item: TeacherItem) -> str:
    return PROMPT_TEMPLATE.format(caption=item.caption.strip() or "(no description)",
                                  question=item.question.replace("<image>", "").strip())


# ------------------------------------------------------------------------- OpenAI endpoint
class OpenAITeacher(Teacher):
    RETRY_CODES = (408, 409, 429, 500, 502, 503, 504)

    def __init__(self, url: str, model: str, max_tokens: int = 4096, temperature: float = 0.7,
                 top_p: float = 0.95, timeout_s: float = 600.0, retries: int = 3,
                 backoff_s: float = 2.0, concurrency: int = 8, api_key: Optional[str] = None):
        if not url:
            raise TeacherError("iterate.teacher.url is required for teacher kind 'openai' "
                               "(e.g. http://host:8000/v1)")
        base = url.rstrip("/")
        self.endpoint = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model, self.max_tokens = model, max_tokens
        self.temperature, self.top_p = temperature, top_p
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.concurrency = max(1, concurrency)
        self.api_key = api_key
        self.stats = {"requests": 0, "retries": 0, "failed_items": 0}

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats["retries"] += 1
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            self.stats["requests"] += 1
            req = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                if e.code not in self.RETRY_CODES:
                    raise TeacherError(f"teacher endpoint {self.endpoint} answered HTTP {e.code}: "
                                       f"{detail}") from None
                last = TeacherError(f"HTTP {e.code}: {detail}")
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = e
            except json.JSONDecodeError as e:
                last = TeacherError(f"invalid JSON from {self.endpoint}: {e}")
            log.warning("teacher request failed (attempt %d/%d): %s", attempt + 1,
                        self.retries + 1, last)
        raise TeacherError(f"teacher endpoint {self.endpoint} failed after {self.retries + 1} "
                           f"attempts (timeout {self.timeout_s}s): {last}")

    @staticmethod
    def _texts(resp: dict) -> list[str]:
        out = []
        for ch in resp.get("choices") or []:
            msg = ch.get("message") or {}
            content = msg.get("content") or ""
            # vLLM's reasoning parsers put the thinking in a separate field.
            reasoning = msg.get("reasoning_content") or msg.get("reasoning")
            out.append(f"<think>\n{reasoning}\n</think>\n{content}" if reasoning else content)
        return out

    def _one(self, item: TeacherItem, n: int) -> list[str]:
        texts: list[str] = []
        # Servers may cap or ignore `n`: ask again for what is missing (bounded).
        for _ in range(n):
            body = {"model": self.model, "n": n - len(texts),
                    "messages": [{"role": "user", "content": teacher_prompt(item)}],
                    "max_tokens": self.max_tokens, "temperature": self.temperature,
                    "top_p": self.top_p}
            texts += self._texts(self._post(body))
            if len(texts) >= n:
                break
        return texts[:n]

    def answer(self, items: list[TeacherItem], n: int) -> list[list[str]]:
        def safe(item):
            try:
                return self._one(item, n)
            except TeacherError as e:
                if "failed after" not in str(e):
                    raise  # a 4xx is a configuration error: stop
                self.stats["failed_items"] += 1
                log.warning("teacher gave up on item %s: %s", item.id, e)
                return []
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(safe, items))


# ------------------------------------------------------------------------- synthetic
_ANS_RE = re.compile(r"<answer>(.*?)</answer>", re.S)


def _wrong(answer: str) -> str:
    try:
        return str(int(answer) + 1)
    except ValueError:
        try:
            return str(float(answer) + 1.0)
        except ValueError:
            return "none of these"


class SyntheticTeacher(Teacher):
    """Candidates per problem: `wrong` chains with a wrong final answer, the rest either the
    reference solution or the solution with a "Wait," self-check tail, chosen by a RNG seeded
    from (seed, item id)."""

    def __init__(self, seed: int = 0, wrong: int = 1):
        self.seed, self.wrong = seed, wrong

    def answer(self, items: list[TeacherItem], n: int) -> list[list[str]]:
        out = []
        for it in items:
            if not it.solution or it.answer is None:
                raise TeacherError(f"synthetic teacher: item {it.id} has no reference solution "
                                   "(iterate.prepare.solution_files / synthesized pool)")
            rng = random.Random(f"{self.seed}:{it.id}")
            body = _ANS_RE.sub("", it.solution).replace("<think>", "").replace("</think>", "").strip()
            cands = []
            for i in range(n):
                if i < self.wrong:
                    cands.append(f"<think>\n{body}\n</think>\n<answer>{_wrong(it.answer)}</answer>")
                elif rng.random() < 0.5:
                    cands.append(f"<think>\n{body}\n</think>\n<answer>{it.answer}</answer>")
                else:
                    cands.append(f"<think>\n{body}\nSo the answer is {it.answer}.\nWait, let me "
                                 f"double-check the image once more.\n{body}\n</think>\n"
                                 f"<answer>{it.answer}</answer>")
            rng.shuffle(cands)
            out.append(cands)
        return out


# ------------------------------------------------------------------------- in-process engine
class EngineTeacher(Teacher):
    """A rollout engine (ovlt.rollout) on a model directory, text-only prompts."""

    def __init__(self, engine, max_tokens: int, temperature: float, top_p: float, seed: int = 0,
                 batch_size: int = 16):
        self.engine, self.max_tokens = engine, max_tokens
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.batch_size = batch_size

    def answer(self, items: list[TeacherItem], n: int) -> list[list[str]]:
        from ovlt.data.chat_template import encode_prompt
        from ovlt.rollout.base import GenerationRequest, SamplingParams
        params = SamplingParams(temperature=self.temperature, top_p=self.top_p,
                                max_new_tokens=self.max_tokens, n=n, seed=self.seed,
                                logprobs=False)
        out: list[list[str]] = []
        for s in range(0, len(items), self.batch_size):
            chunk = items[s:s + self.batch_size]
            reqs = [GenerationRequest(prompt_ids=encode_prompt(teacher_prompt(it)),
                                      prompt_text=teacher_prompt(it), request_id=it.id)
                    for it in chunk]
            out += [[c.text for c in comps] for comps in self.engine.generate(reqs, params)]
        return out


def make_teacher(tcfg, seed: int = 0, engine_factory=None) -> Teacher:
    if tcfg.kind == "synthetic":
        return SyntheticTeacher(seed=seed, wrong=tcfg.synthetic_wrong)
    if tcfg.kind == "openai":
        return OpenAITeacher(tcfg.url, tcfg.model, tcfg.max_tokens, tcfg.temperature, tcfg.top_p,
                             tcfg.timeout_s, tcfg.retries, tcfg.retry_backoff_s, tcfg.concurrency,
                             api_key=os.environ.get(tcfg.api_key_env) if tcfg.api_key_env else None)
    if tcfg.kind == "engine":
        if not tcfg.model_path:
            raise TeacherError("iterate.teacher.model_path is required for teacher kind 'engine'")
        if engine_factory is None:
            raise TeacherError("teacher kind 'engine' needs an engine factory")
        return EngineTeacher(engine_factory(tcfg.model_path), tcfg.max_tokens, tcfg.temperature,
                             tcfg.top_p, seed=seed)
    raise TeacherError(f"iterate.teacher.kind: {tcfg.kind!r} not allowed; allowed values: "
                       "'synthetic', 'openai', 'engine'")
