"""Model folders, written whole by an explicit schema (:mod:`~ptrag_sc.model._schema`) and read
back without running code: ``model.json`` (the manifest: header, files with size and SHA-256, and
values), ``model.safetensors`` (every array) and optionally ``adata.h5ad``. A change to what is
saved bumps ``FORMAT_VERSION`` and adds the reader of the previous one to :data:`MIGRATIONS`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .. import _files
from .._checks import check_anndata
from ..data._checks import check_control_label, check_genes
from . import _legacy, _schema
from ._mudata import is_mudata, rna_modality
from ._schema import MANIFEST_FNAME, WEIGHTS_FNAME, ModelFileError, build_model, file_error
from ._validation import restore_on_error

if TYPE_CHECKING:
    from typing import BinaryIO

    from anndata import AnnData
    from scvi.model.base import BaseModelClass

FORMAT_NAME, FORMAT_VERSION = _schema.FORMAT_NAME, _schema.FORMAT_VERSION
ADATA_FNAME = "adata.h5ad"
LEGACY_FNAME = "model.pt"  # scvi-tools' pickle: opened only by `convert_legacy_model`
#: A folder argument.
PathArg = str | os.PathLike


def _prefix(prefix: str | None) -> str:
    if prefix is not None and (not isinstance(prefix, str) or set(prefix) & {"/", "\\", "\0"}):
        raise ValueError(f"`prefix` must be a file name prefix, not a path: {prefix!r}")
    return prefix or ""


def save_model(
    model: BaseModelClass,
    dir_path: PathArg,
    prefix: str | None,
    overwrite: bool,
    save_anndata: bool,
    anndata_source: Path | None = None,
    **kwargs: object,
) -> None:
    """Write ``model`` to ``dir_path`` whole or not at all (``anndata_source``: h5ad to copy)."""
    from safetensors.torch import save

    prefix = _prefix(prefix)
    adata_name = f"{prefix}{ADATA_FNAME}"
    values, tensors = _schema.serialise(model)  # every value checked before anything is written
    try:
        blob = save(tensors, metadata={"format": FORMAT_NAME})
    except (TypeError, ValueError) as exc:  # a dtype safetensors does not store
        raise TypeError(f"Cannot save the model's arrays in safetensors: {exc}") from exc
    if save_anndata and anndata_source is None and model.adata is None:
        raise ValueError("`save_anndata=True` but the model has no AnnData attached.")
    target = Path(os.path.abspath(dir_path))
    replaced = {f"{prefix}{n}" for n in (MANIFEST_FNAME, WEIGHTS_FNAME, _legacy.V1_ARRAYS_FNAME)}
    if overwrite and target.is_dir() and os.path.lexists(target / adata_name):
        ours = False  # an h5ad the folder's manifest lists was written by `save`: replaceable
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            old = json.loads(_files.read_bytes(target / f"{prefix}{MANIFEST_FNAME}"))
            ours = ADATA_FNAME in old["files"] or old.get("anndata_saved") is True
        if save_anndata and not ours:
            raise FileExistsError(f"{target / adata_name} was not written by `save`: move it.")
        replaced |= {adata_name} if ours else set()
    with _files.replacing_folder(target, overwrite=overwrite, keep_out=replaced) as staging:
        _files.write_bytes(staging, f"{prefix}{WEIGHTS_FNAME}", blob)
        files = {WEIGHTS_FNAME: {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}}
        if anndata_source is not None:
            _files.write_bytes(staging, adata_name, _files.read_bytes(Path(anndata_source)))
        elif save_anndata:
            model.adata.write_h5ad(staging / adata_name, **kwargs)
            _files.fsync_path(staging / adata_name)
        if save_anndata:
            with open(staging / adata_name, "rb") as handle:
                files[ADATA_FNAME] = _files.digest(handle)
        manifest = {**_schema.header(model), **values, "files": files}
        text = json.dumps(manifest, indent=1, allow_nan=False).encode()
        _files.write_bytes(staging, f"{prefix}{MANIFEST_FNAME}", text)


def _manifest_path(dir_path: Path, prefix: str) -> Path:
    """The manifest's path, or a clear error for missing, empty, legacy and foreign folders."""
    where = f"Cannot load a model from {dir_path}:"
    if not dir_path.exists():
        raise FileNotFoundError(f"{where} the directory does not exist.")
    if not dir_path.is_dir():
        raise NotADirectoryError(f"{where} it is a file; pass the directory `model.save` wrote.")
    manifest, legacy = dir_path / f"{prefix}{MANIFEST_FNAME}", dir_path / f"{prefix}{LEGACY_FNAME}"
    if os.path.lexists(manifest):
        return manifest
    if legacy.exists():
        raise ModelFileError(
            f"{dir_path} holds a model in scvi-tools' pickle format ({legacy.name}), which runs "
            "arbitrary code when opened, so ptrag_sc does not read it. If you trust its source, "
            f"convert it once with `PTRAG.convert_legacy_model({str(dir_path)!r}, new_dir, "
            "trust_pickle=True)` and load `new_dir` instead."
        )
    present = sorted(p.name for p in dir_path.iterdir())
    if not present:
        raise FileNotFoundError(f"{where} the directory is empty.")
    by = f"`save`{f' with prefix={prefix!r}' if prefix else ''}, or the save did not finish"
    found = f"no {manifest.name} (found {present[:10]})"
    raise ModelFileError(f"{where} {found}: not written by {by}.")


def _read_manifest(source: Path, folder_fd: int) -> dict:
    try:
        with _files.open_file(source.name, folder_fd) as handle:
            raw = handle.read()
        manifest = json.loads(raw.decode("utf-8"), parse_constant=_schema.no_constant)
        return {**manifest, "written": _schema.check_header(manifest, MIGRATIONS)}
    except UnicodeDecodeError as exc:
        raise file_error(source, f"the file is not UTF-8 text (damaged?): {exc}.") from None
    except json.JSONDecodeError as exc:
        why = f"not valid JSON (truncated or damaged?): {exc}" if raw.strip() else "empty"
        raise file_error(source, f"the file is {why}.") from None
    except ValueError as exc:  # a link, another tool's file, another version
        raise file_error(source, str(exc)) from None


class _Folder:
    """An open model folder: its files are read relative to it, checked, never through a link."""

    def __init__(self, source: Path, prefix: str, manifest: dict | None = None) -> None:
        self.source, self.prefix = source, prefix
        self.fd = _files.open_folder(source.parent)
        # Read through the open folder: a save that swaps in a new folder meanwhile cannot
        # pair one save's manifest with another's files.
        try:
            self.manifest = _read_manifest(source, self.fd) if manifest is None else manifest
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> _Folder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self, name: str) -> BinaryIO:
        """The listed file ``name``, open, checked to be as recorded (size and SHA-256)."""
        path = self.source.with_name(f"{self.prefix}{name}")
        expected = self.manifest["files"].get(name)
        if not isinstance(expected, dict):
            raise file_error(self.source, f"the manifest does not describe {name}.")
        try:
            return _files.open_verified(path.name, self.fd, expected, self.source.name)
        except FileNotFoundError:
            what = f"{path.name} is missing (listed in {self.source.name})"
            raise FileNotFoundError(f"Cannot load {path.parent}: {what}.") from None
        except ValueError as exc:  # a link, or another content
            raise file_error(path, str(exc)) from None

    def read(self, name: str) -> bytes:
        with self.open(name) as handle:
            return handle.read()

    def tensors(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load

        data = self.read(WEIGHTS_FNAME)
        try:
            return load(data)
        except Exception as exc:  # SafetensorError and friends: a damaged or foreign file
            path = self.source.with_name(f"{self.prefix}{WEIGHTS_FNAME}")
            raise file_error(path, f"not safetensors: {type(exc).__name__}: {exc}.") from None


def _read(folder: _Folder) -> dict:
    content = _schema.deserialise(folder.manifest, folder.tensors())
    return {**content, "adata": ADATA_FNAME in folder.manifest["files"]}


#: Readers of each format version (1: ptrag_sc 0.1.0; 3: evidence fits by source name), giving
#: the content in the current form: ``var_names``, ``registry``, ``attributes``, ``state``,
#: ``adata``.
MIGRATIONS = {
    1: _legacy.read_v1,
    2: lambda folder: _legacy.sources_by_name(_read(folder)),
    3: _read,
}


def read_model_files(
    dir_path: PathArg, prefix: str | None = None, backup_url: str | dict | None = None
) -> tuple[Path, dict]:
    """The checked content of a model folder (see :data:`MIGRATIONS`) and its manifest's path."""
    prefix, dir_path = _prefix(prefix), Path(dir_path)
    if backup_url is not None:
        dir_path.mkdir(parents=True, exist_ok=True)
        _files.download_missing(dir_path, [f"{prefix}{MANIFEST_FNAME}"], backup_url)
    source = _manifest_path(dir_path, prefix)
    try:
        with _Folder(source, prefix) as folder:
            manifest = folder.manifest
            if backup_url is not None:
                names = [f"{prefix}{name}" for name in manifest["files"]]
                _files.download_missing(dir_path, names, backup_url)
            content = MIGRATIONS[manifest["format_version"]](folder)
    except (ModelFileError, FileNotFoundError):
        raise
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise file_error(source, f"malformed entry {exc}.") from None
    except RecursionError:
        raise file_error(source, "the JSON is nested too deeply.") from None
    problem = _schema.check_content(content, manifest["written"])
    if problem:
        raise file_error(source, problem)
    return source, {**content, "written": manifest["written"], "manifest": manifest}


def _saved_adata(source: Path, manifest: dict, prefix: str) -> AnnData:
    """The AnnData saved with the model, checked against the manifest (from format 2 on)."""
    from anndata import read_h5ad

    path = source.with_name(f"{prefix}{ADATA_FNAME}")
    try:
        with _Folder(source, prefix, manifest) as folder:
            if ADATA_FNAME in manifest["files"]:
                handle = folder.open(ADATA_FNAME)
            else:  # format version 1 recorded no checksum
                handle = _files.open_file(path.name, folder.fd)
            with handle:
                return read_h5ad(handle)
    except (ModelFileError, FileNotFoundError):
        raise
    except Exception as exc:  # h5py's errors of a damaged file, a link
        raise file_error(path, f"not a readable h5ad file: {type(exc).__name__}: {exc}") from None


class SafeSaveMixin:
    """``save``/``load`` for scvi-tools models without pickle (safetensors and a JSON schema).

    Put it before :class:`~scvi.model.base.BaseModelClass` in the bases. Attributes ending in
    ``_`` are saved and restored.
    """

    def save(
        self,
        dir_path: str | os.PathLike,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        **anndata_write_kwargs: object,
    ) -> None:
        """Save the model: weights, settings, training state and (optionally) the AnnData.

        Writes ``model.json`` (settings, registry, training state, gene names, sizes and SHA-256
        of the other files), ``model.safetensors`` (every array) and, with ``save_anndata``,
        ``adata.h5ad``; no pickle, no optimiser state. Atomic: a failure leaves the previous
        model as it was; other files of the folder are kept (see :doc:`/errors_and_guarantees`).

        Parameters
        ----------
        dir_path
            Directory to write; created if missing; not a symbolic link.
        prefix
            Prefix of the file names (several models in one directory); no folder separators.
        overwrite
            Replace this model's files in an existing directory (default: error if it exists).
        save_anndata
            Also write the model's AnnData, loaded back by ``load(dir_path)``.
        **anndata_write_kwargs
            Passed to :meth:`anndata.AnnData.write_h5ad` (e.g. ``compression="gzip"``).

        Raises
        ------
        ValueError
            If ``dir_path`` exists (without ``overwrite``) or is a link, or ``prefix`` is a path.
        TypeError
            If an attribute ending in ``_`` holds a type the schema cannot store (checked first).
        """
        for name in ("save_kwargs", "legacy_mudata_format", "datamodule"):
            if anndata_write_kwargs.pop(name, None) not in (None, False):
                raise TypeError(f"`{name}` is an option of scvi-tools' `torch.save`, not used.")
        save_model(self, dir_path, prefix, overwrite, save_anndata, **anndata_write_kwargs)

    @classmethod
    def load(
        cls,
        dir_path: str | os.PathLike,
        adata: AnnData | bool | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
        backup_url: str | dict | None = None,
    ) -> BaseModelClass:
        """Load a model written by :meth:`save`, without running any code from the directory.

        Files are read never through a symbolic link and checked against the sizes and SHA-256
        sums in ``model.json``. Folders of older ptrag_sc versions load as they are; scvi-tools'
        pickle format is refused (see :meth:`convert_legacy_model`).

        Parameters
        ----------
        dir_path
            Directory written by :meth:`save`.
        adata
            AnnData (or MuData: its RNA modality) with the model's genes in the model's order,
            registered with the saved setup arguments (new cell types and batches are
            accepted). ``None``: the AnnData saved with the model, or none. ``False``: none.
        accelerator, device
            Where to put the model (Lightning-style, one device).
        prefix
            Prefix of the file names.
        backup_url
            Where to download missing files from: a base URL (file names are appended) or a
            mapping ``{file name: URL}``; downloaded files are checked like local ones.

        Returns
        -------
        The model, in evaluation mode.

        Raises
        ------
        TypeError
            If ``adata`` is neither an AnnData, a MuData, ``None`` nor ``False``.
        FileNotFoundError
            If the directory or a file the manifest lists does not exist, or it is empty.
        ModelFileError
            (a ``ValueError``) If a file is damaged, a link, foreign, pickle-based or newer, or
            the weights or the memory do not fit the model (the message names them).
        ValueError
            If ``adata``'s genes differ from the model's or are in another order, or its labels
            lack the saved control label; ``adata`` is then left as it was.
        """
        from scvi.model._utils import parse_device_args

        adata = rna_modality(adata, model_cls=cls, default="rna") if is_mudata(adata) else adata
        if adata is not None and adata is not False:
            check_anndata(adata)
        device = parse_device_args(accelerator, device, "torch", validate_single_device=True)[2]
        source, content = read_model_files(dir_path, prefix, backup_url)
        registry = content["registry"]
        if registry.get("model_name") not in (None, cls.__name__):
            raise file_error(
                source, f"it holds a {registry['model_name']} model, not {cls.__name__}."
            )
        if registry.get("setup_method_name", "setup_anndata") != "setup_anndata":
            raise file_error(
                source, f"unsupported setup method {registry['setup_method_name']!r}."
            )
        if adata is None and content["adata"]:
            adata = _saved_adata(source, content["manifest"], _prefix(prefix))
        elif adata is None:
            message = "No AnnData was passed and none was saved with the model: loaded without one"
            warnings.warn(f"{message} (`adata=False` silences this).", UserWarning, stacklevel=2)
        adata = None if adata is False else adata
        with restore_on_error(adata):
            if adata is not None:
                check_genes(adata, content["var_names"], dir_path)
                embeddings = _schema.constructor_arguments(content).get("perturbation_embeddings")
                check_control_label(adata, registry["setup_args"], embeddings)
                cls.setup_anndata(adata, source_registry=registry, **registry["setup_args"])
            model = build_model(cls, source, content, adata, device)
            if adata is not None:
                model._validate_anndata(adata)
        return model

    @staticmethod
    def load_registry(dir_path: str | os.PathLike, prefix: str | None = None) -> dict:
        """The scvi-tools registry saved with a model (setup arguments, field states)."""
        return read_model_files(dir_path, prefix)[1]["registry"]

    @staticmethod
    def view_setup_args(dir_path: str | os.PathLike, prefix: str | None = None) -> None:
        """Print the arguments used to set up a saved model's AnnData."""
        from scvi.data import AnnDataManager

        AnnDataManager.view_setup_method_args(SafeSaveMixin.load_registry(dir_path, prefix))

    @classmethod
    def convert_legacy_save(cls, *args: object, **kwargs: object) -> None:
        """Not supported: scvi-tools' converter unpickles; see :meth:`convert_legacy_model`."""
        raise NotImplementedError(
            "scvi-tools' `convert_legacy_save` reads pickle files. Use `PTRAG.convert_legacy_model"
            "(old_dir, new_dir, trust_pickle=True)` for models in scvi-tools' format (model.pt)."
        )

    @classmethod
    def convert_legacy_model(
        cls,
        dir_path: PathArg,
        output_dir_path: PathArg,
        *,
        trust_pickle: bool = False,
        prefix: str | None = None,
        overwrite: bool = False,
    ) -> None:
        """Convert a model saved in scvi-tools' pickle format (``model.pt``) to the safe format.

        ``model.pt`` is read with ``torch.load(weights_only=False)``, which **runs any code the
        file contains**: do this once, for files from a source you trust.

        Parameters
        ----------
        dir_path, output_dir_path
            Directory holding ``model.pt`` (and possibly ``adata.h5ad``), and the one to write.
        trust_pickle
            Must be ``True``: the explicit statement that you trust the file.
        prefix
            Prefix of the file names, in both directories.
        overwrite
            Write into an existing ``output_dir_path``.
        """
        prefix, dir_path = _prefix(prefix), Path(dir_path)
        legacy, adata = dir_path / f"{prefix}{LEGACY_FNAME}", dir_path / f"{prefix}{ADATA_FNAME}"
        if not legacy.is_file():
            raise FileNotFoundError(f"Cannot convert {dir_path}: {legacy.name} does not exist.")
        if not trust_pickle:
            why = "reading it runs any code it contains. Pass `trust_pickle=True` if you trust it"
            raise ValueError(f"{legacy} is a pickle file: {why}.")
        if Path(output_dir_path).exists() and not overwrite:
            raise ValueError(f"{output_dir_path} exists. Pass `overwrite=True` or another path.")
        try:
            content = {**_legacy.read_pickle(legacy), "written": "scvi-tools' pickle format"}
        except ValueError as exc:
            raise ModelFileError(str(exc)) from None
        problem = _schema.check_content(content, content["written"])
        if problem:
            raise file_error(legacy, problem)
        model = build_model(cls, legacy, content, None, torch.device("cpu"))
        source = adata if adata.is_file() else None
        save_model(model, output_dir_path, prefix, overwrite, source is not None, source)
