"""State-dict adapter: mcore rank-local layouts checked against what the layers compute.

Each layout is verified functionally and independently of the adapter's own split code: the
rank-local mcore tensors are used the way megatron-core's layers use them (GQA groups
[q.., k, v] per group, SwiGLU chunk of linear_fc1, row-parallel partial sums, vocab-parallel
lookup) and the result must equal the HF layer's output computed from the HF tensors.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from ovlt.models.qwen2_5_vl import state_dict_adapter as sda
from ovlt.models.qwen2_5_vl.checkpoint_io import HFCheckpointReader

L, V = "language_model.", "vision_model."


@pytest.fixture(scope="module")
def hf(tiny_hf_dir):
    r = HFCheckpointReader(tiny_hf_dir)
    return {k: r[k] for k in r}


def _cfg(tiny_model_cfg, **kw):
    c = copy.deepcopy(tiny_model_cfg)
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def _gqa_cfg(tiny_model_cfg):
    """Untied, 8 heads / 2 KV groups (4 q heads per group), odd vocab."""
    return _cfg(tiny_model_cfg, num_attention_heads=8, num_query_groups=2, mrope_section=[2, 1, 1],
                tie_word_embeddings=False, vocab_size=1000)


def _random_hf(cfg, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g).to(dtype) for n, s in sda.hf_shapes(cfg).items()}


def test_names_match_contract(tiny_model_cfg, hf):
    cfg = tiny_model_cfg  # 4 LLM layers, 4 vision layers, tied embeddings
    sd0 = sda.hf_to_mcore(hf, cfg, 0, 2, 0, 2)
    sd1 = sda.hf_to_mcore(hf, cfg, 0, 2, 1, 2)
    llm_layer = ["input_layernorm.weight", "self_attention.linear_qkv.weight",
                 "self_attention.linear_qkv.bias", "self_attention.linear_proj.weight",
                 "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]
    vis_layer = ["input_layernorm.weight", "pre_mlp_layernorm.weight",
                 "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
                 "self_attention.linear_proj.weight", "self_attention.linear_proj.bias",
                 "mlp.linear_fc1.weight", "mlp.linear_fc1.bias", "mlp.linear_fc2.weight",
                 "mlp.linear_fc2.bias"]
    want0 = {V + "patch_embed.proj.weight", V + "merger.norm.weight",
             *(V + f"merger.linear_fc{i}.{s}" for i in (1, 2) for s in ("weight", "bias")),
             *(f"{V}decoder.layers.{i}.{n}" for i in range(4) for n in vis_layer),
             L + "embedding.word_embeddings.weight",
             *(f"{L}decoder.layers.{i}.{n}" for i in range(2) for n in llm_layer)}
    # tied + PP>1: mcore keeps output_layer.weight (a copy of the embedding) on the last stage
    want1 = {L + "decoder.final_layernorm.weight", L + "output_layer.weight",
             *(f"{L}decoder.layers.{i}.{n}" for i in range(2) for n in llm_layer)}
    assert set(sd0) == want0
    assert set(sd1) == want1
    # PP renumbering: stage 1's local layer 0 is HF layer 2
    assert torch.equal(sd1[L + "decoder.layers.0.input_layernorm.weight"],
                       hf["model.layers.2.input_layernorm.weight"])
    assert torch.equal(sd1[L + "output_layer.weight"], sd0[L + "embedding.word_embeddings.weight"])
    # PP=1 and tied: no output layer at all
    assert L + "output_layer.weight" not in sda.hf_to_mcore(hf, cfg, 0, 1, 0, 1)


def test_llm_gqa_qkv_matches_mcore_attention_math(tiny_model_cfg):
    cfg = _gqa_cfg(tiny_model_cfg)
    hf = _random_hf(cfg)
    H, nh, G = cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups
    hd, hpg = H // nh, nh // G
    x = torch.randn(5, H, dtype=torch.float64)
    p = "model.layers.3.self_attn."
    ref = {s: (x @ hf[p + f"{s}_proj.weight"].double().T + hf[p + f"{s}_proj.bias"].double())
           .reshape(5, -1, hd) for s in "qkv"}  # [tokens, heads, hd]
    for tp in (1, 2):
        for r in range(tp):
            sd = sda.hf_to_mcore(hf, cfg, r, tp, 1, 2)  # layer 3 = stage 1, local layer 1
            w = sd[L + "decoder.layers.1.self_attention.linear_qkv.weight"].double()
            b = sd[L + "decoder.layers.1.self_attention.linear_qkv.bias"].double()
            # megatron-core: mixed [s, ng_local, (np/ng + 2) * hn] -> split [np/ng*hn, hn, hn]
            mixed = (x @ w.T + b).reshape(5, G // tp, (hpg + 2) * hd)
            q, k, v = torch.split(mixed, [hpg * hd, hd, hd], dim=-1)
            heads = slice(r * nh // tp, (r + 1) * nh // tp)
            groups = slice(r * G // tp, (r + 1) * G // tp)
            torch.testing.assert_close(q.reshape(5, -1, hd), ref["q"][:, heads], rtol=0, atol=1e-12)
            torch.testing.assert_close(k.reshape(5, -1, hd), ref["k"][:, groups], rtol=0, atol=1e-12)
            torch.testing.assert_close(v.reshape(5, -1, hd), ref["v"][:, groups], rtol=0, atol=1e-12)


def test_vision_qkv_per_head_interleave(tiny_model_cfg, hf):
    cfg = tiny_model_cfg
    D, nh = cfg.vision.hidden_size, cfg.vision.num_heads
    hd = D // nh
    x = torch.randn(7, D, dtype=torch.float64)
    p = "visual.blocks.2.attn.qkv."
    # HF: qkv(x).reshape(seq, 3, num_heads, -1).permute(1, 0, 2, 3)
    ref = (x @ hf[p + "weight"].double().T + hf[p + "bias"].double()).reshape(7, 3, nh, hd)
    for tp in (1, 2):
        for r in range(tp):
            sd = sda.hf_to_mcore(hf, cfg, r, tp, 0, 1)
            w = sd[V + "decoder.layers.2.self_attention.linear_qkv.weight"].double()
            b = sd[V + "decoder.layers.2.self_attention.linear_qkv.bias"].double()
            mixed = (x @ w.T + b).reshape(7, nh // tp, 3 * hd)  # MHA: one group per head
            q, k, v = torch.split(mixed, [hd, hd, hd], dim=-1)
            heads = slice(r * nh // tp, (r + 1) * nh // tp)
            for i, t in enumerate((q, k, v)):
                torch.testing.assert_close(t, ref[:, i, heads], rtol=0, atol=1e-12)


@pytest.mark.parametrize("part", ["llm", "vision"])
def test_swiglu_mlp_and_row_parallel_sum(tiny_model_cfg, hf, part):
    cfg = tiny_model_cfg
    if part == "llm":
        p, m, dim, stage = "model.layers.1.mlp.", L + "decoder.layers.1.mlp.", cfg.hidden_size, 0
    else:
        p, m, dim, stage = "visual.blocks.3.mlp.", V + "decoder.layers.3.mlp.", cfg.vision.hidden_size, 0
    x = torch.randn(4, dim, dtype=torch.float64)
    lin = lambda n, y: y @ hf[p + n + ".weight"].double().T + (  # noqa: E731
        hf[p + n + ".bias"].double() if p + n + ".bias" in hf else 0)
    ref = lin("down_proj", F.silu(lin("gate_proj", x)) * lin("up_proj", x))
    tp = 2
    total = 0
    for r in range(tp):
        sd = {k: v.double() for k, v in sda.hf_to_mcore(hf, cfg, r, tp, stage, 2).items()}
        h = x @ sd[m + "linear_fc1.weight"].T + sd.get(m + "linear_fc1.bias", 0)
        gate, up = torch.chunk(h, 2, dim=-1)  # mcore's SwiGLU on the local fc1 output
        total = total + F.silu(gate) * up @ sd[m + "linear_fc2.weight"].T
    total = total + (sd[m + "linear_fc2.bias"] if m + "linear_fc2.bias" in sd else 0)  # bias once
    torch.testing.assert_close(total, ref, rtol=0, atol=1e-10)


def test_attention_output_projection_row_split(tiny_model_cfg, hf):
    cfg = tiny_model_cfg
    x = torch.randn(3, cfg.vision.hidden_size, dtype=torch.float64)
    w, b = hf["visual.blocks.0.attn.proj.weight"].double(), hf["visual.blocks.0.attn.proj.bias"].double()
    parts = [sda.hf_to_mcore(hf, cfg, r, 2, 0, 1) for r in range(2)]
    pre = V + "decoder.layers.0.self_attention.linear_proj."
    xs = x.chunk(2, dim=-1)
    out = sum(xs[r] @ parts[r][pre + "weight"].double().T for r in range(2)) + parts[0][pre + "bias"].double()
    torch.testing.assert_close(out, x @ w.T + b, rtol=0, atol=1e-12)
    assert torch.equal(parts[0][pre + "bias"], parts[1][pre + "bias"])  # row bias not split


def test_vocab_padding_embedding_and_output_layer(tiny_model_cfg):
    cfg = _gqa_cfg(tiny_model_cfg)  # vocab 1000, untied
    cfg.make_vocab_size_divisible_by = 128  # Megatron-style padding (the default is 1)
    hf = _random_hf(cfg)
    tp = 2
    padded = sda.padded_vocab_size(cfg.vocab_size, tp)
    assert padded == 1024  # multiple of 128 * 2
    ids = torch.tensor([0, 5, 511, 512, 999])
    emb, logits = 0, []
    h = torch.randn(2, cfg.hidden_size)
    for r in range(tp):
        first = sda.hf_to_mcore(hf, cfg, r, tp, 0, 2)
        last = sda.hf_to_mcore(hf, cfg, r, tp, 1, 2)
        w = first[L + "embedding.word_embeddings.weight"]
        assert w.shape == (padded // tp, cfg.hidden_size)
        lo = r * padded // tp
        mask = (ids >= lo) & (ids < lo + padded // tp)  # mcore VocabParallelEmbedding
        emb = emb + w[(ids - lo).clamp(0, padded // tp - 1)] * mask[:, None]
        logits.append(h @ last[L + "output_layer.weight"].T)
        if r == tp - 1:
            assert torch.count_nonzero(w[cfg.vocab_size - lo:]) == 0  # padded rows are zero
    assert torch.equal(emb, hf["model.embed_tokens.weight"][ids])
    torch.testing.assert_close(torch.cat(logits, -1)[:, :cfg.vocab_size],
                               h @ hf["lm_head.weight"].T, rtol=0, atol=0)


def test_patch_embed_flat_equals_conv3d(tiny_model_cfg, hf):
    v = tiny_model_cfg.vision
    sd = sda.hf_to_mcore(hf, tiny_model_cfg, 0, 1, 0, 1)
    flat = sd[V + "patch_embed.proj.weight"]
    assert flat.shape == (v.hidden_size, 3 * 2 * 14 * 14)
    px = torch.randn(6, 3 * 2 * 14 * 14, dtype=torch.float64)
    ref = F.conv3d(px.view(-1, 3, 2, 14, 14), hf["visual.patch_embed.proj.weight"].double(),
                   stride=(2, 14, 14)).view(6, -1)
    torch.testing.assert_close(px @ flat.double().T, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_in_memory_round_trip_bit_exact(tiny_model_cfg, tp, pp):
    cfg = _gqa_cfg(tiny_model_cfg)
    hf = _random_hf(cfg, seed=tp * 10 + pp, dtype=torch.bfloat16)
    shards = {(t, p): sda.hf_to_mcore(hf, cfg, t, tp, p, pp) for t in range(tp) for p in range(pp)}
    back = dict(sda.mcore_to_hf(shards, cfg, tp, pp))
    assert list(back) != [] and set(back) == set(hf)
    for n, t in hf.items():
        assert back[n].dtype == t.dtype and back[n].shape == t.shape and torch.equal(back[n], t), n
    # list-of-lists input [pp][tp] and a gather function give the same stream
    rows = [[shards[(t, p)] for t in range(tp)] for p in range(pp)]
    names = [n for n, _ in sda.mcore_to_hf(rows, cfg, tp, pp)]
    gathered = sda.mcore_to_hf(lambda name, p: [shards[(t, p)][name] for t in range(tp)], cfg, tp, pp)
    assert names == [n for n, _ in gathered] == list(back)


def test_te_norm_names_and_transformers5_names(tiny_model_cfg, hf):
    cfg = tiny_model_cfg
    te = sda.hf_to_mcore(hf, cfg, 0, 1, 0, 1, norm_names="te")
    assert L + "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te
    assert V + "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in te
    assert not any(k.endswith(("input_layernorm.weight", "pre_mlp_layernorm.weight")) for k in te)
    assert torch.equal(te[L + "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"],
                       hf["model.layers.0.post_attention_layernorm.weight"])
    back = dict(sda.mcore_to_hf({(0, 0): te}, cfg, 1, 1))
    assert all(torch.equal(back[n], hf[n]) for n in hf)
    # transformers>=4.52 spelling, given as an iterable of pairs
    renamed = [("model.language_model." + n[6:] if n.startswith("model.") else "model." + n, t)
               for n, t in hf.items()]
    local = sda.hf_to_mcore(hf, cfg, 1, 2, 0, 2)
    via5 = sda.hf_to_mcore(renamed, cfg, 1, 2, 0, 2)
    assert set(via5) == set(local) and all(torch.equal(via5[k], local[k]) for k in local)


def test_errors_name_the_problem(tiny_model_cfg, hf):
    cfg = tiny_model_cfg
    broken = dict(hf)
    del broken["model.layers.3.self_attn.k_proj.bias"]
    with pytest.raises(KeyError, match=r"model\.layers\.3\.self_attn\.k_proj\.bias.*stage 1"):
        sda.hf_to_mcore(broken, cfg, 0, 1, 1, 2)
    with pytest.raises(ValueError, match="tensor_parallel=3 must divide model.num_attention_heads=4"):
        sda.hf_to_mcore(hf, cfg, 0, 3, 0, 1)
    with pytest.raises(ValueError, match="tensor_parallel=4 must divide model.num_query_groups=2"):
        sda.hf_to_mcore(hf, cfg, 0, 4, 0, 1)
    with pytest.raises(ValueError, match="pipeline_parallel=3 must divide the 4 LLM layers"):
        sda.hf_to_mcore(hf, cfg, 0, 1, 0, 3)
    wrong = dict(hf, **{"model.norm.weight": torch.ones(7)})
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*\(7,\).*\(64,\)"):
        sda.hf_to_mcore(wrong, cfg, 0, 1, 0, 1)
    shards = {(0, 0): sda.hf_to_mcore(hf, cfg, 0, 1, 0, 1)}
    del shards[(0, 0)][V + "merger.norm.weight"]
    with pytest.raises(KeyError, match="vision_model.merger.norm.weight"):
        list(sda.mcore_to_hf(shards, cfg, 1, 1))


def test_merger_tp_table_switches_layout(tiny_model_cfg, hf, monkeypatch):
    """The one table decides the merger split; column/row layouts still round-trip exactly."""
    monkeypatch.setitem(sda.MERGER_TP_KIND, "linear_fc1.weight", "column")
    monkeypatch.setitem(sda.MERGER_TP_KIND, "linear_fc1.bias", "column")
    monkeypatch.setitem(sda.MERGER_TP_KIND, "linear_fc2.weight", "row")
    cfg = tiny_model_cfg
    shards = {(t, 0): sda.hf_to_mcore(hf, cfg, t, 2, 0, 1) for t in range(2)}
    w = hf["visual.merger.mlp.0.weight"]
    assert torch.equal(shards[(1, 0)][V + "merger.linear_fc1.weight"], w[w.shape[0] // 2:])
    back = dict(sda.mcore_to_hf(shards, cfg, 2, 1))
    assert all(torch.equal(back[n], hf[n]) for n in hf)
