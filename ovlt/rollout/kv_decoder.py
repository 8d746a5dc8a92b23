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
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

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


class LLMDecoder:
    """Bind to `model`'s LLM parameters. `model_cfg` is the ovlt `ModelConfig`."""

    def __init__(self, model: torch.nn.Module, model_cfg, tp_group=None, vocab_size: int | None = None):
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

    # ------------------------------------------------------------------ pieces
    @property
    def device(self):
        return self.embed.device

    @property
    def dtype(self):
        return self.embed.dtype

    def _rms(self, x, w):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * xf.to(x.dtype)

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

    @staticmethod
    def _rotate(x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

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
            h = self._rms(x, L.ln1)
            qkv = F.linear(h, L.qkv_w, L.qkv_b).view(B, S, G, Q + 2, D)
            q = qkv[:, :, :, :Q].reshape(B, S, G * Q, D).transpose(1, 2)
            k = qkv[:, :, :, Q].transpose(1, 2)
            v = qkv[:, :, :, Q + 1].transpose(1, 2)
            q = self._rotate(q, cos, sin)
            k = self._rotate(k, cos, sin)
            kc, vc = cache[li, 0], cache[li, 1]
            kc.index_copy_(2, slots, k)
            vc.index_copy_(2, slots, v)
            a = F.scaled_dot_product_attention(q, kc, vc, attn_mask=attn_mask, enable_gqa=G != G * Q)
            a = F.linear(a.transpose(1, 2).reshape(B, S, G * Q * D), L.proj_w)
            x = self._mlp(self._attn_out(x, a, L), L)
        return self._rms(x, self.final_norm)

    def _attn_out(self, x, a, L: _Layer):
        a = self._reduce(a)
        if L.proj_b is not None:
            a = a + L.proj_b
        return x + a

    def _mlp(self, x, L: _Layer):
        h = self._rms(x, L.ln2)
        gate, up = F.linear(h, L.fc1_w).chunk(2, dim=-1)
        return x + self._reduce(F.linear(F.silu(gate) * up, L.fc2_w))

    @torch.no_grad()
    def decode(self, tok: torch.Tensor, write_pos: torch.Tensor, rope_pos: torch.Tensor,
               cache: torch.Tensor) -> torch.Tensor:
        """One token per cache slot: tok, write_pos, rope_pos [B] int64 (B = the cache's slots).
        Slot b's token is written at cache position write_pos[b] and attends positions
        [0, write_pos[b]]; its rotary position is rope_pos[b] (the same on the three MRoPE
        axes: generated tokens are text). Returns fp32 logits [B, vocab]."""
        B = tok.shape[0]
        G, Q, D = self.n_groups, self.q_per_group, self.head_dim
        x = self.embed_tokens(tok[:, None])                              # [B, 1, H]
        cos, sin = self.rope(rope_pos[None, :, None].expand(3, -1, -1))  # [B, 1, D]
        rows = torch.arange(B, device=tok.device)
        lengths = write_pos + 1
        for li, L in enumerate(self.layers):
            h = self._rms(x, L.ln1)
            qkv = F.linear(h, L.qkv_w, L.qkv_b).view(B, G, Q + 2, D)
            q = self._rotate(qkv[:, :, :Q].reshape(B, G * Q, D), cos, sin)
            k = self._rotate(qkv[:, :, Q], cos, sin)
            kc, vc = cache[li, 0], cache[li, 1]                          # [B, G, S_max, D]
            kc[rows, :, write_pos] = k
            vc[rows, :, write_pos] = qkv[:, :, Q + 1]
            a = decode_attention(q, kc, vc, lengths)                      # [B, G*Q, D]
            x = self._mlp(self._attn_out(x, F.linear(a.reshape(B, 1, G * Q * D), L.proj_w), L), L)
        return self.logits(self._rms(x, self.final_norm)[:, 0])
