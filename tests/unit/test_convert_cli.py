"""`ovlt convert`: HF -> mcore(TP, PP) -> HF round trips are bit-exact and load in transformers."""
from __future__ import annotations

import copy
import json
import shutil
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ovlt.cli import main as ovlt_main
from ovlt.models.qwen2_5_vl import mcore_dir
from ovlt.models.qwen2_5_vl.checkpoint_io import INDEX_NAME, HFCheckpointReader


def _tensors(d):
    r = HFCheckpointReader(d)
    return {k: r[k] for k in r}


def _assert_same_dir(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb)
    for n in ta:
        assert ta[n].dtype == tb[n].dtype and ta[n].shape == tb[n].shape, n
        assert torch.equal(ta[n], tb[n]), n


@pytest.fixture(scope="module")
def gqa_hf_dir(tmp_path_factory, tiny_model_cfg):
    """Untied, 8 heads / 2 KV groups, vocab 1000 (padding needed), bf16 weights."""
    from ovlt.models.qwen2_5_vl.hf_config import save_tiny_hf_model
    c = copy.deepcopy(tiny_model_cfg)
    c.num_attention_heads, c.num_query_groups, c.mrope_section = 8, 2, [2, 1, 1]
    c.tie_word_embeddings, c.vocab_size = False, 1000
    c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id = 990, 991, 992, 993
    out = tmp_path_factory.mktemp("gqa_hf")
    save_tiny_hf_model(out, c, seed=3, dtype=torch.bfloat16, max_shard_size="1MB")
    (out / "tokenizer_config.json").write_text('{"model_max_length": 77}')
    (out / "chat_template.jinja").write_text("{{ messages }}")
    return out


def _convert(hf, tmp_path, tp, pp, drop_hf_side=False, extra=()):
    m, back = tmp_path / "mcore", tmp_path / "hf"
    assert ovlt_main(["convert", "hf2mcore", "--hf", str(hf), "--out", str(m),
                      "--tp", str(tp), "--pp", str(pp), *extra]) == 0
    if drop_hf_side:  # like a trainer checkpoint: config.json is rebuilt from config.yaml
        shutil.rmtree(m / "hf")
    assert ovlt_main(["convert", "mcore2hf", "--mcore", str(m), "--out", str(back),
                      "--max-shard-size", "8MB"]) == 0
    return m, back


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (2, 2)])
def test_round_trip_tiny_bit_exact(tiny_hf_dir, tmp_path, tp, pp):
    m, back = _convert(tiny_hf_dir, tmp_path, tp, pp)
    meta = json.loads((m / "meta.json").read_text())
    assert meta["tp"] == tp and meta["pp"] == pp and meta["format"] == "ovlt-mcore-v1"
    assert meta["padded_vocab_size"] == 151936 and meta["layer_offsets"] == list(range(0, 4, 4 // pp))
    assert sorted(p.name for p in m.glob("mp_rank_*")) == sorted(
        f"mp_rank_{t:02d}_{p:03d}" for t in range(tp) for p in range(pp))
    _assert_same_dir(tiny_hf_dir, back)
    index = json.loads((back / INDEX_NAME).read_text())
    assert "lm_head.weight" not in index["weight_map"]  # tied: absent, like the official 3B
    assert len(set(index["weight_map"].values())) > 1  # sharded with an index
    assert (back / "generation_config.json").is_file()


def test_round_trip_untied_gqa_bf16_tp2_pp2(gqa_hf_dir, tmp_path):
    m, back = _convert(gqa_hf_dir, tmp_path, 2, 2, extra=("--vocab-divisible-by", "128"))
    with safe_open(str(m / "mp_rank_01_001" / "model.safetensors"), "pt") as h:
        out = h.get_tensor("language_model.output_layer.weight")
    assert out.dtype == torch.bfloat16 and out.shape == (512, 64)  # 1000 -> 1024 rows / 2
    assert torch.count_nonzero(out[1000 - 512:]) == 0
    _assert_same_dir(gqa_hf_dir, back)
    assert "lm_head.weight" in _tensors(back)
    for side in ("tokenizer_config.json", "chat_template.jinja", "config.json"):
        assert (back / side).read_bytes() == (gqa_hf_dir / side).read_bytes()


@pytest.mark.parametrize("which", ["tiny", "gqa"])
def test_converted_dir_loads_in_transformers_with_identical_logits(
        which, tiny_hf_dir, gqa_hf_dir, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration
    src = tiny_hf_dir if which == "tiny" else gqa_hf_dir
    _, back = _convert(src, tmp_path, 2, 2, drop_hf_side=which == "gqa")
    a = Qwen2_5_VLForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    b = Qwen2_5_VLForConditionalGeneration.from_pretrained(back, dtype=torch.float32).eval()
    cfg = a.config
    n_img = 4  # grid 1x4x4 patches -> 4 merged tokens
    ids = torch.tensor([[5, 6, cfg.vision_start_token_id] + [cfg.image_token_id] * n_img
                        + [cfg.vision_end_token_id, 7, 8, 9]])
    torch.manual_seed(0)
    px = torch.randn(16, 3 * 2 * 14 * 14)
    grid = torch.tensor([[1, 4, 4]])
    with torch.no_grad():
        la = a(input_ids=ids, pixel_values=px, image_grid_thw=grid).logits
        lb = b(input_ids=ids, pixel_values=px, image_grid_thw=grid).logits
    assert la.shape[-1] == cfg.text_config.vocab_size and la.abs().max() > 0
    assert torch.equal(la, lb)


def test_hf2mcore_streams_one_entry_at_a_time(tiny_hf_dir, tmp_path, monkeypatch):
    """At most one plan entry's HF tensors (3: q, k, v) are alive at any time."""
    live: list = []
    peak = [0]

    class SpyReader(HFCheckpointReader):
        def __getitem__(self, key):
            t = super().__getitem__(key)
            live[:] = [r for r in live if r() is not None]
            live.append(weakref.ref(t))
            peak[0] = max(peak[0], len(live))
            return t

    monkeypatch.setattr(mcore_dir, "HFCheckpointReader", SpyReader)
    mcore_dir.hf_to_mcore_dir(tiny_hf_dir, tmp_path / "m", 2, 2)
    assert 1 <= peak[0] <= 3


def test_errors(tiny_hf_dir, tmp_path, capsys):
    def run(*argv):
        rc = ovlt_main(["convert", *argv])
        return rc, capsys.readouterr().err

    rc, err = run("hf2mcore", "--hf", str(tmp_path / "nope"), "--out", str(tmp_path / "o1"))
    assert rc == 1 and "nope: not a directory" in err
    rc, err = run("hf2mcore", "--hf", str(tiny_hf_dir), "--out", str(tmp_path / "o2"), "--tp", "3")
    assert rc == 1 and "tensor_parallel=3 must divide model.num_attention_heads=4" in err
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o2.partial").exists()
    rc, err = run("mcore2hf", "--mcore", str(tiny_hf_dir), "--out", str(tmp_path / "o3"))
    assert rc == 1 and "no meta.json" in err
    # a missing tensor is named
    broken = tmp_path / "broken"
    shutil.copytree(tiny_hf_dir, broken)
    index = json.loads((broken / INDEX_NAME).read_text())
    gone = "model.layers.1.mlp.up_proj.weight"
    f = broken / index["weight_map"].pop(gone)
    with safe_open(str(f), "pt") as h:
        kept = {k: h.get_tensor(k) for k in h.keys() if k != gone}
    save_file(kept, str(f), metadata={"format": "pt"})
    (broken / INDEX_NAME).write_text(json.dumps(index))
    rc, err = run("hf2mcore", "--hf", str(broken), "--out", str(tmp_path / "o4"), "--tp", "2")
    assert rc == 1 and f"missing tensor {gone!r}" in err
    # an existing output is not overwritten without --force
    (tmp_path / "o5").mkdir()
    (tmp_path / "o5" / "keep.txt").write_text("x")
    rc, err = run("hf2mcore", "--hf", str(tiny_hf_dir), "--out", str(tmp_path / "o5"))
    assert rc == 1 and "--force" in err and (tmp_path / "o5" / "keep.txt").exists()
    # a missing rank file is named
    m = tmp_path / "m"
    assert ovlt_main(["convert", "hf2mcore", "--hf", str(tiny_hf_dir), "--out", str(m), "--tp", "2"]) == 0
    shutil.rmtree(m / "mp_rank_01_000")
    rc, err = run("mcore2hf", "--mcore", str(m), "--out", str(tmp_path / "o6"))
    assert rc == 1 and "mp_rank_01_000" in err


def test_round_trip_te_norm_names(tiny_hf_dir, tmp_path):
    m, back = tmp_path / "m", tmp_path / "hf"
    assert ovlt_main(["convert", "hf2mcore", "--hf", str(tiny_hf_dir), "--out", str(m),
                      "--tp", "2", "--pp", "2", "--norm-names", "te"]) == 0
    with safe_open(str(m / "mp_rank_01_001" / "model.safetensors"), "pt") as h:
        names = list(h.keys())
    assert "language_model.decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in names
    assert not any("pre_mlp_layernorm" in n for n in names)
    assert ovlt_main(["convert", "mcore2hf", "--mcore", str(m), "--out", str(back)]) == 0
    _assert_same_dir(tiny_hf_dir, back)


def test_reads_transformers5_names_single_file(tiny_hf_dir, tmp_path):
    """`model.language_model.*` / `model.visual.*` in one model.safetensors (no index)."""
    src = tmp_path / "t5"
    src.mkdir()
    shutil.copy(tiny_hf_dir / "config.json", src / "config.json")
    t = _tensors(tiny_hf_dir)
    renamed = {("model.language_model." + n[6:] if n.startswith("model.") else "model." + n): v
               for n, v in t.items()}
    assert "model.visual.merger.ln_q.weight" in renamed
    save_file(renamed, str(src / "model.safetensors"), metadata={"format": "pt"})
    assert sorted(HFCheckpointReader(src)) == sorted(t)
    _, back = _convert(src, tmp_path, 2, 1)
    _assert_same_dir(tiny_hf_dir, back)  # written back under the official names
