"""Model set-up shared by the SFT and GRPO trainers: build, freeze, recompute, wrap in mcore DDP.

Freezing happens before the DDP wrap: mcore's gradient buffers (and so the distributed
optimizer's shards) only hold parameters with `requires_grad=True`, so frozen modules cost no
gradient or Adam memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ovlt.logging import get_logger
from ovlt.utils.device import PRECISION_DTYPES

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
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

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
    # read by sft_forward: the logits-chunk budget of the fused LM-head loss
    model.ovlt_lm_head_chunk_bytes = int(getattr(train_cfg, "lm_head_chunk_mib", 0)) << 20 or None
    apply_recompute(model, train_cfg.recompute)
    cfg = mcore_config(model)
    for c in _transformer_configs(model):
        # Loss = sum over tokens; mcore sums token counts over micro-batches and DP ranks, and
        # the optimizer step divides the gradients once (see finalize_grads): an exact
        # per-token mean.
        c.calculate_per_token_loss = per_token_loss
        c.finalize_model_grads_func = finalize_grads
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
    fast = enable_cuda_fastpaths(model)
    log.info("model: %.2fM trainable / %.2fM frozen parameters on this rank (freeze=%s, "
             "recompute=%s, CUDA fast paths: %s)", counts["trainable"] / 1e6,
             counts["frozen"] / 1e6, list(train_cfg.freeze), train_cfg.recompute, fast or "off")
    return ModelBundle(chunks=[ddp], config=cfg, param_counts=counts)


def finalize_grads(model: list, num_tokens=None, pg_collection=None, force_all_reduce=False):
    """mcore's `finalize_model_grads` (DP reduce, tied-embedding and non-TP grad all-reduces)
    minus its last pass, grads *= 1/num_tokens, after zeroing the main_grad of any weight that
    `grad_routing.zero_grad_buffers` left unzeroed and that got no gradient. The total token
    count (summed over PP and DP like mcore does) is recorded per chunk
    (`grad_routing.set_pending_scale`) for the optimizer step, which folds it into the Adam update
    (fused path) or applies it (see `ovlt.engine.optimizer.OvltStep`). Same numbers, one
    pass over the fp32 grads fewer."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    from ovlt.engine.grad_routing import set_pending_scale, zero_unwritten
    zero_unwritten(model)  # before any reduction reads the buffers
    finalize_model_grads(model, None, pg_collection=pg_collection,
                         force_all_reduce=force_all_reduce)
    if num_tokens is None:
        return
    if pg_collection is not None:
        pp_group, dp_cp_group = pg_collection.pp, pg_collection.dp_cp
    else:
        pp_group = ps.get_pipeline_model_parallel_group()
        dp_cp_group = ps.get_data_parallel_group(with_context_parallel=True)
    from megatron.core.pipeline_parallel.utils import get_pp_last_rank
    # a collective over a 1-rank group changes nothing but costs a host round trip (NCCL)
    if torch.distributed.get_world_size(pp_group) > 1:
        torch.distributed.broadcast(num_tokens, src=get_pp_last_rank(pp_group), group=pp_group)
    if torch.distributed.get_world_size(dp_cp_group) > 1:
        torch.distributed.all_reduce(num_tokens, group=dp_cp_group)
    # as mcore: 1/N, and no scaling when no token carries a loss
    scale = torch.where(num_tokens > 0, 1.0 / num_tokens.clamp(min=1), 1.0)
    for chunk in model:
        set_pending_scale(chunk, scale)


def enable_cuda_fastpaths(model: torch.nn.Module) -> dict:
    """Training-only CUDA fusions, switched on after the DDP wrap (every trainable weight has
    its fp32 `main_grad` then): mcore's torch.compile'd SwiGLU (`bias_activation_fusion`, which
    also keeps only the fc1 output for backward) and bias-dropout-add, the fused RoPE, and
    weight-gradient GEMMs, the embedding backward and the SFT LM-head dW accumulating into
    main_grad (`ovlt.compat.cuda_fastpaths`, `language.OvltVocabParallelEmbedding`,
    `ovlt.kernels.fused_nll_loss(dw_into=)`). Nothing changes on CPU or with OVLT_FASTPATHS=0;
    returns what was switched on."""
    from ovlt.compat import cuda_fastpaths
    if not cuda_fastpaths.fastpaths_enabled():
        return {}
    from ovlt.models.qwen2_5_vl.vision import VisionModel
    rope = cuda_fastpaths.install()["rope_fusion"]
    # A frozen tower runs forward only: the compiled fusions would save no memory there and
    # their per-call guard checks cost more host time than its small kernels take on the GPU.
    frozen = {id(m.config) for m in model.modules() if isinstance(m, VisionModel)
              and not any(p.requires_grad for p in m.parameters())}
    for c in _transformer_configs(model):
        trains = id(c) not in frozen
        c.bias_activation_fusion = trains and c.gated_linear_unit and c.activation_func is F.silu
        c.bias_dropout_fusion = trains
        # sbhd with per-token angles (ovlt's core attention); TE's thd attention keeps mcore's
        c.apply_rope_fusion = rope and not c.rotary_interleaved and c.context_parallel_size == 1
    from ovlt.engine.grad_routing import Writer, set_writer
    from ovlt.models.qwen2_5_vl.language import OvltVocabParallelEmbedding, Qwen2LanguageModel
    n_emb = 0
    for lm in model.modules():
        # tied LM head: the weight gets a second, ordinary gradient that must not be dropped
        if isinstance(lm, Qwen2LanguageModel) and lm.pre_process and \
                not lm.share_embeddings_and_output_weights:
            emb = lm.embedding.word_embeddings
            if isinstance(emb, OvltVocabParallelEmbedding) and hasattr(emb.weight, "main_grad"):
                set_writer(emb.weight, Writer.EMBEDDING)
                n_emb += 1
        if isinstance(lm, Qwen2LanguageModel) and lm.post_process and \
                not lm.share_embeddings_and_output_weights:
            w = lm.output_layer.weight
            # read by sft_forward: the fused LM-head loss adds dW into main_grad directly
            if w.requires_grad and hasattr(w, "main_grad"):
                set_writer(w, Writer.LOSS_KERNEL)
                n_emb += 1
    return {"fused_swiglu_bda": True, "fused_rope": rope, "embedding_head_grad_fusion": n_emb,
            "wgrad_fusion_layers": cuda_fastpaths.enable_wgrad_fusion(model)}


def build_vl_model(job_cfg, precision: str):
    """The Qwen2.5-VL mcore model of `job_cfg.model` for this PP stage, base weights loaded
    from `model.hf_path` when set (through the state-dict adapter)."""
    from ovlt.models.qwen2_5_vl.provider import build_model

    mcfg = job_cfg.model
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"train.precision={precision!r}: one of {sorted(PRECISION_DTYPES)}")
    if mcfg.params_dtype != precision:
        log.info("model.params_dtype=%s overridden by train.precision=%s", mcfg.params_dtype,
                 precision)
        mcfg.params_dtype = precision
    model = build_model(mcfg)
    if mcfg.hf_path:
        from ovlt.engine.hf_io import load_hf_weights
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
