"""ovlt's own FP8 training layers (`torch._scaled_mm`), model-agnostic: `linear` (per-tensor
delayed / current scaling, row-wise), `mlp` (the SwiGLU MLP with FP8 GEMMs), `swiglu` and
`cast` (their Triton kernels). Chosen through the spec provider in
`ovlt.models.qwen2_5_vl.specs`; Transformer Engine's FP8 is the other provider."""
