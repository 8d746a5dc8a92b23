"""Build the generation engine for `eval run` from a model directory.

`--model DIR` is an HF Qwen2.5-VL directory (config.json + safetensors: the base model or a
round's exported checkpoint). The model shape comes from its config.json; runtime settings
(dtype, layer implementation, attention backend) from the job config. vLLM reads the directory
itself; the built-in engine gets an mcore model built for this process (single process, TP=PP=1
unless launched with torchrun) with the directory's weights loaded through the state-dict adapter.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from ovlt.logging import get_logger

logger = get_logger(__name__)

# ModelConfig fields that describe how to run the model, not its shape: kept from the job config.
RUNTIME_FIELDS = ("params_dtype", "transformer_impl", "attention_backend", "fp8")


def model_config_for(model_dir: str, base_cfg):
    """The job's ModelConfig with the shape of `model_dir`'s config.json."""
    from ovlt.models.qwen2_5_vl.hf_config import from_hf_config
    shape = from_hf_config(model_dir)
    keep = {f: getattr(base_cfg, f) for f in RUNTIME_FIELDS}
    return dataclasses.replace(shape, hf_path=str(model_dir), **keep)


def build_engine(model_dir: str, engine: str = "auto", cfg=None):
    """`engine`: auto | vllm | builtin. `cfg`: a JobConfig (None = defaults)."""
    import torch

    from ovlt.config import JobConfig
    from ovlt.data.tokenizer import load_tokenizer
    from ovlt.rollout import make_engine, vllm_available
    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (eval run needs an HF model "
                                f"directory; export an mcore checkpoint with `ovlt convert mcore2hf`)")
    from ovlt.models.qwen2_5_vl.checkpoint_io import HFCheckpointReader
    HFCheckpointReader(model_dir).close()  # a Qwen2.5-VL in safetensors (never a pickle), early
    cfg = copy.deepcopy(cfg) if cfg is not None else JobConfig()
    cfg.model = model_config_for(model_dir, cfg.model)
    cfg.rollout.engine = engine
    tokenizer = load_tokenizer()
    if engine in ("auto", "vllm") and vllm_available():
        return make_engine(cfg, tokenizer=tokenizer)
    if not torch.cuda.is_available() and cfg.model.params_dtype != "fp32":
        logger.info("no GPU: running the built-in engine in fp32 (params_dtype=%s ignored)",
                    cfg.model.params_dtype)
        cfg.model.params_dtype = "fp32"
    from megatron.core import parallel_state

    from ovlt.distributed import init_distributed
    from ovlt.models.qwen2_5_vl.provider import build_model, load_hf_weights
    if not parallel_state.model_parallel_is_initialized():
        init_distributed(cfg.parallel)
    model = build_model(cfg.model)
    load_hf_weights(model, model_dir)
    model.eval()
    return make_engine(cfg, model=model, tokenizer=tokenizer)  # images: model.vision_model
