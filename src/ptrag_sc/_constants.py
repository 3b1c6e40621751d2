"""Contracts shared across the package (the ground floor: nothing here imports the package).

Registry keys, obs/uns/layer names written to AnnData, the tensor keys of the batches the data
layer builds and the module reads, the module's output keys, candidate relation codes and the
option literals.
"""

from __future__ import annotations

from typing import Literal, NamedTuple


class _RegistryKeys(NamedTuple):
    X_KEY: str = "X"
    PERTURBATION_KEY: str = "perturbation"
    CELL_TYPE_KEY: str = "cell_type"
    BATCH_KEY: str = "batch"


REGISTRY_KEYS = _RegistryKeys()

DEFAULT_PERTURBATION_KEY = "gene"
DEFAULT_CONTROL_GROUP = "non-targeting"
DEFAULT_CELL_TYPE_KEY = "cell_line"
DEFAULT_PERTURBATION_SEP = "+"

#: Default layer written by ``PTRAG.predict`` and read by ``ptrag_sc.tl.evaluate``.
DEFAULT_PRED_LAYER = "ptrag"

#: obs columns written by generation-mode ``PTRAG.predict``.
OBS_SOURCE_CELL = "ptrag_source_cell"
OBS_UNSEEN_PERTURBATION = "ptrag_unseen_perturbation"
OBS_UNSEEN_CELL_TYPE = "ptrag_unseen_cell_type"
OBS_RETRIEVAL_DISTANCE = "ptrag_retrieval_distance"
#: Suffix of the obs column holding a prediction's confidence (``"<key_added>_confidence"``).
CONFIDENCE_SUFFIX = "_confidence"

#: uns key holding prediction settings.
UNS_KEY = "ptrag"


class TENSORS:
    """Keys of the batch dictionaries the data layer builds and
    :class:`~ptrag_sc.module.PTRAGModule` reads.

    One batch holds ``B`` sets of ``S`` cells; ``G`` genes, ``D`` embedding dimensions, ``K``
    stage-1 candidates.
    """

    X_CTRL = "x_ctrl"  #: ``[B, S, G]`` control cells, one per generated cell
    X_PERT = "x_pert"  #: ``[B, S, G]`` observed perturbed cells (training and validation)
    PERT_EMBEDDING = "pert_embedding"  #: ``[B, D]`` gene embedding of each set's perturbation
    CANDIDATES = "candidates"  #: ``[B, K]`` memory entries from stage 1, ``-1`` = padding
    CANDIDATE_SAME_CELL_TYPE = "candidate_same_cell_type"  #: ``[B, K]`` bool
    CANDIDATE_RELATION = "candidate_relation"  #: ``[B, K]`` relation code (``RELATION_*``)
    # : ``[B, G]`` mean response of the cell type's *other* perturbations
    CONTEXT_RESPONSE = "context_response"
    # : ``[B, G]`` the stacked evidence's estimate of the perturbation-specific shift
    STACKED_SHIFT = "stacked_shift"
    CANDIDATE_SIMILARITY = "candidate_similarity"  #: ``[B, K]`` stage-1 similarity (0 for padding)
    # : ``[B, K]`` annotation Jaccard
    CANDIDATE_ANNOTATION_SIMILARITY = "candidate_annotation_similarity"
    CONTROL_MEAN = "control_mean"  #: ``[B, G]`` mean control profile of each set's context
    # : ``[B, G]`` the group's observed mean shift (all its cells), training and validation
    TARGET_SHIFT = "target_shift"
    BATCH = "batch"  #: ``[B]`` batch code, ``-1`` = unknown
    # : ``[B]`` weight of each set in the logged metrics (absent: 1; 0 pads data-parallel
    # validation)
    METRIC_WEIGHT = "metric_weight"


class OUTPUTS:
    """Keys of the module's inference and generative outputs."""

    PREDICTION = "prediction"  #: ``[B, S, G]`` generated cells
    DELTA = "delta"  #: ``[B, G]`` mean shift from the evidence (response memories), else absent
    MEAN_SHIFT = "mean_shift"  #: ``[B, G]`` the generated set's mean minus the control mean
    KEEP = "keep"  #: ``[B, S, K]`` stage-2 decisions (0/1)
    KEEP_PROBABILITY = "keep_probability"  #: ``[B, S, K]``
    ATTENTION = "attention"  #: ``[B, S, K]`` vanilla RAG weights
    SET_WEIGHTS = "set_weights"  #: ``[B, K]`` each candidate's weight in the retrieved shift
    VALID = "valid"  #: ``[B, K]`` bool, False for padding


#: How a candidate relates to its query.
RELATION_OTHER, RELATION_SAME_PERTURBATION, RELATION_MEMBER = 0, 1, 2
N_RELATIONS = 3

Retrieval = Literal["ptrag", "vanilla", "none"]
MemoryKind = Literal["response", "embedding"]
ContextMode = Literal["add", "replace"]
Backbone = Literal["pooled", "full"]
LossKind = Literal["energy", "sinkhorn"]
IndexBackend = Literal["auto", "exact", "faiss"]

RETRIEVALS: tuple[str, ...] = ("ptrag", "vanilla", "none")
MEMORY_KINDS: tuple[str, ...] = ("response", "embedding")
CONTEXT_MODES: tuple[str, ...] = ("add", "replace")
BACKBONES: tuple[str, ...] = ("pooled", "full")
LOSSES: tuple[str, ...] = ("energy", "sinkhorn")
INDEX_BACKENDS: tuple[str, ...] = ("auto", "exact", "faiss")
