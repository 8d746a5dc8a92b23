"""Inputs a job names (files, folders) checked before any work, with what makes a missing one:
a fresh checkout has no data and no model, and the error says which command writes them."""
from __future__ import annotations

from pathlib import Path

# what model.hf_path must be, said beside "does not exist"
MODEL_HINT = ("a Hugging Face Qwen2.5-VL folder: a downloaded one, or the one an SFT run exports "
              "to <sft.train.save_dir>/final_hf")
SYNTH_FILES = ("sft.jsonl", "rl.parquet")  # what `ovlt data synth --out DIR` writes in DIR


def data_hint(path) -> str:
    """The command that writes a missing data file, for the error that names it."""
    p = Path(path)
    out = p.parent if p.name in SYNTH_FILES else Path("DIR")
    return (f"`ovlt data synth --out {out} --n 64` writes synthetic {out / 'sft.jsonl'} and "
            f"{out / 'rl.parquet'}; `ovlt data check FILE` validates your own")


def require_path(key: str, path, kind: str = "file", hint: str = "") -> None:
    """ConfigError naming `key` unless `path` exists and is a `kind` ("file" | "dir" | "any")."""
    from ovlt.config import ConfigError
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{key}: {p} does not exist" + (f" ({hint})" if hint else ""))
    if kind == "file" and not p.is_file():
        raise ConfigError(f"{key}: {p} is not a file")
    if kind == "dir" and not p.is_dir():
        raise ConfigError(f"{key}: {p} is not a directory")
