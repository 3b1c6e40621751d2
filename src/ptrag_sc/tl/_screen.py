"""In-silico perturbation screens: rank every gene by its predicted effect (``tl.screen``)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from .._constants import OUTPUTS, TENSORS
from .._symbols import _format_list
from .._utils import progress_bar
from ..data import normalise_labels
from ._utils import as_str_tuple

if TYPE_CHECKING:
    from ..data import ModelState, PerturbationData
    from ..model import PTRAG
    from ..module import PTRAGModule

Effect = Literal["shift_norm", "energy"]
EFFECTS: tuple[str, ...] = ("shift_norm", "energy")
#: Perturbations whose set-level work is done together (bounds memory: a few (n, G) tables each).
CHUNK_PERTURBATIONS = 1024
#: Prefix of the columns holding the predicted shift of each signature gene.
SHIFT_PREFIX = "shift_"

__all__ = ["screen"]


def screen(
    model: PTRAG,
    adata: AnnData | None = None,
    *,
    cell_type: str | Sequence[str] | None = None,
    perturbations: Sequence[str] | None = None,
    combinations: Sequence[str] | None = None,
    signature: Sequence[str] | Mapping[str, Sequence[str]] | pd.Series | None = None,
    effect: Effect = "shift_norm",
    n_cells: int = 64,
    batch_size: int = 64,
    seed: int = 0,
    return_shifts: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """In-silico screen: predict every perturbation for a cell type and rank it by its effect.

    Every requested perturbation (by default every gene with an embedding, plus
    ``combinations``) is predicted for the same ``n_cells`` control cells of the cell type and
    scored by its effect on a target ``signature`` or, without one, by the size of its predicted
    effect. One set per perturbation: with the default response memory the set's mean comes
    without decoding cells; models without one, ``learned_shift=True`` and ``effect="energy"``
    need the (slower) generative pass. See :doc:`/screen`.

    Parameters
    ----------
    model
        A trained :class:`~ptrag_sc.PTRAG`.
    adata
        AnnData (or MuData registered with ``setup_mudata``) providing the control cells, with
        the model's genes. Default: the model's training AnnData.
    cell_type
        The cell type(s) to screen (one ranking each). Default: the only cell type with control
        cells in ``adata`` (an error lists them when there are several). Required when
        ``adata`` has no cell-type column.
    perturbations
        Labels to screen. Default: every gene of ``model.perturbation_embeddings`` (measured or
        not).
    combinations
        Further labels, e.g. ``["MAPK1+SGK1"]``; members must have embeddings.
    signature
        The target phenotype, as model genes:

        - a list of genes: the score is the mean predicted shift of these genes;
        - ``{"up": [...], "down": [...]}``: the mean shift of the ``up`` genes minus the mean
          shift of the ``down`` genes (either may be omitted);
        - a :class:`~pandas.Series` gene -> weight: the weighted sum of the shifts.

        Genes the model does not predict are dropped with a warning. ``None``: the score is
        ``effect``.
    effect
        Without a signature: ``"shift_norm"``, the norm of the predicted mean shift from
        control; or ``"energy"``, the energy distance between the generated cells and their
        control cells.
    n_cells
        Control cells per perturbation, drawn once (``seed``) and shared by all perturbations;
        more than ``cell_set_size`` are cut into sets whose results are averaged.
    batch_size
        Sets per forward pass.
    seed
        Seed of the choice of control cells.
    return_shifts
        Also return the predicted mean shift of every perturbation on every gene.

    Returns
    -------
    A DataFrame, one row per (cell type, perturbation), ranked within each cell type, with
    columns

    ``cell_type``, ``perturbation``
        The screened pair (the label as requested, or the embedding table's symbol).
    ``score``, ``rank``
        The signature score (or the effect size) and its rank (1 = highest score).
    ``shift_norm``
        Norm of the predicted mean shift from control over all genes.
    ``measured_in_cell_type``
        Whether ``adata`` holds perturbed cells of this perturbation in this cell type.
    ``observed_score``
        The same score on the observed cells of a measured perturbation (for
        ``effect="energy"``, on up to ``n_cells`` of them); NaN otherwise.
    ``trained``
        Whether the model trained on this perturbation (in any cell type).
    ``retrieval_distance``
        ``1 -`` the stage-1 similarity of the kept candidates, weighted by their weight; NaN
        when nothing was kept or for ``retrieval="none"``.
    ``confidence``
        The Pearson correlation the predicted mean shift is expected to reach with a measured
        one (see ``PTRAG.predict``); NaN without a response memory.
    ``shift_<gene>``
        With a signature: the predicted mean shift of each signature gene.

    With ``return_shifts=True``, a tuple ``(table, shifts)``: the predicted mean shifts, rows in
    the table's order (indexed by perturbation, or by (cell type, perturbation) for several
    cell types), columns the model's genes.

    Examples
    --------
    >>> import ptrag_sc
    >>> ptrag_sc.settings.progress_bar = False
    >>> adata = ptrag_sc.datasets.perturbench_devel()
    >>> ptrag_sc.PTRAG.setup_anndata(adata, perturbation_key="gene", cell_type_key="cell_line")
    >>> model = ptrag_sc.PTRAG(adata, perturbation_embeddings=adata.uns["gene_embeddings"])
    >>> model.train(max_steps=20)
    >>> signature = {"up": ["CDKN1A"], "down": ["MKI67"]}
    >>> hits = ptrag_sc.tl.screen(model, cell_type="U87MG", signature=signature)
    >>> list(hits.columns[:4])
    ['cell_type', 'perturbation', 'score', 'rank']
    >>> int(hits["rank"].iloc[0])
    1
    """
    from .._checks import check_choice, positive_int
    from .._settings import settings
    from ..data._checks import check_controls_per_cell_type, check_expression
    from ..model import PTRAG as Model
    from ..model._inference import check_batch_size, context_index
    from ..model._mudata import model_input

    if not isinstance(model, Model):
        hint = ""
        if isinstance(model, AnnData):
            hint = " The model comes first: `tl.screen(model, adata, ...)`."
        raise TypeError(
            f"`model` must be a trained PTRAG model, got {type(model).__name__}.{hint}"
        )
    if adata is not None and not isinstance(adata, AnnData) and type(adata).__name__ != "MuData":
        raise TypeError(
            "`adata` must be an AnnData (or a MuData) with control cells, got "
            f"{type(adata).__name__}."
        )
    adata = model_input(model, adata)
    if adata is None:
        raise ValueError("Pass an AnnData with control cells: this model was loaded without one.")
    state, module = model.state, model.module
    check_choice("effect", effect, EFFECTS)
    n_cells = positive_int("n_cells", n_cells)
    batch_size = check_batch_size(batch_size)
    labels, shown = _requested(state, perturbations, combinations)
    weights, signature_genes = _signature_weights(signature, state.var_names)

    data = state.data(adata, require_labels=False)
    cell_types = _cell_types(state, data, cell_type)
    check_controls_per_cell_type(data.is_control, data.cell_types, where="the AnnData to screen")
    keys, (context_names, context_means) = state.builder.control_contexts(data, data.is_control)
    # Set means are known without decoding cells with a response memory and no learned shift.
    fast = effect != "energy" and module.uses_responses and not module.learned_shift
    trained = np.isin(labels.astype(str), np.asarray(state.training_perturbations).astype(str))

    tables, shift_frames = [], []
    for ct in cell_types:
        pool = np.flatnonzero(data.is_control & (data.cell_types == ct))
        # The same draw for a cell type whichever others are screened with it.
        rng = np.random.default_rng(seed)
        cells = np.sort(rng.choice(pool, size=min(n_cells, pool.size), replace=False))
        check_expression(data.expression.rows(cells).numpy(), where=f"the control cells of {ct!r}")
        shifts, energy, distance, confidence = _predicted(
            state,
            module,
            data,
            labels,
            ct,
            cells,
            context_index(context_names, keys[cells]),
            context_means,
            fast=fast,
            energy=effect == "energy" and weights is None,
            batch_size=batch_size,
            progress=settings.progress_bar and len(labels) > CHUNK_PERTURBATIONS,
        )
        observed, measured = _observed(state, data, labels, ct, cells, weights, effect)
        norm = np.linalg.norm(shifts, axis=1)
        score = shifts @ weights if weights is not None else energy if effect == "energy" else norm
        table = pd.DataFrame(
            {
                "cell_type": ct,
                "perturbation": shown,
                "score": score,
                "shift_norm": norm,
                "measured_in_cell_type": measured,
                "observed_score": observed,
                "trained": trained,
                "retrieval_distance": distance,
                "confidence": confidence,
            }
        )
        if weights is not None:
            columns = state.var_names.get_indexer(signature_genes)
            for gene, column in zip(signature_genes, columns, strict=True):
                table[SHIFT_PREFIX + gene] = shifts[:, column]
        order = np.argsort(-np.nan_to_num(table["score"].to_numpy(), nan=-np.inf), kind="stable")
        table = table.iloc[order].reset_index(drop=True)
        rank = table["score"].rank(ascending=False, method="min").astype(np.int64)
        table.insert(3, "rank", rank)
        tables.append(table)
        if return_shifts:
            shift_frames.append(pd.DataFrame(shifts[order], columns=state.var_names.copy()))
    out = pd.concat(tables, ignore_index=True)
    if not return_shifts:
        return out
    shifts = pd.concat(shift_frames, ignore_index=True)
    if len(cell_types) == 1:
        shifts.index = pd.Index(out["perturbation"].to_numpy(), name="perturbation")
    else:
        shifts.index = pd.MultiIndex.from_frame(out[["cell_type", "perturbation"]])
    return out, shifts


def _predicted(
    state: ModelState,
    module: PTRAGModule,
    data: PerturbationData,
    labels: np.ndarray,
    cell_type: str,
    cells: np.ndarray,
    context_index: np.ndarray,
    context_means: np.ndarray,
    *,
    fast: bool,
    energy: bool,
    batch_size: int,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Predicted mean shift ``(P, G)``, energy, retrieval distance and confidence ``(P,)``."""
    from ..model._inference import evaluating, run
    from ..module import energy_distance

    n_labels, n_cells = len(labels), cells.size
    sums = np.zeros((n_labels, module.n_genes), dtype=np.float64)
    energies = np.zeros(n_labels, dtype=np.float64)
    distances = np.zeros(n_labels, dtype=np.float64)
    confidences = np.full(n_labels, np.nan, dtype=np.float64)
    weights = np.zeros(n_labels, dtype=np.float64)
    with (
        evaluating(module) as device,
        progress_bar(n_labels, f"Screening {cell_type}", "perturbation", progress) as advance,
    ):
        for start in range(0, n_labels, CHUNK_PERTURBATIONS):
            chunk = labels[start : start + CHUNK_PERTURBATIONS]
            sources = np.tile(cells, len(chunk))
            groups = state.builder.prediction_groups(
                labels=np.repeat(chunk, n_cells),
                cell_types=np.full(sources.shape[0], cell_type, dtype=object),
                batches=data.batches[sources],
                context_index=np.tile(context_index, len(chunk)),
                context_means=context_means,
            )
            row_of_group = start + pd.Index(chunk).get_indexer(groups.perturbation)
            for step in run(
                module,
                device,
                groups,
                data.expression,
                sources,
                set_size=state.cell_set_size,
                batch_size=batch_size,
            ):
                control_mean = step.batch[TENSORS.CONTROL_MEAN]
                if fast:
                    mean = control_mean + step.inference[OUTPUTS.DELTA]
                    shift = torch.minimum(mean.clamp_min(0.0), module.gene_ceiling) - control_mean
                else:
                    generated = step.decode(module)
                    shift = generated[OUTPUTS.MEAN_SHIFT]
                    if energy:
                        e = energy_distance(
                            generated[OUTPUTS.PREDICTION],
                            step.batch[TENSORS.X_CTRL],
                            include_target_term=True,
                        )
                        e = e.cpu().numpy().astype(np.float64) * step.rows.shape[1]
                        np.add.at(energies, row_of_group[step.sets], e)
                size = float(step.rows.shape[1])
                rows = row_of_group[step.sets]
                np.add.at(sums, rows, shift.cpu().numpy().astype(np.float64) * size)
                np.add.at(weights, rows, size)
                np.add.at(distances, rows, step.distance * size)
                confidences[rows] = step.confidence
            advance(len(chunk))
    weights = np.maximum(weights, 1e-12)
    energies = energies / weights if energy else np.full(n_labels, np.nan)
    return (sums / weights[:, None]).astype(np.float32), energies, distances / weights, confidences


def _requested(
    state: ModelState,
    perturbations: Sequence[str] | None,
    combinations: Sequence[str] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Canonical labels to screen and the labels shown in the table."""
    extra = list(as_str_tuple(combinations) or ())
    if perturbations is not None:
        listed = list(as_str_tuple(perturbations))
        if not listed:
            raise ValueError(
                "`perturbations` is empty; pass labels, or None to screen every gene with an "
                "embedding."
            )
        shown, canonical = state.requested(listed + extra)
    else:
        # Every gene with an embedding: not the control label, and a combination also in the
        # table (e.g. an embedded "A+B" row) once.
        setup = state.setup
        shown = np.asarray([str(g) for g in state.encoder.table.index] + extra, dtype=object)
        canonical = normalise_labels(shown, control_group=setup.control_group, sep=setup.sep)
        keep = (canonical != setup.control_group) & ~pd.Index(canonical).duplicated()
        shown, canonical = state.requested(shown[keep])
    return canonical.astype(object), np.asarray(shown, dtype=object)


def _signature_weights(
    signature: Sequence[str] | Mapping[str, Sequence[str]] | pd.Series | None, var_names: pd.Index
) -> tuple[np.ndarray | None, list[str]]:
    """Weights ``(G,)`` of the signature over the model's genes and its genes (model spelling)."""
    if signature is None:
        return None, []
    # (genes, weights, whether the weights are shared out over the genes found)
    if isinstance(signature, pd.Series):
        if not pd.api.types.is_numeric_dtype(signature) or not np.all(
            np.isfinite(signature.to_numpy(dtype=float))
        ):
            raise ValueError("A `signature` Series maps genes to finite numeric weights.")
        if signature.index.has_duplicates:
            raise ValueError(
                "The `signature` Series lists genes twice: "
                f"{signature.index[signature.index.duplicated()][:5].tolist()}."
            )
        parts = [(list(map(str, signature.index)), signature.to_numpy(dtype=float), False)]
    elif isinstance(signature, Mapping):
        unknown = sorted(set(signature) - {"up", "down"})
        if unknown:
            raise ValueError(
                f"A `signature` mapping has the keys 'up' and/or 'down', got {unknown}."
            )
        parts = []
        for key, sign in (("up", 1.0), ("down", -1.0)):
            genes = list(as_str_tuple(signature.get(key)) or ())
            if genes:
                parts.append((genes, np.full(len(genes), sign), True))
        if not parts:
            raise ValueError("The `signature` mapping lists no gene under 'up' or 'down'.")
    elif isinstance(signature, str | Sequence | np.ndarray | pd.Index):
        genes = list(as_str_tuple(signature))
        if not genes:
            raise ValueError("`signature` is empty; pass genes, or None to rank by effect size.")
        parts = [(genes, np.ones(len(genes)), True)]
    else:
        raise TypeError(
            "`signature` must be a list of genes, a {'up': [...], 'down': [...]} mapping or a "
            f"pandas Series gene -> weight, got {type(signature).__name__}."
        )
    upper = pd.Index(var_names.astype(str).str.upper())
    positions = []
    for genes, _, _ in parts:
        position = var_names.get_indexer(genes)
        if not upper.has_duplicates:  # the case-insensitive match, when it is unambiguous
            position = np.where(
                position >= 0, position, upper.get_indexer([g.upper() for g in genes])
            )
        positions.append(position)
    # A gene listed twice (as written, in another case, or under 'up' and 'down') would count
    # twice.
    listed = pd.DataFrame(
        {"gene": [g for genes, _, _ in parts for g in genes], "at": np.concatenate(positions)}
    )
    repeated = listed["gene"].duplicated(keep=False) | (
        (listed["at"] >= 0) & listed["at"].duplicated(keep=False)
    )
    twice = sorted(set(listed.loc[repeated, "gene"]))
    if twice:
        raise ValueError(
            f"`signature` lists the same gene more than once: {twice[:10]}. List each gene once "
            "(for weights, pass a pandas Series gene -> weight)."
        )
    weights = np.zeros(len(var_names), dtype=np.float64)
    for (_, values, average), position in zip(parts, positions, strict=True):
        present = position >= 0
        if present.any():
            share = values[present] / (present.sum() if average else 1.0)
            np.add.at(weights, position[present], share)
    found = listed["at"].to_numpy()
    dropped = listed["gene"][found < 0].tolist()
    if not (found >= 0).any():
        raise ValueError(
            f"None of the signature genes is among the model's {len(var_names)} genes (e.g. "
            f"{dropped[:5]}); the model predicts {var_names[:5].tolist()}..."
        )
    if dropped:
        warnings.warn(
            f"{len(dropped)} signature gene(s) are not among the model's genes and are left out: "
            f"{dropped[:10]}.",
            UserWarning,
            stacklevel=3,
        )
    return weights, list(dict.fromkeys(str(var_names[p]) for p in found[found >= 0]))


def _cell_types(
    state: ModelState, data: PerturbationData, cell_type: str | Sequence[str] | None
) -> list[str]:
    """The cell types to screen (sets ``data.cell_types`` when the AnnData has no such column)."""
    from ..data import NO_CELL_TYPE

    setup = state.setup
    wanted = None if cell_type is None else list(as_str_tuple(cell_type))
    if wanted == []:
        raise ValueError("`cell_type` is empty.")
    if not data.has_cell_types:
        if setup.cell_type_key is not None:
            if wanted is None or len(wanted) != 1:
                raise ValueError(
                    f"The AnnData has no column {setup.cell_type_key!r} (`cell_type_key`): pass "
                    "one `cell_type=` naming its control cells' cell type (trained: "
                    f"{_format_list(state.training_cell_types, limit=10)})."
                )
            data.cell_types = np.full(data.n_obs, wanted[0], dtype=object)
            return wanted
        if wanted not in (None, [NO_CELL_TYPE]):
            raise ValueError(
                "The model was set up without `cell_type_key`: leave `cell_type=None` (got "
                f"{cell_type!r})."
            )
        return [NO_CELL_TYPE]
    with_controls = sorted(set(data.cell_types[data.is_control].astype(str)))
    if wanted is None:
        if len(with_controls) != 1:
            raise ValueError(
                f"The AnnData has control cells of {len(with_controls)} cell types "
                f"({_format_list(with_controls, limit=10)}): pass `cell_type=` naming the one(s) "
                "to screen."
            )
        return with_controls
    absent = [c for c in wanted if c not in with_controls]
    if absent:
        same_letters = [c for c in with_controls if c.lower() in {a.lower() for a in absent}]
        raise ValueError(
            f"No control cells of cell type(s) {absent} in `adata.obs[{setup.cell_type_key!r}]` "
            f"(cell types with control cells: {_format_list(with_controls, limit=10)})."
            + (
                f" Cell type names are case-sensitive: did you mean {_format_list(same_letters)}?"
                if same_letters
                else ""
            )
        )
    if len(set(wanted)) != len(wanted):
        raise ValueError(f"`cell_type` lists a cell type twice: {wanted}.")
    return wanted


def _observed(
    state: ModelState,
    data: PerturbationData,
    labels: np.ndarray,
    cell_type: str,
    cells: np.ndarray,
    weights: np.ndarray | None,
    effect: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Score of the observed cells of each measured label (else NaN), and which are measured."""
    from ._metrics import energy_distance

    in_type = data.cell_types == cell_type
    perturbed = in_type & ~data.is_control
    position = pd.Index(labels.astype(str)).get_indexer(data.labels.astype(str))
    code = np.where(perturbed & (position >= 0), position, -1)
    measured = np.zeros(len(labels), dtype=bool)
    measured[np.unique(code[code >= 0])] = True
    observed = np.full(len(labels), np.nan)
    if not measured.any():
        return observed, measured
    present = np.flatnonzero(measured)
    compact = np.full(len(labels), -1, dtype=np.int64)
    compact[present] = np.arange(present.size)
    codes = np.where(code >= 0, compact[np.maximum(code, 0)], -1)
    control_code = np.where(in_type & data.is_control, present.size, -1)
    means = data.means(np.where(codes >= 0, codes, control_code), present.size + 1)
    shifts = means[:-1] - means[-1]
    if weights is not None:
        observed[present] = shifts @ weights
    elif effect == "energy":
        # Sets as large as the predicted ones: the energy's V-statistic depends on the set size.
        size = cells.size // -(-cells.size // state.cell_set_size)
        rng = np.random.default_rng(0)
        controls = data.expression.rows(cells[:size]).numpy()
        for i in present:
            members = np.flatnonzero(codes == compact[i])
            chosen = np.sort(rng.choice(members, size=min(size, members.size), replace=False))
            # Half of the V-statistic: the loss' (geomloss') convention, as the predicted energies.
            observed[i] = 0.5 * energy_distance(data.expression.rows(chosen).numpy(), controls)
    else:
        observed[present] = np.linalg.norm(shifts, axis=1)
    return observed, measured
