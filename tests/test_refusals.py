"""A refused call leaves the user's AnnData / MuData exactly as it was (property over the refusals)."""

from __future__ import annotations

import hashlib
import warnings

import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scvi
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scvi.data.fields import CategoricalObsField

import ptrag_sc
from ptrag_sc import PTRAG

TINY = {"n_hidden": 16, "n_layers": 1, "n_heads": 2, "cell_set_size": 8, "n_candidates": 4, "gene_annotations": None}


def _data():
    adata = ptrag_sc.datasets.synthetic(
        n_cell_types=2, n_perturbations=4, n_genes=20, n_cells_per_perturbation=10, n_control_cells=20, n_batches=2, seed=0
    )
    adata.uns.pop("gene_embeddings")
    return adata


EMBEDDINGS = ptrag_sc.datasets.synthetic(
    n_cell_types=2, n_perturbations=4, n_genes=20, n_cells_per_perturbation=10, n_control_cells=20, n_batches=2, seed=0
).uns["gene_embeddings"]


def _hash(value) -> str:
    """Bytes of a value, dtypes and shape included."""
    h = hashlib.sha256()
    if sp.issparse(value):
        for part in (value.data, value.indices, value.indptr):
            h.update(np.ascontiguousarray(part).tobytes())
        h.update(f"{value.format}{value.shape}{value.dtype}".encode())
    elif isinstance(value, pd.DataFrame):
        h.update(_hash(value.index).encode() + _hash(value.columns).encode())
        for column in value.columns:
            h.update(_hash(value[column]).encode())
    elif isinstance(value, pd.Series | pd.Index):
        h.update(str(value.dtype).encode() + str(getattr(value, "name", "")).encode())
        h.update("\x1f".join(f"{type(v).__name__}:{v!r}" for v in value.tolist()).encode())
    elif isinstance(value, np.ndarray):
        h.update(f"{value.dtype}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes() if value.dtype != object else repr(value.tolist()).encode())
    elif isinstance(value, dict):
        for k in value:
            h.update(f"{k!r}={_hash(value[k])};".encode())
    else:
        h.update(f"{type(value).__name__}:{value!r}".encode())
    return h.hexdigest()


def fingerprint(obj) -> dict:
    """Everything of an AnnData (or of each modality of a MuData) that a refusal must not change."""
    if isinstance(obj, md.MuData):
        out = {"obs": _hash(obj.obs), "obs_names": _hash(obj.obs_names)}
        for name, mod in obj.mod.items():
            out.update({f"{name}/{k}": v for k, v in fingerprint(mod).items()})
        return out
    out = {"shape": obj.shape, "X": _hash(obj.X), "obs": _hash(obj.obs), "var": _hash(obj.var), "uns": _hash(dict(obj.uns))}
    for group in ("layers", "obsm", "varm", "obsp"):
        out[group] = _hash({k: getattr(obj, group)[k] for k in getattr(obj, group).keys()})
    return out


# Faults that a careless user brings in, applied to the cells ``rows`` of a fresh AnnData.
def _mixed(column):
    def fault(adata, rows):
        values = adata.obs[column].astype(str).to_numpy().astype(object)
        values[rows] = 7
        adata.obs[column] = values

    return fault


def _missing(column):
    def fault(adata, rows):
        values = adata.obs[column].astype(object).to_numpy()
        values[rows] = np.nan
        adata.obs[column] = values

    return fault


def _expression(value):
    def fault(adata, rows):
        adata.X = np.asarray(adata.X.toarray() if sp.issparse(adata.X) else adata.X, dtype=np.float32)
        adata.X[rows, 0] = value

    return fault


def _no_controls(adata, rows):
    adata.obs["gene"] = adata.obs["gene"].astype(str).replace({"non-targeting": "control"})


def _no_column(adata, rows):
    del adata.obs["cell_line"]


FAULTS = {
    "mixed cell types": _mixed("cell_line"),
    "mixed batches": _mixed("gem_group"),
    "missing cell types": _missing("cell_line"),
    "missing batches": _missing("gem_group"),
    "missing labels": _missing("gene"),
    "negative expression": _expression(-1.0),
    "NaN expression": _expression(np.nan),
    "huge expression": _expression(1e30),
    "another control label": _no_controls,
    "no cell-type column": _no_column,
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    adata = _data()
    scvi.settings.seed = 0
    PTRAG.setup_anndata(adata, batch_key="gem_group")
    model = PTRAG(adata, perturbation_embeddings=EMBEDDINGS, **TINY)
    model.train(max_steps=2)
    path = tmp_path_factory.mktemp("refusals") / "model"
    model.save(path)
    return model, path


ENTRIES = ("setup_anndata", "load", "setup_mudata", "predict")


def _call(entry: str, adata, saved):
    model, path = saved
    if entry == "setup_anndata":
        PTRAG.setup_anndata(adata, batch_key="gem_group")
    elif entry == "load":
        PTRAG.load(path, adata=adata)
    else:
        model.predict(adata)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("fault", sorted(FAULTS))
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.integers(0, 119), min_size=1, max_size=6, unique=True))
def test_a_refused_call_changes_nothing(saved, fault, entry, rows):
    adata = _data()
    FAULTS[fault](adata, np.asarray(rows))
    mdata = md.MuData({"rna": adata}) if entry == "setup_mudata" else None
    target = mdata if mdata is not None else adata
    before = fingerprint(target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if mdata is not None:
                PTRAG.setup_mudata(mdata, batch_key="gem_group")
            else:
                _call(entry, adata, saved)
        except (ValueError, KeyError, TypeError) as exc:
            assert "'<' not supported" not in str(exc)
        else:
            # Accepted: only faults the entry point does not care about may pass.
            assert (entry, fault) in ACCEPTED, f"{entry} accepted {fault}"
            return
    assert fingerprint(target) == before


#: Faults an entry point rightly accepts: prediction reads the model's own registration (new
#: cell types and batches, including a mixed column's values, are valid), and without a
#: cell-type column a predicted AnnData is one cell type; setup_mudata drops unlabelled cells.
ACCEPTED = {
    ("setup_mudata", "missing labels"),  # documented: such cells are dropped (excluded_cells="drop")
    ("predict", "no cell-type column"),
    ("predict", "mixed cell types"),
    ("predict", "mixed batches"),
    ("load", "mixed cell types"),
    ("load", "mixed batches"),
}


def test_a_failure_inside_scvi_registration_is_undone(monkeypatch):
    """A refusal after scvi-tools has written `_scvi_labels` (here: the batch field fails) undoes it."""
    adata = _data()
    before = fingerprint(adata)
    register = CategoricalObsField.register_field

    def fail_on_batch(self, data):
        if self.registry_key == "batch":
            raise RuntimeError("disk on fire")
        return register(self, data)

    monkeypatch.setattr(CategoricalObsField, "register_field", fail_on_batch)
    with pytest.raises(RuntimeError, match="disk on fire"):
        PTRAG.setup_anndata(adata, batch_key="gem_group")
    assert fingerprint(adata) == before
    monkeypatch.undo()
    PTRAG.setup_anndata(adata, batch_key="gem_group")  # and it registers afterwards
    assert "_scvi_labels" in adata.obs


@pytest.mark.parametrize("column", ["cell_line", "gem_group"])
def test_mixed_columns_are_named(column):
    adata = _data()
    _mixed(column)(adata, np.arange(3))
    with pytest.raises(ValueError, match=rf"`adata.obs\['{column}'\]`.*mixes values of types \['number', 'str'\].*astype\(str\)"):
        PTRAG.setup_anndata(adata, batch_key="gem_group")
    assert not [c for c in adata.obs.columns if c.startswith("_scvi")]


def test_setup_mudata_checks_kept_cells_before_dropping_any():
    adata = _data()
    labels = adata.obs["gene"].astype(str).to_numpy().astype(object)
    labels[:5] = "unassigned"  # cells to drop
    adata.obs["gene"] = labels
    _missing("cell_line")(adata, np.arange(20, 23))  # and kept cells without a cell type
    mdata = md.MuData({"rna": adata})
    with pytest.raises(ValueError, match=r"`obs\['cell_line'\]` \(`cell_type_key`\) of the kept cells.*missing values"):
        PTRAG.setup_mudata(mdata)
    assert mdata.mod["rna"].n_obs == 120
