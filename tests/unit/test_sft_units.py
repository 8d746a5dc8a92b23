"""Trainer building blocks against independent references: the LR schedule by hand, the
FLOP count against torch's FlopCounterMode on HF transformers' Qwen2.5-VL, freezing by prefix."""
import math

import pytest
import torch

from ovlt.config import OptimizerConfig
from ovlt.engine.flops import (window_lengths, llm_forward_flops, peak_flops,
                                 train_step_flops)
from ovlt.engine.lr_schedule import LRSchedule
from ovlt.engine.model_setup import freeze_modules


def test_lr_warmup_cosine_by_hand():
    s = LRSchedule(OptimizerConfig(lr=1e-3, min_lr=1e-4, lr_schedule="cosine",
                                   warmup_ratio=0.2), total_steps=10)
    assert s.warmup_steps == 2
    assert s.lr_at(0) == pytest.approx(5e-4) and s.lr_at(1) == pytest.approx(1e-3)
    # step 2 starts the decay at the peak; step 6 is half way (p = 4/8) -> the midpoint.
    assert s.lr_at(2) == pytest.approx(1e-3)
    assert s.lr_at(6) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s.lr_at(10) == pytest.approx(1e-4)
    lin = LRSchedule(OptimizerConfig(lr=2.0, min_lr=0.0, lr_schedule="linear", warmup_ratio=0.0,
                                     warmup_steps=0), total_steps=4)
    assert [lin.lr_at(i) for i in range(4)] == pytest.approx([2.0, 1.5, 1.0, 0.5])
    const = LRSchedule(OptimizerConfig(lr=3.0, lr_schedule="constant", warmup_steps=1), 5)
    assert [const.lr_at(i) for i in range(3)] == pytest.approx([3.0, 3.0, 3.0])


def test_lr_apply_sets_every_group():
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p1]}, {"params": [p2], "lr_mult": 0.5}], lr=0.0)
    s = LRSchedule(OptimizerConfig(lr=1.0, lr_schedule="constant", warmup_ratio=0.0), 3)
    s.apply(opt, 0)
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.5]


def test_window_partition_partial_windows(tiny_model_cfg):
    # grid 12x20 patches -> merged 6x10, windows of 4x4 merged units: 2 rows x 3 cols,
    # merged sizes (4x4,4x4,4x2),(2x4,2x4,2x2) -> x4 patches each.
    assert window_lengths(tiny_model_cfg.vision, 12, 20) == [64, 64, 32, 32, 32, 16]


def test_peak_flops_table():
    assert peak_flops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert peak_flops(None) is None and peak_flops("Some CPU") is None


def _hf_flops(model_cfg, grids, text_len):
    """FLOPs of one forward+backward of HF Qwen2.5-VL (eager attention: its score matmuls are
    visible to the counter, unlike CPU SDPA kernels) on one sample, by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ovlt.models.qwen2_5_vl.hf_config import to_hf_config
    torch.manual_seed(0)
    cfg = to_hf_config(model_cfg)
    cfg._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    model = Qwen2_5_VLForConditionalGeneration(cfg).float()
    n_img_tok = sum(t * h * w for t, h, w in grids) // 4
    ids = [model_cfg.vision_start_token_id] + [model_cfg.image_token_id] * n_img_tok + \
        [model_cfg.vision_end_token_id] + list(range(100, 100 + text_len))
    input_ids = torch.tensor([ids])
    n_patch = sum(t * h * w for t, h, w in grids)
    pv = torch.randn(n_patch, 3 * 2 * 14 * 14)
    with FlopCounterMode(display=False) as fc:
        out = model(input_ids=input_ids, pixel_values=pv,
                    image_grid_thw=torch.tensor(grids), labels=input_ids)
        out.loss.backward()
    return fc.get_total_flops(), len(ids)


def test_flops_match_torch_flop_counter_on_hf_model(tiny_model_cfg):
    grids = [(1, 12, 20), (1, 8, 8)]  # partial windows + a second image
    measured, seqlen = _hf_flops(tiny_model_cfg, grids, text_len=37)
    ours = train_step_flops(tiny_model_cfg, [seqlen], grids, freeze=(), causal=False)
    # FlopCounterMode also counts the LLM rotary's tiny position matmul (<1e-4 of the total).
    assert ours.total == pytest.approx(measured, rel=2e-4)
    assert ours.vision > 0 and ours.merger > 0 and ours.llm > 0


def test_flops_frozen_components_by_hand(tiny_model_cfg):
    m = tiny_model_cfg
    full = train_step_flops(m, [100], [], freeze=())
    frozen = train_step_flops(m, [100], [], freeze=("vision", "merger", "llm"))
    # Nothing trains: forward only = 1/3 of forward + 2x backward.
    assert frozen.llm == pytest.approx(full.llm / 3)
    # LLM frozen but the vision side trains: activation grads only (matmul bwd 1x, attn 2x).
    llm_mm, llm_attn = llm_forward_flops(m, [100])
    act_only = train_step_flops(m, [100], [], freeze=("llm",))
    assert act_only.llm == pytest.approx(2 * llm_mm + 3 * llm_attn)
    # Vision frozen, LLM training: vision is forward only (no grads flow into it).
    g = [(1, 8, 8)]
    a = train_step_flops(m, [16 + 2], g, freeze=("vision", "merger"))
    b = train_step_flops(m, [16 + 2], g, freeze=())
    assert a.llm == pytest.approx(b.llm)
    assert a.merger == pytest.approx(b.merger / 3)


class _FakeVL(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.vision_model = torch.nn.Module()
        self.vision_model.blocks = torch.nn.Linear(2, 3)          # 9 params
        self.vision_model.merger = torch.nn.Linear(3, 4)          # 16 params
        self.language_model = torch.nn.Linear(4, 5)               # 25 params


def test_freeze_groups_by_prefix():
    m = _FakeVL()
    counts = freeze_modules(m, ["vision"])
    assert counts == {"trainable": 41, "frozen": 9}
    assert not m.vision_model.blocks.weight.requires_grad
    assert m.vision_model.merger.weight.requires_grad and m.language_model.weight.requires_grad
    m = _FakeVL()
    assert freeze_modules(m, ["vision", "merger"]) == {"trainable": 25, "frozen": 25}
    m = _FakeVL()
    assert freeze_modules(m, ["llm"]) == {"trainable": 25, "frozen": 25}
    with pytest.raises(ValueError, match="train.freeze"):
        freeze_modules(_FakeVL(), ["encoder"])
