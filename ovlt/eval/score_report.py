"""Reports: `report.md` (our accuracy next to the published numbers, and the same predictions
under every scoring style: ovlt, the benchmarks' official scorers, OpenVLThinker's) + a PNG bar
chart, and `plot_rounds` for accuracy across the iterate loop's rounds. matplotlib runs headless
(Agg)."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from ovlt.utils.io import atomic_write_bytes, atomic_write_text

BENCH_ORDER = ("mathvista", "mathverse", "mathvision")
BENCH_TITLE = {"mathvista": "MathVista", "mathverse": "MathVerse", "mathvision": "MathVision"}
# Published accuracies (percent), from ../shared/RECIPE.md (OpenVLThinker paper, v1.2).
PUBLISHED: dict[str, dict[str, float]] = {
    "Qwen2.5-VL-7B": {"mathvista": 68.5, "mathverse": 46.8, "mathvision": 24.0},
    "OpenVLThinker-7B v1.2": {"mathvista": 72.3, "mathverse": 50.3, "mathvision": 25.9},
}


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _save_png(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    _plt().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def load_scores(paths: Sequence[str | os.PathLike]) -> dict[str, dict]:
    """benchmark -> scores.json content, from scores.json files or directories holding one."""
    out = {}
    for p in paths:
        p = Path(p)
        f = p / "scores.json" if p.is_dir() else p
        if not f.is_file():
            raise FileNotFoundError(f"{f}: no scores.json (run `ovlt eval score` first)")
        from ovlt.eval.readers import parse_json, read_text
        s = parse_json(read_text(f, "scores file"), str(f))
        check_scores(s, f)
        out[s["benchmark"]] = s
    return out


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _percent(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 100.0


def check_scores(s, f) -> None:
    """What `write_report` reads of a scores.json, checked with errors naming file and key."""
    if not isinstance(s, dict) or "benchmark" not in s or "accuracy" not in s:
        raise ValueError(f"{f}: not an ovlt scores.json (needs 'benchmark' and 'accuracy')")
    if not isinstance(s["benchmark"], str) or not s["benchmark"]:
        raise ValueError(f"{f}: 'benchmark' is {s['benchmark']!r}, expected a benchmark name")
    if not _percent(s["accuracy"]):
        raise ValueError(f"{f}: 'accuracy' is {s['accuracy']!r}, expected a percentage 0-100")
    for k in ("n", "correct"):
        if not _count(s.get(k)):
            raise ValueError(f"{f}: {k!r} is {s.get(k)!r}, expected a count >= 0")
    styles = s.get("styles", {})
    if not isinstance(styles, dict) or not all(
            isinstance(v, dict) and _percent(v.get("accuracy")) for v in styles.values()):
        raise ValueError(f"{f}: 'styles' is {styles!r}, expected {{style: {{'accuracy': "
                         f"percentage, ...}}}}")
    by = s.get("by", {})
    if not isinstance(by, dict):
        raise ValueError(f"{f}: 'by' is a {type(by).__name__}, expected an object")
    for group, labels in by.items():
        if not isinstance(labels, dict):
            raise ValueError(f"{f}: by.{group} is a {type(labels).__name__}, expected an object")
        for lab, v in labels.items():
            if not (isinstance(v, dict) and _count(v.get("n")) and _percent(v.get("accuracy"))):
                raise ValueError(f"{f}: by.{group}.{lab} is {v!r}, expected {{'n': count, "
                                 f"'accuracy': percentage}}")


def bar_chart(ours: Mapping[str, float], out_png: str | os.PathLike, model_name: str = "ours",
              published: Mapping[str, Mapping[str, float]] = PUBLISHED) -> Path:
    """Grouped bars: one group per benchmark, one bar per model (ours + published)."""
    plt = _plt()
    benches = [b for b in BENCH_ORDER if b in ours] or list(ours)
    models = [(model_name, ours)] + list(published.items())
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(models)
    for k, (name, accs) in enumerate(models):
        xs = [i + (k - (len(models) - 1) / 2) * width for i in range(len(benches))]
        ys = [accs.get(b, float("nan")) for b in benches]
        ax.bar(xs, ys, width, label=name)
        for x, y in zip(xs, ys):
            if y == y:  # not NaN
                ax.text(x, y + 0.5, f"{y:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(benches)), [BENCH_TITLE.get(b, b) for b in benches])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, max(100.0, max((v for _, a in models for v in a.values()), default=0) + 5))
    ax.legend(fontsize=8)
    ax.set_title("Accuracy vs published")
    out = Path(out_png)
    _save_png(fig, out)
    return out


STYLE_NOTES = {
    "ovlt": "ovlt's extraction and grader (mathruler + math-verify)",
    "official": "each benchmark's own rule scorer: compare this row with published numbers",
    "openvlthinker": "OpenVLThinker's evaluation script (answer tag, mathruler)",
}


def style_table(scores: Mapping[str, dict], benches: Sequence[str]) -> list[str]:
    """The same predictions' accuracy under every scoring style, one row per style (empty
    when the scores carry no per-style accuracies)."""
    styles = [st for st in STYLE_NOTES if any(st in scores[b].get("styles", {}) for b in benches)]
    if not styles:
        return []
    lines = ["", "Accuracy (%) of the same predictions under each scoring style "
             "(`ovlt eval score --style`; **bold**: the row above):", "",
             "| scoring | " + " | ".join(BENCH_TITLE.get(b, b) for b in benches) + " | what |",
             "|---|" + "---|" * (len(benches) + 1)]
    for st in styles:
        cells = []
        for b in benches:
            v = scores[b].get("styles", {}).get(st)
            txt = "–" if v is None else f"{v['accuracy']:.1f}"
            cells.append(f"**{txt}**" if v is not None and scores[b].get("style") == st else txt)
        lines.append(f"| {st} | " + " | ".join(cells) + f" | {STYLE_NOTES[st]} |")
    return lines


def write_report(scores: Mapping[str, dict], out_dir: str | os.PathLike, model_name: str = "ours",
                 title: str = "ovlt evaluation") -> tuple[Path, Path]:
    """`report.md` + `accuracy.png` in out_dir. `scores`: benchmark -> scores.json dict."""
    out = Path(out_dir)
    ours = {b: float(s["accuracy"]) for b, s in scores.items()}
    png = bar_chart(ours, out / "accuracy.png", model_name)
    benches = [b for b in BENCH_ORDER if b in scores] + [b for b in scores if b not in BENCH_ORDER]
    used = sorted({s.get("style", "ovlt") for s in scores.values()})
    lines = [f"# {title}", "", "Accuracy (%); published numbers from the OpenVLThinker paper; "
             f"ours scored in the {' / '.join(used)} style.", "",
             "| model | " + " | ".join(BENCH_TITLE.get(b, b) for b in benches) + " |",
             "|---|" + "---|" * len(benches)]
    lines.append(f"| **{model_name}** | " + " | ".join(
        f"**{ours[b]:.1f}** (n={scores[b]['n']})" for b in benches) + " |")
    for name, accs in PUBLISHED.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{accs[b]:.1f}" if b in accs else "–" for b in benches) + " |")
    lines += style_table(scores, benches)
    lines += ["", f"![accuracy]({png.name})", ""]
    for b in benches:
        s = scores[b]
        lines += [f"## {BENCH_TITLE.get(b, b)}", "",
                  f"overall: {s['accuracy']:.2f}% ({s['correct']}/{s['n']})"
                  + (f"; {s['n_missing_predictions']} items without prediction"
                     if s.get("n_missing_predictions") else ""), ""]
        for group, labels in s.get("by", {}).items():
            lines += [f"| {group} | n | accuracy |", "|---|---|---|"]
            lines += [f"| {lab} | {v['n']} | {v['accuracy']:.1f} |" for lab, v in labels.items()]
            lines.append("")
    md = out / "report.md"
    atomic_write_text(md, "\n".join(lines))
    return md, png


RoundScores = Union[Sequence[Mapping[str, float]], Mapping[Union[int, str], Mapping[str, float]]]


def plot_rounds(per_round_scores: RoundScores, out_png: str | os.PathLike,
                published: Optional[Mapping[str, Mapping[str, float]]] = PUBLISHED) -> Path:
    """Accuracy (%) per benchmark across rounds: a list (index = round, 0 = base model) or a dict
    round -> {benchmark: accuracy}. Published numbers are drawn as dashed reference lines."""
    plt = _plt()
    if isinstance(per_round_scores, Mapping):
        rounds = sorted(per_round_scores, key=lambda r: int(r))
        rows = [per_round_scores[r] for r in rounds]
        xs = [int(r) for r in rounds]
    else:
        rows = list(per_round_scores)
        xs = list(range(len(rows)))
    if not rows:
        raise ValueError("plot_rounds needs at least one round of scores")
    benches = [b for b in BENCH_ORDER if any(b in r for r in rows)]
    benches += sorted({b for r in rows for b in r} - set(benches))
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, b in enumerate(benches):
        pts = [(x, r[b]) for x, r in zip(xs, rows) if b in r]
        c = colors[k % len(colors)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=c,
                label=BENCH_TITLE.get(b, b))
        if published:
            ref = published.get("OpenVLThinker-7B v1.2", {}).get(b)
            if ref is not None:
                ax.axhline(ref, color=c, linestyle="--", linewidth=0.8, alpha=0.7)
    ax.set_xticks(xs)
    ax.set_xlabel("round (0 = base model)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy across rounds (dashed: OpenVLThinker-7B v1.2)")
    ax.legend(fontsize=8)
    out = Path(out_png)
    _save_png(fig, out)
    return out
