"""The CUDA fast paths' pieces that run anywhere, against the mcore / torch code they replace:
the foreach grad-norm and scale (apex multi_tensor_* drop-ins) and the embedding backward that
accumulates into main_grad. (The wgrad GEMM into fp32 needs cuBLAS: checked at install on the
GPU and timed in benchmarks/sft_parts.py.)"""
import torch
import torch.nn.functional as F


def test_multi_tensor_l2norm_matches_mcore_local():
    from megatron.core.utils import local_multi_tensor_l2_norm

    from ovlt.compat.cuda_fastpaths import multi_tensor_l2norm
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(s, generator=g) for s in [(7, 3), (1000,), (4, 5, 6), (0,)]]
    ours, _ = multi_tensor_l2norm(0, None, [ts], False)
    ref = torch.sqrt(sum((t.double() ** 2).sum() for t in ts))
    assert abs(ours.item() - ref.item()) < 1e-5 * ref.item()
    try:  # mcore's own fallback builds a CUDA tensor: only comparable with a GPU
        theirs, _ = local_multi_tensor_l2_norm(0, None, [ts], False)
        assert abs(theirs.item() - ours.item()) < 1e-5 * ref.item()
    except (AssertionError, RuntimeError) as e:
        assert torch.cuda.is_available() is False, e


def test_grad_sq_norm_joins_adjacent_views_of_one_buffer(monkeypatch):
    """Main grads as views of one flat buffer (with a gap, a view out of order, a duplicate, a
    strided view, another buffer): adjacent contiguous views are reduced as one flat tensor and
    the sum of squares is still that of the list as given."""
    from ovlt.compat import cuda_fastpaths as cf
    g = torch.Generator().manual_seed(1)
    buf = torch.randn(3000, generator=g)
    other = torch.randn(50, generator=g)
    views = [buf[100:400].view(10, 30), buf[0:100], buf[400:1000], buf[1100:1500],
             buf[1500:1500], buf[1500:2100].view(20, 30), buf[0:100],
             buf[2100:2700].view(30, 20).t(), other]
    merged = cf.merge_adjacent_views([v for v in views if v.numel()])
    spans = sorted((m.storage_offset(), m.numel()) for m in merged if m.untyped_storage().data_ptr()
                   == buf.untyped_storage().data_ptr() and m.is_contiguous())
    # [0, 1000) joined from 3 views, the duplicate [0, 100) alone, [1100, 2100) joined
    assert (0, 1000) in spans and (1100, 1000) in spans and (0, 100) in spans
    assert len(merged) == 5  # + the strided view and the other buffer, unchanged
    ref = sum((v.double() ** 2).sum() for v in views)
    big = []
    real = torch.linalg.vector_norm
    monkeypatch.setattr(torch.linalg, "vector_norm", lambda t, **kw: big.append(t.numel())
                        or real(t, **kw))
    monkeypatch.setattr(torch, "_foreach_norm", torch._foreach_norm)
    got = cf.grad_sq_norm(views, "cpu")
    assert got.shape == (1,) and abs(got.item() - ref.item()) < 1e-5 * ref.item()
    assert big == []  # all below the one-reduction size: foreach
    huge = torch.randn(1 << 24, generator=g)
    got = cf.grad_sq_norm([huge[: 1 << 23], huge[1 << 23:], other], "cpu")
    assert big == [1 << 24]
    ref = (huge.double() ** 2).sum() + (other.double() ** 2).sum()
    # torch's CPU fp32 norm of 16M elements is itself off by ~6e-4 (foreach too); CUDA's tree
    # reduction is not
    assert abs(got.item() - ref.item()) < 2e-3 * ref.item()


def test_multi_tensor_scale_in_place_and_copy():
    from ovlt.compat.cuda_fastpaths import multi_tensor_scale
    a = [torch.arange(6.0), torch.ones(3)]
    multi_tensor_scale(0, None, [a, a], 0.5)
    assert torch.equal(a[0], torch.arange(6.0) * 0.5) and torch.equal(a[1], torch.full((3,), .5))
    src = [torch.arange(4.0)]
    dst = [torch.zeros(4, dtype=torch.bfloat16)]
    multi_tensor_scale(0, None, [src, dst], 1.0)
    assert torch.equal(dst[0], src[0].bfloat16())
    multi_tensor_scale(0, None, [src, dst], 3.0)
    assert torch.equal(dst[0], (src[0] * 3).bfloat16())


def test_embedding_backward_into_main_grad():
    from ovlt.models.qwen2_5_vl.language import EmbeddingIntoMainGrad
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 8, generator=g, dtype=torch.bfloat16).requires_grad_(True)
    weight.main_grad = torch.randn(50, 8, generator=g)  # earlier micro-batches' sum
    weight.grad_added_to_main_grad = False
    start = weight.main_grad.clone()
    ids = torch.tensor([[3, 7, 3, 49], [0, 3, 7, 7]])  # repeats accumulate
    out = EmbeddingIntoMainGrad.apply(ids, weight)
    ref_w = weight.detach().clone().requires_grad_(True)
    ref = F.embedding(ids, ref_w)
    assert torch.equal(out, ref)
    gy = torch.randn(out.shape, generator=g, dtype=torch.bfloat16)
    out.backward(gy)
    ref.backward(gy)
    assert weight.grad_added_to_main_grad
    assert torch.allclose(weight.main_grad, start + ref_w.grad.float(), atol=1e-2, rtol=1e-2)
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[ids.unique()] = False
    assert torch.equal(weight.main_grad[untouched], start[untouched])
