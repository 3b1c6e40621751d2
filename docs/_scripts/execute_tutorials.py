"""Execute the tutorial notebooks in place, so that their committed outputs are current.

Usage, from the repository root::

    python docs/_scripts/execute_tutorials.py                     # every tutorials/*.ipynb
    python docs/_scripts/execute_tutorials.py tutorials/01_quickstart.ipynb

Each notebook runs in a fresh kernel inside a temporary working directory (files it writes do
not land in the repository), with a time limit per cell. The run time of each notebook is
printed and stored in the notebook's metadata (``ptrag_sc.execution_seconds``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]


def execute(path: Path, timeout: int = 600) -> float:
    """Execute ``path`` in place; return the run time in seconds."""
    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as workdir:
        client = NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": workdir}},
        )
        start = time.perf_counter()
        client.execute()
        seconds = time.perf_counter() - start
    nb.metadata.setdefault("ptrag_sc", {})["execution_seconds"] = round(seconds, 1)
    nbformat.write(nb, path)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: tutorials/*.ipynb")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = parser.parse_args(argv)
    notebooks = args.notebooks or sorted((ROOT / "tutorials").glob("*.ipynb"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # small models: one thread is fastest
    for path in notebooks:
        seconds = execute(path.resolve(), timeout=args.timeout)
        print(f"{path.name}: {seconds:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
