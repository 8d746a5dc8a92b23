"""The Triton support every ovlt kernel shares, and the LM-head / advantage kernels built on it.

Shared (public; `ovlt.fp8` builds its cast kernels on these too):
  * `HAVE_TRITON`, `triton`, `tl`: triton when it imports (`tl` keeps kernel annotations
    evaluable without it);
  * `use_triton(t)`: whether a kernel runs for tensor `t`: compiled for CUDA tensors, by
    Triton's interpreter for CPU tensors when TRITON_INTERPRET=1 (decided per call, so it
    doesn't matter which module imported triton first); else the caller's torch path;
  * `Kernel(fn, helpers, do_not_specialize)`: a kernel launched as `k.on(t)[grid](...)`;
    `device_fn`: a device function such a kernel calls; `compiled_fn`: a compiled Triton
    function whatever TRITON_INTERPRET says;
  * `MAX_COMBINE`, `ADD_COMBINE`: the combine functions for `tl.reduce` (see below).
Built here: row statistics and gradients over a [C, V] logits chunk (`row_stats`, `row_grad_`,
for `ovlt.kernels`' fused LM-head losses) and the segmented reduction of `group_advantages`.
CPU tensors without the interpreter, or a machine without triton, use the equivalent torch code,
one chunk at a time, so nothing [T, V] is ever built on either path.
"""
import os
import types

import torch

from .rounding import to_bf16_rne  # noqa: F401 - a device function of _row_grad_fn

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except Exception:  # triton absent (e.g. a CPU-only install): the torch path serves
    HAVE_TRITON = False
    triton = None

    class tl:  # kernel annotations must still evaluate
        constexpr = None


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    return HAVE_TRITON and (t.is_cuda or (_interpret() and t.device.type == "cpu"))


class Kernel:
    """A kernel launched with `k[grid](...)`, compiled or interpreted by the tensor's device.
    `helpers`: names of device functions the kernel calls, compiled functions in its
    module (`device_fn`): the compiler calls them as they are; for the interpreter (which
    cannot call a jit function when TRITON_INTERPRET was set after triton was imported) the
    kernel runs with those names bound to the plain Python functions inside.
    `do_not_specialize`: integer arguments that change from call to call (e.g. a ring
    buffer's slot): Triton otherwise compiles a variant for values 1 and multiples of 16."""

    def __init__(self, fn, helpers=(), do_not_specialize=()):
        self.fn = fn
        self.helpers = tuple(helpers)
        self.do_not_specialize = list(do_not_specialize)
        self._compiled = None
        self._interpreted = None

    def _plain(self):
        if not self.helpers:
            return self.fn
        env = dict(self.fn.__globals__)
        env.update({name: getattr(env[name], "fn", env[name]) for name in self.helpers})
        f = types.FunctionType(self.fn.__code__, env, self.fn.__name__, self.fn.__defaults__,
                               self.fn.__closure__)
        f.__qualname__, f.__module__ = self.fn.__qualname__, self.fn.__module__
        return f

    def on(self, t: torch.Tensor):
        if t.is_cuda:
            if self._compiled is None:
                self._compiled = compiled_fn(self.fn, do_not_specialize=self.do_not_specialize)
            return self._compiled
        if self._interpreted is None:
            from triton.runtime.interpreter import InterpretedFunction
            self._interpreted = InterpretedFunction(self._plain())
        return self._interpreted


def compiled_fn(fn, **kw):
    """`fn` as a compiled Triton function (a JITFunction) whatever TRITON_INTERPRET says now:
    `triton.jit` returns an interpreter wrapper while it is set, and a compiled kernel that
    calls one (a helper made while a test had the interpreter on) fails."""
    from triton.runtime.jit import JITFunction
    return JITFunction(fn, **kw)


def device_fn(fn):
    """A device function for kernels run through `Kernel(helpers=)`: a compiled Triton
    function when triton is there (its `.fn` is `fn`), else `fn` itself."""
    return compiled_fn(fn) if HAVE_TRITON else fn


# ---------------------------------------------------------------- row statistics
# Reductions go through tl.reduce with explicit combine functions rather than tl.max/tl.sum:
# those are jit functions bound at triton import time, which the interpreter cannot call
# when TRITON_INTERPRET was set only after triton was imported. Triton's own elementwise
# max/sum combines are the ones its interpreter reduces with numpy (any other combine goes
# element by element in Python: ~10^4x slower); ours stand in where a version lacks them.
def _max_combine(a, b):
    return tl.maximum(a, b)


def _add_combine(a, b):
    return a + b


if HAVE_TRITON:
    import triton.language.standard as _std
    MAX_COMBINE = getattr(_std, "_elementwise_max", None) or compiled_fn(_max_combine)
    ADD_COMBINE = getattr(_std, "_sum_combine", None) or compiled_fn(_add_combine)
else:  # importable without triton (kernels are then never launched)
    MAX_COMBINE = ADD_COMBINE = None


def _row_stats_fn(X, stride_x, TGT, M_OUT, S_OUT, SZ_OUT, ZT_OUT, V: tl.constexpr, vocab_start,
                  inv_temp, BLOCK: tl.constexpr):
    # One program per token row: online max / sum-exp / sum p*z over the (scaled) logits,
    # plus the target logit when the target falls in this vocab shard. V (the shard's vocab
    # width, fixed per run) is a constexpr: Triton 3.6's interpreter passes plain int
    # arguments as shape-(1,) arrays, which numpy 2 refuses as a range() bound.
    row = tl.program_id(0)
    x_row = X + row.to(tl.int64) * stride_x
    cols = tl.arange(0, BLOCK)
    m = float("-inf")
    s = 0.0
    sz = 0.0
    for start in range(0, V, BLOCK):
        idx = start + cols
        msk = idx < V
        z = tl.load(x_row + idx, mask=msk, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.reduce(z, 0, MAX_COMBINE))
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new)
        s = s * alpha + tl.reduce(p, 0, ADD_COMBINE)
        sz = sz * alpha + tl.reduce(p * tl.where(msk, z, 0.0), 0, ADD_COMBINE)  # p = 0 off the row
        m = m_new
    t = tl.load(TGT + row) - vocab_start
    valid = (t >= 0) & (t < V)
    t_safe = tl.where(valid, t, 0)
    zt = tl.load(x_row + t_safe).to(tl.float32) * inv_temp
    zt = tl.where(valid, zt, 0.0)
    tl.store(M_OUT + row, m)
    tl.store(S_OUT + row, s)
    tl.store(SZ_OUT + row, sz)
    tl.store(ZT_OUT + row, zt)


def _row_grad_fn(X, stride_x, DX, stride_dx, TGT, LSE, G_LP, ENT, G_ENT, V: tl.constexpr,
                 vocab_start, inv_temp, HAS_ENT: tl.constexpr, OUT_BF16: tl.constexpr,
                 BLOCK: tl.constexpr):
    # d/dlogits of  g_lp * log p(target) + g_ent * entropy, for one row, written over X when
    # DX is X (the chunk is overwritten with its own gradient while it is hot). V: constexpr,
    # as in _row_stats_fn.
    row = tl.program_id(0)
    x_row = X + row.to(tl.int64) * stride_x
    dx_row = DX + row.to(tl.int64) * stride_dx
    cols = tl.arange(0, BLOCK)
    lse = tl.load(LSE + row)
    g = tl.load(G_LP + row)
    t = tl.load(TGT + row) - vocab_start
    if HAS_ENT:
        ge = tl.load(G_ENT + row)
        shift = tl.load(ENT + row) - lse
    for start in range(0, V, BLOCK):
        idx = start + cols
        msk = idx < V
        z = tl.load(x_row + idx, mask=msk, other=0.0).to(tl.float32) * inv_temp
        p = tl.exp(z - lse)
        d = tl.where(idx == t, g, 0.0) - g * p
        if HAS_ENT:
            # dH/dz_v = -p_v (log p_v + H) = -p_v (z_v - lse + H)
            d = d - ge * p * (z + shift)
        d = d * inv_temp
        if OUT_BF16:
            # to nearest even (what torch does): Triton's plain cast to bf16 truncated toward
            # zero on an H200, a bias on every logit gradient
            tl.store(dx_row + idx, to_bf16_rne(d), mask=msk)
        else:
            tl.store(dx_row + idx, d.to(DX.dtype.element_ty), mask=msk)


_row_stats = Kernel(_row_stats_fn)
_row_grad = Kernel(_row_grad_fn, helpers=("to_bf16_rne",))


def _launch_cfg(V: int, t: torch.Tensor):
    if t.is_cuda:
        return min(4096, triton.next_power_of_2(V)), 8
    return min(1024, triton.next_power_of_2(V)), 4  # interpreter: small V still loops


def row_stats(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, inv_temp: float):
    """Per row of `logits` [C, V] (any float dtype, unit column stride): max m, sum exp(z - m),
    sum exp(z - m) * z, and the target logit z_t (0 when the target is outside
    [vocab_start, vocab_start + V)), all fp32 with z = logits * inv_temp."""
    C, V = logits.shape
    outs = [torch.empty(C, dtype=torch.float32, device=logits.device) for _ in range(4)]
    if C == 0:
        return tuple(outs)
    if use_triton(logits):
        block, warps = _launch_cfg(V, logits)
        kw = {"num_warps": warps} if logits.is_cuda else {}
        _row_stats.on(logits)[(C,)](logits, logits.stride(0), targets, *outs, V, vocab_start,
                                    float(inv_temp), BLOCK=block, **kw)
        return tuple(outs)
    z = logits.float()
    if inv_temp != 1.0:
        z = z * inv_temp
    m = z.amax(dim=1)
    p = torch.sub(z, m[:, None]).exp_()
    local = targets - vocab_start
    valid = (local >= 0) & (local < V)
    zt = z.gather(1, local.clamp(0, V - 1)[:, None]).squeeze(1)
    pz = torch.bmm(p[:, None, :], z[:, :, None]).view(C)  # row dot products: no [C, V] product
    return m, p.sum(1), pz, torch.where(valid, zt, torch.zeros_like(zt))


def row_grad_(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, inv_temp: float,
              lse: torch.Tensor, g_lp: torch.Tensor, ent: torch.Tensor | None = None,
              g_ent: torch.Tensor | None = None) -> torch.Tensor:
    """Overwrite `logits` [C, V] with d(sum_t g_lp[t] * logp[t] + g_ent[t] * H[t]) / d logits
    (the raw, unscaled logits). lse/ent are the full-vocab statistics of z = logits*inv_temp."""
    C, V = logits.shape
    if C == 0:
        return logits
    has_ent = g_ent is not None
    if use_triton(logits):
        block, warps = _launch_cfg(V, logits)
        kw = {"num_warps": warps} if logits.is_cuda else {}
        _row_grad.on(logits)[(C,)](logits, logits.stride(0), logits, logits.stride(0), targets,
                                   lse, g_lp, ent if has_ent else lse, g_ent if has_ent else g_lp,
                                   V, vocab_start, float(inv_temp), HAS_ENT=has_ent,
                                   OUT_BF16=logits.dtype == torch.bfloat16, BLOCK=block, **kw)
        return logits
    local = targets - vocab_start
    valid = (local >= 0) & (local < V)
    rows = torch.nonzero(valid).squeeze(1)
    if logits.dtype == torch.float32 and not has_ent:
        # in place, three passes: logits <- -g_lp * inv_temp * softmax(z), then the targets
        if inv_temp != 1.0:
            logits.mul_(inv_temp)
        logits.sub_(lse[:, None]).exp_().mul_((-g_lp * inv_temp)[:, None])
        logits[rows, local[rows]] += g_lp[rows] * inv_temp
        return logits
    z = logits.float() * inv_temp
    p = torch.exp(z - lse[:, None])
    d = -g_lp[:, None] * p
    d[rows, local[rows]] += g_lp[rows]
    if has_ent:
        d -= g_ent[:, None] * p * (z + (ent - lse)[:, None])
    logits.copy_(d * inv_temp)
    return logits


# ---------------------------------------------------------------- segmented group statistics
def _seg_sum_fn(R, GID, SUM, CNT, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    msk = offs < N
    r = tl.load(R + offs, mask=msk, other=0.0).to(tl.float32)
    g = tl.load(GID + offs, mask=msk, other=0)
    tl.atomic_add(SUM + g, r, mask=msk)
    tl.atomic_add(CNT + g, tl.where(msk, 1.0, 0.0), mask=msk)


def _seg_m2_fn(R, GID, SUM, CNT, M2, N, BLOCK: tl.constexpr):
    # second pass (sum of squared deviations from the group mean): no E[x^2]-E[x]^2 cancellation
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    msk = offs < N
    r = tl.load(R + offs, mask=msk, other=0.0).to(tl.float32)
    g = tl.load(GID + offs, mask=msk, other=0)
    mean = tl.load(SUM + g, mask=msk, other=0.0) / tl.load(CNT + g, mask=msk, other=1.0)
    d = r - mean
    tl.atomic_add(M2 + g, d * d, mask=msk)


def _seg_norm_fn(R, GID, SUM, CNT, M2, OUT, N, eps, STD: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    msk = offs < N
    r = tl.load(R + offs, mask=msk, other=0.0).to(tl.float32)
    g = tl.load(GID + offs, mask=msk, other=0)
    cnt = tl.load(CNT + g, mask=msk, other=1.0)
    single = cnt < 1.5  # a group of one: mean 0, std 1 (verl / EasyR1 convention)
    mean = tl.where(single, 0.0, tl.load(SUM + g, mask=msk, other=0.0) / cnt)
    a = r - mean
    if STD:
        var = tl.load(M2 + g, mask=msk, other=0.0) / tl.maximum(cnt - 1.0, 1.0)  # unbiased
        std = tl.where(single, 1.0, tl.sqrt(var))
        a = a / (std + eps)
    tl.store(OUT + offs, a, mask=msk)


_seg_sum = Kernel(_seg_sum_fn)
_seg_m2 = Kernel(_seg_m2_fn)
_seg_norm = Kernel(_seg_norm_fn)


def group_advantages(rewards: torch.Tensor, dense_ids: torch.Tensor, num_groups: int, eps: float,
                     std_normalize: bool) -> torch.Tensor:
    """Triton segmented reduction: rewards [N] fp32, dense_ids [N] int in [0, num_groups)."""
    N = rewards.numel()
    out = torch.empty(N, dtype=torch.float32, device=rewards.device)
    if N == 0:
        return out
    acc = torch.zeros(3, num_groups, dtype=torch.float32, device=rewards.device)
    s, c, m2 = acc[0], acc[1], acc[2]
    block = 1024 if rewards.is_cuda else max(16, triton.next_power_of_2(min(N, 4096)))
    grid = (triton.cdiv(N, block),)
    _seg_sum.on(rewards)[grid](rewards, dense_ids, s, c, N, BLOCK=block)
    if std_normalize:
        _seg_m2.on(rewards)[grid](rewards, dense_ids, s, c, m2, N, BLOCK=block)
    _seg_norm.on(rewards)[grid](rewards, dense_ids, s, c, m2, out, N, float(eps),
                                STD=bool(std_normalize), BLOCK=block)
    return out
