"""Engine selection (vLLM absent on CPU machines) and the vLLM prompt layout helper."""
import logging

import pytest
import torch

from ovlt.config import CONFIG_ROOT, load_config
from ovlt.rollout import make_engine, vllm_available
from ovlt.rollout.builtin import BuiltinEngine
from ovlt.rollout.vllm_engine import collapse_image_pads


def _module(cfg):
    """A bare module with the mcore LLM parameter names of the tiny config."""
    from ovlt.models.qwen2_5_vl.state_dict_adapter import mcore_shapes
    root = torch.nn.Module()
    for name, shape in mcore_shapes(cfg, 1, 1, 0).items():
        if not name.startswith("language_model."):
            continue
        *path, leaf = name.split(".")
        mod = root
        for p in path:
            if not hasattr(mod, p):
                mod.add_module(p, torch.nn.Module())
            mod = getattr(mod, p)
        mod.register_parameter(leaf, torch.nn.Parameter(torch.zeros(shape)))
    return root


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
