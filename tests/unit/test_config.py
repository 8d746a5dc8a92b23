"""Config loader: presets load, overrides apply, and bad input fails with a message naming the key."""
import textwrap

import pytest

from ovlt.config import CONFIG_ROOT, ConfigError, load_config


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


@pytest.mark.parametrize("preset,layers,hidden,tied", [
    ("qwen2_5_vl_7b", 28, 3584, False), ("qwen2_5_vl_3b", 36, 2048, True),
    ("qwen2_5_vl_32b", 64, 5120, False), ("tiny", 4, 64, True)])
def test_model_presets(preset, layers, hidden, tied):
    cfg = load_config(CONFIG_ROOT / "model" / f"{preset}.yaml")
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.tie_word_embeddings) == (layers, hidden, tied)
    # head dim 128 = 2 * sum(mrope_section) for the real sizes
    assert 2 * sum(cfg.model.mrope_section) == cfg.model.hidden_size // cfg.model.num_attention_heads


def test_every_shipped_yaml_validates():
    files = sorted(CONFIG_ROOT.rglob("*.yaml"))
    assert files
    for f in files:
        if f.parent.name == "data":  # dataset registries, not job configs
            continue
        load_config(f)


def test_defaults_and_overrides(tmp_path):
    p = write(tmp_path, """
        defaults: [model/tiny.yaml]
        sft: {train: {global_batch_size: 8}}
    """)
    cfg = load_config(p, ["sft.train.micro_batch_size=2", "parallel.tensor_parallel=2",
                          "sft.optimizer.lr=3e-5", "data.sft_files=[a.jsonl, b.jsonl]",
                          "model.vision.depth=2"], world_size=4)
    assert cfg.model.hidden_size == 64
    assert cfg.sft.train.global_batch_size == 8 and cfg.sft.train.micro_batch_size == 2
    assert cfg.parallel.tensor_parallel == 2
    assert cfg.sft.optimizer.lr == pytest.approx(3e-5)
    assert cfg.data.sft_files == ["a.jsonl", "b.jsonl"]
    assert cfg.model.vision.depth == 2


def test_int_is_accepted_for_float():
    cfg = load_config(None, ["sft.optimizer.lr=1"])
    assert cfg.sft.optimizer.lr == 1.0 and isinstance(cfg.sft.optimizer.lr, float)


BAD_CASES = [
    # (yaml text or None, overrides, world_size, fragment expected in the message)
    ("model: {hiden_size: 10}\n", [], None, "model.hiden_size: unknown key"),
    ("modle: {}\n", [], None, "modle: unknown key in top level"),
    ("model: {num_layers: four}\n", [], None, "model.num_layers: expected an integer"),
    ("model: {num_layers: 2.5}\n", [], None, "model.num_layers: expected an integer"),
    ("model: {transformer_impl: tensorrt}\n", [], None, "allowed values: 'auto', 'te', 'local'"),
    ("model: [1, 2]\n", [], None, "model: expected a mapping"),
    ("- just\n- a list\n", [], None, "top level must be a mapping"),
    ("model: {vision: {depth: 2}\n", [], None, "invalid YAML"),
    (None, ["parallel.tensor_parallel=3"], None, "must divide model.num_attention_heads"),
    (None, ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"], 6, "not divisible"),
    (None, ["sft.train.global_batch_size=32", "sft.train.micro_batch_size=3"], 1, "must be a multiple"),
    (None, ["sft.train.freeze=[vision, eyes]"], None, "'eyes' not allowed"),
    (None, ["rollout.top_p=1.5"], None, "rollout.top_p=1.5"),
    (None, ["sft.train.recompute=yes"], None, "sft.train.recompute"),
    (None, ["data.min_pixels=1000000", "data.max_pixels=10"], None, "data.min_pixels"),
    (None, ["parallel.sequence_parallel=true"], None, "needs parallel.tensor_parallel > 1"),
    (None, ["novalue"], None, "expected key.sub=value"),
    (None, ["grpo.kl_type=k9"], None, "grpo.kl_type"),
    (None, ["grpo.train.export_hf=maybe"], None, "expected true/false"),
    (None, ["sft.train.lm_head_chunk_mib=-1"], None, "sft.train.lm_head_chunk_mib=-1: must be >= 0"),
    (None, ["model.fp8_amax_history=2"], None, "model.fp8_amax_history=2: must be >= 3"),
    (None, ["model.fp8=scaled_mm_later"], None, "model.fp8"),
    ("defaults: [model/nope.yaml]\n", [], None, "defaults entry 'model/nope.yaml' not found"),
]


@pytest.mark.parametrize("text,overrides,world_size,fragment", BAD_CASES)
def test_bad_config_is_rejected_with_named_key(tmp_path, text, overrides, world_size, fragment):
    path = write(tmp_path, text) if text is not None else None
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides, world_size=world_size)
    assert fragment in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


def test_circular_defaults(tmp_path):
    write(tmp_path, "defaults: [b.yaml]\n", "a.yaml")
    write(tmp_path, "defaults: [a.yaml]\n", "b.yaml")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.yaml")


def test_grpo_refuses_padded_vocab_rows():
    from ovlt.config import require_unpadded_vocab
    ok = load_config(CONFIG_ROOT / "model" / "tiny.yaml", ["parallel.tensor_parallel=2"])
    require_unpadded_vocab(ok)  # 151936 splits over TP=2 with no padding
    bad = load_config(CONFIG_ROOT / "model" / "tiny.yaml",
                      ["parallel.tensor_parallel=2", "model.make_vocab_size_divisible_by=128"])
    with pytest.raises(ConfigError, match="model.make_vocab_size_divisible_by"):
        require_unpadded_vocab(bad)


def test_launcher_checks_only_its_own_batch_size():
    ov = ["sft.train.global_batch_size=6", "grpo.train.global_batch_size=8"]
    load_config(None, ov, world_size=4, trainers=("grpo",))  # SFT's 6 is not GRPO's concern
    with pytest.raises(ConfigError, match="sft.train.global_batch_size=6"):
        load_config(None, ov, world_size=4, trainers=("sft",))


def test_min_verified_above_the_samples_is_refused():
    with pytest.raises(ConfigError, match=r"iterate.filter.min_verified=3 exceeds "
                                          r"iterate.self_answer.samples=2"):
        load_config(CONFIG_ROOT / "iterate" / "tiny_cpu.yaml", ["iterate.filter.min_verified=3"])
    with pytest.raises(ConfigError, match=r"iterate.filter.min_verified"):
        load_config(CONFIG_ROOT / "iterate" / "tiny_cpu.yaml", ["iterate.filter.min_verified=0"])
