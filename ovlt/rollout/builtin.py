"""Built-in rollout engine: batched KV-cached decoding on the trainer's own mcore model.

No weight copy: `LLMDecoder` reads the model's parameters in place, so whatever the optimizer
just wrote is what the next rollout samples from (`update_weights` is only needed for weights
that come from elsewhere). One batch = prompts left-padded to a common length, a static KV
cache, one prefill (images embedded by the model's own vision tower), then one token per
sequence per step. On GPU the decode step is captured once per batch as a CUDA graph and
replayed, which removes the per-kernel launch overhead that dominates small-batch decoding.
Finished sequences (EOS or a stop string) are masked and the batch stops when all are done.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

from ovlt.logging import get_logger, log_once
from ovlt.models.qwen2_5_vl.rope_index import rope_positions_fn
from ovlt.rollout.base import (Completion, GenerationRequest, OnComplete, RolloutEngine,
                               SamplingParams, report_all)
from ovlt.rollout.kv_decoder import LLMDecoder
from ovlt.rollout.sampling import sample

log = get_logger(__name__)

IM_END_ID, ENDOFTEXT_ID = 151645, 151643


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


class _DecodeState:
    shape: tuple
    cache: torch.Tensor
    key_valid: torch.Tensor
    step: Callable


class BuiltinEngine(RolloutEngine):
    shares_trainer_weights = True

    def __init__(self, model: torch.nn.Module, model_cfg, tokenizer=None,
                 eos_token_ids: Optional[list[int]] = None, max_batch_size: int = 64,
                 cuda_graphs: bool = True, tp_group=None, check_every: int = 8,
                 image_embedder: Optional[Callable] = None, rope_fn: Optional[Callable] = None,
                 pad_token_id: int = ENDOFTEXT_ID):
        self.model = model
        self.cfg = model_cfg
        self.tokenizer = tokenizer
        self.decoder = LLMDecoder(model, model_cfg, tp_group=tp_group)
        self.eos = list(eos_token_ids) if eos_token_ids is not None else [IM_END_ID, ENDOFTEXT_ID]
        self.max_batch_size = max_batch_size
        self.use_graphs = cuda_graphs and tp_group is None
        self.check_every = max(1, check_every)
        self.image_embedder = image_embedder or _default_image_embedder(model)
        self.rope_fn = rope_fn or rope_positions_fn(model_cfg)
        self.pad_id = pad_token_id
        # Vision placeholders exist only in prompts: a sampled <|image_pad|> would not match
        # any image features when the trainer re-reads the response.
        self.banned_ids = sorted({model_cfg.image_token_id, model_cfg.video_token_id,
                                  model_cfg.vision_start_token_id, model_cfg.vision_end_token_id})
        self.pad_multiple = 32
        self._state: Optional[_DecodeState] = None

    # ------------------------------------------------------------------ interface
    def generate(self, requests: list[GenerationRequest], params: SamplingParams,
                 on_complete: Optional[OnComplete] = None) -> list[list[Completion]]:
        if params.stop and self.tokenizer is None:
            raise ValueError("SamplingParams.stop needs the engine's tokenizer (make_engine(tokenizer=...))")
        if params.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {params.max_new_tokens}")
        dev = self.decoder.device
        gen = torch.Generator(device=dev)
        gen.manual_seed(params.seed if params.seed is not None
                        else int(torch.randint(0, 2**62, (1,)).item()))
        rows = [(i, j) for i in range(len(requests)) for j in range(params.n)]
        # Similar lengths together: less left padding per batch.
        rows.sort(key=lambda r: len(requests[r[0]].prompt_ids))
        out: list[list[Optional[Completion]]] = [[None] * params.n for _ in requests]
        for s in range(0, len(rows), self.max_batch_size):
            chunk = rows[s: s + self.max_batch_size]
            comps = self._generate_batch([requests[i] for i, _ in chunk], params, gen)
            for (i, j), c in zip(chunk, comps):
                c.index = j
                out[i][j] = c
        report_all(out, on_complete)  # type: ignore[arg-type]
        return out  # type: ignore[return-value]

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

    # ------------------------------------------------------------------ one batch
    def _prefill_inputs(self, reqs: list[GenerationRequest]):
        d = self.decoder
        dev = d.device
        lens = torch.tensor([len(r.prompt_ids) for r in reqs])
        if int(lens.min()) < 1:
            raise ValueError("GenerationRequest.prompt_ids is empty")
        B = len(reqs)
        P = -(-int(lens.max()) // self.pad_multiple) * self.pad_multiple
        ids = torch.full((B, P), self.pad_id, dtype=torch.long)
        pos = torch.zeros(3, B, P, dtype=torch.long)
        next_pos = torch.zeros(B, dtype=torch.long)
        for b, r in enumerate(reqs):
            L = len(r.prompt_ids)
            row = torch.as_tensor(r.prompt_ids, dtype=torch.long)
            ids[b, P - L:] = row
            p = self.rope_fn(row, r.image_grid_thw)
            pos[:, b, P - L:] = p
            next_pos[b] = int(p.max()) + 1
        ids, pos = ids.to(dev), pos.to(dev)
        x = d.embed_tokens(ids)
        with_img = [b for b, r in enumerate(reqs) if r.pixel_values is not None]
        if with_img:
            if self.image_embedder is None:
                raise ValueError("a request has pixel_values but the model exposes no image "
                                 "embedder (image_embeddings / embed_images)")
            pv = torch.cat([reqs[b].pixel_values for b in with_img]).to(dev)
            grid = torch.cat([torch.as_tensor(reqs[b].image_grid_thw).view(-1, 3) for b in with_img]).to(dev)
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
        return x, pos, lens.to(dev), next_pos.to(dev), P

    @torch.no_grad()
    def _generate_batch(self, reqs: list[GenerationRequest], sp: SamplingParams,
                        gen: torch.Generator) -> list[Completion]:
        d = self.decoder
        dev = d.device
        T = sp.max_new_tokens
        x, pos, lens, next_pos, P = self._prefill_inputs(reqs)
        B, S_max = len(reqs), P + T
        st = self._decode_state(B, S_max)
        ar = torch.arange(S_max, device=dev)
        st.key_valid.copy_(ar[None, :] >= (P - lens)[:, None])                   # [B, S_max]
        causal = ar[None, :] <= torch.arange(P, device=dev)[:, None]            # [P, S_max]
        diag = ar[None, :] == torch.arange(P, device=dev)[:, None]              # pad rows see themselves
        mask = ((st.key_valid[:, None, :] & causal[None]) | diag[None]).unsqueeze(1)
        cos, sin = d.rope(pos)
        hidden = d.forward(x, cos, sin, st.cache, torch.arange(P, device=dev), mask)
        logits = d.logits(hidden[:, -1])
        del hidden, mask, x
        step = st.step

        tokens = torch.full((B, T), self.pad_id, dtype=torch.long, device=dev)
        logps = torch.zeros(B, T, dtype=torch.float32, device=dev)
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        eos = torch.tensor(self.eos, dtype=torch.long, device=dev)
        banned = torch.tensor([i for i in self.banned_ids if i < logits.shape[-1]],
                              dtype=torch.long, device=dev)
        stop_at = [None] * B           # (n_tokens, text) of rows ended by a stop string
        checked = 0
        n_steps = T
        for t in range(T):
            tok, lp = sample(logits, sp.temperature, sp.top_k, sp.top_p, gen, banned)
            tok = tok.masked_fill(finished, self.pad_id)
            tokens[:, t] = tok
            logps[:, t] = lp
            finished |= torch.isin(tok, eos)
            if t == T - 1:
                break
            if (t + 1) % self.check_every == 0:
                if sp.stop:
                    self._check_stops(tokens, finished, stop_at, checked, t + 1, sp.stop)
                    checked = t + 1
                if bool(finished.all()):
                    n_steps = t + 1
                    break
            logits = step(tok, next_pos + t, P + t)
        if sp.stop:
            self._check_stops(tokens, finished, stop_at, checked, n_steps, sp.stop)
        return self._completions(reqs, tokens[:, :n_steps].cpu(), logps[:, :n_steps].cpu(), stop_at)

    def _decode_state(self, B: int, S_max: int):
        """KV cache + decode step for this batch shape, kept for the next batch of the same
        shape (prompt lengths are rounded up, so most batches of a GRPO step reuse it and the
        CUDA graph is captured once)."""
        st = self._state
        if st is not None and st.shape == (B, S_max):
            return st
        self._state = None
        if self.decoder.device.type == "cuda":
            torch.cuda.empty_cache()
        st = _DecodeState()
        st.shape = (B, S_max)
        st.cache = self.decoder.new_cache(B, S_max)
        st.key_valid = torch.zeros(B, S_max, dtype=torch.bool, device=self.decoder.device)
        st.step = self._make_step(B, S_max, st.cache, st.key_valid)
        self._state = st
        return st

    def _make_step(self, B: int, S_max: int, cache: torch.Tensor, key_valid: torch.Tensor):
        d = self.decoder
        dev = d.device
        ar = torch.arange(S_max, device=dev)

        def eager(tok, pos1d, slot):
            x = d.embed_tokens(tok[:, None])
            cos, sin = d.rope(pos1d[None, :, None].expand(3, -1, -1))
            mask = (key_valid & (ar[None, :] <= slot)).view(B, 1, 1, S_max)
            h = d.forward(x, cos, sin, cache, slot.view(1), mask)
            return d.logits(h[:, 0])

        if not (self.use_graphs and dev.type == "cuda"):
            return lambda tok, pos1d, slot: eager(tok, pos1d, torch.tensor(slot, device=dev))
        log_once(log, "builtin_cuda_graphs", "built-in engine: CUDA graphs for decode")
        tok_s = torch.zeros(B, dtype=torch.long, device=dev)
        pos_s = torch.zeros(B, dtype=torch.long, device=dev)
        slot_s = torch.zeros((), dtype=torch.long, device=dev)
        # Warm up on a side stream (allocator / cuBLAS workspaces), then capture. This runs
        # before any prefill, so what the warm-up writes into cache slot 0 is overwritten.
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                eager(tok_s, pos_s, slot_s)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out_s = eager(tok_s, pos_s, slot_s)

        def replay(tok, pos1d, slot):
            tok_s.copy_(tok)
            pos_s.copy_(pos1d)
            slot_s.fill_(slot)
            graph.replay()
            return out_s
        return replay

    def _check_stops(self, tokens, finished, stop_at, start: int, end: int, stops: list[str]):
        """Rows whose text gained a stop string in tokens [start, end): record the first token
        count at which it appears and mark them finished."""
        cpu = tokens[:, :end].cpu()
        fin = finished.cpu()
        for b in range(cpu.shape[0]):
            if stop_at[b] is not None:
                continue
            ids = cpu[b].tolist()
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if fin[b] and not any(s in text for s in stops):
                continue
            if not any(s in text for s in stops):
                continue
            for k in range(max(1, start), end + 1):
                t = self.tokenizer.decode(ids[:k], skip_special_tokens=True)
                hits = [t.find(s) + len(s) for s in stops if s in t]
                if hits:
                    stop_at[b] = (k, t[: min(hits)])
                    finished[b] = True
                    break

    def _completions(self, reqs, tokens, logps, stop_at) -> list[Completion]:
        out = []
        eos = set(self.eos)
        for b, r in enumerate(reqs):
            ids = tokens[b].tolist()
            n, reason, text = len(ids), "length", None
            for k, t in enumerate(ids):
                if t in eos:
                    n, reason = k + 1, "stop"
                    break
            if stop_at[b] is not None and stop_at[b][0] <= n:
                n, reason, text = stop_at[b][0], "stop", stop_at[b][1]
            ids = ids[:n]
            if text is None:
                text = self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer else ""
            out.append(Completion(request_id=r.request_id, token_ids=ids,
                                  logprobs=logps[b, :n].tolist(), text=text, finish_reason=reason))
        return out
