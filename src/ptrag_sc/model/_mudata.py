"""MuData input for :class:`~ptrag_sc.PTRAG`: labels from guides, registration of the RNA
modality, and the RNA AnnData that a MuData argument stands for."""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scvi.utils import setup_anndata_dsp

from .._constants import (
    DEFAULT_CELL_TYPE_KEY,
    DEFAULT_CONTROL_GROUP,
    DEFAULT_PERTURBATION_KEY,
    DEFAULT_PERTURBATION_SEP,
)
from ..data._cells import expression_matrix
from ..data._checks import (
    check_categories,
    check_controls_per_cell_type,
    check_expression,
    check_setup_arguments,
)
from ..data._perturbations import normalise_labels
from ..pp._guides import GUIDE_ASSIGNED, assign_guides, guide_columns
from ._validation import check_trained

if TYPE_CHECKING:
    from mudata import MuData

logger = logging.getLogger(__name__)

_SCVI_UUID_KEY = "_scvi_uuid"


def is_mudata(data: object) -> bool:
    """Whether ``data`` is a :class:`~mudata.MuData` (without importing mudata needlessly)."""
    if isinstance(data, AnnData) or data is None:
        return False
    try:
        from mudata import MuData
    except ImportError:  # pragma: no cover - mudata comes with scvi-tools
        return False
    return isinstance(data, MuData)


def _describe(mdata: MuData) -> str:
    return ", ".join(f"{name!r} ({mod.n_obs} x {mod.n_vars})" for name, mod in mdata.mod.items())


def rna_modality(
    mdata: MuData,
    *,
    model_cls: type | None = None,
    model_adata: AnnData | None = None,
    var_names: pd.Index | None = None,
    default: str | None = None,
) -> AnnData:
    """The RNA modality of ``mdata`` that a PTRAG model reads: the one that is ``model_adata``,
    else the one registered with ``model_cls``, else the one whose genes are ``var_names``, else
    the one named ``default``; ``ValueError`` listing the modalities if none or several."""
    mods = {name: mod for name, mod in mdata.mod.items() if isinstance(mod, AnnData)}
    if any(mod is model_adata for mod in mods.values()):
        return model_adata
    if model_cls is not None:
        store = getattr(model_cls, "_setup_adata_manager_store", {})
        uuids = {name: mod.uns.get(_SCVI_UUID_KEY) for name, mod in mods.items()}
        registered = [n for n, u in uuids.items() if u in store and store[u].adata is mods[n]]
        if _the_one(registered, f"are registered with {model_cls.__name__}"):
            return mods[registered[0]]
    if var_names is not None:
        reference = pd.Index(np.asarray(var_names).astype(str))
        same = [
            n for n, mod in mods.items() if pd.Index(mod.var_names.astype(str)).equals(reference)
        ]
        if _the_one(same, "have the model's genes"):
            return mods[same[0]]
    if default is not None and default in mods:
        return mods[default]
    name = model_cls.__name__ if model_cls is not None else "PTRAG"
    raise ValueError(
        f"Cannot tell which modality of the MuData holds the RNA expression {name} reads "
        f"(modalities: {_describe(mdata)}); none is registered"
        + (" or has the model's genes" if var_names is not None else "")
        + f". Call `{name}.setup_mudata(mdata, rna_mod=...)` or pass the RNA AnnData, e.g. "
        "`mdata.mod['rna']`."
    )


def _the_one(names: list[str], what: str) -> bool:
    """Whether ``names`` holds one modality; an error naming them if several."""
    if len(names) > 1:
        raise ValueError(
            f"Several modalities of the MuData {what}: {names}. Pass the AnnData itself, e.g. "
            f"`mdata.mod[{names[0]!r}]`."
        )
    return len(names) == 1


class MuDataMixin:
    """MuData support for a model class registered on its RNA AnnData: :meth:`setup_mudata`,
    and :meth:`_resolve_adata`, which turns a MuData argument into its RNA AnnData."""

    @classmethod
    @setup_anndata_dsp.dedent
    def setup_mudata(
        cls,
        mdata: MuData,
        *,
        rna_mod: str = "rna",
        guide_mod: str | None = None,
        perturbation_key: str = DEFAULT_PERTURBATION_KEY,
        control_group: str = DEFAULT_CONTROL_GROUP,
        cell_type_key: str | None = DEFAULT_CELL_TYPE_KEY,
        batch_key: str | None = None,
        layer: str | None = None,
        perturbation_sep: str = DEFAULT_PERTURBATION_SEP,
        assign_kwargs: dict | None = None,
        overwrite: bool = False,
        excluded_cells: Literal["drop", "raise"] = "drop",
        **kwargs: object,
    ) -> None:
        """Label the cells of a MuData from its guides and register its RNA modality.

        For screens with guide capture (ECCITE-seq, CROP-seq): labels come from the guide counts
        (:func:`ptrag_sc.pp.assign_guides`) or an obs column, cells without a confident single
        guide are set aside, and the RNA modality is registered with :meth:`setup_anndata`.
        ``PTRAG(mdata)``, ``predict(mdata)`` and ``get_retrieval(adata=mdata)`` then read it.

        Parameters
        ----------
        %(param_mdata)s
        rna_mod
            Modality with the expression (non-negative log-normalised, see ``layer``).
        guide_mod
            Modality with guide UMI counts (cells x guides, ``var`` naming each guide's
            target; see ``assign_kwargs``). ``None``: the labels are already in
            ``mdata.mod[rna_mod].obs[perturbation_key]``.
        perturbation_key
            obs column of the RNA modality with the perturbation labels. With ``guide_mod`` it
            is written here (see Notes) and must not exist yet unless ``overwrite=True``.
        control_group
            Label of control cells; with ``guide_mod``, the label given to cells assigned to
            a control guide (``assign_kwargs["control_targets"]``, default
            ``"non-targeting"``).
        cell_type_key
            obs column with the cell type / cell line, in the RNA modality or in
            ``mdata.obs`` (then copied into the RNA modality). ``None``: one cell type.
        batch_key
            obs column with the batch, looked up like ``cell_type_key``.
        layer
            Layer of the RNA modality with the expression (default: its ``X``).
        perturbation_sep
            Separator of combination labels.
        assign_kwargs
            Keyword arguments of :func:`ptrag_sc.pp.assign_guides` (``min_umi``,
            ``min_ratio``, ``target_key``, ``control_targets``, ``unassigned``,
            ``multiplet``, ``layer`` of the guide modality, ``key_added``). Without
            ``guide_mod`` only ``unassigned`` and ``multiplet`` are read: the labels of
            cells to set aside.
        overwrite
            Replace an existing ``perturbation_key`` column of the RNA modality.
        excluded_cells
            Cells without a confident single guide (without ``guide_mod``: a missing,
            ``unassigned`` or ``multiplet`` label): ``"drop"`` removes them from the RNA
            modality in place (see Notes); ``"raise"`` raises an error if there are any.
        **kwargs
            Passed to :meth:`setup_anndata`.

        Raises
        ------
        TypeError
            If ``mdata`` is not a MuData, or ``modalities=`` is passed.
        KeyError
            If a modality, obs column or layer does not exist (the error lists those that do).
        ValueError
            If ``perturbation_key`` exists and ``overwrite=False``; with
            ``excluded_cells="raise"`` and cells to exclude; if a cell type with perturbed cells
            has no control; if a kept cell lacks a cell type or batch, or its column mixes
            numbers and strings; if the expression holds NaN, infinite or negative values.

        Notes
        -----
        Nothing is written before every check has passed.

        Written: the columns of the guide assignment (:func:`~ptrag_sc.pp.assign_guides`, e.g.
        ``guide_status``) in ``mdata.mod[guide_mod].obs``, for every cell;
        ``mdata.mod[rna_mod].obs[perturbation_key]`` (with ``guide_mod``: each kept cell's
        target gene, ``control_group`` for control guides); ``cell_type_key`` / ``batch_key``
        copied from ``mdata.obs`` when only there; the fields of :meth:`setup_anndata`.

        Excluded cells (unassigned, multiplets, RNA cells absent from the guide modality) never
        become a label or a control. ``"drop"`` removes them from ``mdata.mod[rna_mod]`` in
        place (as muon's ``mu.pp.filter_obs``) and calls ``mdata.update()``; the guide modality
        keeps them, its ``guide_status`` saying why. Rebuild the MuData to bring them back.

        Unlike scvi-tools' ``setup_mudata`` (one field per modality), PTRAG registers the RNA
        AnnData alone, and ``model.adata`` is that AnnData.

        Examples
        --------
        >>> import anndata as ad
        >>> import mudata as md
        >>> import numpy as np
        >>> import pandas as pd
        >>> import ptrag_sc
        >>> rng = np.random.default_rng(0)
        >>> rna = ad.AnnData(np.log1p(rng.poisson(2.0, (6, 4))).astype(np.float32))
        >>> rna.obs["cell_line"] = "THP-1"
        >>> targets = ["STAT1", "non-targeting"]
        >>> var = pd.DataFrame({"target_gene": targets}, index=["STAT1g1", "NTg1"])
        >>> counts = [[20, 0], [0, 15], [9, 8], [30, 1], [1, 0], [0, 11]]
        >>> counts = np.array(counts, dtype=np.float32)
        >>> gdo = ad.AnnData(counts, obs=pd.DataFrame(index=rna.obs_names), var=var)
        >>> mdata = md.MuData({"rna": rna, "gdo": gdo})
        >>> ptrag_sc.PTRAG.setup_mudata(mdata, guide_mod="gdo")
        >>> mdata.mod["rna"].obs["gene"].tolist()  # a multiplet and an unassigned cell dropped
        ['STAT1', 'non-targeting', 'STAT1', 'non-targeting']
        >>> mdata.mod["gdo"].obs["guide_status"].value_counts().to_dict()
        {'assigned': 4, 'unassigned': 1, 'multiplet': 1}
        """
        if not is_mudata(mdata):
            hint = f" For an AnnData use `{cls.__name__}.setup_anndata`."
            hint = hint if isinstance(mdata, AnnData) else ""
            raise TypeError(f"`mdata` must be a MuData, got {type(mdata).__name__}.{hint}")
        if "modalities" in kwargs:
            raise TypeError(
                f"`{cls.__name__}.setup_mudata` takes `rna_mod=` and `guide_mod=` instead of "
                "scvi-tools' `modalities=`: the model reads one modality (RNA), and the guide "
                "modality only provides its labels."
            )
        if excluded_cells not in ("drop", "raise"):
            raise ValueError(
                f"`excluded_cells` must be 'drop' or 'raise', not {excluded_cells!r}."
            )
        _check_modality(mdata, rna_mod, "rna_mod")
        rna = mdata.mod[rna_mod]
        mod = f"mdata.mod[{rna_mod!r}]"
        keys = {
            "perturbation_key": perturbation_key,
            "control_group": control_group,
            "cell_type_key": cell_type_key,
            "batch_key": batch_key,
            "layer": layer,
        }
        check_setup_arguments(rna, **keys, sep=perturbation_sep, where=mod)
        assign_kwargs = dict(assign_kwargs or {})
        reserved = sorted(set(assign_kwargs) & {"inplace", "copy"})
        if reserved:
            raise ValueError(
                f"`assign_kwargs` must not set {reserved}: `setup_mudata` writes the assignment "
                "itself."
            )
        if assign_kwargs.get("control_group", control_group) != control_group:
            raise ValueError(
                f"`assign_kwargs['control_group']={assign_kwargs['control_group']!r}` differs "
                f"from `control_group={control_group!r}`; set `control_group` only."
            )
        unassigned = assign_kwargs.get("unassigned", "unassigned")
        multiplet = assign_kwargs.get("multiplet", "multiplet")

        # 1. Labels of the RNA cells and which cells to set aside (nothing written to RNA yet).
        if guide_mod is not None:
            _check_modality(mdata, guide_mod, "guide_mod")
            if guide_mod == rna_mod:
                raise ValueError(f"`guide_mod` and `rna_mod` are the same modality ({rna_mod!r}).")
            if perturbation_key in rna.obs.columns and not overwrite:
                raise ValueError(
                    f"`{mod}.obs` already has a column {perturbation_key!r}. Pass "
                    "`overwrite=True` to replace it with the guide assignment, choose another "
                    "`perturbation_key`, or use it as it is with `guide_mod=None`."
                )
            guides = mdata.mod[guide_mod]
            if not guides.obs_names.is_unique:
                raise ValueError(
                    f"`mdata.mod[{guide_mod!r}]` has duplicated obs names; run "
                    "`mdata.obs_names_make_unique()`."
                )
            assign_kwargs["control_group"] = control_group
            assignment = assign_guides(guides, inplace=False, **assign_kwargs)
            columns = guide_columns(assign_kwargs.get("key_added", "guide"))
            status = assignment[columns["status"]].astype(object).reindex(rna.obs_names)
            labels = assignment[columns["target"]].astype(object).reindex(rna.obs_names).to_numpy()
            missing = status.isna().to_numpy()  # cells without guide data count as unassigned
            status = status.fillna(unassigned).to_numpy()
            keep = status == GUIDE_ASSIGNED
            where = f"the guide assignment of `mdata.mod[{guide_mod!r}]`"
        else:
            values = _obs_source(mdata, rna_mod, perturbation_key, "perturbation_key")
            labels = values[perturbation_key].astype(object).to_numpy()
            status = np.where(values[perturbation_key].isna(), unassigned, labels.astype(str))
            keep = ~np.isin(status, [unassigned, multiplet])
            missing = np.zeros(rna.n_obs, dtype=bool)
            where = f"`obs[{perturbation_key!r}]` of the RNA modality"
        n_unassigned, n_multiplets = (
            int((status == unassigned).sum()),
            int((status == multiplet).sum()),
        )
        n_excluded = int((~keep).sum())
        if n_excluded and excluded_cells == "raise":
            raise ValueError(
                f"{n_excluded} cell(s) of `{mod}` have no single perturbation ({n_unassigned} "
                f"unassigned, {n_multiplets} multiplets) in {where}. Pass `excluded_cells='drop'` "
                "to remove them from the RNA modality, or filter them first."
            )
        if not keep.any():
            raise ValueError(f"No cell of `{mod}` has a single perturbation in {where}.")

        # 2. Checks of the kept cells before anything is written.
        context = {}
        for key, argument in ((cell_type_key, "cell_type_key"), (batch_key, "batch_key")):
            if key is not None:
                context[key] = _obs_source(mdata, rna_mod, key, argument)[key]
                where_key = f"`obs[{key!r}]` (`{argument}`) of the kept cells of `{mod}`"
                check_categories(context[key][keep], where_key, rna.obs_names[keep])
        kept_labels = labels[keep].astype(str)
        normalised = normalise_labels(
            kept_labels, control_group=control_group, sep=perturbation_sep
        )
        blank = normalised == ""
        if blank.any():
            raise ValueError(
                f"{int(blank.sum())} kept cell(s) of {where} have empty labels (blank or only "
                f"separators), e.g. {rna.obs_names[keep][blank][:5].tolist()}."
            )
        if not (kept_labels == control_group).any():
            hint = (
                " Control guides are those whose target is in "
                "`assign_kwargs['control_targets']` (default ('non-targeting',))."
            )
            raise ValueError(
                f"No control cells: `control_group={control_group!r}` does not occur among the "
                f"kept cells of {where}. Labels present include {sorted(set(kept_labels))[:10]}."
                + (hint if guide_mod is not None else "")
            )
        cell_types = np.full(keep.sum(), "all")
        if cell_type_key is not None:
            cell_types = context[cell_type_key].astype(str).to_numpy()[keep]
        is_control = kept_labels == control_group
        check_controls_per_cell_type(is_control, cell_types, where=f"the kept cells of `{mod}`")
        in_layer = f"`{mod}.X`" if layer is None else f"`{mod}.layers[{layer!r}]`"
        check_expression(expression_matrix(rna, layer), where=in_layer)

        # 3. Write: the guide assignment, then drop the excluded cells, then labels and context.
        if guide_mod is not None:
            for column in assignment.columns:
                guides.obs[column] = assignment[column].values  # positional (obs names may repeat)
        if n_excluded:
            rna._inplace_subset_obs(keep)
        if guide_mod is not None or perturbation_key not in rna.obs.columns:
            rna.obs[perturbation_key] = pd.Categorical(kept_labels)
        elif isinstance(rna.obs[perturbation_key].dtype, pd.CategoricalDtype):
            rna.obs[perturbation_key] = rna.obs[perturbation_key].cat.remove_unused_categories()
        for key, values in context.items():
            if key not in rna.obs.columns:
                categorical = isinstance(values.dtype, pd.CategoricalDtype)
                rna.obs[key] = values.array[keep] if categorical else values.to_numpy()[keep]
        if n_excluded:
            with warnings.catch_warnings():  # mudata's notice about its future pull default
                warnings.filterwarnings("ignore", category=FutureWarning, module="mudata")
                mdata.update()
            logger.info(
                "setup_mudata: %d cell(s) kept; %d unassigned (%d without guide data) and %d "
                "multiplet(s) removed from mdata.mod[%r].",
                int(keep.sum()),
                n_unassigned,
                int(missing.sum()),
                n_multiplets,
                rna_mod,
            )
        cls.setup_anndata(rna, **keys, perturbation_sep=perturbation_sep, **kwargs)

    def _resolve_adata(self, adata: AnnData | MuData | None) -> AnnData | None:
        """``adata`` itself, or the RNA AnnData of a MuData (see :func:`rna_modality`)."""
        if not is_mudata(adata):
            return adata
        initialised = getattr(self, "registry_", None) is not None
        return rna_modality(
            adata,
            model_cls=type(self),
            model_adata=getattr(self, "_adata", None),
            var_names=self.var_names if initialised else None,
        )


def model_input(model: MuDataMixin, adata: AnnData | MuData | None) -> AnnData | None:
    """What a trained model's prediction reads: ``adata``, the RNA modality of a MuData, or by
    default the model's own AnnData (``None`` when it was loaded without one)."""
    adata = model._resolve_adata(adata)
    check_trained(model)
    return model.adata if adata is None else adata


def _check_modality(mdata: MuData, name: str, argument: str) -> None:
    if name not in mdata.mod:
        raise KeyError(
            f"`{argument}={name!r}` is not a modality of the MuData. Modalities: "
            f"{_describe(mdata)}."
        )
    if not isinstance(mdata.mod[name], AnnData):
        raise TypeError(
            f"`mdata.mod[{name!r}]` is a {type(mdata.mod[name]).__name__}, not an AnnData."
        )


def _obs_source(mdata: MuData, rna_mod: str, key: str, argument: str) -> pd.DataFrame:
    """The obs frame holding ``key``, aligned to the RNA cells: the RNA modality's, else
    ``mdata.obs``."""
    rna = mdata.mod[rna_mod]
    if key in rna.obs.columns:
        return rna.obs
    if key in mdata.obs.columns:
        if not mdata.obs_names.is_unique:
            raise ValueError(
                "`mdata.obs_names` are not unique; run `mdata.obs_names_make_unique()`."
            )
        return mdata.obs[[key]].reindex(rna.obs_names)
    raise KeyError(
        f"`{argument}={key!r}` is a column neither of `mdata.mod[{rna_mod!r}].obs` "
        f"({list(map(str, rna.obs.columns))[:30]}) nor of `mdata.obs` "
        f"({list(map(str, mdata.obs.columns))[:30]})."
    )
