"""The demo's task family (`colour_sum`): answers checked against the drawn pixels, chains whose
arithmetic holds, files the readers take, and the probe's prompt selection."""
from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from ovlt.data.formats import SkipReport, read_rl, read_sft
from ovlt.data.synth import (STRIPE_COLORS, STRIPE_VALUES, TASKS, generate, make_problem)
from ovlt.iterate.probe import probe_records


def _colours_in(img) -> list[str]:
    """Nearest palette colour at the centre of each 28 px column of the 112 px image."""
    a = np.asarray(img.convert("RGB"), dtype=float)
    names = list(STRIPE_COLORS)
    pal = np.array([STRIPE_COLORS[c] for c in names], dtype=float)
    seen = []
    for x in (14, 42, 70, 98):
        px = a[56, x]
        seen.append(names[int(np.argmin(((pal - px) ** 2).sum(1)))])
    return seen


def test_answers_match_the_pixels_and_chains_add_up():
    levels = Counter()
    for i in range(200):
        p = make_problem(7, i, ("colour_sum",))
        assert p["task"] == "colour_sum" and p["image"].size == (112, 112)
        colours = set(_colours_in(p["image"]))
        levels[p["difficulty"]] += 1
        assert len(colours) == {"easy": 1, "medium": 2, "hard": 3}[p["difficulty"]], p["id"]
        assert int(p["answer"]) == sum(STRIPE_VALUES[c] for c in colours), p["id"]
        think = re.fullmatch(r"<think>\n(.*)\n</think>\n<answer>(\d+)</answer>", p["solution"])
        assert think and think.group(2) == p["answer"]
        named = re.findall(r"([a-z]+) (\d)", think.group(1))
        assert {c for c, _ in named} == colours
        assert all(STRIPE_VALUES[c] == int(v) for c, v in named)
        if "=" in think.group(1):
            lhs, rhs = think.group(1).split("=")
            assert sum(int(v) for _, v in named) == int(rhs)
        assert "red 1, blue 2, green 3, yellow 4, purple 5" in p["question"]
        # the levels differ in their text too: a sum names how many colours it adds
        count = {"easy": "the value of the colour", "medium": "the two colours",
                 "hard": "the three colours"}[p["difficulty"]]
        assert count in p["question"], (p["id"], p["question"])
    assert min(levels.values()) > 40  # the three levels are all drawn
    # deterministic per (seed, index)
    assert make_problem(7, 3, ("colour_sum",))["solution"] == \
        make_problem(7, 3, ("colour_sum",))["solution"]


def test_generate_writes_the_family_and_refuses_unknown_tasks(tmp_path):
    s = generate(tmp_path / "d", 30, seed=3, tasks=["colour_sum"])
    assert set(k.split("/")[0] for k in s["by_task_level"]) == {"colour_sum"}
    rep = SkipReport(strict=True)
    rl = list(read_rl(tmp_path / "d" / "rl.parquet", report=rep))
    sft = list(read_sft(tmp_path / "d" / "sft.jsonl", report=rep))
    assert len(rl) == len(sft) == 30 and rep.num_skipped == 0
    with pytest.raises(ValueError, match="unknown synthetic task"):
        generate(tmp_path / "e", 3, seed=3, tasks=["colour_sums"])
    # the default families are unchanged by the new one
    assert "colour_sum" not in TASKS
    assert make_problem(5, 3)["task"] in TASKS


def test_probe_records_are_the_first_of_the_chosen_levels():
    class R:
        def __init__(self, i, d):
            self.id, self.difficulty = i, d
    recs = [R(i, d) for i, d in enumerate(["easy", "hard", "medium", "easy", "hard", "medium"])]
    assert [r.id for r in probe_records(recs, 3)] == [0, 1, 2]
    assert [r.id for r in probe_records(recs, 3, ["medium", "hard"])] == [1, 2, 4]
    assert probe_records(recs, 0) == []
