"""Command line: ``python -m ptrag_sc demo --output demo_output``."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ptrag-sc", description="PT-RAG for single-cell perturbation prediction.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train, predict, evaluate against baselines and write a report")
    demo.add_argument("--output", default="demo_output", help="output folder (default: demo_output)")
    demo.add_argument("--dataset", default="perturbench_devel", choices=["perturbench_devel", "synthetic"])
    demo.add_argument("--max-steps", type=int, default=600)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from . import settings
        from ._demo import run_demo

        if args.quiet:
            settings.progress_bar = False
        summary = run_demo(args.output, dataset=args.dataset, max_steps=args.max_steps, seed=args.seed)
        wide = summary.pivot(index="method", columns="metric", values="mean")
        print(wide.round(3).to_string())
        print(f"\nReport written to {args.output}/report.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
