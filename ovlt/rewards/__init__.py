"""Verifiable rewards for GRPO: answer correctness, format, and a timeout-safe worker pool."""
from ovlt.rewards.extract import extract_final_answer
from ovlt.rewards.math_reward import format_reward, math_reward, score_answer, total_reward
from ovlt.rewards.normalize import grade_answer, normalize_answer
from ovlt.rewards.pool import PoolStats, RewardPool, reward_kwargs

__all__ = ["math_reward", "format_reward", "total_reward", "reward_kwargs", "score_answer", "extract_final_answer",
           "grade_answer", "normalize_answer", "RewardPool", "PoolStats"]
