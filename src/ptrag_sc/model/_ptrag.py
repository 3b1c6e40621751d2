"""The user-facing PT-RAG model class."""

from __future__ import annotations

import logging
import math
import warnings
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS as SCVI_KEYS
from scvi import settings as scvi_settings
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField
from scvi.model.base import BaseModelClass
from scvi.train import TrainRunner
from scvi.utils import setup_anndata_dsp

from .._constants import (
    DEFAULT_CELL_TYPE_KEY,
    DEFAULT_CONTROL_GROUP,
    DEFAULT_PERTURBATION_KEY,
    DEFAULT_PERTURBATION_SEP,
    DEFAULT_PRED_LAYER,
    OBS_RETRIEVAL_DISTANCE,
    OBS_SOURCE_CELL,
    OBS_UNSEEN_CELL_TYPE,
    OBS_UNSEEN_PERTURBATION,
    REGISTRY_KEYS,
    UNS_KEY,
)
from .._settings import settings
from .._utils import flush_denormal, quiet_lightning
from ..data._fields import PerturbationField
from ..data._memory import (
    NeighbourIndex,
    RetrievalMemory,
    build_memory,
    context_responses,
    group_means,
)
from ..data._pairing import match_controls
from ..data._perturbations import PerturbationEncoder
from ..data._sets import ExpressionMatrix, SetDataModule, SetGroups, index_groups, make_batch
from ..module._module import TENSORS, PTRAGModule
from ..train import KeepBestWeights, PTRAGTrainingPlan
from ._mudata import MuDataMixin
from ._validation import (
    check_controls_per_cell_type,
    check_expression,
    check_obs_key,
    check_same_genes,
    expression_matrix,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

logger = logging.getLogger(__name__)

_NOT_TRAINED = "Model not trained. Call `model.train()` first."
#: Name of the context entry (the cell type's mean response) in :meth:`PTRAG.get_retrieval`.
CONTEXT_CANDIDATE = "<context mean>"
_NO_CELL_TYPE = "all"


class PTRAG(MuDataMixin, BaseModelClass):
    """Perturbation-aware two-stage retrieval-augmented generation (PT-RAG).

    A STATE-style set-to-set model: a set of control cells of one cell type and the gene
    embedding of a perturbation are mapped to a set of perturbed cells, trained with an energy
    distance between predicted and observed sets. Before generation a two-stage retriever adds
    context: stage 1 takes the ``n_candidates`` training perturbations closest to the query in
    the gene-embedding space; stage 2 decides, for each cell and candidate, with a hard
    Gumbel-Softmax over a learned score, which candidates to keep (with a sparsity penalty).
    Everything is trained end to end.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`. ``None`` together with ``registry`` when
        loading a saved model without data.
    registry
        Registry of a saved model (used by :meth:`load`).
    perturbation_embeddings
        Gene embeddings: a :class:`~pandas.DataFrame` indexed by gene symbol, one row per gene
        (e.g. GenePT; see :func:`ptrag_sc.pp.read_gene_embeddings`). Combination labels
        ``"A+B"`` are embedded as the sum of their genes' rows unless the table has a row for
        the combination itself. Every perturbation of ``adata`` must be embeddable.
    n_hidden
        Hidden width ``H``.
    n_layers
        Transformer layers.
    n_heads
        Attention heads.
    cell_set_size
        Cells per set ``S`` during training; at prediction, groups are cut into sets of at most
        this size.
    retrieval
        ``"ptrag"`` (two-stage selection), ``"vanilla"`` (cross-attention over the stage-1
        candidates) or ``"none"`` (STATE with gene embeddings). All share one code path.
    memory
        ``"response"``: memory entries are training (perturbation, cell type) pairs carrying
        their measured mean shift, so the same perturbation measured in other cell types is
        retrievable evidence, and the kept candidates' shifts enter the prediction directly.
        ``"embedding"``: entries are training perturbations carrying only their gene embedding
        (the paper).
    n_candidates
        Stage-1 candidates per query ``K``.
    sparsity_weight
        Weight of the mean keep rate in the loss (PT-RAG).
    gumbel_tau
        Gumbel-Softmax temperature.
    context_mode
        ``"add"``: the retrieved context is added to the cell and perturbation encodings;
        ``"replace"``: it replaces them (the paper's behaviour).
    loss
        ``"energy"`` (energy distance; geomloss convention) or ``"sinkhorn"`` (debiased
        Sinkhorn divergence through geomloss, blur 0.05).
    backbone
        ``"pooled"``: deep layers run over pooled set tokens, about one transformer layer of
        work per cell; ``"full"``: STATE's self-attention over all cells in every layer.
    n_set_tokens
        Pooled tokens per set (``backbone="pooled"``).
    decoder_rank
        Rank of the per-cell part of the decoder (``None``: full rank per cell, as STATE).
    n_scorer_hidden
        Hidden width of the stage-2 scorer (``None``: ``n_hidden``, as the paper).
    dropout
        Dropout rate.
    match_batch
        With a ``batch_key``, pair perturbed cells with control cells of the same batch.
    index_backend
        Stage-1 search: ``"exact"``, ``"faiss"`` or ``"auto"`` (faiss for memories larger than
        100,000 entries when installed).
    learned_shift
        Let the network add a learned mean shift per set on top of the retrieved one (with
        ``decoder_rank`` set). By default (``None``), with a response memory each set's mean
        moves exactly by the retrieved shift and the network shapes the cells around it (in our
        benchmarks a learned shift fitted the training cell types and transferred worse to
        held-out ones); without one, the shift is learned.

    Examples
    --------
    >>> import ptrag_sc
    >>> ptrag_sc.settings.progress_bar = False
    >>> adata = ptrag_sc.datasets.perturbench_devel()
    >>> ptrag_sc.pp.few_shot_split(adata, held_out="U87MG", val=["PLK4"], test=["MAPK1", "SGK1"])
    >>> ptrag_sc.PTRAG.setup_anndata(adata, perturbation_key="gene", cell_type_key="cell_line")
    >>> model = ptrag_sc.PTRAG(adata, perturbation_embeddings=adata.uns["gene_embeddings"])
    >>> model.train(max_steps=20, split_key="split")  # a real run trains for thousands of steps
    >>> model.predict(adata)  # counterfactual: writes adata.layers["ptrag"]
    >>> adata.layers["ptrag"].shape == adata.shape
    True
    >>> controls = adata[(adata.obs["gene"] == "non-targeting") & (adata.obs["cell_line"] == "U87MG")]
    >>> generated = model.predict(controls, perturbations=["MAPK1", "MAPK1+SGK1"])  # generation
    >>> generated.n_obs == 2 * controls.n_obs
    True
    >>> table = model.get_retrieval(["MAPK1"], cell_type="U87MG")
    >>> first = table.iloc[0]
    >>> first["candidate"], first["candidate_cell_type"], round(float(first["similarity"]), 3)
    ('MAPK1', 'A172', 1.0)

    Notes
    -----
    Fields written to a registered AnnData: ``obs["_scvi_labels"]``, ``obs["_scvi_batch"]``,
    ``uns["_scvi_uuid"]`` and ``uns["_scvi_manager_uuid"]`` (scvi-tools registration), and
    ``layers[key_added]`` by :meth:`predict`.
    """

    _module_cls = PTRAGModule
    _training_plan_cls = PTRAGTrainingPlan
    _train_runner_cls = TrainRunner

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        *,
        perturbation_embeddings: pd.DataFrame,
        n_hidden: int = 128,
        n_layers: int = 4,
        n_heads: int = 8,
        cell_set_size: int = 64,
        retrieval: Literal["ptrag", "vanilla", "none"] = "ptrag",
        memory: Literal["response", "embedding"] = "response",
        n_candidates: int = 32,
        sparsity_weight: float = 0.1,
        gumbel_tau: float = 0.5,
        context_mode: Literal["add", "replace"] = "add",
        loss: Literal["energy", "sinkhorn"] = "energy",
        backbone: Literal["pooled", "full"] = "pooled",
        n_set_tokens: int = 4,
        decoder_rank: int | None = 32,
        n_scorer_hidden: int | None = 32,
        dropout: float = 0.0,
        match_batch: bool = True,
        index_backend: Literal["auto", "exact", "faiss"] = "auto",
        learned_shift: bool | None = None,
    ) -> None:
        adata = self._resolve_adata(adata)
        super().__init__(adata, registry)
        _check_choice("retrieval", retrieval, ("ptrag", "vanilla", "none"))
        _check_choice("memory", memory, ("response", "embedding"))
        _check_choice("context_mode", context_mode, ("add", "replace"))
        _check_choice("loss", loss, ("energy", "sinkhorn"))
        _check_choice("backbone", backbone, ("pooled", "full"))
        _check_choice("index_backend", index_backend, ("auto", "exact", "faiss"))
        if cell_set_size < 2:
            raise ValueError(f"`cell_set_size` must be at least 2, got {cell_set_size}.")
        if n_candidates < 1:
            raise ValueError(f"`n_candidates` must be at least 1, got {n_candidates}.")

        pert_state = self._field_state(REGISTRY_KEYS.PERTURBATION_KEY)
        self._encoder = PerturbationEncoder(perturbation_embeddings, sep=pert_state["sep"])
        if adata is not None:
            self._encoder.check(pert_state["perturbations"], context=" in the registered AnnData")

        self.cell_set_size = cell_set_size
        self.n_candidates = n_candidates
        self.match_batch = match_batch
        self.index_backend = index_backend
        self.retrieval = retrieval
        self.memory_kind = memory
        self.module = self._module_cls(
            self.summary_stats.n_vars,
            self._encoder.n_dims,
            n_hidden=n_hidden,
            n_layers=n_layers,
            n_heads=n_heads,
            backbone=backbone,
            n_set_tokens=n_set_tokens,
            retrieval=retrieval,
            memory=memory,
            context_mode=context_mode,
            n_batch=self.summary_stats.n_batch if self._batch_key is not None else 0,
            gumbel_tau=gumbel_tau,
            n_scorer_hidden=n_scorer_hidden,
            decoder_rank=decoder_rank,
            sparsity_weight=sparsity_weight,
            dropout=dropout,
            loss=loss,
            learned_shift=learned_shift,
        )
        self._memory_state: dict | None = None
        self._index: NeighbourIndex | None = None
        self.training_perturbations_: np.ndarray | None = None
        self.best_epoch_: int | None = None
        self.training_cell_types_: np.ndarray | None = None
        self._model_summary_string = (
            f"PTRAG model: retrieval={retrieval!r}, memory={memory!r}, backbone={backbone!r}, "
            f"n_hidden={n_hidden}, n_layers={n_layers}, cell_set_size={cell_set_size}, "
            f"n_candidates={n_candidates}, context_mode={context_mode!r}, "
            f"embedding dims={self._encoder.n_dims}, genes={self.summary_stats.n_vars}."
        )
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------ setup
    @classmethod
    @setup_anndata_dsp.dedent
    def setup_anndata(
        cls,
        adata: AnnData,
        *,
        perturbation_key: str = DEFAULT_PERTURBATION_KEY,
        control_group: str = DEFAULT_CONTROL_GROUP,
        cell_type_key: str | None = DEFAULT_CELL_TYPE_KEY,
        batch_key: str | None = None,
        layer: str | None = None,
        perturbation_sep: str = DEFAULT_PERTURBATION_SEP,
        **kwargs,
    ) -> None:
        """Register an AnnData for :class:`PTRAG`.

        Parameters
        ----------
        %(param_adata)s
        perturbation_key
            obs column with perturbation labels (e.g. ``"gene"``). Labels are gene symbols;
            combinations are written ``"A+B"`` (see ``perturbation_sep``).
        control_group
            Label of control cells in ``perturbation_key`` (e.g. ``"non-targeting"``).
        cell_type_key
            obs column with the cell type / cell line. ``None``: all cells share one type.
        %(param_batch_key)s
        %(param_layer)s Must hold non-negative log-normalised expression.
        perturbation_sep
            Separator of combination labels.

        Raises
        ------
        KeyError
            If an obs column or the layer does not exist (the error lists those that do).
        ValueError
            If there are no control cells (overall or for a cell type with perturbed cells),
            or the expression holds NaN, infinite or negative values.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        check_obs_key(adata, perturbation_key, "perturbation_key")
        check_obs_key(adata, cell_type_key, "cell_type_key")
        check_obs_key(adata, batch_key, "batch_key")
        X = expression_matrix(adata, layer)
        check_expression(X, where="`adata.X`" if layer is None else f"`adata.layers[{layer!r}]`")
        fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=False),
            PerturbationField(
                REGISTRY_KEYS.PERTURBATION_KEY, perturbation_key, control_group=control_group, sep=perturbation_sep
            ),
            CategoricalObsField(SCVI_KEYS.LABELS_KEY, cell_type_key),
            CategoricalObsField(SCVI_KEYS.BATCH_KEY, batch_key),
        ]
        # Fail before anything is written into the user's AnnData.
        fields[1].validate_field(adata)
        if kwargs.get("source_registry") is None:
            labels = adata.obs[perturbation_key].astype(str).to_numpy()
            cell_types = (
                adata.obs[cell_type_key].astype(str).to_numpy()
                if cell_type_key is not None
                else np.full(adata.n_obs, _NO_CELL_TYPE)
            )
            check_controls_per_cell_type(labels == control_group, cell_types, where="the AnnData")
        adata_manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    # ------------------------------------------------------------- properties
    def _setup_args(self) -> dict:
        return self.registry_["setup_args"]

    def _field_state(self, key: str) -> dict:
        return self.registry_["field_registries"][key]["state_registry"]

    @property
    def _perturbation_key(self) -> str:
        return self._setup_args()["perturbation_key"]

    @property
    def _cell_type_key(self) -> str | None:
        return self._setup_args()["cell_type_key"]

    @property
    def _batch_key(self) -> str | None:
        return self._setup_args()["batch_key"]

    @property
    def _layer(self) -> str | None:
        return self._setup_args()["layer"]

    @property
    def control_group(self) -> str:
        """Label of control cells."""
        return self._setup_args()["control_group"]

    @property
    def var_names(self) -> pd.Index:
        """Genes the model predicts, in order."""
        return pd.Index(self.get_var_names())

    @property
    def perturbation_embeddings(self) -> pd.DataFrame:
        """The validated gene-embedding table (upper-case symbols, float32)."""
        return self._encoder.table

    @property
    def memory(self) -> RetrievalMemory | None:
        """The retrieval memory built from training cells (``None`` before training)."""
        return None if self._memory_state is None else RetrievalMemory.from_dict(self._memory_state)

    @property
    def memory_(self) -> dict | None:
        # Saved with the model (attributes ending in "_" are); setting it installs the memory.
        return self._memory_state

    @memory_.setter
    def memory_(self, state: dict | None) -> None:
        self._memory_state = state
        self._index = None
        if state is not None:
            memory = RetrievalMemory.from_dict(state)
            self.module.set_memory(memory.embeddings, memory.responses, memory.response_codes, memory.response_basis)

    def _neighbour_index(self) -> NeighbourIndex:
        if self._index is None:
            self._index = NeighbourIndex(
                self.memory, n_candidates=self.n_candidates, backend=self.index_backend, sep=self._encoder.sep
            )
        return self._index

    # ----------------------------------------------------------- obs readers
    def _labels(self, adata: AnnData) -> np.ndarray:
        check_obs_key(adata, self._perturbation_key, "perturbation_key")
        return adata.obs[self._perturbation_key].astype(str).to_numpy()

    def _cell_types(self, adata: AnnData) -> np.ndarray:
        key = self._cell_type_key
        if key is None:
            return np.full(adata.n_obs, _NO_CELL_TYPE, dtype=object)
        check_obs_key(adata, key, "cell_type_key")
        return adata.obs[key].astype(str).to_numpy().astype(object)

    def _batch_codes(self, adata: AnnData) -> np.ndarray:
        """Training batch code of each cell (``-1`` for batches unseen in training or none)."""
        key = self._batch_key
        if key is None or key not in adata.obs.columns:
            return np.full(adata.n_obs, -1, dtype=np.int64)
        mapping = pd.Index(self._field_state(SCVI_KEYS.BATCH_KEY)["categorical_mapping"].astype(str))
        return mapping.get_indexer(adata.obs[key].astype(str).to_numpy()).astype(np.int64)

    # ---------------------------------------------------------------- training
    def _split(self, split_key, train_size, validation_size, labels, is_control, seed):
        adata = self.adata
        n = adata.n_obs
        if split_key is not None:
            check_obs_key(adata, split_key, "split_key")
            split = adata.obs[split_key].astype(str).str.lower().to_numpy()
            known = {"train", "val", "validation", "test"}
            unknown = sorted(set(np.unique(split)) - known)
            if unknown:
                raise ValueError(
                    f"`adata.obs[{split_key!r}]` holds values {unknown[:5]}; expected 'train', "
                    "'val' (or 'validation') and 'test'."
                )
            train = split == "train"
            val = np.isin(split, ["val", "validation"])
            test = split == "test"
        else:
            if not 0 < train_size <= 1:
                raise ValueError(f"`train_size` must be in (0, 1], got {train_size}.")
            validation_size = 1 - train_size if validation_size is None else validation_size
            if validation_size < 0 or train_size + validation_size > 1 + 1e-9:
                raise ValueError("`train_size + validation_size` must be at most 1.")
            rng = np.random.default_rng(seed)
            u = rng.random(n)
            train = is_control | (u < train_size)
            val = ~is_control & (u >= train_size) & (u < train_size + validation_size)
            test = ~(train | val)
        if not (train & ~is_control).any():
            raise ValueError("The training split holds no perturbed cells.")
        return train, val, test

    def _groups(
        self,
        *,
        member: np.ndarray,
        labels: np.ndarray,
        cell_types: np.ndarray,
        batches: np.ndarray,
        control_mask: np.ndarray,
        control_means: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    ) -> SetGroups:
        """Groups of ``member`` rows by (cell type, perturbation[, batch]).

        Control pools are built from the ``control_mask`` rows of the same cell type (and
        batch), and every group gets its stage-1 candidates, computed once per group.
        ``control_means`` is ``(context keys, (n, G) means, context key of each row)`` from
        :meth:`_control_means`: the mean of the controls each group's cells are generated
        from (response memories only).
        """
        use_batch = self._batch_key is not None and self.match_batch
        ct_codes, _ = pd.factorize(cell_types, sort=True)
        pert_codes, _ = pd.factorize(labels, sort=True)
        batch_key = batches if use_batch else np.zeros_like(batches)
        cells, start, first = index_groups([ct_codes, pert_codes, batch_key], member)
        # Control pools per (cell type, batch), falling back to the cell type when a batch has none.
        pool_cells, pool_start, pool_first = index_groups([ct_codes, batch_key], control_mask)
        pool_key = {(ct_codes[i], batch_key[i]): p for p, i in enumerate(pool_first)}
        ct_pool_cells, ct_pool_start, ct_pool_first = index_groups([ct_codes], control_mask)
        ct_pool = {ct_codes[i]: p for p, i in enumerate(ct_pool_first)}
        group_pool = np.empty(first.shape[0], dtype=np.int64)
        fallback = 0
        for g, i in enumerate(first):
            p = pool_key.get((ct_codes[i], batch_key[i]))
            if p is None:
                fallback += 1
                p = len(pool_first) + ct_pool[ct_codes[i]]
            group_pool[g] = p
        if fallback and use_batch:
            warnings.warn(
                f"{fallback} group(s) have no control cells in their own batch; their controls "
                "come from the whole cell type.",
                UserWarning,
                stacklevel=3,
            )
        pool = np.concatenate([pool_cells, ct_pool_cells])
        pool_starts = np.concatenate([pool_start[:-1], ct_pool_start + pool_start[-1]])
        group_labels = labels[first].astype(str)
        group_cts = cell_types[first].astype(str)
        embedding = self._encoder.embed(group_labels) if len(first) else np.zeros((0, self._encoder.n_dims), np.float32)
        context = context_valid = None
        if self.retrieval != "none" and len(first):
            candidates, _, same, relation = self._neighbour_index().query(group_labels, embedding, group_cts)
            if self.memory_kind == "response":
                context, context_valid = context_responses(self.memory, group_labels, group_cts)
        else:
            candidates = np.full((len(first), self.n_candidates), -1, dtype=np.int64)
            same = np.zeros_like(candidates, dtype=bool)
            relation = np.zeros_like(candidates)
        return SetGroups(
            cells=cells,
            cell_start=start,
            pool=pool,
            pool_start=pool_starts,
            group_pool=group_pool,
            perturbation=group_labels,
            cell_type=group_cts,
            embedding=embedding,
            candidates=candidates,
            candidate_same_cell_type=same,
            candidate_relation=relation,
            batch=batches[first].astype(np.int64),
            context_response=context,
            context_valid=context_valid,
            control_mean_table=None if control_means is None else control_means[1],
            control_mean_index=None if control_means is None else pd.Index(control_means[0]).get_indexer(control_means[2][first]),
        )

    def _control_means(
        self, X, cell_types: np.ndarray, mask: np.ndarray, batches: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Mean of the controls each cell is generated from, for applying retrieved shifts.

        The context of a cell is its cell type, or (cell type, batch) when matching on batch and
        that batch has control cells, as for the control pools. Returns the context keys, their
        mean control profiles and every row's key (``None`` unless the memory has responses).
        """
        if self.retrieval == "none" or self.memory_kind != "response":
            return None
        keys = np.asarray(cell_types, dtype=object).astype(str)
        if batches is not None and self._batch_key is not None and self.match_batch:
            with_batch = np.char.add(np.char.add(keys, "|"), np.asarray(batches).astype(str))
            has_controls = np.isin(with_batch, np.unique(with_batch[mask]))
            keys = np.where(has_controls, with_batch, keys)
        codes, uniques = pd.factorize(np.where(mask, keys, None), sort=True)
        return np.asarray(uniques, dtype=object), group_means(X, codes, len(uniques)).astype(np.float32), keys

    def train(
        self,
        max_epochs: int | None = None,
        max_steps: int | None = None,
        *,
        batch_size: int = 16,
        split_key: str | None = None,
        train_size: float = 0.9,
        validation_size: float | None = None,
        early_stopping: bool = False,
        keep_best: bool = True,
        check_val_every_n_epoch: int | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        plan_kwargs: dict | None = None,
        **trainer_kwargs,
    ):
        """Train the model on sets of cells.

        Each step draws ``batch_size`` sets of ``cell_set_size`` perturbed cells sharing
        (cell type, perturbation[, batch]), each cell paired with a control cell of the same
        cell type (and batch). Before training, the retrieval memory is built from the training
        cells only and the stage-1 candidates of every group are computed once.

        Parameters
        ----------
        max_epochs
            Passes over the training groups (a group of ``n`` cells yields ``ceil(n / S)``
            sets per epoch).
        max_steps
            Optimisation steps; takes precedence over ``max_epochs``. With neither, 2,000 steps.
        batch_size
            Sets per step.
        split_key
            obs column whose values ``"train"``, ``"val"``/``"validation"`` and ``"test"``
            decide the split (e.g. from :func:`ptrag_sc.pp.few_shot_split`). Control cells are
            inputs in every split; only training cells enter the memory and the loss.
        train_size
            Without ``split_key``: fraction of each group's perturbed cells used for training.
        validation_size
            Without ``split_key``: fraction used for validation (default: the rest).
        early_stopping
            Stop when ``validation_energy`` stops improving (see scvi-tools'
            ``early_stopping_patience`` and related trainer arguments).
        keep_best
            With a validation split, restore at the end the weights of the validation with the
            lowest ``validation_energy`` (kept in memory; ``model.best_epoch_`` records when).
            Small few-shot splits overfit quickly, so this is on by default.
        check_val_every_n_epoch
            Validation frequency; default: about 20 validations per run.
        accelerator, devices
            Lightning device arguments. Multi-GPU: ``accelerator="gpu", devices=-1,
            strategy="ddp_find_unused_parameters_true"`` (each rank takes its share of the
            sets).
        plan_kwargs
            Passed to :class:`~ptrag_sc.train.PTRAGTrainingPlan` (``lr``, ``weight_decay``...).
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` (e.g. ``enable_progress_bar``,
            ``gradient_clip_val``; default clip 10).

        Returns
        -------
        None. ``model.history`` holds ``train_loss``, ``train_energy``, ``validation_energy``
        and, for PT-RAG, ``train_active_ratio``.
        """
        adata = self.adata
        if adata is None:
            raise ValueError("This model has no AnnData attached: load it with `PTRAG.load(dir, adata=...)` to train.")
        # scvi-tools leaves the seed unset (None) until a user sets one: then sampling is random.
        seed = int(scvi_settings.seed) if scvi_settings.seed is not None else int(np.random.default_rng().integers(2**31))
        X = self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        labels = self._labels(adata)
        is_control = labels == self.control_group
        cell_types = self._cell_types(adata)
        batches = self._batch_codes(adata)
        train, val, test = self._split(split_key, train_size, validation_size, labels, is_control, seed)

        self.training_perturbations_ = np.unique(labels[train & ~is_control]).astype(object)
        self.training_cell_types_ = np.unique(cell_types[train & ~is_control]).astype(object)
        if self.retrieval != "none":
            memory = build_memory(
                self.memory_kind,
                X=X,
                perturbations=labels,
                cell_types=cell_types,
                is_control=is_control,
                train_mask=train,
                encoder=self._encoder,
                n_response_components=self.module.n_response_components,
            )
            self.memory_ = memory.to_dict()

        common = {
            "labels": labels,
            "cell_types": cell_types,
            "batches": batches,
            "control_mask": is_control,
            "control_means": self._control_means(X, cell_types, is_control, batches),
        }
        train_groups = self._groups(member=train & ~is_control, **common)
        val_groups = self._groups(member=val & ~is_control, **common) if (val & ~is_control).any() else None
        datamodule = SetDataModule(
            ExpressionMatrix(X),
            train_groups,
            val_groups,
            train_idx=np.flatnonzero(train),
            val_idx=np.flatnonzero(val),
            test_idx=np.flatnonzero(test),
            set_size=self.cell_set_size,
            batch_size=batch_size,
            seed=seed,
        )
        steps_per_epoch = max(1, len(datamodule.train_dataloader()))
        if max_steps is None and max_epochs is None:
            max_steps = 2000
        if max_steps is not None:
            max_epochs = math.ceil(max_steps / steps_per_epoch)
            trainer_kwargs["max_steps"] = max_steps
        if check_val_every_n_epoch is None and not early_stopping:
            check_val_every_n_epoch = max(1, max_epochs // 20)
        if val_groups is None:
            check_val_every_n_epoch = None
            trainer_kwargs.setdefault("limit_val_batches", 0)
        elif early_stopping:
            trainer_kwargs.setdefault("early_stopping_monitor", "validation_energy")
        trainer_kwargs.setdefault("gradient_clip_val", 10.0)
        trainer_kwargs.setdefault("enable_progress_bar", settings.progress_bar)
        trainer_kwargs["use_distributed_sampler"] = False
        keeper = None
        if keep_best and val_groups is not None:
            keeper = KeepBestWeights("validation_energy")
            trainer_kwargs["callbacks"] = [*trainer_kwargs.get("callbacks", []), keeper]
        plan_kwargs = dict(plan_kwargs or {})
        training_plan = self._training_plan_cls(self.module, **plan_kwargs)
        with flush_denormal(), quiet_lightning(not trainer_kwargs["enable_progress_bar"]):
            runner = self._train_runner_cls(
                self,
                training_plan=training_plan,
                data_splitter=datamodule,
                max_epochs=max_epochs,
                accelerator=accelerator,
                devices=devices,
                early_stopping=early_stopping,
                check_val_every_n_epoch=check_val_every_n_epoch,
                **trainer_kwargs,
            )
            runner()
        self.best_epoch_ = None if keeper is None else keeper.best_epoch

    # -------------------------------------------------------------- generation
    def _require_trained(self) -> None:
        if not self.is_trained_:
            raise RuntimeError(_NOT_TRAINED)

    @torch.inference_mode()
    def _generate(
        self,
        expression: ExpressionMatrix,
        control_rows: np.ndarray,
        labels: np.ndarray,
        cell_types: np.ndarray,
        batches: np.ndarray,
        *,
        control_means: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
        batch_size: int,
        sample_retrieval: bool,
        seed: int | None,
        progress: bool,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Predict one cell per row from its control row under its perturbation.

        Rows sharing (cell type, perturbation[, batch]) are cut into near-equal sets of at most
        ``cell_set_size``; sets of equal size are batched together.

        Returns the predictions ``(n, G)`` and the retrieval distance of each row.
        """
        n = control_rows.shape[0]
        all_rows = np.ones(n, dtype=bool)
        groups = self._groups(
            member=all_rows,
            labels=labels,
            cell_types=cell_types,
            batches=batches,
            control_mask=all_rows,
            control_means=control_means,
        )
        similarity = None
        if self.retrieval != "none":
            _, similarity, _, _ = self._neighbour_index().query(groups.perturbation, groups.embedding, groups.cell_type)
        sizes = groups.sizes
        n_sets = -(-sizes // self.cell_set_size)
        # Near-equal chunks: set j of group g holds rows [g_start + b_j, g_start + b_{j+1}).
        set_group = np.repeat(np.arange(len(groups)), n_sets)
        set_rank = np.arange(set_group.shape[0]) - np.repeat(np.cumsum(n_sets) - n_sets, n_sets)
        lo = groups.cell_start[set_group] + (set_rank * sizes[set_group]) // n_sets[set_group]
        hi = groups.cell_start[set_group] + ((set_rank + 1) * sizes[set_group]) // n_sets[set_group]
        set_len = hi - lo

        out = np.empty((n, expression.shape[1]), dtype=np.float32)
        distance = np.full(n, np.nan, dtype=np.float32)
        module = self.module
        module.eval()
        device = next(module.parameters()).device
        generator_state = None
        if sample_retrieval:
            generator_state = torch.random.get_rng_state()
            torch.manual_seed(0 if seed is None else seed)
        work = [(size, np.flatnonzero(set_len == size)) for size in np.unique(set_len)]
        n_batches = sum(-(-len(idx) // batch_size) for _, idx in work)
        bar = _progress(n_batches, "Predicting", progress)
        try:
            with flush_denormal():
                for size, set_ids in work:
                    for b in range(0, len(set_ids), batch_size):
                        chosen = set_ids[b : b + batch_size]
                        rows = lo[chosen][:, None] + np.arange(size)[None, :]  # positions in groups.cells
                        out_rows = groups.cells[rows]
                        batch = make_batch(expression, groups, set_group[chosen], control_rows[out_rows])
                        batch = {k: v.to(device) for k, v in batch.items()}
                        inference = module.inference(**module._get_inference_input(batch), sample_retrieval=sample_retrieval)
                        generated = module.generative(**module._get_generative_input(batch, inference))
                        out[out_rows.ravel()] = generated["prediction"].reshape(-1, out.shape[1]).cpu().numpy()
                        if similarity is not None:
                            weights = _evidence_weights(inference, similarity.shape[1]).cpu().numpy()  # [B,S,K]
                            sims = np.nan_to_num(similarity[set_group[chosen]], nan=0.0)[:, None, :]
                            distance[out_rows.ravel()] = (weights * (1.0 - sims)).sum(-1).ravel()
                        bar.update(1)
        finally:
            bar.close()
            if generator_state is not None:
                torch.random.set_rng_state(generator_state)
        return out, distance

    def predict(
        self,
        adata: AnnData | None = None,
        perturbations: Sequence[str] | None = None,
        *,
        cell_type: str | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        key_added: str = DEFAULT_PRED_LAYER,
        inplace: bool = True,
        sample_retrieval: bool = False,
        seed: int | None = None,
    ) -> AnnData | np.ndarray | None:
        """Predict perturbed cells, in one of two modes.

        **Counterfactual** (``perturbations=None``): every perturbed cell of ``adata`` (or of
        ``indices``) is generated from a control cell of its own cell type (and batch) in
        ``adata`` under its own perturbation; the result goes to ``adata.layers[key_added]``
        (same cells and genes as ``adata``; control cells keep their own values).

        **Generation** (``perturbations=[...]``): ``adata`` holds control cells (all its cells
        when it has no perturbation column, else those labelled ``control_group``); a new
        AnnData is returned with one copy of these cells per requested perturbation. Any gene
        (or combination of genes) with an embedding can be asked for, measured or not.

        Parameters
        ----------
        adata
            AnnData with the model's genes in the same order. Default: the training AnnData.
        perturbations
            Perturbation labels to generate (generation mode).
        cell_type
            Generation mode: the cell type of the control cells when ``adata`` has no
            cell-type column, or the one cell type to keep when it has.
        indices
            Counterfactual mode: positions of the cells to predict (default: all).
        batch_size
            Sets per forward pass (default 64).
        key_added
            Layer name (counterfactual) / layer of the returned AnnData (generation).
        inplace
            Counterfactual mode: write the layer (True) or return the array (False).
        sample_retrieval
            Sample the stage-2 selection with Gumbel noise instead of keeping candidates
            with ``p_keep > 0.5``.
        seed
            Seed of the sampled selection (``sample_retrieval=True``).

        Returns
        -------
        Counterfactual mode: ``None`` (``inplace=True``; writes ``adata.layers[key_added]``) or
        an ``(n_obs, n_vars)`` float32 array. Generation mode: a new :class:`~anndata.AnnData`
        with the prediction in ``.X`` and ``.layers[key_added]``; obs: the perturbation and
        cell-type columns, ``ptrag_source_cell`` (obs name of the control cell),
        ``ptrag_unseen_perturbation`` (never measured in training),
        ``ptrag_unseen_cell_type``, ``ptrag_retrieval_distance`` (``1 -`` cosine similarity
        to the retrieved evidence, weighted by the selection; an uncertainty proxy; NaN for
        ``retrieval="none"``); ``uns["ptrag"]`` records the settings.
        """
        adata = self._resolve_adata(adata)
        self._require_trained()
        adata = self.adata if adata is None else adata
        if adata is None:
            raise ValueError("Pass an AnnData: this model was loaded without one.")
        check_same_genes(adata.var_names, self.var_names)
        batch_size = batch_size or 64
        if perturbations is not None:
            if indices is not None:
                raise ValueError("`indices` applies to counterfactual prediction; use it without `perturbations`.")
            return self._predict_generation(adata, perturbations, cell_type, batch_size, key_added, sample_retrieval, seed)
        if cell_type is not None:
            raise ValueError("`cell_type` applies to generation mode (with `perturbations=[...]`).")
        X = expression_matrix(adata, self._layer)
        check_expression(X, where="the AnnData to predict")
        labels = self._labels(adata)
        is_control = labels == self.control_group
        query = ~is_control
        if indices is not None:
            chosen = np.zeros(adata.n_obs, dtype=bool)
            chosen[np.asarray(indices)] = True
            query &= chosen
        cell_types = self._cell_types(adata)
        without_controls = sorted(set(cell_types[query]) - set(cell_types[is_control]))
        if without_controls:
            raise ValueError(
                f"No control cells for cell type(s) {without_controls[:10]} in the AnnData to "
                "predict: each perturbed cell is generated from a control cell of its own cell type."
            )
        self._encoder.check(np.unique(labels[query]), context=" in the AnnData to predict")
        batches = self._batch_codes(adata)
        context = [cell_types]
        if self._batch_key is not None and self.match_batch and self._batch_key in adata.obs.columns:
            context.append(adata.obs[self._batch_key].astype(str).to_numpy())
        try:
            paired = match_controls(is_control, *context, seed=0 if seed is None else seed, query=query)
        except ValueError:
            paired = match_controls(is_control, cell_types, seed=0 if seed is None else seed, query=query)
        rows = np.flatnonzero(query)
        expression = ExpressionMatrix(X)
        predicted, _ = self._generate(
            expression,
            paired[rows],
            labels[rows],
            cell_types[rows],
            batches[rows],
            control_means=_rows_of(self._control_means(X, cell_types, is_control, context[1] if len(context) > 1 else None), rows),
            batch_size=batch_size,
            sample_retrieval=sample_retrieval,
            seed=seed,
            progress=settings.progress_bar and len(rows) > 20_000,
        )
        layer = X.toarray().astype(np.float32) if sp.issparse(X) else np.array(X, dtype=np.float32)
        layer[rows] = predicted
        if not inplace:
            return layer
        adata.layers[key_added] = layer
        return None

    def _predict_generation(self, adata, perturbations, cell_type, batch_size, key_added, sample_retrieval, seed):
        perturbations = [str(p) for p in ([perturbations] if isinstance(perturbations, str) else perturbations)]
        if not perturbations:
            raise ValueError("`perturbations` is empty.")
        self._encoder.check(perturbations, context=" requested")
        X = expression_matrix(adata, self._layer)
        keep = np.ones(adata.n_obs, dtype=bool)
        if self._perturbation_key in adata.obs.columns:
            keep &= adata.obs[self._perturbation_key].astype(str).to_numpy() == self.control_group
        if self._cell_type_key is not None and self._cell_type_key in adata.obs.columns:
            cell_types = adata.obs[self._cell_type_key].astype(str).to_numpy().astype(object)
            if cell_type is not None:
                if cell_type not in set(cell_types):
                    raise ValueError(
                        f"`cell_type={cell_type!r}` does not occur in `adata.obs[{self._cell_type_key!r}]` "
                        f"(values: {sorted(set(cell_types))[:10]})."
                    )
                keep &= cell_types == cell_type
        else:
            cell_types = np.full(adata.n_obs, cell_type or _NO_CELL_TYPE, dtype=object)
        if not keep.any():
            raise ValueError(
                f"No control cells to generate from: no cell of the AnnData is labelled "
                f"{self.control_group!r} in `obs[{self._perturbation_key!r}]`"
                + (f" with cell type {cell_type!r}." if cell_type else ".")
            )
        controls = np.flatnonzero(keep)
        check_expression(X[controls], where="the control cells")
        n_ctrl, n_pert = controls.shape[0], len(perturbations)
        control_rows = np.tile(controls, n_pert)
        labels = np.repeat(np.asarray(perturbations, dtype=object), n_ctrl)
        cts = np.tile(cell_types[controls], n_pert)
        batches = np.tile(self._batch_codes(adata)[controls], n_pert)
        predicted, distance = self._generate(
            ExpressionMatrix(X),
            control_rows,
            labels,
            cts,
            batches,
            control_means=_rows_of(self._control_means(X, cell_types, keep), control_rows),
            batch_size=batch_size,
            sample_retrieval=sample_retrieval,
            seed=seed,
            progress=settings.progress_bar and n_pert > 1,
        )
        pert_key = self._perturbation_key
        ct_key = self._cell_type_key or "cell_type"
        seen = set(self.training_perturbations_.tolist())
        seen_ct = set(self.training_cell_types_.tolist())
        obs = pd.DataFrame(
            {
                pert_key: pd.Categorical(labels, categories=perturbations),
                ct_key: pd.Categorical(cts.astype(str)),
                OBS_SOURCE_CELL: np.asarray(adata.obs_names)[control_rows],
                OBS_UNSEEN_PERTURBATION: ~np.isin(labels.astype(str), list(seen)),
                OBS_UNSEEN_CELL_TYPE: ~np.isin(cts.astype(str), list(seen_ct)),
                OBS_RETRIEVAL_DISTANCE: distance,
            },
            index=pd.Index([f"{p}:{c}" for p, c in zip(labels, np.asarray(adata.obs_names)[control_rows], strict=True)]),
        )
        if self._batch_key is not None and self._batch_key in adata.obs.columns:
            obs[self._batch_key] = pd.Categorical(np.tile(adata.obs[self._batch_key].astype(str).to_numpy()[controls], n_pert))
        out = AnnData(X=predicted, obs=obs, var=pd.DataFrame(index=self.var_names.copy()))
        out.layers[key_added] = predicted.copy()
        out.uns[UNS_KEY] = {
            "mode": "generation",
            "retrieval": self.retrieval,
            "memory": self.memory_kind,
            "n_candidates": self.n_candidates,
            "cell_set_size": self.cell_set_size,
            "sample_retrieval": bool(sample_retrieval),
            "seed": -1 if seed is None else int(seed),
            "perturbation_key": pert_key,
            "cell_type_key": ct_key,
            "control_group": self.control_group,
            "layer": key_added,
        }
        return out

    def add_perturbation_embeddings(self, embeddings: pd.DataFrame, *, overwrite: bool = False) -> None:
        """Add gene vectors, so that more genes (or combinations) can be predicted.

        The model's weights do not depend on which genes have vectors: a gene measured nowhere
        can be predicted once its embedding (of the same kind and dimension, e.g. from
        :func:`ptrag_sc.pp.embed_gene_text`) is added. The table is saved with the model.

        Parameters
        ----------
        embeddings
            DataFrame indexed by gene symbol, with the model's embedding dimension.
        overwrite
            Replace the vectors of genes the model already has (default: error).
        """
        new = PerturbationEncoder(embeddings).table
        if new.shape[1] != self._encoder.n_dims:
            raise ValueError(
                f"The new embeddings have {new.shape[1]} dimensions; the model's have {self._encoder.n_dims}."
            )
        clash = new.index.intersection(self._encoder.table.index)
        if len(clash) and not overwrite:
            raise ValueError(
                f"{len(clash)} gene(s) already have a vector, e.g. {clash[:5].tolist()}; pass "
                "`overwrite=True` to replace them."
            )
        new.columns = self._encoder.table.columns
        table = pd.concat([self._encoder.table.drop(index=clash), new])
        self._encoder = PerturbationEncoder(table, sep=self._encoder.sep)
        self.init_params_["non_kwargs"]["perturbation_embeddings"] = table
        self._index = None

    # ---------------------------------------------------------- introspection
    def get_perturbation_embedding(self, perturbations: Sequence[str]) -> pd.DataFrame:
        """Embedding vectors used for ``perturbations`` (combinations summed).

        Returns
        -------
        DataFrame indexed by perturbation label, one column per embedding dimension.
        """
        perturbations = [str(p) for p in perturbations]
        return pd.DataFrame(
            self._encoder.embed(perturbations), index=pd.Index(perturbations, name="perturbation"), columns=self._encoder.table.columns
        )

    @torch.inference_mode()
    def get_retrieval(
        self,
        perturbations: Sequence[str],
        *,
        cell_type: str | Sequence[str] | None = None,
        adata: AnnData | None = None,
        n_cells: int = 256,
        seed: int = 0,
    ) -> pd.DataFrame:
        """What the retriever fetches and keeps for each query perturbation.

        Stage 1 gives the candidates and their cosine similarity; stage 2 is run on up to
        ``n_cells`` control cells of the cell type, and its keep probabilities are averaged
        over them.

        Parameters
        ----------
        perturbations
            Query perturbation labels.
        cell_type
            Cell type(s) to query (default: every training cell type).
        adata
            AnnData providing the control cells (default: the training AnnData).
        n_cells
            Control cells used per cell type.
        seed
            Seed of the choice of control cells.

        Returns
        -------
        Long DataFrame with columns ``query``, ``cell_type``, ``rank``, ``candidate``,
        ``candidate_cell_type`` (response memory), ``similarity`` (cosine), ``keep_probability``
        (mean over cells; vanilla RAG: mean attention weight), ``selected_fraction`` (fraction
        of cells keeping the candidate; NaN for vanilla RAG) and ``selected``
        (``selected_fraction > 0.5``).
        """
        adata = self._resolve_adata(adata)
        self._require_trained()
        if self.retrieval == "none":
            raise ValueError("This model was built with `retrieval='none'`: it retrieves nothing.")
        adata = self.adata if adata is None else adata
        if adata is None:
            raise ValueError("Pass an AnnData with control cells: this model was loaded without one.")
        check_same_genes(adata.var_names, self.var_names)
        perturbations = [str(p) for p in ([perturbations] if isinstance(perturbations, str) else perturbations)]
        self._encoder.check(perturbations, context=" requested")
        cell_types_all = self._cell_types(adata)
        labels = adata.obs[self._perturbation_key].astype(str).to_numpy() if self._perturbation_key in adata.obs else None
        is_control = labels == self.control_group if labels is not None else np.ones(adata.n_obs, dtype=bool)
        if cell_type is None:
            wanted = list(self.training_cell_types_)
        else:
            wanted = [cell_type] if isinstance(cell_type, str) else list(cell_type)
        X = expression_matrix(adata, self._layer)
        expression = ExpressionMatrix(X)
        memory = self.memory
        names = memory.perturbations.astype(str)
        rng = np.random.default_rng(seed)
        device = next(self.module.parameters()).device
        frames = []
        for ct in wanted:
            pool = np.flatnonzero(is_control & (cell_types_all == ct))
            if pool.size == 0:
                raise ValueError(f"No control cells of cell type {ct!r} in the AnnData.")
            cells = rng.choice(pool, size=min(n_cells, pool.size), replace=False)
            cts = np.full(len(perturbations), ct, dtype=object)
            emb = self._encoder.embed(perturbations)
            cand, sim, same, relation = self._neighbour_index().query(np.asarray(perturbations), emb, cts)
            batch = {
                TENSORS.X_CTRL: expression.rows(np.broadcast_to(cells, (len(perturbations), cells.size))),
                TENSORS.PERT_EMBEDDING: torch.from_numpy(emb),
                TENSORS.CANDIDATES: torch.from_numpy(cand),
                TENSORS.CANDIDATE_SAME_CELL_TYPE: torch.from_numpy(same),
                TENSORS.CANDIDATE_RELATION: torch.from_numpy(relation),
                TENSORS.BATCH: torch.full((len(perturbations),), -1, dtype=torch.long),
            }
            names_k = np.where(cand >= 0, names[np.maximum(cand, 0)], None)
            cts_k = np.where(cand >= 0, memory.cell_types.astype(str)[np.maximum(cand, 0)], None)
            valid = cand >= 0
            if memory.kind == "response":
                context, context_valid = context_responses(memory, np.asarray(perturbations), cts)
                batch[TENSORS.CONTEXT_RESPONSE] = torch.from_numpy(context)
                batch[TENSORS.CONTEXT_VALID] = torch.from_numpy(context_valid)
                names_k = np.concatenate([names_k, np.full((len(perturbations), 1), CONTEXT_CANDIDATE, dtype=object)], 1)
                cts_k = np.concatenate([cts_k, np.full((len(perturbations), 1), ct, dtype=object)], 1)
                sim = np.concatenate([sim, np.full((len(perturbations), 1), np.nan, dtype=np.float32)], 1)
                valid = np.concatenate([valid, context_valid[:, None]], 1)
            batch = {k: v.to(device) for k, v in batch.items()}
            self.module.eval()
            inference = self.module.inference(**self.module._get_inference_input(batch), sample_retrieval=False)
            if "keep" in inference:
                keep_p = inference["keep_probability"].mean(1).cpu().numpy()
                selected = inference["keep"].mean(1).cpu().numpy()
            else:
                keep_p = inference["attention"].mean(1).cpu().numpy()
                selected = np.full_like(keep_p, np.nan)
            k = names_k.shape[1]
            frame = pd.DataFrame(
                {
                    "query": np.repeat(perturbations, k),
                    "cell_type": ct,
                    "rank": np.tile(np.arange(1, k + 1), len(perturbations)),
                    "candidate": names_k.ravel(),
                    "candidate_cell_type": cts_k.ravel(),
                    "similarity": sim.ravel().astype(np.float64),
                    "keep_probability": keep_p.ravel(),
                    "selected_fraction": selected.ravel(),
                }
            )
            frames.append(frame[valid.ravel()])
        out = pd.concat(frames, ignore_index=True)
        out["selected"] = out["selected_fraction"] > 0.5
        if memory.kind != "response":
            out = out.drop(columns="candidate_cell_type")
        return out


def _rows_of(control_means, rows: np.ndarray):
    """``control_means`` with its per-row context keys taken at ``rows``."""
    return None if control_means is None else (*control_means[:2], control_means[2][rows])


def _check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}.")


def _evidence_weights(inference: dict, n_candidates: int) -> torch.Tensor:
    """Per-cell weights over the stage-1 candidates (not the context entry), for the distance."""
    valid = inference["valid"][:, None, :n_candidates].to(inference["x0"].dtype)
    if "keep" in inference:
        weights = (inference["keep"] * inference["keep_probability"])[..., :n_candidates]
    else:
        weights = inference["attention"][..., :n_candidates]
    total = weights.sum(-1, keepdim=True)
    uniform = valid / valid.sum(-1, keepdim=True).clamp_min(1)
    return torch.where(total > 0, weights / total.clamp_min(1e-12), uniform)


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, description: str, enabled: bool):
    if not enabled:
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="batch")
