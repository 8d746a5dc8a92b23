"""The LLM's MLP under delayed-scaling FP8 (`model.fp8=scaled_mm_delayed`): fc1 -> SwiGLU -> fc2
as one autograd function, so the SwiGLU writes fc2's FP8 input and its backward writes fc1's FP8
output gradient directly (`swiglu.py`) instead of a bf16 tensor that a cast then re-reads.

Everything else is the two FP8 linears' own path (`linear.py`): the same casts with the same amax
histories, in the same order, the same GEMMs, dW into main_grad under mcore's fused wgrad, and
TP as mcore's MLP (fc1 column-parallel: dX all-reduced; fc2 row-parallel: Y all-reduced). The
results equal the unfused module's (with the CUDA fast paths' SwiGLU) bit for bit
(tests/procs/test_model_fp8_mlp.py). Any MLP this does not
cover (bias, other activations, per-token scales, sequence parallel, current or row-wise
scaling, dims not multiples of 16) runs mcore's forward with the FP8 linears, unchanged.
Weights: the step's cached casts when `linear.fp8_weight_cache` holds them, as the linears.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region
from megatron.core.transformer.mlp import MLP

from ovlt.fp8.linear import E4M3, GRAD_FORMATS, scaled_mm, _pad16, weight_cast, wgrad
from ovlt.fp8.cast import cast_transpose
from ovlt.fp8.swiglu import swiglu_cast_transpose, swiglu_grad_cast_transpose


class Fp8SwiGLUMLPFunction(torch.autograd.Function):
    """fc1 -> SwiGLU -> fc2 in FP8 as one autograd function (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, w1, w2, hist1, hist2, grad_dtype, main_grad_weights, allreduce_dgrad,
                tp_group, fast_accum, cached1, cached2):
        (hx1, hw1, _), (hx2, hw2, _) = hist1, hist2
        shape = x.shape
        x2 = _pad16(x.reshape(-1, shape[-1]))
        need_dh = x.requires_grad or w1.requires_grad  # the backward goes through the SwiGLU
        xq, xqt, sx = cast_transpose(x2, E4M3, True, w1.requires_grad, hx1)
        w1q, w1qt, sw1 = weight_cast(w1, hw1, x.requires_grad, cached1)
        h = scaled_mm(xq, sx, w1q.t(), sw1, x.dtype, fast_accum)
        aq, aqt, sa = swiglu_cast_transpose(h, E4M3, True, w2.requires_grad, hx2)
        w2q, w2qt, sw2 = weight_cast(w2, hw2, need_dh, cached2)
        y = scaled_mm(aq, sa, w2q.t(), sw2, x.dtype, fast_accum)
        ctx.save_for_backward(xqt, sx, w1qt, sw1, h if need_dh else None, aqt, sa, w2qt, sw2)
        ctx.hg = (hist1[2], hist2[2])
        ctx.weights = main_grad_weights  # (w1, w2) or (None, None): dW into main_grad
        ctx.grad_dtype, ctx.shape, ctx.m = grad_dtype, shape, math.prod(shape[:-1])
        ctx.allreduce_dgrad, ctx.tp_group, ctx.w_dtype = allreduce_dgrad, tp_group, w1.dtype
        return y[:ctx.m].view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        xqt, sx, w1qt, sw1, h, aqt, sa, w2qt, sw2 = ctx.saved_tensors
        need_dx, need_dw1, need_dw2 = ctx.needs_input_grad[:3]
        need_dh = need_dx or need_dw1
        (hg1, hg2), (mw1, mw2) = ctx.hg, ctx.weights
        ctx.weights = (None, None)
        g = _pad16(gy.reshape(-1, gy.shape[-1]))
        gq, gqt, sg = cast_transpose(g, ctx.grad_dtype, need_dh, need_dw2, hg2)
        dx = dw1 = dw2 = None
        if need_dw2:
            dw2 = wgrad(mw2, gqt, sg, aqt, sa, gy.dtype, ctx.w_dtype)
        if need_dh:
            da = scaled_mm(gq, sg, w2qt.t(), sw2, gy.dtype)
            dhq, dhqt, sdh = swiglu_grad_cast_transpose(h, da, ctx.grad_dtype, need_dx,
                                                        need_dw1, hg1)
            del da
            if need_dw1:
                dw1 = wgrad(mw1, dhqt, sdh, xqt, sx, gy.dtype, ctx.w_dtype)
            if need_dx:
                dx = scaled_mm(dhq, sdh, w1qt.t(), sw1, gy.dtype)[:ctx.m].view(*ctx.shape)
                if ctx.allreduce_dgrad:
                    torch.distributed.all_reduce(dx, group=ctx.tp_group)
        return dx, dw1, dw2, None, None, None, None, None, None, None, None, None


class Fp8SwiGLUMLP(MLP):
    """mcore's MLP; with delayed-scaling FP8 linears and a plain bias-free SwiGLU, one fused
    FP8 autograd function (see the module docstring)."""

    def fused_ok(self, per_token_scale) -> bool:
        """Whether this forward takes the fused path (else mcore's, with the FP8 linears)."""
        fc1, fc2, cfg = self.linear_fc1, self.linear_fc2, self.config
        return (getattr(fc1, "fp8_delayed", False) and getattr(fc2, "fp8_delayed", False)
                and per_token_scale is None and cfg.gated_linear_unit
                and cfg.activation_func is F.silu and not cfg.use_te_activation_func
                and getattr(cfg, "activation_func_clamp_value", None) is None
                and not getattr(cfg, "glu_linear_offset", 0.0)
                and fc1.bias is None and fc2.bias is None
                and not fc1.sequence_parallel and not fc2.sequence_parallel
                and not fc1.explicit_expert_comm and not fc2.explicit_expert_comm
                and not fc1.disable_grad_reduce
                and all(d % 16 == 0 for d in (*fc1.weight.shape, *fc2.weight.shape)))

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if not self.fused_ok(per_token_scale):
            return super().forward(hidden_states, per_token_scale=per_token_scale, **kwargs)
        fc1, fc2, cfg = self.linear_fc1, self.linear_fc2, self.config
        dev = fc1.weight.device
        main_grad = tuple(m.weight if m.gradient_accumulation_fusion and
                          hasattr(m.weight, "main_grad") else None for m in (fc1, fc2))
        y = Fp8SwiGLUMLPFunction.apply(
            hidden_states, fc1.weight, fc2.weight, fc1.amax_histories(dev),
            fc2.amax_histories(dev), GRAD_FORMATS[getattr(cfg, "ovlt_fp8_grad_format", "e5m2")],
            main_grad, fc1.tp_group.size() > 1, fc1.tp_group,
            bool(getattr(cfg, "ovlt_fp8_fprop_fast_accum", False)),
            fc1.cached_weight_cast(fc1.weight, need_qt=hidden_states.requires_grad),
            fc2.cached_weight_cast(fc2.weight, need_qt=hidden_states.requires_grad
                                   or fc1.weight.requires_grad))
        return reduce_from_tensor_model_parallel_region(y, group=fc2.tp_group), None
