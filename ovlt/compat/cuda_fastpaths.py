"""The apex / Transformer Engine seam: megatron-core's fused-kernel fast paths, given ovlt or
torch implementations on CUDA machines that have neither apex nor TE.

megatron-core 0.16.1 without apex/TE falls back to per-tensor Python loops and unfused ops
that cost a large share of an SFT step on a GPU:
  * `multi_tensor_l2norm` (grad-norm for clipping): one `torch.norm` per tensor and a host sync
    per tensor (`torch.tensor(list of CUDA scalars)`);
  * `multi_tensor_scale` (the clip itself): `dst.copy_(src * scale)`, a temporary per tensor;
  * no `fused_weight_gradient_mlp_cuda`: `gradient_accumulation_fusion` is refused, so every
    weight-gradient GEMM writes a bf16 grad that a DDP hook then adds into the fp32 main_grad
    (an extra pass over 10 bytes per parameter, and a grad-sized allocation);
  * no TE `fused_apply_rotary_pos_emb`: RoPE runs as ~8 elementwise passes and two
    concatenations per q and per k of every layer;
  * the MLP's SwiGLU (`bias_swiglu_impl`) is a torch.compile'd function whose backward reads
    its inputs once per output half (a `torch.cat`).
Here they become `torch._foreach_norm`, an in-place `torch._foreach_mul_`, a weight-gradient
GEMM that writes the fp32 main_grad directly (`torch.mm(..., out_dtype=fp32)` on a weight's
first gradient of the step, `torch.addmm` with beta=1 after; checked against mm + add once at
install), `ovlt.kernels.fused_rope` and `ovlt.kernels.fused_swiglu` (Triton, one pass forward and one
backward each).

`install()` is idempotent, a no-op without CUDA or with apex/TE present, and logs once which
path is in use. `OVLT_FASTPATHS=0` keeps mcore's own fallbacks (A/B benchmarks, debugging).
The training-time switches that use these (mcore config flags) are set in
`ovlt.engine.model_setup.enable_cuda_fastpaths`.
"""
from __future__ import annotations

import os

import torch

from ovlt.engine.grad_routing import (Writer, first_write_replaces, mark_overwrites, reset_written,
                                      set_writer, weight_of)
from ovlt.logging import get_logger, log_once

log = get_logger(__name__)
_STATE: dict = {}


def fastpaths_enabled() -> bool:
    """The CUDA fast paths (this seam, fused activations) unless OVLT_FASTPATHS=0."""
    return torch.cuda.is_available() and os.environ.get("OVLT_FASTPATHS", "1") != "0"


def _apex_or_te_present() -> bool:
    try:
        import amp_C  # noqa: F401
        return True
    except Exception:  # noqa: BLE001
        pass
    try:
        from transformer_engine.pytorch.optimizers import multi_tensor_l2norm  # noqa: F401
        return True
    except Exception:  # noqa: BLE001
        return False


def _te_rope_present() -> bool:
    from megatron.core.models.common.embeddings import rope_utils
    return rope_utils.fused_apply_rotary_pos_emb is not None


# ------------------------------------------------------------------ multi-tensor kernels
def merge_adjacent_views(tensors: list) -> list:
    """`tensors` with runs of contiguous views that sit back to back in one storage (mcore's
    main grads are views of one flat grad buffer) joined into single 1-D views. Same elements,
    each counted as often as before; nothing is copied."""
    keyed = sorted(((t.untyped_storage().data_ptr(), t.storage_offset(), i)
                    for i, t in enumerate(tensors)), key=lambda k: k[:2])
    out, run = [], None  # run: [storage ptr, start offset, end offset, first tensor, count]
    for ptr, off, i in keyed:
        t = tensors[i]
        if run is not None and t.is_contiguous() and run[0] == ptr and run[2] == off and \
                t.dtype == run[3].dtype:
            run[2], run[4] = off + t.numel(), run[4] + 1
            continue
        if run is not None:
            out.append(_flat_view(run))
        run = [ptr, off, off + t.numel(), t, 1] if t.is_contiguous() else None
        if run is None:
            out.append(t)
    if run is not None:
        out.append(_flat_view(run))
    return out


def _flat_view(run):
    _, start, end, first, count = run
    if count == 1:
        return first
    return first.new_empty(0).set_(first.untyped_storage(), start, (end - start,), (1,))


def grad_sq_norm(tensors, device) -> torch.Tensor:
    """Sum of the squares of every element of `tensors`, as a [1] fp32 tensor on `device`, no
    host sync. Adjacent views of one buffer are reduced as one flat tensor (one plain
    reduction reads 2 B fp32 grads at 3.76 TB/s on an H200, foreach over the 18 tensors at
    3.30: `benchmarks/sft_parts.py --parts adam`); the rest by one foreach reduction."""
    tensors = merge_adjacent_views([t for t in tensors if t.numel()])
    if not tensors:
        return torch.zeros(1, dtype=torch.float32, device=device)
    big = [t for t in tensors if t.numel() >= 1 << 24]
    small = [t for t in tensors if t.numel() < 1 << 24]
    norms = [torch.linalg.vector_norm(t, dtype=torch.float32) for t in big]
    norms += list(torch._foreach_norm(small, 2.0)) if small else []
    return torch.stack([n.float() for n in norms]).square().sum().reshape(1).to(device)


def multi_tensor_l2norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for `amp_C.multi_tensor_l2norm`: (total L2 norm [1] fp32, None), no host sync."""
    dev = tensor_lists[0][0].device if tensor_lists[0] else "cuda"
    return grad_sq_norm(tensor_lists[0], dev).sqrt(), None


def multi_tensor_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for `amp_C.multi_tensor_scale`: dst = src * scale (in place when src is dst)."""
    src, dst = tensor_lists[0], tensor_lists[1]
    if not src:
        return
    if all(s is d for s, d in zip(src, dst)):
        if scale != 1.0:
            torch._foreach_mul_(src, scale)
        return
    if scale == 1.0:
        torch._foreach_copy_(dst, src)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def bias_swiglu_impl(input, bias, fp8_input_store=False, cpu_offload_input=False):
    """Drop-in for mcore's `bias_swiglu_impl` (the MLP's fused activation, [S, B, 2F] or
    [T, 2F]): `ovlt.kernels.fused_swiglu` when there is no bias, FP8 input store or offload (the
    Qwen2 LLM's case), mcore's own function otherwise."""
    if bias is not None or fp8_input_store or cpu_offload_input:
        return _STATE["originals"][6](input, bias, fp8_input_store, cpu_offload_input)
    from ovlt.kernels.swiglu import fused_swiglu
    return fused_swiglu(input)


class TorchWgradAccum:
    """Stands in for apex's `fused_weight_gradient_mlp_cuda` module:
    `wgrad_gemm_accum_fp32(input [M,K], grad_output [M,N], main_grad [N,K])` does
    main_grad += grad_output^T @ input in one GEMM with an fp32 accumulator/output.
    The main_grad of a weight marked to overwrite (`grad_routing.mark_overwrites`, by
    `enable_wgrad_fusion`) is overwritten instead while the weight has no gradient yet this step
    (mcore sets the flag right after this call): the GEMM then needs neither the zeroed buffer
    nor a read of it (`ovlt.engine.grad_routing` skips zeroing such weights)."""

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input, grad_output, main_grad):
        w = weight_of(main_grad)
        overwrite = w is not None and first_write_replaces(w)
        # out_dtype only where the inputs are narrower (cuBLAS); fp32 inputs: plain GEMMs
        kw = {} if total_input.dtype == main_grad.dtype else {"out_dtype": main_grad.dtype}
        if overwrite:
            torch.mm(grad_output.t(), total_input, out=main_grad, **kw)
        else:
            torch.addmm(main_grad, grad_output.t(), total_input, out=main_grad, **kw)

    @staticmethod
    def wgrad_gemm_accum_fp16(total_input, grad_output, main_grad):
        main_grad.addmm_(grad_output.t(), total_input)


def _wgrad_accum_works() -> bool:
    """One small check that this torch/cuBLAS accumulates bf16 x bf16 into fp32 in place, and
    overwrites (NaNs and all) on a weight's first gradient of the step."""
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        a = torch.randn(64, 48, device="cuda", generator=g).bfloat16()
        b = torch.randn(64, 32, device="cuda", generator=g).bfloat16()
        acc = torch.randn(32, 48, device="cuda", generator=g)
        prod = b.float().t() @ a.float()
        ref = acc + prod
        TorchWgradAccum.wgrad_gemm_accum_fp32(a, b, acc)
        fresh = torch.full((32, 48), float("nan"), device="cuda")
        weight = torch.nn.Parameter(torch.empty(0))
        weight.main_grad = fresh
        mark_overwrites(weight)
        reset_written(weight)
        TorchWgradAccum.wgrad_gemm_accum_fp32(a, b, fresh)
        tol = 1e-3 * ref.abs().max().item()  # allclose is False on any NaN left behind
        return torch.allclose(acc, ref, rtol=0, atol=tol) and \
            torch.allclose(fresh, prod, rtol=0, atol=tol)
    except Exception as e:  # noqa: BLE001 - any failure: keep mcore's unfused path
        log.warning("wgrad accumulation into fp32 main_grad unavailable here (%s)", str(e)[:200])
        return False


def install() -> dict:
    """Install the torch fast paths into megatron-core where apex/TE are missing. Returns
    {"multi_tensor": bool, "wgrad_fusion": bool} (what is active)."""
    if "result" in _STATE:
        return _STATE["result"]
    res = {"multi_tensor": False, "wgrad_fusion": False, "rope_fusion": False}
    if not fastpaths_enabled():
        reason = "no CUDA" if not torch.cuda.is_available() else "OVLT_FASTPATHS=0"
        log_once(log, "apex_seam", f"apex seam: mcore's own fallbacks ({reason})")
    elif _apex_or_te_present():
        log_once(log, "apex_seam", "apex seam: apex/Transformer Engine kernels (installed)")
        res = {"multi_tensor": True, "wgrad_fusion": True, "rope_fusion": _te_rope_present(),
               "native": True}
    else:
        from megatron.core.models.common.embeddings import rope_utils
        from megatron.core.optimizer import clip_grads, optimizer
        from megatron.core.tensor_parallel import layers
        from megatron.core.transformer import mlp
        _STATE["originals"] = (clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl,
                               optimizer.multi_tensor_scale_impl,
                               getattr(layers, "fused_weight_gradient_mlp_cuda", None),
                               layers._grad_accum_fusion_available,
                               rope_utils.fused_apply_rotary_pos_emb, mlp.bias_swiglu_impl)
        mlp.bias_swiglu_impl = bias_swiglu_impl
        clip_grads.l2_norm_impl = multi_tensor_l2norm
        clip_grads.multi_tensor_scale_impl = multi_tensor_scale
        optimizer.multi_tensor_scale_impl = multi_tensor_scale
        res["multi_tensor"] = True
        if _wgrad_accum_works():
            layers.fused_weight_gradient_mlp_cuda = TorchWgradAccum
            layers._grad_accum_fusion_available = True
            res["wgrad_fusion"] = True
        if rope_utils.fused_apply_rotary_pos_emb is None:
            from ovlt.kernels.rope import fused_rope
            rope_utils.fused_apply_rotary_pos_emb = fused_rope
        res["rope_fusion"] = True
        log_once(log, "apex_seam", "apex/TE seam: ovlt fallbacks (foreach grad norm/scale, "
                 "Triton RoPE and SwiGLU; wgrad GEMM into fp32 main_grad: "
                 f"{res['wgrad_fusion']})")
    _STATE["result"] = res
    return res


def uninstall() -> None:
    """Put mcore's own fallbacks back (A/B benchmarks in one process)."""
    orig = _STATE.pop("originals", None)
    _STATE.pop("result", None)
    if orig is None:
        return
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.tensor_parallel import layers
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.transformer import mlp
    (clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl,
     optimizer.multi_tensor_scale_impl, wgrad, layers._grad_accum_fusion_available,
     rope_utils.fused_apply_rotary_pos_emb, mlp.bias_swiglu_impl) = orig
    if wgrad is None:
        layers.__dict__.pop("fused_weight_gradient_mlp_cuda", None)
    else:
        layers.fused_weight_gradient_mlp_cuda = wgrad


def enable_wgrad_fusion(model: torch.nn.Module) -> int:
    """After the DDP wrap (which gives every trainable weight its fp32 `main_grad`): let mcore's
    Column/RowParallelLinears accumulate their weight gradients straight into it. Returns the
    number of layers switched. Layers whose weight has no main_grad stay as they are.
    The transformer layers' weights, whose gradient is only ever that GEMM (the LM head's
    also comes from the fused losses), overwrite main_grad on their first gradient of a step
    and are marked to overwrite (`grad_routing.mark_overwrites`; row-wise FP8 linears return a
    dW instead)."""
    if not install()["wgrad_fusion"]:
        return 0
    return switch_wgrad_fusion(model, (torch.bfloat16, torch.float16))


def switch_wgrad_fusion(model: torch.nn.Module, dtypes: tuple) -> int:
    """`enable_wgrad_fusion`'s switch for weights of `dtypes`, without the install check (a
    CPU test runs the fused path on fp32 weights with `TorchWgradAccum` patched into mcore)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.transformer_layer import TransformerLayer
    in_layers = {id(m) for layer in model.modules() if isinstance(layer, TransformerLayer)
                 for m in layer.modules()}
    n = 0
    for mod in model.modules():
        if isinstance(mod, (ColumnParallelLinear, RowParallelLinear)):
            w = getattr(mod, "weight", None)
            if w is not None and w.requires_grad and hasattr(w, "main_grad") \
                    and w.dtype in dtypes:
                mod.gradient_accumulation_fusion = True
                set_writer(w, Writer.WGRAD_GEMM)
                if id(mod) in in_layers and not getattr(mod, "fp8_rowwise", False):
                    mark_overwrites(w)
                n += 1
    return n
