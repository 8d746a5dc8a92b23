"""Layer backends: which module fills each slot of a transformer layer spec.

megatron-core builds its layer specs by asking a `BackendSpecProvider`
(`megatron/core/models/backends.py`) for `column_parallel_linear()`, `row_parallel_linear()`,
`layer_norm()`, `core_attention()`, `fuse_layernorm_and_linear()` /
`column_parallel_layer_norm_linear()`; its `LocalSpecProvider` and `TESpecProvider` are the
two stock answers. ovlt's specs ask the same questions of one of three providers:

  LocalBackend  mcore Column/RowParallelLinear, torch RMSNorm, mcore's MLP, the model's core
                attention;
  Fp8Backend    the same with ovlt's `torch._scaled_mm` FP8 linears for one `model.fp8`
                recipe (`ovlt.fp8.linear`: per-tensor current / delayed, row-wise) and the MLP
                that fuses its SwiGLU with the FP8 casts (`ovlt.fp8.mlp`);
  TEBackend     mcore's `TESpecProvider` (Transformer Engine linears, the RMSNorm fused into
                the column-parallel one, TE's attention unless the model's is asked for) and
                TE's FP8 recipes through the TransformerConfig.

Why not mcore's `LocalSpecProvider` as it is: it answers apex's FusedLayerNorm when apex
imports (rewriting a module global to do so) and mcore's `DotProductAttention`, which has no
packed (THD) input; ovlt's local layers are torch RMSNorm and the model's own varlen core
attention everywhere. Three answers mcore's protocol has no slot for are added: `mlp()` (the
FP8 MLP is a module of its own), `transformer_config_kwargs()` (what the backend needs set in
the TransformerConfig: TE's FP8 recipe) and `norm_names` (where the layer norms live in a
state dict: their own modules, or inside TE's fused linears).

Nothing here is specific to a model: the model passes its core attention in, and choosing a
backend from a config is the model's spec module's job (`ovlt.models.qwen2_5_vl.specs`). The
one seam for Transformer Engine is `te_available()` (`te_installed()`: found, not imported).
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Optional

from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
from megatron.core.models.backends import BackendSpecProvider
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.torch_norm import WrappedTorchNorm

TE_FP8_RECIPES = {"te_delayed": "delayed", "te_current": "tensorwise"}  # model.fp8 -> mcore's


@functools.lru_cache(maxsize=None)
def te_available() -> bool:
    """Whether Transformer Engine and mcore's TE layers import here (checked once)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
        from megatron.core.extensions import transformer_engine as mcore_te
        return bool(mcore_te.HAVE_TE)
    except Exception:  # noqa: BLE001 - any failure (missing, broken CUDA libs) = not usable
        return False


def te_installed() -> bool:
    """Whether a `transformer_engine` package is installed (found, not imported)."""
    try:
        return importlib.util.find_spec("transformer_engine") is not None
    except (ImportError, ValueError):
        return False


class LocalBackend(BackendSpecProvider):
    """mcore's local tensor-parallel linears in the parameter dtype, torch RMSNorm, mcore's
    MLP, and the core attention the model hands in."""

    name = "local"
    norm_names = "local"  # layer norms are modules of their own in the state dict

    def __init__(self, core_attention: type):
        self._core_attention = core_attention

    def describe(self) -> str:
        return "local (mcore linears in the parameter dtype)"

    def column_parallel_linear(self) -> type:
        return ColumnParallelLinear

    def row_parallel_linear(self) -> type:
        return RowParallelLinear

    def fuse_layernorm_and_linear(self) -> bool:
        return False

    def column_parallel_layer_norm_linear(self) -> Optional[type]:
        return None

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        return WrappedTorchNorm  # LayerNorm or RMSNorm by TransformerConfig.normalization

    def core_attention(self) -> type:
        return self._core_attention

    def mlp(self) -> type:
        return MLP

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool, moe_use_legacy_grouped_gemm: bool):
        raise NotImplementedError("ovlt's layer backends build dense layers (no MoE)")

    def activation_func(self) -> Optional[type]:
        return None  # the MLP applies TransformerConfig.activation_func itself

    def transformer_config_kwargs(self) -> dict:
        return {}


class Fp8Backend(LocalBackend):
    """The local layers with ovlt's FP8 linears of one recipe (`ovlt.fp8.linear.RECIPES`)
    and, for every MLP, `Fp8SwiGLUMLP` (fused under delayed scaling, mcore's path otherwise)."""

    name = "fp8"

    def __init__(self, recipe: str, core_attention: type):
        from ovlt.fp8.linear import RECIPES
        if recipe not in RECIPES:
            raise ValueError(f"unknown ovlt FP8 recipe {recipe!r}; one of {RECIPES}")
        super().__init__(core_attention)
        self.recipe = recipe

    def describe(self) -> str:
        return f"ovlt FP8 (torch._scaled_mm linears, {self.recipe})"

    def column_parallel_linear(self) -> type:
        from ovlt.fp8.linear import fp8_linear_classes
        return fp8_linear_classes(self.recipe)[0]

    def row_parallel_linear(self) -> type:
        from ovlt.fp8.linear import fp8_linear_classes
        return fp8_linear_classes(self.recipe)[1]

    def mlp(self) -> type:
        from ovlt.fp8.mlp import Fp8SwiGLUMLP
        return Fp8SwiGLUMLP


class TEBackend(TESpecProvider):
    """mcore's Transformer Engine provider, with TE's FP8 recipe (`fp8`: "none" or a key of
    `TE_FP8_RECIPES`) and, when given, the model's core attention instead of TE's."""

    name = "te"
    norm_names = "te"  # layer norms live in the fused linears (`...linear_qkv.layer_norm_weight`)

    def __init__(self, fp8: str = "none", core_attention: Optional[type] = None):
        if fp8 != "none" and fp8 not in TE_FP8_RECIPES:
            raise ValueError(f"unknown Transformer Engine FP8 recipe {fp8!r}; one of "
                             f"{sorted(TE_FP8_RECIPES)} or 'none'")
        self.fp8 = fp8
        self._core_attention = core_attention

    def describe(self) -> str:
        attn = "TE attention" if self._core_attention is None else self._core_attention.__name__
        return f"Transformer Engine (fp8={self.fp8}, {attn})"

    def core_attention(self) -> type:
        return self._core_attention or super().core_attention()

    def mlp(self) -> type:
        return MLP

    def transformer_config_kwargs(self) -> dict:
        if self.fp8 == "none":
            return {}
        return {"fp8": "hybrid",  # e4m3 forward, e5m2 gradients
                "fp8_recipe": TE_FP8_RECIPES[self.fp8]}
