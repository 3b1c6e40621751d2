"""Files shipped in ``ptrag_sc/datasets/data`` and the gene embeddings stored beside them."""

from __future__ import annotations

from importlib.resources import files
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import os
    from importlib.resources.abc import Traversable


def bundled(name: str) -> Traversable:
    """A file of ``ptrag_sc/datasets/data`` (an importlib resource)."""
    return files("ptrag_sc.datasets").joinpath("data", name)


def write_gene_embeddings(
    path: str | os.PathLike[str], embeddings: pd.DataFrame, texts: pd.DataFrame, model: str
) -> None:
    """Write what :func:`read_gene_embeddings` reads: the embeddings (symbol x dimension) and,
    per symbol, the ``source`` and ``matched`` columns of :func:`ptrag_sc.pp.gene_texts`."""
    np.savez_compressed(
        path,
        symbols=np.array(embeddings.index, dtype=str),
        embeddings=embeddings.to_numpy(np.float32),
        source=texts.loc[embeddings.index, "source"].to_numpy(dtype=str),
        matched=texts.loc[embeddings.index, "matched"].to_numpy(dtype=str),
        model=np.array(model),
    )


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
