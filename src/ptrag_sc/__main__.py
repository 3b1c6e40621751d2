"""Command line: ``ptrag-sc demo --output demo_output`` (or ``python -m ptrag_sc demo``).

Only the standard library is imported until a command runs, so ``--help`` and ``--version``
answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys

DATASETS = ("perturbench_devel", "synthetic")


def _version() -> str:
    """The installed distribution's version, or the package's own when not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ptrag-sc")
    except PackageNotFoundError:
        from . import __version__

        return __version__


class _VersionAction(argparse.Action):
    """``--version`` that looks the version up only when asked."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog} {_version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ptrag-sc``."""
    parser = argparse.ArgumentParser(
        prog="ptrag-sc",
        description="PT-RAG for single-cell perturbation prediction (a scvi-tools model).",
        epilog="Example: ptrag-sc demo --output demo_output",
    )
    parser.add_argument("--version", action=_VersionAction, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="train, predict, evaluate against baselines and write a report",
        description=(
            "Train PT-RAG on the bundled real Perturb-seq data, predict held-out perturbations "
            "in a held-out cell line, score them against baselines and write report.md, CSV "
            "tables, figures and the saved model to the output folder (files of an earlier "
            "run there are overwritten). About a minute on a laptop CPU."
        ),
    )
    demo.add_argument(
        "--output",
        default="demo_output",
        metavar="DIR",
        help="output folder, created if needed (default: demo_output)",
    )
    demo.add_argument(
        "--dataset",
        default="perturbench_devel",
        choices=DATASETS,
        help=(
            "perturbench_devel: the bundled real data, glioblastoma line U87MG held out "
            "(default); synthetic: simulated data, three cell lines"
        ),
    )
    demo.add_argument(
        "--max-steps",
        type=_positive_int,
        default=None,
        metavar="N",
        help="training steps (default: the model's own default training length)",
    )
    demo.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="random seed of training, the baselines and the bootstrap intervals (default: 0)",
    )
    noise = demo.add_mutually_exclusive_group()
    noise.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help=(
            "no progress bar and no results table: print only where the report is "
            "(by default a progress bar is shown when the output is a terminal)"
        ),
    )
    noise.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help=(
            "also show PyTorch Lightning's messages and warnings during training "
            "(ptrag_sc.settings.verbosity = logging.INFO); silenced by default"
        ),
    )
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ptrag-sc`` console script and of ``python -m ptrag_sc``."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    return 0  # pragma: no cover - argparse requires a command


def _demo(args: argparse.Namespace) -> int:
    import logging

    # The command line only writes figures to files.
    os.environ.setdefault("MPLBACKEND", "Agg")
    from . import settings
    from ._demo import BASELINE_METHODS, MODEL_NAME, REPORT_METRICS, run_demo

    # Progress bars draw on stdout (Lightning) and stderr (tqdm): only on a terminal.
    settings.progress_bar = not args.quiet and sys.stdout.isatty() and sys.stderr.isatty()
    if args.verbose:
        settings.verbosity = logging.INFO
    summary = run_demo(args.output, dataset=args.dataset, max_steps=args.max_steps, seed=args.seed)
    report = os.path.join(args.output, "report.md")
    if not args.quiet:
        wide = summary.pivot(index="method", columns="metric", values="mean")
        methods = [m for m in (MODEL_NAME, *BASELINE_METHODS) if m in wide.index]
        wide = wide.reindex(index=methods, columns=[m for m in REPORT_METRICS if m in wide.columns])
        print(wide.round(3).to_string())
        print()
    print(f"Report written to {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
