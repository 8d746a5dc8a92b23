"""Per-benchmark judgement of one response, and accuracy aggregation.

MathVista (answer = option text for multi_choice):
  multi_choice — the extracted answer picks an option by letter ("B", "(B) 3") or by its text
    ("3", normalised); right when that option is the answer's option. No nearest-string guess.
  free_form by answer_type — integer: the extracted number equals the integer ("3.0" == "3");
    float: both rounded to the item's `precision` are equal ("3" == "3.0" at precision 1);
    list: same length and elementwise equal in order ("[1, 2]" == "1,2"); text: equal after
    normalisation (case, `\\text{}`, trailing period).
MathVerse: multi-choice by letter (options parsed from the question's "Choices:" block allow
  option text too); free-form with `score_answer` (rules + math-verify). Grouped by problem_version.
MathVision: options A–E by letter or option text; otherwise `score_answer`. Grouped by subject
  and level.
Numbers are read from an extracted answer after normalisation (units, %, degrees, `\\frac`,
thousands separators); when that fails, the first number in the answer ("about 5.2 cm").
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Callable, Iterable, Optional

from ovlt.eval.readers import LETTERS, EvalItem
from ovlt.eval.answers import extract_eval_answer, extract_letter
from ovlt.rewards.math_reward import option_letter_for_text, score_answer
from ovlt.rewards.normalize import (choice_letter, normalize_answer, numbers_equal,
                                    split_collection, strip_choice_label, to_number)

_NUM_IN_TEXT = re.compile(r"-?\d+(?:\.\d+)?")

# A judge maps (item, response) -> extracted answer text or None (see ovlt.eval.judge).
Judge = Callable[[EvalItem, str], Optional[str]]


def read_number(ans: Optional[str]):
    if ans is None:
        return None
    n = to_number(normalize_answer(strip_choice_label(ans)))
    if n is None:
        # "approximately 5.2 cm", "12 apples": the first number (answers lead with the value)
        nums = _NUM_IN_TEXT.findall(re.sub(r"(?<=\d),(?=\d{3}\b)", "", ans))
        if nums:
            n = to_number(nums[0])
    return n


def pick_option(ans: Optional[str], choices: list[str]) -> Optional[int]:
    """Index of the option `ans` names, by letter first, then by option text."""
    if not ans or not choices:
        return None
    letter = choice_letter(ans)
    if letter is None and re.fullmatch(r"\s*[a-h]\s*", ans):
        letter = ans.strip().upper()  # in a multiple-choice context a lone "b" is option B
    if letter is None and len(ans.strip()) > 2:
        # a sentence like "so I pick option (C)" — but not a bare lower-case variable
        letter = extract_letter(ans, len(choices)) if re.search(r"[\(\[]?[A-H][\)\].:]|option", ans, re.I) else None
    if letter is not None and LETTERS.index(letter) < len(choices):
        return LETTERS.index(letter)
    for cand in (ans, strip_choice_label(ans)):
        letter = option_letter_for_text(cand, choices)
        if letter is not None:
            return LETTERS.index(letter)
    return None


def _answer_option(answer: str, choices: list[str]) -> Optional[int]:
    if answer in choices:
        return choices.index(answer)
    letter = option_letter_for_text(answer, choices)
    return None if letter is None else LETTERS.index(letter)


def _list_elements(s: str) -> Optional[list[str]]:
    n = normalize_answer(s)
    if not n:
        return None
    col = split_collection(n)
    if col is not None:
        return [normalize_answer(x) for x in col[1]]
    if n[0] in "([" and n[-1] in ")]":  # one-element list "[5]"
        return [n[1:-1]]
    return [n]


def _elements_equal(a: str, b: str) -> bool:
    if a == b:
        return True
    x, y = to_number(a), to_number(b)
    return x is not None and y is not None and numbers_equal(x, y)


def judge_mathvista(item: EvalItem, ans: Optional[str]) -> tuple[bool, Optional[str]]:
    if ans is None:
        return False, None
    if item.question_type == "multi_choice":
        k = pick_option(ans, item.choices or [])
        t = _answer_option(item.answer, item.choices or [])
        return (k is not None and k == t), (None if k is None else item.choices[k])
    atype = (item.answer_type or "text").lower()
    if atype == "integer":
        n = read_number(ans)
        try:
            truth = int(float(item.answer))
        except ValueError:
            return False, ans
        return (n is not None and n == truth), None if n is None else str(n)
    if atype == "float":
        n = read_number(ans)
        p = item.precision if item.precision is not None else 2
        if n is None:
            return False, None
        try:
            ok = round(float(n), p) == round(float(item.answer), p)
        except (ValueError, OverflowError):
            return False, str(n)
        return ok, f"{float(n):.{p}f}"
    if atype == "list":
        g, t = _list_elements(ans), _list_elements(item.answer)
        ok = g is not None and t is not None and len(g) == len(t) and all(
            _elements_equal(a, b) for a, b in zip(g, t))
        return ok, None if g is None else "[" + ", ".join(g) + "]"
    g = normalize_answer(strip_choice_label(ans))
    return g == normalize_answer(item.answer), g


def judge_choice_letter(item: EvalItem, ans: Optional[str]) -> tuple[bool, Optional[str]]:
    """MathVerse multi-choice / MathVision with options: the answer is a letter."""
    if ans is None:
        return False, None
    truth = choice_letter(item.answer) or item.answer.strip().upper()
    if item.choices:
        k = pick_option(ans, item.choices)
        pred = None if k is None else LETTERS[k]
    else:
        pred = choice_letter(ans)
        if pred is None and re.fullmatch(r"\s*[a-h]\s*", ans):
            pred = ans.strip().upper()
        if pred is None and re.search(r"[\(\[]?[A-H][\)\].:]|option", ans, re.I):
            pred = extract_letter(ans, 8)
    return pred is not None and pred == truth, pred


def judge_math(item: EvalItem, ans: Optional[str]) -> tuple[bool, Optional[str]]:
    if ans is None:
        return False, None
    return score_answer(ans, item.answer) == 1.0, ans


def judge_response(item: EvalItem, response: str, judge: Optional[Judge] = None,
                   judge_mode: str = "fallback") -> dict:
    """One per-item judgement record."""
    mc = item.question_type == "multi_choice"
    n_opt = len(item.choices) if item.choices else 5
    ans, source = extract_eval_answer(response or "", multiple_choice=mc, n_options=n_opt)
    if judge is not None and (judge_mode == "always" or ans is None):
        judged = judge(item, response or "")
        if judged:
            ans, source = judged, "llm_judge"
    if item.benchmark == "mathvista":
        ok, pred = judge_mathvista(item, ans)
    elif mc and (item.benchmark == "mathvision" or choice_letter(item.answer)):
        ok, pred = judge_choice_letter(item, ans)
    else:
        ok, pred = judge_math(item, ans)
    return {"id": item.id, "correct": bool(ok), "extracted": ans, "source": source,
            "prediction": pred, "answer": item.answer, "question_type": item.question_type,
            "answer_type": item.answer_type, "categories": item.categories}


GROUPS = {"mathvista": ("task", "skills", "category", "question_type"),
          "mathverse": ("problem_version", "question_type"),
          "mathvision": ("subject", "level")}


def aggregate(benchmark: str, judgements: Iterable[dict], n_items: Optional[int] = None) -> dict:
    """overall accuracy (percent) and per-group accuracies; list-valued labels (skills) count the
    item once under each label."""
    js = list(judgements)
    correct = sum(j["correct"] for j in js)
    by: dict[str, dict[str, list[int]]] = {g: defaultdict(lambda: [0, 0]) for g in GROUPS[benchmark]}
    for j in js:
        for g in GROUPS[benchmark]:
            labels = j["categories"].get(g)
            if labels is None or labels == "" or labels == []:
                continue
            for lab in (labels if isinstance(labels, list) else [labels]):
                by[g][str(lab)][0] += int(j["correct"])
                by[g][str(lab)][1] += 1
    out = {"benchmark": benchmark, "n": len(js), "correct": correct,
           "accuracy": round(100.0 * correct / len(js), 2) if js else 0.0,
           "by": {g: {lab: {"n": n, "correct": c, "accuracy": round(100.0 * c / n, 2)}
                      for lab, (c, n) in sorted(groups.items())}
                  for g, groups in by.items() if groups}}
    if n_items is not None:
        out["n_items"] = n_items
        out["n_missing_predictions"] = n_items - len(js)
    return out
