"""Log-prob fwd+bwd over the LM head, bf16, H=3584, V=152064: plain torch, chunked torch,
Liger fused linear cross entropy, ovlt (`fused_logprob` with a per-token upstream gradient,
and the fused scalar-loss path of `fused_grpo_loss`), plus the bf16 GEMM floor.

  python benchmarks/logprob.py --out benchmarks/results [--tokens 4096 16384]
"""
import argparse

import torch
from torch.utils.checkpoint import checkpoint

from _bench_util import measure, write_results  # noqa: E402  (puts the repo root on sys.path)

from ovlt import kernels  # noqa: E402

H, V = 3584, 152064


def plain_torch(h, w, t):
    lp = torch.log_softmax((h @ w.t()).float(), -1).gather(1, t[:, None]).squeeze(1)
    lp.sum().backward()


def chunked_torch(h, w, t, chunk=2048):
    def piece(hc, tc):
        return torch.log_softmax((hc @ w.t()).float(), -1).gather(1, tc[:, None]).squeeze(1)
    lp = torch.cat([checkpoint(piece, h[i:i + chunk], t[i:i + chunk], use_reentrant=False)
                    for i in range(0, h.shape[0], chunk)])
    lp.sum().backward()


def ovlt_logprob(h, w, t):
    kernels.fused_logprob(h, w, t).sum().backward()


def ovlt_fused_loss(h, w, t, consts):
    old, adv, mask = consts
    loss, _ = kernels.fused_grpo_loss(h, w, t, old, None, adv, mask, kl_coef=0.0)
    loss.backward()


def gemm_floor(h, w):
    """The three GEMMs of fwd+bwd at full size (logits, d hidden, d weight), bf16."""
    g = torch.empty(h.shape[0], w.shape[0], dtype=h.dtype, device=h.device)

    def run():
        torch.mm(h, w.t(), out=g)
        g @ w
        g.t() @ h
    return run


def check_compiled():
    """The compiled (not interpreted) kernels against the test references on small shapes."""
    from tests.kernel_refs import ref_grpo, ref_logprob
    out = {}
    saved = kernels.config.chunk_bytes
    kernels.config.chunk_bytes = 64 * 5003 * 4  # several chunks
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator(device="cuda").manual_seed(0)
        h = torch.randn(300, 256, device="cuda", generator=g).to(dtype).requires_grad_()
        w = (torch.randn(5003, 256, device="cuda", generator=g) / 16 * 3).to(dtype).requires_grad_()
        t = torch.randint(0, 5003, (300,), device="cuda", generator=g)
        lp, ent = kernels.fused_logprob(h, w, t, temperature=0.7, return_entropy=True)
        hr, wr = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
        rlp, rent = ref_logprob(hr, wr, t, 0.7)
        dh, dw = torch.autograd.grad(lp.sum() + ent.sum(), [h, w])
        rdh, rdw = torch.autograd.grad(rlp.sum() + rent.sum(), [hr, wr])
        old = rlp.detach() + 0.05 * torch.randn_like(rlp)  # away from the clip edges: bf16
        # logit rounding must not flip a token across a clip boundary in this check
        adv = torch.randn_like(rlp)
        mask = torch.rand_like(rlp) > 0.2
        loss, _ = kernels.fused_grpo_loss(h, w, t, old, old, adv, mask, temperature=0.7)
        gh, gw = torch.autograd.grad(loss, [h, w])
        rloss, _ = ref_grpo(hr, wr, t, old, old, adv, mask, temperature=0.7)
        rgh, rgw = torch.autograd.grad(rloss, [hr, wr])
        rel = lambda a, b: float((a.float() - b).norm() / b.norm())  # noqa: E731
        out[str(dtype)] = {"logp_max_abs": float((lp.detach() - rlp.detach()).abs().max()),
                           "ent_max_abs": float((ent.detach() - rent.detach()).abs().max()),
                           "dh_rel": rel(dh, rdh), "dw_rel": rel(dw, rdw),
                           "loss_abs": float((loss - rloss).abs().detach()),
                           "grpo_dh_rel": rel(gh, rgh), "grpo_dw_rel": rel(gw, rgw)}
    kernels.config.chunk_bytes = saved
    print("compiled-kernel check:", out, flush=True)
    return out


def dw_accuracy(h, w, t, consts):
    """How far the bf16-accumulated d weight is from the fp32-accumulated one (same bf16
    dlogits), and both from plain torch's single-GEMM d weight of the same loss."""
    old, adv, mask = consts
    grads = {}
    saved = kernels.config.dw_fp32
    for fp32 in (False, True):
        kernels.config.dw_fp32 = fp32
        w.grad = None
        kernels.fused_grpo_loss(h, w, t, old, None, adv, mask, kl_coef=0.0)[0].backward()
        grads[fp32] = w.grad.float()
    kernels.config.dw_fp32 = saved
    w.grad = None
    lp = torch.log_softmax((h @ w.t()).float(), -1).gather(1, t[:, None]).squeeze(1)
    ratio = torch.exp(lp - old)  # the same clipped-surrogate loss, with adv=1, in plain torch
    loss = (torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.3)) * mask).sum() / mask.sum()
    loss.backward()
    plain = w.grad.float()
    w.grad = None
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    return {"bf16acc_vs_fp32acc": rel(grads[False], grads[True]),
            "fp32acc_vs_plain_torch": rel(grads[True], plain),
            "bf16acc_vs_plain_torch": rel(grads[False], plain)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    dev = "cuda"
    check = check_compiled()
    w = (torch.randn(V, H, device=dev) * 0.02).bfloat16().requires_grad_()
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyLoss)
        liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    except Exception as e:  # report, don't fail the other rows
        print(f"liger unavailable: {e!r}")
        liger = None
    rows = []
    for T in args.tokens:
        h = torch.randn(T, H, device=dev).bfloat16().requires_grad_()
        t = torch.randint(0, V, (T,), device=dev)
        consts = (torch.full((T,), -12.0, device=dev), torch.ones(T, device=dev),
                  torch.ones(T, dtype=torch.bool, device=dev))
        default = (kernels.config.chunk_bytes, kernels.config.dw_fp32)
        c_def = kernels.config.chunk_bytes // (V * 2) // 256 * 256
        variants = {
            "plain_torch": lambda: plain_torch(h, w, t),
            "chunked_torch_ckpt2048": lambda: chunked_torch(h, w, t),
            f"ovlt_fused_logprob_c{c_def}_dw{'fp32' if default[1] else 'bf16'}":
                lambda: ovlt_logprob(h, w, t),
        }
        if liger is not None:
            variants["liger_flce"] = lambda: liger(w, h, t).backward()
        for name, fn in variants.items():
            r = measure(fn, [h, w])
            rows.append(dict(T=T, variant=name, **r))
            print(rows[-1], flush=True)
        # the fused scalar-loss path (gradient produced in the forward chunk loop): chunk size
        # x d-weight accumulation dtype
        for c in (1024, 1536, 2048):
            for fp32 in (False, True):
                kernels.config.chunk_bytes, kernels.config.dw_fp32 = c * V * 2, fp32
                r = measure(lambda: ovlt_fused_loss(h, w, t, consts), [h, w])
                name = f"ovlt_fused_loss_c{c}_dw{'fp32' if fp32 else 'bf16'}"
                rows.append(dict(T=T, variant=name,
                                 default=(c == c_def and fp32 == default[1]), **r))
                print(rows[-1], flush=True)
        kernels.config.chunk_bytes, kernels.config.dw_fp32 = default
        if T == max(args.tokens):
            rows.append(dict(T=T, variant="dw_accuracy", **dw_accuracy(h, w, t, consts)))
            print(rows[-1], flush=True)
        with torch.no_grad():
            r = measure(gemm_floor(h.detach(), w.detach()), [])
        rows.append(dict(T=T, variant="bf16_gemm_floor_3gemms", **r))
        print(rows[-1], flush=True)
        if args.profile and T == max(args.tokens):
            from torch.profiler import ProfilerActivity, profile
            kernels.config.chunk_bytes, kernels.config.dw_fp32 = default
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                ovlt_fused_loss(h, w, t, consts)
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
            print(table)
            rows.append(dict(T=T, variant="profile_ovlt_fused_loss", table=table))
        h = t = consts = None  # free them before the next size (the closures above read them)
        w.grad = None
        torch.cuda.empty_cache()
    write_results(args.out, "logprob.json", {"H": H, "V": V, "dtype": "bf16", "rows": rows,
                                             "compiled_check": check})


if __name__ == "__main__":
    main()
