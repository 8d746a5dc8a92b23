"""vLLM rollout engine (vLLM 0.26, V1 engine), colocated with the trainer.

Checked against the vLLM 0.26.0 source (file references below are inside the `vllm` package):
- Weights: with the trainer's model (`make_engine(model=...)`, GRPO) the engine is built with
  `load_format="dummy"`: vLLM reads only config/tokenizer/processor files from
  `model.hf_path`, and the weights come from the trainer through `update_weights` (the reshard
  stream of HF names + full tensors, `ovlt.rollout.reshard.iter_hf_weights`), loaded by
  `OvltWorkerExtension.ovlt_load_weights` via the vLLM model's own `load_weights`. Without a
  trainer (eval, the iterate loop's generation) vLLM loads the HF directory's weights itself.
- In-process: `VLLM_ENABLE_V1_MULTIPROCESSING=0` (forced) keeps the engine core in this process
  (`InprocClient` + `UniProcExecutor`), so `collective_rpc` hands the tensor generator to the
  worker by reference. Under torchrun (world size > 1) every trainer rank runs one vLLM engine
  with `distributed_executor_backend="external_launcher"`: consecutive groups of
  `rollout.tensor_parallel` ranks form one vLLM TP group (`distributed/parallel_state.py`
  `initialize_model_parallel`: ExternalDP x DP x PP x TP), and all ranks of a group must call
  `generate` with the same prompts — the trainer gives every rank of a data-parallel replica
  the same prompts, so `rollout.tensor_parallel` must divide the trainer's TP x CP.
- Memory: `enable_sleep_mode=True` (cumem allocator). `sleep()` = level 2 (weights and KV cache
  discarded; the next update overwrites the weights anyway); `wake()` re-allocates the weights
  only (`wake_up(tags=["weights"])`, buffers such as RoPE caches are restored by the worker);
  the KV cache is re-allocated just before the next `generate`. The scheduler stays paused
  until every tag is awake (`v1/engine/core.py:wake_up`), so `generate` always wakes the KV
  cache first. After every weight update the prefix cache and the encoder (vision embedding)
  cache are reset: both hold values computed with the old weights.
- Prompts: token ids with ONE `<|image_pad|>` per image plus the PIL images. vLLM's Qwen2-VL
  processor replaces each single pad by the image's `grid_t*grid_h*grid_w/4` pads
  (`model_executor/models/qwen2_vl.py:_get_prompt_updates`, applied to token prompts by
  `multimodal/processing/processor.py:_apply_prompt_updates`, one match per image); an already
  expanded run would be expanded again. The images are ovlt's smart-resized ones, so vLLM's
  processor computes the same grid (its resize is then a no-op).
- Log-probs (`logprobs=0`: the sampled token's log-prob only, a list of {token: Logprob} per
  step): `logprobs_mode="raw_logprobs"` (log-softmax of the unscaled logits) is the contract at
  temperature 1 (the recipe's) and for greedy; at other temperatures `processed_logprobs`
  (after temperature *and* top-k/top-p masking, renormalised) is the closest vLLM offers — equal
  to the contract when top-p = 1 and top-k is off. The trainer recomputes the old log-probs
  itself in any case. vLLM's logits are bf16 before the fp32 log-softmax (as the built-in
  engine's), so expect ~1e-1 absolute differences to an fp32-logit recomputation.
- Requests: every request of a call goes to ONE `LLM.generate` (vLLM's scheduler batches them
  continuously), with one `vllm.SamplingParams` per request (`LLM.generate` takes a list):
  the request's own cap (`max_tokens`) and seed (`ovlt.rollout.base.request_seeds`; vLLM
  seeds sample j of an n-sample request with seed + j, `v1/engine/parallel_sampling.py`), and
  `n` for the samples of a prompt, which share its prefill through prefix caching (on) and its
  image through the encoder cache. `on_complete` is called when `LLM.generate` returns (the
  offline API returns everything at once), in request order.
- Memory: `rollout.gpu_memory_utilization: 0` sizes vLLM's share from the memory the trainer
  leaves free, measured when the engine starts (`gpu_memory_utilization_for`); vLLM 0.26
  refuses a share larger than the free memory at start (`v1/worker/gpu_worker.py`).
- Stopping: EOS = `eos_token_ids` (default `<|im_end|>` and `<|endoftext|>`, as the built-in
  engine) passed as `stop_token_ids` (kept in `token_ids`, like EOS); `eos_token_ids=[]`
  disables EOS entirely, as does `SamplingParams.ignore_eos` (benchmarks). Stop strings are
  kept in the text.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Iterable, Optional

import torch

from ovlt.logging import get_logger, log_once
from ovlt.rollout.base import (Completion, GenerationRequest, OnComplete, RolloutEngine,
                               SamplingParams, report_all, request_caps, request_seeds)

log = get_logger(__name__)

VLLM_VERSION = "0.26.0"
IM_END_ID, ENDOFTEXT_ID = 151645, 151643


def collapse_image_pads(ids: list[int], image_token_id: int) -> list[int]:
    """Each run of image-pad tokens -> one pad (vLLM's processor re-expands it)."""
    out = []
    for i, t in enumerate(ids):
        if t == image_token_id and i > 0 and ids[i - 1] == image_token_id:
            continue
        out.append(t)
    return out


def logprobs_mode_for(temperature: float) -> str:
    """vLLM `logprobs_mode` whose log-probs are log softmax(logits / T) (see module doc)."""
    return "raw_logprobs" if temperature in (0.0, 1.0) else "processed_logprobs"


def _dist_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) of an initialised torch.distributed, else of the env."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        local = torch.cuda.current_device() if torch.cuda.is_available() else 0
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", local))
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def optional_package_fallbacks() -> dict:
    """vLLM settings for optional packages that are not installed (set before the engine
    starts; vLLM freezes its env cache at engine start). Returns what was set.
    - flashinfer: vLLM's samplers call `flashinfer_sampler_supported()` at construction
      (v1/worker/gpu/sample/sampler.py:52, v1/sample/ops/topk_topp_sampler.py:91), which imports
      the FlashInfer attention backend (a top-level `import flashinfer`) unless
      VLLM_USE_FLASHINFER_SAMPLER=0: without flashinfer-python the engine would not start.
    - blake3: image inputs are hashed with blake3 by default (multimodal/hasher.py:38).
    """
    import importlib.util
    done = {}
    for pkg, var, val in (("flashinfer", "VLLM_USE_FLASHINFER_SAMPLER", "0"),
                          ("blake3", "VLLM_MM_HASHER_ALGORITHM", "sha256")):
        if importlib.util.find_spec(pkg) is None and var not in os.environ:
            os.environ[var] = val
            done[var] = val
    if done:
        log_once(log, "vllm-fallbacks", f"vLLM: optional packages missing, set {done}")
    return done


GIB = 1 << 30
RESERVE_BYTES = 2 * GIB   # beside vLLM's share: NCCL / cuBLAS workspaces, weight-update buckets
MAX_UTILIZATION = 0.95


def gpu_memory_utilization_for(free_bytes: int, total_bytes: int, reserve_bytes: int = RESERVE_BYTES,
                               pending_bytes: int = 0, need_bytes: int = 0) -> float:
    """vLLM's `gpu_memory_utilization` (its share of the whole GPU: weights + activations + KV
    cache) from what the trainer leaves free: (free - reserve - pending) / total, rounded down
    to 1/1000, at most MAX_UTILIZATION. `free_bytes`: measured with the trainer resident (its
    allocator cache emptied); `pending_bytes`: memory the trainer will still take while vLLM
    holds its share (e.g. optimizer states created at the first update); `need_bytes`: the
    least vLLM can work with (its weights and some KV cache): less is an error."""
    if total_bytes <= 0 or free_bytes < 0 or free_bytes > total_bytes:
        raise ValueError(f"GPU memory: free {free_bytes} of total {total_bytes} bytes is not a "
                         "measurement")
    budget = free_bytes - reserve_bytes - pending_bytes
    if budget <= max(need_bytes, 0) or budget <= 0:
        raise ValueError(
            f"vLLM would get {budget / GIB:.2f} GiB: the GPU has {free_bytes / GIB:.2f} of "
            f"{total_bytes / GIB:.2f} GiB free, less {reserve_bytes / GIB:.2f} GiB reserve and "
            f"{pending_bytes / GIB:.2f} GiB the trainer still allocates"
            + (f"; it needs at least {need_bytes / GIB:.2f} GiB" if need_bytes > 0 else "")
            + " (free memory for the trainer: fewer layers per GPU, more parallelism, or the "
              "built-in engine)")
    return min(MAX_UTILIZATION, math.floor(1000 * budget / total_bytes) / 1000)


def measured_gpu_memory_utilization(pending_bytes: int = 0, reserve_bytes: int = RESERVE_BYTES,
                                    need_bytes: int = 0) -> float:
    """`gpu_memory_utilization_for` of this process's GPU now (its allocator cache emptied
    first: cached blocks would count as used)."""
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    util = gpu_memory_utilization_for(free, total, reserve_bytes, pending_bytes, need_bytes)
    log.info("vLLM gpu_memory_utilization=%.3f: %.1f of %.1f GiB free, %.1f GiB reserved, "
             "%.1f GiB pending for the trainer", util, free / GIB, total / GIB, reserve_bytes / GIB,
             pending_bytes / GIB)
    return util


def llm_kwargs(cfg, hf_dir: str, load_format: str = "dummy",
               gpu_memory_utilization: Optional[float] = None) -> dict:
    """The `vllm.LLM(...)` keyword arguments for this job config (every name exists in vLLM
    0.26's `LLM.__init__` / `EngineArgs`). `gpu_memory_utilization` overrides the config's
    (needed when the config says 0: measured)."""
    rc, m = cfg.rollout, cfg.model
    util = float(rc.gpu_memory_utilization if gpu_memory_utilization is None
                 else gpu_memory_utilization)
    if not 0 < util <= 1:
        raise ValueError(f"gpu_memory_utilization={util}: give a share in (0, 1] (the config's 0 "
                         "means: measure it, which VLLMEngine does)")
    if m.params_dtype == "fp16":
        dtype = "float16"
    else:  # the rollout runs in bf16 whatever the trainer's master dtype
        dtype = "bfloat16"
    return dict(
        model=str(hf_dir), load_format=load_format, dtype=dtype, seed=int(cfg.grpo.train.seed),
        tensor_parallel_size=int(rc.tensor_parallel),
        gpu_memory_utilization=util, enable_sleep_mode=True,
        max_model_len=int(rc.max_prompt_length + rc.max_new_tokens),
        enforce_eager=not rc.cuda_graphs, enable_prefix_caching=True,
        limit_mm_per_prompt={"image": 8, "video": 0},
        # `size` (not the deprecated min_pixels/max_pixels call kwargs) works with
        # transformers 4.5x and 5.x; vLLM's Qwen2-VL info reads it too (qwen2_vl.py
        # `_get_vision_info`), which bounds the profiling run's dummy image.
        mm_processor_kwargs={"size": {"shortest_edge": int(cfg.data.min_pixels),
                                      "longest_edge": int(cfg.data.max_pixels)}},
        worker_extension_cls="ovlt.rollout.vllm_worker.OvltWorkerExtension",
        logprobs_mode=logprobs_mode_for(rc.temperature))


class VLLMEngine(RolloutEngine):
    """`load_format`: "dummy" (weights from `update_weights`) or "auto" (vLLM reads `hf_dir`).
    `eos_token_ids`: None = `<|im_end|>`, `<|endoftext|>`; [] = never stop on EOS.
    `extra_llm_kwargs`: merged last into the `vllm.LLM` arguments (benchmarks).
    `pending_bytes`: GPU memory the trainer will still allocate after this engine starts
    (used when `rollout.gpu_memory_utilization` is 0: measured)."""

    def __init__(self, cfg, tokenizer=None, hf_dir: str | None = None, load_format: str = "dummy",
                 eos_token_ids: Optional[list[int]] = None,
                 extra_llm_kwargs: Optional[dict[str, Any]] = None, pending_bytes: int = 0):
        prev = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
        if prev not in (None, "0"):
            log.warning("VLLM_ENABLE_V1_MULTIPROCESSING=%s overridden to 0: the colocated engine "
                        "must run in this process (weights pass by reference)", prev)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        optional_package_fallbacks()
        import vllm
        if not vllm.__version__.startswith(VLLM_VERSION.rsplit(".", 1)[0]):
            log.warning("vLLM %s installed; ovlt is written against %s", vllm.__version__, VLLM_VERSION)
        rc, m = cfg.rollout, cfg.model
        hf_dir = hf_dir or m.hf_path
        if not hf_dir:
            raise ValueError("the vLLM engine needs model.hf_path (an HF directory with config.json, "
                             "tokenizer and preprocessor_config.json; with the trainer's weights "
                             "its weight files are not read)")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.image_token_id = m.image_token_id
        self.eos = [IM_END_ID, ENDOFTEXT_ID] if eos_token_ids is None else list(eos_token_ids)
        self.load_format = load_format
        self.hf_dir = str(hf_dir)
        if rc.temperature not in (0.0, 1.0) and (rc.top_p < 1.0 or rc.top_k > 0):
            log.warning("rollout.temperature=%s with top-p/top-k: vLLM's log-probs are renormalised "
                        "over the kept tokens (the trainer recomputes them anyway)", rc.temperature)
        util = None
        if float(rc.gpu_memory_utilization) == 0 and "gpu_memory_utilization" not in (extra_llm_kwargs or {}):
            util = measured_gpu_memory_utilization(pending_bytes=pending_bytes)
        kw = llm_kwargs(cfg, self.hf_dir, load_format, gpu_memory_utilization=util)
        rank, world, local_rank = _dist_world()
        if world > 1:
            tp = int(rc.tensor_parallel)
            par = getattr(cfg, "parallel", None)
            block = (par.tensor_parallel * par.context_parallel) if par is not None else tp
            if world % tp or block % tp:
                raise ValueError(f"rollout.tensor_parallel={tp} must divide the world size {world} "
                                 f"and the trainer's tensor x context parallel size {block} (the "
                                 "ranks of one vLLM TP group must get the same prompts)")
            # One engine per trainer rank (vLLM's torchrun mode); it reads RANK / LOCAL_RANK.
            os.environ.setdefault("RANK", str(rank))
            os.environ.setdefault("LOCAL_RANK", str(local_rank))
            os.environ.setdefault("WORLD_SIZE", str(world))
            kw["distributed_executor_backend"] = "external_launcher"
        kw.update(extra_llm_kwargs or {})
        self.llm_kwargs = kw
        log.info("vLLM engine: %s", {k: v for k, v in kw.items() if k != "model"})
        self.llm = vllm.LLM(**kw)
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None and type(core).__name__ != "InprocClient":
            raise RuntimeError(f"vLLM engine core runs as {type(core).__name__}, not in-process: "
                               "set VLLM_ENABLE_V1_MULTIPROCESSING=0 before vLLM is first imported")
        self._kv_asleep = False
        self._weights_asleep = False
        self.last_update: dict = {}

    # ------------------------------------------------------------------ generation
    def _prompt(self, r: GenerationRequest) -> dict:
        p: dict = {"prompt_token_ids": collapse_image_pads(list(r.prompt_ids), self.image_token_id)}
        if r.pixel_values is not None or r.images:
            if not r.images:
                raise ValueError(f"request {r.request_id}: vLLM needs the PIL images "
                                 "(GenerationRequest.images), not only pixel_values")
            n_pads = sum(1 for t in p["prompt_token_ids"] if t == self.image_token_id)
            if n_pads != len(r.images):
                raise ValueError(f"request {r.request_id}: {n_pads} <|image_pad|> runs in the "
                                 f"prompt but {len(r.images)} images")
            p["multi_modal_data"] = {"image": list(r.images)}
        elif self.image_token_id in p["prompt_token_ids"]:
            raise ValueError(f"request {r.request_id}: <|image_pad|> in the prompt but no images")
        return p

    def sampling_params(self, params: SamplingParams, **overrides):
        """The `vllm.SamplingParams` for `params` (keyword `overrides` win)."""
        import vllm
        kw = dict(n=params.n, temperature=params.temperature, top_p=params.top_p,
                  top_k=params.top_k if params.top_k > 0 else 0, max_tokens=params.max_new_tokens,
                  stop=list(params.stop) or None, include_stop_str_in_output=True,
                  seed=params.seed, logprobs=0 if params.logprobs else None,
                  skip_special_tokens=True)
        if self.eos and not params.ignore_eos:
            kw["stop_token_ids"] = list(self.eos)
        else:
            kw["ignore_eos"] = True
        kw.update(overrides)
        return vllm.SamplingParams(**kw)

    def request_sampling_params(self, requests: list[GenerationRequest], params: SamplingParams,
                                **overrides) -> list:
        """One `vllm.SamplingParams` per request: its cap and seed; greedy n > 1 as n = 1
        (vLLM refuses it, sampling_params.py _verify_greedy_sampling; `generate` copies the
        one greedy completion)."""
        caps = request_caps(requests, params)
        seeds = request_seeds(requests, params)
        n = 1 if params.temperature <= 0 else params.n
        return [self.sampling_params(params, n=n, max_tokens=cap, seed=seed, **overrides)
                for cap, seed in zip(caps, seeds)]

    def generate(self, requests: list[GenerationRequest], params: SamplingParams,
                 on_complete: Optional[OnComplete] = None, **sampling_overrides) -> list[list[Completion]]:
        if self._weights_asleep:
            raise RuntimeError("VLLMEngine.generate after sleep(): call wake() and update_weights() first")
        if params.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {params.n}")
        # Our tokenizer decodes each completion once at the end: vLLM's incremental
        # detokenizer otherwise runs for every sequence at every decode step. Stop strings need
        # it (vLLM matches them in the text as it grows).
        decode_here = self.tokenizer is not None and not params.stop
        if decode_here:
            sampling_overrides = {"detokenize": False, **sampling_overrides}
        sps = self.request_sampling_params(requests, params, **sampling_overrides)
        if not requests:
            return []
        prompts = [self._prompt(r) for r in requests]
        if self._kv_asleep:
            self._wake_up(["kv_cache"])
            self._kv_asleep = False
        copies = params.n if params.temperature <= 0 and params.n > 1 else 1
        outs = self.llm.generate(prompts, sps, use_tqdm=False)
        if len(outs) != len(requests):
            raise RuntimeError(f"vLLM returned {len(outs)} outputs for {len(requests)} prompts")
        result = []
        for r, o in zip(requests, outs):
            comps = []
            for c in sorted(o.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                lps: list[float] = []
                if c.logprobs:
                    for t, d in zip(ids, c.logprobs):
                        lp = d.get(t) if d is not None else None
                        lps.append(float(lp.logprob) if lp is not None else float("nan"))
                text = self.tokenizer.decode(ids, skip_special_tokens=True) if decode_here \
                    else c.text
                comps.append(Completion(request_id=r.request_id, token_ids=ids, logprobs=lps,
                                        text=text, finish_reason="length"
                                        if c.finish_reason == "length" else "stop",
                                        index=len(comps)))
            if copies > 1:
                comps = [dataclasses.replace(comps[0], token_ids=list(comps[0].token_ids),
                                             logprobs=list(comps[0].logprobs), index=j)
                         for j in range(copies)]
            result.append(comps)
        report_all(result, on_complete)
        return result

    # ------------------------------------------------------------------ weights / memory
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.load_format != "dummy":
            log_once(log, "vllm-update-real", "vLLM engine built with its own weights now takes "
                     "them from update_weights")
        if self._weights_asleep:
            self.wake()
        res = self.llm.collective_rpc("ovlt_load_weights", args=(named_tensors,))
        self.reset_caches()
        stats = res[0] if res else {}
        self.last_update = stats
        missing = stats.get("missing") if isinstance(stats, dict) else None
        if missing:
            log.warning("vLLM: %d parameters got no tensor in update_weights (first: %s)",
                        len(missing), missing[:5])
        log.debug("vLLM: loaded %s", {k: v for k, v in (stats or {}).items() if k != "missing"})

    def reset_caches(self) -> None:
        """Drop vLLM's prefix cache (KV of earlier prompts) and encoder cache (vision
        embeddings): both were computed with the weights before an update."""
        if not self.llm.reset_prefix_cache():
            log.warning("vLLM: prefix cache not reset (requests running?)")
        reset_enc = getattr(self.llm.llm_engine, "reset_encoder_cache", None)
        if reset_enc is not None:
            reset_enc()

    def same_shape(self, hf_dir: str) -> bool:
        """Whether `hf_dir` holds a model of this engine's architecture and shape."""
        from ovlt.models.qwen2_5_vl.hf_config import from_hf_config
        try:
            a, b = from_hf_config(self.hf_dir), from_hf_config(hf_dir)
        except (OSError, ValueError):
            return False
        a.name = b.name = ""
        return a == b

    def load_hf_dir(self, hf_dir: str) -> None:
        """Replace the weights by those of another HF directory of the same shape (the
        checkpoint's own names; vLLM's mapper takes both transformers spellings)."""
        from pathlib import Path

        from ovlt.models.qwen2_5_vl.checkpoint_io import iter_safetensors
        files = sorted(Path(hf_dir).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{hf_dir}: no *.safetensors weights")
        self.update_weights((kv for f in files for kv in iter_safetensors(f)))
        self.hf_dir = str(hf_dir)

    def sleep(self) -> None:
        if self._weights_asleep and self._kv_asleep:
            return
        if self._kv_asleep:  # weights awake, KV asleep: vLLM's executor counts as sleeping and
            # would ignore a new sleep() (v1/executor/abstract.py), so wake the rest first
            self._wake_up(["kv_cache"])
            self._kv_asleep = False
        self.llm.sleep(level=2)
        self._kv_asleep = self._weights_asleep = True

    def wake(self) -> None:
        if self._weights_asleep:
            self._wake_up(["weights"])
            self._weights_asleep = False

    def _wake_up(self, tags: list[str]) -> None:
        """vLLM's memory comes from its own allocator (cumem), not torch's: blocks the
        trainer's update freed but torch still caches would leave vLLM out of memory on
        an 80 GB GPU (seen at the first wake after an update), so they go back first."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.llm.wake_up(tags=tags)
