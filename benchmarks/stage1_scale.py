"""Stage 1 at scale: the neighbour table of a 1M-entry memory with faiss, and its recall.

Usage::

    python benchmarks/stage1_scale.py                       # 1,000,000 entries, 128-d, K = 32
    python benchmarks/stage1_scale.py --entries 200000 --out /tmp/stage1

An embedding memory of ``--entries`` perturbations whose gene embeddings are clustered like the
synthetic data's (``--programs`` program centres ``N(0, I/D)``, each entry a centre plus
``N(0, 0.36 I/D)`` noise, unit norm: the generator's model of gene embeddings). Measured with
:class:`ptrag_sc.data.NeighbourIndex` (``backend="faiss"``, approximate IVF-Flat beyond
``APPROXIMATE_THRESHOLD`` entries), one thread:

- index build time (k-means training of the inverted lists on a sample, adding every entry);
- the complete neighbour table: every entry queried with its own entry excluded, ``K = 32``;
- recall@32 against the exact search (``backend="exact"``, chunked matrix products) on a
  random sample of queries, for the default and other ``n_probe`` values;
- peak resident memory (``VmHWM``).

Writes ``benchmarks/results/stage1/stage1.json`` and ``stage1.md`` (or under ``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from scale import machine, peak_rss_gib

RESULTS = Path(__file__).parent / "results" / "stage1"


def embeddings(n: int, dim: int, programs: int, seed: int = 0) -> np.ndarray:
    """Unit-norm clustered embeddings, generated in blocks (float32 throughout)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0 / np.sqrt(dim), size=(programs, dim)).astype(np.float32)
    program = rng.integers(0, programs, n)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 1 << 16):
        rows = slice(start, min(start + (1 << 16), n))
        block = centres[program[rows]] + rng.normal(
            0.0, 0.6 / np.sqrt(dim), size=(program[rows].size, dim)
        ).astype(np.float32)
        out[rows] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def recall(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each query's exact top-K found by the approximate search."""
    hits = [
        np.intersect1d(a[a >= 0], e[e >= 0]).size / max(1, (e >= 0).sum())
        for a, e in zip(approx, exact, strict=True)
    ]
    return float(np.mean(hits))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--programs", type=int, default=1000)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument(
        "--sample", type=int, default=2000, help="queries checked against the exact search"
    )
    parser.add_argument(
        "--n-probe",
        type=int,
        nargs="*",
        default=[4, 16],
        help="other n_probe values checked on the sample",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import faiss
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    from ptrag_sc.data import RetrievalMemory
    from ptrag_sc.data import _index as index_module
    from ptrag_sc.data._index import NeighbourIndex

    load_before = machine()
    t0 = time.perf_counter()
    emb = embeddings(args.entries, args.dim, args.programs)
    labels = np.char.add("P", np.arange(args.entries).astype(str)).astype(object)
    memory = RetrievalMemory(
        kind="embedding",
        perturbations=labels,
        cell_types=np.full(args.entries, "", dtype=object),
        embeddings=emb,
        responses=None,
        n_cells=np.ones(args.entries, dtype=np.int64),
    )
    t_data = time.perf_counter() - t0
    no_ct = np.full(args.entries, "", dtype=object)

    t0, c0 = time.perf_counter(), time.process_time()
    approx_index = NeighbourIndex(memory, n_candidates=args.k, backend="faiss", approximate=True)
    t_build, c_build = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    table, _, _, _ = approx_index.query(labels, emb, no_ct, chunk_size=16384)
    t_query, c_query = time.perf_counter() - t0, time.process_time() - c0

    rng = np.random.default_rng(1)
    sample = np.sort(rng.choice(args.entries, min(args.sample, args.entries), replace=False))
    exact_index = NeighbourIndex(memory, n_candidates=args.k, backend="exact")
    t0, c0 = time.perf_counter(), time.process_time()
    exact, _, _, _ = exact_index.query(labels[sample], emb[sample], no_ct[sample])
    t_exact, c_exact = time.perf_counter() - t0, time.process_time() - c0
    default_probe = approx_index.n_probe
    rows = [
        {
            "n_probe": default_probe,
            "recall_at_k": recall(table[sample], exact),
            "ms_per_query": 1e3 * t_query / args.entries,
            "cpu_ms_per_query": 1e3 * c_query / args.entries,
            "default": True,
        }
    ]
    # Other n_probe values: timed on a random tenth of the queries (containing the checked
    # sample), so that lists hold as many queries per list as in the full table, relatively.
    subset = np.union1d(sample, rng.choice(args.entries, args.entries // 10, replace=False))
    in_subset = np.searchsorted(subset, sample)
    for n_probe in args.n_probe:
        if n_probe == default_probe:
            continue
        approx_index.n_probe = n_probe
        t0, c0 = time.perf_counter(), time.process_time()
        found, _, _, _ = approx_index.query(
            labels[subset], emb[subset], no_ct[subset], chunk_size=16384
        )
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        rows.append(
            {
                "n_probe": n_probe,
                "recall_at_k": recall(found[in_subset], exact),
                "ms_per_query": 1e3 * seconds / subset.size,
                "cpu_ms_per_query": 1e3 * cpu / subset.size,
                "default": False,
            }
        )
    n_lists = approx_index._lists.n_lists
    result = {
        "entries": args.entries,
        "dim": args.dim,
        "programs": args.programs,
        "k": args.k,
        "threads": args.threads,
        "index": (
            f"{n_lists} faiss k-means lists (spherical, "
            f"{index_module.KMEANS_ITERATIONS} iterations on "
            f"{min(args.entries, index_module.KMEANS_POINTS_PER_LIST * n_lists):,} entries); "
            "each query scored "
            f"exactly against the entries of its n_probe nearest lists (nearest centroids)"
        ),
        "data_seconds": t_data,
        "build_seconds": t_build,
        "build_cpu_seconds": c_build,
        "table_seconds": t_query,
        "table_cpu_seconds": c_query,
        "exact_cpu_ms_per_query": 1e3 * c_exact / sample.size,
        "table_queries_per_s": args.entries / t_query,
        "exact_sample_queries": int(sample.size),
        "exact_ms_per_query": 1e3 * t_exact / sample.size,
        "exact_full_table_hours_estimate": t_exact / sample.size * args.entries / 3600,
        "recall": rows,
        "peak_rss_gib": peak_rss_gib(),
        "machine_before": load_before,
        "machine_after": machine(),
        "faiss": faiss.__version__,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stage1.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"### Stage 1 at scale: {args.entries:,} memory entries, {args.dim}-d clustered "
        f"embeddings ({args.programs} programs), K = {args.k}",
        "",
        f"Machine: {result['machine_before']} (before); {result['machine_after']} (after). "
        f"{args.threads} thread(s), faiss {faiss.__version__}.",
        "",
        "Wall-clock seconds, and in brackets the CPU seconds the process got (one thread: what "
        "the wall",
        "time would be on an idle core; other jobs shared the 2 cores).",
        "",
        f"- Index: {result['index']}; built in **{t_build:.1f} s** ({c_build:.1f} s CPU).",
        f"- Neighbour table for all {args.entries:,} entries (each excluding itself): "
        f"{t_query:.1f} s "
        f"({c_query:.1f} s CPU; {args.entries / t_query:,.0f} queries/s).",
        f"- Exact search (chunked, at most {index_module.EXACT_PAIRS_PER_CHUNK:,} scores at a "
        "time): "
        f"{1e3 * t_exact / sample.size:.1f} ms/query ({1e3 * c_exact / sample.size:.1f} ms CPU) "
        f"on {sample.size:,} sampled queries "
        f"(the full table would take about {result['exact_full_table_hours_estimate']:.1f} h).",
        f"- Peak RSS of the process: {result['peak_rss_gib']:.2f} GiB.",
        "",
        f"Recall on {sample.size:,} sampled queries; ms per query from the full table (default) "
        "or a random tenth of the queries.",
        "",
        f"| n_probe | recall@{args.k} vs exact | ms per query | CPU ms per query |",
        "|--:|--:|--:|--:|",
        *(
            f"| {r['n_probe']}{' (default)' if r['default'] else ''} | {r['recall_at_k']:.4f} | "
            f"{r['ms_per_query']:.3f} | {r['cpu_ms_per_query']:.3f} |"
            for r in rows
        ),
        "",
    ]
    (args.out / "stage1.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
