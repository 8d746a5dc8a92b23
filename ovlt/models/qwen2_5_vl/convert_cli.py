"""`ovlt convert hf2mcore|mcore2hf`: checkpoint conversion between HF and ovlt mcore directories.

    ovlt convert hf2mcore --hf DIR --out DIR --tp N --pp N [--norm-names local|te]
    ovlt convert mcore2hf --mcore DIR --out DIR [--max-shard-size 4GB]

The output is built in `<out>.partial` and renamed into place when complete, so an interrupted
run never leaves a directory that looks finished. An existing non-empty `--out` needs --force.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

from ovlt.logging import get_logger

log = get_logger(__name__)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (examples: 4GB, 500MB, 1048576)")
    unit = (m.group(2) or "").upper().rstrip("B").rstrip("I")
    return int(float(m.group(1)) * {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}[unit])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ovlt convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf2mcore", help="HF safetensors directory -> mcore TP/PP checkpoint")
    a.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    a.add_argument("--out", required=True)
    a.add_argument("--tp", type=int, default=1)
    a.add_argument("--pp", type=int, default=1)
    a.add_argument("--norm-names", choices=("local", "te"), default="local",
                   help="spelling of the pre-attention/pre-MLP norms (local spec or TE fused)")
    a.add_argument("--vocab-divisible-by", type=int, default=None,
                   help="vocab rows are padded to a multiple of this times --tp")
    a.add_argument("--force", action="store_true", help="replace a non-empty --out")
    b = sub.add_parser("mcore2hf", help="mcore TP/PP checkpoint -> HF safetensors directory")
    b.add_argument("--mcore", required=True, help="directory written by hf2mcore or the trainer")
    b.add_argument("--out", required=True)
    b.add_argument("--max-shard-size", type=parse_size, default=parse_size("4GB"))
    b.add_argument("--force", action="store_true", help="replace a non-empty --out")
    return p


def _staging(out: Path, force: bool) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"{out} exists and is not empty (pass --force to replace it)")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def _commit(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    tmp.rename(out)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from ovlt.models.qwen2_5_vl import mcore_dir

    out = Path(args.out)
    try:
        tmp = _staging(out, args.force)
        if args.cmd == "hf2mcore":
            meta = mcore_dir.hf_to_mcore_dir(args.hf, tmp, args.tp, args.pp,
                                             norm_names=args.norm_names,
                                             vocab_divisible_by=args.vocab_divisible_by)
            _commit(tmp, out)
            print(f"wrote {out}: tp={meta['tp']} pp={meta['pp']} "
                  f"padded_vocab_size={meta['padded_vocab_size']}")
        else:
            index = mcore_dir.mcore_dir_to_hf(args.mcore, tmp, max_shard_bytes=args.max_shard_size)
            _commit(tmp, out)
            print(f"wrote {out}: {len(index['weight_map'])} tensors, "
                  f"{index['metadata']['total_size']} bytes, "
                  f"{len(set(index['weight_map'].values()))} shards")
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        print(f"ovlt convert {args.cmd}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
