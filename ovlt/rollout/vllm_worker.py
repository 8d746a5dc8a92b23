"""vLLM worker extension (`LLM(worker_extension_cls=...)`): methods vLLM mixes into each of its
GPU workers, reached with `llm.collective_rpc(name, args=...)`.

`ovlt_load_weights` feeds (HF name, full tensor) pairs to the vLLM model's own `load_weights`,
whose per-parameter weight loaders slice each full tensor for this worker's TP rank (QKV and
gate/up fusion, vocab padding), so the trainer sends HF names and full tensors only. In the
colocated setup (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, engine in the trainer's process) the
iterable is passed by reference: no serialisation, one bucket of the reshard stream at a time.
"""
from __future__ import annotations

import torch


class OvltWorkerExtension:
    def ovlt_load_weights(self, named_tensors) -> int:
        model = self.model_runner.model  # noqa: attribute of the vLLM GPU worker this mixes into
        count = [0]

        def counted():
            for name, t in named_tensors:
                count[0] += 1
                yield name, t

        model.load_weights(weights=counted())
        torch.cuda.synchronize()
        return count[0]
