"""GRPO launcher: `torchrun --nproc-per-node N launchers/grpo.py --config configs/grpo/X.yaml
[key=value ...]` (also `ovlt grpo ...`; without torchrun it runs as one process).

Typical overrides from the iterate loop: `model.hf_path=<SFT final_hf>`
`data.rl_files=[a.parquet]` `grpo.train.save_dir=<out>`. Writes under `grpo.train.save_dir`:
metrics.jsonl, rollouts.jsonl, logs/, checkpoints (resumed automatically), final_hf/.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by torchrun: make `ovlt` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ovlt grpo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML config (e.g. configs/grpo/tiny_cpu.yaml)")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = ap.parse_intermixed_args(sys.argv[1:] if argv is None else argv)  # overrides before or after the options

    from launchers._job import run_job
    from ovlt.config import require_unpadded_vocab

    def run(cfg):
        from ovlt.grpo.train import run_grpo
        return run_grpo(cfg)
    return run_job("grpo", args.config, args.overrides, run, check=require_unpadded_vocab)


if __name__ == "__main__":
    raise SystemExit(main())
