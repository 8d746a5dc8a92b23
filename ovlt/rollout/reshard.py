"""Trainer (mcore TP x PP shards) -> rollout engine weights, with no disk round trip.

`iter_hf_weight_buckets(local_sd, cfg, groups, bucket_mb)` runs on every trainer rank, in
lockstep. Walking the state-dict adapter's plan stage by stage:
  1. the owning PP stage all-gathers each TP-sharded parameter on its TP group and merges the
     shards into full HF-named tensors (`state_dict_adapter.merge_entry`);
  2. the tensors are packed into a bucket of at most `bucket_mb` (a single larger tensor, e.g.
     the embedding, forms its own bucket);
  3. with PP > 1 the bucket is broadcast from the owning stage over the PP group (a header with
     names/dtypes/shapes, then one flat byte buffer);
  4. every rank yields the same list of (hf_name, full tensor) for the engine's `update_weights`.
Peak extra memory: one bucket (plus its flat send/receive buffer) and one parameter's TP shards.
Collectives move raw bytes (uint8), so bf16/fp8 work on gloo too and results are bit-exact.
Every collective waits at most `timeout_s` and fails with a rank-tagged RuntimeError.

`shard_for_vllm(hf_name, full_tensor, tp_rank, tp_size, cfg)` slices a full HF tensor the way
vLLM's Qwen2.5-VL loader does (QKVParallelLinear incl. KV-head replication when TP > KV heads,
MergedColumnParallelLinear, RowParallelLinear with unsplit bias, ColumnParallelLinear,
VocabParallelEmbedding/ParallelLMHead with rows padded to a multiple of 64);
`vllm_rank_state` assembles those slices into vLLM's fused rank-local parameters.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Optional

import torch
import torch.distributed as dist

from ovlt.models.qwen2_5_vl import state_dict_adapter as sda
from ovlt.utils.device import default_device

_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
           torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]
_HDR = 8  # per tensor: name index, dtype code, ndim, up to 5 dims


# --------------------------------------------------------------------------- process groups
@dataclass
class ReshardGroups:
    tp_group: Optional[object]
    pp_group: Optional[object]
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1

    @classmethod
    def from_groups(cls, tp_group, pp_group) -> "ReshardGroups":
        return cls(tp_group, pp_group, dist.get_rank(tp_group), dist.get_world_size(tp_group),
                   dist.get_rank(pp_group), dist.get_world_size(pp_group))

    @classmethod
    def from_parallel_state(cls) -> "ReshardGroups":
        """The TP and PP groups of megatron-core's `parallel_state` (after init_distributed)."""
        from megatron.core import parallel_state as ps
        return cls.from_groups(ps.get_tensor_model_parallel_group(),
                               ps.get_pipeline_model_parallel_group())

    @classmethod
    def single(cls) -> "ReshardGroups":
        return cls(None, None)


class _Comm:
    """Collectives with a deadline and rank-tagged errors."""

    def __init__(self, g: ReshardGroups, timeout_s: float):
        self.g = g
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.tag = (f"[rank {dist.get_rank() if dist.is_initialized() else 0} "
                    f"tp {g.tp_rank}/{g.tp_size} pp {g.pp_rank}/{g.pp_size}]")
        group = g.tp_group if g.tp_size > 1 else g.pp_group
        nccl = group is not None and dist.get_backend(group) == "nccl"
        self.device = default_device() if nccl else torch.device("cpu")

    def _wait(self, work, what: str) -> None:
        try:
            ok = work.wait(timeout=self.timeout)
        except Exception as e:  # gloo raises on timeout / peer failure
            raise RuntimeError(f"{self.tag} reshard: {what} failed: {e}") from e
        if ok is False:
            raise RuntimeError(f"{self.tag} reshard: {what} timed out after {self.timeout}")

    def all_gather_tp(self, t: torch.Tensor, what: str) -> list[torch.Tensor]:
        flat = t.detach().contiguous().reshape(-1).view(torch.uint8).to(self.device)
        outs = [torch.empty_like(flat) for _ in range(self.g.tp_size)]
        self._wait(dist.all_gather(outs, flat, group=self.g.tp_group, async_op=True),
                   f"all_gather of {what} on the TP group")
        return [o.view(t.dtype).reshape(t.shape) for o in outs]

    def broadcast_pp(self, t: torch.Tensor, src_stage: int, what: str) -> None:
        src = dist.get_global_rank(self.g.pp_group, src_stage)
        self._wait(dist.broadcast(t, src=src, group=self.g.pp_group, async_op=True),
                   f"broadcast of {what} from PP stage {src_stage}")


# --------------------------------------------------------------------------- buckets
def _send_bucket(comm: _Comm, bucket, name_idx: dict, stage: int) -> None:
    hdr = torch.zeros(len(bucket), _HDR, dtype=torch.int64)
    for i, (name, t) in enumerate(bucket):
        if t.dim() > _HDR - 3:
            raise ValueError(f"{comm.tag} reshard: {name} has {t.dim()} dims (max {_HDR - 3})")
        hdr[i, :3] = torch.tensor([name_idx[name], _DTYPES.index(t.dtype), t.dim()])
        hdr[i, 3:3 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    n = torch.tensor([len(bucket)], dtype=torch.int64, device=comm.device)
    comm.broadcast_pp(n, stage, "bucket size")
    comm.broadcast_pp(hdr.to(comm.device), stage, f"bucket header ({bucket[0][0]}...)")
    data = torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8).to(comm.device)
                      for _, t in bucket])
    comm.broadcast_pp(data, stage, f"bucket data ({bucket[0][0]}...)")


def _recv_buckets(comm: _Comm, names: list[str], stage: int) -> Iterator[list]:
    while True:
        n = torch.zeros(1, dtype=torch.int64, device=comm.device)
        comm.broadcast_pp(n, stage, "bucket size")
        if int(n.item()) == 0:
            return
        hdr = torch.zeros(int(n.item()), _HDR, dtype=torch.int64, device=comm.device)
        comm.broadcast_pp(hdr, stage, "bucket header")
        hdr = hdr.cpu().tolist()
        metas = []
        for idx, code, ndim, *dims in hdr:
            dtype, shape = _DTYPES[code], tuple(dims[:ndim])
            metas.append((names[idx], dtype, shape,
                          int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()))
        data = torch.empty(sum(m[3] for m in metas), dtype=torch.uint8, device=comm.device)
        comm.broadcast_pp(data, stage, f"bucket data ({metas[0][0]}...)")
        out, off = [], 0
        for name, dtype, shape, nb in metas:  # views into `data`: no second copy
            out.append((name, data[off:off + nb].view(dtype).reshape(shape)))
            off += nb
        yield out


def iter_hf_weight_buckets(local_sd: Mapping[str, torch.Tensor], cfg,
                           groups: Optional[ReshardGroups] = None, bucket_mb: float = 512,
                           timeout_s: float = 600.0, vocab_divisible_by: Optional[int] = None,
                           ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield lists of (HF name, full tensor), each list at most `bucket_mb` (or one tensor), on
    every rank of the TP x PP grid, in the same order everywhere. `local_sd`: this rank's mcore
    state dict (`model.state_dict()` names, local or TE norm spelling; extra keys ignored)."""
    g = groups or ReshardGroups.single()
    comm = _Comm(g, timeout_s)
    limit = int(bucket_mb * 2 ** 20)
    local = sda.to_local_norm_names(local_sd)
    plan = [e for e in sda.build_plan(cfg, g.tp_size, g.pp_size, "local") if e.export]
    ctx = sda.conversion_context(cfg, g.tp_size, vocab_divisible_by)
    names = [n for e in plan for n in e.hf_names]
    name_idx = {n: i for i, n in enumerate(names)}
    for stage in range(g.pp_size):
        if stage != g.pp_rank:
            yield from _recv_buckets(comm, names, stage)
            continue
        bucket, size = [], 0
        for e in (e for e in plan if e.pp_rank == stage):
            if e.mcore_name not in local:
                raise sda.MissingTensorError(f"{comm.tag} reshard: this rank's state dict has no "
                                             f"{e.mcore_name!r}")
            shard = local[e.mcore_name]
            if sda.is_tp_sharded(e.kind) and g.tp_size > 1:
                shards = comm.all_gather_tp(shard, e.mcore_name)
            else:
                shards = [shard] * g.tp_size
            for name, t in sda.merge_entry(e, shards, ctx):
                nb = t.numel() * t.element_size()
                if bucket and size + nb > limit:
                    if g.pp_size > 1:
                        _send_bucket(comm, bucket, name_idx, stage)
                    yield bucket
                    bucket, size = [], 0
                bucket.append((name, t))
                size += nb
        if bucket:
            if g.pp_size > 1:
                _send_bucket(comm, bucket, name_idx, stage)
            yield bucket
        if g.pp_size > 1:  # end-of-stage marker
            comm.broadcast_pp(torch.zeros(1, dtype=torch.int64, device=comm.device), stage,
                              "end-of-stage marker")


def iter_hf_weights(local_sd, cfg, groups=None, bucket_mb: float = 512, **kw
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Flat (name, tensor) stream for `RolloutEngine.update_weights`, still bucket-bounded."""
    for bucket in iter_hf_weight_buckets(local_sd, cfg, groups, bucket_mb, **kw):
        yield from bucket


# --------------------------------------------------------------------------- vLLM layout
VLLM_VOCAB_PADDING = 64  # vllm.model_executor.layers.vocab_parallel_embedding default


def _layer_suffix(name: str) -> str:
    return name.split(".", 3)[-1] if name.startswith(("model.layers.", "visual.blocks.")) else name


def vllm_kind(hf_name: str) -> tuple[str, Optional[str]]:
    """(parallel layer kind, shard id) of an HF tensor in vLLM's Qwen2.5-VL."""
    n = sda.canonical_hf_name(hf_name)
    if n in ("model.embed_tokens.weight", "lm_head.weight"):
        return "vocab", None
    s = _layer_suffix(n)
    if n.startswith("model.layers."):
        for p, sid in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")):
            if s.startswith(f"self_attn.{p}."):
                return "qkv", sid
        if s.startswith(("mlp.gate_proj.", "mlp.up_proj.")):
            return "merged", "0" if "gate" in s else "1"
        if s in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            return "row", None
    if n.startswith("visual.blocks."):
        if s.startswith("attn.qkv."):
            return "qkv_fused", None
        if s.startswith(("mlp.gate_proj.", "mlp.up_proj.")):
            return "merged", "0" if "gate" in s else "1"
        if s in ("attn.proj.weight", "mlp.down_proj.weight"):
            return "row", None
    if n in ("visual.merger.mlp.0.weight", "visual.merger.mlp.0.bias"):
        return "column", None
    if n == "visual.merger.mlp.2.weight":
        return "row", None
    return "replicated", None  # norms, row-parallel biases, patch embed (ReplicatedLinear)


def _heads_slice(t: torch.Tensor, n_heads: int, tp_rank: int, tp_size: int) -> torch.Tensor:
    """QKVParallelLinear's slice of a q/k/v tensor with `n_heads` heads: contiguous heads, and
    when tp_size > n_heads each head replicated on tp_size // n_heads consecutive ranks."""
    if tp_size >= n_heads:
        if tp_size % n_heads:
            raise ValueError(f"vLLM needs tp_size={tp_size} divisible by the {n_heads} KV heads")
        return t.chunk(n_heads, dim=0)[tp_rank // (tp_size // n_heads)]
    return t.chunk(tp_size, dim=0)[tp_rank]


def shard_for_vllm(hf_name: str, tensor: torch.Tensor, tp_rank: int, tp_size: int, cfg=None
                   ) -> torch.Tensor:
    """The piece of the full HF tensor `hf_name` that vLLM TP rank `tp_rank` holds (for the
    vocab: the whole rank-local parameter, zero rows past the vocab). `cfg` (ModelConfig) is
    needed for the KV-head count of `k_proj`/`v_proj`."""
    kind, sid = vllm_kind(hf_name)
    if kind == "replicated" or tp_size == 1 and kind != "vocab":
        return tensor
    if kind == "vocab":
        padded = -(-tensor.shape[0] // VLLM_VOCAB_PADDING) * VLLM_VOCAB_PADDING
        if padded % tp_size:
            raise ValueError(f"vLLM cannot split {padded} vocab rows over tp_size={tp_size}")
        per = padded // tp_size
        rows = tensor[tp_rank * per:min((tp_rank + 1) * per, tensor.shape[0])]
        pad = torch.zeros(per - rows.shape[0], *tensor.shape[1:], dtype=tensor.dtype,
                          device=tensor.device)
        return torch.cat([rows, pad]) if pad.shape[0] else rows
    if kind == "qkv":
        if sid == "q":
            return tensor.chunk(tp_size, dim=0)[tp_rank]
        if cfg is None:
            raise ValueError(f"shard_for_vllm({hf_name!r}): pass cfg (KV-head count needed)")
        return _heads_slice(tensor, cfg.num_query_groups, tp_rank, tp_size)
    if kind == "qkv_fused":  # vision MHA: [q; k; v] each split by heads, concatenated per rank
        return torch.cat([p.chunk(tp_size, dim=0)[tp_rank] for p in tensor.chunk(3, dim=0)])
    if kind in ("merged", "column"):
        return tensor.chunk(tp_size, dim=0)[tp_rank]
    if kind == "row":
        return tensor.chunk(tp_size, dim=1)[tp_rank].contiguous()
    raise AssertionError(kind)


def vllm_param_name(hf_name: str) -> tuple[str, Optional[str]]:
    """vLLM parameter that receives `hf_name`, and the shard id inside it (None = whole)."""
    n = sda.canonical_hf_name(hf_name)
    kind, sid = vllm_kind(n)
    if kind == "qkv":
        n = n.replace(f"self_attn.{sid}_proj.", "self_attn.qkv_proj.")
    elif kind == "merged":
        n = n.replace("mlp.gate_proj.", "mlp.gate_up_proj.").replace("mlp.up_proj.", "mlp.gate_up_proj.")
    if n.startswith("model."):
        n = "language_model." + n
    elif n.startswith("lm_head."):
        n = "language_model." + n
    return n, sid


def vllm_rank_state(named_tensors: Iterable[tuple[str, torch.Tensor]], cfg, tp_rank: int,
                    tp_size: int) -> dict[str, torch.Tensor]:
    """vLLM's rank-local parameters (fused qkv_proj / gate_up_proj, padded vocab, flat patch
    embed) built from full HF tensors. Fused parameters are emitted once all parts arrived."""
    parts: dict[str, dict] = {}
    out = {}
    need = {"q": 3, "0": 2}
    for name, t in named_tensors:
        vname, sid = vllm_param_name(name)
        piece = shard_for_vllm(name, t, tp_rank, tp_size, cfg)
        if vname.endswith("patch_embed.proj.weight"):
            piece = piece.reshape(piece.shape[0], -1)  # vLLM's conv3d_to_linear_weight
        if sid is None:
            out[vname] = piece
            continue
        p = parts.setdefault(vname, {})
        p[sid] = piece
        order = ("q", "k", "v") if sid in "qkv" else ("0", "1")
        if len(p) == need[order[0]]:
            out[vname] = torch.cat([p[k] for k in order])
            del parts[vname]
    if parts:
        raise sda.MissingTensorError(f"incomplete fused vLLM parameters: {sorted(parts)}")
    return out
