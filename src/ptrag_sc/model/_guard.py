"""Who may use a model's network at a time: any number of predictions (which switch it to
evaluation mode), or one training; a call that cannot get its hold is refused, not queued."""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class _Usage:
    lock: threading.Lock = field(default_factory=threading.Lock)
    predictions: int = 0
    training: bool = False


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
    """Random numbers drawn in this block come from a generator of its own, seeded with
    ``seed``: torch's global one is neither read nor advanced (function modes are per thread)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    with _Generator(generator):
        yield
