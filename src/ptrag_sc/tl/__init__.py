"""Tools: evaluation metrics, summaries, cell-eval export and cell-eval2 scores, honest baselines
and in-silico screens."""

from __future__ import annotations

from ._baselines import BASELINES, predict_baseline
from ._cell_eval import to_cell_eval
from ._cell_eval2 import score_cell_eval2
from ._evaluate import LOWER_IS_BETTER, METRIC_COLUMNS, evaluate
from ._screen import screen
from ._summarize import summarize

__all__ = [
    "BASELINES",
    "LOWER_IS_BETTER",
    "METRIC_COLUMNS",
    "evaluate",
    "predict_baseline",
    "score_cell_eval2",
    "screen",
    "summarize",
    "to_cell_eval",
]
