"""Pickle-free model files: round trips, the typed encoder, fault cases and malicious files."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scvi
import torch
from conftest import few_shot_split, make_small_adata
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from scvi.model.base import BaseModelClass

from ptrag_sc import PTRAG
from ptrag_sc.model import ModelFileError
from ptrag_sc.model._io import (
    ARRAYS_FNAME,
    MANIFEST_FNAME,
    WEIGHTS_FNAME,
    decode_tree,
    encode_tree,
)

TINY = {"n_hidden": 16, "n_layers": 1, "n_heads": 2, "cell_set_size": 8, "n_candidates": 4}


def _tiny_adata():
    data = make_small_adata(n_perturbations=6, n_genes=30, n_cells_per_perturbation=20, n_control_cells=40)
    data.obs["split"] = few_shot_split(data, n_val=1, n_test=2)
    return data


@pytest.fixture(scope="module")
def tiny():
    scvi.settings.seed = 0
    data = _tiny_adata()
    PTRAG.setup_anndata(data)
    model = PTRAG(data, perturbation_embeddings=data.uns["gene_embeddings"], **TINY)
    model.train(max_steps=5, split_key="split")
    return model, data


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    model, _ = tiny
    path = tmp_path_factory.mktemp("saved") / "model"
    model.save(path)
    return path


@pytest.fixture
def copy_of(saved, tmp_path):
    """A fresh copy of the saved model directory, to damage."""
    path = tmp_path / "copy"
    shutil.copytree(saved, path)
    return path


def _fresh(data):
    """A copy of the training AnnData as a user would reopen it (no scvi registration)."""
    fresh = data.copy()
    for key in ("_scvi_uuid", "_scvi_manager_uuid"):
        fresh.uns.pop(key, None)
    return fresh


def _rehash(path: Path) -> None:
    """Make the manifest agree with the (edited) files, so the loader's parsers are what is tested."""
    manifest_path = path / MANIFEST_FNAME
    manifest = json.loads(manifest_path.read_text())
    for name in (WEIGHTS_FNAME, ARRAYS_FNAME):
        raw = (path / name).read_bytes()
        manifest["files"][name] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    manifest_path.write_text(json.dumps(manifest))


def _edit_manifest(path: Path, edit) -> None:
    manifest_path = path / MANIFEST_FNAME
    manifest = json.loads(manifest_path.read_text())
    edit(manifest)
    manifest_path.write_text(json.dumps(manifest))


def _same(a, b) -> bool:
    """Equal values of the same types (dtypes included), recursively."""
    if type(a) is not type(b):
        return False
    if isinstance(a, pd.DataFrame):
        try:
            pd.testing.assert_frame_equal(a, b, check_exact=True, check_index_type=True, check_column_type=True)
        except AssertionError:
            return False
        return a.index.dtype == b.index.dtype and a.columns.dtype == b.columns.dtype
    if isinstance(a, pd.Series):
        try:
            pd.testing.assert_series_equal(a, b, check_exact=True)
        except AssertionError:
            return False
        return True
    if isinstance(a, pd.Index):
        return a.equals(b) and a.dtype == b.dtype and a.name == b.name
    if isinstance(a, pd.Categorical):
        return a.equals(b) and a.ordered == b.ordered and a.categories.equals(b.categories)
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (np.ndarray, np.generic)):
        return a.dtype == b.dtype and np.shape(a) == np.shape(b) and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
    if isinstance(a, dict):
        if isinstance(a, defaultdict) and a.default_factory is not b.default_factory:
            return False
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and np.isnan(a):
        return np.isnan(b)
    return a == b


def _through_files(value, tmp_path: Path):
    """Encode, write JSON + npz as `save` does, read back without pickle, decode."""
    node, arrays = encode_tree(value)
    (tmp_path / "t.json").write_text(json.dumps(node, allow_nan=False))
    np.savez(tmp_path / "t.npz", **arrays)
    with np.load(tmp_path / "t.npz", allow_pickle=False) as npz:
        loaded = {k: npz[k] for k in npz.files}
    return decode_tree(json.loads((tmp_path / "t.json").read_text()), loaded)


ROUND_TRIP_VALUES = {
    "none": None,
    "bool": True,
    "int": -3,
    "big int": 2**80,
    "float": 0.1,
    "nan": float("nan"),
    "-inf": float("-inf"),
    "str": "naïve ✓ \"quoted\" $type",
    "list": [1, "a", None, [2.5, False]],
    "tuple": (1, ("a", None)),
    "dict str keys": {"$type": "not a tag", "b": {"c": [1, 2]}},
    "dict other keys": {1: "a", 2.5: "b", None: "c", True: "d", "e": 5},
    "defaultdict": defaultdict(dict, {"x": {"y": 1}}),
    "float32 array": np.arange(6, dtype=np.float32).reshape(2, 3),
    "int64 array": np.array([1, -2, 3], dtype=np.int64),
    "uint8 array": np.array([0, 255], dtype=np.uint8),
    "bool array": np.array([True, False]),
    "complex array": np.array([1 + 2j]),
    "float array with nan": np.array([np.nan, np.inf, 1.0]),
    "unicode array": np.array(["a", "βγ", ""]),
    "object array of str": np.array(["GENE1", "GENE2"], dtype=object),
    "2-d object array of str": np.array([["a", "b"], ["c", "d"]], dtype=object),
    "empty object array": np.array([], dtype=object),
    "object array of float": np.array([0.5, 1.5], dtype=object),
    "object array of int": np.array([1, 2], dtype=object),
    "object array of bool": np.array([True, False], dtype=object),
    "0-d array": np.array(3.0),
    "datetime array": np.array(["2024-01-01"], dtype="datetime64[D]"),
    "numpy int scalar": np.int64(7),
    "numpy float32 scalar": np.float32(0.25),
    "numpy bool scalar": np.bool_(True),
    "numpy str scalar": np.str_("x"),
    "float tensor": torch.arange(4, dtype=torch.float32),
    "long tensor": torch.tensor([[1, 2]], dtype=torch.long),
    "embedding table": pd.DataFrame(
        np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32),
        index=pd.Index(["A", "B", "C"], dtype=object),
        columns=[f"dim{i}" for i in range(4)],
    ),
    "history frame (object floats)": pd.DataFrame(
        {"train_loss": np.array([0.5, 0.25], dtype=object)}, index=pd.Index([0, 1], name="epoch")
    ),
    "mixed frame": pd.DataFrame(
        {
            "f": [1.0, 2.0, np.nan],
            "i": np.array([1, 2, 3], dtype=np.int32),
            "s": ["x", "y", "z"],
            "c": pd.Categorical(["u", "v", "u"], categories=["v", "u"], ordered=True),
            "b": [True, False, True],
            "t": pd.array(["p", "q", "r"], dtype="string"),
        },
        index=pd.RangeIndex(10, 13, name="row"),
    ),
    "frame with int columns and duplicates": pd.DataFrame([[1, 2, 3]], columns=[0, 0, 5]),
    "empty frame": pd.DataFrame(index=pd.Index(["a", "b"])),
    "frame with categorical index": pd.DataFrame({"v": [1, 2]}, index=pd.CategoricalIndex(["p", "q"])),
    "series": pd.Series([1.5, 2.5], index=["a", "b"], name="s"),
    "index": pd.Index(["x", "y"], name="genes"),
    "range index": pd.RangeIndex(0, 10, 2),
    "categorical": pd.Categorical(["a", "b", "a"]),
}


@pytest.mark.parametrize("name", list(ROUND_TRIP_VALUES))
def test_encoder_round_trips(name, tmp_path):
    value = ROUND_TRIP_VALUES[name]
    assert _same(_through_files({"attr_": value}, tmp_path), {"attr_": value})


json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=8,
)
arrays_like = st.sampled_from([np.float32, np.int16, np.bool_]).flatmap(
    lambda dtype: st.lists(st.integers(-5, 5), max_size=6).map(lambda xs: np.asarray(xs, dtype=dtype))
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.dictionaries(st.text(max_size=4), json_like | arrays_like, max_size=4))
def test_encoder_round_trips_nested_values(value, tmp_path):
    assert _same(_through_files(value, tmp_path), value)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (np.array([1, "a"], dtype=object), r"attr_.*only str"),
        (np.array(["a", None], dtype=object), r"attr_.*NoneType"),
        (object(), r"attr_.*builtins.object"),
        ({1, 2}, r"attr_.*builtins.set"),
        ({"k": [lambda x: x]}, r"attr_\.k\[0\].*function"),
        (pd.DataFrame({"d": [{"a": 1}]}), r"attr_\['d'\].*only str"),
        (pd.DataFrame({"v": [1]}, index=pd.MultiIndex.from_tuples([("a", 1)])), r"MultiIndex"),
        (pd.Series([1, None], dtype="Int64"), r"extension dtype"),
        (np.ma.masked_array([1, 2], mask=[0, 1]), r"subclass"),
        (np.zeros(2, dtype=[("a", "f4")]), r"dtype"),
        ({(1, 2): "tuple key"}, r"dict keys"),
    ],
)
def test_encoder_rejects_what_needs_pickle(value, match):
    with pytest.raises(TypeError, match=match):
        encode_tree({"attr_": value}, path="model")


def test_save_rejects_unsupported_attribute_before_writing(tiny, tmp_path):
    model, _ = tiny
    model.custom_state_ = {"ok": 1, "callback": print}
    try:
        with pytest.raises(TypeError, match=r"custom_state_\.callback"):
            model.save(tmp_path / "m")
    finally:
        del model.custom_state_
    assert not (tmp_path / "m").exists()


def test_new_attributes_round_trip(tiny, tmp_path):
    model, _ = tiny
    model.extra_table_ = pd.DataFrame({"score": [0.1, 0.2]}, index=["A", "B"])
    try:
        model.save(tmp_path / "m")
    finally:
        del model.extra_table_
    loaded = PTRAG.load(tmp_path / "m", adata=False)
    pd.testing.assert_frame_equal(loaded.extra_table_, pd.DataFrame({"score": [0.1, 0.2]}, index=["A", "B"]))


def _saved_attributes(model) -> dict:
    return {name: value for name, value in model._get_user_attributes() if name.endswith("_")}


@pytest.mark.parametrize("with_adata", [False, True])
def test_round_trip(tiny, saved, with_adata):
    model, data = tiny
    fresh = _fresh(data)
    loaded = PTRAG.load(saved, adata=fresh if with_adata else False)
    assert (loaded.adata is fresh) == with_adata
    assert not loaded.module.training
    # Every saved attribute, weights and buffers come back identical, types included.
    original, restored = _saved_attributes(model), _saved_attributes(loaded)
    assert sorted(original) == sorted(restored)
    for name in original:
        if name != "registry_" or not with_adata:  # with an AnnData the registry is the new registration's
            assert _same(original[name], restored[name]), name
    for (k, a), (k2, b) in zip(model.module.state_dict().items(), loaded.module.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    for (k, a), (_, b) in zip(model.module.named_buffers(), loaded.module.named_buffers(), strict=True):
        assert torch.equal(a, b), k
    # Same predictions, both modes, and the same retrieval table.
    np.testing.assert_array_equal(loaded.predict(fresh, inplace=False), model.predict(data, inplace=False))
    controls = fresh[fresh.obs["gene"] == "non-targeting"].copy()
    perts = [str(p) for p in model.training_perturbations_[:2]]
    np.testing.assert_array_equal(
        loaded.predict(controls, perturbations=perts).X, model.predict(controls, perturbations=perts).X
    )
    query = [str(data.obs.loc[data.obs["split"] == "test", "gene"].iloc[0])]
    pd.testing.assert_frame_equal(loaded.get_retrieval(query, adata=fresh), model.get_retrieval(query, adata=data))


def test_round_trip_with_batches_then_fine_tune(tmp_path):
    data = make_small_adata(n_perturbations=4, n_genes=20, n_cells_per_perturbation=16, n_control_cells=32, n_batches=2)
    scvi.settings.seed = 0
    PTRAG.setup_anndata(data, batch_key="gem_group")
    model = PTRAG(data, perturbation_embeddings=data.uns["gene_embeddings"], **TINY)
    model.train(max_steps=2)
    model.save(tmp_path / "m")
    fresh = _fresh(data)
    loaded = PTRAG.load(tmp_path / "m", adata=fresh)
    mapping = loaded.registry_["field_registries"]["batch"]["state_registry"]["categorical_mapping"]
    np.testing.assert_array_equal(mapping, model.registry_["field_registries"]["batch"]["state_registry"]["categorical_mapping"])
    np.testing.assert_array_equal(loaded.predict(inplace=False), model.predict(data, inplace=False))
    loaded.train(max_steps=2)  # a loaded model can be trained further
    assert loaded.is_trained


def test_load_without_adata_warns(saved):
    with pytest.warns(UserWarning, match="loaded without"):
        loaded = PTRAG.load(saved)
    assert loaded.adata is None


def test_save_anndata(tiny, tmp_path):
    model, data = tiny
    model.save(tmp_path / "m", save_anndata=True, compression="gzip")
    assert (tmp_path / "m" / "adata.h5ad").is_file()
    loaded = PTRAG.load(tmp_path / "m")
    assert loaded.adata is not None and loaded.adata.n_obs == data.n_obs
    np.testing.assert_array_equal(loaded.predict(inplace=False), model.predict(data, inplace=False))


def test_prefix_and_backup_url(tiny, tmp_path):
    model, data = tiny
    model.save(tmp_path / "m", prefix="run1_")
    assert (tmp_path / "m" / "run1_model.safetensors").is_file()
    loaded = PTRAG.load(tmp_path / "m", adata=False, prefix="run1_")
    np.testing.assert_array_equal(loaded.predict(data, inplace=False), model.predict(data, inplace=False))
    with pytest.raises(ModelFileError, match="not written by ptrag_sc"):
        PTRAG.load(tmp_path / "m", adata=False)
    # Missing files are fetched from the backup URL, then checked like local ones.
    base = (tmp_path / "m").as_uri()
    loaded = PTRAG.load(tmp_path / "downloaded", adata=False, prefix="run1_", backup_url=base)
    np.testing.assert_array_equal(loaded.predict(data, inplace=False), model.predict(data, inplace=False))


def test_load_checks_genes(saved, tiny):
    _, data = tiny
    fresh = _fresh(data)
    with pytest.raises(ValueError, match=r"2 missing \(e.g. \['GENE.*0 extra"):
        PTRAG.load(saved, adata=fresh[:, 2:].copy())
    renamed = fresh.copy()
    renamed.var_names = ["X" + g for g in renamed.var_names]
    with pytest.raises(ValueError, match=r"30 missing.*30 extra"):
        PTRAG.load(saved, adata=renamed)
    reordered = fresh[:, fresh.var_names[::-1]].copy()
    with pytest.raises(ValueError, match=r"different order.*adata\[:, genes\]"):
        PTRAG.load(saved, adata=reordered)
    # The documented fix works.
    genes = PTRAG.load(saved, adata=False).var_names
    loaded = PTRAG.load(saved, adata=reordered[:, genes].copy())
    assert list(loaded.adata.var_names) == list(genes)


def test_save_overwrite(tiny, saved, tmp_path):
    model, data = tiny
    path = tmp_path / "m"
    model.save(path)
    with pytest.raises(ValueError, match="already exists.*overwrite=True"):
        model.save(path)
    (path / "notes.txt").write_text("mine")
    (path / WEIGHTS_FNAME).write_bytes(b"damaged")
    model.save(path, overwrite=True)
    assert (path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in path.iterdir()) == sorted([MANIFEST_FNAME, ARRAYS_FNAME, WEIGHTS_FNAME, "notes.txt"])
    PTRAG.load(path, adata=False)


class _Payload:
    """Unpickling this creates a marker file: stands for arbitrary code in a crafted model file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickles_never_run(copy_of, tmp_path):
    marker = tmp_path / "code_ran"
    payload = _Payload(marker)

    # 1. A crafted scvi-tools model.pt: refused by load, load_registry and view_setup_args.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save({"model_state_dict": {}, "attr_dict": payload, "var_names": payload}, legacy / "model.pt")
    for call in (
        lambda: PTRAG.load(legacy, adata=False),
        lambda: PTRAG.load(legacy),
        lambda: PTRAG.load_registry(legacy),
        lambda: PTRAG.view_setup_args(legacy),
    ):
        with pytest.raises(ModelFileError, match=r"model.pt.*arbitrary code.*convert_legacy_model"):
            call()
    with pytest.raises(NotImplementedError, match="convert_legacy_model"):
        PTRAG.convert_legacy_save(legacy, tmp_path / "x")

    # 2. The same model.pt next to a real model: ignored.
    shutil.copyfile(legacy / "model.pt", copy_of / "model.pt")
    PTRAG.load(copy_of, adata=False)

    # 3. Pickles where the loader expects arrays, weights or JSON.
    cases = tmp_path / "cases"
    for name, damage, match in [
        ("npz with object array", lambda p: np.savez(p / ARRAYS_FNAME, a0=np.array([payload], dtype=object)), "object arrays"),
        ("npz that is a pickle", lambda p: (p / ARRAYS_FNAME).write_bytes(pickle.dumps(payload)), "not a numpy .npz"),
        ("weights that are a pickle", lambda p: torch.save({"w": payload}, p / WEIGHTS_FNAME), "safetensors"),
    ]:
        path = cases / name.replace(" ", "_")
        shutil.copytree(copy_of, path)
        damage(path)
        _rehash(path)
        with pytest.raises(ModelFileError, match=match):
            PTRAG.load(path, adata=False)
    assert not marker.exists()

    # The payload is live: the explicit opt-in does run it (and the file is no model).
    with pytest.raises(ModelFileError):
        PTRAG.convert_legacy_model(legacy, tmp_path / "converted", trust_pickle=True)
    assert marker.exists()


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m["attributes"].update(memory_={"$type": "pickle", "data": "gASV"}), r"memory_: unknown node type 'pickle'"),
        (lambda m: m["attributes"].update(__class__="x"), r"invalid attribute name '__class__'"),
        (lambda m: m["attributes"].update(module={"$type": "dict", "items": {}}), r"invalid attribute name 'module'"),
        (lambda m: m["attributes"].update(best_epoch_={"plain": "object"}), r"best_epoch_: unknown node type None"),
        (lambda m: m["attributes"].update(best_epoch_={"$type": "ndarray", "key": "../../etc/passwd"}), r"refers to array"),
        (lambda m: m["attributes"]["init_params_"]["items"]["non_kwargs"]["items"].update(evil=1), r"constructor argument.*'evil'"),
        (lambda m: m["attributes"]["init_params_"]["items"]["non_kwargs"]["items"].update(retrieval="rm -rf"), r"cannot be built.*retrieval"),
        (lambda m: m["registry"]["items"].update(model_name="SCVI"), r"holds a SCVI model, not a PTRAG"),
        (lambda m: m["registry"]["items"].pop("setup_args"), r"registry lacks"),
        (lambda m: m.update(attributes=["not", "a", "dict"]), r"lacks a valid 'attributes'"),
        (lambda m: m.update(format_version=99), r"format version 99.*up to 1\. Upgrade ptrag_sc"),
        (lambda m: m.update(format_version="1"), r"invalid format_version"),
    ],
)
def test_odd_manifest_content(copy_of, edit, match):
    _edit_manifest(copy_of, edit)
    with pytest.raises(ModelFileError, match=r"model\.json.*" + match):
        PTRAG.load(copy_of, adata=False)


def _damage_weights(transform):
    def damage(path):
        state = load_file(str(path / WEIGHTS_FNAME))
        save_file(transform(state), str(path / WEIGHTS_FNAME))
        _rehash(path)

    return damage


def _drop_first(state):
    state.pop(next(iter(state)))
    return state


def _write(name, content: bytes, rehash=False):
    def damage(path):
        (path / name).write_bytes(content)
        if rehash:
            _rehash(path)

    return damage


def _truncate(name, rehash=False):
    def damage(path):
        raw = (path / name).read_bytes()
        (path / name).write_bytes(raw[: len(raw) // 2])
        if rehash:
            _rehash(path)

    return damage


RANDOM = np.random.default_rng(0).bytes(4096)


def _other_tool(path):
    for f in path.iterdir():
        f.unlink()
    (path / "config.json").write_text("{}")
    (path / "pytorch_model.bin").write_bytes(RANDOM)

FAULTS = {
    "no manifest, other tool": (
        _other_tool,
        ModelFileError, r"no model\.json.*config\.json.*not written by ptrag_sc",
    ),
    "other tool's model.json": (_write(MANIFEST_FNAME, b'{"architectures": ["Bert"]}'), ModelFileError, r"model\.json.*another tool"),
    "empty manifest": (_write(MANIFEST_FNAME, b""), ModelFileError, r"model\.json.*empty"),
    "truncated manifest": (_truncate(MANIFEST_FNAME), ModelFileError, r"model\.json.*not valid JSON"),
    "random manifest": (_write(MANIFEST_FNAME, RANDOM), ModelFileError, r"model\.json.*(UTF-8|JSON)"),
    "deep JSON": (_write(MANIFEST_FNAME, b"[" * 100_000 + b"]" * 100_000), ModelFileError, r"model\.json.*(deeply|JSON)"),
    "missing weights": (lambda p: (p / WEIGHTS_FNAME).unlink(), FileNotFoundError, r"model\.safetensors is missing"),
    "empty weights": (_write(WEIGHTS_FNAME, b""), ModelFileError, r"model\.safetensors.*empty"),
    "truncated weights": (_truncate(WEIGHTS_FNAME), ModelFileError, r"model\.safetensors.*truncated"),
    "changed weights": (_write(WEIGHTS_FNAME, RANDOM[:100]), ModelFileError, r"model\.safetensors.*(truncated|wrong size)"),
    "truncated weights, manifest updated": (_truncate(WEIGHTS_FNAME, rehash=True), ModelFileError, r"model\.safetensors.*not a readable safetensors"),
    "random weights, manifest updated": (_write(WEIGHTS_FNAME, RANDOM, rehash=True), ModelFileError, r"model\.safetensors.*not a readable safetensors"),
    "weight missing": (_damage_weights(_drop_first), ModelFileError, r"model\.safetensors.*do not fit.*Missing key"),
    "weight extra": (_damage_weights(lambda s: {**s, "extra": torch.zeros(1)}), ModelFileError, r"model\.safetensors.*Unexpected key"),
    "weight of wrong shape": (
        _damage_weights(lambda s: {k: (torch.zeros(3) if i == 0 else v) for i, (k, v) in enumerate(s.items())}),
        ModelFileError, r"model\.safetensors.*size mismatch",
    ),
    "missing arrays": (lambda p: (p / ARRAYS_FNAME).unlink(), FileNotFoundError, r"model_arrays\.npz is missing"),
    "empty arrays": (_write(ARRAYS_FNAME, b""), ModelFileError, r"model_arrays\.npz.*empty"),
    "random arrays": (_write(ARRAYS_FNAME, RANDOM), ModelFileError, r"model_arrays\.npz.*(truncated|wrong size|SHA-256)"),
    "random arrays, manifest updated": (_write(ARRAYS_FNAME, RANDOM, rehash=True), ModelFileError, r"model_arrays\.npz.*not a numpy \.npz"),
    "truncated arrays, manifest updated": (_truncate(ARRAYS_FNAME, rehash=True), ModelFileError, r"model_arrays\.npz.*npz"),
    "array removed": (
        lambda p: (np.savez(p / ARRAYS_FNAME, a0=np.zeros(1)), _rehash(p)),
        ModelFileError, r"model\.json.*refers to array 'a\d+'",
    ),
    "same size, other content": (
        lambda p: (p / ARRAYS_FNAME).write_bytes(bytes(reversed((p / ARRAYS_FNAME).read_bytes()))),
        ModelFileError, r"model_arrays\.npz.*SHA-256.*modified",
    ),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_cases(copy_of, fault):
    damage, error, match = FAULTS[fault]
    damage(copy_of)
    with pytest.raises(error, match="(?s)" + match):
        PTRAG.load(copy_of, adata=False)


def test_missing_and_empty_directories(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PTRAG.load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PTRAG.load_registry(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        PTRAG.load(tmp_path / "empty")
    with pytest.raises(NotADirectoryError, match="is a file"):
        PTRAG.load(saved / MANIFEST_FNAME)


def test_load_registry(tiny, saved, capsys):
    model, _ = tiny
    registry = PTRAG.load_registry(saved)
    assert _same(registry, model.registry_)
    assert registry["setup_args"]["perturbation_key"] == "gene"
    PTRAG.view_setup_args(saved)
    assert "perturbation_key" in capsys.readouterr().out


def test_legacy_conversion(tiny, tmp_path):
    model, data = tiny
    old = tmp_path / "old"
    BaseModelClass.save(model, str(old), save_anndata=True)  # scvi-tools' pickle format
    with pytest.raises(ModelFileError, match=r"pickle format.*trust_pickle=True"):
        PTRAG.load(old)
    with pytest.raises(ValueError, match="trust_pickle=True"):
        PTRAG.convert_legacy_model(old, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    PTRAG.convert_legacy_model(old, tmp_path / "new", trust_pickle=True)
    loaded = PTRAG.load(tmp_path / "new")  # with the AnnData saved next to the old model
    assert loaded.adata is not None
    np.testing.assert_array_equal(loaded.predict(_fresh(data), inplace=False), model.predict(data, inplace=False))
    with pytest.raises(ValueError, match="already exists"):
        PTRAG.convert_legacy_model(old, tmp_path / "new", trust_pickle=True)
