"""Optional LLM answer extractor (MathVista-style GPT extraction) over an OpenAI-compatible
`/chat/completions` endpoint. Off by default; `ovlt eval score --judge-url URL` turns it on for
responses where the rule-based extractor finds nothing (`--judge-mode always` for every item).
The model only *extracts* the answer; correctness is still decided by the rule-based scorers.
"""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from typing import Optional

from ovlt.eval.readers import LETTERS, EvalItem
from ovlt.logging import get_logger

logger = get_logger(__name__)

INSTRUCTION = (
    "Read the question and a model's response, and extract the model's final answer. "
    "For a multiple-choice question reply with the option letter only; otherwise reply with the "
    "final value only (a number, expression, list or short text), without units. If the response "
    "gives no final answer, reply with NONE.")


def judge_prompt(item: EvalItem, response: str) -> str:
    q = item.question
    if item.choices:
        q += "\nChoices:\n" + "\n".join(f"({LETTERS[k]}) {c}" for k, c in enumerate(item.choices))
    return f"{INSTRUCTION}\n\nQuestion: {q}\n\nModel response: {response[-6000:]}\n\nExtracted answer:"


class LLMJudge:
    """Callable `(item, response) -> answer or None` for `scoring.judge_response`."""

    def __init__(self, url: str, model: str = "gpt-4o-mini", api_key: Optional[str] = None,
                 timeout_s: float = 60.0, retries: int = 2):
        self.url = url.rstrip("/")
        if not self.url.endswith("/chat/completions"):
            self.url += "/chat/completions"
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get("OVLT_JUDGE_API_KEY")
        self.timeout_s = timeout_s
        self.retries = retries
        self.calls = 0
        self.failures = 0

    def _post(self, prompt: str) -> str:
        body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": 64,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            data = json.loads(resp.read().decode("utf-8"))
        return data["choices"][0]["message"]["content"]

    def __call__(self, item: EvalItem, response: str) -> Optional[str]:
        self.calls += 1
        prompt = judge_prompt(item, response)
        for attempt in range(self.retries + 1):
            try:
                text = self._post(prompt).strip()
                break
            except (urllib.error.URLError, TimeoutError, KeyError, IndexError, ValueError) as e:
                if attempt == self.retries:
                    self.failures += 1
                    logger.warning("LLM judge failed on id=%s after %d tries: %s", item.id,
                                   attempt + 1, e)
                    return None
                time.sleep(0.5 * (attempt + 1))
        text = text.removeprefix("Extracted answer:").strip()
        return None if not text or text.upper() == "NONE" else text
