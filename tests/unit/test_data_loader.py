"""Datasets/loaders over synthetic data: per-step plans consistent across DP ranks, worker
processes give the same batches as in-process loading, decode failures are counted skips."""
import os

import pytest
from PIL import Image

from ovlt.data.chat_template import encode_sft
from ovlt.data.datasets import (SFTDataset, SFTLoader, step_plans)
from ovlt.data.formats import read_sft
from ovlt.data.image_processing import preprocess
from ovlt.data.synth import generate


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth_loader")
    generate(d, 24, seed=21)
    return d


def _key(b):
    return (b.input_ids.tolist(), b.cu_seqlens.tolist(), b.sample_ids,
            None if b.pixel_values is None else b.pixel_values.sum().item())


def test_sft_loader_dp_plan_and_workers(synth_dir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ds = SFTDataset(list(read_sft(synth_dir / "sft.jsonl")), max_length=2048,
                    min_pixels=3136, max_pixels=112 * 112)
    assert len(ds) == 24 and ds.report.num_skipped == 0
    budget = 640
    per_rank = []
    for rank in range(2):
        loader = SFTLoader(ds, global_batch_size=8, token_budget=budget, dp_rank=rank, dp_size=2,
                           num_workers=0, seed=1)
        per_rank.append(list(loader))
    assert len(per_rank[0]) == len(per_rank[1]) == 3
    by_id = {r.id: r for r in ds.records}
    for step in range(3):
        r0, r1 = per_rank[0][step], per_rank[1][step]
        assert len(r0) == len(r1)                                   # same micro-batch count
        ids0 = {i for b in r0 for i in b.sample_ids}
        ids1 = {i for b in r1 for i in b.sample_ids}
        assert not ids0 & ids1 and len(ids0 | ids1) == 8
        for b in r0 + r1:
            assert b.num_tokens <= budget
            assert b.pixel_values.shape[0] == int(b.image_grid_thw.prod(-1).sum())
            # each packed sample is exactly the sample encoded on its own
            for k, sid in enumerate(b.sample_ids):
                a, e = b.cu_seqlens[k].item(), b.cu_seqlens[k + 1].item()
                rec = by_id[sid]
                grid = preprocess(Image.open(rec.images[0]), 3136, 112 * 112)[1]
                ids, _ = encode_sft(rec.messages, [grid])
                assert b.input_ids[0, a:e].tolist() == ids
    # the epoch covers each sample once (24 = 3 steps x 8)
    seen = [i for r in per_rank for step in r for b in step for i in b.sample_ids]
    assert sorted(seen) == sorted(by_id)
    # a worker process produces identical batches
    w = list(SFTLoader(ds, 8, budget, dp_rank=1, dp_size=2, num_workers=1, seed=1))
    assert [[_key(b) for b in s] for s in w] == [[_key(b) for b in s] for s in per_rank[1]]
    # another epoch reshuffles
    loader = SFTLoader(ds, 8, budget, dp_rank=0, dp_size=2, num_workers=0, seed=1)
    loader.set_epoch(1)
    assert [b.sample_ids for b in next(iter(loader))] != [b.sample_ids for b in per_rank[0][0]]


def test_step_plans_deterministic():
    lengths = [100 + 13 * i % 400 for i in range(40)]
    a = step_plans(lengths, 16, 4, 512, seed=0, epoch=0)
    assert a == step_plans(lengths, 16, 4, 512, seed=0, epoch=0)
    assert len(a) == 2 and all(len(p) == 4 for p in a)


def test_decode_failure_in_worker_is_a_counted_skip(tmp_path):
    generate(tmp_path, 6, seed=2)
    recs = list(read_sft(tmp_path / "sft.jsonl"))
    ds = SFTDataset(recs, max_length=2048, max_pixels=112 * 112)
    assert len(ds) == 6
    # Truncate one image after the dataset was built: header still readable, pixels not.
    victim = ds.records[0]
    data = open(victim.images[0], "rb").read()
    open(victim.images[0], "wb").write(data[:len(data) // 2])
    steps = list(SFTLoader(ds, 6, 4096, num_workers=0, seed=0))
    batches = steps[0]
    skipped = [s for b in batches for s in b.skipped]
    assert len(skipped) == 1 and skipped[0][0] == victim.id and "corrupt" in skipped[0][3]
    assert sum(len(b.sample_ids) for b in batches) == 5


def test_over_length_skipped_at_build(synth_dir):
    recs = list(read_sft(synth_dir / "sft.jsonl"))
    ds = SFTDataset(recs, max_length=120, max_pixels=112 * 112)
    assert len(ds) + ds.report.num_skipped == 24 and ds.report.num_skipped > 0
    assert all(s.reason.startswith("over-length") for s in ds.report.skips)
    assert all(L <= 120 for L in ds.lengths)
    assert ds.report.valid == len(ds)


def test_builders_from_config(synth_dir, tmp_path):
    from ovlt.config import DataConfig
    from ovlt.data.datasets import build_sft_loader, read_records
    reg = tmp_path / "reg.yaml"
    reg.write_text(f"sources:\n  - {{name: extra, files: [{synth_dir}/rl.parquet], weight: 0.5,"
                   f" difficulty: hard}}\n")
    cfg = DataConfig(sft_files=[str(synth_dir / "sft.jsonl")],
                     rl_files=[str(synth_dir / "rl.parquet")], registry=str(reg),
                     max_pixels=112 * 112, max_length=1024, pack_tokens=1024, num_workers=0)
    loader = build_sft_loader(cfg, global_batch_size=8)
    assert len(loader) == 3 and loader.budget == 1024
    assert all(b.num_tokens <= 1024 for b in next(iter(loader)))
    rl = read_records(cfg, "rl")
    assert len(rl) == 24 + 12                      # files + half of the registry source
    assert sum(r.source == "extra" for r in rl) == 12
    only = read_records(cfg, "rl", files=[str(synth_dir / "rl.parquet")])
    assert len(only) == 24


def test_iter_epoch_resumes_mid_epoch(synth_dir):
    ds = SFTDataset(list(read_sft(synth_dir / "sft.jsonl")), max_pixels=112 * 112)
    loader = SFTLoader(ds, 8, 2048, num_workers=0, seed=4)
    full = [[b.sample_ids for b in step] for step in loader.iter_epoch(2)]
    tail = [[b.sample_ids for b in step] for step in loader.iter_epoch(2, first_step=1)]
    assert len(full) == 3 and tail == full[1:]
