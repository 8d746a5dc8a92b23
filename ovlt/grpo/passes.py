"""The model-facing half of a GRPO step: log-prob passes and the policy-update loss.

Both run through `ovlt.engine.train_step.train_step` (megatron-core schedules, TP/PP/DP), with the
model returning final hidden states and the LM head applied by the fused kernels, so the
[tokens x vocab] logits are never built:
- `logprob_pass` / `queue_logprob_pass`: forward only; per-token log p(target) at the sampling
  temperature, stored on each micro-batch (`old_logprobs` / `ref_logprobs`). The policy and
  the reference run the same kernels (`forward_only_kernels`, `Reference` copies the policy's
  fusion switches): no torch.compile'd training-only fusion runs here, so a forward-only pass
  compiles nothing and the two passes cost the same per token.
- `update` / `queue_update`: one optimizer step with `ovlt.kernels.fused_grpo_loss` (PPO clip +
  dual clip + KL). train_step normalises by the token count of the whole global batch, so the
  loss function returns token_mean x tokens (a per-token sum) and the update is the token-mean
  GRPO loss. A micro-batch without `old_logprobs` is on-policy (the first update after
  sampling): its own detached log-prob is the old one (ratio exactly 1), and is stored as
  `old_logprobs` for the KL metric.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Optional

import torch

from ovlt.config import GRPOConfig, allowed_values
from ovlt.grpo.batch import RLMicroBatch
from ovlt.grpo.image_features import StepImages
from ovlt.engine.lm_head import flat_hidden, host_side_inputs, loss_rows, tp_group, unwrap
from ovlt.engine.train_step import PendingStep, StepResult, train_step_async
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


def rl_forward(model, mb: RLMicroBatch, images: Optional[StepImages] = None):
    """Final hidden states [S, 1, H] (last PP stage) of a packed micro-batch. `images`: the
    step's frozen-tower features, encoded once per prompt (`ovlt.grpo.image_features`)."""
    net = unwrap(model)
    feats = images.features(net, mb.image_groups) if images is not None else None
    if feats is not None:
        mb = dataclasses.replace(mb, pixel_values=None)  # not copied to the device
    b = mb.to(_device(model))
    return model(input_ids=b.input_ids, position_ids=b.position_ids, pixel_values=b.pixel_values,
                 image_features=feats, return_hidden=True, **host_side_inputs(net, mb))


# Kernel switches of megatron-core's TransformerConfig that `Reference` copies from the policy,
# so both forward-only passes run the same kernels.
KERNEL_SWITCHES = ("bias_activation_fusion", "bias_dropout_fusion", "apply_rope_fusion",
                   "masked_softmax_fusion")


def transformer_configs(chunks) -> list:
    """The distinct megatron-core TransformerConfigs of `chunks` (modules or a list), in
    module order (the LLM's and the vision tower's)."""
    seen: dict = {}
    for chunk in (chunks if isinstance(chunks, (list, tuple)) else [chunks]):
        for mod in chunk.modules():
            cfg = getattr(mod, "config", None)
            if cfg is not None and hasattr(cfg, "bias_dropout_fusion"):
                seen.setdefault(id(cfg), cfg)
    return list(seen.values())


def _compiled_activation(cfg) -> bool:
    """Whether mcore's MLP would run a torch.compile'd activation under `cfg`: its fused SwiGLU /
    GeLU, unless the CUDA fast paths replaced the bias-free SwiGLU by ovlt's Triton kernel
    (`ovlt.compat.cuda_fastpaths.bias_swiglu_impl`, the LLM's case)."""
    if not getattr(cfg, "bias_activation_fusion", False):
        return False
    import torch.nn.functional as F
    from megatron.core.transformer import mlp

    from ovlt.compat import cuda_fastpaths
    triton = (mlp.bias_swiglu_impl is cuda_fastpaths.bias_swiglu_impl and not cfg.add_bias_linear
              and cfg.gated_linear_unit and cfg.activation_func is F.silu
              and not cfg.activation_func_fp8_input_store)
    return not triton


@contextlib.contextmanager
def forward_only_kernels(chunks):
    """Within the block the models of `chunks` run no torch.compile'd mcore fusion.

    The CUDA fast paths switch mcore's fusions on for trained layers: bias-dropout-add
    (`bias_dropout_fusion`) is a torch.compile'd function, in eval mode a different one from
    training's, and so is the activation of an MLP with biases (`bias_activation_fusion`
    outside ovlt's Triton SwiGLU). The first forward-only pass compiled them inside the timed
    step (inductor's pattern passes, host syncs and all) and a new shape could recompile them.
    With dropout off (eval) the unfused bias-dropout-add is one in-place add, so a
    forward-only pass loses nothing without them; the Triton SwiGLU and the fused RoPE (no
    compile) stay."""
    cfgs = transformer_configs(chunks)
    saved = [(c, c.bias_dropout_fusion, c.bias_activation_fusion) for c in cfgs]
    for c in cfgs:
        if _compiled_activation(c):
            c.bias_activation_fusion = False
        c.bias_dropout_fusion = False
    try:
        yield
    finally:
        for c, bdf, baf in saved:
            c.bias_dropout_fusion, c.bias_activation_fusion = bdf, baf


def copy_kernel_switches(dst, src) -> None:
    """The fusion switches of `src`'s TransformerConfigs set on `dst`'s (same architecture,
    configs paired in module order)."""
    a, b = transformer_configs(dst), transformer_configs(src)
    if len(a) != len(b):
        raise ValueError(f"copy_kernel_switches: {len(a)} configs vs {len(b)}")
    for d, s in zip(a, b):
        for k in KERNEL_SWITCHES:
            if hasattr(s, k):
                setattr(d, k, getattr(s, k))


def queue_logprob_pass(chunks: list, micro_batches: list[RLMicroBatch], field: str,
                       temperature: float, device,
                       images: Optional[StepImages] = None) -> PendingStep:
    """Queue a forward-only pass that fills `mb.<field>` ([1, T] fp32 on the model's device,
    where the update reads it) with log p(target), 0 off the loss tokens; nothing is read on
    the host (`PendingStep.result()`: tokens, and the mean entropy in `stats`). `images`: the
    frozen tower's features of these weights (`rl_forward`)."""
    from ovlt.kernels import fused_logprob

    model = unwrap(chunks[0])

    def loss_fn(mb, hidden):
        h = flat_hidden(hidden)
        rows, pick = loss_rows_picker(mb, h.device)
        lp_rows, ent = fused_logprob(h.index_select(0, rows), model.output_weight(),
                                     pick(mb.targets), temperature=temperature,
                                     return_entropy=True, tp_group=tp_group())
        setattr(mb, field, scatter_rows(lp_rows, rows, h.shape[0]))
        n = mb.loss_mask.sum()  # a host scalar, as in `sft_loss`
        ent_sum = (ent.detach() * pick(mb.loss_mask)).sum()
        return (lp_rows.detach() * 0).sum(), n, {"entropy": ent_sum}

    with torch.no_grad(), forward_only_kernels(chunks):
        return train_step_async(chunks, None, micro_batches,
                                functools.partial(rl_forward, images=images), loss_fn,
                                device=device, forward_only=True)


def logprob_pass(chunks: list, micro_batches: list[RLMicroBatch], field: str,
                 temperature: float, device, images: Optional[StepImages] = None) -> dict:
    """`queue_logprob_pass`, read: returns the mean entropy (`{"entropy": ...}`)."""
    return queue_logprob_pass(chunks, micro_batches, field, temperature, device,
                              images).result().stats


def scatter_rows(lp_rows: torch.Tensor, rows: torch.Tensor, T: int) -> torch.Tensor:
    """[1, T] fp32: `lp_rows` at `rows`, 0 elsewhere (detached)."""
    lp = torch.zeros(T, dtype=torch.float32, device=lp_rows.device)
    lp[rows] = lp_rows.detach().float()
    return lp.view(1, -1)


def update(chunks: list, optimizer, micro_batches: list[RLMicroBatch], gcfg, temperature: float,
           device, images: Optional[StepImages] = None) -> StepResult:
    """One optimizer step of the GRPO loss over `micro_batches` (this rank's share)."""
    return queue_update(chunks, optimizer, micro_batches, gcfg, temperature, device,
                        images).result()


def queue_update(chunks: list, optimizer, micro_batches: list[RLMicroBatch], gcfg,
                 temperature: float, device, images: Optional[StepImages] = None) -> PendingStep:
    """`update` queued without a host sync (`train_step_async`): a GRPO step's optimizer steps
    run back to back and their numbers are read after the last one is queued. A micro-batch
    whose `old_logprobs` is None is on-policy: the loss takes its own detached log-prob as the
    old one and stores it in `old_logprobs` (for the KL metric)."""
    from ovlt.kernels import fused_grpo_loss

    model = unwrap(chunks[0])
    use_ref = gcfg.kl_coef != 0

    def loss_fn(mb, hidden):
        h = flat_hidden(hidden)
        rows, pick = loss_rows_picker(mb, h.device)  # token_mean over the loss tokens == rows
        on_policy = mb.old_logprobs is None
        loss, m, lp_rows = fused_grpo_loss(
            h.index_select(0, rows), model.output_weight(), pick(mb.targets),
            None if on_policy else pick(mb.old_logprobs),
            pick(mb.ref_logprobs) if mb.ref_logprobs is not None else None,
            pick(mb.advantages), pick(mb.loss_mask),
            clip_low=gcfg.clip_low, clip_high=gcfg.clip_high,
            dual_clip=gcfg.dual_clip if gcfg.dual_clip else None,
            kl_coef=gcfg.kl_coef if use_ref else 0.0, kl_type=gcfg.kl_type,
            temperature=temperature, loss_agg="token_mean", tp_group=tp_group(),
            return_logprobs=True)
        if on_policy:
            mb.old_logprobs = scatter_rows(lp_rows, rows, h.shape[0])
        n = mb.loss_mask.sum()  # a host scalar, as in `sft_loss`
        stats = {k: v * n for k, v in m.items()}
        return loss * n, n, stats

    return train_step_async(chunks, optimizer, micro_batches,
                            functools.partial(rl_forward, images=images), loss_fn, device=device)


def kl_to_reference(micro_batches: list[RLMicroBatch]) -> tuple[torch.Tensor | None, float]:
    """(sum, token count) of the k3 estimate of KL(policy || ref), exp(ref - logp) -
    (ref - logp) - 1, over the loss tokens, at the sampling policy (`old_logprobs`). Reported
    whatever kl_coef is (the loss's own KL term is only computed when kl_coef != 0). The sum
    stays where the log-probs are (a 0-d fp64 tensor, None without any pair): the caller
    reads it once, with the step's other numbers."""
    tot, n = None, 0.0
    for mb in micro_batches:
        if mb.ref_logprobs is None or mb.old_logprobs is None:
            continue
        d = (mb.ref_logprobs - mb.old_logprobs).double()
        k3 = torch.exp(d) - d - 1
        s = (k3 * to_device_async(mb.loss_mask, d.device).double()).sum()
        tot = s if tot is None else tot + s
        n += float(mb.loss_mask.double().sum())
    return tot, n


def engine_logprob_gap(micro_batches: list[RLMicroBatch]):
    """(sum, max, token count) of |trainer - engine| log-prob over the loss tokens the engine
    gave a log-prob for, the trainer's being `old_logprobs` (the sampling policy). Nonzero
    beyond numerics means the engine sampled from other weights than the trainer holds (a
    stale or mis-mapped weight sync); the ratio then corrects less than it should. Sum and
    max stay where the log-probs are (0-d fp64, None without any token)."""
    tot = mx = None
    n = 0.0
    for mb in micro_batches:
        if mb.engine_logprobs is None or mb.old_logprobs is None:
            continue
        keep = (mb.loss_mask > 0) & torch.isfinite(mb.engine_logprobs)  # host: no sync
        dev = mb.old_logprobs.device
        e = to_device_async(torch.nan_to_num(mb.engine_logprobs), dev)
        d = torch.where(to_device_async(keep, dev), (mb.old_logprobs - e).abs().double(), 0.0)
        tot = d.sum() if tot is None else tot + d.sum()
        mx = d.max() if mx is None else torch.maximum(mx, d.max())
        n += float(keep.sum())
    return tot, mx, n


def _host_copy(t: torch.Tensor, pin: bool) -> torch.Tensor:
    """A host copy of `t` that owns its memory (page-locked with `pin`)."""
    return t.detach().cpu().pin_memory() if pin else t.detach().cpu().clone()


class Reference:
    """Reference policy for the KL term / metric.

    memory: a frozen copy of the initial weights as a second model in device memory (fastest),
    running the policy's kernels (`copy_kernel_switches`; call after the policy's wrap, which
    switches the CUDA fast paths on).
    offload: that second model, its weights in pinned host memory except during the reference
    pass: `prefetch` copies them in on a side stream (queued before the old log-prob pass, so
    the copy runs behind it), the pass waits for the copy, and the storage is freed once the
    pass is queued. The rollout's KV cache and the update's gradients and activations never
    share the device with it (a 7B reference is 15 GB of an 80 GB card).
    swap / cpu: the initial weights kept in host memory (pinned for `swap`) and swapped into
    the policy's own parameters for the reference pass, then swapped back (no second model).
    """

    MODES = allowed_values(GRPOConfig, "ref_mode")

    def __init__(self, mode: str, policy: torch.nn.Module, build_fn=None):
        if mode not in self.MODES:
            raise ValueError(f"grpo.ref_mode: {mode!r} not allowed; allowed: {', '.join(self.MODES)}")
        self.mode = mode
        policy = unwrap(policy)
        if mode in ("memory", "offload"):
            if build_fn is None:
                raise ValueError(f"ref_mode={mode} needs a model builder")
            from megatron.core.enums import ModelType
            self.model = build_fn()
            self.model.load_state_dict(policy.state_dict(), strict=False)
            copy_kernel_switches(self.model, policy)  # the policy's kernels, so equal cost
            if not hasattr(self.model, "model_type"):  # read by mcore's schedules
                self.model.model_type = ModelType.encoder_or_decoder
            self.model.eval()
            for p in self.model.parameters():
                p.requires_grad_(False)
            if mode == "offload":
                pin = torch.cuda.is_available()
                self.host = [(p, _host_copy(p, pin)) for p in self.model.parameters()]
                self._ready = None  # the side stream's copy, waited for by the pass
                self._stream = None
                self.on_device = True
                self.release()
        else:
            pin = mode == "swap" and torch.cuda.is_available()
            self.state = {n: _host_copy(p, pin) for n, p in policy.named_parameters()}

    def prefetch(self) -> None:
        """offload: give the weights their device storage back and queue their copy from host
        memory (a side stream on a GPU: the work queued before runs beside it). Nothing in the
        other modes, or when they are on the device already."""
        if self.mode != "offload" or self.on_device:
            return
        for p, h in self.host:  # allocated on the current stream, as the pass that reads them
            p.data.untyped_storage().resize_(h.numel() * h.element_size())
        if self.host and self.host[0][0].is_cuda:
            main = torch.cuda.current_stream()
            self._stream = self._stream or torch.cuda.Stream()
            self._stream.wait_stream(main)
            with torch.no_grad(), torch.cuda.stream(self._stream):
                for p, h in self.host:
                    p.data.copy_(h, non_blocking=True)
            self._ready = self._stream.record_event()
        else:
            with torch.no_grad():
                for p, h in self.host:
                    p.data.copy_(h)
        self.on_device = True

    def release(self) -> None:
        """offload: free the weights' device storage (behind the work queued on the stream
        that allocated it: later allocations there come after it)."""
        for p, _ in self.host:
            p.data.untyped_storage().resize_(0)
        self.on_device = False

    @contextlib.contextmanager
    def weights_in(self, policy_chunks: list):
        """Yield the chunks to run the reference pass with."""
        if self.mode == "memory":
            yield [self.model]
            return
        if self.mode == "offload":
            self.prefetch()
            if self._ready is not None:
                torch.cuda.current_stream().wait_event(self._ready)
                self._ready = None
            try:
                yield [self.model]
            finally:
                self.release()
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
