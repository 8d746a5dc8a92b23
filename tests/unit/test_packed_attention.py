"""Packed (varlen) attention of the local core-attention module against attention computed one
segment at a time with an explicit softmax; on a GPU also which SDPA kernel runs."""
import math

import pytest
import torch

from ovlt.models.qwen2_5_vl.attention import varlen_attention

# segment lengths with repeats (one SDPA call per distinct length), non-contiguous groups and
# an empty segment
LENGTHS = [5, 3, 5, 0, 7, 3, 5]


def reference(q, k, v, lengths, causal, scale):
    """Plain softmax(q k^T * scale) v per segment, K/V heads repeated for the query groups."""
    rep = q.shape[1] // k.shape[1]
    out, s = [], 0
    for n in lengths:
        if n == 0:
            continue
        qs, ks, vs = (t[s:s + n].float().transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        scores = qs @ ks.transpose(1, 2) * scale
        if causal:
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1).to(q.device),
                                        float("-inf"))
        out.append((scores.softmax(-1) @ vs).transpose(0, 1))
        s += n
    return torch.cat(out)


def inputs(device, dtype, heads=4, groups=2, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(LENGTHS)
    q, k, v = (torch.randn(t, h, dim, generator=g).to(device, dtype).requires_grad_()
               for h in (heads, groups, groups))
    cu = torch.tensor([0] + LENGTHS).cumsum(0)
    return q, k, v, cu


def check(device, dtype, causal, atol, permutation=None, rtol=0.0):
    q, k, v, cu = inputs(device, dtype)
    scale = 1 / math.sqrt(q.shape[-1])
    out = varlen_attention(q, k, v, cu, causal, scale, permutation=permutation)
    grad = torch.randn_like(out)
    got = [out, *torch.autograd.grad(out, (q, k, v), grad)]
    ref_out = reference(q, k, v, LENGTHS, causal, scale)
    want = [ref_out, *torch.autograd.grad(ref_out, (q, k, v), grad.float())]
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol), \
            (name, float((a.float() - b.float()).abs().max()))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("permutation", [None, False], ids=["one_gather", "per_group_scatter"])
def test_packed_segments_equal_per_segment_softmax_cpu(causal, permutation):
    check("cpu", torch.float32, causal, atol=1e-5, permutation=permutation)


def test_tokens_outside_every_segment_get_zeros():
    q, k, v, cu = inputs("cpu", torch.float32)
    n = int(cu[-2])  # the last segment's tokens lie in none
    out = varlen_attention(q, k, v, cu[:-1], True, 0.25)
    assert torch.equal(out[n:], torch.zeros_like(out[n:]))
    assert torch.allclose(out[:n], reference(q, k, v, LENGTHS[:-1], True, 0.25), atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("causal", [True, False])
def test_packed_segments_on_cuda_run_flash_not_cudnn(causal):
    """bf16 on a GPU: right numbers, and the segments' SDPA calls run the flash kernel (cuDNN
    would build an execution plan for every new segment length)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        check("cuda", torch.bfloat16, causal, atol=3e-2, rtol=2e-2)  # bf16: 1/128 relative
        torch.cuda.synchronize()
    names = [e.name.lower() for e in prof.events()
             if e.device_type == torch.autograd.DeviceType.CUDA]
    assert any("flash" in n for n in names) and not any("cudnn" in n for n in names), \
        sorted({n[:80] for n in names if "attention" in n or "flash" in n or "fmha" in n})
