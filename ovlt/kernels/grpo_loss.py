"""fused_grpo_loss: PPO-clip (dual clip) + KL-to-reference GRPO loss, fused with the log-prob.

The loss is a scalar whose per-token derivative w.r.t. log p(target) is known as soon as a
chunk's statistics are, so the forward chunk loop also turns each chunk's logits into their
gradient and runs the d hidden / d weight GEMMs right there: three GEMMs per chunk in total,
no recompute, no second read of the logits. Backward only scales the stored gradients by the
upstream scalar.

Semantics follow verl / EasyR1 (`compute_policy_loss`, `kl_penalty`, `agg_loss`):
  ratio = exp(clamp(logp - old, -20, 20)); pg1 = -A*ratio; pg2 = -A*clip(ratio, 1-cl, 1+ch)
  pg = max(pg1, pg2); for A < 0: pg = min(pg, -A*dual_clip)
  loss_tok = pg + kl_coef * kl(logp, ref);  loss = agg(loss_tok, loss_mask)
"""
from __future__ import annotations

import torch

from ._lmhead import check_inputs, run_chunks, scale_stored_grads, shard_of

_EPS = 1e-8  # verl's masked_mean epsilon
_KL_TYPES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2",
             "low_var_kl": "k3", "k3": "k3"}
_AGG = {"token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm"}


def _kl(logp, ref, kind):
    """Per-token KL estimate and its derivative w.r.t. logp."""
    diff = logp - ref
    if kind == "k1":
        return diff, torch.ones_like(diff)
    if kind == "abs":
        return diff.abs(), torch.sign(diff)
    if kind == "k2":
        return 0.5 * diff * diff, diff
    # k3 / low_var_kl: exp(ref - logp) - (ref - logp) - 1, inputs clamped to +-20, output +-10
    x = -diff
    xin = (x >= -20) & (x <= 20)
    x = x.clamp(-20, 20)
    r = torch.exp(x)
    k = r - x - 1
    kin = (k >= -10) & (k <= 10)
    return k.clamp(-10, 10), torch.where(xin & kin, 1 - r, torch.zeros_like(r))


def token_terms(logp, old, adv, ref, cfg):
    """Per-token (loss, dloss/dlogp, pg, kl, clipped, dual_clipped), all fp32."""
    lr_raw = logp - old
    inside = (lr_raw >= -20) & (lr_raw <= 20)
    ratio = torch.exp(lr_raw.clamp(-20, 20))
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1 - cfg["clip_low"], 1 + cfg["clip_high"])
    pg = torch.maximum(pg1, pg2)
    d = torch.where((pg1 >= pg2) & inside, pg1, torch.zeros_like(pg1))  # d(-A r)/dlogp = -A r
    clipped = pg2 > pg1
    dual = torch.zeros_like(clipped)
    if cfg["dual_clip"] is not None:
        pg3 = -adv * cfg["dual_clip"]
        dual = (adv < 0) & (pg > pg3)
        pg = torch.where(dual, pg3, pg)
        d = torch.where(dual, torch.zeros_like(d), d)
    kl = torch.zeros_like(pg)
    if cfg["kl_coef"] != 0.0:
        kl, dkl = _kl(logp, ref, cfg["kl_type"])
        d = d + cfg["kl_coef"] * dkl
    return pg + cfg["kl_coef"] * kl, d, pg, kl, clipped, dual


def agg_weights(mask: torch.Tensor, loss_agg: str) -> torch.Tensor:
    """w such that loss = sum_t w_t * loss_t reproduces verl's agg_loss."""
    m = mask.float()
    if loss_agg == "token_mean":
        return m / (m.sum() + _EPS)
    if m.dim() != 2:
        raise ValueError(f"loss_agg={loss_agg!r} needs per-token inputs shaped [B, S], "
                         f"got loss_mask {tuple(mask.shape)}")
    B, S = m.shape
    if loss_agg == "seq_mean_token_sum":
        return m / B
    if loss_agg == "seq_mean_token_mean":  # a sequence with no tokens contributes 0
        return m / (B * m.sum(1, keepdim=True).clamp_min(1.0))
    return m / S  # seq_mean_token_sum_norm (Dr. GRPO): token sums over the max length


class _FusedGRPO(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, old, ref, adv, w, cfg, tp_group, need_dh, need_dw):
        shard = shard_of(weight, tp_group)
        T = hidden.shape[0]
        loss_tok = torch.zeros(T, dtype=torch.float32, device=hidden.device)

        def grad_fn(sl, lse, logp, ent):
            # old None: on-policy, the chunk's own (detached) log-prob is the old one
            lt, d, *_ = token_terms(logp, logp if old is None else old[sl], adv[sl],
                                    None if ref is None else ref[sl], cfg)
            loss_tok[sl] = lt
            return w[sl] * d, None

        grad = need_dh or need_dw
        _, logp, ent, dh, dw = run_chunks(hidden, weight, targets, cfg["temperature"], shard,
                                          grad_fn=grad_fn if grad else None,
                                          need_dh=need_dh, need_dw=need_dw)
        if not grad:
            loss_tok = token_terms(logp, logp if old is None else old, adv, ref, cfg)[0]
        loss = (w * loss_tok).sum()
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype, ctx.done = weight.dtype, False
        ctx.mark_non_differentiable(logp, ent)
        return loss, logp, ent

    @staticmethod
    def backward(ctx, g_loss, _g_logp, _g_ent):
        dh, dw = scale_stored_grads(ctx, g_loss)
        return dh, dw, None, None, None, None, None, None, None, None, None


def fused_grpo_loss(hidden, weight, targets, old_logprobs, ref_logprobs, advantages, loss_mask,
                    clip_low=0.2, clip_high=0.3, dual_clip=3.0, kl_coef=0.01,
                    kl_type="low_var_kl", temperature=1.0, loss_agg="token_mean", tp_group=None,
                    return_logprobs=False):
    """GRPO loss (scalar fp32) and metrics, with the log-prob computed by the fused LM head.

    hidden [T, H] or [B, S, H]; weight [V(_local), H]; targets / old_logprobs / ref_logprobs /
    advantages / loss_mask per token ([T] or [B, S]; the seq_* `loss_agg` modes need [B, S]).
    old/ref log-probs and advantages are constants (no gradient flows into them);
    `old_logprobs=None` means on-policy: the old log-prob is this forward's own, detached
    (ratio exactly 1: the first update after sampling needs no separate old-log-prob pass);
    `return_logprobs=True` also returns that log-prob ([T] fp32, detached) as a third output;
    `ref_logprobs` may be None when kl_coef == 0; `dual_clip=None` disables the dual clip.
    kl_type: low_var_kl|k3, kl|k1, mse|k2, abs. loss_agg: token_mean, seq_mean_token_sum,
    seq_mean_token_mean, seq_mean_token_sum_norm (hyphens accepted).
    tp_group: see `fused_logprob` (vocab-parallel weight shard; identical loss on every rank).

    Metrics (detached fp32 scalars, masked token means whatever `loss_agg` is):
    pg_loss and kl_loss (aggregated like the loss), clip_frac (pg2 > pg1, verl's pg_clipfrac),
    clip_frac_lower (dual clip active), ppo_kl (mean of old - logp, verl's ppo_kl),
    approx_kl (mean of 0.5*(logp - old)^2, Schulman's k2 estimate of KL(old||new)),
    entropy (mean entropy of the tempered policy).
    """
    loss_agg = loss_agg.replace("-", "_")
    if loss_agg not in _AGG:
        raise ValueError(f"loss_agg must be one of {sorted(_AGG)}, got {loss_agg!r}")
    if kl_type not in _KL_TYPES:
        raise ValueError(f"kl_type must be one of {sorted(_KL_TYPES)}, got {kl_type!r}")
    if kl_coef != 0 and ref_logprobs is None:
        raise ValueError("ref_logprobs is required when kl_coef != 0")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    tok_shape = loss_mask.shape
    H = hidden.shape[-1]
    hidden2 = hidden.reshape(-1, H)
    T = hidden2.shape[0]
    flat = {}
    for name, x in (("targets", targets), ("old_logprobs", old_logprobs),
                    ("ref_logprobs", ref_logprobs), ("advantages", advantages)):
        if x is None:
            continue
        if x.shape != tok_shape or x.numel() != T:
            raise ValueError(f"{name} shape {tuple(x.shape)} != loss_mask shape "
                             f"{tuple(tok_shape)} (T={T} tokens)")
        flat[name] = x.reshape(-1) if name == "targets" else x.reshape(-1).detach().float()
    check_inputs(hidden2, weight, flat["targets"])
    cfg = dict(clip_low=float(clip_low), clip_high=float(clip_high),
               dual_clip=None if dual_clip is None else float(dual_clip), kl_coef=float(kl_coef),
               kl_type=_KL_TYPES[kl_type], temperature=float(temperature))
    w = agg_weights(loss_mask.detach(), loss_agg).reshape(-1)
    grad_on = torch.is_grad_enabled()
    need_dh = grad_on and hidden.requires_grad
    need_dw = grad_on and weight.requires_grad
    old, adv, ref = flat.get("old_logprobs"), flat["advantages"], flat.get("ref_logprobs")
    loss, logp, ent = _FusedGRPO.apply(hidden2, weight, flat["targets"], old, ref, adv, w, cfg,
                                       tp_group, need_dh, need_dw)
    with torch.no_grad():
        if old is None:
            old = logp
        _, _, pg, kl, clipped, dual = token_terms(logp, old, adv, ref, cfg)
        m = loss_mask.reshape(-1).float()
        den = m.sum() + _EPS
        metrics = {
            "pg_loss": (w * pg).sum(),
            "kl_loss": (w * kl).sum(),
            "clip_frac": (clipped.float() * m).sum() / den,
            "clip_frac_lower": (dual.float() * m).sum() / den,
            "ppo_kl": ((old - logp) * m).sum() / den,
            "approx_kl": (0.5 * (logp - old) ** 2 * m).sum() / den,
            "entropy": (ent * m).sum() / den,
        }
    return (loss, metrics, logp) if return_logprobs else (loss, metrics)
