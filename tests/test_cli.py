"""The command line, the lazy package import and quiet training."""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import time
import tomllib
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import scvi
from conftest import SMALL_MODEL, few_shot_split, make_small_adata

import ptrag_sc
from ptrag_sc import __main__ as cli

SRC = Path(ptrag_sc.__file__).resolve().parents[1]
HEAVY = ("torch", "scvi", "lightning", "anndata", "numpy", "pandas", "matplotlib", "rich")


def _python(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run this Python with the package under test first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout, check=False)


def _expected_version() -> str:
    try:
        return version("ptrag-sc")
    except PackageNotFoundError:
        return ptrag_sc.__version__


# ------------------------------------------------------------------ the CLI
def test_help_is_fast_and_imports_no_heavy_module():
    times = []
    for _ in range(5):
        start = time.perf_counter()
        proc = _python("-m", "ptrag_sc", "--help")
        times.append(time.perf_counter() - start)
        assert proc.returncode == 0, proc.stderr
        assert "demo" in proc.stdout
        assert proc.stderr == ""
    assert statistics.median(times) < 2.0, times

    code = (
        "import sys\n"
        "from ptrag_sc.__main__ import main\n"
        "for argv in (['--help'], ['demo', '--help'], ['--version']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    proc = _python("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_version():
    proc = _python("-m", "ptrag_sc", "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"ptrag-sc {_expected_version()}"


def test_version_in_process(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"ptrag-sc {_expected_version()}"


def _all_actions(parser: argparse.ArgumentParser, where: str = "ptrag-sc"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                yield f"{where} {choice.dest}", choice
            for name, sub in action.choices.items():
                yield from _all_actions(sub, f"{where} {name}")
        else:
            yield f"{where} {'/'.join(action.option_strings) or action.dest}", action


def test_every_option_has_help():
    actions = list(_all_actions(cli.build_parser()))
    names = {name for name, _ in actions}
    for expected in ("--output", "--dataset", "--max-steps", "--seed", "-q/--quiet", "-v/--verbose", "--version"):
        assert any(name.endswith(expected) for name in names), (expected, names)
    missing = [name for name, action in actions if not action.help or action.help == argparse.SUPPRESS]
    assert not missing, missing


def test_console_script_is_main():
    pyproject = tomllib.loads((SRC.parent / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["ptrag-sc"] == "ptrag_sc.__main__:main"


@pytest.mark.parametrize("argv", [["demo", "--max-steps", "0"], ["demo", "--max-steps", "x"], ["demo", "-q", "-v"], []])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "usage: ptrag-sc" in capsys.readouterr().err


@pytest.fixture
def fake_demo(monkeypatch):
    """Replace the demo by a stub recording its arguments; restore the settings afterwards."""
    import ptrag_sc._demo

    calls = []

    def run_demo(output, **kwargs):
        calls.append(
            {"output": output, **kwargs, "progress_bar": ptrag_sc.settings.progress_bar, "verbosity": ptrag_sc.settings.verbosity}
        )
        return pd.DataFrame({"method": ["PT-RAG"], "metric": ["pearson_delta"], "mean": [0.5]})

    monkeypatch.setattr(ptrag_sc._demo, "run_demo", run_demo)
    saved = (ptrag_sc.settings.progress_bar, ptrag_sc.settings.verbosity)
    yield calls
    ptrag_sc.settings.progress_bar, ptrag_sc.settings.verbosity = saved


def test_demo_arguments(fake_demo, capsys, tmp_path):
    assert cli.main(["demo", "--output", str(tmp_path)]) == 0
    call = fake_demo[-1]
    assert call["max_steps"] is None  # the model's default length
    assert call["dataset"] == "perturbench_devel"
    assert call["seed"] == 0
    assert call["verbosity"] == logging.WARNING
    assert call["progress_bar"] is False  # pytest's output is not a terminal
    out = capsys.readouterr().out
    assert "pearson_delta" in out
    assert f"Report written to {tmp_path / 'report.md'}" in out

    assert cli.main(["demo", "--output", str(tmp_path), "--quiet", "--max-steps", "30", "--seed", "3"]) == 0
    call = fake_demo[-1]
    assert (call["max_steps"], call["seed"], call["progress_bar"]) == (30, 3, False)
    assert capsys.readouterr().out.strip() == f"Report written to {tmp_path / 'report.md'}"

    assert cli.main(["demo", "--output", str(tmp_path), "--verbose", "--dataset", "synthetic"]) == 0
    assert fake_demo[-1]["verbosity"] == logging.INFO
    assert fake_demo[-1]["dataset"] == "synthetic"


def test_demo_progress_bar_on_a_terminal(fake_demo, monkeypatch, tmp_path):
    terminal = SimpleNamespace(isatty=lambda: True)
    monkeypatch.setattr(cli, "sys", SimpleNamespace(stdout=terminal, stderr=terminal))
    cli.main(["demo", "--output", str(tmp_path)])
    assert fake_demo[-1]["progress_bar"] is True
    cli.main(["demo", "--output", str(tmp_path), "--quiet"])
    assert fake_demo[-1]["progress_bar"] is False


# ------------------------------------------------------------ lazy package
def test_lazy_package_attributes():
    for name in ptrag_sc.__all__:
        assert name in dir(ptrag_sc)
        assert getattr(ptrag_sc, name) is not None
    from ptrag_sc import PTRAG

    assert PTRAG is ptrag_sc.model.PTRAG
    assert callable(ptrag_sc.tl.evaluate)
    assert "rich.pretty" in sys.modules  # scvi-tools 1.4.2's view_anndata_setup needs it
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        ptrag_sc.nonexistent  # noqa: B018


# -------------------------------------------------------------- verbosity
def test_verbosity_setting():
    settings = ptrag_sc.settings
    saved = settings.verbosity
    try:
        assert saved == logging.WARNING
        settings.verbosity = "info"
        assert settings.verbosity == logging.INFO
        assert logging.getLogger("ptrag_sc").level == logging.INFO
        assert "verbosity=INFO" in repr(settings)
        settings.verbosity = logging.ERROR
        assert settings.verbosity == logging.ERROR
        with pytest.raises(ValueError, match="Unknown verbosity"):
            settings.verbosity = "loud"
        with pytest.raises(TypeError):
            settings.verbosity = True
    finally:
        settings.verbosity = saved


#: What Lightning says during a short CPU training when nobody silences it.
CHATTY = ("GPU available:", "TPU available:", "💡 Tip", "litlogger", "LeafSpec", "smaller than the logging interval")


@pytest.fixture(scope="module")
def small_data():
    data = make_small_adata()
    data.obs["split"] = few_shot_split(data)
    ptrag_sc.PTRAG.setup_anndata(data)
    return data


def _train_and_capture(data, capfd, caplog, *, verbosity: int, progress_bar: bool) -> str:
    """Train 5 steps and return everything printed, logged or warned meanwhile."""
    settings = ptrag_sc.settings
    saved = (settings.verbosity, settings.progress_bar)
    # Lightning's logger may not propagate to the root logger (it has its own stderr handler
    # when the root had none at import time): listen to it directly.
    lightning_logger = logging.getLogger("lightning.pytorch")
    lightning_logger.addHandler(caplog.handler)
    try:
        settings.verbosity, settings.progress_bar = verbosity, progress_bar
        scvi.settings.seed = 0
        model = ptrag_sc.PTRAG(data, perturbation_embeddings=data.uns["gene_embeddings"], **SMALL_MODEL)
        capfd.readouterr()
        caplog.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.train(max_steps=5, split_key="split")
    finally:
        lightning_logger.removeHandler(caplog.handler)
        settings.verbosity, settings.progress_bar = saved
    out = capfd.readouterr()
    return "\n".join([out.out, out.err, caplog.text, *(str(w.message) for w in caught)])


def test_training_is_quiet_by_default(small_data, capfd, caplog):
    text = _train_and_capture(small_data, capfd, caplog, verbosity=logging.WARNING, progress_bar=True)
    for line in CHATTY:
        assert line not in text, (line, text)
    assert "Epoch" in text  # the progress bar still shows
    # the state is restored afterwards
    assert logging.getLogger("lightning.pytorch").getEffectiveLevel() == logging.INFO


def test_training_messages_with_verbosity_info(small_data, capfd, caplog):
    text = _train_and_capture(small_data, capfd, caplog, verbosity=logging.INFO, progress_bar=False)
    for line in CHATTY[:4]:  # Lightning's log messages
        assert line in text, (line, text)
    # its warnings depend on the torch and Lightning versions: at least one is there
    assert any(line in text for line in CHATTY[4:]), text
    assert "Epoch" not in text  # no progress bar


def test_quiet_lightning_restores_state():
    from ptrag_sc._utils import quiet_lightning

    chatty = "The number of training batches (6) is smaller than the logging interval"
    logger = logging.getLogger("lightning.pytorch")
    before = logger.level
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filters = list(warnings.filters)
        with quiet_lightning(True):
            assert logger.getEffectiveLevel() >= logging.WARNING
            warnings.warn(chatty, UserWarning, stacklevel=1)
            warnings.warn("something else", UserWarning, stacklevel=1)
        assert (logger.level, warnings.filters) == (before, filters)
        with quiet_lightning(False):
            assert logger.level == before
            warnings.warn(chatty, UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else", chatty]
