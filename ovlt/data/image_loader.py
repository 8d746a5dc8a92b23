"""The one image-decoding seam: NVIDIA DALI (GPU decode + resize) when `nvidia.dali` imports,
else PIL in DataLoader worker processes. Which path is used is logged once per process.

Both paths produce what `image_processing.preprocess` produces: (pixel_values [N, 1176]
float32, grid_thw). The PIL path is bit-identical to transformers' processor. The DALI path
decodes with nvJPEG and resizes with DALI's antialiased cubic filter, which is not PIL's
bicubic, so values differ slightly (not yet measured: `benchmarks/image_loading.py` reports
the max/mean difference to the PIL path whenever DALI runs); the grids are identical because
both take the size from `smart_resize`. JPEG decoders may also differ by a grey level.

Sources are what the data files hold: a path (str / PathLike), raw bytes, or a
`{"bytes": ..., "path": ...}` dict (parquet image structs; bytes win when present).
"""
from __future__ import annotations

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


def image_size(src) -> tuple[int, int]:
    """(width, height) from the header only (cheap; used to count image tokens), with the
    same zero-pixel / size-limit checks as `open_image`."""
    data = read_bytes(src)
    try:
        with Image.open(io.BytesIO(data)) as img:
            check_size(*img.size, src)
            return img.size
    except ImageError:
        raise
    except Exception as e:
        dims = _header_dims(data)
        if dims and 0 in dims:
            raise ImageError(f"zero-pixel image ({dims[0]}x{dims[1]}): {source_name(src)}") from None
        raise ImageError(f"corrupt or unsupported image {source_name(src)}: "
                         f"{type(e).__name__}: {e}") from None


def load_image_pil(src, min_pixels: int, max_pixels: int) -> tuple[torch.Tensor, tuple]:
    img = open_image(src)
    try:
        return ip.preprocess(img, min_pixels, max_pixels)
    except ValueError as e:  # e.g. aspect ratio > 200
        raise ImageError(f"{source_name(src)}: {e}") from None


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


class DaliImageLoader:
    """Batched GPU decode + smart resize with DALI; normalisation + patchify in torch on GPU.
    Sizes come from the file headers (PIL, CPU, cheap) so grids match the PIL path.
    Alpha is dropped, not composited on white as in the PIL path.
    NOTE: never executed by ovlt's tests or benchmarks so far (no DALI wheel reachable on the
    test machines; see benchmarks/README.md)."""

    def __init__(self, min_pixels: int, max_pixels: int, batch_size: int = 64,
                 device_id: int | None = None, num_threads: int = 4):
        from nvidia.dali import fn, pipeline_def, types

        self.min_pixels, self.max_pixels, self.batch_size = min_pixels, max_pixels, batch_size
        self.device_id = torch.cuda.current_device() if device_id is None else device_id

        @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=self.device_id,
                      prefetch_queue_depth=1)
        def pipe():
            enc = fn.external_source(name="enc", dtype=types.UINT8)
            # per-sample target width / height (named axes: no ambiguity about `size` order)
            rw = fn.external_source(name="rw", dtype=types.FLOAT)
            rh = fn.external_source(name="rh", dtype=types.FLOAT)
            img = fn.decoders.image(enc, device="mixed", output_type=types.RGB)
            return fn.resize(img, resize_x=rw, resize_y=rh, interp_type=types.INTERP_CUBIC,
                             antialias=True)

        from nvidia.dali.plugin.pytorch import feed_ndarray
        self._feed = feed_ndarray
        self._pipe = pipe()
        self._pipe.build()
        self._mean = torch.tensor(ip.CLIP_MEAN, device=f"cuda:{self.device_id}")
        self._std = torch.tensor(ip.CLIP_STD, device=f"cuda:{self.device_id}")

    def _patchify(self, rgb: torch.Tensor):
        H, W, _ = rgb.shape
        x = (rgb.double() / 255).float()
        x = ((x - self._mean) / self._std).permute(2, 0, 1)
        p, m = ip.PATCH_SIZE, ip.MERGE_SIZE
        gh, gw = H // p, W // p
        x = x.reshape(3, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
        x = x.unsqueeze(5).expand(*x.shape[:5], ip.TEMPORAL_PATCH_SIZE, p, p)
        return x.reshape(gh * gw, ip.PATCH_DIM), (1, gh, gw)

    def load(self, sources: Sequence) -> list[tuple[torch.Tensor, tuple]]:
        out = []
        for i in range(0, len(sources), self.batch_size):
            chunk = list(sources[i:i + self.batch_size])
            datas = [read_bytes(s) for s in chunk]
            ws, hs = [], []
            for d in datas:
                w, h = image_size(d)
                rh, rw = ip.smart_resize(h, w, ip.FACTOR, self.min_pixels, self.max_pixels)
                ws.append(np.array(rw, np.float32))
                hs.append(np.array(rh, np.float32))
            n = len(chunk)
            pad = self.batch_size - n  # DALI pipelines run fixed-size batches
            encs = [np.frombuffer(d, np.uint8) for d in datas] + [np.frombuffer(datas[0], np.uint8)] * pad
            self._pipe.feed_input("enc", encs)
            self._pipe.feed_input("rw", ws + [ws[0]] * pad)
            self._pipe.feed_input("rh", hs + [hs[0]] * pad)
            (imgs,) = self._pipe.run()
            for k in range(n):
                src = imgs[k]   # TensorGPU [H, W, 3] uint8
                t = torch.empty(tuple(src.shape()), dtype=torch.uint8,
                                device=f"cuda:{self.device_id}")
                self._feed(src, t, cuda_stream=torch.cuda.current_stream(self.device_id))
                out.append(self._patchify(t))
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
