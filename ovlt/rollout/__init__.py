"""Rollout engines. `make_engine` picks vLLM when it imports and the config allows, else the
built-in engine (which needs the trainer's model), and logs the choice once."""
from __future__ import annotations

from ovlt.logging import get_logger, log_once
from ovlt.rollout.base import Completion, GenerationRequest, RolloutEngine, SamplingParams

log = get_logger(__name__)

__all__ = ["make_engine", "RolloutEngine", "GenerationRequest", "SamplingParams", "Completion"]


def vllm_available() -> bool:
    """vLLM's offline API imports and a GPU is there (vLLM imports lazily: `import vllm` alone
    succeeds even when `vllm.LLM`'s dependencies are missing)."""
    try:
        import torch
        if not torch.cuda.is_available():
            return False
        from vllm import LLM, SamplingParams  # noqa: F401
    except Exception as e:  # ImportError, or a broken CUDA stack underneath
        log_once(log, "vllm-import", "vLLM unavailable: %s: %s" % (type(e).__name__, e))
        return False
    return True


# One vLLM engine per process (vLLM's parallel state is process-global): a trainer that
# rebuilds its model (curriculum stage boundary) gets the same engine back.
_VLLM_ENGINES: dict = {}


def make_engine(cfg, model=None, tokenizer=None, tp_group=None, pending_bytes: int = 0,
                **kw) -> RolloutEngine:
    """`cfg`: the JobConfig (uses `rollout` and `model`). `model`: the trainer's mcore model
    (required for the built-in engine, which shares its weights). `pending_bytes`: GPU memory
    the trainer will still allocate and keep (optimizer states, a reference model), kept out
    of vLLM's share when `rollout.gpu_memory_utilization` is 0 (measured)."""
    want = cfg.rollout.engine
    if want in ("auto", "vllm") and vllm_available():
        from ovlt.rollout.vllm_engine import VLLMEngine
        log_once(log, "rollout-engine", "rollout engine: vLLM")
        # With the trainer's model the weights come from update_weights (dummy load);
        # without one (eval, generation from an HF directory) vLLM reads them itself.
        kw.setdefault("load_format", "dummy" if model is not None else "auto")
        key = (str(kw.get("hf_dir") or cfg.model.hf_path), kw["load_format"],
               int(cfg.rollout.tensor_parallel))
        eng = _VLLM_ENGINES.get("engine")
        if eng is not None:
            # vLLM cannot host a second engine, and shutting one down destroys the default
            # torch.distributed group (vllm/distributed/parallel_state.py
            # destroy_distributed_environment): reuse it, with new weights when asked.
            if eng.key == key:
                log.info("rollout engine: reusing this process's vLLM engine for %s", key[0])
                return eng
            if key[1] == "auto" and eng.same_shape(key[0]):
                log.info("rollout engine: reusing this process's vLLM engine with the weights "
                         "of %s", key[0])
                eng.load_hf_dir(key[0])
                eng.key = key
                return eng
            raise RuntimeError(f"this process already runs a vLLM engine for {eng.key}; vLLM "
                               f"cannot host a second one ({key}): run it in another process")
        eng = VLLMEngine(cfg, tokenizer=tokenizer, pending_bytes=pending_bytes, **kw)
        eng.key = key
        _VLLM_ENGINES["engine"] = eng
        return eng
    if want == "vllm":
        raise RuntimeError("rollout.engine=vllm but vllm does not import (pip install "
                           "'ovlt[gpu]'); use rollout.engine=auto or builtin")
    if model is None:
        raise ValueError("the built-in rollout engine needs the trainer's model (make_engine(model=...))")
    from ovlt.rollout.builtin import BuiltinEngine
    log_once(log, "rollout-engine", "rollout engine: built-in (vLLM %s)" %
             ("disabled by rollout.engine=builtin" if want == "builtin" else "not installed"))
    while hasattr(model, "module"):  # DDP / Float16Module wrappers
        model = model.module
    return BuiltinEngine(model, cfg.model, tokenizer=tokenizer, tp_group=tp_group,
                         cuda_graphs=cfg.rollout.cuda_graphs,
                         compile_decode=None if cfg.rollout.compile_decode else False,
                         max_batch_size=cfg.rollout.max_batch_size, **kw)
