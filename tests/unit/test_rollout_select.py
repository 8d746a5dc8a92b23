"""Engine selection (vLLM absent on CPU machines) and the vLLM prompt layout helper."""
import logging

import pytest
import torch

from ovlt.config import CONFIG_ROOT, load_config
from ovlt.rollout import make_engine, vllm_available
from ovlt.rollout.builtin import BuiltinEngine
from ovlt.rollout.vllm_engine import collapse_image_pads
from tests.rollout_testlib import llm_params_module


def _module(cfg):
    """A bare module with the mcore LLM parameter names of the tiny config."""
    return llm_params_module(cfg, lambda name, shape: torch.zeros(shape))


@pytest.mark.skipif(vllm_available(), reason="vLLM installed here")
def test_make_engine_falls_back_to_builtin(caplog):
    cfg = load_config(CONFIG_ROOT / "grpo" / "tiny_cpu.yaml", ["rollout.engine=auto"])
    wrapped = torch.nn.Module()
    wrapped.module = _module(cfg.model)  # a DDP-like wrapper is unwrapped
    with caplog.at_level(logging.INFO):
        eng = make_engine(cfg, model=wrapped)
    assert isinstance(eng, BuiltinEngine) and eng.model is wrapped.module
    cfg = load_config(CONFIG_ROOT / "grpo" / "tiny_cpu.yaml", ["rollout.engine=vllm"])
    with pytest.raises(RuntimeError, match="vllm does not import"):
        make_engine(cfg, model=wrapped)
    with pytest.raises(ValueError, match="needs the trainer's model"):
        make_engine(load_config(CONFIG_ROOT / "grpo" / "tiny_cpu.yaml"))


def test_collapse_image_pads():
    P = 151655
    ids = [1, 151652, P, P, P, 151653, 7, 151652, P, P, 151653]
    assert collapse_image_pads(ids, P) == [1, 151652, P, 151653, 7, 151652, P, 151653]
    assert collapse_image_pads([P], P) == [P] and collapse_image_pads([], P) == []
