"""ovlt's own FP8 training layers (`torch._scaled_mm`), model-agnostic: `linear` (per-tensor
delayed / current scaling, row-wise), `mlp` (the SwiGLU MLP with FP8 GEMMs), `swiglu` and
`cast` (their Triton kernels, built on `ovlt.kernels.triton_ops`). Layer specs reach them through
the `Fp8Backend` provider (`ovlt.models.backends`); Transformer Engine's FP8 is `TEBackend`."""
