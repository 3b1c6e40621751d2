"""Seeded synthetic Perturb-seq data with known effects and gene embeddings."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from .._constants import DEFAULT_CELL_TYPE_KEY, DEFAULT_CONTROL_GROUP, DEFAULT_PERTURBATION_KEY
from .._constants import DEFAULT_PERTURBATION_SEP as SEP
from ._synthetic_model import (
    _BASE_SD,
    _CELL_TYPE_BASE_SD,
    _CHUNK_ELEMENTS,
    _COUNTS_PER_GENE,
    _EMBEDDING_NOISE,
    _LIBRARY_SIZE,
    _MAX_MEASURED_FRACTION,
    _N_LATENT,
    _PROGRAMS_PER_GENE,
    _SIZE_SD,
    _simulate_expression,
    _true_effects,
)

__all__ = ["synthetic"]

BATCH_KEY = "gem_group"

_DEFAULTS: dict[str, Any] = {
    "n_cell_types": 3,
    "n_perturbations": 30,
    "n_genes": 200,
    "n_cells_per_perturbation": 50,
    "n_control_cells": 200,
    "embedding_dim": 32,
    "n_programs": 5,
    "effect_size": 0.5,
    "embedding_smoothness": 0.8,
    "cell_type_specificity": 0.3,
    "n_batches": 2,
    "batch_effect": 0.1,
    "n_combinations": 0,
    "combination_interaction": 0.2,
    "target_overlap": 0.5,
    "knockdown": 0.8,
    "library_size": _LIBRARY_SIZE,
    "sparse": False,
}

_PRESETS: dict[str, dict[str, Any]] = {
    "replogle_nadig_like": {
        "n_cell_types": 4,
        "n_perturbations": 2000,
        "n_genes": 2000,
        "n_cells_per_perturbation": 70,
        "n_control_cells": 10000,
        "embedding_dim": 128,
        "n_programs": 40,
        "n_batches": 4,
        "sparse": True,
    },
}

_PRESET_CELL_LINES = {"replogle_nadig_like": ["hepg2", "jurkat", "k562", "rpe1"]}


def synthetic(
    *,
    n_cell_types: int | None = None,
    n_perturbations: int | None = None,
    n_genes: int | None = None,
    n_cells_per_perturbation: int | None = None,
    n_control_cells: int | None = None,
    embedding_dim: int | None = None,
    n_programs: int | None = None,
    effect_size: float | None = None,
    embedding_smoothness: float | None = None,
    cell_type_specificity: float | None = None,
    n_batches: int | None = None,
    batch_effect: float | None = None,
    n_combinations: int | None = None,
    combination_interaction: float | None = None,
    target_overlap: float | None = None,
    knockdown: float | None = None,
    library_size: float | None = None,
    sparse: bool | None = None,
    preset: str | None = None,
    seed: int = 0,
) -> AnnData:
    r"""Simulate a Perturb-seq experiment with known effects and gene embeddings.

    Cells of several cell lines receive single (or double, ``A+B``) gene perturbations or a
    non-targeting control. Perturbation effects are drawn in a latent space from the gene
    embeddings, so that genes with similar embeddings have similar effects (tunable), are
    modulated by the cell line, and are mapped to counts through a negative-binomial model. The
    result follows the package's default schema (the Replogle–Nadig / STATE convention).

    Every argument left at ``None`` takes the preset's value when a ``preset`` is given and the
    package default (stated below) otherwise; an explicit argument always wins over the preset.

    Parameters
    ----------
    n_cell_types
        Number of cell lines :math:`C`. Default 3 (named ``cell_line_0``, ...).
    n_perturbations
        Number of single-gene perturbations :math:`P`. Default 30.
    n_genes
        Number of measured genes :math:`G` (``var_names`` ``GENE0001``, ...). Default 200.
    n_cells_per_perturbation
        Cells per (cell line, perturbation) group, singles and combinations alike. Default 50.
    n_control_cells
        Non-targeting control cells per cell line. Default 200.
    embedding_dim
        Dimension :math:`D` of the gene embeddings. Default 32.
    n_programs
        Number :math:`K` of gene programs, i.e. clusters of the gene embeddings. Default 5.
    effect_size
        Scale :math:`\alpha` of the perturbation effects: the root mean square, over genes, of
        the shift of the log rate of a single perturbation (before the knock-down of its own
        target and the renormalisation). Default 0.5.
    embedding_smoothness
        :math:`\lambda \in [0, 1]`: share of the variance of the latent effect explained by the
        gene embedding. 1: the effect is a fixed function of the embedding; 0: it is
        independent of it. Default 0.8.
    cell_type_specificity
        :math:`\gamma \ge 0`: strength of the cell-line-specific modulation of the effects. The
        correlation of a perturbation's log-rate shifts in two cell lines is about
        :math:`1 / (1 + \gamma^2)`. Default 0.3.
    n_batches
        Number of batches :math:`B` (obs ``gem_group``), balanced within every group. Default 2.
    batch_effect
        :math:`\sigma_b`: sd of the gene-wise log-rate offset of a batch. Default 0.1.
    n_combinations
        Number of double perturbations ``A+B`` (distinct unordered pairs of the singles),
        measured in every cell line. Default 0.
    combination_interaction
        :math:`\iota`: sd of the interaction term added to the sum of the two latent effects of a
        combination (each latent coordinate of a single has unit variance). Default 0.2.
    target_overlap
        Fraction of the perturbed genes that are measured genes; the others are unmeasured genes
        named ``PGENE0001``, .... Default 0.5.
    knockdown
        :math:`\kappa \in [0, 1)`: CRISPRi knock-down efficiency; a perturbation multiplies the
        rate of its own target by :math:`1 - \kappa` when the target is measured. Default 0.8.
    library_size
        Mean total count per cell :math:`S` over the whole transcriptome (measured genes plus
        the unmeasured rest). Default ``1e4``.
    sparse
        Return ``X`` as a :class:`scipy.sparse.csr_matrix` instead of a dense array. Default
        ``False``; the preset sets ``True``.
    preset
        ``None`` or ``"replogle_nadig_like"``: four cell lines ``hepg2``, ``jurkat``, ``k562``,
        ``rpe1``; 2,000 perturbations and 2,000 genes; 70 cells per group and 10,000 controls per
        line (600,000 cells); ``embedding_dim=128``, ``n_programs=40``, ``n_batches=4``,
        ``sparse=True``. The data are built in chunks of about 4 M matrix entries, so memory stays
        bounded by the sparse output plus a few chunks.
    seed
        Seed of the generator. The same arguments and seed give identical data.

    Returns
    -------
    :class:`anndata.AnnData` with
    ``n_obs = C * (n_control_cells + (P + n_combinations) * n_cells_per_perturbation)``
    cells, ordered by cell line, then group (controls first), and

    ``X``
        ``log1p`` of the library-size-normalised counts (target sum ``1e4``), ``float32``,
        dense or CSR.
    ``obs["gene"]``
        Perturbation label (categorical): ``"non-targeting"``, a gene symbol, or ``"A+B"``.
    ``obs["cell_line"]``
        Cell line (categorical).
    ``obs["gem_group"]``
        Batch (categorical, ``batch1``, ...).
    ``var_names``
        Measured gene symbols.
    ``uns["gene_embeddings"]``
        ``float32`` :class:`~pandas.DataFrame` indexed by the single perturbed genes, columns
        ``dim0``, ..., unit-norm rows.
    ``uns["true_effects"]``
        ``float32`` :class:`~pandas.DataFrame` indexed by ``"<cell_line>:<perturbation>"`` (every
        non-control group), columns ``var_names``: the true shift
        :math:`\Delta_{c,p} = m_{c,p} - m_{c,\mathrm{ctrl}}` of the mean of ``X`` (see Notes).
    ``uns["synthetic"]``
        Dict of the resolved generation parameters (``seed``; ``preset``, ``""`` for none) plus
        ``cell_lines``, ``perturbations`` (singles), ``combinations``, ``measured_targets``
        (perturbed genes that are measured) and ``embedding_program`` (program of each single, in
        the order of ``gene_embeddings``).

    Raises
    ------
    ValueError
        If an argument is out of range (the message names it) or the preset is unknown.

    Notes
    -----
    Generative model, with :math:`L = 32` latent effect dimensions:

    1. Embeddings. Program centres :math:`\mu_k \sim N(0, I_D/D)`; each single perturbation
       :math:`p` gets a program :math:`k_p` (balanced, random) and
       :math:`e_p = v_p / \lVert v_p \rVert` with :math:`v_p = \mu_{k_p} + 0.6\, \xi_p`,
       :math:`\xi_p \sim N(0, I_D/D)`.
    2. Latent effects. :math:`z_p = \sqrt{\lambda}\, W^\top e_p + \sqrt{1-\lambda}\, u_p` with
       :math:`W \in \mathbb{R}^{D \times L}` and :math:`u_p \in \mathbb{R}^L` i.i.d.
       :math:`N(0, 1)`, so :math:`\mathrm{E}[z_p^\top z_q] / L = \lambda \cos(e_p, e_q)` for
       :math:`p \ne q`. Combinations: :math:`z_{A+B} = z_A + z_B + \iota\, w_{AB}`,
       :math:`w_{AB} \sim N(0, I_L)`.
    3. Log-rate shifts. Shared and cell-line loadings
       :math:`\Lambda, \Lambda_c \in \mathbb{R}^{L \times G}` with i.i.d. entries
       :math:`\mathrm{Bernoulli}(q)\, N(0, 1/(Lq))`, :math:`q = 3/L`;
       :math:`\delta_{c,p} = \alpha\, z_p^\top (\Lambda + \gamma \Lambda_c) / \sqrt{1 + \gamma^2}
       + \log(1-\kappa) \sum_{t \in T_p} \mathbb{1}_t`, where :math:`T_p` holds the measured
       targets of :math:`p` (CRISPRi-like knock-down). Controls: :math:`\delta = 0`.
    4. Baselines and batches. :math:`\eta_{c,g} = a_g + \tau_{c,g}`, :math:`a_g \sim N(0, 1)`,
       :math:`\tau_{c,g} \sim N(0, 0.5^2)`; batch offsets
       :math:`\beta_{b,g} \sim N(0, \sigma_b^2)`.
       The unmeasured rest of the transcriptome is one extra category :math:`g = 0` with
       :math:`\delta = \beta = 0` and :math:`\eta_{c,0}` set so that the measured genes hold a
       share :math:`f = \min(0.9, 0.6\, G / S)` of a control library before batch offsets
       (0.6 counts per measured gene on average, whatever :math:`G` and :math:`S`).
    5. Counts. For cell :math:`i` of line :math:`c`, group :math:`p` and batch :math:`b`:
       :math:`\pi_i = \mathrm{softmax}_{g \in \{0, \dots, G\}}(\eta_c + \delta_{c,p} + \beta_b)`,
       size factor :math:`s_i = S \exp(0.3\, \epsilon_i - 0.045)`,
       :math:`\epsilon_i \sim N(0, 1)`, :math:`Y_{ig} \sim \mathrm{NB}(\text{mean }
       s_i \pi_{ig}, \theta = 5)` (gamma–Poisson) for measured genes and
       :math:`Y_{i0} \sim \mathrm{Poisson}(s_i \pi_{i0})`.
    6. Expression. :math:`X_{ig} = \log(1 + 10^4\, Y_{ig} / N_i)`, :math:`N_i = \sum_{h=0}^G
       Y_{ih}` (total-count normalisation over the whole library).

    True effects. :math:`m_{c,p,g} = \frac{1}{B} \sum_b \mathrm{E}_s\,
    \mathrm{E}_{Y \sim \mathrm{NB}(s \pi_{c,p,b,g}, \theta)} \log(1 + 10^4 Y / s)`, computed
    semi-analytically: exact negative-binomial sums (tabulated on a fine grid of the mean and
    interpolated in its logarithm) and a 9-node Gauss–Hermite quadrature over the log size factor.
    The only approximation is the observed library size :math:`N_i` replaced by its
    expectation :math:`s_i`, which affects perturbed and control cells alike: with 20,000 cells per
    group the observed mean shift matches :math:`\Delta` to within sampling noise (RMS error
    0.004). This is the mean shift a perfect predictor would report.

    Examples
    --------
    >>> import ptrag_sc
    >>> adata = ptrag_sc.datasets.synthetic(n_perturbations=10, n_combinations=3, seed=1)
    >>> bool(adata.obs["gene"].str.contains("+", regex=False).any())
    True
    >>> adata.uns["gene_embeddings"].shape
    (10, 32)
    >>> adata.uns["true_effects"].shape
    (39, 200)
    """
    arguments = {k: v for k, v in locals().items() if k not in ("preset", "seed")}
    params = _resolve_params(preset, arguments)
    _validate(params, seed)
    rng = np.random.default_rng(seed)
    n_ct, n_pert, n_genes_ = params["n_cell_types"], params["n_perturbations"], params["n_genes"]
    n_batch, n_comb = params["n_batches"], params["n_combinations"]

    width = max(4, len(str(n_genes_)))
    var_names = np.array([f"GENE{i + 1:0{width}d}" for i in range(n_genes_)], dtype=object)
    n_measured_targets = round(params["target_overlap"] * n_pert)
    measured_idx = np.sort(rng.choice(n_genes_, size=n_measured_targets, replace=False))
    n_unmeasured = n_pert - n_measured_targets
    pwidth = max(4, len(str(n_unmeasured)))
    singles = [str(v) for v in var_names[measured_idx]] + [
        f"PGENE{i + 1:0{pwidth}d}" for i in range(n_unmeasured)
    ]
    # measured gene index of each single's target, -1 when not measured
    target_of = np.concatenate([measured_idx, np.full(n_unmeasured, -1)]).astype(np.int64)
    cell_lines = _cell_line_names(preset, n_ct)
    batches = [f"batch{b + 1}" for b in range(n_batch)]

    dim, n_prog = params["embedding_dim"], params["n_programs"]
    centres = rng.normal(0.0, 1.0 / math.sqrt(dim), size=(n_prog, dim))
    program = rng.permutation(np.arange(n_pert) % n_prog)
    noise = rng.normal(0.0, _EMBEDDING_NOISE / math.sqrt(dim), size=(n_pert, dim))
    emb = centres[program] + noise
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)

    lam = params["embedding_smoothness"]
    w_map = rng.normal(size=(dim, _N_LATENT))
    own = rng.normal(size=(n_pert, _N_LATENT))
    z_single = math.sqrt(lam) * (emb @ w_map) + math.sqrt(1.0 - lam) * own
    pair_id = np.zeros(0, dtype=np.int64)
    if n_comb:
        pair_id = np.sort(rng.choice(n_pert * (n_pert - 1) // 2, size=n_comb, replace=False))
    first, second = _unrank_pairs(pair_id, n_pert)
    interaction = params["combination_interaction"] * rng.normal(size=(n_comb, _N_LATENT))
    z_all = np.vstack([z_single, z_single[first] + z_single[second] + interaction])
    combos = [SEP.join((singles[a], singles[b])) for a, b in zip(first, second, strict=True)]
    groups = [DEFAULT_CONTROL_GROUP, *singles, *combos]  # group 0 is the control
    n_groups = len(groups)

    q = min(1.0, _PROGRAMS_PER_GENE / _N_LATENT)
    gamma = params["cell_type_specificity"]

    def loadings(*shape: int) -> np.ndarray:
        mask = rng.random((*shape, _N_LATENT, n_genes_)) < q
        return mask * rng.normal(0.0, 1.0 / math.sqrt(_N_LATENT * q), size=mask.shape)

    shared = loadings()
    specific = loadings(n_ct)
    delta = np.zeros((n_ct, n_groups, n_genes_), dtype=np.float32)
    scale = params["effect_size"] / math.sqrt(1.0 + gamma**2)
    for c in range(n_ct):
        delta[c, 1:] = scale * (z_all @ (shared + gamma * specific[c]))
    log_kd = math.log1p(-params["knockdown"])
    rows_1 = np.flatnonzero(target_of >= 0)
    delta[:, 1 + rows_1, target_of[rows_1]] += log_kd
    for j, (a, b) in enumerate(zip(first, second, strict=True)):
        for t in {int(target_of[a]), int(target_of[b])} - {-1}:
            delta[:, 1 + n_pert + j, t] += log_kd

    base = rng.normal(0.0, _BASE_SD, size=n_genes_) + rng.normal(
        0.0, _CELL_TYPE_BASE_SD, size=(n_ct, n_genes_)
    )
    batch_offset = rng.normal(0.0, params["batch_effect"], size=(n_batch, n_genes_))
    lib = params["library_size"]
    frac = min(_MAX_MEASURED_FRACTION, _COUNTS_PER_GENE * n_genes_ / lib)
    lse = np.log(np.exp(base).sum(axis=1))
    rest_logit = lse + math.log((1.0 - frac) / frac)  # per cell line

    n_per = params["n_cells_per_perturbation"]
    sizes = np.tile(np.r_[params["n_control_cells"], np.full(n_groups - 1, n_per)], n_ct)
    cell_group = np.repeat(np.tile(np.arange(n_groups), n_ct), sizes)
    cell_line = np.repeat(np.repeat(np.arange(n_ct), n_groups), sizes)
    n_obs = int(sizes.sum())
    block = np.repeat(np.arange(sizes.size), sizes)
    rank = np.arange(n_obs) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    shuffled = np.lexsort((rng.random(n_obs), block))  # random order within each block
    cell_batch = np.empty(n_obs, dtype=np.int64)
    cell_batch[shuffled] = rank % n_batch  # balanced batches within each group
    size_factor = lib * np.exp(_SIZE_SD * rng.standard_normal(n_obs) - _SIZE_SD**2 / 2)

    X = _simulate_expression(
        rng,
        cell_line=cell_line,
        cell_group=cell_group,
        cell_batch=cell_batch,
        size_factor=size_factor,
        base=base,
        rest_logit=rest_logit,
        delta=delta,
        batch_offset=batch_offset,
        chunk=max(1, _CHUNK_ELEMENTS // n_genes_),
        sparse=params["sparse"],
    )

    true = _true_effects(base, rest_logit, delta, batch_offset, lib)[:, 1:]
    del delta
    true_effects = pd.DataFrame(
        true.reshape(-1, n_genes_),
        index=[f"{cl}:{g}" for cl in cell_lines for g in groups[1:]],
        columns=pd.Index(var_names, dtype=str),
    )

    obs = pd.DataFrame(
        {
            DEFAULT_PERTURBATION_KEY: pd.Categorical.from_codes(cell_group, categories=groups),
            DEFAULT_CELL_TYPE_KEY: pd.Categorical.from_codes(cell_line, categories=cell_lines),
            BATCH_KEY: pd.Categorical.from_codes(cell_batch, categories=batches),
        },
        index=pd.Index([f"cell{i:07d}" for i in range(n_obs)], dtype=str),
    )
    embeddings = pd.DataFrame(
        emb.astype(np.float32),
        index=pd.Index(singles, dtype=str),
        columns=[f"dim{i}" for i in range(dim)],
    )
    info = dict(params)
    info.update(
        seed=int(seed),
        preset=preset or "",
        cell_lines=np.array(cell_lines, dtype=object),
        perturbations=np.array(singles, dtype=object),
        combinations=np.array(combos, dtype=object),
        measured_targets=np.array(singles[:n_measured_targets], dtype=object),
        embedding_program=program.astype(np.int64),
    )
    uns = {"gene_embeddings": embeddings, "true_effects": true_effects, "synthetic": info}
    return AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(var_names, dtype=str)), uns=uns)


def _resolve_params(preset: str | None, explicit: dict[str, Any]) -> dict[str, Any]:
    if preset is not None and preset not in _PRESETS:
        raise ValueError(f"Unknown preset={preset!r}; expected None or one of {sorted(_PRESETS)}.")
    params = {**_DEFAULTS, **_PRESETS.get(preset, {})}
    params.update({k: v for k, v in explicit.items() if v is not None})
    params["library_size"] = float(params["library_size"])
    params["sparse"] = bool(params["sparse"])
    return params


def _validate(params: dict[str, Any], seed: int) -> None:
    def check_int(name: str, low: int) -> None:
        value = params[name]
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
        params[name] = int(value)

    def check_float(
        name: str, low: float, high: float = math.inf, *, open_high: bool = False
    ) -> None:
        try:
            value = float(params[name])
        except (TypeError, ValueError):
            raise ValueError(f"`{name}` must be a number, got {params[name]!r}.") from None
        bad_high = value >= high if open_high else value > high
        if not math.isfinite(value) or value < low or bad_high:
            bracket = ")" if open_high else "]"
            raise ValueError(f"`{name}` must lie in [{low}, {high}{bracket}, got {value!r}.")
        params[name] = value

    for name in (
        "n_cell_types", "n_perturbations", "n_genes", "n_cells_per_perturbation",
        "n_control_cells", "n_batches", "n_programs",
    ):  # fmt: skip
        check_int(name, 1)
    check_int("embedding_dim", 2)
    check_int("n_combinations", 0)
    check_float("effect_size", 0.0)
    check_float("embedding_smoothness", 0.0, 1.0)
    check_float("cell_type_specificity", 0.0)
    check_float("batch_effect", 0.0)
    check_float("combination_interaction", 0.0)
    check_float("target_overlap", 0.0, 1.0)
    check_float("knockdown", 0.0, 1.0, open_high=True)
    if not params["library_size"] > 0 or not math.isfinite(params["library_size"]):
        raise ValueError(f"`library_size` must be positive, got {params['library_size']!r}.")
    n_pert = params["n_perturbations"]
    max_comb = n_pert * (n_pert - 1) // 2
    if params["n_combinations"] > max_comb:
        raise ValueError(
            f"`n_combinations`={params['n_combinations']} exceeds the {max_comb} distinct pairs "
            f"of n_perturbations={n_pert}."
        )
    if round(params["target_overlap"] * n_pert) > params["n_genes"]:
        raise ValueError(
            "`target_overlap` * n_perturbations measured targets exceed n_genes="
            f"{params['n_genes']}; lower `target_overlap`."
        )
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative integer, got {seed!r}.")


def _cell_line_names(preset: str | None, n: int) -> list[str]:
    named = _PRESET_CELL_LINES.get(preset or "", [])
    return [*named[:n], *(f"cell_line_{i}" for i in range(len(named), n))]


def _unrank_pairs(pair_id: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Map ranks of the unordered pairs ``i < j`` of ``range(n)`` (lexicographic) to ``(i, j)``."""

    def start(i: np.ndarray) -> np.ndarray:  # number of pairs whose first element is < i
        return i * n - i * (i + 1) // 2

    root = np.sqrt(np.maximum((2 * n - 1) ** 2 - 8 * pair_id, 0))
    i = np.floor((2 * n - 1 - root) / 2).astype(np.int64)
    i -= start(i) > pair_id  # guard against floating-point rounding
    i += start(i + 1) <= pair_id
    return i, (pair_id - start(i) + i + 1).astype(np.int64)
