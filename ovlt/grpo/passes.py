"""The model-facing half of a GRPO step: log-prob passes and the policy-update loss.

Both run through `ovlt.engine.train_step.train_step` (megatron-core schedules, TP/PP/DP), with the
model returning final hidden states and the LM head applied by the fused kernels, so the
[tokens x vocab] logits are never built:
- `logprob_pass`: forward only; per-token log p(target) at the sampling temperature, stored on
  each micro-batch (`old_logprobs` / `ref_logprobs`).
- `update`: one optimizer step with `ovlt.kernels.fused_grpo_loss` (PPO clip + dual clip + KL).
  train_step normalises by the token count of the whole global batch, so the loss function
  returns token_mean x tokens (a per-token sum) and the update is the token-mean GRPO loss.
"""
from __future__ import annotations

import contextlib

import torch

from ovlt.grpo.batch import RLMicroBatch
from ovlt.engine.lm_head import flat_hidden, host_side_inputs, loss_rows, tp_group, unwrap
from ovlt.engine.train_step import PendingStep, StepResult, train_step, train_step_async
from ovlt.utils.device import to_device_async


def _device(model):
    return next(model.parameters()).device


def loss_rows_picker(mb: RLMicroBatch, dev):
    """(rows, pick): the micro-batch's loss-token rows on `dev`, found on the host from its
    (CPU) loss mask, and `pick(x)`, a [1, T] field at those rows on `dev`: host tensors are
    indexed on the host and copied without draining the stream, device ones (the log-prob
    passes' outputs) gathered where they are. No host sync either way (SFT's loss does the
    same: `sft.sft_forward`)."""
    rows_host = loss_rows(mb.loss_mask)
    rows = to_device_async(rows_host, dev)

    def pick(x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            return to_device_async(x.reshape(-1)[rows_host], dev)
        return x.reshape(-1)[rows]
    return rows, pick


def rl_forward(model, mb: RLMicroBatch):
    """Final hidden states [S, 1, H] (last PP stage) of a packed micro-batch."""
    b = mb.to(_device(model))
    return model(input_ids=b.input_ids, position_ids=b.position_ids, pixel_values=b.pixel_values,
                 return_hidden=True, **host_side_inputs(unwrap(model), mb))


def logprob_pass(chunks: list, micro_batches: list[RLMicroBatch], field: str,
                 temperature: float, device) -> dict:
    """Fill `mb.<field>` ([1, T] fp32, on the model's device: the update reads it there) with
    log p(target), 0 off the loss tokens; returns the mean entropy."""
    from ovlt.kernels import fused_logprob

    model = unwrap(chunks[0])

    def loss_fn(mb, hidden):
        h = flat_hidden(hidden)
        rows, pick = loss_rows_picker(mb, h.device)
        lp_rows, ent = fused_logprob(h.index_select(0, rows), model.output_weight(),
                                     pick(mb.targets), temperature=temperature,
                                     return_entropy=True, tp_group=tp_group())
        lp = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
        lp[rows] = lp_rows.detach().float()
        setattr(mb, field, lp.view(1, -1))
        n = mb.loss_mask.sum()  # a host scalar, as in `sft_loss`
        ent_sum = (ent.detach() * pick(mb.loss_mask)).sum()
        return (lp_rows.detach() * 0).sum(), n, {"entropy": ent_sum}

    with torch.no_grad():
        res = train_step(chunks, None, micro_batches, rl_forward, loss_fn, device=device,
                         forward_only=True)
    return res.stats


def update(chunks: list, optimizer, micro_batches: list[RLMicroBatch], gcfg, temperature: float,
           device) -> StepResult:
    """One optimizer step of the GRPO loss over `micro_batches` (this rank's share)."""
    return queue_update(chunks, optimizer, micro_batches, gcfg, temperature, device).result()


def queue_update(chunks: list, optimizer, micro_batches: list[RLMicroBatch], gcfg,
                 temperature: float, device) -> PendingStep:
    """`update` queued without a host sync (`train_step_async`): a GRPO step's optimizer steps
    run back to back and their numbers are read after the last one is queued."""
    from ovlt.kernels import fused_grpo_loss

    model = unwrap(chunks[0])
    use_ref = gcfg.kl_coef != 0

    def loss_fn(mb, hidden):
        h = flat_hidden(hidden)
        rows, pick = loss_rows_picker(mb, h.device)  # token_mean over the loss tokens == rows
        loss, m = fused_grpo_loss(
            h.index_select(0, rows), model.output_weight(), pick(mb.targets),
            pick(mb.old_logprobs), pick(mb.ref_logprobs) if mb.ref_logprobs is not None else None,
            pick(mb.advantages), pick(mb.loss_mask),
            clip_low=gcfg.clip_low, clip_high=gcfg.clip_high,
            dual_clip=gcfg.dual_clip if gcfg.dual_clip else None,
            kl_coef=gcfg.kl_coef if use_ref else 0.0, kl_type=gcfg.kl_type,
            temperature=temperature, loss_agg="token_mean", tp_group=tp_group())
        n = mb.loss_mask.sum()  # a host scalar, as in `sft_loss`
        stats = {k: v * n for k, v in m.items()}
        return loss * n, n, stats

    return train_step_async(chunks, optimizer, micro_batches, rl_forward, loss_fn, device=device)


def kl_to_reference(micro_batches: list[RLMicroBatch]) -> tuple[float, float]:
    """(sum, token count) of the k3 estimate of KL(policy || ref), exp(ref - logp) -
    (ref - logp) - 1, over the loss tokens, at the sampling policy (`old_logprobs`). Reported
    whatever kl_coef is (the loss's own KL term is only computed when kl_coef != 0). Summed
    where the log-probs are; one read at the end."""
    tot, n = None, 0.0
    for mb in micro_batches:
        if mb.ref_logprobs is None or mb.old_logprobs is None:
            continue
        d = (mb.ref_logprobs - mb.old_logprobs).double()
        k3 = torch.exp(d) - d - 1
        s = (k3 * to_device_async(mb.loss_mask, d.device).double()).sum()
        tot = s if tot is None else tot + s
        n += float(mb.loss_mask.double().sum())
    return (0.0 if tot is None else float(tot)), n


class Reference:
    """Reference policy for the KL term / metric.

    memory: a frozen copy of the initial weights as a second model in device memory (fastest).
    swap / cpu: the initial weights kept in host memory (pinned for `swap`) and swapped into
    the policy's own parameters for the reference pass, then swapped back (no second model).
    """

    def __init__(self, mode: str, policy: torch.nn.Module, build_fn=None):
        self.mode = mode
        policy = unwrap(policy)
        if mode == "memory":
            if build_fn is None:
                raise ValueError("ref_mode=memory needs a model builder")
            from megatron.core.enums import ModelType
            self.model = build_fn()
            self.model.load_state_dict(policy.state_dict(), strict=False)
            if not hasattr(self.model, "model_type"):  # read by mcore's schedules
                self.model.model_type = ModelType.encoder_or_decoder
            self.model.eval()
            for p in self.model.parameters():
                p.requires_grad_(False)
        elif mode in ("swap", "cpu"):
            pin = mode == "swap" and torch.cuda.is_available()
            self.state = {n: (p.detach().cpu().pin_memory() if pin else p.detach().cpu().clone())
                          for n, p in policy.named_parameters()}
        else:
            raise ValueError(f"grpo.ref_mode: {mode!r} not allowed; allowed: memory, swap, cpu")

    @contextlib.contextmanager
    def weights_in(self, policy_chunks: list):
        """Yield the chunks to run the reference pass with."""
        if self.mode == "memory":
            yield [self.model]
            return
        policy = unwrap(policy_chunks[0])
        params = dict(policy.named_parameters())
        stash = {}
        with torch.no_grad():
            for n, ref in self.state.items():
                stash[n] = params[n].detach().to("cpu", copy=True)
                params[n].copy_(ref, non_blocking=True)
        try:
            yield policy_chunks
        finally:
            with torch.no_grad():
                for n, t in stash.items():
                    params[n].copy_(t)
