"""Model folders are written whole or not at all, never through a link, with the user's permissions."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scvi
import torch
from conftest import make_small_adata

from ptrag_sc import PTRAG, _files
from ptrag_sc.model import ModelFileError
from ptrag_sc.model._io import ADATA_FNAME, MANIFEST_FNAME, WEIGHTS_FNAME

TINY = {"n_hidden": 16, "n_layers": 1, "n_heads": 2, "cell_set_size": 8, "n_candidates": 4, "gene_annotations": None}


@pytest.fixture(scope="module")
def two_models():
    """Two models of the same data with different weights (old and new), and the data."""
    data = make_small_adata(n_perturbations=4, n_genes=20, n_cells_per_perturbation=12, n_control_cells=24)
    PTRAG.setup_anndata(data)
    models = []
    for seed in (0, 1):
        scvi.settings.seed = seed
        model = PTRAG(data, perturbation_embeddings=data.uns["gene_embeddings"], **TINY)
        model.train(max_steps=2)
        models.append(model)
    return models, data


def _weights(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    return PTRAG.load(path, adata=False, prefix=prefix).module.state_dict()


def _same_weights(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("fail_on", [WEIGHTS_FNAME, ADATA_FNAME, MANIFEST_FNAME, "swap"])
def test_a_failed_overwrite_leaves_the_old_model(two_models, tmp_path, monkeypatch, fail_on):
    (old, new), _ = two_models
    path = tmp_path / "m"
    old.save(path, save_anndata=True)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    write_bytes, write_h5ad, swap_in = _files.write_bytes, type(new.adata).write_h5ad, _files.swap_in

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if fail_on == "swap":
        monkeypatch.setattr(_files, "swap_in", disk_full)
    elif fail_on == ADATA_FNAME:
        monkeypatch.setattr(type(new.adata), "write_h5ad", disk_full)
    else:
        monkeypatch.setattr(_files, "write_bytes", lambda folder, name, data: (disk_full() if name == fail_on else write_bytes(folder, name, data)))
    with pytest.raises(OSError, match="No space left"):
        new.save(path, overwrite=True, save_anndata=True)
    monkeypatch.setattr(_files, "write_bytes", write_bytes)
    monkeypatch.setattr(type(new.adata), "write_h5ad", write_h5ad)
    monkeypatch.setattr(_files, "swap_in", swap_in)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert _same_weights(_weights(path), old.module.state_dict())
    assert _leftovers(tmp_path) == []


def test_an_interrupted_save_leaves_the_old_model(two_models, tmp_path, monkeypatch):
    (old, new), _ = two_models
    path = tmp_path / "m"
    old.save(path)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(_files, "fsync_path", interrupt)
    with pytest.raises(KeyboardInterrupt):
        new.save(path, overwrite=True)
    monkeypatch.undo()
    assert _same_weights(_weights(path), old.module.state_dict())
    assert _leftovers(tmp_path) == []
    new.save(path, overwrite=True)
    assert _same_weights(_weights(path), new.module.state_dict())


def test_links_in_the_folder_are_never_written_through(two_models, tmp_path):
    (model, _), _ = two_models
    outside = tmp_path / "precious.h5ad"
    outside.write_bytes(b"the user's own file")
    path = tmp_path / "m"
    model.save(path)
    (path / ADATA_FNAME).symlink_to(outside)
    for name in (f".{WEIGHTS_FNAME}.tmp", f".{MANIFEST_FNAME}.tmp", ".m.saving"):  # old temporary names
        (path / name).symlink_to(outside)
    with pytest.raises(FileExistsError, match="not written by `save`"):
        model.save(path, overwrite=True, save_anndata=True)
    model.save(path, overwrite=True)
    assert outside.read_bytes() == b"the user's own file"
    assert (path / ADATA_FNAME).is_symlink()  # kept as the user's link, not followed

    # A link in place of a model file is refused on load, named.
    (path / WEIGHTS_FNAME).rename(tmp_path / "weights")
    (path / WEIGHTS_FNAME).symlink_to(tmp_path / "weights")
    with pytest.raises(ModelFileError, match=r"model\.safetensors.*symbolic link"):
        PTRAG.load(path, adata=False)
    (path / MANIFEST_FNAME).rename(tmp_path / "manifest")
    (path / MANIFEST_FNAME).symlink_to(tmp_path / "manifest")
    with pytest.raises(ModelFileError, match=r"model\.json.*symbolic link"):
        PTRAG.load(path, adata=False)


def test_a_linked_model_folder_is_not_replaced(two_models, tmp_path):
    (model, _), _ = two_models
    model.save(tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ValueError, match=r"symbolic link.*real"):
        model.save(tmp_path / "link", overwrite=True)
    assert (tmp_path / "link").is_symlink()
    PTRAG.load(tmp_path / "link", adata=False)  # reading through the user's own link is fine


def test_every_file_gets_the_umask_permissions(two_models, tmp_path):
    (model, _), _ = two_models
    previous = os.umask(0o027)
    try:
        model.save(tmp_path / "m", save_anndata=True)
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "m").iterdir()}
    assert modes == {MANIFEST_FNAME: 0o640, WEIGHTS_FNAME: 0o640, ADATA_FNAME: 0o640}
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o750


def _save_repeatedly(model, target: Path, rounds: int) -> None:
    for _ in range(rounds):
        model.save(target, overwrite=True)


@pytest.mark.skipif(sys.platform != "linux", reason="forks the test process")
def test_concurrent_saves_leave_a_loadable_folder(two_models, tmp_path):
    """Processes saving to one folder at once (fast version of benchmarks/concurrent_saves.py)."""
    (old, new), _ = two_models
    target = tmp_path / "target"
    context = multiprocessing.get_context("fork")  # the children inherit the models, no import
    writers = [context.Process(target=_save_repeatedly, args=(m, target, 6)) for m in (old, new, old, new)]
    for writer in writers:
        writer.start()
    while any(w.is_alive() for w in writers):
        if target.exists():
            try:
                PTRAG.load(target, adata=False)
            except FileNotFoundError:  # a reader can meet the old folder as it is removed
                pass
        time.sleep(0.01)
    for writer in writers:
        writer.join()
    assert [w.exitcode for w in writers] == [0, 0, 0, 0]
    weights = _weights(target)
    assert _same_weights(weights, old.module.state_dict()) or _same_weights(weights, new.module.state_dict())
    assert _leftovers(tmp_path) == []
    manifest = json.loads((target / MANIFEST_FNAME).read_text())
    assert sorted(manifest["files"]) == [WEIGHTS_FNAME]


def test_swap_without_an_exchange_call(tmp_path, monkeypatch):
    """Where the system cannot swap two names at once, two renames do it, and a failure undoes."""
    monkeypatch.setattr(_files, "_exchange", lambda a, b: False)
    target, new = tmp_path / "t", tmp_path / "n"
    target.mkdir()
    (target / "a").write_text("old")
    new.mkdir()
    (new / "a").write_text("new")
    _files.swap_in(new, target)
    assert (target / "a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]
    new.mkdir()
    rename = os.rename

    def fail_second(a, b):
        if Path(a) == new:
            raise OSError(errno.EIO, "I/O error")
        rename(a, b)

    monkeypatch.setattr(os, "rename", fail_second)
    with pytest.raises(OSError, match="I/O error"):
        _files.swap_in(new, target)
    assert (target / "a").read_text() == "new"
    np.testing.assert_equal(sorted(p.name for p in tmp_path.iterdir()), ["n", "t"])
