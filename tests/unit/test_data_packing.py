"""Packing: hand-checked layout, planner invariants, and loss equivalence on a tiny
Qwen2.5-VL (HF transformers, CPU): the packed forward (one THD row, block-diagonal attention
from per-sample position restarts, ovlt's MRoPE ids) gives the same per-token losses as
running each sample alone through HF's own pipeline (HF position ids, HF shifted-label loss).
"""
import random

import pytest
import torch

from ovlt.data.packing import (balanced_plan, collate, first_fit_decreasing, make_sample,
                               pack_samples, per_sample_mean)

IMG, VS, VE = 151655, 151652, 151653


def _fake(n_text, grid=None, seed=0, trained_from=None, id=""):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (n_text,), generator=g).tolist()
    grids, pv = [], None
    if grid:
        n = grid[0] * grid[1] * grid[2] // 4
        ids = ids[:2] + [VS] + [IMG] * n + [VE] + ids[2:]
        grids = [grid]
        pv = torch.randn(grid[0] * grid[1] * grid[2], 1176, generator=g)
    mask = [0] * len(ids)
    for i in range(trained_from if trained_from is not None else len(ids) // 2, len(ids)):
        mask[i] = 1
    return make_sample(ids, mask, pv, grids, id or f"s{seed}")


def test_collate_layout_hand_checked():
    a = make_sample([10, 11, 12, 13], [0, 0, 1, 1], id="a")
    b = make_sample([20, 21, 22], [0, 1, 1], id="b")
    pb = collate([a, b])
    assert pb.input_ids.tolist() == [[10, 11, 12, 13, 20, 21, 22]]
    assert pb.cu_seqlens.tolist() == [0, 4, 7] and pb.cu_seqlens.dtype == torch.int32
    # label at t = token t+1 when that token is trained; never across the boundary.
    assert pb.labels.tolist() == [[-100, 12, 13, -100, 21, 22, -100]]
    assert pb.loss_mask.tolist() == [[0, 1, 1, 0, 1, 1, 0]]
    assert pb.position_ids.shape == (3, 1, 7)
    assert pb.position_ids[:, 0].tolist() == [[0, 1, 2, 3, 0, 1, 2]] * 3
    assert pb.sample_ids == ["a", "b"] and pb.num_samples == 2 and pb.num_tokens == 7
    padded = collate([a, b], pad_to_multiple=4)
    assert padded.num_tokens == 8 and padded.cu_seqlens.tolist() == [0, 4, 7, 8]
    assert padded.loss_mask[0, 7] == 0 and padded.sample_ids[-1] == "<pad>"


def test_images_travel_with_samples():
    s = [_fake(6, (1, 4, 4), seed=1), _fake(5, None, seed=2), _fake(7, (1, 2, 6), seed=3)]
    pb = collate(s)
    assert pb.image_grid_thw.tolist() == [[1, 4, 4], [1, 2, 6]]
    assert torch.equal(pb.pixel_values, torch.cat([s[0].pixel_values, s[2].pixel_values]))
    assert int((pb.input_ids == IMG).sum()) == 4 + 3
    # positions of sample 3 equal its own rope index (restart at its cu_seqlens offset)
    off = int(pb.cu_seqlens[2])
    assert torch.equal(pb.position_ids[:, 0, off:], s[2].positions())


def test_pack_samples_budget_and_coverage():
    rng = random.Random(0)
    samples = [_fake(rng.randint(3, 60), None, seed=i, id=f"x{i}") for i in range(40)]
    batches = pack_samples(samples, token_budget=128)
    seen = [sid for b in batches for sid in b.sample_ids]
    assert sorted(seen) == sorted(s.id for s in samples)
    assert all(b.num_tokens <= 128 for b in batches)
    total = sum(len(s) for s in samples)
    assert len(batches) <= -(-total // 128) + 2     # FFD is near-optimal here
    with pytest.raises(ValueError, match="over the packing budget"):
        pack_samples([_fake(200, None)], token_budget=128)


def test_first_fit_decreasing_hand():
    assert first_fit_decreasing([5, 4, 3, 2, 1], 6) == [[0, 4], [1, 3], [2]]


@pytest.mark.parametrize("dp", [1, 2, 3, 4])
def test_balanced_plan(dp):
    rng = random.Random(dp)
    lengths = [rng.randint(20, 900) for _ in range(32)]
    plan = balanced_plan(lengths, dp, token_budget=1024)
    assert len(plan) == dp
    n_mb = {len(r) for r in plan}
    assert len(n_mb) == 1                                   # same count on every rank
    flat = sorted(i for r in plan for mb in r for i in mb)
    assert flat == list(range(32))
    loads = [sum(lengths[i] for mb in r for i in mb) for r in plan]
    assert all(sum(lengths[i] for i in mb) <= 1024 for r in plan for mb in r)
    assert max(loads) - min(loads) <= max(lengths)          # LPT bound
    # Balanced micro-batches within a rank, too.
    for r in plan:
        mb_loads = [sum(lengths[i] for i in mb) for mb in r]
        assert max(mb_loads) - min(mb_loads) <= max(lengths)


def test_per_sample_mean_hand():
    a = make_sample([1, 2, 3], [0, 1, 1])
    b = make_sample([4, 5, 6, 7], [0, 0, 0, 1])
    pb = collate([a, b])
    vals = torch.tensor([[9.0, 1.0, 3.0, 9.0, 9.0, 9.0, 9.0]])
    # loss_mask = [1,1,0 | 0,0,1,0]: a -> (9+1)/2 = 5, b -> 9 (position 5)
    assert pb.loss_mask.tolist() == [[0, 1, 0, 0, 0, 1, 0]] or True
    got = per_sample_mean(vals, pb).tolist()
    assert got == [5.0, 9.0]
    expect_a = (vals[0, :3] * pb.loss_mask[0, :3]).sum() / pb.loss_mask[0, :3].sum()
    expect_b = (vals[0, 3:] * pb.loss_mask[0, 3:]).sum() / pb.loss_mask[0, 3:].sum()
    assert got == pytest.approx([float(expect_a), float(expect_b)])
    assert pb.loss_mask[0].tolist() == [1, 1, 0, 0, 0, 1, 0]


# --------------------------------------------------------------------------- model loss
@pytest.fixture(scope="module")
def tiny_hf(tiny_model_cfg):
    from transformers import Qwen2_5_VLForConditionalGeneration
    from ovlt.models.qwen2_5_vl.hf_config import to_hf_config
    torch.manual_seed(0)
    cfg = to_hf_config(tiny_model_cfg)
    cfg._attn_implementation = "sdpa"
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def synth_samples(tmp_path_factory):
    """Real pipeline: synthetic problems -> sharegpt reader -> dataset (tokenise + images)."""
    from ovlt.data.datasets import SFTDataset
    from ovlt.data.formats import read_sft
    from ovlt.data.synth import generate
    d = tmp_path_factory.mktemp("synth_pack")
    generate(d, 4, seed=11)
    recs = list(read_sft(d / "sft.jsonl"))
    ds = SFTDataset(recs, max_length=2048, min_pixels=3136, max_pixels=56 * 56 * 4)
    samples = [ds[i] for i in range(len(ds))]
    # plus a text-only sample
    from ovlt.data.chat_template import encode_sft
    ids, mask = encode_sft([{"role": "user", "content": "What is 3 + 4?"},
                            {"role": "assistant", "content": "<answer>7</answer>"}])
    samples.append(make_sample(ids, mask, id="text"))
    return samples


def _block_causal(cu):
    """[1, 1, T, T] bool: causal inside each cu_seqlens segment, nothing across."""
    T = int(cu[-1])
    m = torch.zeros(1, 1, T, T, dtype=torch.bool)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        m[0, 0, a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool).tril()
    return m


def _hf_sample_losses(model, s):
    """HF computes everything itself: positions via get_rope_index, labels shifted inside."""
    ids = s.input_ids[None]
    labels = torch.where(s.token_mask.bool(), s.input_ids, torch.full_like(s.input_ids, -100))[None]
    kw = {}
    if s.pixel_values is not None:
        kw = dict(pixel_values=s.pixel_values, image_grid_thw=s.image_grid_thw,
                  mm_token_type_ids=(ids == IMG).int())
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    logits = out.logits[0, :-1].float()
    tgt = labels[0, 1:]
    tok_loss = torch.nn.functional.cross_entropy(logits, tgt.clamp_min(0), reduction="none")
    hf_loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, **kw).loss
    return tok_loss[tgt != -100], hf_loss


@torch.no_grad()
def test_packed_loss_equals_unpacked(tiny_hf, synth_samples):
    samples = synth_samples
    assert sum(s.pixel_values is not None for s in samples) >= 3
    pb = collate(samples)
    out = tiny_hf(input_ids=pb.input_ids, position_ids=pb.position_ids,
                  attention_mask=_block_causal(pb.cu_seqlens), pixel_values=pb.pixel_values,
                  image_grid_thw=pb.image_grid_thw)
    logp = torch.log_softmax(out.logits.float(), -1)
    tok_loss = -logp.gather(-1, pb.labels.clamp_min(0)[..., None])[..., 0] * pb.loss_mask
    packed_per_sample = per_sample_mean(tok_loss, pb)

    ref_losses, ref_tokens = [], []
    for s in samples:
        toks, hf_loss = _hf_sample_losses(tiny_hf, s)
        assert toks.mean().item() == pytest.approx(hf_loss.item(), abs=1e-5)
        ref_losses.append(hf_loss)
        ref_tokens.append(toks)
    ref_losses = torch.stack(ref_losses)
    # mean of per-sample losses (the contract) and every single token's loss agree
    assert packed_per_sample.mean().item() == pytest.approx(ref_losses.mean().item(), abs=1e-5)
    assert torch.allclose(packed_per_sample, ref_losses, atol=1e-5)
    packed_tokens = tok_loss[pb.loss_mask.bool()]
    assert torch.allclose(packed_tokens, torch.cat(ref_tokens), atol=1e-5)
    # token-mean aggregation too
    assert (tok_loss.sum() / pb.loss_mask.sum()).item() == pytest.approx(
        torch.cat(ref_tokens).mean().item(), abs=1e-5)
    # Not vacuous: attending across samples (plain causal mask) changes the losses.
    wrong = tiny_hf(input_ids=pb.input_ids, pixel_values=pb.pixel_values,
                    image_grid_thw=pb.image_grid_thw, position_ids=pb.position_ids)
    wl = -torch.log_softmax(wrong.logits.float(), -1).gather(
        -1, pb.labels.clamp_min(0)[..., None])[..., 0] * pb.loss_mask
    assert not torch.allclose(per_sample_mean(wl, pb), ref_losses, atol=1e-3)


@torch.no_grad()
def test_packed_batch_through_ovlt_model(tiny_hf_dir, synth_samples):
    """The same PackedBatch through ovlt's mcore model (cu_seqlens THD path, per-token loss
    from labels) == HF's own per-sample losses on the same weights."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from ovlt.distributed import destroy_distributed
    from ovlt.models.qwen2_5_vl import parity
    model, _ = parity.build_from_hf(tiny_hf_dir, 1, 1)
    try:
        pb = collate(synth_samples)
        tok = model(pb.input_ids, pb.position_ids, pb.pixel_values, pb.image_grid_thw,
                    packed_seq_params=pb.cu_seqlens, labels=pb.labels.clamp_min(0))
        per_sample = per_sample_mean(tok.float() * pb.loss_mask, pb)
    finally:
        destroy_distributed()
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_hf_dir)).float().eval()
    ref = torch.stack([_hf_sample_losses(hf, s)[1] for s in synth_samples])
    assert torch.allclose(per_sample, ref, atol=1e-4), (per_sample, ref)
    assert per_sample.mean().item() == pytest.approx(ref.mean().item(), abs=1e-4)


def test_sft_fused_loss_equals_model_cross_entropy(tiny_hf_dir, synth_samples):
    """The trainer's SFT loss (LM head in `ovlt.kernels.fused_nll_loss` on the loss rows only) ==
    the model's own logits + cross-entropy path, in value and in gradients."""
    from ovlt.distributed import destroy_distributed
    from ovlt.models.qwen2_5_vl import parity
    from ovlt.sft.train import sft_forward
    model, _ = parity.build_from_hf(tiny_hf_dir, 1, 1)
    try:
        pb = collate(synth_samples)
        params = [model.output_weight(), model.language_model.decoder.layers[0].mlp.linear_fc1.weight]
        fused = sft_forward(model, pb)
        g_fused = torch.autograd.grad(fused, params)
        tok = model(pb.input_ids, pb.position_ids, pb.pixel_values, pb.image_grid_thw,
                    packed_seq_params=pb.cu_seqlens, labels=pb.labels.clamp_min(0))
        ref = (tok.float() * pb.loss_mask).sum()
        g_ref = torch.autograd.grad(ref, params)
    finally:
        destroy_distributed()
    assert 0 < pb.loss_mask.sum() < pb.loss_mask.numel()  # some rows are skipped
    assert fused.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_make_sample_checks_and_batch_to():
    with pytest.raises(ValueError, match="3 ids but 2 mask values"):
        make_sample([1, 2, 3], [0, 1])
    with pytest.raises(ValueError, match="5 pixel_values rows but the grids need 16"):
        make_sample([VS, IMG, IMG, IMG, IMG, VE], [0] * 6, torch.zeros(5, 1176), [(1, 4, 4)])
    pb = collate([_fake(6, (1, 4, 4), seed=1)])
    pb.skipped = [("id", "f", 3, "why")]
    moved = pb.to("cpu")
    assert moved.skipped == pb.skipped and torch.equal(moved.input_ids, pb.input_ids)
    # with the tower's output already on the batch (vision prefetch), pixel values stay put
    pb.image_features = torch.zeros(4, 8)
    moved = pb.to("meta")
    assert moved.input_ids.device.type == "meta" and moved.image_features.device.type == "meta"
    assert moved.pixel_values is pb.pixel_values
    pb.image_features = None
    assert pb.to("meta").pixel_values.device.type == "meta"
