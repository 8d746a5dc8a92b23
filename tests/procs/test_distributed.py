"""ovlt.distributed: launcher env parsing, a 4-process gloo TP=2 x PP=2 layout, collectives,
the gloo group copies as mcore's optimizer is told of them, seeding through mcore's TP RNG
tracker (CPU shim)."""
import pytest
import torch

from ovlt.distributed import DistributedError, first_slurm_host, read_launch_env
from tests.dist_utils import run_distributed


def test_torchrun_env_wins_over_slurm():
    le = read_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
                          "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    assert (le.rank, le.world_size, le.local_rank, le.master_addr, le.master_port, le.source) == \
        (3, 8, 1, "n1", 1234, "torchrun")


def test_slurm_env():
    le = read_launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                          "SLURM_JOB_NODELIST": "gpu[003-005,9]", "SLURM_JOB_ID": "4242"})
    assert (le.rank, le.world_size, le.local_rank, le.master_addr, le.source) == \
        (5, 16, 1, "gpu003", "slurm")
    assert le.master_port == 20000 + 4242


def test_single_process_and_bad_env():
    assert read_launch_env({}).source == "single"
    assert first_slurm_host("node7") == "node7"
    assert first_slurm_host("a[10-12],b1") == "a10"
    with pytest.raises(DistributedError, match="torchrun"):
        read_launch_env({"RANK": "x", "WORLD_SIZE": "2"})


def _layout_worker(rank, world):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    from ovlt.config import ParallelConfig
    from ovlt.distributed import destroy_distributed, has_gloo_group_copies, init_distributed
    info = init_distributed(ParallelConfig(tensor_parallel=2, pipeline_parallel=2,
                                           timeout_minutes=1.0), seed=7)
    try:  # what mcore's optimizer is told (use_gloo_process_groups) must match what was built
        ps.get_data_parallel_group_gloo(with_context_parallel=True, partial_data_parallel=True)
        built = True
    except AssertionError:
        built = False
    out = dict(info=(info.tp, info.pp, info.dp, info.cp),
               tp=torch.distributed.get_process_group_ranks(ps.get_tensor_model_parallel_group()),
               pp=torch.distributed.get_process_group_ranks(ps.get_pipeline_model_parallel_group()),
               dp=torch.distributed.get_process_group_ranks(ps.get_data_parallel_group()),
               tp_rank=ps.get_tensor_model_parallel_rank(),
               pp_rank=ps.get_pipeline_model_parallel_rank(),
               gloo_copies=(has_gloo_group_copies(), built))
    # all-reduce inside the TP group
    t = torch.tensor([float(rank + 1)])
    torch.distributed.all_reduce(t, group=ps.get_tensor_model_parallel_group())
    out["tp_sum"] = float(t)
    # send/recv along the pipeline: first stage sends, last receives
    if ps.is_pipeline_first_stage():
        torch.distributed.send(torch.arange(4.0) * (rank + 1), dst=ps.get_pipeline_model_parallel_next_rank())
    else:
        buf = torch.empty(4)
        torch.distributed.recv(buf, src=ps.get_pipeline_model_parallel_prev_rank())
        out["recv"] = buf.tolist()
    # seeding: default stream equal on all ranks, TP stream differs by TP rank
    out["default"] = torch.rand(3).tolist()
    with get_cuda_rng_tracker().fork():
        out["tp_stream"] = torch.rand(3).tolist()
    out["after_fork"] = torch.rand(1).tolist()  # the fork must not consume the default stream
    torch.distributed.barrier()
    destroy_distributed()
    return out


@pytest.mark.slow
def test_tp2_pp2_groups_and_collectives():
    res = run_distributed(_layout_worker, 4, timeout=120)
    # mcore order tp-cp-ep-dp-pp: TP pairs are adjacent ranks, PP strides by tp, DP is trivial.
    expect_tp = {0: [0, 1], 1: [0, 1], 2: [2, 3], 3: [2, 3]}
    expect_pp = {0: [0, 2], 1: [1, 3], 2: [0, 2], 3: [1, 3]}
    for r, o in enumerate(res):
        assert o["info"] == (2, 2, 1, 1)
        assert o["tp"] == expect_tp[r] and o["pp"] == expect_pp[r] and o["dp"] == [r]
        assert (o["tp_rank"], o["pp_rank"]) == (r % 2, r // 2)
        assert o["gloo_copies"] == (False, False)  # gloo backend: the main groups serve
        assert o["tp_sum"] == sum(x + 1 for x in expect_tp[r])
    assert res[2]["recv"] == [0.0, 1.0, 2.0, 3.0]          # from rank 0
    assert res[3]["recv"] == [0.0, 2.0, 4.0, 6.0]          # from rank 1
    g = torch.Generator().manual_seed(7)
    ref_default = torch.rand(3, generator=g).tolist()
    for o in res:
        assert o["default"] == pytest.approx(ref_default)
    # mcore: TP stream seed = seed + 2718 + tp_rank
    for r, o in enumerate(res):
        ref = torch.rand(3, generator=torch.Generator().manual_seed(7 + 2718 + r % 2)).tolist()
        assert o["tp_stream"] == pytest.approx(ref)
    assert res[0]["tp_stream"] != res[1]["tp_stream"]
    g = torch.Generator().manual_seed(7)
    torch.rand(3, generator=g)
    assert res[0]["after_fork"] == pytest.approx(torch.rand(1, generator=g).tolist())


def _bad_world_worker(rank, world):
    from ovlt.config import ParallelConfig
    from ovlt.distributed import init_distributed
    try:
        init_distributed(ParallelConfig(tensor_parallel=2, pipeline_parallel=2))
    except DistributedError as e:
        return str(e)
    return "no error"


@pytest.mark.slow
def test_indivisible_world_is_a_rank_tagged_error():
    res = run_distributed(_bad_world_worker, 2, timeout=60)
    assert res[0].startswith("[rank 0/2]") and "not divisible" in res[0]
    assert res[1].startswith("[rank 1/2]")
