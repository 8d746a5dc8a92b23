"""ovlt's get_rope_index vs HF `Qwen2_5_VLModel.get_rope_index` on the tiny config."""
import pytest
import torch

from ovlt.models.qwen2_5_vl.rope_index import get_rope_index, rope_index_1d

IMG, VS, VE = 151655, 151652, 151653


@pytest.fixture(scope="module")
def hf_model(tiny_model_cfg):
    from transformers import Qwen2_5_VLModel
    from ovlt.models.qwen2_5_vl.hf_config import to_hf_config
    torch.manual_seed(0)
    return Qwen2_5_VLModel(to_hf_config(tiny_model_cfg)).eval()


def _image(t, h, w):
    return [VS] + [IMG] * (t * h * w // 4) + [VE]


def _hf(model, ids, grids, mask):
    mm = (ids == IMG).int()
    return model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=grids,
                                attention_mask=mask)


def _batch(seqs, pad_left=True, pad_id=151643):
    S = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), S), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), S, dtype=torch.long)
    for b, s in enumerate(seqs):
        if pad_left:
            ids[b, S - len(s):] = torch.tensor(s)
            mask[b, S - len(s):] = 1
        else:
            ids[b, :len(s)] = torch.tensor(s)
            mask[b, :len(s)] = 1
    return ids, mask


def _rand_text(g, n):
    return torch.randint(0, 151000, (n,), generator=g).tolist()


CASES = {
    # name: list of samples, each a list of pieces: int = n text tokens, tuple = image grid
    "text_only": [[12]],
    "one_image": [[5, (1, 4, 6), 9]],
    "two_images_different_sizes": [[3, (1, 8, 4), 2, (1, 6, 10), 7]],
    "image_first_and_last": [[(1, 2, 2), 4, (1, 4, 2)]],
    "big_image": [[4, (1, 36, 52), 3]],
    "mixed_batch_left_pad": [[12], [5, (1, 4, 6), 9], [3, (1, 8, 4), 2, (1, 6, 10), 7], [2, (1, 2, 4), 1]],
}


def _build(pieces, g):
    ids, grids = [], []
    for p in pieces:
        if isinstance(p, tuple):
            ids += _image(*p)
            grids.append(p)
        else:
            ids += _rand_text(g, p)
    return ids, grids


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("pad_left", [True, False])
def test_matches_hf(hf_model, name, pad_left):
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    seqs, grids = [], []
    for pieces in CASES[name]:
        s, gr = _build(pieces, g)
        seqs.append(s)
        grids += gr
    ids, mask = _batch(seqs, pad_left=pad_left)
    thw = torch.tensor(grids, dtype=torch.long) if grids else None
    ref_pos, ref_delta = _hf(hf_model, ids, thw, mask)
    pos, delta = get_rope_index(ids, thw, attention_mask=mask)
    assert pos.shape == (3, len(seqs), ids.shape[1])
    assert torch.equal(pos, ref_pos)
    assert torch.equal(delta, ref_delta.long())
    # Unpadded single sequences (what packing calls) agree with the batched answer too.
    if len(seqs) == 1 and mask.all():
        ref1, refd = _hf(hf_model, ids, thw, None)
        p1, d1 = get_rope_index(ids, thw)
        assert torch.equal(p1, ref1) and torch.equal(d1, refd.long())


def test_hand_computed_values():
    # text(2) + image 1x4x6 (merged 2x3 -> 6 tokens) + text(2)
    ids = torch.tensor([7, VS] + [IMG] * 6 + [VE, 8])
    pos, delta = rope_index_1d(ids, [(1, 4, 6)])
    assert pos.tolist() == [
        [0, 1, 2, 2, 2, 2, 2, 2, 5, 6],
        [0, 1, 2, 2, 2, 3, 3, 3, 5, 6],
        [0, 1, 2, 3, 4, 2, 3, 4, 5, 6],
    ]
    assert delta == 7 - 10


def test_errors_name_the_problem():
    ids = torch.tensor([[7, VS] + [IMG] * 6 + [VE]])
    with pytest.raises(ValueError, match="needs 4"):
        get_rope_index(ids, torch.tensor([[1, 4, 4]]))
    with pytest.raises(ValueError, match="image_grid_thw has 0 rows"):
        get_rope_index(ids, None)
    with pytest.raises(ValueError, match="batch has 1 images"):
        get_rope_index(ids, torch.tensor([[1, 4, 6], [1, 2, 2]]))
    with pytest.raises(ValueError, match="vision_start"):
        get_rope_index(torch.tensor([[7] + [IMG] * 6 + [VE]]), torch.tensor([[1, 4, 6]]))
