"""Safetensors directories, read lazily and written tensor by tensor (never pickle).

- `HFCheckpointReader(dir)`: an official Qwen2.5-VL HF directory (sharded + index json, or one
  `model.safetensors`) as a lazy read-only Mapping under the official names (`model.*`,
  `visual.*`, `lm_head.weight`); transformers-5 names (`model.language_model.*`,
  `model.visual.*`) are accepted and renamed.
- `HFCheckpointWriter(dir, max_shard_bytes)`: add tensors one by one; shards are flushed when
  full; `close()` writes `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`.
- `StreamingSafetensorsWriter(path, specs)`: a safetensors file whose header (names, dtypes,
  shapes) is known up front, so every tensor is written as soon as it exists: peak memory is one
  tensor, not the file.
- `copy_side_files(src, dst)`: tokenizer / processor / generation config files.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ovlt.errors import InputError
from ovlt.models.qwen2_5_vl.state_dict_adapter import MissingTensorError, canonical_hf_name
from ovlt.utils.io import atomic_write_json, read_json

INDEX_NAME = "model.safetensors.index.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")

_DTYPE_TO_ST = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
                torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
                torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_ST_TO_DTYPE = {v: k for k, v in _DTYPE_TO_ST.items()}


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def open_safetensors(f):
    """`safe_open` of `f`; a truncated or non-safetensors file is an InputError naming it."""
    try:
        return safe_open(str(f), framework="pt", device="cpu")
    except FileNotFoundError:
        raise FileNotFoundError(f"{f}: no such file") from None
    except Exception as e:  # noqa: BLE001 - SafetensorError / OSError: the file is unusable
        raise InputError(f"{f}: not a readable safetensors file (truncated or another format: "
                         f"{e})") from None


# --------------------------------------------------------------------------- reading
class SafetensorsDir(Mapping):
    """Lazy Mapping over every tensor of the `*.safetensors` files listed (name -> file)."""

    def __init__(self, where: dict[str, Path], rename=None):
        self._where = where          # key -> file
        self._orig = rename or {}    # key -> name inside the file when it differs
        self._handles: dict[Path, object] = {}

    def _handle(self, f: Path):
        h = self._handles.get(f)
        if h is None:
            h = self._handles[f] = open_safetensors(f)
        return h

    def __getitem__(self, key: str) -> torch.Tensor:
        f = self._where.get(key)
        if f is None:
            raise KeyError(key)
        h = self._handle(f)
        try:
            return h.get_tensor(self._orig.get(key, key))
        except Exception as e:  # noqa: BLE001 - data past the end of a truncated file
            raise InputError(f"{f}: cannot read tensor {key!r} ({e})") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(self._where[key]).get_slice(self._orig.get(key, key)).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        st = self._handle(self._where[key]).get_slice(self._orig.get(key, key)).get_dtype()
        if st not in _ST_TO_DTYPE:
            raise ValueError(f"{self._where[key]}: tensor {key!r} has unsupported dtype {st}")
        return _ST_TO_DTYPE[st]

    def meta(self, key: str) -> torch.Tensor:
        """A meta tensor with the stored shape and dtype (no data read)."""
        return torch.empty(self.shape(key), dtype=self.dtype(key), device="meta")

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)

    def __contains__(self, key) -> bool:
        return key in self._where

    def close(self) -> None:
        self._handles.clear()


class HFCheckpointReader(SafetensorsDir):
    """An HF model directory, lazily, under official Qwen2.5-VL names."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: not a directory (expected an HF model directory)")
        from ovlt.models.qwen2_5_vl.hf_config import read_hf_config
        read_hf_config(self.path)  # present, valid JSON, and a Qwen2.5-VL
        index = self.path / INDEX_NAME
        if index.is_file():
            files = {n: self.path / f for n, f in read_index(index).items()}
            for f in set(files.values()):
                if not f.is_file():
                    raise FileNotFoundError(f"{index} lists {f.name}, which does not exist")
        elif (self.path / "model.safetensors").is_file():
            f = self.path / "model.safetensors"
            files = {n: f for n in open_safetensors(f).keys()}
        else:
            if any(self.path.glob("*.bin")) or any(self.path.glob("*.pt*")):
                raise InputError(f"{self.path}: only pickle (*.bin / *.pt) weights found; convert "
                                 "them to safetensors first (ovlt never unpickles checkpoints), "
                                 "e.g. save_pretrained(..., safe_serialization=True)")
            raise FileNotFoundError(f"{self.path}: no {INDEX_NAME} and no model.safetensors")
        where, orig = {}, {}
        for n, f in files.items():
            c = canonical_hf_name(n)
            if c in where:
                raise ValueError(f"{self.path}: tensor {c!r} appears twice (as {orig.get(c, c)!r} "
                                 f"and {n!r})")
            where[c] = f
            if c != n:
                orig[c] = n
        super().__init__(where, orig)

    def __getitem__(self, key: str) -> torch.Tensor:
        try:
            return super().__getitem__(key)
        except KeyError:
            raise MissingTensorError(f"{self.path}: missing tensor {key!r}") from None


def read_index(index: Path) -> dict[str, str]:
    """The `weight_map` of a safetensors index file: tensor name -> file name in its folder."""
    body = read_json(index)
    wm = body.get("weight_map") if isinstance(body, dict) else None
    if not isinstance(wm, dict) or not wm or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise InputError(f"{index}: not a safetensors index (expected an object whose "
                         "'weight_map' maps tensor names to file names)")
    for v in set(wm.values()):
        if Path(v).name != v or v in (".", ".."):
            raise InputError(f"{index}: weight_map names {v!r}, not a file in the same folder")
    return wm


# --------------------------------------------------------------------------- writing
class StreamingSafetensorsWriter:
    """Write a safetensors file tensor by tensor, in the order of `specs` [(name, dtype, shape)].

    The header is written first (offsets follow from dtypes and shapes), then each `write`
    appends one tensor's bytes; `close()` checks every tensor came and renames into place."""

    def __init__(self, path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        off = 0
        self._order = []
        for name, dtype, shape in specs:
            if dtype not in _DTYPE_TO_ST:
                raise ValueError(f"{name}: dtype {dtype} cannot be stored in safetensors")
            n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _DTYPE_TO_ST[dtype], "shape": list(shape),
                            "data_offsets": [off, off + n]}
            self._order.append((name, dtype, tuple(shape)))
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, like safetensors does
        self._tmp = self.path.with_name(f".{self.path.name}.tmp")
        self._f = open(self._tmp, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, t: torch.Tensor) -> None:
        if self._next >= len(self._order):
            raise ValueError(f"{self.path}: unexpected extra tensor {name!r}")
        want = self._order[self._next]
        got = (name, t.dtype, tuple(t.shape))
        if got != want:
            raise ValueError(f"{self.path}: tensor #{self._next} is {got}, header says {want}")
        data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
        self._f.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            missing = [n for n, _, _ in self._order[self._next:]]
            self.abort()
            raise MissingTensorError(f"{self.path}: {len(missing)} tensors never written, "
                                     f"first {missing[0]!r}")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        if self._tmp.exists():
            self._tmp.unlink()


class HFCheckpointWriter:
    """Sharded HF safetensors writer: holds at most one shard (`max_shard_bytes`) in memory."""

    def __init__(self, out_dir, max_shard_bytes: int = 4 * 1024 ** 3):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_shard_bytes
        self._cur: dict[str, torch.Tensor] = {}
        self._cur_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        self._names.add(name)
        n = tensor_nbytes(t)
        if self._cur and self._cur_bytes + n > self.max_bytes:
            self._flush()
        self._cur[name] = t.detach().contiguous().cpu()
        self._cur_bytes += n
        self.total_bytes += n

    def _flush(self) -> None:
        tmp = self.out / f".shard-{len(self._shards):05d}.safetensors.tmp"
        save_file(self._cur, str(tmp), metadata={"format": "pt"})
        self._shards.append((tmp, list(self._cur)))
        self._cur, self._cur_bytes = {}, 0

    def close(self) -> dict:
        if self._cur or not self._shards:
            self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, (tmp, names) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, self.out / final)
            weight_map.update({k: final for k in names})
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_json(self.out / INDEX_NAME, index)
        return index


class StreamingHFWriter:
    """Sharded HF safetensors writer for a stream whose names, dtypes and shapes are known up
    front (`specs`, in stream order): shards are planned by size, every tensor goes straight to
    disk, so memory never holds more than the tensor being written."""

    def __init__(self, out_dir, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 max_shard_bytes: int = 4 * 1024 ** 3):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        shards: list[list] = [[]]
        size = 0
        for name, dtype, shape in specs:
            n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            if shards[-1] and size + n > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, dtype, tuple(shape)))
            size += n
        self._files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        self._shards = shards
        self.total_bytes = sum(int(torch.Size(s).numel()) * torch.empty((), dtype=d).element_size()
                               for _, d, s in specs)
        self._i, self._left, self._w = -1, 0, None

    def add(self, name: str, t: torch.Tensor) -> None:
        if self._left == 0:
            if self._w is not None:
                self._w.close()
            self._i += 1
            if self._i >= len(self._shards):
                raise ValueError(f"{self.out}: unexpected extra tensor {name!r}")
            self._w = StreamingSafetensorsWriter(self.out / self._files[self._i], self._shards[self._i])
            self._left = len(self._shards[self._i])
        self._w.write(name, t)
        self._left -= 1

    def close(self) -> dict:
        if self._w is not None:
            self._w.close()
        if self._i != len(self._shards) - 1 or self._left:
            raise MissingTensorError(f"{self.out}: the stream ended before all tensors were written")
        weight_map = {n: f for f, sh in zip(self._files, self._shards) for n, _, _ in sh}
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_json(self.out / INDEX_NAME, index)
        return index

    def abort(self) -> None:
        if self._w is not None:
            self._w.abort()


def copy_side_files(src, dst, skip=("config.json",)) -> list[str]:
    """Copy tokenizer/processor/generation-config files (everything but weights, the index, and
    `skip`), so the output directory is usable as is. Returns the copied names."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for f in sorted(src.iterdir()):
        if (not f.is_file() or f.name.startswith(".") or f.name in skip or f.name == INDEX_NAME
                or f.name.endswith(_WEIGHT_SUFFIXES) or f.name.endswith(".index.json")):
            continue
        shutil.copyfile(f, dst / f.name)
        copied.append(f.name)
    return copied


def looks_like_hf_export(d: Path) -> bool:
    """An HF model directory written by ovlt before its outputs were marked
    (`ovlt.utils.outdir`): config.json and safetensors, no sub-directories."""
    return ((d / "config.json").is_file() and any(d.glob("*.safetensors"))
            and not any(p.is_dir() for p in d.iterdir()))


def iter_safetensors(path) -> Iterator[tuple[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt", device="cpu") as h:
        for k in h.keys():
            yield k, h.get_tensor(k)
