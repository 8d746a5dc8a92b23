"""The per-token loss and the update depend only on the global batch, not on how it is split:
the same 2 SFT steps through the launcher with big vs small packed micro-batches, DP=2, TP=2
and PP=2 (gloo, CPU, tiny model) give the same losses and the same trained weights."""
import pytest

from tests.sft_testlib import base_overrides, hf_tensors, losses, make_synth, metric, run_sft

VARIANTS = {
    # name: (world size, overrides)
    "small_microbatches": (1, {"data.pack_tokens": 180}),  # ~1 sample per micro-batch
    "dp2": (2, {}),
    "tp2": (2, {"parallel.tensor_parallel": 2}),
    "pp2": (2, {"parallel.pipeline_parallel": 2}),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("lossavg")
    sft_file = make_synth(root / "synth", n=16)
    # Start every variant from the same HF weights (random init differs with TP: vocab padding).
    from ovlt.models.qwen2_5_vl.hf_config import save_tiny_hf_model
    hf = save_tiny_hf_model(root / "base_hf")
    ref = root / "ref"
    run_sft(1, base_overrides(sft_file, ref, **_common(hf)))
    return sft_file, root, hf, losses(ref), hf_tensors(ref / "final_hf")


def _common(hf):
    return {"sft.train.max_steps": 2, "sft.optimizer.lr": 2e-3, "model.hf_path": str(hf)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_same_global_batch_same_loss_and_update(reference, name):
    sft_file, root, hf, ref_losses, ref_w = reference
    world, extra = VARIANTS[name]
    out = root / name
    run_sft(world, base_overrides(sft_file, out, **_common(hf), **extra))
    got = losses(out)
    # Step 1: same weights, same tokens -> same mean; step 2 also checks the first update.
    assert got == pytest.approx(ref_losses, rel=1e-5, abs=1e-5)
    # every step logged once, in order, with the batch's totals summed over DP ranks and
    # counted once per model replica (not once per TP/PP rank)
    assert metric(out, "step") == metric(root / "ref", "step") == [1, 2]
    assert metric(out, "tokens") == metric(root / "ref", "tokens")
    assert metric(out, "loss_tokens") == metric(root / "ref", "loss_tokens")
    w = hf_tensors(out / "final_hf")
    assert w.keys() == ref_w.keys()
    # Adam divides by sqrt(v): on its first steps a near-zero gradient entry moves by up to lr
    # whatever its size, so fp32 reduction-order noise shows as ~1e-6 on single entries, and
    # now and then one entry passes 1e-5 (2e-5 seen once in 8192 at TP=2 with
    # transformers 5.24). 1e-5 (0.5% of the lr = 2e-3) on all but 1 in 1000 entries still
    # catches any mis-scaled gradient: a wrong token count or micro-batch average changes every
    # entry by a large fraction of the lr.
    for k in ref_w:
        d = (w[k].double() - ref_w[k].double()).abs()
        off = int((d > 1e-5 + 1e-4 * ref_w[k].double().abs()).sum())
        assert off <= d.numel() // 1000 and d.max().item() < 1e-4, (k, off, d.max().item())
