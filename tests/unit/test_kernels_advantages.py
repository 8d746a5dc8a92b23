"""grpo_advantages (Triton segmented reduction under TRITON_INTERPRET=1) vs a per-group loop."""
import pytest
import torch

from ovlt.kernels import triton_ops as ops
from ovlt.kernels import grpo_advantages
from ovlt.kernels.advantages import torch_group_advantages
from tests.kernel_refs import ref_advantages

@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _variable_groups(seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [1, 5, 2, 8, 1, 3, 5]
    ids = torch.cat([torch.full((n,), 1000 + 7 * i) for i, n in enumerate(sizes)])
    perm = torch.randperm(len(ids), generator=g)  # groups interleaved, ids sparse
    n = len(ids)
    rewards = (torch.rand(n, generator=g) > 0.5).float() + 0.1 * torch.randn(n, generator=g)
    rewards[ids == 1000 + 7 * 3] = 1.0  # a group with all-equal rewards -> advantages 0
    return rewards[perm], ids[perm]


@pytest.mark.parametrize("std_normalize", [True, False])
def test_variable_groups_match_reference(std_normalize):
    assert ops.use_triton(torch.zeros(1))
    r, ids = _variable_groups()
    got = grpo_advantages(r, ids, std_normalize=std_normalize)
    want = ref_advantages(r, ids, std_normalize=std_normalize).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.all(got[ids == 1000 + 21] == 0)
    single = ids == 1000  # group of one: mean 0, std 1 -> r / (1 + eps)
    torch.testing.assert_close(got[single], r[single] / (1 + 1e-6) if std_normalize else r[single])


def test_triton_and_torch_paths_agree_on_many_groups():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (3000,), generator=g) * 3 - 50  # negative ids too
    r = torch.randn(3000, generator=g)
    _, inv = torch.unique(ids, return_inverse=True)
    G = int(inv.max()) + 1
    tri = ops.group_advantages(r, inv.to(torch.int32), G, 1e-6, True)
    torch.testing.assert_close(tri, torch_group_advantages(r, inv, G, 1e-6, True), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tri, ref_advantages(r, ids).float(), rtol=1e-5, atol=1e-5)


def test_bf16_rewards_and_errors():
    r, ids = _variable_groups(2)
    got = grpo_advantages(r.bfloat16(), ids)
    torch.testing.assert_close(got, ref_advantages(r.bfloat16().float(), ids).float(),
                               rtol=1e-5, atol=1e-5)
    assert grpo_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long)).numel() == 0
    with pytest.raises(ValueError, match="integers"):
        grpo_advantages(r, ids.float())
    with pytest.raises(ValueError, match=r"\[N\]"):
        grpo_advantages(r, ids[:-1])
