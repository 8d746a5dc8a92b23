"""Loss and gradients of the mcore model vs HF (fp32, CPU) at TP=1 and TP=2."""
import pytest
import torch

from ovlt.models.qwen2_5_vl import parity
from tests.dist_utils import run_distributed

# (HF parameter, mcore parameter, how the mcore tensor is split over TP)
PAIRS = [
    ("model.language_model.layers.0.self_attn.o_proj.weight",
     "language_model.decoder.layers.0.self_attention.linear_proj.weight", "row"),
    ("model.language_model.layers.3.mlp.down_proj.weight",
     "language_model.decoder.layers.3.mlp.linear_fc2.weight", "row"),
    ("model.language_model.norm.weight", "language_model.decoder.final_layernorm.weight", "full"),
    ("model.language_model.embed_tokens.weight",
     "language_model.embedding.word_embeddings.weight", "vocab"),
    ("model.visual.blocks.0.mlp.down_proj.weight", "vision_model.decoder.layers.0.mlp.linear_fc2.weight", "row"),
    ("model.visual.blocks.2.attn.proj.bias",
     "vision_model.decoder.layers.2.self_attention.linear_proj.bias", "full"),
    ("model.visual.merger.mlp.0.weight", "vision_model.merger.linear_fc1.weight", "full"),
    ("model.visual.patch_embed.proj.weight", "vision_model.patch_embed.proj.weight", "patch"),
]


def _shard(t, kind, tp, r, padded_rows=None):
    if kind == "row":
        return t.chunk(tp, dim=1)[r]
    if kind == "vocab":
        t = torch.cat([t, t.new_zeros(padded_rows - t.shape[0], *t.shape[1:])])
        return t.chunk(tp, dim=0)[r]
    if kind == "patch":
        return t.reshape(t.shape[0], -1)
    return t


def _hf_loss_and_grads(hf_dir, batch):
    hf = parity.load_hf(hf_dir).train()
    out = parity.hf_model_output(hf, batch, grad=True, labels=batch["input_ids"])
    out.loss.backward()
    params = dict(hf.named_parameters())
    return float(out.loss), {h: params[h].grad.detach().clone() for h, _, _ in PAIRS}


def _grad_worker(rank, world, hf_dir, tp):
    from megatron.core import parallel_state as ps
    from ovlt.distributed import destroy_distributed
    try:
        model, cfg = parity.build_from_hf(hf_dir, tp, 1)
        model.train()
        batch = parity.make_batch(cfg, images=2)
        ids = batch["input_ids"]
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
        loss_tok = model(ids, batch["position_ids"], batch["pixel_values"],
                         batch["image_grid_thw"], labels=labels)
        n = (labels >= 0).sum()
        loss = loss_tok.sum() / n
        loss.backward()
        assert float(loss_tok[:, -1].abs().sum()) == 0.0  # -100 labels carry no loss
        params = dict(model.named_parameters())
        grads = {m: params[m].grad.detach().clone() for _, m, _ in PAIRS}
        ref_loss, ref = _hf_loss_and_grads(hf_dir, batch)
        padded = model.language_model.vocab_size
        out = {"loss": float(loss), "ref_loss": ref_loss, "diffs": {}}
        r = ps.get_tensor_model_parallel_rank()
        for h, m, kind in PAIRS:
            want = _shard(ref[h], kind, tp, r, padded)
            assert grads[m].shape == want.shape, (m, grads[m].shape, want.shape)
            out["diffs"][m] = (float((grads[m] - want).abs().max()), float(want.abs().max()))
        torch.distributed.barrier()  # no teardown while another rank still works
        return out
    finally:
        destroy_distributed()


def _check(res):
    for o in res:
        assert o["loss"] == pytest.approx(o["ref_loss"], abs=1e-5)
        for name, (diff, scale) in o["diffs"].items():
            assert scale > 0, name
            assert diff < 1e-5 + 1e-4 * scale, (name, diff, scale)


def test_loss_and_grads_match_hf_tp1(tiny_hf_dir):
    _check(run_distributed(_grad_worker, 1, str(tiny_hf_dir), 1, timeout=300))


@pytest.mark.slow
def test_loss_and_grads_match_hf_tp2(tiny_hf_dir):
    _check(run_distributed(_grad_worker, 2, str(tiny_hf_dir), 2, timeout=300))
