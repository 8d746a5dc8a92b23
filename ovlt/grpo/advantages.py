"""Rewards to advantages: each rollout scored through the reward pool in `rewards.style`
(accuracy, weighted with the format reward), overlong responses masked or penalised, advantages
normalised per prompt group (`ovlt.kernels.grpo_advantages`), and groups whose rewards are all
equal dropped (`filter_zero_advantage`): they carry no signal."""
from __future__ import annotations

import torch

from ovlt.grpo.batch import Rollout


def score(pool, rollouts: list[Rollout], rcfg) -> tuple[list[float], list[float]]:
    """(rewards, accuracy) per rollout in `rewards.style`: the accuracy from the pool, then
    (1 - w) * accuracy + w * format reward (EasyR1's weighting; w = rewards.format_weight or the
    style's own)."""
    from ovlt.rewards.math_reward import combine, format_reward, resolve_format_weight
    from ovlt.rewards.pool import accuracy_kwargs
    acc = pool.score([r.text for r in rollouts], [r.answer for r in rollouts],
                     **accuracy_kwargs(rcfg))
    w = resolve_format_weight(rcfg.style, rcfg.format_weight)
    if not w:
        return list(acc), acc
    return [combine(a, format_reward(r.text, rcfg.style), w) for a, r in zip(acc, rollouts)], acc


def assign_advantages(rollouts: list[Rollout], gcfg) -> dict:
    """Overlong handling, group advantages, zero-advantage filtering. Returns stats."""
    from ovlt.kernels import grpo_advantages
    clipped = 0
    for r in rollouts:
        if r.finish_reason == "length":
            clipped += 1
            if gcfg.overlong == "mask":
                r.train = False
            elif gcfg.overlong == "penalty":
                r.reward -= gcfg.overlong_penalty
    if not rollouts:
        return {"clipped": 0, "groups_dropped": 0}
    rw = torch.tensor([r.reward for r in rollouts], dtype=torch.float32)
    gid = torch.tensor([r.group for r in rollouts], dtype=torch.long)
    adv = grpo_advantages(rw, gid)
    dropped = 0
    for g in gid.unique().tolist():
        idx = (gid == g).nonzero().flatten().tolist()
        flat = len({rollouts[i].reward for i in idx}) == 1
        for i in idx:
            rollouts[i].advantage = float(adv[i])
            if flat and gcfg.filter_zero_advantage:
                rollouts[i].train = False
        dropped += int(flat)
    return {"clipped": clipped, "groups_dropped": dropped}
