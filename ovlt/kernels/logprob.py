"""fused_logprob: log p(target) (and entropy) of softmax(hidden @ W^T / temperature), chunked.

Forward: one GEMM per token chunk plus the Triton row statistics; saves only lse and entropy
([T] fp32). Backward: the upstream gradient of the per-token outputs is only known then, so
each chunk's logits are recomputed (one more GEMM), overwritten by their gradient, and fed to
the d hidden / d weight GEMMs. For a scalar loss known at forward time, `fused_grpo_loss`
skips that recompute.
"""
from __future__ import annotations

import torch

from ._lmhead import check_inputs, run_chunks, shard_of


class _FusedLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, tp_group):
        shard = shard_of(weight, tp_group)
        lse, logp, ent, _, _ = run_chunks(hidden, weight, targets, temperature, shard)
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.temperature, ctx.shard = temperature, shard
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dh or need_dw):
            return None, None, None, None, None
        if g_logp is None:
            g_logp = torch.zeros_like(lse)

        def grad_fn(sl, *_):
            return g_logp[sl], (None if g_ent is None else g_ent[sl])

        _, _, _, dh, dw = run_chunks(hidden, weight, targets, ctx.temperature, ctx.shard,
                                     grad_fn=grad_fn, saved=(lse, ent), need_dh=need_dh,
                                     need_dw=need_dw)
        return dh, (dw.to(weight.dtype) if dw is not None else None), None, None, None


def fused_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  temperature: float = 1.0, return_entropy: bool = False, tp_group=None):
    """log softmax(hidden @ weight.T / temperature)[t, targets[t]] as fp32 [T], never
    building the [T, V] logits.

    hidden [T, H] and weight [V, H] share a dtype (the GEMMs run in it, statistics in fp32).
    With `tp_group`, `weight` is this rank's vocab shard (rank r holds rows
    [r*V_local, (r+1)*V_local) of the full head), `hidden` is the same on every rank, targets
    are global ids, and the returned d hidden is already summed over the group (do not also
    wrap hidden in megatron's copy-to-TP-region). Targets outside [0, V) (e.g. -100) give
    logp 0 and no gradient. `return_entropy=True` also returns the entropy [T] of the same
    tempered distribution, differentiable too.
    """
    check_inputs(hidden, weight, targets)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logp, ent = _FusedLogprob.apply(hidden, weight, targets, float(temperature), tp_group)
    return (logp, ent) if return_entropy else logp
