"""Command line: ``ptrag-sc demo --output demo_output`` (or ``python -m ptrag_sc demo``).

Only the standard library is imported until a command runs, so ``--help`` and ``--version``
answer at once, and a bad argument is refused before anything heavy is loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn

#: Tasks of ``ptrag-sc demo`` (``ptrag_sc._demo.TASKS``, named here to keep ``--help`` light).
TASKS = ("glioblastoma", "thp1", "synthetic")
DEFAULT_TASKS = ("glioblastoma", "thp1")
#: Wall time of the default demo on an idle 2-core CPU (measured; see docs/faq.md).
DEMO_TIME = "about 2 minutes"


def _version() -> str:
    """The installed distribution's version, else the package's own."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ptrag-sc")
    except PackageNotFoundError:
        from . import __version__

        return __version__


class _Parser(argparse.ArgumentParser):
    """An argument parser that reports a bad argument in one line (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ptrag-sc``."""
    parser = _Parser(
        prog="ptrag-sc",
        description="PT-RAG for single-cell perturbation prediction (a scvi-tools model).",
        epilog="Example: ptrag-sc demo --output demo_output",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {_version()}",
        help="print the version and exit",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    demo = sub.add_parser(
        "demo",
        help="train, predict, evaluate against baselines and write a report",
        description=(
            "Run two prediction tasks on the bundled real Perturb-seq data: perturbations in a "
            "glioblastoma line where few were measured (glioblastoma), and knockouts never "
            "measured in THP-1 cells (thp1). Each trains PT-RAG, predicts the held-out "
            "perturbations, scores them against baselines, and saves and reloads the model; the "
            "report (report.md), CSV tables, figures and models go to the output folder. "
            f"{DEMO_TIME[0].upper() + DEMO_TIME[1:]} on an idle 2-core CPU. Progress goes to "
            "stderr, the bottom line to stdout."
        ),
    )
    demo.add_argument(
        "--output",
        default="demo_output",
        metavar="DIR",
        help="output folder, created if needed (default: demo_output)",
    )
    demo.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the files of an earlier demo run in the output folder (refused otherwise)",
    )
    demo.add_argument(
        "--task",
        nargs="+",
        choices=TASKS,
        default=list(DEFAULT_TASKS),
        metavar="TASK",
        help=(
            "tasks to run, of glioblastoma (few-shot cell line), thp1 (unseen knockouts) and "
            "synthetic (simulated data, a quick check) (default: glioblastoma thp1)"
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
        type=_seed,
        default=0,
        metavar="N",
        help=(
            "random seed of training, the baselines and the bootstrap intervals, "
            "0 to 2**32-1 (default: 0)"
        ),
    )
    demo.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        metavar="N",
        help=(
            "PyTorch threads (ptrag_sc.settings.num_threads; default: 1, which is safe when "
            "other programs share the CPU; see the FAQ)"
        ),
    )
    noise = demo.add_mutually_exclusive_group()
    noise.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress and no bottom line: print only where the report is",
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


def _integer(minimum: int, maximum: int | None, expected: str) -> Callable[[str], int]:

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return convert


_positive_int = _integer(1, None, "a positive integer")
_seed = _integer(0, 2**32 - 1, "an integer from 0 to 2**32-1")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ptrag-sc`` console script and of ``python -m ptrag_sc``."""
    parser = build_parser()
    return _demo(parser.parse_args(argv), parser)  # the only command


def _demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import logging

    if len(set(args.task)) != len(args.task):
        parser.exit(2, f"ptrag-sc demo: error: --task names a task twice: {' '.join(args.task)}\n")
    # The command line only writes figures to files. OpenMP threads that wait for work sleep
    # instead of spinning, in case --threads is raised on a busy machine (read when the OpenMP
    # runtime loads, so before torch is imported).
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from . import settings
    from ._demo import PhaseLog, prepare_output, run_demo
    from ._demo_report import bottom_line_text

    tasks = tuple(args.task)
    try:
        prepare_output(args.output, tasks, overwrite=args.overwrite)
    except (ValueError, FileExistsError) as exc:
        parser.exit(2, f"ptrag-sc demo: error: {exc}\n")

    settings.num_threads = args.threads
    settings.progress_bar = not args.quiet
    if args.verbose:
        settings.verbosity = logging.INFO
    try:
        run_demo(
            args.output,
            tasks=tasks,
            max_steps=args.max_steps,
            seed=args.seed,
            overwrite=args.overwrite,
            log=PhaseLog(not args.quiet),
        )
    except KeyboardInterrupt:
        print("ptrag-sc demo: interrupted", file=sys.stderr)
        return 130
    report = os.path.join(args.output, "report.md")
    if not args.quiet:
        print(bottom_line_text(report))
    print(f"Report written to {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
