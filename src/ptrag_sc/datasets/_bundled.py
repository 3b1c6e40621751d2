"""Files shipped in ``ptrag_sc/datasets/data`` and the gene embeddings stored beside them."""

from __future__ import annotations

from importlib.resources import files

import numpy as np
import pandas as pd


def bundled(name: str):
    """A file of ``ptrag_sc/datasets/data`` (an importlib resource)."""
    return files("ptrag_sc.datasets").joinpath("data", name)


def read_gene_embeddings(name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The embeddings (symbol x dimension, float32) and their text source per symbol from a
    bundled npz written by a ``scripts/build_*.py`` (``symbols``, ``embeddings``, ``source``,
    ``matched``, ``model``)."""
    with bundled(name).open("rb") as fh, np.load(fh, allow_pickle=False) as npz:
        symbols = npz["symbols"].astype(str)
        embeddings = pd.DataFrame(
            npz["embeddings"].astype(np.float32),
            index=pd.Index(symbols, name="gene"),
            columns=[str(i) for i in range(npz["embeddings"].shape[1])],
        )
        source = pd.DataFrame(
            {
                "source": npz["source"].astype(str),
                "matched": npz["matched"].astype(str),
                "model": str(npz["model"]),
            },
            index=pd.Index(symbols, name="gene"),
        )
    return embeddings, source
