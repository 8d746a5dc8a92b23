"""The OpenVLThinker self-improvement loop (`ovlt iterate`, `launchers/iterate.py`).

  stages.py    the plan: r0.prepare, r0.eval, then per round data -> sft -> grpo -> eval
  loop.py      runs the plan once per stage, resume / --force-from / config-change refusal
  manifest.py  the atomic JSON record of every stage (status, config, inputs, outputs, metrics)
  runner.py    how a stage starts: local torchrun or srun + torchrun rendezvous (SLURM)
  teacher.py   round-1 chain writers: OpenAI-compatible endpoint, in-process engine, synthetic
  filter.py    verify, keep the shortest chain, cut at the first "Wait," after a right answer
  stage_*.py   the loop's own stage programs (prepare, data, eval); SFT/GRPO are launchers/
  probe.py     a round's GRPO, before vs after, on a fixed probe set (same prompts and seeds)
  summary.py   runs/<name>/summary.json: the rounds' numbers, baselines, stage times
  report.py    runs/<name>/report.md + probe / accuracy plots, read from summary.json
"""
