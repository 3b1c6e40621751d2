"""Saving and loading models without pickle.

scvi-tools writes a model as one ``model.pt`` read back with ``torch.load(weights_only=False)``,
so opening a model file received from someone else can run arbitrary code. :class:`SafeSaveMixin`
replaces ``save``/``load``/``load_registry`` with a format made only of data:

``model.json``
    Manifest: format name and version, model class, library versions, the scvi-tools registry,
    the attributes ending in ``_`` (``init_params_``, ``memory_``, ``history_`` ...) and the
    gene names, encoded as a typed tree (see :func:`encode_tree`); plus the size and SHA-256 of
    the two files below.
``model_arrays.npz``
    Every numpy array of that tree (numbers, booleans and unicode strings; never object arrays),
    read with ``np.load(allow_pickle=False)``.
``model.safetensors``
    The module's ``state_dict``, read with :func:`safetensors.torch.load_file`.
``adata.h5ad``
    Only with ``save(..., save_anndata=True)``.

Loading never unpickles: a directory in scvi-tools' format (``model.pt``) is refused with a
message pointing to :meth:`SafeSaveMixin.convert_legacy_model`, the only place that calls
``torch.load(weights_only=False)``, and only with ``trust_pickle=True``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import warnings
import zipfile
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

if TYPE_CHECKING:
    from anndata import AnnData

#: Name written into every manifest; anything else is not a ptrag_sc model.
FORMAT_NAME = "ptrag_sc.model"
#: Version of the on-disk layout. Loading refuses manifests from a newer version.
FORMAT_VERSION = 1

MANIFEST_FNAME = "model.json"
ARRAYS_FNAME = "model_arrays.npz"
WEIGHTS_FNAME = "model.safetensors"
ADATA_FNAME = "adata.h5ad"
#: scvi-tools' pickle-based file; never opened except by ``convert_legacy_model(trust_pickle=True)``.
LEGACY_FNAME = "model.pt"

_TYPE = "$type"
#: Array dtype kinds written to the npz: bool, integers, floats, complex, unicode, bytes, datetimes.
_ARRAY_KINDS = frozenset("biufcUSMm")
_SUPPORTED = (
    "None, bool, int, float, str, list, tuple, dict (keys: str, int, float, bool, None), "
    "numpy arrays and scalars of numbers, booleans or strings (object arrays only when all "
    "elements are str, or all bool, int or float), pandas DataFrame / Series / Index / "
    "Categorical built from those, CPU-convertible torch tensors"
)


class ModelFileError(ValueError):
    """A model directory or one of its files cannot be loaded (missing, damaged, foreign or newer)."""


class _Malformed(Exception):
    """Internal: the encoded tree does not have the expected shape (converted to ModelFileError)."""


# --------------------------------------------------------------------------- encoding
class _Encoder:
    """Turns a tree of supported values into JSON-able nodes plus a dict of numpy arrays."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def _store(self, array: np.ndarray) -> str:
        key = f"a{len(self.arrays)}"
        self.arrays[key] = np.asarray(array, order="C")  # (ascontiguousarray would turn 0-d into 1-d)
        return key

    def _unsupported(self, value, path: str, why: str = "") -> TypeError:
        kind = f"{type(value).__module__}.{type(value).__qualname__}"
        return TypeError(
            f"Cannot save `{path}`: {why or f'values of type {kind} are not supported'}. "
            f"Model files hold only data: {_SUPPORTED}. Store this attribute as one of those types."
        )

    def array(self, array: np.ndarray, path: str) -> dict:
        """An ndarray node. Object arrays are stored as unicode or numeric arrays and restored as object."""
        node: dict[str, Any] = {_TYPE: "ndarray"}
        if array.dtype.kind == "O":
            array = self._object_array(array, path)
            node["object"] = True
        elif array.dtype.kind not in _ARRAY_KINDS or array.dtype.fields is not None:
            raise self._unsupported(array, path, f"arrays of dtype {array.dtype} are not supported")
        if array.dtype.kind == "U" and any(s.endswith("\x00") for s in array.ravel().tolist()):
            raise self._unsupported(array, path, "strings ending in NUL characters do not survive a numpy unicode array")
        node["key"] = self._store(array)
        return node

    def _object_array(self, array: np.ndarray, path: str) -> np.ndarray:
        items = array.ravel().tolist()
        if all(isinstance(x, str) for x in items):  # includes the empty array
            return np.asarray(items, dtype=str).reshape(array.shape) if items else np.zeros(array.shape, dtype="U1")
        for kinds, dtype in (((bool, np.bool_), bool), ((int, np.integer), np.int64), ((float, np.floating), np.float64)):
            if all(isinstance(x, kinds) and (dtype is bool or not isinstance(x, (bool, np.bool_))) for x in items):
                try:
                    return np.asarray(items, dtype=dtype).reshape(array.shape)
                except OverflowError:
                    break
        found = sorted({type(x).__name__ for x in items})
        raise self._unsupported(
            array,
            path,
            f"an object array may hold only str, or only bool, int or float; it holds {found}",
        )

    def index(self, index: pd.Index, path: str) -> dict:
        if isinstance(index, pd.MultiIndex):
            raise self._unsupported(index, path, "MultiIndex is not supported")
        name = self.encode(index.name, f"{path}.name")
        if isinstance(index, pd.RangeIndex):
            return {_TYPE: "range_index", "start": index.start, "stop": index.stop, "step": index.step, "name": name}
        if isinstance(index, pd.CategoricalIndex):
            return {_TYPE: "categorical_index", "values": self.categorical(index.array, path), "name": name}
        return {_TYPE: "index", "values": self.column(index, path), "name": name}

    def categorical(self, cat: pd.Categorical, path: str) -> dict:
        return {
            _TYPE: "categorical",
            "codes": self.array(np.asarray(cat.codes), f"{path}.codes"),
            "categories": self.index(cat.categories, f"{path}.categories"),
            "ordered": bool(cat.ordered),
        }

    def column(self, values: pd.Series | pd.Index, path: str) -> dict:
        """The values of a Series or Index: numpy, categorical or pandas' string dtype."""
        dtype = values.dtype
        if isinstance(dtype, pd.CategoricalDtype):
            return self.categorical(pd.Categorical(values), path)
        if isinstance(dtype, pd.StringDtype):
            if pd.isna(values).any():
                raise self._unsupported(values, path, "string columns with missing values are not supported")
            node = self.array(np.asarray(values.to_numpy(dtype=object)), path)
            node["pandas_dtype"] = "string"
            return node
        if not isinstance(dtype, np.dtype):
            raise self._unsupported(values, path, f"pandas extension dtype {dtype} is not supported")
        return self.array(np.asarray(values.to_numpy()), path)

    def dataframe(self, frame: pd.DataFrame, path: str) -> dict:
        node: dict[str, Any] = {
            _TYPE: "dataframe",
            "index": self.index(frame.index, f"{path}.index"),
            "columns": self.index(frame.columns, f"{path}.columns"),
        }
        dtypes = set(frame.dtypes.tolist())
        if frame.shape[1] > 1 and len(dtypes) == 1 and isinstance(next(iter(dtypes)), np.dtype) and next(iter(dtypes)).kind in "biufc":
            node["block"] = self.array(frame.to_numpy(), f"{path}.values")  # wide numeric tables in one entry
        else:
            node["data"] = [self.column(frame.iloc[:, i], f"{path}[{frame.columns[i]!r}]") for i in range(frame.shape[1])]
        return node

    def encode(self, value, path: str):
        # numpy scalars first: np.float64 and np.str_ subclass float and str.
        if isinstance(value, np.generic):
            node = self.array(np.asarray(value), path)
            node[_TYPE] = "scalar"
            return node
        if value is None or isinstance(value, (bool, str, int)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {_TYPE: "float", "value": repr(value)}
        if isinstance(value, np.ndarray):
            if type(value) is not np.ndarray:
                raise self._unsupported(value, path, f"ndarray subclass {type(value).__name__} is not supported; use np.asarray")
            return self.array(value, path)
        if isinstance(value, torch.Tensor):
            try:
                array = value.detach().cpu().numpy()
            except (TypeError, RuntimeError) as exc:
                raise self._unsupported(value, path, f"tensor of dtype {value.dtype} has no numpy equivalent") from exc
            node = self.array(array, path)
            node[_TYPE] = "tensor"
            return node
        if isinstance(value, pd.DataFrame):
            return self.dataframe(value, path)
        if isinstance(value, pd.Series):
            return {
                _TYPE: "series",
                "values": self.column(value, path),
                "index": self.index(value.index, f"{path}.index"),
                "name": self.encode(value.name, f"{path}.name"),
            }
        if isinstance(value, pd.Index):
            return self.index(value, path)
        if isinstance(value, pd.Categorical):
            return self.categorical(value, path)
        if isinstance(value, list):
            return [self.encode(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, tuple) and type(value) is tuple:
            return {_TYPE: "tuple", "items": [self.encode(v, f"{path}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, dict):
            return self.mapping(value, path)
        raise self._unsupported(value, path)

    def mapping(self, value: dict, path: str) -> dict:
        node: dict[str, Any] = {_TYPE: "dict"}
        if isinstance(value, defaultdict):
            factories = {dict: "dict", list: "list", None: None}
            if value.default_factory not in factories:
                raise self._unsupported(value, path, f"defaultdict with factory {value.default_factory!r} is not supported")
            node["default_factory"] = factories[value.default_factory]
        if all(isinstance(k, str) for k in value):
            node["items"] = {k: self.encode(v, f"{path}.{k}") for k, v in value.items()}
            return node
        pairs = []
        for k, v in value.items():
            if not (k is None or isinstance(k, (str, int, float, bool))) or isinstance(k, np.generic):
                raise self._unsupported(k, f"{path} key {k!r}", f"dict keys of type {type(k).__name__} are not supported")
            pairs.append([self.encode(k, f"{path} key"), self.encode(v, f"{path}[{k!r}]")])
        node["pairs"] = pairs
        return node


def encode_tree(value, path: str = "value") -> tuple[Any, dict[str, np.ndarray]]:
    """Encode ``value`` into a JSON-able node and the numpy arrays it refers to.

    Raises
    ------
    TypeError
        If a value (at the reported path) is of an unsupported type.
    """
    encoder = _Encoder()
    return encoder.encode(value, path), encoder.arrays


# --------------------------------------------------------------------------- decoding
class _Decoder:
    """Rebuilds values from nodes, checking every node; errors are ``_Malformed`` with a path."""

    def __init__(self, arrays) -> None:
        self.arrays = arrays
        self.used: set[str] = set()

    def _get(self, node: dict, field: str, path: str):
        if field not in node:
            raise _Malformed(f"{path}: entry {field!r} is missing")
        return node[field]

    def array(self, node: dict, path: str) -> np.ndarray:
        key = self._get(node, "key", path)
        if not isinstance(key, str) or key not in self.arrays:
            raise _Malformed(f"{path}: refers to array {key!r}, which the array file does not hold")
        array = self.arrays[key]
        self.used.add(key)
        if node.get("object"):
            array = array.astype(object)
        if node.get("pandas_dtype") == "string":
            array = pd.array(array, dtype="string")
        return array

    def index(self, node, path: str) -> pd.Index:
        kind = node.get(_TYPE) if isinstance(node, dict) else None
        if kind == "range_index":
            bounds = [self._get(node, f, path) for f in ("start", "stop", "step")]
            if not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds) or bounds[2] == 0:
                raise _Malformed(f"{path}: invalid range index {bounds}")
            return pd.RangeIndex(*bounds, name=self.decode(node.get("name"), f"{path}.name"))
        if kind == "categorical_index":
            return pd.CategoricalIndex(
                self.categorical(self._get(node, "values", path), path), name=self.decode(node.get("name"), f"{path}.name")
            )
        if kind == "index":
            values = self.column(self._get(node, "values", path), path)
            if np.ndim(values) != 1:
                raise _Malformed(f"{path}: index values must be one-dimensional")
            name = self.decode(node.get("name"), f"{path}.name")
            return pd.Index(values, name=name, dtype=values.dtype, copy=False, tupleize_cols=False)
        raise _Malformed(f"{path}: expected an index, found {_describe(node)}")

    def categorical(self, node, path: str) -> pd.Categorical:
        if not (isinstance(node, dict) and node.get(_TYPE) == "categorical"):
            raise _Malformed(f"{path}: expected a categorical, found {_describe(node)}")
        codes = self.array(self._get(node, "codes", path), f"{path}.codes")
        if codes.dtype.kind not in "iu" or codes.ndim != 1:
            raise _Malformed(f"{path}: categorical codes must be a 1-D integer array")
        categories = self.index(self._get(node, "categories", path), f"{path}.categories")
        try:
            return pd.Categorical.from_codes(codes, categories=categories, ordered=bool(node.get("ordered", False)))
        except (ValueError, TypeError) as exc:
            raise _Malformed(f"{path}: invalid categorical ({exc})") from exc

    def column(self, node, path: str):
        if isinstance(node, dict) and node.get(_TYPE) == "categorical":
            return self.categorical(node, path)
        if isinstance(node, dict) and node.get(_TYPE) == "ndarray":
            return self.array(node, path)
        raise _Malformed(f"{path}: expected column values, found {_describe(node)}")

    def dataframe(self, node: dict, path: str) -> pd.DataFrame:
        index = self.index(self._get(node, "index", path), f"{path}.index")
        columns = self.index(self._get(node, "columns", path), f"{path}.columns")
        if "block" in node:
            block = self.array(node["block"], f"{path}.values")
            if block.shape != (len(index), len(columns)):
                raise _Malformed(f"{path}: values of shape {block.shape} do not fit {len(index)} rows x {len(columns)} columns")
            return pd.DataFrame(block, index=index, columns=columns, copy=False)
        data = self._get(node, "data", path)
        if not isinstance(data, list) or len(data) != len(columns):
            raise _Malformed(f"{path}: expected {len(columns)} columns of data")
        values = [self.column(c, f"{path}[{i}]") for i, c in enumerate(data)]
        if any(np.ndim(v) != 1 or len(v) != len(index) for v in values):
            raise _Malformed(f"{path}: a column does not have {len(index)} rows")
        frame = pd.DataFrame(dict(enumerate(values)), index=index)
        frame.columns = columns
        return frame

    def decode(self, node, path: str):
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [self.decode(v, f"{path}[{i}]") for i, v in enumerate(node)]
        if not isinstance(node, dict):
            raise _Malformed(f"{path}: unexpected {_describe(node)}")
        kind = node.get(_TYPE)
        if kind == "float":
            text = node.get("value")
            if text not in ("nan", "inf", "-inf"):
                raise _Malformed(f"{path}: invalid special float {text!r}")
            return float(text)
        if kind == "ndarray":
            return self.array(node, path)
        if kind == "scalar":
            array = self.array(node, path)
            if array.ndim != 0:
                raise _Malformed(f"{path}: a scalar must be a 0-d array")
            return array[()]
        if kind == "tensor":
            array = self.array(node, path)
            if array.dtype.kind not in "biufc":
                raise _Malformed(f"{path}: a tensor must hold numbers")
            return torch.from_numpy(np.array(array))
        if kind == "dataframe":
            return self.dataframe(node, path)
        if kind == "series":
            index = self.index(self._get(node, "index", path), f"{path}.index")
            values = self.column(self._get(node, "values", path), path)
            if np.ndim(values) != 1 or len(values) != len(index):
                raise _Malformed(f"{path}: series values do not fit its index")
            return pd.Series(values, index=index, name=self.decode(node.get("name"), f"{path}.name"), copy=False)
        if kind in ("index", "range_index", "categorical_index"):
            return self.index(node, path)
        if kind == "categorical":
            return self.categorical(node, path)
        if kind == "tuple":
            items = self._get(node, "items", path)
            if not isinstance(items, list):
                raise _Malformed(f"{path}: tuple items must be a list")
            return tuple(self.decode(v, f"{path}[{i}]") for i, v in enumerate(items))
        if kind == "dict":
            return self.mapping(node, path)
        raise _Malformed(f"{path}: unknown node type {kind!r}")

    def mapping(self, node: dict, path: str) -> dict:
        out: dict = {}
        if "default_factory" in node:
            factories = {"dict": dict, "list": list, None: None}
            if node["default_factory"] not in factories:
                raise _Malformed(f"{path}: unknown default factory {node['default_factory']!r}")
            out = defaultdict(factories[node["default_factory"]])
        if "items" in node:
            items = node["items"]
            if not isinstance(items, dict):
                raise _Malformed(f"{path}: dict items must be a JSON object")
            for k, v in items.items():
                out[k] = self.decode(v, f"{path}.{k}")
            return out
        pairs = self._get(node, "pairs", path)
        if not isinstance(pairs, list):
            raise _Malformed(f"{path}: dict pairs must be a list")
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, list) and len(pair) == 2):
                raise _Malformed(f"{path}: pair {i} is not a [key, value] list")
            key = self.decode(pair[0], f"{path} key {i}")
            if not (key is None or isinstance(key, (str, int, float, bool))):
                raise _Malformed(f"{path}: dict key {i} is not a plain scalar")
            out[key] = self.decode(pair[1], f"{path}[{key!r}]")
        return out


def _describe(node) -> str:
    if isinstance(node, dict):
        return f"a node of type {node.get(_TYPE)!r}"
    return f"a JSON {type(node).__name__}"


def decode_tree(node, arrays, path: str = "value"):
    """Inverse of :func:`encode_tree` (``arrays``: a mapping of array name to ndarray)."""
    return _Decoder(arrays).decode(node, path)


# --------------------------------------------------------------------------- files
def _fname(prefix: str | None, name: str) -> str:
    return f"{prefix or ''}{name}"


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, write) -> None:
    """Write through a temporary file in the same directory, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("ptrag_sc", "scvi-tools", "torch"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


def save_model(
    model,
    dir_path,
    *,
    prefix: str | None = None,
    overwrite: bool = False,
    save_anndata: bool = False,
    anndata_source: Path | None = None,
    **anndata_write_kwargs,
) -> None:
    """Write ``model`` to ``dir_path`` in the pickle-free format (see the module docstring).

    ``anndata_source``: an h5ad file copied as the model's AnnData (legacy conversion).
    """
    from safetensors.torch import save_file

    dir_path = Path(dir_path)
    # Everything is encoded before anything touches the disk: an unsupported attribute type
    # raises a TypeError without leaving a half-written directory.
    attributes = {name: value for name, value in model._get_user_attributes() if name.endswith("_") and name != "registry_"}
    attr_nodes = {}
    encoder = _Encoder()
    for name, value in attributes.items():
        attr_nodes[name] = encoder.encode(value, name)
    registry_node = encoder.encode(model.registry_, "registry_")
    var_names_node = encoder.array(np.asarray(model.get_var_names()).astype(str), "var_names")
    arrays = encoder.arrays
    state_dict = model.module.state_dict()
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise TypeError(f"Cannot save the module: state_dict entries {not_tensors[:5]} are not tensors.")
    # Cloned: safetensors refuses tensors that share memory (tied weights).
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}

    if save_anndata and anndata_source is None and model.adata is None:
        raise ValueError("`save_anndata=True` but the model has no AnnData attached.")
    if dir_path.exists() and not overwrite:
        raise ValueError(
            f"{dir_path} already exists. Pass `overwrite=True` to replace the model files in it, or "
            "choose another directory."
        )
    if dir_path.exists() and not dir_path.is_dir():
        raise NotADirectoryError(f"{dir_path} exists and is not a directory.")
    dir_path.mkdir(parents=True, exist_ok=True)

    weights_path = dir_path / _fname(prefix, WEIGHTS_FNAME)
    arrays_path = dir_path / _fname(prefix, ARRAYS_FNAME)
    manifest_path = dir_path / _fname(prefix, MANIFEST_FNAME)
    meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)}
    _write_atomic(weights_path, lambda p: save_file(state, str(p), metadata=meta))

    def write_arrays(p: Path) -> None:
        with open(p, "wb") as handle:
            np.savez(handle, **arrays)

    _write_atomic(arrays_path, write_arrays)
    if anndata_source is not None:
        import shutil

        save_anndata = True
        shutil.copyfile(anndata_source, dir_path / _fname(prefix, ADATA_FNAME))
    elif save_anndata:
        model.adata.write(dir_path / _fname(prefix, ADATA_FNAME), **anndata_write_kwargs)

    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "versions": _library_versions(),
        "anndata_saved": bool(save_anndata),
        "files": {
            WEIGHTS_FNAME: {"bytes": weights_path.stat().st_size, "sha256": _file_digest(weights_path)},
            ARRAYS_FNAME: {"bytes": arrays_path.stat().st_size, "sha256": _file_digest(arrays_path)},
        },
        "var_names": var_names_node,
        "registry": registry_node,
        "attributes": attr_nodes,
    }
    text = json.dumps(manifest, indent=1, allow_nan=False)
    # The manifest goes last: a save that fails halfway leaves no manifest that would accept it.
    _write_atomic(manifest_path, lambda p: p.write_text(text, encoding="utf-8"))


class _ModelFiles:
    """The decoded content of a model directory (nothing executed, nothing unpickled)."""

    def __init__(self, source: Path, weights_path: Path, manifest: dict, var_names, registry: dict, attributes: dict):
        self.source = source  # the manifest (or legacy model.pt) the content comes from
        self.weights_path = weights_path
        self.manifest = manifest
        self.var_names = var_names
        self.registry = registry
        self.attributes = attributes


def _error(path: Path, what: str) -> ModelFileError:
    return ModelFileError(f"Cannot load {path}: {what}")


def _legacy_message(dir_path: Path, legacy: Path) -> str:
    return (
        f"{dir_path} holds a model in scvi-tools' pickle format ({legacy.name}), which can run "
        "arbitrary code when opened, so ptrag_sc does not read it. If you trust its source, convert it "
        f"once with `PTRAG.convert_legacy_model({str(dir_path)!r}, new_dir, trust_pickle=True)` and load "
        "`new_dir` instead."
    )


def _fetch(backup_url, dir_path: Path, names: list[str], *, required: bool = True) -> None:
    """Download missing files: ``backup_url`` is a base URL (file names appended) or a name -> URL mapping.

    Downloaded files are only data to the loader: they go through the same checks as local ones.
    """
    import urllib.error
    import urllib.request

    for name in names:
        target = dir_path / name
        if target.exists():
            continue
        if isinstance(backup_url, dict):
            url = backup_url.get(name)
            if url is None:
                continue
        else:
            url = f"{str(backup_url).rstrip('/')}/{name}"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "ptrag_sc"})) as response:
                _write_atomic(target, lambda p, r=response: _copy_stream(r, p))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            if required:
                raise FileNotFoundError(f"Cannot download {name} from {url}: {exc}") from None


def _copy_stream(response, path: Path) -> None:
    import shutil

    with open(path, "wb") as handle:
        shutil.copyfileobj(response, handle, 1 << 20)


def _check_dir(dir_path: Path, prefix: str | None) -> Path:
    """The manifest path, or a clear error for missing, empty, legacy and foreign directories."""
    if not dir_path.exists():
        raise FileNotFoundError(f"Cannot load a model from {dir_path}: the directory does not exist.")
    if not dir_path.is_dir():
        raise NotADirectoryError(
            f"Cannot load a model from {dir_path}: it is a file; pass the directory written by `model.save`."
        )
    manifest_path = dir_path / _fname(prefix, MANIFEST_FNAME)
    if manifest_path.is_file():
        return manifest_path
    legacy = dir_path / _fname(prefix, LEGACY_FNAME)
    if legacy.exists():
        raise ModelFileError(_legacy_message(dir_path, legacy))
    present = sorted(p.name for p in dir_path.iterdir())
    if not present:
        raise FileNotFoundError(f"Cannot load a model from {dir_path}: the directory is empty.")
    raise ModelFileError(
        f"Cannot load a model from {dir_path}: it has no {manifest_path.name} (found {present[:10]}"
        f"{' ...' if len(present) > 10 else ''}). It was not written by ptrag_sc's `save`"
        + (f" with prefix={prefix!r}" if prefix else "")
        + ", or the save did not finish."
    )


def _read_manifest(manifest_path: Path) -> dict:
    raw = manifest_path.read_bytes()
    if not raw.strip():
        raise _error(manifest_path, "the file is empty (an interrupted save or copy?).")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise _error(manifest_path, f"the file is not UTF-8 text (damaged, or not a ptrag_sc model): {exc}.") from None
    except RecursionError:
        raise _error(manifest_path, "the JSON is nested too deeply.") from None
    except json.JSONDecodeError as exc:
        raise _error(manifest_path, f"the file is not valid JSON (truncated or damaged?): {exc}.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise _error(manifest_path, f"it is not a ptrag_sc model manifest (no \"format\": {FORMAT_NAME!r}); written by another tool?")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _error(manifest_path, f"invalid format_version {version!r}.")
    if version > FORMAT_VERSION:
        written = manifest.get("versions", {})
        raise _error(
            manifest_path,
            f"it was written in model format version {version} (by ptrag_sc "
            f"{written.get('ptrag_sc', '?') if isinstance(written, dict) else '?'}); this ptrag_sc reads "
            f"format versions up to {FORMAT_VERSION}. Upgrade ptrag_sc to load it.",
        )
    for field, kind in (("files", dict), ("attributes", dict), ("registry", dict), ("var_names", dict)):
        if not isinstance(manifest.get(field), kind):
            raise _error(manifest_path, f"the manifest lacks a valid {field!r} entry.")
    return manifest


def _check_file(manifest_path: Path, manifest: dict, path: Path, name: str) -> None:
    """The file exists and is byte-for-byte the one the manifest describes."""
    if not path.is_file():
        raise FileNotFoundError(f"Cannot load {manifest_path.parent}: {path.name} is missing (listed in {manifest_path.name}).")
    expected = manifest["files"].get(name)
    if not isinstance(expected, dict):
        raise _error(manifest_path, f"the manifest does not describe {name}.")
    size = path.stat().st_size
    if size == 0:
        raise _error(path, "the file is empty (an interrupted save or copy?).")
    if size != expected.get("bytes"):
        what = "truncated" if isinstance(expected.get("bytes"), int) and size < expected["bytes"] else "of the wrong size"
        raise _error(path, f"the file is {what} ({size} bytes; {manifest_path.name} records {expected.get('bytes')}).")
    if _file_digest(path) != expected.get("sha256"):
        raise _error(
            path,
            f"its content does not match the SHA-256 recorded in {manifest_path.name}: the file was modified "
            "or damaged after saving, or comes from another save.",
        )


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    if not zipfile.is_zipfile(path):
        raise _error(path, "not a numpy .npz archive (truncated or damaged?).")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise _error(path, "it holds object arrays (pickled data), which ptrag_sc never unpickles.") from None
        raise _error(path, f"not a readable numpy .npz archive ({exc}).") from None
    except Exception as exc:  # zipfile, zlib and npy-header errors of damaged archives
        raise _error(path, f"not a readable numpy .npz archive (truncated or damaged?): {type(exc).__name__}: {exc}.") from None
    for key, array in arrays.items():
        if not isinstance(array, np.ndarray):
            raise _error(path, f"entry {key!r} is not a numpy array.")
        if array.dtype.kind not in _ARRAY_KINDS or array.dtype.fields is not None:
            raise _error(path, f"entry {key!r} has unsupported dtype {array.dtype}.")
    return arrays


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError and friends: a damaged or foreign file
        raise _error(path, f"not a readable safetensors file (truncated or damaged?): {type(exc).__name__}: {exc}.") from None


def read_model_files(dir_path, prefix: str | None = None, backup_url=None, *, weights: bool = True):
    """Read and decode a model directory; returns ``(_ModelFiles, state_dict or None)``."""
    dir_path = Path(dir_path)
    if backup_url is not None:
        dir_path.mkdir(parents=True, exist_ok=True)
        _fetch(backup_url, dir_path, [_fname(prefix, n) for n in (MANIFEST_FNAME, ARRAYS_FNAME, WEIGHTS_FNAME)])
    manifest_path = _check_dir(dir_path, prefix)
    manifest = _read_manifest(manifest_path)
    arrays_path = dir_path / _fname(prefix, ARRAYS_FNAME)
    _check_file(manifest_path, manifest, arrays_path, ARRAYS_FNAME)
    arrays = _read_arrays(arrays_path)
    decoder = _Decoder(arrays)
    try:
        var_names = decoder.array(manifest["var_names"], "var_names")
        registry = decoder.decode(manifest["registry"], "registry")
        attributes = {name: decoder.decode(node, name) for name, node in manifest["attributes"].items()}
    except _Malformed as exc:
        raise _error(manifest_path, f"malformed entry {exc}.") from None
    except RecursionError:
        raise _error(manifest_path, "the JSON is nested too deeply.") from None
    if var_names.ndim != 1 or var_names.dtype.kind != "U":
        raise _error(manifest_path, "var_names must be a 1-D array of strings.")
    if not isinstance(registry, dict) or not isinstance(registry.get("setup_args"), dict) or not isinstance(
        registry.get("field_registries"), dict
    ):
        raise _error(manifest_path, "the registry lacks 'setup_args' or 'field_registries'.")
    for name in attributes:
        if not (name.isidentifier() and name.endswith("_") and not name.startswith("_")) or name == "registry_":
            raise _error(manifest_path, f"invalid attribute name {name!r} (saved attributes end in '_').")
    state = None
    if weights:
        weights_path = dir_path / _fname(prefix, WEIGHTS_FNAME)
        _check_file(manifest_path, manifest, weights_path, WEIGHTS_FNAME)
        state = _read_weights(weights_path)
    weights_path = dir_path / _fname(prefix, WEIGHTS_FNAME)
    return _ModelFiles(manifest_path, weights_path, manifest, var_names.astype(str), registry, attributes), state


def check_genes(adata: AnnData, var_names: np.ndarray, dir_path) -> None:
    """``adata`` has exactly the model's genes, in the model's order."""
    reference = pd.Index(np.asarray(var_names).astype(str))
    genes = pd.Index(np.asarray(adata.var_names).astype(str))
    if genes.equals(reference):
        return
    missing = reference.difference(genes)
    extra = genes.difference(reference)
    if len(missing) == 0 and len(extra) == 0:
        raise ValueError(
            "The AnnData has the model's genes in a different order; predictions and training would "
            "mix up genes. Reorder it first: `genes = PTRAG.load(dir_path, adata=False).var_names`, then "
            f"`adata = adata[:, genes].copy()` (dir_path={str(dir_path)!r})."
        )
    raise ValueError(
        f"The AnnData's genes differ from the {len(reference)} genes the model was trained on: "
        f"{len(missing)} missing (e.g. {missing[:5].tolist()}), {len(extra)} extra (e.g. "
        f"{extra[:5].tolist()}). If it holds all of them, subset it with `adata[:, model.var_names]` "
        "(model loaded without an AnnData)."
    )


def _build(cls, files: _ModelFiles, adata, state: dict[str, torch.Tensor], device):
    """Like scvi-tools' ``_initialize_model`` plus the weight load, from decoded files."""
    source = files.source
    attributes = dict(files.attributes)
    init_params = attributes.pop("init_params_", None)
    if not isinstance(init_params, dict) or not isinstance(init_params.get("non_kwargs"), dict):
        raise _error(source, "no valid 'init_params_' (the model's constructor arguments).")
    kwargs = init_params.get("kwargs") or {}
    if not isinstance(kwargs, dict) or not all(isinstance(v, dict) for v in kwargs.values()):
        raise _error(source, "invalid 'init_params_.kwargs'.")
    arguments = dict(init_params["non_kwargs"])
    for group in kwargs.values():
        arguments.update(group)
    params = inspect.signature(cls.__init__).parameters
    accepted = set(params) - {"self", "adata", "registry"}
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(arguments) - accepted)
    else:
        unknown = sorted(set(arguments) & {"self", "adata", "registry"})
    if unknown:
        raise _error(
            source,
            f"the model was saved with constructor argument(s) {unknown} that this version of "
            f"{cls.__name__} does not take (written by ptrag_sc "
            f"{files.manifest.get('versions', {}).get('ptrag_sc', '?')}).",
        )
    try:
        model = cls(adata, registry=files.registry, **arguments)
    except Exception as exc:  # the arguments come from the file: report them as its fault, cause attached
        raise _error(source, f"the model it describes cannot be built: {type(exc).__name__}: {exc}") from exc
    for name, value in attributes.items():
        try:
            setattr(model, name, value)
        except Exception as exc:
            raise _error(source, f"attribute {name!r} cannot be restored: {type(exc).__name__}: {exc}") from exc
    try:
        model.module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise _error(files.weights_path, f"the weights do not fit the model described by {source.name}: {exc}") from None
    model.to_device(device)
    model.module.eval()
    return model


class SafeSaveMixin:
    """``save``/``load`` for scvi-tools models without pickle (safetensors + JSON + npz).

    Put it before :class:`~scvi.model.base.BaseModelClass` in the bases. Attributes ending in
    ``_`` are saved and restored; they must be made of the types listed in
    :func:`encode_tree` (``save`` raises a ``TypeError`` naming the attribute otherwise).
    """

    def save(
        self,
        dir_path: str | os.PathLike,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        **anndata_write_kwargs,
    ) -> None:
        """Save the model: weights, settings, training state and (optionally) the AnnData.

        Written files (``prefix`` prepended): ``model.json`` (manifest: format version,
        registry, attributes ending in ``_``, gene names), ``model_arrays.npz`` (their
        arrays), ``model.safetensors`` (weights), ``adata.h5ad`` (with ``save_anndata``).
        Nothing is pickled, so :meth:`load` is as safe as reading an h5ad. The optimiser
        state is not saved.

        Parameters
        ----------
        dir_path
            Directory to write; created if missing.
        prefix
            Prefix of the file names (several models in one directory).
        overwrite
            Write into an existing directory, replacing this model's files (other files are
            left alone). Default: error if ``dir_path`` exists.
        save_anndata
            Also write the model's AnnData (``adata.h5ad``), loaded back by
            ``load(dir_path)``.
        **anndata_write_kwargs
            Passed to :meth:`anndata.AnnData.write` (e.g. ``compression="gzip"``).

        Raises
        ------
        ValueError
            If ``dir_path`` exists and ``overwrite`` is False.
        TypeError
            If an attribute ending in ``_`` holds a type that cannot be stored without pickle
            (checked before anything is written).
        """
        for name in ("save_kwargs", "legacy_mudata_format", "datamodule"):
            if anndata_write_kwargs.pop(name, None) not in (None, False):
                raise TypeError(f"`{name}` is a scvi-tools `torch.save` option; ptrag_sc writes models without torch.save.")
        save_model(self, dir_path, prefix=prefix, overwrite=overwrite, save_anndata=save_anndata, **anndata_write_kwargs)

    @classmethod
    def load(
        cls,
        dir_path: str | os.PathLike,
        adata: AnnData | bool | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
        backup_url: str | dict | None = None,
    ):
        """Load a model written by :meth:`save`, without running any code from the directory.

        Files are read with :func:`json.load`, ``np.load(allow_pickle=False)`` and
        :func:`safetensors.torch.load_file`, and checked against the sizes and SHA-256 sums in
        ``model.json``. A directory in scvi-tools' pickle format (``model.pt``) is refused; see
        :meth:`convert_legacy_model`.

        Parameters
        ----------
        dir_path
            Directory written by :meth:`save`.
        adata
            AnnData with the model's genes in the same order; set up from the saved registry
            (no :meth:`setup_anndata` call needed). ``None``: the AnnData saved with the model
            (``save_anndata=True``), or none. ``False``: none.
        accelerator, device
            Where to put the model (Lightning-style, one device).
        prefix
            Prefix of the file names.
        backup_url
            Where to download missing files from: a base URL (file names are appended) or a
            mapping ``{file name: URL}``. Downloaded files are checked like local ones.

        Returns
        -------
        The model, in evaluation mode.

        Raises
        ------
        FileNotFoundError
            If the directory, or a file the manifest lists, does not exist, or the directory is empty.
        ModelFileError
            (a ``ValueError``) If a file is damaged, truncated, from another tool or a newer
            format, pickle-based, or the weights do not fit the model.
        ValueError
            If ``adata``'s genes differ from the model's (the message names them) or are in
            another order.
        """
        from scvi.model._utils import parse_device_args

        _, _, torch_device = parse_device_args(
            accelerator=accelerator, devices=device, return_device="torch", validate_single_device=True
        )
        dir_path = Path(dir_path)
        files, state = read_model_files(dir_path, prefix, backup_url)
        registry = files.registry
        model_name = registry.get("model_name")
        if model_name is not None and model_name != cls.__name__:
            raise _error(files.source, f"it holds a {model_name} model, not a {cls.__name__}.")

        if adata is None:
            adata_path = dir_path / _fname(prefix, ADATA_FNAME)
            if backup_url is not None and files.manifest.get("anndata_saved"):
                _fetch(backup_url, dir_path, [adata_path.name], required=False)
            if files.manifest.get("anndata_saved") and adata_path.is_file():
                from anndata import read_h5ad

                adata = read_h5ad(adata_path)
            else:
                warnings.warn(
                    "No AnnData was passed and none was saved with the model; it is loaded without "
                    "one (pass `adata=` to predict on data, or `adata=False` to silence this).",
                    UserWarning,
                    stacklevel=2,
                )
                adata = None
        elif adata is False:
            adata = None

        if adata is not None:
            check_genes(adata, files.var_names, dir_path)
            method_name = registry.get("setup_method_name", "setup_anndata")
            if method_name != "setup_anndata":
                raise _error(files.source, f"unsupported setup method {method_name!r}.")
            cls.setup_anndata(adata, source_registry=registry, **registry["setup_args"])

        model = _build(cls, files, adata, state, torch_device)
        if adata is not None:
            model._validate_anndata(adata)
        return model

    @staticmethod
    def load_registry(dir_path: str | os.PathLike, prefix: str | None = None) -> dict:
        """The scvi-tools registry saved with a model (setup arguments, field states), read safely."""
        files, _ = read_model_files(Path(dir_path), prefix, weights=False)
        return files.registry

    @staticmethod
    def view_setup_args(dir_path: str | os.PathLike, prefix: str | None = None) -> None:
        """Print the arguments used to set up a saved model's AnnData."""
        from scvi.data import AnnDataManager

        AnnDataManager.view_setup_method_args(SafeSaveMixin.load_registry(dir_path, prefix))

    @classmethod
    def convert_legacy_save(cls, *args, **kwargs):
        """Not supported: scvi-tools' legacy converter unpickles; use :meth:`convert_legacy_model`."""
        raise NotImplementedError(
            "scvi-tools' `convert_legacy_save` reads pickle files. Use "
            f"`{cls.__name__}.convert_legacy_model(old_dir, new_dir, trust_pickle=True)` for models "
            "saved in scvi-tools' format (model.pt) by earlier ptrag_sc versions."
        )

    @classmethod
    def convert_legacy_model(
        cls,
        dir_path: str | os.PathLike,
        output_dir_path: str | os.PathLike,
        *,
        trust_pickle: bool = False,
        prefix: str | None = None,
        overwrite: bool = False,
    ) -> None:
        """Convert a model saved in scvi-tools' pickle format (``model.pt``) to the safe format.

        ``model.pt`` is read with ``torch.load(weights_only=False)``, which **runs any code the
        file contains**: do this only for files from a source you trust, once, and share the
        converted directory instead.

        Parameters
        ----------
        dir_path
            Directory holding ``model.pt`` (and possibly ``adata.h5ad``, copied over).
        output_dir_path
            Directory to write the converted model to.
        trust_pickle
            Must be ``True``: the explicit statement that you trust the file.
        prefix
            Prefix of the file names, in both directories.
        overwrite
            Write into an existing ``output_dir_path``.
        """
        dir_path = Path(dir_path)
        legacy = dir_path / _fname(prefix, LEGACY_FNAME)
        if not legacy.is_file():
            raise FileNotFoundError(f"Cannot convert {dir_path}: {legacy.name} does not exist.")
        if not trust_pickle:
            raise ValueError(
                f"{legacy} is a pickle file: reading it runs any code it contains. Pass "
                "`trust_pickle=True` only if you trust where it comes from."
            )
        if Path(output_dir_path).exists() and not overwrite:
            raise ValueError(f"{output_dir_path} already exists. Pass `overwrite=True` or choose another directory.")
        payload = torch.load(legacy, map_location="cpu", weights_only=False)
        state = payload.get("model_state_dict") if isinstance(payload, dict) else None
        attributes = payload.get("attr_dict") if isinstance(payload, dict) else None
        if not isinstance(state, dict) or not isinstance(attributes, dict) or not isinstance(attributes.get("registry_"), dict):
            raise ModelFileError(
                f"{legacy} is not a scvi-tools model file (expected a dict with 'model_state_dict' and "
                "'attr_dict' holding 'registry_')."
            )
        state = {k: v for k, v in state.items() if k != "pyro_param_store"}
        attributes = dict(attributes)
        registry = attributes.pop("registry_")
        var_names = np.asarray(payload.get("var_names", [])).astype(str)
        files = _ModelFiles(legacy, legacy, {}, var_names, registry, attributes)
        model = _build(cls, files, None, state, torch.device("cpu"))
        saved_adata = dir_path / _fname(prefix, ADATA_FNAME)
        save_model(
            model,
            output_dir_path,
            prefix=prefix,
            overwrite=overwrite,
            anndata_source=saved_adata if saved_adata.is_file() else None,
        )
