"""The reference rewards, behaviour for behaviour (quirks included), graded by mathruler.

`openvlthinker` — the GRPO reward OpenVLThinker v1.2's EasyR1 config names
(`train/easyr1/examples/reward_function/r1v.py`, `compute_score`; its "overall" is accuracy):
  - the answer is the FIRST `<answer>...</answer>` whose content sits on one line (the pattern
    has no DOTALL flag, and is case-sensitive); without such a pair the WHOLE response
    (thinking included) is graded;
  - no `\\boxed{}` fallback;
  - right when mathruler's `grade_answer(answer, truth.strip())` holds or the lower-cased answer
    equals the lower-cased (unstripped) truth;
  - a right answer earns 0.5 instead of 1.0 when the response has `</think>` and `<answer>` and
    nothing but whitespace between the last `</think>` and the next `<answer>`;
  - any exception (a non-string truth) scores 0.
  Its format check (not part of the reward): the whole response is
  `<think>...</think>` + whitespace + `<answer>...</answer>`.
`easyr1` — EasyR1's `examples/reward_function/math.py`:
  - whitespace around `<`, `>` and `/` is removed from the whole response first (the answer
    included: "1 / 2" becomes "1/2");
  - the answer is the content of the LAST `\\boxed{` (mathruler's `extract_boxed_content`, the
    string "None" when there is none), graded by `grade_answer(answer, truth)`;
  - format: `<think>.*</think>.*\\boxed{.*}.*` over the whole response;
  - overall = (1 - w) * accuracy + w * format with w = 0.1 by default.
"""
from __future__ import annotations

import re

from mathruler.grader import extract_boxed_content, grade_answer

STYLES = ("ovlt", "openvlthinker", "easyr1")
# The format weight each style uses when `rewards.format_weight` is left unset (None).
DEFAULT_FORMAT_WEIGHT = {"ovlt": 0.0, "openvlthinker": 0.0, "easyr1": 0.1}

_R1V_ANSWER = re.compile(r"<answer>(.*?)</answer>")
_R1V_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
_EASYR1_SPACES = re.compile(r"\s*([</>])\s*")
_EASYR1_FORMAT = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)


def check_style(style: str) -> str:
    if style not in STYLES:
        raise ValueError(f"reward style must be one of {', '.join(STYLES)}, got {style!r}")
    return style


def openvlthinker_answer(response: str) -> str:
    """What r1v grades: the first one-line `<answer>` pair's content, else the whole response."""
    m = _R1V_ANSWER.search(response)
    return (m.group(1) if m else response).strip()


def openvlthinker_nothing_between(response: str) -> bool:
    """r1v's 0.5 rule: `</think>` and `<answer>` both present with only whitespace between the
    last `</think>` and the first `<answer>` after it."""
    if "</think>" not in response or "<answer>" not in response:
        return False
    tail = response[response.rfind("</think>") + len("</think>"):]
    return tail.split("<answer>", 1)[0].strip() == ""


def openvlthinker_accuracy(response: str, ground_truth: str) -> float:
    try:
        scale = 0.5 if openvlthinker_nothing_between(response) else 1.0
        given = openvlthinker_answer(response)
        right = grade_answer(given, ground_truth.strip()) or given.lower() == ground_truth.lower()
        return scale if right else 0.0
    except Exception:  # r1v scores any failure (e.g. a non-string truth) as 0
        return 0.0


def openvlthinker_format(response: str) -> float:
    return 1.0 if isinstance(response, str) and _R1V_FORMAT.fullmatch(response) else 0.0


def easyr1_clean(response: str) -> str:
    return _EASYR1_SPACES.sub(r"\1", response)


def easyr1_accuracy(response: str, ground_truth: str) -> float:
    answer = extract_boxed_content(easyr1_clean(response))
    return 1.0 if grade_answer(answer, ground_truth) else 0.0


def easyr1_format(response: str) -> float:
    return 1.0 if _EASYR1_FORMAT.fullmatch(easyr1_clean(response)) else 0.0
