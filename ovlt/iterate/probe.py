"""The probe: does a round's GRPO raise the reward it optimises?

A fixed set of prompts (the first `iterate.probe.prompts` problems of the held-out split in
file order, of `iterate.probe.difficulties` when set) is sampled `iterate.probe.samples` times
per prompt from the SFT model (before GRPO) and from the GRPO model (after), with the same
sampling seed, temperature and length cap, the prompts encoded and the responses scored
exactly as the GRPO trainer does (`ovlt.grpo.data.build_requests`, `ovlt.grpo.advantages.score`;
a record whose image is unusable is the trainer's logged skip). Unlike the trainer's per-step
rewards, which are measured on different prompts at every step, the two numbers are comparable.

Standard error of the probe mean given its prompts (the sampling noise): with s_i^2 the unbiased
variance of prompt i's n rewards, se = sqrt(sum_i s_i^2 / n) / P (for 0/1 rewards
sqrt(sum_i p_i (1 - p_i) / (n - 1)) / P).

The rise: sample j of prompt i draws from the same seed before and after GRPO (common random
numbers), so the two runs are paired and the rise's standard error is that of the per-sample
differences d_ij = after_ij - before_ij, the same formula over d (`paired_rise`). Where the two
models agree on a sample the draws coincide and d_ij is 0: this is the sampling noise of the
rise itself, smaller than sqrt(se_before^2 + se_after^2), which treats the runs as
independent (`diff_se`, kept beside it).
"""
from __future__ import annotations

import math
from typing import Sequence


def probe_stats(per_prompt: Sequence[Sequence[float]]) -> dict:
    """Mean reward over every sample and its standard error given the prompt set."""
    groups = [list(map(float, g)) for g in per_prompt if len(g)]
    if not groups:
        return {"mean": None, "se": None, "prompts": 0, "samples": 0}
    means = [sum(g) / len(g) for g in groups]
    var_of_mean = 0.0
    for g, m in zip(groups, means):
        if len(g) > 1:
            var_of_mean += sum((x - m) ** 2 for x in g) / (len(g) - 1) / len(g)
    p = len(groups)
    return {"mean": sum(means) / p, "se": math.sqrt(var_of_mean) / p, "prompts": p,
            "samples": sum(len(g) for g in groups), "per_prompt": means, "rewards": groups}


def paired_rise(before: Sequence[Sequence[float]], after: Sequence[Sequence[float]]):
    """Mean and standard error of after - before over samples paired by (prompt, sample
    index), or None when the two runs' prompts or samples do not line up."""
    if len(before) != len(after) or any(len(b) != len(a) for b, a in zip(before, after)):
        return None
    d = probe_stats([[x - y for x, y in zip(a, b)] for b, a in zip(before, after)])
    return None if d["mean"] is None else {"rise": d["mean"], "se": d["se"]}


def diff_se(se_before, se_after):
    if se_before is None or se_after is None:
        return None
    return math.hypot(se_before, se_after)


def probe_records(records: list, n_prompts: int, difficulties=()) -> list:
    """The first `n_prompts` records (of the given difficulties, if any), in file order."""
    if difficulties:
        records = [r for r in records if r.difficulty in set(difficulties)]
    return records[:n_prompts] if n_prompts > 0 else []


def reward_pool(cfg):
    """The reward worker pool the GRPO trainer builds (`grpo.reward_fn`, rewards.*)."""
    from ovlt.rewards.pool import RewardPool
    kw = {"fn": cfg.grpo.reward_fn} if cfg.grpo.reward_fn else {}
    return RewardPool(num_workers=cfg.rewards.num_workers, timeout_s=cfg.rewards.timeout_s, **kw)


def probe_reward(cfg, engine, records: list, pool=None) -> dict:
    """Sample every record `iterate.probe.samples` times on `engine` and score the responses
    with the GRPO trainer's prompt encoding and reward (`pool`: a `reward_pool(cfg)`, made and
    closed here when None). Returns `probe_stats` plus a few decoded samples."""
    from ovlt.data.image_loader import ImageLoader
    from ovlt.data.tokenizer import load_tokenizer
    from ovlt.grpo.advantages import score
    from ovlt.grpo.batch import Rollout
    from ovlt.grpo.data import build_requests
    from ovlt.rollout.base import SamplingParams

    pc, rc = cfg.iterate.probe, cfg.rollout
    skipped: list = []
    reqs = build_requests(records, cfg, load_tokenizer(),
                          ImageLoader(cfg.data.min_pixels, cfg.data.max_pixels, "pil"), engine,
                          skipped)
    left_out = {id(r) for r in skipped}
    records = [r for r in records if id(r) not in left_out]
    temperature = rc.temperature if pc.temperature is None else pc.temperature
    params = SamplingParams(temperature=temperature, top_p=rc.top_p, top_k=rc.top_k,
                            max_new_tokens=pc.max_new_tokens or rc.max_new_tokens,
                            stop=list(rc.stop), n=pc.samples, seed=pc.seed, logprobs=False)
    outs = []
    for s in range(0, len(reqs), max(1, pc.batch_size)):
        outs += engine.generate(reqs[s:s + pc.batch_size], params)
    rolls = [Rollout(prompt_ids=[], response_ids=list(c.token_ids), group=i, answer=rec.answer,
                     text=c.text, finish_reason=c.finish_reason)
             for i, (rec, cs) in enumerate(zip(records, outs)) for c in cs]
    own = pool is None
    pool = reward_pool(cfg) if own else pool
    try:
        rewards, acc = score(pool, rolls, cfg.rewards)
    finally:
        if own:
            pool.close()
    per, k = [], 0
    for cs in outs:
        per.append(rewards[k:k + len(cs)])
        k += len(cs)
    out = probe_stats(per)
    out.update(accuracy=sum(acc) / max(1, len(acc)), temperature=temperature,
               samples_per_prompt=pc.samples, seed=pc.seed,
               examples=[r.text for r in rolls[:4]])
    return out
