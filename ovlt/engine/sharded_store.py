"""megatron-core sharded state dicts (model + DistributedOptimizer state) stored as safetensors
+ JSON: nothing in a store is a pickle, and a store loads at any TP/PP/DP layout.

    common.json                       {"format", "world_size", "common"}: the non-sharded state
                                      (rank 0), tensors in it referenced by name
    common.safetensors                those tensors (only when there are any)
    r00003-001-of-002.safetensors     rank 3's main-replica pieces, second of its two files.
                                      The header's metadata holds "pieces" (JSON: name in the
                                      file, global key, offset, global shape of each piece) and
                                      "objects" (JSON-encoded ShardedObjects, first file only)

`save` is collective (every rank writes its own files); `load` reads, for each tensor this
rank asks for, the parts of the stored pieces that overlap it: a TP=2 save loads at TP=1 and
the other way round. Reads go through safetensors headers and slices only, never `torch.load`.
The stored values are what mcore's own dist-checkpointing would store (its `save_preprocess`
/ `load_preprocess` apply the sharded-tensor factories), so the layout stays mcore's.

Not stored: a layer's `_extra_state` (Transformer Engine keeps its FP8 scaling history there
as a pickle); it loads as None, and TE rebuilds the history in the first steps after a resume.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ovlt.errors import InputError
from ovlt.logging import get_logger, log_once

log = get_logger(__name__)

FORMAT = "ovlt-sharded-v1"
COMMON = "common.json"
COMMON_TENSORS = "common.safetensors"
MAX_FILE_BYTES = 4 * 1024 ** 3
_FILE_RE = re.compile(r"^r(\d{5})-(\d{3})-of-(\d{3})\.safetensors$")
_MARK = "__ovlt__"


class CheckpointError(InputError):
    """A checkpoint is missing, incomplete, corrupt or of another format; names the file."""


def _file_name(rank: int, i: int, n: int) -> str:
    return f"r{rank:05d}-{i:03d}-of-{n:03d}.safetensors"


# --------------------------------------------------------------------------- JSON values
def encode(value: Any, tensors: dict, where: str) -> Any:
    """`value` as JSON; tensors go into `tensors` (name -> tensor) and are referenced by
    name. Raises TypeError naming `where` for anything JSON cannot hold."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if torch.is_tensor(value):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()
        return {_MARK: "tensor", "name": name}
    if isinstance(value, torch.dtype):
        return {_MARK: "dtype", "name": str(value).replace("torch.", "")}
    if isinstance(value, (tuple, torch.Size)):
        return {_MARK: "tuple", "items": [encode(v, tensors, f"{where}[{i}]")
                                          for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and _MARK not in value:
            return {k: encode(v, tensors, f"{where}.{k}") for k, v in value.items()}
        return {_MARK: "dict", "items": [[encode(k, tensors, where),
                                          encode(v, tensors, f"{where}.{k}")]
                                         for k, v in value.items()]}
    raise TypeError(f"checkpoint value {where} is a {type(value).__name__}, which ovlt does not "
                    "store (JSON values, tuples and tensors only: no pickle)")


def decode(value: Any, tensors, where: str) -> Any:
    """Inverse of `encode`; `tensors` maps names to tensors. A marker it does not know is a
    CheckpointError naming `where`."""
    if isinstance(value, list):
        return [decode(v, tensors, where) for v in value]
    if not isinstance(value, dict):
        return value
    kind = value.get(_MARK)
    if kind is None:
        return {k: decode(v, tensors, where) for k, v in value.items()}
    try:
        if kind == "tensor":
            return tensors[value["name"]]
        if kind == "dtype":
            dt = getattr(torch, value["name"])
            if not isinstance(dt, torch.dtype):
                raise KeyError(value["name"])
            return dt
        if kind == "tuple":
            return tuple(decode(v, tensors, where) for v in value["items"])
        if kind == "dict":
            return {_hashable(decode(k, tensors, where)): decode(v, tensors, where)
                    for k, v in value["items"]}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{where}: bad {kind!r} entry ({e!r})") from None
    raise CheckpointError(f"{where}: unknown entry kind {kind!r}")


def _hashable(k):
    if isinstance(k, list):
        return tuple(_hashable(v) for v in k)
    return k


# --------------------------------------------------------------------------- save
def _pieces(sharded: dict, rank: int) -> tuple[list, dict]:
    """This rank's main-replica tensor pieces [(name, key, offset, global_shape, tensor)] and
    its main-replica objects {unique_key: json}."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import (ShardedObject, ShardedTensor,
                                                          is_main_replica)
    pieces, objects = [], {}
    for sh in nested_values(sharded):
        if not is_main_replica(sh.replica_id):
            continue
        if isinstance(sh, ShardedObject):
            if sh.key.endswith("._extra_state"):
                if sh.data is not None:
                    log_once(log, "extra_state", "checkpoint: layers' _extra_state (TE FP8 "
                             "scaling history, a pickle) is not stored; it rebuilds after a "
                             "resume")
                continue
            sink: dict = {}
            objects[sh.unique_key] = encode(sh.data, sink, sh.key)
            if sink:
                raise TypeError(f"checkpoint: ShardedObject {sh.unique_key!r} holds tensors; "
                                "ovlt stores objects as JSON only")
            continue
        if not isinstance(sh, ShardedTensor):
            raise TypeError(f"checkpoint: cannot store {type(sh).__name__} {sh.key!r}")
        if sh.flattened_range is not None:
            raise TypeError(f"checkpoint: {sh.key!r} is a flattened shard; ovlt stores whole "
                            "local shards (DistributedOptimizer 'fully_reshardable' format)")
        shape = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
        offset = tuple(int(o) for o in sh.global_offset)
        name = f"{sh.key}@{'.'.join(map(str, offset))}"
        pieces.append((name, sh.key, offset, tuple(sh.global_shape),
                       sh.data.detach().reshape(shape)))
    return pieces, objects


def save(state: dict, out_dir, max_file_bytes: int = MAX_FILE_BYTES) -> None:
    """Collective: store an mcore sharded state dict in `out_dir` (which must exist)."""
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
    from ovlt.models.qwen2_5_vl.checkpoint_io import StreamingSafetensorsWriter

    out = Path(out_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    sharded, common = save_preprocess(state, validate_access_integrity=dist.is_initialized())
    pieces, objects = _pieces(sharded, rank)
    if rank == 0:
        tensors: dict = {}
        body = {"format": FORMAT, "world_size": world, "common": encode(common, tensors, "common")}
        if tensors:
            from safetensors.torch import save_file
            save_file(tensors, str(out / COMMON_TENSORS))
        (out / COMMON).write_text(json.dumps(body, indent=1) + "\n")
    files: list[list] = [[]]
    size = 0
    for p in pieces:
        n = p[4].numel() * p[4].element_size()
        if files[-1] and size + n > max_file_bytes:
            files.append([])
            size = 0
        files[-1].append(p)
        size += n
    for i, group in enumerate(files):
        meta = {"format": FORMAT,
                "pieces": json.dumps([[name, key, list(off), list(gs)]
                                      for name, key, off, gs, _ in group])}
        if i == 0:
            meta["objects"] = json.dumps(objects)
        specs = [(name, t.dtype, tuple(t.shape)) for name, _, _, _, t in group]
        w = StreamingSafetensorsWriter(out / _file_name(rank, i, len(files)), specs, meta)
        try:
            for name, _, _, _, t in group:
                w.write(name, t)
        except BaseException:
            w.abort()
            raise
        w.close()


# --------------------------------------------------------------------------- load
@dataclass
class _Piece:
    file: Path
    name: str
    offset: tuple
    shape: tuple
    global_shape: tuple


class StoreReader:
    """The index of a store directory: every piece of every tensor, from the file headers."""

    def __init__(self, path):
        self.path = Path(path)
        common_p = self.path / COMMON
        if not common_p.is_file():
            raise CheckpointError(f"{common_p}: missing (not an ovlt checkpoint, or an "
                                  "unfinished one)")
        try:
            body = json.loads(common_p.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{common_p}: not valid JSON ({e})") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            got = body.get("format") if isinstance(body, dict) else type(body).__name__
            raise CheckpointError(f"{common_p}: format {got!r}, expected {FORMAT!r}")
        world = body.get("world_size")
        if not isinstance(world, int) or world < 1:
            raise CheckpointError(f"{common_p}: bad world_size {world!r}")
        self._common_body = body.get("common", {})
        self.pieces: dict[str, list[_Piece]] = {}
        self.objects: dict[str, Any] = {}
        self._handles: dict[Path, Any] = {}
        counts: dict[int, set] = {}
        for f in sorted(self.path.iterdir()):
            m = _FILE_RE.match(f.name)
            if m is None:
                continue
            r, i, n = (int(x) for x in m.groups())
            counts.setdefault(r, set()).add((i, n))
            meta = self._open(f).metadata() or {}
            try:
                if meta.get("format") != FORMAT:
                    raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
                for name, key, off, gs in json.loads(meta["pieces"]):
                    shape = tuple(self._open(f).get_slice(name).get_shape())
                    off, gs = tuple(int(x) for x in off), tuple(int(x) for x in gs)
                    if len(off) != len(gs) or len(shape) != len(gs) or any(
                            o < 0 or o + s > g for o, s, g in zip(off, shape, gs)):
                        raise ValueError(f"piece {name!r} of shape {shape} at {off} does not "
                                         f"fit its tensor's shape {gs}")
                    self.pieces.setdefault(key, []).append(_Piece(f, name, off, shape, gs))
                if "objects" in meta:
                    self.objects.update(json.loads(meta["objects"]))
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - any malformed header is the file's fault
                raise CheckpointError(f"{f}: bad ovlt checkpoint header ({e})") from None
        for r in range(world):
            have = counts.get(r, set())
            ns = {n for _, n in have}
            n = next(iter(ns)) if len(ns) == 1 else None
            if n is None or {i for i, _ in have} != set(range(n)):
                raise CheckpointError(f"{self.path}: the files of rank {r} are incomplete "
                                      f"(expected {_file_name(r, 0, n or 1)} ... of the "
                                      f"{world} ranks that wrote it; found "
                                      f"{sorted(_file_name(r, i, k) for i, k in have) or 'none'})")

    def _open(self, f: Path):
        from safetensors import safe_open
        h = self._handles.get(f)
        if h is None:
            try:
                h = self._handles[f] = safe_open(str(f), framework="pt", device="cpu")
            except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: the file is bad
                raise CheckpointError(f"{f}: unreadable (truncated or not a safetensors file: "
                                      f"{e})") from None
        return h

    def common(self) -> dict:
        tensors = {}
        p = self.path / COMMON_TENSORS
        if p.exists():
            h = self._open(p)
            try:
                tensors = {k: h.get_tensor(k) for k in h.keys()}
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"{p}: unreadable ({e})") from None
        return decode(self._common_body, tensors, str(self.path / COMMON))

    def read_tensor(self, sh) -> torch.Tensor:
        """The local shard `sh` (a ShardedTensor) asks for, assembled from the stored pieces
        that overlap it; written into `sh.data` when that is a tensor of the right shape."""
        pieces = self.pieces.get(sh.key)
        if not pieces:
            raise CheckpointError(f"{self.path}: no tensor {sh.key!r} (a checkpoint of another "
                                  "model or configuration?)")
        gshape = pieces[0].global_shape
        if gshape != tuple(sh.global_shape) and not sh.allow_shape_mismatch:
            raise CheckpointError(f"{self.path}: tensor {sh.key!r} has shape {gshape}; the model "
                                  f"expects {tuple(sh.global_shape)}")
        lo = tuple(int(o) for o in sh.global_offset)
        full = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
        hi = tuple(o + s for o, s in zip(lo, full))
        data = sh.data
        if torch.is_tensor(data) and tuple(data.shape) == tuple(sh.local_shape) \
                and not data.is_meta:
            out = data
        else:
            out = torch.zeros(tuple(sh.local_shape), dtype=sh.dtype)
        view = out
        for _ in range(sh.prepend_axis_num):
            view = view.unsqueeze(0)
        want = math.prod(min(h, g) - o for o, h, g in zip(lo, hi, gshape)) \
            if all(o < g for o, g in zip(lo, gshape)) else 0
        got = 0
        for p in pieces:
            a = [max(x, y) for x, y in zip(lo, p.offset)]
            b = [min(x, y + s) for x, y, s in zip(hi, p.offset, p.shape)]
            if any(x >= y for x, y in zip(a, b)):
                continue
            src = tuple(slice(x - o, y - o) for x, y, o in zip(a, b, p.offset))
            dst = tuple(slice(x - o, y - o) for x, y, o in zip(a, b, lo))
            try:
                part = self._open(p.file).get_slice(p.name)[src]
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"{p.file}: cannot read {p.name!r} ({e})") from None
            view[dst].copy_(part)
            got += math.prod(y - x for x, y in zip(a, b))
        if got != want:
            raise CheckpointError(f"{self.path}: tensor {sh.key!r} is "
                                  f"{'incomplete' if got < want else 'stored twice'} for the "
                                  f"slice at {lo} ({got} of {want} elements)")
        return out

    def read_object(self, sh):
        if sh.key.endswith("._extra_state"):
            return None
        if sh.unique_key not in self.objects:
            raise CheckpointError(f"{self.path}: no object {sh.unique_key!r}")
        return decode(self.objects[sh.unique_key], {}, f"{self.path}: {sh.unique_key}")

    def close(self) -> None:
        self._handles.clear()


def load(state: dict, path) -> dict:
    """Load the mcore sharded state dict `state` (what to read, in this rank's layout) from the
    store `path`; returns the state dict with tensors, as `dist_checkpointing.load` does."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, merge
    from megatron.core.dist_checkpointing.mapping import ShardedObject, apply_factory_merges
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess
    from megatron.core.dist_checkpointing.utils import (extract_sharded_base,
                                                        force_all_tensors_to_non_fp8)
    reader = StoreReader(path)
    try:
        with torch.no_grad():
            force_all_tensors_to_non_fp8(state)
            common = reader.common()
            sharded, nonpersistent, factories = load_preprocess(state)
            merge(common, nonpersistent)
            sharded, _ = extract_sharded_base(sharded)
            dict_list_map_inplace(lambda sh: reader.read_object(sh)
                                  if isinstance(sh, ShardedObject) else reader.read_tensor(sh),
                                  sharded)
            merge(common, sharded)
            return apply_factory_merges(common, factories)
    finally:
        reader.close()
