"""Checkpoint loading runs no pickle. Pickles planted where torch DCP / mcore would read them
(`dist/.metadata`, `common.pt`, `*.distcp`) never run: a checkpoint of ovlt's format resumes
past them, an old DCP checkpoint is refused naming its `.metadata`, and a truncated shard or a
corrupt trainer state is one line naming the file. All through the SFT launcher."""
from __future__ import annotations

import contextlib
import io
import pickle
import shutil
from pathlib import Path

from tests.sft_testlib import TINY_SFT, base_overrides, make_synth


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('the pickle ran')",)


def _launch(overrides) -> tuple[int, list[str], str]:
    from launchers.sft import main
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        rc = main(["--config", TINY_SFT] + list(overrides))
    err = buf.getvalue()
    return rc, [ln for ln in err.splitlines() if "ovlt sft: " in ln], err


def _worker(rank, world, tmp):
    tmp = Path(tmp)
    sft = make_synth(tmp / "synth", n=8)
    marker = tmp / "PWNED"
    payload = pickle.dumps(_Payload(marker))
    good = tmp / "good"

    def ov(save_dir, **kw):
        return base_overrides(sft, save_dir, **{"sft.train.max_steps": 2, **kw})

    rc, lines, err = _launch(ov(good, **{"sft.train.exit_interval": 1}))
    assert rc == 0 and not lines, err[-3000:]
    ckpt = good / "step_0000001"
    assert (ckpt / "state" / "common.json").is_file()
    for clone in ("old", "truncated", "corrupt"):
        shutil.copytree(good, tmp / clone)
    results = {}

    # pickles planted in a good checkpoint: never read, the run resumes and finishes
    (ckpt / "dist").mkdir()
    for f in (ckpt / "dist" / ".metadata", ckpt / "dist" / "__0_0.distcp",
              ckpt / "state" / ".metadata", ckpt / "state" / "common.pt"):
        f.write_bytes(payload)
    results["planted"] = _launch(ov(good))[:2]
    from ovlt.engine.checkpoint import find_latest, read_trainer_state
    results["resumed_to"] = read_trainer_state(find_latest(good))["step"]

    # an old-format (torch DCP) checkpoint: refused unread
    old = tmp / "old" / "step_0000001"
    shutil.rmtree(old / "state")
    (old / "dist").mkdir()
    (old / "dist" / ".metadata").write_bytes(payload)
    results["old"] = _launch(ov(tmp / "old"))[:2]

    # a truncated shard
    shard = next((tmp / "truncated" / "step_0000001" / "state").glob("r00000-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100_000])
    results["truncated"] = _launch(ov(tmp / "truncated"))[:2] + (str(shard),)

    # a corrupt trainer state
    ts = tmp / "corrupt" / "step_0000001" / "trainer_state.json"
    ts.write_text('{"step": ')
    results["corrupt"] = _launch(ov(tmp / "corrupt"))[:2] + (str(ts),)
    results["pickle_ran"] = marker.exists()
    return results


def test_checkpoints_never_unpickle(tmp_path):
    from tests.dist_utils import run_distributed
    r = run_distributed(_worker, 1, str(tmp_path), timeout=900)[0]
    assert r["pickle_ran"] is False
    rc, lines = r["planted"]
    assert rc == 0 and lines == [] and r["resumed_to"] == 2
    rc, lines = r["old"]
    old_meta = tmp_path / "old" / "step_0000001" / "dist" / ".metadata"
    assert rc == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"ovlt sft: error: {old_meta}: a torch DCP checkpoint, whose "
                               "metadata is a pickle; ovlt does not load pickles")
    rc, lines, shard = r["truncated"]
    assert rc == 1 and len(lines) == 1 and lines[0].startswith(f"ovlt sft: error: {shard}: "
                                                               "unreadable (truncated"), lines
    rc, lines, ts = r["corrupt"]
    assert rc == 1 and len(lines) == 1 and f"{ts}: not valid JSON" in lines[0], lines
