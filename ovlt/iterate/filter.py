"""Verify-and-keep-shortest filter for SFT chains (OpenVLThinker's data recipe).

For one problem with several candidate chains:
  1. normalise each chain to `<think>reasoning</think>\n<answer>final</answer>`;
  2. cut the self-reflection tail at the first "Wait," (configurable marker) that follows a point
     where the chain has already stated the correct answer (the cut chain keeps that answer);
  3. keep the chains whose final answer verifies against the ground truth;
  4. return the shortest one (ties: the earliest candidate), when at least `min_verified` of
     the candidates verify (default 1, the recipe). Above 1 it is a pass-rate filter: an answer
     guessed right once rarely comes out right again, so the kept chains are ones the model
     (or teacher) can reproduce, not lucky guesses behind a wrong chain.
`verify(response, ground_truth) -> bool` is injected (the loop passes `ovlt.rewards.math_reward`)
so the rules here are testable with hand-made chains.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

Verify = Callable[[str, str], bool]

_THINK_OPEN = "<think>"
_THINK_CLOSE = "</think>"
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.S)
_ANSWER_IS_RE = re.compile(r"answer is[:\s]*\$?([^\n$]+?)\$?\s*(?:\.|$|\n)", re.I)
_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


def last_boxed(text: str) -> Optional[str]:
    """Content of the last `\\boxed{...}` with nested braces, or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


def final_answer(text: str) -> Optional[str]:
    """The chain's final answer: last `<answer>` tag, else last `\\boxed{}`, else None."""
    tags = _ANSWER_RE.findall(text)
    if tags:
        return tags[-1].strip()
    return last_boxed(text)


def stated_answer(prefix: str) -> Optional[str]:
    """The answer a partial chain has stated most recently (for the "Wait," cut): an answer
    tag, a `\\boxed{}`, an "answer is X" phrase, else the last number. Whichever occurs last."""
    cands: list[tuple[int, str]] = []
    for m in _ANSWER_RE.finditer(prefix):
        cands.append((m.start(), m.group(1).strip()))
    b = prefix.rfind("\\boxed{")
    if b >= 0 and last_boxed(prefix) is not None:
        cands.append((b, last_boxed(prefix)))
    for m in _ANSWER_IS_RE.finditer(prefix):
        cands.append((m.start(), m.group(1).strip()))
    if cands:
        return max(cands, key=lambda c: c[0])[1]
    nums = _NUMBER_RE.findall(prefix)
    return nums[-1] if nums else None


def split_chain(text: str) -> tuple[str, Optional[str]]:
    """(reasoning, final answer) of a teacher/model chain in any of the usual layouts."""
    answer = final_answer(text)
    if _THINK_CLOSE in text:
        reasoning = text.split(_THINK_CLOSE, 1)[0]
    else:
        reasoning = _ANSWER_RE.sub("", text)
    reasoning = reasoning.replace(_THINK_OPEN, "").strip()
    return reasoning, answer


def format_chain(reasoning: str, answer: str) -> str:
    return f"{_THINK_OPEN}\n{reasoning.strip()}\n{_THINK_CLOSE}\n<answer>{answer.strip()}</answer>"


def cut_at_marker(reasoning: str, ground_truth: str, verify: Verify,
                  marker: str = "Wait,") -> tuple[str, bool]:
    """Cut `reasoning` at the first `marker` preceded by a correctly stated answer.
    Returns (reasoning, was_cut)."""
    pos = reasoning.find(marker)
    while pos >= 0:
        said = stated_answer(reasoning[:pos])
        if said is not None and verify(f"<answer>{said}</answer>", ground_truth):
            return reasoning[:pos].rstrip(), True
        pos = reasoning.find(marker, pos + len(marker))
    return reasoning, False


@dataclass
class FilterResult:
    chain: Optional[str]      # the kept chain (normalised), None when nothing verified
    n_candidates: int
    n_verified: int
    was_cut: bool
    index: int = -1           # which candidate was kept


def select_chain(candidates: list[str], ground_truth: str, verify: Verify,
                 cut_at_wait: bool = True, marker: str = "Wait,",
                 min_verified: int = 1) -> FilterResult:
    """Normalise, cut, verify, keep the shortest. See the module docstring."""
    best: Optional[tuple[int, int, str, bool]] = None  # (length, index, chain, was_cut)
    n_ok = 0
    for i, text in enumerate(candidates):
        reasoning, answer = split_chain(text or "")
        if answer is None or not verify(f"<answer>{answer}</answer>", ground_truth):
            continue
        n_ok += 1
        cut = False
        if cut_at_wait and marker:
            reasoning, cut = cut_at_marker(reasoning, ground_truth, verify, marker)
        chain = format_chain(reasoning, answer)
        if best is None or len(chain) < best[0]:
            best = (len(chain), i, chain, cut)
    if best is None or n_ok < min_verified:
        return FilterResult(None, len(candidates), n_ok, False)
    return FilterResult(best[2], len(candidates), n_ok, best[3], best[1])
