"""The command line, the lazy package import and quiet training."""

from __future__ import annotations

import argparse
import io
import logging
import os
import re
import statistics
import subprocess
import sys
import time
import tomllib
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
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
    for expected in ("--output", "--overwrite", "--task", "--max-steps", "--seed", "--threads", "-q/--quiet", "-v/--verbose", "--version"):
        assert any(name.endswith(expected) for name in names), (expected, names)
    missing = [name for name, action in actions if not action.help or action.help == argparse.SUPPRESS]
    assert not missing, missing


def test_console_script_is_main():
    pyproject = tomllib.loads((SRC.parent / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["ptrag-sc"] == "ptrag_sc.__main__:main"


def test_task_names_match_the_demo():
    from ptrag_sc import _demo

    assert set(cli.TASKS) == set(_demo.TASKS)
    assert cli.DEFAULT_TASKS == _demo.DEFAULT_TASKS


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["demo", "--max-steps", "0"], "--max-steps: expected a positive integer, got 0"),
        (["demo", "--max-steps", "x"], "--max-steps: expected a positive integer, got 'x'"),
        (["demo", "--seed", "-1"], "--seed: expected an integer from 0 to 2**32-1, got -1"),
        (["demo", "--seed", str(2**32)], "--seed: expected an integer from 0 to 2**32-1"),
        (["demo", "--threads", "0"], "--threads: expected a positive integer, got 0"),
        (["demo", "--task", "k562"], "--task: invalid choice: 'k562'"),
        (["demo", "--task", "thp1", "thp1"], "--task names a task twice"),
        (["demo", "-q", "-v"], "not allowed with argument"),
        (["demo", "--output", ""], "must be a non-empty path, got ''"),
        (["demo", "--output", "   "], "must be a non-empty path"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_bad_arguments_one_line_exit_2(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("ptrag-sc"), lines[0]
    assert "error: " in lines[0], lines[0]
    assert match in lines[0], lines[0]


def test_bad_output_paths_one_line_exit_2(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    cases = {
        str(a_file): "is an existing file, not a folder",
        str(a_file / "below"): "Cannot create the output folder",
    }
    for output, match in cases.items():
        with pytest.raises(SystemExit) as exc:
            cli.main(["demo", "--output", output])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1, err
        assert match in err, err
    assert a_file.read_text() == "mine"


@pytest.fixture
def fake_demo(monkeypatch):
    """Replace the demo by a stub recording its arguments and writing a report; restore the
    settings afterwards."""
    import ptrag_sc._demo

    calls = []

    def run_demo(output, **kwargs):
        calls.append(
            {
                "output": output,
                **kwargs,
                "progress_bar": ptrag_sc.settings.progress_bar,
                "verbosity": ptrag_sc.settings.verbosity,
                "num_threads": ptrag_sc.settings.num_threads,
            }
        )
        Path(output, "report.md").write_text("# ptrag_sc demo report\n\n## Bottom line\n\n- **PT-RAG** wins.\n\n## 1. Details\n")
        return pd.DataFrame({"method": ["PT-RAG"], "metric": ["pearson_delta"], "mean": [0.5]})

    monkeypatch.setattr(ptrag_sc._demo, "run_demo", run_demo)
    saved = (ptrag_sc.settings.progress_bar, ptrag_sc.settings.verbosity, ptrag_sc.settings.num_threads)
    yield calls
    ptrag_sc.settings.progress_bar, ptrag_sc.settings.verbosity, ptrag_sc.settings.num_threads = saved


def test_demo_arguments(fake_demo, capsys, tmp_path):
    assert cli.main(["demo", "--output", str(tmp_path)]) == 0
    call = fake_demo[-1]
    assert call["max_steps"] is None  # the model's default length
    assert call["tasks"] == ("glioblastoma", "thp1")
    assert (call["seed"], call["overwrite"], call["num_threads"]) == (0, False, 1)
    assert call["verbosity"] == logging.WARNING
    assert call["progress_bar"] is True
    assert call["log"].enabled
    out = capsys.readouterr().out
    assert out.startswith("Bottom line\n- PT-RAG wins.")  # plain text, no markdown
    assert out.strip().endswith(f"Report written to {tmp_path / 'report.md'}")

    args = ["demo", "--output", str(tmp_path), "--quiet", "--max-steps", "30", "--seed", "3", "--threads", "2", "--overwrite"]
    assert cli.main(args) == 0
    call = fake_demo[-1]
    assert (call["max_steps"], call["seed"], call["num_threads"], call["overwrite"]) == (30, 3, 2, True)
    assert call["progress_bar"] is False
    assert not call["log"].enabled
    assert capsys.readouterr().out.strip() == f"Report written to {tmp_path / 'report.md'}"

    assert cli.main(["demo", "--output", str(tmp_path / "v"), "--verbose", "--task", "synthetic"]) == 0
    assert fake_demo[-1]["verbosity"] == logging.INFO
    assert fake_demo[-1]["tasks"] == ("synthetic",)


def test_demo_refuses_to_replace_files(fake_demo, capsys, tmp_path):
    (tmp_path / "report.md").write_text("my own notes")
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--output", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert "already holds files of a demo run (report.md)" in err
    assert "--overwrite" in err
    assert (tmp_path / "report.md").read_text() == "my own notes"
    assert not fake_demo  # refused before anything ran
    assert cli.main(["demo", "--output", str(tmp_path), "--overwrite"]) == 0


def test_demo_in_a_subprocess_is_quiet_and_line_oriented(tmp_path):
    """The real command on the synthetic task: progress lines on stderr, nothing else there;
    the bottom line on stdout; a second run is refused without --overwrite."""
    out = tmp_path / "out"
    argv = ["-m", "ptrag_sc", "demo", "--output", str(out), "--task", "synthetic", "--max-steps", "5"]
    proc = _python(*argv, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert "\r" not in proc.stderr
    phases = ["data", "training PT-RAG", "prediction", "save and reload", "scoring"]
    assert [line.split("] ", 1)[1].split(":", 1)[0] for line in lines[:-1]] == phases, proc.stderr
    assert all(line.startswith("[1/1 synthetic] ") for line in lines[:-1])
    assert "5/5 steps" in lines[1]
    assert "identical after reloading" in lines[3]
    assert lines[-1].startswith(f"report written: {out / 'report.md'}")
    assert proc.stdout.startswith("Bottom line\n")
    assert proc.stdout.strip().endswith(f"Report written to {out / 'report.md'}")
    report = (out / "report.md").read_bytes()

    again = _python(*argv, timeout=120)
    assert again.returncode == 2
    assert len(again.stderr.splitlines()) == 1
    assert "Traceback" not in again.stderr
    assert (out / "report.md").read_bytes() == report


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
    for line in ("Monitored metric", "Signaling Trainer to stop", "Epoch"):
        assert line not in text, (line, text)
    # pytest's stderr is not a terminal: one progress line on stderr, nothing on stdout
    out = capfd.readouterr()
    assert out.out == ""
    # the state is restored afterwards
    assert logging.getLogger("lightning.pytorch").getEffectiveLevel() == logging.INFO


def test_training_progress_line_and_bar(small_data, capfd):
    settings = ptrag_sc.settings
    saved = settings.progress_bar
    try:
        settings.progress_bar = True
        scvi.settings.seed = 0
        model = ptrag_sc.PTRAG(small_data, perturbation_embeddings=small_data.uns["gene_embeddings"], **SMALL_MODEL)
        capfd.readouterr()
        model.train(max_steps=200, split_key="split", check_val_every_n_steps=5, early_stopping_patience=1)
        out = capfd.readouterr()
        assert out.out == ""
        assert re.fullmatch(r"Training: \d+/200 steps \(stopped early: no better validation_loss in 1 checks\), \d+ s\n", out.err), out.err
        model.train(max_steps=5, split_key="split", early_stopping=False)
        assert re.fullmatch(r"Training: 5/5 steps, \d+ s\n", capfd.readouterr().err)

        from ptrag_sc.train import TrainingProgress

        class Terminal(io.StringIO):
            def isatty(self):
                return True

        terminal = Terminal()
        model.train(max_steps=5, split_key="split", early_stopping=False, callbacks=[TrainingProgress(terminal)])
        drawn = terminal.getvalue()
        assert "\r" in drawn
        assert "Training" in drawn
        assert "5/5" in drawn
        assert capfd.readouterr().err == ""
        settings.progress_bar = False
        model.train(max_steps=5, split_key="split")
        assert capfd.readouterr() == ("", "")
    finally:
        settings.progress_bar = saved


def test_training_messages_with_verbosity_info(small_data, capfd, caplog):
    text = _train_and_capture(small_data, capfd, caplog, verbosity=logging.INFO, progress_bar=False)
    for line in CHATTY[:4]:  # Lightning's log messages
        assert line in text, (line, text)
    # its warnings depend on the torch and Lightning versions: at least one is there
    assert any(line in text for line in CHATTY[4:]), text
    assert "Training:" not in text  # no progress line


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


# ----------------------------------------------------------------- threads
def test_num_threads_setting():
    settings = ptrag_sc.settings
    saved = settings.num_threads
    try:
        assert saved == 1  # the default
        settings.num_threads = np.int64(3)
        assert settings.num_threads == 3
        assert type(settings.num_threads) is int
        assert "num_threads=3" in repr(settings)
        settings.num_threads = None
        assert settings.num_threads is None
        for bad in (0, -1, 1.5, True, "2"):
            with pytest.raises(ValueError, match="num_threads"):
                settings.num_threads = bad
    finally:
        settings.num_threads = saved


def test_threads_apply_while_the_package_computes_and_are_restored(small_data):
    import torch
    from lightning.pytorch.callbacks import Callback

    from ptrag_sc._utils import settings_threads

    class Threads(Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen.append(torch.get_num_threads())

    settings = ptrag_sc.settings
    saved = (settings.num_threads, torch.get_num_threads())
    try:
        torch.set_num_threads(1)
        settings.num_threads = 2
        with settings_threads():
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
        model = ptrag_sc.PTRAG(small_data, perturbation_embeddings=small_data.uns["gene_embeddings"], **SMALL_MODEL)
        recorder = Threads()
        model.train(max_steps=3, split_key="split", callbacks=[recorder])
        assert recorder.seen == [2, 2, 2]
        assert torch.get_num_threads() == 1
        settings.num_threads = None
        torch.set_num_threads(3)
        with settings_threads():
            assert torch.get_num_threads() == 3  # torch's own setting
    finally:
        settings.num_threads, threads = saved
        torch.set_num_threads(threads)
