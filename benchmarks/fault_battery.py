"""Fault battery: bad input and faults against the public API, each outcome classified.

Usage::

    python benchmarks/fault_battery.py                      # all cases (about 2 minutes on 1 core)
    python benchmarks/fault_battery.py --only predict       # cases whose id or API has "predict"
    python benchmarks/fault_battery.py --output DIR --label before

About 320 cases, as a careless or unlucky user would try them, against ``setup_anndata``,
``PTRAG(...)``, ``train``, ``predict``, ``get_retrieval``, ``save`` / ``load``,
``add_perturbation_embeddings``, ``setup_mudata``, ``tl`` / ``pl`` (plus a reproducibility
check in a new process, and concurrent saves and predictions). Every case names what a correct
outcome is; the runner classifies what happened:

``clear_error``
    An exception of type ``ValueError``, ``KeyError``, ``TypeError``, ``RuntimeError`` or a
    path or I/O error (``FileNotFoundError``, ``NotADirectoryError``, ``FileExistsError``, an
    ``OSError`` such as a full disk, passed through) whose
    message names the argument or value at fault (one of the case's tokens), raised by
    ptrag_sc (or by Python at the call itself), not from deep inside a library.
``correct``
    The call succeeded and the case's check of the result passed (finite, in range, equal to
    the reference where there is one, the expected warning given).
``obscure_error``
    Any other exception: another type, a message that does not name the fault, or one raised
    inside a library (scvi-tools, Lightning, torch, numpy, pandas...).
``silent_wrong``
    The call succeeded but should have failed, or its result fails the case's check.
``overwrite``
    The user's objects (AnnData, MuData, embedding table) changed beyond the documented keys
    (``obs['_scvi_*']``, ``uns['_scvi_*']`` and, on success, ``layers[key_added]`` with
    ``obs[key_added + '_confidence']``).
``data_loss``
    A file or model folder of the user's that the call had to leave alone changed or went
    missing (a failed save that destroyed the previous model, a replaced h5ad).
``outside_write``
    A file outside the folder the call writes to changed (a link written through).
``code_executed``
    Loading ran code planted in the model directory (a pickle that touches a marker file).

Writes ``<output>/cases.csv`` (one row per case) and ``<output>/summary.md`` (counts, and the
cases that are not a clear error or a correct result). Targets (issue 9): 0 silent wrong
results, 0 overwrites, 0 code executed, at most 5 obscure errors; issue 19's cases (their
``group`` names the failure class): 0 silent, 0 data loss, 0 writes outside the folder, at
most 2 obscure errors.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pathlib
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent
DEFAULT_OUTPUT = HERE / "results" / "faults"
OUTCOMES = (
    "clear_error",
    "correct",
    "obscure_error",
    "silent_wrong",
    "overwrite",
    "data_loss",
    "outside_write",
    "code_executed",
)
CLEAR_TYPES = (
    ValueError,
    KeyError,
    TypeError,
    RuntimeError,
    FileNotFoundError,
    NotADirectoryError,
    FileExistsError,
    OSError,
)
TINY = {
    "n_hidden": 16,
    "n_layers": 1,
    "n_heads": 2,
    "cell_set_size": 8,
    "n_candidates": 4,
    "gene_annotations": None,
}
STEPS = 12


# --------------------------------------------------------------------------- the harness
@dataclass
class Trial:
    """What a case runs and what counts as right.

    call
        The action.
    tokens
        An error is clear when its message contains one of these (case-insensitive).
    check
        For a successful call: ``check(result) -> (ok, why)``. ``None``: success is wrong.
    watch
        User objects that must not change (beyond the documented keys).
    allow_layers
        Layers a successful call may add or replace.
    warns
        A successful call must emit a warning containing this text.
    after
        Run after the call, whatever happened: ``after() -> (ok, why)``; not ok is a silent
        wrong result (e.g. a failed ``train`` that left the model marked trained).
    keep
        The user's files (or model folders) whose bytes must survive the call: a change is
        ``data_loss``.
    outside
        Files outside the folder the call writes to: a change is ``outside_write``.
    """

    call: Callable[[], Any]
    tokens: tuple[str, ...] = ()
    check: Callable[[Any], tuple[bool, str]] | None = None
    watch: tuple = ()
    allow_layers: tuple[str, ...] = ()
    warns: str | None = None
    after: Callable[[], tuple[bool, str]] | None = None
    keep: tuple[Path, ...] = ()
    outside: tuple[Path, ...] = ()


@dataclass
class Case:
    id: str
    api: str
    description: str
    build: Callable[[Env], Trial]
    from_issue: bool = False
    group: str = ""


CASES: list[Case] = []


def case(api: str, description: str, *, issue: bool = False, group: str = ""):
    def register(build):
        CASES.append(Case(f"{api}:{build.__name__}", api, description, build, issue, group))
        return build

    return register


def files_digest(paths) -> dict[str, str]:
    """Bytes of files, or of every file under folders (``"absent"`` when missing), by path."""
    out = {}
    for path in map(Path, paths):
        entries = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for entry in entries:
            out[str(entry)] = (
                hashlib.sha1(entry.read_bytes()).hexdigest() if entry.exists() else "absent"
            )
    return out


def _digest(values) -> str:
    h = hashlib.sha1()
    if sp.issparse(values):
        values = values.toarray()
    elif hasattr(values, "shape") and not isinstance(
        values, np.ndarray | pd.DataFrame | pd.Series
    ):
        values = np.asarray(values[...]) if hasattr(values, "__getitem__") else np.asarray(values)
    if isinstance(values, pd.DataFrame | pd.Series | pd.Index):
        h.update(
            pd.util.hash_pandas_object(
                values.astype(str) if isinstance(values, pd.Index) else values, index=True
            )
            .to_numpy()
            .tobytes()
        )
        return h.hexdigest()
    array = np.asarray(values)
    if array.dtype == object:
        h.update("\x1f".join(map(str, array.ravel())).encode())
    else:
        h.update(np.ascontiguousarray(array).view(np.uint8).tobytes())
    h.update(str(array.shape).encode())
    return h.hexdigest()


def fingerprint(obj) -> dict:
    """What must not change in a user object, as comparable digests."""
    from anndata import AnnData

    if isinstance(obj, AnnData):
        out = {
            "X": None if obj.X is None else _digest(obj.X),
            "obs_names": _digest(obj.obs_names),
            "var_names": _digest(obj.var_names),
            "n": obj.shape,
        }
        for k in obj.layers.keys():
            out[f"layers/{k}"] = _digest(obj.layers[k])
        for c in obj.obs.columns:
            if not str(c).startswith("_scvi"):
                out[f"obs/{c}"] = _digest(obj.obs[c].astype(object).astype(str))
        for k in obj.uns.keys():
            if not str(k).startswith("_scvi"):
                out[f"uns/{k}"] = str(type(obj.uns[k]))
        for k in obj.obsm.keys():
            out[f"obsm/{k}"] = _digest(obj.obsm[k])
        return out
    if type(obj).__name__ == "MuData":
        out = {"obs_names": _digest(obj.obs_names)}
        for name, mod in obj.mod.items():
            out.update({f"{name}/{k}": v for k, v in fingerprint(mod).items()})
        return out
    if isinstance(obj, pd.DataFrame):
        return {
            "frame": _digest(obj),
            "index": _digest(obj.index),
            "columns": _digest(obj.columns),
        }
    return {"value": _digest(obj)}


def changes(before: dict, after: dict, allow_layers: tuple[str, ...]) -> list[str]:
    # A layer's prediction comes with its confidence column (documented beside the layer).
    allowed = tuple(f"layers/{k}" for k in allow_layers) + tuple(
        f"obs/{k}_confidence" for k in allow_layers
    )
    return sorted(
        k
        for k in set(before) | set(after)
        if before.get(k) != after.get(k) and not (allowed and k.endswith(allowed))
    )


def _raised_in(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    return frames[-1].filename if frames else ""


def _is_ours(path: str) -> bool:
    return (
        "ptrag_sc" in path.replace("\\", "/").split("/site-packages/")[-1]
        or Path(path).resolve() == Path(__file__).resolve()
    )


@dataclass
class Record:
    id: str
    api: str
    description: str
    from_issue: bool
    group: str
    outcome: str
    detail: str
    seconds: float
    error_type: str = ""
    raised_in: str = ""


class Env:
    """Small data, tiny models and a scratch folder shared by the cases."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.marker = tmp / "CODE_WAS_EXECUTED"
        self._trained = None
        self._saved = None
        self._n = 0

    # data ----------------------------------------------------------------
    def data(self, *, n_batches: int = 1, n_cell_types: int = 2, seed: int = 0, **kwargs):
        import ptrag_sc

        params = {
            "n_cell_types": n_cell_types,
            "n_perturbations": 6,
            "n_genes": 20,
            "n_cells_per_perturbation": 12,
            "n_control_cells": 30,
            "n_batches": n_batches,
            "seed": seed,
        }
        params.update(kwargs)
        return ptrag_sc.datasets.synthetic(**params)

    def emb(self, adata):
        return adata.uns["gene_embeddings"]

    def perts(self, adata) -> list[str]:
        return sorted(set(adata.obs["gene"].astype(str)) - {"non-targeting"})

    def path(self, name: str) -> Path:
        self._n += 1
        return self.tmp / f"{self._n:03d}_{name}"

    # models --------------------------------------------------------------
    def model(self, adata, setup: dict | None = None, **kwargs):
        from ptrag_sc import PTRAG

        PTRAG.setup_anndata(adata, **(setup or {}))
        return PTRAG(adata, perturbation_embeddings=self.emb(adata), **{**TINY, **kwargs})

    def fit(
        self,
        adata=None,
        *,
        setup: dict | None = None,
        steps: int = STEPS,
        train: dict | None = None,
        **kwargs,
    ):
        import scvi

        adata = self.data() if adata is None else adata
        scvi.settings.seed = 0
        model = self.model(adata, setup, **kwargs)
        model.train(max_steps=steps, **(train or {}))
        return model, adata

    @property
    def trained(self):
        """A trained model and its AnnData, shared: cases must not change them."""
        if self._trained is None:
            model, adata = self.fit()
            ref = model.predict(adata, inplace=False)
            self._trained = (model, adata, ref)
        return self._trained

    @property
    def saved(self) -> Path:
        """A directory holding the shared model, saved once."""
        if self._saved is None:
            model = self.trained[0]
            self._saved = self.tmp / "saved_model"
            model.save(self._saved, overwrite=True)
        return self._saved

    def copy_saved(self) -> Path:
        target = self.path("model_copy")
        shutil.copytree(self.saved, target)
        return target

    def pickle_bomb(self, path: Path) -> None:
        """A torch/pickle file that touches the marker file when unpickled."""
        import torch

        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"model_state_dict": _Bomb(str(self.marker)), "attr_dict": {"registry_": {}}}, path
        )


class _Bomb:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def run_case(env: Env, item: Case) -> Record:
    import scvi

    scvi.settings.seed = 0
    env.marker.unlink(missing_ok=True)
    start = time.perf_counter()
    outcome, detail, etype, where = "", "", "", ""
    try:
        trial = item.build(env)
    except Exception as exc:  # the case itself could not be prepared: a harness fault
        return Record(
            item.id,
            item.api,
            item.description,
            item.from_issue,
            item.group,
            "harness_error",
            f"{type(exc).__name__}: {exc}",
            0.0,
        )
    before = [fingerprint(obj) for obj in trial.watch]
    kept_before, outside_before = files_digest(trial.keep), files_digest(trial.outside)
    result, error = None, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        previous_sigint = signal.getsignal(signal.SIGINT)
        try:
            result = trial.call()
        except BaseException as exc:
            error = exc
        finally:
            if signal.getsignal(signal.SIGINT) != previous_sigint:
                signal.signal(signal.SIGINT, previous_sigint)
                detail = "SIGINT handler left changed; "
    after = [fingerprint(obj) for obj in trial.watch]
    changed = [
        c
        for b, a in zip(before, after, strict=True)
        for c in changes(b, a, trial.allow_layers if error is None else ())
    ]
    post = (True, "")
    if trial.after is not None:
        try:
            post = trial.after()
        except Exception as exc:
            post = (False, f"after-check failed: {type(exc).__name__}: {exc}")
    lost = sorted(k for k, v in kept_before.items() if files_digest([k]).get(k) != v)
    written_outside = sorted(k for k, v in outside_before.items() if files_digest([k]).get(k) != v)
    if env.marker.exists():
        outcome, detail = "code_executed", detail + "the planted pickle ran"
    elif written_outside:
        outcome, detail = (
            "outside_write",
            detail + f"changed outside the folder: {written_outside[:3]}",
        )
    elif lost:
        outcome, detail = "data_loss", detail + f"changed or removed: {lost[:3]}"
    elif changed:
        outcome, detail = "overwrite", detail + f"changed: {changed[:6]}"
    elif error is not None:
        etype, where = type(error).__name__, _raised_in(error)
        message = str(error)
        named = any(t.lower() in message.lower() for t in trial.tokens)
        ours = _is_ours(where)
        if isinstance(error, CLEAR_TYPES) and named and ours and post[0]:
            outcome = "clear_error"
        elif not post[0]:
            outcome = "silent_wrong"
        else:
            outcome = "obscure_error"
        why = [] if named else ["message names none of " + repr(trial.tokens)]
        if not ours:
            why.append("raised inside " + _short(where))
        if not isinstance(error, CLEAR_TYPES):
            why.append(f"type {etype}")
        if not post[0]:
            why.append(post[1])
        detail += f"{etype}: {_one_line(message)}" + (
            f" [{'; '.join(why)}]" if outcome != "clear_error" else ""
        )
    elif trial.check is None:
        outcome, detail = "silent_wrong", detail + "accepted without an error"
        if not post[0]:
            detail += "; " + post[1]
    else:
        try:
            ok, why = trial.check(result)
        except Exception as exc:
            ok, why = False, f"check failed: {type(exc).__name__}: {exc}"
        if ok and trial.warns is not None:
            texts = [str(w.message) for w in caught]
            if not any(trial.warns.lower() in t.lower() for t in texts):
                ok, why = False, f"no warning mentioning {trial.warns!r}"
        if ok and not post[0]:
            ok, why = False, post[1]
        outcome, detail = ("correct" if ok else "silent_wrong"), detail + ("" if ok else why)
    return Record(
        item.id,
        item.api,
        item.description,
        item.from_issue,
        item.group,
        outcome,
        detail,
        time.perf_counter() - start,
        etype,
        _short(where),
    )


def _short(path: str) -> str:
    path = path.replace("\\", "/")
    return path.split("/site-packages/")[-1].split("/src/")[-1]


def _one_line(text: str, limit: int = 220) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------ checks
def ok() -> Callable[[Any], tuple[bool, str]]:
    return lambda _: (True, "")


def prediction_ok(
    adata, *, reference=None, columns=None, atol=1e-5, ceiling_from=None
) -> Callable:
    """Finite, non-negative, within each gene's range in ``ceiling_from`` (default ``adata``),
    equal to a reference."""

    def check(pred):
        pred = np.asarray(pred)
        if pred.shape != adata.shape:
            return False, f"shape {pred.shape} != {adata.shape}"
        if not np.isfinite(pred).all():
            return False, "non-finite predictions"
        if pred.min() < 0:
            return False, f"negative prediction {pred.min():.3g}"
        source = adata if ceiling_from is None else ceiling_from
        X = source.X.toarray() if sp.issparse(source.X) else np.asarray(source.X)
        if ceiling_from is not None and columns is not None:
            X = X[:, columns]
        if (pred > X.max(axis=0) + 1e-4).any():
            return False, "prediction above the gene's largest value"
        if reference is not None:
            ref = reference if columns is None else reference[:, columns]
            if not np.allclose(pred, ref, atol=atol):
                return (
                    False,
                    f"differs from the reference (max |diff| {np.abs(pred - ref).max():.3g})",
                )
        return True, ""

    return check


def layer_ok(adata, key: str, **kwargs) -> Callable:
    def check(_):
        if key not in adata.layers:
            return False, f"layers[{key!r}] not written"
        return prediction_ok(adata, **kwargs)(adata.layers[key])

    return check


def generated_ok(
    n_expected: int,
    *,
    labels: list[str] | None = None,
    cell_type: str | None = None,
    ceiling=None,
    reference=None,
) -> Callable:
    def check(out):
        X = np.asarray(out.X)
        if out.n_obs != n_expected:
            return False, f"{out.n_obs} cells, expected {n_expected}"
        if not np.isfinite(X).all() or X.min() < 0:
            return False, "non-finite or negative predictions"
        if ceiling is not None and (X > ceiling + 1e-4).any():
            return False, "prediction above the gene's largest value"
        if labels is not None and sorted(set(out.obs["gene"].astype(str))) != sorted(labels):
            return False, f"labels {sorted(set(out.obs['gene'].astype(str)))} != {sorted(labels)}"
        if cell_type is not None:
            cts = set(out.obs.iloc[:, 1].astype(str))
            if cts != {cell_type}:
                return False, f"cell types {cts} != {{{cell_type!r}}}"
        if reference is not None and not np.allclose(X, reference, atol=1e-5):
            return False, "differs from the reference"
        return True, ""

    return check


def trained_state(model) -> dict:
    import torch

    return {
        "weights": {k: v.detach().clone() for k, v in model.module.state_dict().items()},
        "memory": json.dumps(_jsonable(model.memory_), sort_keys=True),
        "history": None
        if model.history_ is None
        else {k: v.to_json() for k, v in model.history_.items()},
        "is_trained": model.is_trained_,
        "torch": torch.__version__,
    }


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return hashlib.sha1(
            np.ascontiguousarray(value).view(np.uint8).tobytes()
            if value.dtype != object
            else str(value.tolist()).encode()
        ).hexdigest()
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, pd.DataFrame | pd.Series):
        return _digest(value)
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)


def same_state(model, before: dict) -> tuple[bool, str]:
    import torch

    now = trained_state(model)
    for k, v in before["weights"].items():
        if not torch.equal(now["weights"][k], v):
            return False, f"weight {k} changed"
    for key in ("memory", "history", "is_trained"):
        if now[key] != before[key]:
            return False, f"{key} changed"
    return True, ""


def untrained(model) -> Callable[[], tuple[bool, str]]:
    return lambda: (not model.is_trained_, "the model is marked trained after a failed train()")


# =========================================================================== cases
# ----------------------------------------------------------------- setup_anndata
def _setup(adata, **kwargs):
    from ptrag_sc import PTRAG

    return lambda: PTRAG.setup_anndata(adata, **kwargs)


def _registered(adata, *, n_perturbations=None, controls=None):
    def check(_):
        state = adata.uns.get("_scvi_manager_uuid")
        if state is None:
            return False, "not registered"
        from ptrag_sc import PTRAG

        manager = PTRAG._get_most_recent_anndata_manager(adata)
        perts = manager.get_state_registry("perturbation")["perturbations"]
        if n_perturbations is not None and len(perts) != n_perturbations:
            return (
                False,
                f"{len(perts)} perturbations registered ({list(perts)}), expected "
                f"{n_perturbations}",
            )
        if controls is not None:
            n = manager.get_state_registry("perturbation")["n_control_cells"]
            if n != controls:
                return False, f"{n} control cells, expected {controls}"
        return True, ""

    return check


@case("setup_anndata", "perturbation_key names a missing column")
def missing_perturbation_key(env):
    a = env.data()
    return Trial(_setup(a, perturbation_key="guide"), ("perturbation_key", "guide"), watch=(a,))


@case("setup_anndata", "cell_type_key names a missing column")
def missing_cell_type_key(env):
    a = env.data()
    return Trial(_setup(a, cell_type_key="celltype"), ("cell_type_key",), watch=(a,))


@case("setup_anndata", "batch_key names a missing column")
def missing_batch_key(env):
    a = env.data()
    return Trial(_setup(a, batch_key="batch"), ("batch_key",), watch=(a,))


@case("setup_anndata", "layer names a missing layer")
def missing_layer(env):
    a = env.data()
    return Trial(_setup(a, layer="counts"), ("layer", "counts"), watch=(a,))


@case("setup_anndata", "control_group absent from the labels")
def control_group_absent(env):
    a = env.data()
    return Trial(_setup(a, control_group="ctrl"), ("control_group", "ctrl"), watch=(a,))


@case("setup_anndata", "control_group is an int")
def control_group_int(env):
    a = env.data()
    return Trial(_setup(a, control_group=0), ("control_group",), watch=(a,))


@case("setup_anndata", "control_group is an empty string")
def control_group_empty(env):
    a = env.data()
    return Trial(_setup(a, control_group=""), ("control_group",), watch=(a,))


@case("setup_anndata", "perturbation_sep is empty")
def sep_empty(env):
    a = env.data()
    return Trial(_setup(a, perturbation_sep=""), ("perturbation_sep",), watch=(a,))


@case("setup_anndata", "perturbation_sep is whitespace")
def sep_space(env):
    a = env.data()
    return Trial(_setup(a, perturbation_sep=" "), ("perturbation_sep",), watch=(a,))


@case("setup_anndata", "an AnnData view", issue=True)
def view(env):
    a = env.data()
    v = a[:150]
    return Trial(_setup(v), ("view", "copy"), watch=(a,))


@case("setup_anndata", "0 genes", issue=True)
def zero_genes(env):
    a = env.data()[:, :0].copy()
    return Trial(_setup(a), ("genes", "n_vars"), watch=(a,))


@case("setup_anndata", "0 cells")
def zero_cells(env):
    a = env.data()[:0].copy()
    return Trial(_setup(a), ("cells", "n_obs"), watch=(a,))


@case("setup_anndata", "duplicated var_names", issue=True)
def duplicate_var_names(env):
    a = env.data()
    a.var_names = ["GENE0001"] * 2 + list(a.var_names[2:])
    return Trial(_setup(a), ("var_names", "duplicated"), watch=(a,))


@case("setup_anndata", "NaN in the perturbation column")
def nan_perturbation(env):
    a = env.data()
    a.obs["gene"] = a.obs["gene"].astype(object)
    a.obs.iloc[3, a.obs.columns.get_loc("gene")] = np.nan
    return Trial(_setup(a), ("gene", "missing"), watch=(a,))


@case("setup_anndata", "NaN cell type", issue=True)
def nan_cell_type(env):
    a = env.data()
    a.obs["cell_line"] = a.obs["cell_line"].astype(object)
    a.obs.iloc[3, a.obs.columns.get_loc("cell_line")] = np.nan
    return Trial(_setup(a), ("cell_line", "cell_type_key"), watch=(a,))


@case("setup_anndata", "NaN batch", issue=True)
def nan_batch(env):
    a = env.data(n_batches=2)
    a.obs["gem_group"] = a.obs["gem_group"].astype(object)
    a.obs.iloc[3, a.obs.columns.get_loc("gem_group")] = np.nan
    return Trial(_setup(a, batch_key="gem_group"), ("gem_group", "batch_key"), watch=(a,))


@case("setup_anndata", "NaN in X")
def nan_x(env):
    a = env.data()
    a.X[3, 2] = np.nan
    return Trial(_setup(a), ("nan",), watch=(a,))


@case("setup_anndata", "inf in X")
def inf_x(env):
    a = env.data()
    a.X[3, 2] = np.inf
    return Trial(_setup(a), ("infinite",), watch=(a,))


@case("setup_anndata", "negative values in X (z-scored)")
def negative_x(env):
    a = env.data()
    a.X[3, 2] = -1.0
    return Trial(_setup(a), ("negative",), watch=(a,))


@case("setup_anndata", "one value of 1e30 in X", issue=True)
def huge_value(env):
    a = env.data()
    a.X[3, 2] = 1e30
    return Trial(_setup(a), ("1e+30", "values up to"), watch=(a,))


@case("setup_anndata", "raw integer counts in X", issue=True)
def raw_counts(env):
    a = env.data()
    a.X = np.round(np.expm1(a.X) * 3).astype(np.float32)
    return Trial(_setup(a), check=_registered(a), watch=(a,), warns="raw counts")


@case("setup_anndata", "raw integer counts in an int layer")
def raw_counts_int_layer(env):
    a = env.data()
    a.layers["counts"] = np.round(np.expm1(a.X) * 3).astype(np.int64)
    return Trial(_setup(a, layer="counts"), check=_registered(a), watch=(a,), warns="raw counts")


@case("setup_anndata", "X is None and no layer given")
def x_none(env):
    a = env.data()
    a.layers["norm"] = a.X.copy()
    a.X = None
    return Trial(_setup(a), ("X", "layer"), watch=(a,))


@case("setup_anndata", "sparse CSR X with a NaN")
def sparse_nan(env):
    a = env.data()
    X = sp.csr_matrix(a.X)
    X.data[5] = np.nan
    a.X = X
    return Trial(_setup(a), ("nan",), watch=(a,))


@case("setup_anndata", "sparse CSC X")
def sparse_csc(env):
    a = env.data()
    a.X = sp.csc_matrix(a.X)
    return Trial(_setup(a), check=_registered(a, n_perturbations=6), watch=(a,))


@case("setup_anndata", "a cell type without control cells")
def no_controls_for_cell_type(env):
    a = env.data()
    keep = ~((a.obs["cell_line"] == "cell_line_1") & (a.obs["gene"] == "non-targeting")).to_numpy()
    a = a[keep].copy()
    return Trial(_setup(a), ("cell_line_1",), watch=(a,))


def _relabel(a, mapping: dict[str, str], rows: int = 4):
    gene = a.obs["gene"].astype(str).to_numpy().astype(object)
    for old, new in mapping.items():
        idx = np.flatnonzero(gene == old)[:rows]
        gene[idx] = new
    a.obs["gene"] = pd.Categorical(gene)
    return a


@case("setup_anndata", "' GENE0011' and 'gene0011' next to 'GENE0011'", issue=True)
def label_whitespace_case(env):
    a = env.data()
    gene = a.obs["gene"].astype(str).to_numpy().astype(object)
    idx = np.flatnonzero(gene == "GENE0011")
    gene[idx[:3]] = " GENE0011"
    gene[idx[3:6]] = "gene0011"
    a.obs["gene"] = pd.Categorical(gene)
    return Trial(_setup(a), check=_registered(a, n_perturbations=6), watch=(a,))


@case("setup_anndata", "'B+A' next to 'A+B'", issue=True)
def label_combination_order(env):
    a = env.data()
    gene = a.obs["gene"].astype(str).to_numpy().astype(object)
    idx = np.flatnonzero(gene == "GENE0011")
    gene[idx[:6]] = "GENE0011+GENE0013"
    gene[idx[6:12]] = "GENE0013+GENE0011"
    a.obs["gene"] = pd.Categorical(gene)
    return Trial(_setup(a), check=_registered(a, n_perturbations=7), watch=(a,))


@case("setup_anndata", "a combination with the control label ('A+non-targeting')")
def label_with_control_member(env):
    a = env.data()
    a = _relabel(a, {"GENE0011": "GENE0011+non-targeting"})
    return Trial(_setup(a), check=_registered(a, n_perturbations=6), watch=(a,))


@case("setup_anndata", "control label with spaces and another case")
def control_label_variants(env):
    a = env.data()
    gene = a.obs["gene"].astype(str).to_numpy().astype(object)
    idx = np.flatnonzero(gene == "non-targeting")
    gene[idx[:3]] = " non-targeting "
    gene[idx[3:6]] = "Non-Targeting"
    a.obs["gene"] = pd.Categorical(gene)
    return Trial(_setup(a), check=_registered(a, n_perturbations=6, controls=60), watch=(a,))


@case("setup_anndata", "an empty-string perturbation label")
def empty_label(env):
    a = env.data()
    a = _relabel(a, {"GENE0011": "  "})
    return Trial(_setup(a), ("gene", "empty"), watch=(a,))


@case("setup_anndata", "perturbation_key is a list")
def perturbation_key_list(env):
    a = env.data()
    return Trial(_setup(a, perturbation_key=["gene"]), ("perturbation_key",), watch=(a,))


@case("setup_anndata", "adata is a DataFrame")
def adata_dataframe(env):
    a = env.data()
    frame = a.to_df()
    return Trial(_setup(frame), ("adata", "AnnData"), watch=(frame,))


@case("setup_anndata", "adata is None")
def adata_none(env):
    return Trial(_setup(None), ("adata", "AnnData"))


@case("setup_anndata", "float16 X")
def float16(env):
    a = env.data()
    a.X = a.X.astype(np.float16)
    return Trial(_setup(a), check=_registered(a), watch=(a,))


@case("setup_anndata", "float64 X")
def float64(env):
    a = env.data()
    a.X = a.X.astype(np.float64)
    return Trial(_setup(a), check=_registered(a), watch=(a,))


@case("setup_anndata", "perturbation_key is also cell_type_key")
def same_key_twice(env):
    a = env.data()
    return Trial(
        _setup(a, cell_type_key="gene"), ("cell_type_key", "perturbation_key"), watch=(a,)
    )


@case("setup_anndata", "batch_key equal to cell_type_key")
def batch_is_cell_type(env):
    a = env.data()
    return Trial(_setup(a, batch_key="cell_line"), check=_registered(a), watch=(a,))


@case("setup_anndata", "categorical labels with unused categories")
def unused_categories(env):
    a = env.data()
    a.obs["gene"] = a.obs["gene"].cat.add_categories(["UNUSED1"])
    return Trial(_setup(a), check=_registered(a, n_perturbations=6), watch=(a,))


@case("setup_anndata", "set up twice")
def setup_twice(env):
    a = env.data()
    from ptrag_sc import PTRAG

    PTRAG.setup_anndata(a)
    return Trial(_setup(a), check=_registered(a, n_perturbations=6), watch=(a,))


@case("setup_anndata", "a layer with negative values")
def negative_layer(env):
    a = env.data()
    a.layers["scaled"] = a.X - a.X.mean(0)
    return Trial(_setup(a, layer="scaled"), ("negative", "scaled"), watch=(a,))


@case("setup_anndata", "all-zero expression")
def all_zero(env):
    a = env.data()
    a.X = np.zeros_like(a.X)
    return Trial(_setup(a), ("zero", "expression"), check=_registered(a), watch=(a,))


@case("setup_anndata", "duplicated obs_names")
def duplicate_obs_names(env):
    a = env.data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a.obs_names = ["cell"] * a.n_obs
    return Trial(_setup(a), ("obs_names",), check=_registered(a), watch=(a,))


@case("setup_anndata", "integer-coded cell types")
def int_cell_types(env):
    a = env.data()
    a.obs["cell_line"] = a.obs["cell_line"].cat.codes.astype(int)
    return Trial(_setup(a), check=_registered(a), watch=(a,))


@case("setup_anndata", "perturbed cells only in one line, controls everywhere")
def controls_only_line(env):
    a = env.data(n_cell_types=3)
    keep = ~((a.obs["cell_line"] == "cell_line_2") & (a.obs["gene"] != "non-targeting")).to_numpy()
    a = a[keep].copy()
    return Trial(_setup(a), check=_registered(a), watch=(a,))


@case("setup_anndata", "backed AnnData (h5ad opened read-only)")
def backed(env):
    import anndata as ad

    a = env.data()
    path = env.path("backed.h5ad")
    a.write_h5ad(path)
    b = ad.read_h5ad(path, backed="r")
    return Trial(_setup(b), ("backed",), check=_registered(b))


@case("setup_anndata", "cell type labels with surrounding spaces in another run")
def unicode_cell_types(env):
    a = env.data()
    a.obs["cell_line"] = (
        a.obs["cell_line"]
        .astype(str)
        .map({"cell_line_0": "Zelllinie_Ä", "cell_line_1": "細胞株"})
        .astype("category")
    )
    return Trial(_setup(a), check=_registered(a), watch=(a,))


# ------------------------------------------------------------------------- PTRAG(...)
def _build(env, a=None, emb=None, **kwargs):
    from ptrag_sc import PTRAG

    if a is None:
        a = env.data()
        PTRAG.setup_anndata(a)
    emb = env.emb(a) if emb is None else emb
    return (lambda: PTRAG(a, perturbation_embeddings=emb, **{**TINY, **kwargs})), a


def _option_case(name: str, value, tokens=None, *, issue=False):
    def build(env):
        call, a = _build(env, **{name: value})
        return Trial(call, tokens or (name,), watch=(a,))

    build.__name__ = (
        f"{name}_{str(value).replace('.', 'p').replace('-', 'minus').replace(' ', '')}"
    )
    case("PTRAG", f"{name}={value!r}", issue=issue)(build)


for _name, _value, _issue in [
    ("n_hidden", 0, True),
    ("n_layers", 0, True),
    ("n_heads", 0, True),
    ("decoder_rank", 0, True),
    ("n_set_tokens", 0, True),
    ("n_candidates", 2.5, True),
    ("n_candidates", 0, False),
    ("cell_set_size", 1, False),
    ("sparsity_weight", float("nan"), True),
    ("sparsity_weight", -1.0, False),
    ("gumbel_tau", 0.0, True),
    ("gumbel_tau", -1.0, True),
    ("gumbel_tau", float("inf"), False),
    ("dropout", 1.0, False),
    ("dropout", -0.1, False),
    ("pseudobulk_weight", float("nan"), False),
    ("retrieval", "rag", False),
    ("memory", "cells", False),
    ("context_mode", "concat", False),
    ("loss", "mse", False),
    ("backbone", "huge", False),
    ("index_backend", "annoy", False),
    ("gene_annotations", "kegg", False),
    ("evidence", "linear_embedding", False),
    ("evidence", ("foo",), False),
    ("match_batch", "yes", False),
    ("learned_shift", 1, False),
    ("n_hidden", True, False),
    ("n_scorer_hidden", 0, False),
    ("n_hidden", "16", False),
]:
    _option_case(_name, _value, issue=_issue)


@case("PTRAG", "n_hidden not divisible by n_heads")
def heads_not_dividing(env):
    call, a = _build(env, n_hidden=30, n_heads=4)
    return Trial(call, ("n_hidden", "n_heads"), watch=(a,))


@case("PTRAG", "n_hidden=16.0 (an integral float)")
def integral_float(env):
    call, a = _build(env, n_hidden=16.0)
    return Trial(call, check=lambda m: (m.module is not None, ""), watch=(a,))


@case("PTRAG", "embeddings as a numpy array")
def embeddings_array(env):
    a = env.data()
    call, a = _build(env, emb=env.emb(a).to_numpy())
    return Trial(call, ("perturbation_embeddings", "DataFrame"), watch=(a,))


@case("PTRAG", "embeddings lack two perturbations")
def embeddings_missing(env):
    a = env.data()
    emb = env.emb(a).drop(index=["GENE0011", "GENE0013"])
    call, a = _build(env, emb=emb)
    return Trial(call, ("GENE0011",), watch=(a, emb))


@case("PTRAG", "embeddings with a NaN")
def embeddings_nan(env):
    a = env.data()
    emb = env.emb(a).copy()
    emb.iloc[0, 0] = np.nan
    call, a = _build(env, emb=emb)
    return Trial(call, ("nan",), watch=(a, emb))


@case("PTRAG", "embeddings with symbols duplicated up to case")
def embeddings_duplicated(env):
    a = env.data()
    emb = env.emb(a)
    emb = pd.concat([emb, emb.iloc[:1].rename(index=str.lower)])
    call, a = _build(env, emb=emb)
    return Trial(call, ("duplicated",), watch=(a, emb))


@case("PTRAG", "embeddings with an all-zero row")
def embeddings_zero_row(env):
    a = env.data()
    emb = env.emb(a).copy()
    emb.iloc[0] = 0.0
    call, a = _build(env, emb=emb)
    return Trial(call, ("zero",), watch=(a, emb))


@case("PTRAG", "embeddings with a text column")
def embeddings_text(env):
    a = env.data()
    emb = env.emb(a).copy()
    emb[emb.columns[0]] = "x"
    call, a = _build(env, emb=emb)
    return Trial(call, ("numbers", "numeric"), watch=(a, emb))


@case("PTRAG", "embeddings with an empty table")
def embeddings_empty(env):
    a = env.data()
    emb = env.emb(a).iloc[:0]
    call, a = _build(env, emb=emb)
    return Trial(call, ("perturbation_embeddings",), watch=(a,))


@case("PTRAG", "embeddings with lower-case symbols")
def embeddings_lower(env):
    a = env.data()
    emb = env.emb(a).rename(index=str.lower)
    call, a = _build(env, emb=emb)
    return Trial(
        call, check=lambda m: (m.perturbation_embeddings.shape[0] == 6, ""), watch=(a, emb)
    )


@case("PTRAG", "embeddings whose values reach 1e30")
def embeddings_huge(env):
    a = env.data()
    emb = env.emb(a) * 1e30

    def call():
        import scvi

        from ptrag_sc import PTRAG

        scvi.settings.seed = 0
        PTRAG.setup_anndata(a)
        m = PTRAG(a, perturbation_embeddings=emb, **TINY)
        m.train(max_steps=STEPS)
        return m.predict(a, inplace=False)

    return Trial(call, ("perturbation_embeddings", "1e+30"), check=prediction_ok(a), watch=(a,))


@case("PTRAG", "AnnData never set up")
def not_registered(env):
    from ptrag_sc import PTRAG

    a = env.data()
    return Trial(
        lambda: PTRAG(a, perturbation_embeddings=env.emb(a), **TINY),
        ("setup_anndata",),
        watch=(a,),
    )


@case("PTRAG", "neither adata nor registry")
def no_adata(env):
    from ptrag_sc import PTRAG

    a = env.data()
    return Trial(lambda: PTRAG(None, perturbation_embeddings=env.emb(a), **TINY), ("adata",))


@case("PTRAG", "perturbation_embeddings not given")
def no_embeddings(env):
    from ptrag_sc import PTRAG

    a = env.data()
    PTRAG.setup_anndata(a)
    return Trial(lambda: PTRAG(a, **TINY), ("perturbation_embeddings",), watch=(a,))


@case("PTRAG", "unicode perturbation labels with vectors")
def unicode_labels(env):
    a = env.data()
    mapping = {"GENE0011": "ΔGENE-α", "GENE0013": "基因13"}
    a.obs["gene"] = a.obs["gene"].astype(str).replace(mapping).astype("category")
    emb = env.emb(a).rename(index=mapping)

    def call():
        import scvi

        from ptrag_sc import PTRAG

        scvi.settings.seed = 0
        PTRAG.setup_anndata(a)
        m = PTRAG(a, perturbation_embeddings=emb, **TINY)
        m.train(max_steps=STEPS)
        return m.predict(a, inplace=False)

    return Trial(call, check=prediction_ok(a), watch=(a, emb))


# ------------------------------------------------------------------------------ train
def _train(env, *, train=None, setup=None, data=None, **kwargs):
    a = env.data() if data is None else data
    model = env.model(a, setup, **kwargs)
    return model, a, (lambda: model.train(**(train or {})))


def _train_case(name: str, description: str, train: dict, tokens: tuple[str, ...], *, issue=False):
    def build(env):
        model, a, call = _train(env, train=train)
        return Trial(call, tokens, watch=(a,), after=untrained(model))

    build.__name__ = name
    case("train", description, issue=issue)(build)


for _name, _desc, _kwargs, _tokens, _issue in [
    ("max_steps_0", "max_steps=0", {"max_steps": 0}, ("max_steps",), True),
    ("max_steps_negative", "max_steps=-1", {"max_steps": -1}, ("max_steps",), True),
    ("max_epochs_0", "max_epochs=0", {"max_epochs": 0}, ("max_epochs",), True),
    ("max_steps_fraction", "max_steps=1.5", {"max_steps": 1.5}, ("max_steps",), False),
    ("max_steps_bool", "max_steps=True", {"max_steps": True}, ("max_steps",), False),
    ("max_epochs_fraction", "max_epochs=0.5", {"max_epochs": 0.5}, ("max_epochs",), False),
    ("batch_size_0", "batch_size=0", {"max_steps": 5, "batch_size": 0}, ("batch_size",), True),
    (
        "batch_size_negative",
        "batch_size=-1",
        {"max_steps": 5, "batch_size": -1},
        ("batch_size",),
        False,
    ),
    (
        "batch_size_fraction",
        "batch_size=1.5",
        {"max_steps": 5, "batch_size": 1.5},
        ("batch_size",),
        False,
    ),
    (
        "nan_loss",
        "plan_kwargs={'lr': 1e6}: the loss becomes NaN",
        {"max_steps": 60, "plan_kwargs": {"lr": 1e6}},
        ("lr",),
        True,
    ),
    (
        "plan_typo",
        "plan_kwargs typo 'learning_rate'",
        {"max_steps": 5, "plan_kwargs": {"learning_rate": 1e-3}},
        ("learning_rate",),
        True,
    ),
    (
        "plan_not_dict",
        "plan_kwargs is a list",
        {"max_steps": 5, "plan_kwargs": [("lr", 1e-3)]},
        ("plan_kwargs",),
        False,
    ),
    ("lr_zero", "plan_kwargs lr=0", {"max_steps": 5, "plan_kwargs": {"lr": 0}}, ("lr",), False),
    (
        "lr_nan",
        "plan_kwargs lr=nan",
        {"max_steps": 5, "plan_kwargs": {"lr": float("nan")}},
        ("lr",),
        False,
    ),
    (
        "weight_decay_negative",
        "plan_kwargs weight_decay=-1",
        {"max_steps": 5, "plan_kwargs": {"weight_decay": -1.0}},
        ("weight_decay",),
        False,
    ),
    (
        "early_stopping_no_val",
        "early_stopping=True without validation",
        {"max_steps": 5, "validation_size": 0, "early_stopping": True},
        ("early_stopping",),
        True,
    ),
    (
        "validation_size_big",
        "validation_size=1.5",
        {"max_steps": 5, "validation_size": 1.5},
        ("validation_size",),
        False,
    ),
    (
        "validation_size_nan",
        "validation_size=nan",
        {"max_steps": 5, "validation_size": float("nan")},
        ("validation_size",),
        False,
    ),
    (
        "split_key_missing",
        "split_key names a missing column",
        {"max_steps": 5, "split_key": "split"},
        ("split_key",),
        False,
    ),
    (
        "check_val_0",
        "check_val_every_n_steps=0",
        {"max_steps": 5, "check_val_every_n_steps": 0},
        ("check_val_every_n_steps",),
        False,
    ),
    (
        "patience_0",
        "early_stopping_patience=0",
        {"max_steps": 5, "early_stopping_patience": 0},
        ("early_stopping_patience",),
        False,
    ),
    (
        "trainer_typo",
        "trainer kwarg typo max_epoch=3",
        {"max_steps": 5, "max_epoch": 3},
        ("max_epoch",),
        False,
    ),
    (
        "accelerator_bad",
        "accelerator='tpu' (not available)",
        {"max_steps": 5, "accelerator": "tpu"},
        ("accelerator", "tpu"),
        False,
    ),
    (
        "accelerator_typo",
        "accelerator='cpuu'",
        {"max_steps": 5, "accelerator": "cpuu"},
        ("accelerator", "cpuu"),
        False,
    ),
    ("devices_zero", "devices=0", {"max_steps": 5, "devices": 0}, ("devices",), False),
    (
        "callbacks_not_list",
        "callbacks= a single callback, not a list",
        {"max_steps": 5, "callbacks": "x"},
        ("callbacks",),
        False,
    ),
    (
        "gradient_clip_negative",
        "gradient_clip_val=-1",
        {"max_steps": 5, "gradient_clip_val": -1.0},
        ("gradient_clip_val",),
        False,
    ),
]:
    _train_case(_name, _desc, _kwargs, _tokens, issue=_issue)


def _split(a, values: dict[str, str] | None = None, default="train"):
    split = np.full(a.n_obs, default, dtype=object)
    gene = a.obs["gene"].astype(str).to_numpy()
    for g, v in (values or {}).items():
        split[gene == g] = v
    a.obs["split"] = split
    return a


@case("train", "split_key with an unknown value")
def split_bad_values(env):
    a = _split(env.data(), {"GENE0011": "holdout"})
    model, a, call = _train(env, data=a, train={"max_steps": 5, "split_key": "split"})
    return Trial(call, ("holdout", "split"), watch=(a,), after=untrained(model))


@case("train", "split_key with a NaN")
def split_nan(env):
    a = _split(env.data())
    a.obs.iloc[0, a.obs.columns.get_loc("split")] = np.nan
    model, a, call = _train(env, data=a, train={"max_steps": 5, "split_key": "split"})
    return Trial(call, ("split",), watch=(a,), after=untrained(model))


@case("train", "split_key puts every perturbed cell in 'test'")
def split_only_test(env):
    a = env.data()
    a.obs["split"] = np.where(a.obs["gene"] == "non-targeting", "train", "test")
    model, a, call = _train(env, data=a, train={"max_steps": 5, "split_key": "split"})
    return Trial(
        call, ("training split", "split", "no perturbed"), watch=(a,), after=untrained(model)
    )


@case("train", "cell_set_size larger than every group (10,000)", issue=True)
def huge_cell_set(env):
    model, a, call = _train(env, train={"max_steps": 2}, cell_set_size=10_000)
    return Trial(call, ("cell_set_size",), watch=(a,), after=untrained(model))


@case("train", "every group a single cell")
def single_cell_groups(env):
    a = env.data()
    gene = a.obs["gene"].astype(str).to_numpy()
    first = (
        ~pd.Series(list(zip(gene, a.obs["cell_line"].astype(str), strict=True)))
        .duplicated()
        .to_numpy()
    )
    a = a[(gene == "non-targeting") | first].copy()
    model, a, call = _train(env, data=a, train={"max_steps": 5})
    return Trial(call, ("single cell", "group", "cells"), watch=(a,), after=untrained(model))


@case("train", "NaN written into X after setup")
def nan_after_setup(env):
    model, a, call = _train(env, train={"max_steps": 5})
    a.X[5, 3] = np.nan
    return Trial(call, ("nan",), watch=(a,), after=untrained(model))


@case("train", "perturbation column dropped after setup")
def column_dropped_after_setup(env):
    model, a, call = _train(env, train={"max_steps": 5})
    del a.obs["gene"]
    return Trial(call, ("gene", "perturbation_key"), watch=(a,), after=untrained(model))


@case("train", "a model loaded without an AnnData")
def train_without_adata(env):
    from ptrag_sc import PTRAG

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PTRAG.load(env.saved, adata=False)
    return Trial(lambda: model.train(max_steps=3), ("adata",))


@case("train", "a second train() runs in train mode (dropout, Gumbel sampling)", issue=True)
def second_train_mode(env):
    from lightning.pytorch.callbacks import Callback

    seen = []

    class Spy(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(pl_module.module.training)

    model, a, _ = _train(env)

    def call():
        model.train(max_steps=4, callbacks=[Spy()])
        model.train(max_steps=4, callbacks=[Spy()])
        return seen

    return Trial(
        call,
        check=lambda s: (len(s) > 0 and all(s), f"module.training during steps: {s}"),
        watch=(a,),
    )


class _Boom(RuntimeError):
    pass


def _raising_callback(exc: BaseException, at: int = 3):
    from lightning.pytorch.callbacks import Callback

    class Raiser(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step >= at:
                raise exc

    return Raiser()


@case(
    "train",
    "an exception from a callback mid-training leaves the trained model as it was",
    issue=True,
)
def exception_mid_training(env):
    model, a = env.fit()
    before = trained_state(model)
    cb = _raising_callback(_Boom("boom: raised by a test callback"))
    return Trial(
        lambda: model.train(max_steps=20, callbacks=[cb]),
        ("boom",),
        watch=(a,),
        after=lambda: same_state(model, before),
    )


@case("train", "Ctrl+C (KeyboardInterrupt) mid-training leaves the model as it was", issue=True)
def keyboard_interrupt(env):
    model, a = env.fit()
    before = trained_state(model)
    cb = _raising_callback(KeyboardInterrupt())
    handler = signal.getsignal(signal.SIGINT)

    def call():
        try:
            model.train(max_steps=20, callbacks=[cb])
        except KeyboardInterrupt:
            return "KeyboardInterrupt"
        return "no exception"

    def check(result):
        if result != "KeyboardInterrupt":
            return False, f"train() returned with {result}"
        if signal.getsignal(signal.SIGINT) != handler:
            return False, "SIGINT handler changed (Ctrl+C ignored afterwards)"
        return same_state(model, before)

    return Trial(call, ("keyboardinterrupt",), check=check, watch=(a,))


@case("train", "an exception during the first train() leaves the model untrained")
def exception_first_training(env):
    model, a, _ = _train(env)
    weights = {k: v.clone() for k, v in model.module.state_dict().items()}
    cb = _raising_callback(_Boom("boom: raised by a test callback"))

    def after():
        import torch

        if model.is_trained_:
            return False, "marked trained"
        if model.memory_ is not None:
            return False, "memory installed"
        if any(not torch.equal(v, model.module.state_dict()[k]) for k, v in weights.items()):
            return False, "weights changed"
        return True, ""

    return Trial(
        lambda: model.train(max_steps=20, callbacks=[cb]), ("boom",), watch=(a,), after=after
    )


def _fit_predict(env, a=None, *, setup=None, train=None, **kwargs):
    a = env.data() if a is None else a

    def call():
        model, _ = env.fit(a, setup=setup, train=train, **kwargs)
        return model.predict(a, inplace=False)

    return call, a


for _name, _desc, _kwargs in [
    ("n_candidates_large", "n_candidates=64, more than the memory holds", {"n_candidates": 64}),
    ("retrieval_none", "retrieval='none'", {"retrieval": "none"}),
    (
        "vanilla_embedding_memory",
        "retrieval='vanilla', memory='embedding'",
        {"retrieval": "vanilla", "memory": "embedding"},
    ),
    (
        "full_backbone_replace",
        "backbone='full', context_mode='replace'",
        {"backbone": "full", "context_mode": "replace"},
    ),
    ("sinkhorn", "loss='sinkhorn'", {"loss": "sinkhorn"}),
    ("go_annotations", "gene_annotations='go' on synthetic symbols", {"gene_annotations": "go"}),
    ("no_evidence", "evidence=()", {"evidence": ()}),
    ("learned_shift", "learned_shift=True", {"learned_shift": True}),
    ("dropout_half", "dropout=0.5", {"dropout": 0.5}),
]:

    def _make(kwargs=_kwargs):
        def build(env):
            call, a = _fit_predict(env, **kwargs)
            return Trial(call, check=prediction_ok(a), watch=(a,))

        return build

    _b = _make()
    _b.__name__ = _name
    case("train", _desc + ": trains and predicts in range")(_b)


@case("train", "one perturbation per cell type (nothing to hold out)")
def one_group_per_cell_type(env):
    a = env.data()
    gene = a.obs["gene"].astype(str).to_numpy()
    a = a[np.isin(gene, ["non-targeting", "GENE0011"])].copy()
    call, a = _fit_predict(env, a)
    return Trial(call, check=prediction_ok(a), watch=(a,))


@case("train", "one cell type, setup without cell_type_key")
def no_cell_type_key(env):
    a = env.data(n_cell_types=1)
    call, a = _fit_predict(env, a, setup={"cell_type_key": None})
    return Trial(call, check=prediction_ok(a), watch=(a,))


@case("train", "all-zero expression")
def train_all_zero(env):
    a = env.data()
    a.X = np.zeros_like(a.X)
    call, a = _fit_predict(env, a)
    return Trial(call, ("zero", "constant", "expression"), check=prediction_ok(a), watch=(a,))


@case("train", "validation_size=0: trains for max_steps")
def validation_size_zero(env):
    call, a = _fit_predict(env, train={"validation_size": 0})
    return Trial(call, check=prediction_ok(a), watch=(a,))


@case("train", "a split whose 'val' perturbation has no embedding")
def val_without_embedding(env):
    a = _split(env.data(), {"GENE0011": "val"})
    emb = env.emb(a).drop(index=["GENE0011"])
    from ptrag_sc import PTRAG

    PTRAG.setup_anndata(a)
    # The constructor checks every registered perturbation: give it the full table, then train
    # on a model whose vocabulary lacks the validation gene.
    model = PTRAG(a, perturbation_embeddings=env.emb(a), **TINY)
    model.state = model.state.replace(encoder=type(model.state.encoder)(emb, sep="+"))
    return Trial(
        lambda: model.train(max_steps=5, split_key="split"),
        ("GENE0011",),
        watch=(a,),
        after=untrained(model),
    )


@case("train", "same seed twice in one process gives identical predictions")
def same_seed_twice(env):
    a = env.data()

    def call():
        import scvi

        out = []
        for _ in range(2):
            b = a.copy()
            scvi.settings.seed = 0
            model = env.model(b)
            model.train(max_steps=STEPS)
            out.append(model.predict(b, inplace=False))
        return out

    return Trial(
        call, check=lambda o: (np.array_equal(o[0], o[1]), "predictions differ"), watch=(a,)
    )


@case("train", "no seed set (scvi.settings.seed=None)")
def no_seed(env):
    a = env.data()

    def call():
        import scvi

        scvi.settings.seed = None
        try:
            model = env.model(a)
            model.train(max_steps=STEPS)
        finally:
            scvi.settings.seed = 0
        return model.predict(a, inplace=False)

    return Trial(call, check=prediction_ok(a), watch=(a,))


# ----------------------------------------------------------------------------- predict
def _predict_case(name, description, kwargs, tokens, *, issue=False, data=None):
    def build(env):
        model, adata, _ = env.trained
        a = adata.copy() if data is None else data(env)
        return Trial(lambda: model.predict(a, **kwargs), tokens, watch=(a,))

    build.__name__ = name
    case("predict", description, issue=issue)(build)


for _name, _desc, _kwargs, _tokens, _issue in [
    ("batch_size_negative", "batch_size=-1", {"batch_size": -1}, ("batch_size",), True),
    ("batch_size_zero", "batch_size=0", {"batch_size": 0}, ("batch_size",), False),
    ("batch_size_fraction", "batch_size=2.5", {"batch_size": 2.5}, ("batch_size",), False),
    ("batch_size_string", "batch_size='8'", {"batch_size": "8"}, ("batch_size",), False),
    ("key_added_empty", "key_added=''", {"key_added": ""}, ("key_added",), False),
    ("key_added_int", "key_added=5", {"key_added": 5}, ("key_added",), False),
    ("indices_empty", "indices=[]", {"indices": []}, ("indices",), True),
    (
        "indices_mask",
        "indices as a boolean mask",
        {"indices": np.ones(204, dtype=bool)},
        ("indices",),
        False,
    ),
    (
        "indices_out_of_range",
        "indices out of range",
        {"indices": [0, 10_000]},
        ("indices",),
        False,
    ),
    ("indices_float", "indices as floats", {"indices": [0.0, 1.0]}, ("indices",), False),
    (
        "cell_type_counterfactual",
        "cell_type= in counterfactual mode",
        {"cell_type": "cell_line_0"},
        ("cell_type",),
        False,
    ),
    ("seed_negative", "seed=-1", {"seed": -1, "sample_retrieval": True}, ("seed",), False),
    ("seed_string", "seed='a'", {"seed": "a"}, ("seed",), False),
    (
        "perturbations_duplicated",
        "perturbations=['GENE0011', 'GENE0011']",
        {"perturbations": ["GENE0011", "GENE0011"]},
        ("perturbations", "GENE0011"),
        True,
    ),
    (
        "perturbations_duplicated_normalised",
        "perturbations=['GENE0011', ' gene0011']",
        {"perturbations": ["GENE0011", " gene0011"]},
        ("perturbations", "GENE0011"),
        True,
    ),
    ("perturbations_empty", "perturbations=[]", {"perturbations": []}, ("perturbations",), False),
    (
        "perturbations_control",
        "perturbations holds the control label",
        {"perturbations": ["non-targeting"]},
        ("perturbations", "non-targeting"),
        False,
    ),
    (
        "perturbations_unknown",
        "perturbations holds a gene without a vector",
        {"perturbations": ["NOTAGENE"]},
        ("NOTAGENE",),
        False,
    ),
    (
        "perturbations_nan",
        "perturbations holds NaN",
        {"perturbations": [float("nan")]},
        ("nan", "perturbations"),
        False,
    ),
    (
        "perturbations_with_indices",
        "perturbations and indices together",
        {"perturbations": ["GENE0011"], "indices": [0]},
        ("indices",),
        False,
    ),
    (
        "generation_unknown_cell_type",
        "generation with a cell_type that is absent",
        {"perturbations": ["GENE0011"], "cell_type": "liver"},
        ("cell_type", "liver"),
        False,
    ),
    ("inplace_string", "inplace='no'", {"inplace": "no"}, ("inplace",), False),
]:
    _predict_case(_name, _desc, _kwargs, _tokens, issue=_issue)


@case("predict", "key_added names an existing layer", issue=True)
def key_added_existing(env):
    model, adata, _ = env.trained
    a = adata.copy()
    a.layers["mine"] = a.X * 2
    return Trial(
        lambda: model.predict(a, key_added="mine"), ("key_added", "mine", "overwrite"), watch=(a,)
    )


@case("predict", "key_added names an existing layer, overwrite=True")
def key_added_overwrite(env):
    model, adata, ref = env.trained
    a = adata.copy()
    a.layers["mine"] = a.X * 2
    return Trial(
        lambda: model.predict(a, key_added="mine", overwrite=True),
        check=layer_ok(a, "mine", reference=ref),
        watch=(a,),
        allow_layers=("mine",),
    )


@case("predict", "key_added is the layer the model reads, even with overwrite=True", issue=True)
def key_added_input_layer(env):
    a = env.data()
    a.layers["norm"] = a.X.copy()
    model, _ = env.fit(a, setup={"layer": "norm"})
    return Trial(
        lambda: model.predict(a, key_added="norm", overwrite=True),
        ("key_added", "norm"),
        watch=(a,),
    )


@case("predict", "indices with a duplicate")
def indices_duplicate(env):
    model, adata, _ref = env.trained
    a = adata.copy()
    rows = np.flatnonzero(a.obs["gene"] != "non-targeting")[:5]
    idx = np.concatenate([rows, rows[:2]])

    single = model.predict(a, indices=rows, inplace=False)

    def check(pred):
        return (np.array_equal(pred, single), "differs from the prediction with each index once")

    return Trial(
        lambda: model.predict(a, indices=idx, inplace=False), ("indices",), check=check, watch=(a,)
    )


@case("predict", "genes in reverse order", issue=True)
def genes_reversed(env):
    model, adata, ref = env.trained
    a = adata[:, adata.var_names[::-1]].copy()
    order = adata.var_names.get_indexer(a.var_names)
    return Trial(
        lambda: model.predict(a, inplace=False),
        ("order", "var_names"),
        check=prediction_ok(a, reference=ref, columns=order),
        watch=(a,),
    )


@case("predict", "a gene missing")
def gene_missing(env):
    model, adata, _ = env.trained
    a = adata[:, 1:].copy()
    return Trial(lambda: model.predict(a), ("GENE0001",), watch=(a,))


@case("predict", "extra genes")
def genes_extra(env):
    import anndata as ad

    model, adata, ref = env.trained
    extra = ad.AnnData(
        np.ones((adata.n_obs, 2), dtype=np.float32),
        obs=adata.obs,
        var=pd.DataFrame(index=["EXTRA1", "EXTRA2"]),
    )
    a = ad.concat([adata, extra], axis=1, merge="first")
    a.obs = adata.obs.copy()

    def check(pred):
        return (
            prediction_ok(a)(pred)
            if False
            else (
                np.allclose(pred[:, :20], ref, atol=1e-5) and np.allclose(pred[:, 20:], 1.0),
                "differs from the reference",
            )
        )

    return Trial(
        lambda: model.predict(a, inplace=False), ("EXTRA1", "genes"), check=check, watch=(a,)
    )


@case("predict", "an AnnData view (inplace)")
def predict_view(env):
    model, adata, _ref = env.trained
    parent = adata.copy()
    v = parent[:150]

    def call():
        model.predict(v)
        return v

    def check(result):
        if "ptrag" not in result.layers:
            return False, "no layer written"
        return prediction_ok(parent[:150].copy(), ceiling_from=adata)(
            np.asarray(result.layers["ptrag"])
        )

    return Trial(call, ("view",), check=check, watch=(parent,))


@case("predict", "an AnnData view, inplace=False")
def predict_view_not_inplace(env):
    model, adata, _ref = env.trained
    parent = adata.copy()
    v = parent[:150]
    return Trial(
        lambda: model.predict(v, inplace=False),
        ("view",),
        check=prediction_ok(parent[:150].copy(), ceiling_from=adata),
        watch=(parent,),
    )


@case("predict", "NaN in X")
def predict_nan(env):
    model, adata, _ = env.trained
    a = adata.copy()
    a.X[0, 0] = np.nan
    return Trial(lambda: model.predict(a), ("nan",), watch=(a,))


@case("predict", "one value of 1e30 in X", issue=True)
def predict_huge(env):
    model, adata, _ = env.trained
    a = adata.copy()
    a.X[0, 0] = 1e30
    return Trial(lambda: model.predict(a), ("1e+30", "values up to"), watch=(a,))


@case("predict", "a cell type never seen in training", issue=True)
def predict_new_cell_type(env):
    model, adata, _ = env.trained
    a = adata.copy()
    a.obs["cell_line"] = (
        a.obs["cell_line"].astype(str).replace({"cell_line_1": "new_line"}).astype("category")
    )
    return Trial(
        lambda: model.predict(a, inplace=False), ("new_line",), check=prediction_ok(a), watch=(a,)
    )


@case("predict", "a batch never seen in training")
def predict_new_batch(env):
    a = env.data(n_batches=2)
    model, _ = env.fit(a, setup={"batch_key": "gem_group"})
    b = a.copy()
    b.obs["gem_group"] = (
        b.obs["gem_group"].astype(str).replace({"batch2": "batch9"}).astype("category")
    )
    return Trial(
        lambda: model.predict(b, inplace=False), ("batch9",), check=prediction_ok(b), watch=(b,)
    )


@case("predict", "perturbation column missing in counterfactual mode")
def predict_no_labels(env):
    model, adata, _ = env.trained
    a = adata.copy()
    del a.obs["gene"]
    return Trial(lambda: model.predict(a), ("gene", "perturbation_key"), watch=(a,))


@case("predict", "an untrained model")
def predict_untrained(env):
    a = env.data()
    model = env.model(a)
    return Trial(lambda: model.predict(a), ("train",), watch=(a,))


@case("predict", "sample_retrieval=True twice with one seed is identical")
def sample_retrieval_repeat(env):
    model, adata, _ = env.trained
    a = adata.copy()

    def call():
        return model.predict(a, inplace=False, sample_retrieval=True, seed=3), model.predict(
            a, inplace=False, sample_retrieval=True, seed=3
        )

    return Trial(call, check=lambda r: (np.array_equal(r[0], r[1]), "differs"), watch=(a,))


@case("predict", "lower-case and spaced labels predict like the canonical ones")
def predict_label_variants(env):
    model, adata, ref = env.trained
    a = adata.copy()
    a.obs["gene"] = (
        a.obs["gene"]
        .astype(str)
        .map(lambda g: g if g == "non-targeting" else f" {g.lower()} ")
        .astype("category")
    )
    return Trial(
        lambda: model.predict(a, inplace=False), check=prediction_ok(a, reference=ref), watch=(a,)
    )


@case("predict", "a perturbation unseen in training but embeddable")
def predict_unseen_perturbation(env):
    a = env.data()
    keep = (a.obs["gene"] != "GENE0011").to_numpy()
    model, _ = env.fit(a[keep].copy())
    return Trial(lambda: model.predict(a, inplace=False), check=prediction_ok(a), watch=(a,))


@case("predict", "inplace=False writes nothing")
def predict_not_inplace(env):
    model, adata, ref = env.trained
    a = adata.copy()
    return Trial(
        lambda: model.predict(a, inplace=False), check=prediction_ok(a, reference=ref), watch=(a,)
    )


@case("predict", "raw integer counts to predict from")
def predict_raw_counts(env):
    model, adata, _ = env.trained
    a = adata.copy()
    a.X = np.round(np.expm1(a.X) * 3).astype(np.float32)
    return Trial(
        lambda: model.predict(a, inplace=False),
        ("raw counts", "integer"),
        check=lambda p: (np.isfinite(p).all(), ""),
        watch=(a,),
        warns="raw counts",
    )


@case("predict", "generation from an AnnData without control cells")
def generation_no_controls(env):
    model, adata, _ = env.trained
    a = adata[adata.obs["gene"] != "non-targeting"].copy()
    return Trial(
        lambda: model.predict(a, perturbations=["GENE0011"]),
        ("control", "non-targeting"),
        watch=(a,),
    )


@case("predict", "counterfactual with a cell type lacking controls")
def counterfactual_no_controls(env):
    model, adata, _ = env.trained
    keep = ~(
        (adata.obs["cell_line"] == "cell_line_1") & (adata.obs["gene"] == "non-targeting")
    ).to_numpy()
    a = adata[keep].copy()
    return Trial(lambda: model.predict(a), ("cell_line_1",), watch=(a,))


@case("predict", "adata is a DataFrame")
def predict_dataframe(env):
    model, adata, _ = env.trained
    frame = adata.to_df()
    return Trial(lambda: model.predict(frame), ("adata", "AnnData"), watch=(frame,))


@case("predict", "sparse X predicts like dense")
def predict_sparse(env):
    model, adata, ref = env.trained
    a = adata.copy()
    a.X = sp.csr_matrix(a.X)
    return Trial(
        lambda: model.predict(a, inplace=False),
        check=lambda p: (np.allclose(p, ref, atol=1e-5), "differs from dense"),
        watch=(a,),
    )


@case("predict", "backed AnnData predicts like in memory")
def predict_backed(env):
    import anndata as ad

    model, adata, ref = env.trained
    path = env.path("predict_backed.h5ad")
    adata.copy().write_h5ad(path)
    b = ad.read_h5ad(path, backed="r")
    return Trial(
        lambda: model.predict(b, inplace=False),
        check=lambda p: (np.allclose(p, ref, atol=1e-5), "differs from in memory"),
    )


@case("predict", "indices pointing only at control cells")
def indices_controls_only(env):
    model, adata, _ = env.trained
    a = adata.copy()
    rows = np.flatnonzero(a.obs["gene"] == "non-targeting")[:3]
    X = np.asarray(a.X)
    return Trial(
        lambda: model.predict(a, indices=rows, inplace=False),
        ("indices", "control"),
        check=lambda p: (np.allclose(p, X), "changed control cells"),
        watch=(a,),
    )


@case("predict", "generation: perturbations='GENE0011' (a string)")
def generation_string(env):
    model, adata, _ = env.trained
    a = adata.copy()
    n = int((a.obs["gene"] == "non-targeting").sum())
    return Trial(
        lambda: model.predict(a, perturbations="GENE0011"),
        check=generated_ok(n, labels=["GENE0011"], ceiling=np.asarray(a.X).max(0)),
        watch=(a,),
    )


@case("predict", "generation: 'B+A' equals 'A+B'")
def generation_combination_order(env):
    model, adata, _ = env.trained
    a = adata.copy()
    ctrl = a[a.obs["gene"] == "non-targeting"].copy()
    ab = model.predict(ctrl, perturbations=["GENE0011+GENE0013"])
    return Trial(
        lambda: model.predict(ctrl, perturbations=["GENE0013+GENE0011"]),
        check=generated_ok(ctrl.n_obs, labels=["GENE0013+GENE0011"], reference=np.asarray(ab.X)),
        watch=(a, ctrl),
    )


@case("predict", "generation without a cell-type column and without cell_type=", issue=True)
def generation_no_cell_type(env):
    model, adata, _ = env.trained
    ctrl = adata[adata.obs["gene"] == "non-targeting"].copy()
    del ctrl.obs["cell_line"]
    return Trial(
        lambda: model.predict(ctrl, perturbations=["GENE0011"]), ("cell_type",), watch=(ctrl,)
    )


@case("predict", "generation without a cell-type column, cell_type='cell_line_0'")
def generation_cell_type_given(env):
    model, adata, _ = env.trained
    ctrl = adata[
        (adata.obs["gene"] == "non-targeting") & (adata.obs["cell_line"] == "cell_line_0")
    ].copy()
    del ctrl.obs["cell_line"]
    return Trial(
        lambda: model.predict(ctrl, perturbations=["GENE0011"], cell_type="cell_line_0"),
        check=generated_ok(ctrl.n_obs, cell_type="cell_line_0"),
        watch=(ctrl,),
    )


@case("predict", "generation with batch_size=1 equals the default batch size")
def generation_batch_size_one(env):
    model, adata, _ = env.trained
    ctrl = adata[adata.obs["gene"] == "non-targeting"].copy()
    ref = np.asarray(model.predict(ctrl, perturbations=["GENE0011", "GENE0013"]).X)
    return Trial(
        lambda: model.predict(ctrl, perturbations=["GENE0011", "GENE0013"], batch_size=1),
        check=generated_ok(2 * ctrl.n_obs, reference=ref),
        watch=(ctrl,),
    )


@case("predict", "generation with an unseen cell type column value")
def generation_new_cell_type(env):
    model, adata, _ = env.trained
    ctrl = adata[adata.obs["gene"] == "non-targeting"].copy()
    ctrl.obs["cell_line"] = "new_line"
    return Trial(
        lambda: model.predict(ctrl, perturbations=["GENE0011"]),
        ("new_line",),
        check=generated_ok(ctrl.n_obs, cell_type="new_line"),
        watch=(ctrl,),
    )


@case("predict", "counterfactual output stays within each gene's training range")
def counterfactual_range(env):
    model, adata, ref = env.trained
    a = adata.copy()
    return Trial(
        lambda: model.predict(a),
        check=layer_ok(a, "ptrag", reference=ref),
        watch=(a,),
        allow_layers=("ptrag",),
    )


# ------------------------------------------------------------------------ get_retrieval
def _retrieval_ok(table) -> tuple[bool, str]:
    if len(table) == 0:
        return False, "empty table"
    p = table["keep_probability"].to_numpy(dtype=float)
    if not np.isfinite(p).all() or p.min() < 0 or p.max() > 1:
        return False, "keep probabilities outside [0, 1] or NaN"
    if not np.isfinite(table["similarity"].to_numpy(dtype=float)).all():
        return False, "NaN similarity"
    return True, ""


def _retrieval_case(name, description, args, kwargs, tokens, *, issue=False, check=None):
    def build(env):
        model, adata, _ = env.trained
        return Trial(
            lambda: model.get_retrieval(*args, **kwargs), tokens, check=check, watch=(adata,)
        )

    build.__name__ = name
    case("get_retrieval", description, issue=issue)(build)


for _name, _desc, _args, _kwargs, _tokens, _issue, _check in [
    ("n_cells_zero", "n_cells=0", (["GENE0011"],), {"n_cells": 0}, ("n_cells",), True, None),
    (
        "n_cells_negative",
        "n_cells=-5",
        (["GENE0011"],),
        {"n_cells": -5},
        ("n_cells",),
        False,
        None,
    ),
    (
        "n_cells_fraction",
        "n_cells=2.5",
        (["GENE0011"],),
        {"n_cells": 2.5},
        ("n_cells",),
        False,
        None,
    ),
    ("empty", "perturbations=[]", ([],), {}, ("perturbations",), False, None),
    (
        "duplicated",
        "duplicated perturbations",
        (["GENE0011", "gene0011"],),
        {},
        ("perturbations", "GENE0011"),
        False,
        None,
    ),
    ("unknown_gene", "a gene without a vector", (["NOTAGENE"],), {}, ("NOTAGENE",), False, None),
    (
        "unknown_cell_type",
        "cell_type='liver'",
        (["GENE0011"],),
        {"cell_type": "liver"},
        ("liver",),
        False,
        None,
    ),
    (
        "cell_type_list_unknown",
        "cell_type list with an unknown entry",
        (["GENE0011"],),
        {"cell_type": ["cell_line_0", "liver"]},
        ("liver",),
        False,
        None,
    ),
    ("seed_negative", "seed=-1", (["GENE0011"],), {"seed": -1}, ("seed",), False, None),
    ("string_query", "perturbations='GENE0011'", ("GENE0011",), {}, (), False, _retrieval_ok),
    (
        "normal",
        "two queries, all cell types",
        (["GENE0011", "GENE0013+PGENE0001"],),
        {},
        (),
        False,
        _retrieval_ok,
    ),
    (
        "n_cells_large",
        "n_cells larger than the control pool",
        (["GENE0011"],),
        {"n_cells": 10_000},
        (),
        False,
        _retrieval_ok,
    ),
    ("n_cells_one", "n_cells=1", (["GENE0011"],), {"n_cells": 1}, (), False, _retrieval_ok),
    (
        "control_query",
        "the control label as a query",
        (["non-targeting"],),
        {},
        ("non-targeting", "perturbations"),
        False,
        None,
    ),
]:
    _retrieval_case(_name, _desc, _args, _kwargs, _tokens, issue=_issue, check=_check)


@case("get_retrieval", "an untrained model")
def retrieval_untrained(env):
    a = env.data()
    model = env.model(a)
    return Trial(lambda: model.get_retrieval(["GENE0011"]), ("train",), watch=(a,))


@case("get_retrieval", "a model with retrieval='none'")
def retrieval_none_model(env):
    model, a = env.fit(retrieval="none")
    return Trial(lambda: model.get_retrieval(["GENE0011"]), ("retrieval",), watch=(a,))


@case("get_retrieval", "an AnnData without controls of the cell type")
def retrieval_no_controls(env):
    model, adata, _ = env.trained
    a = adata[adata.obs["gene"] != "non-targeting"].copy()
    return Trial(
        lambda: model.get_retrieval(["GENE0011"], adata=a), ("control", "cell_line"), watch=(a,)
    )


# --------------------------------------------------------------------------- save/load
def _load(path, adata=None, **kwargs):
    from ptrag_sc import PTRAG

    def call():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return PTRAG.load(path, adata=adata, **kwargs)

    return call


@case("save", "saving into an existing directory without overwrite")
def save_existing(env):
    model = env.trained[0]
    path = env.path("exists")
    path.mkdir()
    return Trial(lambda: model.save(path), ("overwrite", str(path.name)))


@case("save", "saving to a path that is a file")
def save_to_file(env):
    model = env.trained[0]
    path = env.path("afile")
    path.write_text("x")
    return Trial(lambda: model.save(path, overwrite=True), (str(path.name),))


@case("save", "save then load predicts identically")
def roundtrip(env):
    _model, adata, ref = env.trained
    a = adata.copy()

    def call():
        return _load(env.saved, a.copy())().predict(a, inplace=False)

    return Trial(call, check=lambda p: (np.array_equal(p, ref), "differs after load"), watch=(a,))


@case("save", "save with save_anndata=True, load without an AnnData")
def roundtrip_with_adata(env):
    model, _adata, ref = env.trained
    path = env.path("with_adata")
    model.save(path, save_anndata=True)
    return Trial(
        lambda: _load(path)().predict(inplace=False),
        check=lambda p: (np.array_equal(p, ref), "differs after load"),
    )


@case("save", "save and load with a prefix")
def roundtrip_prefix(env):
    model, adata, ref = env.trained
    path = env.path("prefix")
    model.save(path, prefix="a_")
    return Trial(
        lambda: _load(path, adata.copy(), prefix="a_")().predict(adata, inplace=False),
        check=lambda p: (np.array_equal(p, ref), "differs"),
    )


@case("save", "a torch.save option (save_kwargs)")
def save_kwargs(env):
    model = env.trained[0]
    return Trial(
        lambda: model.save(env.path("sk"), save_kwargs={"pickle_protocol": 2}), ("save_kwargs",)
    )


@case("load", "a directory that does not exist")
def load_missing(env):
    return Trial(_load(env.tmp / "nothing_here"), ("nothing_here",))


@case("load", "an empty directory")
def load_empty(env):
    path = env.path("empty")
    path.mkdir()
    return Trial(_load(path), ("empty",))


@case("load", "model.json of random bytes", issue=True)
def load_random_manifest(env):
    path = env.copy_saved()
    (path / "model.json").write_bytes(os.urandom(512))
    return Trial(_load(path), ("model.json",))


@case("load", "an empty model.json", issue=True)
def load_empty_manifest(env):
    path = env.copy_saved()
    (path / "model.json").write_bytes(b"")
    return Trial(_load(path), ("model.json", "empty"))


@case("load", "truncated weights file")
def load_truncated_weights(env):
    path = env.copy_saved()
    w = path / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    return Trial(_load(path), ("model.safetensors",))


def _copy_v1(env) -> Path:
    path = env.path("model_v1")
    shutil.copytree(V1_MODEL, path)
    return path


@case("load", "truncated array file (a format-version-1 folder)")
def load_truncated_arrays(env):
    path = _copy_v1(env)
    w = path / "model_arrays.npz"
    w.write_bytes(w.read_bytes()[:200])
    return Trial(_load(path), ("model_arrays.npz",))


@case("load", "random bytes as weights (same size)")
def load_random_weights(env):
    path = env.copy_saved()
    w = path / "model.safetensors"
    w.write_bytes(os.urandom(w.stat().st_size))
    return Trial(_load(path), ("model.safetensors",))


@case("load", "a crafted model.pt that runs code when unpickled", issue=True)
def load_pickle_bomb(env):
    path = env.path("bomb")
    env.pickle_bomb(path / "model.pt")
    return Trial(_load(path), ("model.pt", "pickle"))


@case("load", "a crafted model.pt next to a valid model", issue=True)
def load_pickle_bomb_beside_model(env):
    _model, adata, ref = env.trained
    path = env.copy_saved()
    env.pickle_bomb(path / "model.pt")
    return Trial(
        lambda: _load(path, adata.copy())().predict(adata, inplace=False),
        ("model.pt",),
        check=lambda p: (np.array_equal(p, ref), "differs"),
    )


@case("load", "load_registry on a crafted model.pt", issue=True)
def load_registry_bomb(env):
    from ptrag_sc import PTRAG

    path = env.path("bomb_registry")
    env.pickle_bomb(path / "model.pt")
    return Trial(lambda: PTRAG.load_registry(path), ("model.pt", "pickle"))


@case("load", "view_setup_args on a crafted model.pt")
def view_setup_args_bomb(env):
    from ptrag_sc import PTRAG

    path = env.path("bomb_view")
    env.pickle_bomb(path / "model.pt")
    return Trial(lambda: PTRAG.view_setup_args(path), ("model.pt", "pickle"))


@case("load", "convert_legacy_model without trust_pickle")
def convert_untrusted(env):
    from ptrag_sc import PTRAG

    path = env.path("bomb_convert")
    env.pickle_bomb(path / "model.pt")
    return Trial(
        lambda: PTRAG.convert_legacy_model(path, env.path("converted")), ("trust_pickle",)
    )


@case("load", "an object (pickled) array planted in model_arrays.npz (format version 1)")
def load_npz_bomb(env):
    path = _copy_v1(env)
    arrays = dict(np.load(path / "model_arrays.npz"))
    first = next(iter(arrays))
    arrays[first] = np.array([_Bomb(str(env.marker))], dtype=object)
    with open(path / "model_arrays.npz", "wb") as fh:
        np.savez(fh, **arrays)
    return Trial(_load(path), ("model_arrays.npz",))


@case("load", "a directory saved by another tool (Hugging Face style)", issue=True)
def load_foreign_dir(env):
    import torch

    path = env.path("hf")
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    torch.save({"w": torch.zeros(2)}, path / "pytorch_model.bin")
    return Trial(_load(path), (str(path.name), "model.json"))


@case("load", "a scvi-tools SCVI model directory")
def load_scvi_dir(env):
    import scvi

    path = env.path("scvi")
    a = env.data()
    a.layers["counts"] = np.round(np.expm1(a.X)).astype(np.float32)
    scvi.model.SCVI.setup_anndata(a, layer="counts")
    m = scvi.model.SCVI(a, n_latent=2, n_hidden=8)
    m.save(path)
    return Trial(_load(path), ("model.pt", "pickle"))


@case("load", "a directory with a foreign model.json")
def load_foreign_manifest(env):
    path = env.path("foreign_json")
    path.mkdir()
    (path / "model.json").write_text(json.dumps({"format": "other", "weights": "x"}))
    return Trial(_load(path), ("model.json",))


@case("load", "a manifest whose checksum does not match")
def load_bad_checksum(env):
    path = env.copy_saved()
    m = json.loads((path / "model.json").read_text())
    text = (
        json.dumps(m).replace(m["files"][next(iter(m["files"]))]["sha256"], "0" * 64)
        if "files" in m
        else None
    )
    if text is None:
        w = path / "model.safetensors"
        data = bytearray(w.read_bytes())
        data[-1] ^= 1
        w.write_bytes(bytes(data))
    else:
        (path / "model.json").write_text(text)
    return Trial(_load(path), ("sha", "checksum", "model"))


@case("load", "a manifest from a newer format version")
def load_newer_format(env):
    path = env.copy_saved()
    m = json.loads((path / "model.json").read_text())
    m["format_version"] = 999
    (path / "model.json").write_text(json.dumps(m))
    return Trial(_load(path), ("format", "version"))


@case("load", "the model directory is a file")
def load_file_path(env):
    path = env.path("file")
    path.write_text("hello")
    return Trial(_load(path), (str(path.name),))


@case("load", "a wrong prefix")
def load_wrong_prefix(env):
    return Trial(_load(env.saved, prefix="other_"), ("other_", "model.json"))


@case("load", "an AnnData with the genes in reverse order", issue=True)
def load_genes_reversed(env):
    _model, adata, ref = env.trained
    b = adata[:, adata.var_names[::-1]].copy()
    order = adata.var_names.get_indexer(b.var_names)
    return Trial(
        lambda: _load(env.saved, b)().predict(b, inplace=False),
        ("order", "var_names", "genes"),
        check=prediction_ok(b, reference=ref, columns=order),
        watch=(b,),
    )


@case("load", "an AnnData missing a gene")
def load_gene_missing(env):
    _model, adata, _ = env.trained
    b = adata[:, 1:].copy()
    return Trial(_load(env.saved, b), ("GENE0001",), watch=(b,))


@case("load", "an AnnData with a new cell type", issue=True)
def load_new_cell_type(env):
    _model, adata, _ = env.trained
    b = adata.copy()
    b.obs["cell_line"] = (
        b.obs["cell_line"].astype(str).replace({"cell_line_1": "new_line"}).astype("category")
    )
    return Trial(
        lambda: _load(env.saved, b)().predict(b, inplace=False),
        ("new_line",),
        check=prediction_ok(b),
        watch=(b,),
    )


@case("load", "an AnnData without the perturbation column")
def load_no_labels(env):
    _model, adata, _ = env.trained
    b = adata.copy()
    del b.obs["gene"]
    return Trial(_load(env.saved, b), ("gene", "perturbation_key"), watch=(b,))


@case("load", "an AnnData view")
def load_view(env):
    _model, adata, _ = env.trained
    parent = adata.copy()
    v = parent[:150]
    return Trial(
        _load(env.saved, v), ("view",), check=lambda m: (m.is_trained_, ""), watch=(parent,)
    )


@case("load", "an AnnData with NaN")
def load_nan(env):
    _model, adata, _ = env.trained
    b = adata.copy()
    b.X[0, 0] = np.nan
    return Trial(_load(env.saved, b), ("nan",), watch=(b,))


@case("load", "adata is a DataFrame")
def load_dataframe(env):
    _model, adata, _ = env.trained
    frame = adata.to_df()
    return Trial(_load(env.saved, frame), ("adata", "AnnData"), watch=(frame,))


@case("load", "a loaded model trains in train mode", issue=True)
def load_then_train(env):
    from lightning.pytorch.callbacks import Callback

    _model, adata, _ = env.trained
    b = adata.copy()
    seen = []

    class Spy(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(pl_module.module.training)

    def call():
        m = _load(env.saved, b)()
        m.train(max_steps=3, callbacks=[Spy()])
        return seen

    return Trial(
        call,
        check=lambda s: (len(s) > 0 and all(s), f"module.training during steps: {s}"),
        watch=(b,),
    )


@case("load", "labels in lower case after load")
def load_label_variants(env):
    _model, adata, ref = env.trained
    b = adata.copy()
    b.obs["gene"] = (
        b.obs["gene"]
        .astype(str)
        .map(lambda g: g if g == "non-targeting" else g.lower())
        .astype("category")
    )
    return Trial(
        lambda: _load(env.saved, b)().predict(b, inplace=False),
        check=prediction_ok(b, reference=ref),
        watch=(b,),
    )


# ----------------------------------------------------------- add_perturbation_embeddings
def _extra_embedding(env, a, names=("NEWGENE",), dims=None):
    emb = env.emb(a)
    dims = emb.shape[1] if dims is None else dims
    rng = np.random.default_rng(0)
    return pd.DataFrame(rng.normal(size=(len(names), dims)).astype(np.float32), index=list(names))


@case("add_perturbation_embeddings", "vectors of another dimension")
def add_wrong_dims(env):
    model, adata = env.fit()
    new = _extra_embedding(env, adata, dims=5)
    return Trial(lambda: model.add_perturbation_embeddings(new), ("dimension",), watch=(new,))


@case("add_perturbation_embeddings", "a gene that already has a vector")
def add_clash(env):
    model, adata = env.fit()
    new = _extra_embedding(env, adata, names=("GENE0011",))
    return Trial(
        lambda: model.add_perturbation_embeddings(new), ("overwrite", "GENE0011"), watch=(new,)
    )


@case("add_perturbation_embeddings", "a numpy array")
def add_array(env):
    model, _adata = env.fit()
    return Trial(
        lambda: model.add_perturbation_embeddings(np.ones((2, 32))), ("DataFrame", "embeddings")
    )


@case("add_perturbation_embeddings", "a NaN")
def add_nan(env):
    model, adata = env.fit()
    new = _extra_embedding(env, adata)
    new.iloc[0, 0] = np.nan
    return Trial(lambda: model.add_perturbation_embeddings(new), ("nan",), watch=(new,))


@case("add_perturbation_embeddings", "an empty table")
def add_empty(env):
    model, adata = env.fit()
    new = _extra_embedding(env, adata).iloc[:0]
    return Trial(lambda: model.add_perturbation_embeddings(new), ("embeddings", "shape"))


@case("add_perturbation_embeddings", "symbols duplicated up to case")
def add_duplicated(env):
    model, adata = env.fit()
    new = _extra_embedding(env, adata, names=("NEWGENE", "newgene"))
    return Trial(lambda: model.add_perturbation_embeddings(new), ("duplicated",), watch=(new,))


@case("add_perturbation_embeddings", "an all-zero row")
def add_zero(env):
    model, adata = env.fit()
    new = _extra_embedding(env, adata) * 0
    return Trial(lambda: model.add_perturbation_embeddings(new), ("zero",), watch=(new,))


@case("add_perturbation_embeddings", "a new gene, then generation")
def add_then_generate(env):
    model, adata = env.fit()
    new = _extra_embedding(env, adata)
    ctrl = adata[adata.obs["gene"] == "non-targeting"].copy()

    def call():
        model.add_perturbation_embeddings(new)
        return model.predict(ctrl, perturbations=["NEWGENE"])

    def check(out):
        good, why = generated_ok(ctrl.n_obs, labels=["NEWGENE"])(out)
        return (
            good and bool(out.obs["ptrag_unseen_perturbation"].all()),
            why or "not flagged unseen",
        )

    return Trial(call, check=check, watch=(new, ctrl))


@case("add_perturbation_embeddings", "overwrite=True replaces the vector")
def add_overwrite(env):
    model, adata = env.fit()
    new = _extra_embedding(env, adata, names=("GENE0011",))

    def call():
        model.add_perturbation_embeddings(new, overwrite=True)
        return model.get_perturbation_embedding(["GENE0011"])

    return Trial(
        call,
        check=lambda e: (np.allclose(e.to_numpy(), new.to_numpy()), "vector not replaced"),
        watch=(new,),
    )


@case("add_perturbation_embeddings", "added vectors survive save and load")
def add_save_load(env):
    model, adata = env.fit()
    new = _extra_embedding(env, adata)
    path = env.path("added")

    def call():
        model.add_perturbation_embeddings(new)
        model.save(path)
        return _load(path, adata.copy())().get_perturbation_embedding(["NEWGENE"])

    return Trial(
        call,
        check=lambda e: (np.allclose(e.to_numpy(), new.to_numpy()), "vector lost"),
        watch=(new,),
    )


# ------------------------------------------------------------------------ setup_mudata
def _mudata(env, *, nan=False, dup_var=False):
    import mudata as md

    a = env.data()
    if nan:
        a.X[2, 2] = np.nan
    if dup_var:
        a.var_names = ["GENE0001"] * 2 + list(a.var_names[2:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return md.MuData({"rna": a})


def _setup_mudata(m, **kwargs):
    from ptrag_sc import PTRAG

    return lambda: PTRAG.setup_mudata(m, **kwargs)


@case("setup_mudata", "an AnnData instead of a MuData")
def mudata_not_mudata(env):
    a = env.data()
    return Trial(_setup_mudata(a), ("mdata", "MuData"), watch=(a,))


@case("setup_mudata", "rna_mod names a missing modality")
def mudata_missing_rna(env):
    m = _mudata(env)
    return Trial(_setup_mudata(m, rna_mod="gex"), ("rna_mod", "gex"), watch=(m,))


@case("setup_mudata", "guide_mod names a missing modality")
def mudata_missing_guides(env):
    m = _mudata(env)
    return Trial(_setup_mudata(m, guide_mod="gdo"), ("guide_mod", "gdo"), watch=(m,))


@case("setup_mudata", "scvi-tools' modalities= argument")
def mudata_modalities(env):
    m = _mudata(env)
    return Trial(_setup_mudata(m, modalities={"rna_layer": "rna"}), ("modalities",), watch=(m,))


@case("setup_mudata", "excluded_cells='keep'")
def mudata_excluded(env):
    m = _mudata(env)
    return Trial(_setup_mudata(m, excluded_cells="keep"), ("excluded_cells",), watch=(m,))


@case("setup_mudata", "labels from obs: set up, train, predict(mdata)")
def mudata_ok(env):
    m = _mudata(env)

    def call():
        import scvi

        from ptrag_sc import PTRAG

        PTRAG.setup_mudata(m)
        scvi.settings.seed = 0
        model = PTRAG(m, perturbation_embeddings=env.emb(m.mod["rna"]), **TINY)
        model.train(max_steps=STEPS)
        return model.predict(m, inplace=False)

    return Trial(call, check=prediction_ok(m.mod["rna"]), watch=(m,))


@case("setup_mudata", "no control cells")
def mudata_no_controls(env):
    m = _mudata(env)
    return Trial(_setup_mudata(m, control_group="ctrl"), ("control_group", "ctrl"), watch=(m,))


@case("setup_mudata", "NaN in the RNA expression")
def mudata_nan(env):
    m = _mudata(env, nan=True)
    return Trial(_setup_mudata(m), ("nan",), watch=(m,))


@case("setup_mudata", "duplicated var_names in the RNA modality")
def mudata_dup_var(env):
    m = _mudata(env, dup_var=True)
    return Trial(_setup_mudata(m), ("var_names", "duplicated"), watch=(m,))


@case("setup_mudata", "unassigned cells with excluded_cells='raise'")
def mudata_unassigned_raise(env):
    m = _mudata(env)
    rna = m.mod["rna"]
    rna.obs["gene"] = rna.obs["gene"].astype(str)
    rna.obs.iloc[0, rna.obs.columns.get_loc("gene")] = "unassigned"
    return Trial(
        _setup_mudata(m, excluded_cells="raise"), ("excluded_cells", "unassigned"), watch=(m,)
    )


@case("setup_mudata", "assign_kwargs sets a reserved key")
def mudata_reserved(env):
    m = _mudata(env)
    return Trial(
        _setup_mudata(m, assign_kwargs={"inplace": False}),
        ("assign_kwargs", "inplace"),
        watch=(m,),
    )


# ------------------------------------------------------------ issue 19: reliability, round 2
V1_MODEL = HERE.parent / "tests" / "data" / "model_v1"
G1, G2, G3, G4, G6 = (
    "1 atomic saves, links, files",
    "2 refused input untouched",
    "3 output files",
    "4 concurrency",
    "6 errors that name the fault",
)


def _model_pair(env):
    """Two models with different weights (old and new), each on its own copy of one dataset."""
    if getattr(env, "_pair", None) is None:
        import scvi

        models, data = [], []
        for seed in (0, 1):
            a = env.data(seed=11)
            scvi.settings.seed = seed
            models.append(env.model(a))
            models[-1].train(max_steps=2)
            data.append(a)
        env._pair = (*models, data[0])
    return env._pair


def _unregistered(adata):
    """A copy of ``adata`` without scvi-tools' registration keys (as a user would reopen it)."""
    copy = adata.copy()
    for key in [k for k in copy.uns if str(k).startswith("_scvi")]:
        del copy.uns[key]
    return copy


def _loads_as(path: Path, model, adata, **kwargs) -> Callable[[], tuple[bool, str]]:
    """After-check: the folder loads, with the predictions of ``model``."""

    def check():
        try:
            loaded = _load(path, _unregistered(adata), **kwargs)()
        except Exception as exc:
            return (
                False,
                f"the folder no longer loads: {type(exc).__name__}: {_one_line(str(exc), 120)}",
            )
        same = np.array_equal(
            loaded.predict(inplace=False), model.predict(_unregistered(adata), inplace=False)
        )
        return same, "the folder loads another model than the one saved before"

    return check


def _failing_save(env, name: str, fail: Callable[[], None], description: str):
    def build(env):
        try:
            from ptrag_sc import _files
        except ImportError:  # ptrag_sc before issue 19: the file-size limit cases still run
            _files = type("NoFiles", (), {})()

        old, new, adata = _model_pair(env)
        path = env.path(name)
        old.save(path, save_anndata=True)
        originals = {
            k: getattr(_files, k)
            for k in ("write_bytes", "fsync_path", "swap_in")
            if hasattr(_files, k)
        }

        def call():
            try:
                fail(_files, originals)
                new.save(path, overwrite=True, save_anndata=True)
            except KeyboardInterrupt:  # Ctrl+C reaches the caller, as it should
                return "interrupted"
            finally:
                for attr, value in originals.items():
                    setattr(_files, attr, value)
                while files_restore:
                    files_restore.pop()()
            return "saved"

        def after():
            loads, why = _loads_as(path, old, adata)()
            if not loads:
                return loads, why
            left = [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]
            return not left, f"temporary folder(s) left: {left}"

        def interrupted(result: object) -> tuple[bool, str]:
            return result == "interrupted", "the interrupt did not reach the caller"

        return Trial(
            call, ("space", "I/O", "too large"), check=interrupted, keep=(path,), after=after
        )

    build.__name__ = name
    case("save", description, group=G1)(build)


def _disk_full_on(file_name):
    def fail(files, originals):
        def write_bytes(folder, name, data):
            if name == file_name:
                raise OSError(28, "No space left on device")
            return originals["write_bytes"](folder, name, data)

        files.write_bytes = write_bytes

    return fail


def _raise_in(attr, error):
    def fail(files, originals):
        def boom(*args, **kwargs):
            raise error

        setattr(files, attr, boom)

    return fail


def _file_size_limit(n_bytes):
    """A full disk, whatever the code writing: files cannot grow beyond ``n_bytes``
    (RLIMIT_FSIZE)."""

    def fail(files, originals):
        import resource

        previous = resource.getrlimit(resource.RLIMIT_FSIZE)
        handler = signal.signal(
            signal.SIGXFSZ, signal.SIG_IGN
        )  # a write past the limit fails (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, previous[1]))

        def restore():
            resource.setrlimit(resource.RLIMIT_FSIZE, previous)
            signal.signal(signal.SIGXFSZ, handler)

        files_restore.append(restore)

    return fail


files_restore: list = []
_failing_save(
    None,
    "overwrite_disk_full_weights",
    _file_size_limit(16_000),
    "an overwriting save: the disk fills up while the weights are written",
)
_failing_save(
    None,
    "overwrite_disk_full_adata",
    _file_size_limit(80_000),
    "an overwriting save: the disk fills up while the AnnData is written",
)
_failing_save(
    None,
    "overwrite_io_error_manifest",
    _disk_full_on("model.json"),
    "an I/O error (disk full) writing the manifest",
)
_failing_save(
    None,
    "overwrite_io_error_swap",
    _raise_in("swap_in", OSError(5, "I/O error")),
    "an I/O error when the new folder is swapped in",
)
_failing_save(
    None,
    "overwrite_interrupted",
    _raise_in("fsync_path", KeyboardInterrupt("interrupted")),
    "Ctrl+C during an overwriting save",
)


def _save_repeatedly(model, target, rounds):
    for _ in range(rounds):
        model.save(target, overwrite=True)


@case("save", "four processes save to one folder at the same time (5 rounds)", group=G1)
def concurrent_processes(env):
    import multiprocessing

    old, new, adata = _model_pair(env)
    target = env.path("concurrent")

    def call():
        context = multiprocessing.get_context("fork")
        writers = [
            context.Process(target=_save_repeatedly, args=(m, target, 5))
            for m in (old, new, old, new)
        ]
        for w in writers:
            w.start()
        for w in writers:
            w.join()
        if any(w.exitcode for w in writers):
            raise RuntimeError(f"a writer failed (exit codes {[w.exitcode for w in writers]})")
        return _load(target, _unregistered(adata))().predict(inplace=False)

    refs = [m.predict(_unregistered(adata), inplace=False) for m in (old, new)]
    return Trial(
        call, check=lambda p: (any(np.array_equal(p, r) for r in refs), "a mix of two saves")
    )


@case("save", "a link to a user file planted as adata.h5ad in the model folder", group=G1)
def link_planted_adata(env):
    model, _adata, _ = env.trained
    path, outside = env.copy_saved(), env.path("precious.h5ad")
    outside.write_bytes(b"the user's own data")
    (path / "adata.h5ad").symlink_to(outside)
    return Trial(
        lambda: model.save(path, overwrite=True, save_anndata=True),
        ("adata.h5ad",),
        outside=(outside,),
    )


@case("save", "links to a user file planted at the old temporary names", group=G1)
def link_planted_temporary(env):
    model, adata, _ = env.trained
    path, outside = env.copy_saved(), env.path("precious.txt")
    outside.write_bytes(b"the user's notes")
    for name in (".model.safetensors.tmp", ".model_arrays.npz.tmp", ".model.json.tmp"):
        (path / name).symlink_to(outside)
    return Trial(
        lambda: model.save(path, overwrite=True),
        check=ok(),
        outside=(outside,),
        after=_loads_as(path, model, adata),
    )


@case("save", "the model folder is a link to another folder", group=G1)
def target_is_link(env):
    model, _, _ = env.trained
    real, link = env.copy_saved(), env.path("link")
    link.symlink_to(real)
    return Trial(lambda: model.save(link, overwrite=True), ("symbolic link",), outside=(real,))


@case("save", "prefix='../evil_' (writes beside the folder)", group=G1)
def prefix_dotdot(env):
    model, _, _ = env.trained
    path = env.path("prefixed")
    before = sorted(p.name for p in env.tmp.iterdir())
    return Trial(
        lambda: model.save(path, prefix="../evil_"),
        ("prefix",),
        after=lambda: (
            sorted(p.name for p in env.tmp.iterdir() if p.name != path.name) == before,
            "a file was written beside the folder",
        ),
    )


@case("load", "prefix='/etc/' (an absolute path)", group=G1)
def load_prefix_absolute(env):
    return Trial(_load(env.saved, prefix="/etc/"), ("prefix",))


@case("save", "umask 027: every file gets the same permissions (0640)", group=G1)
def permissions(env):
    model, _, _ = env.trained
    path = env.path("perms")

    def call():
        previous = os.umask(0o027)
        try:
            model.save(path, save_anndata=True)
        finally:
            os.umask(previous)
        return {p.name: oct(p.stat().st_mode & 0o777) for p in path.iterdir()}

    return Trial(call, check=lambda modes: (set(modes.values()) == {"0o640"}, f"modes {modes}"))


@case("save", "a user's own adata.h5ad in the folder, save_anndata=True", group=G1)
def user_adata_in_folder(env):
    model, adata, _ = env.trained
    path = env.copy_saved()
    adata.copy().write_h5ad(path / "adata.h5ad")
    return Trial(
        lambda: model.save(path, overwrite=True, save_anndata=True),
        ("adata.h5ad",),
        keep=(path / "adata.h5ad",),
    )


@case("save", "overwrite keeps the user's other files (notes, another prefix)", group=G1)
def overwrite_keeps_files(env):
    model, adata, _ = env.trained
    path = env.copy_saved()
    (path / "notes.txt").write_text("mine")
    model.save(path, prefix="other_", overwrite=True)
    keep = (path / "notes.txt", path / "other_model.json", path / "other_model.safetensors")
    return Trial(
        lambda: model.save(path, overwrite=True),
        check=ok(),
        keep=keep,
        after=_loads_as(path, model, adata),
    )


def _saved_with_adata(env, name):
    model, _adata, _ = env.trained
    path = env.path(name)
    model.save(path, save_anndata=True)
    return path


@case("load", "a truncated adata.h5ad saved with the model", group=G1)
def load_truncated_adata(env):
    path = _saved_with_adata(env, "trunc_adata")
    raw = (path / "adata.h5ad").read_bytes()
    (path / "adata.h5ad").write_bytes(raw[: len(raw) // 2])
    return Trial(_load(path), ("adata.h5ad",))


@case("load", "another AnnData in place of the saved adata.h5ad", group=G1)
def load_replaced_adata(env):
    path = _saved_with_adata(env, "other_adata")
    env.data(seed=5).write_h5ad(path / "adata.h5ad")
    return Trial(_load(path), ("adata.h5ad",))


@case("load", "model.safetensors is a link to a file elsewhere", group=G1)
def load_link_weights(env):
    path = env.copy_saved()
    elsewhere = env.path("weights_elsewhere")
    (path / "model.safetensors").rename(elsewhere)
    (path / "model.safetensors").symlink_to(elsewhere)
    return Trial(_load(path), ("symbolic link",))


@case("load", "a folder saved by ptrag_sc 0.1.0 (format version 1)", group=G1)
def load_version_1(env):
    reference = np.load(V1_MODEL / "reference_prediction.npy")
    return Trial(
        lambda: _load(V1_MODEL)().predict(inplace=False),
        check=lambda p: (np.allclose(p, reference, atol=1e-6), "predictions changed"),
    )


@case("load", "a memory lacking a field this version needs", group=G1)
def load_memory_field_missing(env):
    path = env.copy_saved()
    m = json.loads((path / "model.json").read_text())
    m["attributes"]["memory_"].pop("kind")
    (path / "model.json").write_text(json.dumps(m))
    return Trial(_load(path), ("kind", "format version"))


def _mixed_column(a, column):
    values = a.obs[column].astype(str).to_numpy().astype(object)
    values[:4] = 3
    a.obs[column] = values
    return a


@case("setup_anndata", "a cell-type column mixing ints and strings", group=G2)
def mixed_cell_type(env):
    a = _mixed_column(env.data(), "cell_line")
    return Trial(_setup(a), ("cell_line",), watch=(a,))


@case("setup_anndata", "a batch column mixing ints and strings", group=G2)
def mixed_batch(env):
    a = _mixed_column(env.data(n_batches=2), "gem_group")
    return Trial(_setup(a, batch_key="gem_group"), ("gem_group",), watch=(a,))


@case("load", "loading onto an AnnData whose cell-type column mixes ints and strings", group=G2)
def load_mixed_cell_type(env):
    a = _mixed_column(env.data(), "cell_line")
    return Trial(_load(env.saved, a), ("cell_line",), watch=(a,))


@case("setup_anndata", "scvi-tools' registration fails after writing _scvi_labels", group=G2)
def registration_fails_midway(env):
    from scvi.data.fields import CategoricalObsField

    a = env.data(n_batches=2)
    register = CategoricalObsField.register_field

    def call():
        def fail_on_batch(self, data):
            if self.registry_key == "batch":
                raise RuntimeError("registration failed (batch)")
            return register(self, data)

        CategoricalObsField.register_field = fail_on_batch
        try:
            _setup(a, batch_key="gem_group")()
        finally:
            CategoricalObsField.register_field = register

    return Trial(
        call,
        ("batch",),
        watch=(a,),
        after=lambda: (
            not [c for c in a.obs if str(c).startswith("_scvi")],
            "_scvi_* columns left",
        ),
    )


@case("setup_mudata", "kept cells without a cell type (NaN), cells to drop", group=G2)
def mudata_kept_nan_cell_type(env):
    m = _mudata(env)
    rna = m.mod["rna"]
    labels = rna.obs["gene"].astype(str).to_numpy().astype(object)
    labels[:3] = "unassigned"
    rna.obs["gene"] = labels
    cell_types = rna.obs["cell_line"].astype(object).to_numpy()
    cell_types[10:12] = np.nan
    rna.obs["cell_line"] = cell_types
    return Trial(_setup_mudata(m), ("cell_line",), watch=(m,))


@case("setup_mudata", "a cell-type column mixing ints and strings", group=G2)
def mudata_mixed_cell_type(env):
    m = _mudata(env)
    _mixed_column(m.mod["rna"], "cell_line")
    return Trial(_setup_mudata(m), ("cell_line",), watch=(m,))


def _backed(env):
    import anndata as ad

    model, adata, _ = env.trained
    path = env.path("backed.h5ad")
    adata.write_h5ad(path)
    return model, ad.read_h5ad(path, backed="r"), path


@case("predict", "output= the file the backed input is read from", group=G3)
def output_is_input(env):
    model, backed, path = _backed(env)
    return Trial(
        lambda: model.predict(backed, output=path, overwrite=True),
        ("output", "read from"),
        keep=(path,),
    )


@case("predict", "output= an existing folder", group=G3)
def output_is_folder(env):
    model, adata, _ = env.trained
    folder = env.path("outdir")
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    return Trial(
        lambda: model.predict(adata, output=folder, overwrite=True),
        ("output", "folder"),
        keep=(folder,),
    )


@case("predict", "output= with an obs column h5py cannot write (ints and strings)", group=G3)
def output_mixed_obs(env):
    model, adata, _ = env.trained
    a = adata.copy()
    note = np.array(["x"] * a.n_obs, dtype=object)
    note[0] = 1
    a.obs["note"] = note
    target = env.path("pred.h5ad")
    return Trial(
        lambda: model.predict(a, output=target),
        ("note",),
        watch=(a,),
        after=lambda: (
            not target.exists()
            and not [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}")],
            "a file was left behind",
        ),
    )


@case("predict", "a failed overwrite of an existing output file", group=G3)
def output_failed_overwrite(env):
    from ptrag_sc.model import _predict

    model, adata, _ = env.trained
    target = env.path("pred_old.h5ad")
    model.predict(adata, output=target).file.close()
    generate = _predict.generate

    def call():
        def broken(*args, **kwargs):
            raise RuntimeError("prediction interrupted")

        _predict.generate = broken
        try:
            return model.predict(adata, output=target, overwrite=True)
        finally:
            _predict.generate = generate

    return Trial(call, ("interrupted",), keep=(target,))


@case("predict", "output= a link to a user file, overwrite=True", group=G3)
def output_link(env):
    model, adata, ref = env.trained
    outside, link = env.path("precious.h5ad"), env.path("pred_link.h5ad")
    outside.write_bytes(b"the user's own file")
    link.symlink_to(outside)

    def call():
        out = model.predict(adata, output=link, overwrite=True)
        values = np.asarray(out.X[:])
        out.file.close()
        return values

    return Trial(
        call,
        check=lambda X: (
            not link.is_symlink() and X.shape == ref.shape,
            "the link was written through",
        ),
        outside=(outside,),
    )


@case("predict", "two threads, sample_retrieval=True, seeds 1 and 2, four calls each", group=G4)
def threads_seeds(env):
    import threading

    model, adata, _ = env.trained
    expected = {
        seed: model.predict(adata, inplace=False, sample_retrieval=True, seed=seed)
        for seed in (1, 2)
    }

    def call():
        results, errors = {1: [], 2: []}, []

        def run(seed):
            try:
                for _ in range(4):
                    results[seed].append(
                        model.predict(adata, inplace=False, sample_retrieval=True, seed=seed)
                    )
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results

    return Trial(
        call,
        check=lambda r: (
            all(np.array_equal(x, expected[s]) for s in r for x in r[s]),
            "a thread got the other's random numbers",
        ),
    )


@case("predict", "sample_retrieval=True leaves torch's global generator alone", group=G4)
def global_generator(env):
    import torch

    model, adata, _ = env.trained

    def call():
        torch.manual_seed(7)
        state = torch.random.get_rng_state()
        model.predict(adata, inplace=False, sample_retrieval=True, seed=3)
        return torch.equal(state, torch.random.get_rng_state())

    return Trial(call, check=lambda same: (same, "the global generator moved"))


@case("predict", "predict called from a callback while the model trains", group=G4)
def predict_during_training(env):
    from lightning.pytorch.callbacks import Callback

    model, adata = env.fit(steps=2)
    errors, modes = [], []

    class PredictEachStep(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            try:
                model.predict(adata, inplace=False)
            except RuntimeError as exc:
                errors.append(str(exc))
            modes.append(pl_module.module.training)

    def call():
        model.train(max_steps=3, callbacks=[PredictEachStep()])
        if errors:
            raise RuntimeError(errors[0])
        return modes

    return Trial(
        call,
        ("training",),
        after=lambda: (all(modes) and len(modes) == 3, f"the network left training mode: {modes}"),
    )


@case("train", "train while a prediction holds the model (another thread)", group=G4)
def train_while_predicting(env):
    from ptrag_sc.model._guard import predicting

    model, adata = env.fit(steps=2)

    def call():
        with predicting(model.module):
            model.train(max_steps=1)

    return Trial(call, ("prediction is running",), watch=(adata,))


@case("load", "an AnnData whose control label differs from the saved one", group=G6)
def load_other_control_label(env):
    a = env.data()
    a.obs["gene"] = a.obs["gene"].astype(str).replace({"non-targeting": "control"})
    return Trial(_load(env.saved, a), ("non-targeting", "control_group"), watch=(a,))


@case("PTRAG", "embedding symbols with surrounding spaces", group=G6)
def embedding_spaces(env):
    from ptrag_sc import PTRAG

    a = env.data()
    table = env.emb(a).copy()
    table.index = [f" {g} " for g in table.index]

    def call():
        PTRAG.setup_anndata(a)
        model = PTRAG(a, perturbation_embeddings=table, **TINY)
        model.train(max_steps=2)
        return model.predict(a, inplace=False)

    return Trial(call, check=prediction_ok(a), watch=(table,))


for _name, _value in (("n_hidden", 65536), ("cell_set_size", 500_000), ("n_candidates", 10**8)):

    def _huge(env, name=_name, value=_value):
        from ptrag_sc import PTRAG

        a = env.data()

        def call():
            PTRAG.setup_anndata(a)
            return PTRAG(a, perturbation_embeddings=env.emb(a), **{**TINY, name: value})

        return Trial(call, (name,))

    _huge.__name__ = f"{_name}_beyond_memory"
    case("PTRAG", f"{_name}={_value} (more memory than the machine has)", group=G6)(_huge)


@case("tl.screen", "tl.screen(adata, ...): the AnnData where the model goes", group=G6)
def screen_adata_first(env):
    import ptrag_sc

    _, adata, _ = env.trained
    return Trial(lambda: ptrag_sc.tl.screen(adata, cell_type="cell_line_0"), ("model",))


@case("tl.evaluate", "tl.evaluate(model): the model where the AnnData goes", group=G6)
def evaluate_model_first(env):
    import ptrag_sc

    model, _, _ = env.trained
    return Trial(lambda: ptrag_sc.tl.evaluate(model), ("adata",))


@case("pl.shift_scatter", "pl.shift_scatter(adata, reference=model)", group=G6)
def shift_scatter_reference_model(env):
    import ptrag_sc

    model, adata, _ = env.trained
    return Trial(lambda: ptrag_sc.pl.shift_scatter(adata, reference=model), ("reference",))


@case("tl.screen", "a signature listing a gene twice", group=G6)
def signature_twice(env):
    import ptrag_sc

    model, adata, _ = env.trained
    gene = str(adata.var_names[0])
    return Trial(
        lambda: ptrag_sc.tl.screen(
            model, cell_type="cell_line_0", signature=[gene, gene.lower(), str(adata.var_names[1])]
        ),
        ("signature", gene),
    )


@case("tl.screen", "a gene under both 'up' and 'down' of a signature", group=G6)
def signature_up_and_down(env):
    import ptrag_sc

    model, adata, _ = env.trained
    gene = str(adata.var_names[0])
    return Trial(
        lambda: ptrag_sc.tl.screen(
            model, cell_type="cell_line_0", signature={"up": [gene], "down": [gene]}
        ),
        ("signature", gene),
    )


# --------------------------------------------------------------------- reproducibility
_REPRO_SCRIPT = textwrap.dedent(
    """
    import hashlib, sys, warnings
    import torch
    torch.set_num_threads(int(sys.argv[1]))
    warnings.simplefilter("ignore")
    import scvi, ptrag_sc
    ptrag_sc.settings.progress_bar = False
    scvi.settings.seed = 0
    a = ptrag_sc.datasets.synthetic(n_cell_types=2, n_perturbations=6, n_genes=20,
                                    n_cells_per_perturbation=12, n_control_cells=30, seed=0)
    ptrag_sc.PTRAG.setup_anndata(a)
    m = ptrag_sc.PTRAG(a, perturbation_embeddings=a.uns["gene_embeddings"], n_hidden=16,
                       n_layers=1, n_heads=2, cell_set_size=8, n_candidates=4)
    m.train(max_steps=30)
    print(hashlib.sha256(m.predict(a, inplace=False).tobytes()).hexdigest())
    """
)


@case("train", "same seed, 2 threads, two new processes: identical predictions", issue=True)
def new_process_repro(env):
    script = env.path("repro.py")
    script.write_text(_REPRO_SCRIPT)

    def call():
        env_vars = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        outs = [
            subprocess.run(
                [sys.executable, str(script), "2"],
                capture_output=True,
                text=True,
                env=env_vars,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
            for _ in range(2)
        ]
        return outs

    return Trial(call, check=lambda o: (o[0] == o[1], f"hashes {o}"))


# ------------------------------------------------------------------------------ runner
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument(
        "--only",
        default=None,
        help="run the cases whose id (or issue-19 class) contains this text",
    )
    parser.add_argument("--label", default="", help="suffix of the output files (e.g. 'before')")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--memory-gb",
        type=float,
        default=6.0,
        help=(
            "address-space limit of the process (a case that asks for more fails instead of "
            "being killed)"
        ),
    )
    args = parser.parse_args(argv)
    import resource

    limit = int(args.memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))

    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import logging

    import scvi

    import ptrag_sc

    ptrag_sc.settings.progress_bar = False
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    scvi.settings.verbosity = logging.ERROR

    selected = [
        c
        for c in CASES
        if args.only is None or args.only in c.id or (c.group and args.only in c.group)
    ]
    records = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ptrag_faults_") as tmp:
        env = Env(Path(tmp))
        env.threads = args.threads
        for item in selected:
            with contextlib.redirect_stdout(sys.stderr):
                rec = run_case(env, item)
            records.append(rec)
            print(f"{rec.outcome:14s} {rec.id:55s} {rec.detail[:110]}", flush=True)
    total = time.perf_counter() - start
    frame = pd.DataFrame([r.__dict__ for r in records])
    args.output.mkdir(parents=True, exist_ok=True)
    suffix = f"_{args.label}" if args.label else ""
    frame.to_csv(args.output / f"cases{suffix}.csv", index=False)
    (args.output / f"summary{suffix}.md").write_text(_summary(frame, total, args))
    counts = frame["outcome"].value_counts()
    print(
        "\n"
        + ", ".join(f"{k}: {int(counts.get(k, 0))}" for k in (*OUTCOMES, "harness_error"))
        + f"  ({len(frame)} cases, {total:.0f} s)"
    )
    return 0


def _summary(frame: pd.DataFrame, total: float, args) -> str:
    import ptrag_sc

    counts = frame["outcome"].value_counts()
    commit = ""
    with contextlib.suppress(Exception):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(ptrag_sc.__file__).parent,
        ).stdout.strip()
    lines = [
        "# Fault battery",
        "",
        f"{len(frame)} cases in {total:.0f} s on {platform.machine()} ({os.cpu_count()} CPU "
        "cores, "
        f"{args.threads} torch thread(s); load average at the end {os.getloadavg()[0]:.1f}), "
        f"ptrag_sc {ptrag_sc.__version__} from `{Path(ptrag_sc.__file__).parent}`"
        + (f" at commit {commit}" if commit else "")
        + ".",
        "",
        "| outcome | cases | target |",
        "|---|---:|---|",
    ]
    targets = {
        "silent_wrong": "0",
        "overwrite": "0",
        "data_loss": "0",
        "outside_write": "0",
        "code_executed": "0",
        "obscure_error": "at most 5 (issue 19's cases: at most 2)",
    }
    for name in (*OUTCOMES, "harness_error"):
        lines.append(f"| {name} | {int(counts.get(name, 0))} | {targets.get(name, '')} |")
    lines += [
        "",
        "By API:",
        "",
        frame.pivot_table(
            index="api", columns="outcome", values="id", aggfunc="count", fill_value=0
        ).to_markdown(),
        "",
    ]
    grouped = frame[frame["group"].fillna("") != ""]
    if len(grouped):
        lines += [
            "## Issue 19's cases, by class",
            "",
            grouped.pivot_table(
                index="group", columns="outcome", values="id", aggfunc="count", fill_value=0
            ).to_markdown(),
            "",
            "| case | outcome | detail |",
            "|---|---|---|",
        ]
        lines += [
            f"| `{r.id}` ({r.description}) | {r.outcome} | "
            f"{_one_line(r.detail, 160).replace('|', '/')} |"
            for r in grouped.itertuples()
        ]
        lines.append("")
    issue = frame[frame["from_issue"]]
    lines += ["## The cases named in issue 9", "", "| case | outcome | detail |", "|---|---|---|"]
    lines += [
        f"| `{r.id}` ({r.description}) | {r.outcome} | "
        f"{_one_line(r.detail, 160).replace('|', '/')} |"
        for r in issue.itertuples()
    ]
    lines.append("")
    bad = frame[~frame["outcome"].isin(["clear_error", "correct"])]
    if len(bad):
        lines += ["## Cases that are neither a clear error nor a correct result", ""]
        lines += [
            f"- `{r.id}` ({r.description}): **{r.outcome}**. {r.detail}" for r in bad.itertuples()
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
