"""Readers of the released formats and every bad-input case: counted skip with file, record
and reason, or DataError in strict mode; plus the registry's weights/caps and `ovlt data check`."""
import io
import json
import struct
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ovlt.data.formats import (DataError, SkipReport, load_registry, read_registry, read_rl,
                               read_sft, validate_rl, validate_sft)


def _png_bytes(w=40, h=30, color=(200, 30, 30)):
    b = io.BytesIO()
    Image.new("RGB", (w, h), color).save(b, "PNG")
    return b.getvalue()


def _png_with_header(w, h):
    """A valid small PNG whose IHDR claims w x h (CRC fixed): tests size checks w/o decoding."""
    d = bytearray(_png_bytes(4, 4))
    d[16:20], d[20:24] = struct.pack(">I", w), struct.pack(">I", h)
    d[29:33] = struct.pack(">I", zlib.crc32(bytes(d[12:29])) & 0xFFFFFFFF)
    return bytes(d)


@pytest.fixture()
def imgdir(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "ok.png").write_bytes(_png_bytes())
    (d / "ok2.png").write_bytes(_png_bytes(60, 90, (0, 0, 255)))
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    (d / "zero.png").write_bytes(_png_with_header(0, 30))
    (d / "huge.png").write_bytes(_png_with_header(8000, 7000))      # 56 MP
    return d


def _conv(q="<image>What?", a="<answer>3</answer>"):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def _write_jsonl(path, rows):
    with open(path, "wb") as f:
        for r in rows:
            f.write(r if isinstance(r, bytes) else (json.dumps(r, ensure_ascii=False) + "\n").encode())


def _check_all(recs, report, kind="sft", max_length=2048):
    """Full validation as `ovlt data check` does; returns valid records."""
    ok = []
    for r in recs:
        why = (validate_sft(r, max_length, 3136, 262144) if kind == "sft"
               else validate_rl(r, max_length, 3136, 262144))
        if why:
            report.reject(r.file, r.index, why)
        else:
            ok.append(r)
    return ok


def test_sft_bad_inputs_each_counted(tmp_path, imgdir):
    f = tmp_path / "sft.jsonl"
    rows = [
        {"messages": _conv(), "images": ["imgs/ok.png"]},                                   # 0 ok
        {"messages": _conv(), "images": ["imgs/missing.png"]},                              # 1
        {"messages": _conv(), "images": ["imgs/corrupt.png"]},                              # 2
        {"messages": _conv("<image><image>Compare"), "images": ["imgs/ok.png"]},            # 3
        {"messages": _conv(a="word " * 3000), "images": ["imgs/ok.png"]},                   # 4
        {"messages": _conv(a="   "), "images": ["imgs/ok.png"]},                            # 5
        {"messages": [{"role": "user", "content": 5}], "images": []},                       # 6
        b'{"messages": [{"role": "user", "content": "bad \xff byte <image>"}, '
        b'{"role": "assistant", "content": "x"}], "images": ["imgs/ok.png"]}\n',            # 7
        {"messages": _conv(), "images": ["imgs/zero.png"]},                                 # 8
        {"messages": _conv(), "images": ["imgs/huge.png"]},                                 # 9
        {"messages": _conv("<image>and <image>"), "images": ["imgs/ok.png", "imgs/ok2.png"]},  # 10 ok
        b"{not json\n",                                                                     # 11
        {"messages": _conv(), "images": "imgs/ok2.png"},                                    # 12 ok (str)
        {"messages": _conv(), "images": [3]},                                               # 13
    ]
    _write_jsonl(f, rows)
    report = SkipReport()
    recs = _check_all(list(read_sft(f, report=report)), report)
    assert [r.index for r in recs] == [0, 10, 12]
    assert report.valid == 3 and report.num_skipped == 11
    reasons = {s.index: s.reason for s in report.skips}
    assert all(s.file == str(f) for s in report.skips)
    assert reasons[1].startswith("image file not found")
    assert reasons[2].startswith("corrupt or unsupported image")
    assert reasons[3].startswith("placeholder/image count mismatch: 2 <image> but 1 images")
    assert reasons[4].startswith("over-length")
    assert reasons[5].startswith("empty answer")
    assert reasons[6].startswith("wrong type: messages[0].content is int")
    assert reasons[7] == "non-UTF-8 text"
    assert reasons[8].startswith("zero-pixel image")
    assert "exceeds 50 MP" in reasons[9]
    assert reasons[11].startswith("invalid JSON")
    assert reasons[13].startswith("wrong type: 'images'")
    # paths were resolved relative to the file
    assert recs[1].images == [str(tmp_path / "imgs/ok.png"), str(tmp_path / "imgs/ok2.png")]
    assert recs[0].messages[1] == {"role": "assistant", "content": "<answer>3</answer>"}


def test_sft_json_list_and_image_root(tmp_path, imgdir):
    f = tmp_path / "sub" / "sft.json"
    f.parent.mkdir()
    f.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "<image>Q"}, {"from": "gpt", "value": "A"}],
         "images": ["ok.png"], "system": "Be brief."}]))
    recs = list(read_sft(f, image_root=str(imgdir)))
    assert recs[0].images == [str(imgdir / "ok.png")]
    assert recs[0].messages == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "<image>Q"},
                                {"role": "assistant", "content": "A"}]


def test_strict_mode_raises_with_location(tmp_path, imgdir):
    f = tmp_path / "s.jsonl"
    _write_jsonl(f, [{"messages": _conv(), "images": ["imgs/ok.png"]},
                     {"messages": _conv("<image><image>x"), "images": ["imgs/ok.png"]}])
    with pytest.raises(DataError, match=r"s\.jsonl: record 1: placeholder/image count mismatch"):
        list(read_sft(f, strict=True))


def _rl_table(rows, img_type=None):
    img_type = img_type or pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    cols = {k: [r.get(k) for r in rows] for k in ("problem", "answer", "images")}
    return pa.table({"problem": pa.array(cols["problem"], pa.string()),
                     "answer": pa.array(cols["answer"], pa.string()),
                     "images": pa.array(cols["images"], img_type)})


def test_rl_struct_images_and_bad_rows(tmp_path, imgdir):
    ok = _png_bytes()
    rows = [
        {"problem": "<image>How many?", "answer": "3", "images": [{"bytes": ok, "path": "a.png"}]},
        {"problem": "<image>How many?", "answer": "  ", "images": [{"bytes": ok, "path": None}]},
        {"problem": "<image><image>x", "answer": "1", "images": [{"bytes": ok, "path": None}]},
        {"problem": "<image>x", "answer": "1", "images": [{"bytes": b"garbage", "path": None}]},
        {"problem": "<image>x", "answer": "1", "images": [{"bytes": None, "path": "imgs/ok.png"}]},
        {"problem": "<image>x", "answer": "1", "images": [{"bytes": None, "path": "imgs/nope.png"}]},
        {"problem": "", "answer": "1", "images": []},
    ]
    f = tmp_path / "rl.parquet"
    pq.write_table(_rl_table(rows), f)
    report = SkipReport()
    recs = _check_all(list(read_rl(f, report=report)), report, kind="rl")
    assert [r.index for r in recs] == [0, 4]
    assert recs[0].images[0] == {"bytes": ok, "path": "a.png"}  # bytes kept, path for messages
    assert recs[1].images[0] == str(tmp_path / "imgs/ok.png")
    reasons = {s.index: s.reason for s in report.skips}
    assert reasons[1] == "empty answer"
    assert reasons[2].startswith("placeholder/image count mismatch")
    assert reasons[3].startswith("corrupt or unsupported image")
    assert reasons[5].startswith("image file not found")
    assert reasons[6] == "empty problem"
    assert report.valid == 2 and report.num_skipped == 5


def test_rl_path_list_and_wrong_types(tmp_path, imgdir):
    f = tmp_path / "paths.parquet"
    pq.write_table(pa.table({"problem": ["<image>q1", "<image>q2"], "answer": ["4", "5"],
                             "images": [["imgs/ok.png"], ["imgs/ok2.png"]],
                             "difficulty": ["easy", "hard"]}), f)
    recs = list(read_rl(f))
    assert [r.images for r in recs] == [[str(tmp_path / "imgs/ok.png")], [str(tmp_path / "imgs/ok2.png")]]
    assert [r.difficulty for r in recs] == ["easy", "hard"]

    g = tmp_path / "types.parquet"
    pq.write_table(pa.table({"problem": pa.array([[1], [2]]), "answer": ["1", "2"]}), g)
    rep = SkipReport()
    assert list(read_rl(g, report=rep)) == []
    assert rep.num_skipped == 2 and "wrong column type: 'problem'" in rep.skips[0].reason

    h = tmp_path / "imgtype.parquet"
    pq.write_table(pa.table({"problem": ["<image>q"], "answer": ["1"], "images": [5]}), h)
    rep = SkipReport()
    assert list(read_rl(h, report=rep)) == []
    assert rep.skips[0].reason.startswith("wrong type: 'images'")

    m = tmp_path / "missing.parquet"
    pq.write_table(pa.table({"question": ["q"], "answer": ["1"]}), m)
    rep = SkipReport()
    assert list(read_rl(m, report=rep)) == []
    assert rep.skips[0].reason.startswith("missing column: 'problem'")


def test_rl_non_utf8_row(tmp_path):
    b = pa.array([b"fine <image>", b"bad \xff\xfe <image>"], type=pa.binary())
    bad = pa.Array.from_buffers(pa.string(), len(b), b.buffers())
    f = tmp_path / "u.parquet"
    pq.write_table(pa.table({"problem": bad, "answer": ["1", "2"],
                             "images": [[_png_bytes()], [_png_bytes()]]}), f)
    rep = SkipReport()
    recs = list(read_rl(f, report=rep))
    assert [r.index for r in recs] == [0]
    assert rep.skips[0].index == 1 and rep.skips[0].reason == "non-UTF-8 text"


def test_registry_weights_and_caps(tmp_path, imgdir):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _write_jsonl(a, [{"id": f"a{i}", "messages": _conv("q"), "images": []} for i in range(10)])
    _write_jsonl(b, [{"id": f"b{i}", "messages": _conv("q"), "images": []} for i in range(8)])
    reg = tmp_path / "reg.yaml"
    reg.write_text("sources:\n"
                   "  - {name: A, files: a.jsonl, weight: 2.0, max_samples: 15}\n"
                   "  - {name: B, files: [b.jsonl], weight: 0.5}\n")
    srcs = load_registry(reg)
    assert [s.name for s in srcs] == ["A", "B"] and srcs[0].files == [str(a)]
    recs = read_registry(reg, "sft", seed=3)
    n_a = sum(r.source == "A" for r in recs)
    n_b = sum(r.source == "B" for r in recs)
    assert (n_a, n_b) == (15, 4)              # 2 x 10 capped at 15; half of 8
    assert len({r.id for r in recs if r.source == "B"}) == 4
    assert [r.id for r in read_registry(reg, "sft", seed=3)] == [r.id for r in recs]
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources:\n  - {files: a.jsonl, weight: -1}\n")
    with pytest.raises(DataError, match=r"sources\[0\]: weight must be a number >= 0"):
        load_registry(bad)
    bad.write_text("sources:\n  - {files: a.jsonl, wieght: 1}\n")
    with pytest.raises(DataError, match="unknown keys"):
        load_registry(bad)


def test_cli_check(tmp_path, imgdir, capsys):
    from ovlt.data.cli import main
    f = tmp_path / "c.jsonl"
    _write_jsonl(f, [{"messages": _conv(), "images": ["imgs/ok.png"]},
                     {"messages": _conv(), "images": ["imgs/corrupt.png"]}])
    assert main(["check", str(f)]) == 1
    out = capsys.readouterr().out
    assert "1 valid, 1 skipped" in out
    assert f"SKIP {f}: record 1: corrupt or unsupported image" in out
    assert main(["check", str(f), "--strict"]) == 1
    err = capsys.readouterr().err
    assert "record 1: corrupt" in err
    g = tmp_path / "good.jsonl"
    _write_jsonl(g, [{"messages": _conv(), "images": ["imgs/ok.png"]}])
    assert main(["check", str(g)]) == 0


def test_cli_check_parquet_and_registry(tmp_path, imgdir, capsys):
    from ovlt.data.cli import main
    rl = tmp_path / "r.parquet"
    pq.write_table(pa.table({"problem": ["<image>q", "<image>q"], "answer": ["1", ""],
                             "images": [["imgs/ok.png"], ["imgs/ok.png"]]}), rl)
    sft = tmp_path / "s.jsonl"
    _write_jsonl(sft, [{"messages": _conv(), "images": ["imgs/huge.png"]}])
    reg = tmp_path / "reg.yaml"
    reg.write_text("sources:\n  - {files: r.parquet}\n  - {files: s.jsonl}\n")
    assert main(["check", str(rl)]) == 1
    out = capsys.readouterr().out
    assert "1 valid, 1 skipped" in out and f"SKIP {rl}: record 1: empty answer" in out
    assert main(["check", str(reg)]) == 1
    out = capsys.readouterr().out
    assert "1 valid, 2 skipped" in out and "exceeds 50 MP" in out
    assert main(["check", str(tmp_path / "none.jsonl")]) == 2
