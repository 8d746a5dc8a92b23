"""ovlt FP8 linear layers for GPUs without Transformer Engine: GEMMs through `torch._scaled_mm`.

Recipes ("scaled_mm_tensor" / "scaled_mm_rowwise": current scaling; "scaled_mm_delayed": per
tensor, scales from an amax history like TE's delayed recipe, `model.fp8_amax_history` casts):
  * forward  Y = X W^T:  X and W cast to float8_e4m3fn; with `model.fp8_fprop_fast_accum` (as
    TE's recipes; off by default, no faster here) this GEMM uses the tensor cores' fast FP8
    accumulation, while the backward GEMMs always promote their partial sums to fp32;
  * backward dX = G W and dW = G^T X:  G cast to float8_e5m2 (default, wider range for
    gradients) or e4m3 (`model.fp8_grad_format`), with the forward's FP8 W^T and X^T;
  * scaling "tensor": one scale per tensor (amax of the whole tensor); "delayed": one scale per
    tensor from the max of its last casts' amaxes (no amax pass before the cast: the cast kernel
    records the amax as it goes); "rowwise": one scale per
    row of the left operand and per column of the right one (per token / per output channel in
    the forward), finer and more robust to outlier tokens;
  * master weights and weight grads stay in the parameter dtype (bf16): the FP8 copies are made
    on the fly and held only as the caches below, nothing FP8 is in the optimizer or a
    checkpoint. Within one optimizer step (`fp8_weight_cache`, used by the trainer's step)
    each trained weight is cast once, up front, and every micro-batch's forward, recompute and
    backward reuse that cast (as TE's `is_first_microbatch`): one cast per weight and step
    instead of one per micro-batch (with a single micro-batch per step the same work, moved to
    the step's start). It holds each weight's FP8 copy and transpose for the step (2 bytes per
    trained weight in FP8 linears); `model.fp8_weight_cache=false` turns it off. Frozen
    weights (the vision tower) are cast once for the run and the cast kept
    (`Fp8LinearMixin._frozen_weight_cast`).
Memory: "tensor" saves X^T and W^T in FP8 for the backward (X at half of bf16, plus 1 byte per
weight; nothing is cast twice); "rowwise" needs X scaled along the other axis for dW, so it
saves X in its input dtype.
Weight gradients: with mcore's `gradient_accumulation_fusion` (set by the CUDA fast paths once
DDP has given the weight its fp32 `main_grad`), the per-tensor dW GEMM writes into main_grad.
`torch._scaled_mm` wants both operands K-major and dims multiple of 16; the token dim is
zero-padded to 16 here. Per-tensor casts that also need a transposed copy go through the fused
Triton cast-transpose kernel of `cast.py` on CUDA. Layers: mcore Column/RowParallelLinear
with `_forward_impl` replaced, so TP (all-reduce of dX in column-parallel layers) keeps mcore
semantics. No sequence parallel.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from ovlt.engine.grad_routing import note_written, written_this_step
from ovlt.fp8.cast import AmaxHistory, cast_transpose

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
GRAD_FORMATS = {"e5m2": E5M2, "e4m3": E4M3}


def _quantize_eager(t: torch.Tensor, dtype, dim=None):
    fmax = torch.finfo(dtype).max
    t = t.detach()
    # max|t| in one pass (no |t| temporary), then scale in t's own dtype (no fp32 copy of t):
    # 4-5 passes over t instead of ~10. The dequant scale is the exact inverse of the one used.
    if dim is None:
        amax = torch.linalg.vector_norm(t, float("inf"))
    else:
        amax = torch.linalg.vector_norm(t, float("inf"), dim=dim, keepdim=True)
    qscale = (fmax / amax.float().clamp(min=1e-12)).to(t.dtype)
    q = (t * qscale).clamp_(-fmax, fmax).to(dtype)
    return q, qscale.float().reciprocal()


_compiled_quantize = None


def quantize(t: torch.Tensor, dtype, dim=None):
    """(fp8 tensor, dequant scale): scale * fp8 ~= t. `dim`: reduce amax over this dim
    (keepdim) for per-row/column scales; None = per tensor. With OVLT_FP8_COMPILE=1 on CUDA
    the cast is fused by torch.compile (one read, one write; compile time on first use)."""
    global _compiled_quantize
    if t.is_cuda and os.environ.get("OVLT_FP8_COMPILE", "0") == "1":
        if _compiled_quantize is None:
            import torch._dynamo
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            _compiled_quantize = torch.compile(_quantize_eager, dynamic=True)
        return _compiled_quantize(t, dtype, dim)
    return _quantize_eager(t, dtype, dim)


def col_major(t: torch.Tensor) -> torch.Tensor:
    """`t` with the same values, laid out column-major (what `_scaled_mm` wants of b)."""
    return t.t().contiguous().t()


def scaled_mm(a, sa, b, sb, out_dtype, fast_accum=False, bias=None):
    """(sa*a) @ (sb*b) (+ bias [N], added in the GEMM's epilogue before the one rounding to
    out_dtype); a [M,K] row-major, b [K,N] (made column-major here). `fast_accum`:
    cuBLASLt's FP8 fast accumulation (no periodic promotion of the partial sums to fp32)."""
    b = b if b.stride(0) == 1 else col_major(b)
    return torch._scaled_mm(a.contiguous(), b, scale_a=sa, scale_b=sb, bias=bias,
                            out_dtype=out_dtype, use_fast_accum=fast_accum)


# (grad dtype, device) pairs whose row-wise GEMM this torch/cuBLAS refused: per tensor from then on
ROWWISE_FALLBACK: set = set()


def rowwise_mm(a_hp, a_dtype, b_hp, out_dtype):
    """a_hp [M,K] @ b_hp [K,N] in FP8 with per-row scales of a and per-column scales of b.
    Some torch/cuBLAS builds only take e4m3 x e4m3 for row-wise scaling: then this GEMM falls
    back to per-tensor scales (logged once per dtype pair)."""
    key = (a_dtype, str(a_hp.device))
    if key not in ROWWISE_FALLBACK:
        try:
            aq, sa = quantize(a_hp, a_dtype, dim=1)
            bq, sb = quantize(b_hp, E4M3, dim=0)
            return scaled_mm(aq, sa, bq, sb, out_dtype)
        except RuntimeError as e:
            from ovlt.logging import get_logger
            get_logger(__name__).warning("row-wise FP8 GEMM with %s grads unsupported here (%s); "
                                         "using per-tensor scales for it", a_dtype, str(e)[:120])
            ROWWISE_FALLBACK.add(key)
    aq, sa = quantize(a_hp, a_dtype)
    bq, sb = quantize(b_hp, E4M3)
    return scaled_mm(aq, sa, bq, sb, out_dtype)


def _pad16(t: torch.Tensor) -> torch.Tensor:
    pad = (-t.shape[0]) % 16
    return F.pad(t, (0, 0, 0, pad)) if pad else t


EPILOGUE_BIAS_DTYPES = (torch.bfloat16, torch.float16)  # biases cuBLASLt's FP8 epilogue takes


def _out_dtype(x: torch.Tensor, rowwise: bool):
    # cuBLASLt row-wise scaling produces bf16 only; per-tensor keeps the input dtype.
    return torch.bfloat16 if rowwise and x.is_cuda else x.dtype


def _wgrad_into_main_grad(weight, gqt, sg, xqt, sx) -> torch.Tensor:
    """dW = G^T X in FP8 straight into the fp32 `weight.main_grad` (mcore's fused wgrad
    contract; the DDP hook then skips its add). Until the weight is written in a step
    (`grad_routing.written_this_step`, reset when the step zeroes the buffers) main_grad holds
    zeros or a slice left unzeroed, and the GEMM overwrites it (no bf16 dW, no read-modify-write
    pass); later micro-batches add a bf16 dW into it."""
    mg = weight.main_grad
    if not written_this_step(weight):
        torch._scaled_mm(gqt, xqt.t(), scale_a=sg, scale_b=sx,
                         out_dtype=torch.float32, out=mg)
    else:
        mg.add_(scaled_mm(gqt, sg, xqt.t(), sx, weight.dtype))
    note_written(weight)
    return torch.empty_like(weight)  # placeholder so DDP's grad hook still fires


def wgrad(weight, gqt, sg, xqt, sx, out_dtype, w_dtype) -> torch.Tensor:
    """dW = G^T X from the FP8 transposes: into `weight.main_grad` when a weight is given (the
    fused wgrad contract), else returned in `w_dtype`."""
    if weight is not None:
        return _wgrad_into_main_grad(weight, gqt, sg, xqt, sx)
    return scaled_mm(gqt, sg, xqt.t(), sx, out_dtype).to(w_dtype)


def weight_cast(weight, history, need_qt: bool, cached=None):
    """(wq, wqt or None, dequant scale) of `weight` for the forward: `cached` (this step's cast,
    see `fp8_weight_cache`) when there is one, else a fresh cast recorded in `history`."""
    if cached is not None:
        return cached
    return cast_transpose(weight, E4M3, want_q=True, want_qt=need_qt, history=history)


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, rowwise: bool, grad_dtype, allreduce_dgrad: bool, tp_group,
                wgrad_into_main_grad: bool, histories, fast_accum: bool, cached_weight):
        shape = x.shape
        x2 = _pad16(x.reshape(-1, shape[-1]))
        m = math.prod(shape[:-1])
        out_dtype = _out_dtype(x, rowwise)
        ctx.weight = None
        epilogue_bias = None
        if rowwise:
            xq, sx = quantize(x2, E4M3, dim=1)          # per token  [M,1]
            wq, sw = quantize(weight, E4M3, dim=1)      # per output channel [N,1]
            y = scaled_mm(xq, sx, wq.t(), sw.t().contiguous(), out_dtype, fast_accum)
            ctx.save_for_backward(x2, weight)
        else:
            # X^T in FP8 is what dW needs and W^T what dX needs (K-major operands only): one
            # pass over each writes both, and nothing is re-cast in the backward.
            hx, hw, ctx.hg = histories or (None, None, None)
            xq, xqt, sx = cast_transpose(x2, E4M3, want_q=True, want_qt=weight.requires_grad,
                                         history=hx)
            wq, wqt, sw = weight_cast(weight, hw, x.requires_grad, cached_weight)
            # a bf16/fp16 bias goes into the GEMM's epilogue (a separate broadcast add re-read
            # and re-wrote the whole output: ~0.1 ms for a 7B layer's QKV at 8192 tokens)
            if bias is not None and bias.dtype == out_dtype and out_dtype in EPILOGUE_BIAS_DTYPES:
                bias, epilogue_bias = None, bias
            y = scaled_mm(xq, sx, wq.t(), sw, out_dtype, fast_accum, epilogue_bias)
            ctx.save_for_backward(xqt, sx, wqt, sw)
            if wgrad_into_main_grad and hasattr(weight, "main_grad"):
                ctx.weight = weight
        has_bias = bias is not None or epilogue_bias is not None
        y = y[:m].to(x.dtype)
        if bias is not None:
            y = y + bias
        ctx.rowwise, ctx.grad_dtype, ctx.m, ctx.shape = rowwise, grad_dtype, m, shape
        ctx.allreduce_dgrad, ctx.tp_group, ctx.has_bias = allreduce_dgrad, tp_group, has_bias
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        g = _pad16(gy.reshape(-1, gy.shape[-1]))
        out_dtype = _out_dtype(gy, ctx.rowwise)
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx = dw = None
        if ctx.rowwise:
            x2, weight = ctx.saved_tensors
            # dX = G W: per token x per input channel; dW = G^T X: per output x input channel
            if need_dx:
                dx = rowwise_mm(g, ctx.grad_dtype, weight, out_dtype)
            if need_dw:
                dw = rowwise_mm(g.t(), ctx.grad_dtype, x2, out_dtype).to(weight.dtype)
        else:
            xqt, sx, wqt, sw = ctx.saved_tensors
            gq, gqt, sg = cast_transpose(g, ctx.grad_dtype, want_q=need_dx, want_qt=need_dw,
                                         history=ctx.hg)
            if need_dx:
                dx = scaled_mm(gq, sg, wqt.t(), sw, out_dtype)         # W as an N-major operand
            if need_dw:
                dw = wgrad(ctx.weight, gqt, sg, xqt, sx, out_dtype, ctx.w_dtype)
                ctx.weight = None
        if dx is not None:
            dx = dx[:ctx.m].to(ctx.x_dtype).view(*ctx.shape)
            if ctx.allreduce_dgrad:
                torch.distributed.all_reduce(dx, group=ctx.tp_group)
        db = gy.reshape(-1, gy.shape[-1]).sum(0) \
            if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None, None, None, None, None


def fp8_linear(x, weight, bias=None, rowwise=False, grad_format="e5m2", allreduce_dgrad=False,
               tp_group=None, wgrad_into_main_grad=False, histories=None, fprop_fast_accum=False,
               cached_weight=None):
    """y = x W^T (+ b) with FP8 GEMMs. `wgrad_into_main_grad` (per-tensor scaling, a weight with
    mcore's fp32 `main_grad`): dW goes into main_grad, see `_wgrad_into_main_grad`.
    `histories`: (x, weight, grad) `AmaxHistory`s for delayed scaling (per-tensor only).
    `fprop_fast_accum`: the forward GEMM with FP8 fast accumulation (dX and dW never).
    `cached_weight`: (wq, wqt, scale), W already cast (per-tensor only; see `weight_cast`)."""
    if histories is not None and rowwise:
        raise ValueError("delayed (amax-history) scaling is per tensor, not row-wise")
    if cached_weight is not None and rowwise:
        raise ValueError("a cached FP8 weight is per tensor, not row-wise")
    return _Fp8Linear.apply(x, weight, bias, rowwise, GRAD_FORMATS[grad_format],
                            allreduce_dgrad, tp_group, wgrad_into_main_grad, histories,
                            bool(fprop_fast_accum), cached_weight)


class Fp8LinearMixin:
    """What makes an mcore Column/RowParallelLinear an FP8 one (`fp8_linear_classes`): its
    `_forward_impl` through `fp8_linear`, the layer's amax histories (`fp8_histories`, delayed
    scaling), the step's weight cast (`fp8_step_cast`, see `fp8_weight_cache`) and a frozen
    weight's kept cast (`fp8_frozen_cast`)."""
    fp8_rowwise = False
    fp8_delayed = False
    fp8_grad_format = "e5m2"
    fp8_histories = None
    fp8_step_cast = None  # (weight, (wq, wqt, scale)) while `fp8_weight_cache` holds it
    fp8_frozen_cast = None  # ((data_ptr, version), cast) of a frozen weight

    def cached_weight_cast(self, weight, need_qt: bool = False):
        """A cast of `weight` made before: this step's (see `fp8_weight_cache`), or for a
        frozen weight the one kept since its first use (see `_frozen_weight_cast`); else None."""
        held = self.fp8_step_cast
        if held is not None and held[0] is weight:
            return held[1]
        return self._frozen_weight_cast(weight, need_qt)

    def _frozen_weight_cast(self, weight, need_qt: bool):
        """A frozen weight (the recipe's vision tower) is cast once, with its own amax as the
        scale, and the cast kept: its values do not change, so under either per-tensor recipe
        every later cast would give the same bytes (delayed scaling's first cast uses the own
        amax too, and every later scale is the max of amaxes that all equal it). Re-made, again
        from its own amax (not from a history of the old values, which would saturate the kept
        cast for good), when the weight's storage or version changes (a checkpoint load) or a
        transpose is needed that the kept cast lacks. 1 byte per frozen weight (2 with the
        transpose); off with `model.fp8_weight_cache=false`."""
        if weight.requires_grad or self.fp8_rowwise or weight.dim() != 2 or \
                not getattr(self.config, "ovlt_fp8_weight_cache", True):
            return None
        key = (weight.data_ptr(), weight._version)
        kept = self.fp8_frozen_cast
        if kept is None or kept[0] != key or (need_qt and kept[1][1] is None):
            kept = (key, weight_cast(weight, None, need_qt))
            self.fp8_frozen_cast = kept
        return kept[1]

    def fp8_cacheable(self) -> bool:
        w = self.weight
        return (not self.fp8_rowwise and w.requires_grad and w.dim() == 2
                and w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0
                and getattr(self.config, "ovlt_fp8_weight_cache", True))

    def amax_histories(self, device):
        """(x, weight, grad) amax histories of this layer (delayed scaling), made on first use.
        Not checkpointed: a resumed run starts them afresh (its first cast of each tensor uses
        current scaling)."""
        if not self.fp8_delayed:
            return None
        if self.fp8_histories is None:
            n = getattr(self.config, "ovlt_fp8_amax_history", 16)
            self.fp8_histories = tuple(AmaxHistory(n, device) for _ in range(3))
        return self.fp8_histories

    def _forward_impl(self, input, weight, bias=None, gradient_accumulation_fusion=False,
                      allreduce_dgrad=False, sequence_parallel=False, tp_group=None, **rest):
        if weight.shape[0] % 16 or weight.shape[1] % 16:
            # torch._scaled_mm needs K and N multiples of 16 (e.g. Qwen2.5-VL's vision MLP,
            # 3420 wide, is not): such a layer keeps the parameter dtype instead of failing.
            from ovlt.logging import get_logger, log_once
            log_once(get_logger(__name__), f"fp8_fallback_{tuple(weight.shape)}",
                     "FP8: %s weight %s has a dim not a multiple of 16; it runs in %s",
                     type(self).__name__, tuple(weight.shape), weight.dtype)
            return super()._forward_impl(
                input, weight, bias=bias, gradient_accumulation_fusion=gradient_accumulation_fusion,
                allreduce_dgrad=allreduce_dgrad, sequence_parallel=sequence_parallel,
                tp_group=tp_group, **rest)
        if sequence_parallel:
            raise NotImplementedError("ovlt FP8 linears do not support sequence parallelism")
        return fp8_linear(input, weight, bias, self.fp8_rowwise,
                          getattr(self.config, "ovlt_fp8_grad_format", self.fp8_grad_format),
                          allreduce_dgrad, tp_group, gradient_accumulation_fusion,
                          self.amax_histories(weight.device),
                          getattr(self.config, "ovlt_fp8_fprop_fast_accum", False),
                          self.cached_weight_cast(weight, need_qt=input.requires_grad))


def _cacheable_linears(chunk) -> list:
    got = chunk.__dict__.get("_ovlt_fp8_cacheable")
    if got is None:
        got = [m for m in chunk.modules() if isinstance(m, Fp8LinearMixin) and m.fp8_cacheable()]
        chunk.__dict__["_ovlt_fp8_cacheable"] = got
    return got


@contextlib.contextmanager
def fp8_weight_cache(chunks: list, enabled: bool = True):
    """Within the block (one optimizer step's forward and backward passes), the per-tensor FP8
    linears of `chunks` use one cast of each trained weight, made here up front (amax recorded
    once per step under delayed scaling). Weights must not change inside the block. Off where
    mcore's DDP gathers parameters during the forward (`overlap_param_gather`: the weights are
    not final yet when the block starts). Yields the number of weights cast."""
    mods = []
    if enabled and not any(getattr(getattr(c, "ddp_config", None), "overlap_param_gather", False)
                           for c in chunks):
        mods = [m for c in chunks for m in _cacheable_linears(c)]
    try:
        for m in mods:
            w = m.weight
            hist = m.amax_histories(w.device)
            m.fp8_step_cast = (w, weight_cast(w, hist[1] if hist else None, True))
        yield len(mods)
    finally:
        for m in mods:
            m.fp8_step_cast = None


RECIPES = ("scaled_mm_tensor", "scaled_mm_delayed", "scaled_mm_rowwise")


@functools.lru_cache(maxsize=None)
def fp8_linear_classes(recipe: str):
    """(ColumnParallelLinear, RowParallelLinear) subclasses for one of `RECIPES`; the same two
    classes on every call."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown ovlt FP8 recipe {recipe!r}; one of {RECIPES}")
    attrs = {"fp8_rowwise": recipe == "scaled_mm_rowwise",
             "fp8_delayed": recipe == "scaled_mm_delayed"}
    col = type(f"Fp8ColumnParallelLinear_{recipe}", (Fp8LinearMixin, ColumnParallelLinear), attrs)
    row = type(f"Fp8RowParallelLinear_{recipe}", (Fp8LinearMixin, RowParallelLinear), attrs)
    return col, row
