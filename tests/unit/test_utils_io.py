import json
import os
import stat

import pytest

from ovlt.utils.io import append_jsonl, atomic_write_json, read_jsonl


def test_atomic_write_json_mode_and_content(tmp_path):
    p = tmp_path / "sub" / "m.json"
    atomic_write_json(p, {"a": 1})
    assert json.loads(p.read_text()) == {"a": 1}
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask
    assert [f.name for f in p.parent.iterdir()] == ["m.json"]  # no temp file left behind


def test_read_jsonl_tolerates_torn_last_line_only(tmp_path):
    p = tmp_path / "x.jsonl"
    append_jsonl(p, {"i": 0})
    append_jsonl(p, {"i": 1})
    with open(p, "a") as f:
        f.write('{"i": 2')  # a kill mid-write
    assert read_jsonl(p) == [{"i": 0}, {"i": 1}]
    p.write_text('{"i": 0}\nnot json\n{"i": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(p)
