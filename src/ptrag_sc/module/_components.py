"""Building blocks: MLPs, attention and the two set-transformer backbones."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp(n_in: int, n_out: int, n_hidden: int, dropout: float) -> nn.Sequential:
    """Two linear layers with GELU (and dropout) between them."""
    dropout_layer = [nn.Dropout(dropout)] if dropout > 0 else []
    return nn.Sequential(
        nn.Linear(n_in, n_hidden), nn.GELU(), *dropout_layer, nn.Linear(n_hidden, n_out)
    )


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate query and key/value projections (the many cells of
    a set and the few set-level tokens are each projected once)."""

    def __init__(self, n_hidden: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if n_hidden % n_heads:
            raise ValueError(
                f"`n_hidden` ({n_hidden}) must be divisible by `n_heads` ({n_heads})."
            )
        self.n_heads = n_heads
        self.query = nn.Linear(n_hidden, n_hidden)
        self.key_value = nn.Linear(n_hidden, 2 * n_hidden)
        self.out = nn.Linear(n_hidden, n_hidden)
        self.dropout = dropout

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape
        return x.view(b, n, self.n_heads, h // self.n_heads).transpose(1, 2)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``queries`` ``[B, Q, H]`` attend to ``keys`` ``[B, T, H]``; returns ``[B, Q, H]``."""
        q = self._split(self.query(queries))
        k, v = self.key_value(keys).chunk(2, dim=-1)
        attended = F.scaled_dot_product_attention(
            q, self._split(k), self._split(v), dropout_p=self.dropout if self.training else 0.0
        )
        b, _, n, _ = attended.shape
        return self.out(attended.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    """Pre-norm feed-forward block with a residual connection."""

    def __init__(self, n_hidden: int, expansion: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(n_hidden)
        self.net = nn.Sequential(
            nn.Linear(n_hidden, expansion * n_hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(expansion * n_hidden, n_hidden),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(self.norm(x))


def _encoder_stack(
    n_hidden: int, n_layers: int, n_heads: int, dropout: float
) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        n_hidden,
        n_heads,
        dim_feedforward=4 * n_hidden,
        dropout=dropout,
        activation="gelu",
        batch_first=True,
        norm_first=True,
    )
    return nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)


class FullSetTransformer(nn.Module):
    """STATE's backbone: self-attention over all cells of a set (``O(S^2 H)`` per layer)."""

    def __init__(self, n_hidden: int, *, n_layers: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.layers = _encoder_stack(n_hidden, n_layers, n_heads, dropout)
        self.norm = nn.LayerNorm(n_hidden)

    def forward(self, cells: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``cells`` ``[B, S, H]``; ``context`` ``[B, T, H]`` is already added into the cells."""
        return self.norm(self.layers(cells))


class PooledSetTransformer(nn.Module):
    """Set transformer that does its deep work once per set instead of once per cell.

    Seed tokens pool the set by attention (PMA, Lee et al. 2019), ``n_layers`` self-attention
    layers run over them and the context tokens, and each cell reads the result back through
    one cross-attention and one feed-forward block: about one layer of work per cell. The
    output is equivariant to the order of the cells.
    """

    def __init__(
        self, n_hidden: int, *, n_layers: int, n_heads: int, n_set_tokens: int, dropout: float
    ) -> None:
        super().__init__()
        self.seeds = nn.Parameter(torch.randn(n_set_tokens, n_hidden) * n_hidden**-0.5)
        self.pool_norm = nn.LayerNorm(n_hidden)
        self.pool = MultiHeadAttention(n_hidden, n_heads, dropout)
        self.layers = _encoder_stack(n_hidden, n_layers, n_heads, dropout)
        self.token_norm = nn.LayerNorm(n_hidden)
        self.read_norm = nn.LayerNorm(n_hidden)
        self.read = MultiHeadAttention(n_hidden, n_heads, dropout)
        self.feed_forward = FeedForward(n_hidden, expansion=2, dropout=dropout)
        self.norm = nn.LayerNorm(n_hidden)

    def forward(self, cells: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``cells`` ``[B, S, H]``, ``context`` ``[B, T, H]`` -> ``[B, S, H]``."""
        seeds = self.seeds.expand(cells.shape[0], -1, -1)
        pooled = seeds + self.pool(seeds, self.pool_norm(cells))
        tokens = self.token_norm(self.layers(torch.cat([pooled, context], dim=1)))
        cells = cells + self.read(self.read_norm(cells), tokens)
        return self.norm(self.feed_forward(cells))
