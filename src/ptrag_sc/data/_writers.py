"""Where counterfactual predictions go, batch by batch (in the model's order, not by row): a dense
layer, a sparse layer or an h5ad file. Rows and genes not predicted keep their input values."""

from __future__ import annotations

import io
import mmap
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from .. import _files
from ._matrix import (
    BackedReader,
    RowSubset,
    _read_backed,
    _to_dense,
    is_backed,
    iter_selected_rows,
    read_rows,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    import pandas as pd
    from anndata import AnnData

    from ._matrix import MatrixLike

#: Encoding of an h5ad dense array (anndata's on-disk format).
_ARRAY_ATTRS = {"encoding-type": "array", "encoding-version": "0.2.0"}
#: Layers from this size up are allocated with their pages committed at once (Linux).
_COMMIT_AT_ONCE_BYTES = 64 * 2**20


def committed_zeros(shape: tuple[int, int], dtype: np.dtype | type = np.float32) -> np.ndarray:
    """A zero-filled array whose memory the kernel commits in one call (Linux, large arrays).

    ``np.zeros`` pages are committed one fault at a time as predictions are written (0.5 s for
    800 MB here, up to 2.7 s with huge-page compaction stalls); an anonymous ``MAP_POPULATE``
    mapping takes 0.4 s, steadily.
    """
    dtype = np.dtype(dtype)
    n_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    populate = getattr(mmap, "MAP_POPULATE", None)
    if populate is None or n_bytes < _COMMIT_AT_ONCE_BYTES:
        return np.zeros(shape, dtype=dtype)
    buffer = mmap.mmap(-1, n_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def _runs(rows: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs of consecutive values in sorted ``rows``: ``(position, first row, length)``."""
    if rows.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    first = np.r_[0, breaks]
    lengths = np.diff(np.r_[first, rows.size])
    return list(zip(first.tolist(), rows[first].tolist(), lengths.tolist(), strict=True))


class _Writer:
    """Shared by the writers: the input ``matrix`` (whose values what is not predicted keeps),
    the ``columns`` of the model's genes in it (``None``: the same) and the ``predicted`` rows."""

    def __init__(
        self, matrix: MatrixLike, columns: np.ndarray | None, predicted: np.ndarray
    ) -> None:
        self.matrix = matrix
        self.shape = (int(matrix.shape[0]), int(matrix.shape[1]))
        self.columns = None if columns is None else np.asarray(columns, dtype=np.int64)
        self.predicted = np.asarray(predicted, dtype=bool)
        # Genes of the AnnData the model does not predict keep their input values.
        self._extra_genes = self.columns is not None and self.columns.size < self.shape[1]
        self._reader: BackedReader | None = None

    def _input_rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows of the input as dense float32."""
        if is_backed(self.matrix) and not isinstance(self.matrix, RowSubset):
            # One reader for all batches: a CSR file's row pointer is read once, not per batch.
            if self._reader is None:
                self._reader = BackedReader(self.matrix)
            return _read_backed(self._reader, np.asarray(rows, dtype=np.int64))
        return read_rows(self.matrix, rows)

    def _full_rows(self, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
        """``values`` (model gene order) as complete rows of the AnnData's columns."""
        if self.columns is None:
            return np.asarray(values, dtype=np.float32)
        if self._extra_genes:
            out = self._input_rows(rows)
        else:
            out = np.empty((rows.size, self.shape[1]), dtype=np.float32)
        out[:, self.columns] = values
        return out

    def _unpredicted_blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray | sp.csr_matrix]]:
        """``(rows, block)`` of the rows that are not predicted, chunk by chunk."""
        return iter_selected_rows(self.matrix, ~self.predicted)


class DenseLayerWriter(_Writer):
    """Predictions into a dense float32 array the shape of the input (``adata.layers[key]`` by
    default); only what they do not overwrite is copied from the input."""

    def __init__(
        self, matrix: MatrixLike, columns: np.ndarray | None, predicted: np.ndarray
    ) -> None:
        super().__init__(matrix, columns, predicted)
        # Zeros, not empty: no stale memory could ever show through.
        self.layer = committed_zeros(self.shape, np.float32)
        for rows, block in self._unpredicted_blocks():
            self.layer[rows] = _to_dense(block)
        if self._extra_genes:
            extra = np.setdiff1d(np.arange(self.shape[1]), self.columns)
            for rows, block in iter_selected_rows(matrix, self.predicted):
                self.layer[np.ix_(rows, extra)] = _to_dense(block[:, extra])

    def write(self, rows: np.ndarray, values: np.ndarray) -> None:
        if self.columns is None:
            self.layer[rows] = values
        else:
            self.layer[np.ix_(rows, self.columns)] = values

    def finish(self) -> np.ndarray:
        return self.layer

    def abort(self) -> None:
        self.layer = None


class SparseLayerWriter(_Writer):
    """Predictions into a CSR matrix, assembled from per-batch pieces without a dense copy (peak
    memory: about the result plus one batch)."""

    def __init__(
        self, matrix: MatrixLike, columns: np.ndarray | None, predicted: np.ndarray
    ) -> None:
        super().__init__(matrix, columns, predicted)
        self._rows: list[np.ndarray] = []
        self._pieces: list[sp.csr_matrix] = []

    def write(self, rows: np.ndarray, values: np.ndarray) -> None:
        self._rows.append(np.asarray(rows, dtype=np.int64))
        self._pieces.append(sp.csr_matrix(self._full_rows(rows, values)))

    def abort(self) -> None:
        self._rows, self._pieces = [], []

    def finish(self) -> sp.csr_matrix:
        for rows, block in self._unpredicted_blocks():
            self._rows.append(rows)
            self._pieces.append(sp.csr_matrix(block, dtype=np.float32))
        n_obs = self.shape[0]
        row_nnz = np.zeros(n_obs, dtype=np.int64)
        for rows, piece in zip(self._rows, self._pieces, strict=True):
            row_nnz[rows] = np.diff(piece.indptr)
        indptr = np.zeros(n_obs + 1, dtype=np.int64)
        np.cumsum(row_nnz, out=indptr[1:])
        nnz = int(indptr[-1])
        index_dtype = np.int32 if nnz < np.iinfo(np.int32).max else np.int64
        data = np.empty(nnz, dtype=np.float32)
        indices = np.empty(nnz, dtype=index_dtype)
        while self._pieces:
            rows, piece = self._rows.pop(), self._pieces.pop()
            lengths = np.diff(piece.indptr)
            target = np.repeat(indptr[rows], lengths) + (
                np.arange(piece.nnz) - np.repeat(piece.indptr[:-1], lengths)
            )
            data[target] = piece.data
            indices[target] = piece.indices
            del piece
        return sp.csr_matrix(
            (data, indices, indptr.astype(index_dtype, copy=False)), shape=self.shape
        )


def _check_writable(frames: dict, uns: dict) -> None:
    """Raise a ``ValueError`` naming the column of ``frames`` (or ``uns``) that an h5ad file
    cannot store, by writing them to a file in memory first."""
    import h5py
    from anndata.io import write_elem

    def fails(key: str, value: object) -> Exception | None:
        with h5py.File(io.BytesIO(), "w") as f:
            try:
                write_elem(f, key, value)
            except Exception as exc:  # anndata's and h5py's errors for unsupported values
                return exc
        return None

    for name, frame in frames.items():
        if fails(name, frame) is None:
            continue
        for column in frame.columns:
            error = fails(name, frame[[column]])
            if error is not None:
                kinds = sorted({type(v).__name__ for v in frame[column].tolist()})
                raise ValueError(
                    f"`adata.{name}[{column!r}]` cannot be written to an h5ad file (values of "
                    f"types {kinds}: {type(error).__name__}). Convert it first, e.g. "
                    f"`adata.{name}[{column!r}] = adata.{name}[{column!r}].astype(str)`, or drop "
                    "it."
                )
        raise ValueError(f"`adata.{name}` cannot be written to an h5ad file (its index?).")
    error = fails("uns", uns)
    if error is not None:
        raise ValueError(f"The prediction record cannot be written to an h5ad file: {error}")


class H5ADWriter(_Writer):
    """Predictions into a new h5ad file whose ``X`` (dense float32) is the counterfactual matrix.

    ``X`` is stored contiguously and each batch written straight to its place, so memory holds
    one batch; the file is written under a temporary name and renamed into place at the end.

    Parameters
    ----------
    path
        File to create.
    obs, var
        Cell and gene annotations of the AnnData predicted.
    uns
        Unstructured annotations to record (e.g. the prediction settings).
    matrix, columns, predicted
        The input expression, the columns of the model's genes in it and the predicted rows.
    overwrite
        Replace an existing file at ``path`` (kept as it was if writing fails).
    input_file
        The file a backed input is read from: refused as ``path``.

    Raises
    ------
    ValueError
        If ``path`` is a folder, a ``.zarr`` path or ``input_file``, or a column of ``obs`` or
        ``var`` cannot be stored in an h5ad file (named; checked before anything is written).
    FileExistsError
        If ``path`` exists and ``overwrite`` is False.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        obs: pd.DataFrame,
        var: pd.DataFrame,
        uns: dict,
        matrix: MatrixLike,
        columns: np.ndarray | None,
        predicted: np.ndarray,
        overwrite: bool = False,
        input_file: str | os.PathLike | None = None,
    ) -> None:
        import h5py
        from anndata.io import write_elem
        from h5py import h5d, h5p, h5s, h5t

        super().__init__(matrix, columns, predicted)
        self.path = Path(os.fspath(path))
        self._fd = None
        shown = f"`output={os.fspath(path)!r}`"
        if self.path.suffix.lower() == ".zarr":
            raise ValueError(
                f"{shown}: predictions are written as an h5ad file; name a `.h5ad` path."
            )
        if self.path.is_dir():
            raise ValueError(
                f"{shown} is a folder; name the file to write, e.g. "
                f"`{self.path / 'predictions.h5ad'}`."
            )
        if os.path.lexists(self.path) and not overwrite:
            raise FileExistsError(
                f"{shown} already exists; pass `overwrite=True` to replace it, or another path."
            )
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"The folder of {shown} does not exist; create it first.")
        if (
            input_file is not None
            and os.path.exists(self.path)
            and os.path.samefile(self.path, input_file)
        ):
            raise ValueError(
                f"{shown} is the file the AnnData is read from (backed mode); write to another "
                "file."
            )
        _check_writable({"obs": obs, "var": var}, dict(uns))
        # Written under a unique temporary name beside the target, renamed over it at the end:
        # a failure leaves the old file, and nothing is written through a link.
        self._partial = _files.sibling_name(self.path, "writing")
        n_obs, n_vars = self.shape
        try:
            with h5py.File(self._partial, "w-") as f:
                f.attrs["encoding-type"] = "anndata"
                f.attrs["encoding-version"] = "0.1.0"
                # Contiguous, allocated now, never pre-filled: every row is written once.
                dcpl = h5p.create(h5p.DATASET_CREATE)
                dcpl.set_alloc_time(h5d.ALLOC_TIME_EARLY)
                dcpl.set_fill_time(h5d.FILL_TIME_NEVER)
                space = h5s.create_simple((n_obs, n_vars))
                dataset = h5py.Dataset(h5d.create(f.id, b"X", h5t.IEEE_F32LE, space, dcpl=dcpl))
                for key, value in _ARRAY_ATTRS.items():
                    dataset.attrs[key] = value
                self._offset = int(dataset.id.get_offset())
                write_elem(f, "obs", obs)
                write_elem(f, "var", var)
                write_elem(f, "uns", dict(uns))
                for key in ("obsm", "varm", "obsp", "varp", "layers"):
                    write_elem(f, key, {})
            self._row_bytes = n_vars * 4
            self._fd = os.open(self._partial, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
        except BaseException:
            self.abort()
            raise

    def _write_rows(self, rows: np.ndarray, values: np.ndarray) -> None:
        order = np.argsort(rows, kind="stable")
        rows = np.asarray(rows, dtype=np.int64)[order]
        values = np.ascontiguousarray(values[order], dtype="<f4")
        buffer = memoryview(values).cast("B")
        for position, row, length in _runs(rows):
            start = position * self._row_bytes
            os.pwrite(
                self._fd,
                buffer[start : start + length * self._row_bytes],
                self._offset + row * self._row_bytes,
            )

    def write(self, rows: np.ndarray, values: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        self._write_rows(rows, self._full_rows(rows, values))

    def finish(self) -> AnnData:
        """Copy the rows not predicted, put the file in place and open it ``backed="r"``."""
        import anndata

        try:
            for rows, block in self._unpredicted_blocks():
                self._write_rows(
                    rows, block.toarray() if sp.issparse(block) else np.asarray(block)
                )
            os.fsync(self._fd)
            self._close()
            os.replace(self._partial, self.path)
            _files.fsync_path(self.path.parent)
        except BaseException:
            self.abort()
            raise
        return anndata.read_h5ad(self.path, backed="r")

    def abort(self) -> None:
        """Close and delete the unfinished file; an existing file at ``path`` is left as it was."""
        self._close()
        Path(self._partial).unlink(missing_ok=True)

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
