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
