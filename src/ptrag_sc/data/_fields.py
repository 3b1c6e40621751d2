"""AnnData field that registers the perturbation column against a gene vocabulary."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import rich
from scvi.data.fields._dataframe_field import BaseDataFrameField

from ._perturbations import normalise_labels

if TYPE_CHECKING:
    from anndata import AnnData


def missing_obs_key_error(adata: AnnData, key: str, argument: str) -> KeyError:
    """A ``KeyError`` naming the missing obs column and listing the ones that exist."""
    columns = list(map(str, adata.obs.columns))
    return KeyError(
        f"`{argument}={key!r}` is not a column of `adata.obs`. Existing columns: "
        f"{columns[:30]}{' ...' if len(columns) > 30 else ''}."
    )


def refuse_missing(values: pd.Series, where: str, cell_names: pd.Index, hint: str = "") -> None:
    """Raise a ``ValueError`` naming the first cells where ``values`` is missing."""
    missing = values.isna().to_numpy()
    if missing.any():
        raise ValueError(
            f"{where} has missing values in {int(missing.sum())} cell(s), e.g. "
            f"{cell_names[missing][:5].tolist()}.{hint}"
        )


def read_labels(
    adata: AnnData, key: str, *, control_group: str, sep: str, refuse_empty: bool = True
) -> np.ndarray:
    """Canonical labels of ``adata.obs[key]`` (the ``perturbation_key``), refusing missing and
    (``refuse_empty``) empty ones."""
    if key not in adata.obs.columns:
        raise missing_obs_key_error(adata, key, "perturbation_key")
    hint = f" Label every cell (controls as {control_group!r})."
    refuse_missing(adata.obs[key], f"`adata.obs[{key!r}]`", adata.obs_names, hint)
    raw = adata.obs[key].astype(str).to_numpy()
    labels = normalise_labels(raw, control_group=control_group, sep=sep)
    empty = labels == ""
    if refuse_empty and empty.any():
        raise ValueError(
            f"`adata.obs[{key!r}]` has empty labels (blank or only separators) in "
            f"{int(empty.sum())} cell(s), e.g. {adata.obs_names[empty][:5].tolist()}.{hint}"
        )
    return labels


def refuse_no_controls(adata: AnnData, key: str, labels: np.ndarray, control_group: str) -> None:
    """Raise a ``ValueError`` listing the labels present when none is ``control_group``."""
    if not (labels == control_group).any():
        values = sorted(map(str, pd.unique(adata.obs[key].astype(str))))[:10]
        raise ValueError(
            f"No control cells: `control_group={control_group!r}` does not occur in "
            f"`adata.obs[{key!r}]`. Values present include {values}."
        )


class PerturbationField(BaseDataFrameField):
    """Perturbation labels in an obs column, with a control label and a combination separator.

    Labels are not turned into a closed list of categories: the model embeds them through the
    gene vocabulary, so labels unseen at registration (new genes, new combinations) stay valid
    when a trained model meets a new AnnData.

    Parameters
    ----------
    registry_key
        Key of the field in the registry.
    obs_key
        Column of ``adata.obs`` holding perturbation labels.
    control_group
        Label of control (unperturbed) cells.
    sep
        Separator of combination labels such as ``"A+B"``.
    """

    def __init__(self, registry_key: str, obs_key: str, *, control_group: str, sep: str) -> None:
        super().__init__(registry_key, obs_key, field_type="obs")
        self.control_group = control_group
        self.sep = sep

    def _labels(self, adata: AnnData) -> np.ndarray:
        options = {"control_group": self.control_group, "sep": self.sep, "refuse_empty": False}
        return read_labels(adata, self.attr_key, **options)

    def validate_field(self, adata: AnnData) -> None:
        refuse_no_controls(adata, self.attr_key, self._labels(adata), self.control_group)

    def _state(self, adata: AnnData) -> dict:
        labels = self._labels(adata)
        perturbations = np.unique(labels[labels != self.control_group]).astype(str)
        return {
            "control_group": self.control_group,
            "sep": self.sep,
            "perturbations": perturbations,
            "n_control_cells": int((labels == self.control_group).sum()),
        }

    def register_field(self, adata: AnnData) -> dict:
        self.validate_field(adata)
        return self._state(adata)

    def transfer_field(
        self, state_registry: dict, adata_target: AnnData, **kwargs: object
    ) -> dict:
        # Controls are not required here: a prediction AnnData may hold only perturbed cells
        # when the model's own training controls are used.
        self._labels(adata_target)
        return self._state(adata_target)

    def get_summary_stats(self, state_registry: dict) -> dict:
        return {"n_perturbations": len(state_registry["perturbations"])}

    def view_state_registry(self, state_registry: dict) -> rich.table.Table | None:
        table = rich.table.Table(title="Perturbation State Registry")
        table.add_column("Source Location", justify="center", style="dodger_blue1")
        table.add_column("Control group", justify="center", style="green")
        table.add_column("Perturbations", justify="center", style="dark_violet")
        table.add_row(
            f"adata.obs['{self.attr_key}']",
            str(state_registry["control_group"]),
            str(len(state_registry["perturbations"])),
        )
        return table
