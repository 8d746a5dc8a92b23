"""Rule-based answer extraction for benchmark scoring (no LLM by default).

Which text is searched: the text after the last `</think>`; when that is empty (a model that
answers inside its thinking) the whole response. A response cut inside its thinking (`<think>`
without `</think>`, e.g. at max tokens) has no answer unless it holds an `<answer>` pair: the last
number of unfinished reasoning is not an answer (OpenVLThinker scores truncation 0 as well).
Then, first hit wins:
  1. `<answer>...</answer>`  — the last non-empty pair;
  2. `\\boxed{...}` / `\\fbox{...}` — the last closed one (nested braces);
  3. "the answer is X" / "final answer: X" / "answer: X" — the last such phrase; X runs to the end
     of its line (a trailing period is dropped);
  4. multiple choice: the last standalone option letter ("(B)", "B.", "option B", or a lone
     capital letter within the options' range); free form: the last number.
Returns (answer or None, source) with source in answer_tag | boxed | phrase | letter | number |
truncated | none.
"""
from __future__ import annotations

import re
from typing import Optional

from ovlt.rewards.extract import (MAX_RESPONSE_CHARS, after_think, extract_answer_tag,
                                  extract_boxed, extract_last_number, thinking_unfinished)

_PHRASE_RE = re.compile(
    r"(?:the\s+)?(?:final\s+|correct\s+)?answer\s*(?:is|:)\s*:?\s*(.+)", re.IGNORECASE)
_LETTER_FORMS = [
    r"\(([A-H])\)",                     # (B)
    r"\b(?:option|choice)\s+\(?([A-H])\)?\b",
    r"(?:^|\s)([A-H])[.:)](?=\s|$)",     # B.  B:  B)
    r"(?:^|[\s*])([A-H])(?=[\s*.,]*$)",  # a lone letter at the very end
]


_CONTINUATION_RE = re.compile(r"\s*(?:,\s*)?\b(?:because|since|as shown|which is|which means|"
                              r"so that|given that)\b.*$", re.IGNORECASE)


def _strip_phrase(s: str) -> str:
    s = s.strip().splitlines()[0].strip() if s.strip() else ""
    s = _CONTINUATION_RE.sub("", s)                  # "12 because 3 x 4 = 12" -> "12"
    s = re.sub(r"^\*+|\*+$", "", s).strip()          # markdown bold
    s = re.sub(r"[.。]\s*$", "", s).strip()
    return s


def extract_letter(text: str, n_options: int) -> Optional[str]:
    """The last option letter standing on its own in `text` (A.. up to n_options)."""
    allowed = "ABCDEFGH"[:max(n_options, 1)]
    best: tuple[int, Optional[str]] = (-1, None)
    for form in _LETTER_FORMS:
        for m in re.finditer(form, text, re.IGNORECASE if "option" in form else 0):
            letter = m.group(1).upper()
            if letter in allowed and m.start(1) > best[0]:
                best = (m.start(1), letter)
    return best[1]


def extract_eval_answer(response: str, multiple_choice: bool = False,
                        n_options: int = 5) -> tuple[Optional[str], str]:
    text = response[-MAX_RESPONSE_CHARS:] if len(response) > MAX_RESPONSE_CHARS else response
    if thinking_unfinished(text):
        ans = extract_answer_tag(text)
        return (ans, "answer_tag") if ans else (None, "truncated")
    tail = after_think(text)
    if not tail.strip():
        tail = text.replace("<think>", " ").replace("</think>", " ")
    ans = extract_answer_tag(tail)
    if ans:
        return ans, "answer_tag"
    ans = extract_boxed(tail)
    if ans:
        return ans, "boxed"
    phrases = list(_PHRASE_RE.finditer(tail))
    if phrases:
        ans = _strip_phrase(phrases[-1].group(1))
        if ans:
            return ans, "phrase"
    if multiple_choice:
        letter = extract_letter(tail, n_options)
        if letter:
            return letter, "letter"
    num = extract_last_number(tail)
    if num:
        return num, "number"
    return None, "none"
