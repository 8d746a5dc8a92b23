"""The token-chunk loop shared by every LM-head kernel: logits of one chunk at a time.

For each chunk of C tokens: `logits = h_c @ W^T` (one cuBLAS GEMM, [C, V_local], in the
inputs' dtype), the Triton row statistics in fp32, and, when a per-token gradient is known,
the chunk is overwritten in place by its gradient and consumed by two more GEMMs:
`dh_c = dlogits @ W` and `dW += dlogits^T @ h_c` (dtype per `config.dw_fp32`). Only one chunk of
logits ever exists. With `tp_group`, W is this rank's contiguous vocab shard (megatron
layout) and ranks all-reduce only per-token statistics (max, then sum-exp, sum p*z, target
logit), and the partial d hidden once at the end.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import triton_ops as ops


@dataclass
class KernelConfig:
    # bytes for the one live logits chunk: 448 MiB gives C=1536 tokens at V=152064 in bf16
    # (H100: C=1024 -> 2048 trades +0.29 GiB for -7.5 ms at T=16384; benchmarks/README.md)
    chunk_bytes: int = 448 << 20
    # d weight accumulation across chunks. False: in the weight's dtype (cuBLAS accumulates
    # each chunk's GEMM in fp32, then one rounding per chunk into the bf16 sum, as Liger
    # does). True: an fp32 V x H buffer (+V*H*4 bytes, 2 GiB at 152064 x 3584, and +4-12%
    # time from the fp32 read-modify-write per chunk). fp32 weights always accumulate in fp32.
    dw_fp32: bool = False


config = KernelConfig()
_MIXED_ADDMM = [True]  # flips off once if this torch lacks addmm(out_dtype=) on CUDA


@dataclass
class Shard:
    group: object
    vocab_start: int
    v_local: int
    v_global: int


def shard_of(weight: torch.Tensor, tp_group) -> Shard:
    v = weight.shape[0]
    if tp_group is None:
        return Shard(None, 0, v, v)
    world, rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    return Shard(tp_group, rank * v, v, v * world)


def check_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [T,H] and weight [V,H] expected, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden dtype {hidden.dtype} != weight dtype {weight.dtype}")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets must be [T]={hidden.shape[0]}, got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"targets must be int32/int64, got {targets.dtype}")


def chunk_rows(T: int, v_local: int, elem: int, chunk_bytes: int | None = None) -> int:
    c = max(1, (chunk_bytes or config.chunk_bytes) // max(1, v_local * elem))
    if c >= 256:
        c -= c % 256  # GEMM-friendly M
    return max(1, min(T, c))


def combine_stats(m, s, sz, zt, shard: Shard, targets: torch.Tensor):
    """Per-token (lse, logp, entropy) in fp32 from this rank's partial statistics."""
    if shard.group is not None:
        gm = m.clone()
        dist.all_reduce(gm, op=dist.ReduceOp.MAX, group=shard.group)
        scale = torch.exp(m - gm)
        buf = torch.stack([s * scale, sz * scale, zt])
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=shard.group)
        m, (s, sz, zt) = gm, buf
    lse = m + torch.log(s)
    ent = lse - sz / s
    valid = (targets >= 0) & (targets < shard.v_global)
    logp = torch.where(valid, zt - lse, torch.zeros_like(lse))
    return lse, logp, ent


def _accumulate_dw(dw: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """dw (+)= a @ b with a, b in the compute dtype and dw possibly fp32."""
    beta = 0.0 if first else 1.0
    if dw.dtype == a.dtype:
        torch.addmm(dw, a, b, beta=beta, out=dw)
    elif a.is_cuda and _MIXED_ADDMM[0]:  # cuBLAS bf16 x bf16 -> fp32 C, accumulated in place
        try:
            torch.addmm(dw, a, b, beta=beta, out_dtype=dw.dtype, out=dw)
            return
        except (RuntimeError, TypeError) as e:  # older torch: no addmm.dtype_out on CUDA
            _MIXED_ADDMM[0] = False
            logging.getLogger(__name__).warning("mixed-dtype addmm unavailable (%s); "
                                                "upcasting d weight GEMM inputs to fp32", e)
    if dw.dtype != a.dtype:
        torch.addmm(dw, a.to(dw.dtype), b.to(dw.dtype), beta=beta, out=dw)


def run_chunks(hidden, weight, targets, temperature, shard: Shard, *, grad_fn=None, saved=None,
               need_dh=False, need_dw=False, dw_into=None, dw_into_fresh=False, chunk_bytes=None):
    """The chunk loop. Without `saved`, computes (lse, logp, ent) [T] fp32. With `grad_fn`
    (`grad_fn(sl, lse_c, logp_c, ent_c) -> (g_lp_c, g_ent_c or None)`), also returns
    dh [T,H] (all-reduced over the TP group) and dW [V_local,H] (fp32 or weight dtype), or,
    with `dw_into` (an fp32 [V_local,H] running sum such as mcore's main_grad), adds dW into it
    chunk by chunk (no dW buffer, no later pass to add it); `dw_into_fresh`: its contents are
    stale, so the first chunk overwrites it (no tokens: it is zeroed).
    `saved=(lse, ent)` skips the statistics (backward of a forward that kept them).
    `chunk_bytes` overrides `config.chunk_bytes` for this call."""
    T, H = hidden.shape
    dev = hidden.device
    inv_temp = 1.0 / float(temperature)
    if saved is None:
        lse = torch.empty(T, dtype=torch.float32, device=dev)
        logp, ent = torch.empty_like(lse), torch.empty_like(lse)
    else:
        lse, ent = saved
        logp = None
    dh = torch.empty_like(hidden) if need_dh else None
    dw = None
    if need_dw:
        dw_dtype = torch.float32 if config.dw_fp32 else weight.dtype
        dw = torch.empty(weight.shape, dtype=dw_dtype, device=dev)
    C = chunk_rows(T, shard.v_local, hidden.element_size(), chunk_bytes)
    buf = torch.empty(C, shard.v_local, dtype=hidden.dtype, device=dev)
    for start in range(0, T, C):
        sl = slice(start, min(T, start + C))
        n = sl.stop - sl.start
        h_c, t_c = hidden[sl], targets[sl]
        lg = buf[:n]
        torch.mm(h_c, weight.t(), out=lg)
        if saved is None:
            stats = ops.row_stats(lg, t_c, shard.vocab_start, inv_temp)
            lse[sl], logp[sl], ent[sl] = combine_stats(*stats, shard, t_c)
        if grad_fn is None:
            continue
        g_lp, g_ent = grad_fn(sl, lse[sl], None if logp is None else logp[sl], ent[sl])
        # an ignored target (outside [0, V)) has logp := 0, so no log-prob gradient at all
        g_lp = torch.where((t_c >= 0) & (t_c < shard.v_global), g_lp.float(), 0.0)
        ops.row_grad_(lg, t_c, shard.vocab_start, inv_temp, lse[sl], g_lp,
                      ent[sl] if g_ent is not None else None,
                      g_ent.float().contiguous() if g_ent is not None else None)
        if need_dh:
            torch.mm(lg, weight, out=dh[sl])
        if need_dw:
            _accumulate_dw(dw, lg.t(), h_c, first=(start == 0))
        if dw_into is not None:
            _accumulate_dw(dw_into, lg.t(), h_c, first=dw_into_fresh and start == 0)
    if need_dw and T == 0:
        dw.zero_()
    if dw_into is not None and dw_into_fresh and (T == 0 or grad_fn is None):
        dw_into.zero_()
    if need_dh and shard.group is not None:
        dist.all_reduce(dh, group=shard.group)
    return lse, logp, ent, dh, dw


def scale_stored_grads(ctx, g_loss):
    """Backward of a scalar loss whose gradients the forward already computed for upstream
    gradient 1 (`ctx.saved_tensors` = (dh, dw), `ctx.weight_dtype`): scale them by `g_loss`."""
    if ctx.done:  # the stored gradients are scaled in place below
        raise RuntimeError("a fused LM-head loss: backward can run only once per forward")
    ctx.done = True
    dh, dw = ctx.saved_tensors
    if dh is not None:
        dh = dh * g_loss.to(dh.dtype)
    if dw is not None:  # one pass: scale and cast (dw may be a V x H fp32 buffer)
        if dw.dtype == ctx.weight_dtype:
            dw = dw.mul_(g_loss.to(dw.dtype))
        else:
            dw = torch.mul(dw, g_loss, out=torch.empty(dw.shape, dtype=ctx.weight_dtype,
                                                       device=dw.device))
    return dh, dw
