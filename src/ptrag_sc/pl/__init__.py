"""Plotting, scanpy-style.

Every function takes ``ax=None`` (draw into a given Axes), ``show=None`` (show the figure when
the function made it) and ``save=None`` (a file path; the format follows the extension), and
returns the Axes (or a list of Axes) when the figure is not shown.

- :func:`shift_scatter`: predicted vs observed mean shift from control, per perturbation, with
  :func:`ptrag_sc.tl.evaluate`'s ``pearson_delta`` in the title;
- :func:`retrieval_heatmap`: which candidates the retriever fetched and kept
  (:meth:`ptrag_sc.PTRAG.get_retrieval`);
- :func:`metric_comparison`: methods compared on one metric, with bootstrap intervals
  (:func:`ptrag_sc.tl.evaluate` / :func:`ptrag_sc.tl.summarize`);
- :func:`confidence`: a prediction's confidence against its measured accuracy;
- :func:`training_history`: training and validation curves of a model;
- :func:`screen`: the ranked scores of an in-silico screen (:func:`ptrag_sc.tl.screen`), top
  hits labelled.
"""

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
