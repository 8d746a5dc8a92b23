"""Verifiable rewards: `math_reward` (answer correctness) and `format_reward` (tag structure).

Grading of an extracted answer against the ground truth (`score_answer`), in order:
  1. multiple choice — when the truth names an option letter ("B", "(B)"), the answer's letter
     ("B", "(B) 3", "B.", "Option B") decides; with `choices` given, option text ("3") is mapped
     to its letter too. When the truth is not a letter, a leading option label on the answer
     ("(B) 3") is dropped, or, with `choices`, a bare letter is replaced by its option text;
  2. rule-based equality after mathruler-style normalisation (`normalize.grade_answer`);
  3. math-verify (`math_verify.parse` + `verify`) on both sides, only when both look like math
     (no plain words, which sympy would read as products of symbols) and neither contains LaTeX
     that could make sympy hang or blow up (macro definitions, deep nesting, exponent towers,
     huge exponents). Those are graded by the rules alone.
A collection answer (tuple / list / set / interval) with some but not all elements right earns
`partial_credit` (0.0 by default, e.g. 0.5), everything else 1.0 or 0.0.
"""
from __future__ import annotations

import re
import threading
from typing import Optional, Sequence

from ovlt.logging import get_logger
from ovlt.rewards.extract import Fallback, extract_boxed, extract_final_answer
from ovlt.rewards.normalize import (choice_letter, match_fraction, normalize_answer,
                                    strip_choice_label)

logger = get_logger(__name__)

_DANGEROUS_TEX = re.compile(
    r"\\(?:def|edef|gdef|xdef|let|newcommand|renewcommand|providecommand|DeclareMathOperator|"
    r"input|include|csname|catcode|expandafter|loop|repeat|write|immediate|openout|read)"
    r"(?![a-zA-Z])")
_POWER_TOWER = re.compile(r"\^\s*\{?[^{}^]*\^")          # a^{b^c}
_BIG_EXPONENT = re.compile(r"(?:\^|\*\*)\s*\{?\s*-?\d{4,}"       # 10^{12345}
                          r"|[)\]}]\s*(?:\^|\*\*)\s*\{?\s*-?\d{3,}")  # (x+1)^{999}: expansion
_FACTORIAL_BIG = re.compile(r"\d{4,}\s*!")
_MATH_WORDS = re.compile(
    r"\\[a-zA-Z]+|\b(?:sqrt|sin|cos|tan|cot|sec|csc|log|ln|exp|pi|inf|infty|arcsin|arccos|"
    r"arctan|frac|cdot|times|le|ge|neq|in|cup|cap)\b", re.IGNORECASE)
MAX_MATH_VERIFY_CHARS = 300
MATH_VERIFY_TIMEOUT_S = 5  # math-verify's own SIGALRM limit per parse / verify
MAX_BRACE_DEPTH = 12


def _brace_depth(s: str) -> int:
    depth = best = 0
    for c in s:
        if c in "{([":
            depth += 1
            best = max(best, depth)
        elif c in "})]":
            depth -= 1
    return best


def safe_for_sympy(s: str) -> bool:
    """Whether handing `s` to sympy is reasonably safe (it is still run under a timeout)."""
    return (len(s) <= MAX_MATH_VERIFY_CHARS and not _DANGEROUS_TEX.search(s)
            and not _POWER_TOWER.search(s) and not _BIG_EXPONENT.search(s)
            and not _FACTORIAL_BIG.search(s) and _brace_depth(s) <= MAX_BRACE_DEPTH)


def looks_like_math(s: str) -> bool:
    """False for answers containing plain words (3+ letters that are not a known function)."""
    rest = _MATH_WORDS.sub(" ", s)
    return re.search(r"[A-Za-z]{3,}", rest) is None


def _math_verify_equal(given: str, truth: str) -> bool:
    if not (safe_for_sympy(given) and safe_for_sympy(truth)):
        return False
    if not (looks_like_math(given) and looks_like_math(truth)):
        return False
    try:
        from math_verify import parse, verify
    except ImportError:  # pragma: no cover - math-verify is a hard dependency
        return False
    # math-verify times itself out with SIGALRM, which only works on a process's main thread;
    # elsewhere (threads) we rely on the caller's process-level timeout (RewardPool).
    t = MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    try:
        gold = parse(f"${truth}$", parsing_timeout=t)
        pred = parse(f"${given}$", parsing_timeout=t)
        if not gold or not pred:
            return False
        return bool(verify(gold, pred, timeout_seconds=t))
    except Exception as e:  # math-verify raises on odd input; a grader error is a wrong answer
        logger.debug("math-verify failed on %r vs %r: %s", given, truth, e)
        return False


def warmup() -> None:
    """Pay math-verify's lazy imports now (RewardPool workers call this before taking items)."""
    _math_verify_equal("\\frac{1}{2}", "0.5")
    _math_verify_equal("x^2+2x+1", "(x+1)^2")


def _is_letter_truth(truth: str) -> bool:
    return re.fullmatch(r"\s*[\(\[]?[A-H][\)\]]?\s*", truth) is not None


def score_answer(given: Optional[str], truth: Optional[str], partial_credit: float = 0.0,
                 choices: Optional[Sequence[str]] = None) -> float:
    """Score an extracted answer against the truth: 1.0, `partial_credit` or 0.0."""
    if given is None or truth is None:
        return 0.0
    given, truth = str(given).strip(), str(truth).strip()
    for _ in range(2):  # "<answer>\\boxed{..}</answer>": grade the box's content
        inner = extract_boxed(given) if given.startswith(("\\boxed", "\\fbox")) else None
        if inner:
            given = inner
    if not given or not truth:
        return 0.0
    letters = "ABCDEFGH"
    if _is_letter_truth(truth):
        t_letter = choice_letter(truth)
        g_letter = choice_letter(given)
        if g_letter is None and choices:
            g_letter = option_letter_for_text(given, choices)
        if g_letter is not None:
            return 1.0 if g_letter == t_letter else 0.0
    else:
        g_letter = choice_letter(given)
        if g_letter is not None:
            if strip_choice_label(given) != given:
                given = strip_choice_label(given)         # "(B) 3" -> "3"
            elif choices and letters.index(g_letter) < len(choices):
                given = str(choices[letters.index(g_letter)])  # "B" -> option B's text
    frac = match_fraction(given, truth)
    if frac == 1.0 or _math_verify_equal(given, truth):
        return 1.0
    return float(partial_credit) if (partial_credit and frac > 0) else 0.0


def option_letter_for_text(given: str, choices: Sequence[str]) -> Optional[str]:
    """The letter of the option whose text equals `given` after normalisation (unique match)."""
    g = normalize_answer(given)
    hits = [i for i, c in enumerate(choices) if normalize_answer(str(c)) == g or
            match_fraction(given, str(c)) == 1.0]
    if len(hits) == 1 and hits[0] < 8:
        return "ABCDEFGH"[hits[0]]
    return None


def math_reward(response: str, ground_truth: str, partial_credit: float = 0.0,
                fallback: Fallback = "none", choices: Optional[Sequence[str]] = None) -> float:
    """1.0 when the response's final answer equals the ground truth, `partial_credit` for a
    partly right collection answer, else 0.0. See `ovlt.rewards.extract` for which answer is
    graded; `choices` (option texts, A first) lets letters and option texts stand for each other."""
    if not isinstance(response, str) or ground_truth is None:
        return 0.0
    answer, _ = extract_final_answer(response, fallback)
    return score_answer(answer, str(ground_truth), partial_credit, choices=choices)


_TAG_RE = re.compile(r"</?(?:think|answer)>", re.IGNORECASE)
_FORMAT_RE = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL | re.IGNORECASE)


def format_reward(response: str) -> float:
    """1.0 when the response is exactly `<think>...</think>` followed by one non-empty
    `<answer>...</answer>` (only whitespace around them, no other think/answer tags), else 0.0."""
    if not isinstance(response, str):
        return 0.0
    tags = [t.lower() for t in _TAG_RE.findall(response)]
    if tags != ["<think>", "</think>", "<answer>", "</answer>"]:
        return 0.0
    m = _FORMAT_RE.fullmatch(response)
    if not m or not m.group(2).strip():
        return 0.0
    return 1.0


def total_reward(response: str, ground_truth: str, partial_credit: float = 0.0,
                 fallback: Fallback = "none", format_weight: float = 0.0,
                 choices: Optional[Sequence[str]] = None) -> float:
    """The GRPO reward: (1 - format_weight) * math_reward + format_weight * format_reward
    (EasyR1's weighting; format_weight = 0 is the accuracy reward alone)."""
    acc = math_reward(response, ground_truth, partial_credit, fallback, choices)
    if not format_weight:
        return acc
    return (1.0 - format_weight) * acc + format_weight * format_reward(response)
