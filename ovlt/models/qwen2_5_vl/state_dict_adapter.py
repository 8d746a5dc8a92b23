"""HF Qwen2.5-VL tensors <-> megatron-core rank-local tensors, for any TP x PP. Pure tensor code.

One *plan* (`build_plan`) lists every mcore parameter of every PP stage with the HF tensors it is
made of and a *kind* saying how it is split across TP ranks. Both directions walk the same plan:

  hf_to_mcore(hf, cfg, tp_rank, tp_size, pp_rank, pp_size) -> {mcore name: rank-local tensor}
  mcore_to_hf(shards | gather_fn, cfg, tp_size, pp_size)   -> iterator of (hf name, full tensor)

Layouts (see docs/CONTRACTS.md "mcore parameter names"):
  qkv      LLM GQA: rows grouped per query group [q_g (heads/group rows), k_g, v_g]; TP splits groups.
  qkv_mha  vision: HF `attn.qkv` is [q_all; k_all; v_all]; mcore interleaves per head [q_h, k_h, v_h].
  gate_up  `linear_fc1` = [gate shard; up shard] on every TP rank.
  column / row   split on the output (dim 0) / input (dim 1) dimension.
  vocab    rows padded with zeros to `padded_vocab_size`, then split on dim 0; stripped on return.
  patch    HF Conv3d weight [hidden, C, T, P, P] <-> flat [hidden, C*T*P*P]; replicated.
  replicated  identical on every TP rank (norms, biases of row-parallel layers, ...).
No dtype conversion anywhere: the round trip is bit-exact.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Sequence, Union

import torch

LLM = "language_model."
VIS = "vision_model."

# The one table deciding how the merger's linears are split over TP. The mcore vision tower keeps
# them replicated (they are tiny and run once per image); switch to "column"/"row" here (and only
# here) if the model builds them as ColumnParallelLinear/RowParallelLinear.
MERGER_TP_KIND = {"linear_fc1.weight": "replicated", "linear_fc1.bias": "replicated",
                  "linear_fc2.weight": "replicated", "linear_fc2.bias": "replicated"}

# TE fuses the pre-attention / pre-MLP norms into the following linear layer.
_NORM_LOCAL_TO_TE = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                     "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
_NORM_TE_TO_LOCAL = {v: k for k, v in _NORM_LOCAL_TO_TE.items()}
_LAYER_RE = re.compile(r"^(.*decoder\.layers\.\d+\.)(.+)$")


class MissingTensorError(KeyError):
    """A tensor needed by the conversion is absent; the message names it."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


# --------------------------------------------------------------------------- sizes / checks
def padded_vocab_size(vocab_size: int, tp_size: int, divisible_by: int = 128) -> int:
    """Vocab rows of mcore's embedding/output layer: a multiple of `divisible_by * tp_size`."""
    m = divisible_by * tp_size
    return -(-vocab_size // m) * m


def layer_offsets(num_layers: int, pp_size: int) -> list[int]:
    """First global LLM layer of each PP stage (even split), plus the total at the end."""
    if pp_size < 1 or num_layers % pp_size:
        raise ValueError(f"pipeline_parallel={pp_size} must divide the {num_layers} LLM layers "
                         "(only even PP splits are supported)")
    per = num_layers // pp_size
    return [s * per for s in range(pp_size)] + [num_layers]


def check_parallel(cfg, tp_size: int, pp_size: int) -> None:
    """Raise ValueError naming the field when TP/PP cannot split this model."""
    v = cfg.vision
    for what, n in (("model.num_attention_heads", cfg.num_attention_heads),
                    ("model.num_query_groups", cfg.num_query_groups),
                    ("model.ffn_hidden_size", cfg.ffn_hidden_size),
                    ("model.vision.num_heads", v.num_heads),
                    ("model.vision.intermediate_size", v.intermediate_size)):
        if tp_size < 1 or n % tp_size:
            raise ValueError(f"tensor_parallel={tp_size} must divide {what}={n}")
    if cfg.num_attention_heads % cfg.num_query_groups:
        raise ValueError(f"model.num_query_groups={cfg.num_query_groups} must divide "
                         f"model.num_attention_heads={cfg.num_attention_heads}")
    merger_hidden = v.hidden_size * v.spatial_merge_size ** 2
    if any(k != "replicated" for k in MERGER_TP_KIND.values()) and merger_hidden % tp_size:
        raise ValueError(f"tensor_parallel={tp_size} must divide the merger width {merger_hidden}")
    layer_offsets(cfg.num_layers, pp_size)


def hf_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Every tensor of the official HF checkpoint with its shape (lm_head absent when tied)."""
    v, H = cfg.vision, cfg.hidden_size
    hd = H // cfg.num_attention_heads
    q, kv, F = cfg.num_attention_heads * hd, cfg.num_query_groups * hd, cfg.ffn_hidden_size
    D, Fv = v.hidden_size, v.intermediate_size
    M = D * v.spatial_merge_size ** 2
    out: dict[str, tuple[int, ...]] = {
        "visual.patch_embed.proj.weight": (D, v.in_channels, v.temporal_patch_size,
                                           v.patch_size, v.patch_size)}
    for i in range(v.depth):
        p = f"visual.blocks.{i}."
        out.update({p + "norm1.weight": (D,), p + "norm2.weight": (D,),
                    p + "attn.qkv.weight": (3 * D, D), p + "attn.qkv.bias": (3 * D,),
                    p + "attn.proj.weight": (D, D), p + "attn.proj.bias": (D,),
                    p + "mlp.gate_proj.weight": (Fv, D), p + "mlp.gate_proj.bias": (Fv,),
                    p + "mlp.up_proj.weight": (Fv, D), p + "mlp.up_proj.bias": (Fv,),
                    p + "mlp.down_proj.weight": (D, Fv), p + "mlp.down_proj.bias": (D,)})
    out.update({"visual.merger.ln_q.weight": (D,), "visual.merger.mlp.0.weight": (M, M),
                "visual.merger.mlp.0.bias": (M,), "visual.merger.mlp.2.weight": (H, M),
                "visual.merger.mlp.2.bias": (H,),
                "model.embed_tokens.weight": (cfg.vocab_size, H)})
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                    p + "self_attn.q_proj.weight": (q, H), p + "self_attn.q_proj.bias": (q,),
                    p + "self_attn.k_proj.weight": (kv, H), p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.v_proj.bias": (kv,),
                    p + "self_attn.o_proj.weight": (H, q), p + "mlp.gate_proj.weight": (F, H),
                    p + "mlp.up_proj.weight": (F, H), p + "mlp.down_proj.weight": (H, F)})
    out["model.norm.weight"] = (H,)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, H)
    return out


# --------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Entry:
    """One mcore parameter on one PP stage, made of `hf_names` (in order) split by `kind`."""
    pp_rank: int
    mcore_name: str
    hf_names: tuple[str, ...]
    kind: str
    export: bool = True  # False: a copy (tied output layer on the last stage), not written back


def build_plan(cfg, tp_size: int, pp_size: int, norm_names: str = "local") -> list[Entry]:
    """All mcore parameters of all stages, in a deterministic order (vision, LLM by stage)."""
    if norm_names not in ("local", "te"):
        raise ValueError(f"norm_names must be 'local' or 'te', got {norm_names!r}")
    check_parallel(cfg, tp_size, pp_size)
    offs = layer_offsets(cfg.num_layers, pp_size)

    def norm(name: str) -> str:
        return _NORM_LOCAL_TO_TE.get(name, name) if norm_names == "te" else name

    plan: list[Entry] = []
    add = lambda s, m, hf, kind, export=True: plan.append(Entry(s, m, tuple(hf), kind, export))  # noqa: E731
    add(0, VIS + "patch_embed.proj.weight", ["visual.patch_embed.proj.weight"], "patch")
    for i in range(cfg.vision.depth):
        m, h = f"{VIS}decoder.layers.{i}.", f"visual.blocks.{i}."
        add(0, m + norm("input_layernorm.weight"), [h + "norm1.weight"], "replicated")
        for s in ("weight", "bias"):
            add(0, m + f"self_attention.linear_qkv.{s}", [h + f"attn.qkv.{s}"], "qkv_mha")
        add(0, m + "self_attention.linear_proj.weight", [h + "attn.proj.weight"], "row")
        add(0, m + "self_attention.linear_proj.bias", [h + "attn.proj.bias"], "replicated")
        add(0, m + norm("pre_mlp_layernorm.weight"), [h + "norm2.weight"], "replicated")
        for s in ("weight", "bias"):
            add(0, m + f"mlp.linear_fc1.{s}", [h + f"mlp.gate_proj.{s}", h + f"mlp.up_proj.{s}"],
                "gate_up")
        add(0, m + "mlp.linear_fc2.weight", [h + "mlp.down_proj.weight"], "row")
        add(0, m + "mlp.linear_fc2.bias", [h + "mlp.down_proj.bias"], "replicated")
    add(0, VIS + "merger.norm.weight", ["visual.merger.ln_q.weight"], "replicated")
    for mname, hname in (("linear_fc1", "mlp.0"), ("linear_fc2", "mlp.2")):
        for s in ("weight", "bias"):
            add(0, f"{VIS}merger.{mname}.{s}", [f"visual.merger.{hname}.{s}"],
                MERGER_TP_KIND[f"{mname}.{s}"])
    add(0, LLM + "embedding.word_embeddings.weight", ["model.embed_tokens.weight"], "vocab")
    for st in range(pp_size):
        for g in range(offs[st], offs[st + 1]):
            m, h = f"{LLM}decoder.layers.{g - offs[st]}.", f"model.layers.{g}."
            a = h + "self_attn."
            add(st, m + norm("input_layernorm.weight"), [h + "input_layernorm.weight"], "replicated")
            for s in ("weight", "bias"):
                add(st, m + f"self_attention.linear_qkv.{s}",
                    [a + f"q_proj.{s}", a + f"k_proj.{s}", a + f"v_proj.{s}"], "qkv")
            add(st, m + "self_attention.linear_proj.weight", [a + "o_proj.weight"], "row")
            add(st, m + norm("pre_mlp_layernorm.weight"), [h + "post_attention_layernorm.weight"],
                "replicated")
            add(st, m + "mlp.linear_fc1.weight", [h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"],
                "gate_up")
            add(st, m + "mlp.linear_fc2.weight", [h + "mlp.down_proj.weight"], "row")
    last = pp_size - 1
    add(last, LLM + "decoder.final_layernorm.weight", ["model.norm.weight"], "replicated")
    if not cfg.tie_word_embeddings:
        add(last, LLM + "output_layer.weight", ["lm_head.weight"], "vocab")
    elif pp_size > 1:
        # mcore keeps a copy of the tied embedding as output_layer.weight on the last stage
        # (kept equal by the embedding-group all-reduce); it is never written back to HF.
        add(last, LLM + "output_layer.weight", ["model.embed_tokens.weight"], "vocab", export=False)
    return plan


# --------------------------------------------------------------------------- split / merge
@dataclass
class _Ctx:
    cfg: object
    tp: int
    padded_vocab: int
    shapes: dict = field(default_factory=dict)


def _qkv_gqa_split(ts: Sequence[torch.Tensor], c: _Ctx, r: int) -> torch.Tensor:
    q, k, v = ts
    G = c.cfg.num_query_groups
    fused = torch.cat([q.reshape(G, -1, *q.shape[1:]), k.reshape(G, -1, *k.shape[1:]),
                       v.reshape(G, -1, *v.shape[1:])], dim=1)  # [G, (hpg+2)*hd, ...]
    per = G // c.tp
    return fused[r * per:(r + 1) * per].reshape(-1, *q.shape[1:])


def _qkv_gqa_merge(shards: Sequence[torch.Tensor], c: _Ctx) -> list[torch.Tensor]:
    cfg = c.cfg
    G, hd = cfg.num_query_groups, cfg.hidden_size // cfg.num_attention_heads
    hpg = cfg.num_attention_heads // G
    full = torch.cat(list(shards), dim=0)
    grouped = full.reshape(G, (hpg + 2) * hd, *full.shape[1:])
    q, k, v = torch.split(grouped, [hpg * hd, hd, hd], dim=1)
    return [t.reshape(-1, *full.shape[1:]).contiguous() for t in (q, k, v)]


def _qkv_mha_split(ts: Sequence[torch.Tensor], c: _Ctx, r: int) -> torch.Tensor:
    (qkv,) = ts
    nh = c.cfg.vision.num_heads
    per_head = qkv.reshape(3, nh, -1, *qkv.shape[1:]).transpose(0, 1)  # [nh, 3, hd, ...]
    per = nh // c.tp
    return per_head[r * per:(r + 1) * per].reshape(-1, *qkv.shape[1:]).contiguous()


def _qkv_mha_merge(shards: Sequence[torch.Tensor], c: _Ctx) -> list[torch.Tensor]:
    nh = c.cfg.vision.num_heads
    full = torch.cat(list(shards), dim=0)
    return [full.reshape(nh, 3, -1, *full.shape[1:]).transpose(0, 1)
            .reshape(-1, *full.shape[1:]).contiguous()]


def _gate_up_split(ts, c: _Ctx, r: int) -> torch.Tensor:
    gate, up = ts
    return torch.cat([gate.chunk(c.tp, dim=0)[r], up.chunk(c.tp, dim=0)[r]], dim=0)


def _gate_up_merge(shards, c: _Ctx) -> list[torch.Tensor]:
    halves = [s.chunk(2, dim=0) for s in shards]
    return [torch.cat([h[0] for h in halves], dim=0), torch.cat([h[1] for h in halves], dim=0)]


def _vocab_split(ts, c: _Ctx, r: int) -> torch.Tensor:
    (w,) = ts
    per = c.padded_vocab // c.tp
    lo, hi = r * per, (r + 1) * per
    out = w[lo:min(hi, w.shape[0])]
    if out.shape[0] < per:  # padded rows are zero, so they never win an argmax by accident
        pad = torch.zeros(per - out.shape[0], *w.shape[1:], dtype=w.dtype, device=w.device)
        out = torch.cat([out, pad], dim=0)
    return out


def _vocab_merge(shards, c: _Ctx) -> list[torch.Tensor]:
    return [torch.cat(list(shards), dim=0)[:c.cfg.vocab_size].contiguous()]


def _patch_split(ts, c: _Ctx, r: int) -> torch.Tensor:
    (w,) = ts
    return w.reshape(w.shape[0], -1)


def _patch_merge(shards, c: _Ctx) -> list[torch.Tensor]:
    v = c.cfg.vision
    w = shards[0]
    return [w.reshape(w.shape[0], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)]


_KINDS: dict[str, tuple[Callable, Callable]] = {
    "qkv": (_qkv_gqa_split, _qkv_gqa_merge),
    "qkv_mha": (_qkv_mha_split, _qkv_mha_merge),
    "gate_up": (_gate_up_split, _gate_up_merge),
    "column": (lambda ts, c, r: ts[0].chunk(c.tp, dim=0)[r],
               lambda sh, c: [torch.cat(list(sh), dim=0)]),
    "row": (lambda ts, c, r: ts[0].chunk(c.tp, dim=1)[r].contiguous(),
            lambda sh, c: [torch.cat(list(sh), dim=1)]),
    "replicated": (lambda ts, c, r: ts[0], lambda sh, c: [sh[0]]),
    "vocab": (_vocab_split, _vocab_merge),
    "patch": (_patch_split, _patch_merge),
}


def is_tp_sharded(kind: str) -> bool:
    """Whether the TP ranks hold different pieces (replicated kinds need no gather)."""
    return kind not in ("replicated", "patch")


def conversion_context(cfg, tp_size: int, vocab_divisible_by: int | None = None) -> _Ctx:
    """Sizes shared by every split/merge (padded vocab for this TP size)."""
    div = vocab_divisible_by or getattr(cfg, "make_vocab_size_divisible_by", 128)
    return _Ctx(cfg, tp_size, padded_vocab_size(cfg.vocab_size, tp_size, div))


# --------------------------------------------------------------------------- HF name spellings
def canonical_hf_name(name: str) -> str:
    """transformers>=4.52 spelling (`model.language_model.*`, `model.visual.*`) -> official one."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name


def to_local_norm_names(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename TE's fused-norm spelling to the local spec's (other names unchanged)."""
    out = {}
    for k, t in sd.items():
        m = _LAYER_RE.match(k)
        out[m.group(1) + _NORM_TE_TO_LOCAL[m.group(2)] if m and m.group(2) in _NORM_TE_TO_LOCAL else k] = t
    return out


# --------------------------------------------------------------------------- HF -> mcore
def _as_lookup(hf_tensors, wanted: set[str]) -> Mapping[str, torch.Tensor]:
    """A Mapping is used lazily as is; an iterable of (name, tensor) is read keeping only `wanted`."""
    if isinstance(hf_tensors, Mapping):
        return hf_tensors
    kept = {}
    for name, t in hf_tensors:
        name = canonical_hf_name(name)
        if name in wanted:
            kept[name] = t
    return kept


def _get_hf(lookup: Mapping, name: str, e: Entry, shapes: dict) -> torch.Tensor:
    t = None
    for cand in (name, "model.language_model." + name[6:] if name.startswith("model.") else None,
                 "model." + name if name.startswith("visual.") else None):
        if cand is not None and cand in lookup:
            t = lookup[cand]
            break
    if t is None:
        raise MissingTensorError(f"missing HF tensor {name!r} (needed for {e.mcore_name} on "
                                 f"pipeline stage {e.pp_rank})")
    want = shapes.get(name)
    if want is not None and tuple(t.shape) != tuple(want):
        raise ValueError(f"HF tensor {name!r} has shape {tuple(t.shape)}, the model config "
                         f"expects {tuple(want)}")
    return t


def convert_entry(e: Entry, hf_lookup: Mapping, ctx: _Ctx, tp_rank: int) -> torch.Tensor:
    ts = [_get_hf(hf_lookup, n, e, ctx.shapes) for n in e.hf_names]
    dtypes = {t.dtype for t in ts}
    if len(dtypes) > 1:
        raise ValueError(f"{e.mcore_name}: HF tensors {list(e.hf_names)} have mixed dtypes {dtypes}")
    return _KINDS[e.kind][0](ts, ctx, tp_rank)


def iter_hf_to_mcore(hf_tensors, cfg, tp_rank: int, tp_size: int, pp_rank: int, pp_size: int, *,
                     norm_names: str = "local", vocab_divisible_by: int | None = None,
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """Streaming form of `hf_to_mcore`: yields (mcore name, rank-local tensor) one at a time."""
    if not 0 <= tp_rank < tp_size or not 0 <= pp_rank < pp_size:
        raise ValueError(f"rank out of range: tp_rank={tp_rank}/{tp_size}, pp_rank={pp_rank}/{pp_size}")
    plan = [e for e in build_plan(cfg, tp_size, pp_size, norm_names) if e.pp_rank == pp_rank]
    ctx = conversion_context(cfg, tp_size, vocab_divisible_by)
    ctx.shapes = hf_shapes(cfg)
    lookup = _as_lookup(hf_tensors, {n for e in plan for n in e.hf_names})
    for e in plan:
        yield e.mcore_name, convert_entry(e, lookup, ctx, tp_rank)


def hf_to_mcore(hf_tensors: Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]],
                cfg, tp_rank: int, tp_size: int, pp_rank: int, pp_size: int, *,
                norm_names: str = "local", vocab_divisible_by: int | None = None,
                ) -> dict[str, torch.Tensor]:
    """The state dict of mcore rank (tp_rank, pp_rank): {mcore name: tensor}. Tensors may share
    storage with the inputs (replicated ones are returned as is). HF names in either spelling."""
    return dict(iter_hf_to_mcore(hf_tensors, cfg, tp_rank, tp_size, pp_rank, pp_size,
                                 norm_names=norm_names, vocab_divisible_by=vocab_divisible_by))


# --------------------------------------------------------------------------- mcore -> HF
GatherFn = Callable[[str, int], Sequence[torch.Tensor]]


def _shard_getter(src) -> GatherFn:
    """`src`: gather function (mcore_name, pp_rank) -> [tensor of tp rank 0..tp-1]; or rank state
    dicts as {(tp_rank, pp_rank): sd} or [pp_rank][tp_rank] -> sd. Either norm spelling."""
    if callable(src):
        return src
    if isinstance(src, Mapping):
        sds = {key: to_local_norm_names(sd) for key, sd in src.items()}
        tps = sorted({tp for tp, _ in sds})
    else:
        sds = {(tp, pp): to_local_norm_names(sd) for pp, row in enumerate(src) for tp, sd in enumerate(row)}
        tps = sorted({tp for tp, _ in sds})

    def get(name: str, pp_rank: int) -> list[torch.Tensor]:
        out = []
        for tp in tps:
            sd = sds.get((tp, pp_rank))
            if sd is None:
                raise MissingTensorError(f"no state dict for tp_rank={tp}, pp_rank={pp_rank}")
            if name not in sd:
                raise MissingTensorError(f"missing mcore tensor {name!r} in the state dict of "
                                         f"tp_rank={tp}, pp_rank={pp_rank}")
            out.append(sd[name])
        return out
    return get


def merge_entry(e: Entry, shards: Sequence[torch.Tensor], ctx: _Ctx) -> list[tuple[str, torch.Tensor]]:
    """Full HF tensors of one plan entry from its TP shards (rank order)."""
    if len(shards) != ctx.tp:
        raise ValueError(f"{e.mcore_name}: got {len(shards)} TP shards, expected {ctx.tp}")
    return list(zip(e.hf_names, _KINDS[e.kind][1](shards, ctx)))


def mcore_to_hf(src, cfg, tp_size: int, pp_size: int, *, vocab_divisible_by: int | None = None,
                ) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (HF name, full tensor) in plan order, one mcore parameter's shards at a time.
    Local names are looked up (a gather function must accept them; dict sources take both)."""
    get = _shard_getter(src)
    ctx = conversion_context(cfg, tp_size, vocab_divisible_by)
    for e in build_plan(cfg, tp_size, pp_size, "local"):
        if not e.export:
            continue
        shards = get(e.mcore_name, e.pp_rank)  # called for every entry: exporters rely on it
        if not is_tp_sharded(e.kind) and len(shards):
            shards = [shards[0]] * tp_size  # replicas: rank 0's copy
        yield from merge_entry(e, shards, ctx)


def mcore_shapes(cfg, tp_size: int, pp_size: int, pp_rank: int, *, norm_names: str = "local",
                 vocab_divisible_by: int | None = None) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor of an mcore rank's state dict, computed with meta tensors."""
    shapes = hf_shapes(cfg)
    metas = {n: torch.empty(s, device="meta") for n, s in shapes.items()}
    return {n: tuple(t.shape) for n, t in iter_hf_to_mcore(
        metas, cfg, 0, tp_size, pp_rank, pp_size, norm_names=norm_names,
        vocab_divisible_by=vocab_divisible_by)}
