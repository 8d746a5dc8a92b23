"""vLLM TP layout of the full HF tensors, checked by emulating vLLM's parallel layers.

For each layer kind the rank-local vLLM parameters from `vllm_rank_state` are used the way
vLLM's QKVParallelLinear / MergedColumnParallelLinear / RowParallelLinear /
VocabParallelEmbedding use them, and the per-rank results must equal the HF layer's output.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from ovlt.models.qwen2_5_vl import state_dict_adapter as sda
from ovlt.rollout.reshard import (iter_hf_weight_buckets, shard_for_vllm, vllm_param_name,
                                  vllm_rank_state)

LM = "language_model.model."


@pytest.fixture(scope="module")
def gqa(tiny_model_cfg):
    c = copy.deepcopy(tiny_model_cfg)
    c.num_attention_heads, c.num_query_groups, c.mrope_section = 8, 2, [2, 1, 1]
    c.tie_word_embeddings, c.vocab_size = False, 1000
    g = torch.Generator().manual_seed(0)
    hf = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in sda.hf_shapes(c).items()}
    return c, hf


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_llm_attention_qkv_with_kv_replication(gqa, tp):
    cfg, hf = gqa
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_query_groups, cfg.hidden_size // cfg.num_attention_heads
    x = torch.randn(3, cfg.hidden_size, dtype=torch.float64)
    p = "model.layers.2.self_attn."
    ref = {s: (x @ hf[p + f"{s}_proj.weight"].T + hf[p + f"{s}_proj.bias"]).view(3, -1, hd) for s in "qkv"}
    for r in range(tp):
        st = vllm_rank_state(hf.items(), cfg, r, tp)
        w, b = st[LM + "layers.2.self_attn.qkv_proj.weight"], st[LM + "layers.2.self_attn.qkv_proj.bias"]
        nq_l, nkv_l = nh // tp, max(1, nkv // tp)
        q, k, v = torch.split(x @ w.T + b, [nq_l * hd, nkv_l * hd, nkv_l * hd], dim=-1)
        q, k, v = (t.view(3, -1, hd) for t in (q, k, v))
        assert torch.equal(q, ref["q"][:, r * nq_l:(r + 1) * nq_l])
        # every local q head must find its own KV head among the local ones (GQA semantics)
        for j in range(nq_l):
            g_kv = (r * nq_l + j) // (nh // nkv)
            local = j // (nq_l // nkv_l) if nq_l >= nkv_l else 0
            assert torch.equal(k[:, local], ref["k"][:, g_kv]) and torch.equal(v[:, local], ref["v"][:, g_kv])


@pytest.mark.parametrize("tp", [2, 4])
def test_mlps_and_row_parallel_sums(gqa, tp):
    cfg, hf = gqa
    sts = [vllm_rank_state(hf.items(), cfg, r, tp) for r in range(tp)]
    # LLM SwiGLU MLP (no biases) and o_proj
    x = torch.randn(2, cfg.hidden_size, dtype=torch.float64)
    p = "model.layers.1.mlp."
    ref = (F.silu(x @ hf[p + "gate_proj.weight"].T) * (x @ hf[p + "up_proj.weight"].T)) @ hf[p + "down_proj.weight"].T
    out = 0
    for st in sts:
        gu = x @ st[LM + "layers.1.mlp.gate_up_proj.weight"].T
        g, u = gu.chunk(2, dim=-1)  # vLLM SiluAndMul on [gate_r | up_r]
        out = out + (F.silu(g) * u) @ st[LM + "layers.1.mlp.down_proj.weight"].T
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    a = torch.randn(2, cfg.hidden_size, dtype=torch.float64)
    out = sum(a.chunk(tp, -1)[r] @ sts[r][LM + "layers.1.self_attn.o_proj.weight"].T for r in range(tp))
    torch.testing.assert_close(out, a @ hf["model.layers.1.self_attn.o_proj.weight"].T, rtol=0, atol=1e-10)
    # vision MLP with biases: row-parallel bias added once (it is not split)
    xv = torch.randn(2, cfg.vision.hidden_size, dtype=torch.float64)
    p = "visual.blocks.0.mlp."
    lin = lambda n, y: y @ hf[p + n + ".weight"].T + hf[p + n + ".bias"]  # noqa: E731
    ref = lin("down_proj", F.silu(lin("gate_proj", xv)) * lin("up_proj", xv))
    out = 0
    for st in sts:
        gu = xv @ st[p + "gate_up_proj.weight"].T + st[p + "gate_up_proj.bias"]
        g, u = gu.chunk(2, dim=-1)
        out = out + (F.silu(g) * u) @ st[p + "down_proj.weight"].T
        assert torch.equal(st[p + "down_proj.bias"], hf[p + "down_proj.bias"])
    torch.testing.assert_close(out + hf[p + "down_proj.bias"], ref, rtol=0, atol=1e-10)


def test_vision_attention_and_merger(gqa):
    cfg, hf = gqa
    tp, nh = 2, cfg.vision.num_heads
    hd = cfg.vision.hidden_size // nh
    x = torch.randn(4, cfg.vision.hidden_size, dtype=torch.float64)
    p = "visual.blocks.1.attn."
    ref = (x @ hf[p + "qkv.weight"].T + hf[p + "qkv.bias"]).view(4, 3, nh, hd)
    M = cfg.vision.hidden_size * 4
    y = torch.randn(3, M, dtype=torch.float64)
    m = "visual.merger.mlp."
    ref_m = F.gelu(y @ hf[m + "0.weight"].T + hf[m + "0.bias"]) @ hf[m + "2.weight"].T + hf[m + "2.bias"]
    out_m = 0
    for r in range(tp):
        st = vllm_rank_state(hf.items(), cfg, r, tp)
        q, k, v = (x @ st[p + "qkv.weight"].T + st[p + "qkv.bias"]).chunk(3, dim=-1)  # [q_r|k_r|v_r]
        for i, t in enumerate((q, k, v)):
            assert torch.equal(t.view(4, -1, hd), ref[:, i, r * nh // tp:(r + 1) * nh // tp])
        h = F.gelu(y @ st[m + "0.weight"].T + st[m + "0.bias"])  # ColumnParallelLinear
        out_m = out_m + h @ st[m + "2.weight"].T                 # RowParallelLinear
        assert st["visual.patch_embed.proj.weight"].shape == (cfg.vision.hidden_size, 1176)
    torch.testing.assert_close(out_m + hf[m + "2.bias"], ref_m, rtol=0, atol=1e-10)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_parallel_embedding_and_lm_head(gqa, tp):
    cfg, hf = gqa
    padded = -(-cfg.vocab_size // 64) * 64  # 1024
    per = padded // tp
    ids = torch.tensor([0, 1, 255, 256, 511, 767, 999])
    h = torch.randn(2, cfg.hidden_size, dtype=torch.float64)
    emb, logits = 0, []
    for r in range(tp):
        st = vllm_rank_state(hf.items(), cfg, r, tp)
        w = st[LM + "embed_tokens.weight"]
        assert w.shape == (per, cfg.hidden_size)
        mask = (ids >= r * per) & (ids < r * per + per)
        emb = emb + w[(ids - r * per).clamp(0, per - 1)] * mask[:, None]
        logits.append(h @ st["language_model.lm_head.weight"].T)
    assert torch.equal(emb, hf["model.embed_tokens.weight"][ids])
    full = torch.cat(logits, -1)
    assert torch.equal(full[:, :cfg.vocab_size], h @ hf["lm_head.weight"].T)
    assert torch.count_nonzero(full[:, cfg.vocab_size:]) == 0


def test_names_and_errors(gqa):
    cfg, hf = gqa
    assert vllm_param_name("model.layers.0.self_attn.k_proj.bias") == (
        LM + "layers.0.self_attn.qkv_proj.bias", "k")
    assert vllm_param_name("model.language_model.layers.3.mlp.up_proj.weight") == (
        LM + "layers.3.mlp.gate_up_proj.weight", "1")
    assert vllm_param_name("model.visual.blocks.0.mlp.gate_proj.bias") == (
        "visual.blocks.0.mlp.gate_up_proj.bias", "0")
    assert vllm_param_name("lm_head.weight") == ("language_model.lm_head.weight", None)
    with pytest.raises(ValueError, match="pass cfg"):
        shard_for_vllm("model.layers.0.self_attn.k_proj.weight", hf["model.layers.0.self_attn.k_proj.weight"], 0, 2)
    with pytest.raises(KeyError, match="incomplete fused"):
        vllm_rank_state([(n, t) for n, t in hf.items() if "layers.0.mlp.up_proj" not in n], cfg, 0, 2)


def test_single_process_buckets_bounded_and_exact(gqa):
    """TP=PP=1 path (no collectives): the stream is the HF checkpoint, in bounded buckets."""
    cfg, hf = gqa
    sd = sda.hf_to_mcore(hf, cfg, 0, 1, 0, 1)
    limit = 0.05  # MB
    got = {}
    for bucket in iter_hf_weight_buckets(sd, cfg, bucket_mb=limit):
        nbytes = sum(t.numel() * t.element_size() for _, t in bucket)
        assert len(bucket) == 1 or nbytes <= limit * 2 ** 20
        got.update(bucket)
    assert set(got) == set(hf) and all(torch.equal(got[n], hf[n]) for n in hf)
