"""Qwen2.5-VL on megatron-core: vision tower (first PP stage) + Qwen2 LLM (all stages).

forward(input_ids [B,S], position_ids [3,B,S], pixel_values=None, image_grid_thw=None,
        packed_seq_params=None | cu_seqlens, labels=None, return_hidden=False)
  * first stage: token embeddings; image features (vision tower on all images of the batch)
    are scattered at `image_token_id` positions in sample-major order, as HF does;
  * other stages: the activation from `set_input_tensor`;
  * last stage: logits [B,S,V/tp] (vocab-parallel, padding masked), per-token loss [B,S] with
    `labels` (-100 = no loss), or final hidden states [S,B,H] with `return_hidden=True`;
    non-last stages return their hidden states [S,B,H] for the pipeline schedule.
Packed micro-batches: B=1, `cu_seqlens` [n+1] (or a PackedSeqParams with qkv_format "thd")
keep attention inside each sample. Host-side inputs avoid device syncs: `cu_seqlens` and
`image_grid_thw` may stay on the CPU, and `num_image_tokens` (the `<|image_pad|>` count, known
to the data pipeline) replaces counting them on the GPU. `image_features` (the tower's output
for these images, computed a step ahead while the tower is frozen) replace running the tower.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

from ovlt.models.qwen2_5_vl.language import Qwen2LanguageModel
from ovlt.models.qwen2_5_vl.vision import VisionModel
from ovlt.utils.device import to_device_async


@dataclass
class LLMPackedSeqParams(PackedSeqParams):
    """PackedSeqParams + the boundaries' host copy (ovlt's core attention groups segments from
    it without a device sync)."""
    host_cu_seqlens_q: Optional[torch.Tensor] = None


def packed_params(cu_seqlens: torch.Tensor, device=None, qkv_format: str = "thd") -> PackedSeqParams:
    """Packed-row attention params from `cu_seqlens` (host or device tensor). `qkv_format`:
    "thd" for Transformer Engine's attention; "sbhd" for ovlt's core attention, where the row is
    one [T, 1, ...] sequence to mcore (MRoPE positions are per token, so RoPE needs no
    per-sample split: mcore's thd RoPE loops over samples with host syncs) and the segments
    are kept apart by the core attention through cu_seqlens."""
    host = cu_seqlens.to("cpu", torch.int32)
    cu = to_device_async(host, device if device is not None else cu_seqlens.device)
    longest = int((host[1:] - host[:-1]).max()) if host.numel() > 1 else 0
    return LLMPackedSeqParams(qkv_format=qkv_format, cu_seqlens_q=cu, cu_seqlens_kv=cu,
                              max_seqlen_q=longest, max_seqlen_kv=longest,
                              host_cu_seqlens_q=host)


class Qwen2_5_VLModel(MegatronModule):
    def __init__(self, model_cfg, language_model: Qwen2LanguageModel,
                 vision_model: Optional[VisionModel]):
        super().__init__(language_model.config)
        self.model_cfg = model_cfg
        self.image_token_id = model_cfg.image_token_id
        self.pre_process = language_model.pre_process
        self.post_process = language_model.post_process
        self.language_model = language_model
        self.vision_model = vision_model  # None off the first pipeline stage
        self.share_embeddings_and_output_weights = \
            language_model.share_embeddings_and_output_weights
        # ovlt's core attention takes packed rows as sbhd + cu_seqlens; TE's needs thd.
        from ovlt.models.qwen2_5_vl.attention import OvltCoreAttention
        ours = [isinstance(layer.self_attention.core_attention, OvltCoreAttention)
                for layer in language_model.decoder.layers]
        self.llm_qkv_format = "sbhd" if all(ours) else "thd"

    # ---------------------------------------------------------------- pipeline / kernels API
    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def output_weight(self) -> torch.Tensor:
        """This rank's vocab shard of the LM head [V_padded/tp, H] (tied: the embedding).
        Rows >= `vocab_size` (see `vocab_range`) are padding."""
        if not self.post_process:
            raise RuntimeError("output_weight() exists only on the last pipeline stage")
        if self.share_embeddings_and_output_weights:
            return self.language_model.shared_embedding_or_output_weight()
        return self.language_model.output_layer.weight

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        """mcore's hook for tied embeddings: `finalize_model_grads` finds this module (it has
        `pre_process`) and all-reduces this weight's grad over the embedding group (PP > 1)."""
        return self.language_model.shared_embedding_or_output_weight()

    @property
    def vocab_size(self) -> int:
        return self.language_model.true_vocab_size

    def vocab_range(self) -> tuple[int, int]:
        """[start, end) of the real vocab ids held by this TP rank's logits / output_weight."""
        from megatron.core import parallel_state
        per = self.language_model.vocab_size // parallel_state.get_tensor_model_parallel_world_size()
        start = parallel_state.get_tensor_model_parallel_rank() * per
        return start, max(start, min(start + per, self.vocab_size))

    def freeze(self, vision: bool = False, merger: bool = False, llm: bool = False) -> None:
        """Stop gradients for the vision blocks+patch embed, the merger, and/or the LLM."""
        if self.vision_model is not None:
            for name, p in self.vision_model.named_parameters():
                is_merger = name.startswith("merger.")
                if (is_merger and merger) or (not is_merger and vision):
                    p.requires_grad_(False)
        if llm:
            for p in self.language_model.parameters():
                p.requires_grad_(False)

    # ---------------------------------------------------------------- forward
    def _vision_trainable(self) -> bool:
        return self.vision_model is not None and any(
            p.requires_grad for p in self.vision_model.parameters())

    def _embed(self, input_ids, pixel_values, image_grid_thw, num_image_tokens=None,
               image_features=None):
        emb = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [S,B,H]
        is_image = input_ids == self.image_token_id  # [B,S]
        if image_features is not None and image_grid_thw is not None and len(image_grid_thw):
            feats = image_features.to(emb.dtype)
        elif pixel_values is not None and image_grid_thw is not None and len(image_grid_thw):
            feats = self.vision_model(pixel_values, image_grid_thw).to(emb.dtype)
        else:
            feats = None
        if feats is not None:
            n_tok = int(is_image.sum()) if num_image_tokens is None else int(num_image_tokens)
            if feats.shape[0] != n_tok:
                raise ValueError(f"{n_tok} <|image_pad|> tokens in input_ids but the images "
                                 f"give {feats.shape[0]} features (grids "
                                 f"{image_grid_thw.tolist()})")
            # HF order: sample by sample ([B,S] row-major), then back to mcore's [S,B,H].
            flat = emb.transpose(0, 1)
            flat = flat.masked_scatter(is_image.unsqueeze(-1), feats)
            return flat.transpose(0, 1).contiguous()
        if (bool(is_image.any()) if num_image_tokens is None else num_image_tokens > 0):
            raise ValueError("input_ids contain <|image_pad|> tokens but no pixel_values/"
                             "image_grid_thw were given")
        if self.training and self._vision_trainable():
            # No image in this micro-batch: run the tower on one blank 2x2 unit and add it
            # times zero, so every rank runs the same TP collectives and vision params get
            # (zero) gradients like on ranks that had images.
            m = self.vision_model.merge
            blank_grid = torch.tensor([[1, m, m]], dtype=torch.long)
            in_f = self.vision_model.patch_embed.proj.in_features
            blank = torch.zeros(m * m, in_f, device=emb.device, dtype=emb.dtype)
            emb = emb + 0.0 * self.vision_model(blank, blank_grid).sum().to(emb.dtype)
        return emb

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                pixel_values: Optional[torch.Tensor] = None,
                image_grid_thw: Optional[torch.Tensor] = None,
                packed_seq_params: Union[None, PackedSeqParams, torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, return_hidden: bool = False,
                num_image_tokens: Optional[int] = None,
                image_features: Optional[torch.Tensor] = None):
        if isinstance(packed_seq_params, torch.Tensor):
            if input_ids.shape[0] != 1:
                raise ValueError(f"packed (cu_seqlens) input needs batch 1, got {input_ids.shape[0]}")
            packed_seq_params = packed_params(packed_seq_params, input_ids.device,
                                              self.llm_qkv_format)
        if position_ids.dim() != 3 or position_ids.shape[0] != 3:
            raise ValueError(f"position_ids must be [3, B, S] (MRoPE), got {tuple(position_ids.shape)}")
        decoder_input = None
        if self.pre_process:
            decoder_input = self._embed(input_ids, pixel_values, image_grid_thw, num_image_tokens,
                                        image_features)
        return self.language_model(input_ids, position_ids, decoder_input=decoder_input,
                                   labels=labels, packed_seq_params=packed_seq_params,
                                   return_hidden=return_hidden)
