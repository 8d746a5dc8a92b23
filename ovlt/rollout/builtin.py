"""Built-in rollout engine: continuous-batching KV-cached decoding on the trainer's own mcore model.

No weight copy: `LLMDecoder` reads the model's parameters in place, so whatever the optimizer
just wrote is what the next rollout samples from (`update_weights` is only needed for weights
that come from elsewhere).

Scheduling (continuous batching): the call's samples (request i, sample j) wait in request
order; `max_batch_size` slots decode one sample each, one token per slot per step. Every
`check_every` steps the host reads what the steps produced (the only sync), finishes the
samples that hit EOS / a stop string / their cap, and hands their slots to the next waiting
samples at once (`ovlt.rollout.slots`). The `n` samples of a prompt share one prefill: the
prompt (image included) is encoded once, its KV prefix copied into (or kept in) its samples'
slots. Once no sample waits, the live slots move to the front (their KV copied) and the step
narrows to the first w slots (w: a power of two, one CUDA graph each), so the call's last long
samples do not pay for a full-width step. `schedule="static"` refills only when every slot is
free and never narrows (batches wait for their longest sequence: the old behaviour, kept as
the benchmark's baseline).

KV cache: one buffer per slot, sized for the call's longest prompt + largest cap (rounded up),
not paged. Why: a slot's keys are contiguous, so the decode attention kernel
(`ovlt.rollout.decode_attention`) reads exactly the live tokens with plain strides and a
refill is one copy, with no page table to keep in step with the CUDA graph; the cost is the
memory reserved for the cap, which bounds the slot count (at 7B: 56 KiB per token, ~0.16 GiB
per slot of 3k tokens), and the slot count is cut to what free memory holds.

Prefill runs the prompt minus its last token (images through the model's own vision tower);
the last prompt token is the first token a slot decodes, so every sampled token — the first
included — comes out of the one decode step, which is captured once as a CUDA graph (static
slot count — and each narrower width; per-slot token, positions, count live in device
tensors the graphs read).

Sampling: each sample draws from its own seed (`ovlt.rollout.base.request_seeds`, sample j of
a request with seed s uses s + j) with a counter-based generator (`sampling.sample_rows`),
so a request's tokens do not depend on the other requests in the call or on slot timing.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from ovlt.logging import get_logger, log_once
from ovlt.models.qwen2_5_vl.rope_index import rope_positions_fn
from ovlt.rollout.base import (Completion, GenerationRequest, OnComplete, RolloutEngine,
                               SamplingParams, request_caps, request_seeds)
from ovlt.rollout.kv_decoder import LLMDecoder
from ovlt.rollout.sampling import sample_rows
from ovlt.rollout.slots import SlotTable

log = get_logger(__name__)

IM_END_ID, ENDOFTEXT_ID = 151645, 151643
# columns of the per-slot integer state (device): token to feed next, cache position of the
# last prompt token, its rotary position, tokens sampled so far, cap, sampling seed
TOK, BASE, ROPE, COUNT, CAP, SEED = range(6)


def _int64(x: int) -> int:
    """x wrapped to a signed 64-bit integer (a seed's bits)."""
    return (int(x) + (1 << 63)) % (1 << 64) - (1 << 63)


def _default_image_embedder(model) -> Optional[Callable]:
    """The model's vision tower + merger: (pixel_values, grid_thw) -> [n_image_tokens, H]."""
    vision = getattr(model, "vision_model", None)  # ovlt Qwen2_5_VLModel (first PP stage)
    if vision is not None:
        return lambda pv, grid: vision(pv, grid)
    for name in ("image_embeddings", "embed_images", "get_image_features"):
        fn = getattr(model, name, None)
        if callable(fn):
            return fn
    return None


@dataclass
class _Prompt:
    ids: torch.Tensor        # [L] int64
    pos: torch.Tensor        # [3, L] MRoPE positions
    request: GenerationRequest


class _DecodeState:
    """Device state of `slots` decode slots with room for `length` tokens each."""
    requested: int           # slots asked for (`slots` may be fewer: free memory)
    slots: int
    length: int
    cache: torch.Tensor      # [layers, 2, slots, groups, length, head_dim]
    ints: torch.Tensor       # [slots, 6] int64 (columns TOK .. SEED)
    active: torch.Tensor     # [slots] bool: decoding (not finished, not idle)
    # decode step over the first `w` slots, for each width w (the slot count, and smaller
    # widths for the tail of a call): -> logits [w, vocab] fp32
    steps: dict[int, Callable[[], torch.Tensor]]


class BuiltinEngine(RolloutEngine):
    shares_trainer_weights = True

    def __init__(self, model: torch.nn.Module, model_cfg, tokenizer=None,
                 eos_token_ids: Optional[list[int]] = None, max_batch_size: int = 64,
                 cuda_graphs: bool = True, tp_group=None, check_every: int = 8,
                 image_embedder: Optional[Callable] = None, rope_fn: Optional[Callable] = None,
                 pad_token_id: int = ENDOFTEXT_ID, schedule: str = "continuous",
                 prefill_tokens: int = 16384, kv_memory_fraction: float = 0.9,
                 compact: bool = True, min_width: int = 8, compile_decode: Optional[bool] = None):
        if schedule not in ("continuous", "static"):
            raise ValueError(f"schedule must be 'continuous' or 'static', got {schedule!r}")
        self.model = model
        self.cfg = model_cfg
        self.tokenizer = tokenizer
        # compile_decode None: on when the model is on a GPU (the decode step's pointwise
        # kernels fused; see ovlt.rollout.kv_decoder)
        on_gpu = next(model.parameters()).is_cuda
        self.decoder = LLMDecoder(model, model_cfg, tp_group=tp_group,
                                  compile=on_gpu if compile_decode is None else compile_decode)
        self.eos = list(eos_token_ids) if eos_token_ids is not None else [IM_END_ID, ENDOFTEXT_ID]
        self.max_batch_size = max(1, int(max_batch_size))
        self.use_graphs = cuda_graphs and tp_group is None
        self.check_every = max(1, check_every)
        self.image_embedder = image_embedder or _default_image_embedder(model)
        self.rope_fn = rope_fn or rope_positions_fn(model_cfg)
        self.pad_id = pad_token_id  # kept for callers; padding never reaches an output
        self.schedule = schedule
        self.prefill_tokens = max(1, int(prefill_tokens))
        self.kv_memory_fraction = float(kv_memory_fraction)
        # Tail of a call (no sample waiting, few decoding): move the live slots to the front
        # and step only the first w slots (w: the slot count or a power of two >= min_width),
        # so the last long samples do not pay for a full-width step.
        self.compact = bool(compact) and schedule == "continuous"
        self.min_width = max(1, int(min_width))
        # Vision placeholders exist only in prompts: a sampled <|image_pad|> would not match
        # any image features when the trainer re-reads the response.
        self.banned_ids = sorted({model_cfg.image_token_id, model_cfg.video_token_id,
                                  model_cfg.vision_start_token_id, model_cfg.vision_end_token_id})
        self.length_multiple = 256   # cache length rounding: calls of similar size reuse it
        self._state: Optional[_DecodeState] = None
        # One side stream for every capture's warm-up, for the engine's lifetime: cuBLAS keeps
        # a workspace (~33 MiB on an H100) per stream it has run on, never freed, so a new
        # stream per graph grew the live memory by 7 x 33 MiB at every rollout.
        self._warmup_stream = None
        self.last_stats: dict = {}

    # ------------------------------------------------------------------ interface
    def generate(self, requests: list[GenerationRequest], params: SamplingParams,
                 on_complete: Optional[OnComplete] = None) -> list[list[Completion]]:
        if params.stop and self.tokenizer is None:
            raise ValueError("SamplingParams.stop needs the engine's tokenizer (make_engine(tokenizer=...))")
        if params.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {params.n}")
        caps = request_caps(requests, params)
        if not requests:
            return []
        seeds = request_seeds(requests, params)
        prompts = [self._prompt(i, r) for i, r in enumerate(requests)]
        # greedy: the n samples of a request are the same, decode one and copy it
        copies = params.n if params.temperature <= 0 and params.n > 1 else 1
        sp = dataclasses.replace(params, n=1) if copies > 1 else params
        total = len(requests) * sp.n
        need = max(p.ids.numel() + c for p, c in zip(prompts, caps))
        st = self._decode_state(min(self.max_batch_size, total), need)

        more: dict[int, list[Completion]] = {}

        def report(i, c):
            cs = [c] + [dataclasses.replace(c, token_ids=list(c.token_ids),
                                            logprobs=list(c.logprobs), index=j)
                        for j in range(1, copies)]
            more[i] = cs[1:]
            for x in cs if on_complete is not None else ():
                on_complete(i, x)

        with torch.no_grad():
            out = self._run(prompts, sp, caps, seeds, st, report if copies > 1 else on_complete)
        for i, cs in more.items():
            out[i].extend(cs)
        return out

    def reserve(self, samples: int, max_len: int) -> int:
        """Allocate the KV cache and capture the decode step now for a call of `samples`
        samples whose prompt + cap is at most `max_len` tokens (the next such `generate`
        reuses them: no allocation or capture inside a timed phase). Returns the slot count."""
        return self._decode_state(min(self.max_batch_size, max(1, int(samples))), int(max_len)).slots

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Weights from outside the trainer (HF names, full tensors: an eval of another
        checkpoint), converted by the state-dict adapter to this rank's mcore shards and copied
        in place into the shared model (so captured CUDA graphs stay valid). The trainer never
        needs this: the engine reads its parameters directly."""
        from ovlt.models.qwen2_5_vl.state_dict_adapter import iter_hf_to_mcore
        params = dict(self.model.named_parameters())
        te = any(k.endswith("layer_norm_weight") for k in params)
        d = self.decoder
        prefix = d.prefix[: -len("language_model.")] if d.prefix.endswith("language_model.") else ""
        # A model without a vision tower (a later PP stage, a text-only test module) skips it.
        has_vision = any(k.startswith(prefix + "vision_model.") for k in params)
        n = 0
        with torch.no_grad():
            for name, t in iter_hf_to_mcore(named_tensors, self.cfg, d.tp_rank, d.tp, 0, 1,
                                            norm_names="te" if te else "local",
                                            vocab_divisible_by=None):
                p = params.get(prefix + name)
                if p is None and name.startswith("vision_model.") and not has_vision:
                    continue
                if p is None:
                    raise KeyError(f"update_weights: the model has no parameter {prefix + name!r}")
                if tuple(p.shape) != tuple(t.shape):
                    raise ValueError(f"update_weights: {name} has shape {tuple(t.shape)}, the "
                                     f"model's is {tuple(p.shape)}")
                p.copy_(t)
                n += 1
        log.info("built-in engine: loaded %d tensors", n)

    def sleep(self) -> None:
        # The KV cache and the captured graph are all this engine owns (weights are shared).
        self._state = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def wake(self) -> None:
        pass

    # ------------------------------------------------------------------ prompts
    def _prompt(self, i: int, r: GenerationRequest) -> _Prompt:
        if len(r.prompt_ids) < 1:
            raise ValueError(f"request {i} ({r.request_id}): prompt_ids is empty")
        ids = torch.as_tensor(r.prompt_ids, dtype=torch.long)
        if int(ids[-1]) in self.banned_ids:
            raise ValueError(f"request {i} ({r.request_id}): the prompt ends with a vision token "
                             f"({int(ids[-1])}); prompts end with text (the chat template's "
                             "assistant header)")
        if r.pixel_values is None and bool((ids == self.cfg.image_token_id).any()):
            raise ValueError(f"request {i} ({r.request_id}): <|image_pad|> in the prompt but no "
                             "pixel_values")
        pos = self.rope_fn(ids, r.image_grid_thw)
        last = pos[:, -1]
        if not bool((last == last[0]).all()):
            raise ValueError(f"request {i} ({r.request_id}): the last prompt token has MRoPE "
                             f"positions {last.tolist()}; prompts end with a text token")
        return _Prompt(ids=ids, pos=pos, request=r)

    # ------------------------------------------------------------------ decode state
    def _slot_bytes(self, length: int) -> int:
        d = self.decoder
        return len(d.layers) * 2 * d.n_groups * length * d.head_dim * d.dtype.itemsize

    def _decode_state(self, slots: int, need: int) -> _DecodeState:
        """KV cache + decode step for `slots` slots of at least `need` tokens, kept for the
        next call that fits it (the CUDA graph is captured once per shape)."""
        length = -(-need // self.length_multiple) * self.length_multiple
        st = self._state
        if st is not None and st.requested == slots and need <= st.length <= 2 * length:
            return st
        self._state = None
        requested = slots
        dev = self.decoder.device
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            free = torch.cuda.mem_get_info(dev)[0]
            # per slot: its KV rows + its fp32 logits row and the sampling temporaries
            per_slot = self._slot_bytes(length) + 8 * 4 * self.decoder.vocab_size
            fit = int(free * self.kv_memory_fraction) // per_slot
            if fit < 1:
                raise RuntimeError(f"built-in engine: {free / 2**30:.1f} GiB free on the GPU, one "
                                   f"decode slot of {length} tokens needs {per_slot / 2**30:.2f} GiB")
            if fit < slots:
                log.warning("built-in engine: %d slots of %d tokens need %.1f GiB, %.1f GiB free: "
                            "decoding with %d slots", slots, length, slots * per_slot / 2**30,
                            free / 2**30, fit)
                slots = fit
        st = _DecodeState()
        st.requested, st.slots, st.length = requested, slots, length
        st.cache = self.decoder.new_cache(slots, length)
        st.ints = torch.zeros(slots, 6, dtype=torch.long, device=dev)
        st.active = torch.zeros(slots, dtype=torch.bool, device=dev)
        widths = [slots] + [w for w in (2 ** i for i in range(12)) if self.min_width <= w < slots]
        if not self.compact:
            widths = [slots]
        st.steps = self._make_steps(st, sorted(widths, reverse=True))
        self._state = st
        return st

    def _make_steps(self, st: _DecodeState, widths: list[int]) -> dict[int, Callable[[], torch.Tensor]]:
        d = self.decoder
        ints = st.ints

        def eager(w: int):
            count = ints[:w, COUNT]
            return d.decode(ints[:w, TOK], ints[:w, BASE] + count, ints[:w, ROPE] + count,
                            st.cache[:, :, :w])

        if not (self.use_graphs and d.device.type == "cuda"):
            return {w: (lambda w=w: eager(w)) for w in widths}
        log_once(log, "builtin_cuda_graphs", "built-in engine: CUDA graphs for decode")
        # Warm up on a side stream (allocator, cuBLAS workspaces, Triton compilation), then
        # capture, widest first, all graphs in one memory pool (never replayed together).
        # This runs before any prefill of this cache: what it writes (position 0 of every
        # slot) is overwritten.
        pool = torch.cuda.graph_pool_handle()
        steps = {}
        if self._warmup_stream is None:
            self._warmup_stream = torch.cuda.Stream()
        s = self._warmup_stream
        for w in widths:
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    eager(w)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = eager(w)

            def replay(graph=graph, out=out):
                graph.replay()
                return out
            steps[w] = replay
        return steps

    # ------------------------------------------------------------------ prefill
    def _prefill(self, prompts: list[_Prompt], dsts: list[list[int]], cache: torch.Tensor) -> None:
        """KV of each prompt minus its last token, written into the cache rows of its slots."""
        d = self.decoder
        dev = d.device
        lens = [p.ids.numel() - 1 for p in prompts]
        B, P = len(prompts), max(lens)
        # right padding (token 0: any id in the vocabulary; pad keys are masked out)
        ids = torch.zeros((B, P), dtype=torch.long)
        pos = torch.zeros(3, B, P, dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, : lens[b]] = p.ids[:-1]
            pos[:, b, : lens[b]] = p.pos[:, :-1]
        ids, pos = ids.to(dev), pos.to(dev)
        x = d.embed_tokens(ids)
        with_img = [b for b, p in enumerate(prompts) if p.request.pixel_values is not None]
        if with_img:
            if self.image_embedder is None:
                raise ValueError("a request has pixel_values but the model exposes no image "
                                 "embedder (image_embeddings / embed_images)")
            reqs = [prompts[b].request for b in with_img]
            pv = torch.cat([r.pixel_values for r in reqs]).to(dev)
            grid = torch.cat([torch.as_tensor(r.image_grid_thw).view(-1, 3) for r in reqs]).to(dev)
            emb = self.image_embedder(pv, grid)
            emb = getattr(emb, "pooler_output", emb)
            if isinstance(emb, (tuple, list)):
                emb = torch.cat(list(emb))
            sel = torch.zeros_like(ids, dtype=torch.bool)
            sel[with_img] = ids[with_img] == self.cfg.image_token_id
            if int(sel.sum()) != emb.shape[0]:
                raise ValueError(f"{int(sel.sum())} <|image_pad|> tokens in the prompts but the "
                                 f"vision tower produced {emb.shape[0]} embeddings")
            x = x.clone()
            x[sel] = emb.to(x.dtype)
        ar = torch.arange(P, device=dev)
        valid = ar[None, :] < torch.tensor(lens, device=dev)[:, None]            # [B, P] keys
        mask = (valid[:, None, :] & (ar[None, :] <= ar[:, None])[None]).unsqueeze(1)
        cos, sin = d.rope(pos)
        tmp = d.new_cache(B, P)
        d.forward(x, cos, sin, tmp, ar, mask)
        for b, slots in enumerate(dsts):
            for s in slots:
                cache[:, :, s, :, : lens[b]].copy_(tmp[:, :, b, :, : lens[b]])

    # ------------------------------------------------------------------ the loop
    def _run(self, prompts: list[_Prompt], sp: SamplingParams, caps: list[int], seeds: list[int],
             st: _DecodeState, on_complete: Optional[OnComplete]) -> list[list[Completion]]:
        dev = self.decoder.device
        n = sp.n
        table = SlotTable(st.slots, len(prompts), n)
        out: list[list[Optional[Completion]]] = [[None] * n for _ in prompts]
        eos_ids = [] if sp.ignore_eos else list(self.eos)
        eos = torch.tensor(eos_ids, dtype=torch.long, device=dev)
        eos_set = set(eos_ids)
        banned = torch.tensor([i for i in self.banned_ids if i < self.decoder.vocab_size],
                              dtype=torch.long, device=dev)
        k = self.check_every
        hist_tok = torch.zeros(st.slots, k, dtype=torch.long, device=dev)
        hist_lp = torch.zeros(st.slots, k, dtype=torch.float32, device=dev)
        hist_ok = torch.zeros(st.slots, k, dtype=torch.bool, device=dev)
        toks: list[list[int]] = [[] for _ in range(st.slots)]
        lps: list[list[float]] = [[] for _ in range(st.slots)]
        checked = [0] * st.slots                 # tokens of a slot already scanned for stops
        stop_at: list[Optional[tuple[int, str]]] = [None] * st.slots
        tail = 4 * max((len(s) for s in sp.stop), default=0) + 8
        st.active.zero_()
        ints = st.ints
        count = ints[:, COUNT]
        stats = {"steps": 0, "prefills": 0, "prefill_prompts": 0, "kv_copies": 0, "syncs": 0,
                 "slot_steps_busy": 0, "slot_steps_run": 0, "compactions": 0}

        def finish(s: int):
            i, j = table.release(s)
            ids, lp = toks[s], lps[s]
            m, reason, text = len(ids), "length", None
            if ids and ids[-1] in eos_set:
                reason = "stop"
            if stop_at[s] is not None and stop_at[s][0] <= m:
                m, reason, text = stop_at[s][0], "stop", stop_at[s][1]
            ids = ids[:m]
            if text is None:
                text = self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer else ""
            c = Completion(request_id=prompts[i].request.request_id, token_ids=ids,
                           logprobs=lp[:m], text=text, finish_reason=reason, index=j)
            out[i][j] = c
            if on_complete is not None:
                on_complete(i, c)

        def prefill(chunk):
            self._prefill([prompts[i] for i, _ in chunk], [dst for _, dst in chunk], st.cache)
            stats["prefills"] += 1
            stats["prefill_prompts"] += len(chunk)

        def refill():
            free = table.free_slots()
            if self.schedule == "static" and len(free) < st.slots:
                return
            plan = table.plan(free)
            if not plan.assign:
                return
            for dst, src, i in plan.copies:
                L = prompts[i].ids.numel() - 1
                if L:
                    st.cache[:, :, dst, :, :L].copy_(st.cache[:, :, src, :, :L])
            stats["kv_copies"] += len(plan.copies)
            # prefill the new prompts, in chunks of about `prefill_tokens` padded tokens
            chunk: list[tuple[int, list[int]]] = []
            for i, dst in plan.prefill.items():
                if prompts[i].ids.numel() == 1:
                    continue  # nothing before the last token
                width = max([prompts[c].ids.numel() - 1 for c, _ in chunk + [(i, dst)]])
                if chunk and width * (len(chunk) + 1) > self.prefill_tokens:
                    prefill(chunk)
                    chunk = []
                chunk.append((i, dst))
            if chunk:
                prefill(chunk)
            rows = []
            for s, i, j in plan.assign:
                rows.append([int(prompts[i].ids[-1]), prompts[i].ids.numel() - 1,
                             int(prompts[i].pos[0, -1]), 0, caps[i], _int64(seeds[i] + j)])
                toks[s], lps[s], checked[s], stop_at[s] = [], [], 0, None
            idx = torch.tensor([s for s, _, _ in plan.assign], device=dev)
            ints.index_copy_(0, idx, torch.tensor(rows, dtype=torch.long).to(dev))
            st.active.index_fill_(0, idx, True)

        def compact():
            """No sample waits: move the busy slots to the front, narrow the step."""
            busy = [s for s, o in enumerate(table.owner) if o is not None]
            fits = [w for w in st.steps if w >= len(busy)]
            if table.queue or not fits:
                return
            w = min(fits)
            if w >= width[0]:
                return
            moves = list(zip([s for s in busy if s >= w], [s for s in range(w) if table.owner[s] is None]))
            for src, dst in moves:
                i = table.owner[src][0]
                L = prompts[i].ids.numel() - 1 + len(toks[src])  # KV written so far
                st.cache[:, :, dst, :, :L].copy_(st.cache[:, :, src, :, :L])
                table.move(src, dst)
                toks[dst], lps[dst], checked[dst], stop_at[dst] = toks[src], lps[src], checked[src], stop_at[src]
            if moves:
                src_i = torch.tensor([m[0] for m in moves], device=dev)
                dst_i = torch.tensor([m[1] for m in moves], device=dev)
                ints.index_copy_(0, dst_i, ints.index_select(0, src_i))
                st.active.index_copy_(0, dst_i, st.active.index_select(0, src_i))
                st.active.index_fill_(0, src_i, False)
            stats["compactions"] += 1
            width[0] = w

        width = [st.slots]
        refill()
        while table.busy():
            wd = width[0]  # slots stepped
            # steps until the next check: no more than the longest remaining cap needs
            left = max(caps[o[0]] - len(toks[s]) for s, o in enumerate(table.owner) if o is not None)
            w_steps = max(1, min(k, left))
            step, ints_n, count_n, active_n = st.steps[wd], ints[:wd], count[:wd], st.active[:wd]
            for w in range(w_steps):
                logits = step()
                tok, lp = sample_rows(logits, sp.temperature, sp.top_k, sp.top_p,
                                      ints_n[:, SEED], count_n, banned)
                act = hist_ok[:wd, w]
                act.copy_(active_n)
                hist_tok[:wd, w] = tok
                hist_lp[:wd, w] = lp
                count_n.add_(act)
                ints_n[:, TOK] = torch.where(act, tok, ints_n[:, TOK])
                done = act & (torch.isin(tok, eos) | (count_n >= ints_n[:, CAP]))
                active_n &= ~done
            stats["steps"] += w_steps
            stats["slot_steps_run"] += w_steps * wd
            ok = hist_ok[:wd, :w_steps].cpu()
            h_tok = hist_tok[:wd, :w_steps].cpu()
            h_lp = hist_lp[:wd, :w_steps].cpu()
            active = active_n.cpu()
            stats["syncs"] += 1
            stats["slot_steps_busy"] += int(ok.sum())
            ended = []
            for s, o in enumerate(table.owner):
                if o is None:
                    continue
                sel = ok[s]
                toks[s].extend(h_tok[s][sel].tolist())
                lps[s].extend(h_lp[s][sel].tolist())
                if sp.stop and len(toks[s]) > checked[s]:
                    stop_at[s] = self._find_stop(toks[s], checked[s], sp.stop, tail)
                    checked[s] = len(toks[s])
                if not bool(active[s]) or stop_at[s] is not None:
                    ended.append(s)
            if ended:
                stopped = [s for s in ended if bool(active[s])]  # ended by a stop string
                if stopped:
                    st.active.index_fill_(0, torch.tensor(stopped, device=dev), False)
                for s in ended:
                    finish(s)
                refill()
                if table.queue:
                    width[0] = st.slots
                elif self.compact:
                    compact()
        self.last_stats = stats
        return out  # type: ignore[return-value]

    def _find_stop(self, ids: list[int], start: int, stops: list[str],
                   tail: int) -> Optional[tuple[int, str]]:
        """(token count, text through the stop string) of the first prefix of `ids` whose text
        contains a stop string, looking at prefixes longer than `start`; None if none. Only the
        last `tail` tokens before `start` and the new ones are decoded unless one matches."""
        window = self.tokenizer.decode(ids[max(0, start - tail):], skip_special_tokens=True)
        if not any(s in window for s in stops):
            return None
        for k in range(max(1, start), len(ids) + 1):
            t = self.tokenizer.decode(ids[:k], skip_special_tokens=True)
            hits = [t.find(s) + len(s) for s in stops if s in t]
            if hits:
                return k, t[: min(hits)]
        return None
