"""Launcher errors under torchrun: one readable line from rank 0, the other ranks quiet, exit
code non-zero, no traceback from any rank; an error only one rank hits is still reported (by
that rank, tagged); a bug keeps its traceback."""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]


def test_torchrun_bad_records_is_one_line_from_rank0(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{}\n{"messages": []}\n{"messages": [{"role": "user", "content": 1}]}\n')
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           str(ROOT / "launchers" / "sft.py"), "--config",
           str(ROOT / "configs" / "sft" / "tiny_cpu.yaml"), f"data.sft_files=[{bad}]",
           f"sft.train.save_dir={out}"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0
    ours = [ln for ln in p.stderr.splitlines() if "ovlt sft: error:" in ln
            and not ln.lstrip().startswith("traceback :")]  # torchrun's summary quotes it
    assert len(ours) == 1, p.stderr[-4000:]
    assert ours[0].startswith("ovlt sft: error: dataset has 0 usable samples")
    assert f"{bad}: record 0" in ours[0]
    # no worker traceback: any traceback frames are torchrun's own (torch/distributed)
    frames = re.findall(r'File "([^"]+)"', p.stderr)
    assert not [f for f in frames if "/ovlt/" in f or "/launchers/" in f], p.stderr[-4000:]
    assert "[rank 1/2]" not in "\n".join(ours)
    for r in (0, 1):  # every rank's log file keeps the full story
        log = (out / "logs" / f"rank{r}.log").read_text()
        assert "dataset has 0 usable samples" in log and "Traceback" in log


SCENARIOS = ("all", "rank1", "bug")


def _reporting_worker(rank, world):
    os.environ["OVLT_ERROR_GRACE_S"] = "3"
    import torch.distributed as dist

    from ovlt.distributed import ERROR_REPORTED_KEY, error_store, init_distributed, report_error
    from ovlt.errors import InputError
    init_distributed(None)
    results = []
    for scenario in SCENARIOS:
        buf = io.StringIO()
        code = None
        with contextlib.redirect_stderr(buf):
            if scenario == "all" or (scenario == "rank1" and rank == 1):
                code = report_error(InputError(f"data.bin: record {rank}: bad"), "ovlt test")
            elif scenario == "bug" and rank == 0:
                try:
                    {}["missing"]
                except KeyError as e:
                    code = report_error(e, "ovlt test")
        dist.barrier()  # rank 0 of "rank1" waits here, as it would in a collective
        if rank == 0:
            error_store().delete_key(ERROR_REPORTED_KEY)  # the next scenario starts afresh
        dist.barrier()
        results.append((code, buf.getvalue()))
    return results


def test_report_error_protocol():
    from tests.dist_utils import run_distributed
    r0, r1 = run_distributed(_reporting_worker, 2)
    (c0, e0), (c1, e1) = r0[0], r1[0]  # both hit it: rank 0 speaks, rank 1 stays quiet
    assert c0 == c1 == 1
    assert e0.strip() == "ovlt test: error: data.bin: record 0: bad" and e1 == ""
    (c0, e0), (c1, e1) = r0[1], r1[1]  # only rank 1 hit it: it reports, tagged
    assert c0 is None and c1 == 1 and e0 == ""
    assert e1.strip() == "[rank 1/2] ovlt test: error: data.bin: record 1: bad"
    (c0, e0), _ = r0[2], r1[2]  # a bug: its traceback, then the line
    assert c0 == 1 and "Traceback (most recent call last)" in e0
    assert e0.strip().splitlines()[-1] == "ovlt test: internal error (KeyError): missing"
