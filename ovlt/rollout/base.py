"""The rollout-engine interface: prompts (token ids + images) in, completions with log-probs out.

Both engines (vLLM, built-in) implement `RolloutEngine`. The trainer feeds new weights with
`update_weights(iterable of (hf_name, tensor))` — names are HF `Qwen2_5_VLForConditionalGeneration`
names, full (un-sharded) tensors, streamed in bounded buckets.

Per-request settings: a request may carry its own token cap (`GenerationRequest.max_new_tokens`)
and sampling seed (`GenerationRequest.seed`); `request_caps` / `request_seeds` resolve both the
same way for every engine. Seeds follow vLLM's convention for `n > 1`: sample `j` of a request
with seed `s` draws from seed `s + j` (so requests given explicit seeds should space them at
least `n` apart). A request's tokens then depend only on its prompt, its seed and the weights,
never on which other requests share its batch.
"""
from __future__ import annotations

import abc
import random
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0      # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1               # -1 = off
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    n: int = 1                    # samples per prompt
    seed: Optional[int] = None    # base of the per-request seeds (None: fresh each call)
    logprobs: bool = True
    ignore_eos: bool = False      # decode exactly to the cap (benchmarks with random weights)


@dataclass
class GenerationRequest:
    prompt_ids: list[int]                          # already chat-templated, image pads expanded
    pixel_values: Optional[torch.Tensor] = None    # [n_patches, 1176] for this prompt's images
    image_grid_thw: Optional[torch.Tensor] = None  # [n_images, 3]
    images: Optional[list] = None                  # PIL images (vLLM takes raw images)
    prompt_text: Optional[str] = None
    request_id: Optional[str] = None
    max_new_tokens: Optional[int] = None           # this request's cap (None: SamplingParams')
    seed: Optional[int] = None                     # this request's seed (None: derived, see
    #                                                request_seeds)


@dataclass
class Completion:
    request_id: Optional[str]
    token_ids: list[int]
    logprobs: list[float]        # log p(token) under the sampling distribution at temperature 1
    text: str
    finish_reason: str           # "stop" (eos / stop string) | "length"
    index: int = 0               # which of the request's n samples this is


#: `on_complete(request_index, completion)`: called once per completion as it finishes.
OnComplete = Callable[[int, "Completion"], None]

_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit integers that scatters nearby inputs."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derived_seed(base: int, index: int) -> int:
    """The seed of request `index` when it has none: a hash of (base, index) in [0, 2**62), so
    derived seeds of one call are far apart (sample seeds `s + j` of two requests never meet
    in practice) and do not depend on the batch."""
    return splitmix64(splitmix64(int(base) & _MASK64) ^ int(index)) >> 2


def request_seeds(requests: list["GenerationRequest"], params: "SamplingParams") -> list[int]:
    """Each request's sampling seed: its own `seed`, else `derived_seed(params.seed, index)`
    (with `params.seed` None, a fresh random base per call)."""
    base = params.seed
    if base is None and any(r.seed is None for r in requests):
        base = random.SystemRandom().getrandbits(62)
    return [int(r.seed) if r.seed is not None else derived_seed(base, i)
            for i, r in enumerate(requests)]


def request_caps(requests: list["GenerationRequest"], params: "SamplingParams") -> list[int]:
    """Each request's token cap (its own `max_new_tokens`, else the params'), checked >= 1."""
    caps = []
    for i, r in enumerate(requests):
        cap = params.max_new_tokens if r.max_new_tokens is None else r.max_new_tokens
        if int(cap) < 1:
            who = f"request {i} ({r.request_id})" if r.max_new_tokens is not None else "SamplingParams"
            raise ValueError(f"{who}: max_new_tokens must be >= 1, got {cap}")
        caps.append(int(cap))
    return caps


def report_all(outputs: list[list["Completion"]], on_complete: Optional[OnComplete]) -> None:
    """`on_complete` for every completion in request order (engines that finish at once)."""
    if on_complete is None:
        return
    for i, comps in enumerate(outputs):
        for c in comps:
            on_complete(i, c)


class RolloutEngine(abc.ABC):
    #: True for an engine that decodes with the trainer's own parameters (no weight sync,
    #: prompts go as pixel values); False for one holding its own copy (vLLM: weights arrive
    #: through `update_weights`, images as PIL images).
    shares_trainer_weights: bool = False

    @abc.abstractmethod
    def generate(self, requests: list[GenerationRequest], params: SamplingParams,
                 on_complete: Optional[OnComplete] = None) -> list[list[Completion]]:
        """One list of `params.n` completions per request, in request order.
        `on_complete(request_index, completion)` is called once per completion as it finishes
        (rewards can be scored while generation runs); an engine that finishes everything at
        once calls it at the end, in request order."""

    @abc.abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new weights (HF names, full tensors)."""

    def sleep(self) -> None:
        """Free GPU memory (KV cache, and weights when colocated)."""

    def wake(self) -> None:
        """Restore what sleep() freed."""
