"""Images/s of Qwen2.5-VL image loading (decode + smart resize + normalise + patchify):
PIL in DataLoader worker processes vs NVIDIA DALI (GPU decode + resize) when it imports.

    python benchmarks/image_loading.py --out benchmarks/results/image_loading_cpu.json
    python benchmarks/image_loading.py --workers 1 4 8 --n-images 512 --out $OUT/image_loading.json

Inputs are written to a temp dir first: 640x480 JPEG "photos" (smooth noise) and the synthetic
PNG charts the demo trains on. Reports images/s per worker count, and the share of a GRPO
step the decoding would take at the recipe's numbers (512 prompts/step, ~145 s/step at 7B on
8xH100 with EasyR1; ../shared/RECIPE.md) if it were on the critical path (it isn't: workers
prefetch).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ovlt.data.image_loader import dali_available, load_image_pil  # noqa: E402

RECIPE_PROMPTS_PER_STEP = 512
RECIPE_STEP_S = 145.0


def make_inputs(d: Path, n: int) -> list[str]:
    from PIL import Image
    from ovlt.data.synth import make_problem
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        if i % 2 == 0:
            small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((640, 480), Image.BICUBIC)
            arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 12, (480, 640, 3))
            img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
            p = d / f"photo_{i:05d}.jpg"
            img.save(p, quality=90)
        else:
            p = d / f"chart_{i:05d}.png"
            make_problem(0, i)["image"].save(p)
        paths.append(str(p))
    return paths


class _DS:
    def __init__(self, paths, min_px, max_px):
        self.paths, self.min_px, self.max_px = paths, min_px, max_px

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        pv, grid = load_image_pil(self.paths[i], self.min_px, self.max_px)
        return pv.shape[0]


def bench_pil(paths, workers: int, min_px: int, max_px: int) -> dict:
    import torch
    from torch.utils.data import DataLoader
    ds = _DS(paths, min_px, max_px)
    kw = dict(batch_size=None, num_workers=workers, collate_fn=lambda x: x)
    if workers:
        kw["prefetch_factor"] = 8
    for _ in DataLoader(torch.utils.data.Subset(ds, range(min(8, len(ds)))), **kw):
        pass  # warm-up (imports, page cache)
    t0 = time.perf_counter()
    patches = sum(DataLoader(ds, **kw))
    dt = time.perf_counter() - t0
    return {"workers": workers, "images": len(paths), "seconds": round(dt, 3),
            "images_per_s": round(len(paths) / dt, 1), "patches": int(patches)}


def bench_dali(paths, min_px, max_px) -> dict:
    import torch
    from ovlt.data.image_loader import DaliImageLoader
    loader = DaliImageLoader(min_px, max_px, batch_size=64)
    loader.load(paths[:64])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = loader.load(paths)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    diffs = []
    for p, (pv, grid) in zip(paths[:32], outs[:32]):
        ref, rgrid = load_image_pil(p, min_px, max_px)
        assert tuple(grid) == tuple(rgrid)
        diffs.append((pv.cpu() - ref).abs())
    d = torch.cat([x.flatten() for x in diffs])
    return {"images": len(paths), "seconds": round(dt, 3), "images_per_s": round(len(paths) / dt, 1),
            "vs_pil_max_abs": float(d.max()), "vs_pil_mean_abs": float(d.mean())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-images", type=int, default=256)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--min-pixels", type=int, default=3136)
    ap.add_argument("--max-pixels", type=int, default=262144)
    ap.add_argument("--dali-skip-reason", default="",
                    help="recorded when DALI is not run (e.g. why its wheel was not brought)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    device = "cpu"
    try:
        import torch
        if torch.cuda.is_available():
            device = torch.cuda.get_device_name(0)
    except Exception:
        pass
    res = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "device": device,
           "cpu_count": os.cpu_count(), "python": platform.python_version(),
           "min_pixels": args.min_pixels, "max_pixels": args.max_pixels, "pil": [], "dali": None}
    with tempfile.TemporaryDirectory() as d:
        paths = make_inputs(Path(d), args.n_images)
        for w in args.workers:
            r = bench_pil(paths, w, args.min_pixels, args.max_pixels)
            r["share_of_grpo_step_if_blocking"] = round(
                RECIPE_PROMPTS_PER_STEP / r["images_per_s"] / RECIPE_STEP_S, 5)
            res["pil"].append(r)
            print(json.dumps(r), flush=True)
        if dali_available():
            res["dali"] = bench_dali(paths, args.min_pixels, args.max_pixels)
            print(json.dumps(res["dali"]), flush=True)
        else:
            res["dali_not_run"] = args.dali_skip_reason or "nvidia.dali does not import here"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from ovlt.utils.io import atomic_write_json
    atomic_write_json(args.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
