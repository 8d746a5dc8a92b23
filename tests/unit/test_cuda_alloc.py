"""`train.cuda_alloc_conf`: parsing and config errors, what "auto" resolves to (expandable
segments for SFT, PyTorch's default for GRPO), no expandable segments where vLLM's memory pool
may run, the environment winning, the per-step allocator figures, and on a GPU that the
settings take effect at run time."""
import importlib.util
import logging

import pytest
import torch

from ovlt.config import CONFIG_ROOT, ConfigError, load_config
from ovlt.utils import cuda_alloc
from ovlt.utils.cuda_alloc import (EXPANDABLE, AllocatorMeter, apply_alloc_conf, may_host_vllm,
                                   parse_alloc_conf, resolve_alloc_conf)


def test_parse_reads_key_value_pairs():
    assert parse_alloc_conf("expandable_segments:True") == {"expandable_segments": "True"}
    assert parse_alloc_conf(" max_split_size_mb:512 , garbage_collection_threshold:0.8") == {
        "max_split_size_mb": "512", "garbage_collection_threshold": "0.8"}
    assert parse_alloc_conf("auto") == {} and parse_alloc_conf("") == {}


@pytest.mark.parametrize("text, words", [
    ("expandable_segments", ["'expandable_segments'", "key:value"]),
    ("expandable_segment:True", ["unknown key 'expandable_segment'", "expandable_segments"]),
    ("expandable_segments:yes", ["expandable_segments takes True or False", "'yes'"]),
    ("backend:cuda", ["backend takes native or cudaMallocAsync"]),
    ("max_split_size_mb:64,max_split_size_mb:128", ["max_split_size_mb given twice"]),
    ("max_split_size_mb:", ["'max_split_size_mb:'", "key:value"]),
])
def test_parse_names_the_bad_item(text, words):
    with pytest.raises(ValueError) as e:
        parse_alloc_conf(text)
    for w in words:
        assert w in str(e.value)


def test_auto_is_expandable_segments_for_sft_and_the_default_for_grpo():
    assert resolve_alloc_conf("auto", "sft") == EXPANDABLE
    assert resolve_alloc_conf("auto", "grpo", hosts_vllm=False) == ""
    assert resolve_alloc_conf("auto", "grpo", hosts_vllm=True) == ""
    assert resolve_alloc_conf("", "sft") == ""
    assert resolve_alloc_conf("max_split_size_mb:256", "grpo", hosts_vllm=True) == \
        "max_split_size_mb:256"
    assert resolve_alloc_conf(EXPANDABLE, "grpo", hosts_vllm=False) == EXPANDABLE
    assert resolve_alloc_conf("expandable_segments:False", "grpo", True) == \
        "expandable_segments:False"
    with pytest.raises(ValueError, match="pytorch#147851"):
        resolve_alloc_conf("max_split_size_mb:256,expandable_segments:True", "grpo", True)


def test_which_processes_may_host_vllm(monkeypatch):
    assert not may_host_vllm("sft", "vllm")  # the SFT trainer never starts a rollout engine
    assert not may_host_vllm("grpo", "builtin")
    assert may_host_vllm("grpo", "vllm")
    real = importlib.util.find_spec
    for installed in (True, False):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
            object() if installed else None) if name == "vllm" else real(name, *a))
        assert may_host_vllm("grpo", "auto") is installed


def test_config_errors_name_the_key():
    path = CONFIG_ROOT / "sft" / "tiny_cpu.yaml"
    assert load_config(path).sft.train.cuda_alloc_conf == "auto"
    two = "max_split_size_mb:512,expandable_segments:True"  # a comma in a key=value override
    assert load_config(path, [f"sft.train.cuda_alloc_conf={two}"]).sft.train.cuda_alloc_conf == two
    with pytest.raises(ConfigError, match=r"sft\.train\.cuda_alloc_conf=.*unknown key "
                                          r"'expandable_segment'"):
        load_config(path, ["sft.train.cuda_alloc_conf=expandable_segment:True"])
    with pytest.raises(ConfigError, match=r"grpo\.train\.cuda_alloc_conf=.*vLLM"):
        load_config(CONFIG_ROOT / "grpo" / "tiny_cpu.yaml",
                    ["grpo.train.cuda_alloc_conf=expandable_segments:True", "rollout.engine=vllm"])
    # the built-in engine has no memory pool: expandable segments are fine there
    cfg = load_config(CONFIG_ROOT / "grpo" / "tiny_cpu.yaml",
                      ["grpo.train.cuda_alloc_conf=expandable_segments:True",
                       "rollout.engine=builtin"])
    assert cfg.grpo.train.cuda_alloc_conf == EXPANDABLE


@pytest.fixture
def fake_cuda(monkeypatch):
    """A CUDA machine as far as `apply_alloc_conf` looks; records what reaches the allocator."""
    applied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda_alloc, "set_allocator_settings", applied.append)
    for k in cuda_alloc.ENV_VARS:
        monkeypatch.delenv(k, raising=False)
    return applied


def test_apply_sets_the_resolved_settings(fake_cuda):
    assert apply_alloc_conf("auto", "sft") == EXPANDABLE
    assert apply_alloc_conf("auto", "grpo") == ""
    assert apply_alloc_conf("", "sft") == ""
    assert apply_alloc_conf("max_split_size_mb:512", "grpo", True) == "max_split_size_mb:512"
    assert fake_cuda == [EXPANDABLE, "max_split_size_mb:512"]  # "" leaves torch's default


def test_the_environment_wins_over_the_config(fake_cuda, monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "garbage_collection_threshold:0.6")
    assert apply_alloc_conf("auto") == "garbage_collection_threshold:0.6"
    assert fake_cuda == []  # torch read the variable itself


def test_apply_does_nothing_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cuda_alloc, "set_allocator_settings",
                        lambda c: pytest.fail("no allocator to configure"))
    assert apply_alloc_conf("auto") is None


def test_grpo_launcher_refuses_expandable_segments_where_vllm_is_installed(
        tmp_path, monkeypatch, capsys):
    """rollout.engine=auto picks vLLM when it is installed: the launcher stops with a config
    error before any process group or model exists."""
    from launchers._job import run_job
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "vllm" else real(name, *a))
    for k in cuda_alloc.ENV_VARS:
        monkeypatch.delenv(k, raising=False)
    from ovlt.data.synth import generate
    generate(tmp_path / "synth", n=2, seed=0)  # inputs that pass the launcher's checks
    rc = run_job("grpo", str(CONFIG_ROOT / "grpo" / "tiny_cpu.yaml"),
                 ["grpo.train.cuda_alloc_conf=expandable_segments:True", "rollout.engine=auto",
                  f"data.rl_files=[{tmp_path / 'synth' / 'rl.parquet'}]",
                  f"grpo.train.save_dir={tmp_path / 'run'}"],
                 run=lambda cfg: pytest.fail("must not run"))
    assert rc == 2
    err = capsys.readouterr().err
    assert "grpo.train.cuda_alloc_conf" in err and "pytorch#147851" in err


def test_allocator_meter_gives_retries_and_reserved_peak_per_interval(caplog):
    GiB = 2 ** 30
    stats = iter([{"num_alloc_retries": 3, "reserved_bytes.all.peak": 10 * GiB},   # at start
                  {"num_alloc_retries": 3, "reserved_bytes.all.peak": 12 * GiB},
                  {"num_alloc_retries": 5, "reserved_bytes.all.peak": 12.5 * GiB},
                  {"num_alloc_retries": 9, "reserved_bytes.all.peak": 11 * GiB}])
    meter = AllocatorMeter("cuda:0", stats=lambda: next(stats))
    with caplog.at_level(logging.INFO, logger=cuda_alloc.log.name):
        assert meter.read() == {"mem_reserved_gb": 12.0, "alloc_retries": 0}
        assert not caplog.records
        assert meter.read() == {"mem_reserved_gb": 12.5, "alloc_retries": 2}
        assert meter.read() == {"mem_reserved_gb": 11.0, "alloc_retries": 4}
    warned = [r for r in caplog.records if "cudaMalloc retries" in r.getMessage()]
    assert len(warned) == 1 and "2 cudaMalloc retries" in warned[0].getMessage()


def test_allocator_meter_from_process_start_counts_retries_before_it_was_made():
    """The trainer's meter is made at the first log line: retries of the model build and the
    first steps (3 here, already in the counter) belong to that line, not to nobody."""
    stats = iter([{"num_alloc_retries": 3}, {"num_alloc_retries": 4}])
    meter = AllocatorMeter("cuda:0", stats=lambda: next(stats), from_process_start=True)
    assert meter.read()["alloc_retries"] == 3
    assert meter.read()["alloc_retries"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_settings_take_effect_at_run_time_on_a_gpu():
    """What the launcher and the benchmark rely on: after `set_allocator_settings` (and
    `empty_cache`), new memory comes from segments of the kind asked for."""
    def segment_of(t):
        ptr = t.data_ptr()
        for seg in torch.cuda.memory_snapshot():
            if seg["address"] <= ptr < seg["address"] + seg["total_size"]:
                return seg
        raise AssertionError("tensor not in any segment")

    try:
        for expandable in (True, False, True):
            torch.cuda.empty_cache()
            cuda_alloc.set_allocator_settings(f"expandable_segments:{expandable}")
            t = torch.empty(64 * 2 ** 20, dtype=torch.uint8, device="cuda")
            assert segment_of(t)["is_expandable"] is expandable
            del t
    finally:
        torch.cuda.empty_cache()
        cuda_alloc.set_allocator_settings("expandable_segments:False")
    before = cuda_alloc.allocator_counters("cuda")
    assert set(before) == set(cuda_alloc.COUNTERS)
    x = torch.empty(32 * 2 ** 20, dtype=torch.uint8, device="cuda")
    after = cuda_alloc.allocator_counters("cuda")
    assert after["num_device_alloc"] == before["num_device_alloc"] + 1  # a fresh segment
    del x
