"""Perturbation labels: their canonical form and their gene-embedding vectors (any label whose
genes have vectors, measured or not)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._symbols import resolve_gene_symbols

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence


#: Largest absolute value accepted in a gene-embedding table.
MAX_EMBEDDING_VALUE = 1e6


def validate_embedding_table(embeddings: pd.DataFrame) -> pd.DataFrame:
    """Check a gene-embedding table and return it as a float32 frame with upper-case symbols
    (surrounding whitespace removed).

    Raises
    ------
    TypeError
        If ``embeddings`` is not a :class:`~pandas.DataFrame`.
    ValueError
        If the table is empty, has blank or duplicated symbols (after stripping and upper-casing),
        non-numeric columns, NaN/inf values, values beyond ``1e6`` in absolute value (they
        overflow the network in float32) or all-zero rows (no direction to retrieve by).
    """
    if not isinstance(embeddings, pd.DataFrame):
        raise TypeError(
            "`perturbation_embeddings` must be a pandas DataFrame indexed by gene symbol "
            f"(one row per gene, one column per dimension), got {type(embeddings).__name__}. "
            "Use `ptrag_sc.pp.read_gene_embeddings` to read GenePT files, CSV/parquet tables "
            "or dicts."
        )
    if embeddings.shape[0] == 0 or embeddings.shape[1] == 0:
        raise ValueError(
            f"`perturbation_embeddings` has shape {embeddings.shape}: it needs at least one gene "
            "(row) and one dimension (column)."
        )
    try:
        values = embeddings.to_numpy(dtype=np.float32)
    except (TypeError, ValueError) as err:
        numeric = pd.api.types.is_numeric_dtype
        columns = [c for c in embeddings.columns if not numeric(embeddings[c])]
        raise ValueError(
            f"`perturbation_embeddings` must hold numbers only; non-numeric columns: {columns[:5]}"
        ) from err
    symbols = pd.Index(embeddings.index.astype(str).str.strip().str.upper(), name="gene")
    if (symbols == "").any():
        raise ValueError(
            f"`perturbation_embeddings` has {int((symbols == '').sum())} blank gene symbol(s) in "
            "its index."
        )
    duplicated = symbols[symbols.duplicated()].unique().tolist()
    if duplicated:
        raise ValueError(
            f"`perturbation_embeddings` has duplicated gene symbols (case-insensitive): "
            f"{duplicated[:10]}."
        )
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        raise ValueError(
            f"`perturbation_embeddings` has NaN or infinite values for {int(bad.sum())} gene(s), "
            f"e.g. {symbols[bad][:10].tolist()}."
        )
    huge = np.abs(values).max(axis=1) > MAX_EMBEDDING_VALUE
    if huge.any():
        raise ValueError(
            f"`perturbation_embeddings` has values up to {float(np.abs(values).max()):.3g} (rows "
            f"{symbols[huge][:10].tolist()}): beyond {MAX_EMBEDDING_VALUE:.0e} they overflow the "
            "network in float32. Rescale the table (e.g. divide each row by its norm)."
        )
    zero = ~np.any(values != 0, axis=1)
    if zero.any():
        raise ValueError(
            f"`perturbation_embeddings` has all-zero rows for {symbols[zero][:10].tolist()}: a "
            "zero vector has no direction for cosine retrieval. Drop these rows (GenePT files "
            "carry such a row for 'ctrl')."
        )
    return pd.DataFrame(values, index=symbols, columns=[str(c) for c in embeddings.columns])


class PerturbationEncoder:
    """Map perturbation labels (``"A"``, ``"A+B"``) to embedding vectors.

    A label present in the table (for example a user-supplied vector for ``"A+B"``) uses its
    own row; otherwise a combination is the sum of its members' rows. A gene missing from the
    table is looked up under its aliases (:func:`ptrag_sc.pp.resolve_gene_symbols`), so an old
    label such as ``KIAA1804`` finds ``MAP3K21``'s vector.

    Parameters
    ----------
    embeddings
        Gene-embedding table, validated by :func:`validate_embedding_table`.
    sep
        Separator of combination labels.
    aliases
        Resolve missing genes through the shipped alias table.
    """

    def __init__(self, embeddings: pd.DataFrame, *, sep: str = "+", aliases: bool = True) -> None:
        self.table = validate_embedding_table(embeddings)
        self.sep = sep
        self.aliases = aliases
        self._row = pd.Series(np.arange(self.table.shape[0]), index=self.table.index)
        self._values = self.table.to_numpy()
        self._resolved: dict[str, str | None] = {}

    def _symbol(self, gene: str) -> str | None:
        """``gene`` or its current name (alias table) in the table; ``None`` without a vector."""
        if gene in self._row.index:
            return gene
        if not self.aliases:
            return None
        if gene not in self._resolved:
            mapping = resolve_gene_symbols([gene], self.table.index, warn=False).mapping
            self._resolved[gene] = mapping.get(gene)
        return self._resolved[gene]

    @property
    def n_dims(self) -> int:
        """Dimension of the embedding vectors."""
        return self._values.shape[1]

    def members(self, label: str) -> list[str]:
        """Gene symbols of a perturbation label (upper-cased, stripped)."""
        return label_members(label, self.sep)

    def missing(self, labels: Iterable[str]) -> dict[str, list[str]]:
        """Labels that cannot be embedded, with their genes that lack a vector."""
        out: dict[str, list[str]] = {}
        for label in pd.unique(np.asarray(list(labels), dtype=object)):
            if str(label).upper() in self._row.index:
                continue
            absent = [m for m in self.members(label) if self._symbol(m) is None]
            if absent or not self.members(label):
                out[str(label)] = absent or [str(label)]
        return out

    def check(self, labels: Iterable[str], *, context: str = "") -> None:
        """Raise a ``ValueError`` naming the perturbations (and genes) without an embedding."""
        missing = self.missing(labels)
        if missing:
            genes = sorted({g for gs in missing.values() for g in gs})
            examples = ", ".join(
                f"{k!r} (no vector for {v})" for k, v in list(missing.items())[:5]
            )
            raise ValueError(
                f"{len(missing)} perturbation(s){context} have no gene embedding: {examples}"
                f"{' ...' if len(missing) > 5 else ''}. {len(genes)} gene(s) are missing from "
                f"`perturbation_embeddings` (e.g. {genes[:10]}), also under their aliases. Add "
                "their vectors (e.g. with `ptrag_sc.pp.embed_gene_text`, then "
                "`model.add_perturbation_embeddings`) or drop those cells; they are never "
                "replaced by zeros."
            )

    def embed(self, labels: Sequence[str]) -> np.ndarray:
        """Embedding of each label, shape ``(len(labels), n_dims)``, float32."""
        labels = np.asarray(labels, dtype=object)
        uniques, inverse = np.unique(labels.astype(str), return_inverse=True)
        self.check(uniques)
        vectors = np.empty((len(uniques), self.n_dims), dtype=np.float32)
        for i, label in enumerate(uniques):
            own = label.upper()
            if own in self._row.index:
                vectors[i] = self._values[self._row[own]]
            else:
                symbols = [self._symbol(m) for m in self.members(label)]
                vectors[i] = self._values[self._row[symbols].to_numpy()].sum(axis=0)
        return vectors[inverse]


def label_members(label: str, sep: str) -> list[str]:
    """Gene symbols of a perturbation label (upper-cased, stripped)."""
    return [m.strip().upper() for m in str(label).split(sep) if m.strip()]


def normalise_label(label: str, *, control_group: str, sep: str = "+") -> str:
    """The canonical form of one perturbation label (see :func:`normalise_labels`)."""
    text = str(label).strip()
    if text == str(control_group).strip():
        return control_group
    members = label_members(text, sep)
    genes = [m for m in members if m != str(control_group).strip().upper()]
    if not genes:
        return control_group if members else ""
    return sep.join(sorted(dict.fromkeys(genes)))


def normalise_labels(
    labels: Iterable[str] | np.ndarray, *, control_group: str, sep: str = "+"
) -> np.ndarray:
    """Canonical perturbation labels, as the model groups and embeds them.

    One rule: surrounding whitespace is removed (also around the members of a combination);
    the control label (compared without surrounding whitespace) becomes ``control_group``;
    gene symbols are upper-cased, as the embedding table's are (aliases such as ``KIAA1804``
    are resolved when embedding, not here); control members of a combination are dropped
    (``"A+non-targeting"`` is ``"A"``); the members of a combination are de-duplicated and
    sorted, so ``"B+A"`` is ``"A+B"``. A label with no member (blank, or separators only)
    becomes ``""``, which :meth:`~ptrag_sc.PTRAG.setup_anndata` refuses.

    Returns
    -------
    Object array of the labels' canonical forms.
    """
    values = np.asarray(labels, dtype=object)
    # Hashing, not sorting, finds the distinct labels; only when all are strings, as two
    # non-string values may be equal (1 == 1.0) while their text differs ("1", "1.0").
    codes, uniques = pd.factorize(values.ravel(), use_na_sentinel=False)
    if not all(isinstance(u, str) for u in uniques):
        values = values.astype(str)
        uniques, codes = np.unique(values, return_inverse=True)
    canonical = np.array(
        [normalise_label(u, control_group=control_group, sep=sep) for u in uniques], dtype=object
    )
    return canonical[codes.ravel()].reshape(values.shape)
