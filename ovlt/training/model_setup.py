"""Model set-up shared by the SFT and GRPO trainers: build, freeze, recompute, wrap in mcore DDP.

Freezing happens before the DDP wrap: mcore's gradient buffers (and so the distributed
optimizer's shards) only hold parameters with `requires_grad=True`, so frozen modules cost no
gradient or Adam memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ovlt.logging import get_logger

log = get_logger(__name__)

# Parameter-name prefixes of the freezable groups of `Qwen2_5_VLModel` (see CONTRACTS.md).
FREEZE_GROUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # group: (prefixes, excluded prefixes)
    "vision": (("vision_model.",), ("vision_model.merger.",)),
    "merger": (("vision_model.merger.",), ()),
    "llm": (("language_model.",), ()),
}


def _in_group(name: str, group: str) -> bool:
    inc, exc = FREEZE_GROUPS[group]
    return name.startswith(inc) and not name.startswith(exc)


def freeze_modules(model: torch.nn.Module, freeze: list[str]) -> dict[str, int]:
    """Set `requires_grad=False` on the groups in `freeze`; return trainable/frozen counts."""
    for g in freeze:
        if g not in FREEZE_GROUPS:
            raise ValueError(f"train.freeze: {g!r} not allowed; allowed: {sorted(FREEZE_GROUPS)}")
    counts = {"trainable": 0, "frozen": 0}
    hit = {g: 0 for g in freeze}
    for name, p in model.named_parameters():
        groups = [g for g in freeze if _in_group(name, g)]
        for g in groups:
            hit[g] += p.numel()
        if groups:
            p.requires_grad_(False)
            counts["frozen"] += p.numel()
        else:
            counts["trainable"] += p.numel()
    for g, n in hit.items():
        if n == 0:
            log.warning("train.freeze: group %r matched no parameter on this rank", g)
    if counts["trainable"] == 0:
        log.warning("train.freeze=%s leaves no trainable parameter on this rank", freeze)
    return counts


def _transformer_configs(model: torch.nn.Module):
    seen = {}
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and hasattr(cfg, "recompute_granularity"):
            seen[id(cfg)] = cfg
    return list(seen.values())


def apply_recompute(model: torch.nn.Module, mode: str) -> None:
    """Activation recomputation. `full`: every transformer layer recomputes in backward (mcore
    `recompute_granularity='full'`, uniform, 1 layer per chunk — read at forward time).
    `selective`: only core attention is recomputed (mcore's flag on each attention module)."""
    if mode == "none":
        return
    if mode not in ("full", "selective"):
        raise ValueError(f"train.recompute: {mode!r} not allowed; allowed: none, selective, full")
    for cfg in _transformer_configs(model):
        cfg.recompute_granularity = mode
        if mode == "full":
            cfg.recompute_method, cfg.recompute_num_layers = "uniform", 1
    if mode == "selective":
        n = 0
        for mod in model.modules():
            if hasattr(mod, "checkpoint_core_attention"):
                mod.checkpoint_core_attention = True
                n += 1
        log.info("selective recompute on %d attention modules", n)


@dataclass
class ModelBundle:
    chunks: list            # DDP-wrapped model chunks (one unless virtual PP)
    config: object          # the LLM's mcore TransformerConfig
    param_counts: dict

    @property
    def module(self):
        return self.chunks[0].module


def mcore_config(model: torch.nn.Module):
    cfgs = _transformer_configs(model)
    if not cfgs:
        raise ValueError("model has no megatron-core TransformerConfig")
    lm = getattr(model, "language_model", None)
    return getattr(lm, "config", None) or cfgs[0]


def wrap_model(model: torch.nn.Module, train_cfg, use_distributed_optimizer: bool = True,
               per_token_loss: bool = True) -> ModelBundle:
    """Freeze, set recompute and the loss-scaling contract, then wrap in mcore DDP."""
    from megatron.core.distributed import (DistributedDataParallel,
                                           DistributedDataParallelConfig, finalize_model_grads)

    from ovlt.compat.mcore_cpu import cuda_free_mode

    from megatron.core.enums import ModelType

    if not hasattr(model, "model_type"):  # mcore's schedules read it off the wrapped model
        model.model_type = ModelType.encoder_or_decoder
    lm = getattr(model, "language_model", None)
    if lm is not None and not hasattr(model, "shared_embedding_or_output_weight"):
        # finalize_model_grads all-reduces tied embedding grads across PP stages through this
        # method of the top module; the LLM has it.
        model.shared_embedding_or_output_weight = lm.shared_embedding_or_output_weight
    counts = freeze_modules(model, list(train_cfg.freeze))
    apply_recompute(model, train_cfg.recompute)
    cfg = mcore_config(model)
    for c in _transformer_configs(model):
        # Loss = sum over tokens; mcore sums token counts over micro-batches and DP ranks and
        # divides the gradients once (finalize_model_grads): an exact per-token mean.
        c.calculate_per_token_loss = per_token_loss
        c.finalize_model_grads_func = finalize_model_grads
        # Packed micro-batches differ in length: PP exchanges shapes before activations.
        c.variable_seq_lengths = True
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=False, bucket_size=None)
    with cuda_free_mode():
        ddp = DistributedDataParallel(cfg, ddp_cfg, model)
    for c in _transformer_configs(model):
        c.no_sync_func = ddp.no_sync
    log.info("model: %.2fM trainable / %.2fM frozen parameters on this rank (freeze=%s, "
             "recompute=%s)", counts["trainable"] / 1e6, counts["frozen"] / 1e6,
             list(train_cfg.freeze), train_cfg.recompute)
    return ModelBundle(chunks=[ddp], config=cfg, param_counts=counts)


def build_vl_model(job_cfg, precision: str):
    """The Qwen2.5-VL mcore model of `job_cfg.model` for this PP stage, base weights loaded
    from `model.hf_path` when set (through the state-dict adapter)."""
    from ovlt.models.qwen2_5_vl.provider import build_model

    mcfg = job_cfg.model
    want = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}[precision]
    if mcfg.params_dtype != want:
        log.info("model.params_dtype=%s overridden by train.precision=%s", mcfg.params_dtype, want)
        mcfg.params_dtype = want
    model = build_model(mcfg)
    if mcfg.hf_path:
        from ovlt.training.hf_io import load_hf_weights
        load_hf_weights(model, mcfg)
    return model


def configure_fp8(model: torch.nn.Module, model_cfg) -> None:
    """FP8 by `model.fp8`: TE recipes set mcore's fp8 fields (the TE layers of the TE spec read
    them in their fp8 autocast); `scaled_mm_*` are baked into the layer spec by the provider;
    "none" = bf16."""
    kind = model_cfg.fp8
    if kind.startswith("te_"):
        for cfg in _transformer_configs(model):
            cfg.fp8 = "hybrid"  # e4m3 forward, e5m2 gradients
            cfg.fp8_recipe = {"te_delayed": "delayed", "te_current": "tensorwise"}[kind]
        log.info("FP8: Transformer Engine recipe %s", kind)
    elif kind.startswith("scaled_mm"):
        log.info("FP8: ovlt torch._scaled_mm linears (%s)", kind)
