"""Packed (THD, cu_seqlens) forward == per-sample forwards; return_hidden/output_weight give the
logits; a micro-batch without images still runs the (trainable) vision tower for zero grads;
frozen towers get no grads."""
import pytest
import torch

from ovlt.models.qwen2_5_vl import parity
from ovlt.models.qwen2_5_vl.rope_index import get_rope_index


@pytest.fixture(scope="module")
def model_cfg(tiny_hf_dir):
    from ovlt.distributed import destroy_distributed
    model, cfg = parity.build_from_hf(tiny_hf_dir, 1, 1)
    yield model, cfg
    destroy_distributed()


def _samples(cfg):
    """Three samples of different lengths: image 0, images 1+2, text only."""
    b = parity.make_batch(cfg, images=3, seed=5)
    ids, grids = b["input_ids"], b["image_grid_thw"]
    cut = [0, 9, 20]  # strip different prefixes -> different lengths
    n_img = [1, 2, 0]
    out, used, px_used = [], 0, 0
    for i in range(3):
        s = ids[i, cut[i]:]
        g = grids[used:used + n_img[i]]
        npx = int(g.prod(-1).sum()) if n_img[i] else 0
        px = b["pixel_values"][px_used:px_used + npx] if n_img[i] else None
        pos, _ = get_rope_index(s[None], g if n_img[i] else None)
        out.append(dict(ids=s, grid=g if n_img[i] else None, px=px, pos=pos))
        used += n_img[i]
        px_used += npx
    return out


def test_packed_equals_per_sample(model_cfg):
    model, cfg = model_cfg
    samples = _samples(cfg)
    with torch.no_grad():
        alone = [model(s["ids"][None], s["pos"], s["px"], s["grid"])[0] for s in samples]
        ids = torch.cat([s["ids"] for s in samples])[None]
        pos = torch.cat([s["pos"] for s in samples], dim=2)
        px = torch.cat([s["px"] for s in samples if s["px"] is not None])
        grid = torch.cat([s["grid"] for s in samples if s["grid"] is not None])
        lens = torch.tensor([0] + [len(s["ids"]) for s in samples])
        cu = lens.cumsum(0).to(torch.int32)
        packed = model(ids, pos, px, grid, packed_seq_params=cu)[0]
        unpacked_wrong = model(ids, pos, px, grid)[0]  # one causal row: crosses samples
    ref = torch.cat(alone)
    assert len({len(s["ids"]) for s in samples}) == 3
    assert (packed - ref).abs().max().item() < 1e-5
    # without cu_seqlens the later samples attend to earlier ones: the test can tell
    assert (unpacked_wrong[len(samples[0]["ids"]):] - ref[len(samples[0]["ids"]):]).abs().max() > 1e-3


def test_return_hidden_and_output_weight(model_cfg):
    model, cfg = model_cfg
    b = parity.make_batch(cfg, images=1)
    with torch.no_grad():
        logits = model(b["input_ids"], b["position_ids"], b["pixel_values"], b["image_grid_thw"])
        hidden = model(b["input_ids"], b["position_ids"], b["pixel_values"], b["image_grid_thw"],
                       return_hidden=True)
    B, S = b["input_ids"].shape
    assert hidden.shape == (S, B, cfg.hidden_size)
    w = model.output_weight()
    start, end = model.vocab_range()
    assert (start, end) == (0, cfg.vocab_size) and w.shape[0] >= cfg.vocab_size
    assert w is model.language_model.embedding.word_embeddings.weight  # tied tiny model
    # what mcore's finalize_model_grads uses to sync the tied weight's grads across PP stages
    from megatron.core.distributed.finalize_model_grads import (
        _get_shared_word_embedding_weight)
    from megatron.core.utils import get_attr_wrapped_model
    found = get_attr_wrapped_model(model, "pre_process", return_model_obj=True)
    assert _get_shared_word_embedding_weight(found, model.config) is w
    manual = (hidden.transpose(0, 1) @ w.t())[..., :cfg.vocab_size]
    assert (manual - logits[..., :cfg.vocab_size]).abs().max().item() < 1e-5


def test_labels_give_per_token_loss(model_cfg):
    model, cfg = model_cfg
    b = parity.make_batch(cfg, images=1)
    ids = b["input_ids"]
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    with torch.no_grad():
        logits = model(ids, b["position_ids"], b["pixel_values"], b["image_grid_thw"])
        loss = model(ids, b["position_ids"], b["pixel_values"], b["image_grid_thw"], labels=labels)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                            ids[:, 1:].flatten(), reduction="none").view(3, -1)
    assert (loss[:, :-1] - ref).abs().max().item() < 1e-5
    assert loss[:, -1].abs().max().item() == 0.0


def test_text_only_batch_trains_with_zero_vision_grads(model_cfg):
    model, cfg = model_cfg
    b = parity.make_batch(cfg, images=0)
    model.train()
    try:
        model.zero_grad(set_to_none=True)
        out = model(b["input_ids"], b["position_ids"])
        with torch.no_grad():
            model.eval()
            ref = model(b["input_ids"], b["position_ids"])
            model.train()
        assert (out - ref).abs().max().item() == 0.0  # the blank image adds exactly zero
        out.float().pow(2).mean().backward()
        vis = [p.grad for p in model.vision_model.parameters()]
        assert all(g is not None for g in vis)
        assert all(float(g.abs().max()) == 0.0 for g in vis)
        # frozen tower: no blank pass, no grads
        model.freeze(vision=True, merger=True)
        model.zero_grad(set_to_none=True)
        model(b["input_ids"], b["position_ids"]).float().pow(2).mean().backward()
        assert all(p.grad is None for p in model.vision_model.parameters())
        assert model.language_model.decoder.layers[0].mlp.linear_fc1.weight.grad is not None
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval()


def test_image_token_count_mismatch_is_a_clear_error(model_cfg):
    model, cfg = model_cfg
    b = parity.make_batch(cfg, images=1)
    with pytest.raises(ValueError, match="image_pad"):  # 54 features for 60 tokens
        model(b["input_ids"], b["position_ids"], b["pixel_values"][:216],
              torch.tensor([[1, 12, 18]]))
    with pytest.raises(ValueError, match="240 patches but image_grid_thw describes 216"):
        model(b["input_ids"], b["position_ids"], b["pixel_values"], torch.tensor([[1, 12, 18]]))
    with pytest.raises(ValueError, match="no pixel_values"):
        model(b["input_ids"], b["position_ids"])
