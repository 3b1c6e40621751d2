"""Checks of user arguments, with errors that name the argument at fault."""

from __future__ import annotations

import math
import numbers

import numpy as np
import pandas as pd

#: Largest integer option accepted (sizes beyond it cannot be allocated or indexed).
MAX_INT = 2**31 - 1


def positive_int(
    name: str, value: object, *, minimum: int = 1, allow_none: bool = False
) -> int | None:
    """``value`` as an int ``>= minimum`` (booleans and fractions are refused)."""
    if value is None and allow_none:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral | float)
        or (isinstance(value, float) and not value.is_integer())
        or int(value) < minimum
    ):
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    if int(value) > MAX_INT:
        raise ValueError(f"`{name}` must be an integer below 2**31, got {value!r}.")
    return int(value)


def finite_float(
    name: str,
    value: object,
    *,
    minimum: float | None = None,
    strict: bool = False,
    maximum: float | None = None,
) -> float:
    """``value`` as a finite float within bounds (``strict``: ``> minimum``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    value = float(value)
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"`{name}` must be {'>' if strict else '>='} {minimum}, got {value!r}.")
    if maximum is not None and value >= maximum:
        raise ValueError(f"`{name}` must be < {maximum}, got {value!r}.")
    return value


def check_flag(name: str, value: object) -> bool:
    """``value`` as a bool (``True``/``False``, numpy booleans too); anything else is refused."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"`{name}` must be True or False, got {value!r}.")
    return bool(value)


def check_seed(name: str, value: object, *, allow_none: bool = True) -> int | None:
    """A seed: ``None`` (when allowed) or an integer ``>= 0``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 0:
        raise ValueError(
            f"`{name}` must be an integer >= 0{' or None' if allow_none else ''}, got {value!r}."
        )
    return int(value)


def check_anndata(adata: object, argument: str = "adata", *, allow_none: bool = False) -> None:
    """``TypeError`` naming ``argument`` unless ``adata`` is an AnnData (MuData: resolved
    before)."""
    from anndata import AnnData

    if adata is None and allow_none:
        return
    if not isinstance(adata, AnnData):
        hint = ""
        if isinstance(adata, pd.DataFrame):
            hint = (
                " Build one with `anndata.AnnData(X=frame.to_numpy(), obs=..., "
                "var=pd.DataFrame(index=frame.columns))`."
            )
        raise TypeError(
            f"`{argument}` must be an AnnData (or a MuData), got {type(adata).__name__}.{hint}"
        )


def check_key_type(name: str, value: object, *, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, str):
        raise TypeError(
            f"`{name}` must be a column name (str){' or None' if allow_none else ''}, got "
            f"{value!r}."
        )


def check_choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}.")
