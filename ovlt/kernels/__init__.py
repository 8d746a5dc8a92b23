"""ovlt kernels: fused LM-head log-prob / GRPO loss (never building [T, V] logits) and GRPO
advantages. Importable on CPU-only machines; Triton runs on CUDA tensors, or on CPU tensors
under TRITON_INTERPRET=1, else an equivalent chunked torch path."""
from ._lmhead import config
from .advantages import grpo_advantages
from .grpo_loss import fused_grpo_loss
from .logprob import fused_logprob
from .nll_loss import fused_nll_loss

__all__ = ["fused_logprob", "fused_grpo_loss", "fused_nll_loss", "grpo_advantages", "config"]
