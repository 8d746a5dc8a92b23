"""The DALI/PIL seam: backend choice (logged once), PIL path == image_processing.preprocess,
every source kind (path, bytes, parquet struct), and clear errors."""
import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from ovlt.data import image_loader as il
from ovlt.data.image_processing import preprocess


def _png(w=90, h=60):
    rng = np.random.default_rng(0)
    b = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(b, "PNG")
    return b.getvalue()


def test_backend_choice(caplog, monkeypatch):
    monkeypatch.setattr(il, "dali_available", lambda: False)
    from ovlt import logging as olog
    olog._ONCE.discard("image_loader_backend")
    with caplog.at_level(logging.INFO):
        assert il.choose_backend("auto") == "pil"
        assert il.choose_backend("pil") == "pil"
    msgs = [r.message for r in caplog.records if "image loading" in r.message]
    assert msgs == ["image loading: PIL in DataLoader worker processes (nvidia.dali not used)"]
    with pytest.raises(RuntimeError, match="nvidia.dali does not import"):
        il.choose_backend("dali")
    with pytest.raises(ValueError, match="choose auto, dali or pil"):
        il.choose_backend("gpu")


def test_pil_loader_matches_preprocess_for_all_source_kinds(tmp_path):
    data = _png()
    p = tmp_path / "a.png"
    p.write_bytes(data)
    ref_pv, ref_grid = preprocess(Image.open(p), 3136, 50176)
    loader = il.ImageLoader(3136, 50176, backend="pil")
    outs = loader.load([str(p), data, {"bytes": data, "path": "x.png"},
                        {"bytes": None, "path": str(p)}])
    for pv, grid in outs:
        assert grid == ref_grid and torch.equal(pv, ref_pv)


def test_errors_name_the_source(tmp_path):
    with pytest.raises(il.ImageError, match="image file not found: .*nope.png"):
        il.load_image_pil(str(tmp_path / "nope.png"), 3136, 50176)
    with pytest.raises(il.ImageError, match="corrupt or unsupported image x.png"):
        il.load_image_pil({"bytes": b"junk", "path": "x.png"}, 3136, 50176)
    with pytest.raises(il.ImageError, match="neither bytes nor path"):
        il.read_bytes({"bytes": None, "path": None})
    with pytest.raises(il.ImageError, match="empty image file"):
        il.open_image(b"")
    wide = io.BytesIO()
    Image.new("RGB", (2100, 10)).save(wide, "PNG")
    with pytest.raises(il.ImageError, match="aspect ratio 210.0"):
        il.load_image_pil(wide.getvalue(), 3136, 50176)
    assert il.image_size(_png(33, 44)) == (33, 44)


def test_header_checks_without_decoding():
    import struct
    import zlib
    d = bytearray(_png(4, 4))
    d[16:20], d[20:24] = struct.pack(">I", 9000), struct.pack(">I", 6000)   # 54 MP header
    d[29:33] = struct.pack(">I", zlib.crc32(bytes(d[12:29])) & 0xFFFFFFFF)
    with pytest.raises(il.ImageError, match="54.0 MP exceeds 50 MP"):
        il.image_size(bytes(d))
    d[16:20] = struct.pack(">I", 0)
    d[29:33] = struct.pack(">I", zlib.crc32(bytes(d[12:29])) & 0xFFFFFFFF)
    with pytest.raises(il.ImageError, match="zero-pixel image"):
        il.image_size(bytes(d))


def test_normalize_patchify_torch_is_bit_identical():
    """The DALI path's torch port of normalize_patchify gives the numpy version's bits."""
    from ovlt.data.image_processing import normalize_patchify
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)
    ref, grid = normalize_patchify(rgb)
    pv, g = il.normalize_patchify_torch(torch.from_numpy(rgb))
    assert g == grid == (1, 4, 6) and pv.dtype == torch.float32
    assert torch.equal(pv, torch.from_numpy(ref))


def test_resize_passes_reproduce_pillow():
    """Two 1-D BICUBIC passes in the order `resize_passes` gives are byte-identical to the
    installed Pillow's one-call resize (which rounds to uint8 between its passes), on shapes
    that grow, shrink, or shrink one side much more than the other."""
    rng = np.random.default_rng(2)
    shapes = [(40, 90, 60, 50), (90, 70, 84, 56), (640, 480, 588, 420), (37, 154, 34, 133),
              (30, 60, 25, 50), (20, 30, 56, 84), (200, 50, 100, 80), (13, 300, 28, 112)]
    shapes += [tuple(int(x) for x in rng.integers(5, 160, 4)) for _ in range(12)]
    for w, h, tw, th in shapes:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        iw, ih = il.resize_passes(w, h, tw, th)
        assert (iw, ih) in ((tw, h), (w, th))
        two = im.resize((iw, ih), Image.BICUBIC).resize((tw, th), Image.BICUBIC)
        assert np.array_equal(np.asarray(two), np.asarray(im.resize((tw, th), Image.BICUBIC))), \
            (w, h, tw, th)


def test_jpeg_end_marker_check():
    """Truncated JPEGs are kept away from nvJPEG (it decodes them without an error)."""
    import io

    from PIL import Image

    from ovlt.data.image_loader import jpeg_has_end
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buf, "JPEG")
    data = buf.getvalue()
    assert jpeg_has_end(data) and jpeg_has_end(data + b"\x00\x00\n")
    assert not jpeg_has_end(data[: len(data) // 2]) and not jpeg_has_end(b"")
