"""The user-facing PT-RAG model class: it wires the data layer, the module and the trainer."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scvi import REGISTRY_KEYS as SCVI_KEYS
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
    REGISTRY_KEYS,
    Backbone,
    ContextMode,
    IndexBackend,
    LossKind,
    MemoryKind,
    Retrieval,
)
from .._settings import settings
from .._utils import flush_denormal, quiet_lightning
from ..data import (
    PerturbationData,
    PerturbationEncoder,
    PerturbationField,
    RetrievalMemory,
    SetupArgs,
)
from ..data._annotations import GeneAnnotations
from ..data._index import NeighbourIndex
from ..data._similarity import Similarity, describe, make_similarity
from ..module import PTRAGModule
from ..train import PTRAGTrainingPlan
from . import _predict, _training
from ._io import SafeSaveMixin
from ._mudata import MuDataMixin, is_mudata
from ._validation import check_anndata, check_flag, check_model_options, check_seed, check_setup

if TYPE_CHECKING:
    from collections.abc import Sequence

    import scipy.sparse as sp
    from anndata import AnnData

logger = logging.getLogger(__name__)

_NOT_TRAINED = "Model not trained. Call `model.train()` first."


class PTRAG(MuDataMixin, SafeSaveMixin, BaseModelClass):
    """Perturbation-aware two-stage retrieval-augmented generation (PT-RAG).

    A STATE-style set-to-set model: a set of control cells of one cell type and the gene
    embedding of a perturbation are mapped to a set of perturbed cells. Before generation a
    two-stage retriever adds context: stage 1 takes the ``n_candidates`` memory entries closest
    to the query in the gene-embedding space; stage 2 decides, for each cell and candidate,
    with a hard Gumbel-Softmax over a learned score, which candidates to keep (with a sparsity
    penalty). With the default response memory, the set's mean shift is the cell type's
    context response (the mean shift of its other perturbations), plus a stacked estimate of
    the perturbation's own shift from several evidence sources (``evidence``; weights fitted on
    the training perturbations with their own entries left out), plus a learned residual from
    the candidates stage 2 keeps; it is supervised on the pseudobulk of whole groups, and the
    transformer shapes the cells around it (energy distance). Everything is trained end to
    end.

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
        Attention heads (must divide ``n_hidden``).
    cell_set_size
        Cells per set ``S`` during training; at prediction, groups are cut into sets of at most
        this size. Larger than every training group: a warning at ``train`` (sets repeat cells);
        more than 4 times larger: an error.
    retrieval
        ``"ptrag"`` (two-stage selection), ``"vanilla"`` (cross-attention over the stage-1
        candidates) or ``"none"`` (STATE with gene embeddings). All share one code path.
    memory
        ``"response"``: memory entries are training (perturbation, cell type) pairs carrying
        their measured mean shift, so the same perturbation measured in other cell types is
        retrievable evidence and the set's mean comes from the evidence.
        ``"embedding"``: entries are training perturbations carrying only their gene embedding
        (the paper).
    n_candidates
        Stage-1 candidates per query ``K``.
    sparsity_weight
        Weight of the mean keep rate in the loss (PT-RAG), ``>= 0``.
    pseudobulk_weight
        Weight of the error of each set's mean shift against its group's pseudobulk shift,
        ``>= 0`` (0: the energy distance alone, as the paper).
    gumbel_tau
        Gumbel-Softmax temperature, ``> 0``.
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
        Dropout rate in ``[0, 1)``.
    match_batch
        With a ``batch_key``, pair perturbed cells with control cells of the same batch.
    index_backend
        Stage-1 search: ``"exact"``, ``"faiss"`` or ``"auto"`` (faiss for memories larger than
        100,000 entries when installed).
    gene_annotations
        A second view of each perturbed gene beside its embedding, for the evidence of a
        response memory (a ridge map and nearest neighbours by annotation): ``"go"``, the GO
        terms of human genes shipped with the package, or ``None``. Genes without annotations
        (e.g. non-human symbols) simply contribute nothing through it.
    evidence
        The evidence sources a response memory stacks into each perturbation's mean shift
        (default: all of ``ptrag_sc.data.EVIDENCE_SOURCES``: ``"linear_embedding"``,
        ``"linear_annotation"``, ``"neighbours_embedding"``, ``"neighbours_annotation"``,
        ``"other_cell_types"``, ``"other_cell_types_raw"``); their non-negative weights are
        fitted on the training perturbations with their own entries left out. ``()`` stacks
        nothing: the context response and the stage-2 retrieval alone make the mean.
    learned_shift
        Let the network learn a mean shift per set. Default (``None``): only without a response
        memory; with one, each set's mean moves by the evidence and the network shapes the
        cells around it.
    similarity
        What stage 1 ranks memory entries by (see :doc:`/screen`):
        ``"embedding"``, the cosine of the gene embeddings (the paper);
        ``"go"``, the Jaccard similarity of the genes' GO terms (shipped with the package);
        ``"response"``, the cosine between the query's measured response in the *other* cell
        types (its mean perturbation-specific shift there) and each entry's specific shift
        (response memories; a training perturbation measured in other cell types);
        or a :class:`~pandas.DataFrame` of your own prior (a GRN, a PPI graph,
        co-essentiality...): query genes as the index, candidate genes as the columns, finite
        values, larger = more similar, square or symmetric not required; a combination
        ``A+B`` missing from it takes the mean of its genes' rows / columns. Where the prior
        says nothing (a gene without GO terms, a perturbation measured in no other cell type,
        a gene missing from the table) the embedding cosine ranks instead: a query it does
        not cover is ranked by the embedding alone; for a covered query the entries it covers
        come first, the others follow by embedding cosine (similarity NaN). The query
        measured in other cell types is always the first candidate. The choice is saved with
        the model (a table as a DataFrame); ``get_retrieval``'s ``similarity`` column and the
        retrieval distance (``1 -`` similarity) then report this prior.

    Examples
    --------
    >>> import ptrag_sc
    >>> ptrag_sc.settings.progress_bar = False
    >>> adata = ptrag_sc.datasets.perturbench_devel()
    >>> ptrag_sc.pp.few_shot_split(adata, held_out="U87MG", val=["PLK4"], test=["MAPK1", "SGK1"])
    >>> ptrag_sc.PTRAG.setup_anndata(adata, perturbation_key="gene", cell_type_key="cell_line")
    >>> model = ptrag_sc.PTRAG(adata, perturbation_embeddings=adata.uns["gene_embeddings"])
    >>> model.train(max_steps=20, split_key="split")  # the default picks its length by validation
    >>> model.predict(adata)  # counterfactual: writes adata.layers["ptrag"]
    >>> adata.layers["ptrag"].shape == adata.shape
    True
    >>> controls = adata[(adata.obs["gene"] == "non-targeting") & (adata.obs["cell_line"] == "U87MG")]
    >>> generated = model.predict(controls, perturbations=["MAPK1", "MAPK1+SGK1"])  # generation
    >>> generated.n_obs == 2 * controls.n_obs
    True
    >>> table = model.get_retrieval(["MAPK1"], cell_type="U87MG")
    >>> first = table.iloc[0]  # MAPK1 itself, measured in another cell line
    >>> first["candidate"], first["candidate_cell_type"] != "U87MG", round(float(first["similarity"]), 3)
    ('MAPK1', True, 1.0)

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
        retrieval: Retrieval = "ptrag",
        memory: MemoryKind = "response",
        n_candidates: int = 32,
        sparsity_weight: float = 0.01,
        pseudobulk_weight: float = 1.0,
        gumbel_tau: float = 0.5,
        context_mode: ContextMode = "add",
        loss: LossKind = "energy",
        backbone: Backbone = "pooled",
        n_set_tokens: int = 4,
        decoder_rank: int | None = 32,
        n_scorer_hidden: int | None = 32,
        dropout: float = 0.0,
        match_batch: bool = True,
        index_backend: IndexBackend = "auto",
        gene_annotations: Literal["go"] | None = "go",
        evidence: Sequence[str] | None = None,
        learned_shift: bool | None = None,
        similarity: Similarity | pd.DataFrame = "embedding",
    ) -> None:
        options = {k: v for k, v in locals().items() if k not in ("self", "adata", "registry", "perturbation_embeddings", "__class__")}
        options = check_model_options(options)
        n_hidden, n_layers, n_heads, n_set_tokens = (options[k] for k in ("n_hidden", "n_layers", "n_heads", "n_set_tokens"))
        cell_set_size, n_candidates, decoder_rank = options["cell_set_size"], options["n_candidates"], options["decoder_rank"]
        n_scorer_hidden, sparsity_weight = options["n_scorer_hidden"], options["sparsity_weight"]
        pseudobulk_weight, gumbel_tau, dropout = options["pseudobulk_weight"], options["gumbel_tau"], options["dropout"]
        adata = self._resolve_adata(adata)
        if adata is None and registry is None:
            raise ValueError("Pass `adata`, an AnnData set up with `PTRAG.setup_anndata` (or load a saved model with `PTRAG.load`).")
        if adata is not None:
            check_anndata(adata)
            if self._get_most_recent_anndata_manager(adata, required=False) is None:
                raise ValueError(
                    f"`adata` is not set up for {type(self).__name__}: call `{type(self).__name__}.setup_anndata(adata, "
                    "perturbation_key=..., cell_type_key=...)` first."
                )
        super().__init__(adata, registry)
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
        self._annotations = GeneAnnotations() if gene_annotations == "go" else None
        self.evidence = None if evidence is None else tuple(evidence)
        self.similarity = similarity
        self._similarity = make_similarity(similarity, annotations=self._annotations, sep=self._encoder.sep)
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
            n_batch=self.summary_stats.n_batch if self._setup.batch_key is not None else 0,
            gumbel_tau=gumbel_tau,
            n_scorer_hidden=n_scorer_hidden,
            decoder_rank=decoder_rank,
            sparsity_weight=sparsity_weight,
            pseudobulk_weight=pseudobulk_weight,
            dropout=dropout,
            loss=loss,
            learned_shift=learned_shift,
        )
        self._memory_state: dict | None = None
        self._index: NeighbourIndex | None = None
        self.training_perturbations_: np.ndarray | None = None
        self.training_cell_types_: np.ndarray | None = None
        self.best_epoch_: int | None = None
        self.best_step_: int | None = None
        self.validation_perturbations_: np.ndarray | None = None
        self._model_summary_string = (
            f"PTRAG model: retrieval={retrieval!r}, memory={memory!r}, backbone={backbone!r}, "
            f"n_hidden={n_hidden}, n_layers={n_layers}, cell_set_size={cell_set_size}, "
            f"n_candidates={n_candidates}, context_mode={context_mode!r}, similarity={describe(similarity)}, "
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
            combinations are written ``"A+B"`` (see ``perturbation_sep``). Labels are read in a
            canonical form (:func:`ptrag_sc.data.normalise_labels`): surrounding whitespace
            removed, symbols upper-cased, combination members sorted.
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
            If the AnnData is a view, has no genes or duplicated gene names, there are no
            control cells (overall or for a cell type with perturbed cells), a label column
            has missing values, or the expression holds NaN, infinite or negative values.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
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
            PerturbationField(REGISTRY_KEYS.PERTURBATION_KEY, perturbation_key, control_group=control_group, sep=perturbation_sep),
            CategoricalObsField(SCVI_KEYS.LABELS_KEY, cell_type_key),
            CategoricalObsField(SCVI_KEYS.BATCH_KEY, batch_key),
        ]
        adata_manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    @classmethod
    def load(cls, dir_path, adata=None, *args, **kwargs):
        """Load a model saved with :meth:`save`, without running any code from the directory.

        Parameters
        ----------
        dir_path
            Directory written by :meth:`save`.
        adata
            AnnData (or MuData) with the model's genes in the model's order, set up on load
            from the saved registry; cell types and batches the model never saw are accepted.
            ``None``: the AnnData saved with the model (``save_anndata=True``), if any;
            ``False``: none.
        *args, **kwargs
            ``accelerator``, ``device``, ``prefix``, ``backup_url``: see
            :meth:`ptrag_sc.model.SafeSaveMixin.load`.

        Returns
        -------
        The model, in evaluation mode (:meth:`train` switches to training mode itself).

        Raises
        ------
        TypeError
            If ``adata`` is neither an AnnData, a MuData, ``None`` nor ``False``.
        FileNotFoundError, ValueError
            See :meth:`ptrag_sc.model.SafeSaveMixin.load`: a missing, damaged, foreign or
            pickle-based directory, or an AnnData whose genes differ from the model's.
        """
        if adata is not None and adata is not False and not is_mudata(adata):
            check_anndata(adata)
        return super().load(dir_path, adata, *args, **kwargs)

    # ------------------------------------------------------------- properties
    def _field_state(self, key: str) -> dict:
        return self.registry_["field_registries"][key]["state_registry"]

    @property
    def _setup(self) -> SetupArgs:
        args = self.registry_["setup_args"]
        return SetupArgs(
            perturbation_key=args["perturbation_key"],
            control_group=args["control_group"],
            cell_type_key=args["cell_type_key"],
            batch_key=args["batch_key"],
            layer=args["layer"],
            sep=args.get("perturbation_sep", DEFAULT_PERTURBATION_SEP),
        )

    @property
    def control_group(self) -> str:
        """Label of control cells."""
        return self._setup.control_group

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
        self._memory_state = None if state is None else RetrievalMemory.from_dict(state).to_dict()
        self._index = None
        if state is not None:
            memory = self.memory
            specific = memory.specific if memory.kind == "response" else None
            self.module.set_memory(memory.embeddings, specific, memory.response_codes)

    def _neighbour_index(self) -> NeighbourIndex | None:
        if self._memory_state is None:
            return None
        if self._index is None:
            self._index = NeighbourIndex(
                self.memory, n_candidates=self.n_candidates, backend=self.index_backend, sep=self._encoder.sep, similarity=self._similarity
            )
        return self._index

    def _data(self, adata: AnnData, *, require_labels: bool = True) -> PerturbationData:
        """The data layer's view of ``adata`` in this model's registration and gene order."""
        batch_state = self.registry_["field_registries"].get(SCVI_KEYS.BATCH_KEY, {}).get("state_registry", {})
        return PerturbationData(
            adata,
            self._setup,
            self.var_names,
            batch_categories=batch_state.get("categorical_mapping") if self._setup.batch_key else None,
            require_labels=require_labels,
        )

    def _builder(self):
        from ..data import SetBuilder

        return SetBuilder(
            self._encoder,
            self.memory,
            self._neighbour_index(),
            n_candidates=self.n_candidates,
            match_batch=self.match_batch and self._setup.batch_key is not None,
            annotations=self._annotations,
        )

    def _require_trained(self) -> None:
        if not self.is_trained_:
            raise RuntimeError(_NOT_TRAINED)

    # ---------------------------------------------------------------- training
    def train(
        self,
        max_epochs: int | None = None,
        max_steps: int | None = None,
        *,
        batch_size: int = 16,
        split_key: str | None = None,
        validation_size: float | None = None,
        early_stopping: bool | None = None,
        early_stopping_patience: int = 5,
        keep_best: bool = True,
        check_val_every_n_steps: int | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        plan_kwargs: dict | None = None,
        **trainer_kwargs,
    ) -> None:
        """Train the model on sets of cells, choosing its length on held-out perturbations.

        Each step draws ``batch_size`` sets of ``cell_set_size`` perturbed cells sharing
        (cell type, perturbation[, batch]), each cell paired with a control cell of the same
        cell type (and batch). The retrieval memory is built from the training cells only.

        Model selection holds out perturbations, not cells: the validation score is the
        training objective on (perturbation, cell type) groups the model never trained on and
        the memory does not hold, which is the task of predicting an unseen perturbation.
        With ``split_key`` the ``"val"`` cells are those groups; without validation cells a
        ``validation_size`` fraction of the training groups (10% by default, at least one) is
        held out automatically, and put back into the memory after training. By default
        training stops when the validation score has not improved for
        ``early_stopping_patience`` checks, and the weights of the best check are kept, so
        more steps cannot make the kept model worse on held-out perturbations.

        Parameters
        ----------
        max_epochs
            Passes over the training groups (a group of ``n`` cells yields ``ceil(n / S)`` sets
            per pass); converted to steps.
        max_steps
            Largest number of optimisation steps; takes precedence over ``max_epochs``.
            Default: 1,500 (early stopping usually ends training sooner).
        batch_size
            Sets per step (per device).
        split_key
            obs column whose values ``"train"``, ``"val"``/``"validation"`` and ``"test"``
            decide the split (e.g. from :func:`ptrag_sc.pp.few_shot_split`). Control cells are
            inputs in every split; only training cells enter the memory and the loss.
        validation_size
            Fraction of the training (perturbation, cell type) groups held out for model
            selection when there are no validation cells; ``0`` disables validation (then the
            model trains for ``max_steps``).
        early_stopping
            Stop when ``validation_loss`` stops improving. Default: on when there is a
            validation set.
        early_stopping_patience
            Validation checks without improvement before stopping.
        keep_best
            Restore at the end the weights of the validation check with the lowest
            ``validation_loss`` (``model.best_step_`` records when).
        check_val_every_n_steps
            Steps between validation checks (default: ``max_steps // 30``, between 10 and
            50). One "epoch" of ``model.history`` is one such interval.
        accelerator, devices
            Lightning device arguments. Multi-device data-parallel training:
            ``strategy="ddp"`` (each rank takes a disjoint share of the sets).
        plan_kwargs
            Passed to :class:`~ptrag_sc.train.PTRAGTrainingPlan` (``lr``, ``weight_decay``,
            ``evidence_lr``...).
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` (e.g. ``enable_progress_bar``,
            ``gradient_clip_val``; default clip 10).

        Returns
        -------
        None. ``model.history`` holds ``train_loss``, ``train_energy``, ``train_mean_error``,
        ``validation_loss``, ``validation_energy``, ``validation_mean_error`` and, for PT-RAG,
        ``train_active_ratio`` and ``validation_active_ratio``. If training fails or is interrupted, the model is left as it
        was before the call.
        """
        adata = self.adata
        if adata is None:
            raise ValueError("This model has no AnnData attached: load it with `PTRAG.load(dir, adata=...)` to train.")
        return _training.train(
            self,
            max_epochs=max_epochs,
            max_steps=max_steps,
            batch_size=batch_size,
            split_key=split_key,
            validation_size=validation_size,
            early_stopping=early_stopping,
            early_stopping_patience=early_stopping_patience,
            keep_best=keep_best,
            check_val_every_n_steps=check_val_every_n_steps,
            accelerator=accelerator,
            devices=devices,
            plan_kwargs=plan_kwargs,
            trainer_kwargs=trainer_kwargs,
        )

    def _run_trainer(self, datamodule, *, plan_kwargs, max_epochs, accelerator, devices, early_stopping, trainer_kwargs):
        """Hand the data module and the training plan to scvi-tools' runner."""
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        training_plan = self._training_plan_cls(self.module, **(plan_kwargs or {}))
        self.module.train()
        with flush_denormal(), quiet_lightning(settings.verbosity > logging.INFO):
            try:
                runner = self._train_runner_cls(
                    self,
                    training_plan=training_plan,
                    data_splitter=datamodule,
                    max_epochs=max_epochs,
                    accelerator=accelerator,
                    devices=devices,
                    early_stopping=early_stopping,
                    **trainer_kwargs,
                )
            except (MisconfigurationException, ImportError, ValueError, TypeError) as exc:
                extra = {k: trainer_kwargs[k] for k in ("strategy", "num_nodes", "precision") if k in trainer_kwargs}
                raise ValueError(
                    f"The trainer cannot be set up with `accelerator={accelerator!r}`, `devices={devices!r}`"
                    + "".join(f", `{k}={v!r}`" for k, v in extra.items())
                    + f": {exc} Check these arguments of `train()` (`accelerator='cpu'` always works)."
                ) from exc
            runner()
        self.module.eval()

    # -------------------------------------------------------------- prediction
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
        overwrite: bool = False,
        sample_retrieval: bool = False,
        seed: int | None = None,
        output: str | os.PathLike | None = None,
        sparse: bool = False,
    ) -> AnnData | np.ndarray | sp.csr_matrix | None:
        """Predict perturbed cells, in one of two modes.

        **Counterfactual** (``perturbations=None``): every perturbed cell of ``adata`` (or of
        ``indices``) is generated from a control cell of its own cell type (and batch) in
        ``adata`` under its own perturbation; the result goes to ``adata.layers[key_added]``
        (same cells and genes as ``adata``; control cells keep their own values).

        **Generation** (``perturbations=[...]``): ``adata`` holds control cells (all its cells
        when it has no perturbation column, else those labelled ``control_group``); a new
        AnnData is returned with one copy of these cells per requested perturbation. Any gene
        (or combination of genes) with an embedding can be asked for, measured or not.

        **Data larger than memory.** ``adata`` may be opened with
        ``anndata.read_h5ad(path, backed="r")``, hold a zarr-backed sparse ``X``
        (``AnnData(X=anndata.io.sparse_dataset(zarr.open(path)["X"]), obs=..., var=...)``), or
        be a view of either: only the rows a batch needs are read (control cells, which every
        set draws from, are kept in memory when they fit in 1 GiB). The counterfactual result
        can then go to a new h5ad file (``output=``), written batch by batch, so the whole
        prediction is never in memory; a CSR layer (``sparse=True``) avoids a dense copy for
        in-memory sparse data. The same holds for :meth:`train`.

        Parameters
        ----------
        adata
            AnnData with the model's genes (in any order: they are matched by name). Default:
            the training AnnData.
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
        overwrite
            Counterfactual mode: replace an existing ``layers[key_added]`` (never the layer
            the model reads its input from).
        sample_retrieval
            Sample the stage-2 selection with Gumbel noise instead of keeping candidates
            with ``p_keep > 0.5``.
        seed
            Seed of the sampled selection (``sample_retrieval=True``) and of the choice of
            control cells (default 0).
        output
            Counterfactual mode: path of a new h5ad file to write instead of a layer. Its
            ``X`` (dense float32, the same cells and genes as ``adata``) holds the prediction,
            written chunk by chunk straight to disk; ``obs`` is ``adata.obs`` plus
            ``ptrag_predicted`` (whether the row was predicted; other rows are copies of the
            input), ``var`` is ``adata.var``, ``uns["ptrag"]`` records the settings. An existing
            file is replaced only with ``overwrite=True``; a failed prediction leaves no file.
            ``inplace`` and ``key_added`` do not apply.
        sparse
            Counterfactual mode: build the layer (or the returned matrix, ``inplace=False``) as
            a :class:`scipy.sparse.csr_matrix`, piece by piece, without a dense copy of the whole
            layer. Worth it when many predicted values are 0 (the output is non-negative).

        Returns
        -------
        Counterfactual mode: ``None`` (``inplace=True``; writes ``adata.layers[key_added]``), an
        ``(n_obs, n_vars)`` float32 array (``inplace=False``; CSR with ``sparse=True``), or with
        ``output`` the new file opened with ``anndata.read_h5ad(output, backed="r")``. Generation mode: a new :class:`~anndata.AnnData`
        with the prediction in ``.X`` and ``.layers[key_added]``; obs: the perturbation and
        cell-type columns, ``ptrag_source_cell`` (obs name of the control cell),
        ``ptrag_unseen_perturbation`` (never measured in training),
        ``ptrag_unseen_cell_type``, ``ptrag_retrieval_distance`` (``1 -`` cosine similarity
        to the retrieved evidence, weighted by its weight in the prediction; an uncertainty
        proxy; NaN for ``retrieval="none"``); ``uns["ptrag"]`` records the settings.
        Predictions are non-negative and never exceed the largest value each gene reaches in
        the training data.
        """
        adata = self._resolve_adata(adata)
        self._require_trained()
        adata = self.adata if adata is None else adata
        if adata is None:
            raise ValueError("Pass an AnnData: this model was loaded without one.")
        check_anndata(adata)
        batch_size = _predict.check_batch_size(batch_size)
        inplace = check_flag("inplace", inplace)
        overwrite = check_flag("overwrite", overwrite)
        sample_retrieval = check_flag("sample_retrieval", sample_retrieval)
        seed = check_seed("seed", seed)
        if perturbations is None and inplace and adata.is_view:
            raise ValueError(
                "`adata` is a view: writing the prediction layer would turn it into a copy and leave the "
                "AnnData it views unchanged. Predict on the full AnnData with `indices=`, on "
                "`adata[mask].copy()`, or pass `inplace=False`."
            )
        if perturbations is not None:
            if indices is not None:
                raise ValueError("`indices` applies to counterfactual prediction; use it without `perturbations`.")
            if output is not None or sparse:
                raise ValueError("`output` and `sparse` apply to counterfactual prediction; use them without `perturbations`.")
            return _predict.generation(self, adata, perturbations, cell_type, batch_size, key_added, sample_retrieval, seed)
        if cell_type is not None:
            raise ValueError("`cell_type` applies to generation mode (with `perturbations=[...]`).")
        return _predict.counterfactual(
            self, adata, indices, batch_size, key_added, inplace, overwrite, sample_retrieval, seed, output=output, sparse=sparse
        )

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
            raise ValueError(f"The new embeddings have {new.shape[1]} dimensions; the model's have {self._encoder.n_dims}.")
        clash = new.index.intersection(self._encoder.table.index)
        if len(clash) and not overwrite:
            raise ValueError(
                f"{len(clash)} gene(s) already have a vector, e.g. {clash[:5].tolist()}; pass `overwrite=True` to replace them."
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
        perturbations = [str(p) for p in ([perturbations] if isinstance(perturbations, str) else perturbations)]
        return pd.DataFrame(
            self._encoder.embed(perturbations), index=pd.Index(perturbations, name="perturbation"), columns=self._encoder.table.columns
        )

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
        ``n_cells`` control cells of the cell type, and its decisions are averaged over them.

        Parameters
        ----------
        perturbations
            Query perturbation labels.
        cell_type
            Cell type(s) to query (default: every training cell type).
        adata
            AnnData providing the control cells (default: the training AnnData).
        n_cells
            Control cells used per cell type (at least 1).
        seed
            Seed of the choice of control cells.

        Returns
        -------
        Long DataFrame with columns ``query``, ``cell_type``, ``rank``, ``candidate``,
        ``candidate_cell_type`` (response memory), ``similarity`` (cosine),
        ``keep_probability`` (mean over cells; vanilla RAG: mean attention weight),
        ``selected_fraction`` (fraction of cells keeping the candidate; NaN for vanilla RAG),
        ``selected`` (``selected_fraction > 0.5``) and ``weight`` (the candidate's normalised
        weight in the retrieved shift, response memories).
        """
        adata = self._resolve_adata(adata)
        self._require_trained()
        adata = self.adata if adata is None else adata
        check_anndata(adata, allow_none=True)
        seed = check_seed("seed", seed, allow_none=False)
        return _predict.retrieval_table(self, perturbations, cell_type, adata, n_cells, seed)
