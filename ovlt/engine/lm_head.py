"""The LM head of the trainers' losses, applied by the fused kernels (`ovlt/kernels/`) to the rows
that carry a loss only: prompt, image and padding tokens never reach the [tokens x vocab]
GEMMs. In SFT about half of a packed batch is prompt/image; in GRPO the prompt is."""
from __future__ import annotations

import torch


def unwrap(model):
    """The ovlt model inside mcore's DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def tp_size() -> int:
    from megatron.core import parallel_state as ps
    return ps.get_tensor_model_parallel_world_size()


def tp_group():
    """The tensor-parallel group for the kernels' vocab-parallel path (None at TP=1)."""
    from megatron.core import parallel_state as ps
    return ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 \
        else None


def flat_hidden(hidden: torch.Tensor) -> torch.Tensor:
    """Final hidden states [S, B, H] -> [B*S, H], in the order of `labels.view(-1)`."""
    return hidden.transpose(0, 1).reshape(-1, hidden.shape[-1])


def loss_rows(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of the tokens with a non-zero loss weight (one host sync)."""
    return mask.reshape(-1).nonzero().squeeze(1)


def host_side_inputs(net, batch) -> dict:
    """Model inputs the host already knows, from the (CPU) micro-batch: segment boundaries,
    image grids and the `<|image_pad|>` count. Read there, they cost the model no device sync."""
    n_img = int((batch.input_ids == net.image_token_id).sum()) \
        if getattr(net, "pre_process", False) else None
    return dict(packed_seq_params=batch.cu_seqlens, image_grid_thw=batch.image_grid_thw,
                num_image_tokens=n_img)
