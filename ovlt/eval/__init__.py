"""Benchmark evaluation: MathVista / MathVerse / MathVision loaders, rule-based scoring,
`eval run` (generation through a RolloutEngine), reports and per-round plots."""
from ovlt.eval.readers import BenchmarkError, EvalItem, load_benchmark
from ovlt.eval.score_report import PUBLISHED, plot_rounds, write_report
from ovlt.eval.scoring import aggregate, judge_response

__all__ = ["load_benchmark", "EvalItem", "BenchmarkError", "judge_response", "aggregate",
           "write_report", "plot_rounds", "PUBLISHED"]
