"""Vocab-parallel path: 2 gloo ranks with half the LM head each == one process with all of it."""
import os

import pytest
import torch

from tests.dist_utils import run_distributed

pytestmark = pytest.mark.slow

T, H, V = 7, 16, 602  # 301 vocab rows per rank: not a multiple of any block


def _inputs():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(T, H, generator=g)
    w = torch.randn(V, H, generator=g) / H ** 0.5 * 3
    t = torch.randint(0, V, (T,), generator=g)
    t[1], t[2], t[3] = 0, V - 1, -100  # first/last row of each shard's range, and an ignored one
    t[4] = 301
    old = torch.randn(T, generator=g) * 0.3 - 6.0
    ref = torch.randn(T, generator=g) * 0.3 - 6.0
    adv = torch.randn(T, generator=g)
    mask = torch.tensor([1, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    return h, w, t, old, ref, adv, mask


def _run(w_rows: slice, tp_group):
    """logprob+entropy grads and GRPO loss grads for the LM-head rows `w_rows`."""
    from ovlt import kernels
    kernels.config.chunk_bytes = 3 * 4 * 301  # 3-token chunks: per-chunk exchanges
    h, w, t, old, ref, adv, mask = _inputs()
    h = h.requires_grad_()
    ws = w[w_rows].clone().requires_grad_()
    lp, ent = kernels.fused_logprob(h, ws, t, temperature=0.8, return_entropy=True,
                                    tp_group=tp_group)
    coef = torch.linspace(-1, 1, T)
    dh, dw = torch.autograd.grad((lp * coef).sum() + (ent * coef.flip(0)).sum(), [h, ws])
    loss, metrics = kernels.fused_grpo_loss(h, ws, t, old, ref, adv, mask, temperature=0.8,
                                            tp_group=tp_group)
    gh, gw = torch.autograd.grad(loss, [h, ws])
    return {"lp": lp.detach(), "ent": ent.detach(), "dh": dh, "dw": dw, "loss": loss.detach(),
            "gh": gh, "gw": gw, "metrics": {k: v.clone() for k, v in metrics.items()}}


def _worker(rank, world_size):
    import torch.distributed as dist
    os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        vl = V // world_size
        out = _run(slice(rank * vl, (rank + 1) * vl), dist.group.WORLD)
        # plain numpy across the queue: torch tensors would travel as shared-memory handles
        # that die with this process
        return {k: ({m: x.numpy() for m, x in v.items()} if k == "metrics" else v.numpy())
                for k, v in out.items()}
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_equals_single_process(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from ovlt import kernels
    monkeypatch.setattr(kernels.config, "chunk_bytes", kernels.config.chunk_bytes)
    full = _run(slice(0, V), None)
    ranks = [{k: ({m: torch.from_numpy(x) for m, x in v.items()} if k == "metrics"
                  else torch.from_numpy(v)) for k, v in r.items()}
             for r in run_distributed(_worker, 2)]
    for r in ranks:
        for key in ("lp", "ent", "dh", "loss", "gh"):
            torch.testing.assert_close(r[key], full[key], rtol=5e-5, atol=5e-5,
                                       msg=lambda m, key=key: f"{key}: {m}")
        for key, v in full["metrics"].items():
            torch.testing.assert_close(r["metrics"][key], v, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, key=key: f"{key}: {m}")
    for key in ("dw", "gw"):  # the shards, stacked, are the full gradient (fp32 rounding apart)
        got = torch.cat([r[key] for r in ranks])
        err = (got - full[key]).norm() / full[key].norm()
        assert err < 1e-5, f"{key}: relative error {err:.2e}"
    assert full["lp"][3] == 0  # ignored target
