"""Training and prediction speed, measured side by side in one run.

Usage::

    python benchmarks/speed.py                 # everything (about 10 minutes on 2 CPU cores)
    python benchmarks/speed.py --skip-predict  # training steps only

Training: one optimisation step (forward, backward, fused AdamW) on 16 sets x 64 cells x 2,000
genes, H=128, 4 layers, 1,536-d perturbation embeddings (GenePT's size), for a STATE-shaped
reference network and for ``PTRAGModule`` variants. Retrieval uses a response memory of 2,000
perturbations x 4 cell types (the Replogle–Nadig scale) and the real stage-1 candidates of 16
random queries. Timings are interleaved (every model runs a
block of steps in each round) and the median over rounds is reported, so background load
affects all models alike; FLOPs per cell come from ``torch.utils.flop_counter`` (matrix products
only). Also measured: the end-to-end ``PTRAG.train`` throughput (data sampling and Lightning
included) for ``retrieval="ptrag"`` vs ``"none"``.

Prediction: ``PTRAG.predict`` (counterfactual) on 100,000 perturbed cells x 2,000 genes, with the
peak resident memory of the process that predicts.

Writes ``benchmarks/results/speed/`` (``training.csv``, ``end_to_end.csv``, ``prediction.csv``,
``speed.md``).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from _state_reference import StateReference

from ptrag_sc.module import TENSORS, PTRAGModule

B, S, G, D, K, H, M = 16, 64, 2000, 1536, 32, 128, 8000

VARIANTS = {
    "STATE (reference shape)": None,
    "PTRAG none, full backbone, full-rank decoder (STATE+GenePT)": {"retrieval": "none", "backbone": "full", "decoder_rank": None},
    "PTRAG ptrag, full backbone, full-rank decoder (paper shape)": {"retrieval": "ptrag", "backbone": "full", "decoder_rank": None, "n_scorer_hidden": None},
    "PTRAG none (default shape)": {"retrieval": "none"},
    "PTRAG vanilla (default shape)": {"retrieval": "vanilla"},
    "PTRAG ptrag (default)": {"retrieval": "ptrag"},
}


def make_memory(seed: int = 1):
    """A response memory of 2,000 perturbations x 4 cell types with clustered embeddings."""
    from ptrag_sc.data import RetrievalMemory
    from ptrag_sc.data._memory import principal_basis

    gen = np.random.default_rng(seed)
    n_pert, cell_types = M // 4, np.array(["hepg2", "jurkat", "k562", "rpe1"])
    centres = gen.normal(size=(40, D))
    genes = centres[gen.integers(0, 40, n_pert)] + 0.6 * gen.normal(size=(n_pert, D))
    responses = (gen.normal(size=(M, G)) * 0.05).astype(np.float32)
    basis = principal_basis(responses[:500], 64)
    return RetrievalMemory(
        kind="response",
        perturbations=np.repeat([f"P{i}" for i in range(n_pert)], 4).astype(object),
        cell_types=np.tile(cell_types, n_pert).astype(object),
        embeddings=np.repeat(genes, 4, axis=0).astype(np.float32),
        responses=responses,
        n_cells=np.full(M, 100),
        response_codes=responses @ basis,
        response_basis=basis,
    )


def make_batch(memory, seed: int = 0) -> dict:
    """16 sets with their real stage-1 candidates, relations and context entries."""
    from ptrag_sc.data import NeighbourIndex
    from ptrag_sc.data._memory import context_responses

    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    query = rng.choice(M, B, replace=False)
    perts, cts = memory.perturbations[query].astype(str), memory.cell_types[query].astype(str)
    cand, _, same, relation = NeighbourIndex(memory, n_candidates=K, backend="exact").query(perts, memory.embeddings[query], cts)
    context, valid = context_responses(memory, perts, cts)
    x = torch.rand(B, S, G, generator=gen) * (torch.rand(B, S, G, generator=gen) < 0.3)
    return {
        TENSORS.X_CTRL: x,
        TENSORS.X_PERT: torch.roll(x, 1, dims=0),
        TENSORS.PERT_EMBEDDING: torch.from_numpy(memory.embeddings[query]),
        TENSORS.CANDIDATES: torch.from_numpy(cand),
        TENSORS.CANDIDATE_SAME_CELL_TYPE: torch.from_numpy(same),
        TENSORS.CANDIDATE_RELATION: torch.from_numpy(relation),
        TENSORS.CONTEXT_RESPONSE: torch.from_numpy(context),
        TENSORS.CONTEXT_VALID: torch.from_numpy(valid),
        TENSORS.BATCH: torch.full((B,), -1),
    }


def build(name: str, memory):
    torch.manual_seed(0)
    options = VARIANTS[name]
    if options is None:
        model = StateReference(G, D, n_hidden=H, n_layers=4, n_heads=8)

        def loss(batch):
            pert = batch[TENSORS.PERT_EMBEDDING][:, None, :].expand(-1, S, -1)
            return model.loss(batch[TENSORS.X_CTRL], pert, batch[TENSORS.X_PERT])

    else:
        model = PTRAGModule(G, D, n_hidden=H, n_layers=4, n_heads=8, **options)
        model.set_memory(memory.embeddings, memory.responses, memory.response_codes, memory.response_basis)

        def loss(batch):
            return model(batch)[2].loss

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(batch):
        optimizer.zero_grad(set_to_none=True)
        value = loss(batch)
        value.backward()
        optimizer.step()

    return model, loss, step


def training(rounds: int, steps: int) -> pd.DataFrame:
    memory = make_memory()
    batch = make_batch(memory)
    built = {name: build(name, memory) for name in VARIANTS}
    flops = {}
    for name, (_, loss, _) in built.items():
        counter = FlopCounterMode(display=False)
        with counter:
            loss(batch).backward()
        flops[name] = counter.get_total_flops() / (B * S)
    for _, _, step in built.values():  # warm-up
        for _ in range(3):
            step(batch)
    times = {name: [] for name in VARIANTS}
    for _ in range(rounds):
        for name, (_, _, step) in built.items():
            start = time.perf_counter()
            for _ in range(steps):
                step(batch)
            times[name].append((time.perf_counter() - start) / steps)
    rows = []
    for name in VARIANTS:
        t = statistics.median(times[name])
        rows.append({"model": name, "step_ms": 1e3 * t, "cells_per_s": B * S / t, "mflop_per_cell": flops[name] / 1e6, "params": sum(p.numel() for p in built[name][0].parameters())})
    table = pd.DataFrame(rows)
    state = table.loc[table["model"] == "STATE (reference shape)", "cells_per_s"].iloc[0]
    table["speed_vs_state"] = table["cells_per_s"] / state
    return table


def end_to_end(steps: int) -> pd.DataFrame:
    import scvi

    import ptrag_sc

    ptrag_sc.settings.progress_bar = False
    adata = ptrag_sc.datasets.synthetic(n_cell_types=4, n_perturbations=60, n_genes=G, n_cells_per_perturbation=128, n_control_cells=1000, seed=0)
    rows = []
    for retrieval in ("none", "ptrag"):
        scvi.settings.seed = 0
        ptrag_sc.PTRAG.setup_anndata(adata)
        model = ptrag_sc.PTRAG(adata, perturbation_embeddings=adata.uns["gene_embeddings"], retrieval=retrieval)
        spans = []
        for n in (5, 5 + steps):
            start = time.perf_counter()
            model.train(max_steps=n, train_size=1.0, enable_model_summary=False)
            spans.append(time.perf_counter() - start)
        per_step = (spans[1] - spans[0]) / steps
        rows.append({"retrieval": retrieval, "step_ms": 1e3 * per_step, "cells_per_s": B * S / per_step})
    table = pd.DataFrame(rows)
    table["ratio_vs_none"] = table["step_ms"] / table.loc[table["retrieval"] == "none", "step_ms"].iloc[0]
    return table


PREDICT_SCRIPT = r"""
import json, resource, sys, time
import numpy as np, scvi, torch, ptrag_sc
ptrag_sc.settings.progress_bar = False
scvi.settings.seed = 0
adata = ptrag_sc.datasets.synthetic(n_cell_types=4, n_perturbations=250, n_genes=2000, n_cells_per_perturbation=100, n_control_cells=2000, seed=1)
ptrag_sc.PTRAG.setup_anndata(adata)
model = ptrag_sc.PTRAG(adata, perturbation_embeddings=adata.uns["gene_embeddings"], retrieval=sys.argv[1])
model.train(max_steps=3, train_size=1.0)
n_pred = int((adata.obs["gene"] != "non-targeting").sum())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
model.predict(adata)
seconds = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"retrieval": sys.argv[1], "cells": n_pred, "genes": adata.n_vars, "seconds": seconds, "cells_per_s": n_pred / seconds,
                  "peak_rss_gib": after / 2**20, "rss_before_predict_gib": before / 2**20, "layer_gib": adata.layers["ptrag"].nbytes / 2**30}))
"""


def prediction() -> pd.DataFrame:
    rows = []
    for retrieval in ("ptrag", "none"):
        out = subprocess.run([sys.executable, "-c", PREDICT_SCRIPT, retrieval], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return pd.DataFrame(rows)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--e2e-steps", type=int, default=40)
    parser.add_argument("--skip-predict", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "speed")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    machine = f"{_cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    train_table = training(args.rounds, args.steps)
    train_table.to_csv(args.out / "training.csv", index=False)
    print(train_table.round(3).to_string(index=False), flush=True)
    e2e = end_to_end(args.e2e_steps)
    e2e.to_csv(args.out / "end_to_end.csv", index=False)
    print(e2e.round(3).to_string(index=False), flush=True)
    lines = [
        "### Training step, 16 sets x 64 cells x 2,000 genes, H=128, 4 layers (module level)",
        f"Machine: {machine}. Median of {args.rounds} interleaved rounds of {args.steps} steps.",
        "",
        train_table.round(2).to_markdown(index=False),
        "",
        f"### End-to-end `PTRAG.train` (sampling and Lightning included), {args.e2e_steps} steps",
        "",
        e2e.round(3).to_markdown(index=False),
        "",
    ]
    if not args.skip_predict:
        pred = prediction()
        pred.to_csv(args.out / "prediction.csv", index=False)
        print(pred.round(3).to_string(index=False), flush=True)
        lines += ["### Prediction, counterfactual `PTRAG.predict`, 100,000 cells x 2,000 genes", "", pred.round(3).to_markdown(index=False), ""]
    (args.out / "speed.md").write_text("\n".join(lines))
    print(f"max RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
