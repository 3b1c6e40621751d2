"""Few-shot cross-cell-type splits (the PT-RAG paper's evaluation protocol)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import DEFAULT_CELL_TYPE_KEY, DEFAULT_CONTROL_GROUP, DEFAULT_PERTURBATION_KEY
from .._symbols import _data_path, _format_list, resolve_gene_symbols

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["few_shot_preset", "few_shot_split"]

SPLIT_CATEGORIES = ("train", "val", "test")
_PRESETS = {"replogle_nadig": "replogle_nadig_fewshot_split.csv"}


@lru_cache(maxsize=len(_PRESETS))
def _read_preset(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    with _data_path(_PRESETS[name]).open("r", encoding="utf-8") as fh:
        df = pd.read_csv(fh, dtype=str)
    return (
        tuple(df.loc[df["split"] == "val", "perturbation"]),
        tuple(df.loc[df["split"] == "test", "perturbation"]),
    )


def few_shot_preset(name: str = "replogle_nadig") -> dict[str, list[str]]:
    """Held-out perturbation lists of a published few-shot split.

    Parameters
    ----------
    name
        ``"replogle_nadig"``: the PT-RAG paper's lists for the Replogle–Nadig compilation
        (104 validation and 624 test genes, the same for every held-out cell line; from the
        repository ``difra100/PT-RAG_ICLR``, commit ``3c19b33``).

    Returns
    -------
    ``{"val": [...], "test": [...]}`` (new lists).

    Examples
    --------
    >>> import ptrag_sc
    >>> lists = ptrag_sc.pp.few_shot_preset("replogle_nadig")
    >>> len(lists["val"]), len(lists["test"])
    (104, 624)
    """
    if name not in _PRESETS:
        raise ValueError(f"Unknown few-shot preset {name!r}; available: {sorted(_PRESETS)}.")
    val, test = _read_preset(name)
    return {"val": list(val), "test": list(test)}


def _check_fraction(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be in [0, 1), got {value}.")
    return value


def _match_requested(
    requested: Sequence[str], labels: Sequence[str], what: str, held_out: Sequence[str]
) -> list[str]:
    """Map requested perturbations to labels of the held-out cells (exact, then via aliases)."""
    label_set = set(labels)
    exact = [g for g in requested if g in label_set]
    rest = [g for g in requested if g not in label_set]
    res = resolve_gene_symbols(rest, labels, warn=False) if rest else None
    matched = exact + ([res.mapping[g] for g in rest if g in res.mapping] if res else [])
    absent = res.missing if res else []
    if not matched:
        raise ValueError(
            f"None of the {len(requested)} `{what}` perturbations is measured in the held-out "
            f"cell type(s) {list(held_out)}: {_format_list(list(requested))}."
        )
    if absent:
        warnings.warn(
            f"{len(absent)} of the {len(requested)} `{what}` perturbations are not measured in "
            f"the held-out cell type(s) {list(held_out)} and are ignored: {_format_list(absent)}.",
            UserWarning,
            stacklevel=3,
        )
    return list(dict.fromkeys(matched))


def few_shot_split(
    adata: AnnData,
    *,
    held_out: str | Iterable[str],
    val: Iterable[str] | None = None,
    test: Iterable[str] | None = None,
    preset: str | None = None,
    perturbation_key: str = DEFAULT_PERTURBATION_KEY,
    cell_type_key: str = DEFAULT_CELL_TYPE_KEY,
    control_group: str = DEFAULT_CONTROL_GROUP,
    key_added: str = "split",
    seed: int = 0,
    val_fraction: float = 0.05,
    test_fraction: float = 0.3,
    copy: bool = False,
) -> AnnData | None:
    """Few-shot split with a held-out cell type (the PT-RAG paper's protocol).

    Every cell of the other cell types is ``"train"``. In the held-out cell type(s), the cells
    of the validation perturbations are ``"val"``, those of the test perturbations
    ``"test"``, and all other cells (its remaining perturbations, and its **controls**) are
    ``"train"``: the controls are the inputs from which the model generates the held-out
    perturbations, so they must be seen; evaluation code should take the controls of the
    held-out type from ``"train"``.

    Parameters
    ----------
    adata
        Annotated data with perturbation and cell-type columns in ``obs``.
    held_out
        The held-out cell type(s) (values of ``obs[cell_type_key]``). With several, the same
        val/test perturbations are held out in each of them.
    val, test
        Perturbation labels held out for validation / test (labels as in
        ``obs[perturbation_key]``; old symbols and aliases are matched too). Labels that are
        not measured in the held-out cell type(s) are ignored with a warning. A list not
        given is drawn at random (see ``val_fraction``/``test_fraction``).
    preset
        ``"replogle_nadig"``: the paper's 104 validation and 624 test genes (see
        :func:`few_shot_preset`); cannot be combined with ``val``/``test``.
    perturbation_key, cell_type_key, control_group
        obs columns holding the perturbation and the cell type, and the control label.
    key_added
        obs column written (categorical ``train``/``val``/``test``); the settings and the
        final lists go to ``uns[f"{key_added}_params"]``.
    seed
        Seed of the random draws.
    val_fraction, test_fraction
        Share of the held-out cell type's perturbations drawn at random for a list not given
        (rounded, at least one when the fraction is positive). The defaults are close to the
        paper's proportions (104 and 624 of about 2,000 perturbations per cell line).
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    ``None``, or the modified copy if ``copy=True``. Writes ``obs[key_added]`` and
    ``uns[f"{key_added}_params"]``.

    Examples
    --------
    >>> import ptrag_sc
    >>> adata = ptrag_sc.datasets.perturbench_devel(subset="glioblastoma")
    >>> ptrag_sc.pp.few_shot_split(adata, held_out="U87MG", test=["MAPK1", "SGK1"], val=["PLK4"])
    >>> adata.obs.groupby("split", observed=True)["gene"].nunique().to_dict()
    {'train': 10, 'val': 1, 'test': 2}
    """
    for key in (perturbation_key, cell_type_key):
        if key not in adata.obs.columns:
            raise KeyError(
                f"Column {key!r} not found in adata.obs; available columns: "
                f"{list(map(str, adata.obs.columns))}."
            )
    if preset is not None:
        if val is not None or test is not None:
            raise ValueError("Pass either `preset` or explicit `val`/`test` lists, not both.")
        lists = few_shot_preset(preset)
        val, test = lists["val"], lists["test"]
    val_fraction = _check_fraction("val_fraction", val_fraction)
    test_fraction = _check_fraction("test_fraction", test_fraction)
    if val is None and test is None and val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"`val_fraction` + `test_fraction` must be below 1 so that the held-out cell type "
            f"keeps training perturbations, got {val_fraction} + {test_fraction}."
        )

    for key in (perturbation_key, cell_type_key):
        if adata.obs[key].isna().any():
            raise ValueError(
                f"adata.obs[{key!r}] has {int(adata.obs[key].isna().sum())} missing values; "
                "label every cell."
            )
    pert = adata.obs[perturbation_key].astype(str)
    ctype = adata.obs[cell_type_key].astype(str)

    held = [held_out] if isinstance(held_out, str) else list(dict.fromkeys(held_out))
    if not held:
        raise ValueError("`held_out` is empty: name at least one cell type.")
    available = sorted(ctype.unique())
    unknown = [h for h in held if h not in available]
    if unknown:
        raise ValueError(
            f"Held-out cell type(s) {unknown} not found in adata.obs[{cell_type_key!r}]; "
            f"available: {available}."
        )
    in_held = ctype.isin(held).to_numpy()
    for h in held:
        if not ((ctype == h) & (pert == control_group)).any():
            raise ValueError(
                f"Held-out cell type {h!r} has no control cells ({perturbation_key} == "
                f"{control_group!r}); the model needs them as inputs."
            )
    labels = sorted(set(pert[in_held]) - {control_group})
    if not labels:
        raise ValueError(f"Held-out cell type(s) {held} have no perturbed cells.")

    chosen: dict[str, list[str] | None] = {"val": None, "test": None}
    for what, req in (("val", val), ("test", test)):
        if req is None:
            continue
        req_list = [req] if isinstance(req, str) else list(req)
        if control_group in req_list:
            raise ValueError(
                f"The control label {control_group!r} cannot be held out as `{what}`."
            )
        chosen[what] = _match_requested(req_list, labels, what, held) if req_list else []
    if chosen["val"] is not None and chosen["test"] is not None:
        overlap = sorted(set(chosen["val"]) & set(chosen["test"]))
        if overlap:
            raise ValueError(f"Perturbations in both `val` and `test`: {_format_list(overlap)}.")

    rng = np.random.default_rng(seed)
    n_total = len(labels)
    for what, frac in (("val", val_fraction), ("test", test_fraction)):
        if chosen[what] is not None:
            continue
        taken = {g for lst in chosen.values() if lst for g in lst}
        pool = [g for g in labels if g not in taken]
        n = max(round(frac * n_total), 1) if frac > 0 else 0
        n = min(n, max(len(pool) - 1, 0))  # keep at least one training perturbation
        chosen[what] = sorted(rng.choice(pool, size=n, replace=False).tolist()) if n else []
    if not set(labels) - set(chosen["val"]) - set(chosen["test"]):
        warnings.warn(
            f"Every perturbation of the held-out cell type(s) {held} is in val or test: the "
            "setting is zero-shot, not few-shot.",
            UserWarning,
            stacklevel=2,
        )

    split = np.full(adata.n_obs, "train", dtype=object)
    split[in_held & pert.isin(chosen["val"]).to_numpy()] = "val"
    split[in_held & pert.isin(chosen["test"]).to_numpy()] = "test"

    target = adata
    if copy:
        try:
            target = adata.copy()
        except (AttributeError, TypeError, NotImplementedError) as err:
            raise ValueError(
                "`copy=True` cannot copy this AnnData (is X a lazy on-disk array, e.g. from "
                "`read_replogle_nadig(..., backed=True)`?); use copy=False, which only writes "
                "obs and uns."
            ) from err
    target.obs[key_added] = pd.Categorical(split, categories=list(SPLIT_CATEGORIES))
    target.uns[f"{key_added}_params"] = {
        "held_out": held,
        "val": list(chosen["val"]),
        "test": list(chosen["test"]),
        "perturbation_key": perturbation_key,
        "cell_type_key": cell_type_key,
        "control_group": control_group,
        "seed": int(seed),
        **({} if preset is None else {"preset": preset}),
    }
    return target if copy else None
