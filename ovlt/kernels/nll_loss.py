"""fused_nll_loss: the SFT loss sum_t w_t * -log p(target_t), fused with the LM head.

Like `fused_grpo_loss`, the per-token derivative (-w_t) is known at forward time, so each
logits chunk is turned into its gradient right after its statistics: three GEMMs per chunk,
no [T, V] logits, no recompute; backward only scales the stored gradients.
"""
from __future__ import annotations

import torch

from ovlt.engine.grad_routing import note_written

from ._lmhead import check_inputs, run_chunks, scale_stored_grads, shard_of


class _FusedNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, w, tp_group, need_dh, need_dw, dw_into,
                dw_into_fresh, chunk_bytes):
        shard = shard_of(weight, tp_group)
        into = dw_into if need_dw else None
        grad = need_dh or need_dw
        _, logp, _, dh, dw = run_chunks(hidden, weight, targets, 1.0, shard,
                                        grad_fn=(lambda sl, *_: (-w[sl], None)) if grad else None,
                                        need_dh=need_dh, need_dw=need_dw and into is None,
                                        dw_into=into, dw_into_fresh=dw_into_fresh,
                                        chunk_bytes=chunk_bytes)
        if into is not None:  # from here on main_grad holds this step's gradient
            note_written(weight)
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype, ctx.done = weight.dtype, False
        ctx.weight = weight if into is not None else None
        ctx.mark_non_differentiable(logp)
        return -(w * logp).sum(), logp

    @staticmethod
    def backward(ctx, g_loss, _g_logp):
        dh, dw = scale_stored_grads(ctx, g_loss)
        if ctx.weight is not None:
            # dW went into main_grad at forward time for an upstream gradient of 1 (the
            # trainer backpropagates this sum as is); checked without a host sync
            torch._assert_async(g_loss == 1)
            note_written(ctx.weight)
            dw = torch.empty_like(ctx.weight)  # placeholder so DDP's grad hook still fires
        return dh, dw, None, None, None, None, None, None, None, None


def fused_nll_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   token_weights: torch.Tensor | None = None, tp_group=None,
                   dw_into: torch.Tensor | None = None, dw_into_fresh: bool = False,
                   chunk_bytes: int | None = None):
    """(sum_t token_weights[t] * -log softmax(hidden @ weight.T)[t, targets[t]], logp [T]).

    hidden [T, H], weight [V(_local), H] (see `fused_logprob` for `tp_group`), targets [T]
    global ids (outside [0, V) -> logp 0, no gradient), token_weights [T] (default 1).
    The loss is a differentiable fp32 scalar; logp is detached.
    `dw_into` (mcore's fp32 `weight.main_grad`): the weight gradient is added into it during
    the forward, which marks the weight written (`ovlt.engine.grad_routing.note_written`, so a later forward of the same
    step knows main_grad holds this step's gradient); the backward must then receive an
    upstream gradient of exactly 1 (asserted on the device). `dw_into_fresh`: dw_into holds
    stale values (a buffer the step did not zero): the gradient overwrites them.
    `chunk_bytes`: logits-chunk budget for this call (default `ovlt.kernels.config.chunk_bytes`).
    """
    check_inputs(hidden, weight, targets)
    w = (torch.ones(hidden.shape[0], device=hidden.device) if token_weights is None
         else token_weights.detach().reshape(-1).float())
    if w.numel() != hidden.shape[0]:
        raise ValueError(f"token_weights has {w.numel()} entries for {hidden.shape[0]} tokens")
    grad_on = torch.is_grad_enabled()
    if dw_into is not None and (dw_into.shape != weight.shape or dw_into.dtype != torch.float32):
        raise ValueError(f"dw_into must be fp32 {tuple(weight.shape)}, got {dw_into.dtype} "
                         f"{tuple(dw_into.shape)}")
    return _FusedNLL.apply(hidden, weight, targets, w, tp_group,
                           grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
                           dw_into, bool(dw_into_fresh), chunk_bytes)
