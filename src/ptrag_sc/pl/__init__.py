"""Plotting, scanpy-style: every function takes ``ax=None``, ``show=None`` and ``save=None`` and
returns the Axes (or a list of Axes) when the figure is not shown."""

from __future__ import annotations

from ._confidence import confidence
from ._history import training_history
from ._metrics import metric_comparison
from ._retrieval import retrieval_heatmap
from ._screen import screen
from ._shifts import shift_scatter

__all__ = [
    "confidence",
    "metric_comparison",
    "retrieval_heatmap",
    "screen",
    "shift_scatter",
    "training_history",
]
