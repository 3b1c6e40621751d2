"""Does an in-silico screen (``ptrag_sc.tl.screen``) rank perturbations by their real effect?

Usage::

    python benchmarks/screen_validation.py                 # synthetic + bundled real data
    python benchmarks/screen_validation.py --only synthetic

Each model is a default :class:`ptrag_sc.PTRAG` trained as a user would
(``model.train(split_key="split")``: default steps, validation and early stopping). The screen
is scored only on perturbations the model never trained on in the screened cell type.

synthetic (known effects)
    ``datasets.synthetic`` with 3 cell lines x 150 perturbations x 40 cells, 500 genes. In
    ``cell_line_0``, 30% of the perturbations are held out (measured in the two other lines) and
    15% more are held out *everywhere* (never measured: the embedding alone speaks for them); 5%
    validate. ``cell_line_0`` is screened for every gene with an embedding and compared with
    ``uns["true_effects"]`` on the held-out perturbations:

    - effect size: Spearman between the screen's score (norm of the predicted mean shift) and
      the norm of the true shift; precision of the top 10 against the true top 10;
    - 20 signatures (the 10 most up- and 10 most down-regulated genes of a random perturbation's
      true effect): Spearman and top-10 precision of the screen's signature score against the
      true signature score, averaged.

    The same statistics for the baselines of ``tl.predict_baseline`` (their predicted mean
    shifts of the same held-out perturbations) and for a random ranking.

glioblastoma_fewshot, k562_doubles (bundled real data, ``datasets.perturbench_devel``)
    The folds of ``benchmarks/run_benchmark.py``: in each glioblastoma line MAP2K3, MAPK1, SGK1 and
    TGFBR2 held out (3 folds), or the 15 K562 double perturbations held out (2 folds, screened as
    ``combinations``). Spearman, pooled over folds, between the screen's score (predicted
    shift norm) and the observed shift norm of the held-out perturbations, with the same for
    the ``other_cell_types`` / ``additive`` baselines, and the data's own ceiling: Spearman
    between the observed shift norms of two random halves of each perturbation's cells.

Writes ``benchmarks/results/screen/validation.csv`` and ``validation.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

PERT, CT, CONTROL = "gene", "cell_line", "non-targeting"
SYNTHETIC = {
    "n_cell_types": 3,
    "n_perturbations": 150,
    "n_genes": 500,
    "n_cells_per_perturbation": 40,
    "n_control_cells": 300,
    "n_batches": 1,
}
K = 10
N_SIGNATURES = 20
GBM_TEST = ["MAP2K3", "MAPK1", "SGK1", "TGFBR2"]
GBM_VAL = ["PLK4"]


def precision_at(pred: np.ndarray, true: np.ndarray, k: int) -> float:
    k = min(k, len(true))
    return len(set(np.argsort(-pred)[:k]) & set(np.argsort(-true)[:k])) / k


def dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x)


def baseline_shifts(adata, method: str, embeddings, groups: list[tuple[str, str]]) -> pd.DataFrame:
    """Predicted mean shift of each (cell type, perturbation) group by a baseline."""
    import ptrag_sc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ptrag_sc.tl.predict_baseline(
            adata, method, split_key="split", gene_embeddings=embeddings, key_added="_b"
        )
    gene = adata.obs[PERT].astype(str).to_numpy()
    line = adata.obs[CT].astype(str).to_numpy()
    X = dense(adata.X)
    layer = dense(adata.layers["_b"])
    del adata.layers["_b"]
    rows = {}
    for ct, p in groups:
        cells = (gene == p) & (line == ct)
        rows[p] = layer[cells].mean(0) - X[(gene == CONTROL) & (line == ct)].mean(0)
    return pd.DataFrame.from_dict(rows, orient="index", columns=adata.var_names)


def train(adata, embeddings, seed: int):
    import scvi

    import ptrag_sc

    scvi.settings.seed = seed
    ptrag_sc.PTRAG.setup_anndata(
        adata, perturbation_key=PERT, cell_type_key=CT, control_group=CONTROL
    )
    model = ptrag_sc.PTRAG(adata, perturbation_embeddings=embeddings)
    t0 = time.perf_counter()
    model.train(split_key="split")
    return model, time.perf_counter() - t0


def synthetic(seed: int) -> list[dict]:
    import ptrag_sc

    adata = ptrag_sc.datasets.synthetic(seed=seed, **SYNTHETIC)
    gene = adata.obs[PERT].astype(str).to_numpy()
    line = adata.obs[CT].astype(str).to_numpy()
    perts = np.array(sorted(set(gene) - {CONTROL}))
    rng = np.random.default_rng(seed)
    order = rng.permutation(perts)
    n = len(perts)
    unseen = order[: round(0.15 * n)]
    test = order[round(0.15 * n) : round(0.45 * n)]
    val = order[round(0.45 * n) : round(0.50 * n)]
    held_line = "cell_line_0"
    split = np.full(adata.n_obs, "train", dtype=object)
    split[(line == held_line) & np.isin(gene, test)] = "test"
    split[(line == held_line) & np.isin(gene, val)] = "val"
    split[np.isin(gene, unseen)] = "test"  # never measured anywhere
    adata.obs["split"] = pd.Categorical(split)
    embeddings = adata.uns["gene_embeddings"]
    model, seconds = train(adata, embeddings, seed)
    t0 = time.perf_counter()
    table, shifts = ptrag_sc.tl.screen(model, cell_type=held_line, return_shifts=True)
    screen_seconds = time.perf_counter() - t0
    true = adata.uns["true_effects"]
    held = np.concatenate([test, unseen])
    predictions = {"PT-RAG screen": shifts.loc[held]}
    groups = [(held_line, p) for p in held]
    for method in ("linear", "knn", "other_cell_types"):
        predictions[f"baseline: {method}"] = baseline_shifts(
            adata, method, embeddings, groups
        ).loc[held]
    true_held = true.loc[[f"{held_line}:{p}" for p in held]].to_numpy()
    sig_rng = np.random.default_rng(seed + 1)
    signatures = []
    for p in sig_rng.choice(perts, N_SIGNATURES, replace=False):
        effect = true.loc[f"{held_line}:{p}"].sort_values()
        signatures.append((effect.index[-10:].tolist(), effect.index[:10].tolist()))
    rows = []
    subsets = {
        "all held-out": np.ones(len(held), bool),
        "measured in other lines": np.isin(held, test),
        "never measured": np.isin(held, unseen),
    }
    for name, pred in predictions.items():
        pred = pred.loc[held]
        for subset, mask in subsets.items():
            p_norm = np.linalg.norm(pred.to_numpy()[mask], axis=1)
            t_norm = np.linalg.norm(true_held[mask], axis=1)
            sig_rho, sig_prec = [], []
            for up, down in signatures:
                ps = (
                    pred.loc[mask, up].mean(1).to_numpy() - pred.loc[mask, down].mean(1).to_numpy()
                )
                cols = pd.Index(true.columns)
                ts = true_held[mask][:, cols.get_indexer(up)].mean(1) - true_held[mask][
                    :, cols.get_indexer(down)
                ].mean(1)
                sig_rho.append(spearmanr(ps, ts).statistic)
                sig_prec.append(precision_at(ps, ts, K))
            rows.append(
                {
                    "dataset": "synthetic",
                    "method": name,
                    "perturbations": subset,
                    "n": int(mask.sum()),
                    "effect_spearman": spearmanr(p_norm, t_norm).statistic,
                    f"effect_precision_at_{K}": precision_at(p_norm, t_norm, K),
                    "signature_spearman": float(np.mean(sig_rho)),
                    f"signature_precision_at_{K}": float(np.mean(sig_prec)),
                }
            )
    for subset, mask in subsets.items():
        rows.append(
            {
                "dataset": "synthetic",
                "method": "random ranking (expected)",
                "perturbations": subset,
                "n": int(mask.sum()),
                "effect_spearman": 0.0,
                f"effect_precision_at_{K}": min(K, mask.sum()) / mask.sum(),
                "signature_spearman": 0.0,
                f"signature_precision_at_{K}": min(K, mask.sum()) / mask.sum(),
            }
        )
    for r in rows:
        r.update(
            train_seconds=round(seconds, 1),
            screen_seconds=round(screen_seconds, 1),
            screened=len(table),
        )
    return rows


def real(name: str, seed: int) -> list[dict]:
    import ptrag_sc

    adata = ptrag_sc.datasets.perturbench_devel()
    gene = adata.obs[PERT].astype(str).to_numpy()
    line = adata.obs[CT].astype(str).to_numpy()
    X = dense(adata.X)
    folds = {}
    if name == "glioblastoma_fewshot":
        for held in ["A172", "T98G", "U87MG"]:
            split = np.full(adata.n_obs, "train", dtype=object)
            split[(line == held) & np.isin(gene, GBM_TEST)] = "test"
            split[(line == held) & np.isin(gene, GBM_VAL)] = "val"
            folds[held] = (split, held, GBM_TEST, "other_cell_types")
    else:
        doubles = sorted({g for g in gene if "+" in g})
        order = np.random.default_rng(0).permutation(doubles)
        halves = [list(order[: len(order) // 2]), list(order[len(order) // 2 :])]
        for i, (test, val) in enumerate([(halves[0], halves[1]), (halves[1], halves[0])]):
            split = np.full(adata.n_obs, "train", dtype=object)
            split[np.isin(gene, test)] = "test"
            split[np.isin(gene, val)] = "val"
            folds[f"half{i}"] = (split, "k562", test, "additive")
    pooled = {"PT-RAG screen": [], "baseline": [], "observed": [], "half_a": [], "half_b": []}
    rng = np.random.default_rng(seed)
    seconds = []
    baseline_name = ""
    for fold, (split, held_line, test, baseline) in folds.items():
        adata.obs["split"] = pd.Categorical(split)
        model, sec = train(adata, adata.uns["gene_embeddings"], seed)
        seconds.append(sec)
        combos = [p for p in test if "+" in p]
        table = ptrag_sc.tl.screen(model, cell_type=held_line, combinations=combos or None)
        table = table.set_index("perturbation")
        base = baseline_shifts(
            adata, baseline, adata.uns["gene_embeddings"], [(held_line, p) for p in test]
        )
        baseline_name = baseline
        ctrl = X[(gene == CONTROL) & (line == held_line)].mean(0)
        for p in test:
            cells = np.flatnonzero((gene == p) & (line == held_line))
            halves = np.array_split(rng.permutation(cells), 2)
            pooled["PT-RAG screen"].append(table.loc[p, "score"])
            pooled["observed"].append(table.loc[p, "observed_score"])
            pooled["baseline"].append(np.linalg.norm(base.loc[p].to_numpy()))
            pooled["half_a"].append(np.linalg.norm(X[halves[0]].mean(0) - ctrl))
            pooled["half_b"].append(np.linalg.norm(X[halves[1]].mean(0) - ctrl))
        print(f"[{name}] fold {fold}: trained in {sec:.0f}s", flush=True)
    observed = np.asarray(pooled["observed"])
    common = {
        "dataset": name,
        "perturbations": "held-out (pooled over folds)",
        "n": len(observed),
        "train_seconds": round(float(np.mean(seconds)), 1),
    }
    return [
        {
            **common,
            "method": "PT-RAG screen",
            "effect_spearman": spearmanr(pooled["PT-RAG screen"], observed).statistic,
        },
        {
            **common,
            "method": f"baseline: {baseline_name}",
            "effect_spearman": spearmanr(pooled["baseline"], observed).statistic,
        },
        {
            **common,
            "method": "split-half ceiling",
            "effect_spearman": spearmanr(pooled["half_a"], pooled["half_b"]).statistic,
        },
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        choices=["synthetic", "glioblastoma_fewshot", "k562_doubles"],
        nargs="+",
        default=None,
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "screen")
    args = parser.parse_args(argv)

    import torch

    import ptrag_sc

    torch.set_num_threads(args.threads)
    ptrag_sc.settings.progress_bar = False
    args.out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    rows = []
    for name in args.only or ["synthetic", "glioblastoma_fewshot", "k562_doubles"]:
        rows += synthetic(args.seed) if name == "synthetic" else real(name, args.seed)
        frame = pd.DataFrame(rows)
        frame.to_csv(args.out / "validation.csv", index=False)
    frame = pd.DataFrame(rows)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count()
    shown = frame.drop(
        columns=[c for c in ("train_seconds", "screen_seconds", "screened") if c in frame.columns]
    )
    lines = [
        "# In-silico screen validation",
        "",
        f"`python benchmarks/screen_validation.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        "",
        f"Machine: {platform.platform()}, {cpus} CPU cores, torch threads {args.threads}, load "
        f"average {load:.1f} at the start; "
        f"seed {args.seed}; wall time {time.perf_counter() - started:.0f} s. Default `PTRAG` "
        "trained with "
        "`model.train(split_key='split')`; scores on held-out perturbations only.",
        "",
        shown.to_markdown(index=False, floatfmt=".3f"),
        "",
    ]
    (args.out / "validation.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
