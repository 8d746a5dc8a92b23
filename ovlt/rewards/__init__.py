"""Verifiable rewards for GRPO in three styles (ovlt | openvlthinker | easyr1): answer
correctness, format, the RL prompt each style trains with, and a timeout-safe worker pool."""
from ovlt.rewards.extract import extract_final_answer
from ovlt.rewards.grading import answers_equal, choice_letter, score_answer
from ovlt.rewards.math_reward import format_reward, math_reward, total_reward
from ovlt.rewards.pool import PoolStats, RewardPool, reward_kwargs
from ovlt.rewards.prompts import rl_prompt
from ovlt.rewards.styles import STYLES

__all__ = ["math_reward", "format_reward", "total_reward", "reward_kwargs", "score_answer",
           "answers_equal", "choice_letter", "extract_final_answer", "rl_prompt", "STYLES",
           "RewardPool", "PoolStats"]
