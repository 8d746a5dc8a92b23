"""The reference reward styles against their references' own outputs.

tests/data/reward_*_cases.json and rl_prompt_cases.json hold inputs and the outputs the reference
code (OpenVLThinker's r1v.py, EasyR1's math.py, their prompt templates) gave when run for real;
each file names its reference and how to regenerate it. Both rewards are deterministic: every
case must agree.
"""
import json
from pathlib import Path

import pytest

from ovlt.config import ConfigError, JobConfig, validate
from ovlt.rewards import format_reward, math_reward, rl_prompt, total_reward
from ovlt.rewards.math_reward import resolve_format_weight

DATA = Path(__file__).resolve().parents[1] / "data"


def cases(name):
    d = json.loads((DATA / name).read_text())
    assert d["reference"] and d["regenerate"]
    return d["cases"]


def test_openvlthinker_reward_reproduces_r1v():
    cs = cases("reward_openvlthinker_cases.json")
    assert len(cs) >= 100
    diff = []
    for c in cs:
        got = {"overall": total_reward(c["response"], c["ground_truth"], style="openvlthinker"),
               "format": format_reward(c["response"], style="openvlthinker")}
        if got != c["expected"]:
            diff.append((c, got))
    assert diff == []
    # the quirks are really exercised: halved rewards, ungraded answers, whole-response grading
    overall = [c["expected"]["overall"] for c in cs]
    assert overall.count(0.5) >= 20 and overall.count(1.0) >= 100 and overall.count(0.0) >= 100


def test_easyr1_reward_reproduces_math_py():
    cs = cases("reward_easyr1_cases.json")
    assert len(cs) >= 100
    diff = []
    for c in cs:
        got = {"overall": total_reward(c["response"], c["ground_truth"], style="easyr1"),
               "format": format_reward(c["response"], style="easyr1"),
               "accuracy": math_reward(c["response"], c["ground_truth"], style="easyr1")}
        if any(abs(got[k] - c["expected"][k]) > 1e-12 for k in got):
            diff.append((c, got))
    assert diff == []
    assert {c["expected"]["overall"] for c in cs} >= {0.0, 0.1, 0.9, 1.0}


def test_rl_prompt_templates_render_like_the_references():
    for c in cases("rl_prompt_cases.json"):
        for style in ("openvlthinker", "easyr1"):
            assert rl_prompt(c["problem"], style, suffix=" ignored") == c["expected"][style]
    # the ovlt style keeps the configured suffix, untrimmed
    assert rl_prompt(" <image>x? ", "ovlt", " Think.") == " <image>x?  Think."


@pytest.mark.parametrize("response,truth,style,expected", [
    # r1v: the FIRST one-line answer pair, case-sensitive tags, whole response without one
    ("<think>r</think> a <answer>1</answer> b <answer>2</answer>", "1", "openvlthinker", 1.0),
    ("<think>r</think> a <answer>1</answer> b <answer>2</answer>", "2", "openvlthinker", 0.0),
    ("<think>r</think> a <answer>\n2\n</answer>", "2", "openvlthinker", 0.0),
    ("2", "2", "openvlthinker", 1.0),
    ("<think>r</think> \\boxed{2}", "2", "openvlthinker", 0.0),     # no box fallback
    ("<think>r</think>\n<answer>2</answer>", "2", "openvlthinker", 0.5),  # nothing in between
    ("<think>r</think> so <answer>2</answer>", "2", "openvlthinker", 1.0),
    ("<think>r</think> so <answer>Yes</answer>", "yes", "openvlthinker", 1.0),
    ("<think>r</think> so <answer>2</answer>", 2, "openvlthinker", 0.0),  # r1v fails on a non-string
    # easyr1: the last box after whitespace around < > / is removed
    ("<think>r</think> \\boxed{1} \\boxed{1 / 2}", "1/2", "easyr1", 1.0),
    ("<think>r</think><answer>2</answer>", "2", "easyr1", 0.0),
])
def test_reference_style_quirks(response, truth, style, expected):
    assert math_reward(response, truth, style=style) == expected


def test_style_defaults_and_refusals():
    assert resolve_format_weight("easyr1", None) == 0.1
    assert resolve_format_weight("openvlthinker", None) == 0.0
    assert resolve_format_weight("ovlt", None) == 0.0 and resolve_format_weight("ovlt", 0.3) == 0.3
    # EasyR1's weighting: right answer without its format = 0.9
    assert total_reward("\\boxed{5}", "5", style="easyr1") == pytest.approx(0.9)
    with pytest.raises(ValueError, match="reward style must be one of"):
        math_reward("x", "1", style="r1v")
    with pytest.raises(ValueError, match="partial_credit, fallback and choices"):
        math_reward("x", "1", partial_credit=0.5, style="openvlthinker")
    cfg = JobConfig()
    cfg.rewards.style, cfg.rewards.fallback = "easyr1", "last_number"
    with pytest.raises(ConfigError, match="rewards.partial_credit and rewards.fallback need"):
        validate(cfg)


def test_grpo_score_uses_the_style(monkeypatch):
    """advantages.score: the pool grades in the style, the format reward is the style's, and the
    weighting is EasyR1's."""
    from types import SimpleNamespace

    from ovlt.config import RewardConfig
    from ovlt.grpo.advantages import score

    class InlinePool:
        def score(self, responses, truths, **kw):
            self.kw = kw
            return [math_reward(r, t, **kw) for r, t in zip(responses, truths)]

    rolls = [SimpleNamespace(text="<think>r</think>\n<answer>5</answer>", answer="5"),
             SimpleNamespace(text="<think>r</think> so \\boxed{5}", answer="5")]
    pool = InlinePool()
    rewards, acc = score(pool, rolls, RewardConfig(style="openvlthinker"))
    assert pool.kw["style"] == "openvlthinker" and acc == [0.5, 0.0] and rewards == [0.5, 0.0]
    rewards, acc = score(pool, rolls, RewardConfig(style="easyr1"))
    assert acc == [0.0, 1.0] and rewards == pytest.approx([0.0, 1.0])  # format 1.0 for the box
    rewards, acc = score(pool, rolls, RewardConfig(style="ovlt", format_weight=0.5))
    assert acc == [1.0, 1.0] and rewards == pytest.approx([1.0, 0.5])
