"""DALI image path (`DaliImageLoader`) against the PIL path (`load_image_pil`, itself
bit-identical to transformers' processor): same grids, pixel values within a measured
tolerance, exact PIL fallback for what DALI would convert differently, errors that name the
source. Runs DALI's CPU pipeline here (skipped when nvidia.dali is not installed); the "gpu"
cases run where CUDA is available (nvJPEG + GPU resize).

Tolerances, in grey levels of the uint8 image after resizing (one level is at most
LEVEL = 1/255/min(CLIP_STD) = 0.0150 in normalised units). Measured with DALI 2.4.0
(nvidia-dali-cuda130) and Pillow 13.0.0 on the CPU pipeline, per image:
  photos (JPEG, 20x30 .. 3000x2000, aspect ratios up to 37.5, 4:4:4 / progressive / grey):
  max 2 levels, mean <= 0.00037 normalised (0.025 levels);
  sharp synthetic PNGs (hard edges; tiny images upscaled 4-6x): max 15 levels on a few
  border pixels (DALI clamps at the border where PIL renormalises its cut kernel), mean
  <= 0.0048 (13x9 -> 84x56); palette and 1-bit PNGs: max 1 level;
  charts from `ovlt.data.synth`: max 1 level here, 2 levels over the benchmark's 64 charts.
The bounds leave ~1.5x room over those numbers. The GPU bounds are wider (nvJPEG's IDCT and
the hardware JPEG decoder round differently from libjpeg-turbo) and provisional until a
device run records the GPU numbers (`benchmarks/image_loading.py`, "dali" rows).
"""
import io

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from ovlt.data import image_loader as il  # noqa: E402
from ovlt.data import image_processing as ip  # noqa: E402

MIN_PX, MAX_PX = 3136, 262144
LEVEL = 1 / 255 / min(ip.CLIP_STD)
# (max abs per image, mean abs per image), normalised units
TOL = {
    "cpu": {"photo": (2 * LEVEL + 1e-6, 0.0006), "sharp": (16 * LEVEL, 0.0075),
            "chart": (2 * LEVEL + 1e-6, 0.0005)},
    "gpu": {"photo": (8 * LEVEL, 0.006), "sharp": (20 * LEVEL, 0.012),
            "chart": (2 * LEVEL + 1e-6, 0.0005)},
}

DEVICES = ["cpu", pytest.param("gpu", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


def _enc(img: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def _photo(rng, w, h):
    """A smooth random field plus noise: JPEG-compressible like a photo."""
    small = rng.integers(0, 256, (max(2, h // 40), max(2, w // 40), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 12, (h, w, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def _sharp(w, h):
    a = np.full((h, w, 3), 255, np.uint8)
    a[h // 4:h // 2, :, 0] = 0
    a[:, w // 3:w // 3 + max(1, w // 20), 1] = 20
    a[::7, ::5] = 0
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def parity_set():
    """(name, kind, encoded bytes): JPEG photos of many sizes (tiny, large, extreme aspect
    ratios, 4:4:4 / 4:2:0 / progressive / greyscale), synth charts, sharp-edged PNGs, and a
    palette and a 1-bit PNG (modes DALI converts as PIL does)."""
    from ovlt.data.synth import make_problem
    rng = np.random.default_rng(0)
    out = []
    for w, h in [(640, 480), (1024, 768), (333, 517), (64, 48), (20, 30), (1500, 40),
                 (40, 1500), (3000, 2000)]:
        out.append((f"jpg{w}x{h}", "photo", _enc(_photo(rng, w, h), "JPEG", quality=90)))
    p = _photo(rng, 500, 375)
    out.append(("jpg_444", "photo", _enc(p, "JPEG", quality=95, subsampling=0)))
    out.append(("jpg_progressive", "photo", _enc(p, "JPEG", quality=85, progressive=True)))
    out.append(("jpg_grey", "photo", _enc(p.convert("L"), "JPEG", quality=90)))
    for i in range(3):
        out.append((f"chart{i}", "chart", _enc(make_problem(0, i)["image"], "PNG")))
    for w, h in [(800, 600), (37, 1900), (28, 28), (13, 9)]:
        out.append((f"png{w}x{h}", "sharp", _enc(_sharp(w, h), "PNG")))
    out.append(("png_palette", "sharp", _enc(_sharp(300, 200).convert("P"), "PNG")))
    out.append(("png_1bit", "sharp", _enc(_sharp(90, 70).convert("1"), "PNG")))
    return out


def _loader(device, **kw):
    kw.setdefault("batch_size", 4)   # several batches, the last one partial
    kw.setdefault("num_threads", 1)
    return il.DaliImageLoader(MIN_PX, MAX_PX, device=device, **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_dali_matches_pil(parity_set, device):
    loader = _loader(device)
    outs = loader.load([d for _, _, d in parity_set])
    assert loader.n_dali == len(parity_set) and loader.n_pil == 0
    stats = {}
    for (name, kind, data), (pv, grid) in zip(parity_set, outs):
        ref, ref_grid = il.load_image_pil(data, MIN_PX, MAX_PX)
        assert grid == ref_grid and all(type(x) is int for x in grid), name
        assert pv.dtype == torch.float32 and pv.shape == ref.shape, name
        assert pv.device.type == ("cuda" if device == "gpu" else "cpu")
        d = (pv.cpu() - ref).abs()
        stats[name] = (kind, float(d.max()), float(d.mean()))
    print("\n".join(f"{device} {n:16s} {k:6s} max {mx:.4f} ({mx / LEVEL:.1f} levels) "
                    f"mean {mn:.5f}" for n, (k, mx, mn) in stats.items()))
    for name, (kind, mx, mn) in stats.items():
        max_tol, mean_tol = TOL[device][kind]
        assert mx <= max_tol and mn <= mean_tol, (name, mx, mn, TOL[device][kind])


def test_cubic_two_pass_is_the_closest_filter(parity_set):
    """Why INTERP_CUBIC in PIL's two-pass order: on the photos it is closer to PIL's BICUBIC
    than one-pass cubic, linear or Lanczos (uint8 after resize, mean abs grey levels)."""
    from nvidia.dali import fn, pipeline_def, types
    photos = [d for _, kind, d in parity_set if kind == "photo"]

    def run(interp, two_pass):
        @pipeline_def(batch_size=len(photos), num_threads=1, device_id=None,
                      prefetch_queue_depth=1)
        def pipe():
            enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
            iw, ih, tw, th = (fn.external_source(name=n, dtype=types.FLOAT, ndim=0)
                              for n in ("iw", "ih", "tw", "th"))
            img = fn.decoders.image(enc, device="cpu", output_type=types.RGB)
            if two_pass:
                img = fn.resize(img, resize_x=iw, resize_y=ih, interp_type=interp)
            return fn.resize(img, resize_x=tw, resize_y=th, interp_type=interp)
        feeds = {k: [] for k in ("iw", "ih", "tw", "th")}
        for d in photos:
            w, h = Image.open(io.BytesIO(d)).size
            th, tw = ip.smart_resize(h, w, ip.FACTOR, MIN_PX, MAX_PX)
            iw, ih = il.resize_passes(w, h, tw, th)
            for k, v in zip(feeds, (iw, ih, tw, th)):
                feeds[k].append(np.array(v, np.float32))
        if not two_pass:   # unused inputs are pruned from the graph
            del feeds["iw"], feeds["ih"]
        (out,) = pipe().run(enc=[np.frombuffer(d, np.uint8) for d in photos], **feeds)
        diffs = [np.abs(np.asarray(out[i]).astype(int)
                        - ip.resize_rgb(Image.open(io.BytesIO(d)), MIN_PX, MAX_PX)).mean()
                 for i, d in enumerate(photos)]
        return float(np.mean(diffs))

    ours = run(types.INTERP_CUBIC, True)
    others = {"cubic_one_pass": run(types.INTERP_CUBIC, False),
              "linear": run(types.INTERP_LINEAR, True),
              "lanczos3": run(types.INTERP_LANCZOS3, True)}
    print(f"\nmean abs grey levels vs PIL: cubic two-pass {ours:.4f}, "
          + ", ".join(f"{k} {v:.4f}" for k, v in others.items()))
    assert ours < 0.05 and all(ours < v for v in others.values())


@pytest.mark.parametrize("device", DEVICES)
def test_pil_fallback_is_exact(tmp_path, device):
    """Transparency (composited on white), CMYK, 16-bit and GIF go through PIL unchanged."""
    rng = np.random.default_rng(3)
    rgba = np.dstack([rng.integers(0, 256, (60, 80, 3)), rng.integers(0, 256, (60, 80))])
    grey16 = (rng.integers(0, 65536, (50, 70))).astype(np.uint16)
    srcs = [
        _enc(Image.fromarray(rgba.astype(np.uint8), "RGBA"), "PNG"),
        _enc(_photo(rng, 90, 70).convert("CMYK"), "JPEG"),
        _enc(Image.fromarray(grey16), "PNG"),
        _enc(_sharp(64, 40).convert("P"), "GIF"),
    ]
    p = tmp_path / "a.png"
    p.write_bytes(srcs[0])
    srcs += [str(p), {"bytes": None, "path": str(p)}]
    loader = _loader(device)
    outs = loader.load(srcs)
    assert loader.n_pil == len(srcs) and loader.n_dali == 0
    for s, (pv, grid) in zip(srcs, outs):
        ref, ref_grid = il.load_image_pil(s, MIN_PX, MAX_PX)
        assert grid == ref_grid and torch.equal(pv.cpu(), ref)


@pytest.mark.parametrize("device", DEVICES)
def test_errors_name_the_source_and_the_loader_recovers(tmp_path, device):
    rng = np.random.default_rng(4)
    good = _enc(_photo(rng, 120, 90), "JPEG")
    png = _enc(_photo(rng, 60, 50), "PNG")
    loader = _loader(device)
    # a truncated PNG fails in nvImageCodec's parser on both devices; a truncated JPEG (which
    # nvJPEG would decode silently) never reaches DALI: it has no EOI marker, PIL raises
    cut = [("cut.png", png), ("cut.jpg", good)]
    for name, data in cut:
        msg = f"corrupt or unsupported image {name}: .*truncated"
        with pytest.raises(il.ImageError, match=msg):
            loader.load([good, {"bytes": data[:len(data) // 2], "path": name}])
    with pytest.raises(il.ImageError, match="image file not found: .*nope.png"):
        loader.load([str(tmp_path / "nope.png")])
    with pytest.raises(il.ImageError, match="empty image file"):
        loader.load([b""])
    with pytest.raises(il.ImageError, match="aspect ratio 210.0"):
        loader.load([_enc(Image.new("RGB", (2100, 10)), "PNG")])
    (pv, grid), = loader.load([good])           # the pipeline was rebuilt after the failure
    ref, ref_grid = il.load_image_pil(good, MIN_PX, MAX_PX)
    assert grid == ref_grid and float((pv.cpu() - ref).abs().max()) <= TOL[device]["photo"][0]
