"""Model files of earlier formats: ptrag_sc's format versions 1 and 2, and scvi-tools' pickle
(opened only by ``convert_legacy_model(trust_pickle=True)``)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

#: Format version 1's arrays.
V1_ARRAYS_FNAME = "model_arrays.npz"
#: Prefixes of the memory's keys before format version 3, and the source each belongs to.
_SOURCE_PREFIXES = {
    "sources.embedding_": "linear_embedding",
    "sources.annotation_": "linear_annotation",
}


def sources_by_name(content: dict) -> dict:
    """``content`` with the memory's ``sources.embedding_weights`` (versions 1 and 2) renamed
    ``sources.linear_embedding.weights`` (version 3: by source name)."""
    memory = content["attributes"].get("memory_")
    if isinstance(memory, dict):
        renamed = {}
        for key, value in memory.items():
            for prefix, source in _SOURCE_PREFIXES.items():
                if str(key).startswith(prefix):
                    key = f"sources.{source}.{key.removeprefix(prefix)}"
            renamed[key] = value
        content["attributes"]["memory_"] = renamed
    return content


def _value(node: object, path: str, arrays: dict[str, np.ndarray]) -> object:
    """A value of a version-1 manifest: the node types that version wrote for PTRAG."""
    if node is None or isinstance(node, bool | int | float | str):
        return node
    if isinstance(node, list):
        return [_value(v, f"{path}[{i}]", arrays) for i, v in enumerate(node)]
    kind = node["$type"]
    if kind in ("ndarray", "scalar"):
        if node["key"] not in arrays:
            raise ValueError(
                f"{path}: refers to array {node['key']!r}, which {V1_ARRAYS_FNAME} does not hold"
            )
        array = arrays[node["key"]].astype(object) if node.get("object") else arrays[node["key"]]
        return array[()] if kind == "scalar" else array
    if kind == "float" and node["value"] in ("nan", "inf", "-inf"):
        return float(node["value"])
    if kind == "tuple":
        return tuple(_value(v, path, arrays) for v in node["items"])
    if kind == "dict" and "items" in node:
        return {k: _value(v, f"{path}.{k}", arrays) for k, v in node["items"].items()}
    if kind == "dict":
        return {_value(k, path, arrays): _value(v, path, arrays) for k, v in node["pairs"]}
    if kind == "index":
        values = _value(node["values"], path, arrays)
        return pd.Index(values, name=node.get("name"), tupleize_cols=False)
    if kind == "range_index":
        return pd.RangeIndex(node["start"], node["stop"], node["step"], name=node.get("name"))
    if kind == "dataframe":
        index, columns = _value(node["index"], path, arrays), _value(node["columns"], path, arrays)
        if "block" in node:
            return pd.DataFrame(_value(node["block"], path, arrays), index=index, columns=columns)
        data = {i: _value(c, path, arrays) for i, c in enumerate(node["data"])}
        return pd.DataFrame(data, index=index).set_axis(columns, axis=1)
    raise ValueError(f"{path}: node type {kind!r} is not read by this version of ptrag_sc")


def read_v1(folder: object) -> dict:
    """The content of a version-1 folder (ptrag_sc 0.1.0: a typed tree over an npz file)."""
    raw = folder.read(V1_ARRAYS_FNAME)
    if not zipfile.is_zipfile(io.BytesIO(raw)):
        raise ValueError(f"{V1_ARRAYS_FNAME} is not a numpy .npz archive (truncated or damaged?)")
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except Exception as exc:  # object arrays (pickles), zip and header errors
        why = f"{type(exc).__name__}: {exc}"
        raise ValueError(
            f"{V1_ARRAYS_FNAME} is not a readable .npz archive of plain arrays ({why})"
        ) from None
    manifest = folder.manifest
    content = {k: _value(manifest[k], k, arrays) for k in ("var_names", "registry")}
    attributes = {k: _value(v, k, arrays) for k, v in manifest["attributes"].items()}
    adata = manifest.get("anndata_saved") is True
    state = folder.tensors()
    return sources_by_name({**content, "attributes": attributes, "state": state, "adata": adata})


def read_pickle(path: Path) -> dict:
    """The content of scvi-tools' ``model.pt``: **runs any code the pickle holds**."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    state = payload.get("model_state_dict") if isinstance(payload, dict) else None
    attributes = dict(payload.get("attr_dict") or {}) if isinstance(payload, dict) else {}
    if not isinstance(state, dict) or not isinstance(attributes.get("registry_"), dict):
        raise ValueError(
            f"{path} is not a scvi-tools model file (expected a dict with 'model_state_dict' and "
            "'attr_dict' holding 'registry_')."
        )
    var_names = np.asarray(payload.get("var_names", [])).astype(str)
    registry = attributes.pop("registry_")
    state = {k: v for k, v in state.items() if k != "pyro_param_store"}
    content = {"var_names": var_names, "registry": registry, "attributes": attributes}
    return sources_by_name({**content, "state": state})
