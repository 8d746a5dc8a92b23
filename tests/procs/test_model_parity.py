"""mcore Qwen2.5-VL vs HF transformers on the tiny random model (fp32, CPU): logits at TP=1,
TP=2, PP=2, TP=2 x PP=2 (two images of different sizes + a text-only sample), and the parity CLI."""
import pytest

from ovlt.models.qwen2_5_vl import parity
from tests.dist_utils import run_distributed

TOL = 1e-4


@pytest.fixture(scope="module")
def tp1(tiny_hf_dir):
    from ovlt.distributed import destroy_distributed
    model, cfg = parity.build_from_hf(tiny_hf_dir, 1, 1)
    yield model, cfg, parity.load_hf(tiny_hf_dir)
    destroy_distributed()


def test_logits_match_hf_tp1(tp1):
    model, cfg, hf = tp1
    batch = parity.make_batch(cfg, images=2)
    assert batch["image_grid_thw"].tolist() == [[1, 12, 20], [1, 8, 8]]
    ref = parity.hf_forward(hf, batch)
    got = parity.mcore_logits(model, batch, cfg)
    assert got.shape == ref.shape == (3, batch["input_ids"].shape[1], cfg.vocab_size)
    assert (got - ref).abs().max().item() < TOL
    assert ref.abs().max().item() > 0.1  # a real signal, not two all-zero tensors


def test_image_features_change_logits(tp1):
    """The images must matter: dropping them (text-only positions) gives different logits."""
    model, cfg, hf = tp1
    batch = parity.make_batch(cfg, images=2)
    got = parity.mcore_logits(model, batch, cfg)
    other = dict(batch, pixel_values=batch["pixel_values"] + 1.0)
    got2 = parity.mcore_logits(model, other, cfg)
    assert (got[:2] - got2[:2]).abs().max().item() > 1e-3
    assert (got[2] - got2[2]).abs().max().item() == 0.0  # the text-only sample is untouched


def test_more_images_and_no_images(tp1):
    model, cfg, hf = tp1
    for k in (0, 4):
        batch = parity.make_batch(cfg, images=k, seed=3)
        ref = parity.hf_forward(hf, batch)
        assert (parity.mcore_logits(model, batch, cfg) - ref).abs().max().item() < TOL


def _parity_worker(rank, world, hf_dir, tp, pp):
    from ovlt.distributed import destroy_distributed
    try:
        return parity.run(hf_dir, tp, pp, images=2)
    finally:
        destroy_distributed()


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_logits_match_hf_parallel(tiny_hf_dir, tp, pp):
    res = run_distributed(_parity_worker, tp * pp, str(tiny_hf_dir), tp, pp, timeout=300)
    reports = [r for r in res if r is not None]
    assert len(reports) == 1  # last stage, TP rank 0
    diff, per_sample = reports[0]
    assert len(per_sample) == 3 and diff < TOL


def test_parity_cli_exit_codes(tiny_hf_dir, capsys):
    assert parity.main(["--hf", str(tiny_hf_dir), "--images", "1"]) == 0
    assert "max_abs_logit_diff=" in capsys.readouterr().out
    # an impossible tolerance must fail
    assert parity.main(["--hf", str(tiny_hf_dir), "--images", "1", "--tol", "0"]) == 1
    assert parity.main(["--hf", str(tiny_hf_dir) + "/nope"]) == 2


def test_parity_cli_other_config(tmp_path):
    """Any tiny config, not only the fixture's: untied LM head, 6 heads / 2 KV groups, a
    3-block vision tower with one full-attention block, 3 images."""
    from ovlt.config import CONFIG_ROOT, load_config
    from ovlt.models.qwen2_5_vl.hf_config import save_tiny_hf_model
    cfg = load_config(CONFIG_ROOT / "model" / "tiny.yaml", [
        "model.tie_word_embeddings=false", "model.hidden_size=96", "model.num_attention_heads=6",
        "model.num_query_groups=2", "model.num_layers=2", "model.ffn_hidden_size=64",
        "model.vision.depth=3", "model.vision.fullatt_block_indexes=[2]"]).model
    save_tiny_hf_model(tmp_path, cfg, seed=3)
    assert parity.main(["--hf", str(tmp_path), "--images", "3"]) == 0
