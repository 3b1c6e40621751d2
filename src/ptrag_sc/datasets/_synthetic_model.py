"""The generative model of :func:`~ptrag_sc.datasets.synthetic`: constants, sampling of the
expression and the exact expected effects."""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
from scipy.special import gammaln

# Fixed constants (documented in ``synthetic``'s Notes).
_N_LATENT = 32  # dimension L of the latent effect space
_PROGRAMS_PER_GENE = 3.0  # expected number of latent dimensions loading on a gene
_EMBEDDING_NOISE = 0.6  # within-program spread of the gene embeddings
_BASE_SD = 1.0  # sd of the shared log baseline rate of a gene
_CELL_TYPE_BASE_SD = 0.5  # sd of the cell-type deviation of the log baseline rate
_SIZE_SD = 0.3  # sd of the log size factor of a cell
_NB_THETA = 5.0  # negative-binomial inverse dispersion
_LIBRARY_SIZE = 1e4  # default mean total count per cell (whole transcriptome)
_COUNTS_PER_GENE = 0.6  # mean count of a measured gene in a control cell
_MAX_MEASURED_FRACTION = 0.9  # cap of the share of the library held by the measured genes
_TARGET_SUM = 1e4  # library-size normalisation target
_N_QUADRATURE = 9  # Gauss-Hermite nodes over the log size factor (true effects)
_CHUNK_ELEMENTS = 1 << 22  # cells x genes per generation chunk


def _log_probs(logits: np.ndarray, rest: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Log-softmax over the genes (last axis) and one extra ``rest`` category (broadcast
    against ``logits[..., :1]``): the log probabilities of the genes and of the rest."""
    top = np.maximum(logits.max(axis=-1, keepdims=True), rest)
    lse = top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True) + np.exp(rest - top))
    return logits - lse, rest - lse


def _simulate_expression(
    rng: np.random.Generator,
    *,
    cell_line: np.ndarray,
    cell_group: np.ndarray,
    cell_batch: np.ndarray,
    size_factor: np.ndarray,
    base: np.ndarray,
    rest_logit: np.ndarray,
    delta: np.ndarray,
    batch_offset: np.ndarray,
    chunk: int,
    sparse: bool,
) -> np.ndarray | sp.csr_matrix:
    """``log1p`` of the normalised counts, sampled by chunks of ``chunk`` cells (keyword
    arguments: ``benchmarks/scale.py`` streams the chunks to a file)."""
    n_obs, n_genes = cell_line.size, base.shape[1]
    dense = None if sparse else np.empty((n_obs, n_genes), dtype=np.float32)
    row_nnz = np.zeros(n_obs, dtype=np.int64)
    data = indices = None
    nnz = 0
    for start in range(0, n_obs, chunk):
        rows = slice(start, min(start + chunk, n_obs))
        c, g, b = cell_line[rows], cell_group[rows], cell_batch[rows]
        logits = base[c] + delta[c, g] + batch_offset[b]
        log_pi, log_rest = _log_probs(logits, rest_logit[c, None])
        del logits
        mean = np.exp(log_pi) * size_factor[rows, None]
        del log_pi
        counts = rng.poisson(rng.gamma(_NB_THETA, mean / _NB_THETA)).astype(np.float32)
        del mean
        rest = rng.poisson(np.exp(log_rest) * size_factor[rows, None])
        total = np.maximum(counts.sum(axis=1, keepdims=True) + rest, 1.0)
        x = np.log1p(counts * (_TARGET_SUM / total))
        del counts
        if not sparse:
            dense[rows] = x
            continue
        nonzero = x > 0
        row_nnz[rows] = nonzero.sum(axis=1)
        flat = np.flatnonzero(nonzero)  # row-major: already in CSR order
        k = flat.size
        if data is None:  # size the buffers from the first chunk's density, with headroom
            density = k / max(1, nonzero.size)
            capacity = max(k, int(1.1 * density * n_obs * n_genes) + 1024)
            data = np.empty(capacity, dtype=np.float32)
            indices = np.empty(capacity, dtype=np.int32)
        if nnz + k > data.size:
            # ndarray.resize reallocates in place (mremap on Linux): no second copy in memory.
            capacity = max(nnz + k, int(1.25 * data.size))
            data.resize(capacity, refcheck=False)
            indices.resize(capacity, refcheck=False)
        data[nnz : nnz + k] = x.ravel()[flat]
        indices[nnz : nnz + k] = flat % n_genes
        nnz += k
        del x, nonzero, flat
    if not sparse:
        return dense
    if data is None:
        data, indices = np.empty(0, np.float32), np.empty(0, np.int32)
    data.resize(nnz, refcheck=False)
    indices.resize(nnz, refcheck=False)
    index_dtype = np.int32 if nnz < np.iinfo(np.int32).max else np.int64
    indptr = np.zeros(n_obs + 1, dtype=index_dtype)
    np.cumsum(row_nnz, out=indptr[1:])
    return sp.csr_matrix(
        (data, indices.astype(index_dtype, copy=False), indptr), shape=(n_obs, n_genes)
    )


def _nb_log1p_table(mean_grid: np.ndarray, size_nodes: np.ndarray) -> np.ndarray:
    """``E[log1p(1e4 Y / s_j)]`` for ``Y ~ NB(mean, theta)``, shape ``[n_grid, n_nodes]``.

    ``mean_grid`` must be increasing; each block of means is summed over its own count range.
    """
    theta = _NB_THETA
    table = np.empty((mean_grid.size, size_nodes.size))
    for lo in range(0, mean_grid.size, 128):
        mu = mean_grid[lo : lo + 128, None]
        mu_max = float(mu[-1, 0])
        k_max = int(mu_max + 12 * math.sqrt(mu_max + mu_max**2 / theta) + 30)
        k = np.arange(k_max + 1, dtype=np.float64)
        const = gammaln(k + theta) - gammaln(theta) - gammaln(k + 1)
        logp = const + theta * np.log(theta / (theta + mu)) + k * np.log(mu / (theta + mu))
        table[lo : lo + 128] = np.exp(logp) @ np.log1p(_TARGET_SUM * k[:, None] / size_nodes)
    return table


def _true_effects(
    base: np.ndarray,
    rest_logit: np.ndarray,
    delta: np.ndarray,
    batch_offset: np.ndarray,
    library_size: float,
) -> np.ndarray:
    """Expected mean of ``X`` per (cell line, group) minus the controls', ``[C, groups, G]``."""
    n_ct, n_groups, n_genes = delta.shape
    n_batch = batch_offset.shape[0]
    nodes, weights = np.polynomial.hermite_e.hermegauss(_N_QUADRATURE)
    weights = weights / weights.sum()
    size_nodes = library_size * np.exp(_SIZE_SD * nodes - _SIZE_SD**2 / 2)

    def log_pi(c: int, b: int) -> np.ndarray:
        logits = base[c] + delta[c].astype(np.float64) + batch_offset[b]
        return _log_probs(logits, np.array([[rest_logit[c]]]))[0]

    max_log_pi = max(float(log_pi(c, b).max()) for c in range(n_ct) for b in range(n_batch))
    lo = math.log(1e-6)
    hi = max_log_pi + math.log(size_nodes.max()) + 0.01
    grid = np.linspace(lo, hi, max(256, int((hi - lo) / 0.02)))
    table = _nb_log1p_table(np.exp(grid), size_nodes)

    out = np.empty((n_ct, n_groups, n_genes), dtype=np.float32)
    for c in range(n_ct):
        acc = np.zeros((n_groups, n_genes))
        for b in range(n_batch):
            lp = log_pi(c, b)
            for j, log_s in enumerate(np.log(size_nodes)):
                x = lp + log_s
                y = np.interp(x, grid, table[:, j])
                below = x < lo  # E[.] is linear in the mean for tiny means
                y[below] *= np.exp(x[below] - lo)
                acc += (weights[j] / n_batch) * y
        out[c] = acc - acc[0]
    return out
