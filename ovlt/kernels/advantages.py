"""grpo_advantages: group-normalised outcome advantages for groups of any size.

verl / EasyR1 `compute_grpo_outcome_advantage`: A_i = (r_i - mean_g) / (std_g + eps) with the
unbiased std of the rollouts sharing a group id; a group of one has mean 0 and std 1. Group
ids are arbitrary integers (not necessarily sorted or dense). On CUDA at or above
`TRITON_MIN_N` rollouts (and always under TRITON_INTERPRET=1 on CPU) a Triton segmented
reduction (atomics: sum/count, then squared deviations, then normalise) runs; below it,
and on CPU, the same arithmetic in torch (index_add_) is as fast (launch-bound).
"""
from __future__ import annotations

import torch

from . import triton_ops as ops

# H100 (benchmarks/grpo_loss.py): both paths are launch-bound (~0.3-0.6 ms incl. unique);
# Triton was faster at 2048, 8K and 64K (and at 2560 in one of two runs); torch below 2048
TRITON_MIN_N = 2048


def torch_group_advantages(r, inv, G, eps, std_normalize):
    """The torch path (and reference) of `grpo_advantages`: r [N] fp32, inv [N] dense group
    ids in [0, G) (`torch.unique(..., return_inverse=True)`)."""
    zeros = torch.zeros(G, dtype=torch.float32, device=r.device)
    cnt = zeros.clone().index_add_(0, inv, torch.ones_like(r))
    mean = zeros.clone().index_add_(0, inv, r) / cnt
    single = cnt < 1.5
    mean = torch.where(single, torch.zeros_like(mean), mean)
    a = r - mean[inv]
    if not std_normalize:
        return a
    m2 = zeros.index_add_(0, inv, a * a)
    std = torch.where(single, torch.ones_like(m2), torch.sqrt(m2 / (cnt - 1).clamp_min(1)))
    return a / (std[inv] + eps)


def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6,
                    std_normalize: bool = True) -> torch.Tensor:
    """rewards [N] (any float dtype), group_ids [N] (ints) -> advantages [N] fp32."""
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards and group_ids must both be [N], got {tuple(rewards.shape)} "
                         f"and {tuple(group_ids.shape)}")
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be integers, got {group_ids.dtype}")
    r = rewards.detach().float().contiguous()
    if r.numel() == 0:
        return r
    uniq, inv = torch.unique(group_ids, return_inverse=True)
    G = uniq.numel()
    triton_ok = ops.use_triton(r) and (not r.is_cuda or r.numel() >= TRITON_MIN_N)
    if triton_ok:
        return ops.group_advantages(r, inv.to(torch.int32).contiguous(), G, eps, std_normalize)
    return torch_group_advantages(r, inv, G, eps, std_normalize)
