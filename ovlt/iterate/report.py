"""`runs/<name>/report.md` + PNG plots, rendered from `summary.json` (`ovlt.iterate.summary`).

Table per round: SFT examples kept, the probe reward before/after the round's GRPO (same
prompts and seeds, with its standard error), held-out accuracy overall and per difficulty,
format rate, time per stage; the baselines (best constant answer, the base model) under it.
Plots: the probe reward before/after GRPO per round, held-out accuracy per round. Written
atomically; safe to call after every stage (partial runs give partial tables).
"""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Optional

from ovlt.iterate.manifest import Manifest
from ovlt.iterate.summary import write_summary
from ovlt.logging import get_logger, log_once
from ovlt.utils.io import atomic_write_bytes, atomic_write_text

log = get_logger(__name__)

STAGES = ("data", "sft", "grpo", "eval")


def _fmt(v, pct: bool = False) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{100 * v:.1f}%" if pct else f"{v:.3f}"
    return str(v)


def _probe_cell(rec: dict) -> str:
    b, a, se = rec.get("probe_reward_before"), rec.get("probe_reward_after"), rec.get("probe_se")
    if b is None or a is None:
        return "–"
    return f"{b:.3f} → {a:.3f} ({a - b:+.3f} ± {se:.3f})" if se is not None else f"{b:.3f} → {a:.3f}"


def levels(summary: dict) -> list[str]:
    out: list[str] = []
    for rec in summary["rounds"]:
        out += [d for d in rec.get("acc_by_level", {}) if d not in out]
    return out


def findings(summary: dict) -> list[str]:
    """One line each: accuracy of the last round against the constant answer and round 1,
    the probe's rise per round in standard errors, SFT chains kept per round."""
    out = []
    rounds = [r for r in summary["rounds"] if r["round"] > 0]
    done = [r for r in rounds if r.get("heldout_acc") is not None]
    const = summary.get("baselines", {}).get("constant_answer_acc")
    if done:
        last = done[-1]
        txt = f"Held-out accuracy after round {last['round']}: {_fmt(last['heldout_acc'], True)}"
        if const:
            txt += f" = {last['heldout_acc'] / const:.1f}x the best constant answer"
        if len(done) > 1:
            txt += f"; round 1: {_fmt(done[0]['heldout_acc'], True)}"
        out.append(txt + ".")
    changed = [f"round {r['round']} {_fmt(r['heldout_acc_sft'], True)} → "
               f"{_fmt(r['heldout_acc'], True)}" for r in rounds
               if r.get("heldout_acc_sft") is not None and r.get("heldout_acc") is not None]
    if changed:
        out.append("Held-out accuracy of the SFT model → after its GRPO: " + "; ".join(changed)
                   + ".")
    rises = []
    for r in rounds:
        b, a, se = r.get("probe_reward_before"), r.get("probe_reward_after"), r.get("probe_se")
        if b is not None and a is not None:
            z = ""
            if se:
                z = f", {(a - b) / se:+.1f} se" + (" (within the noise)" if abs(a - b) < 2 * se
                                                    else "")
            rises.append(f"round {r['round']} {a - b:+.3f}{z}")
    if rises:
        out.append("Probe reward change from GRPO: " + "; ".join(rises) + ".")
    kept = [(r["round"], r["sft_kept"]) for r in rounds if r.get("sft_kept") is not None]
    if kept:
        out.append("Verified SFT chains kept: " + ", ".join(f"round {k} {n}" for k, n in kept)
                   + ".")
    return out


def render(summary: dict) -> str:
    lv = levels(summary)
    secs = summary.get("stage_seconds", {})
    lines = [f"# ovlt iterate: {summary.get('name', '')}", ""]
    head = (["round", "SFT kept", "probe reward before → after GRPO (± se, paired)", "SFT model acc",
             "held-out acc"]
            + [f"acc {d}" for d in lv] + ["format"] + [f"t {s}" for s in STAGES])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rec in summary["rounds"]:
        r = rec["round"]
        row = [str(r) if r else "0 (base)", _fmt(rec.get("sft_kept")), _probe_cell(rec),
               _fmt(rec.get("heldout_acc_sft"), True), _fmt(rec.get("heldout_acc"), True)]
        row += [_fmt(rec.get("acc_by_level", {}).get(d), True) for d in lv]
        row.append(_fmt(rec.get("format_rate"), True))
        for s in STAGES:
            t = secs.get(f"r{r}.{s}")
            row.append(f"{t:.0f}s" if t is not None else "–")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "SFT kept: verified shortest chains kept for SFT. Probe: mean GRPO reward (as "
              "the trainer scores rollouts) over a fixed set of held-out prompts, several "
              "samples each at the rollout temperature, from the round's SFT model (before "
              "GRPO) and GRPO model (after), same prompts and sampling seed; ± is the standard "
              "error of the difference given those prompts, over samples paired by seed "
              "(the unpaired one is in summary.json). Held-out: greedy accuracy on the "
              "held-out split (per difficulty) of the round's GRPO model; SFT model acc: the "
              "same for the round's SFT model, before its GRPO; format = share of answers in "
              "the required `<think>`/`<answer>` layout."]
    base = summary.get("baselines", {})
    if base.get("constant_answer_acc") is not None:
        lines.append(f"Chance level: the best constant answer ({base['constant_answer']!r}, chosen "
                     f"with hindsight on the held-out split) scores "
                     f"{_fmt(base['constant_answer_acc'], True)}.")
    lines += [""] + [f"- {t}" for t in findings(summary)]
    bench: dict = {}
    for rec in summary["rounds"]:
        for name, acc in (rec.get("benchmarks") or {}).items():
            bench.setdefault(name, {})[rec["round"]] = acc
    if bench:
        rs = [rec["round"] for rec in summary["rounds"]]
        lines += ["", "## Benchmarks", "", "| benchmark | " + " | ".join(
            f"round {r}" for r in rs) + " |", "|---|" + "---|" * len(rs)]
        for name, per in bench.items():
            lines.append(f"| {name} | " + " | ".join(_fmt(per.get(r)) for r in rs) + " |")
    if "total" in secs:
        lines += ["", f"Total stage time: {secs['total']:.0f}s."]
    lines.append("")
    return "\n".join(lines)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _pyplot():
    """matplotlib's pyplot on the Agg backend, or None (logged once) when not installed: the
    report and summary.json do not need it."""
    try:
        import matplotlib
    except ImportError:
        log_once(log, "no-matplotlib", "matplotlib is not installed: report.md without plots",
                 level=logging.WARNING)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _figure(rows: list):
    """(pyplot, figure, axes) for one 6x3.5 in plot of `rows`, or None when there are no rows
    or no matplotlib."""
    plt = _pyplot() if rows else None
    return None if plt is None else (plt, *plt.subplots(figsize=(6, 3.5)))


def _save(plt, fig, path: Path) -> Path:
    atomic_write_bytes(path, _png(fig))
    plt.close(fig)
    return path


def plot_probe(summary: dict, path: Path) -> Optional[Path]:
    """Probe reward before / after GRPO per round, error bars = standard errors."""
    rows = [r for r in summary["rounds"] if r.get("probe_reward_before") is not None
            and r.get("probe_reward_after") is not None]
    made = _figure(rows)
    if made is None:
        return None
    plt, fig, ax = made
    xs = [r["round"] for r in rows]
    w = 0.35
    ax.bar([x - w / 2 for x in xs], [r["probe_reward_before"] for r in rows], w,
           yerr=[r.get("probe_se_before") or 0 for r in rows], capsize=3,
           label="before GRPO (SFT model)", color="#9db4d6")
    ax.bar([x + w / 2 for x in xs], [r["probe_reward_after"] for r in rows], w,
           yerr=[r.get("probe_se_after") or 0 for r in rows], capsize=3,
           label="after GRPO", color="#2d5fa8")
    ax.set_xticks(xs)
    ax.set_xlabel("round")
    ax.set_ylabel("probe reward")
    ax.set_title("GRPO reward on a fixed probe set (same prompts and seeds)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, axis="y")
    return _save(plt, fig, path)


def plot_accuracy(summary: dict, path: Path) -> Optional[Path]:
    rows = [r for r in summary["rounds"] if r.get("heldout_acc") is not None]
    made = _figure(rows)
    if made is None:
        return None
    plt, fig, ax = made
    xs = [r["round"] for r in rows]
    ax.plot(xs, [r["heldout_acc"] for r in rows], marker="o", lw=2, label="all")
    for d in levels(summary):
        ax.plot(xs, [r.get("acc_by_level", {}).get(d) for r in rows], marker=".", ls="--", label=d)
    if any(r.get("format_rate") is not None for r in rows):
        ax.plot(xs, [r.get("format_rate") for r in rows], marker="x", ls=":", label="format")
    const = summary.get("baselines", {}).get("constant_answer_acc")
    if const is not None:
        ax.axhline(const, color="grey", ls="-.", lw=1, label="best constant answer")
    ax.set_xticks(xs)
    ax.set_xlabel("round (0 = base model)")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def write_report(man: Manifest, run_dir: str | Path) -> Path:
    """summary.json from the manifest, then report.md and the plots from summary.json."""
    run_dir = Path(run_dir)
    write_summary(man, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    text = render(summary)
    for name, fn in (("probe_reward.png", plot_probe), ("accuracy_per_round.png", plot_accuracy)):
        if fn(summary, run_dir / name):
            text += f"\n![{name}]({name})\n"
    atomic_write_text(run_dir / "report.md", text)
    return run_dir / "report.md"
