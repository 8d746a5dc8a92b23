"""The iterate launcher on inputs that are not there: one line naming the key, the path and what
makes it, before any run directory exists; a failed stage's line quotes the stage's own words,
not torchrun's traceback."""
from __future__ import annotations

import pytest

from ovlt.config import CONFIG_ROOT
from ovlt.iterate.loop import stage_error

SEVEN_B = str(CONFIG_ROOT / "iterate" / "openvlthinker_7b.yaml")


def _iterate(capsys, *args):
    from launchers.iterate import main
    rc = main(["--config", SEVEN_B, *args])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    return rc, err


def test_missing_inputs_of_the_recipe_config(tmp_path, capsys, tiny_hf_dir):
    out = f"iterate.out_dir={tmp_path / 'runs'}"
    rc, err = _iterate(capsys, out)            # as it ships: placeholder paths
    assert rc == 2 and err == [
        "ovlt iterate: error: model.hf_path: /models/Qwen2.5-VL-7B-Instruct does not exist (a "
        "Hugging Face Qwen2.5-VL folder: a downloaded one, or the one an SFT run exports to "
        "<sft.train.save_dir>/final_hf; unset, r0.prepare writes a random-init one of the "
        "model's shape)"]
    rc, err = _iterate(capsys, out, f"model.hf_path={tiny_hf_dir}")
    assert rc == 2 and err == [
        "ovlt iterate: error: iterate.prepare.pool_files[0]: /data/openvlthinker/pool.parquet does "
        "not exist (`ovlt data synth --out DIR --n 64` writes synthetic DIR/sft.jsonl and "
        "DIR/rl.parquet; `ovlt data check FILE` validates your own)"]
    pool = tmp_path / "pool.parquet"
    pool.write_bytes(b"x")
    rc, err = _iterate(capsys, out, f"model.hf_path={tiny_hf_dir}",
                       f"iterate.prepare.pool_files=[{pool}]")
    assert rc == 2 and len(err) == 1 and err[0].startswith(
        "ovlt iterate: error: eval.benchmarks[0].data: /data/eval/MathVista/testmini.parquet "
        "does not exist (the mathvista test split"), err
    assert not (tmp_path / "runs").exists()     # nothing written before the inputs are there


# a stage that raised SystemExit under torchrun, as its stage.log holds it (shortened)
PREPARE_LOG = """\
# 2026-12-07 23:08:25 python -m torch.distributed.run --standalone -m ovlt.iterate.stage_prepare
23:08:27 [rank0] WARNING __main__: pool/held-out files: 0 valid, 1 skipped
no usable records in ['/data/pool.parquet']
E1207 23:08:27.441000 15949 torch/distributed/elastic/multiprocessing/api.py:1002] failed \
(exitcode: 1) local_rank: 0 (pid: 15954) of binary: /usr/bin/python
Traceback (most recent call last):
  File "torch/distributed/run.py", line 1028, in main
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
"""


@pytest.mark.parametrize("log, want", [
    (PREPARE_LOG, "no usable records in ['/data/pool.parquet']"),
    # a trainer's own one-line error wins over whatever follows it (torchrun quotes it too)
    ("23:01 [rank0] INFO x\novlt sft: error: data.sft_files[0]: a.jsonl: record 3: no text\n"
     "E1207 23:08:27.441000 1 api.py:1002] failed (exitcode: 2)\n"
     "  traceback : ovlt sft: error: data.sft_files[0]: a.jsonl: record 3: no text\n",
     "ovlt sft: error: data.sft_files[0]: a.jsonl: record 3: no text"),
    ("", "(the log is empty)"),
])
def test_stage_error_line(log, want):
    assert stage_error(log) == want
