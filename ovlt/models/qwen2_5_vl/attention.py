"""ovlt's local core-attention module for mcore `SelfAttention` (spec slot `core_attention`).

mcore's local `DotProductAttention` has no packed (THD / cu_seqlens) support, so this module
replaces it in the local and FP8 specs. It takes the shapes mcore hands a core attention:
  * `sbhd`: q [S, B, np, hn], k/v [S, B, ng, hn] -> [S, B, np*hn];
  * `thd` (packed_seq_params.qkv_format == "thd"): q [T, np, hn], k/v [T, ng, hn] -> [T, np*hn];
and, whenever `packed_seq_params.cu_seqlens_q` is set, attends only inside each segment
(samples of a packed LLM row, or images / windows of the vision tower; there the layer reads
`cu_window_seqlens` unless its index is a full-attention layer).

Kernels: flash-attn's varlen kernel on CUDA when it imports, else torch SDPA. For segments, SDPA
runs once per distinct segment length on the stacked segments of that length (vision windows
are mostly equal-sized, so that is a handful of batched calls instead of one per window). On a
GPU, SDPA's flash kernel goes first: the cuDNN backend, which torch may prefer there, builds an
execution plan for every new shape (~40 ms of host time each on an H100, the GPU idle behind
it), and packed samples bring new segment lengths with every batch.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from ovlt.logging import get_logger, log_once
from ovlt.utils.device import to_device_async

log = get_logger(__name__)

try:  # optional GPU package: one seam, a real fallback
    from flash_attn import flash_attn_varlen_func as _flash_varlen
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _flash_varlen = None


def resolve_backend(requested: str = "auto", device_is_cuda: Optional[bool] = None) -> str:
    """'flash' when asked for / available on CUDA, else 'sdpa'. ('te' is chosen in specs.py.)"""
    cuda = torch.cuda.is_available() if device_is_cuda is None else device_is_cuda
    if requested == "flash" and _flash_varlen is None:
        raise RuntimeError("model.attention_backend=flash but flash_attn does not import")
    if requested in ("flash", "auto") and cuda and _flash_varlen is not None:
        return "flash"
    return "sdpa"


# SDPA backends in priority order on a GPU: no per-shape plan building first (module docstring)
CUDA_SDPA_ORDER = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                   SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]


def _sdpa(q, k, v, causal, scale, dropout):
    """q [N, h, L, d], k/v [N, g, L, d]."""
    def run():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                              dropout_p=dropout,
                                              enable_gqa=k.shape[1] != q.shape[1])
    if not q.is_cuda:
        return run()
    with sdpa_kernel(CUDA_SDPA_ORDER, set_priority=True):
        return run()


def _starts_by_length(cu_seqlens: torch.Tensor) -> dict:
    """Segment length -> start offsets of the non-empty segments of that length, in order."""
    bounds = cu_seqlens.tolist()
    by_len = defaultdict(list)
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e > s:
            by_len[e - s].append(s)
    return by_len


def segment_groups(cu_seqlens: torch.Tensor, device, index: bool = True) -> list:
    """[(length, n, token index [n*length] or None, first start)] for the non-empty segments of
    `cu_seqlens`, grouped by length. The index is None when the group's segments lie back to
    back (a packed row of equal-length samples, most vision windows): attention then reads
    them as a view instead of gathering; `index=False`: None for every group (the caller
    gathers through `segment_permutation`). One host sync when `cu_seqlens` is on the GPU (pass
    the host copy where there is one; cache the result per batch, see `_groups`)."""
    out = []
    for length, starts in _starts_by_length(cu_seqlens).items():
        contiguous = not index or all(b - a == length for a, b in zip(starts[:-1], starts[1:]))
        # built on the host and copied through pinned memory: a list straight to a GPU
        # tensor is a synchronous copy (the stream drains)
        idx = None if contiguous else to_device_async(
            (torch.tensor(starts)[:, None] + torch.arange(length)[None]).reshape(-1), device)
        out.append((length, len(starts), idx, starts[0]))
    return out


def _gather(t, length, n, idx, start):
    """The segments of a group as [n, heads, length, d] (a view when they are contiguous)."""
    if idx is not None:
        seg = t.index_select(0, idx)
    elif start == 0 and n * length == t.shape[0]:
        seg = t  # not a full-length narrow: its backward would zero-fill and copy the gradient
    else:
        seg = t.narrow(0, start, n * length)
    return seg.view(n, length, t.shape[1], t.shape[2]).transpose(1, 2)


def segment_permutation(cu_seqlens: torch.Tensor, total: int, device):
    """(tokens in `segment_groups(cu_seqlens)` order, and for each of the `total` tokens its row
    in that order), both on `device`; None when some token lies in no segment. With them a
    batch's segments are gathered once and split per group (a split's backward is one
    concatenation), and the groups' outputs put back with one gather: no per-group scatter or
    full-size zero fill, forward or backward. Pass the host copy of `cu_seqlens` where there
    is one."""
    pos = [(torch.tensor(starts)[:, None] + torch.arange(length)[None]).reshape(-1)
           for length, starts in _starts_by_length(cu_seqlens).items()]
    pos = torch.cat(pos) if pos else torch.zeros(0, dtype=torch.long)
    if pos.numel() != total:
        return None
    rows = torch.empty(total, dtype=torch.long)
    rows[pos] = torch.arange(total)
    return to_device_async(pos, device), to_device_async(rows, device)


def segment_plan(cu_seqlens: torch.Tensor, total: int, device, permutation=None) -> dict:
    """`varlen_attention`'s `groups` and `permutation` for `cu_seqlens` (host copy preferred;
    cache the result per batch). Segments covering every token: one length group is read as a
    view (no permutation needed), several go through `segment_permutation`; tokens outside
    every segment, or `permutation=False`, take the per-group path with token indexes."""
    cu = cu_seqlens.cpu() if cu_seqlens.is_cuda else cu_seqlens  # one host sync, not one a call
    if permutation is None:
        groups = segment_groups(cu, device, index=False)
        if sum(n * length for length, n, _, _ in groups) == total:
            if len(groups) == 1:
                return {"groups": groups, "permutation": False}
            return {"groups": groups, "permutation": segment_permutation(cu, total, device)}
    return {"groups": segment_groups(cu, device), "permutation": False}


def varlen_attention(q, k, v, cu_seqlens, causal: bool, scale: float, dropout: float = 0.0,
                     backend: str = "sdpa", max_seqlen: Optional[int] = None, groups=None,
                     permutation=None):
    """Attention inside the segments of `cu_seqlens`. q [T, h, d], k/v [T, g, d] -> [T, h, d].
    `groups` / `permutation`: `segment_plan` of `cu_seqlens` when already known
    (`permutation=False` alone: use the per-group path)."""
    if backend == "flash" and q.is_cuda:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        if max_seqlen is None:
            max_seqlen = int((cu[1:] - cu[:-1]).max())
        return _flash_varlen(q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p=dropout,
                             softmax_scale=scale, causal=causal)
    if groups is None or permutation is None:
        plan = segment_plan(cu_seqlens, q.shape[0], q.device, permutation)
        groups, permutation = plan["groups"], plan["permutation"]
    if len(groups) == 1 and groups[0][0] * groups[0][1] == q.shape[0]:
        length, n, _, _ = groups[0]  # one group covering every token (back to back): a view
        o = _sdpa(*(_gather(t, length, n, None, 0) for t in (q, k, v)), causal, scale, dropout)
        return o.transpose(1, 2).reshape(q.shape)
    if permutation:
        order, rows = permutation
        sizes = [n * length for length, n, _, _ in groups]
        parts = zip(*(t.index_select(0, order).split(sizes) for t in (q, k, v)))
        outs = [_sdpa(*(t.view(n, length, t.shape[1], t.shape[2]).transpose(1, 2) for t in qkv),
                      causal, scale, dropout).transpose(1, 2).reshape(n * length, *q.shape[1:])
                for qkv, (length, n, _, _) in zip(parts, groups)]
        return torch.cat(outs).index_select(0, rows)
    out = q.new_zeros(q.shape)  # tokens outside every segment stay zero
    for length, n, idx, start in groups:
        o = _sdpa(*(_gather(t, length, n, idx, start) for t in (q, k, v)), causal, scale, dropout)
        if idx is None:
            idx = torch.arange(start, start + n * length, device=q.device)
        out = out.index_copy(0, idx, o.transpose(1, 2).reshape(n * length, *q.shape[1:]))
    return out


class OvltCoreAttention(MegatronModule):
    """Drop-in for mcore's `DotProductAttention` (same constructor) with packed-sequence support."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise NotImplementedError("context parallelism needs the TE attention spec "
                                      "(transformer_impl=te); ovlt's local attention has no CP")
        self.layer_number = max(1, layer_number)
        self.causal = attn_mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        hn = config.kv_channels
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(hn)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        # Vision tower: window attention except at the configured full-attention layers.
        full = getattr(config, "ovlt_full_attention_layers", None)
        self.window = full is not None and (self.layer_number - 1) not in set(full)
        self.backend = resolve_backend(getattr(config, "ovlt_attention_backend", "auto"))
        log_once(log, f"core_attn_{self.backend}", f"core attention backend: {self.backend}")

    def _cu(self, packed_seq_params):
        if packed_seq_params is None:
            return None, None
        if self.window:
            cu = packed_seq_params.cu_window_seqlens
            return cu, getattr(packed_seq_params, "max_window_seqlen", None)
        return packed_seq_params.cu_seqlens_q, packed_seq_params.max_seqlen_q

    def _groups(self, packed_seq_params, cu, device, total: int) -> dict:
        """Segment grouping and order (`varlen_attention`'s keywords), computed once per batch
        and kept on the params object, so the layers don't each sync with the host and rebuild
        the indices."""
        if self.backend == "flash" and device.type == "cuda":
            return {}
        key = "_ovlt_groups_window" if self.window else "_ovlt_groups_full"
        cached = getattr(packed_seq_params, key, None)
        if cached is None or cached[0] is not cu:
            # the boundaries' host copy, when the model attached one, avoids a device sync
            host = getattr(packed_seq_params, "host_" + ("cu_window_seqlens" if self.window
                                                          else "cu_seqlens_q"), None)
            host = host if host is not None else cu.cpu()
            cached = (cu, segment_plan(host, total, device))
            setattr(packed_seq_params, key, cached)
        return cached[1]

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by OvltCoreAttention")
        dropout = self.dropout if self.training else 0.0
        causal = self.causal if attn_mask_type is None else attn_mask_type in (
            AttnMaskType.causal, AttnMaskType.padding_causal)
        cu, max_len = self._cu(packed_seq_params)
        if query.dim() == 3:  # thd
            if cu is None:
                raise ValueError("thd attention needs packed_seq_params.cu_seqlens_q")
            out = varlen_attention(query, key, value, cu, causal, self.scale, dropout,
                                   self.backend, max_len,
                                   **self._groups(packed_seq_params, cu, query.device,
                                                  query.shape[0]))
            return out.reshape(out.shape[0], -1)
        s, b = query.shape[:2]
        if cu is not None:
            if b != 1:
                raise ValueError(f"cu_seqlens with sbhd layout needs batch 1, got {b}")
            out = varlen_attention(query[:, 0], key[:, 0], value[:, 0], cu, causal, self.scale,
                                   dropout, self.backend, max_len,
                                   **self._groups(packed_seq_params, cu, query.device, s))
            return out.reshape(s, 1, -1)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [B, h, S, d]
        mask = None
        if attention_mask is not None and not causal:
            mask = ~attention_mask.bool()  # mcore: True = masked out; SDPA: True = attend
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                           scale=self.scale, dropout_p=dropout,
                                           enable_gqa=k.shape[1] != q.shape[1])
        return o.permute(2, 0, 1, 3).reshape(s, b, -1)
