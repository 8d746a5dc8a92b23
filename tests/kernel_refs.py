"""Plain-torch references for the kernel tests: full [T, V] logits, autograd, verl formulas."""
import torch
import torch.nn.functional as F


def ref_logprob(h, w, t, temperature=1.0):
    """(logp [T], entropy [T]) from the full logits in fp32; targets outside [0, V) -> logp 0."""
    logits = (h @ w.t()).float() / temperature
    ls = F.log_softmax(logits, dim=-1)
    valid = (t >= 0) & (t < w.shape[0])
    lp = ls.gather(1, t.clamp(0, w.shape[0] - 1)[:, None]).squeeze(1)
    lp = torch.where(valid, lp, torch.zeros_like(lp))
    return lp, -(ls.exp() * ls).sum(-1)


def ref_kl(logp, ref, kl_type):
    # verl core_algos.kl_penalty
    if kl_type in ("kl", "k1"):
        return logp - ref
    if kl_type == "abs":
        return (logp - ref).abs()
    if kl_type in ("mse", "k2"):
        return 0.5 * (logp - ref).square()
    kl = torch.clamp(ref - logp, min=-20, max=20)
    ratio = torch.exp(kl)
    return torch.clamp(ratio - kl - 1, min=-10, max=10)


def ref_agg(loss_mat, mask, mode):
    # verl core_algos.agg_loss (hyphens -> underscores)
    mask = mask.float()
    if mode == "token_mean":
        return (loss_mat * mask).sum() / (mask.sum() + 1e-8)
    if mode == "seq_mean_token_sum":
        return (loss_mat * mask).sum(-1).mean()
    if mode == "seq_mean_token_mean":
        return ((loss_mat * mask).sum(-1) / mask.sum(-1)).mean()
    return (loss_mat * mask).sum() / mask.shape[-1]


def ref_grpo(h, w, t, old, ref, adv, mask, clip_low=0.2, clip_high=0.3, dual_clip=3.0,
             kl_coef=0.01, kl_type="low_var_kl", temperature=1.0, loss_agg="token_mean"):
    """Loss and metrics, verl compute_policy_loss style; per-token tensors shaped like mask."""
    H = h.shape[-1]
    lp, ent = ref_logprob(h.reshape(-1, H), w, t.reshape(-1), temperature)
    lp, ent = lp.reshape(mask.shape), ent.reshape(mask.shape)
    ratio = torch.exp(torch.clamp(lp - old, -20.0, 20.0))
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clip1 = torch.maximum(pg1, pg2)
    pg = clip1
    if dual_clip is not None:
        pg3 = -adv * dual_clip
        pg = torch.where(adv < 0, torch.minimum(pg3, clip1), clip1)
    kl = ref_kl(lp, ref, kl_type) if kl_coef else torch.zeros_like(lp)
    loss = ref_agg(pg + kl_coef * kl, mask, loss_agg)
    m = mask.float()
    mmean = lambda x: (x.float() * m).sum() / (m.sum() + 1e-8)  # noqa: E731
    with torch.no_grad():
        metrics = {"pg_loss": ref_agg(pg, mask, loss_agg), "kl_loss": ref_agg(kl, mask, loss_agg),
                   "clip_frac": mmean(pg2 > pg1), "ppo_kl": mmean(old - lp),
                   "approx_kl": mmean(0.5 * (lp - old) ** 2), "entropy": mmean(ent),
                   "clip_frac_lower": (mmean((clip1 > -adv * dual_clip) & (adv < 0))
                                       if dual_clip is not None else torch.tensor(0.0))}
    return loss, metrics


def ref_advantages(rewards, group_ids, eps=1e-6, std_normalize=True):
    """verl compute_grpo_outcome_advantage, a loop over groups."""
    out = torch.empty(rewards.shape, dtype=torch.float64)
    r = rewards.double()
    for g in group_ids.unique().tolist():
        idx = (group_ids == g).nonzero().squeeze(1)
        s = r[idx]
        mean, std = (s.mean(), s.std()) if len(s) > 1 else (torch.tensor(0.0), torch.tensor(1.0))
        out[idx] = (s - mean) / (std + eps) if std_normalize else s - mean
    return out
