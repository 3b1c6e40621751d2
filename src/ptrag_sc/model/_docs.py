"""The long parameter sections of :class:`~ptrag_sc.PTRAG`'s docstrings, put in by :func:`fill`."""

from __future__ import annotations

import inspect
from typing import TypeVar

_Documented = TypeVar("_Documented")

INIT_PARAMETERS = """\
adata
    AnnData registered with :meth:`setup_anndata`. ``None`` together with ``registry`` when
    loading a saved model without data.
registry
    Registry of a saved model (used by :meth:`load`).
perturbation_embeddings
    Gene embeddings: a :class:`~pandas.DataFrame` indexed by gene symbol (e.g. GenePT; see
    :func:`ptrag_sc.pp.read_gene_embeddings`). A combination ``"A+B"`` is the sum of its genes'
    rows unless the table has its own row. Every perturbation of ``adata`` must be embeddable.
n_hidden
    Hidden width ``H``.
n_layers
    Transformer layers.
n_heads
    Attention heads (must divide ``n_hidden``).
cell_set_size
    Cells per set ``S`` (at prediction, groups are cut into sets of at most this size). Larger
    than every training group: a warning at ``train``; more than 4 times larger: an error.
retrieval
    ``"ptrag"`` (two-stage selection), ``"vanilla"`` (cross-attention over the stage-1
    candidates) or ``"none"`` (STATE with gene embeddings).
memory
    ``"response"``: entries are training (perturbation, cell type) pairs carrying their
    measured mean shift, and the set's mean comes from this evidence. ``"embedding"``: entries
    are training perturbations carrying only their gene embedding (the paper).
n_candidates
    Stage-1 candidates per query ``K``.
sparsity_weight
    Weight of the mean keep rate in the loss (PT-RAG), ``>= 0``.
pseudobulk_weight
    Weight of the error of each set's mean shift against its group's pseudobulk shift, ``>= 0``
    (0: the energy distance alone, as the paper).
gumbel_tau
    Gumbel-Softmax temperature, ``> 0``.
context_mode
    ``"add"``: the retrieved context is added to the cell and perturbation encodings;
    ``"replace"``: it replaces them (the paper).
loss
    ``"energy"`` (energy distance) or ``"sinkhorn"`` (debiased Sinkhorn divergence, blur 0.05).
backbone
    ``"pooled"``: deep layers run over pooled set tokens; ``"full"``: STATE's self-attention
    over all cells in every layer.
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
    ``"go"`` (GO terms of human genes, shipped with the package) or ``None``: a second view of
    each perturbed gene for the evidence of a response memory; genes without annotations
    contribute nothing through it.
evidence
    The evidence sources a response memory stacks into each perturbation's mean shift, with
    non-negative weights fitted on the training perturbations (default: all of
    ``ptrag_sc.data.EVIDENCE_SOURCES``). ``()``: the context response and stage 2 alone.
learned_shift
    Let the network learn a mean shift per set. Default (``None``): only without a response
    memory.
similarity
    What stage 1 ranks memory entries by (see :doc:`/screen`): ``"embedding"`` (cosine of the
    gene embeddings, the paper), ``"go"`` (Jaccard similarity of GO terms), ``"response"``
    (cosine of the query's measured response in the other cell types with each entry's
    specific shift; response memories), or a :class:`~pandas.DataFrame` of your own prior
    (query genes as the index, candidate genes as the columns, finite, larger = more similar).
    Where the prior says nothing the embedding cosine ranks. Saved with the model;
    ``get_retrieval``'s ``similarity`` and the retrieval distance report this prior."""

PREDICT_PARAMETERS = """\
adata
    AnnData with the model's genes (in any order). Default: the training AnnData.
perturbations
    Perturbation labels to generate (generation mode).
cell_type
    Generation mode: the cell type of the control cells when ``adata`` has no cell-type
    column, or the one cell type to keep when it has.
indices
    Counterfactual mode: positions of the cells to predict (default: all).
batch_size
    Sets per forward pass (default 64).
key_added
    Layer name (counterfactual) / layer of the returned AnnData (generation).
inplace
    Counterfactual mode: write the layer (True) or return the array (False).
overwrite
    Counterfactual mode: replace an existing ``layers[key_added]`` (never the model's input
    layer) or ``output`` file.
sample_retrieval
    Sample the stage-2 selection with Gumbel noise instead of keeping ``p_keep > 0.5``.
seed
    Seed of the sampled selection and of the choice of control cells (default 0).
output
    Counterfactual mode: path of a new h5ad file to write, chunk by chunk, instead of a layer:
    ``X`` (dense float32) holds the prediction, ``obs`` is ``adata.obs`` plus
    ``ptrag_predicted`` (whether the row was predicted), ``uns["ptrag"]`` the settings. A
    failed prediction leaves no file. ``inplace`` and ``key_added`` do not apply.
sparse
    Counterfactual mode: build the layer (or the returned matrix) as a
    :class:`scipy.sparse.csr_matrix`, piece by piece, without a dense copy."""

TRAIN_PARAMETERS = """\
max_epochs
    Passes over the training groups (a group of ``n`` cells yields ``ceil(n / S)`` sets per
    pass); converted to steps.
max_steps
    Largest number of optimisation steps; takes precedence over ``max_epochs``. Default:
    1,500 (early stopping usually ends training sooner).
batch_size
    Sets per step (per device).
split_key
    obs column whose values ``"train"``, ``"val"``/``"validation"`` and ``"test"`` decide the
    split (e.g. from :func:`ptrag_sc.pp.few_shot_split`). Control cells are inputs in every
    split; only training cells enter the memory and the loss.
validation_size
    Fraction of the training (perturbation, cell type) groups held out for model selection
    when there are no validation cells; ``0`` disables validation.
early_stopping
    Stop when ``validation_loss`` stops improving. Default: on with a validation set.
early_stopping_patience
    Validation checks without improvement before stopping.
keep_best
    Restore at the end the weights of the check with the lowest ``validation_loss``
    (``model.best_step_`` records when).
check_val_every_n_steps
    Steps between validation checks (default: ``max_steps // 30``, between 10 and 50). One
    "epoch" of ``model.history`` is one such interval.
accelerator, devices
    Lightning device arguments; ``strategy="ddp"`` trains data-parallel.
plan_kwargs
    Passed to :class:`~ptrag_sc.train.PTRAGTrainingPlan` (``lr``, ``weight_decay``,
    ``optimizer``...).
**trainer_kwargs
    Passed to :class:`scvi.train.Trainer` (e.g. ``enable_progress_bar``,
    ``gradient_clip_val``; default clip 10)."""

BLOCKS = {
    "init_parameters": INIT_PARAMETERS,
    "train_parameters": TRAIN_PARAMETERS,
    "predict_parameters": PREDICT_PARAMETERS,
}


def fill(obj: _Documented) -> _Documented:
    """Fill the ``%(name)s`` fields of ``obj``'s docstring, dedented first, from :data:`BLOCKS`."""
    obj.__doc__ = inspect.cleandoc(obj.__doc__) % BLOCKS
    return obj
