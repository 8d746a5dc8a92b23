"""ovlt's Qwen2.5-VL image preprocessing vs transformers' `Qwen2VLImageProcessorPil`
(the PIL/numpy processor; the default torchvision-backed one can't import without torchvision)."""
import numpy as np
import pytest
import torch
from PIL import Image

from ovlt.data.image_processing import grid_for_size, preprocess, smart_resize

# (width, height, mode, min_pixels, max_pixels)
CASES = [
    (1, 1, "RGB", 3136, 262144),            # tiny: upscaled to 56x56
    (5, 9, "RGB", 3136, 262144),
    (27, 29, "RGB", 3136, 262144),
    (28, 28, "RGB", 3136, 262144),
    (56, 56, "RGB", 3136, 262144),          # no resize needed
    (100, 37, "RGB", 3136, 262144),
    (224, 224, "RGB", 3136, 262144),
    (333, 517, "RGB", 3136, 262144),
    (640, 480, "RGB", 3136, 262144),
    (1024, 768, "RGB", 3136, 262144),       # downscaled to the cap
    (4032, 3024, "RGB", 3136, 262144),      # huge photo
    (6000, 4000, "RGB", 3136, 1003520),     # huge, other cap
    (1900, 10, "RGB", 3136, 262144),        # extreme ratio 190
    (12, 2000, "RGB", 3136, 262144),        # extreme ratio 167
    (3000, 20, "RGB", 3136, 262144),        # 150
    (800, 17, "RGB", 3136, 12845056),       # default cap
    (301, 199, "L", 3136, 262144),          # greyscale
    (150, 90, "RGBA", 3136, 262144),        # alpha -> composited on white
    (120, 160, "P", 3136, 262144),          # palette
    (77, 313, "LA", 3136, 262144),
    (420, 420, "CMYK", 3136, 262144),
    (250, 180, "RGB", 200704, 262144),      # high min_pixels: upscale
    (997, 991, "RGB", 3136, 50176),         # small cap
]


def _image(w, h, mode, seed):
    rng = np.random.default_rng(seed)
    if mode in ("L", "P"):
        img = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
        if mode == "P":
            img = img.convert("P")
            img.info["transparency"] = 3
        return img
    nch = {"RGB": 3, "RGBA": 4, "LA": 2, "CMYK": 4}[mode]
    arr = rng.integers(0, 256, (h, w, nch), dtype=np.uint8)
    # Smooth ramps on top of noise so bicubic interpolation is exercised on real structure.
    ramp = (np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 1))).astype(np.uint8)
    arr = (arr // 2 + ramp // 2).astype(np.uint8)
    return Image.fromarray(arr, mode)


@pytest.fixture(scope="module")
def hf_processor_cls():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil


def test_case_count():
    assert len(CASES) >= 20


@pytest.mark.parametrize("i", range(len(CASES)))
def test_matches_transformers(hf_processor_cls, i):
    w, h, mode, min_px, max_px = CASES[i]
    img = _image(w, h, mode, seed=i)
    proc = hf_processor_cls(min_pixels=min_px, max_pixels=max_px)
    ref = proc(images=[img], return_tensors="np")
    pv, grid = preprocess(img, min_pixels=min_px, max_pixels=max_px)
    assert tuple(ref["image_grid_thw"][0].tolist()) == grid
    assert pv.dtype == torch.float32 and pv.shape == ref["pixel_values"].shape
    assert pv.shape[1] == 1176
    diff = np.abs(pv.numpy() - ref["pixel_values"]).max()
    assert diff < 1e-5, f"{w}x{h} {mode}: max abs diff {diff}"
    assert grid_for_size(h, w, min_px, max_px) == grid
    t, gh, gw = grid
    assert gh * 14 * gw * 14 <= max(max_px, 56 * 56) and gh % 2 == 0 and gw % 2 == 0


def test_smart_resize_hand_values():
    assert smart_resize(1, 1) == (56, 56)
    assert smart_resize(224, 224) == (224, 224)
    assert smart_resize(1000, 1000, max_pixels=262144) == (504, 504)  # floor(1000/(1000/512)/28)*28
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2500)
    with pytest.raises(ValueError, match="zero size"):
        smart_resize(0, 10)
