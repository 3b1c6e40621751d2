"""Data-parallel training throughput: cells per second per device, through ``PTRAG.train``.

Usage::

    # every GPU: accelerator="gpu", devices=-1, strategy="ddp"
    python benchmarks/ddp_gpu.py
    # one GPU, for the scaling ratio
    python benchmarks/ddp_gpu.py --devices 1
    # CPU smoke check (gloo)
    python benchmarks/ddp_gpu.py --accelerator cpu --devices 2 \\
        --cells-per-perturbation 64 --steps 30

Trains the default PT-RAG model on synthetic Perturb-seq data (4 cell types x 200 perturbations x
128 cells x 2,000 genes by default, 1,536-d gene embeddings) with
``model.train(accelerator=..., devices=..., strategy="ddp")``, as a user would: Lightning starts
this script once per device, every rank draws a disjoint share of the sets, and only rank 0
writes. A callback on rank 0 stamps the training steps (synchronising the device first); the
steady-state step time is taken after ``--warmup`` steps. Each rank processes ``batch_size``
sets of ``cell_set_size`` cells per step, so the throughput per device is
``batch_size * cell_set_size / step time`` and the total is that times the number of devices.

Writes ``benchmarks/results/ddp_gpu/ddp_<accelerator>_<devices>.json`` and ``.md`` (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report as report


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock():
    import lightning.pytorch as pl

    class StepClock(pl.Callback):
        """Time stamps of every training step on this rank (after the device finished it)."""

        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, *args, **kwargs) -> None:
            _synchronize(pl_module.device)
            self.stamps.append(time.perf_counter())

    return StepClock()


def _device_name(accelerator: str) -> str:
    if accelerator in ("gpu", "cuda") and torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"{report.cpu_name()}, {os.cpu_count()} logical CPUs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--devices", default="-1", help="number of devices, -1 for all")
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16, help="sets per step and device")
    parser.add_argument("--cell-types", type=int, default=4)
    parser.add_argument("--perturbations", type=int, default=200)
    parser.add_argument("--cells-per-perturbation", type=int, default=128)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per process (CPU runs)"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ddp_gpu")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    devices = int(args.devices)

    import scvi

    import ptrag_sc

    ptrag_sc.settings.progress_bar = False
    scvi.settings.seed = 0  # every process builds the same data, split and sampling plans
    adata = ptrag_sc.datasets.synthetic(
        n_cell_types=args.cell_types,
        n_perturbations=args.perturbations,
        n_genes=args.genes,
        n_cells_per_perturbation=args.cells_per_perturbation,
        n_control_cells=2000,
        seed=0,
    )
    ptrag_sc.PTRAG.setup_anndata(adata)
    # The synthetic genes are not human symbols: no GO annotations (the step is the same).
    model = ptrag_sc.PTRAG(
        adata, perturbation_embeddings=adata.uns["gene_embeddings"], gene_annotations=None
    )
    clock = _clock()
    start = time.perf_counter()
    model.train(
        max_steps=args.steps,
        batch_size=args.batch_size,
        validation_size=0.0,  # training throughput only
        accelerator=args.accelerator,
        devices=devices,
        strategy=args.strategy if devices != 1 else "auto",
        callbacks=[clock],
        enable_model_summary=False,
    )
    total = time.perf_counter() - start
    trainer = model.trainer
    if not trainer.is_global_zero:
        return
    stamps = np.asarray(clock.stamps)
    if stamps.size <= args.warmup + 1:
        raise SystemExit(
            f"Only {stamps.size} steps were timed; ask for more than --warmup={args.warmup} steps."
        )
    steady = stamps[args.warmup :]
    step_s = float((steady[-1] - steady[0]) / (len(steady) - 1))
    cells_per_step = args.batch_size * model.cell_set_size
    world = int(trainer.world_size)
    result = {
        "device": _device_name(args.accelerator),
        "accelerator": args.accelerator,
        "devices": world,
        "strategy": args.strategy if world > 1 else "single device",
        "torch": torch.__version__,
        "cells": int(adata.n_obs),
        "genes": int(adata.n_vars),
        "batch_size_per_device": args.batch_size,
        "cell_set_size": model.cell_set_size,
        "steps": int(trainer.global_step),
        "step_ms": 1e3 * step_s,
        "median_step_ms": 1e3 * float(np.median(np.diff(steady))),
        "cells_per_s_per_device": cells_per_step / step_s,
        "cells_per_s_total": world * cells_per_step / step_s,
        "train_seconds_incl_setup": total,
        "peak_device_memory_gib": torch.cuda.max_memory_allocated() / 2**30
        if torch.cuda.is_available() and args.accelerator != "cpu"
        else None,
        "load_average": os.getloadavg(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"ddp_{args.accelerator}_{world}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"### Data-parallel `PTRAG.train` throughput ({result['device']}, torch "
        f"{torch.__version__})",
        "",
        f"{world} device(s), strategy {result['strategy']}, {args.batch_size} sets x "
        f"{model.cell_set_size} cells per step and "
        f"device, {adata.n_vars} genes, default PT-RAG; steady state after {args.warmup} of "
        f"{result['steps']} steps.",
        "",
        "| devices | step (ms) | cells/s per device | cells/s total |",
        "|--:|--:|--:|--:|",
        f"| {world} | {result['step_ms']:.1f} | {result['cells_per_s_per_device']:.0f} | "
        f"{result['cells_per_s_total']:.0f} |",
        "",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
