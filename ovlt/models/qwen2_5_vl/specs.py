"""Qwen2.5-VL's layer specs, built from ONE backend chosen from the model config.

`backend_for(model_cfg)` is the only place that reads `model.transformer_impl`, `model.fp8`
and `model.attention_backend` to pick layer implementations; the specs below ask the backend
it returns (`ovlt.models.backends`: mcore's provider pattern) for every slot, as mcore's own
`get_gpt_layer_*_spec` do:

  transformer_impl  fp8          backend
  local | auto      none         LocalBackend: mcore linears, torch RMSNorm, ovlt core attention
  local | auto      scaled_mm_*  Fp8Backend: the same with ovlt's FP8 linears and FP8 MLP
  te                none | te_*  TEBackend: TE linears with fused RMSNorm, TE attention for the
                                 LLM when model.attention_backend is auto or te (else ovlt's)

"auto" never selects Transformer Engine: its spec has not yet run on a GPU against the local
one (logits, gradients, checkpoint, export), so a silent switch to it wherever TE happens to be
installed (the NGC image) would run unproven layers. "te" selects it explicitly, with a
one-time warning. A `te_*` fp8 without transformer_impl=te, a `scaled_mm_*` fp8 with it and
attention_backend=te without it are ConfigErrors (`ovlt.config.check_layer_choice`): never a
silent fall-back to other numerics.

The vision tower always uses ovlt's core attention (its per-layer window/full cu_seqlens are
not something TE's attention takes per layer); its other slots come from the same backend.
The choice is logged once per process.
"""
from __future__ import annotations

import logging

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from ovlt.config import ConfigError, check_layer_choice
from ovlt.logging import get_logger, log_once
from ovlt.models import backends
from ovlt.models.qwen2_5_vl.attention import OvltCoreAttention

log = get_logger(__name__)


def backend_for(model_cfg):
    """The layer backend for `model_cfg` (see the module docstring); ConfigError for a
    combination that does not exist or transformer_impl=te where TE does not import."""
    check_layer_choice(model_cfg)
    impl, fp8, attn = model_cfg.transformer_impl, model_cfg.fp8, model_cfg.attention_backend
    if impl == "te":
        if not backends.te_available():
            raise ConfigError("model.transformer_impl=te but Transformer Engine does not import "
                              "here (transformer_engine.pytorch and megatron.core's TE layers)")
        log_once(log, "te_unproven", "model.transformer_impl=te: Transformer Engine layers, a "
                 "path not yet proven on a GPU against the local layers (logits, gradients, "
                 "checkpoint, export); model.transformer_impl=local is the proven one",
                 level=logging.WARNING)
        return backends.TEBackend(fp8, None if attn in ("auto", "te") else OvltCoreAttention)
    if impl == "auto":
        log_once(log, "auto_not_te",
                 "model.transformer_impl=auto: local layers%s. auto never selects Transformer "
                 "Engine: its layers have not yet been proven on a GPU against the local ones; "
                 "model.transformer_impl=te selects them explicitly",
                 " (transformer_engine is installed, not used)" if backends.te_installed() else "")
    if fp8.startswith("scaled_mm"):
        return backends.Fp8Backend(fp8, OvltCoreAttention)
    return backends.LocalBackend(OvltCoreAttention)


def layer_spec(backend, mask: AttnMaskType, core_attention: type) -> ModuleSpec:
    """A pre-norm transformer layer (RMSNorm, self-attention, RMSNorm, MLP) from `backend`'s
    modules, mcore's `get_gpt_layer_*_spec` pattern: with a backend that fuses the norm into the
    column-parallel linear, the norm slots stay identities."""
    fused = backend.fuse_layernorm_and_linear()
    norm = IdentityOp if fused else backend.layer_norm(rms_norm=True)
    col_in = backend.column_parallel_layer_norm_linear() if fused else \
        backend.column_parallel_linear()
    row = backend.row_parallel_linear()
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention, params={"attn_mask_type": mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=col_in, core_attention=core_attention, linear_proj=row,
                    q_layernorm=IdentityOp, k_layernorm=IdentityOp)),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=backend.mlp(),
                           submodules=MLPSubmodules(linear_fc1=col_in, linear_fc2=row)),
            mlp_bda=get_bias_dropout_add))


def language_layer_spec(model_cfg) -> ModuleSpec:
    backend = backend_for(model_cfg)
    log_once(log, "llm_spec", "LLM layers: %s", backend.describe())
    return layer_spec(backend, AttnMaskType.causal, backend.core_attention())


def vision_layer_spec(model_cfg) -> ModuleSpec:
    backend = backend_for(model_cfg)
    log_once(log, "vit_spec", "vision layers: %s, ovlt window/full core attention",
             backend.describe())
    return layer_spec(backend, AttnMaskType.no_mask, OvltCoreAttention)
