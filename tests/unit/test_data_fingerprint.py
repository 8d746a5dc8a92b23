"""Checkpoint data fingerprints (`ovlt.data.fingerprint`): the hash against hashlib by hand,
what changes it and what does not, and the resume check's message."""
from __future__ import annotations

import hashlib
import json

import pytest

from ovlt.data.fingerprint import check_same_data, fingerprint, image_key
from ovlt.data.formats import DataError, RLRecord


def test_fingerprint_is_the_sha256_of_the_json_rows():
    rows = [["a", {"k": "é"}, 3], ["b", [], 0]]
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps(r, ensure_ascii=False).encode() + b"\n")
    assert fingerprint(rows) == {"samples": 2, "sha256": h.hexdigest()}
    assert fingerprint(iter(rows)) == fingerprint(rows)  # a generator is read once, same hash


def test_image_key_by_file_name_or_content():
    assert image_key("/data/a/img/001.png") == image_key("rel/img/001.png") == "001.png"
    assert image_key(b"\x89PNG") == hashlib.sha256(b"\x89PNG").hexdigest()
    assert image_key({"bytes": None, "path": "x.png"}) != image_key({"bytes": None, "path": "y.png"})


def test_grpo_prompts_fingerprint_follows_records_not_paths():
    from ovlt.grpo.data import PromptStream
    from ovlt.config import CurriculumStage

    def stream(recs, name="medium"):
        s = PromptStream.__new__(PromptStream)
        s.stages, s.records = [CurriculumStage(name=name, rl_files=["x.parquet"])], [recs]
        return s
    r1 = RLRecord("2 + 2?", "4", ["/mnt/a/img/1.png"], "p1")
    r2 = RLRecord("3 + 4?", "7", ["/mnt/a/img/2.png"], "p2")
    base = stream([r1, r2]).fingerprint()
    assert base["samples"] == 2
    moved = [RLRecord("2 + 2?", "4", ["/other/img/1.png"], "p1"), r2]
    assert stream(moved).fingerprint() == base                      # another mount point
    assert stream([r2, r1]).fingerprint() != base                   # order
    assert stream([r1, RLRecord("3 + 4?", "8", r2.images, "p2")]).fingerprint() != base  # answer
    assert stream([r1, r2], name="hard").fingerprint() != base      # curriculum stage


def test_check_same_data_refuses_other_data_and_accepts_old_checkpoints(tmp_path):
    now = {"samples": 3, "sha256": "b" * 64}
    check_same_data({"step": 4, "data": dict(now)}, now, tmp_path, kind="GRPO prompts",
                    source="x", save_key="grpo.train.save_dir")
    check_same_data({"step": 4}, now, tmp_path, kind="GRPO prompts", source="x",
                    save_key="grpo.train.save_dir")  # written before fingerprints: accepted
    with pytest.raises(DataError) as e:
        check_same_data({"step": 4, "data": {"samples": 5, "sha256": "a" * 64}}, now, tmp_path,
                        kind="GRPO prompts", source="the curriculum (all: rl.parquet)",
                        save_key="grpo.train.save_dir")
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path}: its checkpoint (step 4) was trained on different GRPO "
                          "prompts (5 usable samples, fingerprint aaaaaaaaaaaa) than the "
                          "curriculum (all: rl.parquet) holds now (3 samples")
    assert "Use a new grpo.train.save_dir" in msg
