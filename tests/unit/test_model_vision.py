"""Vision tower vs HF: the layout helpers, and the whole tower with window attention (default:
window layers + full layers), with no window attention (all full), and all windowed."""
import pytest
import torch
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from ovlt.models.qwen2_5_vl.vision import image_cu_seqlens, rotary_position_ids, window_layout

GRIDS = [[1, 12, 20], [1, 8, 8], [2, 4, 6], [1, 18, 10]]


def test_layout_helpers_match_hf():
    g = torch.tensor(GRIDS)
    assert torch.equal(rotary_position_ids(g, 2), get_vision_position_ids(g, 2))
    idx, cu = window_layout(g, 2, 112 // 2 // 14)
    ref_idx, ref_cu = get_vision_window_index(g, spatial_merge_size=2, window_size=112, patch_size=14)
    assert torch.equal(idx, ref_idx) and torch.equal(cu, ref_cu)
    assert image_cu_seqlens(g).tolist() == [0, 240, 304, 328, 352, 532]


@pytest.fixture(scope="module")
def dist1():
    from ovlt.config import ParallelConfig
    from ovlt.distributed import destroy_distributed, init_distributed
    init_distributed(ParallelConfig())
    yield
    destroy_distributed()


def _both(hf_dir, fullatt):
    from ovlt.models.qwen2_5_vl.hf_config import from_hf_config
    from ovlt.models.qwen2_5_vl.parity import load_hf
    from ovlt.models.qwen2_5_vl.provider import build_model, load_hf_weights
    cfg = from_hf_config(hf_dir)
    cfg.params_dtype, cfg.transformer_impl = "fp32", "local"
    if fullatt is not None:
        cfg.vision.fullatt_block_indexes = fullatt
    model = build_model(cfg)
    load_hf_weights(model, hf_dir)
    hf = load_hf(hf_dir)
    if fullatt is not None:
        hf.model.visual.fullatt_block_indexes = fullatt
    return model.vision_model.eval(), hf.model.visual


def _run(vis, hf_vis, grids, seed=0):
    g = torch.tensor(grids)
    px = torch.randn(int(g.prod(-1).sum()), 1176, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = hf_vis(px, grid_thw=g).pooler_output
        got = vis(px, g)
    return got, ref


@pytest.mark.parametrize("fullatt", [None, [0, 1, 2, 3], []], ids=["mixed", "all_full", "all_window"])
def test_vision_tower_matches_hf(dist1, tiny_hf_dir, fullatt):
    vis, hf_vis = _both(tiny_hf_dir, fullatt)
    got, ref = _run(vis, hf_vis, GRIDS)
    assert got.shape == (sum(t * h * w for t, h, w in GRIDS) // 4, 64)
    assert (got - ref).abs().max().item() < 1e-5
    assert ref.abs().max().item() > 0.1


def test_window_attention_matters(dist1, tiny_hf_dir):
    """Guard against a test that can't fail: windowed and full attention differ here by far more
    (~1e-3 on outputs of ~5e-2) than the 1e-5 parity tolerance above."""
    full, _ = _both(tiny_hf_dir, [0, 1, 2, 3])
    win, _ = _both(tiny_hf_dir, [])
    g = torch.tensor(GRIDS[:1])
    px = torch.randn(240, 1176, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (full(px, g) - win(px, g)).abs().max().item() > 1e-4


def test_images_are_independent(dist1, tiny_hf_dir):
    """Packing images (THD) == running each image alone: no attention across images."""
    vis, _ = _both(tiny_hf_dir, None)
    g = torch.tensor(GRIDS)
    n = g.prod(-1)
    px = torch.randn(int(n.sum()), 1176, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        together = vis(px, g)
        alone = torch.cat([vis(p, gi[None]) for p, gi in zip(px.split(n.tolist()), g)])
    assert (together - alone).abs().max().item() < 1e-5


def test_forward_only_path_equals_mcore_layers(dist1, tiny_hf_dir):
    """The no-autograd fast path (`_lean_blocks`) computes what mcore's TransformerLayers do:
    same tower, same inputs, with grad (mcore path) and without (fast path)."""
    vis, _ = _both(tiny_hf_dir, None)
    g = torch.tensor(GRIDS)
    px = torch.randn(int(g.prod(-1).sum()), 1176, generator=torch.Generator().manual_seed(3))
    calls = []
    orig = vis._lean_blocks
    vis._lean_blocks = lambda *a: calls.append(1) or orig(*a)
    mcore = vis(px, g)  # params require grad: the mcore layers run
    assert not calls and mcore.requires_grad
    with torch.no_grad():
        lean = vis(px, g)
    assert calls and vis._lean_layers_ok
    assert (lean - mcore.detach()).abs().max().item() < 1e-6
    for p in vis.decoder.parameters():
        p.requires_grad_(False)
    vis(px, g)  # a trainable patch embed still needs the blocks' backward: mcore path
    assert len(calls) == 1
    vis.patch_embed.requires_grad_(False)  # frozen tower (train.freeze=[vision]): fast path
    assert torch.equal(vis(px, g).detach(), lean) and len(calls) == 2


def test_forward_only_path_k_padded_fc2(dist1, tiny_hf_dir, monkeypatch):
    """The GPU's K-padded fc2 (`ffn_padded`: the vision MLP width rounded up to 8 so cuBLAS
    gets aligned rows), forced on the CPU with a width 5 wider: the same outputs, and the padded
    weight copy follows in-place weight updates (a checkpoint load)."""
    from ovlt.models.qwen2_5_vl import vision
    vis, _ = _both(tiny_hf_dir, None)
    vis.requires_grad_(False)
    g = torch.tensor(GRIDS)
    px = torch.randn(int(g.prod(-1).sum()), 1176, generator=torch.Generator().manual_seed(4))
    plain = vis(px, g)
    monkeypatch.setattr(vision, "ffn_padded", lambda ffn, x: ffn + 5)
    padded = vis(px, g)
    fc2 = vis.decoder.layers[0].mlp.linear_fc2
    assert fc2._ovlt_k_padded[1].shape[1] == fc2.weight.shape[1] + 5
    assert (padded - plain).abs().max().item() < 1e-6
    with torch.no_grad():
        fc2.weight.mul_(2.0)
    changed = vis(px, g)
    monkeypatch.setattr(vision, "ffn_padded", lambda ffn, x: ffn)
    assert (changed - vis(px, g)).abs().max().item() < 1e-6
    assert (changed - plain).abs().max().item() > 1e-4  # 200x the tolerance above
