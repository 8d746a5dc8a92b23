"""Images/s of Qwen2.5-VL image loading (decode + smart resize + normalise + patchify):
PIL in DataLoader worker processes vs NVIDIA DALI (`ovlt.data.image_loader.DaliImageLoader`:
GPU decode + resize, torch normalise/patchify on the GPU), plus DALI-vs-PIL tensor parity.

    python benchmarks/image_loading.py --smoke --out /tmp/il.json           # seconds, any machine
    python benchmarks/image_loading.py --device cpu --out benchmarks/results/image_loading_cpu.json
    python benchmarks/image_loading.py --workers 0 4 8 --n-images 512 --out $OUT/image_loading.json

Inputs are written to a temp dir first: 640x480 JPEG "photos" (smooth noise) and the synthetic
PNG charts the demo trains on. Reports images/s per worker count, and the share of a GRPO
step the decoding would take at the recipe's numbers (512 prompts/step, ~145 s/step at 7B on
8xH100 with EasyR1; ../shared/RECIPE.md) if it were on the critical path (it isn't: workers
prefetch).

DALI rows (when nvidia.dali imports): `--device cuda` (default when a GPU is visible) runs the
GPU pipeline ("mixed" nvJPEG decoder, GPU resize) once per `--dali-hw-decoder-load` value
(the share of JPEGs given to the hardware JPEG decoder; "default" = DALI's 0.65); `--device cpu`
runs DALI's CPU pipeline. Each row times one `load()` of all inputs (file reads, PIL header
parse, decode, resize, normalise, patchify; synchronised) after one warm-up batch, then
compares every output with the PIL path (`load_image_pil`): grids must be identical; pixel
differences are reported per input kind in normalised units and in grey levels.
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

from ovlt.data.image_loader import load_image_pil  # noqa: E402
from ovlt.data import image_processing as ip  # noqa: E402

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


def dali_version() -> str | None:
    try:
        import nvidia.dali
    except Exception:
        return None
    return nvidia.dali.__version__


LEVEL = 1 / 255 / min(ip.CLIP_STD)   # normalised units of one grey level, at most


def pil_refs(paths, min_px, max_px):
    return [load_image_pil(p, min_px, max_px) for p in paths]


def parity(paths, outs, refs) -> dict:
    """DALI vs PIL per input kind: grid mismatches, max / mean abs difference (normalised
    units and grey levels), share of values more than one grey level apart."""
    import torch
    by_kind: dict = {}
    for p, (pv, grid), (ref, rgrid) in zip(paths, outs, refs):
        kind = "photo_jpeg" if p.endswith(".jpg") else "chart_png"
        k = by_kind.setdefault(kind, {"images": 0, "grid_mismatch": 0, "max": 0.0, "sum": 0.0,
                                      "n": 0, "over_1_level": 0, "worst_image_mean": 0.0})
        k["images"] += 1
        if tuple(grid) != tuple(rgrid) or pv.shape != ref.shape:
            k["grid_mismatch"] += 1
            continue
        d = (pv.float().cpu() - ref).abs()
        k["max"] = max(k["max"], float(d.max()))
        k["sum"] += float(d.sum(dtype=torch.float64))
        k["n"] += d.numel()
        k["over_1_level"] += int((d > LEVEL * 1.0001).sum())
        k["worst_image_mean"] = max(k["worst_image_mean"], float(d.mean()))
    out = {}
    for kind, k in by_kind.items():
        mean = k["sum"] / max(k["n"], 1)
        out[kind] = {"images": k["images"], "grid_mismatch": k["grid_mismatch"],
                     "max_abs": round(k["max"], 5),
                     "max_abs_grey_levels": round(k["max"] / LEVEL, 2),
                     "mean_abs": round(mean, 6), "mean_abs_grey_levels": round(mean / LEVEL, 4),
                     "worst_image_mean_abs": round(k["worst_image_mean"], 6),
                     "frac_values_over_1_level": round(k["over_1_level"] / max(k["n"], 1), 6)}
    return out


def bench_dali(paths, min_px, max_px, device: str, refs, hw_decoder_load=None,
               batch_size: int = 64, threads: int = 4) -> dict:
    import torch
    from ovlt.data.image_loader import DaliImageLoader, pil_pass_rule
    gpu = device == "cuda"
    t0 = time.perf_counter()
    loader = DaliImageLoader(min_px, max_px, batch_size=batch_size, device="gpu" if gpu else "cpu",
                             num_threads=threads, hw_decoder_load=hw_decoder_load)
    build_s = time.perf_counter() - t0
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    loader.load(paths[:batch_size])   # warm-up: allocations, nvJPEG / codec state
    sync()
    loader.n_dali = loader.n_pil = 0
    t0 = time.perf_counter()
    outs = loader.load(paths)
    sync()
    dt = time.perf_counter() - t0
    patches = sum(int(pv.shape[0]) for pv, _ in outs)
    res = {"device": "gpu (mixed decoder, GPU resize)" if gpu else "cpu (DALI CPU pipeline)",
           "hw_decoder_load": "default (0.65)" if hw_decoder_load is None else hw_decoder_load,
           "batch_size": batch_size, "num_threads": threads, "images": len(paths),
           "build_s": round(build_s, 3), "seconds": round(dt, 3),
           "images_per_s": round(len(paths) / dt, 1), "patches": patches,
           "decoded_by_dali": loader.n_dali, "decoded_by_pil_fallback": loader.n_pil,
           "output_device": str(outs[0][0].device), "pil_pass_rule": pil_pass_rule()}
    res["share_of_grpo_step_if_blocking"] = round(
        RECIPE_PROMPTS_PER_STEP / res["images_per_s"] / RECIPE_STEP_S, 5)
    res["parity_vs_pil"] = parity(paths, outs, refs)
    res["truncated_jpeg"] = truncated_jpeg_behaviour(loader, paths)
    del outs, loader
    return res


def truncated_jpeg_behaviour(loader, paths) -> str:
    """What this DALI loader does with the first JPEG cut in half: the PIL path raises
    ImageError ("image file is truncated"); nvJPEG might decode it silently."""
    from ovlt.data.image_loader import ImageError
    jpg = next((p for p in paths if p.endswith(".jpg")), None)
    if jpg is None:
        return "no JPEG input"
    data = Path(jpg).read_bytes()
    try:
        loader.load([{"bytes": data[:len(data) // 2], "path": "cut.jpg"}])
    except ImageError as e:
        return f"ImageError: {e}"[:300]
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"[:300]
    return "decoded without error (the PIL path raises ImageError)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-images", type=int, default=256)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--min-pixels", type=int, default=3136)
    ap.add_argument("--max-pixels", type=int, default=262144)
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                    help="where the DALI pipeline runs (auto: cuda when a GPU is visible)")
    ap.add_argument("--dali-hw-decoder-load", nargs="+", default=["default", "0"],
                    help="GPU only: one DALI row per value ('default' = DALI's own)")
    ap.add_argument("--dali-batch-size", type=int, default=64)
    ap.add_argument("--dali-threads", type=int, default=0, help="0: min(8, cpu count)")
    ap.add_argument("--smoke", action="store_true",
                    help="16 inputs, in-process PIL only, one DALI row: checks the script runs")
    ap.add_argument("--dali-skip-reason", default="",
                    help="recorded when DALI is not run (e.g. why its wheel was not brought)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.smoke:
        args.n_images, args.workers = 16, [0]
        args.dali_hw_decoder_load = args.dali_hw_decoder_load[:1]
        args.dali_batch_size = min(args.dali_batch_size, 8)

    import PIL
    import torch
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    dali_dev = ("cuda" if cuda else "cpu") if args.device == "auto" else args.device
    threads = args.dali_threads or min(8, os.cpu_count() or 1)
    res = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "device": device,
           "cpu_count": os.cpu_count(), "python": platform.python_version(),
           "torch": torch.__version__, "pillow": PIL.__version__, "dali_version": dali_version(),
           "min_pixels": args.min_pixels, "max_pixels": args.max_pixels, "pil": [], "dali": []}
    with tempfile.TemporaryDirectory() as d:
        paths = make_inputs(Path(d), args.n_images)
        for w in args.workers:
            r = bench_pil(paths, w, args.min_pixels, args.max_pixels)
            r["share_of_grpo_step_if_blocking"] = round(
                RECIPE_PROMPTS_PER_STEP / r["images_per_s"] / RECIPE_STEP_S, 5)
            res["pil"].append(r)
            print(json.dumps(r), flush=True)
        if res["dali_version"] is None:
            res["dali_not_run"] = args.dali_skip_reason or "nvidia.dali does not import here"
        elif dali_dev == "cuda" and not cuda:
            res["dali_not_run"] = "--device cuda but no GPU is visible"
        else:
            refs = pil_refs(paths, args.min_pixels, args.max_pixels)
            loads = args.dali_hw_decoder_load if dali_dev == "cuda" else ["default"]
            for v in loads:
                try:
                    r = bench_dali(paths, args.min_pixels, args.max_pixels, dali_dev, refs,
                                   None if v == "default" else float(v),
                                   args.dali_batch_size, threads)
                except Exception as e:  # record and go on: the PIL rows are still worth keeping
                    r = {"hw_decoder_load": v, "error": f"{type(e).__name__}: {e}"[:2000]}
                res["dali"].append(r)
                print(json.dumps(r), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from ovlt.utils.io import atomic_write_json
    atomic_write_json(args.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
