"""The user-facing PT-RAG model class: it wires the data layer, the module and the trainer."""

from __future__ import annotations

import copy
import functools
import os
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scvi import REGISTRY_KEYS as SCVI_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField
from scvi.model.base import BaseModelClass
from scvi.train import TrainRunner
from scvi.utils import setup_anndata_dsp

from .._checks import check_anndata
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
from ..data import ModelState, PerturbationEncoder, PerturbationField, RetrievalMemory
from ..data._checks import check_setup
from ..data._similarity import Similarity, describe
from ..module import PTRAGModule
from ..train import PTRAGTrainingPlan
from . import _docs, _predict, _training
from ._io import SafeSaveMixin
from ._mudata import MuDataMixin, model_input
from ._validation import check_model_options, check_model_size, module_kwargs, restore_on_error

if TYPE_CHECKING:
    from collections.abc import Sequence

    import scipy.sparse as sp

#: ``__init__`` arguments that are not options of the network.
_NOT_MODULE_OPTIONS = ("self", "adata", "registry", "perturbation_embeddings", "__class__")
#: What scvi-tools' runner writes on the model; put back when training fails.
_RUNNER_WRITES = (
    "is_trained_",
    "history_",
    "train_indices_",
    "validation_indices_",
    "test_indices_",
)


def _option(name: str, doc: str) -> property:
    return property(lambda self: getattr(self.state, name), doc=doc)


def _trained(name: str, doc: str) -> property:
    """A saved attribute held by the state (what the model was trained on)."""

    def set_value(self: PTRAG, value: np.ndarray | None) -> None:
        self.state = self.state.replace(**{name: value})

    return property(lambda self: getattr(self.state, name), set_value, doc=doc)


@_docs.fill
class PTRAG(MuDataMixin, SafeSaveMixin, BaseModelClass):
    """Perturbation-aware two-stage retrieval-augmented generation (PT-RAG).

    A STATE-style set-to-set model: a set of control cells of one cell type and the gene
    embedding of a perturbation are mapped to a set of perturbed cells. A two-stage retriever
    adds context: stage 1 takes the ``n_candidates`` memory entries closest to the query;
    stage 2 keeps, per cell and candidate, those a learned score selects (hard Gumbel-Softmax
    with a sparsity penalty). With the default response memory, the set's mean shift is the
    cell type's context response plus stacked evidence for the perturbation's own shift, and
    each prediction carries a confidence; the transformer shapes the cells around that mean
    (see :doc:`/concepts`).

    Parameters
    ----------
    %(init_parameters)s

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
    >>> is_control = adata.obs["gene"] == "non-targeting"
    >>> controls = adata[is_control & (adata.obs["cell_line"] == "U87MG")]
    >>> generated = model.predict(controls, perturbations=["MAPK1", "MAPK1+SGK1"])  # generation
    >>> generated.n_obs == 2 * controls.n_obs
    True
    >>> table = model.get_retrieval(["MAPK1"], cell_type="U87MG")
    >>> first = table.iloc[0]  # MAPK1 itself, measured in another cell line
    >>> similarity = round(float(first["similarity"]), 3)
    >>> first["candidate"], first["candidate_cell_type"] != "U87MG", similarity
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
        options = check_model_options(
            {k: v for k, v in locals().items() if k not in _NOT_MODULE_OPTIONS}
        )
        adata = self._resolve_adata(adata)
        if adata is None and registry is None:
            raise ValueError(
                "Pass `adata`, an AnnData set up with `PTRAG.setup_anndata` (or load a saved "
                "model with `PTRAG.load`)."
            )
        if adata is not None:
            check_anndata(adata)
            if self._get_most_recent_anndata_manager(adata, required=False) is None:
                name = type(self).__name__
                raise ValueError(
                    f"`adata` is not set up for {name}: call `{name}.setup_anndata(adata, "
                    "perturbation_key=..., cell_type_key=...)` first."
                )
        super().__init__(adata, registry)
        n_genes = self.summary_stats.n_vars
        n_batch = self.summary_stats.n_batch if self.registry_["setup_args"]["batch_key"] else 0
        if registry is None and isinstance(perturbation_embeddings, pd.DataFrame):
            # Not on load: a loaded model may only predict.
            n_dims = perturbation_embeddings.shape[1]
            shape = {"n_genes": n_genes, "n_dims": n_dims, "n_batch": n_batch}
            check_model_size(type(self), options, **shape)
        self.state = ModelState.build(
            self.registry_, self.get_var_names(), perturbation_embeddings, options
        )
        if adata is not None:
            field = self.registry_["field_registries"][REGISTRY_KEYS.PERTURBATION_KEY]
            registered = field["state_registry"]["perturbations"]
            self.state.encoder.check(registered, context=" in the registered AnnData")
        n_dims = self.state.encoder.n_dims
        module_options = module_kwargs(self._module_cls, options)
        self.module = self._module_cls(n_genes, n_dims, n_batch=n_batch, **module_options)
        self.best_epoch_ = self.best_step_ = self.validation_perturbations_ = None
        shown = ("retrieval", "memory", "backbone", "n_hidden", "n_layers", "cell_set_size")
        text = ", ".join(f"{k}={options[k]!r}" for k in (*shown, "n_candidates", "context_mode"))
        text += f", similarity={describe(options['similarity'])}"
        self._model_summary_string = (
            f"PTRAG model: {text}, embedding dims={n_dims}, genes={n_genes}."
        )
        # What the constructor was called with (canonical types: `16.0` is saved as `16`).
        arguments = {"perturbation_embeddings": perturbation_embeddings, **options}
        self.init_params_ = self._get_init_params(arguments)

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
        **kwargs: object,
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
        transfer = kwargs.get("source_registry") is not None
        if transfer:
            # A trained model meeting new data: cell types and batches it never saw are valid
            # (they are read by name, never as the registry's codes).
            kwargs.setdefault("extend_categories", True)
        keys = dict(setup_method_args["setup_args"])
        sep = keys.pop("perturbation_sep")
        with restore_on_error(adata if isinstance(adata, AnnData) else None):
            check_setup(adata, **keys, sep=sep, transfer=transfer)
            fields = [
                LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=False),
                PerturbationField(
                    REGISTRY_KEYS.PERTURBATION_KEY,
                    perturbation_key,
                    control_group=control_group,
                    sep=sep,
                ),
                CategoricalObsField(SCVI_KEYS.LABELS_KEY, cell_type_key),
                CategoricalObsField(SCVI_KEYS.BATCH_KEY, batch_key),
            ]
            adata_manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
            adata_manager.register_fields(adata, **kwargs)
            cls.register_manager(adata_manager)

    # ------------------------------------------------------------- properties
    #: What retrieval and the data layer need (:class:`~ptrag_sc.data.ModelState`): prediction,
    #: training, screens and saving read it, never the model.
    state: ModelState

    retrieval = _option("retrieval", "The ``retrieval`` option.")
    memory_kind = _option("memory_kind", "The ``memory`` option.")
    n_candidates = _option("n_candidates", "Stage-1 candidates per query.")
    cell_set_size = _option("cell_set_size", "Cells per set.")
    match_batch = _option("match_batch", "The ``match_batch`` option.")
    index_backend = _option("index_backend", "The ``index_backend`` option.")
    evidence = _option("evidence", "The evidence sources stacked (``None``: all).")
    similarity = _option("similarity", "What stage 1 ranks memory entries by.")
    training_perturbations_ = _trained("training_perturbations", "Perturbations trained on.")
    training_cell_types_ = _trained("training_cell_types", "Cell types trained on.")

    @property
    def control_group(self) -> str:
        """Label of control cells."""
        return self.state.setup.control_group

    @property
    def var_names(self) -> pd.Index:
        """Genes the model predicts, in order."""
        return self.state.var_names

    @property
    def perturbation_embeddings(self) -> pd.DataFrame:
        """The validated gene-embedding table (upper-case symbols, float32)."""
        return self.state.encoder.table

    @property
    def memory(self) -> RetrievalMemory | None:
        """The retrieval memory built from training cells (``None`` before training)."""
        return self.state.memory

    @property
    def memory_(self) -> dict | None:
        # Saved with the model (attributes ending in "_" are); setting it installs the memory.
        return None if self.state.memory is None else self.state.memory.to_dict()

    @memory_.setter
    def memory_(self, saved: dict | None) -> None:
        memory = None if saved is None else RetrievalMemory.from_dict(saved)
        if memory is not None:
            self.module.set_memory(memory.embeddings, memory.response_codes)
        self.state = self.state.replace(memory=memory)

    # ---------------------------------------------------------------- training
    @_docs.fill
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
        **trainer_kwargs: object,
    ) -> None:
        """Train the model on sets of cells, choosing its length on held-out perturbations.

        Each step draws ``batch_size`` sets of ``cell_set_size`` perturbed cells sharing
        (cell type, perturbation[, batch]), each paired with a control cell of the same cell
        type (and batch). The retrieval memory holds the training cells only. Validation holds
        out (perturbation, cell type) groups, not cells: the ``"val"`` cells of ``split_key``,
        else a ``validation_size`` fraction of the training groups (10%% by default), put back
        into the memory after training. By default training stops when the validation loss
        has not improved for ``early_stopping_patience`` checks, and the best weights are kept.

        Parameters
        ----------
        %(train_parameters)s

        Returns
        -------
        None. ``model.history`` holds ``train_loss``, ``train_energy``, ``train_mean_error``,
        their ``validation_`` counterparts and, for PT-RAG, ``train_active_ratio`` and
        ``validation_active_ratio``. If training fails or is interrupted, the model is left as
        it was before the call.
        """
        arguments = {k: v for k, v in locals().items() if k != "self"}
        if self.adata is None:
            raise ValueError(
                "This model has no AnnData attached: load it with `PTRAG.load(dir, adata=...)` "
                "to train."
            )
        written = {name: copy.deepcopy(getattr(self, name, None)) for name in _RUNNER_WRITES}
        try:
            trained = _training.train(
                self.state,
                self.module,
                self.adata,
                runner=functools.partial(self._train_runner_cls, self),
                plan_cls=self._training_plan_cls,
                **arguments,
            )
        except BaseException:
            for name, value in written.items():
                setattr(self, name, value)
            raise
        self.state = trained.state
        self.best_step_, self.best_epoch_ = trained.best_step, trained.best_epoch
        self.validation_perturbations_ = trained.validation_perturbations

    # -------------------------------------------------------------- prediction
    @_docs.fill
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

        ``adata`` may be backed (``read_h5ad(path, backed="r")``, a zarr-backed sparse ``X``, or
        a view of either): only the rows a batch needs are read, and ``output=`` writes the
        result to a new h5ad file batch by batch (see :doc:`/scaling`).

        Parameters
        ----------
        %(predict_parameters)s

        Returns
        -------
        Counterfactual mode: ``None`` (``inplace=True``; writes ``adata.layers[key_added]``), an
        ``(n_obs, n_vars)`` float32 array (``inplace=False``; CSR with ``sparse=True``), or with
        ``output`` the new file opened with ``anndata.read_h5ad(output, backed="r")``. Generation
        mode: a new :class:`~anndata.AnnData` with the prediction in ``.X`` and
        ``.layers[key_added]``; obs: the perturbation and cell-type columns,
        ``ptrag_source_cell`` (the control cell), ``ptrag_unseen_perturbation``,
        ``ptrag_unseen_cell_type``, ``ptrag_retrieval_distance`` (``1 -`` the similarity of
        the candidates stage 2 kept, weighted by their selection; NaN when nothing was kept)
        and ``<key_added>_confidence`` (response memories: the Pearson correlation with the
        measured mean shift the model expects, per perturbation and cell type);
        ``uns["ptrag"]`` records the settings. Counterfactual mode in place also writes
        ``adata.obs[f"{key_added}_confidence"]`` (NaN for control cells; replaced only with
        ``overwrite=True``). Predictions are non-negative and never exceed the largest value
        each gene reaches in the training data.
        """
        options = {
            k: v for k, v in locals().items() if k not in ("self", "adata", "perturbations")
        }
        adata = model_input(self, adata)
        return _predict.predict(self.state, self.module, adata, perturbations, **options)

    def add_perturbation_embeddings(
        self, embeddings: pd.DataFrame, *, overwrite: bool = False
    ) -> None:
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
        encoder = self.state.encoder
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
        table = pd.concat([encoder.table.drop(index=clash), new])
        encoder = PerturbationEncoder(table, sep=encoder.sep)
        self.state = self.state.replace(encoder=encoder)
        self.init_params_["non_kwargs"]["perturbation_embeddings"] = table

    # ---------------------------------------------------------- introspection
    def get_perturbation_embedding(self, perturbations: Sequence[str]) -> pd.DataFrame:
        """Embedding vectors used for ``perturbations`` (combinations summed).

        Returns
        -------
        DataFrame indexed by perturbation label, one column per embedding dimension.
        """
        labels = [perturbations] if isinstance(perturbations, str) else perturbations
        labels = [str(p) for p in labels]
        index = pd.Index(labels, name="perturbation")
        embedded = self.state.encoder.embed(labels)
        return pd.DataFrame(embedded, index=index, columns=self.state.encoder.table.columns)

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
        ``selected`` (``selected_fraction > 0.5``), and, with a response memory, ``confidence``
        (the query's confidence, as in :meth:`predict`) and ``reliability`` (the scale of the
        stacked evidence for the query: its cell type's trust times its gate; NaN for a query
        measured in training, whose evidence is its own entry's).
        """
        adata = model_input(self, adata)
        return _predict.retrieval_table(
            self.state, self.module, perturbations, cell_type, adata, n_cells, seed
        )
