"""AnnData field that registers the perturbation column against a gene vocabulary."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import rich
from scvi.data.fields import BaseAnnDataField

if TYPE_CHECKING:
    from anndata import AnnData


def missing_obs_key_error(adata: AnnData, key: str, argument: str) -> KeyError:
    """A ``KeyError`` naming the missing obs column and listing the ones that exist."""
    columns = list(map(str, adata.obs.columns))
    return KeyError(
        f"`{argument}={key!r}` is not a column of `adata.obs`. Existing columns: "
        f"{columns[:30]}{' ...' if len(columns) > 30 else ''}."
    )


class PerturbationField(BaseAnnDataField):
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
        super().__init__()
        self._registry_key = registry_key
        self._attr_key = obs_key
        self.control_group = control_group
        self.sep = sep

    @property
    def registry_key(self) -> str:
        return self._registry_key

    @property
    def attr_name(self) -> str:
        return "obs"

    @property
    def attr_key(self) -> str:
        return self._attr_key

    @property
    def is_empty(self) -> bool:
        return False

    def _labels(self, adata: AnnData) -> np.ndarray:
        if self.attr_key not in adata.obs.columns:
            raise missing_obs_key_error(adata, self.attr_key, "perturbation_key")
        labels = adata.obs[self.attr_key]
        if labels.isna().any():
            bad = adata.obs_names[labels.isna().to_numpy()][:5].tolist()
            raise ValueError(
                f"`adata.obs[{self.attr_key!r}]` has missing values in {int(labels.isna().sum())} "
                f"cell(s), e.g. {bad}. Label every cell (controls as {self.control_group!r})."
            )
        from ._perturbations import normalise_labels

        return normalise_labels(
            labels.astype(str).to_numpy(), control_group=self.control_group, sep=self.sep
        )

    def validate_field(self, adata: AnnData) -> None:
        labels = self._labels(adata)
        if not (labels == self.control_group).any():
            values = pd.unique(labels)
            raise ValueError(
                f"No control cells: `control_group={self.control_group!r}` does not occur in "
                f"`adata.obs[{self.attr_key!r}]`. Values present include "
                f"{sorted(map(str, values))[:10]}."
            )

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
