"""Bad SFT data through the real launcher (`launchers/sft.py` main, in a spawned gloo rank):
truncated JPEGs with valid headers are counted, logged skips (per step in metrics.jsonl and
in the summary); a step that lost every sample stops the run with an error naming the
records; a finished save_dir says it has nothing to train; a save_dir trained on other data is
refused instead of resumed."""
import contextlib
import io
import json
from pathlib import Path

from PIL import Image

from tests.sft_testlib import TINY_SFT, base_overrides, make_synth


def _truncate_images(sft_file: Path, every: int) -> list[int]:
    """Rewrite records 0, every, 2*every, ... to point at a truncated JPEG of their image
    (header intact: sizes read fine, decoding fails in the worker). Returns their indices."""
    lines = sft_file.read_text().splitlines()
    bad = []
    for i in range(0, len(lines), every):
        rec = json.loads(lines[i])
        src = sft_file.parent / rec["images"][0]
        jpg = src.with_suffix(".trunc.jpg")
        buf = io.BytesIO()
        Image.open(src).convert("RGB").save(buf, "JPEG", quality=95)
        jpg.write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
        rec["images"] = [str(jpg.relative_to(sft_file.parent))]
        lines[i] = json.dumps(rec)
        bad.append(i)
    sft_file.write_text("\n".join(lines) + "\n")
    return bad


def _launch(overrides) -> dict:
    """The launcher's exit code, stdout and stderr, or the exception it ended with."""
    from launchers.sft import main
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(["--config", TINY_SFT] + list(overrides))
    except Exception as e:  # noqa: BLE001 - returned to the test, which checks the message
        return {"rc": None, "error": f"{type(e).__name__}: {e}", "out": out.getvalue(),
                "err": err.getvalue()}
    return {"rc": rc, "error": None, "out": out.getvalue(), "err": err.getvalue()}


def _worker(rank, world, runs):
    return [_launch(ov) for ov in runs]


def _failure(res) -> str:
    """The run failed: its message (an exception, or a non-zero exit with its stderr)."""
    if res["error"] is not None:
        return res["error"]
    assert res["rc"] not in (0, None), res
    return res["err"]


def _summary(res) -> dict:
    assert res["rc"] == 0 and res["error"] is None, res
    return json.loads(res["out"].strip().splitlines()[-1])


def test_sft_bad_images_and_save_dir_reuse(tmp_path):
    from tests.dist_utils import run_distributed
    all_bad = make_synth(tmp_path / "all_bad", n=8)
    _truncate_images(all_bad, every=1)
    some_bad = make_synth(tmp_path / "some_bad", n=8)
    bad_idx = _truncate_images(some_bad, every=4)            # records 0 and 4
    other = make_synth(tmp_path / "other", n=8, seed=1)
    ov = {"sft.train.max_steps": 2}
    runs = [base_overrides(all_bad, tmp_path / "run_all_bad", **ov),
            base_overrides(some_bad, tmp_path / "run", **ov),
            base_overrides(some_bad, tmp_path / "run", **ov),      # finished: nothing to train
            base_overrides(other, tmp_path / "run", **ov),         # other data: refused
            base_overrides(other, tmp_path / "run", **{"sft.train.max_steps": 3})]
    r_all, r_some, r_again, r_other, r_longer = run_distributed(_worker, 1, runs,
                                                                timeout=900)[0]

    # every image truncated: a clear error naming step, file, record and reason; no checkpoint
    msg = _failure(r_all)
    assert "SFT step 1: all 4 samples of the global batch were skipped" in msg, msg
    assert f"{all_bad}: record " in msg and "corrupt or unsupported image" in msg, msg
    assert "truncated" in msg, msg
    assert not list((tmp_path / "run_all_bad").glob("step_*"))

    # two of eight truncated: trained on the rest, the skips counted and logged
    s = _summary(r_some)
    assert s["trained_steps"] == 2 and s["final_loss"] > 1.0, s
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text()
               .splitlines()]
    per_step = [m["skipped_samples"] for m in metrics]
    assert len(per_step) == 2 and sum(per_step) == s["skipped_samples"], (per_step, s)
    # 2 steps x 4 samples = all 8 records once: both bad ones met exactly once
    assert s["skipped_samples"] == len(bad_idx) == 2, s
    log = (tmp_path / "run" / "logs" / "rank0.log").read_text()
    for i in bad_idx:
        assert f"skipping {some_bad}: record {i}: corrupt or unsupported image" in log, log

    # the same command again: says it has nothing to train, trains nothing, exits 0
    s2 = _summary(r_again)
    assert s2["trained_steps"] == 0 and s2["start_step"] == 2, s2
    log = (tmp_path / "run" / "logs" / "rank0.log").read_text()
    assert "holds a finished run (checkpoint step_" in log and "nothing to train" in log, log

    # new data into the finished save_dir: refused, naming the save_dir and the data
    msg = _failure(r_other)
    assert f"{tmp_path / 'run'}: its checkpoint (step 2) was trained on different SFT data" in msg
    assert str(other) in msg and "Use a new sft.train.save_dir" in msg, msg
    msg = _failure(r_longer)  # resuming mid-plan with other data is refused the same way
    assert "was trained on different SFT data" in msg, msg
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
