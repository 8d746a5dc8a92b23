"""The whole OpenVLThinker loop, round after round: data -> SFT -> GRPO -> eval.

    python launchers/iterate.py --config configs/iterate/tiny_cpu.yaml [key=value ...]
    python launchers/iterate.py --config ... --resume            # after a kill / crash
    python launchers/iterate.py --config ... --force-from r2.sft # redo from a stage on
    sbatch launchers/iterate.sh configs/iterate/openvlthinker_7b.yaml   # SLURM, multi-node

Each stage runs as its own torchrun (per-stage world size from `iterate.nproc_*`/`nnodes_*`),
its log in `runs/<name>/<stage>/stage.log`; `runs/<name>/manifest.json` records every stage and
`runs/<name>/summary.json` + `report.md` sum the rounds up.

Errors: bad input (config, files) and a failed stage are one line (`ovlt iterate: error: ...`,
exit code 2 for the config, 1 otherwise); an unexpected exception prints its traceback.
"""
from __future__ import annotations

import argparse
import signal
import sys
import traceback
from pathlib import Path

if __package__ in (None, ""):  # `python launchers/iterate.py` from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ovlt.config import ConfigError, load_config  # noqa: E402
from ovlt.logging import get_logger, setup_logging  # noqa: E402

log = get_logger("ovlt.iterate")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ovlt iterate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="iterate YAML (configs/iterate/...)")
    ap.add_argument("--resume", action="store_true",
                    help="continue an existing run at its first unfinished stage")
    ap.add_argument("--force-from", default=None, metavar="STAGE",
                    help="rerun STAGE (e.g. r2.sft, r1.data, prepare) and every later stage")
    ap.add_argument("--launcher", choices=["local", "slurm"], default=None,
                    help="override iterate.launcher")
    ap.add_argument("--stop-after", default=None, metavar="STAGE",
                    help="stop after this stage (e.g. r1.grpo)")
    ap.add_argument("--plan", action="store_true", help="print the stages and exit")
    ap.add_argument("overrides", nargs="*", help="key.sub=value")
    args = ap.parse_intermixed_args(argv)  # overrides before or after the options

    overrides = list(args.overrides)
    if args.launcher:
        overrides.append(f"iterate.launcher={args.launcher}")
    from ovlt.distributed import log_to_files, report_error
    from ovlt.errors import error_line
    prog = "ovlt iterate"

    def one_line(e: BaseException) -> int:
        line = f"{prog}: error: {error_line(e)}"
        log_to_files(line + "\n" + "".join(traceback.format_exception(e)))
        print(line, file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1

    try:
        cfg = load_config(args.config, overrides)
    except Exception as e:  # noqa: BLE001
        return report_error(e, prog, same_on_all_ranks=True)

    from ovlt.iterate.loop import IterateError, run_dir_of, run_loop
    from ovlt.iterate.report import write_report
    from ovlt.iterate.runner import make_runner
    from ovlt.iterate.stages import build_plan, parse_stage_id, stage_config

    run_dir = run_dir_of(cfg)
    if args.plan:
        try:
            for p in build_plan(cfg, run_dir):
                stage_config(cfg, p)  # validates the stage's config for its world size
                print(f"{p.sid:<12} {p.nnodes}x{p.nproc}  {p.program}")
        except ValueError as e:  # ConfigError included: the plan's own checks name the key
            return one_line(e)
        except Exception as e:  # noqa: BLE001
            return report_error(e, prog)
        return 0
    from ovlt.iterate.inputs import check_inputs
    try:
        check_inputs(cfg)  # before the run directory: a typo leaves nothing behind
    except ConfigError as e:
        return one_line(e)
    setup_logging(str(run_dir / "logs"))

    def _term(signum, frame):  # scheduler preemption: stop the stage cleanly, resume later
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, _term)
    try:
        runner = make_runner(cfg.iterate.launcher)
        stop = parse_stage_id(args.stop_after, cfg.iterate.rounds) if args.stop_after else None
        man = run_loop(cfg, runner, resume=args.resume, force_from=args.force_from,
                       stop_after=stop,
                       on_stage_done=lambda m, p: write_report(m, run_dir))
    except (IterateError, ValueError) as e:  # a failed stage names its log; bad input
        return one_line(e)
    except Exception as e:  # noqa: BLE001
        return report_error(e, prog)
    report = write_report(man, run_dir)
    print(f"run finished: {run_dir / 'manifest.json'}\nreport: {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
