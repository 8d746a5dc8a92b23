"""mcore optimizer for ovlt trainers: Adam(W) with fp32 master weights, sharded across DP
(`DistributedOptimizer`, ZeRO-1 style) when `optimizer.use_distributed_optimizer`, with global
grad-norm clipping. bf16 params keep fp32 main copies inside the optimizer; fp32 runs (CPU tiny)
update the params directly.

The step (`OvltStep`, installed on every optimizer built here) also applies the per-token
gradient scale 1/N that `model_setup.finalize_grads` leaves pending on the model chunks (the
loss is a per-token sum; N = loss tokens of the global batch, known after the backward):
  * fused path (CUDA, bf16/fp16 params, DistributedOptimizer): the inner torch Adam is replaced
    by `FusedAdamW`, which folds 1/N and the clip coefficient into one device scalar, updates
    master param + moments and writes the bf16 model param in a single pass per tensor
    (`ovlt.kernels.fused_adamw_`); the grad norm is one foreach reduction; no host sync;
  * otherwise: grads *= 1/N (what mcore's finalize_model_grads would have done), then mcore's
    own step, unchanged (CPU runs stay bit-exact with plain mcore).
"""
from __future__ import annotations

import types

import torch
import torch.distributed as dist

from ovlt.compat.mcore_cpu import cuda_free_mode
from ovlt.distributed import has_gloo_group_copies
from ovlt.engine.grad_routing import take_pending_scale
from ovlt.logging import get_logger
from ovlt.utils.device import default_device, dtype_of

log = get_logger(__name__)


def build_optimizer(chunks: list, opt_cfg, precision: str, fused: bool | None = None):
    """The mcore optimizer over `chunks`. `fused`: None = the fused step where it applies
    (CUDA, OVLT_FASTPATHS not 0, bf16/fp16, distributed optimizer); True forces it (tests)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from ovlt.compat import cuda_fastpaths

    dtype = dtype_of(precision)
    cfg = OptimizerConfig(
        optimizer="adam", lr=opt_cfg.lr, min_lr=opt_cfg.min_lr,
        weight_decay=opt_cfg.weight_decay, adam_beta1=opt_cfg.adam_beta1,
        adam_beta2=opt_cfg.adam_beta2, adam_eps=opt_cfg.adam_eps,
        clip_grad=opt_cfg.clip_grad, bf16=precision == "bf16", fp16=precision == "fp16",
        params_dtype=dtype, use_distributed_optimizer=opt_cfg.use_distributed_optimizer,
        # fp16 only: dynamic loss scaling.
        initial_loss_scale=2 ** 16 if precision == "fp16" else None)
    cuda_fastpaths.install()  # foreach grad-norm / clip kernels where apex is missing (CUDA)
    with cuda_free_mode():
        opt = get_megatron_optimizer(cfg, chunks,
                                     use_gloo_process_groups=has_gloo_group_copies())
    if fused is None:
        fused = (cuda_fastpaths.fastpaths_enabled() and precision == "bf16"
                 and opt_cfg.use_distributed_optimizer)
    if fused:
        for o in inner_optimizers(opt):
            _swap_in_fused_adamw(o)
    elif torch.cuda.is_available():
        # Without TE/apex mcore builds torch AdamW with its default multi-tensor path; the fused
        # CUDA kernel does the same math in one pass over (param, grad, m, v).
        for o in inner_optimizers(opt):
            torch_opt = getattr(o, "optimizer", None)
            if isinstance(torch_opt, (torch.optim.Adam, torch.optim.AdamW)):
                for group in torch_opt.param_groups:
                    group["fused"], group["foreach"] = True, False
    opt.step = types.MethodType(OvltStep(chunks, fused), opt)
    log.info("optimizer: mcore %s (adam, lr %.3g, wd %.3g, clip %.3g, %s, distributed=%s, "
             "step=%s)", type(opt).__name__, opt_cfg.lr, opt_cfg.weight_decay,
             opt_cfg.clip_grad, precision, opt_cfg.use_distributed_optimizer,
             "fused (ovlt.kernels.fused_adamw_)" if fused else "mcore")
    return opt


def inner_optimizers(opt) -> list:
    """The mcore optimizers inside a (possibly chained) mcore optimizer."""
    return list(getattr(opt, "chained_optimizers", None) or [opt])


def _adam_params(opt):
    """(torch optimizer, param group, param) for every param of the torch Adams in `opt`."""
    for o in inner_optimizers(opt):
        torch_opt = getattr(o, "optimizer", None)
        if torch_opt is None:
            continue
        for group in torch_opt.param_groups:
            for p in group["params"]:
                yield torch_opt, group, p


def unallocated_state_bytes(opt) -> int:
    """Bytes of Adam moments (exp_avg, exp_avg_sq) the next step will still allocate: torch
    and mcore create them lazily, so GPU memory measured before the first update misses them."""
    return sum(2 * p.numel() * p.element_size() for torch_opt, _, p in _adam_params(opt)
               if "exp_avg" not in torch_opt.state.get(p, {}))


class FusedAdamW(torch.optim.Optimizer):
    """AdamW over the fp32 main params of one mcore (Distributed)Optimizer, one
    `ovlt.kernels.fused_adamw_` call per tensor. Same param groups and state layout as torch's
    Adam (exp_avg, exp_avg_sq, step), so mcore's (sharded) state dicts are unchanged.
    `grad_coeff` (device scalar) multiplies every gradient; `model_out[param]` is where the
    updated param is also written in the model dtype (the DistributedOptimizer's param-buffer
    shard of that param)."""

    def __init__(self, torch_adam: torch.optim.Optimizer):
        # Take over the replaced optimizer's groups, state, defaults and hooks (the same
        # objects: mcore holds references to them).
        self.__dict__.update(torch_adam.__dict__)
        self.decoupled = isinstance(torch_adam, torch.optim.AdamW) or any(
            g.get("decoupled_weight_decay", False) for g in self.param_groups)
        self.grad_coeff = None
        self.model_out: dict = {}
        self.wrote_model_params = False
        for g in self.param_groups:
            g["fused"], g["foreach"] = False, False  # torch's own loader keeps `step` on CPU
            if g.get("amsgrad") or g.get("maximize"):
                raise ValueError("FusedAdamW: amsgrad / maximize are not supported")

    def _state_of(self, p):
        st = self.state[p]
        if "exp_avg" not in st:
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        step = st.get("step")
        if step is None:
            st["step"] = torch.tensor(0.0)
        elif torch.is_tensor(step) and step.device.type != "cpu":
            st["step"] = step.detach().to("cpu", torch.float32)  # once, after a load
        return st

    @torch.no_grad()
    def step(self, closure=None):
        from ovlt.kernels.adamw import fused_adamw_
        if closure is not None:
            raise ValueError("FusedAdamW.step takes no closure")
        coeff, ones = self.grad_coeff, {}
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            wd = group["weight_decay"] if self.decoupled else 0.0
            if not self.decoupled and group["weight_decay"]:
                raise ValueError("FusedAdamW: L2 (coupled) weight decay is not supported")
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self._state_of(p)
                st["step"] += 1
                c = coeff if coeff is not None else \
                    ones.setdefault(p.device, torch.ones(1, device=p.device))
                fused_adamw_(p, p.grad, st["exp_avg"], st["exp_avg_sq"], c,
                             step=int(st["step"].item()), lr=group["lr"], beta1=beta1,
                             beta2=beta2, eps=group["eps"], weight_decay=wd,
                             out=self.model_out.get(p))
        self.wrote_model_params = bool(self.model_out)


def _swap_in_fused_adamw(o) -> None:
    """Replace the torch Adam inside one mcore DistributedOptimizer by FusedAdamW, with the
    bf16 param-buffer shard of each fp32 main param as its output (so mcore's separate
    main -> model param copy is skipped for the step; it still runs on checkpoint loads)."""
    torch_opt = getattr(o, "optimizer", None)
    if not isinstance(torch_opt, (torch.optim.Adam, torch.optim.AdamW)) or \
            not hasattr(o, "shard_fp32_from_float16_groups"):
        raise ValueError("the fused optimizer step needs mcore's DistributedOptimizer over "
                         f"torch Adam, got {type(o).__name__} / {type(torch_opt).__name__}")
    fused = FusedAdamW(torch_opt)
    for main_group, model_group in zip(o.shard_fp32_from_float16_groups, o.model_float16_groups):
        for main_p, model_p in zip(main_group, model_group):
            rng = o._get_model_param_range_map(model_p)["gbuf_world_in_bucket"]
            gbuf, _, bucket = o.model_param_gbuf_map[model_p]
            buf = o.buffers[gbuf].buckets[bucket].param_data
            fused.model_out[main_p] = buf.view(-1)[rng.start:rng.end]
    n_fp32 = sum(len(g) for g in o.shard_fp32_groups)
    if n_fp32:
        # fp32 model params are updated in place through their shard views; mcore's copy
        # into the param buffer must still run for them, so the copy is not skipped.
        fused.model_out = {}
        log.info("fused AdamW: %d fp32 model params present; bf16 copies left to mcore", n_fp32)
    o.optimizer = fused
    copy_main_to_model = o._copy_main_params_to_model_params

    def copy_unless_written():
        if fused.wrote_model_params:
            fused.wrote_model_params = False
            return
        copy_main_to_model()
    o._copy_main_params_to_model_params = copy_unless_written


class OvltStep:
    """`optimizer.step()` for the optimizers built here; see the module docstring."""

    def __init__(self, chunks: list, fused: bool):
        self.chunks, self.fused = chunks, fused

    def __call__(self, opt):
        scale = take_pending_scale(self.chunks)
        if not self.fused:
            if scale is not None:
                with cuda_free_mode():
                    for c in self.chunks:
                        c.scale_gradients(scale)
            return type(opt).step(opt)
        return self._fused_step(opt, scale)

    @torch.no_grad()
    def _fused_step(self, opt, scale):
        inner = inner_optimizers(opt)
        if opt.prepare_grads():  # sets the main grads (views of the fp32 grad buffer)
            return False, None, None
        from ovlt.compat.cuda_fastpaths import grad_sq_norm
        dev = default_device()
        sq = grad_sq_norm([g for o in inner for g in o.get_main_grads_for_grad_norm()], dev)
        group = opt.get_grad_stats_parallel_group()
        if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(sq, group=group)
        s = scale.reshape(1).float().to(dev) if scale is not None else torch.ones(1, device=dev)
        norm = sq.sqrt() * s
        clip = inner[0].config.clip_grad
        coeff = s * torch.clamp(clip / (norm + 1.0e-6), max=1.0) if clip > 0 else s
        for o in inner:
            o.optimizer.grad_coeff = coeff
        ok = opt.step_with_ready_grads()
        return ok, norm, None


def ensure_optimizer_state(opt) -> None:
    """Materialise Adam state (zeros, step 0) for every param before building a *loading*
    sharded state dict: without apex/TE, mcore's DistributedOptimizer.state_dict() reads the
    `step` of each param state, which a fresh torch Adam does not have yet."""
    for torch_opt, group, p in _adam_params(opt):
        st = torch_opt.state[p]
        if "exp_avg" not in st:
            st["exp_avg"] = torch.zeros_like(p.data)
            st["exp_avg_sq"] = torch.zeros_like(p.data)
        if "step" not in st:
            # where torch itself would put it: on the param's device for fused kernels
            on_dev = group.get("fused") or group.get("capturable")
            st["step"] = torch.tensor(0.0, dtype=torch.float32,
                                      device=p.device if on_dev else "cpu")
