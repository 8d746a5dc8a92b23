"""The Qwen2 language model: mcore `GPTModel` with MRoPE, QKV bias, RMSNorm, SwiGLU.

`Qwen2LanguageModel.forward` differs from `GPTModel.forward` in three ways the trainers need:
it can return the final hidden states (for the fused log-prob / GRPO kernels), it masks the
TP vocab padding (rows >= the real vocab size never win a softmax), and labels of -100 give a
zero loss instead of an out-of-range lookup.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import VocabParallelEmbedding
from megatron.core.transformer import TransformerConfig

from ovlt.engine.grad_routing import Writer, note_written, route
from ovlt.models.qwen2_5_vl.specs import backend_for
from ovlt.utils.device import dtype_of



def common_config_kwargs(model_cfg, pp_size: int) -> dict:
    """TransformerConfig fields shared by the LLM and the vision tower."""
    dt = dtype_of(model_cfg.params_dtype)
    return dict(
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=pp_size,
        params_dtype=dt, bf16=dt == torch.bfloat16, fp16=dt == torch.float16,
        pipeline_dtype=dt,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
        hidden_dropout=0.0, attention_dropout=0.0,
        # Fusions are CUDA kernels or TE features; the plain paths are exact everywhere.
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        use_cpu_initialization=not torch.cuda.is_available(),
        # what the layer backend needs set (Transformer Engine's FP8 recipe)
        **backend_for(model_cfg).transformer_config_kwargs(),
    )


def language_config(model_cfg) -> TransformerConfig:
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if model_cfg.num_layers % pp:
        raise ValueError(f"model.num_layers={model_cfg.num_layers} must be divisible by "
                         f"parallel.pipeline_parallel={pp}")
    cfg = TransformerConfig(
        num_layers=model_cfg.num_layers, hidden_size=model_cfg.hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        kv_channels=model_cfg.hidden_size // model_cfg.num_attention_heads,
        layernorm_epsilon=model_cfg.rms_norm_eps,
        add_bias_linear=False, add_qkv_bias=True,
        mrope_section=list(model_cfg.mrope_section),
        **common_config_kwargs(model_cfg, pp))
    return with_ovlt_layer_options(cfg, model_cfg)


def with_ovlt_layer_options(cfg: TransformerConfig, model_cfg) -> TransformerConfig:
    """`cfg` carrying the model options ovlt's own layers read (attention backend, FP8 linears'
    settings) as `ovlt_*` attributes: shared by the LLM and the vision tower."""
    cfg.ovlt_attention_backend = model_cfg.attention_backend
    cfg.ovlt_fp8_grad_format = model_cfg.fp8_grad_format
    cfg.ovlt_fp8_amax_history = model_cfg.fp8_amax_history
    cfg.ovlt_fp8_fprop_fast_accum = model_cfg.fp8_fprop_fast_accum
    cfg.ovlt_fp8_weight_cache = model_cfg.fp8_weight_cache
    return cfg


class EmbeddingIntoMainGrad(torch.autograd.Function):
    """F.embedding whose weight gradient is index-added straight into the fp32 `main_grad`
    (only the rows of this batch's tokens), instead of a dense [V, H] bf16 gradient that mcore
    DDP's hook then adds into main_grad (a zero fill of V x H, a scatter and a V x H add)."""

    @staticmethod
    def forward(ctx, ids, weight):
        ctx.save_for_backward(ids)
        ctx.weight = weight
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        w = ctx.weight
        w.main_grad.index_add_(0, ids.reshape(-1),
                               grad.reshape(-1, grad.shape[-1]).to(w.main_grad.dtype))
        note_written(w)
        # a placeholder gradient (never read: written already) so DDP's hook still fires
        return None, torch.empty_like(w)


class OvltVocabParallelEmbedding(VocabParallelEmbedding):
    """mcore's VocabParallelEmbedding; when its weight's gradient is routed to the embedding
    (`grad_routing.Writer.EMBEDDING`, set by the trainer's CUDA fast paths once DDP gave the
    weight its main_grad) and TP=1, the backward accumulates into main_grad directly
    (`EmbeddingIntoMainGrad`)."""

    def forward(self, input_):
        if not (route(self.weight).writer is Writer.EMBEDDING and self.tp_group.size() == 1
                and self.training
                and torch.is_grad_enabled() and self.weight.requires_grad
                and hasattr(self.weight, "main_grad") and not self.reduce_scatter_embeddings
                and not self.deterministic_mode):
            return super().forward(input_)
        return EmbeddingIntoMainGrad.apply(input_, self.weight)


class Qwen2LanguageModel(GPTModel):
    """`GPTModel` + `true_vocab_size` (the unpadded vocab) and the forward described above."""

    def __init__(self, *args, true_vocab_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.true_vocab_size = true_vocab_size
        if self.pre_process:
            # mcore's LanguageModelEmbedding builds its VocabParallelEmbedding itself (no spec
            # slot): give it the subclass above, same parameters and state dict.
            self.embedding.word_embeddings.__class__ = OvltVocabParallelEmbedding

    def _mask_vocab_padding(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [..., V/tp] of this TP rank; padded vocab rows -> dtype min."""
        per_rank = logits.shape[-1]
        start = parallel_state.get_tensor_model_parallel_rank() * per_rank
        n_valid = self.true_vocab_size - start
        if n_valid >= per_rank:
            return logits
        keep = torch.arange(per_rank, device=logits.device) < max(n_valid, 0)
        return logits.masked_fill(~keep, torch.finfo(logits.dtype).min)

    def forward(self, input_ids, position_ids, decoder_input=None, labels=None,
                packed_seq_params=None, return_hidden: bool = False):
        decoder_input, rotary_pos_emb, *_ = self._preprocess(
            input_ids=input_ids, position_ids=position_ids, decoder_input=decoder_input,
            packed_seq_params=packed_seq_params)
        hidden = self.decoder(hidden_states=decoder_input, attention_mask=None,
                              rotary_pos_emb=rotary_pos_emb, packed_seq_params=packed_seq_params)
        if not self.post_process or return_hidden:
            return hidden
        weight = self.shared_embedding_or_output_weight() if \
            self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden, weight=weight)
        logits = self._mask_vocab_padding(logits)  # [S, B, V/tp]
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        valid = labels >= 0
        loss = self.compute_language_model_loss(labels.clamp(min=0), logits)  # [B, S]
        return loss * valid
