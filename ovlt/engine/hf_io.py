"""Base weights in (HF directory -> this rank's shards) and the trained model out (all ranks'
shards -> one HF directory that `transformers` loads), both through the model's state-dict
adapter. Export streams one parameter at a time: the owning ranks (DP rank 0 of the right PP
stage, every TP rank) send their shard to global rank 0, which merges it and hands it to the
sharded HF writer, so rank 0 never holds more than one full tensor plus one output shard."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from ovlt.logging import get_logger
from ovlt.models.qwen2_5_vl.checkpoint_io import looks_like_hf_export
from ovlt.utils import outdir
from ovlt.utils.device import default_device

log = get_logger(__name__)


def load_hf_weights(model, model_cfg) -> None:
    from ovlt.models.qwen2_5_vl.provider import load_hf_weights as _load
    log.info("loading base weights from %s", model_cfg.hf_path)
    _load(model, model_cfg.hf_path)


EXPORT_KIND = "hf_model"


def export_dir_is_free(out_dir) -> bool:
    """`out_dir` is absent, empty or an earlier export (one `export_hf` may replace)."""
    d = Path(out_dir)
    return not d.exists() or (d.is_dir() and (not any(d.iterdir()) or outdir.is_own(
        d, EXPORT_KIND, looks_like_hf_export)))


def free_export_dir(out_dir: Path) -> Path:
    """`out_dir` when the export may write there (absent, or an earlier export of ours), else
    the first free `<out_dir>-N`: a folder ovlt did not write is never replaced."""
    if export_dir_is_free(out_dir) and not _foreign_partial(out_dir):
        return out_dir
    for i in range(1, 1000):
        alt = out_dir.with_name(f"{out_dir.name}-{i}")
        if export_dir_is_free(alt) and not _foreign_partial(alt):
            log.error("%s holds files ovlt did not write; the export goes to %s instead",
                      out_dir, alt)
            return alt
    raise outdir.OutputDirError(f"{out_dir}: no free export directory next to it")


def _foreign_partial(out_dir: Path) -> bool:
    p = outdir.partial_of(out_dir)
    return p.exists() and not (p.is_dir() and outdir.is_own(p, EXPORT_KIND))


def _rank_table() -> dict:
    """(tp_rank, pp_rank) -> global rank of the DP-rank-0, CP-rank-0 replica."""
    from megatron.core import parallel_state as ps
    me = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
          ps.get_data_parallel_rank(), ps.get_context_parallel_rank(), dist.get_rank())
    allr = [None] * dist.get_world_size()
    dist.all_gather_object(allr, me)
    return {(tp, pp): g for tp, pp, dp, cp, g in allr if dp == 0 and cp == 0}


def export_hf(model, model_cfg, out_dir, dtype: torch.dtype = torch.bfloat16,
              max_shard_bytes: int = 4 * 1024 ** 3) -> Path | None:
    """Collective. Writes `out_dir` (config.json, sharded safetensors + index, the tokenizer
    files of `model.hf_path`, else ovlt's own Qwen2.5 tokenizer) atomically via
    `<out_dir>.partial` (`ovlt.utils.outdir`: an earlier export there is replaced, a folder ovlt
    did not write is not: the export then goes to the first free `<out_dir>-N`, with an error
    logged). Returns the path on rank 0, None elsewhere."""
    from megatron.core import parallel_state as ps

    from ovlt.models.qwen2_5_vl import state_dict_adapter as sda
    from ovlt.models.qwen2_5_vl.checkpoint_io import HFCheckpointWriter, copy_side_files
    from ovlt.models.qwen2_5_vl.hf_config import to_hf_config

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    rank = dist.get_rank()
    table = _rank_table()
    local = sda.to_local_norm_names({k: v for k, v in model.state_dict().items()
                                     if not k.endswith("._extra_state")})
    shapes = {s: sda.mcore_shapes(model_cfg, tp, pp, s) for s in range(pp)} if rank == 0 else {}
    plan = [e for e in sda.build_plan(model_cfg, tp, pp, "local") if e.export]

    def get(name: str, pp_rank: int) -> list[torch.Tensor]:
        """Rank 0: receive the TP shards of `name`; owners (other ranks): send theirs."""
        out = []
        for r in range(tp):
            owner = table[(r, pp_rank)]
            if rank == 0:
                if owner == 0:
                    out.append(local[name].detach().to(dtype).cpu())
                else:
                    buf = torch.empty(shapes[pp_rank][name], dtype=dtype, device=comm_dev)
                    dist.recv(buf, src=owner)
                    out.append(buf.cpu())
            elif rank == owner:
                dist.send(local[name].detach().to(device=comm_dev, dtype=dtype).contiguous(),
                          dst=0)
        return out

    comm_dev = default_device() if dist.get_backend() == "nccl" else torch.device("cpu")
    out_dir = Path(out_dir)
    if rank == 0:
        out_dir = free_export_dir(out_dir)
        tmp = outdir.stage(out_dir, EXPORT_KIND, force=True, out_name="export",
                           looks_like_ours=looks_like_hf_export)
        writer = HFCheckpointWriter(tmp, max_shard_bytes=max_shard_bytes)
        # The adapter walks the export plan in order, asking `get` for each parameter.
        for name, full in sda.mcore_to_hf(get, model_cfg, tp, pp):
            writer.add(name, full)
    else:
        for e in plan:  # the same order, sending where this rank owns a shard
            get(e.mcore_name, e.pp_rank)
    if rank != 0:
        dist.barrier()
        return None
    writer.close()
    cfg = to_hf_config(model_cfg)
    cfg.dtype = str(dtype).replace("torch.", "")
    cfg.save_pretrained(tmp)
    copied = []
    if model_cfg.hf_path and Path(model_cfg.hf_path).is_dir():
        copied = copy_side_files(model_cfg.hf_path, tmp)  # tokenizer/processor of the base
    if "tokenizer.json" not in copied and "vocab.json" not in copied:
        from ovlt.data.tokenizer import save_hf_tokenizer
        save_hf_tokenizer(tmp)  # ovlt's offline Qwen2.5 tokenizer: the directory is complete
    outdir.commit(tmp, out_dir)
    log.info("exported HF model to %s", out_dir)
    dist.barrier()
    return out_dir
