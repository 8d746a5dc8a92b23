"""ovlt's torch._scaled_mm FP8 linears vs an exact fp32 emulation of the same quantization
(CPU), and the FP8 spec end to end on the tiny model."""
import contextlib

import pytest
import torch

from ovlt.fp8.linear import E4M3, E5M2, fp8_linear, quantize


def _dq(t, dtype, dim=None):
    """Quantize-dequantize in fp32 (the independent reference), own implementation."""
    fmax = torch.finfo(dtype).max
    amax = t.abs().amax() if dim is None else t.abs().amax(dim=dim, keepdim=True)
    scale = fmax / amax
    return (t * scale).clamp(-fmax, fmax).to(dtype).float() / scale


def test_quantize_roundtrip_and_scales():
    t = torch.tensor([[1.0, -2.0, 448.0 * 4], [0.5, 0.25, -0.125]])
    q, s = quantize(t, E4M3)
    assert q.dtype == E4M3 and s.shape == ()
    assert float(s) == pytest.approx(4.0)  # amax 1792 / 448
    q, s = quantize(t, E4M3, dim=1)
    assert s.shape == (2, 1) and float(s[1]) == pytest.approx(0.5 / 448)
    assert torch.allclose(q.float() * s, t, rtol=0.07)


def _cpu_takes_rowwise_scales() -> bool:
    """Whether this torch's CPU `_scaled_mm` takes row-wise scales (torch 2.11's CPU backend
    takes per-tensor ones only; ovlt's row-wise GEMM then falls back to per-tensor scales,
    tested on its own below)."""
    a = torch.zeros(16, 16).to(E4M3)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16),
                         out_dtype=torch.bfloat16)
        return True
    except RuntimeError:
        return False


ROWWISE = pytest.param(True, id="rowwise", marks=pytest.mark.skipif(
    not _cpu_takes_rowwise_scales(), reason="this torch's CPU _scaled_mm has no row-wise scales"))


@pytest.mark.parametrize("rowwise", [pytest.param(False, id="tensor"), ROWWISE])
@pytest.mark.parametrize("grad", ["e5m2", "e4m3"])
def test_fp8_linear_matches_emulation(rowwise, grad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 19, 64, generator=g).requires_grad_()   # 38 tokens: exercises padding
    w = torch.randn(48, 64, generator=g).requires_grad_()
    b = torch.randn(48, generator=g).requires_grad_()
    gy = torch.randn(2, 19, 48, generator=g)
    y = fp8_linear(x, w, b, rowwise=rowwise, grad_format=grad)
    y.backward(gy)
    gdt = E5M2 if grad == "e5m2" else E4M3
    x2, g2 = x.detach().reshape(-1, 64), gy.reshape(-1, 48)
    d = 1 if rowwise else None
    y_ref = _dq(x2, E4M3, d) @ _dq(w.detach(), E4M3, d).t() + b.detach()
    dx_ref = _dq(g2, gdt, d) @ _dq(w.detach(), E4M3, 0 if rowwise else None)
    dw_ref = _dq(g2.t(), gdt, d) @ _dq(x2, E4M3, 0 if rowwise else None)
    for got, ref in ((y.detach().reshape(-1, 48), y_ref), (x.grad.reshape(-1, 64), dx_ref),
                     (w.grad, dw_ref)):
        assert (got - ref).abs().max().item() < 1e-4 * ref.abs().max().item()
    assert torch.allclose(b.grad, g2.sum(0), atol=1e-5)
    # and FP8 is a real approximation of the fp32 GEMM: close, but not equal
    exact = x2 @ w.detach().t() + b.detach()
    rel = ((y.detach().reshape(-1, 48) - exact).norm() / exact.norm()).item()
    assert 1e-3 < rel < 0.08


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_fp8_linear_bf16_bias_rounds_once(dev):
    """bf16 per-tensor FP8 linear with a bias (the LLM's QKV): the bias is added in fp32 with
    the GEMM's result and rounded to bf16 once (cuBLASLt's epilogue), and db is the token sum."""
    g = torch.Generator().manual_seed(5)

    def make(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).bfloat16().to(dev).requires_grad_()
    x, w, b = make(37, 64), make(48, 64), make(48, scale=4.0)
    gy = torch.randn(37, 48, generator=g).bfloat16().to(dev)
    y = fp8_linear(x, w, b)
    y.backward(gy)
    ref = _dq(x.detach().float(), E4M3) @ _dq(w.detach().float(), E4M3).t() + b.detach().float()
    ulp = torch.finfo(torch.bfloat16).eps * ref.abs()
    # the GEMM sums in its own order and, on Hopper tensor cores, with ~14-bit FP8 partial
    # sums between fp32 promotions: slack of 1e-4 of the output scale (a bf16 ulp is 8e-3)
    err = (y.detach().float() - ref).abs() - 1e-4 * ref.abs().max()
    assert y.dtype == torch.bfloat16 and (err <= ulp).all(), (err / ulp).max()
    half = (err <= ulp / 2).float().mean()
    assert half > 0.99, half  # one rounding: within half an ulp (a second one: up to one)
    assert torch.allclose(b.grad.float(), gy.float().sum(0), rtol=1e-2, atol=1e-2)


def test_fp8_spec_builds_and_tracks_fp32(tiny_hf_dir):
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from ovlt.config import ParallelConfig
    from ovlt.distributed import destroy_distributed, init_distributed
    from ovlt.models.qwen2_5_vl import parity
    from ovlt.models.qwen2_5_vl.hf_config import from_hf_config
    from ovlt.models.qwen2_5_vl.provider import build_model, load_hf_weights
    init_distributed(ParallelConfig())
    try:
        outs = {}
        for fp8 in ("none", "scaled_mm_tensor", "scaled_mm_delayed", "scaled_mm_rowwise"):
            cfg = from_hf_config(tiny_hf_dir)
            cfg.params_dtype, cfg.transformer_impl, cfg.fp8 = "fp32", "local", fp8
            model = build_model(cfg).eval()
            load_hf_weights(model, tiny_hf_dir)
            qkv = model.language_model.decoder.layers[0].self_attention.linear_qkv
            assert isinstance(qkv, ColumnParallelLinear)
            assert ("Fp8" in type(qkv).__name__) == (fp8 != "none")
            batch = parity.make_batch(cfg, images=1)
            outs[fp8] = parity.mcore_logits(model, batch, cfg)
        ref = outs["none"]
        for k in ("scaled_mm_tensor", "scaled_mm_delayed", "scaled_mm_rowwise"):
            rel = ((outs[k] - ref).norm() / ref.norm()).item()
            assert 1e-4 < rel < 0.1, (k, rel)
    finally:
        destroy_distributed()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton kernel)")
def test_cast_transpose_kernel_bitwise():
    from ovlt.fp8.cast import cast_transpose
    x = torch.randn(1000, 777, device="cuda", dtype=torch.bfloat16)
    for src in (x, x[:, ::3], x.t()):
        for dt in (E4M3, E5M2):
            q, qt, dq = cast_transpose(src, dt, True, True)
            fmax = torch.finfo(dt).max
            ref = (src.float() * (fmax / src.float().abs().max())).clamp(-fmax, fmax).to(dt)
            assert torch.equal(q.view(torch.uint8), ref.view(torch.uint8))
            assert torch.equal(qt.view(torch.uint8), ref.t().contiguous().view(torch.uint8))


def test_fp8_linear_falls_back_where_dims_are_not_multiples_of_16():
    """Qwen2.5-VL's vision MLP (3420 wide) can't go through torch._scaled_mm: such a layer
    must compute exactly what the plain linear does; a 16-aligned one must not."""
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer import TransformerConfig
    from ovlt.config import ParallelConfig
    from ovlt.distributed import destroy_distributed, init_distributed
    from ovlt.fp8.linear import fp8_linear_classes
    init_distributed(ParallelConfig())
    try:
        tcfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
                                 use_cpu_initialization=True)
        fp8_col, _ = fp8_linear_classes("scaled_mm_tensor")
        x = torch.randn(5, 1, 64, generator=torch.Generator().manual_seed(1))
        for out, fp8_used in ((24, False), (32, True)):
            kw = dict(config=tcfg, init_method=torch.nn.init.normal_, bias=True,
                      gather_output=False)
            plain, f8 = ColumnParallelLinear(64, out, **kw), fp8_col(64, out, **kw)
            f8.load_state_dict(plain.state_dict())
            y_plain, y_f8 = plain(x)[0], f8(x)[0]
            assert torch.equal(y_plain, y_f8) == (not fp8_used), out
            assert ((y_plain - y_f8).norm() / y_plain.norm()).item() < 0.08  # FP8-close
    finally:
        destroy_distributed()


def test_fp8_wgrad_into_main_grad_matches_emulation():
    """With mcore's main_grad contract the per-tensor dW GEMM overwrites a freshly zeroed
    main_grad (fp32, no bf16 rounding), then accumulates on the next micro-batch, sets
    grad_added_to_main_grad and hands back a placeholder grad."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 64, generator=g).bfloat16()
    w = torch.randn(48, 64, generator=g).bfloat16().requires_grad_()
    w.main_grad = torch.zeros(48, 64)
    w.grad_added_to_main_grad = False
    gys = [torch.randn(37, 48, generator=g).bfloat16() for _ in range(2)]
    x2 = torch.nn.functional.pad(x.float(), (0, 0, 0, 11))  # the 16-row padding is zeros
    for i, gy in enumerate(gys):
        fp8_linear(x, w, wgrad_into_main_grad=True).backward(gy)
        assert w.grad_added_to_main_grad and w.grad is not None  # placeholder: the hook fires
        w.grad = None
        g2 = torch.nn.functional.pad(gy.float(), (0, 0, 0, 11))
        dw_ref = _dq(g2.t(), E5M2) @ _dq(x2, E4M3)
        if i == 0:  # fp32 straight out of the GEMM
            assert (w.main_grad - dw_ref).abs().max() < 1e-4 * dw_ref.abs().max()
            first = dw_ref
        else:       # + the second micro-batch's dW, rounded to bf16 once
            # (to one bf16 rounding of the second dW: the GEMM and the emulation may round a
            # value near a bf16 tie differently)
            ref = first + dw_ref.bfloat16().float()
            assert (w.main_grad - ref).abs().max() < 2 ** -8 * dw_ref.abs().max()
    # without main_grad the same layer returns dW to autograd (bf16) as before
    w2 = w.detach().clone().requires_grad_()
    fp8_linear(x, w2, wgrad_into_main_grad=True).backward(gys[0])
    assert w2.grad.dtype == torch.bfloat16 and torch.allclose(w2.grad.float(), first, rtol=1e-2,
                                                              atol=1e-2 * first.abs().max())


@contextlib.contextmanager
def _tiny_fp8_sft(tmp_path):
    """The tiny SFT job with delayed-scaling FP8 (gloo): (config, the micro-batches of its first
    4 steps, one random init to build same-init models from)."""
    import itertools

    from megatron.core import parallel_state as ps

    from ovlt.config import load_config
    from ovlt.distributed import destroy_distributed, init_distributed
    from ovlt.sft.data import Position, SFTStream, build_sft_dataset
    from tests.sft_testlib import TINY_SFT, base_overrides, init_state, make_synth

    cfg = load_config(TINY_SFT, base_overrides(make_synth(tmp_path, n=16), "/nonexistent",
                                               **{"model.fp8": "scaled_mm_delayed",
                                                  "sft.optimizer.lr": 1e-3}))
    init_distributed(cfg.parallel, seed=7)
    try:
        stream = SFTStream(build_sft_dataset(cfg.data), 4, 512, ps.get_data_parallel_rank(),
                           ps.get_data_parallel_world_size(), seed=0, num_workers=0)
        got = [mbs for _, mbs in itertools.islice(stream.iterate(Position()), 4)]
        yield cfg, got, init_state(cfg)
    finally:
        destroy_distributed()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="CPU/gloo reference run (the tiny config pins gloo); on a GPU the fused "
                           "wgrad runs in benchmarks/sft_throughput.py")
def test_fp8_wgrad_fusion_under_mcore_ddp(tmp_path):
    """The tiny bf16 FP8 model (delayed scaling: attention through the FP8 linears, the MLP
    through the fused FP8 SwiGLU MLP) under mcore DDP + DistributedOptimizer, two micro-batches
    per step: with dW written into main_grad (the CUDA fast-path setting) the steps match the
    DDP-hook path (no lost or double-counted micro-batch)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from ovlt.fp8.mlp import Fp8SwiGLUMLP
    from ovlt.engine.optimizer import build_optimizer
    from ovlt.sft.train import sft_forward, sft_loss
    from ovlt.engine.train_step import train_step
    from tests.sft_testlib import model_from

    with _tiny_fp8_sft(tmp_path) as (cfg, got, base):
        steps = [got[0] + got[1], got[2] + got[3]]  # >= 2 micro-batches per step
        runs = {}
        for fused in (False, True):
            model, bundle = model_from(cfg, base)
            n = 0
            for mod in model.modules():
                if isinstance(mod, (ColumnParallelLinear, RowParallelLinear)) and \
                        "Fp8" in type(mod).__name__ and mod.weight.requires_grad:
                    mod.gradient_accumulation_fusion = fused
                    n += 1
            assert n >= 8
            fused_mlps = [m for m in model.modules()
                          if isinstance(m, Fp8SwiGLUMLP) and m.fused_ok(None)]
            assert len(fused_mlps) >= 2  # the LLM's MLPs (the vision tower's have biases)
            opt = build_optimizer(bundle.chunks, cfg.sft.optimizer, "bf16")
            runs[fused] = [train_step(bundle.chunks, opt, mbs, sft_forward, sft_loss)
                           for mbs in steps]
        for a, b in zip(runs[False], runs[True]):
            assert abs(a.loss - b.loss) < 2e-3 * abs(a.loss), (a.loss, b.loss)
            # dW rounded to bf16 (hook path) vs fp32 (fused): the norms agree to bf16 rounding,
            # a dropped or doubled micro-batch would be far off
            assert abs(a.grad_norm - b.grad_norm) < 5e-3 * a.grad_norm, (a.grad_norm, b.grad_norm)


def _hist_casts(mode, monkeypatch, tensors, length):
    if mode == "triton_interpret":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from ovlt.fp8.cast import AmaxHistory, cast_transpose
    dev = "cuda" if mode == "cuda" else "cpu"
    h = AmaxHistory(length, dev)
    outs = [cast_transpose(t.to(dev), E4M3, True, True, history=h) for t in tensors]
    return [tuple(o.cpu() for o in out) for out in outs], h


@pytest.mark.parametrize("mode", [
    "torch", "triton_interpret",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs CUDA"))])
def test_delayed_scaling_uses_the_amax_history(monkeypatch, mode):
    """Cast k's scale comes from the amaxes of casts k-L+2 .. k-1 (cast 0: its own); a value
    above the history's range saturates at the format max; the history holds each amax."""
    g = torch.Generator().manual_seed(5)
    amaxes = [3.0, 1.0, 0.5, 8.0, 0.25, 0.25, 0.25]
    ts = []
    for a in amaxes:
        t = torch.rand(70, 90, generator=g) * 0.9 * a
        t[3, 7] = -a  # the exact amax
        ts.append(t.bfloat16())
    L = 4
    outs, h = _hist_casts(mode, monkeypatch, ts, L)
    fmax = torch.finfo(E4M3).max
    for k, ((q, qt, dq), t) in enumerate(zip(outs, ts)):
        used = amaxes[0] if k == 0 else max(amaxes[max(0, k - (L - 2)):k])
        scale = fmax / torch.tensor(used)  # torch: fmax * (1 / used), as the casts do
        assert float(dq) == float(scale.reciprocal()), (k, float(dq), used)
        ref = (t.float() * scale).clamp(-fmax, fmax).to(E4M3)
        same = q.view(torch.uint8) == ref.view(torch.uint8)
        assert torch.equal(qt.view(torch.uint8), q.t().contiguous().view(torch.uint8)), k
        if mode == "triton_interpret":
            # Triton's interpreter rounds fp32 -> fp8 without carrying a mantissa overflow into
            # the exponent (0.4989 -> 0.25); compiled kernels round like torch (checked on CUDA)
            assert same.float().mean() > 0.95, k
        else:
            assert same.all(), k
        if amaxes[k] > used:  # cast 3 (amax 8 after 1, 0.5): saturated, not overflowed
            assert float(q.float().abs().max()) == fmax
    # slots: cast 6 wrote slot 2, zeroed slot 3; slots 0, 1 hold casts 4 and 5
    assert h.amaxes().tolist() == [0.25, 0.25, 0.25, 0.0] and h.calls == len(ts)


def test_delayed_fp8_linear_matches_emulation():
    """Two steps of a delayed-scaling FP8 linear: the second uses the first step's amaxes of
    X, W and the output gradient (not its own), against an fp32 emulation."""
    from ovlt.fp8.cast import AmaxHistory
    g = torch.Generator().manual_seed(9)
    w = torch.randn(48, 64, generator=g).requires_grad_()
    hist = tuple(AmaxHistory(8, "cpu") for _ in range(3))
    xs = [torch.randn(32, 64, generator=g) * s for s in (1.0, 0.5)]
    gys = [torch.randn(32, 48, generator=g) * s for s in (2.0, 1.0)]

    def dq_with(t, dtype, amax):
        fmax = torch.finfo(dtype).max
        scale = fmax / amax
        return (t * scale).clamp(-fmax, fmax).to(dtype).float() / scale

    for step, (x, gy) in enumerate(zip(xs, gys)):
        x = x.requires_grad_()
        w.grad = None
        y = fp8_linear(x, w, histories=hist)
        y.backward(gy)
        # step 0 scales by its own amaxes, step 1 by step 0's
        ax, aw, ag = (t.abs().max() for t in (xs[0], w.detach(), gys[0]))
        y_ref = dq_with(x.detach(), E4M3, ax) @ dq_with(w.detach(), E4M3, aw).t()
        dx_ref = dq_with(gy, E5M2, ag) @ dq_with(w.detach(), E4M3, aw)
        dw_ref = dq_with(gy, E5M2, ag).t() @ dq_with(x.detach(), E4M3, ax)
        for got, ref in ((y.detach(), y_ref), (x.grad, dx_ref), (w.grad, dw_ref)):
            assert (got - ref).abs().max() < 1e-4 * ref.abs().max(), step
    assert [h.calls for h in hist] == [2, 2, 2]
    with pytest.raises(ValueError, match="per tensor"):
        fp8_linear(xs[0], w, rowwise=True, histories=hist)
    from ovlt.fp8.cast import AmaxHistory as AH
    with pytest.raises(ValueError, match=">= 3"):
        AH(2, "cpu")


def test_rowwise_gemm_falls_back_to_per_tensor_scales(monkeypatch, caplog):
    """Where `_scaled_mm` refuses row-wise scales for a dtype pair, the row-wise linear runs
    that GEMM with per-tensor scales (the per-tensor recipe's numbers), says so once, and does
    not try row-wise again for that pair."""
    from ovlt.fp8 import linear as F8
    real, tried = torch._scaled_mm, []

    def per_tensor_only(a, b, scale_a, scale_b, **kw):
        tried.append(scale_a.numel() > 1)
        if scale_a.numel() > 1 or scale_b.numel() > 1:
            raise RuntimeError("only per-tensor scaling here")
        return real(a, b, scale_a=scale_a, scale_b=scale_b, **kw)
    monkeypatch.setattr(torch, "_scaled_mm", per_tensor_only)
    monkeypatch.setattr(F8, "ROWWISE_FALLBACK", set())
    g = torch.Generator().manual_seed(4)
    x = torch.randn(32, 64, generator=g)
    w = torch.randn(48, 64, generator=g)
    with caplog.at_level("WARNING"):
        got = F8.rowwise_mm(x, E4M3, w.t(), torch.float32)
        again = F8.rowwise_mm(x, E4M3, w.t(), torch.float32)
    assert tried == [True, False, False]  # one refused row-wise try, then per tensor only
    ref = _dq(x, E4M3) @ _dq(w, E4M3).t()
    assert (got - ref).abs().max() < 1e-4 * ref.abs().max() and torch.equal(got, again)
    assert sum("unsupported" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("rowwise", [pytest.param(False, id="tensor"), ROWWISE])
def test_fast_accumulation_only_in_the_forward_gemm(monkeypatch, rowwise):
    """`fprop_fast_accum` reaches the forward GEMM only: the dgrad and wgrad GEMMs keep fp32
    promotion of their partial sums (TE's recipes do the same)."""
    calls = []
    real = torch._scaled_mm

    def spy(*a, **kw):
        calls.append(kw.get("use_fast_accum", False))
        return real(*a, **kw)
    monkeypatch.setattr(torch, "_scaled_mm", spy)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 64, generator=g).requires_grad_()
    w = torch.randn(48, 64, generator=g).requires_grad_()
    for fast in (True, False):
        calls.clear()
        y = fp8_linear(x, w, rowwise=rowwise, fprop_fast_accum=fast)
        assert calls == [fast]
        y.backward(torch.randn(32, 48, generator=g))
        assert calls == [fast, False, False]


def test_fast_accumulation_follows_the_model_config(monkeypatch):
    """model.fp8_fprop_fast_accum reaches the layers (default off) through the mcore config."""
    from ovlt.config import ModelConfig
    from ovlt.fp8 import linear as F8
    import inspect
    seen, sig = [], inspect.signature(F8.fp8_linear)

    def spy(*a, **kw):
        seen.append(sig.bind(*a, **kw).arguments["fprop_fast_accum"])
        return a[0]
    monkeypatch.setattr(F8, "fp8_linear", spy)
    assert ModelConfig().fp8_fprop_fast_accum is False
    col, _ = F8.fp8_linear_classes("scaled_mm_tensor")
    layer = col.__new__(col)
    for flag in (True, False):
        layer.config = type("C", (), {"ovlt_fp8_fprop_fast_accum": flag})()
        layer._forward_impl(torch.zeros(4, 16), torch.zeros(16, 16))
    assert seen == [True, False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLASLt fast accumulation: CUDA")
def test_fast_accumulation_on_cuda_stays_within_fp8_error():
    """On the GPU the fast-accumulation forward differs from the promoted one by far less than
    the FP8 rounding of its inputs (K = 3584, a 7B layer's width)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(512, 3584, device="cuda", generator=g, dtype=torch.bfloat16)
    w = torch.randn(1024, 3584, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    exact = x.float() @ w.float().t()
    fast = fp8_linear(x, w, fprop_fast_accum=True).float()
    slow = fp8_linear(x, w, fprop_fast_accum=False).float()
    quant = ((slow - exact).norm() / exact.norm()).item()
    assert 1e-3 < quant < 0.08  # the FP8 inputs' own error
    assert ((fast - slow).norm() / exact.norm()).item() < 0.25 * quant


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="CPU/gloo reference run (the tiny config pins gloo)")
def test_fp8_weight_cache_casts_each_weight_once_per_step(tmp_path):
    """`fp8_weight_cache` (the trainer's step): each trained FP8 weight is cast once per
    optimizer step, however many micro-batches; with one micro-batch per step that is the same
    cast as without the cache, so training is bit for bit the same; with two, the weight
    histories record one cast per step instead of two and the losses stay FP8-close. Nothing
    FP8 is held after the step."""
    from ovlt.fp8.linear import Fp8LinearMixin
    from ovlt.engine.optimizer import build_optimizer
    from ovlt.sft.train import sft_forward, sft_loss
    from ovlt.engine.train_step import train_step
    from tests.sft_testlib import model_from

    with _tiny_fp8_sft(tmp_path) as (cfg, got, base):
        def run(cache: bool, steps):
            cfg.model.fp8_weight_cache = cache
            model, bundle = model_from(cfg, base)
            linears = [m for m in model.modules()
                       if isinstance(m, Fp8LinearMixin) and m.weight.requires_grad]
            assert len(linears) >= 8 and all(m.fp8_cacheable() == cache for m in linears)
            opt = build_optimizer(bundle.chunks, cfg.sft.optimizer, "bf16")
            res = [train_step(bundle.chunks, opt, mbs, sft_forward, sft_loss) for mbs in steps]
            assert all(m.fp8_step_cast is None for m in linears)  # released after the step
            weight_casts = {m.fp8_histories[1].calls for m in linears}
            params = [p.detach().clone() for p in model.parameters() if p.requires_grad]
            # frozen FP8 weights (the vision tower): cast once from their own amax and kept
            # with the cache (their history unused), once per forward without it
            frozen = [m for m in model.modules() if isinstance(m, Fp8LinearMixin)
                      and not m.weight.requires_grad and m.fp8_histories is not None]
            casts = [m.fp8_histories[1].calls for m in frozen]
            assert len(frozen) >= 4
            if cache:
                assert set(casts) == {0} and all(m.fp8_frozen_cast for m in frozen)
            else:
                assert min(casts) == len(steps) * len(steps[0])
            return res, weight_casts, params

        one_mb = [got[0][:1], got[1][:1], got[2][:1]]
        (a, ca, pa), (b, cb, pb) = run(False, one_mb), run(True, one_mb)
        assert ca == cb == {3}
        assert [r.loss for r in a] == [r.loss for r in b]
        assert [r.grad_norm for r in a] == [r.grad_norm for r in b]
        assert all(torch.equal(x, y) for x, y in zip(pa, pb))

        two_mb = [got[0][:1] + got[1][:1], got[2][:1] + got[3][:1]]
        assert all(len(s) == 2 for s in two_mb)
        (a, ca, _), (b, cb, _) = run(False, two_mb), run(True, two_mb)
        assert ca == {4} and cb == {2}  # one weight cast per micro-batch vs per step
        for x, y in zip(a, b):
            assert abs(x.loss - y.loss) < 2e-3 * abs(x.loss), (x.loss, y.loss)


def test_frozen_weight_cast_is_kept_until_the_weight_changes():
    """A frozen FP8 weight is cast once and that cast reused (the bytes a new cast would give);
    an in-place change of the weight (a checkpoint load copies into it) or a transpose that the
    kept cast lacks makes a new one; trained weights and `fp8_weight_cache=false` keep none."""
    import types

    from ovlt.fp8 import linear as F8

    class Linear(F8.Fp8LinearMixin):
        fp8_delayed = True

        def __init__(self, w, cache=True):
            self.weight = torch.nn.Parameter(w, requires_grad=False)
            self.config = types.SimpleNamespace(ovlt_fp8_amax_history=4,
                                                ovlt_fp8_weight_cache=cache)

    g = torch.Generator().manual_seed(6)
    lin = Linear(torch.randn(32, 48, generator=g))
    first = lin.cached_weight_cast(lin.weight)
    assert first[1] is None  # no transpose asked for
    assert lin.cached_weight_cast(lin.weight) is first  # kept: no second cast
    # the bytes of the delayed recipe's casts of this weight, first and later ones
    hist = F8.AmaxHistory(4, "cpu")
    for _ in range(3):
        fresh = F8.weight_cast(lin.weight, hist, False)
        assert torch.equal(first[0].view(torch.uint8), fresh[0].view(torch.uint8))
        assert torch.equal(first[2], fresh[2])
    with_t = lin.cached_weight_cast(lin.weight, need_qt=True)  # now with its transpose
    assert with_t is not first and torch.equal(with_t[1].view(torch.uint8),
                                               with_t[0].view(torch.uint8).t())
    assert torch.equal(with_t[0].view(torch.uint8), first[0].view(torch.uint8))
    with torch.no_grad():
        lin.weight.copy_(torch.randn(32, 48, generator=g) * 3)  # what load_state_dict does
    new = lin.cached_weight_cast(lin.weight)
    # re-cast with the new weight's own amax (3x the old one): nothing saturated
    assert new is not with_t and float(new[2]) == pytest.approx(3 * float(first[2]), rel=0.3)
    assert float(new[0].float().abs().max() * new[2]) == pytest.approx(
        float(lin.weight.abs().max()), rel=1e-2)
    err = (new[0].float() * new[2] - lin.weight).abs() / lin.weight.abs().clamp(min=1e-3)
    assert float(err[lin.weight.abs() > 0.05].max()) < 0.07  # e4m3's relative step
    trained = Linear(torch.randn(16, 16, generator=g))
    trained.weight.requires_grad_(True)
    assert trained.cached_weight_cast(trained.weight) is None
    off = Linear(torch.randn(16, 16, generator=g), cache=False)
    assert off.cached_weight_cast(off.weight) is None
