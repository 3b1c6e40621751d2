"""How a :class:`~ptrag_sc.PTRAG` is put together: registration, network, embedding table."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import pandas as pd
from scvi import REGISTRY_KEYS as SCVI_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField

from .._checks import check_anndata
from .._constants import REGISTRY_KEYS
from ..data import PerturbationEncoder, PerturbationField
from ..data._checks import check_setup
from ..data._similarity import describe

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData
    from scvi.module.base import BaseModuleClass

    from ..data import ModelState


def module_kwargs(module_cls: type, options: dict) -> dict:
    """The constructor ``options`` that the network class takes too (handed over unchanged)."""
    accepted = inspect.signature(module_cls.__init__).parameters
    return {k: v for k, v in options.items() if k in accepted}


def register(cls: type, adata: AnnData, setup_method_args: dict, kwargs: dict) -> None:
    """The body of :meth:`PTRAG.setup_anndata`: check, declare the fields, register."""
    args = setup_method_args["setup_args"]
    transfer = kwargs.get("source_registry") is not None
    if transfer:
        # A trained model meeting new data: cell types and batches it never saw are valid
        # (they are read by name, never as the registry's codes).
        kwargs.setdefault("extend_categories", True)
    keys = ("perturbation_key", "control_group", "cell_type_key", "batch_key", "layer")
    check_setup(
        adata, **{k: args[k] for k in keys}, sep=args["perturbation_sep"], transfer=transfer
    )
    perturbations = PerturbationField(
        REGISTRY_KEYS.PERTURBATION_KEY,
        args["perturbation_key"],
        control_group=args["control_group"],
        sep=args["perturbation_sep"],
    )
    fields = [
        LayerField(REGISTRY_KEYS.X_KEY, args["layer"], is_count_data=False),
        perturbations,
        CategoricalObsField(SCVI_KEYS.LABELS_KEY, args["cell_type_key"]),
        CategoricalObsField(SCVI_KEYS.BATCH_KEY, args["batch_key"]),
    ]
    adata_manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
    adata_manager.register_fields(adata, **kwargs)
    cls.register_manager(adata_manager)


def check_registered(model_cls: type, adata: AnnData | None, registry: dict | None) -> None:
    """A model is built from a registered AnnData, or from a saved registry (loading)."""
    if adata is None and registry is None:
        raise ValueError(
            "Pass `adata`, an AnnData set up with `PTRAG.setup_anndata` (or load a saved model "
            "with `PTRAG.load`)."
        )
    if adata is not None:
        check_anndata(adata)
        if model_cls._get_most_recent_anndata_manager(adata, required=False) is None:
            name = model_cls.__name__
            raise ValueError(
                f"`adata` is not set up for {name}: call `{name}.setup_anndata(adata, "
                "perturbation_key=..., cell_type_key=...)` first."
            )


def module(
    module_cls: type, state: ModelState, n_genes: int, n_batch: int, options: dict
) -> BaseModuleClass:
    """The network of a new model, for its ``state`` and validated constructor ``options``."""
    return module_cls(
        n_genes,
        state.encoder.n_dims,
        n_batch=n_batch if state.setup.batch_key is not None else 0,
        **module_kwargs(module_cls, options),
    )


def summary(options: dict, n_dims: int, n_genes: int) -> str:
    """The one-line description ``print(model)`` shows."""
    shown = ("retrieval", "memory", "backbone", "n_hidden", "n_layers", "cell_set_size")
    shown += ("n_candidates", "context_mode")
    text = ", ".join(f"{name}={options[name]!r}" for name in shown)
    similarity = describe(options["similarity"])
    return (
        f"PTRAG model: {text}, similarity={similarity}, embedding dims={n_dims}, genes={n_genes}."
    )


def embedding_table(
    state: ModelState, embeddings: pd.DataFrame, *, overwrite: bool
) -> pd.DataFrame:
    """The body of :meth:`PTRAG.add_perturbation_embeddings`: the model's table with
    ``embeddings``."""
    encoder = state.encoder
    new = PerturbationEncoder(embeddings).table
    if new.shape[1] != encoder.n_dims:
        raise ValueError(
            f"The new embeddings have {new.shape[1]} dimensions; the model's have "
            f"{encoder.n_dims}."
        )
    clash = new.index.intersection(encoder.table.index)
    if len(clash) and not overwrite:
        raise ValueError(
            f"{len(clash)} gene(s) already have a vector, e.g. {clash[:5].tolist()}; pass "
            "`overwrite=True` to replace them."
        )
    new.columns = encoder.table.columns
    return pd.concat([encoder.table.drop(index=clash), new])


def embedding_frame(state: ModelState, perturbations: str | Sequence[str]) -> pd.DataFrame:
    """The body of :meth:`PTRAG.get_perturbation_embedding`."""
    labels = [
        str(p) for p in ([perturbations] if isinstance(perturbations, str) else perturbations)
    ]
    return pd.DataFrame(
        state.encoder.embed(labels),
        index=pd.Index(labels, name="perturbation"),
        columns=state.encoder.table.columns,
    )
