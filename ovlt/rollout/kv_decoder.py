"""KV-cached forward of the Qwen2.5-VL language model, reading the trainer's own parameters.

The built-in engine does not copy weights: `LLMDecoder` holds references to the mcore model's
`Parameter` objects (names per docs/CONTRACTS.md) and runs the same math as the mcore
`GPTModel` (RMSNorm, fused QKV with per-group interleave [q_g..., k_g, v_g], MRoPE, GQA
attention, SwiGLU with [gate; up] stacked fc1), but against a static KV cache so that each
decode step is one token per sequence. With tensor parallelism each rank holds its head /
ffn / vocab shard and the decoder all-reduces exactly where mcore's row-parallel layers do.

Cache layout: one static buffer `[layers, 2, slots, kv_heads, S_max, head_dim]`. `forward`
runs a block of tokens per row (prefill: every row writes the same positions); `decode` runs
one token per slot, each slot writing and attending at its own length (per-slot positions are
device tensors, so the step is a fixed-shape graph that CUDA graphs can replay while slots
start and finish at different times).

Decode step kernels: a step is one token per slot, so every elementwise op (RMSNorm's
square-mean-scale, rotary, SwiGLU, residual adds) is a tiny kernel, ~45 per layer. `compile=True`
(CUDA, TP = 1) runs each layer's pointwise work through `torch.compile` (`decode_layer_in` /
`layer_out`: the same math in ~20 kernels a layer; the GEMMs stay cuBLAS, the attention stays
`decode_attention`), compiled with a dynamic slot count, so every decode width and every layer
share one graph per function (at 7B width, 320 slots: the step's graph 17 % shorter on an H100,
benchmarks/README.md).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ovlt.rollout.decode_attention import decode_attention


@dataclass
class _Layer:
    ln1: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: Optional[torch.Tensor]
    proj_w: torch.Tensor
    proj_b: Optional[torch.Tensor]
    ln2: torch.Tensor
    fc1_w: torch.Tensor
    fc2_w: torch.Tensor


def params_module(named: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A bare module whose `named_parameters()` are `named` (frozen, submodules made from the
    dotted names): mcore-named weights for `LLMDecoder` / the built-in engine without building
    the model."""
    root = torch.nn.Module()
    for name, t in named.items():
        *path, leaf = name.split(".")
        mod = root
        for p in path:
            if not hasattr(mod, p):
                mod.add_module(p, torch.nn.Module())
            mod = getattr(mod, p)
        mod.register_parameter(leaf, torch.nn.Parameter(t, requires_grad=False))
    return root


def _find(params: dict, *names: str):
    for n in names:
        if n in params:
            return params[n]
    return None


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """mcore's RMSNorm: normalised in fp32, rounded to x's dtype, then scaled by w."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, non-interleaved halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def decode_layer_in(x, ln1, qkv_w, qkv_b, cos, sin, eps: float, groups: int, q_per_group: int):
    """A decode layer up to attention, one token per slot: x [B, 1, H], cos / sin [B, 1, D]
    -> q [B, groups * q_per_group, D] (rotated), k [B, groups, D] (rotated), v [B, groups, D]."""
    B, D = x.shape[0], cos.shape[-1]
    qkv = F.linear(rms_norm(x, ln1, eps), qkv_w, qkv_b).view(B, groups, q_per_group + 2, D)
    q = rotate(qkv[:, :, :q_per_group].reshape(B, groups * q_per_group, D), cos, sin)
    k = rotate(qkv[:, :, q_per_group], cos, sin)
    return q, k, qkv[:, :, q_per_group + 1]


def layer_out(x, a, proj_w, proj_b, ln2, fc1_w, fc2_w, eps: float, reduce: Callable = _identity):
    """A layer from the attention output on: output projection, residual, SwiGLU MLP,
    residual. x [B, S, H]; a [B, S, Hq, D] (prefill) or [B, Hq, D] (decode, S = 1).
    `reduce` sums row-parallel partial outputs (TP)."""
    a = reduce(F.linear(a.reshape(*x.shape[:-1], -1), proj_w))
    if proj_b is not None:
        a = a + proj_b
    x = x + a
    gate, up = F.linear(rms_norm(x, ln2, eps), fc1_w).chunk(2, dim=-1)
    return x + reduce(F.linear(F.silu(gate) * up, fc2_w))


def layer_fns(eps: float, groups: int, q_per_group: int,
              reduce: Callable = _identity) -> tuple[Callable, Callable]:
    """(layer_in, layer_out) of one decode layer with the constants closed over (tensors only
    as arguments: what torch.compile traces)."""
    def bound_in(x, ln1, qkv_w, qkv_b, cos, sin):
        return decode_layer_in(x, ln1, qkv_w, qkv_b, cos, sin, eps, groups, q_per_group)

    def bound_out(x, a, proj_w, proj_b, ln2, fc1_w, fc2_w):
        return layer_out(x, a, proj_w, proj_b, ln2, fc1_w, fc2_w, eps, reduce)
    return bound_in, bound_out


_COMPILED: dict[tuple, tuple[Callable, Callable]] = {}


def compiled_layer_fns(eps: float, groups: int, q_per_group: int,
                       backend: str = "inductor") -> tuple[Callable, Callable]:
    """`layer_fns` through torch.compile, once per process and shape (constants closed over,
    not traced as dynamic ints); the slot count becomes dynamic at the second width seen
    (dynamo's automatic dynamic shapes), so all widths and all layers share at most two
    compiled graphs per function."""
    key = (float(eps), int(groups), int(q_per_group), backend)
    if key not in _COMPILED:
        _COMPILED[key] = tuple(torch.compile(f, backend=backend)
                               for f in layer_fns(eps, groups, q_per_group))
    return _COMPILED[key]


class LLMDecoder:
    """Bind to `model`'s LLM parameters. `model_cfg` is the ovlt `ModelConfig`. `compile`:
    run the decode step's pointwise work through torch.compile (TP = 1 only; `compile_backend`
    "inductor" on a GPU; tests use "aot_eager" to check the plumbing on CPU)."""

    def __init__(self, model: torch.nn.Module, model_cfg, tp_group=None, vocab_size: int | None = None,
                 compile: bool = False, compile_backend: str = "inductor"):
        params = dict(model.named_parameters())
        params.update({k: v for k, v in model.named_buffers()})
        emb_key = next((k for k in params if k.endswith("embedding.word_embeddings.weight")), None)
        if emb_key is None:
            raise ValueError("LLMDecoder: model has no '*embedding.word_embeddings.weight' parameter "
                             "(expected mcore names, see docs/CONTRACTS.md); the built-in engine "
                             "needs the first pipeline stage's weights")
        pre = emb_key[: -len("embedding.word_embeddings.weight")]
        self.prefix = pre
        idx = sorted({int(m.group(1)) for k in params
                      if (m := re.match(re.escape(pre) + r"decoder\.layers\.(\d+)\.", k))})
        if not idx:
            raise ValueError(f"LLMDecoder: no '{pre}decoder.layers.N.*' parameters found")
        self.layers: list[_Layer] = []
        for i in idx:
            p = f"{pre}decoder.layers.{i}."
            ln1 = _find(params, p + "input_layernorm.weight", p + "self_attention.linear_qkv.layer_norm_weight")
            ln2 = _find(params, p + "pre_mlp_layernorm.weight", p + "mlp.linear_fc1.layer_norm_weight")
            missing = [n for n, t in (("input_layernorm", ln1), ("pre_mlp_layernorm", ln2)) if t is None]
            if missing:
                raise ValueError(f"LLMDecoder: layer {i} has no {missing} weight")
            self.layers.append(_Layer(
                ln1=ln1, qkv_w=params[p + "self_attention.linear_qkv.weight"],
                qkv_b=params.get(p + "self_attention.linear_qkv.bias"),
                proj_w=params[p + "self_attention.linear_proj.weight"],
                proj_b=params.get(p + "self_attention.linear_proj.bias"),
                ln2=ln2, fc1_w=params[p + "mlp.linear_fc1.weight"],
                fc2_w=params[p + "mlp.linear_fc2.weight"]))
        self.embed = params[emb_key]
        if pre + "decoder.final_layernorm.weight" not in params:
            raise ValueError("LLMDecoder: the model has no final layer norm: the built-in engine "
                             "needs every LLM layer on this rank (pipeline_parallel=1; use "
                             "rollout.engine=vllm with pipeline parallelism)")
        self.final_norm = params[pre + "decoder.final_layernorm.weight"]
        out = params.get(pre + "output_layer.weight")
        self.lm_head = out if out is not None else self.embed  # tied embeddings
        self.tp_group = tp_group
        self.tp = torch.distributed.get_world_size(tp_group) if tp_group is not None else 1
        self.tp_rank = torch.distributed.get_rank(tp_group) if tp_group is not None else 0
        m = model_cfg
        self.head_dim = m.hidden_size // m.num_attention_heads
        self.n_heads = m.num_attention_heads // self.tp
        self.n_groups = m.num_query_groups // self.tp
        self.q_per_group = self.n_heads // self.n_groups
        self.eps = m.rms_norm_eps
        self.vocab_size = vocab_size or m.vocab_size
        half = self.head_dim // 2
        if sum(m.mrope_section) != half:
            raise ValueError(f"mrope_section {m.mrope_section} must sum to head_dim/2 = {half}")
        self.inv_freq = 1.0 / (m.rope_theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64)
                                                 / self.head_dim)).float()
        # Which of the 3 MRoPE position axes (t, h, w) drives each rotary frequency.
        self.axis_of_freq = torch.cat([torch.full((s,), i % 3, dtype=torch.long)
                                       for i, s in enumerate(m.mrope_section)])
        self.compiled = bool(compile) and self.tp == 1
        if self.compiled:
            self._layer_in, self._layer_out = compiled_layer_fns(
                self.eps, self.n_groups, self.q_per_group, compile_backend)
        else:
            self._layer_in, self._layer_out = layer_fns(self.eps, self.n_groups,
                                                        self.q_per_group, self._reduce)

    # ------------------------------------------------------------------ pieces
    @property
    def device(self):
        return self.embed.device

    @property
    def dtype(self):
        return self.embed.dtype

    def _reduce(self, x):
        if self.tp > 1:
            torch.distributed.all_reduce(x, group=self.tp_group)
        return x

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            return F.embedding(ids, self.embed)
        vp = self.embed.shape[0]
        lo = self.tp_rank * vp
        local = ids - lo
        outside = (local < 0) | (local >= vp)
        out = F.embedding(local.clamp(0, vp - 1), self.embed)
        out = out.masked_fill(outside.unsqueeze(-1), 0)
        return self._reduce(out)

    def rope(self, position_ids: torch.Tensor):
        """position_ids [3, B, S] -> cos, sin [B, S, head_dim] (MRoPE: each frequency band
        rotates by the t, h or w position as `mrope_section` assigns)."""
        dev = position_ids.device
        if self.inv_freq.device != dev:  # moved once, outside any CUDA-graph capture
            self.inv_freq, self.axis_of_freq = self.inv_freq.to(dev), self.axis_of_freq.to(dev)
        inv, axis = self.inv_freq, self.axis_of_freq
        pos = position_ids.float().index_select(0, axis)          # [D/2, B, S]
        freqs = pos.permute(1, 2, 0) * inv                         # [B, S, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] (after final norm) -> fp32 logits [..., vocab] (full vocab)."""
        out = F.linear(hidden, self.lm_head).float()
        if self.tp > 1:
            parts = [torch.empty_like(out) for _ in range(self.tp)]
            torch.distributed.all_gather(parts, out.contiguous(), group=self.tp_group)
            out = torch.cat(parts, dim=-1)
        if out.shape[-1] > self.vocab_size:  # mcore pads the vocab; padding is never sampled
            out = out[..., : self.vocab_size]
        return out

    def new_cache(self, batch: int, max_len: int) -> torch.Tensor:
        return torch.zeros(len(self.layers), 2, batch, self.n_groups, max_len, self.head_dim,
                           dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: torch.Tensor,
                slots: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """x [B, S, H] input embeddings; cos/sin [B, S, D]; `slots` [S] cache positions written;
        attn_mask [B, 1, S, S_max] bool (True = attend). Returns final-normed hidden [B, S, H]."""
        B, S, _ = x.shape
        G, Q, D = self.n_groups, self.q_per_group, self.head_dim
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for li, L in enumerate(self.layers):
            h = rms_norm(x, L.ln1, self.eps)
            qkv = F.linear(h, L.qkv_w, L.qkv_b).view(B, S, G, Q + 2, D)
            q = qkv[:, :, :, :Q].reshape(B, S, G * Q, D).transpose(1, 2)
            k = qkv[:, :, :, Q].transpose(1, 2)
            v = qkv[:, :, :, Q + 1].transpose(1, 2)
            q = rotate(q, cos, sin)
            k = rotate(k, cos, sin)
            kc, vc = cache[li, 0], cache[li, 1]
            kc.index_copy_(2, slots, k)
            vc.index_copy_(2, slots, v)
            a = F.scaled_dot_product_attention(q, kc, vc, attn_mask=attn_mask, enable_gqa=G != G * Q)
            x = layer_out(x, a.transpose(1, 2), L.proj_w, L.proj_b, L.ln2, L.fc1_w, L.fc2_w,
                          self.eps, self._reduce)
        return rms_norm(x, self.final_norm, self.eps)

    @torch.no_grad()
    def decode(self, tok: torch.Tensor, write_pos: torch.Tensor, rope_pos: torch.Tensor,
               cache: torch.Tensor) -> torch.Tensor:
        """One token per cache slot: tok, write_pos, rope_pos [B] int64 (B = the cache's slots).
        Slot b's token is written at cache position write_pos[b] and attends positions
        [0, write_pos[b]]; its rotary position is rope_pos[b] (the same on the three MRoPE
        axes: generated tokens are text). Returns fp32 logits [B, vocab]."""
        B = tok.shape[0]
        x = self.embed_tokens(tok[:, None])                              # [B, 1, H]
        cos, sin = self.rope(rope_pos[None, :, None].expand(3, -1, -1))  # [B, 1, D]
        rows = torch.arange(B, device=tok.device)
        lengths = write_pos + 1
        for li, L in enumerate(self.layers):
            q, k, v = self._layer_in(x, L.ln1, L.qkv_w, L.qkv_b, cos, sin)
            kc, vc = cache[li, 0], cache[li, 1]                          # [B, G, S_max, D]
            kc[rows, :, write_pos] = k
            vc[rows, :, write_pos] = v
            a = decode_attention(q, kc, vc, lengths)                      # [B, G*Q, D]
            x = self._layer_out(x, a, L.proj_w, L.proj_b, L.ln2, L.fc1_w, L.fc2_w)
        return self.logits(rms_norm(x, self.final_norm, self.eps)[:, 0])
