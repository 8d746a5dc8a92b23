"""Model FLOPs of one training step of Qwen2.5-VL (vision tower + merger + LLM), for MFU.

Conventions (stated so numbers can be compared):
- matmul: 2 FLOPs per multiply-add; forward = 2 * params * tokens for every linear layer.
- backward: 2x forward for a trainable component (activation + weight grads), 1x when it is
  frozen but a component before it trains (activation grads only), 0 otherwise.
- attention scores/values: exact per sample — causal L(L+1)/2 pairs in the LLM,
  bidirectional L^2 per window (window layers) or per image (full layers) in the vision tower;
  its backward is 2x forward whenever activation grads flow through it.
- embeddings lookups, norms, activations and softmax are not counted (standard MFU practice).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence


@dataclass
class FlopsBreakdown:
    vision: float = 0.0
    merger: float = 0.0
    llm: float = 0.0

    @property
    def total(self) -> float:
        return self.vision + self.merger + self.llm


def _bwd_factors(freeze: Iterable[str]) -> dict[str, tuple[float, float]]:
    """(matmul backward multiplier, attention backward multiplier) per component."""
    frozen = set(freeze)
    out, upstream_trains = {}, False
    for comp in ("vision", "merger", "llm"):
        trains = comp not in frozen
        mm = 2.0 if trains else (1.0 if upstream_trains else 0.0)
        attn = 2.0 if (trains or upstream_trains) else 0.0
        out[comp] = (mm, attn)
        upstream_trains = upstream_trains or trains
    return out


def llm_forward_flops(m, seqlens: Sequence[int], causal: bool = True):
    """(matmul, attention) forward FLOPs of the LLM over samples of lengths `seqlens`."""
    h, f, v = m.hidden_size, m.ffn_hidden_size, m.vocab_size
    kv = m.num_query_groups * (h // m.num_attention_heads)
    per_tok = 2 * (h * (h + 2 * kv) + h * h + 3 * h * f) * m.num_layers + 2 * h * v
    tokens = sum(seqlens)
    # QK^T and AV: 2 matmuls x 2 FLOPs x heads*head_dim per (query, key) pair.
    pairs = sum(L * (L + 1) // 2 if causal else L * L for L in seqlens)
    return per_tok * tokens, m.num_layers * 4 * h * pairs


def window_lengths(v, h: int, w: int) -> list[int]:
    """Patch counts of the attention windows of one frame (HF's window partition: windows of
    `window_size // patch_size // merge` merged units per side, over the merged grid)."""
    m = v.spatial_merge_size
    ws = max(1, v.window_size // v.patch_size // m)
    gh, gw = h // m, w // m
    out = []
    for i in range(0, gh, ws):
        for j in range(0, gw, ws):
            out.append(min(ws, gh - i) * min(ws, gw - j) * m * m)
    return out


def vision_forward_flops(v, llm_hidden: int, grids: Sequence[Sequence[int]]):
    """(patch embed, vision matmul, vision attention, merger matmul) forward FLOPs of `grids`."""
    hv, fv = v.hidden_size, v.intermediate_size
    patch_in = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    n_full = len(v.fullatt_block_indexes)
    n_win = v.depth - n_full
    pe = mm = attn = merger = 0.0
    for t, h, w in grids:
        p = t * h * w
        pe += 2 * p * patch_in * hv
        mm += 2 * p * v.depth * (4 * hv * hv + 3 * hv * fv)
        win = sum(L * L for L in window_lengths(v, h, w)) * t
        attn += 4 * hv * (n_full * p * p + n_win * win)
        merged = p // (v.spatial_merge_size ** 2)
        hm = hv * v.spatial_merge_size ** 2
        merger += 2 * merged * (hm * hm + hm * llm_hidden)
    return pe, mm, attn, merger


def train_step_flops(model_cfg, seqlens: Sequence[int], grids: Sequence[Sequence[int]],
                     freeze: Iterable[str] = (), causal: bool = True) -> FlopsBreakdown:
    """FLOPs of forward + backward over samples of lengths `seqlens` with images `grids`.
    `causal=False` counts the LLM's full L^2 score matrix (what SDPA FLOP counters report)."""
    bw = _bwd_factors(freeze)
    llm_mm, llm_attn = llm_forward_flops(model_cfg, seqlens, causal)
    pe, v_mm, v_attn, mg = vision_forward_flops(model_cfg.vision, model_cfg.hidden_size, grids)
    # The patch embedding's input (pixels) needs no gradient: weight gradient only.
    pe_bwd = 1.0 if bw["vision"][0] == 2.0 else 0.0
    return FlopsBreakdown(
        vision=pe * (1 + pe_bwd) + v_mm * (1 + bw["vision"][0]) + v_attn * (1 + bw["vision"][1]),
        merger=mg * (1 + bw["merger"][0]),
        llm=llm_mm * (1 + bw["llm"][0]) + llm_attn * (1 + bw["llm"][1]))


# Dense peak TFLOP/s per GPU by device-name substring (bf16 / fp8), for MFU.
_PEAKS = [("H200", 989.4e12, 1978.9e12), ("H100", 989.4e12, 1978.9e12),
          ("A100", 312e12, 312e12), ("L40S", 362e12, 733e12)]


def peak_flops(device_name: str | None, fp8: bool = False) -> float | None:
    """Peak dense FLOP/s of one device, or None (CPU / unknown GPU: MFU is not reported).
    MFU of FP8 runs is quoted against the bf16 peak unless `fp8=True` is asked for."""
    if not device_name:
        return None
    for key, bf16, f8 in _PEAKS:
        if key in device_name:
            return f8 if fp8 else bf16
    return None
