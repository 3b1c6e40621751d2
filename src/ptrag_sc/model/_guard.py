"""Who may use a model's network at a time: any number of predictions, or one training.

Prediction switches the network to evaluation mode and training to training mode; done at
the same time (two threads, or a Lightning callback that predicts) one would change the
other's result. Predictions take a shared hold, ``train`` an exclusive one, and a call that
cannot get its hold is refused with an error that says why, instead of waiting.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator

import torch

__all__ = ["local_random", "predicting", "training"]


class _Usage:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.predictions = 0
        self.training = False


_USAGE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_USAGE_LOCK = threading.Lock()


def _usage(module: torch.nn.Module) -> _Usage:
    with _USAGE_LOCK:
        return _USAGE.setdefault(module, _Usage())


@contextlib.contextmanager
def predicting(module: torch.nn.Module) -> Iterator[None]:
    """A shared hold on a model's network for a prediction (refused while it trains)."""
    usage = _usage(module)
    with usage.lock:
        if usage.training:
            raise RuntimeError(
                "This model is training (`train()` is running, in another thread or in a "
                "callback): predicting now would switch its network to evaluation mode "
                "mid-training. Predict after `train()` returns, or with a copy taken before "
                "training (`copy.deepcopy(model)`)."
            )
        usage.predictions += 1
    try:
        yield
    finally:
        with usage.lock:
            usage.predictions -= 1


@contextlib.contextmanager
def training(module: torch.nn.Module) -> Iterator[None]:
    """The exclusive hold on a model's network for ``train`` (refused while in use)."""
    usage = _usage(module)
    with usage.lock:
        if usage.training or usage.predictions:
            what = "`train()` is already running" if usage.training else "a prediction is running"
            raise RuntimeError(
                f"{what} for this model (in another thread); training now would change its "
                "network under it. Call `train()` after it returns."
            )
        usage.training = True
    try:
        yield
    finally:
        with usage.lock:
            usage.training = False


class _Generator(torch.overrides.TorchFunctionMode):
    """Gives ``generator`` to the random functions called in its block that were given none."""

    RANDOM = frozenset(
        {torch.rand, torch.rand_like, torch.randn, torch.randn_like, torch.randint}
        | {torch.bernoulli, torch.multinomial}
    )

    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.generator = generator

    def __torch_function__(
        self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None
    ) -> object:
        kwargs = kwargs or {}
        if func in self.RANDOM and kwargs.get("generator") is None:
            kwargs = {**kwargs, "generator": self.generator}
        return func(*args, **kwargs)


@contextlib.contextmanager
def local_random(seed: int, device: torch.device) -> Iterator[None]:
    """Random numbers drawn in this block come from a generator of its own, seeded with ``seed``.

    torch's global generator is neither read nor advanced, so predictions in other threads
    (function modes are per thread) draw the same numbers whatever runs beside them.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    with _Generator(generator):
        yield
