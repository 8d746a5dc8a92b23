"""Shared pieces of the SFT / checkpoint tests: synthetic data, a tiny-config run of the real
launcher inside `run_distributed` workers, and reading back exported weights."""
from __future__ import annotations

from pathlib import Path

import torch

from ovlt.config import CONFIG_ROOT

TINY_SFT = str(CONFIG_ROOT / "sft" / "tiny_cpu.yaml")


def init_state(cfg, precision: str = "bf16") -> dict[str, torch.Tensor]:
    """One random init of the job's model, as its tensors (to build same-init copies from)."""
    from ovlt.engine.model_setup import build_vl_model
    return {k: v.clone() for k, v in build_vl_model(cfg, precision).state_dict().items()
            if torch.is_tensor(v)}


def model_from(cfg, state: dict, precision: str = "bf16"):
    """A fresh copy of the job's model holding `state`, wrapped for training: (model, bundle)."""
    from ovlt.engine.model_setup import build_vl_model, wrap_model
    model = build_vl_model(cfg, precision)
    model.load_state_dict(state, strict=False)
    return model, wrap_model(model, cfg.sft.train)


def make_synth(out: Path, n: int = 16, seed: int = 0) -> Path:
    from ovlt.data.synth import generate
    generate(out, n=n, seed=seed)
    return out / "sft.jsonl"


def base_overrides(sft_file, save_dir, **extra) -> list[str]:
    ov = {"data.sft_files": f"[{sft_file}]", "sft.train.save_dir": str(save_dir),
          "sft.train.global_batch_size": 4, "data.max_pixels": 12544, "data.max_length": 512,
          "data.pack_tokens": 512, "data.num_workers": 0, "sft.optimizer.warmup_ratio": 0.0,
          "sft.optimizer.warmup_steps": 1}
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


def launcher_worker(rank, world, overrides):
    """Body of a `run_distributed` worker: the real `launchers/sft.py` main."""
    from launchers.sft import main
    rc = main(["--config", TINY_SFT] + list(overrides))
    assert rc == 0, rc
    return rank


def run_sft(world: int, overrides: list[str]):
    from tests.dist_utils import run_distributed
    return run_distributed(launcher_worker, world, overrides, timeout=900)


def losses(save_dir) -> list[float]:
    return metric(save_dir, "loss")


def metric(save_dir, key: str) -> list:
    """`key` of every record in the run's metrics.jsonl, in order."""
    from ovlt.utils.io import read_jsonl
    return [r[key] for r in read_jsonl(Path(save_dir) / "metrics.jsonl")]


def hf_tensors(hf_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    out = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
