"""Qwen2.5-VL vision tower on mcore blocks: patch embed, 2D rotary, window/full attention
`TransformerBlock`, 2x2 patch merger.

Images arrive packed (THD): `pixel_values` [N, 3*2*14*14] are the patches of all images
back to back, `grid_thw` [n_images, 3] their (t, h, w) grids in patches. Nothing is padded
to a max image: attention is restricted per image (full layers) or per window (other layers)
through cu_seqlens. Window attention groups the 2x2 merge units of each
(window_size/patch/merge)^2 window together, as HF does; tokens are reordered into window
order before the blocks and restored after the merger.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock

from ovlt.models.qwen2_5_vl.language import common_config_kwargs, with_ovlt_layer_options
from ovlt.utils.device import to_device_async

VISION_ROPE_THETA = 10000.0


@dataclass
class VisionPackedSeqParams(PackedSeqParams):
    """cu_seqlens_q = per-image boundaries (full-attention layers); cu_window_seqlens = window
    boundaries (the other layers). Layout stays sbhd with batch 1."""
    cu_window_seqlens: torch.Tensor = None
    max_window_seqlen: int = None
    # host copies: ovlt's core attention groups segments from them without a device sync
    host_cu_seqlens_q: torch.Tensor = None
    host_cu_window_seqlens: torch.Tensor = None


def vision_config(model_cfg) -> TransformerConfig:
    v = model_cfg.vision
    cfg = TransformerConfig(
        num_layers=v.depth, hidden_size=v.hidden_size, num_attention_heads=v.num_heads,
        num_query_groups=v.num_heads, ffn_hidden_size=v.intermediate_size,
        kv_channels=v.hidden_size // v.num_heads, layernorm_epsilon=v.rms_norm_eps,
        add_bias_linear=True, add_qkv_bias=True,
        # The whole tower lives on the first pipeline stage: never split it.
        **common_config_kwargs(model_cfg, pp_size=1))
    cfg.ovlt_full_attention_layers = tuple(v.fullatt_block_indexes)
    return with_ovlt_layer_options(cfg, model_cfg)


def rotary_position_ids(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(h, w) patch coordinates [N, 2], laid out merge-block by merge-block as the patches are."""
    out = []
    for t, h, w in grid_thw.tolist():
        hh = torch.arange(h).view(h // merge, merge, 1, 1).expand(h // merge, merge, w // merge, merge)
        ww = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, w // merge, merge)
        # patch order inside an image: (block row, block col, row in block, col in block)
        hh = hh.permute(0, 2, 1, 3).reshape(-1)
        ww = ww.permute(0, 2, 1, 3).reshape(-1)
        out.append(torch.stack([hh, ww], dim=-1).repeat(t, 1))
    return torch.cat(out)


def window_layout(grid_thw: torch.Tensor, merge: int, window_units: int):
    """(window_index [N/merge^2] in merge units, cu_window_seqlens in patches).
    Windows tile each frame's merged grid row-major in `window_units`^2 blocks (edge windows
    smaller); inside a window, units keep row-major order."""
    order, lens = [], []
    base = 0
    unit = merge * merge
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        idx = torch.arange(t * gh * gw).view(t, gh, gw) + base
        for f in range(t):
            for r in range(0, gh, window_units):
                for c in range(0, gw, window_units):
                    blk = idx[f, r:r + window_units, c:c + window_units].reshape(-1)
                    order.append(blk)
                    lens.append(blk.numel() * unit)
        base += t * gh * gw
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    return torch.cat(order), cu


def image_cu_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """Per-frame boundaries (HF attends within each temporal frame of an image/video).
    Plain Python on the host: torch's CPU repeat_interleave took ~3 ms here on a GPU host."""
    bounds = [0]
    for t, h, w in grid_thw.tolist():
        for _ in range(t):
            bounds.append(bounds[-1] + h * w)
    return torch.tensor(bounds, dtype=torch.int32)


class PatchEmbed(torch.nn.Module):
    """HF's Conv3d with stride == kernel is a Linear over the flattened patch."""

    def __init__(self, in_features: int, hidden: int, dtype, device):
        super().__init__()
        self.proj = torch.nn.Linear(in_features, hidden, bias=False, dtype=dtype, device=device)

    def forward(self, x):
        return self.proj(x.to(self.proj.weight.dtype))


class PatchMerger(torch.nn.Module):
    """RMSNorm, then 2x2 neighbours concatenated -> Linear -> GELU -> Linear.
    Replicated on every TP rank (it is small and runs once per image token); the state-dict
    adapter's MERGER_TP_KIND says the same."""

    def __init__(self, config: TransformerConfig, out_hidden: int, merge: int):
        super().__init__()
        h = config.hidden_size * merge * merge
        kw = dict(dtype=config.params_dtype,
                  device=None if config.use_cpu_initialization else torch.cuda.current_device())
        self.norm = torch.nn.RMSNorm(config.hidden_size, eps=1e-6, **kw)
        self.linear_fc1 = torch.nn.Linear(h, h, bias=True, **kw)
        self.linear_fc2 = torch.nn.Linear(h, out_hidden, bias=True, **kw)
        self.merged = h

    def forward(self, x):  # x [N, hidden] -> [N / merge^2, out_hidden]
        x = self.norm(x).view(-1, self.merged)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class VisionModel(MegatronModule):
    def __init__(self, model_cfg, layer_spec):
        config = vision_config(model_cfg)
        super().__init__(config)
        v = model_cfg.vision
        self.merge = v.spatial_merge_size
        self.window_units = v.window_size // v.spatial_merge_size // v.patch_size
        in_features = v.in_channels * v.temporal_patch_size * v.patch_size * v.patch_size
        dev = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.patch_embed = PatchEmbed(in_features, v.hidden_size, config.params_dtype, dev)
        self.decoder = TransformerBlock(config, layer_spec, post_layer_norm=False,
                                        pre_process=True, post_process=False)
        self.merger = PatchMerger(config, model_cfg.hidden_size, self.merge)
        head_dim = v.hidden_size // v.num_heads
        quarter = torch.arange(0, head_dim // 2, 2, dtype=torch.float32) / (head_dim // 2)
        # A plain attribute, not a buffer: model.to(bf16) must not round the frequencies.
        self.inv_freq = 1.0 / VISION_ROPE_THETA ** quarter

    def set_input_tensor(self, t):  # the tower never receives activations from a prior stage
        pass

    def _rotary(self, grid_thw, device):
        pos = to_device_async(rotary_position_ids(grid_thw, self.merge), device)
        if self.inv_freq.device != device:  # once: a pageable copy per call would sync
            self.inv_freq = self.inv_freq.to(device)
        freqs = (pos[..., None].float() * self.inv_freq).flatten(1)  # [N, hd/2]
        return torch.cat([freqs, freqs], dim=-1)  # [N, head_dim]

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """[N, 1176] patches of all images -> [N / merge^2, LLM hidden] image tokens, in the
        order of the images and of their `<|image_pad|>` tokens."""
        grid_thw = grid_thw.to("cpu", torch.long)
        n = pixel_values.shape[0]
        expected = int((grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]).sum())
        if n != expected:
            raise ValueError(f"pixel_values has {n} patches but image_grid_thw describes "
                             f"{expected} ({grid_thw.tolist()})")
        dev = pixel_values.device
        unit = self.merge * self.merge
        win_index, cu_win = window_layout(grid_thw, self.merge, self.window_units)
        restore = torch.empty_like(win_index)  # the inverse permutation, on the host
        restore[win_index] = torch.arange(win_index.numel())
        win_index, restore = to_device_async(win_index, dev), to_device_async(restore, dev)
        x = self.patch_embed(pixel_values)
        x = x.view(n // unit, unit, -1)[win_index].reshape(n, 1, -1)  # [S, B=1, H]
        rot = self._rotary(grid_thw, dev)
        rot = rot.view(n // unit, unit, -1)[win_index].reshape(n, 1, 1, -1)
        cu_img = image_cu_seqlens(grid_thw)
        cu_img_dev = to_device_async(cu_img, dev)
        params = VisionPackedSeqParams(
            qkv_format="sbhd", cu_seqlens_q=cu_img_dev, cu_seqlens_kv=cu_img_dev,
            max_seqlen_q=int((cu_img[1:] - cu_img[:-1]).max()),
            max_seqlen_kv=int((cu_img[1:] - cu_img[:-1]).max()),
            cu_window_seqlens=to_device_async(cu_win, dev),
            max_window_seqlen=int((cu_win[1:] - cu_win[:-1]).max()),
            host_cu_seqlens_q=cu_img, host_cu_window_seqlens=cu_win)
        if self._lean_forward_ok(x):
            with torch.no_grad():
                x = self._lean_blocks(x, rot, params)
        else:
            x = self.decoder(hidden_states=x, attention_mask=None, rotary_pos_emb=rot,
                             packed_seq_params=params)
        x = self.merger(x[:, 0])
        return x[restore]

    # ------------------------------------------------------------ forward-only fast path
    def _lean_forward_ok(self, x) -> bool:
        """The blocks need no autograd (frozen blocks and input, or no grad mode) and are plain
        local-spec mcore layers at TP=1: then `_lean_blocks` runs them. It computes what
        mcore's TransformerLayer does here (no dropout; biases added in the GEMM epilogue, where
        mcore adds them in a separate bf16 op) with a fraction of the host work per layer: the
        tower's kernels are small, so mcore's per-layer Python made it host-bound on a GPU
        (~1 ms of idle GPU per layer on an H200)."""
        if torch.is_grad_enabled() and (x.requires_grad or
                                        any(p.requires_grad for p in self.decoder.parameters())):
            return False
        ok = getattr(self, "_lean_layers_ok", None)
        if ok is None:
            from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

            from ovlt.models.qwen2_5_vl.attention import OvltCoreAttention
            cfg = self.config
            ok = (cfg.tensor_model_parallel_size == 1 and cfg.hidden_dropout == 0.0
                  and cfg.gated_linear_unit and cfg.activation_func is F.silu
                  and cfg.num_query_groups == cfg.num_attention_heads
                  and not getattr(cfg, "rotary_interleaved", False))
            for layer in self.decoder.layers:
                att, mlp = layer.self_attention, layer.mlp
                ok = ok and type(att.linear_qkv) is ColumnParallelLinear \
                    and type(att.linear_proj) is RowParallelLinear \
                    and type(mlp.linear_fc1) is ColumnParallelLinear \
                    and type(mlp.linear_fc2) is RowParallelLinear \
                    and isinstance(att.core_attention, OvltCoreAttention) \
                    and isinstance(layer.input_layernorm, torch.nn.RMSNorm) \
                    and isinstance(layer.pre_mlp_layernorm, torch.nn.RMSNorm)
            self._lean_layers_ok = ok
        return ok

    def _lean_blocks(self, x, rot, params):
        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
        cfg = self.config
        heads, hd = cfg.num_attention_heads, cfg.kv_channels
        n, ffn = x.shape[0], cfg.ffn_hidden_size
        padded = ffn_padded(ffn, x)
        # fc2's input, zero beyond ffn: each layer's SwiGLU overwrites the first ffn columns
        act = x.new_zeros(n, padded) if padded != ffn else None
        for layer in self.decoder.layers:
            att, mlp = layer.self_attention, layer.mlp
            h = layer.input_layernorm(x)
            qkv = F.linear(h, att.linear_qkv.weight, att.linear_qkv.bias)
            qkv = qkv.view(*qkv.shape[:2], heads, 3 * hd)  # per head [q_h, k_h, v_h]
            q, k, v = torch.split(qkv, [hd, hd, hd], dim=3)
            q = apply_rotary_pos_emb(q.reshape(*q.shape[:2], -1, hd), rot, config=cfg)
            k = apply_rotary_pos_emb(k, rot, config=cfg)
            o = att.core_attention(q, k, v, None, packed_seq_params=params)
            x = x + F.linear(o, att.linear_proj.weight, att.linear_proj.bias)
            h = layer.pre_mlp_layernorm(x)
            y = F.linear(h, mlp.linear_fc1.weight, mlp.linear_fc1.bias)  # [gate; up]
            if act is None:
                a, w2 = _swiglu(y), mlp.linear_fc2.weight
            else:
                _swiglu(y, out=act[:, :ffn])
                a, w2 = act.view(n, 1, padded), _k_padded_weight(mlp.linear_fc2, padded)
            x = x + F.linear(a, w2, mlp.linear_fc2.bias)
        return x


def _swiglu(y: torch.Tensor, out=None) -> torch.Tensor:
    """silu(gate) * up of the fused fc1 output [N, 1, 2F] (into `out` [N, F] when given):
    `ovlt.kernels.swiglu` (one pass) on CUDA, torch ops elsewhere."""
    if y.is_cuda:
        from ovlt.kernels.swiglu import swiglu_forward
        return swiglu_forward(y, out=out)
    g, u = torch.chunk(y, 2, dim=-1)
    if out is None:
        return F.silu(g) * u
    return torch.mul(F.silu(g).reshape(out.shape), u.reshape(out.shape), out=out)


def ffn_padded(ffn: int, x: torch.Tensor) -> int:
    """The fc2 GEMM's K for the forward-only tower on `x`'s device: on CUDA, rounded up to 8
    elements (16 bytes) so the rows of both operands are aligned for cuBLAS's Hopper kernels
    (Qwen2.5-VL's 3420 gets an sm80 fallback kernel, ~4x slower); unchanged elsewhere."""
    return -(-ffn // 8) * 8 if x.is_cuda else ffn


def _k_padded_weight(linear, k: int) -> torch.Tensor:
    """`linear.weight` [out, ffn] zero-padded to [out, k], cached on the module until the
    weight changes (a checkpoint load writes it in place: its version moves). One extra copy of
    the tower's fc2 weights (~280 MB at 7B) while the forward-only path is used."""
    w = linear.weight
    key = (w.data_ptr(), w._version, k)
    cached = getattr(linear, "_ovlt_k_padded", None)
    if cached is None or cached[0] != key:
        padded = w.new_zeros(w.shape[0], k)
        padded[:, :w.shape[1]] = w.detach()
        cached = (key, padded)
        linear._ovlt_k_padded = cached
    return cached[1]
