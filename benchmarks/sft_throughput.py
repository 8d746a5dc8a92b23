"""SFT step throughput on 7B-shaped Qwen2.5-VL layers: HF transformers vs ovlt bf16 vs ovlt FP8.

    python benchmarks/sft_throughput.py --out benchmarks/results/sft_throughput_h200.json  # GPU
    python benchmarks/sft_throughput.py --tiny --out /tmp/x.json                           # CPU smoke
    ... --profile-dir DIR   also profiles 2 steps per variant (kernel table, idle gaps;
                            OVLT_BENCH_TRACE=1 adds a Chrome trace)

Every variant trains the same model shape (Qwen2.5-VL-7B widths and the real 152,064 vocab,
cut to `--llm-layers` LLM layers and `--vision-layers` vision layers) on the same batch: `--samples`
samples of `--seq` tokens, each with one `--image`-px image (256 image tokens at 448 px) and the
answer half of the text trained on; vision tower + merger frozen, LLM trained (the recipe).
One timed unit = one full optimizer step (forward, backward, grad clip, Adam update). Steps run
back to back as the trainer runs them (each step's loss read once the next one is queued; see
`timed`); a step timed between two device syncs would leave the GPU idle while the host starts
the next one.
  hf                 transformers Qwen2_5_VLForConditionalGeneration, sdpa attention, bf16
                     params, fused torch AdamW, [samples, seq] padded batch already on the GPU.
  ovlt_bf16          the SFT trainer's own step (`ovlt.engine.train_step.train_step_async`): mcore DDP +
                     DistributedOptimizer (fp32 master weights), one packed THD micro-batch, pinned
                     as the trainer's DataLoader(pin_memory=True) delivers it, CUDA fast paths on.
  ovlt_bf16_noprefetch  A/B of one piece: the frozen tower runs inside each step's forward
                     instead of one step ahead (`train_step(prefetch=)`).
  ovlt_bf16_nofast   the same with OVLT_FASTPATHS=0: mcore's own fallbacks without apex/TE, no
                     fused optimizer step.
  ovlt_bf16_headbf16 A/B of one piece: LM-head dW accumulated in bf16 and added by DDP's hook.
  ovlt_bf16_autogc   A/B of one piece: Python's automatic garbage collection instead of the
                     trainer's scheduled one (`train.gc_interval`, automatic collection off)
  ovlt_bf16_noskip   A/B of one piece: the fused AdamW also reads and writes the blocks no
                     gradient has reached (every step here trains on the same batch, so ~95 %
                     of the embedding's rows are such blocks; real data leaves the share of the
                     vocabulary it never uses)
  ovlt_fp8           ovlt_bf16 with model.fp8=scaled_mm_tensor (ovlt `torch._scaled_mm` linears,
                     per-tensor current scaling) in the LLM; the frozen vision tower stays bf16
                     (its MLP width 3420 is not a multiple of 16, which _scaled_mm requires).
  ovlt_fp8_delayed   the same with model.fp8=scaled_mm_delayed (scales from an amax history;
                     the LLM's MLP fuses its SwiGLU with the FP8 casts, `ovlt.fp8.mlp`)
  ovlt_fp8_delayed_unfusedmlp  A/B of that piece: SwiGLU and FP8 casts as separate kernels
  ovlt_fp8_delayed_sepbias     A/B: the QKV bias added after the FP8 GEMM, not in its epilogue
  ovlt_fp8_delayed_nocache     A/B: each FP8 weight cast in its layer's forward, not once up
                               front per step (`model.fp8_weight_cache=false`)
  ovlt_bf16_noexpand, ovlt_fp8_delayed_noexpand  A/B: PyTorch's default allocator settings
                     instead of the trainer's expandable segments (`train.cuda_alloc_conf`)
  hf_expandable      HF under expandable segments (HF itself runs under PyTorch's default)
`update_s` = grad clip + optimizer update (CUDA events inside the step), `fwd_bwd_s` = the rest.
`alloc_events` (CUDA): the caching allocator's counters over the timed steps; a
`num_alloc_retries` is a cache flush that waits for the device, i.e. a host sync in the step.
`host_syncs` (CUDA): the synchronizing CUDA calls of one more step run after the timed ones
under torch's sync debug mode, "file:line: message" -> count (the ovlt step should make none).
`--repeats N` runs the variant list N times in one process, every other time reversed (ABBA), so
a drift of the machine within the run weighs on every variant alike; each variant's figures pool
the timed steps of all repeats, `speedups` gives each pair's ratio per repeat and pooled.
`gpu` (CUDA, where nvidia-smi runs): each timed step's mean SM clock, power and temperature,
sampled every `--telemetry-ms` and bounded by the host clock at which each step's numbers were
read (HF's reader returns after its forward, so its bounds are shifted by the backward).
FLOPs use `ovlt.engine.flops.train_step_flops` (same convention for every variant: causal LLM
attention, LM head on every token, frozen vision forward-only); MFU against the device's dense
bf16 peak (989 TFLOP/s for H100/H200). `losses` lists every step's loss: the ovlt variants
start from the same init.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import gc
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # also when imported (tests, gc_pause.py)

from _bench_util import with_host_syncs  # noqa: E402
from _gpu_telemetry import GpuTelemetry, per_step  # noqa: E402
from ovlt.utils.cuda_alloc import (EXPANDABLE, allocator_counters,  # noqa: E402
                                   resolve_alloc_conf, set_allocator_settings)
from ovlt.utils.device import HostCopy, StepClock  # noqa: E402
from ovlt.utils.io import atomic_write_json  # noqa: E402


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


class OptTimer:
    """Wraps a callable (the optimizer update) to record its GPU time with CUDA events (no
    syncs inside the step: they would expose host work that otherwise overlaps), or its wall
    time on the CPU."""

    def __init__(self, fn, dev):
        self.fn, self.dev, self.times, self._pending = fn, dev, [], []

    def __call__(self, *a, **k):
        if self.dev.type != "cuda":
            t0 = time.perf_counter()
            out = self.fn(*a, **k)
            self.times.append(time.perf_counter() - t0)
            return out
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        out = self.fn(*a, **k)
        e.record()
        self._pending.append((s, e))
        return out

    def median(self, first: int, count: int) -> float:
        """Median over calls first .. first + count - 1 (the timed steps)."""
        if self._pending:
            torch.cuda.synchronize()
            self.times += [s.elapsed_time(e) / 1e3 for s, e in self._pending]
            self._pending = []
        t = sorted(self.times[first:first + count])
        return t[len(t) // 2] if t else float("nan")


def profile_steps(step, path, n=2):
    """Run `n` steps under the torch profiler; write the top CUDA kernels by self time and the
    GPU-busy fraction (union of kernel intervals over the wall time) to `path` (.txt + .json)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    kern, by_name = [], {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            a, b = e.time_range.start, e.time_range.end
            kern.append((a, b, e.name))
            by_name[e.name] = by_name.get(e.name, 0.0) + (b - a)
    kern.sort()
    merged = []  # the union of the kernel intervals (GPU-busy time): [start, end, first, last]
    for a, b, name in kern:
        if merged and a <= merged[-1][1]:
            if b >= merged[-1][1]:
                merged[-1][1], merged[-1][3] = b, name
        else:
            merged.append([a, b, name, name])
    busy = sum(m[1] - m[0] for m in merged)
    span = (kern[-1][1] - kern[0][0]) if kern else 0.0
    # GPU-idle gaps: the largest, labelled by the kernels around them, where they fall in the
    # profiled span and the innermost host ops running at their middle; and all by size
    all_gaps = [(m2[0] - m1[1], m1[1], m2[0], m1[3], m2[2]) for m1, m2 in zip(merged, merged[1:])]
    gaps = sorted(all_gaps, reverse=True)[:40]
    cpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    gap_info = []
    for length, a, b, before, after in gaps:
        mid = (a + b) / 2
        cover = sorted((e.time_range.end - e.time_range.start, e.name) for e in cpu
                       if e.time_range.start <= mid <= e.time_range.end)
        gap_info.append({"ms": length / 1e3, "at_ms": (a - kern[0][0]) / 1e3,
                         "after_kernel": before[:90], "before_kernel": after[:90],
                         "host_ops": [name for _, name in cover[:4]]})
    bins = {}
    for lo, hi in ((0, 10), (10, 50), (50, 200), (200, 1e12)):
        sel = [g[0] for g in all_gaps if lo <= g[0] < hi]
        bins[f"{lo}-{hi if hi < 1e12 else 'inf'}us"] = {"count": len(sel) / n,
                                                         "ms": sum(sel) / 1e3 / n}
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:60]
    summary = {"steps": n, "wall_ms_per_step": wall * 1e3 / n,
               "gpu_busy_ms_per_step": busy / 1e3 / n, "kernel_span_ms_per_step": span / 1e3 / n,
               "kernels_ms_per_step": {k: v / 1e3 / n for k, v in top},
               "idle_gaps_by_size_per_step": bins, "largest_idle_gaps": gap_info}
    with open(path + ".json", "w") as f:
        json.dump(summary, f, indent=1)
    if os.environ.get("OVLT_BENCH_TRACE"):
        prof.export_chrome_trace(path + ".trace.json.gz")  # torch gzips by the suffix
    with open(path + ".txt", "w") as f:
        f.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=70,
                                          max_name_column_width=90))
    print(f"profile {os.path.basename(path)}: wall {summary['wall_ms_per_step']:.1f} ms/step, "
          f"GPU busy {summary['gpu_busy_ms_per_step']:.1f} ms/step", flush=True)
    for k, v in top[:25]:
        print(f"   {v / 1e3 / n:8.2f} ms  {k[:110]}")
    print(f"   idle gaps per step by size: {bins}")
    for gi in gap_info[:12]:
        print(f"   idle {gi['ms']:6.2f} ms at {gi['at_ms']:7.2f}: {gi['after_kernel'][:40]} -> "
              f"{gi['before_kernel'][:40]} during {' < '.join(gi['host_ops'])[:80]}")


LOSSES: dict = {}
HOST: dict = {}
STEP_MS: dict = {}
STEP_SEEN_DONE: dict = {}
ALLOC_EVENTS: dict = {}
HOST_SYNCS: dict = {}


def timed(step, warmup, iters, dev, profile_path=None, name=None, sync_probe=True):
    """Median and min step time, last loss. Steps run back to back as the trainer runs them:
    `step()` queues one step and returns a reader of its loss, called once the next step is
    queued (each reader waits for its own step only), so the host prepares step k+1 while the
    GPU still runs step k. Step k's time is the GPU-clock interval from its start event to step
    k+1's (`StepClock`: an idle GPU waiting for the host is counted, like the wall clock)."""
    clocks, losses, reader, queue_s, wait_s = [], [], None, [], []
    seen_done = [time.time()]  # host clock when each step's reader returned (GPU telemetry)
    for i in range(warmup + iters):
        if i == warmup:
            alloc0 = allocator_counters(dev)
        clocks.append(StepClock(dev).start())
        t0 = time.perf_counter()
        read = step()
        t1 = time.perf_counter()
        if reader is not None:
            losses.append(float(reader()))
            seen_done.append(time.time())
        queue_s.append(t1 - t0)
        wait_s.append(time.perf_counter() - t1)
        reader = read
    end = StepClock(dev).start()  # queued right behind the last step: its end
    losses.append(float(reader()))
    seen_done.append(time.time())
    # the allocator's events over the timed steps: a retry is a cache flush that waits for
    # the device (a host sync inside the step)
    ALLOC_EVENTS[name] = {k: v - alloc0[k] for k, v in allocator_counters(dev).items()}
    STEP_SEEN_DONE[name] = seen_done[warmup:]  # the timed steps' bounds: iters + 1 entries
    spans = list(zip(clocks, clocks[1:] + [end]))[warmup:]
    in_order = [a.seconds(until=b) for a, b in spans]
    STEP_MS[name] = [round(t * 1e3, 3) for t in in_order]  # the spread, step by step
    times = sorted(in_order)
    # host time to queue a step, and its wait for the previous step's loss: a step that
    # synchronised inside would queue in about its GPU time and never wait
    HOST[name] = {"queue_s": sorted(queue_s[warmup:])[iters // 2],
                  "wait_s": sorted(wait_s[warmup:])[iters // 2]}
    LOSSES[name] = losses  # per-step losses: the variants start from the same init
    if dev.type == "cuda" and sync_probe:  # one more step, under sync debug mode: where it waits
        syncs: list = []
        with_host_syncs(step, syncs)()
        HOST_SYNCS[name] = dict(collections.Counter(syncs).most_common(8))
    if profile_path and dev.type == "cuda":
        profile_steps(step, profile_path)
    return times[len(times) // 2], times[0], losses[-1]


def lazy_loss(loss: torch.Tensor):
    """A reader of `loss` that waits for the work queued so far only (see `timed`)."""
    copy = HostCopy(loss)
    return lambda: copy.tolist()[0]


def run_hf(args, m, samples, dev, name="hf"):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ovlt.models.qwen2_5_vl.hf_config import to_hf_config
    cfg = to_hf_config(m)
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)  # the same init in every repeat
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
        return lazy_loss(loss)
    res = timed(step, args.warmup, args.iters, dev, _prof_path(args, name), name, args.sync_probe)
    model = opt = None  # freed (not `del`: the closures above read these names)
    return res + (update_t.median(args.warmup, args.iters),)


def alloc_conf(variant: str) -> str:
    """The CUDA caching allocator settings a variant runs under: the ovlt variants the SFT
    trainer's (`train.cuda_alloc_conf=auto`: expandable segments), HF PyTorch's default as its
    users run it; `_noexpand` / `hf_expandable` swap them (A/B)."""
    if variant == "hf_expandable":
        return EXPANDABLE
    if variant.startswith("hf") or variant.endswith("_noexpand"):
        return "expandable_segments:False"
    return resolve_alloc_conf("auto", "sft")


def _prof_path(args, name):
    wanted = args.profile_variants is None or name in args.profile_variants.split(",")
    return os.path.join(args.profile_dir, name) if args.profile_dir and wanted else None


def _head_bf16(bundle):
    """A/B: the LM-head weight gradient accumulated in bf16 per logits chunk (448 MiB chunks)
    and added into main_grad by DDP's hook, as before the main_grad accumulation."""
    from ovlt.engine.lm_head import unwrap
    net = unwrap(bundle.chunks[0])
    from ovlt.engine import grad_routing
    grad_routing.set_writer(net.output_weight(), grad_routing.Writer.DDP_HOOK)
    net.ovlt_lm_head_chunk_bytes = None


def _unfused_fp8_mlp(bundle):
    """A/B: the FP8 MLP as mcore runs it, SwiGLU and the FP8 casts as separate kernels."""
    from ovlt.fp8.mlp import Fp8SwiGLUMLP
    for chunk in bundle.chunks:
        for mod in chunk.modules():
            if isinstance(mod, Fp8SwiGLUMLP):
                mod.fused_ok = lambda per_token_scale: False


def _adamw_updates_every_block(fn):
    """A/B: the fused AdamW reads and writes every block, also those no gradient has reached
    (`kernels.adamw.SKIP_IDLE_BLOCKS`)."""
    from unittest import mock

    from ovlt.kernels import adamw
    with mock.patch.object(adamw, "SKIP_IDLE_BLOCKS", False):
        return fn()


def _separate_fp8_bias(fn):
    """A/B: the FP8 linears' bias added after the GEMM (a separate pass) instead of in its
    epilogue."""
    from ovlt.fp8 import linear as fp8
    old, fp8.EPILOGUE_BIAS_DTYPES = fp8.EPILOGUE_BIAS_DTYPES, ()
    try:
        return fn()
    finally:
        fp8.EPILOGUE_BIAS_DTYPES = old


def run_ovlt(args, m, samples, dev, name="ovlt", tweak=None, prefetch=True, gc_interval=None):
    from ovlt.config import OptimizerConfig, TrainConfig
    from ovlt.data.packing import collate
    from ovlt.engine.gc_schedule import GCSchedule
    from ovlt.engine.model_setup import configure_fp8, wrap_model
    from ovlt.engine.optimizer import build_optimizer
    from ovlt.sft.train import mark_head_overwrites, sft_forward, sft_loss
    from ovlt.engine.train_step import train_step_async
    from ovlt.models.qwen2_5_vl.provider import build_model

    torch.manual_seed(0)
    if dev.type == "cuda":  # mcore's TP RNG tracker too: every ovlt variant gets the same init
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
        model_parallel_cuda_manual_seed(0)
    if m.fp8 != "none":
        # The model's _scaled_mm linears need every GEMM dim divisible by 16; the vision MLP's
        # [gate; up] width 2 x 3420 = 6840 is not, so the (frozen) vision tower stays bf16 and
        # FP8 covers the LLM, where the training FLOPs are.
        from ovlt.models.qwen2_5_vl import provider, specs
        orig = specs.vision_layer_spec
        provider.specs.vision_layer_spec = lambda cfg: orig(dataclasses.replace(cfg, fp8="none"))
    model = build_model(m)
    configure_fp8(model, m)
    tcfg = TrainConfig(freeze=["vision", "merger"], recompute=args.recompute)
    bundle = wrap_model(model, tcfg)
    if tweak is not None:
        tweak(bundle)
    mark_head_overwrites(bundle.chunks)  # as run_sft
    prec = "bf16" if dev.type == "cuda" else "fp32"
    opt = build_optimizer(bundle.chunks, OptimizerConfig(lr=1e-6, weight_decay=0.0), prec)
    mbs = [collate(samples)]  # one packed THD micro-batch of samples x seq tokens
    if dev.type == "cuda":
        mbs = [mb.pin_memory() for mb in mbs]  # as the trainer's DataLoader(pin_memory) gives
    update_t = OptTimer(opt.step, dev)
    opt.step = update_t  # grad clip + sharded Adam + param copy-back, timed

    steps_done = [0]

    def step():  # the next step trains on the same batch: its images are prefetched (frozen tower)
        queued = train_step_async(bundle.chunks, opt, mbs, sft_forward, sft_loss, device=dev,
                                  prefetch=mbs[0] if prefetch else None)
        steps_done[0] += 1
        gc_sched.tick(steps_done[0])  # where run_sft collects: right after queueing a step
        return lambda: queued.result().loss
    # Python's GC on the trainer's schedule (`train.gc_interval`)
    with GCSchedule(tcfg.gc_interval if gc_interval is None else gc_interval) as gc_sched:
        res = timed(step, args.warmup, args.iters, dev, _prof_path(args, name), name,
                    args.sync_probe)
    bundle = opt = model = None  # freed (not `del`: the closure above reads these names)
    return res + (update_t.median(args.warmup, args.iters),)


def _without_fastpaths(fn):
    """Run `fn` with OVLT_FASTPATHS=0 (mcore's own apex fallbacks, unfused activations)."""
    from ovlt.compat import cuda_fastpaths
    old = os.environ.get("OVLT_FASTPATHS")
    os.environ["OVLT_FASTPATHS"] = "0"
    cuda_fastpaths.uninstall()
    try:
        return fn()
    finally:
        if old is None:
            os.environ.pop("OVLT_FASTPATHS")
        else:
            os.environ["OVLT_FASTPATHS"] = old
        cuda_fastpaths.uninstall()


def pooled(runs: list, tokens: int, flops: float, peak: float | None) -> dict:
    """One variant's result over its repeats: the median and min over every timed step of every
    repeat (`step_ms`), the median update time; each repeat's own figures under `repeats`."""
    ok = [r for r in runs if "step_s" in r]
    if not ok:
        return runs[-1]
    steps = sorted(t / 1e3 for r in ok for t in r["step_ms"])
    med = steps[len(steps) // 2]
    upd = sorted(r["update_s"] for r in ok)[len(ok) // 2]
    out = {"step_s": med, "step_s_min": steps[0], "update_s": upd, "fwd_bwd_s": med - upd,
           "loss": ok[-1]["loss"], "tokens_per_s": tokens / med, "tflops": flops / med / 1e12}
    out["mfu"] = out["tflops"] * 1e12 / peak if peak else None
    for k in ("peak_mem_gib", "peak_reserved_gib"):
        if k in ok[0]:
            out[k] = max(r[k] for r in ok)
    if ok[0].get("alloc_events") is not None:  # summed over the repeats' timed steps
        out["alloc_conf"], out["host_syncs"] = ok[0]["alloc_conf"], ok[0].get("host_syncs")
        out["alloc_events"] = {k: sum(r["alloc_events"][k] for r in ok)
                               for k in ok[0]["alloc_events"]}
    out.update(losses=ok[0]["losses"], host=ok[-1]["host"], step_ms=ok[0]["step_ms"])
    if "gpu" in ok[0]:
        out["gpu"] = ok[0]["gpu"]
    if len(runs) > 1:
        out["repeats"] = [{k: r.get(k) for k in ("step_s", "step_s_min", "update_s", "step_ms",
                                                  "losses", "gpu", "alloc_events", "error")
                           if k in r} for r in runs]
    return out


def speedups(runs: dict) -> dict:
    """"A vs B" = B's step time / A's step time, per repeat (the two ran next to each other)
    and over the pooled steps of all repeats, for every ordered pair of variants that ran."""
    out = {}
    for a, ra in runs.items():
        for b, rb in runs.items():
            pairs = [(x, y) for x, y in zip(ra, rb) if "step_s" in x and "step_s" in y]
            if a == b or not pairs:
                continue
            ta = sorted(t for x, _ in pairs for t in x["step_ms"])
            tb = sorted(t for _, y in pairs for t in y["step_ms"])
            out[f"{a} vs {b}"] = {"per_repeat": [y["step_s"] / x["step_s"] for x, y in pairs],
                                  "pooled": tb[len(tb) // 2] / ta[len(ta) // 2]}
    return out


def add_shape_args(ap, iters: int) -> None:
    """The model / batch / timing arguments `model_cfg`, `make_samples` and `run_ovlt` read."""
    ap.add_argument("--llm-layers", type=int, default=4)
    ap.add_argument("--vision-layers", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--image", type=int, default=448)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=iters)
    ap.add_argument("--no-sync-probe", dest="sync_probe", action="store_false",
                    help="skip the extra step under torch's sync debug mode (GPU only)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_args(ap, iters=6)
    ap.add_argument("--repeats", type=int, default=1,
                    help="run the variants this many times, every other time in reverse order "
                         "(ABBA); results pool all timed steps, `speedups` pairs each repeat")
    ap.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    ap.add_argument("--variants", default="hf,ovlt_bf16,ovlt_fp8")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run)")
    ap.add_argument("--profile-dir", default=None,
                    help="also profile 2 steps per variant: <dir>/<variant>.{txt,json}")
    ap.add_argument("--profile-variants", default=None,
                    help="comma list: profile only these variants (default: all)")
    ap.add_argument("--telemetry-ms", type=int, default=100,
                    help="sample the GPU's SM clock / power / temperature this often (nvidia-smi)"
                         " and give each timed step their means under `gpu`; 0 = off")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.tiny:
        args.seq, args.image = min(args.seq, 128), min(args.image, 112)

    from ovlt.distributed import init_distributed
    from ovlt.engine.flops import peak_flops, train_step_flops
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
               "hf_expandable": lambda: run_hf(args, m, samples, dev, "hf_expandable"),
               "ovlt_bf16_noexpand": lambda: run_ovlt(args, m, samples, dev,
                                                      "ovlt_bf16_noexpand"),
               "ovlt_fp8_delayed_noexpand": lambda: run_ovlt(
                   args, model_cfg(args, "scaled_mm_delayed"), samples, dev,
                   "ovlt_fp8_delayed_noexpand"),
               "ovlt_bf16": lambda: run_ovlt(args, m, samples, dev, "ovlt_bf16"),
               "ovlt_bf16_noprefetch": lambda: run_ovlt(args, m, samples, dev,
                                                        "ovlt_bf16_noprefetch", prefetch=False),
               "ovlt_bf16_nofast": lambda: _without_fastpaths(
                   lambda: run_ovlt(args, m, samples, dev, "ovlt_bf16_nofast")),
               "ovlt_bf16_headbf16": lambda: run_ovlt(args, m, samples, dev,
                                                      "ovlt_bf16_headbf16", _head_bf16),
               "ovlt_bf16_autogc": lambda: run_ovlt(args, m, samples, dev, "ovlt_bf16_autogc",
                                                    gc_interval=0),
               "ovlt_bf16_noskip": lambda: _adamw_updates_every_block(
                   lambda: run_ovlt(args, m, samples, dev, "ovlt_bf16_noskip")),
               "ovlt_fp8": lambda: run_ovlt(args, model_cfg(args, "scaled_mm_tensor"), samples,
                                            dev, "ovlt_fp8"),
               "ovlt_fp8_delayed": lambda: run_ovlt(args, model_cfg(args, "scaled_mm_delayed"),
                                                    samples, dev, "ovlt_fp8_delayed"),
               "ovlt_fp8_delayed_unfusedmlp": lambda: run_ovlt(
                   args, model_cfg(args, "scaled_mm_delayed"), samples, dev,
                   "ovlt_fp8_delayed_unfusedmlp", _unfused_fp8_mlp),
               "ovlt_fp8_delayed_nocache": lambda: run_ovlt(
                   args, dataclasses.replace(model_cfg(args, "scaled_mm_delayed"),
                                             fp8_weight_cache=False),
                   samples, dev, "ovlt_fp8_delayed_nocache"),
               "ovlt_fp8_delayed_sepbias": lambda: _separate_fp8_bias(lambda: run_ovlt(
                   args, model_cfg(args, "scaled_mm_delayed"), samples, dev,
                   "ovlt_fp8_delayed_sepbias"))}
    for flag, names in (("--variants", args.variants),
                        ("--profile-variants", args.profile_variants or "")):
        unknown = [n for n in names.split(",") if n and n not in runners]
        if unknown:
            ap.error(f"{flag}: unknown variant(s) {unknown}; known: {sorted(runners)}")
    if args.profile_dir:
        os.makedirs(args.profile_dir, exist_ok=True)
    os.environ.setdefault("OVLT_FP8_COMPILE", "1")

    def run_variant(v):
        if v.startswith("ovlt_fp8") and dev.type != "cuda":
            return {"skipped": "FP8 needs a CUDA device"}
        conf = alloc_conf(v)
        if dev.type == "cuda":
            torch.cuda.empty_cache()  # the previous variant's segments: the new settings
            set_allocator_settings(conf)  # then govern all of this variant's memory
            torch.cuda.reset_peak_memory_stats()
        try:
            med, best, loss, upd = runners[v]()
            r = {"step_s": med, "step_s_min": best, "update_s": upd, "loss": loss}
            if dev.type == "cuda":
                r["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
                r["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2 ** 30
                r.update(alloc_conf=conf, alloc_events=ALLOC_EVENTS.get(v),
                         host_syncs=HOST_SYNCS.get(v))
        except Exception as e:  # noqa: BLE001 - record and continue with the next variant
            import traceback
            traceback.print_exc()
            return {"error": f"{type(e).__name__}: {e}"[:500]}
        r.update(losses=LOSSES.get(v), host=HOST.get(v), step_ms=STEP_MS.get(v))
        if telemetry.samples and v in STEP_SEEN_DONE:
            r["gpu"] = per_step(telemetry.samples, STEP_SEEN_DONE[v])
        return r

    telemetry = GpuTelemetry(str(torch.cuda.get_device_properties(dev).uuid)
                             if dev.type == "cuda" else "", args.telemetry_ms
                             if dev.type == "cuda" else 0)
    variants = args.variants.split(",")
    runs = {v: [] for v in variants}
    try:
        for rep in range(args.repeats):
            # ABBA: every other repeat runs the variants in reverse, so a drift of the machine
            # over the run (clocks, power) weighs on each variant alike, not on the later ones
            for v in variants if rep % 2 == 0 else variants[::-1]:
                runs[v].append(run_variant(v))
                res.setdefault("run_order", []).append(v)
                res["variants"][v] = pooled(runs[v], tokens, flops.total, peak)
                print(v, f"repeat {rep}", json.dumps(runs[v][-1]), flush=True)
                gc.collect()
                if rep == 0 and v == variants[-1]:
                    args.profile_dir = None  # profiles come from the first repeat only
                res["speedups"] = speedups(runs)
                atomic_write_json(args.out, res)  # after every variant: a killed run keeps them
    finally:
        telemetry.close()  # the sampler must not outlive the benchmark
    for name, sp in res["speedups"].items():
        print(f"{name}: pooled {sp['pooled']:.3f}x, per repeat "
              f"{', '.join(f'{x:.3f}' for x in sp['per_repeat'])}", flush=True)
    for v, r in res["variants"].items():  # one short line each: the device log's tail
        if "step_s" in r:
            print(f"{v}: {r['step_s'] * 1e3:.1f} ms, host queue/wait "
                  f"{r['host']['queue_s'] * 1e3:.1f}/{r['host']['wait_s'] * 1e3:.1f} ms, "
                  f"alloc {r.get('alloc_conf')} {r.get('alloc_events')}, "
                  f"reserved {r.get('peak_reserved_gib', float('nan')):.1f} GiB, "
                  f"host syncs {r.get('host_syncs')}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
