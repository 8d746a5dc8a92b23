"""What the trainer launchers share: load + validate the config for one trainer, check the
inputs it names, set up rank-tagged logging, the CUDA allocator's settings and the process
groups, save the resolved config, run, tear down.

Errors end the job as `ovlt.distributed.report_error` says: bad input (a config key, a missing
or wrong file, a bad record or checkpoint) is one line from rank 0 naming what and where, exit
code 2 for the config, 1 otherwise; an unexpected exception (a bug) prints its traceback. The
other ranks stay quiet, and every rank's log file holds the full traceback.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional


def check_inputs(cfg, trainer: str) -> None:
    """The files and folders the job reads exist and are of the right kind, and its output
    cannot land on them; ConfigError naming the key otherwise (before any process group)."""
    from ovlt.config import ConfigError
    from ovlt.engine.hf_io import export_dir_is_free
    from ovlt.models.qwen2_5_vl.hf_config import read_hf_config
    from ovlt.utils.inputs import MODEL_HINT, data_hint, require_path
    from ovlt.utils.outdir import overlaps

    m, d = cfg.model, cfg.data
    train = getattr(cfg, trainer).train
    if m.hf_path:
        require_path("model.hf_path", m.hf_path, "dir", MODEL_HINT)
        try:
            read_hf_config(m.hf_path)  # present, valid JSON, a Qwen2.5-VL
        except (ValueError, OSError) as e:
            raise ConfigError(f"model.hf_path: {e}") from None
    files = [("data.sft_files", d.sft_files)] if trainer == "sft" else (
        [("data.rl_files", d.rl_files)]
        + [(f"grpo.curriculum[{i}].rl_files", st.rl_files)
           for i, st in enumerate(cfg.grpo.curriculum)])
    if not d.registry and not any(paths for _, paths in files):
        need = "data.sft_files" if trainer == "sft" else "data.rl_files"
        kind = "SFT .json/.jsonl" if trainer == "sft" else "RL .parquet"
        example = "runs/synth/" + ("sft.jsonl" if trainer == "sft" else "rl.parquet")
        raise ConfigError(f"{need} is empty: this job needs {kind} files ({need}=[{example}] "
                          f"or data.registry=REGISTRY.yaml; {data_hint(example)})")
    for key, paths in files:
        for i, f in enumerate(paths):
            require_path(f"{key}[{i}]", f, "file", data_hint(f))
            if os.path.getsize(f) == 0:
                raise ConfigError(f"{key}[{i}]: {f} is empty")
            if trainer == "grpo" and not str(f).endswith(".parquet"):
                raise ConfigError(f"{key}[{i}]: {f} is not a .parquet file; GRPO reads RL "
                                  "prompts from parquet (problem, answer, images); an SFT "
                                  ".json/.jsonl goes to data.sft_files")
    if d.registry:
        from ovlt.data.formats import DataError, load_registry
        require_path("data.registry", d.registry, "file")
        try:
            sources = load_registry(d.registry)
        except DataError as e:
            raise ConfigError(f"data.registry: {e}") from None
        kind = "sft" if trainer == "sft" else "rl"
        for src in (s for s in sources if s.kind == kind):
            for f in map(os.path.normpath, src.files):  # relative to the registry: "../"
                require_path(f"data.registry {d.registry}: source {src.name!r}", f, "file",
                             data_hint(f))
    if d.image_root:
        require_path("data.image_root", d.image_root, "dir")
    save_dir = Path(train.save_dir)
    if save_dir.exists() and not save_dir.is_dir():
        raise ConfigError(f"{trainer}.train.save_dir: {save_dir} is a file")
    final = save_dir / "final_hf"
    if m.hf_path and train.export_hf and overlaps(m.hf_path, final):
        raise ConfigError(f"model.hf_path {m.hf_path} overlaps {final}, where this run exports "
                          f"its model: it would replace its own input; use another "
                          f"{trainer}.train.save_dir")
    if train.export_hf and not export_dir_is_free(final):
        raise ConfigError(f"{trainer}.train.save_dir: {final} holds files ovlt did not write; "
                          "the export would not replace them: move them or use another save_dir")


def run_job(trainer: str, config: str, overrides: list[str], run: Callable,
            check: Optional[Callable] = None) -> int:
    """`trainer` names the config section ("sft" or "grpo"); `run(cfg)` returns a summary dict
    that rank 0 prints as JSON. Returns the exit code (see the module docstring)."""
    from ovlt.config import ConfigError, load_config, save_config
    from ovlt.distributed import report_error
    from ovlt.logging import setup_logging
    prog = f"ovlt {trainer}"
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    try:
        cfg = load_config(config, overrides, world_size=world, trainers=(trainer,))
        if check is not None:
            check(cfg)
    except Exception as e:  # noqa: BLE001 - the same on every rank: rank 0 says it
        return report_error(e, prog, same_on_all_ranks=True)
    try:
        check_inputs(cfg, trainer)
        train = getattr(cfg, trainer).train
        save_dir = Path(train.save_dir)
        setup_logging(str(save_dir / "logs"))

        from ovlt.utils.cuda_alloc import apply_alloc_conf, may_host_vllm
        try:  # before the first CUDA allocation, so it governs all of the process's memory
            apply_alloc_conf(train.cuda_alloc_conf, trainer,
                             may_host_vllm(trainer, cfg.rollout.engine))
        except ValueError as e:  # expandable segments asked for where vLLM may run
            raise ConfigError(f"{trainer}.train.cuda_alloc_conf: {e}") from None

        from ovlt.distributed import destroy_distributed, init_distributed
        info = init_distributed(cfg.parallel, seed=train.seed)
    except Exception as e:  # noqa: BLE001
        return report_error(e, prog)
    try:
        if info.rank == 0:
            save_config(cfg, save_dir / "config.yaml")
        summary = run(cfg)
    except Exception as e:  # noqa: BLE001
        code = report_error(e, prog)
        if info.world_size == 1:
            destroy_distributed()
        # else: no teardown, other ranks may still sit in a collective; the process exits
        return code
    destroy_distributed()
    if info.rank == 0:
        print(json.dumps(summary))
    return 0
