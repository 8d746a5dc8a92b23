"""fused_nll_loss (the SFT loss on the fused LM head) vs full-logits torch cross-entropy."""
import pytest
import torch
import torch.nn.functional as F

from ovlt import kernels


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernels.config, "chunk_bytes", 3 * 4 * 300)  # several chunks


@pytest.mark.parametrize("dtype,tol_fwd,tol_grad", [(torch.float32, 1e-5, 1e-5),
                                                     (torch.bfloat16, 2e-2, 2e-2)])
def test_weighted_nll_and_grads_match_cross_entropy(dtype, tol_fwd, tol_grad):
    g = torch.Generator().manual_seed(0)
    T, H, V = 11, 16, 300
    h = torch.randn(T, H, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) / 2).to(dtype).requires_grad_()
    t = torch.randint(0, V, (T,), generator=g)
    t[3] = -100  # ignored: no loss, no gradient
    tw = torch.rand(T, generator=g)
    loss, logp = kernels.fused_nll_loss(h, w, t, tw)
    hr, wr = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ce = F.cross_entropy(hr @ wr.T, t, ignore_index=-100, reduction="none")
    ref = (ce * tw).sum()
    torch.testing.assert_close(loss, ref, atol=tol_fwd * T, rtol=tol_fwd)
    torch.testing.assert_close(logp, -ce, atol=tol_fwd * 10, rtol=tol_fwd)
    # a non-unit upstream gradient exercises the scaling of the stored gradients
    dh, dw = torch.autograd.grad(loss * 2.5, [h, w])
    rdh, rdw = torch.autograd.grad(ref * 2.5, [hr, wr])
    for got, want in ((dh, rdh), (dw, rdw)):
        assert got.dtype == dtype
        err = (got.float() - want).norm() / want.norm()
        assert err < tol_grad, f"relative gradient error {err:.2e}"
    assert dh[3].abs().max() == 0


def test_no_rows_gives_zero_loss_and_zero_grads():
    h = torch.randn(0, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=True)
    loss, _ = kernels.fused_nll_loss(h, w, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert float(loss) == 0.0 and w.grad.abs().max() == 0


def test_dw_into_main_grad_accumulates():
    """dw_into: the weight gradient lands in the fp32 running sum (mcore's main_grad) during the
    forward, across the chunks; backward flags it and still returns the input gradient."""
    g = torch.Generator().manual_seed(1)
    T, H, V = 13, 16, 300
    h = torch.randn(T, H, generator=g).requires_grad_()
    w = (torch.randn(V, H, generator=g) / 2).requires_grad_()
    t = torch.randint(0, V, (T,), generator=g)
    start = torch.randn(V, H, generator=g)
    main_grad = start.clone()
    w.grad_added_to_main_grad = False
    loss, _ = kernels.fused_nll_loss(h, w, t, dw_into=main_grad)
    dh, dw_placeholder = torch.autograd.grad(loss, [h, w])
    assert w.grad_added_to_main_grad and dw_placeholder.shape == w.shape
    hr, wr = h.detach().requires_grad_(), w.detach().requires_grad_()
    ref = F.cross_entropy(hr @ wr.T, t, reduction="sum")
    rdh, rdw = torch.autograd.grad(ref, [hr, wr])
    torch.testing.assert_close(main_grad, start + rdw, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dh, rdh, atol=1e-5, rtol=1e-5)
    # an upstream gradient other than 1 would make the early dW wrong: refused
    loss, _ = kernels.fused_nll_loss(h, w, t, dw_into=main_grad)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(loss * 2.0, [h, w])
    with pytest.raises(ValueError, match="dw_into"):
        kernels.fused_nll_loss(h, w, t, dw_into=main_grad[:10])


def test_dw_into_fresh_overwrites_stale_values_then_accumulates(monkeypatch):
    """dw_into_fresh: the first chunk replaces whatever main_grad held (NaN here, a slice the
    step did not zero), the later chunks add; a call without tokens leaves zeros."""
    from ovlt.kernels import config
    g = torch.Generator().manual_seed(2)
    T, H, V = 13, 16, 300
    h = torch.randn(T, H, generator=g).requires_grad_()
    w = (torch.randn(V, H, generator=g) / 2).requires_grad_()
    t = torch.randint(0, V, (T,), generator=g)
    hr, wr = h.detach().requires_grad_(), w.detach().requires_grad_()
    rdw, = torch.autograd.grad(F.cross_entropy(hr @ wr.T, t, reduction="sum"), [wr])
    monkeypatch.setattr(config, "chunk_bytes", 5 * V * 4)  # 5-token chunks: 3 of them
    main_grad = torch.full((V, H), float("nan"))
    w.grad_added_to_main_grad = False
    loss, _ = kernels.fused_nll_loss(h, w, t, dw_into=main_grad, dw_into_fresh=True)
    assert w.grad_added_to_main_grad  # set by the forward: a second forward must accumulate
    loss.backward()
    torch.testing.assert_close(main_grad, rdw, atol=1e-5, rtol=1e-5)
    loss, _ = kernels.fused_nll_loss(h, w, t, dw_into=main_grad)
    loss.backward()
    torch.testing.assert_close(main_grad, 2 * rdw, atol=1e-5, rtol=1e-5)
    main_grad.fill_(float("nan"))
    loss, _ = kernels.fused_nll_loss(h[:0], w, t[:0], dw_into=main_grad, dw_into_fresh=True)
    assert torch.equal(main_grad, torch.zeros_like(main_grad))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLAS bf16 x bf16 -> fp32 path")
def test_dw_into_fresh_ignores_nan_on_cuda():
    """The overwrite on the GPU (bf16 operands, fp32 main_grad, beta = 0) never reads the stale
    values: NaN in main_grad does not leak into the gradient."""
    g = torch.Generator(device="cuda").manual_seed(0)
    T, H, V = 300, 64, 1000
    h = torch.randn(T, H, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    w = torch.randn(V, H, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    t = torch.randint(0, V, (T,), device="cuda", generator=g)
    main_grad = torch.full((V, H), float("nan"), device="cuda")
    loss, _ = kernels.fused_nll_loss(h, w, t, dw_into=main_grad, dw_into_fresh=True)
    loss.backward()
    hr, wr = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    rdw, = torch.autograd.grad(F.cross_entropy(hr @ wr.T, t, reduction="sum"), [wr])
    assert torch.isfinite(main_grad).all()
    assert ((main_grad - rdw).norm() / rdw.norm()).item() < 2e-2
