"""Build the mcore Qwen2.5-VL for this rank (TP/PP from mcore `parallel_state`).

`build_model(model_cfg, pre_process=None, post_process=None)`; pre/post default to whether
this rank is the first/last pipeline stage. The vision tower is built on the first stage only.
On CPU, call `ovlt.distributed.init_distributed` first (it applies the mcore CPU shim).
`load_hf_weights(model, hf_dir)` fills a built model from an HF directory through the
state-dict adapter.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state

from ovlt.logging import get_logger
from ovlt.models.qwen2_5_vl import specs
from ovlt.models.qwen2_5_vl.language import Qwen2LanguageModel, language_config
from ovlt.utils.device import dtype_of
from ovlt.models.qwen2_5_vl.model import Qwen2_5_VLModel
from ovlt.models.qwen2_5_vl.state_dict_adapter import padded_vocab_size
from ovlt.models.qwen2_5_vl.vision import VisionModel

log = get_logger(__name__)

def build_model(model_cfg, pre_process: Optional[bool] = None,
                post_process: Optional[bool] = None) -> Qwen2_5_VLModel:
    """This rank's stage of the model, randomly initialised (mcore init); load weights with
    `load_hf_weights(model, hf_dir)` (`model_cfg.hf_path` is not read here)."""
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("build_model needs mcore parallel_state: call "
                           "ovlt.distributed.init_distributed(parallel_cfg) first")
    if not torch.cuda.is_available():
        from ovlt.compat import mcore_cpu
        mcore_cpu.apply()
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    config = language_config(model_cfg)
    vocab = padded_vocab_size(model_cfg.vocab_size, tp, model_cfg.make_vocab_size_divisible_by)
    llm = Qwen2LanguageModel(
        config=config, transformer_layer_spec=specs.language_layer_spec(model_cfg),
        vocab_size=vocab, true_vocab_size=model_cfg.vocab_size,
        max_sequence_length=model_cfg.max_position_embeddings,
        pre_process=pre_process, post_process=post_process, parallel_output=True,
        share_embeddings_and_output_weights=model_cfg.tie_word_embeddings,
        position_embedding_type="mrope", rotary_base=model_cfg.rope_theta)
    vision = VisionModel(model_cfg, specs.vision_layer_spec(model_cfg)) if pre_process else None
    model = Qwen2_5_VLModel(model_cfg, llm, vision)
    # mcore's torch-norm layers are created in fp32 whatever params_dtype says (mcore expects a
    # Float16Module wrapper); cast so every parameter has the configured dtype.
    model.to(dtype_of(model_cfg.params_dtype))
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    n = sum(p.numel() for p in model.parameters())
    log.info("built Qwen2.5-VL stage pre=%s post=%s tp=%d: %.1fM params on this rank",
             pre_process, post_process, tp, n / 1e6)
    return model


def load_hf_weights(model: Qwen2_5_VLModel, hf_dir, strict: bool = True) -> None:
    """Load an HF Qwen2.5-VL directory into this rank's model via the state-dict adapter
    (tensor by tensor, only this rank's shards)."""
    from ovlt.models.qwen2_5_vl.checkpoint_io import HFCheckpointReader
    from ovlt.models.qwen2_5_vl.state_dict_adapter import iter_hf_to_mcore
    reader = HFCheckpointReader(hf_dir)
    try:
        local = dict(iter_hf_to_mcore(
            reader, model.model_cfg,
            tp_rank=parallel_state.get_tensor_model_parallel_rank(),
            tp_size=parallel_state.get_tensor_model_parallel_world_size(),
            pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
            pp_size=parallel_state.get_pipeline_model_parallel_world_size(),
            norm_names=specs.backend_for(model.model_cfg).norm_names))
    finally:
        reader.close()
    load_mcore_state_dict(model, local, strict=strict)


def load_mcore_state_dict(model: Qwen2_5_VLModel, state: dict, strict: bool = True) -> None:
    """Copy a rank-local mcore state dict (CONTRACTS names) into the model; with tied
    embeddings on PP>1, a missing `output_layer.weight` on the last stage is taken from the
    first stage's embedding (embedding-group all-reduce, as mcore's own init does)."""
    own = model.state_dict()
    want = {k for k in own if not k.endswith("._extra_state")}
    tied_pp_out = "language_model.output_layer.weight"
    missing = sorted(want - set(state) - {tied_pp_out})
    unexpected = sorted(set(state) - want)
    if strict and (missing or unexpected):
        raise KeyError(f"state dict mismatch: missing {missing[:8]}{'...' if len(missing) > 8 else ''}"
                       f", unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    with torch.no_grad():
        for k, v in state.items():
            if k in own:
                if own[k].shape != v.shape:
                    raise ValueError(f"{k}: checkpoint shape {tuple(v.shape)} != model "
                                     f"{tuple(own[k].shape)}")
                own[k].copy_(v)
    if tied_pp_out in own and tied_pp_out not in state:
        sync_tied_output_weight(model)


def sync_tied_output_weight(model: Qwen2_5_VLModel) -> None:
    """Tied embeddings with PP>1: last stage's output_layer.weight := first stage's embedding."""
    lm = model.language_model
    if not (lm.share_embeddings_and_output_weights
            and parallel_state.get_pipeline_model_parallel_world_size() > 1):
        return
    w = lm.shared_embedding_or_output_weight()
    with torch.no_grad():
        if lm.post_process and not lm.pre_process:
            w.zero_()
        torch.distributed.all_reduce(w.data, group=parallel_state.get_embedding_group())
