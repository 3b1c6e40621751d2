"""Package-wide settings."""

from __future__ import annotations


class PTRAGSettings:
    """Global settings of :mod:`ptrag_sc`.

    Attributes
    ----------
    progress_bar
        Show progress bars during training, text embedding and prediction over many
        perturbations. Set ``ptrag_sc.settings.progress_bar = False`` to silence them
        (for example in scripts and CI logs); this also silences Lightning's informational
        messages during training.
    """

    def __init__(self) -> None:
        self._progress_bar = True

    @property
    def progress_bar(self) -> bool:
        """Whether long-running steps show a progress bar."""
        return self._progress_bar

    @progress_bar.setter
    def progress_bar(self, value: bool) -> None:
        self._progress_bar = bool(value)

    def __repr__(self) -> str:
        return f"PTRAGSettings(progress_bar={self.progress_bar})"


settings = PTRAGSettings()
