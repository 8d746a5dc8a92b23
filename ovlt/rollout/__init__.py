"""Rollout engines. `make_engine` picks vLLM when it imports and the config allows, else the
built-in engine (which needs the trainer's model), and logs the choice once."""
from __future__ import annotations

from ovlt.logging import get_logger, log_once
from ovlt.rollout.base import Completion, GenerationRequest, RolloutEngine, SamplingParams

log = get_logger(__name__)

__all__ = ["make_engine", "RolloutEngine", "GenerationRequest", "SamplingParams", "Completion"]


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA stack underneath
        return False
    return True


def make_engine(cfg, model=None, tokenizer=None, tp_group=None, **kw) -> RolloutEngine:
    """`cfg`: the JobConfig (uses `rollout` and `model`). `model`: the trainer's mcore model
    (required for the built-in engine, which shares its weights)."""
    want = cfg.rollout.engine
    if want in ("auto", "vllm") and vllm_available():
        from ovlt.rollout.vllm_engine import VLLMEngine
        log_once(log, "rollout-engine", "rollout engine: vLLM")
        return VLLMEngine(cfg, tokenizer=tokenizer, **kw)
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
                         max_batch_size=cfg.rollout.max_batch_size, **kw)
