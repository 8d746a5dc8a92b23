"""ovlt's torch._scaled_mm FP8 linears vs an exact fp32 emulation of the same quantization
(CPU), and the FP8 spec end to end on the tiny model."""
import pytest
import torch

from ovlt.models.qwen2_5_vl.fp8 import E4M3, E5M2, fp8_linear, quantize


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


@pytest.mark.parametrize("rowwise", [False, True], ids=["tensor", "rowwise"])
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
        for fp8 in ("none", "scaled_mm_tensor", "scaled_mm_rowwise"):
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
        for k in ("scaled_mm_tensor", "scaled_mm_rowwise"):
            rel = ((outs[k] - ref).norm() / ref.norm()).item()
            assert 1e-4 < rel < 0.1, (k, rel)
    finally:
        destroy_distributed()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton kernel)")
def test_cast_transpose_kernel_bitwise():
    from ovlt.models.qwen2_5_vl.fp8_cast import cast_transpose
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
    from ovlt.models.qwen2_5_vl.fp8 import fp8_linear_classes
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
