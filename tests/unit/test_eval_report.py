"""report.md + bar chart, and plot_rounds: files render and hold the right numbers."""
import json

import pytest
from PIL import Image

from ovlt.eval.cli import main
from ovlt.eval.score_report import PUBLISHED, plot_rounds, write_report
from ovlt.eval.scoring import aggregate


def _scores(bench, n, correct, cat_key, labels):
    js = [{"correct": k < correct, "categories": {cat_key: labels[k % len(labels)]}} for k in range(n)]
    return aggregate(bench, js, n_items=n)


def _check_png(path, min_bytes=8000):
    assert path.is_file() and path.stat().st_size > min_bytes
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
        # not blank: a real chart has many colours
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20


def test_write_report_table_and_chart(tmp_path):
    scores = {"mathvista": _scores("mathvista", 10, 7, "task", ["geometry problem solving", "math word problem"]),
              "mathverse": _scores("mathverse", 5, 2, "problem_version", ["Text Dominant", "Vision Only"]),
              "mathvision": _scores("mathvision", 4, 1, "subject", ["logic", "algebra"])}
    assert scores["mathvista"]["accuracy"] == 70.0 and scores["mathverse"]["accuracy"] == 40.0
    md, png = write_report(scores, tmp_path, model_name="ovlt-r1")
    text = md.read_text()
    assert "| model | MathVista | MathVerse | MathVision |" in text
    assert "| **ovlt-r1** | **70.0** (n=10) | **40.0** (n=5) | **25.0** (n=4) |" in text
    assert "| Qwen2.5-VL-7B | 68.5 | 46.8 | 24.0 |" in text
    assert "| OpenVLThinker-7B v1.2 | 72.3 | 50.3 | 25.9 |" in text
    # per-group tables: geometry items are k = 0, 2, 4, 6, 8 of which k < 7 are right -> 4/5
    assert "| geometry problem solving | 5 | 80.0 |" in text
    assert f"![accuracy]({png.name})" in text
    _check_png(png)


def test_plot_rounds_list_and_dict(tmp_path):
    rounds = [{"mathvista": 68.0, "mathverse": 45.0, "mathvision": 23.5},
              {"mathvista": 70.1, "mathverse": 48.2, "mathvision": 24.4},
              {"mathvista": 71.9, "mathverse": 49.0}]
    p1 = plot_rounds(rounds, tmp_path / "rounds.png")
    _check_png(p1)
    p2 = plot_rounds({"0": rounds[0], "2": rounds[2], "1": rounds[1]}, tmp_path / "rounds2.png")
    _check_png(p2)
    with pytest.raises(ValueError, match="at least one round"):
        plot_rounds([], tmp_path / "x.png")


def test_report_cli_from_scores_dirs(tmp_path, capsys):
    for b, (n, c) in {"mathvista": (4, 3), "mathvision": (5, 1)}.items():
        d = tmp_path / b
        d.mkdir()
        (d / "scores.json").write_text(json.dumps(aggregate(b, [{"correct": k < c, "categories": {}}
                                                                  for k in range(n)])))
    assert main(["report", "--scores", str(tmp_path / "mathvista"), str(tmp_path / "mathvision"),
                 "--out", str(tmp_path / "rep"), "--model-name", "mine"]) == 0
    out = capsys.readouterr().out
    assert "mathvista: 75.00%" in out and "mathvision: 20.00%" in out
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "| model | MathVista | MathVision |" in text and "| Qwen2.5-VL-7B | 68.5 | 24.0 |" in text
    _check_png(tmp_path / "rep" / "accuracy.png")
    assert main(["report", "--scores", str(tmp_path / "nope"), "--out", str(tmp_path / "r2")]) == 2
    assert PUBLISHED["OpenVLThinker-7B v1.2"]["mathverse"] == 50.3
