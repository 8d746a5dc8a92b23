"""summary.json from a manifest, the probe's standard error, and the report rendered from the
summary (hand-made manifests; numbers checked against hand computation)."""
from __future__ import annotations

import json
import math

import pytest

from ovlt.iterate.manifest import Manifest
from ovlt.iterate.probe import diff_se, paired_rise, probe_stats
from ovlt.iterate.report import render, write_report
from ovlt.iterate.summary import build_summary


def test_probe_stats_binary_matches_the_closed_form():
    per = [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 1]]
    s = probe_stats(per)
    p = [0.5, 1.0, 0.25]
    assert s["mean"] == pytest.approx(sum(p) / 3)
    # 0/1 rewards: se = sqrt(sum p(1-p) / (n-1)) / P
    assert s["se"] == pytest.approx(math.sqrt(sum(x * (1 - x) for x in p) / 3) / 3)
    assert s["prompts"] == 3 and s["samples"] == 12


def test_probe_stats_graded_rewards_and_edge_cases():
    # rewards 0.5 * acc + 0.5 * format: values 0, 0.5, 1
    s = probe_stats([[0.5, 1.0], [0.0, 0.5, 1.0]])
    var0 = ((0.5 - 0.75) ** 2 + (1.0 - 0.75) ** 2) / 1 / 2
    var1 = ((0.0 - 0.5) ** 2 + 0 + (1.0 - 0.5) ** 2) / 2 / 3
    assert s["mean"] == pytest.approx((0.75 + 0.5) / 2)
    assert s["se"] == pytest.approx(math.sqrt(var0 + var1) / 2)
    assert probe_stats([[1.0], [0.0]])["se"] == 0.0       # one sample: no variance estimate
    assert probe_stats([])["mean"] is None
    assert diff_se(0.03, 0.04) == pytest.approx(0.05) and diff_se(None, 0.1) is None


def test_paired_rise_is_the_se_of_per_sample_differences():
    before = [[0.0, 0.5, 1.0, 1.0], [0.0, 0.0, 0.5]]
    after = [[0.5, 0.5, 1.0, 1.0], [1.0, 0.0, 0.5]]     # two samples changed, the rest alike
    r = paired_rise(before, after)
    d0, d1 = [0.5, 0, 0, 0], [1.0, 0, 0]                 # per-sample differences
    m0, m1 = 0.125, 1 / 3
    var0 = sum((x - m0) ** 2 for x in d0) / 3 / 4
    var1 = sum((x - m1) ** 2 for x in d1) / 2 / 3
    assert r["rise"] == pytest.approx((m0 + m1) / 2)
    assert r["se"] == pytest.approx(math.sqrt(var0 + var1) / 2)
    # pairing only removes the noise the runs share: below the unpaired standard error here
    assert r["se"] < diff_se(probe_stats(before)["se"], probe_stats(after)["se"])
    assert paired_rise(before, after[:1]) is None                 # prompts do not line up
    assert paired_rise(before, [after[0], after[1][:2]]) is None  # samples do not line up


def _manifest(tmp_path) -> Manifest:
    man = Manifest(tmp_path / "manifest.json")
    man.data["name"] = "demo"

    def done(sid, rnd, stage, metrics, seconds):
        man.stages[sid] = {"status": "done", "round": rnd, "stage": stage, "metrics": metrics,
                           "seconds": seconds, "outputs": {}}
    done("r0.prepare", 0, "prepare", {"pool": 100}, 5.0)
    done("r0.eval", 0, "eval", {"accuracy": 0.0, "format": 0.0, "n": 60,
                                "by_difficulty": {"hard": 0.0, "easy": 0.0, "medium": 0.0},
                                "n_by_difficulty": {"hard": 20, "easy": 20, "medium": 20},
                                "constant_answer": "7", "constant_baseline": 0.15}, 9.5)
    done("r1.data", 1, "data", {"kept": 96, "source": "teacher:synthetic", "problems": 96}, 20.0)
    done("r1.sft", 1, "sft", {"steps": 120, "loss_first": 11.0, "loss_last": 0.3}, 60.0)
    done("r1.grpo", 1, "grpo", {"steps": 8, "reward_before": 0.6, "reward_after": 0.7}, 70.0)
    done("r1.eval", 1, "eval", {
        "accuracy": 0.4, "format": 1.0, "n": 60,
        "by_difficulty": {"hard": 0.2, "easy": 0.7, "medium": 0.3},
        "n_by_difficulty": {"hard": 20, "easy": 20, "medium": 20},
        "constant_answer": "7", "constant_baseline": 0.15,
        "sft_model": {"accuracy": 0.45, "format": 1.0, "n": 60,
                      "by_difficulty": {"medium": 0.35, "easy": 0.8, "hard": 0.2}},
        "probe": {"before": 0.55, "after": 0.7, "se_before": 0.03, "se_after": 0.04,
                  "se_rise": 0.05, "se_rise_independent": 0.06, "prompts": 32,
                  "samples_per_prompt": 8}}, 30.0)
    man.stages["r2.data"] = {"status": "running", "round": 2, "stage": "data", "metrics": {},
                             "seconds": None}
    return man


def test_summary_schema_and_values(tmp_path):
    s = build_summary(_manifest(tmp_path))
    assert s["name"] == "demo"
    assert [r["round"] for r in s["rounds"]] == [0, 1, 2]
    r0, r1, r2 = s["rounds"]
    assert r0["heldout_acc"] == 0.0 and r0["sft_kept"] is None and r0["probe_reward_before"] is None
    assert r1 == {**r1, "heldout_acc": 0.4, "heldout_n": 60, "format_rate": 1.0, "sft_kept": 96,
                  "probe_reward_before": 0.55, "probe_reward_after": 0.7, "probe_se": 0.05,
                  "probe_se_before": 0.03, "probe_se_after": 0.04, "probe_se_independent": 0.06,
                  "heldout_acc_sft": 0.45}
    assert list(r1["acc_by_level"]) == ["easy", "medium", "hard"]  # difficulty order
    assert r1["acc_by_level_sft"] == {"easy": 0.8, "medium": 0.35, "hard": 0.2}
    assert r0["heldout_acc_sft"] is None  # the base model has no SFT model before it
    assert r1["grpo"]["reward_after"] == 0.7 and r1["sft"]["steps"] == 120
    assert r2["heldout_acc"] is None and r2["sft_kept"] is None  # running: nothing yet
    assert s["baselines"] == {"constant_answer_acc": 0.15, "constant_answer": "7",
                              "base_model_acc": 0.0, "base_model_format": 0.0}
    assert s["stage_seconds"] == {"r0.prepare": 5.0, "r0.eval": 9.5, "r1.data": 20.0,
                                  "r1.sft": 60.0, "r1.grpo": 70.0, "r1.eval": 30.0,
                                  "total": 194.5}


def test_report_and_plots_come_from_summary_json(tmp_path):
    man = _manifest(tmp_path)
    write_report(man, tmp_path)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s == json.loads(json.dumps(build_summary(man)))
    text = (tmp_path / "report.md").read_text()
    assert text == render(s) + "\n![probe_reward.png](probe_reward.png)\n" \
        "\n![accuracy_per_round.png](accuracy_per_round.png)\n"
    assert ("| 1 | 96 | 0.550 → 0.700 (+0.150 ± 0.050) | 45.0% | 40.0% | 70.0% | 30.0% | "
            "20.0% | 100.0% |") in text
    assert "| 0 (base) | – | – | – | 0.0% |" in text
    assert "scores 15.0%" in text and "Total stage time: 194s." in text
    # what a reader checks first: accuracy vs the constant answer (0.40 / 0.15), the probe's
    # rise in standard errors (0.15 / 0.05), the chains kept
    assert "- Held-out accuracy after round 1: 40.0% = 2.7x the best constant answer." in text
    assert "- Probe reward change from GRPO: round 1 +0.150, +3.0 se." in text
    s["rounds"][1]["probe_reward_after"] = 0.6  # +0.05 = 1 se: said to be noise
    assert "round 1 +0.050, +1.0 se (within the noise)." in render(s)
    assert "- Held-out accuracy of the SFT model → after its GRPO: round 1 45.0% → 40.0%." in text
    assert "- Verified SFT chains kept: round 1 96." in text
    for png in ("probe_reward.png", "accuracy_per_round.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # nothing but the report's own files next to the manifest (atomic writes leave no temp)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "accuracy_per_round.png", "probe_reward.png", "report.md", "summary.json"]
