"""Time training with 1 and 2 torch threads, alone and beside one busy process per core.

The figures of the FAQ ("Why is training so slow while other programs run?"). Each
configuration trains the demo's first model (the bundled glioblastoma few-shot split) for
``--steps`` steps in a fresh process, after 10 warm-up steps; the busy processes are plain
Python loops, one per core. Prints one line per run (wall and CPU seconds of the timed steps)
with the load average before it; the CPU time shows threads spinning while they wait::

    python scripts/measure_threads.py [--rounds 3] [--steps 100] [--timeout 600]

Also: ``--demo`` times the whole default ``ptrag-sc demo`` (wall and CPU seconds) alone and
beside the busy processes.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

#: (torch threads, OMP_WAIT_POLICY or None for the runtime's default)
CONFIGS = ((1, None), (2, None), (2, "PASSIVE"))

TRAIN = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
import scvi, ptrag_sc
ptrag_sc.settings.progress_bar = False
ptrag_sc.settings.num_threads = None  # measure torch's own thread count
adata = ptrag_sc.datasets.perturbench_devel()
ptrag_sc.pp.few_shot_split(adata, held_out="U87MG", val=["PLK4"], test=["MAP2K3", "MAPK1", "SGK1", "TGFBR2"])
ptrag_sc.PTRAG.setup_anndata(adata, perturbation_key="gene", cell_type_key="cell_line", control_group="non-targeting")
scvi.settings.seed = 0
model = ptrag_sc.PTRAG(adata, perturbation_embeddings=adata.uns["gene_embeddings"])
model.train(max_steps=10, split_key="split", early_stopping=False)
start, cpu = time.perf_counter(), time.process_time()
model.train(max_steps=int(sys.argv[2]), split_key="split", early_stopping=False)
print(f"wall {time.perf_counter() - start:.1f} s, cpu {time.process_time() - cpu:.1f} s")
"""


def busy_loops() -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def run(argv: list[str], env: dict, timeout: float) -> tuple[str, float, float]:
    """Output, wall seconds and CPU seconds (children) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False)
        out = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() else f"failed: {proc.stderr[-300:]}"
    except subprocess.TimeoutExpired:
        out = f"over {timeout:.0f} s (stopped)"
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return out, time.perf_counter() - start, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--demo", action="store_true", help="time the default demo instead")
    args = parser.parse_args()
    for round_ in range(1, args.rounds + 1):
        for busy in (False, True):
            loops = busy_loops() if busy else []
            try:
                if args.demo:
                    with tempfile.TemporaryDirectory() as out:
                        state = load()
                        argv = [sys.executable, "-m", "ptrag_sc", "demo", "--output", out, "--quiet"]
                        result, wall, cpu = run(argv, dict(os.environ), args.timeout)
                        print(f"round {round_} busy={busy} load [{state}] demo: wall {wall:.0f} s, cpu {cpu:.0f} s", flush=True)
                    continue
                for threads, policy in CONFIGS:
                    env = dict(os.environ)
                    env.pop("OMP_WAIT_POLICY", None)
                    if policy:
                        env["OMP_WAIT_POLICY"] = policy
                    state = load()
                    result, _, _ = run([sys.executable, "-c", TRAIN, str(threads), str(args.steps)], env, args.timeout)
                    print(f"round {round_} busy={busy} load [{state}] threads={threads} wait={policy or 'default'}: {result}", flush=True)
            finally:
                for loop in loops:
                    loop.kill()
                    loop.wait()


if __name__ == "__main__":
    main()
