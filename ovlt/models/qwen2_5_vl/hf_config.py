"""ModelConfig <-> HF `Qwen2_5_VLConfig` (config.json of an official Qwen2.5-VL directory)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ovlt.config import ModelConfig, VisionConfig
from ovlt.errors import InputError
from ovlt.utils.io import read_json

MODEL_TYPE = "qwen2_5_vl"
ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"


def read_hf_config(src) -> dict:
    """`config.json` of an HF directory (or the file itself) as a dict, checked to describe a
    Qwen2.5-VL; InputError / FileNotFoundError naming the file otherwise."""
    p = Path(src)
    p = p / "config.json" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no config.json (is this an HF model directory?)")
    d = read_json(p)
    if not isinstance(d, dict):
        raise InputError(f"{p}: expected a JSON object, got {type(d).__name__}")
    check_architecture(d, p)
    return d


def check_architecture(d: dict, where) -> None:
    """ovlt's model, conversion and weight adapter are Qwen2.5-VL's: refuse any other model
    before its tensors are looked at (a Llama or BERT would fail later on a missing tensor)."""
    mt, archs = d.get("model_type"), d.get("architectures") or []
    ours = mt == MODEL_TYPE or (mt is None and any("Qwen2_5_VL" in str(a) for a in archs))
    if not ours:
        what = f"model_type {mt!r}" if mt is not None else "no model_type"
        if archs:
            what += f" ({', '.join(map(str, archs))})"
        raise InputError(f"{where}: {what} is not Qwen2.5-VL; ovlt trains and converts "
                         f"Qwen2.5-VL models only (model_type {MODEL_TYPE!r}, {ARCHITECTURE})")


def to_hf_config(m: ModelConfig):
    from transformers import Qwen2_5_VLConfig

    v = m.vision
    text = dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size,
                intermediate_size=m.ffn_hidden_size, num_hidden_layers=m.num_layers,
                num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_query_groups,
                rms_norm_eps=m.rms_norm_eps, max_position_embeddings=m.max_position_embeddings,
                rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta,
                                 "mrope_section": list(m.mrope_section)},
                hidden_act="silu", tie_word_embeddings=m.tie_word_embeddings)
    vision = dict(depth=v.depth, hidden_size=v.hidden_size, num_heads=v.num_heads,
                  intermediate_size=v.intermediate_size, patch_size=v.patch_size,
                  temporal_patch_size=v.temporal_patch_size, spatial_merge_size=v.spatial_merge_size,
                  window_size=v.window_size, fullatt_block_indexes=list(v.fullatt_block_indexes),
                  in_channels=v.in_channels, out_hidden_size=m.hidden_size, hidden_act="silu")
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                           image_token_id=m.image_token_id, video_token_id=m.video_token_id,
                           vision_start_token_id=m.vision_start_token_id,
                           vision_end_token_id=m.vision_end_token_id,
                           tie_word_embeddings=m.tie_word_embeddings)
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return cfg


def from_hf_config(src) -> ModelConfig:
    """`src`: an HF directory, a config.json path, or a dict. Handles both the nested
    (`text_config`) layout and the older flat layout of the official repos."""
    if isinstance(src, (str, Path)):
        p = Path(src)
        where = p / "config.json" if p.is_dir() else p
        d = read_hf_config(p)
    else:
        where = "HF config"
        d = dict(src)
    try:
        m = _model_config(d)
    except KeyError as e:
        raise InputError(f"{where}: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise InputError(f"{where}: a field has the wrong type ({e})") from None
    from ovlt.config import ConfigError, from_dict
    try:  # the same type checks as a YAML model section
        return from_dict(ModelConfig, dataclasses.asdict(m), "model")
    except ConfigError as e:
        raise InputError(f"{where}: {e}") from None


def _model_config(d: dict) -> ModelConfig:
    t = dict(d)
    t.update(d.get("text_config") or {})
    vd = d.get("vision_config") or {}
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    theta = rope.get("rope_theta", t.get("rope_theta", 1000000.0))
    section = rope.get("mrope_section", [16, 24, 24])
    vision = VisionConfig(
        depth=vd.get("depth", 32), hidden_size=vd.get("hidden_size", 1280),
        num_heads=vd.get("num_heads", 16), intermediate_size=vd.get("intermediate_size", 3420),
        patch_size=vd.get("patch_size", 14), temporal_patch_size=vd.get("temporal_patch_size", 2),
        spatial_merge_size=vd.get("spatial_merge_size", 2), window_size=vd.get("window_size", 112),
        fullatt_block_indexes=list(vd.get("fullatt_block_indexes", [7, 15, 23, 31])),
        in_channels=vd.get("in_channels", vd.get("in_chans", 3)))
    return ModelConfig(
        name=d.get("_name_or_path") or "qwen2_5_vl", vocab_size=t["vocab_size"],
        hidden_size=t["hidden_size"], num_layers=t["num_hidden_layers"],
        num_attention_heads=t["num_attention_heads"],
        num_query_groups=t.get("num_key_value_heads") or t["num_attention_heads"],
        ffn_hidden_size=t["intermediate_size"], rope_theta=float(theta),
        mrope_section=list(section), rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", t.get("tie_word_embeddings", False))),
        max_position_embeddings=t.get("max_position_embeddings", 128000),
        image_token_id=d.get("image_token_id", 151655),
        video_token_id=d.get("video_token_id", 151656),
        vision_start_token_id=d.get("vision_start_token_id", 151652),
        vision_end_token_id=d.get("vision_end_token_id", 151653),
        vision=vision)


def save_tiny_hf_model(out_dir, model_cfg: ModelConfig | None = None, seed: int = 0,
                       dtype=None, max_shard_size="200MB"):
    """Random-init a real `Qwen2_5_VLForConditionalGeneration` of `model_cfg` (default: the
    tiny preset) and `save_pretrained` it — the stand-in for downloaded weights."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    if model_cfg is None:
        from ovlt.config import load_config, CONFIG_ROOT
        model_cfg = load_config(CONFIG_ROOT / "model" / "tiny.yaml").model
    torch.manual_seed(seed)
    hf_cfg = to_hf_config(model_cfg)
    model = Qwen2_5_VLForConditionalGeneration(hf_cfg).to(dtype or torch.float32)
    # Non-trivial norms so parity tests can't pass by accident on all-ones weights.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "ln_q" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    return out_dir
