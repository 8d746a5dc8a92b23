"""Fused FP8 cast (+ transpose) Triton kernel for the per-tensor FP8 linears on CUDA.

`torch._scaled_mm` (cuBLASLt FP8) only takes "TN" operands: both K-major. So dX = dY W needs W
transposed and dW = dY^T X needs dY and X transposed. Casting to FP8 and then transposing the
1-byte tensor is slow in torch (a separate, poorly coalesced copy: ~1 ms for a 7B fc1 weight on
an H100); this kernel reads each tile (`TILE`) of the bf16 tensor once and writes the scaled
FP8 tile and/or its transpose, like TE's cast-transpose.
Scales are per tensor. Current scaling: one torch reduction gives amax and the kernel turns it
into the scale itself (program 0 also writes the dequant scale): two launches per cast, no
tiny torch ops for the scale. Delayed scaling (`AmaxHistory`): the scale comes from earlier
casts' amaxes and the kernel records this tensor's amax as it casts: one launch, no amax pass.
CPU: Triton's interpreter with TRITON_INTERPRET=1, else torch ops with the same result.
"""
from __future__ import annotations

import torch

from ovlt.kernels.triton_ops import MAX_COMBINE, Kernel, device_fn, tl, use_triton

# Tile of one program (rows x cols) and its warps. `benchmarks/sft_parts.py --parts fp8` on an
# H200: 64 x 128 with 4 warps is 5-8 % faster than 64 x 64 on the step's big casts (3.4-3.6 TB/s).
TILE = {"rows": 64, "cols": 128, "num_warps": 4}


class AmaxHistory:
    """Delayed-scaling state of one tensor role (a layer's input, weight or output gradient):
    the amaxes of its last `length` casts, on the device, and the host-side call count.
    Cast k records its own amax in slot k % L (zeroed by cast k-1) and takes its scale from the
    other slots but the next one (which it zeroes for cast k+1), so no program of one launch
    reads a slot another program writes. Cast 0 has no history: it uses its own amax.
    A slot is LANES floats that the kernel's programs atomic-max into by program id: one
    address for ~10^5 programs serialised the atomics (+0.75 ms per step on an H200)."""

    LANES = 32

    def __init__(self, length: int, device):
        if length < 3:
            raise ValueError(f"FP8 amax history length must be >= 3, got {length}")
        self.hist = torch.zeros(length, self.LANES, dtype=torch.float32, device=device)
        self.calls = 0

    def amaxes(self) -> torch.Tensor:
        """[length] the amax recorded in each slot (0 = none yet / cleared)."""
        return self.hist.amax(dim=1)

    def slots(self):
        L = self.hist.shape[0]
        return self.calls % L, (self.calls + 1) % L


# Device helpers shared by every FP8 cast kernel (here and `swiglu.py`; `Kernel(helpers=)`).
@device_fn
def _fp8_scale(src_ptr, dq_ptr, n_src, skip0, skip1, first, FMAX: tl.constexpr,
               NSRC: tl.constexpr, LANES: tl.constexpr):
    # amax = max of src[0:n_src] but the slots (rows of LANES) skip0 / skip1 (current
    # scaling: src = this tensor's amax, n_src 1). The same fp32 arithmetic as torch's
    # `fmax / amax` (which is fmax * (1 / amax)) and `.reciprocal()`; div_rn: Triton's
    # default fp32 division is approximate. Program 0 writes the dequant scale.
    idx = tl.arange(0, NSRC)
    slot = idx // LANES
    h = tl.load(src_ptr + idx, mask=(idx < n_src) & (slot != skip0) & (slot != skip1),
                other=0.0).to(tl.float32)
    amax = tl.maximum(tl.reduce(h, 0, MAX_COMBINE), 1e-12)
    s = tl.math.div_rn(tl.full((), 1.0, tl.float32), amax) * FMAX
    tl.store(dq_ptr, tl.math.div_rn(tl.full((), 1.0, tl.float32), s), mask=first)
    return s


@device_fn
def _fp8_store(q_ptr, qt_ptr, x, s, rows, cols, n_rows, n_cols, mask, FMAX: tl.constexpr,
               WRITE_Q: tl.constexpr, WRITE_QT: tl.constexpr):
    # x [rows, cols] (fp32) scaled, saturated and cast; q is [n_rows, n_cols] row-major and qt
    # its transpose. Returns max|x| of the tile.
    y = tl.minimum(tl.maximum(x * s, -FMAX), FMAX).to(q_ptr.dtype.element_ty)
    if WRITE_Q:
        tl.store(q_ptr + rows[:, None] * n_cols + cols[None, :], y, mask=mask)
    if WRITE_QT:
        tl.store(qt_ptr + cols[None, :] * n_rows + rows[:, None], y, mask=mask)
    return tl.reduce(tl.reduce(tl.abs(x), 1, MAX_COMBINE), 0, MAX_COMBINE)


@device_fn
def _fp8_record(hist_ptr, amax, cur, nxt, first, LANES: tl.constexpr):
    # this cast's amax into its history slot (lane by program id), the next slot zeroed
    lane = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) % LANES
    tl.atomic_max(hist_ptr + cur * LANES + lane, amax)
    lanes = tl.arange(0, LANES)
    tl.store(hist_ptr + nxt * LANES + lanes, tl.full((LANES,), 0.0, tl.float32),
             mask=lanes < LANES * first.to(tl.int32))  # program 0 only


FP8_HELPERS = ("_fp8_scale", "_fp8_store", "_fp8_record")
# the history slots move every call: one compiled variant for all of them
FP8_SLOT_ARGS = ("skip0", "skip1", "cur", "nxt")


def _cast_t_fn(x_ptr, q_ptr, qt_ptr, src_ptr, dq_ptr, hist_ptr, R, C, stride_r, stride_c,
               n_src, skip0, skip1, cur, nxt, FMAX: tl.constexpr, WRITE_Q: tl.constexpr,
               WRITE_QT: tl.constexpr, RECORD: tl.constexpr, NSRC: tl.constexpr,
               LANES: tl.constexpr, IDX64: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_C: tl.constexpr):
    first = (tl.program_id(0) == 0) & (tl.program_id(1) == 0)
    s = _fp8_scale(src_ptr, dq_ptr, n_src, skip0, skip1, first, FMAX, NSRC, LANES)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if IDX64:
        rows, cols = rows.to(tl.int64), cols.to(tl.int64)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    x = tl.load(x_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask,
                other=0.0).to(tl.float32)
    amax = _fp8_store(q_ptr, qt_ptr, x, s, rows, cols, R, C, mask, FMAX, WRITE_Q, WRITE_QT)
    if RECORD:
        _fp8_record(hist_ptr, amax, cur, nxt, first, LANES)


_cast_t_kernel = Kernel(_cast_t_fn, FP8_HELPERS, FP8_SLOT_ARGS)


def scale_source(t: torch.Tensor, history: "AmaxHistory | None"):
    """Where a cast of `t` takes its amax from, as kernel arguments (src, n_src, skip0, skip1,
    cur, nxt): its history's slots but this cast's and the next one's, or (no history, or its
    first cast) t's own amax in one torch reduction. Counts the cast in the history."""
    cur, nxt = history.slots() if history is not None else (-1, -1)
    if history is not None and history.calls > 0:
        src, n_src, skip0, skip1 = history.hist, history.hist.numel(), cur, nxt
    else:  # exact in t's dtype: a max of its values
        src, n_src, skip0, skip1 = torch.linalg.vector_norm(t, float("inf")), 1, -1, -1
    if history is not None:
        history.calls += 1
    return src, n_src, skip0, skip1, cur, nxt


def needs_int64(n_rows, n_cols, *row_strides, col_stride: int = 1) -> bool:
    """Whether a kernel over [n_rows, n_cols] tiles with these row strides (and column stride)
    in elements forms an offset of 2^31 or more: int32 offset arithmetic would wrap there."""
    return n_rows * max((n_cols, *row_strides)) + n_cols * col_stride >= 2 ** 31


def fp8_outputs(n_rows, n_cols, dtype, device, want_q: bool, want_qt: bool):
    """Empty (q [n_rows, n_cols] or None, q^T [n_cols, n_rows] or None, dequant scale) that a
    cast kernel fills."""
    q = torch.empty(n_rows, n_cols, dtype=dtype, device=device) if want_q else None
    qt = torch.empty(n_cols, n_rows, dtype=dtype, device=device) if want_qt else None
    return q, qt, torch.empty((), dtype=torch.float32, device=device)


def launch_args(history, n_src):
    """Keyword arguments every FP8 cast kernel launch shares."""
    return {"RECORD": history is not None,
            "LANES": 1 if history is None else history.LANES,
            "NSRC": max(2, 1 << (n_src - 1).bit_length())}


def cast_transpose(t: torch.Tensor, dtype, want_q: bool = True, want_qt: bool = False,
                   history: AmaxHistory | None = None):
    """Per-tensor FP8 cast of a 2-D tensor. Returns (q [R,C] row-major or None,
    qt [C,R] row-major (= t^T) or None, dequant scale: a 0-dim fp32 tensor, scale * q ~= t).
    Scale from t's own amax (current scaling), or with `history` from the amaxes of its
    previous casts (delayed scaling: no amax pass over t; values above the scaled range
    saturate at the format's max), recording t's amax there."""
    if t.dim() != 2:
        raise ValueError(f"cast_transpose takes 2-D tensors, got {tuple(t.shape)}")
    t = t.detach()
    fmax = torch.finfo(dtype).max
    src, n_src, skip0, skip1, cur, nxt = scale_source(t, history)
    if not use_triton(t):
        if n_src == 1:
            amax = src.float()
        else:
            keep = torch.ones(src.shape[0], dtype=torch.bool, device=src.device)
            keep[[skip0, skip1]] = False
            amax = src[keep].max()
        qscale = fmax / amax.clamp(min=1e-12)
        y = (t.float() * qscale).clamp(-fmax, fmax).to(dtype)
        if history is not None:
            history.hist[cur, 0] = t.abs().max().float()
            history.hist[nxt] = 0.0
        return (y.contiguous() if want_q else None,
                y.t().contiguous() if want_qt else None, qscale.reciprocal())
    R, C = t.shape
    q, qt, dq = fp8_outputs(R, C, dtype, t.device, want_q, want_qt)
    br, bc = TILE["rows"], TILE["cols"]
    grid = ((R + br - 1) // br, (C + bc - 1) // bc)
    hist = src if history is None else history.hist
    _cast_t_kernel.on(t)[grid](
        t, q if want_q else qt, qt if want_qt else q, src, dq, hist, R, C, t.stride(0),
        t.stride(1), n_src, skip0, skip1, cur, nxt, FMAX=fmax, WRITE_Q=want_q, WRITE_QT=want_qt,
        IDX64=needs_int64(R, C, t.stride(0), col_stride=t.stride(1)),
        BLOCK_R=br, BLOCK_C=bc, **launch_args(history, n_src),
        **({"num_warps": TILE["num_warps"]} if t.is_cuda else {}))
    return q, qt, dq
