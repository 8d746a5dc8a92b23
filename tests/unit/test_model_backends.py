"""The layer backend chosen from the model config (`specs.backend_for`), the module classes of
the layer specs built from each backend (the table below, written out by hand), and a built
model holding those modules. Transformer Engine is not installed here: its path runs with
`backends.te_available` patched, the spec naming mcore's TE classes (never instantiated)."""
import dataclasses
import logging

import pytest
from megatron.core.extensions import transformer_engine as mcore_te
from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from ovlt.config import CONFIG_ROOT, ConfigError, ModelConfig, load_config
from ovlt.fp8.linear import Fp8LinearMixin, fp8_linear_classes
from ovlt.fp8.mlp import Fp8SwiGLUMLP
from ovlt.models import backends
from ovlt.models.qwen2_5_vl import specs
from ovlt.models.qwen2_5_vl.attention import OvltCoreAttention

FP8_RECIPES = ("scaled_mm_tensor", "scaled_mm_delayed", "scaled_mm_rowwise")


@pytest.fixture
def logged(monkeypatch):
    """(key, level, message) of every `log_once` call of the spec module (each is once per
    process, so the test sees the calls, not what a logger kept)."""
    got = []
    monkeypatch.setattr(specs, "log_once", lambda logger, key, msg, *args, level=logging.INFO:
                        got.append((key, level, msg % args)))
    return got


@pytest.fixture
def fake_te(monkeypatch):
    monkeypatch.setattr(backends, "te_available", lambda: True)


def _cfg(impl="local", fp8="none", attn="auto"):
    return ModelConfig(transformer_impl=impl, fp8=fp8, attention_backend=attn)


def _slots(spec) -> dict:
    """Layer spec -> {slot: module class} (and the attention mask type)."""
    sub, att = spec.submodules, spec.submodules.self_attention
    mlp = sub.mlp
    return {"layer": spec.module, "input_layernorm": sub.input_layernorm,
            "self_attention": att.module, "mask": att.params["attn_mask_type"],
            "linear_qkv": att.submodules.linear_qkv,
            "core_attention": att.submodules.core_attention,
            "linear_proj": att.submodules.linear_proj,
            "q_layernorm": att.submodules.q_layernorm, "k_layernorm": att.submodules.k_layernorm,
            "pre_mlp_layernorm": sub.pre_mlp_layernorm, "mlp": mlp.module,
            "linear_fc1": mlp.submodules.linear_fc1, "linear_fc2": mlp.submodules.linear_fc2}


def _expected(qkv, row, mlp, norm, attn, mask):
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.transformer_layer import TransformerLayer
    return {"layer": TransformerLayer, "input_layernorm": norm, "self_attention": SelfAttention,
            "mask": mask, "linear_qkv": qkv, "core_attention": attn, "linear_proj": row,
            "q_layernorm": IdentityOp, "k_layernorm": IdentityOp, "pre_mlp_layernorm": norm,
            "mlp": mlp, "linear_fc1": qkv, "linear_fc2": row}


# ------------------------------------------------------------------ which backend
@pytest.mark.parametrize("impl", ["local", "auto"])
@pytest.mark.parametrize("te", [False, True], ids=["no_te", "te_importable"])
def test_local_and_auto_choose_the_local_layers(monkeypatch, logged, impl, te):
    monkeypatch.setattr(backends, "te_available", lambda: te)
    b = specs.backend_for(_cfg(impl))
    assert type(b) is backends.LocalBackend
    assert b.norm_names == "local" and b.transformer_config_kwargs() == {}
    assert (b.column_parallel_linear(), b.row_parallel_linear(), b.mlp()) == \
        (ColumnParallelLinear, RowParallelLinear, MLP)
    assert b.core_attention() is OvltCoreAttention and not b.fuse_layernorm_and_linear()


def test_auto_says_once_why_it_does_not_pick_te(monkeypatch, logged, fake_te):
    monkeypatch.setattr(backends, "te_installed", lambda: True)
    assert type(specs.backend_for(_cfg("auto"))) is backends.LocalBackend
    (key, level, msg), = [c for c in logged if c[0] == "auto_not_te"]
    assert level == logging.INFO
    assert "auto never selects Transformer Engine" in msg and "installed, not used" in msg
    logged.clear()
    specs.backend_for(_cfg("local"))
    assert not [c for c in logged if c[0] == "auto_not_te"]  # only auto has to explain


@pytest.mark.parametrize("impl", ["local", "auto"])
@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_scaled_mm_recipes_choose_ovlt_fp8(logged, fake_te, impl, recipe):
    b = specs.backend_for(_cfg(impl, recipe))
    assert type(b) is backends.Fp8Backend and b.recipe == recipe and b.norm_names == "local"
    col, row = b.column_parallel_linear(), b.row_parallel_linear()
    assert issubclass(col, Fp8LinearMixin) and issubclass(col, ColumnParallelLinear)
    assert issubclass(row, Fp8LinearMixin) and issubclass(row, RowParallelLinear)
    for cls in (col, row):
        assert cls.fp8_rowwise == (recipe == "scaled_mm_rowwise")
        assert cls.fp8_delayed == (recipe == "scaled_mm_delayed")
    assert (col, row) == fp8_linear_classes(recipe)  # one class per recipe, every call
    assert b.mlp() is Fp8SwiGLUMLP and b.transformer_config_kwargs() == {}


@pytest.mark.parametrize("attn", ["auto", "te", "flash", "sdpa"])
@pytest.mark.parametrize("fp8,recipe", [("none", None), ("te_delayed", "delayed"),
                                        ("te_current", "tensorwise")])
def test_te_only_when_asked_for_and_with_a_warning(logged, fake_te, attn, fp8, recipe):
    b = specs.backend_for(_cfg("te", fp8, attn))
    assert isinstance(b, backends.TEBackend) and isinstance(b, TESpecProvider)
    assert b.norm_names == "te" and b.fuse_layernorm_and_linear()
    assert b.transformer_config_kwargs() == ({} if recipe is None else
                                             {"fp8": "hybrid", "fp8_recipe": recipe})
    want_attn = mcore_te.TEDotProductAttention if attn in ("auto", "te") else OvltCoreAttention
    assert b.core_attention() is want_attn
    (key, level, msg), = [c for c in logged if c[0] == "te_unproven"]
    assert level == logging.WARNING and "not yet proven" in msg


def test_te_asked_for_where_it_does_not_import(monkeypatch):
    monkeypatch.setattr(backends, "te_available", lambda: False)
    with pytest.raises(ConfigError, match="transformer_impl=te but Transformer Engine does not"):
        specs.backend_for(_cfg("te"))


BAD = [("auto", "te_delayed", "auto", r"model.fp8=te_delayed .*transformer_impl=auto does not select TE"),
       ("local", "te_current", "auto", r"model.fp8=te_current .*transformer_impl=local does not select TE"),
       ("te", "scaled_mm_delayed", "auto", r"model.fp8=scaled_mm_delayed is ovlt's FP8"),
       ("auto", "none", "te", r"model.attention_backend=te needs model.transformer_impl=te")]


@pytest.mark.parametrize("impl,fp8,attn,match", BAD)
def test_impossible_combinations_are_config_errors(fake_te, impl, fp8, attn, match):
    """At config load (naming the keys), and from `backend_for` for a config built in code."""
    with pytest.raises(ConfigError, match=match):
        specs.backend_for(_cfg(impl, fp8, attn))
    with pytest.raises(ConfigError, match=match):
        load_config(CONFIG_ROOT / "model" / "tiny.yaml", [
            f"model.transformer_impl={impl}", f"model.fp8={fp8}",
            f"model.attention_backend={attn}"])


# ------------------------------------------------------------------ the specs it builds
def _fp8_row(recipe):
    col, row = fp8_linear_classes(recipe)
    return dict(col=col, row=row, mlp=Fp8SwiGLUMLP)


SPEC_CASES = [("local", "none", dict(col=ColumnParallelLinear, row=RowParallelLinear, mlp=MLP))] \
    + [("auto", r, _fp8_row(r)) for r in FP8_RECIPES]


@pytest.mark.parametrize("impl,fp8,want", SPEC_CASES, ids=[c[1] for c in SPEC_CASES])
def test_local_and_fp8_specs_hold_these_modules(logged, impl, fp8, want):
    cfg = _cfg(impl, fp8)
    llm, vit = _slots(specs.language_layer_spec(cfg)), _slots(specs.vision_layer_spec(cfg))
    slots = (want["col"], want["row"], want["mlp"], WrappedTorchNorm, OvltCoreAttention)
    assert llm == _expected(*slots, AttnMaskType.causal)
    assert vit == _expected(*slots, AttnMaskType.no_mask)


@pytest.mark.parametrize("attn", ["auto", "sdpa"])
def test_te_specs_hold_these_modules(logged, fake_te, attn):
    cfg = _cfg("te", "te_delayed", attn)
    llm, vit = _slots(specs.language_layer_spec(cfg)), _slots(specs.vision_layer_spec(cfg))
    qkv, row = mcore_te.TELayerNormColumnParallelLinear, mcore_te.TERowParallelLinear
    llm_attn = mcore_te.TEDotProductAttention if attn == "auto" else OvltCoreAttention
    assert llm == _expected(qkv, row, MLP, IdentityOp, llm_attn, AttnMaskType.causal)
    # the vision tower keeps ovlt's window/full attention whatever the backend
    assert vit == _expected(qkv, row, MLP, IdentityOp, OvltCoreAttention, AttnMaskType.no_mask)


@pytest.mark.parametrize("fp8", ["none", "scaled_mm_delayed"])
def test_built_model_holds_the_backends_modules(tiny_model_cfg, fp8):
    """Every layer of a built tiny model (LLM and vision tower) is made of the modules its
    backend names, and the state dict keeps the local norm names."""
    from ovlt.config import ParallelConfig
    from ovlt.distributed import destroy_distributed, init_distributed
    from ovlt.models.qwen2_5_vl.provider import build_model
    cfg = dataclasses.replace(tiny_model_cfg, fp8=fp8)
    b = specs.backend_for(cfg)
    init_distributed(ParallelConfig())
    try:
        model = build_model(cfg)
    finally:
        destroy_distributed()
    blocks = [model.language_model.decoder, model.vision_model.decoder]
    layers = [layer for blk in blocks for layer in blk.layers]
    assert len(layers) == cfg.num_layers + cfg.vision.depth
    for layer in layers:
        att, mlp = layer.self_attention, layer.mlp
        assert type(att.linear_qkv) is b.column_parallel_linear()
        assert type(att.linear_proj) is b.row_parallel_linear()
        assert type(mlp.linear_fc1) is b.column_parallel_linear()
        assert type(mlp.linear_fc2) is b.row_parallel_linear()
        assert type(mlp) is b.mlp() and type(att.core_attention) is OvltCoreAttention
    keys = model.state_dict().keys()
    assert "language_model.decoder.layers.0.input_layernorm.weight" in keys
    assert not any("layer_norm_weight" in k for k in keys)
