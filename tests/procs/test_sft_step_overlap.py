"""Two pieces of the SFT step that skip work, against the step without them (tiny fp32 model,
CPU, real mcore DDP + DistributedOptimizer, 2 packed micro-batches per step):
- gradient buffers: the transformer layers' weights overwrite their main_grad on their first
  gradient of a step (the wgrad GEMM, `TorchWgradAccum` patched into mcore as on a GPU), and so
  does the SFT loss for the LM head (`mark_head_overwrites`, dW written in the forward), so
  `grad_routing.zero_grad_buffers` leaves their slices unzeroed — poisoned with NaN here;
- the frozen vision tower run one step ahead (`train_step(prefetch=...)`)."""
import itertools

import torch

from tests.dist_utils import run_distributed
from tests.sft_testlib import TINY_SFT, base_overrides, init_state, make_synth, model_from


def _setup(sft_file):
    from megatron.core import parallel_state as ps

    from ovlt.config import load_config
    from ovlt.distributed import init_distributed
    from ovlt.sft.data import Position, SFTStream, build_sft_dataset

    cfg = load_config(TINY_SFT, base_overrides(sft_file, "/nonexistent",
                                               **{"sft.optimizer.lr": 1e-3,
                                                  "data.pack_tokens": 256,
                                                  # an untied LM head, as 7B's
                                                  "model.tie_word_embeddings": False}))
    init_distributed(cfg.parallel, seed=3)
    stream = SFTStream(build_sft_dataset(cfg.data), 4, 256, ps.get_data_parallel_rank(),
                       ps.get_data_parallel_world_size(), seed=0, num_workers=0)
    batches = [mbs for _, mbs in itertools.islice(stream.iterate(Position()), 3)]
    assert all(len(mbs) >= 2 for mbs in batches)  # accumulation over micro-batches is exercised
    assert all(mbs[0].pixel_values is not None for mbs in batches)
    return cfg, batches


def _grad_buffer_worker(rank, world, sft_file):
    from megatron.core.tensor_parallel import layers

    from ovlt.compat.cuda_fastpaths import TorchWgradAccum, switch_wgrad_fusion
    from ovlt.engine import grad_routing
    from ovlt.engine.optimizer import build_optimizer
    from ovlt.sft.train import mark_head_overwrites, sft_forward, sft_loss
    from ovlt.engine.train_step import train_step

    cfg, batches = _setup(sft_file)
    base = init_state(cfg, "fp32")
    runs = {}
    for fused in (False, True):
        model, bundle = model_from(cfg, base, "fp32")
        opt = build_optimizer(bundle.chunks, cfg.sft.optimizer, "fp32")
        ddp = bundle.chunks[0]
        if fused:
            old = (getattr(layers, "fused_weight_gradient_mlp_cuda", None),
                   layers._grad_accum_fusion_available)
            layers.fused_weight_gradient_mlp_cuda = TorchWgradAccum
            layers._grad_accum_fusion_available = True
            n = switch_wgrad_fusion(model, (torch.float32,))
            # the LM head's dW into main_grad from the SFT loss, as the CUDA fast paths set it
            head = model.language_model.output_layer.weight
            grad_routing.set_writer(head, grad_routing.Writer.LOSS_KERNEL)
            _ = grad_routing.zero_views(ddp)  # a cache built before the mark is dropped
            assert mark_head_overwrites(bundle.chunks) == 1
            marked = [p for p in ddp.params_with_grad if grad_routing.route(p).overwrites]
            # the 4 linears of every LLM layer (switch_wgrad_fusion) and the head (SFT's mark)
            assert n >= len(marked) - 1 == 4 * cfg.model.num_layers
            assert any(p is head for p in marked)
            # garbage in every slice the step does not zero: the overwrite must replace it
            for p in marked:
                p.main_grad.fill_(float("nan"))
            zeroed = sum(v.numel() for v in grad_routing.zero_views(ddp))
            total = sum(b.grad_data.numel() for b in ddp.buffers)
            assert zeroed == total - sum(p.numel() for p in marked)
        out = []
        try:
            for mbs in batches:
                r = train_step(bundle.chunks, opt, mbs, sft_forward, sft_loss)
                out.append((r.loss, r.grad_norm))
                if fused:  # poison again for the next step
                    for p in marked:
                        p.main_grad.fill_(float("nan"))
        finally:
            if fused:
                layers.fused_weight_gradient_mlp_cuda, layers._grad_accum_fusion_available = old
        runs[fused] = (out, {k: v.clone() for k, v in model.state_dict().items() if k in base})
    for (la, ga), (lb, gb) in zip(runs[False][0], runs[True][0]):
        assert abs(la - lb) < 1e-5 * abs(la), (la, lb)
        assert abs(ga - gb) < 1e-4 * ga, (ga, gb)
    pa, pb = runs[False][1], runs[True][1]
    moved = 0
    # atol 1 % of the lr (1e-3): Adam moves an element whose gradient cancels to ~eps by a
    # fraction of the lr that depends on the gradient's summation order (fused vs unfused dW);
    # seen: one of 128 QKV-bias elements 1.05e-6 apart after 3 steps on a fresh install
    for k in pa:
        assert torch.allclose(pa[k], pb[k], rtol=1e-4, atol=1e-5), k
        moved += int(not torch.equal(pb[k], base[k]))
    assert moved > 10

    # a marked weight that gets no gradient in a step is zeroed before the reduction
    p = marked[0]
    p.main_grad.fill_(float("nan"))
    p.grad_added_to_main_grad = False
    grad_routing.zero_unwritten([ddp])
    assert torch.equal(p.main_grad, torch.zeros_like(p.main_grad))

    # main_grad knows its weight only weakly: a strong reference made a weight <-> main_grad
    # cycle through tensor attributes that the GC cannot see through (DDP's grad accumulators
    # hold the weight in C++), and a dropped model stayed in GPU memory
    import gc
    import weakref
    assert all(grad_routing.weight_of(q.main_grad) is q for q in marked)
    w = torch.nn.Parameter(torch.zeros(3))
    w.main_grad = mg = torch.zeros(3)
    grad_routing.mark_overwrites(w)
    alive = weakref.ref(w)
    del w
    gc.collect()
    assert alive() is None and grad_routing.weight_of(mg) is None
    return True


def _prefetch_worker(rank, world, sft_file):
    from ovlt.engine.optimizer import build_optimizer
    from ovlt.sft.train import sft_forward, sft_loss
    from ovlt.engine.train_step import train_step

    cfg, batches = _setup(sft_file)
    base = init_state(cfg, "fp32")
    runs = {}
    for prefetch in (False, True):
        model, bundle = model_from(cfg, base, "fp32")
        opt = build_optimizer(bundle.chunks, cfg.sft.optimizer, "fp32")
        tower = model.vision_model
        calls = []
        orig = tower.forward
        tower.forward = lambda *a, **k: calls.append(a[0].shape[0]) or orig(*a, **k)
        losses = []
        for i, mbs in enumerate(batches):
            nxt = batches[i + 1][0] if prefetch and i + 1 < len(batches) else None
            before = len(calls)
            losses.append(train_step(bundle.chunks, opt, mbs, sft_forward, sft_loss,
                                     prefetch=nxt).loss)
            ran = len(calls) - before
            # the step runs the tower for each micro-batch whose features were not prefetched,
            # plus once for the next step's first micro-batch
            expect = len(mbs) - (1 if prefetch and i > 0 else 0) + (nxt is not None)
            assert ran == expect, (prefetch, i, ran, expect)
            if nxt is not None:
                assert nxt.image_features.shape[0] == int(
                    (nxt.input_ids == cfg.model.image_token_id).sum())
        runs[prefetch] = (losses, {k: v.clone() for k, v in model.state_dict().items()
                                   if k in base})
        for mbs in batches:
            mbs[0].image_features = None
    assert runs[False][0] == runs[True][0]  # the same features: bit-identical steps
    for k, v in runs[False][1].items():
        assert torch.equal(v, runs[True][1][k]), k
    return True


def test_unzeroed_overwritten_grad_slices_match_full_zeroing(tmp_path):
    sft = make_synth(tmp_path / "synth", n=24)
    assert run_distributed(_grad_buffer_worker, 1, str(sft), timeout=600) == [True]


def test_prefetched_image_features_match_forward(tmp_path):
    sft = make_synth(tmp_path / "synth", n=24)
    assert run_distributed(_prefetch_worker, 1, str(sft), timeout=600) == [True]


def test_image_features_count_is_checked():
    """Prefetched features that do not match the batch's <|image_pad|> count are refused."""
    import pytest

    from ovlt.config import CONFIG_ROOT, load_config
    from ovlt.distributed import destroy_distributed, init_distributed
    from ovlt.models.qwen2_5_vl.provider import build_model
    cfg = load_config(CONFIG_ROOT / "model" / "tiny.yaml").model
    init_distributed()
    try:
        model = build_model(cfg)
        ids = torch.tensor([[1, cfg.image_token_id, cfg.image_token_id, 2]])
        with pytest.raises(ValueError, match="2 <|image_pad|> tokens .* give 3 features"):
            model._embed(ids, None, torch.tensor([[1, 2, 6]]), 2,
                         torch.zeros(3, cfg.hidden_size))
    finally:
        destroy_distributed()


def test_prefetch_only_for_a_frozen_tower_and_images():
    from ovlt.config import CONFIG_ROOT, load_config
    from ovlt.data.packing import collate, make_sample
    from ovlt.distributed import destroy_distributed, init_distributed
    from ovlt.models.qwen2_5_vl.provider import build_model
    from ovlt.engine.vision_prefetch import prefetch_image_features
    cfg = load_config(CONFIG_ROOT / "model" / "tiny.yaml").model
    init_distributed()
    try:
        model = build_model(cfg)
        ids = [cfg.vision_start_token_id] + [cfg.image_token_id] * 4 + [cfg.vision_end_token_id, 5]
        pv = torch.randn(16, 1176, generator=torch.Generator().manual_seed(0))
        with_image = collate([make_sample(ids, [0] * 7, pv, [(1, 4, 4)], id="a")])
        text_only = collate([make_sample([5, 6, 7], [0, 1, 1], id="b")])
        assert not prefetch_image_features([model], with_image)  # the tower trains
        assert with_image.image_features is None
        model.vision_model.requires_grad_(False)
        assert not prefetch_image_features([model], text_only)
        assert prefetch_image_features([model], with_image)
        with torch.no_grad():
            ref = model.vision_model(pv, torch.tensor([[1, 4, 4]]))
        assert torch.equal(with_image.image_features, ref) and ref.shape[0] == 4
    finally:
        destroy_distributed()

