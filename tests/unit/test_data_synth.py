"""Synthetic data: deterministic per seed, readable by ovlt's own readers, and answers that
are right - checked by measuring the drawn images (bar heights, shape blobs) and by
re-evaluating the arithmetic of each solution."""
import hashlib
import json
import re

import numpy as np
import pyarrow.parquet as pq

from ovlt.data.formats import SkipReport, read_rl, read_sft, validate_rl, validate_sft
from ovlt.data.synth import COLORS, LEVELS, TASKS, generate, make_problem


def _digest(d):
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(d).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_deterministic_per_seed(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(a, 25, seed=5)
    generate(b, 25, seed=5)
    generate(c, 25, seed=6)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    # sample i does not depend on n
    assert make_problem(5, 3)["question"] == make_problem(5, 3)["question"]
    generate(tmp_path / "d", 10, seed=5)
    assert (tmp_path / "d/images/synth-5-000003.png").read_bytes() == \
        (a / "images/synth-5-000003.png").read_bytes()


def test_outputs_read_back_without_skips(tmp_path):
    out = tmp_path / "s"
    summary = generate(out, 30, seed=1)
    assert summary["n"] == 30
    rep = SkipReport(strict=True)
    sft = list(read_sft(out / "sft.jsonl", report=rep))
    rl = list(read_rl(out / "rl.parquet", report=rep))
    assert len(sft) == len(rl) == 30 and rep.num_skipped == 0
    for r in sft:
        assert validate_sft(r, 2048, 3136, 262144) is None
    for r in rl:
        assert validate_rl(r, 6144, 3136, 262144) is None
        assert r.difficulty in LEVELS and r.source in TASKS
    t = pq.read_table(out / "rl.parquet")
    assert set(t.column_names) >= {"problem", "answer", "images", "difficulty", "source"}
    assert {r.source for r in rl} == set(TASKS)
    first = json.loads((out / "sft.jsonl").read_text().splitlines()[0])
    assert first["messages"][0]["content"].startswith("<image>")
    assert first["messages"][1]["content"].endswith(f"<answer>{first['answer']}</answer>")


def test_images_small_and_answers_short():
    for i in range(150):
        p = make_problem(2, i)
        w, h = p["image"].size
        assert 112 <= w <= 224 and 112 <= h <= 224, (p["task"], w, h)
        assert re.fullmatch(r"-?\d+", p["answer"]), p
        assert p["solution"].endswith(f"<answer>{p['answer']}</answer>")


def test_solution_arithmetic():
    """Every 'a op b op ... = c' (op in + - x) and every Pythagoras step in a solution holds."""
    chain = re.compile(r"(-?\d+(?:\s*[-+x]\s*-?\d+)+)\s*=\s*(-?\d+)")
    pyth = re.compile(r"sqrt\((\d+)\^2 \+ (\d+)\^2\) = .* = (\d+)\.")
    checked = 0
    for i in range(200):
        p = make_problem(3, i)
        for lhs, rhs in chain.findall(p["solution"]):
            toks = re.findall(r"\d+|[-+x]", lhs)
            if toks[0] == "-":
                toks = [str(-int(toks[1]))] + toks[2:]
            val = int(toks[0])
            for op, num in zip(toks[1::2], toks[2::2]):
                val = val + int(num) if op == "+" else (val - int(num) if op == "-" else val * int(num))
            assert val == int(rhs), (p["solution"], lhs, rhs)
            checked += 1
        for a, b, c in pyth.findall(p["solution"]):
            assert int(a) ** 2 + int(b) ** 2 == int(c) ** 2
            checked += 1
    assert checked > 100


def _bar_values(img, n, vmax):
    """Measure bar heights in pixels (chart geometry: 168 high, axis 22 px from the bottom,
    10 px top margin, bars start at x = 32 with pitch (w - 38) / n)."""
    a = np.asarray(img).astype(int)
    h, w, _ = a.shape
    bottom, top = 22, 10
    plot_h = h - top - bottom
    vals = []
    for i in range(n):
        x = int(26 + 6 + i * (w - 26 - 12) / n + 4)
        col = a[:h - bottom - 1, x]
        colored = np.nonzero((np.abs(col - col.mean(axis=1, keepdims=True)).sum(1) > 60))[0]
        y_top = colored.min()
        vals.append(round((h - bottom - y_top) * vmax / plot_h))
    return vals


def test_bar_chart_answers_match_pixels():
    checked = 0
    for i in range(0, 300, len(TASKS)):   # index % 5 == 0 -> bar_chart
        p = make_problem(4, i)
        assert p["task"] == "bar_chart"
        n = (p["image"].size[0] - 44) // 30
        vmax = 10 if p["difficulty"] == "easy" else 20
        vals = dict(zip("ABCDEFG", _bar_values(p["image"], n, vmax)))
        q = p["question"]
        if p["difficulty"] == "easy":
            expect = vals[re.search(r"bar (\w)", q).group(1)]
        elif p["difficulty"] == "medium":
            x, y = re.findall(r"bar (\w)", q)
            expect = vals[x] - vals[y]
        else:
            expect = sum(vals.values())
        assert int(p["answer"]) == expect, (i, q, vals, p["answer"])
        checked += 1
    assert checked == 60


def _blobs(img):
    """(kind, colour) of each shape: one per 56-px grid cell; kind from the fill ratio of
    its bounding box (square 1, circle pi/4, triangle 1/2)."""
    a = np.asarray(img).astype(int)
    out = []
    for gy in range(a.shape[0] // 56):
        for gx in range(a.shape[1] // 56):
            cell = a[gy * 56:(gy + 1) * 56, gx * 56:(gx + 1) * 56]
            ink = (cell != 255).any(-1)
            if ink.sum() < 20:
                continue
            ys, xs = np.nonzero(ink)
            fill = ink.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
            kind = "square" if fill > 0.93 else ("circle" if fill > 0.65 else "triangle")
            rgb = tuple(int(v) for v in np.median(cell[ink], axis=0))
            colour = min(COLORS, key=lambda c: sum(abs(u - v) for u, v in zip(COLORS[c], rgb)))
            out.append((kind, colour))
    return out


def test_shape_count_answers_match_pixels():
    checked = 0
    for i in range(2, 400, len(TASKS)):   # index % 5 == 2 -> shape_count
        p = make_problem(7, i)
        assert p["task"] == "shape_count"
        shapes = _blobs(p["image"])
        q = p["question"]
        if p["difficulty"] == "easy":
            kind = re.search(r"How many (\w+)s are", q).group(1)
            expect = sum(k == kind for k, _ in shapes)
        elif p["difficulty"] == "medium":
            colour, kind = re.search(r"How many (\w+) (\w+)s are", q).groups()
            expect = sum(s == (kind, colour) for s in shapes)
        else:
            colour = re.search(r"not (\w+)\?", q).group(1)
            expect = sum(c != colour for _, c in shapes)
        assert int(p["answer"]) == expect, (i, q, shapes, p["answer"])
        checked += 1
    assert checked == 80


def test_cli_synth(tmp_path, capsys):
    from ovlt.data.cli import main
    assert main(["synth", "--out", str(tmp_path / "o"), "--n", "7", "--seed", "9"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 7 and sum(out["by_task_level"].values()) == 7
    assert len(list((tmp_path / "o/images").glob("*.png"))) == 7
