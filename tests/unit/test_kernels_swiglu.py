"""ovlt.kernels.fused_swiglu against plain torch autograd on silu(g) * u (float64 reference), under
TRITON_INTERPRET=1 and on the torch path; the strided `out=` of the forward; the seam's
drop-in for mcore's `bias_swiglu_impl`; on CUDA, bf16 rounding to nearest."""
import pytest
import torch
import torch.nn.functional as F


def _ref(y, d):
    y64 = y.detach().double().requires_grad_(True)
    g, u = y64.chunk(2, dim=-1)
    out = F.silu(g) * u
    out.backward(d.double())
    return out.detach(), y64.grad


@pytest.mark.parametrize("interpret", [True, False])
@pytest.mark.parametrize("shape", [(37, 2 * 1100), (3, 5, 2 * 24)])
def test_matches_torch_fp32(monkeypatch, interpret, shape):
    if interpret:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from ovlt.kernels.swiglu import fused_swiglu
    g = torch.Generator().manual_seed(0)
    y = (torch.randn(shape, generator=g) * 3).requires_grad_(True)  # 1100 > one 1024 block
    d = torch.randn(*shape[:-1], shape[-1] // 2, generator=g)
    out = fused_swiglu(y)
    out.backward(d)
    ref, ref_grad = _ref(y, d)
    assert out.shape == ref.shape
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(y.grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("interpret", [True, False])
def test_forward_into_strided_out(monkeypatch, interpret):
    """The vision tower's K-padded fc2 input: rows of 40 columns, 37 written, the rest kept."""
    if interpret:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from ovlt.kernels.swiglu import swiglu_forward
    y = torch.randn(9, 1, 74, generator=torch.Generator().manual_seed(1))
    buf = torch.full((9, 40), 7.0)
    got = swiglu_forward(y, out=buf[:, :37])
    ref, _ = _ref(y, torch.zeros(9, 1, 37))
    assert torch.allclose(buf[:, :37].double(), ref.view(9, 37), rtol=1e-5, atol=1e-6)
    assert torch.equal(buf[:, 37:], torch.full((9, 3), 7.0))
    assert got.data_ptr() == buf.data_ptr()


def test_bf16_within_one_ulp(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from ovlt.kernels.swiglu import fused_swiglu
    g = torch.Generator().manual_seed(2)
    y = (torch.randn(64, 2 * 96, generator=g) * 2).bfloat16().requires_grad_(True)
    d = torch.randn(64, 96, generator=g).bfloat16()
    out = fused_swiglu(y)
    out.backward(d)
    ref, ref_grad = _ref(y.float(), d.float())
    # one bf16 ulp of the exact result (the CPU interpreter may truncate where the GPU rounds)
    assert ((out.double() - ref).abs() <= ref.abs() * 2.0 ** -7 + 1e-30).all()
    assert ((y.grad.double() - ref_grad).abs() <= ref_grad.abs() * 2.0 ** -7 + 1e-30).all()


def test_rejects_bad_shapes():
    from ovlt.kernels.swiglu import fused_swiglu, swiglu_backward, swiglu_forward
    with pytest.raises(ValueError, match="even"):
        fused_swiglu(torch.zeros(4, 7))
    with pytest.raises(ValueError, match="out must be"):
        swiglu_forward(torch.zeros(4, 8), out=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="does not match"):
        swiglu_backward(torch.zeros(4, 8), torch.zeros(4, 3))


def test_seam_is_mcores_swiglu():
    """`cuda_fastpaths.bias_swiglu_impl` (what mcore's MLP calls on a GPU) computes mcore's
    SwiGLU, values and gradients, on its [S, B, 2F] activations."""
    from megatron.core.fusions.fused_bias_swiglu import swiglu

    from ovlt.compat.cuda_fastpaths import bias_swiglu_impl
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(11, 2, 2 * 40, generator=gen).requires_grad_(True)
    y_ref = y.detach().clone().requires_grad_(True)
    out = bias_swiglu_impl(y, None)
    ref = swiglu.__wrapped__(y_ref) if hasattr(swiglu, "__wrapped__") else \
        F.silu(y_ref[..., :40]) * y_ref[..., 40:]
    assert out.shape == (11, 2, 40)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    d = torch.randn(out.shape, generator=gen)
    out.backward(d)
    ref.backward(d)
    assert torch.allclose(y.grad, y_ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton on the GPU)")
def test_cuda_bf16_rounds_to_nearest():
    """On the GPU the bf16 results are the fp32 results rounded to nearest: within half an ulp
    of an fp64 reference (truncation: up to one), without the -0.5 ulp mean bias that
    truncation would give."""
    from ovlt.kernels.swiglu import fused_swiglu
    g = torch.Generator(device="cuda").manual_seed(0)
    y = (torch.randn(4096, 2 * 3000, device="cuda", generator=g) * 2).bfloat16()
    d = torch.randn(4096, 3000, device="cuda", generator=g).bfloat16()
    y.requires_grad_(True)
    out = fused_swiglu(y)
    out.backward(d)
    ref, ref_grad = _ref(y.float(), d.float())
    for got, want in ((out, ref), (y.grad, ref_grad)):
        keep = want.abs() > 1e-3
        ulp = torch.exp2(torch.floor(torch.log2(want.abs())) - 7)
        err = ((got.double() - want) * want.sign() / ulp)[keep]
        # half an ulp, plus the fp32 arithmetic's own error (0.5013 seen on an H200)
        assert err.abs().max().item() <= 0.51, err.abs().max().item()
        assert abs(err.mean().item()) < 0.05, err.mean().item()
