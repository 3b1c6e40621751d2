"""Pickle-free model files: the schema, round trips, older formats, fault cases and malicious files."""

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
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load, load_file, save, save_file
from scvi.model.base import BaseModelClass

from ptrag_sc import PTRAG
from ptrag_sc.model import ModelFileError
from ptrag_sc.model._io import (
    ADATA_FNAME,
    FORMAT_VERSION,
    MANIFEST_FNAME,
    MIGRATIONS,
    WEIGHTS_FNAME,
)
from ptrag_sc.model._schema import decode, encode

TINY = {"n_hidden": 16, "n_layers": 1, "n_heads": 2, "cell_set_size": 8, "n_candidates": 4}
#: A model saved in format version 1 (ptrag_sc 0.1.0, commit 0edcd07), with its AnnData and its
#: predictions on it (written by tests/data/make_model_v1.py).
V1_MODEL = Path(__file__).parent / "data" / "model_v1"


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
    manifest = json.loads((path / MANIFEST_FNAME).read_text())
    for name in manifest["files"]:
        raw = (path / name).read_bytes()
        manifest["files"][name] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    (path / MANIFEST_FNAME).write_text(json.dumps(manifest))


def _edit_manifest(path: Path, edit) -> None:
    manifest = json.loads((path / MANIFEST_FNAME).read_text())
    edit(manifest)
    (path / MANIFEST_FNAME).write_text(json.dumps(manifest))


def _edit_tensors(path: Path, edit) -> None:
    tensors = load_file(str(path / WEIGHTS_FNAME))
    save_file(edit(tensors), str(path / WEIGHTS_FNAME))
    _rehash(path)


def _same(a, b) -> bool:
    """Equal values of the same kinds (dtypes included), recursively; a tuple equals a list, a
    numpy scalar the Python number it is saved as."""
    if isinstance(a, pd.DataFrame):
        try:
            pd.testing.assert_frame_equal(a, b, check_exact=True, check_index_type=True, check_column_type=True)
        except AssertionError:
            return False
        return a.index.dtype == b.index.dtype and a.columns.dtype == b.columns.dtype
    if isinstance(a, np.generic) and not isinstance(b, np.generic | np.ndarray):  # saved as a plain number
        return _same(a.item(), b)
    if isinstance(a, np.ndarray | np.generic):
        return (
            isinstance(b, np.ndarray | np.generic)
            and a.dtype == b.dtype
            and np.shape(a) == np.shape(b)
            and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and np.isnan(a):
        return isinstance(b, float) and np.isnan(b)
    return type(a) is type(b) and a == b


def _through_files(value):
    """Encode, write JSON + safetensors as `save` does, read back, decode."""
    tensors: dict = {}
    node = encode(value, "value", tensors)
    arrays = {k: v.numpy() for k, v in load(save(tensors)).items()} if tensors else {}
    used: set = set()
    out = decode(json.loads(json.dumps(node, allow_nan=False)), "value", arrays, used)
    assert used == set(arrays)
    return out


ROUND_TRIP_VALUES = {
    "none": None,
    "bool": True,
    "int": -3,
    "big int": 2**80,
    "float": 0.1,
    "nan": float("nan"),
    "-inf": float("-inf"),
    "str": 'naïve ✓ "quoted" $type',
    "list": [1, "a", None, [2.5, False]],
    "dict": {"b": {"c": [1, 2]}, "": 0},
    "float32 array": np.arange(6, dtype=np.float32).reshape(2, 3),
    "int64 array": np.array([1, -2, 3], dtype=np.int64),
    "uint8 array": np.array([0, 255], dtype=np.uint8),
    "bool array": np.array([True, False]),
    "float array with nan": np.array([np.nan, np.inf, 1.0]),
    "big-endian array": np.array([1.5, 2.5], dtype=">f8").astype("<f8"),
    "unicode array": np.array(["a", "βγ", ""]),
    "2-d unicode array": np.array([["a", "b"], ["c", "d"]]),
    "object array of str": np.array(["GENE1", "GENE2"], dtype=object),
    "empty object array": np.array([], dtype=object),
    "object array of float": np.array([0.5, 1.5], dtype=object),
    "0-d array": np.array(3.0),
    "embedding table": pd.DataFrame(
        np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32),
        index=pd.Index(["A", "B", "C"], dtype=object),
        columns=[f"dim{i}" for i in range(4)],
    ),
    "history frame (object floats)": pd.DataFrame(
        {"train_loss": np.array([0.5, 0.25], dtype=object)}, index=pd.Index([0, 1], name="epoch")
    ),
    "empty frame": pd.DataFrame(np.zeros((2, 0)), index=["a", "b"], columns=pd.Index([], dtype=object)),
}


@pytest.mark.parametrize("name", list(ROUND_TRIP_VALUES))
def test_schema_round_trips(name):
    value = ROUND_TRIP_VALUES[name]
    assert _same(_through_files({"attr_": value}), {"attr_": value})


def test_schema_turns_numpy_scalars_and_tuples_into_plain_values():
    out = _through_files({"a": np.float32(0.25), "b": np.int64(7), "c": np.str_("x"), "d": (1, "a")})
    assert out == {"a": 0.25, "b": 7, "c": "x", "d": [1, "a"]}
    assert [type(v) for v in out.values()] == [float, int, str, list]


json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=3).filter(lambda k: not k.startswith("$")), children, max_size=3),
    max_leaves=8,
)
arrays_like = st.sampled_from([np.float32, np.int16, np.bool_, np.uint8]).flatmap(
    lambda dtype: st.lists(st.integers(0, 5), max_size=6).map(lambda xs: np.asarray(xs, dtype=dtype))
)


@settings(max_examples=40, deadline=None)
@given(value=st.dictionaries(st.text(max_size=4).filter(lambda k: not k.startswith("$")), json_like | arrays_like, max_size=4))
def test_schema_round_trips_nested_values(value):
    assert _same(_through_files(value), value)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (np.array([1, "a"], dtype=object), r"attr_.*only str or only numbers"),
        (np.array(["a", None], dtype=object), r"attr_.*NoneType"),
        (object(), r"attr_.*builtins.object"),
        ({1, 2}, r"attr_.*builtins.set"),
        ({"k": [lambda x: x]}, r"attr_\.k\[0\].*function"),
        (pd.DataFrame({"a": [1.0], "b": ["x"]}), r"one numpy dtype"),
        (pd.DataFrame({"d": [{"a": 1}]}), r"attr_\.values.*only str"),
        (pd.DataFrame({"v": [1]}, index=pd.MultiIndex.from_tuples([("a", 1)])), r"attr_\.index.*tuple"),
        (pd.Series([1, None], dtype="Int64"), r"pandas"),
        (np.ma.masked_array([1, 2], mask=[0, 1]), r"MaskedArray"),
        (np.zeros(2, dtype=[("a", "f4")]), r"dtype"),
        (np.array([1 + 2j]), r"dtype complex"),
        (np.array(["2024-01-01"], dtype="datetime64[D]"), r"dtype"),
        ({(1, 2): "tuple key"}, r"dict keys"),
        ({"$tensor": "data.x"}, r"not starting with '\$'"),
        (torch.zeros(2), r"torch"),
    ],
)
def test_schema_rejects_what_it_cannot_hold(value, match):
    with pytest.raises(TypeError, match=match):
        encode({"attr_": value}, "model", {})


@pytest.mark.parametrize(
    ("node", "match"),
    [
        ({"$type": "pickle", "data": "gASV"}, r"unknown tagged value"),
        ({"$tensor": "data.x", "$strings": []}, r"unknown tagged value"),
        ({"$tensor": "../../etc/passwd"}, r"refers to array"),
        ({"$tensor": "data.a", "extra": 1}, r"unknown tagged value"),
        ({"$strings": ["a", 1], "shape": [2]}, r"invalid string array"),
        ({"$strings": ["a"], "shape": [3]}, r"shape \[3\] does not fit 1"),
        ({"$float": "1e999"}, r"invalid special float"),
        ({"$frame": {"values": 1}}, r"a frame has"),
    ],
)
def test_schema_decodes_only_what_it_writes(node, match):
    with pytest.raises(ValueError, match=match):
        decode({"x": node}, "value", {"data.a": np.zeros(1)}, set())


def test_save_rejects_unsupported_attribute_before_writing(tiny, tmp_path):
    model, _ = tiny
    model.custom_state_ = {"ok": 1, "callback": print}
    try:
        with pytest.raises(TypeError, match=r"custom_state_\.callback"):
            model.save(tmp_path / "m")
    finally:
        del model.custom_state_
    assert list(tmp_path.iterdir()) == []


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
    # Every saved attribute, weights and buffers come back identical, dtypes included.
    original, restored = _saved_attributes(model), _saved_attributes(loaded)
    assert sorted(original) == sorted(restored)
    for name in original:
        if name != "registry_" or not with_adata:  # with an AnnData the registry is the new registration's
            assert _same(original[name], restored[name]), name
    for (k, a), (k2, b) in zip(model.module.state_dict().items(), loaded.module.state_dict().items(), strict=True):
        assert k == k2
        assert torch.equal(a, b)
    # Same predictions, both modes, and the same retrieval table.
    np.testing.assert_array_equal(loaded.predict(fresh, inplace=False), model.predict(data, inplace=False))
    controls = fresh[fresh.obs["gene"] == "non-targeting"].copy()
    perts = [str(p) for p in model.training_perturbations_[:2]]
    np.testing.assert_array_equal(loaded.predict(controls, perturbations=perts).X, model.predict(controls, perturbations=perts).X)
    query = [str(data.obs.loc[data.obs["split"] == "test", "gene"].iloc[0])]
    pd.testing.assert_frame_equal(loaded.get_retrieval(query, adata=fresh), model.get_retrieval(query, adata=data))


def test_memory_is_saved_field_by_field(saved):
    manifest = json.loads((saved / MANIFEST_FNAME).read_text())
    assert manifest["format_version"] == FORMAT_VERSION == max(MIGRATIONS)
    memory = manifest["attributes"]["memory_"]
    assert memory["kind"] == "response"
    assert memory["embeddings"] == {"$tensor": "data.memory_.embeddings"}
    assert memory["perturbations"]["$strings"]
    names = set(load_file(str(saved / WEIGHTS_FNAME)))
    assert "data.memory_.responses" in names
    assert any(n.startswith("module.") for n in names)
    assert {p.name for p in saved.iterdir()} == {MANIFEST_FNAME, WEIGHTS_FNAME}


def test_version_1_folder_loads_and_predicts_as_it_did(tmp_path):
    loaded = PTRAG.load(V1_MODEL)  # with the AnnData saved beside it
    reference = np.load(V1_MODEL / "reference_prediction.npy")
    np.testing.assert_allclose(loaded.predict(inplace=False), reference, atol=1e-6)
    # Saving rewrites it in the current format; the old arrays file is not carried over.
    shutil.copytree(V1_MODEL, tmp_path / "m")
    loaded.save(tmp_path / "m", overwrite=True, save_anndata=True)
    assert {p.name for p in (tmp_path / "m").iterdir()} == {MANIFEST_FNAME, WEIGHTS_FNAME, ADATA_FNAME, "reference_prediction.npy"}
    assert json.loads((tmp_path / "m" / MANIFEST_FNAME).read_text())["format_version"] == FORMAT_VERSION
    np.testing.assert_allclose(PTRAG.load(tmp_path / "m").predict(inplace=False), reference, atol=1e-6)


def test_version_1_damage_is_reported(tmp_path):
    path = tmp_path / "v1"
    shutil.copytree(V1_MODEL, path)
    raw = (path / "model_arrays.npz").read_bytes()
    (path / "model_arrays.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ModelFileError, match=r"model_arrays\.npz.*truncated"):
        PTRAG.load(path, adata=False)


def test_missing_or_unknown_memory_fields_are_refused_with_the_version(copy_of):
    _edit_manifest(copy_of, lambda m: m["attributes"]["memory_"].pop("responses"))
    _edit_tensors(copy_of, lambda t: {k: v for k, v in t.items() if k != "data.memory_.responses"})
    with pytest.raises(ModelFileError, match=r"memory \(format version 3, ptrag_sc .*\) lacks the field\(s\) \['responses'\]"):
        PTRAG.load(copy_of, adata=False)
    _edit_manifest(copy_of, lambda m: m["attributes"]["memory_"].update(responses=None, evidence_v9=1))
    with pytest.raises(ModelFileError, match=r"has field\(s\) \['evidence_v9'\] this version does not know"):
        PTRAG.load(copy_of, adata=False)


def test_version_2_folder_reads_the_sources_fits_by_name(copy_of, tiny):
    # Format version 2 kept what the evidence sources fitted under one prefix.
    model, data = tiny
    prefix = {"linear_embedding": "embedding", "linear_annotation": "annotation"}

    def as_version_2(manifest):
        manifest["format_version"] = 2
        memory = manifest["attributes"]["memory_"]
        for key in [k for k in memory if k.startswith("sources.")]:
            source, name = key.removeprefix("sources.").split(".", 1)
            memory[f"sources.{prefix[source]}_{name}"] = memory.pop(key)

    _edit_manifest(copy_of, as_version_2)
    loaded = PTRAG.load(copy_of, adata=_fresh(data))
    assert set(loaded.memory.sources) == set(model.memory.sources) == set(prefix)
    np.testing.assert_array_equal(loaded.predict(inplace=False), model.predict(data, inplace=False))


def test_an_evidence_source_this_version_lacks_is_named(copy_of):
    def rename(manifest):
        manifest["attributes"]["memory_"]["evidence_model.sources"]["$strings"][0] = "future"

    _edit_manifest(copy_of, rename)
    with pytest.raises(ModelFileError, match=r"stacks evidence source\(s\) \['future'\] this version"):
        PTRAG.load(copy_of, adata=False)


def test_weight_mismatch_names_the_tensors(copy_of):
    first = next(k for k in load_file(str(copy_of / WEIGHTS_FNAME)) if k.startswith("module."))
    _edit_tensors(copy_of, lambda t: {**{k: v for k, v in t.items() if k != first}, "module.extra": torch.zeros(1)})
    with pytest.raises(ModelFileError, match=rf"model\.safetensors.*format version 3.*missing \['{first[7:]}'\]; unexpected \['extra'\]"):
        PTRAG.load(copy_of, adata=False)


def test_load_without_adata_warns(saved):
    with pytest.warns(UserWarning, match="loaded without"):
        loaded = PTRAG.load(saved)
    assert loaded.adata is None


def test_save_anndata_is_checksummed(tiny, tmp_path):
    model, data = tiny
    path = tmp_path / "m"
    model.save(path, save_anndata=True, compression="gzip")
    loaded = PTRAG.load(path)
    assert loaded.adata is not None
    assert loaded.adata.n_obs == data.n_obs
    np.testing.assert_array_equal(loaded.predict(inplace=False), model.predict(data, inplace=False))
    raw = (path / ADATA_FNAME).read_bytes()
    (path / ADATA_FNAME).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ModelFileError, match=r"adata\.h5ad.*truncated"):
        PTRAG.load(path)
    _fresh(data).write_h5ad(path / ADATA_FNAME)  # another AnnData in its place
    with pytest.raises(ModelFileError, match=r"adata\.h5ad.*(SHA-256|size|truncated)"):
        PTRAG.load(path)
    PTRAG.load(path, adata=_fresh(data))  # an AnnData passed explicitly does not read the file


def test_prefix_and_backup_url(tiny, tmp_path):
    model, data = tiny
    model.save(tmp_path / "m", prefix="run1_")
    assert (tmp_path / "m" / "run1_model.safetensors").is_file()
    loaded = PTRAG.load(tmp_path / "m", adata=False, prefix="run1_")
    np.testing.assert_array_equal(loaded.predict(data, inplace=False), model.predict(data, inplace=False))
    with pytest.raises(ModelFileError, match="not written by `save`"):
        PTRAG.load(tmp_path / "m", adata=False)
    # Missing files are fetched from the backup URL, then checked like local ones.
    base = (tmp_path / "m").as_uri()
    loaded = PTRAG.load(tmp_path / "downloaded", adata=False, prefix="run1_", backup_url=base)
    np.testing.assert_array_equal(loaded.predict(data, inplace=False), model.predict(data, inplace=False))


@pytest.mark.parametrize("prefix", ["../", "a/b_", "..\\x_", "\x00"])
def test_prefix_is_a_plain_name(tiny, tmp_path, prefix):
    model, _ = tiny
    (tmp_path / "m").mkdir()
    with pytest.raises(ValueError, match="prefix"):
        model.save(tmp_path / "m", prefix=prefix, overwrite=True)
    with pytest.raises(ValueError, match="prefix"):
        PTRAG.load(tmp_path / "m", prefix=prefix)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["m"]


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
    genes = PTRAG.load(saved, adata=False).var_names  # the documented fix works
    loaded = PTRAG.load(saved, adata=reordered[:, genes].copy())
    assert list(loaded.adata.var_names) == list(genes)


def test_other_control_label_is_named_and_the_anndata_left_alone(saved, tiny):
    _, data = tiny
    fresh = _fresh(data)
    fresh.obs["gene"] = fresh.obs["gene"].astype(str).replace({"non-targeting": "ctrl"})
    before = (fresh.obs.copy(), dict(fresh.uns))
    with pytest.raises(ValueError, match=r"control label 'non-targeting'.*\['ctrl'\].*replace") as info:
        PTRAG.load(saved, adata=fresh)
    assert not isinstance(info.value, ModelFileError)
    pd.testing.assert_frame_equal(fresh.obs, before[0])
    assert fresh.uns.keys() == before[1].keys()


def test_save_overwrite_keeps_other_files(tiny, tmp_path):
    model, _ = tiny
    path = tmp_path / "m"
    model.save(path)
    with pytest.raises(ValueError, match=r"already exists.*overwrite=True"):
        model.save(path)
    (path / "notes.txt").write_text("mine")
    (path / "figures").mkdir()
    (path / "figures" / "a.png").write_bytes(b"png")
    model.save(path, prefix="other_", overwrite=True)  # a second model beside the first
    (path / WEIGHTS_FNAME).write_bytes(b"damaged")
    model.save(path, overwrite=True)
    assert (path / "notes.txt").read_text() == "mine"
    assert (path / "figures" / "a.png").read_bytes() == b"png"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [MANIFEST_FNAME, WEIGHTS_FNAME, "other_model.json", "other_model.safetensors", "notes.txt", "figures"]
    )
    PTRAG.load(path, adata=False)
    PTRAG.load(path, adata=False, prefix="other_")
    assert not [p for p in tmp_path.iterdir() if p.name != "m"]  # no temporary folder left


def test_save_refuses_to_replace_a_users_anndata(tiny, tmp_path):
    model, data = tiny
    path = tmp_path / "m"
    model.save(path)
    _fresh(data).write_h5ad(path / ADATA_FNAME)  # the user's own file, not listed in the manifest
    digest = hashlib.sha256((path / ADATA_FNAME).read_bytes()).hexdigest()
    with pytest.raises(FileExistsError, match=r"adata\.h5ad was not written by `save`"):
        model.save(path, overwrite=True, save_anndata=True)
    model.save(path, overwrite=True)  # without save_anndata it is kept
    assert hashlib.sha256((path / ADATA_FNAME).read_bytes()).hexdigest() == digest
    model.save(tmp_path / "n", save_anndata=True)
    model.save(tmp_path / "n", overwrite=True)  # the model's own AnnData goes with the old model
    assert not (tmp_path / "n" / ADATA_FNAME).exists()


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

    # 3. Pickles where the loader expects weights or JSON, and in a version-1 arrays file.
    cases = tmp_path / "cases"
    v1_npz = tmp_path / "v1"
    shutil.copytree(V1_MODEL, v1_npz)
    (v1_npz / "model_arrays.npz").write_bytes(pickle.dumps(payload))
    _rehash(v1_npz)
    with pytest.raises(ModelFileError, match=r"not a numpy \.npz"):
        PTRAG.load(v1_npz, adata=False)
    np.savez(v1_npz / "model_arrays.npz", a0=np.array([payload], dtype=object))
    _rehash(v1_npz)
    with pytest.raises(ModelFileError, match="plain arrays"):
        PTRAG.load(v1_npz, adata=False)
    path = cases / "weights_pickle"
    shutil.copytree(copy_of, path)
    torch.save({"w": payload}, path / WEIGHTS_FNAME)
    _rehash(path)
    with pytest.raises(ModelFileError, match="safetensors"):
        PTRAG.load(path, adata=False)
    assert not marker.exists()

    # The payload is live: the explicit opt-in does run it (and the file is no model).
    with pytest.raises(ModelFileError):
        PTRAG.convert_legacy_model(legacy, tmp_path / "converted", trust_pickle=True)
    assert marker.exists()


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m["attributes"].update(memory_={"$type": "pickle", "data": "gASV"}), r"memory_: unknown tagged value"),
        (lambda m: m["attributes"].update(__class__="x"), r"invalid attribute name '__class__'"),
        (lambda m: m["attributes"].update(module={}), r"invalid attribute name 'module'"),
        (lambda m: m["attributes"].update(best_epoch_="three"), r"'best_epoch_' holds a str"),
        (lambda m: m["attributes"].update(is_trained_=1), r"'is_trained_' holds a int"),
        (lambda m: m["attributes"].update(best_epoch_={"$tensor": "../../etc/passwd"}), r"refers to array"),
        (lambda m: m["attributes"]["init_params_"]["non_kwargs"].update(evil=1), r"argument\(s\) \['evil'\]"),
        (lambda m: m["attributes"]["init_params_"]["non_kwargs"].update(retrieval="rm -rf"), r"cannot be built.*retrieval"),
        (lambda m: m["attributes"].pop("init_params_"), r"no valid 'init_params_'"),
        (lambda m: m["registry"].update(model_name="SCVI"), r"holds a SCVI model, not PTRAG"),
        (lambda m: m["registry"].pop("setup_args"), r"registry lacks"),
        (lambda m: m.update(attributes=["not", "a", "dict"]), r"lacks a valid 'attributes'"),
        (lambda m: m.pop("files"), r"lacks a valid 'files'"),
        (lambda m: m.update(format_version=99), r"format version 99.*reads format versions \[1, 2, 3\]\. Upgrade ptrag_sc"),
        (lambda m: m.update(format_version=0), r"invalid format_version 0"),
        (lambda m: m.update(format_version="2"), r"invalid format_version '2'"),
    ],
)
def test_odd_manifest_content(copy_of, edit, match):
    _edit_manifest(copy_of, edit)
    with pytest.raises(ModelFileError, match=r"model\.json.*" + match):
        PTRAG.load(copy_of, adata=False)


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


def _tensors(edit):
    return lambda path: _edit_tensors(path, edit)


FAULTS = {
    "no manifest, other tool": (_other_tool, ModelFileError, r"no model\.json.*config\.json.*not written by `save`"),
    "other tool's model.json": (_write(MANIFEST_FNAME, b'{"architectures": ["Bert"]}'), ModelFileError, r"model\.json.*another tool"),
    "empty manifest": (_write(MANIFEST_FNAME, b""), ModelFileError, r"model\.json.*empty"),
    "truncated manifest": (_truncate(MANIFEST_FNAME), ModelFileError, r"model\.json.*not valid JSON"),
    "random manifest": (_write(MANIFEST_FNAME, RANDOM), ModelFileError, r"model\.json.*(UTF-8|JSON)"),
    "deep JSON": (_write(MANIFEST_FNAME, b"[" * 100_000 + b"]" * 100_000), ModelFileError, r"model\.json.*(deeply|JSON)"),
    "NaN in JSON": (lambda p: (p / MANIFEST_FNAME).write_text((p / MANIFEST_FNAME).read_text().replace('"best_step_": 5', '"best_step_": NaN')), ModelFileError, r"NaN is not JSON"),
    "missing weights": (lambda p: (p / WEIGHTS_FNAME).unlink(), FileNotFoundError, r"model\.safetensors is missing"),
    "empty weights": (_write(WEIGHTS_FNAME, b""), ModelFileError, r"model\.safetensors.*empty"),
    "truncated weights": (_truncate(WEIGHTS_FNAME), ModelFileError, r"model\.safetensors.*truncated"),
    "changed weights": (_write(WEIGHTS_FNAME, RANDOM[:100]), ModelFileError, r"model\.safetensors.*(truncated|wrong size)"),
    "truncated weights, manifest updated": (_truncate(WEIGHTS_FNAME, rehash=True), ModelFileError, r"model\.safetensors.*not safetensors"),
    "random weights, manifest updated": (_write(WEIGHTS_FNAME, RANDOM, rehash=True), ModelFileError, r"model\.safetensors.*not safetensors"),
    "same size, other content": (
        lambda p: (p / WEIGHTS_FNAME).write_bytes(bytes(reversed((p / WEIGHTS_FNAME).read_bytes()))),
        ModelFileError, r"model\.safetensors.*SHA-256.*modified",
    ),
    "weight of wrong shape": (
        _tensors(lambda t: {k: (torch.zeros(3) if k == "module.gene_ceiling" else v) for k, v in t.items()}),
        ModelFileError, r"model\.safetensors.*of another shape \['gene_ceiling \(3,\)",
    ),
    "array removed": (_tensors(lambda t: {k: v for k, v in t.items() if k != "data.memory_.embeddings"}), ModelFileError, r"memory_\.embeddings: refers to array"),
    "array extra": (_tensors(lambda t: {**t, "data.hidden": torch.zeros(1)}), ModelFileError, r"arrays no entry refers to: \['data.hidden'\]"),
    "tensor outside the namespaces": (_tensors(lambda t: {**t, "evil": torch.zeros(1)}), ModelFileError, r"neither 'module"),
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
    with pytest.raises(ValueError, match="exists"):
        PTRAG.convert_legacy_model(old, tmp_path / "new", trust_pickle=True)


def test_defaultdict_registry_is_saved_as_a_dict(tiny, saved):
    model, _ = tiny
    assert isinstance(model.registry_["field_registries"], defaultdict)
    assert type(PTRAG.load_registry(saved)["field_registries"]) is dict
