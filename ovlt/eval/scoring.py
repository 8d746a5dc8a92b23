"""Per-benchmark judgement of one response in three scoring styles, and accuracy aggregation.

Every response is judged in all styles (`STYLES`); `style` picks the one reported as `correct`
and `accuracy`, the others sit beside it (`correct_by_style`, scores' `styles`):
  ovlt           ovlt's extraction (`ovlt.eval.answers`) and grading (`ovlt.rewards.grading`):
  - MathVista multi_choice: the answer picks an option by letter ("B", "(B) 3") or by its text;
    right when that option's text is the answer (duplicate options: any copy counts).
    free_form by answer_type — integer: the answer's number equals the integer ("3.0" == "3");
    float: both rounded to the item's `precision` agree; list: same length, elementwise equal in
    order; text: the same text (case, `\\text{}`, trailing period).
  - MathVerse multi-choice and MathVision with options: the option letter (option text counts
    when the options are known: MathVerse's "Choices:"/"Choice:" block, MathVision's options);
    free-form: `score_answer` (mathruler, then math-verify).
  A number is read from an answer only when it holds one ("about 5.2 cm", "10 cm^2", "1 000",
  `\\frac{1}{2}`, `50\\%` -> 50); "2:1", "5 or 6" and "3 to 4" hold none.
  official       each benchmark's own rule scorer (`ovlt.eval.official`).
  openvlthinker  OpenVLThinker's `evaluation/eval_openvlthinker.py`: only a response with
    `</answer>` has an answer (the text between the last `<answer>` and the next `</answer>`);
    a MathVista / MathVision answer that is one of the options becomes its letter (the first
    option with that text); right when the lower-cased strings match or mathruler's
    `grade_answer(truth, answer)` holds.
Grouped by task/skills/category (MathVista), problem_version (MathVerse), subject/level
(MathVision).
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Callable, Iterable, Optional

from ovlt.eval import official
from ovlt.eval.answers import extract_eval_answer, extract_letter
from ovlt.eval.readers import LETTERS, EvalItem
from ovlt.logging import get_logger
from ovlt.rewards.grading import (answers_equal, choice_letter, drop_label, mv_parse, plain_text,
                                  score_answer, strip_choice_label, strip_delimiters, unwrap_text)
from ovlt.rewards.guard import GraderTimeout, safe_for_sympy, time_limit

logger = get_logger(__name__)

STYLES = ("ovlt", "official", "openvlthinker")
# A judge maps (item, response) -> extracted answer text or None (see ovlt.eval.judge).
Judge = Callable[[EvalItem, str], Optional[str]]

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_NOT_ONE_NUMBER = re.compile(r"\d\s*:\s*\d|\b(?:or|and|to)\b|±|\\pm|\\mp")


def check_style(style: str) -> str:
    if style not in STYLES:
        raise ValueError(f"scoring style must be one of {', '.join(STYLES)}, got {style!r}")
    return style


# --------------------------------------------------------------------------- ovlt style
def read_number(ans: Optional[str]) -> Optional[float]:
    """The one number an answer states, else None (see the module docstring)."""
    if ans is None:
        return None
    s = unwrap_text(strip_choice_label(strip_delimiters(ans))).replace("\u2212", "-")
    s = re.sub(r"(?<=\d)[ ,](?=\d{3}(?!\d))", "", s).replace("{,}", "")
    s = drop_label(s.replace("\\%", "").replace("%", "")).strip()
    if not s or _NOT_ONE_NUMBER.search(s):
        return None
    try:
        return float(s)
    except ValueError:
        pass
    if safe_for_sympy(s):
        parsed = mv_parse(s)
        v = parsed[0] if parsed else None
        if getattr(v, "is_number", False) is True:  # no free symbols: a value
            try:
                return float(v)
            except (TypeError, ValueError, OverflowError):
                pass
    units_out = re.sub(r"(?<=[A-Za-z])\s*\^\s*\{?\s*[23]\s*\}?", "", s)  # cm^2, m^3
    nums = _NUMBER.findall(units_out)
    return float(nums[0]) if len(nums) == 1 else None


def pick_option(ans: Optional[str], choices: list[str]) -> Optional[int]:
    """Index of the option `ans` names, by letter first, then by option text (None when it
    names several options or none)."""
    if not ans or not choices:
        return None
    letter = choice_letter(ans)
    if letter is None and re.fullmatch(r"\s*[a-h]\s*", ans):
        letter = ans.strip().upper()  # in a multiple-choice context a lone "b" is option B
    if letter is None and len(ans.strip()) > 2 and \
            re.search(r"[\(\[]?[A-H][\)\].:]|option", ans, re.I):
        # a sentence like "so I pick option (C)" — but not a bare lower-case variable
        letters = {m for m in re.findall(r"[\(\[]([A-H])[\)\]]", ans)}
        letter = extract_letter(ans, len(choices)) if len(letters) <= 1 else None
    if letter is not None:
        k = LETTERS.index(letter)
        return k if k < len(choices) else None
    for cand in dict.fromkeys((ans, strip_choice_label(ans))):
        hits = [i for i, c in enumerate(choices) if answers_equal(cand, str(c))]
        if hits and len({plain_text(str(choices[i])) for i in hits}) == 1:
            return hits[0]  # one option, or copies of one text
    return None


def _list_elements(s: str) -> Optional[list[str]]:
    s = strip_delimiters(s).strip()
    if not s:
        return None
    if s[0] in "([" and s[-1] in ")]":
        s = s[1:-1]
    parts, depth, cur = [], 0, []
    for c in s:
        depth += c in "([{"
        depth -= c in ")]}"
        if c == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
    parts.append("".join(cur).strip())
    return parts


def _same_option_text(option: str, answer: str, choices: list[str]) -> bool:
    if plain_text(option) == plain_text(answer):
        return True
    # an answer that is not literally an option (a data quirk): compare values
    return answer not in choices and answers_equal(option, answer)


def judge_mathvista(item: EvalItem, ans: Optional[str]) -> tuple[bool, Optional[str]]:
    if ans is None:
        return False, None
    if item.question_type == "multi_choice":
        choices = item.choices or []
        k = pick_option(ans, choices)
        if k is None:
            return False, None
        return _same_option_text(choices[k], item.answer, choices), choices[k]
    atype = (item.answer_type or "text").lower()
    if atype in ("integer", "float"):
        n = read_number(ans)
        try:
            truth = float(item.answer)
        except ValueError:
            return False, None if n is None else str(n)
        if n is None:
            return False, None
        if atype == "integer":
            return n == truth, str(int(n)) if n == int(n) else str(n)
        p = item.precision if item.precision is not None else 2
        return round(n, p) == round(truth, p), f"{n:.{p}f}"
    if atype == "list":
        g, t = _list_elements(ans), _list_elements(item.answer)
        ok = g is not None and t is not None and len(g) == len(t) and all(
            answers_equal(a, b) for a, b in zip(g, t))
        return ok, None if g is None else "[" + ", ".join(g) + "]"
    g = plain_text(strip_choice_label(ans))
    return g == plain_text(item.answer), g


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
        if pred is None and re.search(r"[\(\[]?[A-H][\)\].:]|option", ans, re.I) and \
                len(set(re.findall(r"[\(\[]([A-H])[\)\]]", ans))) <= 1:
            pred = extract_letter(ans, 8)
    return pred is not None and pred == truth, pred


def judge_math(item: EvalItem, ans: Optional[str]) -> tuple[bool, Optional[str]]:
    if ans is None:
        return False, None
    return score_answer(ans, item.answer) == 1.0, ans


def judge_ovlt(item: EvalItem, ans: Optional[str]) -> tuple[bool, Optional[str]]:
    if item.benchmark == "mathvista":
        return judge_mathvista(item, ans)
    if item.question_type == "multi_choice" and \
            (item.benchmark == "mathvision" or choice_letter(item.answer)):
        return judge_choice_letter(item, ans)
    return judge_math(item, ans)


# --------------------------------------------------------------------------- other styles
def judge_official(item: EvalItem, response: str, extraction: Optional[str]) -> tuple[bool, Optional[str]]:
    if item.benchmark == "mathvista":
        return official.judge_mathvista(item, response, extraction)
    if item.benchmark == "mathvision":
        return official.judge_mathvision(item, response)
    return official.judge_mathverse(item, extraction)


def _mathruler(truth: str, answer: str) -> bool:
    from mathruler.grader import grade_answer
    try:
        with time_limit():
            return bool(grade_answer(truth, answer))
    except (GraderTimeout, Exception):
        return False


def judge_openvlthinker(item: EvalItem, response: str) -> tuple[bool, Optional[str]]:
    if not response or "</answer>" not in response:
        return False, None
    answer = response.split("<answer>")[-1].split("</answer>")[0].strip()
    truth = item.answer
    options = item.choices if item.benchmark in ("mathvista", "mathvision") else None
    if options and truth in options and options.index(truth) < 10:
        truth = "ABCDEFGHIJ"[options.index(truth)]
    return truth.lower() == answer.lower() or _mathruler(truth, answer), answer


# --------------------------------------------------------------------------- one response
def judge_response(item: EvalItem, response: str, judge: Optional[Judge] = None,
                   judge_mode: str = "fallback", style: str = "ovlt") -> dict:
    """One per-item judgement record: `correct` / `prediction` in `style`, every style's
    verdict in `correct_by_style`."""
    check_style(style)
    response = response or ""
    mc = item.question_type == "multi_choice"
    n_opt = len(item.choices) if item.choices else 5
    ans, source = extract_eval_answer(response, multiple_choice=mc, n_options=n_opt)
    if judge is not None and (judge_mode == "always" or ans is None):
        judged = judge(item, response)
        if judged:
            ans, source = judged, "llm_judge"
    verdicts = {"ovlt": judge_ovlt(item, ans),
                "official": judge_official(item, response, ans),
                "openvlthinker": judge_openvlthinker(item, response)}
    ok, pred = verdicts[style]
    return {"id": item.id, "correct": bool(ok), "extracted": ans, "source": source,
            "prediction": pred, "answer": item.answer, "question_type": item.question_type,
            "answer_type": item.answer_type, "categories": item.categories, "style": style,
            "correct_by_style": {s: bool(v[0]) for s, v in verdicts.items()}}


GROUPS = {"mathvista": ("task", "skills", "category", "question_type"),
          "mathverse": ("problem_version", "question_type"),
          "mathvision": ("subject", "level")}


def _accuracy(correct: int, n: int) -> float:
    return round(100.0 * correct / n, 2) if n else 0.0


def aggregate(benchmark: str, judgements: Iterable[dict], n_items: Optional[int] = None) -> dict:
    """Overall accuracy (percent) and per-group accuracies in the judgements' style; list-valued
    labels (skills) count the item once under each label; `styles`: every style's overall."""
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
           "accuracy": _accuracy(correct, len(js)),
           "by": {g: {lab: {"n": n, "correct": c, "accuracy": round(100.0 * c / n, 2)}
                      for lab, (c, n) in sorted(groups.items())}
                  for g, groups in by.items() if groups}}
    if js and all("correct_by_style" in j for j in js):
        out["style"] = js[0].get("style", "ovlt")
        out["styles"] = {}
        for s in STYLES:
            c = sum(j["correct_by_style"].get(s, False) for j in js)
            out["styles"][s] = {"n": len(js), "correct": c, "accuracy": _accuracy(c, len(js))}
    if n_items is not None:
        out["n_items"] = n_items
        out["n_missing_predictions"] = n_items - len(js)
    return out
