"""The SFT trainer: packed image+text micro-batches through the mcore Qwen2.5-VL with mcore
DDP + DistributedOptimizer, per-token loss over the global batch, warmup+cosine LR, atomic
resumable checkpoints, per-step metrics, and an HF export at the end.

Outputs under `sft.train.save_dir`: `metrics.jsonl`, `logs/`, `step_*/` checkpoints + `latest`,
`final_hf/` (a transformers-loadable directory), `profile/` with `--profile`.
Re-running the same command resumes from `latest` (and only re-exports if training is done).
Batching: each step takes `train.global_batch_size` samples (a seeded shuffle per epoch), split
over DP ranks and packed into micro-batches of at most `data.pack_tokens` tokens (default
`data.max_length`) by the data pipeline; `train.micro_batch_size` is not used by SFT (packing
decides the micro-batch count), the loss is the per-token mean over the whole global batch.
A step's numbers are read and logged once the next step is queued (`train_step_async`), so the
GPU does not idle while the host starts a step; before a checkpoint or an exit they are read at
once, so a checkpoint never covers a step missing from `metrics.jsonl`.
Samples whose images fail to decode in a worker are dropped from their micro-batch, counted
(`skipped_samples` per step in metrics.jsonl and in the summary) and logged with file, record
and reason; a step whose global batch lost every sample stops the run with a `DataError`
naming them (it would train on nothing and log a loss of 0).
A checkpoint records a fingerprint of the data it was trained on; resuming a save_dir with
different data is refused (`ovlt.data.fingerprint.check_same_data`): start a new save_dir instead.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from ovlt.logging import get_logger
from ovlt.engine.flops import peak_flops, train_step_flops
from ovlt.engine.gc_schedule import GCSchedule
from ovlt.engine.grad_routing import (Writer, first_write_replaces, forget_layout,
                                      mark_overwrites, route)
from ovlt.engine.loop import TrainLoop
from ovlt.engine.lr_schedule import LRSchedule
from ovlt.engine.metrics_logger import MetricsLogger, memory_gb
from ovlt.engine.model_setup import build_vl_model, configure_fp8, wrap_model
from ovlt.engine.optimizer import build_optimizer
from ovlt.engine.lm_head import (flat_hidden, host_side_inputs, loss_rows, tp_group,
                                    tp_size, unwrap)
from ovlt.engine.profiler import StepProfiler
from ovlt.data.fingerprint import check_same_data
from ovlt.sft.data import Position, SFTStream, build_sft_dataset, data_fingerprint
from ovlt.engine.train_step import train_step_async
from ovlt.utils.device import default_device, to_device_async

log = get_logger(__name__)


# ----------------------------------------------------------------------- forward / loss
def sft_forward(model, batch):
    """The micro-batch's summed token loss (fp32 scalar) on the last PP stage, hidden states
    elsewhere. With an unpadded vocab the LM head runs in `ovlt.kernels.fused_nll_loss` on the loss
    tokens only (no [T, V] logits, ~half the head's GEMMs); a padded head (TP vocab padding)
    takes the model's own logits + cross-entropy path."""
    net = unwrap(model)
    dev = next(model.parameters()).device
    b = batch.to(dev)
    kw = dict(input_ids=b.input_ids, position_ids=b.position_ids, pixel_values=b.pixel_values,
              image_features=b.image_features, **host_side_inputs(net, batch))
    mask = b.loss_mask.reshape(-1).float()
    if not net.post_process:
        return model(**kw)
    if net.output_weight().shape[0] * tp_size() != net.vocab_size:
        return (model(**kw, labels=b.labels).float().reshape(-1) * mask).sum()
    from ovlt.kernels import fused_nll_loss

    h = flat_hidden(model(**kw, return_hidden=True))
    rows = to_device_async(loss_rows(batch.loss_mask), dev)  # found on the host: no sync
    w = net.output_weight()
    into = w.main_grad if route(w).writer is Writer.LOSS_KERNEL else None
    # a head marked by `mark_head_overwrites` was not zeroed: its step's first write replaces
    fresh = into is not None and first_write_replaces(w)
    loss, _ = fused_nll_loss(h.index_select(0, rows), w, b.labels.reshape(-1)[rows], mask[rows],
                             tp_group=tp_group(), dw_into=into, dw_into_fresh=fresh,
                             chunk_bytes=getattr(net, "ovlt_lm_head_chunk_bytes", None))
    return loss


def mark_head_overwrites(chunks) -> int:
    """Let the SFT loss overwrite the LM head's main_grad on its first write of a step, so
    `grad_routing.zero_grad_buffers` skips its slice (V x H fp32: 2.2 GB at 7B). Only for a
    head whose gradient is nothing but `sft_forward`'s fused loss writing into main_grad
    (`Writer.LOSS_KERNEL`, unpadded vocab); GRPO's head gradient arrives through DDP's
    hook, which adds, so only the SFT trainer marks. Returns the number of heads marked."""
    n = 0
    for ddp in chunks:
        net = unwrap(ddp)
        if not getattr(net, "post_process", False):
            continue
        w = net.output_weight()
        if route(w).writer is Writer.LOSS_KERNEL and w.shape[0] * tp_size() == net.vocab_size:
            mark_overwrites(w)
            forget_layout(ddp)
            n += 1
    return n


def sft_loss(batch, loss_sum):
    """(loss sum, loss-token count, stats) for `train_step` from `sft_forward`'s output. The
    count stays a host scalar: mcore adds it into its device counter without a copy."""
    return loss_sum, batch.loss_mask.float().sum(), {}


def batch_flops(model_cfg, micro_batches, freeze) -> tuple[float, int]:
    """(training FLOPs, tokens) of this rank's micro-batches."""
    seqlens, grids, tokens = [], [], 0
    for b in micro_batches:
        cu = b.cu_seqlens.tolist()
        seqlens.extend(cu[i + 1] - cu[i] for i in range(len(cu) - 1))
        tokens += b.num_tokens
        if b.image_grid_thw is not None:
            grids.extend(tuple(g) for g in b.image_grid_thw.tolist())
    return train_step_flops(model_cfg, seqlens, grids, freeze).total, tokens


class _Skips:
    """Samples dropped in the workers (`PackedBatch.skipped`): each bad record enters the
    dataset's SkipReport (logged) once, however many epochs meet it again."""

    def __init__(self, report):
        self.report, self.seen = report, set()

    def take(self, micro_batches) -> list:
        got = [s for b in micro_batches for s in b.skipped]
        for _id, file, index, reason in got:
            if (file, index) not in self.seen:
                self.seen.add((file, index))
                self.report.reject(file, index, reason)
        return got


def all_skipped_error(step: int, skipped: list, n_global: int):
    from ovlt.data.formats import DataError
    eg = "; ".join(f"{f}: record {i}: {why}" for _id, f, i, why in skipped[:3]) or \
        "(none on this rank)"
    return DataError(
        f"SFT step {step}: all {n_global} samples of the global batch were skipped (their "
        f"images failed to decode), so the step has nothing to train on; e.g. {eg}. Fix or "
        f"remove these records (`ovlt data check FILE` lists every one)")


# ----------------------------------------------------------------------- the loop
def run_sft(cfg, profile_steps: Optional[list[int]] = None) -> dict:
    """Train; expects `init_distributed` done. Returns a summary dict (on every rank)."""
    from megatron.core import parallel_state as ps

    t, o = cfg.sft.train, cfg.sft.optimizer
    rank, world = dist.get_rank(), dist.get_world_size()
    device = default_device()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()

    ds = build_sft_dataset(cfg.data)
    budget = cfg.data.pack_tokens or cfg.data.max_length
    stream = SFTStream(ds, t.global_batch_size, budget, dp_rank, dp, seed=cfg.data.seed,
                       num_workers=cfg.data.num_workers,
                       pad_to_multiple=cfg.parallel.tensor_parallel
                       if cfg.parallel.sequence_parallel else 1)
    total_steps = t.max_steps or max(1, int(math.ceil(t.epochs * stream.steps_per_epoch)))
    fingerprint = data_fingerprint(ds)
    loop = TrainLoop(t, t.save_dir, total_steps)  # before the model: a refusal costs nothing
    check_same_data(loop.saved_state, fingerprint, loop.save_dir, kind="SFT data",
                    source=f"data.sft_files={list(cfg.data.sft_files)}",
                    save_key="sft.train.save_dir")
    skips = _Skips(ds.report)

    model = build_vl_model(cfg, t.precision)
    configure_fp8(model, cfg.model)
    bundle = wrap_model(model, t, o.use_distributed_optimizer)
    mark_head_overwrites(bundle.chunks)
    optimizer = build_optimizer(bundle.chunks, o, t.precision)
    sched = LRSchedule(o, total_steps)

    start_step, pos = loop.start_step, Position()
    st = loop.resume(bundle.chunks, optimizer, is_writer=rank == 0)
    if st is not None:
        pos = Position(int(st["epoch"]), int(st["step_in_epoch"]))
        if int(st.get("total_steps", total_steps)) != total_steps:
            log.warning("checkpoint planned %s steps, this run %d", st.get("total_steps"),
                        total_steps)
    logger = MetricsLogger(loop.save_dir, rank == 0, total_steps, tensorboard=t.tensorboard,
                           wandb=t.wandb, run_name="sft", start_step=start_step)
    prof = StepProfiler(profile_steps if profile_steps is not None else t.profile_steps,
                        loop.save_dir, rank)
    peak = peak_flops(torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    log.info("SFT: %d samples, %d steps/epoch, %d total steps (start %d), global batch %d, "
             "token budget %d, world %d (tp %d pp %d dp %d)", len(ds), stream.steps_per_epoch,
             total_steps, start_step, t.global_batch_size, budget, world,
             cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, dp)

    def state(step, p):
        return {"step": step, "epoch": p.epoch, "step_in_epoch": p.step_in_epoch,
                "consumed_samples": step * t.global_batch_size, "total_steps": total_steps,
                "world_size": world, "tp": cfg.parallel.tensor_parallel,
                "pp": cfg.parallel.pipeline_parallel, "dp": dp, "schedule": sched.state_dict(),
                "data": fingerprint}

    def summary(steps, final_hf=None, exited_early=False):
        return {"steps": steps, "start_step": start_step, "trained_steps": steps - start_step,
                "skipped_samples": skipped_total, "final_loss": last.get("loss"),
                "save_dir": str(loop.save_dir), "final_hf": str(final_hf) if final_hf else None,
                "exited_early": exited_early}

    last = {"loss": None}
    skipped_total = 0
    it = stream.iterate(pos) if start_step < total_steps else iter(())
    upcoming = next(it, None)  # one step ahead: its first micro-batch's images are prefetched
    pending = None  # the step queued before this one, its numbers not read yet

    def finish(queued) -> None:
        """Read one queued step's numbers (waits for that step's GPU work only) and log them."""
        nonlocal last, skipped_total
        done_step, p, lr, step_skips, queued_step = queued
        res = queued_step.result()
        gflops, gtokens = res.totals["batch_flops"], res.totals["batch_tokens"]
        n_skipped = int(res.totals["batch_skipped"])
        if res.totals["batch_samples"] == 0:  # same global numbers on every rank: all raise
            raise all_skipped_error(done_step, step_skips, n_skipped)
        if n_skipped:
            log.warning("step %d: %d sample(s) skipped (images failed to decode), trained on %d",
                        done_step, n_skipped, int(res.totals["batch_samples"]))
        skipped_total += n_skipped
        tflops = gflops / res.time_s / world / 1e12
        rec = {"loss": res.loss, "grad_norm": res.grad_norm, "lr": lr, "tokens": int(gtokens),
               "loss_tokens": res.tokens, "tokens_per_s": gtokens / res.time_s,
               "tflops": tflops, "mfu": (tflops * 1e12 / peak) if peak else None,
               "step_time_s": res.time_s, "skipped": res.skipped,
               "skipped_samples": n_skipped, "epoch": p.epoch}
        rec.update(memory_gb(device))
        if done_step % t.log_interval == 0 or done_step == total_steps:
            logger.log(done_step, rec)
        last = rec

    with GCSchedule(t.gc_interval) as gc_sched:
        for step in range(start_step, total_steps):
            pos, mbs = upcoming
            upcoming = next(it) if step + 1 < total_steps else None
            lr = sched.apply(optimizer, step)
            prof.step_begin(step + 1)  # 1-based, like the log lines
            fl, toks = batch_flops(cfg.model, mbs, t.freeze)
            step_skips = skips.take(mbs)
            n_samples = sum(1 for b in mbs for i in b.sample_ids if i != "<pad>")
            # every TP/PP rank of a replica sees the same batch: summed over DP with the loss
            queued = (step + 1, pos, lr, step_skips, train_step_async(
                bundle.chunks, optimizer, mbs, sft_forward, sft_loss, device=device,
                prefetch=upcoming[1][0] if upcoming and upcoming[1] else None,
                host_stats={"batch_flops": fl, "batch_tokens": float(toks),
                            "batch_samples": float(n_samples),
                            "batch_skipped": float(len(step_skips))}))
            prof.step_end(step + 1)
            # the previous step is read only now that this one is queued: no idle GPU in between
            if pending is not None:
                finish(pending)
            pending = queued
            save, leave = loop.save_due(step + 1), loop.exit_due(step + 1)
            if save or leave or step + 1 == total_steps:
                finish(pending)  # a checkpoint never covers a step missing from metrics.jsonl
                pending = None
            if save:
                loop.save(step + 1, state(step + 1, pos))
            gc_sched.tick(step + 1)
            if leave:
                loop.save_unless_saved(step + 1, state(step + 1, pos))
                logger.close()
                log.info("train.exit_interval=%d: exiting at step %d; re-run to resume",
                         t.exit_interval, step + 1)
                return summary(step + 1, exited_early=True)
    logger.close()
    if skips.seen:
        log.warning("SFT: %d record(s) skipped during training (%d sample-steps): %s",
                    len(skips.seen), skipped_total, ds.report.summary())
    hf_dir = loop.finish(state(total_steps, pos), bundle.module, cfg.model)
    return summary(total_steps, final_hf=hf_dir)
