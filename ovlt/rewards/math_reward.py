"""Verifiable rewards in three styles (`rewards.style`; docs/REWARDS.md compares them):

  ovlt           the most correct grader we can make: the last `<answer>` (or `\\boxed{}`) after
                 the thinking, graded by `ovlt.rewards.grading.score_answer` (mathruler, then
                 math-verify, behind a sympy safety guard; options; partial credit);
  openvlthinker  OpenVLThinker's GRPO reward (r1v.py), quirks included (`ovlt.rewards.styles`);
  easyr1         EasyR1's math.py reward (`ovlt.rewards.styles`).

`math_reward` is the accuracy part, `format_reward` the style's format check, `total_reward`
their EasyR1 weighting (1 - w) * accuracy + w * format, w = `format_weight` or the style's own
default (None: 0 for ovlt and openvlthinker, 0.1 for easyr1). `partial_credit`, `fallback` and
`choices` are `ovlt`-style options; the reference styles refuse them rather than ignore them.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

from ovlt.rewards import styles
from ovlt.rewards.extract import Fallback, extract_final_answer
from ovlt.rewards.grading import score_answer
from ovlt.rewards.grading import warmup as _warmup_grader


def _check_options(style: str, partial_credit: float, fallback: str, choices) -> None:
    styles.check_style(style)
    if style != "ovlt" and (partial_credit or fallback != "none" or choices):
        raise ValueError(f"reward style {style!r} reproduces its reference as is: partial_credit, "
                         f"fallback and choices are options of the 'ovlt' style only")


def math_reward(response: str, ground_truth: str, partial_credit: float = 0.0,
                fallback: Fallback = "none", choices: Optional[Sequence[str]] = None,
                style: str = "ovlt") -> float:
    """The accuracy reward of `style` for one response (1.0, 0.0, or for `ovlt`
    `partial_credit` for a partly right collection; 0.5 where openvlthinker halves)."""
    _check_options(style, partial_credit, fallback, choices)
    if style == "openvlthinker":
        return styles.openvlthinker_accuracy(response, ground_truth)
    if not isinstance(response, str) or ground_truth is None:
        return 0.0
    if style == "easyr1":
        return styles.easyr1_accuracy(response, str(ground_truth))
    answer, _ = extract_final_answer(response, fallback)
    return score_answer(answer, str(ground_truth), partial_credit, choices=choices)


_TAG_RE = re.compile(r"</?(?:think|answer)>", re.IGNORECASE)
_FORMAT_RE = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL | re.IGNORECASE)


def format_reward(response: str, style: str = "ovlt") -> float:
    """1.0 when the response has the style's format. `ovlt`: exactly `<think>...</think>` then
    one non-empty `<answer>...</answer>` (only whitespace around them, no other think/answer
    tags); the reference styles: their own checks (`ovlt.rewards.styles`)."""
    styles.check_style(style)
    if not isinstance(response, str):
        return 0.0
    if style == "openvlthinker":
        return styles.openvlthinker_format(response)
    if style == "easyr1":
        return styles.easyr1_format(response)
    tags = [t.lower() for t in _TAG_RE.findall(response)]
    if tags != ["<think>", "</think>", "<answer>", "</answer>"]:
        return 0.0
    m = _FORMAT_RE.fullmatch(response)
    if not m or not m.group(2).strip():
        return 0.0
    return 1.0


def resolve_format_weight(style: str, format_weight: Optional[float]) -> float:
    return styles.DEFAULT_FORMAT_WEIGHT[styles.check_style(style)] if format_weight is None \
        else float(format_weight)


def combine(accuracy: float, fmt: float, format_weight: float) -> float:
    """EasyR1's weighting; format_weight = 0 is the accuracy alone."""
    return accuracy if not format_weight else (1.0 - format_weight) * accuracy + format_weight * fmt


def total_reward(response: str, ground_truth: str, partial_credit: float = 0.0,
                 fallback: Fallback = "none", format_weight: Optional[float] = None,
                 choices: Optional[Sequence[str]] = None, style: str = "ovlt") -> float:
    """The GRPO reward: (1 - w) * math_reward + w * format_reward (see the module docstring)."""
    w = resolve_format_weight(style, format_weight)
    acc = math_reward(response, ground_truth, partial_credit, fallback, choices, style)
    return combine(acc, format_reward(response, style) if w else 0.0, w)


def warmup() -> None:
    """Pay the graders' lazy imports now (RewardPool workers call this before taking items)."""
    _warmup_grader()
    styles.easyr1_accuracy("\\boxed{x^2}", "x**2")
