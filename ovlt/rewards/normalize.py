"""mathruler-style answer normalisation and rule-based comparison (our own implementation).

`normalize_answer(s)` rewrites an answer into a canonical string:
  - math delimiters (`$`, `\\(`, `\\[`), `\\boxed{}`/`\\fbox{}` wrappers, `\\text{}`-like wrappers,
    `\\left`/`\\right`, spacing commands and `\\displaystyle` are dropped;
  - unicode minus/dashes -> `-`, `×` -> `\\times`, `π` -> `\\pi`;
  - `\\dfrac`/`\\tfrac` -> `\\frac`, `\\frac12` -> `\\frac{1}{2}`, `\\sqrt2` -> `\\sqrt{2}`;
  - degrees (`^\\circ`, `°`, "degrees"), percent (`\\%`, `%`) and dollar signs are removed;
  - thousands separators (`1,000`, `1{,}000`, `1\\,000`) are removed from numbers;
  - a trailing unit after a number is removed (`5 cm`, `12\\text{ m}^2`, `3cm`);
  - a leading single-variable assignment (`x = 5`) keeps its right-hand side;
  - whitespace and a trailing period are removed, and text is lower-cased.
`grade_answer(given, truth)` is True when the two normalise to the same string, or both are
numbers that are equal (exact rationals; floats to a relative 1e-6), or both are the same kind
of bracketed collection — tuple `(a,b)`, interval `[a,b)`, set `\\{a,b\\}` (order-free) — or
plain comma lists of equal length whose elements grade equal pairwise.
Multiple choice: `choice_letter(s)` reads a letter answer (`B`, `(B)`, `B.`, `(B) 3`, `Option B`);
`strip_choice_label("(B) 3") == "3"` lets option text be graded against a non-letter truth.
"""
from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Optional

_WRAPPERS = ("text", "textbf", "textit", "textrm", "mathrm", "mathbf", "mathit", "mbox",
             "operatorname", "boxed", "fbox")
_WRAP_RE = re.compile(r"\\(?:" + "|".join(_WRAPPERS) + r")\s*\{([^{}]*)\}")
_SPACING_RE = re.compile(r"\\(?:[,;:! ]|quad|qquad|displaystyle|left|right|bigl|bigr|Bigl|Bigr|big|Big)(?![a-zA-Z])")

# Unit words stripped after a number (whitespace-separated or glued). Only after a number,
# so a symbolic answer like "x" or "cm" on its own is never touched.
_UNITS = [
    "square", "sq", "cubic", "cu",
    "km", "cm", "mm", "m", "nm", "meters?", "metres?", "centimeters?", "millimeters?",
    "kilometers?", "inch(?:es)?", "in", "ft", "feet", "foot", "yards?", "yd", "miles?", "mi",
    "kg", "g", "mg", "grams?", "kilograms?", "lbs?", "pounds?", "ounces?", "oz", "tons?",
    "l", "ml", "liters?", "litres?", "gallons?",
    "s", "sec", "seconds?", "min", "minutes?", "h", "hrs?", "hours?", "days?", "weeks?",
    "months?", "years?", "mph", "km/h", "m/s", "kph",
    "dollars?", "cents?", "euros?", "yuan", "units?", "degrees?", "deg", "rad", "radians?",
    "percent", "people", "persons?", "students?", "points?", "times",
]
# Each unit must end at a non-letter, so "mmmm" can't be split ambiguously (no backtracking blowup).
_UNIT_ALT = "(?:" + "|".join(_UNITS) + r")(?:\^\{?[23]\}?|²|³)?(?![a-zA-Z])"
_TRAILING_UNITS_RE = re.compile(r"^(.*?\d\}?)\s*(?:" + _UNIT_ALT + r"\s*)+$", re.IGNORECASE)
_NUM_RE = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?$", re.IGNORECASE)
_FRAC_RE = re.compile(r"^([-+]?)\\frac\{([-+]?\d+(?:\.\d+)?)\}\{([-+]?\d+(?:\.\d+)?)\}$")
_SLASH_RE = re.compile(r"^([-+]?\d+(?:\.\d+)?)/(\d+(?:\.\d+)?)$")
_THOUSANDS_RE = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_ASSIGN_RE = re.compile(r"^[a-zA-Z](?:_\{?\w+\}?)?\s*=\s*(?!.*=)(.+)$")
_LETTER_PATTERNS = [
    re.compile(r"^([A-H])$"),                                   # B
    re.compile(r"^[\(\[]([A-Ha-h])[\)\]](?:\s*[.:]?\s*.*)?$", re.DOTALL),  # (B), (B) 3, [b]
    re.compile(r"^([A-H])[.:)](?:\s+.*)?$", re.DOTALL),          # B.  B: 3  B) 3
    re.compile(r"^(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)\s*(?:is)?\s*:?\s*"
               r"[\(\[]?([A-Ha-h])[\)\]]?(?![A-Za-z0-9])", re.IGNORECASE),  # Option B / answer: (c)
]

MAX_NUMBER_DIGITS = 400  # longer digit strings are compared as strings, never converted


def _unwrap(s: str) -> str:
    # Repeat until stable: wrappers may be nested (\text{\textbf{5}}); bounded by length.
    for _ in range(20):
        t = _WRAP_RE.sub(r"\1", s)
        if t == s:
            break
        s = t
    return s


def _fix_fracs(s: str) -> str:
    # \frac12 -> \frac{1}{2};  \frac1{2} -> \frac{1}{2};  \frac{1}2 -> \frac{1}{2}
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*(\d)\s*\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\s*(\{[^{}]*\})\s*(\d)", r"\\frac\1{\2}", s)
    s = re.sub(r"\\sqrt\s*(\d+|[a-zA-Z])", r"\\sqrt{\1}", s)
    return s


def normalize_answer(s: Optional[str]) -> Optional[str]:
    """Canonical string of an answer (None stays None)."""
    if s is None:
        return None
    s = str(s).strip()
    if len(s) > 4000:
        return s  # not a real answer; compared verbatim
    s = s.replace("\u2212", "-").replace("\u2013", "-").replace("\u2014", "-").replace("\ufe63", "-")
    s = s.replace("×", "\\times ").replace("·", "\\cdot ").replace("π", "\\pi ").replace("÷", "/")
    s = s.replace("√", "\\sqrt")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("{,}", "").replace("\\$", "").replace("$", "")
    s = re.sub(r"^\\\(|\\\)$|^\\\[|\\\]$", "", s.strip())
    s = _unwrap(s)
    s = _SPACING_RE.sub(" ", s)
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°|\bdegrees?\b", "", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\percent", "")
    s = s.replace("\\ ", " ").strip()
    s = re.sub(r"\.\s*$", "", s)  # trailing sentence period
    m = _ASSIGN_RE.match(s)
    if m:
        s = m.group(1).strip()
    if _THOUSANDS_RE.match(s.replace(" ", "")):
        s = s.replace(",", "")
    m = _TRAILING_UNITS_RE.match(s) if len(s) < 200 else None
    if m and m.group(1).strip():
        s = m.group(1)
    s = _fix_fracs(s)
    s = re.sub(r"\s+", "", s)
    if s.startswith("."):
        s = "0" + s
    s = re.sub(r"^-\.", "-0.", s)
    if _NUM_RE.match(s) and "." in s and "e" not in s.lower():
        s = s.rstrip("0").rstrip(".") if "." in s else s  # 3.50 -> 3.5, 3.0 -> 3
        if s in ("", "-", "+"):
            s = "0"
    return s.lower()


def to_number(s: Optional[str]):
    """A normalised answer as Fraction (exact) or float; None when it isn't a plain number."""
    if not s or len(s) > MAX_NUMBER_DIGITS:
        return None
    if _NUM_RE.match(s):
        try:
            return Fraction(s) if "e" not in s.lower() else float(s)
        except (ValueError, OverflowError, ZeroDivisionError):
            return None
    m = _FRAC_RE.match(s) or _SLASH_RE.match(s)
    if m:
        groups = m.groups()
        sign = -1 if (len(groups) == 3 and groups[0] == "-") else 1
        a, b = groups[-2], groups[-1]
        try:
            den = Fraction(b)
            return None if den == 0 else sign * Fraction(a) / den
        except (ValueError, ZeroDivisionError):
            return None
    return None


def numbers_equal(a, b, rel_tol: float = 1e-6) -> bool:
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b
    try:
        fa, fb = float(a), float(b)
    except OverflowError:
        return False
    if math.isinf(fa) or math.isinf(fb) or math.isnan(fa) or math.isnan(fb):
        return False
    return math.isclose(fa, fb, rel_tol=rel_tol, abs_tol=1e-12)


def _split_top_level(s: str) -> list[str]:
    """Split on commas not nested inside (), [], {}."""
    parts, depth, cur = [], 0, []
    for c in s:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    parts.append("".join(cur))
    return parts


def split_collection(s: str) -> Optional[tuple[str, list[str]]]:
    """('set'|'tuple'|'interval'|'list', elements) for a bracketed or comma-separated answer."""
    if s.startswith("\\{") and s.endswith("\\}"):
        return "set", _split_top_level(s[2:-2])
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]":
        inner = s[1:-1]
        # Only a collection when the outer brackets enclose everything (not "(a)+(b)").
        depth = 0
        for c in inner:
            depth += c in "([{"
            depth -= c in ")]}"
            if depth < 0:
                return None
        parts = _split_top_level(inner)
        if len(parts) < 2:
            return None
        kind = "tuple" if (s[0], s[-1]) == ("(", ")") else "interval"
        return (kind + s[0] + s[-1]), parts
    parts = _split_top_level(s)
    if len(parts) >= 2:
        return "list", parts
    return None


def choice_letter(s: Optional[str]) -> Optional[str]:
    """The option letter an answer names ("B", "(B)", "B.", "(B) 3", "Option B"), else None.
    A bare lower-case letter is not read as an option (it is usually a variable)."""
    if not s:
        return None
    s = _unwrap(s.strip()).strip().rstrip(".").strip() if len(s) < 1000 else s
    for pat in _LETTER_PATTERNS:
        m = pat.match(s)
        if m:
            return m.group(1).upper()
    return None


def strip_choice_label(s: str) -> str:
    """'(B) 3' -> '3', 'B. 3' -> '3', 'B: 3' -> '3'; other strings unchanged."""
    m = re.match(r"^\s*(?:[\(\[][A-Ha-h][\)\]]|[A-H][.:])\s*(.+)$", s, re.DOTALL)
    return m.group(1).strip() if m else s


def _elements_equal(a: str, b: str) -> bool:
    if a == b:
        return True
    na, nb = to_number(a), to_number(b)
    return na is not None and nb is not None and numbers_equal(na, nb)


def match_fraction(given: str, truth: str) -> float:
    """Fraction of the truth's elements matched (1.0 = all) after normalisation, without math
    parsing: exact string, equal numbers, or elementwise for collections of the same kind."""
    g, t = normalize_answer(given), normalize_answer(truth)
    if not g or not t:
        return 0.0
    if _elements_equal(g, t):
        return 1.0
    cg, ct = split_collection(g), split_collection(t)
    if cg is None or ct is None:
        return 0.0
    (kg, eg), (kt, et) = cg, ct
    if kg != kt and not ({kg, kt} <= {"list", "tuple()"}):
        return 0.0  # set vs tuple vs interval (and bracket sides) are different answers
    eg = [normalize_answer(x) for x in eg]
    et = [normalize_answer(x) for x in et]
    if kt == "set":
        remaining, hits = list(eg), 0
        for x in et:
            for j, y in enumerate(remaining):
                if _elements_equal(x, y):
                    hits += 1
                    del remaining[j]
                    break
        if hits == len(et) and not remaining:
            return 1.0
        return hits / max(len(et), len(eg))
    hits = sum(_elements_equal(x, y) for x, y in zip(eg, et))
    if hits == len(et) == len(eg):
        return 1.0
    return hits / max(len(et), len(eg))


def grade_answer(given: Optional[str], truth: Optional[str]) -> bool:
    """Rule-based equality (see module docstring); no sympy, so it cannot hang."""
    if given is None or truth is None:
        return False
    return match_fraction(given, truth) == 1.0
