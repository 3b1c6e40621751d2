"""A minimal network of STATE's shape, for side-by-side speed measurements.

Follows the State Transition model of Adduri et al. (arc-state,
``StateTransitionPerturbationModel``):
MLP basal and perturbation encoders applied to every cell (the perturbation embedding is repeated
per cell), a bidirectional transformer over the cells of a set without positions, a residual in
latent space, an MLP decoder to genes with a ReLU, and geomloss' energy distance per set. Only the
shape matters here (it is the "STATE" row of ``speed.py``); it is not used by the package.
"""

from __future__ import annotations

import torch
from geomloss import SamplesLoss
from torch import nn


def build_mlp(n_in: int, n_out: int, n_hidden: int, n_layers: int) -> nn.Sequential:
    dims = [n_in] + [n_hidden] * (n_layers - 1) + [n_out]
    layers: list[nn.Module] = []
    for i in range(n_layers):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < n_layers - 1:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class StateReference(nn.Module):
    def __init__(
        self,
        n_genes: int,
        pert_dim: int,
        *,
        n_hidden: int = 128,
        n_layers: int = 4,
        n_heads: int = 8,
        n_encoder_layers: int = 2,
        n_decoder_layers: int = 2,
    ) -> None:
        super().__init__()
        self.basal_encoder = build_mlp(n_genes, n_hidden, n_hidden, n_encoder_layers)
        self.pert_encoder = build_mlp(pert_dim, n_hidden, n_hidden, n_encoder_layers)
        layer = nn.TransformerEncoderLayer(
            n_hidden,
            n_heads,
            4 * n_hidden,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.project_out = build_mlp(n_hidden, n_genes, n_hidden, n_decoder_layers)
        self.energy = SamplesLoss("energy", blur=0.05)

    def forward(self, x_ctrl: torch.Tensor, pert: torch.Tensor) -> torch.Tensor:
        basal = self.basal_encoder(x_ctrl)
        hidden = basal + self.pert_encoder(pert)  # pert: [B, S, D], repeated per cell
        return torch.relu(self.project_out(self.transformer(hidden) + basal))

    def loss(self, x_ctrl: torch.Tensor, pert: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.energy(self(x_ctrl, pert), target).mean()
