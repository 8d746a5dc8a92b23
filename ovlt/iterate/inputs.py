"""What the loop reads from the user, checked before its first stage starts: a run that would
fail at round 2's eval on a missing benchmark file fails now, in one line naming the key."""
from __future__ import annotations

from ovlt.utils.inputs import MODEL_HINT, data_hint, require_path


def check_inputs(cfg) -> None:
    """ConfigError naming the key of the first missing model / pool / held-out / benchmark path."""
    it = cfg.iterate
    if cfg.model.hf_path:
        require_path("model.hf_path", cfg.model.hf_path, "dir",
                     MODEL_HINT + "; unset, r0.prepare writes a random-init one of the model's shape")
    for key, paths in (("iterate.prepare.pool_files", it.prepare.pool_files),
                       ("iterate.prepare.solution_files", it.prepare.solution_files),
                       ("iterate.heldout_files", it.heldout_files)):
        for i, f in enumerate(paths):
            require_path(f"{key}[{i}]", f, "file", data_hint(f))
    for i, b in enumerate(cfg.eval.benchmarks):
        if b.data:
            require_path(f"eval.benchmarks[{i}].data", b.data, "any",
                         f"the {b.name} test split as a parquet / JSON file or folder")
