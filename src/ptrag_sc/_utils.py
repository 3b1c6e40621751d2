"""Small shared helpers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def flush_denormal() -> Iterator[None]:
    """Treat denormal floats as zero on CPU while the block runs.

    Optimizer states and zero-initialised layers drift into denormal range during training, and
    x86 CPUs handle those up to 100 times slower: measured here, a training step went from
    3.6 s to 0.5 s with flushing. PyTorch's default (no flushing) is restored afterwards.
    """
    changed = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if changed:
            torch.set_flush_denormal(False)
