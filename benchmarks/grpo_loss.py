"""fused_grpo_loss vs log-probs-then-torch-loss (bf16, H=3584, V=152064), and grpo_advantages
(Triton vs torch) at 512x5 and 64K rollouts.

  python benchmarks/grpo_loss.py --out benchmarks/results
"""
import argparse

import torch

from _bench_util import cuda_time as time_fn, measure, write_results  # noqa: E402

from ovlt import kernels  # noqa: E402
from ovlt.kernels import triton_ops as ops  # noqa: E402
from ovlt.kernels.advantages import torch_group_advantages  # noqa: E402
from ovlt.kernels.grpo_loss import agg_weights, token_terms  # noqa: E402

H, V = 3584, 152064
CFG = dict(clip_low=0.2, clip_high=0.3, dual_clip=3.0, kl_coef=0.01, kl_type="k3",
           temperature=1.0)


def torch_loss(logp, old, ref, adv, mask):
    lt = token_terms(logp, old, adv, ref, CFG)[0]
    return (agg_weights(mask, "token_mean") * lt).sum()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    dev = "cuda"
    w = (torch.randn(V, H, device=dev) * 0.02).bfloat16().requires_grad_()
    rows = []
    for T in args.tokens:
        h = torch.randn(T, H, device=dev).bfloat16().requires_grad_()
        t = torch.randint(0, V, (T,), device=dev)
        old = torch.full((T,), -12.0, device=dev) + 0.1 * torch.randn(T, device=dev)
        ref = old + 0.1 * torch.randn(T, device=dev)
        adv = torch.randn(T, device=dev)
        mask = torch.rand(T, device=dev) > 0.1

        def fused():
            kernels.fused_grpo_loss(h, w, t, old, ref, adv, mask)[0].backward()

        def logprob_then_torch():
            torch_loss(kernels.fused_logprob(h, w, t), old, ref, adv, mask).backward()

        def plain():
            lp = torch.log_softmax((h @ w.t()).float(), -1).gather(1, t[:, None]).squeeze(1)
            torch_loss(lp, old, ref, adv, mask).backward()

        for name, fn in (("ovlt_fused_grpo_loss", fused),
                         ("ovlt_fused_logprob_then_torch_loss", logprob_then_torch),
                         ("plain_torch_logits_then_torch_loss", plain)):
            rows.append(dict(T=T, variant=name, **measure(fn, [h, w])))
            print(rows[-1], flush=True)
        h = t = None  # free them before the next size (the closures above read them)
        w.grad = None
        torch.cuda.empty_cache()
    adv_rows = []
    for n_prompts, g in ((512, 5), (8192, 8), (1024, 8), (256, 8)):
        N = n_prompts * g
        ids = torch.arange(n_prompts, device=dev).repeat_interleave(g)
        ids = ids[torch.randperm(N, device=dev)]
        r = (torch.rand(N, device=dev) > 0.5).float()

        def tri():
            _, inv = torch.unique(ids, return_inverse=True)
            return ops.group_advantages(r, inv.to(torch.int32), n_prompts, 1e-6, True)

        def tor():
            _, inv = torch.unique(ids, return_inverse=True)
            return torch_group_advantages(r, inv, n_prompts, 1e-6, True)
        torch.testing.assert_close(tri(), tor(), rtol=1e-5, atol=1e-5)
        row = dict(N=N, group=g, triton_ms=time_fn(tri), torch_ms=time_fn(tor),
                   public_ms=time_fn(lambda: kernels.grpo_advantages(r, ids)))
        adv_rows.append(row)
        print(row, flush=True)
    write_results(args.out, "grpo_loss.json", {"H": H, "V": V, "dtype": "bf16", "rows": rows,
                                               "advantages": adv_rows})


if __name__ == "__main__":
    main()
