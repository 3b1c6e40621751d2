"""README.md as a user meets it: every ```python block runs as written, the commands CI runs are
where CI reads them, and the figures the README states agree with the code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import ptrag_sc
from ptrag_sc import __main__ as cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SRC = Path(ptrag_sc.__file__).resolve().parents[1]


def python_blocks(text: str) -> list[str]:
    """The ```python blocks of a markdown text, in order (blocks inside list items dedented)."""
    pattern = re.compile(r"^(?P<indent> *)```python\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)
    return [textwrap.dedent(m["body"]) for m in pattern.finditer(text)]


def test_the_readme_snippets_are_the_expected_ones():
    blocks = python_blocks(README)
    assert len(blocks) == 2, "a new README snippet: check that test_readme_snippets_run covers it"
    quick_start, screen = blocks
    assert "scvi.settings.seed = 0" in quick_start  # reproducible as written
    assert "model.train(split_key=\"split\")" in quick_start
    assert 'tl.screen(model, cell_type="k562"' in screen  # the bundled data's spelling


def test_readme_snippets_run(tmp_path):
    """The quick start and the screen example, in one fresh process, as written: they run, print
    nothing, warn nothing, and the model they save reloads."""
    blocks = python_blocks(README)
    check = textwrap.dedent(
        """
        import numpy as np
        assert "ptrag" in adata.layers and new.n_obs == 2 * int((adata.obs.gene == "non-targeting").sum())
        assert list(hits["rank"][:3]) == [1, 2, 3] and set(hits["cell_type"]) == {"k562"}
        again = ptrag_sc.PTRAG.load("ptrag_model", adata).predict(adata, inplace=False)
        assert np.array_equal(again, adata.layers["ptrag"])
        assert scores["pearson_delta"].notna().all()
        print("README-OK", model.best_step_)
        """
    )
    script = tmp_path / "readme_snippets.py"
    script.write_text("\n".join([*blocks, check]))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
        "MPLBACKEND": "Agg",
    }
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("README-OK"), proc.stdout
    # stderr: Lightning's "Seed set to 0" (scvi-tools' seed setter) and the training line only
    lines = proc.stderr.splitlines()
    assert lines[0] == "Seed set to 0", proc.stderr
    assert len(lines) == 2, proc.stderr
    assert re.fullmatch(r"Training: \d+/1500 steps.*, \d+ s", lines[1]), proc.stderr


def test_ci_reads_the_two_readme_commands():
    """.ci/run takes the README's first two ```bash blocks: the demo, then the tests."""
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    demo, tests = (" ".join(line.strip() for line in block.strip().splitlines()) for block in blocks[:2])
    assert demo.endswith("ptrag-sc demo --output demo_output")
    assert tests.endswith("python -m pytest -q -n 2")
    for command in (demo, tests):
        assert command.startswith("python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && ")


def test_one_demo_time_everywhere():
    """README, the CLI help and the installation page state the same measured demo time."""
    assert cli.DEMO_TIME in README
    assert cli.DEMO_TIME in (ROOT / "docs" / "installation.md").read_text()
    assert cli.DEMO_TIME[0].upper() + cli.DEMO_TIME[1:] in " ".join(cli.build_parser()._subparsers._group_actions[0].choices["demo"].description.split())
    for stale in ("about a minute", "a few minutes on a laptop"):
        assert stale not in README
        assert stale not in (ROOT / "docs" / "installation.md").read_text()


def test_install_note_names_the_cpu_index():
    assert "https://download.pytorch.org/whl/cpu" in README
    assert "multi-GB CUDA build" in README
