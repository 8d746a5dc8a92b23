"""The OpenVLThinker self-improvement loop (`ovlt iterate`, `launchers/iterate.py`).

  stages.py    the plan: r0.prepare, r0.eval, then per round data -> sft -> grpo -> eval
  loop.py      runs the plan once per stage, resume / --force-from / config-change refusal
  manifest.py  the atomic JSON record of every stage (status, config, inputs, outputs, metrics)
  runner.py    how a stage starts: local torchrun or srun + torchrun rendezvous (SLURM)
  teacher.py   round-1 chain writers: OpenAI-compatible endpoint, in-process engine, synthetic
  filter.py    verify, keep the shortest chain, cut at the first "Wait," after a right answer
  stage_*.py   the loop's own stage programs (prepare, data, eval); SFT/GRPO are launchers/
  report.py    runs/<name>/report.md + reward / accuracy plots
"""
