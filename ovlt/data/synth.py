"""Synthetic verifiable visual-math problems drawn with PIL (the demo's and tests' data).

Five task families - bar charts, line charts, shape counting, geometry, tables - each at three
difficulty levels ("easy": read one value; "medium": compare two / one operation; "hard":
aggregate or two-step). Every problem has a ground-truth answer (mostly a small integer) and
a step-by-step solution ending in `<answer>X</answer>`. Images are 112-224 px. A sixth family,
`colour_sum` (the embedded demo's: colour stripes whose values are added), is drawn only when
asked for (`tasks=`).

`generate(out_dir, n, seed)` writes:
  images/<id>.png
  sft.jsonl   sharegpt: {"id", "messages": [user "<image>question + suffix", assistant solution],
              "images": ["images/<id>.png"], "source", "difficulty", "answer"}
  rl.parquet  columns id, problem ("<image>question"), answer, images (list of {bytes, path}),
              source (task family), difficulty
Output is a pure function of (n, seed): sample i uses its own RNG seeded from (seed, i).
"""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ovlt.utils.io import atomic_write_bytes, atomic_write_text

LEVELS = ("easy", "medium", "hard")
TASKS = ("bar_chart", "line_chart", "shape_count", "geometry", "table")
COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (30, 160, 60),
          "orange": (240, 140, 20), "purple": (140, 60, 180)}
LABELS = "ABCDEFG"


def _font(size: int):
    return ImageFont.load_default(size=size)


def _canvas(w: int, h: int):
    img = Image.new("RGB", (w, h), (255, 255, 255))
    return img, ImageDraw.Draw(img)


def _answer(steps: list[str], ans) -> str:
    return "<think>\n" + "\n".join(steps) + "\n</think>\n" + f"<answer>{ans}</answer>"


# --------------------------------------------------------------------------- charts
def _axes(d, w, h, vmax, step, font, left=26, bottom=22, top=10):
    plot_h = h - top - bottom
    d.line([(left, top), (left, h - bottom), (w - 6, h - bottom)], fill=(0, 0, 0), width=1)
    for v in range(0, vmax + 1, step):
        y = h - bottom - plot_h * v / vmax
        d.line([(left - 3, y), (w - 6, y)], fill=(225, 225, 225) if v else (0, 0, 0))
        d.text((2, y - 6), str(v), fill=(0, 0, 0), font=font)
    return left, top, plot_h, bottom


def bar_chart(rng: random.Random, level: str):
    n = {"easy": 3, "medium": rng.randint(4, 5), "hard": rng.randint(5, 6)}[level]
    vmax = 10 if level == "easy" else 20
    vals = [rng.randint(1, vmax) for _ in range(n)]
    w, h = 30 * n + 44, 168
    img, d = _canvas(w, h)
    font = _font(11)
    left, top, plot_h, bottom = _axes(d, w, h, vmax, 2 if vmax == 10 else 4, font)
    bw = (w - left - 12) / n
    color = COLORS[rng.choice(list(COLORS))]
    for i, v in enumerate(vals):
        x0 = left + 6 + i * bw
        y0 = h - bottom - plot_h * v / vmax
        d.rectangle([x0, y0, x0 + bw * 0.7, h - bottom], fill=color)
        d.text((x0 + bw * 0.35 - 3, y0 - 13), str(v), fill=(0, 0, 0), font=font)
        d.text((x0 + bw * 0.35 - 3, h - bottom + 4), LABELS[i], fill=(0, 0, 0), font=font)
    if level == "easy":
        i = rng.randrange(n)
        q = f"What is the value of bar {LABELS[i]} in the bar chart?"
        steps = [f"Bar {LABELS[i]} reaches the height labelled {vals[i]}."]
        ans = vals[i]
    elif level == "medium":
        i, j = rng.sample(range(n), 2)
        if vals[i] < vals[j]:
            i, j = j, i
        q = f"How much larger is bar {LABELS[i]} than bar {LABELS[j]}?"
        steps = [f"Bar {LABELS[i]} is {vals[i]}.", f"Bar {LABELS[j]} is {vals[j]}.",
                 f"The difference is {vals[i]} - {vals[j]} = {vals[i] - vals[j]}."]
        ans = vals[i] - vals[j]
    else:
        q = "What is the sum of the values of all bars?"
        steps = [f"The bars are {', '.join(f'{LABELS[k]} = {v}' for k, v in enumerate(vals))}.",
                 f"Sum: {' + '.join(map(str, vals))} = {sum(vals)}."]
        ans = sum(vals)
    return img, q, ans, steps


def line_chart(rng: random.Random, level: str):
    n = {"easy": 4, "medium": 5, "hard": 6}[level]
    vmax = 10
    vals = [rng.randint(0, vmax) for _ in range(n)]
    w, h = 200, 160
    img, d = _canvas(w, h)
    font = _font(11)
    left, top, plot_h, bottom = _axes(d, w, h, vmax, 2, font)
    dx = (w - left - 20) / (n - 1)
    pts = [(left + 8 + k * dx, h - bottom - plot_h * v / vmax) for k, v in enumerate(vals)]
    color = COLORS[rng.choice(list(COLORS))]
    d.line(pts, fill=color, width=2)
    for k, (x, y) in enumerate(pts):
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        d.text((x - 3, h - bottom + 4), str(k + 1), fill=(0, 0, 0), font=font)
    if level == "easy":
        k = rng.randrange(n)
        q = f"In the line chart, what is the value at x = {k + 1}?"
        steps = [f"At x = {k + 1} the point lies on the gridline {vals[k]}."]
        ans = vals[k]
    elif level == "medium":
        a, b = sorted(rng.sample(range(n), 2))
        q = f"By how much does the value change from x = {a + 1} to x = {b + 1}? (negative if it decreases)"
        steps = [f"At x = {a + 1} the value is {vals[a]}.", f"At x = {b + 1} the value is {vals[b]}.",
                 f"Change: {vals[b]} - {vals[a]} = {vals[b] - vals[a]}."]
        ans = vals[b] - vals[a]
    else:
        q = "What is the difference between the highest and the lowest value in the line chart?"
        steps = [f"The values are {', '.join(map(str, vals))}.",
                 f"Highest {max(vals)}, lowest {min(vals)}.",
                 f"Difference: {max(vals)} - {min(vals)} = {max(vals) - min(vals)}."]
        ans = max(vals) - min(vals)
    return img, q, ans, steps


# --------------------------------------------------------------------------- shapes
def _draw_shape(d, kind, cx, cy, r, color):
    if kind == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif kind == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)


def shape_count(rng: random.Random, level: str):
    total = {"easy": rng.randint(2, 5), "medium": rng.randint(4, 8), "hard": rng.randint(6, 10)}[level]
    kinds = ["circle", "square", "triangle"]
    names = list(COLORS) if level != "easy" else ["blue"]
    size = 168 if total <= 6 else 224
    img, d = _canvas(size, size)
    cell = 56
    slots = [(x, y) for x in range(size // cell) for y in range(size // cell)]
    rng.shuffle(slots)
    shapes = []
    for (gx, gy) in slots[:total]:
        kind, cname = rng.choice(kinds), rng.choice(names)
        r = rng.randint(10, 18)
        cx = gx * cell + cell // 2 + rng.randint(-5, 5)
        cy = gy * cell + cell // 2 + rng.randint(-5, 5)
        _draw_shape(d, kind, cx, cy, r, COLORS[cname])
        shapes.append((kind, cname))
    if level == "easy":
        kind = rng.choice(kinds)
        ans = sum(k == kind for k, _ in shapes)
        q = f"How many {kind}s are in the image?"
        steps = [f"Shapes: {', '.join(k for k, _ in shapes)}.", f"Counting the {kind}s gives {ans}."]
    elif level == "medium":
        kind, cname = rng.choice(shapes)
        ans = sum(s == (kind, cname) for s in shapes)
        q = f"How many {cname} {kind}s are in the image?"
        steps = [f"Shapes: {', '.join(f'{c} {k}' for k, c in shapes)}.",
                 f"The {cname} {kind}s number {ans}."]
    else:
        cname = rng.choice([c for _, c in shapes])
        ans = sum(c != cname for _, c in shapes)
        q = f"How many shapes are not {cname}?"
        steps = [f"There are {total} shapes in total.",
                 f"{total - ans} of them are {cname}.", f"{total} - {total - ans} = {ans}."]
    return img, q, ans, steps


# --------------------------------------------------------------------------- geometry
def geometry(rng: random.Random, level: str):
    img, d = _canvas(196, 168)
    font = _font(13)
    black = (0, 0, 0)
    if level == "easy":
        a, b = rng.randint(6, 14), rng.randint(3, 9)
        d.rectangle([30, 40, 30 + a * 10, 40 + b * 10], outline=black, width=2)
        d.text((30 + a * 5 - 6, 22), str(a), fill=black, font=font)
        d.text((34 + a * 10, 40 + b * 5 - 6), str(b), fill=black, font=font)
        q = "What is the area of the rectangle?"
        steps = [f"The sides are {a} and {b}.", f"Area = {a} x {b} = {a * b}."]
        return img, q, a * b, steps
    if level == "medium":
        A = rng.randint(30, 90)
        B = rng.randint(30, 150 - A)
        C = 180 - A - B
        pts = [(20, 140), (176, 140), (20 + rng.randint(40, 110), 30)]
        d.polygon(pts, outline=black, width=2)
        d.text((26, 118), f"{A}°", fill=black, font=font)
        d.text((142, 118), f"{B}°", fill=black, font=font)
        d.text((pts[2][0] - 8, pts[2][1] + 12), "?", fill=black, font=font)
        q = "Two angles of the triangle are marked. What is the measure of the angle marked '?' in degrees?"
        steps = ["The angles of a triangle add up to 180 degrees.",
                 f"180 - {A} - {B} = {C}."]
        return img, q, C, steps
    k = rng.randint(1, 3)
    a, b, c = rng.choice([(3, 4, 5), (6, 8, 10), (5, 12, 13)])
    if c * k <= 26:  # scale the Pythagorean triple while the labels stay 2-digit and short
        a, b, c = a * k, b * k, c * k
    sx, sy = 120 / max(a, b), 110 / max(a, b)
    p0, p1, p2 = (30, 150), (30 + b * sx, 150), (30, 150 - a * sy)
    d.polygon([p0, p1, p2], outline=black, width=2)
    d.rectangle([30, 140, 40, 150], outline=black)
    d.text((12, 150 - a * sy / 2 - 6), str(a), fill=black, font=font)
    d.text((30 + b * sx / 2 - 6, 152), str(b), fill=black, font=font)
    d.text((30 + b * sx / 2 + 6, 150 - a * sy / 2 - 14), "?", fill=black, font=font)
    q = "The triangle has a right angle. What is the length of the side marked '?'?"
    steps = ["The side marked '?' is the hypotenuse.",
             f"By Pythagoras: sqrt({a}^2 + {b}^2) = sqrt({a * a} + {b * b}) = sqrt({c * c}) = {c}."]
    return img, q, c, steps


# --------------------------------------------------------------------------- tables
ITEMS = ["apples", "pens", "books", "cups", "hats", "balls"]


def table(rng: random.Random, level: str):
    n = {"easy": 3, "medium": 4, "hard": 4}[level]
    items = rng.sample(ITEMS, n)
    qty = [rng.randint(1, 12) for _ in range(n)]
    price = [rng.randint(1, 5) for _ in range(n)]
    with_price = level == "hard"
    cols = ["item", "count"] + (["price"] if with_price else [])
    cw, rh = 64, 28
    img, d = _canvas(cw * len(cols) + 8, rh * (n + 1) + 8)
    font = _font(12)
    for r in range(n + 1):
        for c, name in enumerate(cols):
            x0, y0 = 4 + c * cw, 4 + r * rh
            d.rectangle([x0, y0, x0 + cw, y0 + rh], outline=(0, 0, 0),
                        fill=(230, 230, 230) if r == 0 else None)
            txt = name if r == 0 else [items[r - 1], str(qty[r - 1]), f"${price[r - 1]}"][c]
            d.text((x0 + 5, y0 + 7), txt, fill=(0, 0, 0), font=font)
    if level == "easy":
        i = rng.randrange(n)
        q = f"According to the table, how many {items[i]} are there?"
        steps = [f"The row for {items[i]} shows a count of {qty[i]}."]
        ans = qty[i]
    elif level == "medium":
        i, j = rng.sample(range(n), 2)
        q = f"According to the table, how many {items[i]} and {items[j]} are there in total?"
        steps = [f"{items[i]}: {qty[i]}.", f"{items[j]}: {qty[j]}.",
                 f"Total: {qty[i]} + {qty[j]} = {qty[i] + qty[j]}."]
        ans = qty[i] + qty[j]
    else:
        i = rng.randrange(n)
        q = f"According to the table, how many dollars do all the {items[i]} cost together?"
        steps = [f"There are {qty[i]} {items[i]} at ${price[i]} each.",
                 f"{qty[i]} x {price[i]} = {qty[i] * price[i]}."]
        ans = qty[i] * price[i]
    return img, q, ans, steps


# --------------------------------------------------------------------------- colour sums
# The embedded demo's family: a tiny random-init model learns it in minutes on a CPU, because
# what it must see is coarse (which colours fill the image) while the levels still differ in
# what it must do with it (read one value / add two / add three).
STRIPE_COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (30, 160, 60),
                 "yellow": (230, 200, 30), "purple": (140, 60, 180)}
STRIPE_VALUES = {c: i + 1 for i, c in enumerate(STRIPE_COLORS)}
STRIPE_LEGEND = "Each colour has a value: " + ", ".join(
    f"{c} {v}" for c, v in STRIPE_VALUES.items()) + "."
STRIPE_WIDTHS = {"easy": (112,), "medium": (56, 56), "hard": (28, 28, 56)}
COUNT_WORDS = {2: "two", 3: "three"}


def colour_sum(rng: random.Random, level: str):
    """112 px square of 1 (easy), 2 (medium) or 3 (hard) vertical stripes of distinct colours
    (widths on the 28 px grid of the vision tokens, each channel jittered by +-20). Easy: the
    value of the colour; medium / hard: the sum of the values of the colours shown, the question
    naming how many (as real problems differ in their text: with the image the only difference,
    GRPO's hard stage taught the two-stripe prompts a third colour)."""
    widths = list(STRIPE_WIDTHS[level])
    rng.shuffle(widths)
    shown = rng.sample(list(STRIPE_COLORS), len(widths))
    img, d = _canvas(112, 112)
    x = 0
    for c, w in zip(shown, widths):
        rgb = tuple(max(0, min(255, v + rng.randint(-20, 20))) for v in STRIPE_COLORS[c])
        d.rectangle([x, 0, x + w - 1, 111], fill=rgb)
        x += w
    order = sorted(shown, key=STRIPE_VALUES.get)
    vals = [STRIPE_VALUES[c] for c in order]
    if level == "easy":
        q = f"{STRIPE_LEGEND} What is the value of the colour in the image?"
        steps = [f"{order[0]} {vals[0]}"]
    else:
        q = (f"{STRIPE_LEGEND} What is the sum of the values of the {COUNT_WORDS[len(vals)]} "
             "colours in the image?")
        steps = [" + ".join(f"{c} {v}" for c, v in zip(order, vals)) + f" = {sum(vals)}"]
    return img, q, sum(vals), steps


GENERATORS = {"bar_chart": bar_chart, "line_chart": line_chart, "shape_count": shape_count,
              "geometry": geometry, "table": table, "colour_sum": colour_sum}


def make_problem(seed: int, index: int, tasks: tuple[str, ...] = TASKS) -> dict:
    """Problem `index` of the set for `seed` (independent of every other index); `tasks`:
    the families to cycle through (default the five chart/geometry/table ones)."""
    rng = random.Random(seed * 1_000_003 + index)
    task = tasks[index % len(tasks)]
    level = LEVELS[rng.randrange(3)]
    img, q, ans, steps = GENERATORS[task](rng, level)
    return {"id": f"synth-{seed}-{index:06d}", "task": task, "difficulty": level, "image": img,
            "question": q, "answer": str(ans), "solution": _answer(steps, ans)}


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def generate(out_dir, n: int, seed: int, prompt_suffix: str | None = None,
             tasks: list[str] | tuple[str, ...] | None = None) -> dict:
    """Write images/, sft.jsonl and rl.parquet under `out_dir`; returns counts. `tasks`: the
    families (keys of GENERATORS; default TASKS)."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    tasks = tuple(tasks or TASKS)
    unknown = [t for t in tasks if t not in GENERATORS]
    if unknown:
        raise ValueError(f"unknown synthetic task(s) {unknown}; allowed: {sorted(GENERATORS)}")
    counts = write_problems(out_dir, (make_problem(seed, i, tasks) for i in range(n)),
                            prompt_suffix)
    return {"n": n, "seed": seed, "out_dir": str(Path(out_dir)), "by_task_level": counts}


def write_problems(out_dir, problems, prompt_suffix: str | None = None) -> dict[str, int]:
    """Write problems (dicts like `make_problem`'s: id, task, difficulty, image, question,
    answer, solution) as images/, sft.jsonl and rl.parquet under `out_dir` (the formats the
    SFT and GRPO readers take); returns counts per task/difficulty."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ovlt.config import RolloutConfig
    suffix = RolloutConfig().prompt_suffix if prompt_suffix is None else prompt_suffix
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    sft_lines, rl_rows = [], {k: [] for k in
                              ("id", "problem", "answer", "images", "source", "difficulty")}
    counts: dict[str, int] = {}
    for p in problems:
        rel = f"images/{p['id']}.png"
        data = _png(p["image"])
        atomic_write_bytes(out / rel, data)
        sft_lines.append(json.dumps({
            "id": p["id"],
            "messages": [{"role": "user", "content": "<image>" + p["question"] + suffix},
                         {"role": "assistant", "content": p["solution"]}],
            "images": [rel], "source": p["task"], "difficulty": p["difficulty"],
            "answer": p["answer"]}, ensure_ascii=False))
        for k, v in (("id", p["id"]), ("problem", "<image>" + p["question"]),
                     ("answer", p["answer"]), ("images", [{"bytes": data, "path": rel}]),
                     ("source", p["task"]), ("difficulty", p["difficulty"])):
            rl_rows[k].append(v)
        key = f"{p['task']}/{p['difficulty']}"
        counts[key] = counts.get(key, 0) + 1
    if not sft_lines:
        raise ValueError("no problems to write")
    atomic_write_text(out / "sft.jsonl", "\n".join(sft_lines) + "\n")
    img_type = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    tbl = pa.table({k: pa.array(v, type=img_type if k == "images" else pa.string())
                    for k, v in rl_rows.items()})
    buf = pa.BufferOutputStream()
    pq.write_table(tbl, buf)
    atomic_write_bytes(out / "rl.parquet", buf.getvalue().to_pybytes())
    return dict(sorted(counts.items()))
