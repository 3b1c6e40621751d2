"""The package keeps the lint and format rules of ``pyproject.toml`` (typed signatures, 99 columns)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    # The environment's own ruff (the version pinned in the `test` extra), not one on PATH.
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (it comes with the `test` extra)")
    command = [sys.executable, "-m", "ruff", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)


def test_ruff_check_passes_on_the_whole_repository():
    result = _ruff("check", ".", "--output-format", "concise")
    assert result.returncode == 0, result.stdout + result.stderr


def test_package_is_ruff_formatted():
    result = _ruff("format", "--check", "src")
    assert result.returncode == 0, result.stdout + result.stderr
