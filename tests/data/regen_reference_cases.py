"""Rewrite the `expected` outputs of the reference-case fixtures in this directory by running the
reference code itself on each stored case's inputs. Not part of the test suite, and not run
with ovlt's venv: the references import what they import.

    python -m venv /tmp/refs && /tmp/refs/bin/pip install mathruler==0.1.0 pylatexenc==2.10 \\
        sympy==1.14.0 Levenshtein latex2sympy2==1.9.1 numpy jinja2
    git clone https://github.com/yihedeng9/OpenVLThinker  DIR/yihedeng9+OpenVLThinker   # etc.:
    #   hiyouga/EasyR1, lupantech/MathVista, mathllm/MATH-V at the commits each file's
    #   "reference" names, checked out as DIR/<owner>+<name>
    /tmp/refs/bin/python tests/data/regen_reference_cases.py --refs DIR [--only NAME ...]

Missing third-party modules the references import but never use here (torch, datasets, openai,
...) are replaced by empty stand-ins; the model and dataset of OpenVLThinker's evaluation script
are replaced by the stored cases; MathVista's GPT extractor by a stub that marks "GPT needed".
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import sys
import tempfile
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
GPT_NEEDED = "<<gpt>>"


def _stub_modules(*names: str) -> None:
    """Empty modules for imports a reference makes but the cases never reach."""
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            sub = ".".join(parts[:i])
            if sub not in sys.modules:
                try:
                    importlib.import_module(sub)
                except ImportError:
                    sys.modules[sub] = types.ModuleType(sub)
                    if i > 1:
                        setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1], sys.modules[sub])


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def _cwd(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _rewrite(name: str, fill) -> None:
    f = HERE / name
    data = json.loads(f.read_text())
    for case in data["cases"]:
        case["expected"] = fill(case)
    f.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    print(f"{name}: {len(data['cases'])} cases")


# --------------------------------------------------------------------------- per fixture
def reward_openvlthinker(refs: Path) -> None:
    r1v = _load(refs / "yihedeng9+OpenVLThinker/train/easyr1/examples/reward_function/r1v.py", "r1v")

    def fill(c):
        s = r1v.compute_score(c["response"], c["ground_truth"])
        return {"overall": s["overall"], "format": s["format"]}
    _rewrite("reward_openvlthinker_cases.json", fill)


def reward_easyr1(refs: Path) -> None:
    math = _load(refs / "hiyouga+EasyR1/examples/reward_function/math.py", "easyr1_math")

    def fill(c):
        s = math.compute_score([{"response": c["response"], "ground_truth": c["ground_truth"]}])[0]
        return {"overall": s["overall"], "format": s["format"], "accuracy": s["accuracy"]}
    _rewrite("reward_easyr1_cases.json", fill)


def rl_prompt(refs: Path) -> None:
    from jinja2 import Template
    tpl = {"openvlthinker": refs / "yihedeng9+OpenVLThinker/train/easyr1/examples/format_prompt/"
                                   "math_format.jinja",
           "easyr1": refs / "hiyouga+EasyR1/examples/format_prompt/math.jinja"}

    def fill(c):
        return {k: Template(p.read_text().strip()).render(content=c["problem"]) for k, p in tpl.items()}
    _rewrite("rl_prompt_cases.json", fill)


def eval_openvlthinker(refs: Path) -> None:
    _stub_modules("torch", "datasets", "transformers", "qwen_vl_utils", "requests", "PIL.Image")
    for mod, attrs in (("datasets", ["load_dataset"]), ("transformers", [
            "AutoProcessor", "Qwen2_5_VLForConditionalGeneration"]), ("qwen_vl_utils", ["process_vision_info"])):
        for a in attrs:
            setattr(sys.modules[mod], a, None)
    torch = sys.modules["torch"]
    if not hasattr(torch, "cuda"):
        torch.cuda = types.SimpleNamespace(is_available=lambda: False)
    if not hasattr(torch, "bfloat16"):
        torch.bfloat16 = None
    sys.modules["PIL"].Image = sys.modules["PIL.Image"]
    ev = _load(refs / "yihedeng9+OpenVLThinker/evaluation/eval_openvlthinker.py", "eval_openvlthinker")
    data = json.loads((HERE / "eval_openvlthinker_cases.json").read_text())
    expected: dict[int, dict] = {}
    for ds in ("mathvista", "mathverse", "mathvision"):
        cases = [(i, c) for i, c in enumerate(data["cases"]) if c["dataset"] == ds]
        seen_prompts: list[str] = []

        def items(_cfg, cases=cases):
            out = []
            for _, c in cases:
                it = {"image_url": None, "instruction": c["instruction"], "response": c["answer"]}
                if ds == "mathvista":
                    it["choices"] = c["choices"]
                if ds == "mathvision":
                    it["options"] = c["options"] if c["options"] is not None else []
                out.append(it)
            return out

        responses = iter([c["response"] for _, c in cases])

        class Proc:
            def __init__(self, *a, **k):
                pass

            def generate_answer(self, image_url, instruction):
                seen_prompts.append(instruction)
                return next(responses)

        ev.ImageProcessor, ev.load_image_dataset = Proc, items
        with tempfile.TemporaryDirectory() as tmp, _cwd(Path(tmp)):
            sys.argv = ["eval_openvlthinker.py", "--dataset", ds, "--model_path", "m/stub"]
            ev.main()
            out = json.loads((Path(tmp) / f"evaluation/outputs/{ds}_stub.json").read_text())
        for (i, _), rec, prompt in zip(cases, out, seen_prompts):
            expected[i] = {"instruction": prompt, "answer": rec["answer"], "correct": rec["correct"]}
    in_order = iter([expected[i] for i in range(len(data["cases"]))])
    _rewrite("eval_openvlthinker_cases.json", lambda c: next(in_order))


def eval_mathvista_official(refs: Path) -> None:
    root = refs / "lupantech+MathVista"
    _stub_modules("datasets", "rich.logging", "pandas", "openai", "models.gpt", "cv2", "PIL.Image",
                  "word2number.w2n", "evaluation.prompts.ext_ans")
    sys.modules["datasets"].load_dataset = None
    sys.modules["rich.logging"].RichHandler = None
    sys.modules["openai"].AzureOpenAI = None
    sys.modules["evaluation.prompts.ext_ans"].demo_prompt = ""
    sys.path.insert(0, str(root))
    calc = _load(root / "evaluation/calculate_score.py", "mathvista_calculate_score")
    ext = _load(root / "evaluation/extract_answer.py", "mathvista_extract_answer")
    gpt = types.SimpleNamespace(get_response=lambda user_prompt: GPT_NEEDED)

    def fill(c):
        if "response" in c:
            problem = {"question_type": c["question_type"], "answer_type": c["answer_type"],
                       "choices": c["choices"], "query": "q", "pid": "1"}
            got = ext.extract_answer(gpt, c["response"], problem)
            return {"extraction": None if got == GPT_NEEDED else got}
        pred = calc.normalize_extracted_answer(c["extraction"], c["choices"], c["question_type"],
                                               c["answer_type"], c["precision"])
        return {"prediction": pred, "true_false": calc.safe_equal(pred, c["answer"])}
    _rewrite("eval_mathvista_official_cases.json", fill)


def eval_mathv_official(refs: Path) -> None:
    evaldir = refs / "mathllm+MATH-V/evaluation"
    _stub_modules("fire")
    data = json.loads((HERE / "eval_mathv_official_cases.json").read_text())
    with tempfile.TemporaryDirectory() as tmp, _cwd(Path(tmp)):
        (Path(tmp) / "data").mkdir()
        raw = [{"id": str(i), "answer": c["answer"], "options": c["options"], "subject": "s",
                "level": 1} for i, c in enumerate(data["cases"])]
        (Path(tmp) / "data/test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in raw))
        answers = Path(tmp) / "answers.jsonl"
        answers.write_text("".join(json.dumps({"id": str(i), "response": c["response"]}) + "\n"
                                   for i, c in enumerate(data["cases"])))
        sys.path.insert(0, str(evaldir))
        mod = _load(evaldir / "evaluate.py", "mathv_evaluate")
        mod.evaluate(str(answers), regen_answer=True)
        lines = [json.loads(x) for x in answers.read_text().splitlines() if x.strip()]
    in_order = iter([{"model_answer": r["model_answer"], "correct": r["correct"]} for r in lines])
    _rewrite("eval_mathv_official_cases.json", lambda c: next(in_order))


FIXTURES = {"reward_openvlthinker": reward_openvlthinker, "reward_easyr1": reward_easyr1,
            "rl_prompt": rl_prompt, "eval_openvlthinker": eval_openvlthinker,
            "eval_mathvista_official": eval_mathvista_official,
            "eval_mathv_official": eval_mathv_official}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--refs", required=True, type=Path, help="directory of reference checkouts")
    ap.add_argument("--only", nargs="*", choices=sorted(FIXTURES), default=sorted(FIXTURES))
    args = ap.parse_args()
    refs = args.refs.resolve()
    with tempfile.TemporaryDirectory() as tmp, _cwd(Path(tmp)):  # the references write logs to cwd
        for name in args.only:
            FIXTURES[name](refs)


if __name__ == "__main__":
    main()
