"""Package-wide settings."""

from __future__ import annotations

import logging
import numbers

#: The package's logger; :attr:`PTRAGSettings.verbosity` sets its level.
_LOGGER_NAME = "ptrag_sc"
#: Torch threads while the package trains and predicts on the CPU, unless set otherwise.
DEFAULT_NUM_THREADS = 1


def _as_level(level: int | str) -> int:
    """A logging level from an int or a name such as ``"info"``."""
    if isinstance(level, str):
        value = logging.getLevelName(level.upper())
        if not isinstance(value, int):
            raise ValueError(
                f"Unknown verbosity {level!r}; use a logging level such as logging.INFO, "
                "'info', 'warning' or 'error'."
            )
        return value
    if isinstance(level, bool) or not isinstance(level, int):
        raise TypeError(f"`verbosity` must be a logging level (int or name), got {level!r}.")
    if level < 0:
        raise ValueError(f"`verbosity` must be a non-negative logging level, got {level}.")
    return level


class PTRAGSettings:
    """Global settings of :mod:`ptrag_sc`.

    Attributes
    ----------
    progress_bar
        Show progress bars during training, text embedding and prediction over many
        perturbations. Set ``ptrag_sc.settings.progress_bar = False`` to silence them
        (for example in scripts and CI logs).
    verbosity
        Logging level, as in scvi-tools (``logging.DEBUG``, ``logging.INFO``,
        ``logging.WARNING``... or their names, ``"info"``); default ``logging.WARNING``.
        It sets the level of the ``ptrag_sc`` logger, and at ``logging.INFO`` or below
        training also shows PyTorch Lightning's messages (the "GPU available" banners, the
        "💡 Tip" lines, "`Trainer.fit` stopped") and its routine warnings, which are
        silenced otherwise. Independent of :attr:`progress_bar`.
    num_threads
        PyTorch threads (``torch.set_num_threads``) while the package trains, predicts or
        screens on the CPU; torch's own setting is restored afterwards. Default 1: the models
        gain little from more threads, and a thread count at or above the free cores makes
        PyTorch's OpenMP threads wait for each other whenever another program runs, many
        times slower (measured figures in the FAQ). Raise it on a machine with cores to
        spare; ``None`` leaves torch's own setting.
    """

    def __init__(self) -> None:
        self._progress_bar = True
        self._verbosity = logging.WARNING
        self._num_threads: int | None = DEFAULT_NUM_THREADS

    @property
    def progress_bar(self) -> bool:
        """Whether long-running steps show a progress bar."""
        return self._progress_bar

    @progress_bar.setter
    def progress_bar(self, value: bool) -> None:
        self._progress_bar = bool(value)

    @property
    def verbosity(self) -> int:
        """Logging level of the package and of Lightning's messages during training."""
        return self._verbosity

    @verbosity.setter
    def verbosity(self, level: int | str) -> None:
        level = _as_level(level)
        self._verbosity = level
        logger = logging.getLogger(_LOGGER_NAME)
        logger.setLevel(level)
        # Messages below WARNING need a handler when the application configured none
        # (Python's last-resort handler prints only warnings and errors).
        if level < logging.WARNING and not logger.handlers and not logging.getLogger().handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
            logger.propagate = False

    @property
    def num_threads(self) -> int | None:
        """PyTorch threads while the package computes on the CPU (``None``: torch's own)."""
        return self._num_threads

    @num_threads.setter
    def num_threads(self, value: int | None) -> None:
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1
        ):
            raise ValueError(f"`num_threads` must be a positive integer or None, got {value!r}.")
        self._num_threads = None if value is None else int(value)

    def __repr__(self) -> str:
        return (
            f"PTRAGSettings(progress_bar={self.progress_bar}, "
            f"verbosity={logging.getLevelName(self.verbosity)}, num_threads={self.num_threads})"
        )


settings = PTRAGSettings()
