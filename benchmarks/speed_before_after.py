"""Training speed of several checkouts of the package, alternated in one run.

Usage::

    python benchmarks/speed_before_after.py before=/path/to/old/checkout/src after=src
    python benchmarks/speed_before_after.py old=A/src new=B/src --rounds 3 --threads 1 2

Each ``NAME=SRC`` checkout gets one process (``PYTHONPATH=SRC``), started once and then asked
for one measurement at a time while the others wait, blocked on their input. Within every
round the checkouts take turns measurement by measurement (the order rotates from round to
round), so the background load of a shared machine falls on all alike. PyTorch runs
``--threads`` threads in every checkout (``torch.set_num_threads`` and, where a checkout has
it, ``ptrag_sc.settings.num_threads``). Two figures, both of the default model with the harness
of ``speed.py`` (same shapes, same data):

- **module step**: ``--steps`` optimisation steps of ``PTRAGModule`` (forward, backward,
  gradient clipping, fused AdamW) on 16 sets x 64 cells x 2,000 genes, after 2 warm-up steps
  (the first of which compiles numba kernels where a checkout has them);
- **end to end**: the median interval between consecutive ``PTRAG.train`` steps (sampling,
  batch building and Lightning included) of a fresh ``--e2e-steps``-step run, first 3 steps
  left out.

The table gives the medians over rounds and, for every checkout after the first, the **paired
ratio**: the median over rounds of its time over the first checkout's in the same round (above
1: slower than the first), with its range. Writes ``benchmarks/results/speed/before_after.csv``
(one row per measurement) and ``before_after.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).parent

WORKER = r"""
import inspect, json, sys, time
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
import speed
import ptrag_sc
from ptrag_sc.module import TENSORS, PTRAGModule

module_steps, e2e_steps = int(sys.argv[2]), int(sys.argv[3])
torch.set_flush_denormal(True)
encoder, memory = speed.make_memory()
batch = speed.make_batch(encoder, memory)
torch.manual_seed(0)
model = PTRAGModule(speed.G, speed.D, n_hidden=speed.H, n_layers=4, n_heads=8)
# The older checkout's memory also carried the perturbation-specific part of each response.
has_specific = "specific" in inspect.signature(model.set_memory).parameters
extra = {"specific": memory.specific} if has_specific else {}
model.set_memory(memory.embeddings, response_codes=memory.response_codes, **extra)
model.set_data_constants(batch[TENSORS.X_CTRL].amax((0, 1)).numpy() * 1.5, 0.1)
model.train()
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
adata = speed._synthetic()


def step():
    optimizer.zero_grad(set_to_none=True)
    model(batch)[2].loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 10.0)
    optimizer.step()


def module_block():
    for _ in range(2):  # warm-up (and the kernels' compilation where there are kernels)
        step()
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(module_steps):
        step()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return {"ms": 1e3 * wall / module_steps, "cpu_ms": 1e3 * cpu / module_steps}


def e2e_run():
    clock = speed._step_clock()
    speed._train(adata, "ptrag", e2e_steps, [clock])
    wall, cpu = np.median(np.diff(np.array(clock.steps[3:]), axis=0), axis=0)
    return {"ms": 1e3 * float(wall), "cpu_ms": 1e3 * float(cpu)}


print("ready", flush=True)
for line in sys.stdin:
    figure, threads = line.split()
    torch.set_num_threads(int(threads))
    if hasattr(ptrag_sc.settings, "num_threads"):  # newer checkouts set torch's threads to this
        ptrag_sc.settings.num_threads = int(threads)
    print(json.dumps(module_block() if figure == "module" else e2e_run()), flush=True)
"""


def load() -> str:
    """The machine's load average, to print beside every figure."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} (1 / 5 / 15 min)"


class Worker:
    """A process of one checkout: measures on request, idle (blocked on its input) otherwise."""

    def __init__(self, src: Path, args: argparse.Namespace) -> None:
        self.src = src
        command = [
            sys.executable,
            "-u",
            "-c",
            WORKER,
            str(HERE),
            str(args.steps),
            str(args.e2e_steps),
        ]
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONPATH=str(src)),
        )

    def _read(self) -> str:
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(
                    f"the worker for {self.src} ended (exit status {self.process.wait()})"
                )
            if line.startswith(("ready", "{")):
                return line

    def wait_ready(self) -> None:
        self._read()

    def measure(self, figure: str, threads: int) -> dict:
        self.process.stdin.write(f"{figure} {threads}\n")
        self.process.stdin.flush()
        return json.loads(self._read())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def summarise(runs: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """Medians over rounds per (threads, figure, time) and the paired ratios to ``names[0]``."""
    rows = []
    for (threads, figure), here in runs.groupby(["threads", "figure"], sort=False):
        for time_kind, label in (("ms", "wall ms"), ("cpu_ms", "CPU ms")):
            paired = here.pivot(index="round", columns="checkout", values=time_kind)
            row = {"threads": threads, "figure": f"{figure} {label}"}
            row |= {name: paired[name].median() for name in names}
            for name in names[1:]:
                ratio = paired[name] / paired[names[0]]
                row[f"{name}/{names[0]}"] = ratio.median()
                row[f"{name}/{names[0]} range"] = f"{ratio.min():.2f}-{ratio.max():.2f}"
            rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkouts", nargs="+", help="NAME=SRC, the first is the reference")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--e2e-steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "speed")
    args = parser.parse_args()
    checkouts = dict(item.split("=", 1) for item in args.checkouts)
    if len(checkouts) < 2 or any(not Path(src).is_dir() for src in checkouts.values()):
        parser.error("give at least two distinct NAME=SRC checkouts, each an existing folder")
    checkouts = {name: Path(src).resolve() for name, src in checkouts.items()}
    names = list(checkouts)
    args.out.mkdir(parents=True, exist_ok=True)
    start_load, start = load(), time.perf_counter()
    workers = {name: Worker(src, args) for name, src in checkouts.items()}  # all start at once
    for worker in workers.values():
        worker.wait_ready()
    rows = []
    try:
        for round_ in range(args.rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for threads in args.threads:
                for figure in ("module", "e2e"):
                    for name in order:
                        row = {
                            "round": round_,
                            "threads": threads,
                            "figure": figure,
                            "checkout": name,
                        }
                        row |= workers[name].measure(figure, threads) | {
                            "load_1min": os.getloadavg()[0]
                        }
                        print(json.dumps(row), flush=True)
                        rows.append(row)
    finally:
        for worker in workers.values():
            worker.close()
    runs = pd.DataFrame(rows)
    runs.to_csv(args.out / "before_after.csv", index=False)
    table = summarise(runs, names)
    print(table.round(3).to_string(index=False))
    minutes = (time.perf_counter() - start) / 60
    lines = [
        "Checkouts: " + "; ".join(f"{name}: `{src}`" for name, src in checkouts.items()) + ".",
        f"{args.rounds} rounds; in each, the checkouts' processes take turns measurement by "
        f"measurement (order rotated every round); {minutes:.1f} min in all.",
        f"Load at the start: {start_load}; at the end: {load()}.",
        "",
        "`module`: default `PTRAGModule` training step, 16 sets x 64 cells x 2,000 genes (mean "
        f"of {args.steps} steps after 2 warm-up steps); `e2e`: median `PTRAG.train` step "
        f"interval of a {args.e2e_steps}-step run; wall: wall clock; CPU: the process's CPU time "
        f"per step. Medians over rounds; `X/{names[0]}`: the median over rounds of X's time over "
        f"{names[0]}'s in the same round (above 1: X is slower), with its range over rounds.",
        "",
        table.round(3).to_markdown(index=False),
        "",
    ]
    (args.out / "before_after.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
