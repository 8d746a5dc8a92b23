"""`ovlt convert hf2mcore|mcore2hf`: checkpoint conversion between HF and ovlt mcore directories.

    ovlt convert hf2mcore --hf DIR --out DIR --tp N --pp N [--norm-names local|te]
    ovlt convert mcore2hf --mcore DIR --out DIR [--max-shard-size 4GB]

The output is built in `<out>.partial` and renamed into place when complete, so an interrupted
run never leaves a directory that looks finished. Nothing the command did not write is deleted:
an existing non-empty `--out` is replaced only with --force and only when it is an earlier
output of the same conversion; a `<out>.partial` that is not an interrupted run's is left alone
(an error); an `--out` that is, holds or lies inside the input is refused.
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
    a.add_argument("--force", action="store_true",
                   help="replace an earlier hf2mcore output at --out")
    b = sub.add_parser("mcore2hf", help="mcore TP/PP checkpoint -> HF safetensors directory")
    b.add_argument("--mcore", required=True, help="directory written by hf2mcore or the trainer")
    b.add_argument("--out", required=True)
    b.add_argument("--max-shard-size", type=parse_size, default=parse_size("4GB"))
    b.add_argument("--force", action="store_true",
                   help="replace an earlier mcore2hf output at --out")
    return p


def _looks_like_mcore_dir(d: Path) -> bool:
    """An hf2mcore output written before outputs were marked: meta.json of our format and
    nothing but what hf2mcore writes."""
    from ovlt.models.qwen2_5_vl.mcore_dir import FORMAT
    import json
    try:
        if json.loads((d / "meta.json").read_text(encoding="utf-8")).get("format") != FORMAT:
            return False
    except (OSError, ValueError, AttributeError):
        return False
    return all(p.name in ("meta.json", "config.yaml", "hf") or p.name.startswith("mp_rank_")
               for p in d.iterdir())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from ovlt.errors import error_line
    from ovlt.models.qwen2_5_vl import mcore_dir
    from ovlt.models.qwen2_5_vl.checkpoint_io import looks_like_hf_export
    from ovlt.utils import outdir

    out = Path(args.out)
    tmp = None
    try:
        if args.cmd == "hf2mcore":
            src = Path(args.hf)
            if not src.is_dir():
                raise FileNotFoundError(f"--hf {src}: not a directory (expected an HF model "
                                        "directory)")
            outdir.check_separate(out, "--out", {"--hf": src})
            tmp = outdir.stage(out, "mcore_dir", args.force, looks_like_ours=_looks_like_mcore_dir)
            meta = mcore_dir.hf_to_mcore_dir(src, tmp, args.tp, args.pp,
                                             norm_names=args.norm_names,
                                             vocab_divisible_by=args.vocab_divisible_by)
            outdir.commit(tmp, out)
            print(f"wrote {out}: tp={meta['tp']} pp={meta['pp']} "
                  f"padded_vocab_size={meta['padded_vocab_size']}")
        else:
            src = Path(args.mcore)
            if not src.is_dir():
                raise FileNotFoundError(f"--mcore {src}: not a directory (expected an mcore "
                                        "checkpoint directory)")
            outdir.check_separate(out, "--out", {"--mcore": src})
            tmp = outdir.stage(out, "hf_model", args.force, looks_like_ours=looks_like_hf_export)
            index = mcore_dir.mcore_dir_to_hf(src, tmp, max_shard_bytes=args.max_shard_size)
            outdir.commit(tmp, out)
            print(f"wrote {out}: {len(index['weight_map'])} tensors, "
                  f"{index['metadata']['total_size']} bytes, "
                  f"{len(set(index['weight_map'].values()))} shards")
    except Exception as e:  # noqa: BLE001
        if tmp is not None and tmp.is_dir():  # this run's unfinished output
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, ValueError, KeyError)):  # bad input: the message names it
            print(f"ovlt convert {args.cmd}: error: {error_line(e)}", file=sys.stderr)
            return 1
        from ovlt.distributed import report_error  # a bug: its traceback
        return report_error(e, f"ovlt convert {args.cmd}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
