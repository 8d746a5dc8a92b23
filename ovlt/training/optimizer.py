"""mcore optimizer for ovlt trainers: Adam(W) with fp32 master weights, sharded across DP
(`DistributedOptimizer`, ZeRO-1 style) when `optimizer.use_distributed_optimizer`, with global
grad-norm clipping. bf16 params keep fp32 main copies inside the optimizer; fp32 runs (CPU tiny)
update the params directly."""
from __future__ import annotations

import torch

from ovlt.logging import get_logger
from ovlt.compat.mcore_cpu import cuda_free_mode

log = get_logger(__name__)


def build_optimizer(chunks: list, opt_cfg, precision: str):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    cfg = OptimizerConfig(
        optimizer="adam", lr=opt_cfg.lr, min_lr=opt_cfg.min_lr,
        weight_decay=opt_cfg.weight_decay, adam_beta1=opt_cfg.adam_beta1,
        adam_beta2=opt_cfg.adam_beta2, adam_eps=opt_cfg.adam_eps,
        clip_grad=opt_cfg.clip_grad, bf16=precision == "bf16", fp16=precision == "fp16",
        params_dtype=dtype, use_distributed_optimizer=opt_cfg.use_distributed_optimizer,
        # fp16 only: dynamic loss scaling.
        initial_loss_scale=2 ** 16 if precision == "fp16" else None)
    with cuda_free_mode():
        # CPU: the main groups are gloo already and distributed.py builds no gloo copies.
        opt = get_megatron_optimizer(cfg, chunks,
                                     use_gloo_process_groups=torch.cuda.is_available())
    if torch.cuda.is_available():
        # Without TE/apex mcore builds torch AdamW with its default multi-tensor path; the fused
        # CUDA kernel does the same math in one pass over (param, grad, m, v) and cut the update
        # of a 2.2B-param model from 75 ms to 43 ms on an H100 (benchmarks/sft_throughput.py).
        for o in inner_optimizers(opt):
            torch_opt = getattr(o, "optimizer", None)
            if isinstance(torch_opt, (torch.optim.Adam, torch.optim.AdamW)):
                for group in torch_opt.param_groups:
                    group["fused"], group["foreach"] = True, False
    log.info("optimizer: mcore %s (adam, lr %.3g, wd %.3g, clip %.3g, %s, distributed=%s)",
             type(opt).__name__, opt_cfg.lr, opt_cfg.weight_decay, opt_cfg.clip_grad,
             precision, opt_cfg.use_distributed_optimizer)
    return opt


def inner_optimizers(opt) -> list:
    """The mcore optimizers inside a (possibly chained) mcore optimizer."""
    return list(getattr(opt, "chained_optimizers", None) or [opt])


def ensure_optimizer_state(opt) -> None:
    """Materialise Adam state (zeros, step 0) for every param before building a *loading*
    sharded state dict: without apex/TE, mcore's DistributedOptimizer.state_dict() reads the
    `step` of each param state, which a fresh torch Adam does not have yet."""
    for o in inner_optimizers(opt):
        torch_opt = getattr(o, "optimizer", None)
        if torch_opt is None:
            continue
        for group in torch_opt.param_groups:
            for p in group["params"]:
                st = torch_opt.state[p]
                if "exp_avg" not in st:
                    st["exp_avg"] = torch.zeros_like(p.data)
                    st["exp_avg_sq"] = torch.zeros_like(p.data)
                if "step" not in st:
                    # where torch itself would put it: on the param's device for fused kernels
                    on_dev = group.get("fused") or group.get("capturable")
                    st["step"] = torch.tensor(0.0, dtype=torch.float32,
                                              device=p.device if on_dev else "cpu")
