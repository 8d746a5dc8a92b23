"""ovlt.kernels.fused_rope vs megatron-core's unfused RoPE (`_apply_rotary_pos_emb_bshd`), forward
and backward, under TRITON_INTERPRET=1 and on the torch path; MRoPE-style per-token angles."""
import pytest
import torch


def _inputs(S=37, B=1, H=5, D=16, dtype=torch.float32, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if strided:  # q as a view into a fused qkv buffer, like mcore's split
        qkv = torch.randn(S, B, H, 3 * D, generator=g, dtype=dtype)
        x = qkv[..., D:2 * D]
    else:
        x = torch.randn(S, B, H, D, generator=g, dtype=dtype)
    # per-token angles with different halves (MRoPE sections make them differ per t/h/w)
    freqs = torch.randn(S, B, 1, D, generator=g) * 3
    return x, freqs


@pytest.mark.parametrize("interpret", [True, False])
@pytest.mark.parametrize("shape", [dict(), dict(B=2, H=3, D=10), dict(strided=True)])
def test_matches_mcore_fp32(monkeypatch, interpret, shape):
    if interpret:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from ovlt.kernels.rope import fused_rope
    x, freqs = _inputs(**shape)
    x1 = x.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    ref = _apply_rotary_pos_emb_bshd(x1, freqs)
    out = fused_rope(x2, freqs)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    gy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    ref.backward(gy)
    out.backward(gy)
    assert torch.allclose(x2.grad, x1.grad, atol=1e-5, rtol=1e-5)
    # with equal halves (real RoPE / MRoPE angles) it is a rotation: norms are kept
    half = freqs[..., : freqs.shape[-1] // 2]
    rot = fused_rope(x, torch.cat([half, half], dim=-1))
    assert torch.allclose(rot.norm(dim=-1), x.norm(dim=-1), rtol=1e-4)


def test_bf16_close_to_mcore(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from ovlt.kernels.rope import fused_rope
    x, freqs = _inputs(S=64, H=4, D=32, dtype=torch.bfloat16)
    ref32 = _apply_rotary_pos_emb_bshd(x.float(), freqs)
    out = fused_rope(x, freqs)
    assert out.dtype == torch.bfloat16
    # within one bf16 ulp of the fp32 result (Triton's CPU interpreter truncates where the
    # GPU rounds to nearest), plus cos/sin rounded to bf16 as mcore does
    tol = ref32.abs() * 2.0 ** -7 + x.float().abs().amax(-1, keepdim=True) * 2.0 ** -8
    assert ((out.float() - ref32).abs() <= tol).all()


def test_rejects_bad_shapes():
    from ovlt.kernels.rope import fused_rope
    with pytest.raises(ValueError, match="freqs"):
        fused_rope(torch.zeros(4, 1, 2, 8), torch.zeros(4, 1, 1, 6))
    with pytest.raises(NotImplementedError):
        fused_rope(torch.zeros(4, 1, 2, 8), torch.zeros(4, 1, 1, 8), interleaved=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton on the GPU)")
def test_cuda_bf16_rounds_to_nearest():
    """On the GPU the bf16 output is the fp32 result rounded to nearest: within one bf16 ulp
    and without the half-ulp bias toward zero that truncation would give."""
    from ovlt.kernels.rope import fused_rope
    x, freqs = _inputs(S=512, H=8, D=64, dtype=torch.bfloat16)
    x, freqs = x.cuda(), freqs.cuda()
    out = fused_rope(x, freqs).float()
    c, sn = torch.cos(freqs).bfloat16().float(), torch.sin(freqs).bfloat16().float()
    half = x.shape[-1] // 2
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    ref = torch.cat([x1 * c[..., :half] - x2 * sn[..., :half],
                     x2 * c[..., half:] + x1 * sn[..., half:]], dim=-1)
    keep = ref.abs() > 1e-3
    ulp = torch.exp2(torch.floor(torch.log2(ref.abs())) - 7)
    err = ((out - ref) * ref.sign() / ulp)[keep]
    # (in-kernel cos/sin may round to a neighbouring bf16 value now and then: rare larger errors)
    assert (err.abs() > 1.01).float().mean().item() < 1e-3
    assert abs(err.mean().item()) < 0.1, err.mean().item()  # truncation: about -0.5
