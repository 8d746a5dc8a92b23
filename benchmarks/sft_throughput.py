"""SFT step throughput on 7B-shaped Qwen2.5-VL layers: HF transformers vs ovlt bf16 vs ovlt FP8.

    python benchmarks/sft_throughput.py --out benchmarks/results/sft_throughput_h100.json  # H100
    python benchmarks/sft_throughput.py --tiny --out /tmp/x.json                           # CPU smoke

Every variant trains the same model shape (Qwen2.5-VL-7B widths and the real 152,064 vocab, cut
to `--llm-layers` LLM layers and `--vision-layers` vision layers) on the same batch: `--samples`
samples of `--seq` tokens, each with one `--image`-px image (256 image tokens at 448 px) and the
answer half of the text trained on; vision tower + merger frozen, LLM trained (the recipe).
One timed unit = one full optimizer step (forward, backward, grad clip, Adam update).
  hf        transformers Qwen2_5_VLForConditionalGeneration, sdpa attention, bf16 params,
            fused torch AdamW, [samples, seq] padded batch (no padding needed here).
  ovlt_bf16 the SFT trainer's own step (`ovlt.training.step.train_step`): mcore DDP +
            DistributedOptimizer (fp32 master weights), one packed THD micro-batch.
  ovlt_fp8  the same with model.fp8=scaled_mm_tensor (ovlt `torch._scaled_mm` linears,
            compiled casts) in the LLM; the frozen vision tower stays bf16 (its MLP width 6840
            is not a multiple of 16, which _scaled_mm requires). Transformer Engine cannot be
            carried to the device.
`update_s` = grad clip + optimizer update (timed inside the step), `fwd_bwd_s` = the rest.
FLOPs use `ovlt.training.flops.train_step_flops` (same convention for every variant: causal LLM
attention, frozen vision forward-only); MFU against the H100's 989 TFLOP/s dense bf16 peak.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def model_cfg(args, fp8="none"):
    from ovlt.config import CONFIG_ROOT, load_config
    name = "tiny.yaml" if args.tiny else "qwen2_5_vl_7b.yaml"
    m = load_config(CONFIG_ROOT / "model" / name).model
    m.num_layers = args.llm_layers
    m.vision.depth = args.vision_layers
    # the real tower has full attention every 8th layer
    m.vision.fullatt_block_indexes = [i for i in range(args.vision_layers) if i % 8 == 7] or [0]
    m.transformer_impl, m.fp8 = "local", fp8
    m.params_dtype = "bf16" if torch.cuda.is_available() else "fp32"
    return m


def make_samples(args, m):
    from ovlt.data.packing import make_sample
    g = torch.Generator().manual_seed(0)
    side = args.image // 14
    n_img_tok = side * side // 4
    out = []
    for i in range(args.samples):
        n_text = args.seq - n_img_tok - 2
        text = torch.randint(1000, 100000, (n_text,), generator=g)
        ids = torch.cat([torch.tensor([m.vision_start_token_id]),
                         torch.full((n_img_tok,), m.image_token_id),
                         torch.tensor([m.vision_end_token_id]), text])
        mask = torch.zeros(args.seq, dtype=torch.long)
        mask[args.seq - n_text // 2:] = 1  # the answer half is trained on
        pv = torch.randn(side * side, 3 * 2 * 14 * 14, generator=g)
        out.append(make_sample(ids, mask, pv, [(1, side, side)], id=f"s{i}"))
    return out


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


class OptTimer:
    """Wraps a callable (the optimizer update) to record its synchronised wall time."""

    def __init__(self, fn, dev):
        self.fn, self.dev, self.times = fn, dev, []

    def __call__(self, *a, **k):
        _sync(self.dev)
        t0 = time.perf_counter()
        out = self.fn(*a, **k)
        _sync(self.dev)
        self.times.append(time.perf_counter() - t0)
        return out

    def median(self, last: int) -> float:
        t = sorted(self.times[-last:])
        return t[len(t) // 2] if t else float("nan")


def timed(step, warmup, iters, dev):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], times[0], float(loss)


def run_hf(args, m, samples, dev):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ovlt.models.qwen2_5_vl.hf_config import to_hf_config
    cfg = to_hf_config(m)
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            model = Qwen2_5_VLForConditionalGeneration(cfg).to(dtype)
    finally:
        torch.set_default_dtype(old)
    model.train()
    model.model.visual.requires_grad_(False)  # vision tower + merger frozen (recipe)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0, fused=dev.type == "cuda")
    ids = torch.stack([s.input_ids for s in samples]).to(dev)
    labels = torch.stack([torch.where(s.token_mask.bool(), s.input_ids,
                                      torch.full_like(s.input_ids, -100)) for s in samples]).to(dev)
    pv = torch.cat([s.pixel_values for s in samples]).to(dev, dtype)
    grid = torch.cat([s.image_grid_thw for s in samples]).to(dev)

    def update():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    update_t = OptTimer(update, dev)

    def step():
        loss = model(input_ids=ids, pixel_values=pv, image_grid_thw=grid, labels=labels).loss
        loss.backward()
        update_t()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    res = timed(step, args.warmup, args.iters, dev)
    del model, opt
    return res + (update_t.median(args.iters),)


def run_ovlt(args, m, samples, dev):
    from ovlt.config import OptimizerConfig, TrainConfig
    from ovlt.data.packing import collate
    from ovlt.training.model_setup import configure_fp8, wrap_model
    from ovlt.training.optimizer import build_optimizer
    from ovlt.training.sft import sft_forward, sft_loss
    from ovlt.training.step import train_step
    from ovlt.models.qwen2_5_vl.provider import build_model

    torch.manual_seed(0)
    if m.fp8 != "none":
        # The model's _scaled_mm linears need every GEMM dim divisible by 16; the vision MLP's
        # [gate; up] width 2 x 3420 = 6840 is not, so the (frozen) vision tower stays bf16 and
        # FP8 covers the LLM, where the training FLOPs are.
        import dataclasses

        from ovlt.models.qwen2_5_vl import provider, specs
        orig = specs.vision_layer_spec
        provider.specs.vision_layer_spec = lambda cfg: orig(dataclasses.replace(cfg, fp8="none"))
    model = build_model(m)
    configure_fp8(model, m)
    tcfg = TrainConfig(freeze=["vision", "merger"], recompute=args.recompute)
    bundle = wrap_model(model, tcfg)
    prec = "bf16" if dev.type == "cuda" else "fp32"
    opt = build_optimizer(bundle.chunks, OptimizerConfig(lr=1e-6, weight_decay=0.0), prec)
    mbs = [collate(samples)]  # one packed THD micro-batch of samples x seq tokens
    update_t = OptTimer(opt.step, dev)
    opt.step = update_t  # grad clip + sharded Adam + param copy-back, timed

    def step():
        return train_step(bundle.chunks, opt, mbs, sft_forward, sft_loss, device=dev).loss
    res = timed(step, args.warmup, args.iters, dev)
    del bundle, opt, model
    return res + (update_t.median(args.iters),)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llm-layers", type=int, default=4)
    ap.add_argument("--vision-layers", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--image", type=int, default=448)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    ap.add_argument("--variants", default="hf,ovlt_bf16,ovlt_fp8")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.tiny:
        args.seq, args.image = min(args.seq, 128), min(args.image, 112)

    from ovlt.distributed import init_distributed
    from ovlt.training.flops import peak_flops, train_step_flops
    info = init_distributed()
    dev = info.device
    m = model_cfg(args)
    samples = make_samples(args, m)
    grids = [tuple(s.image_grid_thw[0].tolist()) for s in samples]
    flops = train_step_flops(m, [args.seq] * args.samples, grids, ["vision", "merger"])
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    peak = peak_flops(name)
    tokens = args.samples * args.seq
    res = {"date": datetime.date.today().isoformat(), "device": name, "torch": torch.__version__,
           "config": vars(args), "tokens_per_step": tokens,
           "model_flops_per_step": flops.total,
           "flops_breakdown": {"vision": flops.vision, "merger": flops.merger, "llm": flops.llm},
           "peak_flops": peak, "variants": {}}
    runners = {"hf": lambda: run_hf(args, m, samples, dev),
               "ovlt_bf16": lambda: run_ovlt(args, m, samples, dev),
               "ovlt_fp8": lambda: run_ovlt(args, model_cfg(args, "scaled_mm_tensor"), samples, dev)}
    os.environ.setdefault("OVLT_FP8_COMPILE", "1")
    for v in args.variants.split(","):
        if v == "ovlt_fp8" and dev.type != "cuda":
            res["variants"][v] = {"skipped": "FP8 needs a CUDA device"}
            continue
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            med, best, loss, upd = runners[v]()
            r = {"step_s": med, "step_s_min": best, "update_s": upd,
                 "fwd_bwd_s": med - upd, "loss": loss, "tokens_per_s": tokens / med,
                 "tflops": flops.total / med / 1e12}
            r["mfu"] = r["tflops"] * 1e12 / peak if peak else None
            if dev.type == "cuda":
                r["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        except Exception as e:  # noqa: BLE001 - record and continue with the next variant
            import traceback
            traceback.print_exc()
            r = {"error": f"{type(e).__name__}: {e}"[:500]}
        res["variants"][v] = r
        print(v, json.dumps(r), flush=True)
        gc.collect()
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
