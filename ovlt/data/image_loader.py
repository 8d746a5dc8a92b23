"""The one image-decoding seam: NVIDIA DALI (GPU decode + resize) when `nvidia.dali` imports,
else PIL in DataLoader worker processes. Which path is used is logged once per process.

Both paths produce what `image_processing.preprocess` produces: (pixel_values [N, 1176]
float32, grid_thw). The PIL path is bit-identical to transformers' processor. The DALI path
(`DaliImageLoader`, written against DALI 2.4) takes the target size from `smart_resize` (so the
grids are identical), decodes with nvImageCodec (nvJPEG on the GPU, libjpeg-turbo on the CPU),
resizes with DALI's antialiased cubic filter in PIL's two-pass order with an 8-bit intermediate,
and normalises + patchifies with a torch port of `image_processing.normalize_patchify`.
Measured against the PIL path (tests/unit/test_data_image_loader_dali.py, DALI's CPU pipeline,
Pillow 13): photos differ by at most 2 grey levels and 0.03 levels on average per image; what
remains is the filter's rounding and border handling, largest (up to 15 levels on a few
border pixels) when tiny sharp-edged images are upscaled. On the GPU nvJPEG adds its own
rounding (`benchmarks/image_loading.py` records the GPU numbers). Images that DALI would not
convert as PIL does (alpha or palette transparency, CMYK, 16-bit, formats other than JPEG and
PNG) are decoded by PIL inside the DALI loader, so every image keeps the PIL path's semantics.
The DALI loader returns tensors on its device (the GPU), the PIL path on the CPU.

Sources are what the data files hold: a path (str / PathLike), raw bytes, or a
`{"bytes": ..., "path": ...}` dict (parquet image structs; bytes win when present).
"""
from __future__ import annotations

import functools
import io
import os
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from ovlt.data import image_processing as ip
from ovlt.logging import get_logger, log_once

log = get_logger(__name__)

MAX_IMAGE_PIXELS = 50_000_000  # larger images are rejected before decoding (decompression bombs)


class ImageError(ValueError):
    """An image cannot be used: missing, corrupt, empty or too large. The message says why."""


def source_name(src) -> str:
    if isinstance(src, dict):
        return str(src.get("path") or "<bytes>")
    if isinstance(src, (bytes, bytearray, memoryview)):
        return "<bytes>"
    return str(src)


def read_bytes(src) -> bytes:
    if isinstance(src, dict):
        if src.get("bytes"):
            return bytes(src["bytes"])
        if src.get("path"):
            return read_bytes(src["path"])
        raise ImageError("image struct has neither bytes nor path")
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    if not isinstance(src, (str, os.PathLike)):
        raise ImageError(f"image source of type {type(src).__name__} (expected path or bytes)")
    try:
        with open(src, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ImageError(f"image file not found: {src}") from None
    except OSError as e:
        raise ImageError(f"cannot read image {src}: {e}") from None


def check_size(w: int, h: int, src, max_image_pixels: int = MAX_IMAGE_PIXELS) -> None:
    if w <= 0 or h <= 0:
        raise ImageError(f"zero-pixel image ({w}x{h}): {source_name(src)}")
    if w * h > max_image_pixels:
        raise ImageError(f"image of {w}x{h} = {w * h / 1e6:.1f} MP exceeds "
                         f"{max_image_pixels / 1e6:.0f} MP: {source_name(src)}")


def _header_dims(data: bytes) -> tuple[int, int] | None:
    """(width, height) read straight from a PNG / GIF / BMP header; PIL refuses to open
    zero-sized images at all, and this lets the error say "zero-pixel" instead of "corrupt"."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:4] in (b"GIF8",) and len(data) >= 10:
        return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    if data[:2] == b"BM" and len(data) >= 26:
        return (abs(int.from_bytes(data[18:22], "little", signed=True)),
                abs(int.from_bytes(data[22:26], "little", signed=True)))
    return None


def open_image(src, max_image_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode fully (so corrupt data fails here, not later) after checking the header size."""
    data = read_bytes(src)
    if not data:
        raise ImageError(f"empty image file: {source_name(src)}")
    try:
        img = Image.open(io.BytesIO(data))
        check_size(*img.size, src, max_image_pixels)
        img.load()
    except ImageError:
        raise
    except Exception as e:  # PIL raises many types for bad data
        dims = _header_dims(data)
        if dims and 0 in dims:
            raise ImageError(f"zero-pixel image ({dims[0]}x{dims[1]}): {source_name(src)}") from None
        raise ImageError(f"corrupt or unsupported image {source_name(src)}: "
                         f"{type(e).__name__}: {e}") from None
    return img


def _header(data: bytes, src) -> tuple[int, int, str, str, bool]:
    """(width, height, format, mode, has_alpha) from the header only, with the same
    empty / zero-pixel / size-limit / corrupt checks and messages as `open_image`.
    has_alpha: what makes `image_processing.to_rgb` composite onto white."""
    if not data:
        raise ImageError(f"empty image file: {source_name(src)}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            check_size(*img.size, src)
            alpha = "A" in img.getbands() or img.info.get("transparency") is not None
            return img.size[0], img.size[1], img.format or "", img.mode, alpha
    except ImageError:
        raise
    except Exception as e:
        dims = _header_dims(data)
        if dims and 0 in dims:
            raise ImageError(f"zero-pixel image ({dims[0]}x{dims[1]}): {source_name(src)}") from None
        raise ImageError(f"corrupt or unsupported image {source_name(src)}: "
                         f"{type(e).__name__}: {e}") from None


def image_size(src) -> tuple[int, int]:
    """(width, height) from the header only (cheap; used to count image tokens), with the
    same zero-pixel / size-limit checks as `open_image`."""
    w, h, _, _, _ = _header(read_bytes(src), src)
    return w, h


def load_image_pil(src, min_pixels: int, max_pixels: int) -> tuple[torch.Tensor, tuple]:
    img = open_image(src)
    try:
        return ip.preprocess(img, min_pixels, max_pixels)
    except ValueError as e:  # e.g. aspect ratio > 200
        raise ImageError(f"{source_name(src)}: {e}") from None


def smart_size(w: int, h: int, src, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) after `image_processing.smart_resize`, its ValueError (e.g. aspect ratio
    over 200) as an ImageError naming the source, as `load_image_pil` reports it."""
    try:
        return ip.smart_resize(h, w, ip.FACTOR, min_pixels, max_pixels)
    except ValueError as e:
        raise ImageError(f"{source_name(src)}: {e}") from None


def normalize_patchify_torch(rgb: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """`image_processing.normalize_patchify` on a uint8 [H, W, 3] torch tensor, on its device:
    the same operations in the same dtypes (x * (1/255) in float64, then float32 mean/std), so
    the output is bit-identical to the numpy version for the same pixels
    (tests/unit/test_data_image_loader.py checks it)."""
    H, W, C = rgb.shape
    if C != 3 or H % ip.FACTOR or W % ip.FACTOR or rgb.dtype != torch.uint8:
        raise ValueError(f"expected uint8 [H, W, 3] with H, W multiples of {ip.FACTOR}, "
                         f"got {rgb.dtype} {tuple(rgb.shape)}")
    x = (rgb.to(torch.float64) * (1 / 255)).to(torch.float32)
    mean = torch.tensor(ip.CLIP_MEAN, dtype=torch.float32, device=rgb.device)
    std = torch.tensor(ip.CLIP_STD, dtype=torch.float32, device=rgb.device)
    x = ((x - mean) / std).permute(2, 0, 1)  # CHW
    gh, gw, m, p = H // ip.PATCH_SIZE, W // ip.PATCH_SIZE, ip.MERGE_SIZE, ip.PATCH_SIZE
    x = x.reshape(C, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
    x = x.unsqueeze(5).expand(*x.shape[:5], ip.TEMPORAL_PATCH_SIZE, p, p)
    return x.reshape(gh * gw, ip.PATCH_DIM), (1, gh, gw)


def _pillow13_vertical_first(w: int, h: int, tw: int, th: int) -> bool:
    """Pillow >= 13 (python-pillow/Pillow#9549) runs its vertical pass first when the height
    shrinks by more than twice as many pixels as the width does (found by probing Pillow
    13.0.0 on 1,800 random shapes: no exception)."""
    return th < h and (h - th) > 2 * (w - tw)


_PROBES = ((8, 16, 12, 10), (40, 90, 30, 60), (60, 40, 40, 30), (30, 60, 25, 50), (90, 70, 84, 56))


@functools.lru_cache(maxsize=None)
def pil_pass_rule() -> str:
    """Which order of its two 1-D passes the installed Pillow uses for BICUBIC resizes:
    'horizontal' (Pillow < 13: always horizontal first) or 'pillow13' (see
    `_pillow13_vertical_first`). Pillow rounds to uint8 between the passes, so the DALI path
    repeats the order (the wrong order costs up to ~27 grey levels on sharp edges). Probed
    once on small random images whose two orders give different bytes."""
    rng = np.random.default_rng(0)
    seen = []
    for w, h, tw, th in _PROBES:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ref = np.asarray(im.resize((tw, th), Image.BICUBIC))
        y_first = np.asarray(im.resize((w, th), Image.BICUBIC).resize((tw, th), Image.BICUBIC))
        x_first = np.asarray(im.resize((tw, h), Image.BICUBIC).resize((tw, th), Image.BICUBIC))
        seen.append(bool(np.array_equal(ref, y_first) and not np.array_equal(ref, x_first)))
    if seen == [_pillow13_vertical_first(*p) for p in _PROBES]:
        return "pillow13"
    if not any(seen):
        return "horizontal"
    log.warning("Pillow %s resizes in an order ovlt does not know (vertical first for %s); "
                "the DALI path will go horizontal first and differ from PIL by rounding",
                Image.__version__, [p for p, y in zip(_PROBES, seen) if y])
    return "horizontal"


def resize_passes(w: int, h: int, tw: int, th: int) -> tuple[int, int]:
    """(width, height) after the first of the two 1-D resize passes from w x h to tw x th, in
    the order the installed Pillow uses (`pil_pass_rule`)."""
    if pil_pass_rule() == "pillow13" and _pillow13_vertical_first(w, h, tw, th):
        return w, th
    return tw, h


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def choose_backend(requested: str = "auto") -> str:
    """'dali' or 'pil' for config value `data.image_loader` ('auto' | 'dali' | 'pil')."""
    if requested not in ("auto", "dali", "pil"):
        raise ValueError(f"data.image_loader={requested!r}: choose auto, dali or pil")
    if requested == "pil":
        backend = "pil"
    elif dali_available():
        backend = "dali"
    elif requested == "dali":
        raise RuntimeError("data.image_loader=dali but nvidia.dali does not import or no GPU")
    else:
        backend = "pil"
    log_once(log, "image_loader_backend",
             "image loading: %s", "NVIDIA DALI (GPU decode + resize)" if backend == "dali"
             else "PIL in DataLoader worker processes (nvidia.dali not used)")
    return backend


# What DALI's decoder turns into the same RGB bytes as PIL's `convert("RGB")` (checked in
# tests/unit/test_data_image_loader_dali.py); anything else goes through PIL inside the DALI loader.
DALI_FORMATS = frozenset({"JPEG", "PNG"})
DALI_MODES = frozenset({"RGB", "L", "P", "1"})


def jpeg_has_end(data: bytes) -> bool:
    """Whether a JPEG ends with its EOI marker (trailing padding allowed). nvJPEG decodes a
    truncated JPEG without an error (measured on the H100, benchmarks/README.md), so such files
    go to PIL, which raises ImageError naming them (or decodes one that only has trailing junk)."""
    return data[-1024:].rstrip(b"\x00\r\n\t ").endswith(b"\xff\xd9")


class DaliImageLoader:
    """Batched decode + smart resize with NVIDIA DALI (>= 2.0), normalise + patchify in torch.

    device="gpu": "mixed" decoder (nvJPEG; PNG is decoded on the CPU by nvImageCodec) and GPU
    resize; the outputs are on cuda:device_id. device="cpu": CPU decoder and resize, outputs
    on the CPU (runs without a GPU: the tests use it). Sizes come from the file headers (PIL,
    cheap) through `smart_resize`, so the grids equal the PIL path's. The resize is DALI's
    antialiased cubic filter (what matches PIL's BICUBIC best: tests/unit/test_data_image_loader_dali.py
    compares it with linear and Lanczos), run as two one-axis passes with uint8 in between, in
    the order Pillow uses (`resize_passes`). EXIF orientation is ignored, as in the PIL path.
    Images outside DALI_FORMATS / DALI_MODES or with transparency are decoded by PIL
    (`load_image_pil`) and moved to the same device. Errors are `ImageError`s naming the source;
    if DALI fails on a batch (e.g. a truncated file), the pipeline is rebuilt and that batch is
    redone with PIL, which names the bad image."""

    def __init__(self, min_pixels: int, max_pixels: int, batch_size: int = 64,
                 device: str = "gpu", device_id: int | None = None, num_threads: int = 4,
                 hw_decoder_load: float | None = None):
        if device not in ("gpu", "cpu"):
            raise ValueError(f"DaliImageLoader device={device!r}: choose gpu or cpu")
        self.min_pixels, self.max_pixels, self.batch_size = min_pixels, max_pixels, batch_size
        self.device, self.num_threads, self.hw_decoder_load = device, num_threads, hw_decoder_load
        if device == "gpu":
            self.device_id = torch.cuda.current_device() if device_id is None else device_id
            self.torch_device = torch.device("cuda", self.device_id)
        else:
            self.device_id, self.torch_device = None, torch.device("cpu")
        from nvidia.dali.plugin.pytorch.torch_utils import to_torch_tensor
        self._to_torch = to_torch_tensor
        self._pipe = self._build()
        self.n_dali = self.n_pil = 0   # images decoded by each path (for logs / benchmarks)

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device == "gpu"
        dec_kw = dict(device="mixed" if gpu else "cpu", output_type=types.RGB,
                      adjust_orientation=False,   # the PIL path does not apply EXIF rotation
                      jpeg_fancy_upsampling=True)  # chroma upsampling as libjpeg-turbo / PIL
        if gpu and self.hw_decoder_load is not None:
            dec_kw["hw_decoder_load"] = float(self.hw_decoder_load)
        rs_kw = dict(interp_type=types.INTERP_CUBIC, antialias=True)

        # device_id=None: a CPU-only pipeline (DALI 2.x); prefetch_queue_depth=1 so that
        # `run(**inputs)` may feed the external sources; batches may be smaller than batch_size.
        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads,
                      device_id=self.device_id, prefetch_queue_depth=1)
        def pipe():
            enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
            # per-sample sizes, scalars: after pass 1 (iw, ih) and final (tw, th)
            iw, ih, tw, th = (fn.external_source(name=n, dtype=types.FLOAT, ndim=0)
                              for n in ("iw", "ih", "tw", "th"))
            img = fn.decoders.image(enc, **dec_kw)
            img = fn.resize(img, resize_x=iw, resize_y=ih, **rs_kw)   # uint8 out, as PIL
            return fn.resize(img, resize_x=tw, resize_y=th, **rs_kw)

        p = pipe()
        p.build()
        return p

    def _run_dali(self, datas, sizes) -> list[torch.Tensor]:
        """uint8 [H', W', 3] tensors on self.torch_device for one batch."""
        f32 = lambda v: np.array(v, np.float32)  # noqa: E731
        passes = [resize_passes(w, h, tw, th) for (w, h, tw, th) in sizes]
        (imgs,) = self._pipe.run(
            enc=[np.frombuffer(d, np.uint8) for d in datas],
            iw=[f32(p[0]) for p in passes], ih=[f32(p[1]) for p in passes],
            tw=[f32(s[2]) for s in sizes], th=[f32(s[3]) for s in sizes])
        rgbs = [self._to_torch(imgs[k], copy=True) for k in range(len(datas))]
        if self.device == "gpu":   # the copies run on torch's stream: finish them before
            torch.cuda.current_stream(self.torch_device).synchronize()   # DALI reuses `imgs`
        return rgbs

    def _pil(self, src) -> tuple[torch.Tensor, tuple]:
        """PIL decode (reads the source again; rare), moved to this loader's device."""
        pv, grid = load_image_pil(src, self.min_pixels, self.max_pixels)
        self.n_pil += 1
        return pv.to(self.torch_device), grid

    def load(self, sources: Sequence) -> list[tuple[torch.Tensor, tuple]]:
        sources = list(sources)
        out: list = [None] * len(sources)
        todo = []   # (index, source, bytes, (w, h, tw, th)) for DALI
        for i, src in enumerate(sources):
            data = read_bytes(src)
            w, h, fmt, mode, alpha = _header(data, src)
            th, tw = smart_size(w, h, src, self.min_pixels, self.max_pixels)
            if fmt in DALI_FORMATS and mode in DALI_MODES and not alpha \
                    and not (fmt == "JPEG" and not jpeg_has_end(data)):
                todo.append((i, src, data, (w, h, tw, th)))
            else:
                out[i] = self._pil(src)
        for c in range(0, len(todo), self.batch_size):
            chunk = todo[c:c + self.batch_size]
            try:
                rgbs = self._run_dali([t[2] for t in chunk], [t[3] for t in chunk])
            except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError for bad data
                log.warning("DALI failed on a batch of %d images (%s: %s); rebuilding the "
                            "pipeline and decoding that batch with PIL",
                            len(chunk), type(e).__name__, " ".join(str(e).split())[:400])
                self._pipe = self._build()
                for i, src, _, _ in chunk:
                    out[i] = self._pil(src)
                continue
            for (i, src, _, (w, h, tw, th)), rgb in zip(chunk, rgbs):
                if tuple(rgb.shape) != (th, tw, 3):   # DALI would have resized wrongly
                    raise RuntimeError(f"DALI returned {tuple(rgb.shape)} for {source_name(src)}"
                                       f", expected {(th, tw, 3)}")
                out[i] = normalize_patchify_torch(rgb)
            self.n_dali += len(chunk)
        return out


class ImageLoader:
    """`load(sources)` -> list of (pixel_values, grid_thw), via DALI or PIL (see module doc).
    In DataLoader workers use the PIL path (`backend='pil'`): DALI owns the GPU."""

    def __init__(self, min_pixels: int = ip.DEFAULT_MIN_PIXELS,
                 max_pixels: int = ip.DEFAULT_MAX_PIXELS, backend: str = "auto"):
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.backend = choose_backend(backend)
        self._dali = DaliImageLoader(min_pixels, max_pixels) if self.backend == "dali" else None

    def load(self, sources: Iterable) -> list[tuple[torch.Tensor, tuple]]:
        sources = list(sources)
        if self._dali is not None:
            return self._dali.load(sources)
        return [load_image_pil(s, self.min_pixels, self.max_pixels) for s in sources]
