"""The rollout interface's per-request resolution: caps and seeds (shared by every engine)."""
import pytest

from ovlt.rollout.base import (GenerationRequest, SamplingParams, derived_seed, report_all,
                               request_caps, request_seeds)


def _mix64_reference(x: int) -> int:
    # splitmix64 (Steele, Lea, Flood 2014), written out independently
    M = 2 ** 64
    z = (x + 0x9E3779B97F4A7C15) % M
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % M
    return z ^ (z >> 31)


def test_derived_seed_is_splitmix_of_base_and_index():
    # splitmix64 of state 0 yields 0xE220A8397B1DCDAF (the published first output for seed 0)
    assert _mix64_reference(0) == 0xE220A8397B1DCDAF
    for base, i in [(0, 0), (7, 3), (2 ** 40 + 5, 319)]:
        assert derived_seed(base, i) == _mix64_reference(_mix64_reference(base) ^ i) >> 2
    seeds = [derived_seed(11, i) for i in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= s < 2 ** 62 for s in seeds)
    # sample seeds s + j (j < 16) of different requests never coincide
    assert len({s + j for s in seeds for j in range(16)}) == 16000


def test_request_seeds_independent_of_batch():
    reqs = [GenerationRequest([1]), GenerationRequest([2], seed=5), GenerationRequest([3])]
    sp = SamplingParams(seed=9)
    assert request_seeds(reqs, sp) == [derived_seed(9, 0), 5, derived_seed(9, 2)]
    assert request_seeds(reqs, sp) == request_seeds(reqs, SamplingParams(seed=9))
    a, b = request_seeds(reqs, SamplingParams()), request_seeds(reqs, SamplingParams())
    assert a[1] == b[1] == 5 and a[0] != b[0]  # unseeded: a fresh base per call


def test_request_caps():
    reqs = [GenerationRequest([1]), GenerationRequest([2], max_new_tokens=3)]
    assert request_caps(reqs, SamplingParams(max_new_tokens=8)) == [8, 3]
    with pytest.raises(ValueError, match=r"request 1 \(x\): max_new_tokens must be >= 1, got 0"):
        request_caps([reqs[0], GenerationRequest([2], max_new_tokens=0, request_id="x")],
                     SamplingParams())
    with pytest.raises(ValueError, match="SamplingParams: max_new_tokens"):
        request_caps(reqs[:1], SamplingParams(max_new_tokens=0))


def test_report_all_in_order():
    seen = []
    report_all([["a", "b"], [], ["c"]], lambda i, c: seen.append((i, c)))
    assert seen == [(0, "a"), (0, "b"), (2, "c")]
    report_all([["a"]], None)
