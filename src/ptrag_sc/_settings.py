"""Package-wide settings."""

from __future__ import annotations

import logging

#: The package's logger; :attr:`PTRAGSettings.verbosity` sets its level.
_LOGGER_NAME = "ptrag_sc"


def _as_level(level: int | str) -> int:
    """A logging level from an int or a name such as ``"info"``."""
    if isinstance(level, bool):
        raise TypeError(f"`verbosity` must be a logging level (int or name), got {level!r}.")
    if isinstance(level, str):
        value = logging.getLevelName(level.upper())
        if not isinstance(value, int):
            raise ValueError(
                f"Unknown verbosity {level!r}; use a logging level such as logging.INFO, "
                "'info', 'warning' or 'error'."
            )
        return value
    if isinstance(level, int):
        if level < 0:
            raise ValueError(f"`verbosity` must be a non-negative logging level, got {level}.")
        return level
    raise TypeError(f"`verbosity` must be a logging level (int or name), got {type(level).__name__}.")


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
    """

    def __init__(self) -> None:
        self._progress_bar = True
        self._verbosity = logging.WARNING

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

    def __repr__(self) -> str:
        return (
            f"PTRAGSettings(progress_bar={self.progress_bar}, "
            f"verbosity={logging.getLevelName(self.verbosity)})"
        )


settings = PTRAGSettings()
