"""Each benchmark's own scorer, rule for rule (`ovlt eval score --style official`), so our numbers
can stand beside published ones. What the scorers read: the model's final answer text
(`final_text`: the last `<answer>` pair's content, else the text after the thinking; nothing for a
response cut inside its thinking) — the scorers predate answer tags and read what a model says.

MathVista (`evaluation/extract_answer.py` rule path + `calculate_score.py`):
  extraction — "" for an empty response; the response itself when it is one of the choices
  (multi_choice), an `int(...)`-able integer answer or a `float(...)`-able float answer;
  otherwise MathVista asks GPT: we use the LLM judge when one is given,
  else ovlt's rule extraction (answer tag, box, "the answer is", letter, last number);
  normalisation — multi_choice: the first "(x)" letter, then a letter names its option, anything
  else (including an empty extraction) becomes the NEAREST option by edit distance; integer:
  `str(int(float(x)))` (truncates 3.7 -> 3); float: `str(round(float(x), precision))`; list:
  `str(x)`; right when that string equals the answer string.
MATH-V (`evaluation/evaluate.py` + `utils.py`): its ending/"the answer is"/`\\boxed` rules pick the
  answer, `find_math_answer` cleans it, and `is_equal` compares it with the answer letter or the
  option text: case-insensitive string match, tuples evaluated element-wise, else both sides'
  numeric values rounded to 2 decimals. The reference `eval()`s sympy's text with `math`'s names;
  we evaluate the same text with a whitelist (numbers, arithmetic, `math` functions/constants).
MathVerse: its scorer asks GPT twice (extract, then judge); the rule path it has is
  `--quick_match`: right when the extraction equals the answer string exactly. Extraction as for
  MathVista (judge, else ovlt's rules).
"""
from __future__ import annotations

import ast
import math
import operator
import re
from typing import Optional

from ovlt.rewards.extract import after_think, extract_answer_tag, thinking_unfinished

# --------------------------------------------------------------------------- shared


def final_text(response: str) -> str:
    """The answer a benchmark scorer reads (see the module docstring)."""
    response = response or ""
    tag = extract_answer_tag(response)
    if tag is not None:
        return tag
    if thinking_unfinished(response):
        return ""
    return after_think(response).strip()


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit-cost insert, delete, substitute)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


# --------------------------------------------------------------------------- MathVista
def mathvista_rule_extract(response: str, question_type: str, answer_type: Optional[str],
                           choices: Optional[list[str]]) -> Optional[str]:
    """MathVista's extraction without GPT: the answer when a rule finds it, None when MathVista
    would ask GPT."""
    if response == "":
        return ""
    if question_type == "multi_choice" and choices and response in choices:
        return response
    if answer_type == "integer":
        try:
            return str(int(response))
        except ValueError:
            pass
    if answer_type == "float":
        try:
            return str(float(response))
        except ValueError:
            pass
    return None


def mathvista_normalize(extraction, choices: Optional[list[str]], question_type: str,
                        answer_type: Optional[str], precision) -> Optional[str]:
    """calculate_score's `normalize_extracted_answer` (empty extractions kept, as by default)."""
    if question_type == "multi_choice":
        ext = extraction.strip() if isinstance(extraction, str) else str(extraction)
        paren = re.findall(r"\(([a-zA-Z])\)", ext)
        if paren:
            ext = paren[0].upper()
        letters = [chr(ord("A") + i) for i in range(len(choices))]
        if ext in letters:
            return choices[letters.index(ext)]
        dists = [edit_distance(ext, c) for c in choices]
        return choices[dists.index(min(dists))]
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))
        if answer_type == "float":
            return str(round(float(extraction), int(precision)))
    except (TypeError, ValueError, OverflowError):
        return None
    # list (and any other type: the reference leaves it unassigned and fails)
    return str(extraction)


def judge_mathvista(item, response: str, extraction: Optional[str]) -> tuple[bool, Optional[str]]:
    """(right, prediction) by MathVista's rules; `extraction`: the judge's or ovlt's answer,
    used where MathVista would ask GPT."""
    text = final_text(response)
    ext = mathvista_rule_extract(text, item.question_type, item.answer_type, item.choices)
    if ext is None:
        ext = extraction if extraction is not None else ""
    pred = mathvista_normalize(ext, item.choices or [], item.question_type, item.answer_type,
                               item.precision)
    return pred == item.answer, pred


# --------------------------------------------------------------------------- MATH-V
_BIN_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
            ast.Div: operator.truediv, ast.Mod: operator.mod, ast.FloorDiv: operator.floordiv}
_MATH_NAMES = {k: getattr(math, k) for k in dir(math) if not k.startswith("_")}
MAX_POWER = 10_000


def _safe_eval(text: str):
    """What `eval(text)` gives under `from math import *` for arithmetic text, without eval:
    numbers, + - * / % // **, unary +/-, tuples, and calls/names from `math`; anything else
    raises (as the reference's eval would raise on sympy's other names)."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, complex)):
            return node.value
        if isinstance(node, ast.BinOp):
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow):
                if abs(b) > MAX_POWER or (isinstance(a, int) and abs(a) > 1 and abs(b) > 1000):
                    raise OverflowError("power too large")
                return a ** b
            return _BIN_OPS[type(node.op)](a, b)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.Name) and node.id in _MATH_NAMES:
            return _MATH_NAMES[node.id]
        if isinstance(node, ast.Tuple):
            return tuple(ev(e) for e in node.elts)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords \
                and node.func.id in _MATH_NAMES and callable(_MATH_NAMES[node.func.id]):
            return _MATH_NAMES[node.func.id](*[ev(a) for a in node.args])
        raise ValueError(f"not arithmetic: {ast.dump(node)[:60]}")
    return ev(ast.parse(text, mode="eval"))


def _latex_value(s: str):
    """MATH-V's `eval(str(latex2sympy(s)))`. Its latex2sympy2 builds evaluated sympy objects with
    decimals as rationals; latex2sympy2_extended (math-verify's) keeps them unevaluated and
    decimals as floats: both are undone so that the text evaluated is the same."""
    import sympy
    from latex2sympy2_extended import latex2sympy
    expr = latex2sympy(s)
    if isinstance(expr, sympy.Basic):
        expr = expr.xreplace({f: sympy.Rational(str(f)) for f in expr.atoms(sympy.Float)}).doit()
    return _safe_eval(str(expr))


def _eval_tuple(s: str) -> str:
    parts = s[1:-1].split(",")
    try:
        if len(parts) > 1 and s[0] + s[-1] in ("()", "[]"):
            vals = [p if ("infty" in p or p in ("a", "-a")) else str(round(_latex_value(p), 2))
                    for p in parts]
            return s[0] + ",".join(vals) + s[-1]
    except Exception:
        return s
    return s


def mathv_is_equal(answer: str, gt: str) -> bool:
    """MATH-V's `is_equal(asw, gt_asw)`."""
    a, g = answer.lower(), gt.lower()
    if not a.replace(" ", "") or not g.replace(" ", ""):
        return False
    if g.strip() == a.strip():
        return True
    a, g = _eval_tuple(a), _eval_tuple(g)
    if g == a:
        return True
    try:
        return round(_latex_value(g), 2) == round(_latex_value(a), 2)
    except Exception:
        return False


def _mathv_strip(s: str) -> str:
    """MATH-V's `_strip_string` (the Hendrycks MATH clean-up, its own variant)."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "").replace("$", "")
    s = s.split("\\text{ ")[0]
    s = s.replace("\\%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    if len(s.split("=")) == 2:
        s = s.split("=")[-1]
    if len(s.split("\\approx")) == 2:
        s = s.split("\\approx")[-1]
    if "sqrt" in s:
        s = _mathv_fix_sqrt(s)
    s = s.replace(" ", "")
    if "sqrt" in s:
        s = _mathv_fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _mathv_fix_slash(s)


def _mathv_fix_sqrt(s: str) -> str:
    head, *rest = s.split("\\sqrt")
    out = head
    for part in rest:
        out += "\\sqrt{" + part[0] + "}" + part[1:] if part and part[0] != "{" else "\\sqrt" + part
    return out


def _mathv_fix_fracs(s: str) -> str:
    head, *rest = s.split("\\frac")
    out = head
    for part in rest:
        out += "\\frac"
        if part and part[0] == "{":
            out += part
            continue
        if len(part) < 2:
            return s
        a, b, tail = part[0], part[1], part[2:]
        out += "{" + a + "}{" + b + "}" + tail if b != "{" else "{" + a + "}" + b + tail
    return out


def _mathv_fix_slash(s: str) -> str:
    if len(s.split("/")) != 2:
        return s
    a, b = s.split("/")
    try:
        ia, ib = int(a), int(b)
    except ValueError:
        return s
    return "\\frac{" + str(ia) + "}{" + str(ib) + "}" if s == f"{ia}/{ib}" else s


def mathv_find_answer(s: str) -> str:
    """MATH-V's `find_math_answer`: the last `\\boxed{...}` (greedy to the last brace) or the
    whole text, the part after `=` / `\\approx`, LaTeX and unit clean-up."""
    s = s.lower().replace("{}", "")
    found = re.findall(r"oxed{(.*)}", s, flags=re.S)
    ans = found[-1] if found else s
    if "}" in ans and ("{" not in ans or ans.find("}") < ans.find("{")):
        ans = ans.split("}")[0]
    ans = ans.split("=")[-1].split("\\approx")[-1]
    for a, b in ((" ", ""), ("\\,", ""), ("∞", "\\infty"), ("+\\infty", "\\infty"), ("\\\\", "\\"),
                 ("\n", ""), ("\\text", ""), ("\\mbox", ""), ("bmatrix", "pmatrix"), ("\\left", ""),
                 ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("{m}^3", ""), ("m^3", ""),
                 ("{units}", ""), ("units", ""), ("{km}", ""), ("km", "")):
        ans = ans.replace(a, b)
    return _mathv_strip(ans)


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def mathv_model_answer(response: str) -> str:
    """MATH-V's answer extraction from a response (evaluate.py)."""
    ans = response.strip()
    for c in "ABCDE":
        if ans.endswith(f" {c}.") or ans.endswith(f" ({c}).") or ans.startswith(f"{c}\n") \
                or ans.startswith(f"({c})\n") or ans.startswith(f"({c}) {c}\n"):
            ans = c
    if _is_number(ans.split("is ")[-1].rstrip(".")):
        ans = ans.split("is ")[-1].rstrip(".")
    if "oxed{" not in ans:
        for flag in ("the final answer is", "the answer is", "the correct answer is",
                     "the answer should be"):
            for f in (flag, flag.replace("the", "The")):
                before = ans
                ans = ans.split(f)[-1].strip()
                if f in before:
                    ans = ans.split("\n")[0].split(". ")[0]
    elif ans.count("oxed{") > 1:
        ans = "\\boxed{" + ans.split("oxed{")[-1]
    ans = mathv_find_answer(ans)
    for c in "abcde":
        ans = ans.replace(f"({c})", c)
    for c in "abcde":
        ans = ans.replace("{" + c + "}", c)
    return ans.rstrip(".").lstrip(":").strip()


def judge_mathvision(item, response: str) -> tuple[bool, str]:
    """(right, model_answer) by MATH-V's rules; the truth is the answer letter and, with
    options, also that option's text."""
    model_answer = mathv_model_answer(final_text(response))
    gt = str(item.answer)
    gt_value = ""
    if item.choices:
        k = ord(gt[0]) - ord("A") if gt else -1
        gt_value = item.choices[k] if 0 <= k < len(item.choices) else ""
    return mathv_is_equal(gt, model_answer) or mathv_is_equal(gt_value, model_answer), model_answer


# --------------------------------------------------------------------------- MathVerse
def judge_mathverse(item, extraction: Optional[str]) -> tuple[bool, Optional[str]]:
    """MathVerse's `--quick_match`: the extraction equals the answer string."""
    return extraction is not None and extraction == item.answer, extraction
