"""The rollout-engine interface: prompts (token ids + images) in, completions with log-probs out.

Both engines (vLLM, built-in) implement `RolloutEngine`. The trainer feeds new weights with
`update_weights(iterable of (hf_name, tensor))` — names are HF `Qwen2_5_VLForConditionalGeneration`
names, full (un-sharded) tensors, streamed in bounded buckets.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0      # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1               # -1 = off
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    n: int = 1                    # samples per prompt
    seed: Optional[int] = None
    logprobs: bool = True


@dataclass
class GenerationRequest:
    prompt_ids: list[int]                          # already chat-templated, image pads expanded
    pixel_values: Optional[torch.Tensor] = None    # [n_patches, 1176] for this prompt's images
    image_grid_thw: Optional[torch.Tensor] = None  # [n_images, 3]
    images: Optional[list] = None                  # PIL images (vLLM takes raw images)
    prompt_text: Optional[str] = None
    request_id: Optional[str] = None


@dataclass
class Completion:
    request_id: Optional[str]
    token_ids: list[int]
    logprobs: list[float]        # log p(token) under the sampling distribution at temperature 1
    text: str
    finish_reason: str           # "stop" (eos / stop string) | "length"


class RolloutEngine(abc.ABC):
    #: True for an engine that decodes with the trainer's own parameters (no weight sync,
    #: prompts go as pixel values); False for one holding its own copy (vLLM: weights arrive
    #: through `update_weights`, images as PIL images).
    shares_trainer_weights: bool = False

    @abc.abstractmethod
    def generate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[list[Completion]]:
        """One list of `params.n` completions per request, in request order."""

    @abc.abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new weights (HF names, full tensors)."""

    def sleep(self) -> None:
        """Free GPU memory (KV cache, and weights when colocated)."""

    def wake(self) -> None:
        """Restore what sleep() freed."""
