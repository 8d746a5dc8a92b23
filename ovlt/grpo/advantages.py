"""Rewards to advantages: each rollout scored through the reward pool (math reward +
format_weight x format reward), overlong responses masked or penalised, advantages normalised
per prompt group (`ovlt.kernels.grpo_advantages`), and groups whose rewards are all equal
dropped (`filter_zero_advantage`): they carry no signal."""
from __future__ import annotations

import torch

from ovlt.grpo.batch import Rollout


def score(pool, rollouts: list[Rollout], rcfg) -> tuple[list[float], list[float]]:
    """(rewards, accuracy) per rollout: math reward (+ format_weight x format reward)."""
    from ovlt.rewards.math_reward import format_reward
    acc = pool.score([r.text for r in rollouts], [r.answer for r in rollouts],
                     partial_credit=rcfg.partial_credit, fallback=rcfg.fallback)
    rewards = list(acc)
    if rcfg.format_weight:
        rewards = [a + rcfg.format_weight * format_reward(r.text) for a, r in zip(acc, rollouts)]
    return rewards, acc


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
