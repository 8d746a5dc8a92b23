"""LLM weights for the built-in engine without building the model: a bare module whose
`named_parameters()` are the mcore LLM names of a config (`ovlt.rollout.kv_decoder.params_module`)."""
from __future__ import annotations

import torch


def llm_params_module(cfg, init) -> torch.nn.Module:
    """The LLM parameters (`language_model.*`) of `cfg` at TP = PP = 1, each `init(name, shape)`
    in the order of `mcore_shapes`, as a bare module."""
    from ovlt.models.qwen2_5_vl.state_dict_adapter import mcore_shapes
    from ovlt.rollout.kv_decoder import params_module
    return params_module({name: init(name, shape)
                          for name, shape in mcore_shapes(cfg, 1, 1, 0).items()
                          if name.startswith("language_model.")})
