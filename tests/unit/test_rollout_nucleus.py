"""The rejection draw from the top-p nucleus (`ovlt.rollout.nucleus`): the fused kernel (under
the Triton interpreter here, compiled on a GPU) draws the same tokens as the torch path, both
draw exactly the nucleus distribution, and the log-prob is log softmax(logits / T) over the
whole vocabulary."""
import pytest
import torch

from ovlt.rollout.nucleus import ROUNDS, fused_sample, round_uniforms
from ovlt.rollout.sampling import row_uniform


def _nucleus(p: torch.Tensor, top_p: float) -> torch.Tensor:
    """Boolean mask of the nucleus of each row of p (sorted brute force: ties at tau kept)."""
    s = p.sort(-1, descending=True).values
    c = s.cumsum(-1)
    j = (c < top_p * c[:, -1:]).sum(-1, keepdim=True).clamp_max(p.shape[-1] - 1)
    return p >= s.gather(-1, j)


def _logits(B, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, generator=g) * 3
    x[0] = 0.0                      # flat row: every token in any nucleus
    x[1, 5] = 40.0                  # one token holds all the mass
    x[2, :] = torch.linspace(0, -30, V)  # a long decreasing tail
    return x


def test_round_uniforms_extend_row_uniform():
    seeds = torch.tensor([0, 5, -7, 2 ** 62])
    ctr = torch.tensor([0, 3, 9, 1])
    us = round_uniforms(seeds, ctr, ROUNDS)
    assert us.shape == (4, ROUNDS)
    assert torch.equal(us[:, 0], row_uniform(seeds, ctr))  # round 0 = the plain draw's uniform
    assert len(set(us.flatten().tolist())) == us.numel()    # other rounds: other uniforms


@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.3])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_kernel_draws_what_the_torch_path_draws(monkeypatch, top_p, temperature):
    B, V = 10, 5000  # two 4096-wide blocks, the second partial
    logits = _logits(B, V)
    banned = torch.tensor([7, 4999, 4096])
    seeds = torch.arange(B) * 7 + 1
    ctr = torch.arange(B) % 3
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tok_t, lp_t = fused_sample(logits, temperature, top_p, seeds, ctr, banned)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    tok_k, lp_k = fused_sample(logits, temperature, top_p, seeds, ctr, banned)
    assert torch.equal(tok_k, tok_t)
    ref = (logits / temperature).log_softmax(-1).gather(-1, tok_t[:, None]).squeeze(-1)
    assert torch.allclose(lp_k, ref, atol=1e-5) and torch.allclose(lp_t, ref, atol=1e-5)
    assert not bool(torch.isin(tok_k, banned).any())
    kept = torch.softmax(logits / temperature, -1).index_fill(-1, banned, 0.0)
    assert _nucleus(kept, top_p).gather(-1, tok_k[:, None]).all()
    assert tok_k[1].item() == 5


def test_rejection_rounds_draw_exactly_the_nucleus(monkeypatch):
    """p = 0.45 on token 0, 0.05 on 1, the rest spread thin: the 0.5-nucleus is {0, 1}, and a
    first draw lands outside it half of the time, so most rows need the later rounds. Every
    draw is in the nucleus, with frequencies 0.9 / 0.1; the kernel draws the same tokens."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    V = 202
    p = torch.full((V,), 0.5 / (V - 2))
    p[0], p[1] = 0.45, 0.05
    N = 20000
    logits = p.log().expand(N, -1).contiguous()
    seeds, ctr = torch.arange(N), torch.zeros(N, dtype=torch.long)
    tok, lp = fused_sample(logits, 1.0, 0.5, seeds, ctr)
    freq = torch.bincount(tok, minlength=V).float() / N
    assert freq[2:].sum().item() == 0  # nothing outside the nucleus
    # after ROUNDS rejections a row takes token 0: (1/2)^4 of rows, a slight pull towards it
    assert abs(freq[0].item() - 0.9) < 0.012
    assert torch.allclose(lp, p.log()[tok], atol=1e-5)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the kernel, on the first rows
    n = 120
    tok_k, lp_k = fused_sample(logits[:n], 1.0, 0.5, seeds[:n], ctr[:n])
    assert torch.equal(tok_k, tok[:n]) and torch.allclose(lp_k, lp[:n], atol=1e-6)
    tok_k, _ = fused_sample(logits[:n], 1.0, 1.0, seeds[:n], ctr[:n], torch.tensor([0]))
    monkeypatch.delenv("TRITON_INTERPRET")
    tok_t, _ = fused_sample(logits[:n], 1.0, 1.0, seeds[:n], ctr[:n], torch.tensor([0]))
    assert torch.equal(tok_k, tok_t) and not bool((tok_k == 0).any())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_on_cuda_draws_what_the_torch_path_draws():
    B, V = 64, 152064
    logits = _logits(B, V).cuda()
    banned = torch.tensor([151655, 151656, 7], device="cuda")
    seeds, ctr = torch.arange(B, device="cuda") * 5, torch.arange(B, device="cuda")
    for top_p in (1.0, 0.99, 0.5):
        tok_k, lp_k = fused_sample(logits, 1.0, top_p, seeds, ctr, banned)
        tok_t, lp_t = fused_sample(logits.cpu(), 1.0, top_p, seeds.cpu(), ctr.cpu(), banned.cpu())
        same = (tok_k.cpu() == tok_t).float().mean().item()
        assert same >= 0.95, (top_p, same)  # block sums vs one cumsum: rare boundary flips
        ref = logits.log_softmax(-1).gather(-1, tok_k[:, None]).squeeze(-1)
        assert torch.allclose(lp_k, ref, atol=1e-4)
        kept = torch.softmax(logits, -1).index_fill(-1, banned, 0.0)
        assert _nucleus(kept, top_p).gather(-1, tok_k[:, None]).all()
