"""The ONE place that picks layer implementations for the LLM and the vision tower.

`transformer_impl` (model config):
  * "te":    Transformer Engine linears with fused RMSNorm (`TELayerNormColumnParallelLinear`),
             `TEDotProductAttention` for the LLM (THD/cu_seqlens, CP, FP8 recipes);
  * "local": mcore `ColumnParallelLinear`/`RowParallelLinear` + torch RMSNorm + ovlt's
             `OvltCoreAttention` (flash-attn varlen when present, else torch SDPA);
  * "auto":  "te" when `transformer_engine` imports, else "local".
`fp8` = "scaled_mm_tensor" | "scaled_mm_delayed" | "scaled_mm_rowwise" swaps the local linears for ovlt's
`torch._scaled_mm` FP8 linears (`fp8.py`), for GPUs without TE, and the MLP for one that fuses
its SwiGLU with the FP8 casts under delayed scaling (`fp8_mlp.py`).
The vision tower always uses ovlt's core attention (its per-layer window/full cu_seqlens are
not something TE's attention takes per layer); its linears follow the same choice.
The choice is logged once per process.
"""
from __future__ import annotations

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from ovlt.logging import get_logger, log_once
from ovlt.models.qwen2_5_vl.attention import OvltCoreAttention

log = get_logger(__name__)


def te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
        from megatron.core.extensions import transformer_engine as _  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 - any failure = not usable
        return False


def resolve_impl(model_cfg) -> str:
    """'te' | 'local' | 'fp8' (local layers with ovlt FP8 linears)."""
    impl = model_cfg.transformer_impl
    fp8 = model_cfg.fp8
    if fp8.startswith("scaled_mm"):
        if impl == "te":
            raise ValueError(f"model.fp8={fp8} is ovlt's non-TE FP8 path; with "
                             "model.transformer_impl=te use model.fp8=te_delayed|te_current")
        return "fp8"
    if impl == "te" and not te_available():
        raise RuntimeError("model.transformer_impl=te but transformer_engine does not import")
    if impl == "auto":
        impl = "te" if te_available() else "local"
    if fp8.startswith("te_") and impl != "te":
        raise ValueError(f"model.fp8={fp8} needs Transformer Engine (model.transformer_impl=te)")
    return impl


def _linears(impl: str, fp8_recipe: str):
    """(column-parallel linear, row-parallel linear, MLP) classes."""
    if impl == "fp8":
        from ovlt.fp8.linear import fp8_linear_classes
        from ovlt.fp8.mlp import Fp8SwiGLUMLP
        return (*fp8_linear_classes(fp8_recipe), Fp8SwiGLUMLP)
    return ColumnParallelLinear, RowParallelLinear, MLP


def _local_layer(impl: str, fp8_recipe: str, mask: AttnMaskType) -> ModuleSpec:
    col, row, mlp = _linears(impl, fp8_recipe)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention, params={"attn_mask_type": mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=col, core_attention=OvltCoreAttention, linear_proj=row,
                    q_layernorm=IdentityOp, k_layernorm=IdentityOp)),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=ModuleSpec(module=mlp, submodules=MLPSubmodules(linear_fc1=col, linear_fc2=row)),
            mlp_bda=get_bias_dropout_add))


def _te_layer(mask: AttnMaskType, te_attention: bool) -> ModuleSpec:
    from megatron.core.extensions.transformer_engine import (
        TEDotProductAttention, TELayerNormColumnParallelLinear, TERowParallelLinear)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            self_attention=ModuleSpec(
                module=SelfAttention, params={"attn_mask_type": mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=TELayerNormColumnParallelLinear,
                    core_attention=TEDotProductAttention if te_attention else OvltCoreAttention,
                    linear_proj=TERowParallelLinear,
                    q_layernorm=IdentityOp, k_layernorm=IdentityOp)),
            self_attn_bda=get_bias_dropout_add,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(
                linear_fc1=TELayerNormColumnParallelLinear, linear_fc2=TERowParallelLinear)),
            mlp_bda=get_bias_dropout_add))


def language_layer_spec(model_cfg) -> ModuleSpec:
    impl = resolve_impl(model_cfg)
    attn = model_cfg.attention_backend
    log_once(log, "llm_spec", f"LLM layers: {impl} (fp8={model_cfg.fp8}, attention={attn})")
    if impl == "te":
        return _te_layer(AttnMaskType.causal, te_attention=attn in ("auto", "te"))
    return _local_layer(impl, model_cfg.fp8, AttnMaskType.causal)


def vision_layer_spec(model_cfg) -> ModuleSpec:
    impl = resolve_impl(model_cfg)
    log_once(log, "vit_spec", f"vision layers: {impl} (ovlt window/full core attention)")
    if impl == "te":
        return _te_layer(AttnMaskType.no_mask, te_attention=False)
    return _local_layer(impl, model_cfg.fp8, AttnMaskType.no_mask)


def uses_te_norm_names(model_cfg) -> bool:
    """True when layer norms live inside the TE linears (`...linear_qkv.layer_norm_weight`)."""
    return resolve_impl(model_cfg) == "te"
