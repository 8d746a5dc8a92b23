"""The `ovlt` grader: is an extracted answer the ground truth?

`answers_equal(given, truth)`, first that decides wins:
  1. the same text after dropping `$` delimiters, `\\text{}`-like wrappers, a trailing period,
     spacing and case ("Cube." == "cube", "\\text{Yes}" == "yes"); then a label before `=` is
     dropped ("Area = 113.1" -> "113.1"; a one-letter variable "x = 5" stays an equation);
  2. two integer literals compare exactly (mathruler rounds big integers through float);
  3. word answers ("blue", "no", "A and B") are decided by step 1 alone: sympy would read words
     as products of symbols ("blue" == "bleu", "no" == "on");
  4. anything `guard.safe_for_sympy` refuses is unequal;
  5. math-verify (`parse` + `verify`: LaTeX, sets, intervals, matrices, equations, percent,
     units in `\\text{}`); its "no" is final for matrices, equations, sets, intervals and
     tuples; skipped when one side is a ratio "2:1" (math-verify reads it as 2);
  6. mathruler's `grade_answer` (MATH normalisation, units, `\\frac12`, mixed numbers, sympy);
  7. a number followed by words ("7 square units", "8 kg") is graded as the number.
Value equality decides: unreduced fractions count ("2/4" == "1/2", where mathruler alone says
no) and a bare comma list is a set ("3, 2, 1" == "1, 2, 3"; tuples "(2, 1)" stay ordered).

`score_answer` adds multiple choice (option letters and option texts stand for each other when
`choices` are given) and partial credit for collections (`collection_match`), which neither
library offers.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

from ovlt.logging import get_logger
from ovlt.rewards.extract import extract_boxed
from ovlt.rewards.guard import (GraderTimeout, is_text, main_thread_timeout, safe_for_sympy,
                                time_limit)

logger = get_logger(__name__)

LETTERS = "ABCDEFGH"

_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mathit|mbox|"
                         r"operatorname)\s*\{([^{}]*)\}")
_DASHES = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2014": "-", "\ufe63": "-", "\uff0d": "-"})
_INT_RE = re.compile(r"[-+]?\d+")
_RATIO_RE = re.compile(r"\d\s*:\s*\d")
_LABEL_RE = re.compile(r"^\s*([A-Za-z][A-Za-z ]*?)\s*=\s*([^=]+)$")
_NUMBER_THEN_WORDS = re.compile(
    r"^\s*([-+\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)\s*((?:[A-Za-z]+\.?\s*){1,3})$")
# words after a number that make it something other than a number with its unit
_CONNECTIVES = {"or", "and", "to", "plus", "minus", "over", "times", "by", "of", "is", "are", "was",
                "were", "not", "no", "but", "if", "then", "than", "because", "so", "less", "more",
                "at", "least", "most"}
_LETTER_FORMS = [
    re.compile(r"^([A-H])$"),                                              # B
    re.compile(r"^[\(\[]([A-Ha-h])[\)\]](?:\s*[.:]?\s*.*)?$", re.DOTALL),  # (B), (B) 3, [b]
    re.compile(r"^([A-H])[.:)](?:\s+.*)?$", re.DOTALL),                     # B.  B: 3  B) 3
    re.compile(r"^(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)\s*(?:is)?\s*:?\s*"
               r"[\(\[]?([A-Ha-h])[\)\]]?(?![A-Za-z0-9])", re.IGNORECASE),   # Option B
]
_PAREN_LETTER = re.compile(r"[\(\[]([A-H])[\)\]]")
_LETTER_LIST = re.compile(r"^[\(\[]?[A-H][\)\]]?(?:\s*(?:,|&|\band\b|\bor\b)\s*[\(\[]?[A-H][\)\]]?)+$",
                          re.IGNORECASE)


def unwrap_text(s: str) -> str:
    """`\\text{5}` -> `5` (nested wrappers too; bounded)."""
    for _ in range(10):
        t = _WRAPPER_RE.sub(r"\1", s)
        if t == s:
            break
        s = t
    return s


def strip_delimiters(s: str) -> str:
    """Drop unescaped `$`, `\\( \\)`, `\\[ \\]` around an answer and a trailing sentence period;
    unicode minus and dashes become '-' (neither library reads them)."""
    s = str(s).translate(_DASHES)
    s = re.sub(r"(?<!\\)\$", "", s).strip()
    s = re.sub(r"^\\[(\[]|\\[)\]]$", "", s).strip()
    return re.sub(r"(?<!\.)\.\s*$", "", s).strip()


def drop_label(s: str) -> str:
    """'Area = 113.1' -> '113.1', 'AB = 5' -> '5': a name of 2+ letters before the one '=' is a
    label; a single-letter variable ('x = 5', 'y = 2x + 1') keeps its equation."""
    m = _LABEL_RE.match(s)
    if m and len(m.group(1).replace(" ", "")) >= 2:
        return m.group(2).strip()
    return s


def plain_text(s: str) -> str:
    """Case- and space-insensitive text form of an answer."""
    s = unwrap_text(strip_delimiters(s)).replace("\\ ", " ").replace("~", " ")
    s = re.sub(r"\\[,;:! ]", " ", s)
    return re.sub(r"\s+", " ", s).strip().rstrip(".").strip().casefold()


# --------------------------------------------------------------------------- library calls
def mathruler_equal(given: str, truth: str) -> bool:
    from mathruler.grader import grade_answer
    try:
        with time_limit():
            return bool(grade_answer(given, truth))
    except GraderTimeout:
        logger.debug("mathruler timed out on %r vs %r", given, truth)
    except Exception as e:  # a grader error on odd input is a wrong answer
        logger.debug("mathruler failed on %r vs %r: %s", given, truth, e)
    return False


def mv_parse(s: str) -> list:
    """math-verify's parse of one answer (as inline math); [] when it can't."""
    from math_verify import parse
    try:
        return parse(f"${strip_delimiters(s)}$", parsing_timeout=main_thread_timeout())
    except Exception as e:
        logger.debug("math-verify could not parse %r: %s", s, e)
        return []


def mv_verify(gold, pred) -> bool:
    from math_verify import verify
    try:
        return bool(verify(gold, pred, timeout_seconds=main_thread_timeout()))
    except Exception as e:
        logger.debug("math-verify failed on %r vs %r: %s", pred, gold, e)
        return False


def _structured(obj) -> bool:
    """A parse math-verify compares by structure, where mathruler's string and sympy rules
    misread ("x = 5" == "y = 5", a matrix as the sum of its entries)."""
    import sympy
    return isinstance(obj, (sympy.MatrixBase, sympy.core.relational.Relational, sympy.FiniteSet,
                            sympy.Interval, sympy.Tuple))


def math_verify_equal(given: str, truth: str) -> bool:
    gold, pred = mv_parse(truth), mv_parse(given)
    return bool(gold and pred) and mv_verify(gold, pred)


def warmup() -> None:
    """Pay the libraries' lazy imports now (RewardPool workers call this before taking items)."""
    answers_equal("\\frac{1}{2}", "0.5")
    answers_equal("x^2+2x+1", "(x+1)^2")


# --------------------------------------------------------------------------- equality
def _number_before_words(s: str) -> Optional[str]:
    m = _NUMBER_THEN_WORDS.match(s)
    if not m or any(w.lower().rstrip(".") in _CONNECTIVES for w in m.group(2).split()):
        return None
    return m.group(1)


def answers_equal(given: Optional[str], truth: Optional[str]) -> bool:
    """Whether two answers are the same (see the module docstring for the order of checks)."""
    if given is None or truth is None:
        return False
    g, t = strip_delimiters(given), strip_delimiters(truth)
    if not g or not t:
        return False
    if plain_text(g) == plain_text(t):
        return True
    g, t = drop_label(g), drop_label(t)
    if _INT_RE.fullmatch(g) and _INT_RE.fullmatch(t):
        return int(g) == int(t)
    if is_text(unwrap_text(g)) or is_text(unwrap_text(t)):
        return False
    if not (safe_for_sympy(g) and safe_for_sympy(t)):
        return False
    if bool(_RATIO_RE.search(g)) == bool(_RATIO_RE.search(t)):
        gold, pred = mv_parse(t), mv_parse(g)
        if gold and pred:
            if mv_verify(gold, pred):
                return True
            if _structured(gold[0]) or _structured(pred[0]):
                return False  # matrices, equations, sets, intervals: math-verify's "no" stands
    if mathruler_equal(g, t):
        return True
    ng, nt = _number_before_words(g) or g, _number_before_words(t) or t
    return (ng, nt) != (g, t) and answers_equal(ng, nt)


# --------------------------------------------------------------------------- partial credit
def _parts(obj) -> Optional[tuple[str, list]]:
    """(kind, elements) of a parsed collection: set, tuple/list, or interval (its endpoints)."""
    import sympy
    if isinstance(obj, sympy.FiniteSet):
        return "set", list(obj.args)
    if isinstance(obj, sympy.Tuple):
        return "tuple", list(obj.args)
    if isinstance(obj, sympy.Interval):
        return f"interval{bool(obj.left_open):d}{bool(obj.right_open):d}", [obj.start, obj.end]
    return None


def collection_match(given: str, truth: str) -> float:
    """Share of matched elements when both answers are collections of the same kind (sets in any
    order, tuples and intervals by position); 0.0 otherwise."""
    g, t = strip_delimiters(given), strip_delimiters(truth)
    if not (safe_for_sympy(g) and safe_for_sympy(t)) or is_text(g) or is_text(t):
        return 0.0
    pg, pt = mv_parse(g), mv_parse(t)
    cg, ct = (_parts(pg[0]) if pg else None), (_parts(pt[0]) if pt else None)
    if cg is None or ct is None or cg[0] != ct[0]:
        return 0.0
    (kind, eg), (_, et) = cg, ct
    if kind == "set":
        left, hits = list(eg), 0
        for x in et:
            for j, y in enumerate(left):
                if mv_verify(x, y):
                    hits += 1
                    del left[j]
                    break
    else:
        hits = sum(mv_verify(x, y) for x, y in zip(et, eg))
    return hits / max(len(eg), len(et), 1)


# --------------------------------------------------------------------------- multiple choice
def choice_letter(s: Optional[str]) -> Optional[str]:
    """The one option letter an answer names ("B", "(B)", "B.", "(B) 3", "Option B"), else None.
    A bare lower-case letter is not an option (usually a variable); an answer naming several
    options ("(A), (B)", "B or C") names none."""
    if not s:
        return None
    s = unwrap_text(strip_delimiters(s)) if len(s) < 1000 else s
    s = s.strip().rstrip(".").strip()
    if _LETTER_LIST.match(s) or len(set(_PAREN_LETTER.findall(s))) > 1:
        return None
    for pat in _LETTER_FORMS:
        m = pat.match(s)
        if m:
            return m.group(1).upper()
    return None


def strip_choice_label(s: str) -> str:
    """'(B) 3' -> '3', 'B. 3' -> '3', 'B: 3' -> '3'; other strings unchanged."""
    m = re.match(r"^\s*(?:[\(\[][A-Ha-h][\)\]]|[A-H][.:])\s*(.+)$", s, re.DOTALL)
    return m.group(1).strip() if m else s


def option_letter_for_text(given: str, choices: Sequence[str]) -> Optional[str]:
    """The letter of the one option whose text equals `given` (None when none or several do)."""
    hits = [i for i, c in enumerate(choices[:len(LETTERS)]) if answers_equal(given, str(c))]
    return LETTERS[hits[0]] if len(hits) == 1 else None


def is_letter_truth(truth: str) -> bool:
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
    if is_letter_truth(truth):
        g_letter = choice_letter(given)
        if g_letter is None and choices:
            g_letter = option_letter_for_text(given, choices)
        if g_letter is not None:
            return 1.0 if g_letter == choice_letter(truth) else 0.0
    else:
        g_letter = choice_letter(given)
        if g_letter is not None:
            if strip_choice_label(given) != given:
                given = strip_choice_label(given)              # "(B) 3" -> "3"
            elif choices and LETTERS.index(g_letter) < len(choices):
                given = str(choices[LETTERS.index(g_letter)])  # "B" -> option B's text
    if answers_equal(given, truth):
        return 1.0
    if partial_credit and collection_match(given, truth) > 0:
        return float(partial_credit)
    return 0.0
