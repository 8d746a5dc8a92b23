"""Find the final answer in a model response (the `ovlt` reward style; the reference styles
extract their own way, see `ovlt.rewards.styles`).

Everything is searched in the text after the last `</think>` when the response has one (an
answer that appears only inside the thinking is not an answer), else in the whole response.
Order (first that yields a non-empty answer wins):
  1. the LAST well-formed `<answer>...</answer>` pair (content stripped; an empty pair is skipped);
  2. the LAST `\\boxed{...}` (mathruler's `extract_boxed_content`; `\\fbox` counts as `\\boxed`);
  3. the configurable fallback: "none" (no answer), "last_number" (the last number in the text
     after `</think>`), "last_line" (the last non-empty line after `</think>`).
Inputs longer than `MAX_RESPONSE_CHARS` are cut to their tail (the final answer sits at the end)
so a pathological response can't make extraction slow.
"""
from __future__ import annotations

import re
from typing import Literal, Optional

from mathruler.grader import extract_boxed_content

Fallback = Literal["none", "last_number", "last_line"]

MAX_RESPONSE_CHARS = 200_000
MAX_ANSWER_CHARS = 2_000  # an "answer" longer than this is not an answer

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_NUMBER_RE = re.compile(r"[-+\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|[-+\u2212]?\.\d+")


def after_think(text: str) -> str:
    """The part of the response after the last `</think>` (the whole text when there is none)."""
    i = text.lower().rfind("</think>")
    return text if i < 0 else text[i + len("</think>"):]


def thinking_unfinished(text: str) -> bool:
    """A `<think>` with no `</think>` after it: the response was cut inside its thinking."""
    low = text.lower()
    return low.rfind("<think>") > low.rfind("</think>")


def extract_answer_tag(text: str) -> Optional[str]:
    """Content of the last non-empty `<answer>...</answer>`; nested opening tags inside the
    pair make it malformed, in which case the text after the innermost `<answer>` is used."""
    found = None
    for m in _ANSWER_RE.finditer(text):
        body = m.group(1)
        # "<answer> a <answer> b </answer>": the regex pairs the first open with the close;
        # the well-formed pair is the innermost one.
        j = body.lower().rfind("<answer>")
        if j >= 0:
            body = body[j + len("<answer>"):]
        body = body.strip()
        if body:
            found = body
    return found


def extract_boxed(text: str) -> Optional[str]:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (None when absent, unclosed or empty)."""
    if "box" not in text:
        return None
    body = extract_boxed_content(text.replace("\\fbox{", "\\boxed{"))
    return body if body and body != "None" else None


def extract_last_number(text: str) -> Optional[str]:
    nums = _NUMBER_RE.findall(text)
    return nums[-1] if nums else None


def extract_last_line(text: str) -> Optional[str]:
    for line in reversed(text.splitlines()):
        if line.strip():
            return line.strip()
    return None


def extract_final_answer(response: str, fallback: Fallback = "none") -> tuple[Optional[str], str]:
    """Return (answer or None, source) with source in answer_tag | boxed | last_number | last_line
    | none."""
    if fallback not in ("none", "last_number", "last_line"):
        raise ValueError(f"fallback must be none | last_number | last_line, got {fallback!r}")
    text = response[-MAX_RESPONSE_CHARS:] if len(response) > MAX_RESPONSE_CHARS else response
    tail = after_think(text)
    ans = extract_answer_tag(tail)
    if ans is not None:
        return _cap(ans), "answer_tag"
    ans = extract_boxed(tail)
    if ans is not None:
        return _cap(ans), "boxed"
    if fallback == "last_number":
        ans = extract_last_number(tail)
    elif fallback == "last_line":
        ans = extract_last_line(tail)
    if ans is not None:
        return _cap(ans), fallback
    return None, "none"


def _cap(ans: str) -> Optional[str]:
    return ans if len(ans) <= MAX_ANSWER_CHARS else None
