"""The longest parameter sections of :class:`~ptrag_sc.PTRAG`'s docstrings, filled in by
:func:`fill`.

The constructor has two dozen options, ``train`` and ``predict`` a dozen each: their
parameter reference lives here, so that the model class shows its wiring. :func:`fill` puts
each block back into its docstring at import time, in the way of scvi-tools'
``setup_anndata_dsp``: ``help()`` and the API reference show the complete docstrings.
"""

from __future__ import annotations

import inspect
from typing import TypeVar

_Documented = TypeVar("_Documented")

__all__ = ["BLOCKS", "fill"]

INIT_PARAMETERS = """\
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
    retrieval distance (``1 -`` similarity) then report this prior."""

PREDICT_PARAMETERS = """\
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
    layer. Worth it when many predicted values are 0 (the output is non-negative)."""

TRAIN_PARAMETERS = """\
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
    ``gradient_clip_val``; default clip 10)."""

#: The ``%(name)s`` fields :func:`fill` knows.
BLOCKS = {
    "init_parameters": INIT_PARAMETERS,
    "train_parameters": TRAIN_PARAMETERS,
    "predict_parameters": PREDICT_PARAMETERS,
}


def fill(obj: _Documented) -> _Documented:
    """Fill the ``%(name)s`` fields of the docstring of ``obj`` (a class or a function) from
    :data:`BLOCKS`.

    The docstring is dedented first (as ``inspect.cleandoc`` does; Sphinx and ``help()`` do the
    same), so a field stands alone on its line at the indentation of the section it belongs to.
    """
    obj.__doc__ = inspect.cleandoc(obj.__doc__) % BLOCKS
    return obj
