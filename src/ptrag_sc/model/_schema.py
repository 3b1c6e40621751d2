"""What a saved model is made of: the values of its manifest, and the checks of what is read.

A value of the manifest is JSON (``None``, bool, int, finite float, str, list, dict with str
keys) or one of four tagged forms, the whole schema:

``{"$tensor": key}``
    A number or boolean array, stored in the safetensors file under ``key``.
``{"$strings": [...], "shape": [...]}``
    A string array.
``{"$float": "nan"}``
    A non-finite float (``"nan"``, ``"inf"``, ``"-inf"``).
``{"$frame": {"values": ..., "index": ..., "columns": ..., "names": [...]}}``
    A DataFrame whose columns share one numpy dtype.

Arrays of Python objects are kept when all their items are strings or all are numbers
(``"object": true`` beside the tag). Anything else is refused when saving, with the path of
the value at fault. Decoding checks every node; the model's own attributes must hold the
kinds in :data:`KINDS`, its retrieval memory only fields of
:class:`~ptrag_sc.data.RetrievalMemory` and all of those without a default, and its weights
exactly the module's tensors. :func:`build_model` makes the model a checked content describes.
"""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import MISSING, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import numpy as np
import pandas as pd
import torch

from ..data import RetrievalMemory
from ..data._sources import SOURCES

if TYPE_CHECKING:
    from collections.abc import Container

    from anndata import AnnData
    from scvi.model.base import BaseModelClass

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "KINDS",
    "MANIFEST_FNAME",
    "WEIGHTS_FNAME",
    "ModelFileError",
    "build_model",
    "check_content",
    "check_header",
    "check_state",
    "constructor_arguments",
    "decode",
    "deserialise",
    "encode",
    "file_error",
    "header",
    "serialise",
]

MANIFEST_FNAME = "model.json"
WEIGHTS_FNAME = "model.safetensors"
#: Name written into every manifest; anything else is not a ptrag_sc model.
FORMAT_NAME = "ptrag_sc.model"
#: Version of the layout written (``ptrag_sc.model._io.MIGRATIONS`` lists those read).
FORMAT_VERSION = 3

_TAGS = {"$tensor": {"object"}, "$strings": {"shape", "object"}, "$float": set(), "$frame": set()}
_OPTIONAL = (type(None),)
#: What the model's own attributes hold (others may hold any value of the schema).
KINDS = {
    "init_params_": (dict,),
    "history_": (dict, *_OPTIONAL),
    "memory_": (dict, *_OPTIONAL),
    "is_trained_": (bool, np.bool_),
    **dict.fromkeys(("best_epoch_", "best_step_"), (numbers.Integral, *_OPTIONAL)),
    **dict.fromkeys(
        (
            "train_indices_",
            "validation_indices_",
            "test_indices_",
            "training_perturbations_",
            "training_cell_types_",
            "validation_perturbations_",
        ),
        (np.ndarray, *_OPTIONAL),
    ),
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
    """The JSON node of ``value``; its number arrays are added to ``tensors``.

    Raises
    ------
    TypeError
        Naming ``path`` (and the part of it) that the schema cannot hold.
    """
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
        parts = {
            "values": value.to_numpy(),
            "index": np.asarray(value.index),
            "columns": np.asarray(value.columns),
        }
        node = {k: encode(v, f"{path}.{k}", tensors) for k, v in parts.items()}
        node["names"] = [
            encode(value.index.name, path, tensors),
            encode(value.columns.name, path, tensors),
        ]
        return {"$frame": node}
    if isinstance(value, list | tuple):
        return [encode(v, f"{path}[{i}]", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str) or k.startswith("$")]
        if bad:
            raise _unsupported(
                path, f"dict keys must be strings not starting with '$', got {bad[:3]}"
            )
        return {k: encode(v, f"{path}.{k}", tensors) for k, v in value.items()}
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    raise _unsupported(path, f"values of type {kind} are not supported")


def _encode_array(array: np.ndarray, path: str, tensors: dict) -> dict:
    node: dict = {}
    if array.dtype.kind == "O":
        items, node["object"] = array.ravel().tolist(), True
        if all(isinstance(x, str) for x in items):
            array = (
                np.asarray(items, dtype=str).reshape(array.shape)
                if items
                else np.zeros(array.shape, "U1")
            )
        elif all(isinstance(x, int | float) and not isinstance(x, bool) for x in items):
            array = np.asarray(items, dtype=np.float64).reshape(array.shape)
        else:
            found = sorted({type(x).__name__ for x in items})
            raise _unsupported(
                path, f"an object array may hold only str or only numbers; it holds {found}"
            )
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
    """Inverse of :func:`encode` (``arrays``: the file's arrays by key; keys read go to ``used``).

    Raises
    ------
    ValueError
        Naming ``path`` for any node that :func:`encode` does not write.
    """
    if node is None or isinstance(node, bool | int | float | str):
        return node
    if isinstance(node, list):
        return [decode(v, f"{path}[{i}]", arrays, used) for i, v in enumerate(node)]
    if not isinstance(node, dict):
        raise ValueError(f"{path}: unexpected JSON {type(node).__name__}")
    tags = [k for k in node if k.startswith("$")]
    if not tags:
        return {k: decode(v, f"{path}.{k}", arrays, used) for k, v in node.items()}
    tag = tags[0]
    if len(tags) > 1 or tag not in _TAGS or set(node) - {tag} - _TAGS[tag]:
        raise ValueError(f"{path}: unknown tagged value with keys {sorted(node)}")
    value = node[tag]
    if tag == "$float":
        if value not in ("nan", "inf", "-inf"):
            raise ValueError(f"{path}: invalid special float {value!r}")
        return float(value)
    if tag == "$frame":
        return _decode_frame(value, path, arrays, used)
    if tag == "$tensor":
        if not isinstance(value, str) or value not in arrays:
            raise ValueError(
                f"{path}: refers to array {value!r}, which the array file does not hold"
            )
        used.add(value)
        array = arrays[value]
    else:
        shape = node.get("shape")
        if not (
            isinstance(value, list)
            and all(isinstance(s, str) for s in value)
            and isinstance(shape, list)
        ):
            raise ValueError(f"{path}: invalid string array")
        if not all(isinstance(n, int) and n >= 0 for n in shape) or math.prod(shape) != len(value):
            raise ValueError(f"{path}: shape {shape} does not fit {len(value)} strings")
        array = np.asarray(value, dtype=str).reshape(shape) if value else np.zeros(shape, "U1")
    return array.astype(object) if node.get("object") else array


def _decode_frame(value: dict, path: str, arrays: dict, used: set) -> pd.DataFrame:
    if not isinstance(value, dict) or set(value) != {"values", "index", "columns", "names"}:
        raise ValueError(f"{path}: a frame has 'values', 'index', 'columns' and 'names'")
    parts = {
        k: decode(value[k], f"{path}.{k}", arrays, used) for k in ("values", "index", "columns")
    }
    names = decode(value["names"], f"{path}.names", arrays, used)
    values, index, columns = parts["values"], parts["index"], parts["columns"]
    if not (
        isinstance(names, list)
        and len(names) == 2
        and all(isinstance(p, np.ndarray) for p in parts.values())
    ):
        raise ValueError(f"{path}: invalid frame")
    if values.shape != (len(index), len(columns)) or index.ndim != 1 or columns.ndim != 1:
        raise ValueError(
            f"{path}: frame values of shape {values.shape} do not fit its index and columns"
        )
    index = pd.Index(index, name=names[0], tupleize_cols=False)
    return pd.DataFrame(
        values,
        index=index,
        columns=pd.Index(columns, name=names[1], tupleize_cols=False),
        copy=False,
    )


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
    """Who wrote ``manifest`` (``"format version N, ptrag_sc X"``).

    Raises
    ------
    ValueError
        If it is not a ptrag_sc manifest of a version in ``readable``, saying what to do.
    """
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
            "Upgrade ptrag_sc to load it"
            if number > FORMAT_VERSION
            else "Load it with the ptrag_sc that wrote it"
        )
        raise ValueError(
            f"it was written in {written}; this ptrag_sc reads format versions "
            f"{sorted(readable)}. {advice}."
        )
    kinds = {"files": dict, "attributes": dict, "registry": dict, "var_names": object}
    wrong = [k for k, t in kinds.items() if k not in manifest or not isinstance(manifest[k], t)]
    if wrong:
        raise ValueError(f"the manifest lacks a valid {wrong[0]!r} entry.")
    return written


def serialise(model: BaseModelClass) -> tuple[dict, dict[str, torch.Tensor]]:
    """``model`` as manifest values (``var_names``, ``registry``, ``attributes``) and the tensors
    they refer to, the module's ``state_dict`` under ``module.``.

    Raises
    ------
    TypeError
        Naming the first attribute (and the part of it) that the schema cannot hold.
    """
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
    """Inverse of :func:`serialise`: ``var_names``, ``registry``, ``attributes``, ``state``, and
    ``unused``, the arrays no value refers to (an error of :func:`check_content`).

    Raises
    ------
    ValueError
        For a value :func:`encode` does not write.
    """
    state = {k.removeprefix("module."): v for k, v in tensors.items() if k.startswith("module.")}
    arrays = {k: v.numpy() for k, v in tensors.items() if k.startswith("data.")}
    if len(state) + len(arrays) != len(tensors):
        raise ValueError("the array file holds tensors named neither 'module.*' nor 'data.*'")
    used: set[str] = set()
    content = {
        k: decode(manifest[k], k, arrays, used) for k in ("var_names", "registry", "attributes")
    }
    return {**content, "state": state, "unused": sorted(set(arrays) - used)}


def constructor_arguments(content: dict) -> dict:
    """The constructor arguments saved in ``init_params_`` (checked by :func:`check_content`)."""
    init_params = content["attributes"]["init_params_"]
    arguments = dict(init_params["non_kwargs"])
    for group in (init_params.get("kwargs") or {}).values():
        arguments.update(group)
    return arguments


def check_content(content: dict, written: str) -> str | None:
    """What is wrong with decoded model content, in words (``None``: nothing).

    ``written`` says which version wrote it, for the message about the memory.
    """
    var_names, registry, attributes = (
        content.get("var_names"),
        content["registry"],
        content["attributes"],
    )
    if (
        not isinstance(var_names, np.ndarray)
        or var_names.ndim != 1
        or var_names.dtype.kind not in "UO"
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
            not (name.isidentifier() and name.endswith("_") and not name.startswith("_"))
            or name == "registry_"
        ):
            return f"invalid attribute name {name!r} (saved attributes end in '_')."
        if name in KINDS and not isinstance(value, KINDS[name]):
            kind = type(value).__name__
            return f"attribute {name!r} holds a {kind}, not what the model keeps there."
    memory = attributes.get("memory_")
    if isinstance(memory, dict):
        # Fields by name (a nested part may be saved as "<field>.<name>"); the fields without
        # a default are those the code cannot do without.
        known = {f.name: f for f in fields(RetrievalMemory)}
        saved = {str(k).split(".", 1)[0] for k in memory}
        required = {n for n, f in known.items() if MISSING is f.default is f.default_factory}
        missing, unknown = sorted(required - saved), sorted(saved - set(known))
        problems = [f"lacks the field(s) {missing} that this version needs"] if missing else []
        problems += [f"has field(s) {unknown} this version does not know"] if unknown else []
        stacked = np.ravel(memory.get("evidence_model.sources", [])).astype(str)
        foreign = sorted(map(str, set(stacked) - set(SOURCES)))
        problems += [f"stacks evidence source(s) {foreign} this version does not have"] * bool(
            foreign
        )
        if problems:
            return (
                f"its retrieval memory ({written}) {' and '.join(problems)}. Load it with the "
                "ptrag_sc version that wrote it, or train the model again with this one."
            )
    if content.get("unused"):
        return f"the array file holds arrays no entry refers to: {content['unused'][:5]}."
    return None


def check_state(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str | None:
    """What differs between the module's tensors and those read (names and shapes), in words."""
    shapes = {k: tuple(v.shape) for k, v in expected.items()}
    read = {k: tuple(v.shape) for k, v in found.items()}
    missing, extra = sorted(set(shapes) - set(read)), sorted(set(read) - set(shapes))
    other = [
        f"{k} {read[k]} (expected {shapes[k]})"
        for k in sorted(set(shapes) & set(read))
        if read[k] != shapes[k]
    ]
    parts = [
        f"{what} {names[:5]}"
        for what, names in (
            ("missing", missing),
            ("unexpected", extra),
            ("of another shape", other),
        )
        if names
    ]
    return "; ".join(parts) if parts else None


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
    problem = check_state(model.module.state_dict(), content["state"])
    if problem:
        weights = source.with_name(source.name.replace(MANIFEST_FNAME, WEIGHTS_FNAME))
        why = f"the weights ({content['written']}) do not fit the model {source.name} describes"
        raise file_error(weights, f"{why}: {problem}.")
    model.module.load_state_dict(content["state"], strict=True)
    model.to_device(device)
    model.module.eval()
    return model
