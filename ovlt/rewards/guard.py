"""What neither grading library guards against: inputs that make sympy hang, blow up memory or
call words equal, and a time limit for mathruler (which has none of its own).

`safe_for_sympy(s)` refuses, before any library sees `s`: TeX that defines or reads things
(`\\def`, `\\newcommand`, `\\input`, ...), numeric exponent towers (`10^{10^{10}}`, `2^3^4`),
exponents of 4+ digits (`9^{99999999}`), a bracket raised to a 3+ digit power (`(x+1)^{999}`:
expansion), factorials of 4+ digit numbers, nesting deeper than `MAX_BRACE_DEPTH` and strings
longer than `MAX_SYMPY_CHARS`. Symbolic exponents (`x^2+x^3`, `e^{x^2}`) are fine: only numbers
stacked on numbers can explode.

`is_text(s)`: an answer of words ("blue", "Yes", "no", "A and B"): no digit, no math syntax and
a word of 2+ letters that is not a math function: sympy would read it as a product of symbols,
so that "blue" == "bleu", "left" == "felt" and "no" == "on".

`time_limit(seconds)`: SIGALRM-based on the main thread (sympy is Python, so the alarm lands);
elsewhere a no-op, and the caller relies on the process-level timeout of `RewardPool`.
"""
from __future__ import annotations

import contextlib
import re
import signal
import threading

MAX_SYMPY_CHARS = 300
MAX_BRACE_DEPTH = 12
SYMPY_TIMEOUT_S = 5

_DANGEROUS_TEX = re.compile(
    r"\\(?:def|edef|gdef|xdef|let|newcommand|renewcommand|providecommand|DeclareMathOperator|"
    r"input|include|csname|catcode|expandafter|loop|repeat|write|immediate|openout|read)"
    r"(?![a-zA-Z])")
# A number raised to a number that is itself raised: 10^{10^{10}}, 2^3^4, 2^{3}^{4}.
_NUMERIC_TOWER = re.compile(r"\d\s*\}?\s*(?:\^|\*\*)\s*\{?\s*[-+]?\d+(?:\.\d+)?\s*\}?\s*(?:\^|\*\*)")
_BIG_EXPONENT = re.compile(r"(?:\^|\*\*)\s*\{?\s*[-+]?\d{4,}"              # 10^{12345}
                           r"|[)\]}]\s*(?:\^|\*\*)\s*\{?\s*[-+]?\d{3,}")  # (x+1)^{999}
_BIG_FACTORIAL = re.compile(r"\d{4,}\s*!")
_MATH_WORDS = re.compile(
    r"\\[a-zA-Z]+|\b(?:sqrt|sin|cos|tan|cot|sec|csc|log|ln|exp|pi|inf|infty|arcsin|arccos|"
    r"arctan|frac|cdot|times)\b", re.IGNORECASE)


def brace_depth(s: str) -> int:
    depth = best = 0
    for c in s:
        if c in "{([":
            depth += 1
            best = max(best, depth)
        elif c in "})]":
            depth -= 1
    return best


def safe_for_sympy(s: str) -> bool:
    """Whether handing `s` to sympy (through math-verify or mathruler) is reasonably safe."""
    return (len(s) <= MAX_SYMPY_CHARS and not _DANGEROUS_TEX.search(s)
            and not _NUMERIC_TOWER.search(s) and not _BIG_EXPONENT.search(s)
            and not _BIG_FACTORIAL.search(s) and brace_depth(s) <= MAX_BRACE_DEPTH)


def is_text(s: str) -> bool:
    """A word answer: no digit, no math syntax, and a word of 2+ letters that is not a math
    function or constant ("no", "blue", "A and B"; not "x", "2x", "\\pi", "sin x")."""
    if re.search(r"[\d\\^_=+*/()\[\]{}<>|]", s):
        return False
    return re.search(r"[A-Za-z]{2,}", _MATH_WORDS.sub(" ", s)) is not None


class GraderTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float = SYMPY_TIMEOUT_S):
    """Raise `GraderTimeout` when the block runs past `seconds` (main thread only)."""
    if threading.current_thread() is not threading.main_thread() or not seconds:
        yield
        return

    def _expire(signum, frame):
        raise GraderTimeout(f"grader ran past {seconds}s")

    old = signal.signal(signal.SIGALRM, _expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def main_thread_timeout() -> int | None:
    """math-verify's own SIGALRM timeout only works on the main thread; None elsewhere."""
    return SYMPY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
