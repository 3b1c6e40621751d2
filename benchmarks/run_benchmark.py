"""PT-RAG, its ablations and honest baselines, trained as a user would and scored by three evaluators.

Usage::

    python benchmarks/run_benchmark.py --dataset glioblastoma_fewshot
    python benchmarks/run_benchmark.py --dataset glioblastoma
    python benchmarks/run_benchmark.py --dataset gbm_zeroshot
    python benchmarks/run_benchmark.py --dataset k562_doubles
    python benchmarks/run_benchmark.py --dataset thp1
    python benchmarks/run_benchmark.py --dataset jurkat
    python benchmarks/run_benchmark.py --dataset replogle_like

    # fast iterations: some models, some (or no) baselines
    python benchmarks/run_benchmark.py --dataset thp1 --models "PT-RAG (default)" --baselines context_mean linear

    # seeds run separately, then combined (the summary is recomputed over all seeds):
    python benchmarks/run_benchmark.py --merge DIR_SEED0 DIR_SEEDS12 --out benchmarks/results/glioblastoma_fewshot

    # smoke test (NOT the defaults a user gets; flagged in every table):
    python benchmarks/run_benchmark.py --dataset thp1 --seeds 0 --folds 1 --max-steps 20 --out /tmp/bench_smoke

What a run does
---------------
For every seed of ``--seeds`` (default 0 1 2) and every fold of the dataset, each model of
:data:`MODELS` is built with its options only and trained with ``model.train(split_key="split")``:
no ``max_steps`` / ``max_epochs``, so the number of steps, the validation and the stopping rule
are the package's defaults (``--max-steps`` exists for smoke tests only; it is recorded in
``settings.json`` and flagged in every table). ``scvi.settings.seed`` is set to the seed before
each model. The baselines of :func:`ptrag_sc.tl.predict_baseline` are fitted on the same split.
The held-out cells are predicted (counterfactual mode) and scored by

- :func:`ptrag_sc.tl.evaluate` (our evaluator), and
- cell-eval (``cell_eval.MetricsEvaluator``, profile ``"full"``; an evaluator we did not write), on
  the ``(pred, real)`` pair of :func:`ptrag_sc.tl.to_cell_eval`, one cell type at a time, with the
  same real control cells on both sides. cell-eval refuses log1p data with values >= 15 (or < 0):
  such predictions are **not clipped**; the method's cell-eval values are recorded as refused
  (``ce_error``) and the tables say so;
- cell-eval2 (:func:`ptrag_sc.tl.score_cell_eval2`, the ``cell-eval2`` extra; ``--no-cell-eval2``
  skips it): the six ``vcc2026`` members per cell type on log1p input with pdex's Wilcoxon DE,
  each rescaled to ``(u - b) / (r - b)``, 0 = cell-eval2's generic mean response and 1 = its
  split-half replicate (both computed once per fold and cell type, from the real cells alone).
  Where cell-eval2 refuses a comparator (e.g. a degenerate DE gate at ~100 cells per group) the
  refusal is recorded and only members whose two ends are finite and ordered are rescaled, by
  hand, marked so in ``scored_by`` and with a dagger in the tables.

Two more measurements per held-out pair (items 2-3 of issue 18): ``cosine_to_others_pred`` /
``cosine_to_others_real``, the mean cosine between the pair's predicted (measured) mean shift and
those of the other held-out perturbations of its cell type (their mean over a cell type is the
mean pairwise cosine; after removing the shift shared by the perturbations this mean is forced
to about -1/(n-1) and says nothing, so it is not reported); and ``confidence``, the mean of
the confidence the model writes to obs (``"<key_added>_confidence"``) over the pair's predicted cells, whose
Spearman correlation with ``pearson_delta`` and ``pearson_pert_centred`` over the held-out pairs
is summarised per seed (``make_tables.py`` also pools it over the real datasets).

Outputs in ``benchmarks/results/<dataset>/`` (or ``--out``):

- ``results.csv``: one row per (seed, fold, method, cell type, perturbation) with every metric of
  ours and cell-eval (prefixed ``ce_``, refusals in ``ce_error``), the two cosines and the
  confidence;
- ``cell_eval2.csv``: one row per (seed, fold, method, cell type, member or ``mean``) with the
  raw value, baseline, replicate, rescaled score (``score``; ``score_linear`` unclamped), how it
  was obtained (``scored_by``) and cell-eval2's refusals;
- ``summary.csv``: per evaluator, method and metric, the mean and sd over seeds of the per-seed
  mean over pairs (over (fold, cell type) units for cell-eval2; ``n_seeds``, ``n_pairs``,
  ``lower_is_better``, ``error``, ``scored_by``), and the ``confidence`` rows (per-seed Spearman);
- ``summary.md``: the tables (mean ± sd, best and ties in bold) and, per headline metric, which
  method wins and whether the win is outside the noise (a difference smaller than the larger sd
  is a tie);
- ``timings.csv``: seconds to train / predict / score per model, seed and fold, the steps and
  epochs actually run and the best epoch restored;
- ``settings.json``: dataset, folds, seeds, models and their options, the ``--max-steps``
  override if any, machine (platform, CPUs, torch threads) and package versions;
- ``shift_scatter.png``: predicted vs observed mean shift per method (first seed).

``make_tables.py`` turns these files into the README table and the results section of
``docs/benchmark.md``.

Datasets
--------
glioblastoma_fewshot
    SPEC's protocol on the bundled glioblastoma lines (A172, T98G, U87MG; McFaline-Figueroa 2024
    via perturbench): one line held out per fold (3 folds), MAP2K3, MAPK1, SGK1 and TGFBR2
    tested, PLK4 validating, the line's other perturbations and all other lines (plus K562)
    training.
glioblastoma
    The same lines, every (line, perturbation) pair held out once, in 9 folds: fold k tests, in
    each line, a different perturbation (``shared[(k + 3 l) % 9]`` for line l) and validates on
    the next one, so each test perturbation is still measured in the two other lines.
k562_doubles
    The bundled Norman 2019 K562 CRISPRa part: the 15 double perturbations are held out and
    predicted from singles (plus the glioblastoma lines). Two folds: half the doubles validate
    while the other half is tested, then the halves swap.
thp1
    Real Papalexi et al. 2021 THP-1 ECCITE-seq CRISPR-KO data (sceptredata, MIT; 299 genes,
    25 targets): confidently assigned cells (top gRNA >= 5 UMIs and >= 3x the second),
    normalised to 10^4 counts and log1p; gene embeddings are MiniLM embeddings of the package's
    annotation texts of the targets. 5 folds over the 25 targets (a fixed seeded partition, 5
    test genes per fold); all other cells train; no ``val`` split is given, so the model holds
    out perturbations for validation itself. One cell line: no cross-cell-type evidence.
gbm_zeroshot
    Zero-shot cell type (PIE's "unseen context"): the three glioblastoma lines only; one line
    held out per fold (3 folds) with only its control cells in training, every perturbation of
    it tested; each is measured in the two other lines. Baselines: ``control``,
    ``other_cell_types`` (the same perturbation's mean shift in the other lines) and
    ``other_lines_context_mean`` (the mean over the other lines of their context shift; the held
    line's own context shift is undefined from training data, so ``context_mean``, ``linear``
    and ``knn`` would fall back to the control and are not run).
jurkat
    Real Jurkat CROP-seq (scPerturb test data; 2,000 genes, 20 targets each measured TCR-
    stimulated and unstimulated, the context as cell type), raw counts normalised to 10^4 and
    log1p, embeddings as for THP-1. Context transfer: the targets are split into two seeded
    halves; fold ``"<context>:<half>"`` tests that half in that context and trains on the whole
    other context and the other half of the same context (4 folds: both halves, both
    directions). Baselines: ``other_cell_types`` (the same perturbation in the other context),
    ``context_mean``, ``linear``, ``knn``, ``control``.
replogle_like
    ``ptrag_sc.datasets.synthetic(preset="replogle_nadig_like")`` scaled to fit a CPU run
    (:data:`REPLOGLE_LIKE`), with the paper's few-shot protocol: k562 held out, 5% of its
    perturbations validate, 30% test, the rest and all other lines train.

The data, the folds and the synthetic data use ``--data-seed`` (default 0), the same for every
training seed, so the spread over seeds is the spread of training alone.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the text model is bundled; never download
os.environ.setdefault("TQDM_DISABLE", "1")  # cell-eval / pdex progress bars

import argparse
import datetime as _dt
import hashlib
import json
import logging
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report as report

#: Model variants, built as ``PTRAG(adata, perturbation_embeddings=emb, **options)`` and trained with
#: ``model.train(split_key="split")``. The paper's ablation uses STATE's full backbone and
#: full-rank decoder (with the reference implementation's defects fixed).
#: The package's default, and the paper's three models as the paper trains them (energy distance
#: only, sparsity 0.1, full self-attention, full-rank decoder), with the reference
#: implementation's defects fixed (SPEC section 4).
PAPER = {"backbone": "full", "decoder_rank": None, "pseudobulk_weight": 0.0, "sparsity_weight": 0.1}
MODELS: dict[str, dict] = {
    "PT-RAG (default)": {},
    "STATE+GenePT": {"retrieval": "none", **PAPER},
    "PT-RAG (paper)": {"retrieval": "ptrag", "memory": "embedding", **PAPER},
    "vanilla RAG": {"retrieval": "vanilla", "memory": "embedding", **PAPER},
    # Stage-1 similarity choices (the default ranks by the gene-embedding cosine).
    "PT-RAG (GO similarity)": {"similarity": "go"},
    "PT-RAG (response similarity)": {"similarity": "response"},
}
BASELINES = ("control", "context_mean", "other_cell_types", "linear", "knn")
#: A baseline of this script (not of :func:`ptrag_sc.tl.predict_baseline`): every held-out cell
#: of a zero-shot line gets the mean over the other glioblastoma lines of their context shift.
OTHER_LINES_MEAN = "other_lines_context_mean"
#: Layer the model's counterfactual prediction goes to; its per-cell confidence, when the model
#: has one, goes to ``obs[PREDICTION_KEY + "_confidence"]``.
PREDICTION_KEY = "_prediction"
#: Column names and control label of every dataset here.
PERTURBATION_KEY, CELL_TYPE_KEY, CONTROL = "gene", "cell_line", "non-targeting"

#: SPEC's few-shot protocol on the glioblastoma lines: one line held out at a time.
GBM_TEST = ["MAP2K3", "MAPK1", "SGK1", "TGFBR2"]
GBM_VAL = ["PLK4"]
GBM_LINES = ["A172", "T98G", "U87MG"]

REPLOGLE_LIKE = {
    "preset": "replogle_nadig_like",
    "n_perturbations": 300,
    "n_cells_per_perturbation": 40,
    "n_control_cells": 1500,
    "sparse": False,
}
#: A quick synthetic check (same protocol as replogle_like, 500 genes).
SYNTHETIC_SMALL = {**REPLOGLE_LIKE, "n_perturbations": 120, "n_genes": 500, "n_control_cells": 600}

#: The real THP-1 data (not shipped with the package).
#: The project's shared data, beside the checkout (or ``$PTRAG_SC_SHARED_DATA``).
SHARED_DATA = Path(os.environ.get("PTRAG_SC_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
THP1_PATH = SHARED_DATA / "papalexi2021_thp1_sceptredata" / "papalexi2021_thp1_lowmoi_299genes.h5ad"
THP1_FOLDS = 5
THP1_ATTRIBUTION = (
    "Papalexi et al., Nat Genet 53:322 (2021), ECCITE-seq of THP-1 cells; subset from the "
    "sceptredata R package (Katsevich-Lab/sceptredata, commit ec722d5, MIT licence)."
)

#: The real Jurkat CROP-seq data (not shipped with the package).
JURKAT_PATH = SHARED_DATA / "datlinger2017_jurkat_scperturb_testdata" / "datlinger2017_jurkat_subset.h5ad"
JURKAT_CONTEXTS = ("stimulated", "unstimulated")
JURKAT_ATTRIBUTION = (
    "Jurkat CROP-seq under TCR stimulation (Datlinger/Bock lab screens; the cell count suggests "
    "Datlinger et al., Nat Methods 2021, scPerturb DatlingerBock2021, rather than the 2017 set): "
    "test data of the scPerturb R package (sanderlab/scPerturb, commit a02081b, MIT licence), "
    "2,000 genes."
)

#: Titles and descriptions written to settings.json (read by make_tables.py).
DATASETS: dict[str, dict[str, str]] = {
    "glioblastoma_fewshot": {
        "title": "Glioblastoma lines, SPEC's few-shot protocol",
        "short": "glioblastoma, few-shot line",
        "description": "One line held out per fold (3 folds); MAP2K3, MAPK1, SGK1 and TGFBR2 tested, PLK4 "
        "validating, the line's other perturbations, the other lines and K562 training (bundled "
        "McFaline-Figueroa 2024 / Norman 2019 data curated by perturbench).",
    },
    "glioblastoma": {
        "title": "Glioblastoma lines, every (line, perturbation) pair held out",
        "short": "glioblastoma, each pair held out",
        "description": "9 folds; each tests one perturbation per line (still measured in the two other "
        "lines), validates on the next one, trains on the rest and on K562. With one test "
        "perturbation per line, the perturbation-centred Pearson is undefined and cell-eval's "
        "discrimination score has a single candidate.",
    },
    "k562_doubles": {
        "title": "K562 CRISPRa: double perturbations predicted from singles",
        "short": "K562 doubles from singles",
        "description": "Bundled Norman 2019 K562 data; the 15 doubles are held out, two folds (half the "
        "doubles validate while the other half is tested). The additive baseline is the standard "
        "bar.",
    },
    "thp1": {
        "title": "THP-1 CRISPR-KO (Papalexi 2021): unseen target genes",
        "short": "THP-1, unseen genes",
        "description": "Real ECCITE-seq data (299 genes, 25 targets, one cell line); confidently assigned "
        "cells, normalised to 10^4 and log1p. 5 folds of 5 test genes (fixed seeded partition); no "
        "validation split is given: the model holds out perturbations itself. Gene embeddings: "
        "MiniLM on the package's annotation texts. " + THP1_ATTRIBUTION,
    },
    "gbm_zeroshot": {
        "title": "Glioblastoma lines, zero-shot cell type (PIE's unseen context)",
        "short": "glioblastoma, zero-shot line",
        "description": "The three glioblastoma lines only (bundled McFaline-Figueroa 2024 data curated by "
        "perturbench); one line held out per fold (3 folds): only its control cells train, every "
        "perturbation of it is predicted from the two other lines, where each is measured. Baselines: "
        "the same perturbation's mean shift in the other lines (`other_cell_types`) and the mean over "
        "the other lines of their context shift (`other_lines_context_mean`). The held line's own "
        "context shift is undefined from training data, so `context_mean`, `linear` and `knn` would fall "
        "back to the control there and are not run.",
    },
    "jurkat": {
        "title": "Jurkat CROP-seq: stimulated/unstimulated context transfer",
        "short": "Jurkat, context transfer",
        "description": "Real CROP-seq data, 20 targets each measured in both contexts (TCR-stimulated "
        "and unstimulated; the context is the cell type), ~100-250 cells per group, 2,000 genes, "
        "normalised to 10^4 and log1p. The targets are split in two fixed seeded halves; a fold "
        "holds out one half in one context and trains on the whole other context and the other "
        "half of the same context (4 folds: both halves, both directions), so every held-out "
        "perturbation is measured in the other context. No validation split is given: the model "
        "holds out perturbations itself. Gene embeddings: MiniLM on the package's annotation texts. "
        + JURKAT_ATTRIBUTION,
    },
    "replogle_like": {
        "title": "Synthetic Replogle–Nadig-like data",
        "short": "synthetic Replogle–Nadig-like",
        "description": "`synthetic(preset=\"replogle_nadig_like\")` scaled to 300 perturbations x 4 lines x 40 "
        "cells, 2,000 genes, 1,500 controls per line; k562 held out, 5% of its perturbations "
        "validating, 30% tested. Effects are known and shared across lines.",
    },
    "synthetic_small": {
        "title": "Small synthetic check",
        "short": "synthetic (small)",
        "description": "Same protocol as replogle_like on 120 perturbations and 500 genes.",
    },
}


# ----------------------------------------------------------------------------------- data
def load(name: str, data_seed: int, cache_dir: Path, thp1_path: Path = THP1_PATH, jurkat_path: Path = JURKAT_PATH):
    """The dataset, its folds ``{name: split array}``, gene embeddings and dataset extras."""
    import ptrag_sc

    if name == "gbm_zeroshot":
        adata = ptrag_sc.datasets.perturbench_devel(subset="glioblastoma")
        line = adata.obs[CELL_TYPE_KEY].astype(str).to_numpy()
        perturbed = adata.obs[PERTURBATION_KEY].astype(str).to_numpy() != CONTROL
        folds = {}
        for held in sorted(set(line)):
            split = np.full(adata.n_obs, "train", dtype=object)
            split[(line == held) & perturbed] = "test"
            folds[held] = split
        # context_mean, linear and knn need the held line's own context shift (undefined here): they
        # would all fall back to the control prediction.
        extra = {"baselines": ("control", "other_cell_types", OTHER_LINES_MEAN)}
        return adata, folds, adata.uns["gene_embeddings"], extra
    if name == "jurkat":
        return load_jurkat(jurkat_path, data_seed, cache_dir)
    if name in ("glioblastoma", "glioblastoma_fewshot", "k562_doubles"):
        adata = ptrag_sc.datasets.perturbench_devel()
        gene = adata.obs[PERTURBATION_KEY].astype(str).to_numpy()
        line = adata.obs[CELL_TYPE_KEY].astype(str).to_numpy()
        folds = {}
        extra = {"baselines": BASELINES}
        if name == "glioblastoma":
            lines = ["A172", "T98G", "U87MG"]
            shared = sorted(set(gene[line == "A172"]) - {CONTROL})
            for k in range(len(shared)):
                split = np.full(adata.n_obs, "train", dtype=object)
                tested = []
                for offset, held in enumerate(lines):
                    test = shared[(k + 3 * offset) % len(shared)]
                    val = shared[(k + 3 * offset + 1) % len(shared)]
                    split[(line == held) & (gene == test)] = "test"
                    split[(line == held) & (gene == val)] = "val"
                    tested.append(f"{held}:{test}")
                folds[",".join(tested)] = split
        elif name == "glioblastoma_fewshot":
            for held in ["A172", "T98G", "U87MG"]:
                split = np.full(adata.n_obs, "train", dtype=object)
                split[(line == held) & np.isin(gene, GBM_TEST)] = "test"
                split[(line == held) & np.isin(gene, GBM_VAL)] = "val"
                folds[held] = split
        else:
            doubles = sorted({g for g in gene if "+" in g})
            order = np.random.default_rng(data_seed).permutation(doubles)
            halves = [set(order[: len(order) // 2]), set(order[len(order) // 2 :])]
            for i, (test, val) in enumerate([(halves[0], halves[1]), (halves[1], halves[0])]):
                split = np.full(adata.n_obs, "train", dtype=object)
                split[np.isin(gene, list(test))] = "test"
                split[np.isin(gene, list(val))] = "val"
                folds[f"half{i}"] = split
            extra["baselines"] = (*BASELINES, "additive")
        return adata, folds, adata.uns["gene_embeddings"], extra
    if name in ("replogle_like", "synthetic_small"):
        params = REPLOGLE_LIKE if name == "replogle_like" else SYNTHETIC_SMALL
        adata = ptrag_sc.datasets.synthetic(seed=data_seed, **params)
        ptrag_sc.pp.few_shot_split(adata, held_out="k562", val_fraction=0.05, test_fraction=0.3, seed=data_seed)
        folds = {"k562": adata.obs["split"].astype(str).to_numpy().astype(object)}
        return adata, folds, adata.uns["gene_embeddings"], {"baselines": BASELINES, "synthetic": params}
    if name == "thp1":
        return load_thp1(thp1_path, data_seed, cache_dir)
    raise ValueError(f"unknown dataset {name!r}")


def load_thp1(path: Path, data_seed: int, cache_dir: Path):
    """Papalexi 2021 THP-1: confident cells, normalise_total 1e4 + log1p, 5 folds over targets."""
    import anndata as ad

    if not Path(path).exists():
        raise FileNotFoundError(f"THP-1 data not found at {path} (see --thp1-path).")
    raw = ad.read_h5ad(path)
    obs = raw.obs
    confident = ((obs["grna_top_umi"] >= 5) & (obs["grna_top_umi"] >= 3 * obs["grna_second_umi"])).to_numpy()
    adata = ad.AnnData(X=raw.X[confident].copy(), obs=obs.loc[confident, ["bio_rep", "target_top"]].copy(), var=raw.var.copy())
    normalise_log1p(adata)
    adata.obs[PERTURBATION_KEY] = adata.obs["target_top"].astype(str).to_numpy()
    adata.obs[CELL_TYPE_KEY] = "THP-1"
    gene = adata.obs[PERTURBATION_KEY].to_numpy()
    targets = sorted(set(gene) - {CONTROL})
    embeddings = gene_text_embeddings(targets, cache_dir)
    order = np.random.default_rng(data_seed).permutation(targets)
    per_fold = -(-len(order) // THP1_FOLDS)
    folds = {}
    for k in range(THP1_FOLDS):
        test = sorted(order[k * per_fold : (k + 1) * per_fold])
        split = np.where(np.isin(gene, test), "test", "train").astype(object)
        folds[",".join(test)] = split
    extra = {
        "baselines": ("control", "context_mean", "linear", "knn"),
        "data": {
            "path": str(path),
            "attribution": THP1_ATTRIBUTION,
            "cells_confident": int(confident.sum()),
            "cells_total": int(raw.n_obs),
            "genes": int(raw.n_vars),
            "targets": targets,
            "assignment": "grna_top_umi >= 5 & grna_top_umi >= 3 * grna_second_umi",
            "normalisation": "sc.pp.normalize_total(target_sum=1e4) + sc.pp.log1p",
            "embeddings": "ptrag_sc.pp.embed_gene_text(ptrag_sc.pp.gene_texts(targets)) (all-MiniLM-L6-v2)",
            "embedding_cache": str(cache_dir / "gene_embeddings.csv"),
        },
    }
    return adata, folds, embeddings, extra


def normalise_log1p(adata) -> None:
    """In place: counts normalised to 10^4 per cell, log1p, dense float32."""
    import scanpy as sc
    from scipy import sparse

    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    if sparse.issparse(adata.X):
        adata.X = adata.X.toarray()
    adata.X = np.asarray(adata.X, dtype=np.float32)


def load_jurkat(path: Path, data_seed: int, cache_dir: Path):
    """Jurkat CROP-seq, two contexts: normalise_total 1e4 + log1p, 4 context-transfer folds.

    The 20 targets are split into two halves by a seeded permutation. Fold ``"<context>:<half>"``
    tests that half in that context and trains on the other context (all of it) and the other
    half in the same context, so each held-out perturbation is measured in the other context.
    """
    import anndata as ad

    if not Path(path).exists():
        raise FileNotFoundError(f"Jurkat data not found at {path} (see --jurkat-path).")
    raw = ad.read_h5ad(path)
    adata = ad.AnnData(X=raw.X.copy(), obs=raw.obs[["sample", "perturbation", "perturbation_2", "target_gene"]].copy(), var=raw.var.copy())
    normalise_log1p(adata)
    target = adata.obs["target_gene"].astype(str).to_numpy()
    adata.obs[PERTURBATION_KEY] = np.where(target == "control", CONTROL, target)
    adata.obs[CELL_TYPE_KEY] = adata.obs["perturbation_2"].astype(str).to_numpy()
    unknown = sorted(set(adata.obs[CELL_TYPE_KEY]) - set(JURKAT_CONTEXTS))
    if unknown:
        raise ValueError(f"Unexpected Jurkat contexts {unknown} in obs['perturbation_2'].")
    gene = adata.obs[PERTURBATION_KEY].to_numpy()
    context = adata.obs[CELL_TYPE_KEY].to_numpy()
    targets = sorted(set(gene) - {CONTROL})
    embeddings = gene_text_embeddings(targets, cache_dir)
    order = np.random.default_rng(data_seed).permutation(targets)
    halves = {"A": sorted(order[: len(order) // 2]), "B": sorted(order[len(order) // 2 :])}
    folds = {}
    for held_context in JURKAT_CONTEXTS:
        for half, test in halves.items():
            split = np.full(adata.n_obs, "train", dtype=object)
            split[(context == held_context) & np.isin(gene, test)] = "test"
            folds[f"{held_context}:{half}"] = split
    extra = {
        "baselines": ("control", "context_mean", "other_cell_types", "linear", "knn"),
        "data": {
            "path": str(path),
            "attribution": JURKAT_ATTRIBUTION,
            "cells": int(adata.n_obs),
            "genes": int(adata.n_vars),
            "targets": targets,
            "halves": halves,
            "contexts": list(JURKAT_CONTEXTS),
            "normalisation": "sc.pp.normalize_total(target_sum=1e4) + sc.pp.log1p",
            "embeddings": "ptrag_sc.pp.embed_gene_text(ptrag_sc.pp.gene_texts(targets)) (all-MiniLM-L6-v2)",
            "embedding_cache": str(cache_dir / "gene_embeddings.csv"),
        },
    }
    return adata, folds, embeddings, extra


def gene_text_embeddings(targets: list[str], cache_dir: Path) -> pd.DataFrame:
    """MiniLM embeddings of the targets' annotation texts, computed once and cached as CSV."""
    import ptrag_sc

    cache = cache_dir / "gene_embeddings.csv"
    if cache.exists():
        emb = pd.read_csv(cache, index_col=0)
        if sorted(emb.index.astype(str)) == sorted(targets):
            emb.columns = emb.columns.astype(str)
            return emb.astype(np.float32)
    texts = ptrag_sc.pp.gene_texts(targets)
    missing = sorted(set(targets) - set(texts.index))
    if missing:
        raise ValueError(f"No description text for targets {missing}: cannot embed them.")
    emb = ptrag_sc.pp.embed_gene_text(texts, show_progress=False)
    cache_dir.mkdir(parents=True, exist_ok=True)
    texts.to_csv(cache_dir / "gene_texts.csv")
    emb.to_csv(cache)
    return emb


def other_lines_context_mean(adata, split: np.ndarray, *, seed: int) -> np.ndarray:
    """Prediction layer of :data:`OTHER_LINES_MEAN` (test cells predicted, others as in X).

    A held-out line of ``gbm_zeroshot`` has no training perturbation, so its own context shift
    is undefined. This baseline gives each of its test cells the mean over the other lines of
    their context shift (the unweighted mean of their training perturbations' shifts, as
    ``context_mean`` computes it), applied to matched control cells of the held line by the
    package's own rule, as every baseline of :func:`ptrag_sc.tl.predict_baseline` is.
    """
    import torch

    from ptrag_sc.data import match_controls
    from ptrag_sc.data._matrix import column_max
    from ptrag_sc.tl._baselines import _apply, _dense_float32, _TrainingStats

    x = _dense_float32(adata.X)
    gene = adata.obs[PERTURBATION_KEY].astype(str).to_numpy()
    line = adata.obs[CELL_TYPE_KEY].astype(str).to_numpy()
    is_ctrl = gene == CONTROL
    train = split == "train"
    test = split == "test"
    stats = _TrainingStats(x, gene, line, is_ctrl, train)
    paired = match_controls(is_ctrl, line, seed=seed, query=test)
    ceiling = column_max(x, train | is_ctrl)
    out = x.copy()
    with torch.no_grad():
        for held in sorted(set(line[test])):
            others = [c for c in stats.ctx if c != held]
            if not others:
                raise ValueError(f"{OTHER_LINES_MEAN}: no other line with training perturbations than {held!r}.")
            delta = np.mean([stats.ctx[c] for c in others], axis=0)
            control_mean = x[is_ctrl & (line == held)].mean(axis=0)
            rows = np.flatnonzero(test & (line == held))
            out[rows] = _apply(x[paired[rows]], delta, control_mean, ceiling)
    return out


# ------------------------------------------------------------------------------ scoring
def cell_eval_directions() -> dict[str, bool | None]:
    """``lower_is_better`` of cell-eval's metrics, from its registry's best values."""
    from cell_eval import metrics_registry

    out = {}
    for name, info in metrics_registry.metrics.items():
        best = str(getattr(info.best_value, "name", info.best_value)).upper()
        out[name] = {"ZERO": True, "ONE": False}.get(best)
    out["de_nsig_counts_real"] = out["de_nsig_counts_pred"] = None
    return out


def score_cell_eval(evaluation, *, workdir: Path, de_cache: dict, cache_key: str) -> pd.DataFrame:
    """cell-eval's per-perturbation metrics, one cell type at a time (``ce_`` columns).

    A cell type whose predictions lie outside [0, 15) is not scored (cell-eval refuses such
    data): its rows carry the reason in ``ce_error`` and no metric. cell-eval's differential
    expression of the real cells is computed once per cell set and reused.
    """
    from cell_eval import MetricsEvaluator

    from ptrag_sc import tl

    split = evaluation.obs["split"].astype(str).to_numpy()
    is_ctrl = evaluation.obs[PERTURBATION_KEY].astype(str).to_numpy() == CONTROL
    cell_types = sorted(set(evaluation.obs[CELL_TYPE_KEY].astype(str).to_numpy()[(split == "test") & ~is_ctrl]))
    frames = []
    for ct in cell_types:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the range is checked (and reported) below
            pred, real = tl.to_cell_eval(
                evaluation,
                pred_layer="pred",
                perturbation_key=PERTURBATION_KEY,
                control_group=CONTROL,
                cell_type_key=CELL_TYPE_KEY,
                cell_types=ct,
                split_key="split",
                split_values=("test",),
                pert_col="target_gene",
                control_pert=CONTROL,
            )
        perts = sorted(set(pred.obs["target_gene"].astype(str)) - {CONTROL})
        lo, hi = float(pred.X.min()), float(pred.X.max())
        error = ""
        res = None
        if lo < 0 or hi >= 15:
            error = (
                f"predictions span [{lo:.3g}, {hi:.3g}] in {ct}; cell-eval accepts log1p values in [0, 15) "
                "and refuses them (not clipped)"
            )
        else:
            digest = hashlib.sha1("\n".join(real.obs_names).encode()).hexdigest()
            key = (cache_key, ct, digest)
            try:
                ev = MetricsEvaluator(
                    pred,
                    real,
                    de_real=de_cache.get(key),
                    control_pert=CONTROL,
                    pert_col="target_gene",
                    num_threads=1,
                    outdir=str(workdir / f"ce{len(list(workdir.iterdir()))}"),  # new dir: no overwrite warning
                )
                if ev.de_comparison is not None:
                    de_cache[key] = ev.de_comparison.real.data
                res, _ = ev.compute(profile="full", write_csv=False, break_on_error=False)
            except Exception as exc:
                error = f"cell-eval failed in {ct}: {type(exc).__name__}: {exc}"
        if res is None:
            frames.append(pd.DataFrame({CELL_TYPE_KEY: ct, PERTURBATION_KEY: perts, report.CELL_EVAL_ERROR: error}))
            continue
        res = res.to_pandas().rename(columns={"perturbation": PERTURBATION_KEY})
        res = res.rename(columns={c: report.CELL_EVAL_PREFIX + c for c in res.columns if c != PERTURBATION_KEY})
        res.insert(0, CELL_TYPE_KEY, ct)
        res[report.CELL_EVAL_ERROR] = ""
        frames.append(res)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def score_cell_eval2(evaluation, *, references: dict, threads: int) -> pd.DataFrame:
    """cell-eval2's rescaled vcc2026 members per cell type (``ptrag_sc.tl.score_cell_eval2``)."""
    from ptrag_sc import tl

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # non-finite rows are counted by tl.evaluate
        return tl.score_cell_eval2(
            evaluation,
            pred_layer="pred",
            perturbation_key=PERTURBATION_KEY,
            control_group=CONTROL,
            cell_type_key=CELL_TYPE_KEY,
            split_key="split",
            split_values=("test",),
            num_threads=threads,
            reference_cache=references,
        )


def predict_with_confidence(model, evaluation) -> tuple[np.ndarray, np.ndarray | None]:
    """The counterfactual prediction of ``evaluation`` and its per-cell confidence, if any.

    The model writes into ``evaluation`` (a copy owned by the run); every obs column, layer and
    uns key it adds is removed again, so the next method starts from the same object.
    """
    from scipy import sparse

    obs_before, uns_before = set(evaluation.obs.columns), set(evaluation.uns)
    from ptrag_sc._constants import CONFIDENCE_SUFFIX

    model.predict(evaluation, key_added=PREDICTION_KEY)
    layer = evaluation.layers.pop(PREDICTION_KEY)
    layer = np.asarray(layer.toarray() if sparse.issparse(layer) else layer, dtype=np.float32)
    column = PREDICTION_KEY + CONFIDENCE_SUFFIX
    confidence = evaluation.obs[column].to_numpy(dtype=float) if column in evaluation.obs else None
    for column in set(evaluation.obs.columns) - obs_before:
        del evaluation.obs[column]
    for key in set(evaluation.uns) - uns_before:
        del evaluation.uns[key]
    return layer, confidence


def pair_shifts(evaluation, layer) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """``(cell type, perturbation, observed shift, predicted shift)`` of every test pair.

    Shifts are mean profiles minus the mean of the cell type's real control cells.
    """
    gene = evaluation.obs[PERTURBATION_KEY].astype(str).to_numpy()
    line = evaluation.obs[CELL_TYPE_KEY].astype(str).to_numpy()
    test = evaluation.obs["split"].astype(str).to_numpy() == "test"
    x = evaluation.X.toarray() if hasattr(evaluation.X, "toarray") else np.asarray(evaluation.X)
    out = []
    for ct, p in sorted(set(zip(line[test & (gene != CONTROL)], gene[test & (gene != CONTROL)], strict=True))):
        cells = test & (line == ct) & (gene == p)
        base = x[(gene == CONTROL) & (line == ct)].mean(0)
        out.append((ct, p, x[cells].mean(0) - base, np.asarray(layer[cells]).mean(0) - base))
    return out


def pair_table(pairs, evaluation, confidence: np.ndarray | None) -> pd.DataFrame:
    """Per test pair: how alike its shift is to the other held-out shifts of its cell type
    (:data:`_report.DISCRIMINATION_COLUMNS`, predicted and measured) and the mean confidence
    of its predicted cells (NaN without one)."""
    from ptrag_sc.tl._metrics import mean_cosine_to_others

    frame = pd.DataFrame({CELL_TYPE_KEY: [c for c, _, _, _ in pairs], PERTURBATION_KEY: [p for _, p, _, _ in pairs]})
    pred_cos, real_cos = np.full(len(frame), np.nan), np.full(len(frame), np.nan)
    for _, index in frame.groupby(CELL_TYPE_KEY).indices.items():
        pred_cos[index] = mean_cosine_to_others(np.vstack([pairs[i][3] for i in index]))
        real_cos[index] = mean_cosine_to_others(np.vstack([pairs[i][2] for i in index]))
    frame[report.DISCRIMINATION_COLUMNS[0]] = pred_cos
    frame[report.DISCRIMINATION_COLUMNS[1]] = real_cos
    frame[report.CONFIDENCE_COLUMN] = np.nan
    if confidence is not None:
        gene = evaluation.obs[PERTURBATION_KEY].astype(str).to_numpy()
        line = evaluation.obs[CELL_TYPE_KEY].astype(str).to_numpy()
        test = evaluation.obs["split"].astype(str).to_numpy() == "test"
        for i, (ct, p) in enumerate(zip(frame[CELL_TYPE_KEY], frame[PERTURBATION_KEY], strict=True)):
            frame.loc[i, report.CONFIDENCE_COLUMN] = float(np.nanmean(confidence[test & (line == ct) & (gene == p)]))
    return frame


# ----------------------------------------------------------------------------------- run
def machine_info() -> dict:
    import torch

    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count()
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpus_available": available,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
        "git_commit": _git_commit(),
    }


def _git_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", str(Path(__file__).parent), "status", "--porcelain", "--", "../src"], capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import ptrag_sc

    out = {"ptrag_sc": getattr(ptrag_sc, "__version__", None), "ptrag_sc_path": str(Path(ptrag_sc.__file__).parent)}
    for dist, key in (
        ("torch", "torch"),
        ("scvi-tools", "scvi"),
        ("cell-eval", "cell_eval"),
        ("cell-eval2", "cell_eval2"),
        ("pdex", "pdex"),
        ("anndata", "anndata"),
        ("scanpy", "scanpy"),
        ("numpy", "numpy"),
        ("lightning", "lightning"),
    ):
        try:
            out[key] = version(dist)
        except PackageNotFoundError:
            out[key] = None
    try:
        out["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception:
        out["git_commit"] = None
    return out


def run(
    name: str,
    *,
    seeds: list[int],
    out: Path,
    models: list[str],
    baselines: list[str] | None = None,
    n_folds: int | None = None,
    max_steps: int | None = None,
    data_seed: int = 0,
    threads: int | None = None,
    thp1_path: Path = THP1_PATH,
    jurkat_path: Path = JURKAT_PATH,
    cell_eval2: bool = True,
) -> pd.DataFrame:
    import scvi
    import torch

    import ptrag_sc
    from ptrag_sc import PTRAG, tl

    if threads:
        torch.set_num_threads(threads)
    ptrag_sc.settings.progress_bar = False
    # cell-eval2 logs every gate it applies; its refusals (exceptions) are recorded in the files.
    logging.getLogger("cell_eval2").setLevel(logging.ERROR)
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    adata, folds, embeddings, extra = load(name, data_seed, out, thp1_path, jurkat_path)
    fold_names = list(folds)[: n_folds or None]
    baselines = list(extra["baselines"] if baselines is None else baselines)
    unknown = sorted(set(baselines) - set(tl.BASELINES) - {OTHER_LINES_MEAN})
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose from {[*tl.BASELINES, OTHER_LINES_MEAN]}")
    kinds = {**{m: "model" for m in models}, **{b: "baseline" for b in baselines}}
    directions = evaluator_directions()
    settings = {
        "dataset": name,
        **DATASETS.get(name, {}),
        "seeds": seeds,
        "data_seed": data_seed,
        "folds": fold_names,
        "n_folds_total": len(folds),
        "max_steps_override": max_steps,
        "train_call": 'model.train(split_key="split")' + (f" with max_steps={max_steps} (SMOKE TEST)" if max_steps else ""),
        "models": {m: MODELS[m] for m in models},
        "baselines": baselines,
        "evaluators": {
            report.OURS: "ptrag_sc.tl.evaluate(split_key='split', split_values=('test',), seed=seed)",
            report.CELL_EVAL: "cell_eval.MetricsEvaluator(pred, real, pert_col='target_gene', control_pert='non-targeting', "
            "num_threads=1).compute(profile='full') on ptrag_sc.tl.to_cell_eval(...) per cell type; "
            "predictions outside [0, 15) are refused, not clipped",
            report.CELL_EVAL2: (
                "ptrag_sc.tl.score_cell_eval2(split_key='split', split_values=('test',), n_splits=5, seed=0) per "
                "cell type: cell-eval2's vcc2026 members, input_type='lognorm', de.backend='pdex', baseline "
                "build_generic_baseline(emit='tile'), anchor compute_replicate_anchor; refusals recorded, "
                "members rescaled by hand where both ends are finite and ordered"
                if cell_eval2
                else "not run (--no-cell-eval2)"
            ),
            "discrimination": "per pair, ptrag_sc.tl._metrics.mean_cosine_to_others of the mean shifts (vs the "
            "cell type's real control mean) of the held-out perturbations of its (seed, fold, method, cell "
            "type), predicted and measured",
            report.CONFIDENCE: f"per pair, the mean of obs[{PREDICTION_KEY + '_confidence'!r}] of its predicted cells when the "
            "model writes it; Spearman over pairs with pearson_delta and pearson_pert_centred per seed",
        },
        "summary": "mean and sd (ddof=1) over seeds of the per-seed mean over (cell type, perturbation) pairs; "
        "a difference smaller than the larger sd is a tie",
        **{k: v for k, v in extra.items() if k != "baselines"},
        "machine": machine_info(),
        "versions": versions(),
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    rows, ce2_rows, timings, scatter = [], [], [], {}
    de_cache: dict = {}
    ce2_references: dict = {}  # the baseline and replicate depend on the real cells only
    workdir = Path(tempfile.mkdtemp(prefix="ptrag_bench_cell_eval_"))
    try:
        for seed in seeds:
            for fold in fold_names:
                split = folds[fold]
                adata.obs["split"] = pd.Categorical(split)
                gene = adata.obs[PERTURBATION_KEY].astype(str).to_numpy()
                line = adata.obs[CELL_TYPE_KEY].astype(str).to_numpy()
                test = split == "test"
                keep = test | ((gene == CONTROL) & np.isin(line, np.unique(line[test])))
                evaluation = adata[keep].copy()
                layers, confidences = {}, {}
                for method in models:
                    if threads:
                        # Libraries sharing the OpenMP runtime (numba in scanpy's normalisation,
                        # cell-eval) reset torch's thread count: set it again before each model.
                        torch.set_num_threads(threads)
                    scvi.settings.seed = seed
                    PTRAG.setup_anndata(adata, perturbation_key=PERTURBATION_KEY, cell_type_key=CELL_TYPE_KEY, control_group=CONTROL)
                    model = PTRAG(adata, perturbation_embeddings=embeddings, **MODELS[method])
                    train_kwargs = {"split_key": "split"}
                    if max_steps:
                        train_kwargs["max_steps"] = max_steps
                    t0 = time.perf_counter()
                    model.train(**train_kwargs)
                    train_seconds = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    layers[method], confidences[method] = predict_with_confidence(model, evaluation)
                    trainer = getattr(model, "trainer", None)
                    timings.append(
                        {
                            "seed": seed,
                            "fold": fold,
                            "method": method,
                            "kind": "model",
                            "train_seconds": train_seconds,
                            "predict_seconds": time.perf_counter() - t0,
                            "steps_run": getattr(trainer, "global_step", None),
                            "epochs_run": (trainer.current_epoch if trainer is not None else None),
                            "best_epoch": getattr(model, "best_epoch_", None),
                            "best_step": getattr(model, "best_step_", None),
                        }
                    )
                    print(
                        f"[{name}] seed {seed} fold {fold}: {method} trained in {train_seconds:.1f}s "
                        f"({timings[-1]['steps_run']} steps, best epoch {timings[-1]['best_epoch']})",
                        flush=True,
                    )
                    del model
                for method in baselines:
                    t0 = time.perf_counter()
                    if method == OTHER_LINES_MEAN:
                        layers[method] = other_lines_context_mean(adata, split, seed=seed)[keep]
                    else:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore", UserWarning)  # fallbacks are counted in uns
                            tl.predict_baseline(
                                adata, method, split_key="split", gene_embeddings=embeddings, key_added="_baseline", seed=seed
                            )
                        layers[method] = np.asarray(adata.layers["_baseline"][keep], dtype=np.float32)
                        del adata.layers["_baseline"]
                    confidences[method] = None
                    timings.append(
                        {"seed": seed, "fold": fold, "method": method, "kind": "baseline", "train_seconds": time.perf_counter() - t0, "steps_run": 0}
                    )
                for method, layer in layers.items():
                    t0 = time.perf_counter()
                    evaluation.layers["pred"] = layer
                    ours = tl.evaluate(evaluation, pred_layer="pred", split_key="split", split_values=("test",), method=method, seed=seed)
                    pairs = pair_shifts(evaluation, layer)
                    ours = ours.merge(pair_table(pairs, evaluation, confidences[method]), on=[CELL_TYPE_KEY, PERTURBATION_KEY], how="left")
                    theirs = score_cell_eval(evaluation, workdir=workdir, de_cache=de_cache, cache_key=str(fold))
                    merged = ours.merge(theirs, on=[CELL_TYPE_KEY, PERTURBATION_KEY], how="outer") if not theirs.empty else ours
                    merged.insert(0, "seed", seed)
                    merged.insert(1, "fold", fold)
                    merged.insert(3, "kind", kinds[method])
                    rows.append(merged)
                    if cell_eval2:
                        ce2 = score_cell_eval2(evaluation, references=ce2_references, threads=threads or 1)
                        ce2.insert(0, "seed", seed)
                        ce2.insert(1, "fold", fold)
                        ce2.insert(2, "method", method)
                        ce2.insert(3, "kind", kinds[method])
                        ce2_rows.append(ce2)
                    for t in timings[::-1]:
                        if t["seed"] == seed and t["fold"] == fold and t["method"] == method:
                            t["score_seconds"] = time.perf_counter() - t0
                            break
                    if seed == seeds[0]:
                        scatter.setdefault(method, []).extend((o, p) for _, _, o, p in pairs)
                del evaluation
                settings["wall_seconds"] = time.perf_counter() - started
                write(_concat(rows), _concat(ce2_rows), pd.DataFrame(timings), scatter, out, settings, directions, kinds, final=False)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results = _concat(rows)
    settings["wall_seconds"] = time.perf_counter() - started
    write(results, _concat(ce2_rows), pd.DataFrame(timings), scatter, out, settings, directions, kinds, final=True)
    return results


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if f is not None and not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def evaluator_directions() -> dict[tuple[str, str], bool | None]:
    """``lower_is_better`` of every (evaluator, metric) summarised from ``results.csv``."""
    from ptrag_sc import tl

    directions = {(report.OURS, m): (m in tl.LOWER_IS_BETTER) for m in tl.METRIC_COLUMNS}
    directions.update({(report.OURS, m): None for m in report.DISCRIMINATION_COLUMNS})
    directions.update({(report.CELL_EVAL, m): v for m, v in cell_eval_directions().items()})
    return directions


def write(results, ce2, timings, scatter, out: Path, settings: dict, directions, kinds, *, final: bool, figure: bool = True) -> None:
    from ptrag_sc.tl import METRIC_COLUMNS

    first = ["seed", "fold", "method", "kind", CELL_TYPE_KEY, PERTURBATION_KEY]
    results = results[first + [c for c in results.columns if c not in first]]
    results.to_csv(out / "results.csv", index=False)
    if ce2 is not None and not ce2.empty:
        ce2.to_csv(out / "cell_eval2.csv", index=False)
    timings.to_csv(out / "timings.csv", index=False)
    summary = _concat(
        [
            report.summarize_seeds(results, our_metrics=[*METRIC_COLUMNS, *report.DISCRIMINATION_COLUMNS], lower_is_better=directions, kinds=kinds),
            report.summarize_cell_eval2(ce2, kinds=kinds),
            report.summarize_confidence(results, kinds=kinds),
        ]
    )
    summary.to_csv(out / "summary.csv", index=False)
    (out / "settings.json").write_text(json.dumps(settings, indent=2, default=str))
    text = report.dataset_markdown(settings["dataset"], summary, settings, timings)
    if not final:
        text = "**Partial: the run is still going.**\n\n" + text
    (out / "summary.md").write_text(text)
    if final:
        if figure:
            scatter_figure(scatter, out / "shift_scatter.png")
        print(text)


def scatter_figure(scatter: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(scatter)
    ncol = 4
    nrow = max(1, -(-len(methods) // ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 3.2 * nrow), squeeze=False)
    for ax, method in zip(axes.ravel(), methods, strict=False):
        obs = np.concatenate([o for o, _ in scatter[method]])
        pred = np.concatenate([p for _, p in scatter[method]])
        ax.scatter(obs, pred, s=2, alpha=0.3, rasterized=True)
        lim = np.nanmax(np.abs(np.concatenate([obs, pred]))) if obs.size else 1.0
        ax.plot([-lim, lim], [-lim, lim], lw=0.5, color="grey")
        r = np.corrcoef(obs, pred)[0, 1] if np.std(pred) > 0 else np.nan
        ax.set_title(f"{method}\nr = {r:.2f}", fontsize=8)
        ax.set_xlabel("observed shift", fontsize=7)
        ax.set_ylabel("predicted shift", fontsize=7)
    for ax in axes.ravel()[len(methods) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def merge(parts: list[Path], out: Path) -> pd.DataFrame:
    """Combine runs of one dataset with disjoint seeds (e.g. seeds run on two machines or days).

    Rows of ``results.csv``, ``cell_eval2.csv`` and ``timings.csv`` are concatenated; the summary is recomputed over
    all seeds; ``settings.json`` lists the seeds and records each part's settings (commit,
    machine, load) under ``parts``. The shift-scatter figure of the part holding the first
    seed is kept.
    """
    settings = [json.loads((p / "settings.json").read_text()) for p in parts]
    if len({s["dataset"] for s in settings}) != 1:
        raise ValueError(f"the parts hold different datasets: {[s['dataset'] for s in settings]}")
    results = pd.concat([pd.read_csv(p / "results.csv") for p in parts], ignore_index=True)
    timings = pd.concat([pd.read_csv(p / "timings.csv") for p in parts if (p / "timings.csv").exists()], ignore_index=True)
    ce2 = _concat([pd.read_csv(p / "cell_eval2.csv") for p in parts if (p / "cell_eval2.csv").exists()])
    seeds = [int(x) for x in results["seed"].unique()]
    if results.duplicated(["seed", "fold", "method", CELL_TYPE_KEY, PERTURBATION_KEY]).any():
        raise ValueError("the parts overlap: the same (seed, fold, method, pair) occurs twice")
    merged = {**settings[0], "seeds": sorted(seeds), "parts": settings}
    merged["wall_seconds"] = sum(float(s.get("wall_seconds", 0.0)) for s in settings)
    kinds = dict(zip(results["method"], results["kind"], strict=False))
    out.mkdir(parents=True, exist_ok=True)
    first = parts[int(np.argmin([min(s["seeds"]) for s in settings]))]
    if (first / "shift_scatter.png").exists() and first.resolve() != out.resolve():
        shutil.copy(first / "shift_scatter.png", out / "shift_scatter.png")
    write(results, ce2, timings, {}, out, merged, evaluator_directions(), kinds, final=True, figure=False)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="DIR", help="combine finished runs of one dataset with disjoint seeds into --out (no training)")
    parser.add_argument("--dataset", choices=list(DATASETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    parser.add_argument("--folds", type=int, default=None, metavar="N", help="run only the first N folds")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS), metavar="MODEL", help=f"subset of {list(MODELS)} (none: --models with no name)")
    parser.add_argument("--baselines", nargs="*", default=None, help="baselines (default: the dataset's; none: --baselines with no name)")
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="SMOKE TESTS ONLY: override the training steps (recorded in settings.json, flagged in every table)",
    )
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the folds and synthetic data (same for all training seeds)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: benchmarks/results/<dataset>)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--thp1-path", type=Path, default=THP1_PATH, help="Papalexi 2021 THP-1 h5ad (sceptredata subset)")
    parser.add_argument("--jurkat-path", type=Path, default=JURKAT_PATH, help="Jurkat CROP-seq h5ad (scPerturb test data)")
    parser.add_argument("--no-cell-eval2", dest="cell_eval2", action="store_false", help="skip cell-eval2 (it needs the cell-eval2 extra)")
    args = parser.parse_args(argv)
    if args.merge:
        if args.out is None:
            parser.error("--merge needs --out")
        merge(args.merge, args.out)
        return
    if args.dataset is None:
        parser.error("--dataset is required")
    out = args.out or Path(__file__).parent / "results" / args.dataset
    run(
        args.dataset,
        seeds=args.seeds,
        out=out,
        models=args.models,
        baselines=args.baselines,
        n_folds=args.folds,
        max_steps=args.max_steps,
        data_seed=args.data_seed,
        threads=args.threads,
        thp1_path=args.thp1_path,
        jurkat_path=args.jurkat_path,
        cell_eval2=args.cell_eval2,
    )


if __name__ == "__main__":
    main()
