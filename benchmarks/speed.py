"""Training and prediction speed, measured side by side in one run.

Usage::

    # everything, 1 and 2 threads (about 30 minutes on 2 CPU cores)
    python benchmarks/speed.py
    python benchmarks/speed.py --threads 1        # one thread count
    python benchmarks/speed.py --skip-predict --skip-e2e   # module-level training steps only
    python benchmarks/speed.py --profile          # also the profiles of 50 default training steps

**Training step** (module level): one optimisation step (forward, backward, gradient clipping,
fused AdamW) on 16 sets x 64 cells x 2,000 genes, H=128, 4 layers, 1,536-d perturbation
embeddings (GenePT's size), for a STATE-shaped reference network
(``benchmarks/_state_reference.py``) and ``PTRAGModule`` variants. Retrieval reads a response
memory of 500 perturbations x 4 cell types built by the data layer (stacked leave-one-out
evidence) and the real stage-1 candidates and evidence of 16 queries. Every round runs a block
of steps of every model in turn (so background load hits all alike); the median over rounds is
reported, as wall-clock time and as the CPU time of this process (less sensitive to other
processes on a shared machine). Ratios to STATE are computed within each round's setting.

**End to end**: steady-state ``PTRAG.train`` step time inside one run (data sampling, batch
building and Lightning included): a callback stamps every training step; the median interval
between consecutive steps is the step time (validation runs are reported apart). Runs of
``retrieval="none"`` and ``"ptrag"`` alternate, repeated, and the ratio is taken from the
medians of the same run.

**Prediction**: ``PTRAG.predict`` (counterfactual) on 100,000 perturbed cells x 2,000 genes, in a
fresh process per setting (so its peak resident memory is its own).

Writes ``benchmarks/results/speed/`` (``training.csv``, ``end_to_end.csv``, ``prediction.csv``,
``speed.md``, and with ``--profile`` ``profile_training.txt`` and ``profile_ops.txt``).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
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
import _report as report
from _state_reference import StateReference

from ptrag_sc.module import TENSORS, PTRAGModule

B, S, G, D, K, H = 16, 64, 2000, 1536, 32, 128
N_PERTURBATIONS, CELL_TYPES = 500, ("hepg2", "jurkat", "k562", "rpe1")
STATE = "STATE (reference shape)"
DEFAULT = "PTRAG ptrag (default)"

VARIANTS = {
    STATE: None,
    "PTRAG none, full backbone, full-rank decoder (STATE+GenePT)": {
        "retrieval": "none",
        "backbone": "full",
        "decoder_rank": None,
    },
    "PTRAG ptrag, full backbone, full-rank decoder (paper shape)": {
        "retrieval": "ptrag",
        "backbone": "full",
        "decoder_rank": None,
        "n_scorer_hidden": None,
    },
    "PTRAG none (default shape)": {"retrieval": "none"},
    "PTRAG vanilla (default shape)": {"retrieval": "vanilla"},
    DEFAULT: {},
}


# --------------------------------------------------------------------------- module level
def make_memory(seed: int = 1):
    """A response memory of 500 perturbations x 4 cell types with clustered gene embeddings."""
    from ptrag_sc.data import PerturbationEncoder, memory_from_means

    gen = np.random.default_rng(seed)
    centres = gen.normal(size=(40, D))
    genes = centres[gen.integers(0, 40, N_PERTURBATIONS)] + 0.6 * gen.normal(
        size=(N_PERTURBATIONS, D)
    )
    names = [f"G{i}" for i in range(N_PERTURBATIONS)]
    encoder = PerturbationEncoder(pd.DataFrame(genes.astype(np.float32), index=names))
    perturbations = np.repeat(names, len(CELL_TYPES))
    cell_types = np.tile(CELL_TYPES, N_PERTURBATIONS)
    effect = np.repeat(gen.normal(size=(N_PERTURBATIONS, G)) * 0.05, len(CELL_TYPES), axis=0)
    means = 1.0 + effect + 0.02 * gen.normal(size=effect.shape)
    memory = memory_from_means(
        "response",
        perturbations=perturbations,
        cell_types=cell_types,
        entry_means=means,
        control_means=np.ones_like(means),
        n_cells=np.full(len(perturbations), 100),
        encoder=encoder,
    )
    return encoder, memory


def make_batch(encoder, memory, seed: int = 0) -> dict:
    """16 sets of 64 cells with the stage-1 candidates and evidence the data layer builds."""
    from ptrag_sc.data import NeighbourIndex, SetBuilder
    from ptrag_sc.data._matrix import ExpressionMatrix
    from ptrag_sc.data._sets import make_batch as build_batch

    rng = np.random.default_rng(seed)
    query = rng.choice(len(memory), B, replace=False)
    builder = SetBuilder(
        encoder,
        memory,
        NeighbourIndex(memory, n_candidates=K, backend="exact"),
        n_candidates=K,
        match_batch=False,
    )
    cells = (rng.random((4 * B * S, G)) * (rng.random((4 * B * S, G)) < 0.3)).astype(np.float32)
    groups = builder.prediction_groups(
        labels=memory.perturbations[query].astype(str),
        cell_types=memory.cell_types[query].astype(str),
        batches=np.full(B, -1),
        context_index=np.zeros(B, dtype=np.int64),
        context_means=cells[: 2 * B * S].mean(0, keepdims=True),
    )
    rows = rng.permutation(cells.shape[0])
    batch = build_batch(
        ExpressionMatrix(cells),
        groups,
        np.arange(B),
        rows[: B * S].reshape(B, S),
        rows[B * S : 2 * B * S].reshape(B, S),
    )
    batch[TENSORS.TARGET_SHIFT] = torch.from_numpy(
        (0.05 * rng.normal(size=(B, G))).astype(np.float32)
    )
    return batch


def build(name: str, memory, batch):
    """Model, loss closure and training-step closure of a variant."""
    torch.manual_seed(0)
    options = VARIANTS[name]
    if options is None:
        model = StateReference(G, D, n_hidden=H, n_layers=4, n_heads=8)

        def loss():
            pert = batch[TENSORS.PERT_EMBEDDING][:, None, :].expand(-1, S, -1)
            return model.loss(batch[TENSORS.X_CTRL], pert, batch[TENSORS.X_PERT])

    else:
        model = PTRAGModule(G, D, n_hidden=H, n_layers=4, n_heads=8, **options)
        model.set_memory(memory.embeddings, memory.response_codes)
        model.set_data_constants(batch[TENSORS.X_CTRL].amax((0, 1)).numpy() * 1.5, 0.1)

        def loss():
            return model(batch)[2].loss

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()

    return model, loss, step


def training(threads: list[int], rounds: int, steps: int) -> pd.DataFrame:
    encoder, memory = make_memory()
    batch = make_batch(encoder, memory)
    built = {name: build(name, memory, batch) for name in VARIANTS}
    flops = {}
    for name, (_, loss, _) in built.items():
        counter = FlopCounterMode(display=False)
        with counter:
            loss().backward()
        flops[name] = counter.get_total_flops() / (B * S)
    rows = []
    torch.set_flush_denormal(True)
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for _, _, step in built.values():  # warm-up
            for _ in range(3):
                step()
        wall = {name: [] for name in VARIANTS}
        cpu = {name: [] for name in VARIANTS}
        for _ in range(rounds):
            for name, (_, _, step) in built.items():
                w0, c0 = time.perf_counter(), time.process_time()
                for _ in range(steps):
                    step()
                wall[name].append((time.perf_counter() - w0) / steps)
                cpu[name].append((time.process_time() - c0) / steps)
        for name in VARIANTS:
            t, c = statistics.median(wall[name]), statistics.median(cpu[name])
            rows.append(
                {
                    "threads": n_threads,
                    "model": name,
                    "step_ms": 1e3 * t,
                    "cpu_ms": 1e3 * c,
                    "cells_per_s": B * S / t,
                    "mflop_per_cell": flops[name] / 1e6,
                    "params": sum(
                        p.numel() for p in built[name][0].parameters() if p.requires_grad
                    ),
                }
            )
    table = pd.DataFrame(rows)
    for n_threads in threads:
        here = table["threads"] == n_threads
        state = table[here & (table["model"] == STATE)].iloc[0]
        table.loc[here, "x_state"] = state["step_ms"] / table.loc[here, "step_ms"]
        table.loc[here, "x_state_cpu"] = state["cpu_ms"] / table.loc[here, "cpu_ms"]
    return table


def profile_ops(path: Path, steps: int = 10) -> None:
    """torch.profiler table of the default module's training step (operators by own CPU time)."""
    from torch.profiler import profile

    encoder, memory = make_memory()
    batch = make_batch(encoder, memory)
    _, _, step = build(DEFAULT, memory, batch)
    torch.set_num_threads(1)
    for _ in range(3):
        step()
    with profile(record_shapes=True) as prof:
        for _ in range(steps):
            step()
    table = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total",
        row_limit=40,
        max_name_column_width=40,
        max_shapes_column_width=60,
    )
    path.write_text(
        f"Default PTRAGModule training step, {steps} steps, 1 thread, 16 x 64 x 2,000 (times "
        f"include profiler overhead)\n\n{table}\n"
    )


# ----------------------------------------------------------------------------- end to end
def _synthetic():
    import ptrag_sc

    ptrag_sc.settings.progress_bar = False
    return ptrag_sc.datasets.synthetic(
        n_cell_types=4,
        n_perturbations=60,
        n_genes=G,
        n_cells_per_perturbation=128,
        n_control_cells=1000,
        seed=0,
    )


def _step_clock():
    import lightning.pytorch as pl

    class StepClock(pl.Callback):
        """Wall and CPU time stamps at the end of every training step and around validation."""

        def __init__(self) -> None:
            self.steps: list[tuple[float, float]] = []
            self.validation: list[float] = []
            self._start = 0.0

        def on_train_batch_end(self, *args, **kwargs) -> None:
            self.steps.append((time.perf_counter(), time.process_time()))

        def on_validation_start(self, *args, **kwargs) -> None:
            self._start = time.perf_counter()

        def on_validation_end(self, trainer, *args, **kwargs) -> None:
            if not trainer.sanity_checking:
                self.validation.append(time.perf_counter() - self._start)

    return StepClock()


def _train(adata, retrieval: str, steps: int, callbacks=()):
    import scvi

    import ptrag_sc

    scvi.settings.seed = 0
    ptrag_sc.PTRAG.setup_anndata(adata)
    # GO annotations are left out: the synthetic genes are not human symbols. The training step
    # is the same computation with or without them (the annotation similarities are a tensor
    # of the batch either way).
    model = ptrag_sc.PTRAG(
        adata,
        perturbation_embeddings=adata.uns["gene_embeddings"],
        retrieval=retrieval,
        gene_annotations=None,
    )
    model.train(
        max_steps=steps,
        check_val_every_n_steps=steps // 2,
        callbacks=list(callbacks),
        enable_model_summary=False,
    )
    return model


def end_to_end(threads: list[int], steps: int, repeats: int) -> pd.DataFrame:
    import ptrag_sc

    adata = _synthetic()
    rows = []
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        ptrag_sc.settings.num_threads = n_threads  # the package sets torch's threads to this
        for repeat in range(repeats):
            order = ("none", "ptrag") if repeat % 2 == 0 else ("ptrag", "none")
            for retrieval in order:
                clock = _step_clock()
                _train(adata, retrieval, steps, [clock])
                stamps = np.array(clock.steps[3:])  # after warm-up
                intervals = np.diff(stamps, axis=0)
                rows.append(
                    {
                        "threads": n_threads,
                        "repeat": repeat,
                        "retrieval": retrieval,
                        "step_ms": 1e3 * float(np.median(intervals[:, 0])),
                        "cpu_ms": 1e3 * float(np.median(intervals[:, 1])),
                        "validation_s": float(np.median(clock.validation))
                        if clock.validation
                        else float("nan"),
                    }
                )
    runs = pd.DataFrame(rows)
    table = runs.groupby(["threads", "retrieval"], as_index=False)[
        ["step_ms", "cpu_ms", "validation_s"]
    ].median()
    table["cells_per_s"] = B * S / (table["step_ms"] / 1e3)
    for n_threads in threads:
        here = table["threads"] == n_threads
        none = table[here & (table["retrieval"] == "none")].iloc[0]
        table.loc[here, "ratio_vs_none"] = table.loc[here, "step_ms"] / none["step_ms"]
        table.loc[here, "ratio_vs_none_cpu"] = table.loc[here, "cpu_ms"] / none["cpu_ms"]
        # The ratio within each repeat (adjacent runs), then the median over repeats.
        paired = runs[runs["threads"] == n_threads].pivot(
            index="repeat", columns="retrieval", values="step_ms"
        )
        table.loc[here & (table["retrieval"] == "ptrag"), "paired_ratio"] = float(
            (paired["ptrag"] / paired["none"]).median()
        )
    return table


def profile_training(path: Path, steps: int = 50) -> None:
    """cProfile of ``steps`` default training steps (the Lightning fit only), top functions."""
    from ptrag_sc.model import _training

    adata = _synthetic()
    torch.set_num_threads(1)
    profiler = cProfile.Profile()
    run = _training.run_trainer

    def profiled(*args, **kwargs):
        profiler.enable()
        try:
            return run(*args, **kwargs)
        finally:
            profiler.disable()

    _training.run_trainer = profiled
    try:
        start = time.perf_counter()
        _train(adata, "ptrag", steps)
        seconds = time.perf_counter() - start
    finally:
        _training.run_trainer = run
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    out.write(
        f"{steps} training steps of the default PTRAG (1 thread), `PTRAG.train` {seconds:.1f} s "
        "in all; the profile covers the Lightning fit.\n\n"
    )
    stats.sort_stats("cumulative").print_stats(45)
    stats.sort_stats("tottime").print_stats(25)
    path.write_text(out.getvalue())


# ------------------------------------------------------------------------------ prediction
PREDICT_SCRIPT = r"""
import json, resource, sys, time
import numpy as np, scvi, torch, ptrag_sc
torch.set_num_threads(int(sys.argv[2]))
ptrag_sc.settings.num_threads = int(sys.argv[2])
ptrag_sc.settings.progress_bar = False
scvi.settings.seed = 0
adata = ptrag_sc.datasets.synthetic(
    n_cell_types=4, n_perturbations=250, n_genes=2000, n_cells_per_perturbation=100,
    n_control_cells=2000, seed=1,
)
ptrag_sc.PTRAG.setup_anndata(adata)
model = ptrag_sc.PTRAG(
    adata, perturbation_embeddings=adata.uns["gene_embeddings"], retrieval=sys.argv[1],
    gene_annotations=None,
)
model.train(max_steps=3, validation_size=0.0)
n_pred = int((adata.obs["gene"] != "non-targeting").sum())
def peak_kib():
    # VmHWM is this process's own peak; ru_maxrss keeps the parent's from before exec.
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
before = peak_kib()
start, cpu = time.perf_counter(), time.process_time()
model.predict(adata)
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
after = peak_kib()
print(json.dumps({
    "retrieval": sys.argv[1], "threads": int(sys.argv[2]), "cells": n_pred, "genes": adata.n_vars,
    "seconds": seconds, "cpu_seconds": cpu, "cells_per_s": n_pred / seconds,
    "peak_rss_gib": after / 2**20, "rss_before_predict_gib": before / 2**20,
}))
"""


def prediction(threads: list[int]) -> pd.DataFrame:
    rows = []
    for n_threads in threads:
        for retrieval in ("ptrag", "none"):
            out = subprocess.run(
                [sys.executable, "-c", PREDICT_SCRIPT, retrieval, str(n_threads)],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------ main
def machine() -> str:
    return f"{report.cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}"


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} (1 / 5 / 15 min)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--e2e-steps", type=int, default=60)
    parser.add_argument("--e2e-repeats", type=int, default=3)
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--skip-predict", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "speed")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [f"Machine: {machine()}.", f"Load at start: {load()}.", ""]

    if args.profile:
        profile_training(args.out / "profile_training.txt")
        profile_ops(args.out / "profile_ops.txt")
        lines += [
            "Profiles: `profile_training.txt` (cProfile, 50 steps of `PTRAG.train`), "
            "`profile_ops.txt` (torch.profiler, module step).",
            "",
        ]

    table = training(args.threads, args.rounds, args.steps)
    table.to_csv(args.out / "training.csv", index=False)
    print(table.round(3).to_string(index=False), flush=True)
    lines += [
        "### Training step, 16 sets x 64 cells x 2,000 genes, H=128, 4 layers (module level; "
        f"{load()})",
        f"Median of {args.rounds} interleaved rounds of {args.steps} steps per model. `step_ms`: "
        "wall clock; "
        "`cpu_ms`: CPU time of the process; `x_state`: STATE's time over the model's (same "
        "threads).",
        "",
        table.round(2).to_markdown(index=False),
        "",
    ]
    if not args.skip_e2e:
        e2e = end_to_end(args.threads, args.e2e_steps, args.e2e_repeats)
        e2e.to_csv(args.out / "end_to_end.csv", index=False)
        print(e2e.round(3).to_string(index=False), flush=True)
        lines += [
            "### End-to-end `PTRAG.train` step (sampling, batch building and Lightning included; "
            f"{load()})",
            "4 cell types x 60 perturbations x 128 cells, 2,000 genes, batch 16 x 64. Median "
            "step interval of "
            f"{args.e2e_steps}-step runs (first 3 steps left out), median over {args.e2e_repeats} "
            "alternating runs; "
            "`validation_s`: one validation check (10% of the groups); `paired_ratio`: median "
            "over repeats of "
            "the ratio between adjacent runs.",
            "",
            e2e.round(3).to_markdown(index=False),
            "",
        ]
    if not args.skip_predict:
        pred = prediction(args.threads)
        pred.to_csv(args.out / "prediction.csv", index=False)
        print(pred.round(3).to_string(index=False), flush=True)
        lines += [
            "### Prediction, counterfactual `PTRAG.predict`, 100,000 cells x 2,000 genes "
            f"({load()})",
            "",
            pred.round(3).to_markdown(index=False),
            "",
        ]
    lines.append(
        f"Load at the end: {load()}. Peak RSS of the benchmark process: "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB."
    )
    (args.out / "speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
