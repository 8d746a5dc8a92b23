"""What the trainer launchers share: load + validate the config for one trainer, set up
rank-tagged logging, the CUDA allocator's settings and the process groups, save the resolved
config, run, tear down."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional


def run_job(trainer: str, config: str, overrides: list[str], run: Callable,
            check: Optional[Callable] = None) -> int:
    """`trainer` names the config section ("sft" or "grpo"); `run(cfg)` returns a summary dict
    that rank 0 prints as JSON. Exit code 2 on a config error (message names the key)."""
    from ovlt.config import ConfigError, load_config, save_config
    from ovlt.logging import setup_logging
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    try:
        cfg = load_config(config, overrides, world_size=world, trainers=(trainer,))
        if check is not None:
            check(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    train = getattr(cfg, trainer).train
    save_dir = Path(train.save_dir)
    setup_logging(str(save_dir / "logs"))

    from ovlt.utils.cuda_alloc import apply_alloc_conf, may_host_vllm
    try:  # before the first CUDA allocation, so it governs all of the process's memory
        apply_alloc_conf(train.cuda_alloc_conf, trainer,
                         may_host_vllm(trainer, cfg.rollout.engine))
    except ValueError as e:  # expandable segments asked for where vLLM may run
        print(f"config error: {trainer}.train.cuda_alloc_conf: {e}", file=sys.stderr)
        return 2

    from ovlt.distributed import destroy_distributed, init_distributed
    info = init_distributed(cfg.parallel, seed=train.seed)
    try:
        if info.rank == 0:
            save_config(cfg, save_dir / "config.yaml")
        summary = run(cfg)
    finally:
        destroy_distributed()
    if info.rank == 0:
        print(json.dumps(summary))
    return 0
