"""vLLM rollout engine (vLLM 0.26, V1 engine), colocated with the trainer.

- Built with `load_format="dummy"`: vLLM reads only config/tokenizer/processor files from
  `model.hf_path`; the weights always come from the trainer through `update_weights` (the
  reshard stream of HF names + full tensors, `ovlt.rollout.reshard.iter_hf_weights`), loaded by
  `OvltWorkerExtension.ovlt_load_weights` via the vLLM model's own `load_weights`.
- Colocated: `VLLM_ENABLE_V1_MULTIPROCESSING=0` keeps the engine core in this process (tensors
  pass by reference); with `rollout.tensor_parallel > 1` under torchrun every trainer rank is one
  vLLM TP rank (`distributed_executor_backend="external_launcher"`).
- Memory: `enable_sleep_mode=True`; `sleep()` = level 2 (drop weights and KV cache: the next
  update overwrites the weights anyway), `wake()` re-allocates the weights, the KV cache is
  re-allocated just before the next `generate`. The prefix cache is reset after every update.
- Multimodal prompts as vLLM expects for Qwen2.5-VL: token ids with ONE `<|image_pad|>` per
  image (vLLM's processor expands it to the image's tokens) and the PIL images (already
  smart-resized, so vLLM computes the same grid as ovlt's processor).
- Log-probs: `raw_logprobs` (log-softmax of the unscaled logits) equals the contract at
  temperature 1 (the recipe's); at other temperatures vLLM's `processed_logprobs` (after
  temperature *and* top-k/top-p renormalisation) is the closest it offers, and the trainer
  recomputes the old log-probs itself in any case.
"""
from __future__ import annotations

import os
from typing import Iterable

import torch

from ovlt.logging import get_logger
from ovlt.rollout.base import Completion, GenerationRequest, RolloutEngine, SamplingParams

log = get_logger(__name__)

VLLM_VERSION = "0.26.0"


def collapse_image_pads(ids: list[int], image_token_id: int) -> list[int]:
    """Each run of image-pad tokens -> one pad (vLLM's processor re-expands it)."""
    out = []
    for i, t in enumerate(ids):
        if t == image_token_id and i > 0 and ids[i - 1] == image_token_id:
            continue
        out.append(t)
    return out


class VLLMEngine(RolloutEngine):
    def __init__(self, cfg, tokenizer=None, hf_dir: str | None = None):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import vllm
        if not vllm.__version__.startswith(VLLM_VERSION.rsplit(".", 1)[0]):
            log.warning("vLLM %s installed; ovlt is written against %s", vllm.__version__, VLLM_VERSION)
        rc, m = cfg.rollout, cfg.model
        hf_dir = hf_dir or m.hf_path
        if not hf_dir:
            raise ValueError("the vLLM engine needs model.hf_path (an HF directory with config.json, "
                             "tokenizer and preprocessor_config.json; weights are not read)")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.image_token_id = m.image_token_id
        kw = dict(model=str(hf_dir), load_format="dummy", dtype="bfloat16", seed=cfg.grpo.train.seed,
                  tensor_parallel_size=rc.tensor_parallel,
                  gpu_memory_utilization=rc.gpu_memory_utilization, enable_sleep_mode=True,
                  max_model_len=rc.max_prompt_length + rc.max_new_tokens,
                  enforce_eager=not rc.cuda_graphs, enable_prefix_caching=True,
                  limit_mm_per_prompt={"image": 8},
                  mm_processor_kwargs={"min_pixels": cfg.data.min_pixels,
                                       "max_pixels": cfg.data.max_pixels},
                  worker_extension_cls="ovlt.rollout.vllm_worker.OvltWorkerExtension",
                  logprobs_mode="raw_logprobs" if rc.temperature in (0.0, 1.0) else "processed_logprobs")
        if rc.tensor_parallel > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            kw["distributed_executor_backend"] = "external_launcher"
        self.llm = vllm.LLM(**kw)
        self._kv_asleep = False
        self._weights_asleep = False

    def generate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[list[Completion]]:
        import vllm
        if self._weights_asleep:
            raise RuntimeError("VLLMEngine.generate after sleep(): call wake() and update_weights() first")
        if self._kv_asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._kv_asleep = False
        prompts = []
        for r in requests:
            p = {"prompt_token_ids": collapse_image_pads(list(r.prompt_ids), self.image_token_id)}
            if r.pixel_values is not None or r.images:
                if not r.images:
                    raise ValueError(f"request {r.request_id}: vLLM needs the PIL images "
                                     "(GenerationRequest.images), not only pixel_values")
                p["multi_modal_data"] = {"image": list(r.images)}
            prompts.append(p)
        sp = vllm.SamplingParams(
            n=params.n, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else 0, max_tokens=params.max_new_tokens,
            stop=list(params.stop) or None, include_stop_str_in_output=True, seed=params.seed,
            logprobs=0 if params.logprobs else None, skip_special_tokens=True)
        outs = self.llm.generate(prompts, sp, use_tqdm=False)
        result = []
        for r, o in zip(requests, outs):
            comps = []
            for c in o.outputs:
                ids = list(c.token_ids)
                lps = [float(d[t].logprob) for t, d in zip(ids, c.logprobs)] if c.logprobs else []
                comps.append(Completion(request_id=r.request_id, token_ids=ids, logprobs=lps,
                                        text=c.text, finish_reason="length"
                                        if c.finish_reason == "length" else "stop"))
            result.append(comps)
        return result

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self._weights_asleep:
            self.wake()
        n = self.llm.collective_rpc("ovlt_load_weights", args=(named_tensors,))
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights
        log.debug("vLLM: loaded %s tensors", n)

    def sleep(self) -> None:
        self.llm.sleep(level=2)
        self._kv_asleep = self._weights_asleep = True

    def wake(self) -> None:
        if self._weights_asleep:
            self.llm.wake_up(tags=["weights"])
            self._weights_asleep = False
