"""fp32 -> bf16 rounding inside Triton kernels: `to_bf16_rne`, a device function for
`triton_ops.Kernel(helpers=("to_bf16_rne",))`."""
try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - optional
    triton = None


def to_bf16_rne(x):
    """Round fp32 `x` to bf16, to nearest even (what torch's casts do). Done on the bits:
    the H200 run showed Triton's plain `.to(tl.bfloat16)` truncating toward zero.
    (`triton_ops.Kernel(helpers=)` runs it in the interpreter as well.)"""
    bits = x.to(tl.uint32, bitcast=True)
    # a NaN stays a NaN (torch gives 0x7FC0): the rounding add would carry the payload of
    # e.g. CUDA's NaN, 0x7FFFFFFF, into the sign bit and make it -0.0
    bits = tl.where(x != x, 0x7FC00000, bits)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


if triton is not None:  # compiled whatever TRITON_INTERPRET says (see triton_ops.compiled_fn)
    from triton.runtime.jit import JITFunction
    to_bf16_rne = JITFunction(to_bf16_rne)
