"""fused_logprob (and the Triton row kernels) vs full-logits torch, under TRITON_INTERPRET=1."""
import json
import os
import subprocess
import sys

import pytest
import torch

from ovlt import kernels
from ovlt.kernels import triton_ops as ops
from tests.kernel_refs import ref_logprob

@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    """Triton interpreter for CPU tensors, and small token chunks so several chunks run."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernels.config, "chunk_bytes", 3 * 4 * 400)  # ~3 rows of fp32 V=400


def _inputs(T, H, V, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(T, H, generator=g) * scale).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) / H ** 0.5 * 3).to(dtype).requires_grad_()
    t = torch.randint(0, V, (T,), generator=g)
    return h, w, t


def _check(T, H, V, dtype, temperature, tol_fwd, tol_grad, entropy=True, t_override=None):
    h, w, t = _inputs(T, H, V, dtype)
    if t_override is not None:
        t = t_override
    lp, ent = kernels.fused_logprob(h, w, t, temperature=temperature, return_entropy=True)
    assert lp.dtype == torch.float32 and lp.shape == (T,)
    # reference on the same (possibly bf16-rounded) inputs, in fp32
    hr = h.detach().float().requires_grad_()
    wr = w.detach().float().requires_grad_()
    rlp, rent = ref_logprob(hr, wr, t, temperature)
    torch.testing.assert_close(lp, rlp, atol=tol_fwd, rtol=5e-5)
    torch.testing.assert_close(ent, rent, atol=tol_fwd, rtol=5e-5)
    g = torch.Generator().manual_seed(1)
    g1, g2 = torch.randn(T, generator=g), torch.randn(T, generator=g)
    loss = (lp * g1).sum() + ((ent * g2).sum() if entropy else 0)
    rloss = (rlp * g1).sum() + ((rent * g2).sum() if entropy else 0)
    dh, dw = torch.autograd.grad(loss, [h, w])
    rdh, rdw = torch.autograd.grad(rloss, [hr, wr])
    assert dh.dtype == dtype and dw.dtype == dtype
    for got, want in ((dh, rdh), (dw, rdw)):
        err = (got.float() - want).norm() / want.norm().clamp_min(1e-12)
        assert err < tol_grad, f"relative gradient error {err:.2e} >= {tol_grad}"


def test_compiled_kernels_and_helpers_ignore_the_interpreter_flag(monkeypatch):
    """Kernels and device helpers made while TRITON_INTERPRET=1 is set (a test's interpreter
    mode when a module is first imported) must still be compiled functions for CUDA tensors:
    `triton.jit` would hand back interpreter wrappers, which a compiled kernel cannot call."""
    pytest.importorskip("triton")
    from triton.runtime.jit import JITFunction
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def helper(x):
        return x

    assert type(ops.device_fn(helper)) is JITFunction
    k = ops.Kernel(helper, do_not_specialize=("x",))
    assert type(ops.compiled_fn(k.fn, do_not_specialize=k.do_not_specialize)) is JITFunction
    from ovlt.kernels.rounding import to_bf16_rne
    assert type(to_bf16_rne) is JITFunction


def test_row_kernels_are_triton_and_match_torch():
    assert ops.use_triton(torch.zeros(1))  # CPU tensor -> interpreter, not the torch fallback
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 2500, generator=g) * 4  # 3 blocks of 1024, last one partial
    t = torch.tensor([0, 2499, 1200, -5, 3000])  # last two outside this "shard"
    m, s, sz, zt = ops.row_stats(x, t, 0, 0.5)
    z = x * 0.5
    torch.testing.assert_close(m, z.max(1).values)
    p = torch.exp(z - m[:, None])
    torch.testing.assert_close(s, p.sum(1), rtol=1e-5, atol=0)
    torch.testing.assert_close(sz, (p * z).sum(1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(zt, torch.tensor([z[0, 0], z[1, 2499], z[2, 1200], 0.0, 0.0]))
    lse = m + s.log()
    ent = lse - sz / s
    g_lp, g_ent = torch.randn(5, generator=g), torch.randn(5, generator=g)
    zr = x.clone().requires_grad_()
    ls = torch.log_softmax(zr * 0.5, -1)
    # a target outside this vocab shard lives on another rank: only the -lse part is local
    lse_r = torch.logsumexp(zr * 0.5, -1)
    tgt_lp = torch.stack([ls[i, t[i]] if 0 <= t[i] < 2500 else -lse_r[i] for i in range(5)])
    ((tgt_lp * g_lp).sum() + (-(ls.exp() * ls).sum(-1) * g_ent).sum()).backward()
    d = ops.row_grad_(x.clone(), t, 0, 0.5, lse, g_lp, ent, g_ent)
    torch.testing.assert_close(d, zr.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("T,H,V,temperature", [(1, 32, 400, 1.0), (7, 24, 1000, 0.7),
                                               (10, 16, 2500, 1.3)])
def test_fp32_matches_reference(T, H, V, temperature):
    _check(T, H, V, torch.float32, temperature, tol_fwd=2e-5, tol_grad=2e-5)


def test_large_hidden_fp32():
    _check(3, 3584, 300, torch.float32, 1.0, tol_fwd=5e-5, tol_grad=5e-5)


@pytest.mark.parametrize("dw_fp32", [False, True])
def test_bf16_within_stated_tolerance(dw_fp32, monkeypatch):
    monkeypatch.setattr(kernels.config, "dw_fp32", dw_fp32)
    # bf16 logits (as in verl's bf16 lm_head) and a bf16 gradient chunk: expect ~1e-2 abs on
    # log-probs and <2% relative gradient error against fp32 math on the same bf16 inputs
    _check(9, 64, 1000, torch.bfloat16, 0.8, tol_fwd=3e-2, tol_grad=2e-2)


def test_ignored_targets_and_logprob_only_gradient():
    t = torch.tensor([5, -100, 17, 399, -100, 0])
    h, w, _ = _inputs(6, 16, 400, torch.float32)
    lp = kernels.fused_logprob(h, w, t)
    assert lp[1] == 0 and lp[4] == 0
    _check(6, 16, 400, torch.float32, 1.0, 2e-5, 2e-5, entropy=False, t_override=t)


def test_weight_only_gradient_and_no_grad_mode():
    h, w, t = _inputs(4, 16, 400, torch.float32)
    h = h.detach()
    (dw,) = torch.autograd.grad(kernels.fused_logprob(h, w, t).sum(), [w])
    wr = w.detach().requires_grad_()
    (rdw,) = torch.autograd.grad(ref_logprob(h, wr, t)[0].sum(), [wr])
    torch.testing.assert_close(dw, rdw, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        lp = kernels.fused_logprob(h, w, t)
    assert not lp.requires_grad
    torch.testing.assert_close(lp, ref_logprob(h, w.detach(), t)[0], rtol=0, atol=2e-5)


def test_bad_inputs_raise():
    h, w, t = _inputs(4, 16, 40, torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        kernels.fused_logprob(h.detach().double(), w, t)
    with pytest.raises(ValueError, match="targets"):
        kernels.fused_logprob(h, w, t[:3])
    with pytest.raises(ValueError, match="temperature"):
        kernels.fused_logprob(h, w, t, temperature=0.0)


def test_torch_fallback_without_interpreter(monkeypatch):
    """CPU tensors without TRITON_INTERPRET take the chunked torch path: same numbers."""
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not ops.use_triton(torch.zeros(1))
    _check(5, 16, 400, torch.float32, 0.9, tol_fwd=2e-5, tol_grad=2e-5,
           t_override=torch.tensor([3, -100, 399, 0, 7]))


def test_import_without_triton():
    """`ovlt.kernels` imports on a machine without triton (and without a GPU)."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch; from ovlt import kernels\n"
            "from ovlt.kernels import triton_ops as ops\n"
            "assert not ops.HAVE_TRITON\n"
            "h = torch.randn(3, 8); w = torch.randn(20, 8); t = torch.tensor([1, 5, 19])\n"
            "ref = torch.log_softmax(h @ w.T, -1)[torch.arange(3), t]\n"
            "assert torch.allclose(kernels.fused_logprob(h, w, t), ref, atol=1e-5)\n"
            "print(kernels.grpo_advantages(torch.tensor([1., 0.]), torch.tensor([0, 0])).tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TRITON_INTERPRET": "0"})
    assert out.returncode == 0, out.stderr
    a = 0.5 / (0.5 ** 0.5 + 1e-6)  # (r - mean) / (unbiased std + eps)
    assert [round(x, 6) for x in json.loads(out.stdout)] == [round(a, 6), round(-a, 6)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton on the GPU)")
def test_cuda_row_grad_bf16_matches_torch_rounding(monkeypatch):
    """The bf16 logit gradients written by the Triton row kernel on the GPU are the torch
    path's (fp32 math, rounded to nearest): no truncation bias toward zero."""
    from ovlt.kernels import triton_ops as ops
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # compiled, not interpreted
    g = torch.Generator(device="cuda").manual_seed(0)
    C, V = 64, 4096 + 37
    logits = (torch.randn(C, V, device="cuda", generator=g) * 3).bfloat16()
    targets = torch.randint(0, V, (C,), device="cuda", generator=g)
    z = logits.float()
    lse = torch.logsumexp(z, dim=1)
    g_lp = torch.randn(C, device="cuda", generator=g)
    ref = logits.clone()
    ops.row_grad_(logits, targets, 0, 1.0, lse, g_lp)
    p = torch.exp(z - lse[:, None])
    d = -g_lp[:, None] * p
    d[torch.arange(C, device="cuda"), targets] += g_lp
    ref.copy_(d)
    same = (logits == ref).float().mean().item()
    assert same > 0.99, same  # truncation matches ~half; exp() ulps differ now and then
