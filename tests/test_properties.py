"""Properties over random small data, fault injection during training, and reproducibility.

The property tests draw small AnnData (unicode labels, 1-3 cell types, a random share of
control cells, dense or sparse, labels written with stray spaces and in another case, views)
and run setup -> a few training steps -> predict -> save -> load -> predict. Each example must
either give finite, non-negative, in-range and deterministic predictions with the user's data
unchanged, or fail with a ``ValueError``/``KeyError``/``TypeError`` that names the argument at
fault. The fault-injection tests interrupt training and check that the model is exactly as it
was before the call.
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scvi
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import Callback

import ptrag_sc
from ptrag_sc import PTRAG
from ptrag_sc.data import normalise_labels
from ptrag_sc.train import NonFiniteLossError
from ptrag_sc.train._runner import deterministic_algorithms

TINY = {"n_hidden": 8, "n_layers": 1, "n_heads": 2, "cell_set_size": 2, "n_candidates": 3, "n_set_tokens": 2, "gene_annotations": None}
CONTROL = "non-targeting"
#: Symbols drawn for perturbations: ASCII, Greek, Cyrillic, CJK, German sharp s, accents.
ALPHABET = "ABCDEGHKLMPQRSTXYZ0123456789-_.ΔΣЖЯ基因ßéñ"
#: Arguments an error may name (the message must contain one of them).
ARGUMENTS = ("adata", "perturbation_key", "cell_type_key", "batch_key", "layer", "control", "perturbation_embeddings", "cell_set_size", "obs[", "view", "split_key", "max_steps")


# ------------------------------------------------------------------------------ helpers
def _digest(values) -> str:
    if sp.issparse(values):
        values = values.toarray()
    array = np.asarray(values)
    if array.dtype == object:
        return hashlib.sha1("\x1f".join(map(str, array.ravel())).encode()).hexdigest()
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


def fingerprint(adata) -> dict:
    """What a user owns in an AnnData: everything but the documented registration keys."""
    out = {"X": _digest(adata.X), "obs_names": _digest(adata.obs_names.to_numpy()), "var_names": _digest(adata.var_names.to_numpy())}
    out.update({f"layers/{k}": _digest(v) for k, v in adata.layers.items()})
    out.update({f"obs/{c}": _digest(adata.obs[c].astype(str).to_numpy()) for c in adata.obs.columns if not str(c).startswith("_scvi")})
    out.update({f"uns/{k}": type(v).__name__ for k, v in adata.uns.items() if not str(k).startswith("_scvi")})
    return out


def _in_range(pred: np.ndarray, ceiling: np.ndarray) -> None:
    assert np.isfinite(pred).all()
    assert pred.min() >= 0
    assert (pred <= ceiling[None, :] + 1e-5).all()


@st.composite
def small_data(draw):
    """A small random Perturb-seq-like AnnData and a gene-embedding table for its labels."""
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    n_genes = draw(st.integers(4, 10))
    n_cell_types = draw(st.integers(1, 3))
    symbols = draw(st.lists(st.text(ALPHABET, min_size=1, max_size=5).filter(lambda s: s.strip(".-_") == s), min_size=2, max_size=4, unique_by=str.upper))
    control_fraction = draw(st.floats(0.15, 0.6))
    per_group = draw(st.integers(3, 6))
    labels, cell_types = [], []
    for c in range(n_cell_types):
        for s in symbols:
            labels += [s] * per_group
            cell_types += [f"type_{c}"] * per_group
        n_ctrl = max(2, round(control_fraction * per_group * len(symbols) / (1 - control_fraction)))
        labels += [CONTROL] * n_ctrl
        cell_types += [f"type_{c}"] * n_ctrl
    labels = np.array(labels, dtype=object)
    # Stray spaces and another case: the documented normalisation makes them one perturbation.
    messy = draw(st.booleans())
    if messy:
        flip = rng.random(labels.shape[0]) < 0.3
        labels = np.where(flip & (labels != CONTROL), np.char.add(" ", np.char.lower(labels.astype(str))), labels).astype(object)
    n = labels.shape[0]
    X = np.log1p(rng.gamma(2.0, 1.0, size=(n, n_genes)) * (rng.random((n, n_genes)) < 0.7)).astype(np.float32)
    X += rng.random((n, n_genes)).astype(np.float32) * 1e-3  # never integer-valued
    sparse = draw(st.booleans())
    obs = pd.DataFrame({"gene": pd.Categorical(labels.astype(str)), "cell_line": pd.Categorical(cell_types)}, index=[f"c{i}" for i in range(n)])
    adata = ad.AnnData(sp.csr_matrix(X) if sparse else X, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))
    table = pd.DataFrame(rng.normal(size=(len(symbols), 6)).astype(np.float32), index=symbols)
    return adata, table, {"view": draw(st.booleans()), "messy": messy, "sparse": sparse}


def _names_argument(exc: BaseException) -> bool:
    return isinstance(exc, ValueError | KeyError | TypeError) and any(a in str(exc) for a in ARGUMENTS)


# ---------------------------------------------------------------------------- properties
@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(small_data())
def test_setup_train_predict_save_load(case):
    adata, table, flags = case
    before = fingerprint(adata)
    table_before = table.copy()
    if flags["view"]:
        view = adata[: adata.n_obs]
        with pytest.raises(ValueError, match="view"):
            PTRAG.setup_anndata(view)
    scvi.settings.seed = 0
    try:
        PTRAG.setup_anndata(adata)
        model = PTRAG(adata, perturbation_embeddings=table, **TINY)
        model.train(max_steps=3, validation_size=0)
    except Exception as exc:
        assert _names_argument(exc), f"unclear error {type(exc).__name__}: {exc}"
        assert fingerprint(adata) == before
        return
    X = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    ceiling = X.max(axis=0)
    pred = model.predict(adata, inplace=False)
    _in_range(pred, ceiling)
    is_control = normalise_labels(adata.obs["gene"].astype(str), control_group=CONTROL) == CONTROL
    np.testing.assert_array_equal(pred[is_control], X[is_control])
    np.testing.assert_array_equal(model.predict(adata, inplace=False), pred)
    if flags["view"]:
        np.testing.assert_array_equal(model.predict(adata[: adata.n_obs], inplace=False), pred)
    n_groups = len(set(normalise_labels(adata.obs["gene"].astype(str), control_group=CONTROL)) - {CONTROL})
    assert len(model.training_perturbations_) == n_groups
    with tempfile.TemporaryDirectory() as tmp:
        model.save(Path(tmp) / "m")
        loaded = PTRAG.load(Path(tmp) / "m", adata=adata.copy())
    np.testing.assert_array_equal(loaded.predict(adata, inplace=False), pred)
    generated = loaded.predict(adata[is_control].copy(), perturbations=[str(table.index[0])])
    _in_range(np.asarray(generated.X), ceiling)
    assert fingerprint(adata) == before
    pd.testing.assert_frame_equal(table, table_before)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.text("ABCab xyz+", min_size=0, max_size=8), min_size=1, max_size=6))
def test_label_normalisation_is_one_rule(labels):
    once = normalise_labels(labels, control_group=CONTROL)
    np.testing.assert_array_equal(normalise_labels(once, control_group=CONTROL), once)  # idempotent
    for raw, canonical in zip(labels, once, strict=True):
        members = sorted({m.strip().upper() for m in raw.split("+") if m.strip()})
        assert canonical == "+".join(members)
        swapped = "+".join(reversed(raw.split("+")))
        assert normalise_labels([f"  {swapped.lower()} "], control_group=CONTROL)[0] == canonical


OPTIONS = ("n_hidden", "n_layers", "n_heads", "n_candidates", "n_set_tokens", "cell_set_size", "decoder_rank", "n_scorer_hidden", "sparsity_weight", "pseudobulk_weight", "gumbel_tau", "dropout")
BAD_VALUES = (0, -1, 2.5, math.nan, math.inf, -math.inf, True, "4", None, 1e30)


@pytest.fixture(scope="module")
def registered():
    rng = np.random.default_rng(0)
    adata = ad.AnnData(
        np.log1p(rng.gamma(2.0, size=(40, 6))).astype(np.float32),
        obs=pd.DataFrame({"gene": ["A", "B", CONTROL, CONTROL] * 10, "cell_line": "x"}, index=[f"c{i}" for i in range(40)]),
    )
    adata.var_names = [f"g{i}" for i in range(6)]
    PTRAG.setup_anndata(adata)
    return adata, pd.DataFrame(rng.normal(size=(2, 4)), index=["A", "B"])


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.sampled_from(OPTIONS), st.sampled_from(BAD_VALUES))
def test_options_fail_with_their_name_or_work(registered, name, value):
    adata, table = registered
    options = {**TINY, "n_hidden": 8, "n_heads": 2}
    options[name] = value
    try:
        model = PTRAG(adata, perturbation_embeddings=table, **options)
    except (ValueError, TypeError) as exc:
        assert f"`{name}`" in str(exc), str(exc)
        return
    # Accepted: then it must be a valid value of its kind, stored in its canonical type.
    assert (value is None and name in ("decoder_rank", "n_scorer_hidden")) or (
        not isinstance(value, bool | str) and math.isfinite(value) and value >= 0
    ), f"{name}={value!r} accepted"
    assert model.module is not None


# ------------------------------------------------------------------------ fault injection
def _data():
    return ptrag_sc.datasets.synthetic(n_cell_types=2, n_perturbations=6, n_genes=20, n_cells_per_perturbation=12, n_control_cells=30, seed=0)


def _model(adata, **kwargs):
    scvi.settings.seed = 0
    PTRAG.setup_anndata(adata)
    return PTRAG(adata, perturbation_embeddings=adata.uns["gene_embeddings"], **{**TINY, "n_hidden": 16, "cell_set_size": 8, **kwargs})


def _state(model) -> dict:
    memory = model.memory_
    return {
        "weights": {k: v.detach().clone() for k, v in model.module.state_dict().items()},
        "memory": None if memory is None else {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in memory.items()},
        "history": None if model.history_ is None else {k: v.copy() for k, v in model.history_.items()},
        "attributes": {n: getattr(model, n) for n in ("is_trained_", "best_step_", "best_epoch_")},
        "arrays": {n: None if getattr(model, n) is None else np.array(getattr(model, n)) for n in ("training_perturbations_", "validation_perturbations_")},
        "training": model.module.training,
    }


def _assert_same_state(model, before: dict) -> None:
    after = _state(model)
    assert after["weights"].keys() == before["weights"].keys()
    for k, v in before["weights"].items():
        assert torch.equal(after["weights"][k], v), k
    np.testing.assert_equal(after["memory"], before["memory"])  # NaN equals NaN here
    assert (after["history"] is None) == (before["history"] is None)
    if before["history"] is not None:
        assert after["history"].keys() == before["history"].keys()
        for k, v in before["history"].items():
            pd.testing.assert_frame_equal(after["history"][k], v)
    assert after["attributes"] == before["attributes"]
    np.testing.assert_equal(after["arrays"], before["arrays"])
    assert after["training"] == before["training"]


class _RaiseAt(Callback):
    def __init__(self, exc: BaseException, step: int = 3) -> None:
        self.exc, self.step = exc, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise self.exc


class _Mode(Callback):
    def __init__(self) -> None:
        self.seen: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(pl_module.module.training)


@pytest.fixture(scope="module")
def trained_small():
    adata = _data()
    model = _model(adata)
    model.train(max_steps=12)
    return model, adata


class _Boom(RuntimeError):
    pass


def test_exception_mid_training_leaves_model_as_before(trained_small):
    model, _ = trained_small
    before = _state(model)
    reference = model.predict(inplace=False)
    with pytest.raises(_Boom):
        model.train(max_steps=20, callbacks=[_RaiseAt(_Boom("from a callback"))])
    _assert_same_state(model, before)
    np.testing.assert_array_equal(model.predict(inplace=False), reference)


def test_keyboard_interrupt_leaves_model_as_before(trained_small):
    model, _ = trained_small
    before = _state(model)
    handler = signal.getsignal(signal.SIGINT)
    # Lightning answers Ctrl+C with sys.exit(1) and ignores further Ctrl+C: train gives back
    # a KeyboardInterrupt and the handler.
    with pytest.raises(KeyboardInterrupt, match="interrupted"):
        model.train(max_steps=20, callbacks=[_RaiseAt(KeyboardInterrupt())])
    assert signal.getsignal(signal.SIGINT) == handler
    _assert_same_state(model, before)


def test_failed_first_training_leaves_model_untrained():
    adata = _data()
    model = _model(adata)
    before = _state(model)
    with pytest.raises(_Boom):
        model.train(max_steps=20, callbacks=[_RaiseAt(_Boom("from a callback"))])
    _assert_same_state(model, before)
    assert not model.is_trained_
    assert model.memory_ is None
    with pytest.raises(RuntimeError, match="not trained"):
        model.predict(adata)


def test_non_finite_loss_stops_training_with_the_step_and_a_hint():
    adata = _data()
    model = _model(adata)
    before = _state(model)
    with pytest.raises(NonFiniteLossError, match=r"became (nan|inf) at step \d+.*lower the learning rate.*plan_kwargs=\{'lr'") as info:
        model.train(max_steps=60, plan_kwargs={"lr": 1e6})
    assert isinstance(info.value, RuntimeError)
    _assert_same_state(model, before)


def test_every_training_runs_in_train_mode(tmp_path):
    adata = _data()
    model = _model(adata)
    model.train(max_steps=3)
    assert not model.module.training  # after train(): evaluation mode
    mode = _Mode()
    model.train(max_steps=3, callbacks=[mode])
    assert mode.seen
    assert all(mode.seen)
    model.save(tmp_path / "m")
    loaded = PTRAG.load(tmp_path / "m", adata=adata.copy())
    assert not loaded.module.training
    mode = _Mode()
    loaded.train(max_steps=3, callbacks=[mode])
    assert mode.seen
    assert all(mode.seen)


def test_deterministic_algorithms_are_restored():
    before = torch.are_deterministic_algorithms_enabled()
    with deterministic_algorithms(True):
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.are_deterministic_algorithms_enabled() == before


_REPRO = textwrap.dedent(
    """
    import hashlib, sys, warnings
    import torch
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    import scvi, ptrag_sc
    ptrag_sc.settings.progress_bar = False
    ptrag_sc.settings.num_threads = 2  # the package's default is one thread
    scvi.settings.seed = 0
    a = ptrag_sc.datasets.synthetic(n_cell_types=2, n_perturbations=8, n_genes=24,
                                    n_cells_per_perturbation=16, n_control_cells=40, seed=0)
    ptrag_sc.PTRAG.setup_anndata(a)
    m = ptrag_sc.PTRAG(a, perturbation_embeddings=a.uns["gene_embeddings"], n_hidden=16, n_layers=1,
                       n_heads=2, cell_set_size=8, n_candidates=6, gene_annotations=None)
    m.train(max_steps=20)
    print(hashlib.sha256(m.predict(a, inplace=False).tobytes()).hexdigest())
    """
)


def test_same_seed_and_threads_give_identical_predictions_in_new_processes(tmp_path):
    script = tmp_path / "repro.py"
    script.write_text(_REPRO)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    # Two fresh processes, run side by side (each imports scvi-tools: most of the time).
    runs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    for run, (_, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, err[-2000:]
    hashes = [out.split()[-1] for out, _ in outputs]
    assert hashes[0] == hashes[1]
