"""`sbatch launchers/iterate.sh` in a fake SLURM environment (tests/fake_slurm: `sbatch` runs the
script in a made-up 3-node allocation, `srun` records its argv + env and runs the stage program
locally as rank 0). Checks the srun/torchrun rendezvous arguments per stage, per-stage node
counts and log files, and the hostlist parser."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ovlt.iterate.runner import expand_nodelist

REPO = Path(__file__).resolve().parents[2]
FAKE = "tests/iterate_fakes/fake_stage.py"


@pytest.mark.parametrize("text,hosts", [
    ("gpu-07", ["gpu-07"]),
    ("gpu-[07-09]", ["gpu-07", "gpu-08", "gpu-09"]),
    ("n[1-2,10],big5", ["n1", "n2", "n10", "big5"]),
    ("a[001-002]-ib,b[9-11]", ["a001-ib", "a002-ib", "b9", "b10", "b11"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
])
def test_expand_nodelist(text, hosts):
    assert expand_nodelist(text) == hosts


def test_expand_nodelist_rejects_garbage():
    with pytest.raises(ValueError, match="unbalanced"):
        expand_nodelist("gpu[1-2")


def _sbatch(tmp_path, extra: str, *overrides):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"""defaults: [model/tiny.yaml]
sft: {{train: {{global_batch_size: 16, micro_batch_size: 1}}}}
grpo: {{train: {{global_batch_size: 48, micro_batch_size: 2}}}}
iterate:
  name: slurmfake
  out_dir: {tmp_path / 'runs'}
  rounds: 1
  program_prepare: {FAKE} prepare
  program_data: {FAKE} data
  program_sft: {FAKE} sft
  program_grpo: {FAKE} grpo
  program_eval: {FAKE} eval
  master_port: 31000
{extra}""")
    env = dict(os.environ, PATH=f"{REPO / 'tests' / 'fake_slurm'}{os.pathsep}{os.environ['PATH']}",
               FAKE_SLURM_NODELIST="gpu-[07-09]", FAKE_SLURM_NNODES="3", FAKE_SLURM_JOB_ID="4242",
               FAKE_SRUN_LOG=str(tmp_path / "srun.jsonl"), OVLT_PYTHON=sys.executable,
               SLURM_CPUS_PER_TASK="16",
               OMP_NUM_THREADS="1")
    return subprocess.run(["sbatch", "--nodes=3", "launchers/iterate.sh", str(cfg), *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _opt(argv: list[str], name: str, start: int = 0) -> str:
    vals = [a.split("=", 1)[1] for a in argv[start:] if a.startswith(f"--{name}=")]
    assert len(vals) == 1, (name, argv)
    return vals[0]


def test_sbatch_iterate_records_rendezvous_per_stage(tmp_path):
    p = _sbatch(tmp_path, """  nnodes_sft: 2
  nproc_sft: 8
  nnodes_grpo: 3
  nproc_grpo: 8
  nnodes_eval: 1
  nproc_eval: 4
""")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert "Submitted batch job 4242" in p.stdout
    rows = [json.loads(x) for x in (tmp_path / "srun.jsonl").read_text().splitlines()]
    expect = {  # stage -> (nnodes, nproc)
        "r0.prepare": (1, 1), "r0.eval": (1, 4), "r1.data": (1, 1),
        "r1.sft": (2, 8), "r1.grpo": (3, 8), "r1.eval": (1, 4)}
    hosts = ["gpu-07", "gpu-08", "gpu-09"]
    ports = set()
    run_dir = tmp_path / "runs" / "slurmfake"
    assert len(rows) == len(expect)
    for row, (sid, (n, nproc)) in zip(rows, expect.items()):
        a = row["argv"]
        t = a.index("torch.distributed.run")
        assert a[t - 2] == sys.executable and a[t - 1] == "-m"
        srun_opts = a[:t - 2]
        # srun: one task per node on the first n hosts of the allocation
        assert _opt(srun_opts, "nodes") == str(n) and _opt(srun_opts, "ntasks") == str(n)
        assert _opt(srun_opts, "ntasks-per-node") == "1"
        assert _opt(srun_opts, "nodelist") == ",".join(hosts[:n])
        assert _opt(srun_opts, "job-name") == f"ovlt-{sid}"
        assert _opt(srun_opts, "cpus-per-task") == "16"
        # torchrun: c10d rendezvous at the first host, this stage's width, a per-stage id
        assert _opt(a, "nnodes", t) == str(n)
        assert _opt(a, "nproc-per-node", t) == str(nproc)
        assert _opt(a, "rdzv-backend", t) == "c10d"
        host, port = _opt(a, "rdzv-endpoint", t).split(":")
        assert host == "gpu-07"
        ports.add(int(port))
        assert _opt(a, "rdzv-id", t) == f"4242-{sid}"
        # the stage program and its config file
        prog = a.index(str(REPO / FAKE))
        assert a[prog + 1] == sid.split(".")[1]
        assert a[prog + 2:prog + 4] == ["--config", str(run_dir / sid / "config.yaml")]
        # environment seen by srun: the allocation and this stage's kill token
        assert row["env"]["SLURM_JOB_NODELIST"] == "gpu-[07-09]"
        assert row["env"]["SLURM_JOB_ID"] == "4242"
        assert f":{sid}:1" in row["env"]["OVLT_STAGE_TOKEN"]
        # per-stage log: the exact command line heads it
        head = (run_dir / sid / "stage.log").read_text().splitlines()[0]
        assert head.startswith("# ") and f"--rdzv-id=4242-{sid}" in head and "srun " in head
    assert ports == set(range(31000, 31006))  # one rendezvous port per stage
    man = json.loads((run_dir / "manifest.json").read_text())
    assert [s["status"] for s in man["stages"].values()] == ["done"] * 6
    assert (run_dir / "report.md").exists()


def test_sbatch_refuses_bad_batch_for_a_stage_world_size(tmp_path):
    # 3 nodes x 8 = 24 GRPO ranks: global batch 48 = micro 2 x dp 24 is fine, 36 is not.
    p = _sbatch(tmp_path, "  nnodes_grpo: 3\n  nproc_grpo: 8\n", "grpo.train.global_batch_size=36")
    assert p.returncode == 2  # a config error
    assert ("r1.grpo: grpo.train.global_batch_size=36 must be a multiple of "
            "grpo.train.micro_batch_size=2 x data-parallel size 24") in p.stderr
    assert not (tmp_path / "runs" / "slurmfake" / "manifest.json").exists()


def test_sbatch_refuses_stage_wider_than_allocation(tmp_path):
    p = _sbatch(tmp_path, "  nnodes_grpo: 4\n")
    assert p.returncode == 1
    assert "r0.prepare" not in p.stderr  # refused before anything ran
    assert "r1.grpo: nnodes=4 but the allocation has 3 node(s): gpu-07,gpu-08,gpu-09" in p.stderr
