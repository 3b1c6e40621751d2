"""PT-RAG for single-cell perturbation response prediction, as a scvi-tools model.

The subpackages and :class:`PTRAG` are imported on first use (PEP 562), so that
``import ptrag_sc`` and the command line (``ptrag-sc --help``) do not pay for importing
scvi-tools, PyTorch and Lightning until they are needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._settings import settings

if TYPE_CHECKING:
    from . import data, datasets, model, module, pl, pp, tl  # noqa: F401 (model: not in __all__)
    from .model import PTRAG

__version__ = "0.1.0"

__all__ = ["PTRAG", "data", "datasets", "module", "pl", "pp", "settings", "tl"]

#: Subpackages imported on first attribute access.
_SUBMODULES = frozenset({"data", "datasets", "model", "module", "pl", "pp", "tl"})
#: Public names defined in a subpackage: name -> subpackage.
_ATTRIBUTES = {"PTRAG": "model"}


def __getattr__(name: str) -> object:
    import importlib

    if name in _SUBMODULES:
        # importing a submodule also binds it as an attribute of this package
        return importlib.import_module(f".{name}", __name__)
    if name in _ATTRIBUTES:
        value = getattr(importlib.import_module(f".{_ATTRIBUTES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*(n for n in globals() if n.startswith("__")), *__all__, "model"})
