"""Row access and streaming statistics over an expression matrix that may not fit in memory.

The matrix can be a dense numpy array, a scipy sparse matrix, or an on-disk array of an AnnData
opened with ``backed="r"`` (an h5py dataset or anndata's sparse dataset). Nothing here holds
more than one chunk of rows of a matrix that is not already in memory.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

#: Rows per chunk when streaming over a matrix.
CHUNK_ROWS = 16384
#: In-memory matrices up to this many float32 bytes get a dense copy for fast gathers.
DENSE_COPY_LIMIT = 1024**3


def is_backed(matrix) -> bool:
    """Whether ``matrix`` lives on disk (h5py dataset, anndata sparse dataset, zarr array)."""
    return not isinstance(matrix, np.ndarray | np.matrix) and not sp.issparse(matrix)


def read_rows(matrix, rows: np.ndarray):
    """Rows ``rows`` of any supported matrix as dense float32 ``(len(rows), G)``.

    On-disk arrays need sorted, unique indices: rows are read once each, in order, and put back
    in the requested order.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return np.zeros((0, matrix.shape[1]), dtype=np.float32)
    if is_backed(matrix):
        unique, inverse = np.unique(rows, return_inverse=True)
        block = matrix[unique]
        block = block.toarray() if sp.issparse(block) else np.asarray(block)
        return np.asarray(block, dtype=np.float32)[inverse]
    block = matrix[rows]
    if sp.issparse(block):
        return block.toarray().astype(np.float32, copy=False)
    return np.asarray(block, dtype=np.float32)


def iter_row_chunks(matrix, chunk_rows: int = CHUNK_ROWS):
    """``(start, block)`` over consecutive row chunks; ``block`` is sparse CSR or dense."""
    n = matrix.shape[0]
    for start in range(0, n, chunk_rows):
        block = matrix[start : min(start + chunk_rows, n)]
        if sp.issparse(block):
            yield start, block.tocsr()
        else:
            yield start, np.asarray(block)


def group_sums(matrix, codes: np.ndarray, n_groups: int, chunk_rows: int = CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Sum of the rows of each group (``codes < 0`` ignored), streamed by chunks.

    Returns ``(sums float64 [n_groups, G], counts int64 [n_groups])``. A sparse indicator
    product per chunk: no loop over cells, and no float64 copy of the matrix.
    """
    codes = np.asarray(codes, dtype=np.int64)
    sums = np.zeros((n_groups, matrix.shape[1]), dtype=np.float64)
    counts = np.bincount(codes[codes >= 0], minlength=n_groups).astype(np.int64)
    if n_groups == 0:
        return sums, counts
    for start, block in iter_row_chunks(matrix, chunk_rows):
        local = codes[start : start + block.shape[0]]
        keep = np.flatnonzero(local >= 0)
        if keep.size == 0:
            continue
        indicator = sp.csr_matrix((np.ones(keep.size), (local[keep], keep)), shape=(n_groups, block.shape[0]))
        part = indicator @ block
        sums += part.toarray() if sp.issparse(part) else np.asarray(part)
    return sums, counts


def group_means(matrix, codes: np.ndarray, n_groups: int, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """Mean row of each group (``codes < 0`` ignored); float64 ``[n_groups, G]``, NaN for empty groups."""
    sums, counts = group_sums(matrix, codes, n_groups, chunk_rows)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts[:, None]
    means[counts == 0] = np.nan
    return means


def column_max(matrix, mask: np.ndarray | None = None, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """Largest value of each column over the rows of ``mask`` (all rows by default), float32."""
    out = np.zeros(matrix.shape[1], dtype=np.float32)
    for start, block in iter_row_chunks(matrix, chunk_rows):
        if mask is not None:
            local = np.flatnonzero(mask[start : start + block.shape[0]])
            if local.size == 0:
                continue
            block = block[local]
        if block.shape[0] == 0:
            continue
        block_max = block.max(axis=0)
        block_max = block_max.toarray().ravel() if sp.issparse(block_max) else np.asarray(block_max).ravel()
        np.maximum(out, block_max.astype(np.float32), out=out)
    return out


class ExpressionMatrix:
    """Row access to the registered expression as float32 tensors.

    A dense in-memory matrix is used as is when it is float32 (shared, not copied) and copied
    to float32 once otherwise; an in-memory sparse matrix is densified once when the dense
    copy is smaller than ``DENSE_COPY_LIMIT``, else kept as CSR and densified per batch; an
    on-disk matrix (backed AnnData) is read per batch, only the rows the batch needs.

    Parameters
    ----------
    matrix
        ``adata.X`` or a layer.
    columns
        Column of ``matrix`` for each of the model's genes (to read an AnnData whose genes are
        in another order), or ``None`` for the identity.
    """

    def __init__(self, matrix, columns: np.ndarray | None = None) -> None:
        self.shape = (matrix.shape[0], matrix.shape[1] if columns is None else len(columns))
        self._columns = None if columns is None else np.asarray(columns, dtype=np.int64)
        self._dense: torch.Tensor | None = None
        self._source = matrix
        nbytes = matrix.shape[0] * matrix.shape[1] * 4
        if is_backed(matrix):
            return
        if sp.issparse(matrix):
            if nbytes <= DENSE_COPY_LIMIT:
                self._dense = torch.from_numpy(matrix.toarray().astype(np.float32, copy=False))
            else:
                self._source = matrix.tocsr().astype(np.float32, copy=False)
        else:
            self._dense = torch.from_numpy(np.ascontiguousarray(np.asarray(matrix), dtype=np.float32))

    @property
    def backed(self) -> bool:
        return self._dense is None and is_backed(self._source)

    def rows(self, index: np.ndarray) -> torch.Tensor:
        """Rows ``index`` (any shape) as a float32 tensor of shape ``index.shape + (G,)``."""
        flat = np.array(index, dtype=np.int64).ravel()  # a writable copy: torch needs one
        if self._dense is not None:
            out = self._dense.index_select(0, torch.from_numpy(flat))
            if self._columns is not None:
                out = out[:, torch.from_numpy(self._columns)]
        else:
            block = read_rows(self._source, flat)
            if self._columns is not None:
                block = block[:, self._columns]
            out = torch.from_numpy(np.ascontiguousarray(block))
        return out.view(*np.shape(index), self.shape[1])
