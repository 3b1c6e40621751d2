"""What a saved model is made of: the values of its manifest, and the checks of what is read.

A manifest value is JSON (``None``, bool, int, finite float, str, list, dict with str keys) or
one of four tagged forms: ``{"$tensor": key}`` (a number or boolean array in the safetensors
file), ``{"$strings": [...], "shape": [...]}``, ``{"$float": "nan" | "inf" | "-inf"}`` and
``{"$frame": {"values", "index", "columns", "names"}}`` (a DataFrame of one numpy dtype). Object
arrays of only strings or only numbers carry ``"object": true``. Anything else is refused when
saving, naming the value's path; decoding checks every node.
"""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import MISSING, fields
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, NoReturn

import numpy as np
import pandas as pd
import torch

from ..data import RetrievalMemory
from ..data._sources import SOURCES

if TYPE_CHECKING:
    from collections.abc import Container
    from pathlib import Path

    from anndata import AnnData
    from scvi.model.base import BaseModelClass

MANIFEST_FNAME = "model.json"
WEIGHTS_FNAME = "model.safetensors"
#: Name written into every manifest; anything else is not a ptrag_sc model.
FORMAT_NAME = "ptrag_sc.model"
#: Version of the layout written (``ptrag_sc.model._io.MIGRATIONS`` lists those read).
FORMAT_VERSION = 3

_TAGS = {"$tensor": {"object"}, "$strings": {"shape", "object"}, "$float": set(), "$frame": set()}
_OR_NONE = (np.ndarray, type(None))
#: What the model's own attributes hold (others may hold any value of the schema).
KINDS = {
    "init_params_": (dict,),
    "history_": (dict, type(None)),
    "memory_": (dict, type(None)),
    "is_trained_": (bool, np.bool_),
    "best_epoch_": (numbers.Integral, type(None)),
    "best_step_": (numbers.Integral, type(None)),
    **{f"{split}_indices_": _OR_NONE for split in ("train", "validation", "test")},
    **{f"training_{what}_": _OR_NONE for what in ("perturbations", "cell_types")},
    "validation_perturbations_": _OR_NONE,
}


class ModelFileError(ValueError):
    """A model folder or one of its files cannot be loaded (missing, damaged, foreign or newer)."""


def file_error(path: Path, what: str) -> ModelFileError:
    return ModelFileError(f"Cannot load {path}: {what}")


def _unsupported(path: str, why: str) -> TypeError:
    return TypeError(
        f"Cannot save `{path}`: {why}. Model files hold only None, bool, int, float, str, lists, "
        "dicts with str keys, numpy arrays of numbers, booleans or strings, and DataFrames of "
        "one such dtype."
    )


def encode(value: object, path: str, tensors: dict[str, torch.Tensor]) -> object:
    """The JSON node of ``value``; its number arrays go to ``tensors``. ``TypeError`` names
    the ``path`` of a value the schema cannot hold."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if type(value) is np.ndarray:
        return _encode_array(value, path, tensors)
    if isinstance(value, pd.DataFrame):
        dtypes = list(value.dtypes)
        if len(set(map(str, dtypes))) > 1 or not all(isinstance(t, np.dtype) for t in dtypes):
            raise _unsupported(path, "DataFrames must have one numpy dtype for all columns")
        parts = {"values": value.to_numpy(), "index": value.index, "columns": value.columns}
        node = {k: encode(np.asarray(v), f"{path}.{k}", tensors) for k, v in parts.items()}
        names = [value.index.name, value.columns.name]
        return {"$frame": {**node, "names": [encode(n, path, tensors) for n in names]}}
    if isinstance(value, list | tuple):
        return [encode(v, f"{path}[{i}]", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str) or k.startswith("$")]
        if bad:
            why = f"dict keys must be strings not starting with '$', got {bad[:3]}"
            raise _unsupported(path, why)
        return {k: encode(v, f"{path}.{k}", tensors) for k, v in value.items()}
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    raise _unsupported(path, f"values of type {kind} are not supported")


def _encode_array(array: np.ndarray, path: str, tensors: dict) -> dict:
    node: dict = {}
    if array.dtype.kind == "O":
        items, node["object"] = array.ravel().tolist(), True
        if all(isinstance(x, str) for x in items):
            shape = array.shape
            array = np.asarray(items, dtype=str).reshape(shape) if items else np.zeros(shape, "U1")
        elif all(isinstance(x, int | float) and not isinstance(x, bool) for x in items):
            array = np.asarray(items, dtype=np.float64).reshape(array.shape)
        else:
            found = sorted({type(x).__name__ for x in items})
            why = f"an object array may hold only str or only numbers; it holds {found}"
            raise _unsupported(path, why)
    if array.dtype.kind == "U":
        return {"$strings": array.ravel().tolist(), "shape": list(array.shape), **node}
    if array.dtype.kind not in "biuf" or array.dtype.fields is not None:
        raise _unsupported(path, f"arrays of dtype {array.dtype} are not supported")
    key = f"data.{path}"
    while key in tensors:
        key += "'"
    native = np.array(array, dtype=array.dtype.newbyteorder("="), order="C")
    tensors[key] = torch.from_numpy(native)
    return {"$tensor": key, **node}


def decode(node: object, path: str, arrays: dict[str, np.ndarray], used: set[str]) -> object:
    """Inverse of :func:`encode` (``arrays``: the file's arrays by key; keys read go to
    ``used``). ``ValueError`` names the ``path`` of a node :func:`encode` does not write."""
    if node is None or isinstance(node, bool | int | float | str):
        return node
    if isinstance(node, list):
        return [decode(v, f"{path}[{i}]", arrays, used) for i, v in enumerate(node)]
    if not isinstance(node, dict):
        raise ValueError(f"{path}: unexpected JSON {type(node).__name__}")
    tags = [k for k in node if k.startswith("$")]
    if not tags:
        return {k: decode(v, f"{path}.{k}", arrays, used) for k, v in node.items()}
    tag, value = tags[0], node[tags[0]]
    if len(tags) > 1 or tag not in _TAGS or set(node) - {tag} - _TAGS[tag]:
        raise ValueError(f"{path}: unknown tagged value with keys {sorted(node)}")
    if tag == "$float":
        if value not in ("nan", "inf", "-inf"):
            raise ValueError(f"{path}: invalid special float {value!r}")
        return float(value)
    if tag == "$frame":
        return _decode_frame(value, path, arrays, used)
    if tag == "$tensor":
        if not isinstance(value, str) or value not in arrays:
            raise ValueError(f"{path}: refers to array {value!r}, which the array file lacks")
        used.add(value)
        array = arrays[value]
    else:
        shape = node.get("shape")
        if not isinstance(value, list) or not isinstance(shape, list):
            raise ValueError(f"{path}: invalid string array")
        if not all(isinstance(s, str) for s in value):
            raise ValueError(f"{path}: invalid string array")
        if not all(isinstance(n, int) and n >= 0 for n in shape) or math.prod(shape) != len(value):
            raise ValueError(f"{path}: shape {shape} does not fit {len(value)} strings")
        array = np.asarray(value, dtype=str).reshape(shape) if value else np.zeros(shape, "U1")
    return array.astype(object) if node.get("object") else array


def _decode_frame(value: object, path: str, arrays: dict, used: set) -> pd.DataFrame:
    keys = ("values", "index", "columns", "names")
    if not isinstance(value, dict) or set(value) != set(keys):
        raise ValueError(f"{path}: a frame has 'values', 'index', 'columns' and 'names'")
    values, index, columns, names = (decode(value[k], f"{path}.{k}", arrays, used) for k in keys)
    parts = (values, index, columns)
    if not (isinstance(names, list) and len(names) == 2) or not all(
        isinstance(p, np.ndarray) for p in parts
    ):
        raise ValueError(f"{path}: invalid frame")
    if values.shape != (len(index), len(columns)) or index.ndim != 1 or columns.ndim != 1:
        raise ValueError(f"{path}: frame values of shape {values.shape} do not fit its axes")
    index, columns = (
        pd.Index(a, name=n, tupleize_cols=False) for a, n in zip(parts[1:], names, strict=True)
    )
    return pd.DataFrame(values, index=index, columns=columns, copy=False)


def no_constant(name: str) -> NoReturn:
    """``parse_constant`` of :func:`json.loads`: ``NaN`` and ``Infinity`` are not JSON."""
    raise ValueError(f"{name} is not JSON (ptrag_sc never writes it)")


def header(model: BaseModelClass) -> dict:
    """The manifest's first entries: format, version, model class, library versions."""
    versions = {}
    for package in ("ptrag_sc", "scvi-tools", "torch"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "unknown"
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "versions": versions,
    }


def check_header(manifest: dict, readable: Container[int]) -> str:
    """Who wrote ``manifest`` (``"format version N, ptrag_sc X"``); ``ValueError`` unless it is
    a ptrag_sc manifest of a version in ``readable``, saying what to do."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(
            f'it is not a ptrag_sc model manifest (no "format": {FORMAT_NAME!r}); another tool?'
        )
    number, versions = manifest.get("format_version"), manifest.get("versions")
    if not isinstance(number, int) or isinstance(number, bool) or number < 1:
        raise ValueError(f"invalid format_version {number!r}.")
    writer = versions.get("ptrag_sc", "?") if isinstance(versions, dict) else "?"
    written = f"format version {number}, ptrag_sc {writer}"
    if number not in readable:
        advice = (
            "Upgrade ptrag_sc" if number > FORMAT_VERSION else "Use the ptrag_sc that wrote it"
        )
        raise ValueError(
            f"it was written in {written}; this ptrag_sc reads format versions "
            f"{sorted(readable)}. {advice} to load it."
        )
    kinds = {"files": dict, "attributes": dict, "registry": dict, "var_names": object}
    wrong = [k for k, t in kinds.items() if k not in manifest or not isinstance(manifest[k], t)]
    if wrong:
        raise ValueError(f"the manifest lacks a valid {wrong[0]!r} entry.")
    return written


def serialise(model: BaseModelClass) -> tuple[dict, dict[str, torch.Tensor]]:
    """The manifest's ``var_names``, ``registry`` and ``attributes`` (those ending in ``_``),
    and the tensors they refer to with the module's weights under ``module.``."""
    tensors: dict[str, torch.Tensor] = {}
    names = np.asarray(model.get_var_names()).astype(str)
    attributes = {
        k: v for k, v in model._get_user_attributes() if k.endswith("_") and k != "registry_"
    }
    values = {
        "var_names": encode(names, "var_names", tensors),
        "registry": encode(model.registry_, "registry_", tensors),
        "attributes": {k: encode(v, k, tensors) for k, v in attributes.items()},
    }
    state = model.module.state_dict()
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise TypeError(
            f"Cannot save the module: state_dict entries {not_tensors[:5]} are not tensors."
        )
    # Cloned: safetensors refuses tensors that share memory (tied weights).
    tensors.update(
        {f"module.{k}": v.detach().cpu().contiguous().clone() for k, v in state.items()}
    )
    return values, tensors


def deserialise(manifest: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """Inverse of :func:`serialise`, with ``state`` (the weights) and ``unused`` (arrays no
    value refers to)."""
    state = {k.removeprefix("module."): v for k, v in tensors.items() if k.startswith("module.")}
    arrays = {k: v.numpy() for k, v in tensors.items() if k.startswith("data.")}
    if len(state) + len(arrays) != len(tensors):
        raise ValueError("the array file holds tensors named neither 'module.*' nor 'data.*'")
    used: set[str] = set()
    keys = ("var_names", "registry", "attributes")
    content = {k: decode(manifest[k], k, arrays, used) for k in keys}
    return {**content, "state": state, "unused": sorted(set(arrays) - used)}


def constructor_arguments(content: dict) -> dict:
    """The constructor arguments saved in ``init_params_``."""
    init_params = content["attributes"]["init_params_"]
    arguments = dict(init_params["non_kwargs"])
    for group in (init_params.get("kwargs") or {}).values():
        arguments.update(group)
    return arguments


def check_content(content: dict, written: str) -> str | None:
    """What is wrong with decoded model content, in words (``written``: by which version)."""
    var_names, registry, attributes = (
        content.get(k) for k in ("var_names", "registry", "attributes")
    )
    if not (
        isinstance(var_names, np.ndarray) and var_names.ndim == 1 and var_names.dtype.kind in "UO"
    ):
        return "var_names must be a 1-D array of strings."
    setup = registry.get("setup_args") if isinstance(registry, dict) else None
    if not isinstance(setup, dict) or not isinstance(registry.get("field_registries"), dict):
        return "the registry lacks 'setup_args' or 'field_registries'."
    if not isinstance(attributes, dict):
        return "the manifest lacks a valid 'attributes' entry."
    init_params = attributes.get("init_params_")
    if not isinstance(init_params, dict) or not isinstance(init_params.get("non_kwargs"), dict):
        return "no valid 'init_params_' (the model's constructor arguments)."
    kwargs = init_params.get("kwargs") or {}
    if not isinstance(kwargs, dict) or not all(isinstance(v, dict) for v in kwargs.values()):
        return "invalid 'init_params_.kwargs'."
    for name, value in attributes.items():
        if (
            not name.isidentifier()
            or not name.endswith("_")
            or name[0] == "_"
            or name == "registry_"
        ):
            return f"invalid attribute name {name!r} (saved attributes end in '_')."
        if name in KINDS and not isinstance(value, KINDS[name]):
            kind = type(value).__name__
            return f"attribute {name!r} holds a {kind}, not what the model keeps there."
    memory = attributes.get("memory_")
    if isinstance(memory, dict):
        # Fields by name (a nested part is saved as "<field>.<name>"); those without a default
        # are those the code cannot do without.
        known = {f.name: f for f in fields(RetrievalMemory)}
        saved = {str(k).split(".", 1)[0] for k in memory}
        required = {n for n, f in known.items() if MISSING is f.default is f.default_factory}
        stacked = np.ravel(memory.get("evidence_model.sources", [])).astype(str)
        problems = {
            "lacks the field(s) {} that this version needs": sorted(required - saved),
            "has field(s) {} this version does not know": sorted(saved - set(known)),
            "stacks evidence source(s) {} this version does not have": sorted(
                map(str, set(stacked) - set(SOURCES))
            ),
        }
        found = [text.format(names) for text, names in problems.items() if names]
        if found:
            return (
                f"its retrieval memory ({written}) {' and '.join(found)}. Load it with the "
                "ptrag_sc version that wrote it, or train the model again with this one."
            )
    if content.get("unused"):
        return f"the array file holds arrays no entry refers to: {content['unused'][:5]}."
    return None


def _state_problem(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    shapes, read = ({k: tuple(v.shape) for k, v in d.items()} for d in (expected, found))
    parts = {
        "missing": sorted(shapes.keys() - read.keys()),
        "unexpected": sorted(read.keys() - shapes.keys()),
        "of another shape": [
            f"{k} {read[k]} (expected {shapes[k]})"
            for k in sorted(shapes.keys() & read.keys())
            if read[k] != shapes[k]
        ],
    }
    return "; ".join(f"{what} {names[:5]}" for what, names in parts.items() if names)


def build_model(
    cls: type, source: Path, content: dict, adata: AnnData | None, device: torch.device
) -> BaseModelClass:
    """The model the content describes (scvi-tools' ``_initialize_model``), weights loaded."""
    arguments = constructor_arguments(content)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "adata", "registry"}
    if set(arguments) - accepted:
        unknown = sorted(set(arguments) - accepted)
        raise file_error(source, f"it has constructor argument(s) {unknown} {cls.__name__} lacks.")
    try:
        model = cls(adata, registry=content["registry"], **arguments)
    except Exception as exc:  # the arguments come from the file: its fault, cause attached
        why = f"{type(exc).__name__}: {exc}"
        raise file_error(source, f"the model it describes cannot be built: {why}") from exc
    for name, value in content["attributes"].items():
        try:
            if name != "init_params_":
                setattr(model, name, value)
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
            raise file_error(source, f"attribute {name!r} cannot be restored: {why}") from exc
    problem = _state_problem(model.module.state_dict(), content["state"])
    if problem:
        weights = source.with_name(source.name.replace(MANIFEST_FNAME, WEIGHTS_FNAME))
        why = f"the weights ({content['written']}) do not fit the model {source.name} describes"
        raise file_error(weights, f"{why}: {problem}.")
    model.module.load_state_dict(content["state"], strict=True)
    model.to_device(device)
    model.module.eval()
    return model
