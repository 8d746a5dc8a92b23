"""The RL prompt each reward style trains with (the text of the user turn; images stay where the
problem's `<image>` placeholders put them).

  ovlt           problem + `rollout.prompt_suffix` (default: the think-then-answer instruction
                 with `<think>` and `<answer>` tags named);
  openvlthinker  OpenVLThinker's `math_format.jinja`: the trimmed problem + " You FIRST think
                 ... provide the final answer." (the released template names no answer
                 format);
  easyr1         EasyR1's `math.jinja`: the trimmed problem + the same sentence + the `<think>`
                 tags and `\\boxed{}` named.
For the reference styles `rollout.prompt_suffix` is not used.
"""
from __future__ import annotations

from ovlt.logging import get_logger, log_once
from ovlt.rewards.styles import check_style

logger = get_logger(__name__)

THINK_FIRST = ("You FIRST think about the reasoning process as an internal monologue and then "
               "provide the final answer.")
STYLE_SUFFIX = {
    "openvlthinker": " " + THINK_FIRST,
    "easyr1": " " + THINK_FIRST + " The reasoning process MUST BE enclosed within <think> </think> "
              "tags. The final answer MUST BE put in \\boxed{}.",
}


def rl_prompt(problem: str, style: str = "ovlt", suffix: str = "") -> str:
    """The user text for one RL problem under `style` (`suffix`: `rollout.prompt_suffix`,
    used by the `ovlt` style only)."""
    if check_style(style) == "ovlt":
        return problem + suffix
    if suffix:
        log_once(logger, f"rl-prompt-{style}", "rewards.style=%s trains with its reference's own "
                 "prompt template; rollout.prompt_suffix is not used", style)
    return problem.strip() + STYLE_SUFFIX[style]
