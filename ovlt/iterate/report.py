"""`runs/<name>/report.md` + PNG plots from the manifest (and the GRPO step logs on disk).

Table per round: SFT examples kept, mean reward before/after GRPO, held-out accuracy per
difficulty, time per stage. Plots: reward across all GRPO steps of all rounds, held-out accuracy
per round. Written atomically; safe to call after every stage (partial runs give partial tables).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

from ovlt.iterate.manifest import DONE, Manifest
from ovlt.iterate.metrics import REWARD_KEYS, step_series
from ovlt.utils.io import atomic_write_bytes, atomic_write_text


def _fmt(v, pct: bool = False) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{100 * v:.1f}%" if pct else f"{v:.3f}"
    return str(v)


def _stage(man: Manifest, sid: str) -> dict:
    st = man.get(sid)
    return st if st.get("status") == DONE else {}


def rounds_of(man: Manifest) -> list[int]:
    return sorted({int(s["round"]) for s in man.stages.values() if "round" in s})


def difficulties(man: Manifest) -> list[str]:
    order = ["easy", "medium", "hard"]
    found = set()
    for s in man.stages.values():
        if s.get("stage") == "eval":
            found |= set((s.get("metrics") or {}).get("by_difficulty", {}))
    return [d for d in order if d in found] + sorted(found - set(order))


def reward_curve(man: Manifest) -> tuple[list[float], list[int]]:
    """Rewards of every GRPO step in round order, and the step index where each round starts."""
    ys: list[float] = []
    starts: list[int] = []
    for r in rounds_of(man):
        st = _stage(man, f"r{r}.grpo")
        if st:
            starts.append(len(ys))
            ys += step_series(st["outputs"]["save_dir"], REWARD_KEYS)
    return ys, starts


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plot_reward(man: Manifest, path: Path) -> Optional[Path]:
    ys, starts = reward_curve(man)
    if not ys:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(range(1, len(ys) + 1), ys, marker=".", lw=1)
    for i, s in enumerate(starts):
        ax.axvline(s + 0.5, color="grey", ls=":", lw=1)
        ax.text(s + 1, max(ys), f"round {i + 1}", fontsize=8, va="top")
    ax.set_xlabel("GRPO step (all rounds)")
    ax.set_ylabel("mean reward")
    ax.set_title("GRPO reward")
    ax.grid(alpha=0.3)
    atomic_write_bytes(path, _png(fig))
    plt.close(fig)
    return path


def plot_accuracy(man: Manifest, path: Path) -> Optional[Path]:
    rows = [(r, _stage(man, f"r{r}.eval").get("metrics")) for r in rounds_of(man)]
    rows = [(r, m) for r, m in rows if m]
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = [r for r, _ in rows]
    ax.plot(xs, [m.get("accuracy") for _, m in rows], marker="o", lw=2, label="all")
    for d in difficulties(man):
        ax.plot(xs, [m.get("by_difficulty", {}).get(d) for _, m in rows], marker=".", ls="--",
                label=d)
    if any(m.get("format") is not None for _, m in rows):
        ax.plot(xs, [m.get("format") for _, m in rows], marker="x", ls=":", label="format")
    ax.set_xticks(xs)
    ax.set_xlabel("round (0 = base model)")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    atomic_write_bytes(path, _png(fig))
    plt.close(fig)
    return path


def render(man: Manifest) -> str:
    diffs = difficulties(man)
    lines = [f"# ovlt iterate: {man.data.get('name', '')}", ""]
    head = (["round", "SFT kept", "reward before GRPO", "reward after GRPO", "held-out acc"]
            + [f"acc {d}" for d in diffs] + ["format", "t data", "t sft", "t grpo", "t eval"])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rounds_of(man):
        data, grpo, ev = (_stage(man, f"r{r}.{s}") for s in ("data", "grpo", "eval"))
        if r == 0 and not ev:
            continue
        dm, gm, em = data.get("metrics", {}), grpo.get("metrics", {}), ev.get("metrics", {})
        row = [str(r) if r else "0 (base)", _fmt(dm.get("kept")),
               _fmt(gm.get("reward_before")), _fmt(gm.get("reward_after")),
               _fmt(em.get("accuracy"), True)]
        row += [_fmt(em.get("by_difficulty", {}).get(d), True) for d in diffs]
        row.append(_fmt(em.get("format"), True))
        for s in ("data", "sft", "grpo", "eval"):
            secs = _stage(man, f"r{r}.{s}").get("seconds")
            row.append(f"{secs:.0f}s" if secs is not None else "–")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("SFT kept: verified shortest chains kept for SFT. Reward before/after: mean "
                 "GRPO reward over the first / last steps of the round. Held-out: greedy "
                 "accuracy on the held-out synthetic split (per difficulty), format = share of "
                 "answers in the required `<think>`/`<answer>` layout.")
    base = next((m for m in (_stage(man, f"r{r}.eval").get("metrics", {}) for r in rounds_of(man))
                 if m.get("constant_baseline") is not None), None)
    if base:
        lines.append(f"Chance level: the best constant answer ({base['constant_answer']!r}, chosen "
                     f"with hindsight on the held-out split) scores "
                     f"{_fmt(base['constant_baseline'], True)}.")
    bench = {}
    for r in rounds_of(man):
        for name, acc in (_stage(man, f"r{r}.eval").get("metrics", {}).get("benchmarks") or {}).items():
            bench.setdefault(name, {})[r] = acc
    if bench:
        lines += ["", "## Benchmarks", "", "| benchmark | " + " | ".join(
            f"round {r}" for r in rounds_of(man)) + " |", "|---|" + "---|" * len(rounds_of(man))]
        for name, per in bench.items():
            lines.append(f"| {name} | " + " | ".join(_fmt(per.get(r)) for r in rounds_of(man)) + " |")
    total = sum(s.get("seconds") or 0 for s in man.stages.values() if s.get("status") == DONE)
    lines += ["", f"Total stage time: {total:.0f}s.", ""]
    return "\n".join(lines)


def write_report(man: Manifest, run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    text = render(man)
    for name, fn in (("reward_curve.png", plot_reward), ("accuracy_per_round.png", plot_accuracy)):
        if fn(man, run_dir / name):
            text += f"\n![{name}]({name})\n"
    atomic_write_text(run_dir / "report.md", text)
    return run_dir / "report.md"
