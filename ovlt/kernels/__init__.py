"""ovlt's Triton kernels. Exported here: the fused LM-head log-prob / GRPO loss / SFT NLL
(never building [T, V] logits) and GRPO advantages. Used by module path: `adamw` (fused AdamW
over the flat fp32 shards), `rope` (fused rotary embedding), `swiglu` (SwiGLU forward /
backward), and the Triton support every kernel shares, public for kernels outside this package
too (the FP8 casts of `ovlt.fp8.cast` / `ovlt.fp8.swiglu`): `triton_ops` (`Kernel`,
`device_fn`, `use_triton`, the `tl.reduce` combines) and `rounding` (`to_bf16_rne`).
Importable on CPU-only machines; Triton runs on CUDA tensors, or on CPU tensors under
TRITON_INTERPRET=1, else an equivalent torch path."""
from ._lmhead import config
from .advantages import grpo_advantages
from .grpo_loss import fused_grpo_loss
from .logprob import fused_logprob
from .nll_loss import fused_nll_loss

__all__ = ["fused_logprob", "fused_grpo_loss", "fused_nll_loss", "grpo_advantages", "config"]
