"""vLLM worker extension (`LLM(worker_extension_cls=...)`): methods vLLM mixes into each of its
GPU workers, reached with `llm.collective_rpc(name, args=...)`.

vLLM 0.26 (`vllm/v1/worker/worker_base.py:WorkerWrapperBase.init_worker`) appends this class to
the bases of its `Worker` class after asserting that none of our attribute names exists there,
so every name here carries the `ovlt_` prefix. The in-process executor
(`vllm/v1/executor/uniproc_executor.py`, used with `VLLM_ENABLE_V1_MULTIPROCESSING=0` and with
`distributed_executor_backend="external_launcher"`) calls the method with the very objects
given to `collective_rpc` (`vllm/v1/serial_utils.py:run_method`: no pickling), so a generator
of GPU tensors passes by reference and is consumed bucket by bucket.

`ovlt_load_weights` feeds (HF name, full tensor) pairs to the vLLM model's own `load_weights`
(`Qwen2_5_VLForConditionalGeneration.load_weights`: `hf_to_vllm_mapper` maps
`model.*` / `model.language_model.*` -> `language_model.model.*`, `lm_head.*` ->
`language_model.lm_head.*`, `visual.*` / `model.visual.*` -> `visual.*`; the per-parameter
weight loaders fuse q/k/v and gate/up and slice each full tensor for this worker's TP rank), so
the trainer sends HF names and full tensors only. For bf16 weights no post-processing is
needed after loading (`UnquantizedLinearMethod.process_weights_after_loading` only acts on CPU).
"""
from __future__ import annotations

import contextlib

import torch


class OvltWorkerExtension:
    def ovlt_load_weights(self, named_tensors) -> dict:
        """Load (HF name, tensor) pairs; returns {"tensors", "bytes", "missing"} where
        `missing` lists the vLLM parameters that no tensor of this call reached."""
        # The vLLM GPU worker this mixes into: get_model() unwraps a CUDA-graph wrapper (V1 runner).
        get_model = getattr(self, "get_model", None)
        model = get_model() if callable(get_model) else self.model_runner.model
        stats = {"tensors": 0, "bytes": 0}

        def counted():
            for name, t in named_tensors:
                stats["tensors"] += 1
                stats["bytes"] += t.numel() * t.element_size()
                yield name, t

        ctx = contextlib.nullcontext()
        try:  # some weight loaders read the current vLLM config
            from vllm.config import set_current_vllm_config
            ctx = set_current_vllm_config(self.vllm_config)
        except Exception:  # noqa: BLE001 - older/newer vLLM without it: load without
            pass
        with ctx, torch.no_grad():
            loaded = model.load_weights(weights=counted())
        torch.cuda.synchronize()
        if loaded is not None:
            names = {n for n, _ in model.named_parameters()}
            stats["missing"] = sorted(names - set(loaded))
        else:
            stats["missing"] = None  # this model's load_weights does not report
        return stats
