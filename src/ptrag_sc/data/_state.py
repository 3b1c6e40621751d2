"""What a model's retrieval and data layer need, in one immutable object: :class:`ModelState`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scvi import REGISTRY_KEYS as SCVI_KEYS

from .._constants import DEFAULT_PERTURBATION_SEP, REGISTRY_KEYS
from ._annotations import GeneAnnotations
from ._builder import SetBuilder
from ._cells import PerturbationData, SetupArgs
from ._index import NeighbourIndex
from ._memory import memory_from_cells
from ._perturbations import PerturbationEncoder, normalise_labels
from ._similarity import make_similarity

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

    from ._memory import RetrievalMemory
    from ._similarity import StageOneSimilarity


@dataclass(frozen=True)
class ModelState:
    """A model's registration, gene encoder, retrieval options and retrieval memory.

    Prediction, training, screens and saving read these from here, never from the model. It is
    immutable: training, loading and new gene vectors make a new one (:meth:`replace`), so the
    index and the set builder, derived on first use, belong to its memory and encoder.

    Attributes
    ----------
    setup
        The arguments of ``setup_anndata``.
    var_names
        The genes the model predicts, in order.
    batch_categories
        The training batches (``None`` without ``batch_key``).
    encoder
        Gene embeddings of perturbation labels.
    annotations
        Gene annotations of the evidence (``None``: not used).
    similarity, prior
        The ``similarity`` option and its stage-1 prior (``None``: the embedding cosine).
    cell_set_size, n_candidates, match_batch, index_backend, retrieval, memory_kind, evidence
        The model's options of these names (``memory_kind``: its ``memory``).
    memory
        The retrieval memory (``None`` before training and without retrieval).
    training_perturbations, training_cell_types
        What the model was trained on (``None`` before training).
    """

    setup: SetupArgs
    var_names: pd.Index
    batch_categories: np.ndarray | None
    encoder: PerturbationEncoder
    annotations: GeneAnnotations | None
    similarity: str | pd.DataFrame
    prior: StageOneSimilarity | None
    cell_set_size: int
    n_candidates: int
    match_batch: bool
    index_backend: str
    retrieval: str
    memory_kind: str
    evidence: tuple[str, ...] | None
    memory: RetrievalMemory | None = None
    training_perturbations: np.ndarray | None = None
    training_cell_types: np.ndarray | None = None

    @classmethod
    def build(
        cls, registry: dict, var_names: Sequence[str], embeddings: pd.DataFrame, options: dict
    ) -> ModelState:
        """The state of a new model from its scvi-tools ``registry`` and its validated
        constructor ``options``."""
        fields = registry["field_registries"]
        args = registry["setup_args"]
        setup = SetupArgs(
            perturbation_key=args["perturbation_key"],
            control_group=args["control_group"],
            cell_type_key=args["cell_type_key"],
            batch_key=args["batch_key"],
            layer=args["layer"],
            sep=args.get("perturbation_sep", DEFAULT_PERTURBATION_SEP),
        )
        batches = fields.get(SCVI_KEYS.BATCH_KEY, {}).get("state_registry", {})
        sep = fields[REGISTRY_KEYS.PERTURBATION_KEY]["state_registry"]["sep"]
        encoder = PerturbationEncoder(embeddings, sep=sep)
        annotations = GeneAnnotations() if options["gene_annotations"] == "go" else None
        similarity = options["similarity"]
        return cls(
            setup=setup,
            var_names=pd.Index(var_names),
            batch_categories=batches.get("categorical_mapping") if setup.batch_key else None,
            encoder=encoder,
            annotations=annotations,
            similarity=similarity,
            prior=make_similarity(similarity, annotations=annotations, sep=encoder.sep),
            cell_set_size=options["cell_set_size"],
            n_candidates=options["n_candidates"],
            match_batch=options["match_batch"],
            index_backend=options["index_backend"],
            retrieval=options["retrieval"],
            memory_kind=options["memory"],
            evidence=None if options["evidence"] is None else tuple(options["evidence"]),
        )

    def replace(self, **changes: object) -> ModelState:
        """A new state with ``changes`` (its index and set builder are rebuilt on first use)."""
        return dataclasses.replace(self, **changes)

    @property
    def has_confidence(self) -> bool:
        """Whether predictions carry a confidence (a response memory)."""
        return self.memory_kind == "response" and self.retrieval != "none"

    @cached_property
    def index(self) -> NeighbourIndex | None:
        """The stage-1 index over the memory (``None`` without a memory)."""
        if self.memory is None:
            return None
        return NeighbourIndex(
            self.memory,
            n_candidates=self.n_candidates,
            backend=self.index_backend,
            sep=self.encoder.sep,
            similarity=self.prior,
        )

    @cached_property
    def builder(self) -> SetBuilder:
        """The builder of the sets the network consumes, reading the memory and its index."""
        return SetBuilder(
            self.encoder,
            self.memory,
            self.index,
            n_candidates=self.n_candidates,
            match_batch=self.match_batch and self.setup.batch_key is not None,
            annotations=self.annotations,
        )

    def data(self, adata: AnnData, *, require_labels: bool = True) -> PerturbationData:
        """The data layer's view of ``adata`` in the model's registration and gene order."""
        return PerturbationData(
            adata,
            self.setup,
            self.var_names,
            batch_categories=self.batch_categories,
            require_labels=require_labels,
        )

    def build_memory(
        self, data: PerturbationData, train_mask: np.ndarray, n_response_components: int
    ) -> RetrievalMemory:
        """The memory of the ``train_mask`` cells of ``data``, with the model's options."""
        return memory_from_cells(
            self.memory_kind,
            data,
            train_mask,
            self.encoder,
            n_response_components=n_response_components,
            annotations=self.annotations,
            sep=self.setup.sep,
            evidence=self.evidence,
        )

    def requested(
        self, labels: str | Sequence[str], argument: str = "perturbations"
    ) -> tuple[list[str], np.ndarray]:
        """Labels a user asks for, as written and in canonical form (:func:`normalise_labels`).

        Raises
        ------
        ValueError
            Naming ``argument``: it is empty, holds the control label (or a blank one), asks
            for one perturbation twice (as written or after normalisation), or a label has no
            gene embedding.
        """
        asked = [labels] if isinstance(labels, str) else [str(p) for p in labels]
        if not asked:
            raise ValueError(f"`{argument}` is empty.")
        control = self.setup.control_group
        canonical = normalise_labels(asked, control_group=control, sep=self.setup.sep)
        if np.any((canonical == control) | (canonical == "")):
            raise ValueError(
                f"`{argument}` holds the control label {control!r} (or a blank label); "
                "ask for genes."
            )
        index = pd.Index(canonical)
        if index.has_duplicates:
            twice = index[index.duplicated()].unique()[:5].tolist()
            raise ValueError(
                f"`{argument}` asks for the same perturbation twice (as written or after "
                f"normalisation): {twice}."
            )
        self.encoder.check(canonical, context=" requested")
        return asked, canonical
