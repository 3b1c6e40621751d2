"""Row access and streaming statistics over an expression matrix that may not fit in memory:
dense, sparse, on disk (``backed="r"``: h5py, anndata's CSR datasets, zarr) or a
:class:`RowSubset` of one. On-disk rows are read in merged contiguous windows, a few reads per
batch of scattered cells."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
import torch

if TYPE_CHECKING:
    from collections.abc import Iterator

    import h5py
    from anndata.abc import CSCDataset, CSRDataset

    #: An expression matrix as an AnnData holds it: dense, sparse, or backed on disk.
    MatrixLike = np.ndarray | sp.spmatrix | sp.sparray | h5py.Dataset | CSRDataset | CSCDataset

#: Rows per chunk when streaming over a matrix.
CHUNK_ROWS = 16384
#: In-memory matrices up to this many float32 bytes get a dense copy for fast gathers.
DENSE_COPY_LIMIT = 1024**3
#: An on-disk matrix keeps the rows it is asked to cache (control cells) in memory up to this size.
CACHE_LIMIT = 1024**3
#: Two requested rows of an on-disk matrix are read in one window when fewer than this many
#: values (dense: rows x genes; CSR: stored entries) lie between them.
MERGE_GAP_VALUES = 1 << 14


def is_backed(matrix: MatrixLike) -> bool:
    """Whether ``matrix`` lives on disk (h5py dataset, anndata sparse dataset, zarr array,
    :class:`RowSubset`)."""
    return not isinstance(matrix, np.ndarray | np.matrix) and not sp.issparse(matrix)


def _windows(starts: np.ndarray, stops: np.ndarray, max_gap: int) -> np.ndarray:
    """Sorted ``[starts, stops)`` ranges merged across gaps up to ``max_gap``: ``(n, 4)`` rows
    ``(first range, last range + 1, lo, hi)``, each window reading ``[lo, hi)``."""
    if starts.size == 0:
        return np.zeros((0, 4), np.int64)
    new = np.ones(starts.size, dtype=bool)
    new[1:] = (starts[1:] - stops[:-1]) > max_gap
    first = np.flatnonzero(new)
    end = np.r_[first[1:], starts.size]
    return np.stack([first, end, starts[first], stops[end - 1]], axis=1).astype(np.int64)


class BackedReader:
    """Reads sets of rows of an on-disk dense array or anndata CSR dataset in contiguous
    windows (a CSR row pointer is read once and kept: 8 bytes per row)."""

    def __init__(self, matrix: MatrixLike) -> None:
        self.matrix = matrix
        self.shape = tuple(matrix.shape)
        group = getattr(matrix, "group", None)
        self.sparse = group is not None and getattr(matrix, "format", None) == "csr"
        if self.sparse:
            self._data = group["data"]
            self._indices = group["indices"]
            self._indptr = np.asarray(group["indptr"][...], dtype=np.int64)

    def read(self, rows: np.ndarray, *, sparse: bool = False) -> np.ndarray | sp.csr_matrix:
        """Rows ``rows`` (sorted, unique) as a CSR matrix (``sparse=True``, CSR sources only) or
        dense float32."""
        rows = np.asarray(rows, dtype=np.int64)
        if not self.sparse:
            return self._read_dense(rows)
        block = self._read_csr(rows)
        return block if sparse else _to_dense(block)

    def _read_dense(self, rows: np.ndarray) -> np.ndarray:
        if rows.size == 0:
            return np.empty((0, self.shape[1]), dtype=np.float32)
        gap = max(1, MERGE_GAP_VALUES // max(1, self.shape[1]))
        windows = _windows(rows, rows + 1, gap)
        blocks = [
            np.asarray(self.matrix[lo:hi], dtype=np.float32) for _, _, lo, hi in windows.tolist()
        ]
        block = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
        offset = np.cumsum(windows[:, 3] - windows[:, 2]) - (windows[:, 3] - windows[:, 2])
        window_of_row = np.repeat(np.arange(windows.shape[0]), windows[:, 1] - windows[:, 0])
        return block[rows - windows[window_of_row, 2] + offset[window_of_row]]

    def _read_csr(self, rows: np.ndarray) -> sp.csr_matrix:
        indptr = self._indptr
        starts, stops = indptr[rows], indptr[rows + 1]
        lengths = stops - starts
        out_indptr = np.zeros(rows.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=out_indptr[1:])
        if out_indptr[-1] == 0:
            return sp.csr_matrix((rows.size, self.shape[1]), dtype=np.float32)
        windows = _windows(starts, stops, MERGE_GAP_VALUES)
        windows = windows[windows[:, 3] > windows[:, 2]]
        spans = windows.tolist()
        data = [self._data[lo:hi] for _, _, lo, hi in spans]
        indices = [self._indices[lo:hi] for _, _, lo, hi in spans]
        if len(spans) > 1:
            data, indices = np.concatenate(data), np.concatenate(indices)
        else:
            data, indices = data[0], indices[0]
        # Position of each requested value in the concatenated windows.
        size = windows[:, 3] - windows[:, 2]
        offset = np.cumsum(size) - size
        window_of_value = np.searchsorted(windows[:, 2], starts, side="right") - 1
        base = starts - windows[window_of_value, 2] + offset[window_of_value]
        source = np.repeat(base, lengths) + _ranks(lengths)
        if source.size == data.shape[0]:
            return sp.csr_matrix(
                (np.asarray(data, np.float32), indices, out_indptr),
                shape=(rows.size, self.shape[1]),
            )
        return sp.csr_matrix(
            (np.asarray(data[source], np.float32), indices[source], out_indptr),
            shape=(rows.size, self.shape[1]),
        )


def _ranks(lengths: np.ndarray) -> np.ndarray:
    """``0..n-1`` within each of consecutive runs of ``lengths``, concatenated."""
    total = int(lengths.sum())
    return np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def _to_dense(block: MatrixLike) -> np.ndarray:
    if sp.issparse(block):
        return block.toarray().astype(np.float32, copy=False)
    return np.asarray(block, dtype=np.float32)


class RowSubset:
    """Some ``rows`` (and ``columns``; ``None``: all) of an on-disk matrix, read only when asked
    for: what a view of a backed AnnData reads (anndata's ``view.X`` loads all its rows)."""

    def __init__(
        self, matrix: MatrixLike, rows: np.ndarray, columns: np.ndarray | None = None
    ) -> None:
        self.matrix = matrix
        self.rows = np.asarray(rows, dtype=np.int64)
        self.columns = None if columns is None else np.asarray(columns, dtype=np.int64)
        self.shape = (self.rows.size, matrix.shape[1] if columns is None else self.columns.size)
        self._reader = BackedReader(matrix) if is_backed(matrix) else None

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    def read(self, positions: np.ndarray, *, sparse: bool = False) -> np.ndarray | sp.csr_matrix:
        """Rows at ``positions`` (any order); CSR when ``sparse`` and the source is CSR."""
        parent = self.rows[np.asarray(positions, dtype=np.int64)]
        unique, inverse = np.unique(parent, return_inverse=True)
        if self._reader is not None:
            block = self._reader.read(unique, sparse=sparse)
        else:
            block = self.matrix[unique]
            block = block.tocsr() if sp.issparse(block) and sparse else _to_dense(block)
        if self.columns is not None:
            block = block[:, self.columns]
        if unique.size != parent.size or np.any(np.diff(parent) < 0):
            block = block[inverse.ravel()]
        return block

    def __getitem__(self, key: int | slice | np.ndarray) -> sp.csr_matrix:
        if isinstance(key, tuple):
            raise TypeError("A RowSubset is indexed by rows only: `subset[rows]`.")
        positions = np.arange(self.shape[0])[key]
        return self.read(np.atleast_1d(positions), sparse=True)


def read_rows(matrix: MatrixLike, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` (any order) of any supported matrix as dense float32."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return np.zeros((0, matrix.shape[1]), dtype=np.float32)
    if isinstance(matrix, RowSubset):
        return _to_dense(matrix.read(rows))
    if is_backed(matrix):
        return _read_backed(BackedReader(matrix), rows)
    return _to_dense(matrix[rows])


def _read_backed(reader: BackedReader, rows: np.ndarray) -> np.ndarray:
    unique, inverse = np.unique(rows, return_inverse=True)
    block = reader.read(unique)
    return (
        block if unique.size == rows.size and np.all(np.diff(rows) > 0) else block[inverse.ravel()]
    )


def iter_row_chunks(
    matrix: MatrixLike, chunk_rows: int = CHUNK_ROWS, mask: np.ndarray | None = None
) -> Iterator[tuple[int, np.ndarray | sp.csr_matrix]]:
    """``(start, block)`` over consecutive row chunks, CSR or dense. With a boolean ``mask``,
    chunks without a selected row are not read and each is trimmed to the span of its selected
    rows (``block`` holds every row of that span)."""
    n = matrix.shape[0]
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        if mask is not None:
            selected = np.flatnonzero(mask[start:stop])
            if selected.size == 0:
                continue
            start, stop = start + int(selected[0]), start + int(selected[-1]) + 1
        block = matrix[start:stop]
        if sp.issparse(block):
            yield start, block.tocsr()
        else:
            yield start, np.asarray(block)


def group_sums(
    matrix: MatrixLike, codes: np.ndarray, n_groups: int, chunk_rows: int = CHUNK_ROWS
) -> tuple[np.ndarray, np.ndarray]:
    """Sum of the rows of each group (``codes < 0`` ignored), streamed by chunks.

    Returns ``(sums float64 [n_groups, G], counts int64 [n_groups])``.
    """
    codes = np.asarray(codes, dtype=np.int64)
    sums = np.zeros((n_groups, matrix.shape[1]), dtype=np.float64)
    counts = np.bincount(codes[codes >= 0], minlength=n_groups).astype(np.int64)
    if n_groups == 0:
        return sums, counts
    for start, block in iter_row_chunks(matrix, chunk_rows, mask=codes >= 0):
        local = codes[start : start + block.shape[0]]
        keep = np.flatnonzero(local >= 0)
        present, row_group = np.unique(local[keep], return_inverse=True)
        indicator = sp.csr_matrix(
            (np.ones(keep.size), (row_group.ravel(), keep)), shape=(present.size, block.shape[0])
        )
        part = indicator @ block
        sums[present] += part.toarray() if sp.issparse(part) else np.asarray(part)
    return sums, counts


def group_means(
    matrix: MatrixLike, codes: np.ndarray, n_groups: int, chunk_rows: int = CHUNK_ROWS
) -> np.ndarray:
    """Mean row of each group (``codes < 0`` ignored); float64 ``[n_groups, G]``, NaN for empty
    groups."""
    sums, counts = group_sums(matrix, codes, n_groups, chunk_rows)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts[:, None]
    means[counts == 0] = np.nan
    return means


def iter_selected_rows(
    matrix: MatrixLike, mask: np.ndarray, chunk_rows: int = CHUNK_ROWS
) -> Iterator[tuple[np.ndarray, np.ndarray | sp.csr_matrix]]:
    """``(rows, block)`` of the rows of ``mask``, chunk by chunk (CSR or dense)."""
    for start, block in iter_row_chunks(matrix, chunk_rows, mask=mask):
        local = np.flatnonzero(mask[start : start + block.shape[0]])
        yield start + local, block[local] if local.size < block.shape[0] else block


def column_max(
    matrix: MatrixLike, mask: np.ndarray | None = None, chunk_rows: int = CHUNK_ROWS
) -> np.ndarray:
    """Largest value of each column over the rows of ``mask`` (all rows by default), float32."""
    out = np.zeros(matrix.shape[1], dtype=np.float32)
    if mask is None:
        blocks = iter_row_chunks(matrix, chunk_rows)
    else:
        blocks = iter_selected_rows(matrix, mask, chunk_rows)
    for _, block in blocks:
        block_max = block.max(axis=0)
        block_max = (
            block_max.toarray().ravel()
            if sp.issparse(block_max)
            else np.asarray(block_max).ravel()
        )
        np.maximum(out, block_max.astype(np.float32), out=out)
    return out


class ExpressionMatrix:
    """Row access to the registered expression as float32 tensors.

    A dense matrix is used as is when float32 (else copied once); a sparse one is densified once
    up to ``DENSE_COPY_LIMIT`` bytes, else densified per batch; an on-disk one (or a
    :class:`RowSubset`) is read per batch, only the rows it needs.

    Parameters
    ----------
    matrix
        ``adata.X`` or a layer.
    columns
        Column of ``matrix`` for each of the model's genes, or ``None`` for the identity.
    cache
        Rows of an on-disk matrix to keep in memory once first needed (the control cells, which
        every set draws from), read in one pass if they fit in ``CACHE_LIMIT`` bytes. Ignored
        for in-memory matrices.
    """

    def __init__(
        self,
        matrix: MatrixLike,
        columns: np.ndarray | None = None,
        *,
        cache: np.ndarray | None = None,
    ) -> None:
        self.shape = (matrix.shape[0], matrix.shape[1] if columns is None else len(columns))
        self._columns = None if columns is None else np.asarray(columns, dtype=np.int64)
        self._dense: torch.Tensor | None = None
        self._reader: BackedReader | None = None
        self._source = matrix
        self._cache_mask = None
        self._cache = None
        self._cache_position: np.ndarray | None = None
        nbytes = matrix.shape[0] * matrix.shape[1] * 4
        if is_backed(matrix):
            if not isinstance(matrix, RowSubset):
                self._reader = BackedReader(matrix)
            if cache is not None and np.any(cache):
                self._cache_mask = np.asarray(cache, dtype=bool)
            return
        if sp.issparse(matrix):
            if nbytes <= DENSE_COPY_LIMIT:
                self._dense = torch.from_numpy(matrix.toarray().astype(np.float32, copy=False))
            else:
                self._source = matrix.tocsr().astype(np.float32, copy=False)
        else:
            self._dense = torch.from_numpy(
                np.ascontiguousarray(np.asarray(matrix), dtype=np.float32)
            )

    @property
    def backed(self) -> bool:
        """Whether rows are read from disk per batch."""
        return self._dense is None and is_backed(self._source)

    def _load_cache(self) -> None:
        """Read the rows of the cache mask in one pass, if they fit in ``CACHE_LIMIT``."""
        mask, self._cache_mask = self._cache_mask, None
        rows = np.flatnonzero(mask)
        if self._reader is not None and self._reader.sparse:
            estimate = 8 * int(np.sum(self._reader._indptr[rows + 1] - self._reader._indptr[rows]))
        else:
            estimate = 4 * rows.size * self._source.shape[1]
        if estimate > CACHE_LIMIT:
            return
        blocks = []
        size = 0
        for _, block in iter_selected_rows(self._source, mask):
            block = (
                sp.csr_matrix(block, dtype=np.float32)
                if sp.issparse(block)
                else np.asarray(block, dtype=np.float32)
            )
            size += (
                block.data.nbytes + block.indices.nbytes if sp.issparse(block) else block.nbytes
            )
            if size > CACHE_LIMIT:
                return  # too large: these rows are read from disk per batch
            blocks.append(block)
        if not blocks:
            return
        self._cache = (
            sp.vstack(blocks, format="csr") if sp.issparse(blocks[0]) else np.concatenate(blocks)
        )
        self._cache_position = np.full(self._source.shape[0], -1, dtype=np.int64)
        self._cache_position[rows] = np.arange(rows.size)

    def _read(self, flat: np.ndarray) -> np.ndarray:
        """Dense float32 rows of the on-disk or CSR source, cached rows from memory."""
        if self._cache_mask is not None:
            self._load_cache()
        if self._cache is None:
            return self._read_source(flat)
        position = self._cache_position[flat]
        cached = position >= 0
        if cached.all():
            return _to_dense(self._cache[position])
        out = np.empty((flat.size, self._source.shape[1]), dtype=np.float32)
        out[cached] = _to_dense(self._cache[position[cached]])
        out[~cached] = self._read_source(flat[~cached])
        return out

    def _read_source(self, rows: np.ndarray) -> np.ndarray:
        if self._reader is None:
            return read_rows(self._source, rows)
        return _read_backed(self._reader, rows)

    def rows(self, index: np.ndarray) -> torch.Tensor:
        """Rows ``index`` (any shape) as a float32 tensor of shape ``index.shape + (G,)``."""
        flat = np.array(index, dtype=np.int64).ravel()  # a writable copy: torch needs one
        if self._dense is not None:
            out = self._dense.index_select(0, torch.from_numpy(flat))
            if self._columns is not None:
                out = out[:, torch.from_numpy(self._columns)]
        else:
            if flat.size == 0:
                block = np.zeros((0, self._source.shape[1]), dtype=np.float32)
            else:
                block = self._read(flat)
            if self._columns is not None:
                block = block[:, self._columns]
            out = torch.from_numpy(np.ascontiguousarray(block))
        return out.view(*np.shape(index), self.shape[1])
