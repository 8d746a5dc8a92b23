"""The ovlt mcore checkpoint directory (docs/CONTRACTS.md), written from / read back to HF.

    config.yaml                      {"model": ModelConfig}
    meta.json                        {"tp", "pp", "format": "ovlt-mcore-v1", "padded_vocab_size",
                                      "layer_offsets", "vocab_divisible_by", "norm_names"}
    mp_rank_{tp:02d}_{pp:03d}/model.safetensors   rank-local mcore names
    hf/                              config.json + tokenizer/processor files of the source HF dir

Memory bound of both conversions: one plan entry at a time — its input tensors (at most 3 HF
tensors, or TP shards of one parameter; the largest is the embedding) plus that entry's output.
Output files are written tensor by tensor (`StreamingSafetensorsWriter`, `StreamingHFWriter`
plan the file layout from names/dtypes/shapes first), so no output file is ever held in memory.
Inputs are mmapped by safetensors: their pages count in VmRSS but are clean, reclaimable file
cache, not heap (benchmarks/convert_memory.py measures both).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import yaml

from ovlt.logging import get_logger
from ovlt.models.qwen2_5_vl import state_dict_adapter as sda
from ovlt.models.qwen2_5_vl.checkpoint_io import (HFCheckpointReader, SafetensorsDir,
                                                  StreamingHFWriter, StreamingSafetensorsWriter,
                                                  copy_side_files)
from ovlt.utils.io import atomic_write_json, atomic_write_text

log = get_logger(__name__)

FORMAT = "ovlt-mcore-v1"
_DTYPE_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def rank_dir(tp_rank: int, pp_rank: int) -> str:
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def unused_hf_tensors(reader, cfg) -> list[str]:
    """HF tensors the conversion would silently drop (a tied checkpoint's lm_head is tolerated)."""
    expected = set(sda.hf_shapes(cfg))
    extra = [n for n in reader if n not in expected]
    if cfg.tie_word_embeddings and "lm_head.weight" in extra:
        log.info("tied embeddings: ignoring lm_head.weight present in the HF checkpoint")
        extra.remove("lm_head.weight")
    return extra


def hf_to_mcore_dir(hf_dir, out_dir, tp: int, pp: int, *, norm_names: str = "local",
                    vocab_divisible_by: int | None = None) -> dict:
    """Convert an HF directory into an mcore checkpoint directory; returns meta."""
    from ovlt.models.qwen2_5_vl.hf_config import from_hf_config

    reader = HFCheckpointReader(hf_dir)
    cfg = from_hf_config(hf_dir)
    sda.check_parallel(cfg, tp, pp)
    extra = unused_hf_tensors(reader, cfg)
    if extra:
        raise ValueError(f"{hf_dir}: {len(extra)} tensors do not belong to the model described by "
                         f"its config.json, e.g. {extra[:3]}")
    missing = [n for n in sda.hf_shapes(cfg) if n not in reader]
    if missing:
        raise sda.MissingTensorError(f"{hf_dir}: missing tensor {missing[0]!r}"
                                     + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    cfg.params_dtype = _DTYPE_NAME.get(reader.dtype("model.embed_tokens.weight"), cfg.params_dtype)
    if norm_names == "te":
        cfg.transformer_impl = "te"
    if vocab_divisible_by is None:
        vocab_divisible_by = cfg.make_vocab_size_divisible_by
    cfg.make_vocab_size_divisible_by = vocab_divisible_by
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metas = {n: reader.meta(n) for n in reader}
    kw = dict(norm_names=norm_names, vocab_divisible_by=vocab_divisible_by)
    for p in range(pp):
        for t in range(tp):
            specs = [(n, m.dtype, tuple(m.shape))
                     for n, m in sda.iter_hf_to_mcore(metas, cfg, t, tp, p, pp, **kw)]
            w = StreamingSafetensorsWriter(out / rank_dir(t, p) / "model.safetensors", specs)
            try:
                for name, tensor in sda.iter_hf_to_mcore(reader, cfg, t, tp, p, pp, **kw):
                    w.write(name, tensor)
                    del tensor  # don't keep it alive while the next entry is read
            except BaseException:
                w.abort()
                raise
            w.close()
            reader.close()  # unmap the inputs read so far (reopened lazily by the next rank)
            log.info("wrote %s (%d tensors)", rank_dir(t, p), len(specs))
    meta = {"tp": tp, "pp": pp, "format": FORMAT,
            "padded_vocab_size": sda.padded_vocab_size(cfg.vocab_size, tp, vocab_divisible_by),
            "layer_offsets": sda.layer_offsets(cfg.num_layers, pp)[:-1],
            "vocab_divisible_by": vocab_divisible_by, "norm_names": norm_names}
    atomic_write_text(out / "config.yaml",
                      yaml.safe_dump({"model": dataclasses.asdict(cfg)}, sort_keys=False))
    copy_side_files(hf_dir, out / "hf", skip=())
    atomic_write_json(out / "meta.json", meta)  # last: its presence marks a complete directory
    return meta


class McoreCheckpoint:
    """A read-only view of an mcore checkpoint directory; tensors are read lazily."""

    def __init__(self, path):
        from ovlt.config import ConfigError, load_config

        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: not a directory (expected an mcore checkpoint)")
        meta_p, cfg_p = self.path / "meta.json", self.path / "config.yaml"
        for p in (meta_p, cfg_p):
            if not p.is_file():
                raise FileNotFoundError(f"{self.path}: no {p.name} (not an ovlt mcore checkpoint "
                                        "directory, or an unfinished one)")
        try:
            self.meta = json.loads(meta_p.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:  # JSON or UTF-8 decoding
            raise ValueError(f"{meta_p}: not valid JSON ({e})") from None
        if not isinstance(self.meta, dict):
            raise ValueError(f"{meta_p}: expected a JSON object, got {type(self.meta).__name__}")
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_p}: format {self.meta.get('format')!r}, expected {FORMAT!r}")
        try:
            self.cfg = load_config(cfg_p).model
        except ConfigError as e:
            raise ValueError(f"{cfg_p}: {e}") from None
        try:
            self.tp, self.pp = int(self.meta["tp"]), int(self.meta["pp"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{meta_p}: 'tp' and 'pp' must be whole numbers, got "
                             f"{self.meta.get('tp')!r} and {self.meta.get('pp')!r}") from None
        self.vocab_divisible_by = int(self.meta.get("vocab_divisible_by") or 1)
        want = sda.padded_vocab_size(self.cfg.vocab_size, self.tp, self.vocab_divisible_by)
        if self.meta.get("padded_vocab_size", want) != want:
            raise ValueError(f"{meta_p}: padded_vocab_size={self.meta['padded_vocab_size']} but "
                             f"vocab {self.cfg.vocab_size} at tp={self.tp} pads to {want}")
        self._ranks: dict[tuple[int, int], SafetensorsDir] = {}

    def rank(self, tp_rank: int, pp_rank: int) -> SafetensorsDir:
        """Lazy mapping of one rank's tensors; TE norm spellings are readable as local ones."""
        key = (tp_rank, pp_rank)
        if key not in self._ranks:
            f = self.path / rank_dir(tp_rank, pp_rank) / "model.safetensors"
            if not f.is_file():
                raise FileNotFoundError(f"{self.path}: missing rank file {f.relative_to(self.path)}")
            from safetensors import safe_open
            with safe_open(str(f), framework="pt") as h:
                names = list(h.keys())
            local = sda.to_local_norm_names({n: n for n in names})
            self._ranks[key] = SafetensorsDir({k: f for k in local},
                                              {k: v for k, v in local.items() if k != v})
        return self._ranks[key]

    def rank_state_dict(self, tp_rank: int, pp_rank: int) -> dict[str, torch.Tensor]:
        r = self.rank(tp_rank, pp_rank)
        return {k: r[k] for k in r}

    def release(self, pp_rank: int | None = None) -> None:
        """Unmap the rank files (of one stage, or all): their pages leave this process' RSS."""
        for key in [k for k in self._ranks if pp_rank is None or k[1] == pp_rank]:
            self._ranks.pop(key).close()

    def gather(self, name: str, pp_rank: int) -> list[torch.Tensor]:
        # The plan walks stages in order: a new stage means the previous one is done.
        for done in {p for _, p in self._ranks if p != pp_rank}:
            self.release(done)
        out = []
        for t in range(self.tp):
            r = self.rank(t, pp_rank)
            if name not in r:
                raise sda.MissingTensorError(f"{self.path / rank_dir(t, pp_rank)}: missing tensor "
                                             f"{name!r}")
            out.append(r[name])
        return out

    def iter_hf(self):
        return sda.mcore_to_hf(self.gather, self.cfg, self.tp, self.pp,
                               vocab_divisible_by=self.vocab_divisible_by)

    def hf_specs(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(name, dtype, shape) of every tensor `iter_hf` yields, in order, without reading data."""
        shapes = sda.hf_shapes(self.cfg)
        out = []
        for e in sda.build_plan(self.cfg, self.tp, self.pp):
            if e.export:
                r = self.rank(0, e.pp_rank)
                if e.mcore_name not in r:
                    raise sda.MissingTensorError(f"{self.path / rank_dir(0, e.pp_rank)}: missing "
                                                 f"tensor {e.mcore_name!r}")
                out += [(n, r.dtype(e.mcore_name), shapes[n]) for n in e.hf_names]
        return out


def mcore_dir_to_hf(mcore_dir, out_dir, *, max_shard_bytes: int = 4 * 1024 ** 3) -> dict:
    """Write an HF directory (sharded safetensors + index + config.json + side files)."""
    ck = McoreCheckpoint(mcore_dir)
    out = Path(out_dir)
    w = StreamingHFWriter(out, ck.hf_specs(), max_shard_bytes)
    n = 0
    try:
        for name, t in ck.iter_hf():
            w.add(name, t)
            del t  # don't keep it alive while the next one is gathered
            n += 1
        index = w.close()
    except BaseException:
        w.abort()
        raise
    side = ck.path / "hf"
    if (side / "config.json").is_file():
        copy_side_files(side, out, skip=())
    else:
        from ovlt.models.qwen2_5_vl.hf_config import to_hf_config
        if side.is_dir():
            copy_side_files(side, out)
        hf_cfg = to_hf_config(ck.cfg)
        hf_cfg.dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[ck.cfg.params_dtype]
        atomic_write_text(out / "config.json", hf_cfg.to_json_string())
    log.info("wrote %d HF tensors in %d shards to %s", n, len(set(index["weight_map"].values())), out)
    return index
