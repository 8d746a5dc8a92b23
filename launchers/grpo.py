"""GRPO launcher: `torchrun --nproc-per-node N launchers/grpo.py --config configs/grpo/X.yaml
[key=value ...]` (also `ovlt grpo ...`; without torchrun it runs as one process).

Typical overrides from the iterate loop: `model.hf_path=<SFT final_hf>`
`data.rl_files=[a.parquet]` `grpo.train.save_dir=<out>`. Writes under `grpo.train.save_dir`:
metrics.jsonl, rollouts.jsonl, logs/, checkpoints (resumed automatically), final_hf/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by torchrun: make `ovlt` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ovlt grpo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML config (e.g. configs/grpo/tiny_cpu.yaml)")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)

    from ovlt.config import ConfigError, load_config, require_unpadded_vocab
    from ovlt.logging import setup_logging
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    try:
        cfg = load_config(args.config, args.overrides, world_size=world, trainers=("grpo",))
        require_unpadded_vocab(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    save_dir = Path(cfg.grpo.train.save_dir)
    setup_logging(str(save_dir / "logs"))

    from ovlt.config import save_config
    from ovlt.distributed import destroy_distributed, init_distributed
    from ovlt.training.grpo import run_grpo
    info = init_distributed(cfg.parallel, seed=cfg.grpo.train.seed)
    try:
        if info.rank == 0:
            save_config(cfg, save_dir / "config.yaml")
        summary = run_grpo(cfg)
    finally:
        destroy_distributed()
    if info.rank == 0:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
