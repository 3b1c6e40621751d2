"""Checks of a model's options and size, with errors that name the value at fault."""

from __future__ import annotations

import contextlib
import inspect
import os
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._checks import check_choice, finite_float, positive_int
from .._constants import BACKBONES, CONTEXT_MODES, INDEX_BACKENDS, LOSSES, MEMORY_KINDS, RETRIEVALS

if TYPE_CHECKING:
    from collections.abc import Iterator

    from anndata import AnnData


def check_trained(model: object) -> None:
    """Raise a ``RuntimeError`` unless ``model`` is trained."""
    if not model.is_trained_:
        raise RuntimeError("Model not trained. Call `model.train()` first.")


def check_model_options(options: dict) -> dict:
    """The checked constructor options of :class:`~ptrag_sc.PTRAG`, numbers in their canonical
    types (``16.0`` -> ``16``)."""
    options = dict(options)
    for name, allowed in (
        ("retrieval", RETRIEVALS),
        ("memory", MEMORY_KINDS),
        ("context_mode", CONTEXT_MODES),
        ("loss", LOSSES),
        ("backbone", BACKBONES),
        ("index_backend", INDEX_BACKENDS),
    ):
        check_choice(name, options[name], allowed)
    for name in ("n_hidden", "n_layers", "n_heads", "n_candidates", "n_set_tokens"):
        options[name] = positive_int(name, options[name])
    options["cell_set_size"] = positive_int("cell_set_size", options["cell_set_size"], minimum=2)
    for name in ("decoder_rank", "n_scorer_hidden"):
        options[name] = positive_int(name, options[name], allow_none=True)
    if options["n_hidden"] % options["n_heads"]:
        raise ValueError(
            f"`n_hidden` ({options['n_hidden']}) must be divisible by `n_heads` "
            f"({options['n_heads']})."
        )
    for name in ("sparsity_weight", "pseudobulk_weight"):
        options[name] = finite_float(name, options[name], minimum=0.0)
    options["gumbel_tau"] = finite_float(
        "gumbel_tau", options["gumbel_tau"], minimum=0.0, strict=True
    )
    options["dropout"] = finite_float("dropout", options["dropout"], minimum=0.0, maximum=1.0)
    check_choice("gene_annotations", options["gene_annotations"], ("go", None))
    if options["evidence"] is not None:
        from ..data._sources import SOURCES

        if isinstance(options["evidence"], str):
            raise ValueError(
                "`evidence` must be a list of source names, got the string "
                f"{options['evidence']!r}."
            )
        unknown = sorted(set(options["evidence"]) - set(SOURCES))
        if unknown:
            raise ValueError(
                f"`evidence` names unknown source(s) {unknown}; choose from {list(SOURCES)}."
            )
    if not isinstance(options["match_batch"], bool | np.bool_):
        raise ValueError(f"`match_batch` must be True or False, got {options['match_batch']!r}.")
    if not isinstance(options["learned_shift"], bool | np.bool_ | None):
        raise ValueError(
            f"`learned_shift` must be True, False or None, got {options['learned_shift']!r}."
        )
    similarity = options["similarity"]
    if isinstance(similarity, pd.DataFrame):
        from ..data._similarity import validate_similarity_table

        validate_similarity_table(similarity)
    else:
        from ..data._similarity import SIMILARITIES

        if not isinstance(similarity, str) or similarity not in SIMILARITIES:
            raise ValueError(
                f"`similarity` must be one of {list(SIMILARITIES)} or a pandas DataFrame (query "
                f"genes as the index, candidate genes as the columns), got {similarity!r}."
            )
    named = similarity if isinstance(similarity, str) else "a table"
    if named != "embedding":
        if options["retrieval"] == "none":
            raise ValueError(
                "`similarity` chooses what stage 1 retrieves by; with `retrieval='none'` nothing "
                "is retrieved: leave it at 'embedding'."
            )
        if named == "response" and options["memory"] != "response":
            raise ValueError(
                "`similarity='response'` compares measured responses: it needs "
                "`memory='response'`."
            )
        if options["index_backend"] == "faiss":
            raise ValueError(
                "`index_backend='faiss'` searches gene embeddings only; with `similarity` other "
                "than 'embedding' use 'auto' or 'exact'."
            )
    return options


#: Options that size the network, tried one by one at their default to find which makes it too
#: large.
SIZE_OPTIONS = (
    "n_hidden",
    "n_layers",
    "n_heads",
    "n_set_tokens",
    "cell_set_size",
    "n_candidates",
    "decoder_rank",
    "n_scorer_hidden",
)


def module_kwargs(module_cls: type, options: dict) -> dict:
    """The constructor ``options`` that the network class takes too (handed over unchanged)."""
    accepted = inspect.signature(module_cls.__init__).parameters
    return {k: v for k, v in options.items() if k in accepted}


def _physical_memory() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return None


def training_bytes(
    module_cls: type, options: dict, *, n_genes: int, n_dims: int, n_batch: int
) -> float:
    """Least memory a training step takes: parameters, gradients, two Adam moments, and the
    activations of one set, forward and backward."""
    import torch

    cells, hidden, candidates = (
        options["cell_set_size"],
        options["n_hidden"],
        options["n_candidates"],
    )
    scorer = options["n_scorer_hidden"] or hidden
    tokens = options["n_set_tokens"] + 1
    # Per cell: its hidden states, stage 2's (candidate x scorer) layer, predicted and observed
    # expression, and attention (over the pooled tokens, or every cell in each layer of the
    # full backbone); per set: the energy distance's three cell-by-cell matrices.
    attention = options["n_heads"] * (
        tokens if options["backbone"] == "pooled" else options["n_layers"] * cells
    )
    per_cell = 16 * hidden + candidates * scorer + 2 * n_genes + attention
    pooled_layers = options["n_layers"] * 8 * hidden * tokens
    activations = (
        4.0 * 3 * (cells * per_cell + 3 * cells**2 + candidates * n_genes + pooled_layers)
    )
    # Parameters grow linearly with depth: two shallow networks built on the meta device
    # (nothing allocated) give the count for any depth.
    module_options = module_kwargs(module_cls, options)
    counts = []
    for depth in (1, 2):
        with torch.device("meta"):
            module = module_cls(
                n_genes, n_dims, n_batch=n_batch, **{**module_options, "n_layers": depth}
            )
        counts.append(sum(p.numel() for p in module.parameters()))
    n_params = counts[0] + (options["n_layers"] - 1) * (counts[1] - counts[0])
    return activations + 16.0 * n_params


def check_model_size(model_cls: type, options: dict, **shape: int) -> None:
    """Refuse sizes whose training cannot fit in this machine's memory, naming the option whose
    default shrinks the estimate most (``shape``: ``n_genes``, ``n_dims``, ``n_batch``)."""
    available = _physical_memory()
    if available is None:
        return
    needed = training_bytes(model_cls._module_cls, options, **shape)
    if needed <= available:
        return
    defaults = {k: p.default for k, p in inspect.signature(model_cls.__init__).parameters.items()}
    shrunk = {
        name: training_bytes(model_cls._module_cls, {**options, name: defaults[name]}, **shape)
        for name in SIZE_OPTIONS
        if options[name] != defaults[name]
    }

    def size(n_bytes: float) -> str:
        return f"{n_bytes / 2**30:,.0f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:,.0f} MiB"

    if shrunk:
        name = min(shrunk, key=shrunk.get)
        raise ValueError(
            f"`{name}={options[name]}` makes the model too large for this machine: training it, "
            f"even one set at a time, needs at least {size(needed)} (parameters, gradients, "
            f"optimiser state, activations) and there are {size(available)} of memory; with "
            f"`{name}={defaults[name]}` (the default) it would need about {size(shrunk[name])}."
        )
    raise ValueError(
        f"The model for {shape['n_genes']} genes would need at least {size(needed)} to train, and "
        f"there are {size(available)} of memory: select fewer genes (e.g. highly variable ones)."
    )


@contextlib.contextmanager
def restore_on_error(adata: AnnData | None) -> Iterator[None]:
    """Undo scvi-tools' registration keys (``obs['_scvi_*']``, ``uns['_scvi_*']``, the only
    write of ``setup_anndata`` and ``load``) if the block fails."""
    if adata is None:
        yield
        return
    obs = {c: adata.obs[c].copy() for c in adata.obs.columns if str(c).startswith("_scvi_")}
    uns = {k: v for k, v in adata.uns.items() if str(k).startswith("_scvi_")}
    try:
        yield
    except BaseException:
        added = [c for c in adata.obs.columns if str(c).startswith("_scvi_") and c not in obs]
        if added:
            adata.obs.drop(columns=added, inplace=True)
        for column, values in obs.items():
            adata.obs[column] = values
        for key in [k for k in adata.uns if str(k).startswith("_scvi_")]:
            del adata.uns[key]
        adata.uns.update(uns)
        raise
