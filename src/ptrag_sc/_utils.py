"""Small shared helpers."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# scvi-tools 1.4.2 calls ``rich.pretty`` in ``view_anndata_setup`` without importing it. This
# module is imported by the model (and the package's ``__init__`` is lazy), so the workaround
# lives here, where every path to :class:`ptrag_sc.PTRAG` passes.
import rich.pretty  # noqa: F401
import torch

from ._settings import settings

#: Loggers of Lightning's informational messages ("GPU available", "💡 Tip", "`Trainer.fit`
#: stopped"), sent by ``rank_zero_info`` below ``lightning.pytorch``'s own INFO handler.
_CHATTY_LOGGERS = (
    "lightning.pytorch",
    "lightning.fabric",
    "lightning",
    "pytorch_lightning",
    "lightning_fabric",
    "lightning_utilities",
)
#: Routine warnings of ``Trainer.fit`` on small data or on CPU (matched from the start).
_CHATTY_WARNINGS = (
    # torch >= 2.10 deprecates ``LeafSpec``, which Lightning 2.6 still instantiates (FutureWarning)
    r".*isinstance\(treespec, LeafSpec\).*",
    # Lightning's PossibleUserWarnings about a short epoch and single-process data loading
    r".*is smaller than the logging interval.*",
    r".*does not have many workers.*",
    # Lightning's rank_zero_warn on machines with an unused accelerator
    r".*(GPU|TPU|HPU) available but not used.*",
)


@contextmanager
def quiet_lightning(enabled: bool) -> Iterator[None]:
    """With ``enabled``, silence Lightning's informational messages and routine warnings while
    the block runs (levels and warning filters are restored afterwards)."""
    if not enabled:
        yield
        return
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        with warnings.catch_warnings():
            for pattern in _CHATTY_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextmanager
def flush_denormal() -> Iterator[None]:
    """Treat denormal floats as zero on CPU while the block runs.

    Optimizer states and zero-initialised layers drift into denormal range during training, which
    x86 CPUs handle up to 100 times slower (measured: a training step from 3.6 s to 0.5 s).
    """
    changed = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if changed:
            torch.set_flush_denormal(False)


@contextmanager
def settings_threads() -> Iterator[None]:
    """Run the block with ``ptrag_sc.settings.num_threads`` PyTorch threads (if set), then
    restore torch's count (read at every call: libraries sharing OpenMP, such as numba, change
    it)."""
    wanted, previous = settings.num_threads, torch.get_num_threads()
    if wanted is None or wanted == previous:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def is_interactive(stream: object) -> bool:
    """Whether ``stream`` shows ``\\r`` updates in place: a terminal or a Jupyter cell."""
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
    return type(stream).__module__.startswith("ipykernel")


@contextmanager
def progress_bar(
    total: int, description: str, unit: str, enabled: bool = True
) -> Iterator[Callable[[int], object]]:
    """A tqdm bar on stderr, as its ``update`` function; a no-op when disabled or when stderr is
    not interactive (a log file would collect every update)."""
    if not enabled or not is_interactive(sys.stderr):
        yield lambda n=1: None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=description, unit=unit, file=sys.stderr) as bar:
        yield bar.update
