"""Gene symbol resolution (exact, case, aliases) over the shipped NCBI Gene tables (``pp/data``);
below the data layer, re-exported by :mod:`ptrag_sc.pp`."""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.resources import files
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = ["SymbolResolution", "resolve_gene_symbols"]

#: Priority given to user-supplied aliases (preferred over the shipped table).
_USER_PRIORITY = -1


def _data_path(name: str) -> Traversable:
    """A shipped gene table (read from the package folder, without importing ``pp``)."""
    return files("ptrag_sc") / "pp" / "data" / name


@lru_cache(maxsize=1)
def gene_table() -> pd.DataFrame:
    """The shipped table of human genes (name, type, GO terms), indexed by official symbol."""
    with _data_path("gene_annotations.tsv.gz").open("rb") as fh:
        df = pd.read_csv(
            fh, sep="\t", compression="gzip", dtype=str, keep_default_na=False, na_values=[]
        )
    return df.set_index("symbol")


@lru_cache(maxsize=1)
def _alias_table() -> dict[str, tuple[tuple[str, int], ...]]:
    """Upper-case alias -> ((official symbol, priority), ...) from the shipped table."""
    with _data_path("gene_aliases.tsv.gz").open("rb") as fh:
        df = pd.read_csv(fh, sep="\t", compression="gzip", dtype={"alias": str, "symbol": str})
    out: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for alias, symbol, prio in zip(df["alias"], df["symbol"], df["priority"], strict=True):
        out[alias.upper()].append((symbol, int(prio)))
    return {k: tuple(v) for k, v in out.items()}


@lru_cache(maxsize=1)
def _official_symbols() -> dict[str, str]:
    """Upper-case official symbol -> official symbol."""
    return {s.upper(): s for s in gene_table().index}


@dataclass(frozen=True)
class SymbolResolution:
    """Result of :func:`resolve_gene_symbols`.

    Attributes
    ----------
    mapping
        Query symbol -> matching vocabulary entry, for every query that was resolved.
    method
        Query symbol -> how it was matched: ``"exact"``, ``"case"`` (case-insensitive) or
        ``"alias"`` (through an alias / previous symbol, in either direction).
    missing
        Queries without a match, in input order (ambiguous ones included).
    ambiguous
        Query -> the vocabulary entries it could equally stand for; these queries are also
        in :attr:`missing`.
    """

    mapping: dict[str, str]
    method: dict[str, str]
    missing: list[str]
    ambiguous: dict[str, list[str]] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """One row per query: ``match`` (``None`` if missing) and ``method``."""
        queries = list(self.mapping) + [q for q in self.missing if q not in self.mapping]
        return pd.DataFrame(
            {
                "match": [self.mapping.get(q) for q in queries],
                "method": [
                    self.method.get(q, "ambiguous" if q in self.ambiguous else "missing")
                    for q in queries
                ],
            },
            index=pd.Index(queries, name="query"),
        )

    def __repr__(self) -> str:
        n_alias = sum(m == "alias" for m in self.method.values())
        return (
            f"SymbolResolution({len(self.mapping)} matched ({n_alias} via alias), "
            f"{len(self.missing)} missing)"
        )


def _as_str_list(values: Iterable[object], what: str) -> list[str]:
    if isinstance(values, str):
        raise TypeError(f"`{what}` must be a collection of gene symbols, not a single string.")
    out = list(values)
    bad = [v for v in out if not isinstance(v, str) or not v.strip()]
    if bad:
        shown = ", ".join(repr(v) for v in bad[:10])
        raise ValueError(
            f"`{what}` contains {len(bad)} entries that are not gene symbols: {shown}"
        )
    return out


def _format_list(items: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items) - limit} more)"


def resolve_gene_symbols(
    symbols: Iterable[str],
    vocabulary: Iterable[str] | pd.DataFrame | pd.Series,
    *,
    aliases: bool | Mapping[str, str | Sequence[str]] = True,
    warn: bool = True,
) -> SymbolResolution:
    """Match gene symbols (e.g. perturbation labels) to the entries of a vocabulary.

    Each query is matched, in this order, (1) exactly, (2) case-insensitively and ignoring
    surrounding whitespace (in queries and vocabulary alike: ``" stat1 "`` finds ``STAT1``), (3)
    through
    gene aliases and previous symbols, in both directions: an old label finds the current
    symbol (``AARS`` -> ``AARS1``, ``KIAA1804`` -> ``MAP3K21``) and a current label finds an
    old vocabulary entry (``MAP3K21`` -> ``KIAA1804``). An official symbol is never re-read as
    an alias of a different gene. When an alias points to several genes present in the
    vocabulary, curated renames are preferred (``SARS`` -> ``SARS1``, not ``SARS2``); if that
    does not decide, the query is reported as ambiguous and left unmatched.

    Parameters
    ----------
    symbols
        Gene symbols to resolve (duplicates are resolved once).
    vocabulary
        The available symbols: a list / Index, or a DataFrame / Series whose index holds them
        (e.g. the table returned by :func:`~ptrag_sc.pp.read_gene_embeddings`).
    aliases
        ``True`` uses the alias table shipped with the package (NCBI Gene aliases and previous
        symbols from Bioconductor org.Hs.eg.db 3.16, plus a few curated GEARS-era renames);
        ``False`` matches exact and case-insensitive only; a mapping ``alias -> symbol(s)``
        is used in addition to (and in preference to) the shipped table.
    warn
        Emit a :class:`UserWarning` naming the queries that have no match.

    Returns
    -------
    A :class:`SymbolResolution` with ``mapping`` (query -> vocabulary entry), ``method``,
    ``missing`` and ``ambiguous``.

    Examples
    --------
    >>> import ptrag_sc
    >>> res = ptrag_sc.pp.resolve_gene_symbols(
    ...     ["KIAA1804", "aars", "SGK1", "NOT_A_GENE"], ["MAP3K21", "AARS1", "SGK1"], warn=False
    ... )
    >>> res.mapping
    {'KIAA1804': 'MAP3K21', 'aars': 'AARS1', 'SGK1': 'SGK1'}
    >>> res.missing
    ['NOT_A_GENE']
    """
    if isinstance(vocabulary, pd.DataFrame | pd.Series):
        vocabulary = vocabulary.index
    vocab = _as_str_list(vocabulary, "vocabulary")
    queries = list(dict.fromkeys(_as_str_list(symbols, "symbols")))

    vocab_set = set(vocab)
    by_upper: dict[str, list[str]] = defaultdict(list)
    for v in dict.fromkeys(vocab):
        by_upper[v.strip().upper()].append(v)

    base: Mapping[str, tuple[tuple[str, int], ...]] = {}
    user: dict[str, list[tuple[str, int]]] = {}
    official: Mapping[str, str] = {}
    if aliases is not False:
        official = _official_symbols()
        base = _alias_table()
        if isinstance(aliases, Mapping):
            for alias, targets in aliases.items():
                listed = [targets] if isinstance(targets, str) else list(targets)
                user.setdefault(str(alias).upper(), []).extend(
                    (str(t), _USER_PRIORITY) for t in listed
                )

    def canonical(upper: str) -> list[tuple[str, int]]:
        """Official symbols (upper case) a label may stand for, with priorities."""
        if upper in official:
            return [(upper, _USER_PRIORITY - 1)]
        cands = user.get(upper, []) + list(base.get(upper, ()))
        return [(s.upper(), p) for s, p in cands]

    @lru_cache(maxsize=1)
    def vocab_index() -> dict[str, list[str]]:
        """Vocabulary entries by the official symbol they stand for (best priority only)."""
        index: dict[str, list[str]] = defaultdict(list)
        for upper, entries in by_upper.items():
            cands = canonical(upper)
            best = min((p for _, p in cands), default=None)
            targets = {s for s, p in cands if p == best}
            if len(targets) == 1:
                index[targets.pop()].extend(entries)
        return index

    mapping: dict[str, str] = {}
    method: dict[str, str] = {}
    ambiguous: dict[str, list[str]] = {}
    missing: list[str] = []
    for q in queries:
        if q in vocab_set:
            mapping[q], method[q] = q, "exact"
            continue
        upper = q.strip().upper()
        same_case = by_upper.get(upper, [])
        if len(same_case) == 1:
            mapping[q], method[q] = same_case[0], "case"
            continue
        if len(same_case) > 1:
            ambiguous[q] = list(same_case)
            missing.append(q)
            continue
        found: list[str] = []
        if aliases is not False:
            index = vocab_index()
            cands = [(s, p) for s, p in canonical(upper) if s in index]
            if cands:
                best = min(p for _, p in cands)
                for s in dict.fromkeys(s for s, p in cands if p == best):
                    found.extend(index[s])
                found = list(dict.fromkeys(found))
                if len(found) > 1:
                    # several vocabulary entries for one gene: prefer the official symbol itself
                    offi = [f for f in found if f.strip().upper() in official]
                    found = offi if len(offi) == 1 else found
        if len(found) == 1:
            mapping[q], method[q] = found[0], "alias"
        else:
            if len(found) > 1:
                ambiguous[q] = found
            missing.append(q)

    if warn and missing:
        amb = [f"{q} ({' / '.join(ambiguous[q])})" for q in missing if q in ambiguous]
        msg = (
            f"{len(missing)} of {len(queries)} gene symbols have no match in the vocabulary: "
            f"{_format_list(missing)}."
        )
        if amb:
            msg += f" Ambiguous: {_format_list(amb)}."
        warnings.warn(msg, UserWarning, stacklevel=2)
    return SymbolResolution(mapping=mapping, method=method, missing=missing, ambiguous=ambiguous)
