"""mcore's MultimodalRotaryEmbedding + apply_rotary_pos_emb == HF Qwen2.5-VL MRoPE, exactly,
for 3-row (t, h, w) position ids that differ per row."""
import torch


def test_mcore_mrope_equals_hf(tiny_model_cfg):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron.core.models.common.embeddings.rotary_pos_embedding import MultimodalRotaryEmbedding
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VLRotaryEmbedding, apply_rotary_pos_emb)
    from ovlt.compat import mcore_cpu
    from ovlt.models.qwen2_5_vl.hf_config import to_hf_config
    mcore_cpu.apply()
    cfg = tiny_model_cfg
    hd = cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(0)
    B, S, H = 2, 23, 3
    pos = torch.randint(0, 500, (3, B, S), generator=g)  # rows differ: a real 3-D test
    q = torch.randn(B, H, S, hd, generator=g)
    hf_rope = Qwen2_5_VLRotaryEmbedding(to_hf_config(cfg).text_config)
    cos, sin = hf_rope(q, pos)
    ref, _ = apply_rotary_pos_emb(q, q, cos, sin)                      # [B, H, S, d]
    emb = MultimodalRotaryEmbedding(hd, 1.0, rotary_base=cfg.rope_theta)(pos, cfg.mrope_section)
    assert emb.shape == (S, B, 1, hd)
    got = _apply_rotary_pos_emb_bshd(q.permute(2, 0, 1, 3), emb)       # [S, B, H, d]
    assert (got.permute(1, 2, 0, 3) - ref).abs().max().item() < 1e-5
    # and the sections matter: one row's change moves the result
    pos2 = pos.clone()
    pos2[2] += 7
    emb2 = MultimodalRotaryEmbedding(hd, 1.0, rotary_base=cfg.rope_theta)(pos2, cfg.mrope_section)
    assert (emb2 - emb).abs().max().item() > 1e-3
