"""`data.registry` reaches the trainers: SFT's dataset and GRPO's prompt stream read its sources
beside data.{sft,rl}_files, and a GRPO curriculum stage without files of its own takes the
records of its difficulty."""
from __future__ import annotations

import pytest

from ovlt.config import CONFIG_ROOT, load_config
from ovlt.data.formats import DataError, read_registry, read_rl, read_sft


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from ovlt.data.synth import generate
    d = tmp_path_factory.mktemp("synth")
    generate(d, n=24, seed=3)
    return d


def _registry(tmp_path, synth, rl_difficulty=""):
    reg = tmp_path / "reg.yaml"
    extra = f", difficulty: {rl_difficulty}" if rl_difficulty else ""
    reg.write_text("sources:\n"
                   f"  - {{name: s, kind: sft, files: [{synth}/sft.jsonl], weight: 0.5}}\n"
                   f"  - {{name: r, kind: rl, files: [{synth}/rl.parquet]{extra}}}\n")
    return reg


def _cfg(trainer, *overrides):
    return load_config(CONFIG_ROOT / trainer / "tiny_cpu.yaml", list(overrides))


def test_sft_dataset_reads_the_registry(synth, tmp_path):
    from ovlt.sft.data import build_sft_dataset
    reg = _registry(tmp_path, synth)
    want = [r.id for r in read_registry(reg, "sft", seed=1234)]
    assert len(want) == 12                                   # half of 24
    ds = build_sft_dataset(_cfg("sft", f"data.registry={reg}", "data.seed=1234").data)
    assert [r.id for r in ds.records] == want
    both = build_sft_dataset(_cfg("sft", f"data.registry={reg}", "data.seed=1234",
                                  f"data.sft_files=[{synth / 'sft.jsonl'}]").data)
    files = [r.id for r in read_sft(synth / "sft.jsonl")]
    assert [r.id for r in both.records] == files + want      # files first, then the registry


def test_grpo_stages_from_the_registry(synth, tmp_path):
    from ovlt.grpo.data import PromptStream
    reg = _registry(tmp_path, synth)
    rows = list(read_rl(synth / "rl.parquet"))
    stream = PromptStream(_cfg("grpo", f"data.registry={reg}"), prompts_per_step=4)
    assert [st.name for st in stream.stages] == ["all"]
    assert sorted(r.id for r in stream.records[0]) == sorted(r.id for r in rows)
    assert str(reg) in stream.sources()

    # a curriculum without files: each stage takes its difficulty's rows (data.rl_files here)
    stages = ("grpo.curriculum=[{name: medium, epochs: 1.0}, {name: hard, epochs: 1.0}]")
    stream = PromptStream(_cfg("grpo", stages, f"data.rl_files=[{synth / 'rl.parquet'}]"), 4)
    for st, recs in zip(stream.stages, stream.records):
        want = sorted(r.id for r in rows if r.difficulty == st.name)
        assert want and sorted(r.id for r in recs) == want, st.name

    # a registry source's `difficulty:` fills rows that have none; a stage nothing matches
    # is refused naming what there is
    plain = tmp_path / "plain.parquet"
    import pyarrow.parquet as pq
    t = pq.read_table(synth / "rl.parquet").drop(["difficulty"])
    pq.write_table(t, plain)
    reg2 = tmp_path / "reg2.yaml"
    reg2.write_text(f"sources:\n  - {{name: r, kind: rl, files: [{plain}], difficulty: hard}}\n")
    stream = PromptStream(_cfg("grpo", "grpo.curriculum=[{name: hard, epochs: 1.0}]",
                               f"data.registry={reg2}"), 4)
    assert len(stream.records[0]) == len(rows)
    with pytest.raises(DataError, match=r"stage 'medium' has no rl_files and none of the 24 "
                                        r"records .* difficulty 'medium' \(found: \['hard'\]\)"):
        PromptStream(_cfg("grpo", "grpo.curriculum=[{name: medium, epochs: 1.0}]",
                          f"data.registry={reg2}"), 4)
