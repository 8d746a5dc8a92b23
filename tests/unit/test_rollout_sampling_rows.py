"""Per-row seeded sampling (counter-based), the decode attention kernel, and the slot table."""
import pytest
import torch

from ovlt.rollout.base import splitmix64
from ovlt.rollout.sampling import row_uniform, sample_rows
from ovlt.rollout.slots import SlotTable


def _uniform_reference(seed: int, counter: int) -> float:
    """The documented hash, in Python integers: top 24 bits of mix(mix(seed) ^ counter)."""
    h = splitmix64(splitmix64(seed % 2 ** 64) ^ (counter % 2 ** 64))
    return (h >> 40) / 2 ** 24


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_row_uniform_is_the_splitmix_hash(device):
    seeds = [0, 1, 17, -5, 2 ** 62 + 3, -(2 ** 63)]
    counters = [0, 1, 2047, 5, 3, 9]
    got = row_uniform(torch.tensor(seeds, device=device), torch.tensor(counters, device=device))
    want = [_uniform_reference(s, c) for s, c in zip(seeds, counters)]
    assert got.cpu().tolist() == want  # exact: 24-bit values are exact in fp32
    u = row_uniform(torch.full((200000,), 7, device=device), torch.arange(200000, device=device))
    assert abs(u.mean().item() - 0.5) < 0.003 and abs(u.var().item() - 1 / 12) < 0.001
    hist = torch.histc(u.float().cpu(), bins=10, min=0, max=1) / u.numel()
    assert (hist - 0.1).abs().max().item() < 0.004


@pytest.mark.parametrize("device", DEVICES)
def test_sample_rows_draws_from_the_filtered_distribution(device):
    p = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    N = 40000
    logits = p.log().expand(N, -1).contiguous().to(device)
    seeds = torch.arange(N, device=device) * 3 + 11
    ctr = torch.zeros(N, dtype=torch.long, device=device)

    def freq(tok, k):
        return torch.bincount(tok.cpu(), minlength=6)[:k].float() / N

    tok, lp = sample_rows(logits, 1.0, seeds=seeds, counters=ctr)
    assert (freq(tok, 6) - p).abs().max().item() < 0.01
    assert torch.allclose(lp.cpu(), p.log()[tok.cpu()], atol=1e-6)  # the policy log-prob
    tok, lp = sample_rows(logits, 1.0, top_k=3, seeds=seeds, counters=ctr)
    want = p[:3] / p[:3].sum()
    assert tok.max().item() <= 2 and (freq(tok, 3) - want).abs().max().item() < 0.01
    assert torch.allclose(lp.cpu(), p.log()[tok.cpu()], atol=1e-6)  # not renormalised
    tok, _ = sample_rows(logits, 1.0, top_p=0.75, seeds=seeds, counters=ctr)  # keeps 0..2
    assert tok.max().item() <= 2 and (freq(tok, 3) - want).abs().max().item() < 0.01
    tok, lp = sample_rows(logits, 0.5, seeds=seeds, counters=ctr)
    p2 = p ** 2 / (p ** 2).sum()
    assert (freq(tok, 6) - p2).abs().max().item() < 0.01
    assert torch.allclose(lp.cpu(), p2.log()[tok.cpu()], atol=1e-5)
    banned = torch.tensor([0, 5], device=device)
    tok, lp = sample_rows(logits, 1.0, seeds=seeds, counters=ctr, banned=banned)
    assert not bool(torch.isin(tok, banned).any())
    assert (freq(tok, 5)[1:] - p[1:5] / p[1:5].sum()).abs().max().item() < 0.01
    assert torch.allclose(lp.cpu(), p.log()[tok.cpu()], atol=1e-6)
    tok, lp = sample_rows(logits[:2], 0.0, banned=banned)  # greedy: best allowed
    assert tok.tolist() == [1, 1] and torch.allclose(lp.cpu(), p.log()[1].expand(2), atol=1e-6)
    with pytest.raises(ValueError, match="seeds and counters"):
        sample_rows(logits, 1.0)


def test_sample_rows_row_depends_only_on_its_inputs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1000, generator=g) * 3
    seeds = torch.tensor([5, 6, 7, 8, 9, 10])
    ctr = torch.tensor([0, 3, 3, 1, 0, 2])
    tok, lp = sample_rows(logits, 1.0, top_p=0.95, seeds=seeds, counters=ctr)
    perm = torch.tensor([4, 2, 0, 5, 1, 3])
    tok2, lp2 = sample_rows(logits[perm], 1.0, top_p=0.95, seeds=seeds[perm], counters=ctr[perm])
    assert torch.equal(tok2, tok[perm]) and torch.allclose(lp2, lp[perm])
    alone = [sample_rows(logits[b:b + 1], 1.0, top_p=0.95, seeds=seeds[b:b + 1],
                         counters=ctr[b:b + 1])[0].item() for b in range(6)]
    assert alone == tok.tolist()
    tok3, _ = sample_rows(logits, 1.0, top_p=0.95, seeds=seeds, counters=ctr + 1)
    assert not torch.equal(tok3, tok)  # the counter moves the stream


# ---------------------------------------------------------------- decode attention
def _attn_inputs(B, Hq, G, L, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, D, generator=g).to(dtype)
    cache = torch.randn(2, B, G, L, D, generator=g).to(dtype)
    lens = torch.randint(1, L + 1, (B,), generator=g)
    lens[0], lens[-1] = 1, L
    return q, cache[0], cache[1], lens


def _attn_plain(q, k, v, lens):
    """Softmax attention written out per slot and head (GQA: head h reads group h // (Hq/G))."""
    B, Hq, D = q.shape
    G = k.shape[1]
    out = torch.empty(B, Hq, D)
    for b in range(B):
        n = int(lens[b])
        for h in range(Hq):
            gi = h // (Hq // G)
            w = (k[b, gi, :n].double() @ q[b, h].double()) / D ** 0.5
            out[b, h] = (w.softmax(0) @ v[b, gi, :n].double()).float()
    return out


@pytest.mark.parametrize("shape", [(3, 4, 2, 100, 16), (2, 7, 1, 70, 32), (3, 28, 4, 130, 128)])
@pytest.mark.parametrize("interpret", [True, False])
def test_decode_attention_matches_plain_softmax(monkeypatch, shape, interpret):
    if interpret:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from ovlt.rollout.decode_attention import decode_attention
    q, k, v, lens = _attn_inputs(*shape, torch.float32)
    got = decode_attention(q, k, v, lens, split=32, block=16)  # several splits per slot
    assert torch.allclose(got, _attn_plain(q, k, v, lens), atol=2e-6)
    # keys past a slot's length never matter (NaN there would poison a read)
    k2, v2 = k.clone(), v.clone()
    for b, n in enumerate(lens.tolist()):
        k2[b, :, n:] = float("nan")
        v2[b, :, n:] = float("nan")
    if interpret:
        assert torch.equal(decode_attention(q, k2, v2, lens, split=32, block=16), got)


def test_choose_split_and_default(monkeypatch):
    from ovlt.rollout.decode_attention import choose_split, decode_attention
    assert choose_split(256, 4, 3072) == 3072          # 1024 programs already: whole slots
    assert choose_split(8, 4, 3072) == 128              # 32 splits per slot
    assert choose_split(1, 1, 100) == 64                # never below one block
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v, lens = _attn_inputs(2, 4, 2, 300, 16, torch.float32, seed=3)
    assert torch.allclose(decode_attention(q, k, v, lens), _attn_plain(q, k, v, lens), atol=2e-6)


def test_decode_attention_bf16_interpreted(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from ovlt.rollout.decode_attention import decode_attention
    q, k, v, lens = _attn_inputs(4, 28, 4, 130, 128, torch.bfloat16, seed=1)
    got = decode_attention(q, k, v, lens, split=64, block=32)
    assert got.dtype == torch.bfloat16
    ref = _attn_plain(q.float(), k.float(), v.float(), lens)
    assert (got.float() - ref).abs().max().item() < 1e-2  # bf16 rounding of p and the output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_cuda(dtype):
    from ovlt.rollout.decode_attention import decode_attention
    q, k, v, lens = _attn_inputs(5, 28, 4, 700, 128, dtype, seed=2)
    got = decode_attention(q.cuda(), k.cuda(), v.cuda(), lens.cuda())
    ref = _attn_plain(q.float(), k.float(), v.float(), lens)
    assert (got.float().cpu() - ref).abs().max().item() < (1e-2 if dtype == torch.bfloat16 else 2e-3)


# ---------------------------------------------------------------- slot table
def test_slot_table_shares_prefixes():
    t = SlotTable(n_slots=3, n_requests=3, n_samples=2)
    p = t.plan(t.free_slots())
    assert p.assign == [(0, 0, 0), (1, 0, 1), (2, 1, 0)]
    assert p.prefill == {0: [0, 1], 1: [2]} and p.copies == [] and p.in_place == []
    # slot 0 (request 0) finishes: request 1's second sample copies from slot 2
    assert t.release(0) == (0, 0)
    p = t.plan(t.free_slots())
    assert p.assign == [(0, 1, 1)] and p.copies == [(0, 2, 1)] and p.prefill == {}
    # slot 2 finishes: request 2 is new -> prefill into slot 2 (its old prefix is dropped)
    t.release(2)
    p = t.plan(t.free_slots())
    assert p.assign == [(2, 2, 0)] and p.prefill == {2: [2]}
    assert t.homes[1] == {0} and t.homes[2] == {2}
    # slot 2 finishes again: request 2's second sample reuses it in place
    t.release(2)
    p = t.plan(t.free_slots())
    assert p.assign == [(2, 2, 1)] and p.in_place == [2] and not p.copies and not p.prefill
    for s in (0, 1, 2):
        t.release(s)
    assert not t.busy() and not t.plan(t.free_slots()).assign
    with pytest.raises(RuntimeError, match="released twice"):
        t.release(0)


def test_slot_table_in_place_first_then_copies():
    t = SlotTable(n_slots=4, n_requests=2, n_samples=5)
    t.plan(t.free_slots())                      # request 0, samples 0-3, prefilled
    t.release(1)
    t.release(3)
    p = t.plan(t.free_slots())                  # sample 4 of request 0 in place, then request 1
    assert p.assign[0] == (1, 0, 4) and p.in_place == [1]
    assert p.assign[1] == (3, 1, 0) and p.prefill == {1: [3]}


def test_slot_table_move():
    t = SlotTable(n_slots=4, n_requests=2, n_samples=1)
    t.plan(t.free_slots())                      # slots 0, 1 <- requests 0, 1
    t.release(0)
    t.move(1, 0)
    assert t.owner == [(1, 0), None, None, None] and t.homes[1] == {0} and t.prefix_of[1] is None
    assert t.homes[0] == set()
    with pytest.raises(RuntimeError, match="cannot move"):
        t.move(2, 3)


# ---------------------------------------------------------------- top-p
def test_sample_rows_top_p_keeps_ties():
    p = torch.tensor([0.4, 0.2, 0.2, 0.2])
    N = 30000
    logits = p.log().expand(N, -1).contiguous()
    seeds, ctr = torch.arange(N), torch.zeros(N, dtype=torch.long)
    tok, _ = sample_rows(logits, 1.0, top_p=0.5, seeds=seeds, counters=ctr)  # tau = 0.2: all
    freq = torch.bincount(tok, minlength=4).float() / N
    assert (freq - p).abs().max().item() < 0.01
    tok, _ = sample_rows(logits, 1.0, top_p=0.35, seeds=seeds, counters=ctr)  # tau = 0.4: top 1
    assert tok.eq(0).all()
