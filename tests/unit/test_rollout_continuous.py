"""Continuous batching in the built-in engine: every seeded request gets the tokens and
log-probs it gets when decoded alone, whatever shares its slots, however often slots refill.

The model is a random 4-layer Qwen2.5-VL LLM of the tiny shape with a 512-token vocabulary
(fast on CPU); its parameters carry the mcore names the engine reads. The reference for each
request is the same engine decoding that request alone with one slot (one request, nothing
to share or refill), and for log-probs a full causal forward of prompt + completion
(`LLMDecoder.forward`, no KV reuse).
"""
import copy

import pytest
import torch

from ovlt.rollout.base import GenerationRequest, SamplingParams, derived_seed
from ovlt.rollout.builtin import BuiltinEngine
from tests.rollout_testlib import llm_params_module

V = 512
EOS = 7


class CharTok:
    """One character per token id: stop-string positions are exact."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


@pytest.fixture(scope="module")
def small(tiny_model_cfg):
    cfg = copy.deepcopy(tiny_model_cfg)
    cfg.vocab_size = V
    g = torch.Generator().manual_seed(0)

    def init(name, shape):
        if "norm" in name.rsplit(".", 1)[-1] or "layernorm" in name:
            return torch.ones(shape)
        return torch.randn(shape, generator=g) * (0.3 if len(shape) > 1 else 0.1)
    return llm_params_module(cfg, init), cfg


def _engine(small, **kw):
    module, cfg = small
    kw.setdefault("eos_token_ids", [EOS])
    kw.setdefault("min_width", 1)  # narrow the step in the tail down to one slot
    return BuiltinEngine(module, cfg, **kw)


def _requests(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L = int(torch.randint(1, 14, (1,), generator=g))
        ids = torch.randint(8, V, (L,), generator=g).tolist()
        out.append(GenerationRequest(prompt_ids=ids, request_id=f"r{i}", seed=1000 * i + 17,
                                     max_new_tokens=int(torch.randint(1, 16, (1,), generator=g))))
    return out


def _alone(eng_kw, small, r, sp):
    eng = _engine(small, max_batch_size=1, **eng_kw)
    return eng.generate([r], sp)[0]


def _same(a, b, atol=1e-5):
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert [c.finish_reason for c in a] == [c.finish_reason for c in b]
    assert [c.text for c in a] == [c.text for c in b]
    for x, y in zip(a, b):
        assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=atol)


def _recomputed_logprobs(small, prompt, completion, temperature):
    """log softmax(logits / T) of each completion token from one full causal forward."""
    from ovlt.models.qwen2_5_vl.rope_index import rope_positions_fn
    from ovlt.rollout.kv_decoder import LLMDecoder
    module, cfg = small
    d = LLMDecoder(module, cfg)
    ids = torch.tensor([prompt + completion])
    S = ids.shape[1]
    pos = rope_positions_fn(cfg)(ids[0], None)[:, None, :]
    cos, sin = d.rope(pos)
    mask = torch.ones(S, S, dtype=torch.bool).tril()[None, None]
    h = d.forward(d.embed_tokens(ids), cos, sin, d.new_cache(1, S), torch.arange(S), mask)
    lp = (d.logits(h[0]) / temperature).log_softmax(-1)
    P = len(prompt)
    return lp[P - 1: S - 1].gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


@pytest.mark.parametrize("temperature,top_p,top_k", [(0.0, 1.0, -1), (1.0, 1.0, -1),
                                                     (0.8, 0.9, 50)])
def test_each_request_as_if_alone(small, temperature, top_p, top_k):
    """Mixed prompt lengths, per-request caps and seeds, n = 2, 7 x 2 samples on 3 slots
    (refilled many times): each request's completions equal its solo run."""
    reqs = _requests()
    sp = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, n=2, max_new_tokens=99)
    eng = _engine(small, max_batch_size=3, check_every=3)
    outs = eng.generate(reqs, sp)
    assert eng.last_stats["prefill_prompts"] == len(reqs)  # one prefill per prompt
    if temperature > 0:  # (greedy decodes one sample per prompt and copies it)
        assert eng.last_stats["kv_copies"] >= 1   # a sibling took a slot another prompt freed
    assert eng.last_stats["compactions"] >= 1  # the tail ran narrower steps, slots moved
    assert eng.last_stats["slot_steps_run"] < 3 * eng.last_stats["steps"]
    assert len(outs) == len(reqs) and all(len(o) == 2 for o in outs)
    lengths = set()
    for r, o in zip(reqs, outs):
        _same(o, _alone({}, small, r, sp))
        for c in o:
            assert 1 <= len(c.token_ids) <= r.max_new_tokens
            assert c.finish_reason == ("stop" if c.token_ids[-1] == EOS else "length")
            assert EOS not in c.token_ids[:-1]
            lengths.add(len(c.token_ids))
            T = temperature if temperature > 0 else 1.0
            ref = _recomputed_logprobs(small, r.prompt_ids, c.token_ids, T)
            assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-4)
    assert len(lengths) > 3  # the mix really is mixed
    if temperature > 0:  # the two samples of a request differ (distinct seeds s, s + 1)
        assert any(o[0].token_ids != o[1].token_ids for o in outs)


def test_n_samples_of_one_prefill_equal_separate_prefills(small):
    """n = 4 from one prefill == four requests with seeds s + j, each prefilled itself."""
    r = _requests(1, seed=3)[0]
    r.max_new_tokens = 12
    sp = SamplingParams(temperature=1.0, n=4)
    eng = _engine(small, max_batch_size=2)
    shared = eng.generate([r], sp)[0]
    assert eng.last_stats["prefill_prompts"] == 1
    sep = [copy.deepcopy(r) for _ in range(4)]
    for j, q in enumerate(sep):
        q.seed = r.seed + j
    eng2 = _engine(small, max_batch_size=4)
    alone = [o[0] for o in eng2.generate(sep, SamplingParams(temperature=1.0, n=1))]
    assert eng2.last_stats["prefill_prompts"] == 4
    _same(shared, alone)
    assert [c.index for c in shared] == [0, 1, 2, 3]


def test_derived_seeds_do_not_depend_on_the_batch(small):
    """Unseeded requests: request i draws from derived_seed(params.seed, i) whatever else is
    in the call."""
    reqs = _requests(4, seed=5)
    for r in reqs:
        r.seed = None
    sp = SamplingParams(temperature=1.0, seed=123, max_new_tokens=10)
    eng = _engine(small, max_batch_size=2)
    outs = eng.generate(reqs, sp)
    for i, r in enumerate(reqs):
        solo = copy.deepcopy(r)
        solo.seed = derived_seed(123, i)
        _same(outs[i], _alone({}, small, solo, sp))
    again = eng.generate(reqs, sp)
    assert [o[0].token_ids for o in again] == [o[0].token_ids for o in outs]
    other = eng.generate(reqs, SamplingParams(temperature=1.0, seed=124, max_new_tokens=10))
    assert [o[0].token_ids for o in other] != [o[0].token_ids for o in outs]


def test_stop_strings_in_continuous_batching(small):
    """A stop string ends a completion at the token that completes it (text through it),
    also when found between checks, and every request still equals its solo run."""
    reqs = _requests(6, seed=1)
    sp0 = SamplingParams(temperature=1.0, max_new_tokens=30, n=2)
    for r in reqs:
        r.max_new_tokens = None
    base = _engine(small, max_batch_size=3, tokenizer=CharTok()).generate(reqs, sp0)
    # stops taken from the middle of two unconstrained completions
    texts = [CharTok().decode(o[0].token_ids) for o in base]
    stops = [t[4:6] for t in texts if len(t) >= 8][:2]
    assert stops
    sp = SamplingParams(temperature=1.0, max_new_tokens=30, n=2, stop=stops)
    eng = _engine(small, max_batch_size=3, tokenizer=CharTok(), check_every=5)
    outs = eng.generate(reqs, sp)
    n_stopped = 0
    for r, o, b in zip(reqs, outs, base):
        _same(o, _alone({"tokenizer": CharTok(), "check_every": 2}, small, r, sp))
        for c, full in zip(o, b):  # same seed: the stopped run is the free run, cut
            text = CharTok().decode(full.token_ids)
            ks = [k for k in range(1, len(text) + 1) if any(s in text[:k] for s in stops)]
            if not ks:
                assert c.token_ids == full.token_ids and c.finish_reason == full.finish_reason
                continue
            k = ks[0]
            n_stopped += 1
            assert c.token_ids == full.token_ids[:k] and c.finish_reason == "stop"
            assert c.text == text[:k] and any(c.text.endswith(s) for s in stops)
            assert c.logprobs == full.logprobs[:k] or torch.allclose(
                torch.tensor(c.logprobs), torch.tensor(full.logprobs[:k]), atol=1e-5)
    assert n_stopped >= len(stops)


def test_on_complete_streams_each_completion_once(small):
    """on_complete(i, c) once per completion with its request index, as completions finish:
    a short request reports before a long one queued ahead of it."""
    r_long = GenerationRequest(prompt_ids=[11, 12, 13], max_new_tokens=40, seed=1)
    r_short = GenerationRequest(prompt_ids=[14, 15], max_new_tokens=2, seed=2)
    reqs = [r_long, r_short, copy.deepcopy(r_short)]
    reqs[2].seed = 3
    seen = []
    eng = _engine(small, max_batch_size=4, check_every=2)
    outs = eng.generate(reqs, SamplingParams(temperature=1.0, n=2, ignore_eos=True),
                        on_complete=lambda i, c: seen.append((i, c)))
    assert len(seen) == 6
    assert sorted((i, c.index) for i, c in seen) == [(i, j) for i in range(3) for j in range(2)]
    for i, c in seen:
        assert outs[i][c.index] is c
    assert [i for i, _ in seen][-2:] == [0, 0]  # the 40-token request finishes last
    assert all(len(c.token_ids) == reqs[i].max_new_tokens for i, c in seen)  # ignore_eos


def test_ignore_eos_decodes_to_the_cap(small):
    reqs = _requests(3, seed=2)
    # an EOS id the model emits often: the most likely first greedy token of each prompt
    eng = _engine(small, max_batch_size=2)
    firsts = {o[0].token_ids[0] for o in eng.generate(reqs, SamplingParams(temperature=0.0))}
    eng = _engine(small, max_batch_size=2, eos_token_ids=sorted(firsts))
    sp = SamplingParams(temperature=0.0, max_new_tokens=6)
    stopped = eng.generate(reqs, sp)
    assert all(o[0].token_ids[-1] in firsts and o[0].finish_reason == "stop" for o in stopped)
    full = eng.generate(reqs, SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True))
    for r, o, s in zip(reqs, full, stopped):
        assert len(o[0].token_ids) == r.max_new_tokens  # the request's own cap wins
        assert o[0].finish_reason == "length"
        assert o[0].token_ids[: len(s[0].token_ids)] == s[0].token_ids


def test_static_schedule_same_tokens_more_steps(small):
    """The static-batch baseline gives the same completions; continuous batching takes fewer
    decode steps on a mixed-length workload."""
    reqs = _requests(8, seed=4)
    sp = SamplingParams(temperature=1.0, n=2, ignore_eos=True)
    cont = _engine(small, max_batch_size=4, check_every=1)
    stat = _engine(small, max_batch_size=4, check_every=1, schedule="static")
    a, b = cont.generate(reqs, sp), stat.generate(reqs, sp)
    for x, y in zip(a, b):
        _same(x, y)
    # static: batches of 4 samples in queue order, each as long as its longest cap
    caps = [r.max_new_tokens for r in reqs for _ in range(2)]
    assert stat.last_stats["steps"] == sum(max(caps[b: b + 4]) for b in range(0, len(caps), 4))
    assert cont.last_stats["steps"] < stat.last_stats["steps"]
    assert cont.last_stats["steps"] >= -(-sum(caps) // 4)
    with pytest.raises(ValueError, match="schedule"):
        _engine(small, schedule="paged")


def test_bad_requests(small):
    eng = _engine(small)
    with pytest.raises(ValueError, match=r"request 1 \(x\): prompt_ids is empty"):
        eng.generate([GenerationRequest([5]), GenerationRequest([], request_id="x")], SamplingParams())
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        eng.generate([GenerationRequest([5], max_new_tokens=0)], SamplingParams())
    with pytest.raises(ValueError, match="stop needs the engine's tokenizer"):
        eng.generate([GenerationRequest([5])], SamplingParams(stop=["x"]))
    assert eng.generate([], SamplingParams()) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_equals_eager_and_solo(small):
    """On the GPU: the captured decode step gives the eager step's completions, compiled or
    not; each request equals its solo run; log-probs equal a CPU full-forward recomputation."""
    module, cfg = small
    mod = copy.deepcopy(module).cuda()
    reqs = _requests()
    sp = SamplingParams(temperature=1.0, top_p=0.9, n=2)

    def run(rs, **kw):
        return BuiltinEngine(mod, cfg, eos_token_ids=[EOS], **kw).generate(rs, sp)

    graphs = run(reqs, max_batch_size=3, cuda_graphs=True)  # decode compiled (the default)
    eager = run(reqs, max_batch_size=3, cuda_graphs=False)
    plain = run(reqs, max_batch_size=3, cuda_graphs=True, compile_decode=False)
    for r, a, b, p in zip(reqs, graphs, eager, plain):
        _same(a, b)
        _same(a, p, atol=1e-4)  # fp32: fused pointwise work rounds alike
        _same(a, run([r], max_batch_size=1)[0], atol=1e-4)
        for c in a:
            ref = _recomputed_logprobs(small, r.prompt_ids, c.token_ids, 1.0)
            assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rollouts_leave_no_memory_behind_on_the_gpu(small):
    """Rollout + sleep, three times: the third cycle ends with exactly the memory the second
    ended with (the first may set up what every later one reuses). Each rollout captures its
    graphs again (one per width); warming them up on a new stream each time left a cuBLAS
    workspace per stream behind (7 x 33 MiB a rollout at the recipe's 320 slots)."""
    module, cfg = small
    eng = BuiltinEngine(copy.deepcopy(module).cuda(), cfg, eos_token_ids=[EOS], max_batch_size=8,
                        min_width=1, cuda_graphs=True, compile_decode=False)
    reqs, sp = _requests(), SamplingParams(temperature=1.0, n=2, seed=3)
    after = []
    for _ in range(3):
        eng.generate(reqs, sp)
        eng.sleep()
        torch.cuda.synchronize()
        after.append(torch.cuda.memory_allocated())
    assert after[1] == after[2], after


def test_greedy_n_decodes_once_and_copies(small):
    reqs = _requests(3, seed=6)
    eng = _engine(small, max_batch_size=4)
    seen = []
    outs = eng.generate(reqs, SamplingParams(temperature=0.0, n=3),
                        on_complete=lambda i, c: seen.append((i, c.index)))
    assert eng.last_stats["slot_steps_busy"] == sum(len(o[0].token_ids) for o in outs)
    one = eng.generate(reqs, SamplingParams(temperature=0.0, n=1))
    for o, a in zip(outs, one):
        assert [c.index for c in o] == [0, 1, 2]
        assert all(c.token_ids == a[0].token_ids and c.logprobs == a[0].logprobs for c in o)
        assert o[0].token_ids is not o[1].token_ids
    assert sorted(seen) == [(i, j) for i in range(3) for j in range(3)]


def test_compiled_decode_step_matches_eager(small):
    """`LLMDecoder(compile=True)` traces each layer's pointwise work through torch.compile
    (here the aot_eager backend: the plumbing, without a C++ or GPU compiler) and gives the
    eager step's logits and KV writes at every width, one graph per function shared by all
    layers (the slot count turns dynamic at the second width)."""
    import torch._dynamo
    from ovlt.rollout.kv_decoder import LLMDecoder
    module, cfg = small
    torch._dynamo.reset()
    eager = LLMDecoder(module, cfg)
    comp = LLMDecoder(module, cfg, compile=True, compile_backend="aot_eager")
    assert comp.compiled and not eager.compiled
    frames0 = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    g = torch.Generator().manual_seed(3)
    cache_e, cache_c = eager.new_cache(5, 32), comp.new_cache(5, 32)
    for width, step in ((5, 0), (3, 1), (2, 2), (5, 3)):
        tok = torch.randint(0, V, (width,), generator=g)
        pos = torch.full((width,), step, dtype=torch.long) + torch.arange(width)
        le = eager.decode(tok, pos, pos + 2, cache_e[:, :, :width])
        lc = comp.decode(tok, pos, pos + 2, cache_c[:, :, :width])
        assert torch.allclose(lc, le, atol=1e-5, rtol=1e-5)
        assert torch.allclose(cache_c, cache_e, atol=1e-6)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames0
    assert 2 <= graphs <= 4  # two functions, each static once then dynamic, never per layer
