"""Built-in engine vs HF transformers on the tiny Qwen2.5-VL: greedy tokens, log-probs, seeds.

The engine reads mcore-named parameters. Here they are built from the HF checkpoint with a
small test-local mapping (fused QKV in mcore's per-group interleave, [gate; up] fc1), so the
reference (HF `generate` / HF forward) is fully independent of ovlt's model code.
"""
import math

import pytest
import torch

from ovlt.rollout.base import GenerationRequest, SamplingParams
from ovlt.rollout.builtin import BuiltinEngine
from ovlt.rollout.kv_decoder import params_module

IMG, VS, VE = 151655, 151652, 151653


def _mcore_module_from_hf(hf, cfg) -> torch.nn.Module:
    """A bare nn.Module whose named_parameters are the mcore names of the HF LLM weights."""
    sd = hf.state_dict()
    G, Hq = cfg.num_query_groups, cfg.num_attention_heads
    D, Q = cfg.hidden_size // Hq, Hq // G
    out = {"language_model.embedding.word_embeddings.weight": sd["model.language_model.embed_tokens.weight"],
           "language_model.decoder.final_layernorm.weight": sd["model.language_model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["language_model.output_layer.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_layers):
        h = f"model.language_model.layers.{i}."
        m = f"language_model.decoder.layers.{i}."
        for suf in ("weight", "bias"):
            q = sd[h + f"self_attn.q_proj.{suf}"].reshape(G, Q, D, -1)
            k = sd[h + f"self_attn.k_proj.{suf}"].reshape(G, 1, D, -1)
            v = sd[h + f"self_attn.v_proj.{suf}"].reshape(G, 1, D, -1)
            fused = torch.cat([q, k, v], dim=1).reshape(G * (Q + 2) * D, -1)
            out[m + f"self_attention.linear_qkv.{suf}"] = fused.squeeze(-1) if suf == "bias" else fused
        out[m + "self_attention.linear_proj.weight"] = sd[h + "self_attn.o_proj.weight"]
        out[m + "input_layernorm.weight"] = sd[h + "input_layernorm.weight"]
        out[m + "pre_mlp_layernorm.weight"] = sd[h + "post_attention_layernorm.weight"]
        out[m + "mlp.linear_fc1.weight"] = torch.cat([sd[h + "mlp.gate_proj.weight"],
                                                      sd[h + "mlp.up_proj.weight"]])
        out[m + "mlp.linear_fc2.weight"] = sd[h + "mlp.down_proj.weight"]
    return params_module({name: t.clone().float() for name, t in out.items()})


@pytest.fixture(scope="module")
def setup(tiny_hf_dir, tiny_model_cfg):
    from transformers import Qwen2_5_VLForConditionalGeneration
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    module = _mcore_module_from_hf(hf, tiny_model_cfg)
    embedder = lambda pv, grid: hf.model.get_image_features(pv, grid)  # noqa: E731
    engine = BuiltinEngine(module, tiny_model_cfg, image_embedder=embedder, max_batch_size=3)
    return hf, engine


def _requests():
    g = torch.Generator().manual_seed(0)
    text1 = torch.randint(0, 150000, (7,), generator=g).tolist()
    text2 = torch.randint(0, 150000, (12,), generator=g).tolist()
    grid = torch.tensor([[1, 4, 8]])
    pv = torch.randn(32, 1176, generator=g)
    img_ids = [VS] + [IMG] * 8 + [VE]
    r_img = GenerationRequest(prompt_ids=text1[:3] + img_ids + text1[3:], pixel_values=pv,
                              image_grid_thw=grid, request_id="img")
    return [GenerationRequest(prompt_ids=text1, request_id="t1"), r_img,
            GenerationRequest(prompt_ids=text2, request_id="t2"),
            GenerationRequest(prompt_ids=text2[:4], request_id="t3")]


def _hf_greedy(hf, r, n):
    ids = torch.tensor([r.prompt_ids])
    kw = {}
    if r.pixel_values is not None:
        # transformers 5 builds 3-D MRoPE positions only when given mm_token_type_ids.
        kw = dict(pixel_values=r.pixel_values, image_grid_thw=r.image_grid_thw,
                  mm_token_type_ids=(ids == IMG).int())
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                      eos_token_id=[151645, 151643], pad_token_id=151643, **kw)
    return out[0, ids.shape[1]:].tolist()


def _hf_logprobs(hf, r, completion, temperature):
    ids = torch.tensor([r.prompt_ids + completion])
    kw = {}
    if r.pixel_values is not None:
        kw = dict(pixel_values=r.pixel_values, image_grid_thw=r.image_grid_thw,
                  mm_token_type_ids=(ids == IMG).int())
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=torch.ones_like(ids), **kw).logits[0].float()
    P = len(r.prompt_ids)
    lp = (logits[P - 1: -1] / temperature).log_softmax(-1)
    return lp.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def test_greedy_equals_hf_generate(setup):
    hf, engine = setup
    reqs = _requests()
    outs = engine.generate(reqs, SamplingParams(temperature=0.0, max_new_tokens=10))
    for r, o in zip(reqs, outs):
        ref = _hf_greedy(hf, r, 10)
        assert o[0].token_ids == ref, r.request_id
        assert o[0].finish_reason in ("length", "stop")


def test_logprobs_equal_recomputed(setup):
    hf, engine = setup
    reqs = _requests()
    for temp in (1.0, 0.7):
        outs = engine.generate(reqs, SamplingParams(temperature=temp, top_p=0.9, max_new_tokens=9,
                                                    n=2, seed=3))
        for r, o in zip(reqs, outs):
            assert len(o) == 2
            for c in o:
                ref = _hf_logprobs(hf, r, c.token_ids, temp)
                got = torch.tensor(c.logprobs)
                assert (got - ref).abs().max().item() < 1e-4, r.request_id


def test_seeded_sampling_reproducible(setup):
    _, engine = setup
    reqs = _requests()
    sp = SamplingParams(temperature=1.0, max_new_tokens=8, n=2, seed=11)
    a = engine.generate(reqs, sp)
    b = engine.generate(reqs, sp)
    c = engine.generate(reqs, SamplingParams(temperature=1.0, max_new_tokens=8, n=2, seed=12))
    ids = lambda outs: [x.token_ids for o in outs for x in o]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)


def test_stop_strings_and_eos(setup):
    """A stop string ends the completion at the token completing it; EOS ends with 'stop'."""
    hf, _ = setup

    class Tok:  # decode: one character per token id, so the stop position is exact
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(97 + i % 26) for i in ids)

    hf_engine_mod = setup[1].model
    from ovlt.config import load_config, CONFIG_ROOT
    cfg = load_config(CONFIG_ROOT / "model" / "tiny.yaml").model
    r = _requests()[0]
    ref = _hf_greedy(hf, r, 12)
    text = Tok().decode(ref)
    stop = text[5:7]  # completes at token 7 (or earlier if it occurs before)
    k = next(i for i in range(1, 13) if stop in text[:i])
    eng = BuiltinEngine(hf_engine_mod, cfg, tokenizer=Tok(), check_every=3)
    o = eng.generate([r], SamplingParams(temperature=0.0, max_new_tokens=12, stop=[stop]))[0][0]
    assert o.token_ids == ref[:k] and o.finish_reason == "stop"
    assert o.text == text[: text.find(stop) + len(stop)]
    # The 4th greedy token declared EOS: the completion keeps it and stops there.
    eng = BuiltinEngine(hf_engine_mod, cfg, eos_token_ids=[ref[3]])
    o = eng.generate([r], SamplingParams(temperature=0.0, max_new_tokens=12))[0][0]
    first = ref.index(ref[3]) + 1
    assert o.token_ids == ref[:first] and o.finish_reason == "stop"


def test_top_k_top_p_bounds():
    """On a known distribution: samples never leave the top-k / top-p set, and the kept
    tokens are drawn in proportion to their renormalised probabilities."""
    from ovlt.rollout.sampling import filter_logits, sample
    p = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    logits = p.log().expand(20000, -1).contiguous()
    g = torch.Generator().manual_seed(0)
    tok, lp = sample(logits, 1.0, top_k=3, generator=g)
    assert tok.max().item() <= 2
    freq = torch.bincount(tok, minlength=6)[:3].float() / tok.numel()
    want = p[:3] / p[:3].sum()
    assert (freq - want).abs().max().item() < 0.015  # ~4 sigma at n=20000
    assert torch.allclose(lp, p.log()[tok], atol=1e-6)  # policy log-prob, not renormalised
    # top_p=0.75: mass before token 2 is 0.65 < 0.75 -> kept; before token 3 is 0.8 -> dropped.
    tok, _ = sample(logits, 1.0, top_p=0.75, generator=g)
    assert tok.max().item() <= 2
    freq = torch.bincount(tok, minlength=6)[:3].float() / tok.numel()
    assert (freq - want).abs().max().item() < 0.015
    kept = filter_logits(p.log()[None], top_p=0.3)  # only the argmax survives
    assert torch.isfinite(kept).sum().item() == 1
    # Temperature: T=0.5 squares and renormalises the probabilities.
    tok, _ = sample(logits, 0.5, generator=g)
    p2 = p ** 2 / (p ** 2).sum()
    freq = torch.bincount(tok, minlength=6).float() / tok.numel()
    assert (freq - p2).abs().max().item() < 0.015
    assert math.isclose(sample(logits[:1], 0.0)[0].item(), 0)


def test_banned_tokens_never_drawn_logprob_unchanged():
    """Vision placeholders are banned from responses (a sampled <|image_pad|> would break the
    trainer's forward): never drawn, even as the argmax; the log-prob stays the policy's."""
    from ovlt.rollout.sampling import sample
    p = torch.tensor([0.5, 0.3, 0.2])
    logits = p.log().expand(5000, -1).contiguous()
    banned = torch.tensor([0])
    g = torch.Generator().manual_seed(0)
    tok, lp = sample(logits, 1.0, generator=g, banned=banned)
    assert (tok != 0).all()
    freq = torch.bincount(tok, minlength=3)[1:].float() / tok.numel()
    assert (freq - torch.tensor([0.6, 0.4])).abs().max().item() < 0.03
    assert torch.allclose(lp, p.log()[tok], atol=1e-6)
    tok, lp = sample(logits[:2], 0.0, banned=banned)  # greedy takes the best allowed token
    assert tok.tolist() == [1, 1] and torch.allclose(lp, p.log()[1].expand(2), atol=1e-6)


def test_engine_on_ovlt_mcore_model(tiny_hf_dir):
    """The engine driving the real ovlt mcore model (its vision tower, its parameters in
    place) gives HF `generate`'s greedy tokens, with and without an image."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ovlt.distributed import destroy_distributed
    from ovlt.models.qwen2_5_vl import parity
    model, cfg = parity.build_from_hf(tiny_hf_dir, 1, 1)
    try:
        hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
        eng = BuiltinEngine(model, cfg)
        reqs = _requests()
        outs = eng.generate(reqs, SamplingParams(temperature=0.0, max_new_tokens=8))
        for r, o in zip(reqs, outs):
            assert o[0].token_ids == _hf_greedy(hf, r, 8), r.request_id
    finally:
        destroy_distributed()


def test_update_weights_loads_hf_tensors(tiny_hf_dir, setup):
    """update_weights(HF names, full tensors) through the adapter: after loading perturbed
    weights, greedy output equals HF generate of the perturbed HF model."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    hf2 = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for n, p in hf2.named_parameters():
            if "language_model" in n and p.dim() == 2:
                p.mul_(1.5)
    _, engine = setup
    cfg = engine.cfg
    module = _mcore_module_from_hf(hf2, cfg)  # same structure, fresh parameters to overwrite
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    eng = BuiltinEngine(module, cfg, image_embedder=lambda pv, g: hf2.model.get_image_features(pv, g))
    eng.update_weights(iter(hf2.state_dict().items()))
    r = _requests()[0]
    o = eng.generate([r], SamplingParams(temperature=0.0, max_new_tokens=8))[0][0]
    assert o.token_ids == _hf_greedy(hf2, r, 8)

