"""How a :class:`~ptrag_sc.PTRAG` is put together and kept consistent.

The model class only wires; these functions hold what it wires: its registration (setup
arguments, the data layer's view of an AnnData), its parts (gene encoder, annotations,
stage-1 similarity, module) and the retrieval state that training and loading install (the
memory, its stage-1 index and the set builder reading both), including the embedding table
that users can extend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd
from scvi import REGISTRY_KEYS as SCVI_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField

from .._constants import DEFAULT_PERTURBATION_SEP, REGISTRY_KEYS
from ..data import (
    PerturbationData,
    PerturbationEncoder,
    PerturbationField,
    RetrievalMemory,
    SetupArgs,
)
from ..data._annotations import GeneAnnotations
from ..data._index import NeighbourIndex
from ..data._similarity import describe, make_similarity
from ._validation import check_anndata, check_setup

if TYPE_CHECKING:
    from ..data import SetBuilder

__all__ = [
    "add_embeddings",
    "assemble",
    "check_registered",
    "data_view",
    "embedding_frame",
    "install_memory",
    "neighbour_index",
    "register",
    "set_builder",
    "setup_args",
]

#: Constructor options handed to the module unchanged.
MODULE_OPTIONS = (
    "n_hidden",
    "n_layers",
    "n_heads",
    "backbone",
    "n_set_tokens",
    "retrieval",
    "memory",
    "context_mode",
    "gumbel_tau",
    "n_scorer_hidden",
    "decoder_rank",
    "sparsity_weight",
    "pseudobulk_weight",
    "dropout",
    "loss",
    "learned_shift",
)


# ------------------------------------------------------------------ registration
def register(
    cls,
    adata,
    setup_method_args: dict,
    *,
    perturbation_key,
    control_group,
    cell_type_key,
    batch_key,
    layer,
    perturbation_sep,
    kwargs: dict,
) -> None:
    """The body of :meth:`PTRAG.setup_anndata`: check, declare the fields, register."""
    if kwargs.get("source_registry") is not None:
        # A trained model meeting new data: cell types and batches it never saw are valid
        # (they are read by name, never as the registry's codes).
        kwargs.setdefault("extend_categories", True)
    check_setup(
        adata,
        perturbation_key=perturbation_key,
        control_group=control_group,
        cell_type_key=cell_type_key,
        batch_key=batch_key,
        layer=layer,
        sep=perturbation_sep,
        transfer=kwargs.get("source_registry") is not None,
    )
    fields = [
        LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=False),
        PerturbationField(
            REGISTRY_KEYS.PERTURBATION_KEY,
            perturbation_key,
            control_group=control_group,
            sep=perturbation_sep,
        ),
        CategoricalObsField(SCVI_KEYS.LABELS_KEY, cell_type_key),
        CategoricalObsField(SCVI_KEYS.BATCH_KEY, batch_key),
    ]
    adata_manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
    adata_manager.register_fields(adata, **kwargs)
    cls.register_manager(adata_manager)


def check_registered(model_cls, adata, registry) -> None:
    """A model is built from a registered AnnData, or from a saved registry (loading)."""
    if adata is None and registry is None:
        raise ValueError(
            "Pass `adata`, an AnnData set up with `PTRAG.setup_anndata` (or load a saved model with `PTRAG.load`)."
        )
    if adata is not None:
        check_anndata(adata)
        if model_cls._get_most_recent_anndata_manager(adata, required=False) is None:
            name = model_cls.__name__
            raise ValueError(
                f"`adata` is not set up for {name}: call `{name}.setup_anndata(adata, "
                "perturbation_key=..., cell_type_key=...)` first."
            )


def setup_args(registry: dict) -> SetupArgs:
    """The arguments of ``setup_anndata`` recorded in a model's registry."""
    args = registry["setup_args"]
    return SetupArgs(
        perturbation_key=args["perturbation_key"],
        control_group=args["control_group"],
        cell_type_key=args["cell_type_key"],
        batch_key=args["batch_key"],
        layer=args["layer"],
        sep=args.get("perturbation_sep", DEFAULT_PERTURBATION_SEP),
    )


def data_view(model, adata, *, require_labels: bool) -> PerturbationData:
    """The data layer's view of ``adata`` in the model's registration and gene order."""
    batch_state = (
        model.registry_["field_registries"].get(SCVI_KEYS.BATCH_KEY, {}).get("state_registry", {})
    )
    setup = model._setup
    return PerturbationData(
        adata,
        setup,
        model.var_names,
        batch_categories=batch_state.get("categorical_mapping") if setup.batch_key else None,
        require_labels=require_labels,
    )


# ------------------------------------------------------------------------ parts
def assemble(model, adata, perturbation_embeddings: pd.DataFrame, options: dict) -> None:
    """Build the parts of a new model from its validated constructor ``options``."""
    pert_state = model._field_state(REGISTRY_KEYS.PERTURBATION_KEY)
    model._encoder = PerturbationEncoder(perturbation_embeddings, sep=pert_state["sep"])
    if adata is not None:
        model._encoder.check(pert_state["perturbations"], context=" in the registered AnnData")
    model.cell_set_size = options["cell_set_size"]
    model.n_candidates = options["n_candidates"]
    model.match_batch = options["match_batch"]
    model.index_backend = options["index_backend"]
    model.retrieval = options["retrieval"]
    model.memory_kind = options["memory"]
    model._annotations = GeneAnnotations() if options["gene_annotations"] == "go" else None
    model.evidence = None if options["evidence"] is None else tuple(options["evidence"])
    model.similarity = options["similarity"]
    model._similarity = make_similarity(
        options["similarity"], annotations=model._annotations, sep=model._encoder.sep
    )
    model.module = model._module_cls(
        model.summary_stats.n_vars,
        model._encoder.n_dims,
        n_batch=model.summary_stats.n_batch if model._setup.batch_key is not None else 0,
        **{name: options[name] for name in MODULE_OPTIONS},
    )
    model._memory_state = None
    model._index = None
    model.training_perturbations_ = None
    model.training_cell_types_ = None
    model.best_epoch_ = None
    model.best_step_ = None
    model.validation_perturbations_ = None
    model._model_summary_string = (
        f"PTRAG model: retrieval={options['retrieval']!r}, memory={options['memory']!r}, backbone={options['backbone']!r}, "
        f"n_hidden={options['n_hidden']}, n_layers={options['n_layers']}, cell_set_size={options['cell_set_size']}, "
        f"n_candidates={options['n_candidates']}, context_mode={options['context_mode']!r}, "
        f"similarity={describe(options['similarity'])}, embedding dims={model._encoder.n_dims}, "
        f"genes={model.summary_stats.n_vars}."
    )


# -------------------------------------------------------------- retrieval state
def install_memory(model, state: dict | None) -> None:
    """Install a memory (its saved form; ``None`` removes it): the module's tables follow it."""
    model._memory_state = None if state is None else RetrievalMemory.from_dict(state).to_dict()
    model._index = None
    if state is not None:
        memory = model.memory
        model.module.set_memory(memory.embeddings, memory.response_codes)


def neighbour_index(model) -> NeighbourIndex | None:
    """The stage-1 index over the memory, built on first use (``None`` without a memory)."""
    if model._memory_state is None:
        return None
    if model._index is None:
        model._index = NeighbourIndex(
            model.memory,
            n_candidates=model.n_candidates,
            backend=model.index_backend,
            sep=model._encoder.sep,
            similarity=model._similarity,
        )
    return model._index


def set_builder(model) -> SetBuilder:
    """The builder of the sets the module consumes, reading the model's memory and index."""
    from ..data import SetBuilder

    return SetBuilder(
        model._encoder,
        model.memory,
        model._neighbour_index(),
        n_candidates=model.n_candidates,
        match_batch=model.match_batch and model._setup.batch_key is not None,
        annotations=model._annotations,
    )


def add_embeddings(model, embeddings: pd.DataFrame, *, overwrite: bool) -> None:
    """The body of :meth:`PTRAG.add_perturbation_embeddings`."""
    new = PerturbationEncoder(embeddings).table
    if new.shape[1] != model._encoder.n_dims:
        raise ValueError(
            f"The new embeddings have {new.shape[1]} dimensions; the model's have {model._encoder.n_dims}."
        )
    clash = new.index.intersection(model._encoder.table.index)
    if len(clash) and not overwrite:
        raise ValueError(
            f"{len(clash)} gene(s) already have a vector, e.g. {clash[:5].tolist()}; pass `overwrite=True` to replace them."
        )
    new.columns = model._encoder.table.columns
    table = pd.concat([model._encoder.table.drop(index=clash), new])
    model._encoder = PerturbationEncoder(table, sep=model._encoder.sep)
    model.init_params_["non_kwargs"]["perturbation_embeddings"] = table
    # Stage 1 embeds queries through the encoder: the index is rebuilt on next use.
    model._index = None


def embedding_frame(model, perturbations) -> pd.DataFrame:
    """The body of :meth:`PTRAG.get_perturbation_embedding`."""
    perturbations = [
        str(p) for p in ([perturbations] if isinstance(perturbations, str) else perturbations)
    ]
    return pd.DataFrame(
        model._encoder.embed(perturbations),
        index=pd.Index(perturbations, name="perturbation"),
        columns=model._encoder.table.columns,
    )
