"""Qwen2.5-VL image preprocessing, re-implemented (PIL for the resize, numpy for the rest).

Same steps and dtypes as transformers' `Qwen2VLImageProcessorPil`, so outputs are bit-identical:
1. RGB: images with an alpha channel (or palette transparency) are composited onto white;
   16-bit grayscale is scaled to 8 bits (the HF processor clips it at 255 instead);
2. smart resize: both sides to multiples of 28 (= patch 14 x merge 2) with the area in
   [min_pixels, max_pixels], aspect ratio kept as closely as possible; PIL bicubic on uint8;
3. rescale x/255 in float64 then float32; normalise with the OpenAI CLIP mean/std (float32);
4. patches: the image is repeated twice in time (temporal patch 2) and cut into 14x14 patches
   ordered so that each 2x2 group of patches that the merger fuses is contiguous; each row is
   one patch flattened as (channel, time, 14, 14) = 1176 values.
`grid_thw` = (1, H/14, W/14); the LLM sees t*h*w/4 `<|image_pad|>` tokens for it.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE
PATCH_DIM = 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE   # 1176
MAX_ASPECT_RATIO = 200
# Qwen2.5-VL preprocessor_config.json defaults.
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 12845056   # = 28 * 28 * 16384


def smart_resize(height: int, width: int, factor: int = FACTOR,
                 min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS
                 ) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area within [min_pixels, max_pixels]."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image has zero size ({width}x{height})")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} of a "
                         f"{width}x{height} image exceeds {MAX_ASPECT_RATIO}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit grayscale ("I;16*", or "I" holding values over 255) -> "L" by the top 8 bits.
    PIL's own convert clips such pixels at 255, which turns most of a 16-bit PNG white."""
    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img).astype(np.int64)
        if img.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = np.clip(a, 0, 65535) >> 8
        out = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
        out.info = {k: v for k, v in img.info.items() if k != "transparency"}
        return out
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB with any transparency composited onto white (as the HF processor does); 16-bit
    grayscale scaled to 8 bits first (`to_8bit`)."""
    img = to_8bit(img)
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def resize_rgb(img: Image.Image, min_pixels: int = DEFAULT_MIN_PIXELS,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """RGB uint8 [H', W', 3] after the smart resize (PIL bicubic)."""
    img = to_rgb(img)
    w, h = img.size
    rh, rw = smart_resize(h, w, FACTOR, min_pixels, max_pixels)
    if (rh, rw) != (h, w):
        img = img.resize((rw, rh), resample=Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def normalize_patchify(rgb: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """uint8 [H, W, 3] (H, W multiples of 28) -> (float32 [N, 1176], (1, H/14, W/14))."""
    H, W, C = rgb.shape
    if C != 3 or H % FACTOR or W % FACTOR:
        raise ValueError(f"expected [H, W, 3] with H, W multiples of {FACTOR}, got {rgb.shape}")
    x = (rgb.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    x = x.transpose(2, 0, 1)  # CHW
    gh, gw, m, p = H // PATCH_SIZE, W // PATCH_SIZE, MERGE_SIZE, PATCH_SIZE
    x = x.reshape(C, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], TEMPORAL_PATCH_SIZE, p, p))
    return np.ascontiguousarray(x.reshape(gh * gw, PATCH_DIM)), (1, gh, gw)


def preprocess(img: Image.Image, min_pixels: int = DEFAULT_MIN_PIXELS,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """One PIL image -> (pixel_values float32 [N, 1176], grid_thw (t, h, w))."""
    pv, grid = normalize_patchify(resize_rgb(img, min_pixels, max_pixels))
    return torch.from_numpy(pv), grid


def grid_for_size(height: int, width: int, min_pixels: int = DEFAULT_MIN_PIXELS,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int, int]:
    """grid_thw an image of this size will get, without decoding it."""
    rh, rw = smart_resize(height, width, FACTOR, min_pixels, max_pixels)
    return 1, rh // PATCH_SIZE, rw // PATCH_SIZE
