"""Gene description texts: curated summaries (GenePT) and annotation-based fallback texts."""

from __future__ import annotations

import gzip
import json
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from functools import lru_cache

import pandas as pd

from .._symbols import _as_str_list, _data_path, _format_list, resolve_gene_symbols
from .._symbols import gene_table as _annotations

__all__ = ["gene_text_from_annotations", "gene_texts", "read_gene_summaries"]

_ONTOLOGY_LABEL = {
    "BP": "Biological process",
    "MF": "Molecular function",
    "CC": "Cellular component",
}
_TYPE_LABEL = {
    "pseudo": "pseudogene",
    "ncRNA": "non-coding RNA gene",
    "snoRNA": "small nucleolar RNA gene",
    "snRNA": "small nuclear RNA gene",
    "rRNA": "ribosomal RNA gene",
    "tRNA": "transfer RNA gene",
    "scRNA": "small cytoplasmic RNA gene",
}
_GENE_SYMBOL_PREFIX = re.compile(r"^\s*Gene Symbol (\S+)")


@lru_cache(maxsize=1)
def _go_terms() -> dict[int, tuple[str, str]]:
    with _data_path("go_terms.tsv.gz").open("rb") as fh:
        df = pd.read_csv(fh, sep="\t", compression="gzip", dtype={"ontology": str, "term": str})
    return {int(g): (o, t) for g, o, t in zip(df["go"], df["ontology"], df["term"], strict=True)}


def _annotation_text(symbol: str, row: pd.Series, max_terms: Mapping[str, int]) -> str:
    parts = [f"Gene Symbol {symbol} {row['name']}."]
    if row["type"] in _TYPE_LABEL:
        parts.append(f"This is a {_TYPE_LABEL[row['type']]}.")
    by_ont: dict[str, list[str]] = {"BP": [], "MF": [], "CC": []}
    terms = _go_terms()
    for ont, term in (terms[int(go)] for go in row["go"].split()):
        if len(by_ont[ont]) < max_terms.get(ont, 0):
            by_ont[ont].append(term)
    parts += [f"{_ONTOLOGY_LABEL[o]}: {'; '.join(names)}." for o, names in by_ont.items() if names]
    return " ".join(parts)


def gene_text_from_annotations(
    genes: Iterable[str],
    *,
    max_terms: int | Mapping[str, int] | None = None,
    warn: bool = True,
) -> pd.Series:
    """Describe genes by symbol, official full name and Gene Ontology term names.

    This is the fallback text for genes without a curated summary. The texts follow GenePT's
    ``"Gene Symbol X ..."`` layout, e.g. ``"Gene Symbol MAP3K21 mitogen-activated protein
    kinase kinase kinase 21. Biological process: ...; .... Molecular function: ....
    Cellular component: ...."``. The annotations ship with the package (NCBI Gene full names
    and direct GO annotations from Bioconductor org.Hs.eg.db 3.16, 2022 snapshot): per gene,
    the most specific terms (ancestors of another annotated term removed, then fewest
    annotated genes first), at most 8 biological-process, 4 molecular-function and 3
    cellular-component terms; ``protein binding`` and evidence ``ND`` are left out.
    Pseudogenes and RNA genes say so.

    Parameters
    ----------
    genes
        Gene symbols; old symbols and aliases are resolved (``AARS`` -> ``AARS1``) and the
        text uses the official symbol.
    max_terms
        Cap on GO terms per ontology: an int for all three, or a mapping such as
        ``{"BP": 5, "MF": 3, "CC": 0}``. ``None`` keeps all shipped terms (8 / 4 / 3).
    warn
        Warn, naming them, about genes that are not in the annotation table.

    Returns
    -------
    :class:`pandas.Series` of texts indexed by the requested symbols (genes without an
    annotation are left out; see ``warn``).

    Examples
    --------
    >>> import ptrag_sc
    >>> texts = ptrag_sc.pp.gene_text_from_annotations(["KIAA1804", "SGK1"], max_terms=2)
    >>> print(texts["KIAA1804"][:75])
    Gene Symbol MAP3K21 mitogen-activated protein kinase kinase kinase 21. Biol
    """
    queries = list(dict.fromkeys(_as_str_list(genes, "genes")))
    if isinstance(max_terms, Mapping):
        unknown = sorted(set(max_terms) - set(_ONTOLOGY_LABEL))
        if unknown:
            raise ValueError(
                f"Unknown ontology keys in `max_terms`: {unknown}; use 'BP', 'MF' and 'CC'."
            )
        caps = {k: int(max_terms.get(k, 0)) for k in _ONTOLOGY_LABEL}
    else:
        caps = dict.fromkeys(_ONTOLOGY_LABEL, 10**6 if max_terms is None else int(max_terms))
    if any(v < 0 for v in caps.values()):
        raise ValueError(f"`max_terms` must be non-negative, got {max_terms!r}.")

    table = _annotations()
    res = resolve_gene_symbols(queries, table.index, warn=False)
    if warn and res.missing:
        warnings.warn(
            f"{len(res.missing)} genes have no annotation (symbol not found in NCBI Gene "
            f"2022, even as an alias): {_format_list(res.missing)}.",
            UserWarning,
            stacklevel=2,
        )
    texts = {
        q: _annotation_text(res.mapping[q], table.loc[res.mapping[q]], caps)
        for q in queries
        if q in res.mapping
    }
    return pd.Series(texts, dtype=object, name="text").rename_axis("gene")


def read_gene_summaries(
    source: str | os.PathLike[str] | Mapping[str, str], *, rekey: bool = True
) -> dict[str, str]:
    """Read gene summary texts (GenePT's ``NCBI_UniProt_summary_of_genes.json`` format).

    Parameters
    ----------
    source
        Path to a JSON (optionally ``.gz``) dict ``symbol -> text``, or such a dict.
    rekey
        GenePT texts start with ``"Gene Symbol <symbol>"``. Some redistributed copies re-key
        them with older names (the Scouter/GEARS copy uses ``KIAA1804`` for the
        ``MAP3K21`` text). With ``rekey=True`` each text is keyed by the symbol it
        describes; texts without the prefix keep their key.

    Returns
    -------
    dict ``symbol -> text`` (a new dict; the input is not modified).

    Examples
    --------
    >>> import ptrag_sc
    >>> summaries = ptrag_sc.pp.read_gene_summaries(
    ...     {"KIAA1804": "Gene Symbol MAP3K21 Predicted to enable kinase activity."}
    ... )
    >>> list(summaries)
    ['MAP3K21']
    """
    if isinstance(source, Mapping):
        data = dict(source)
    else:
        path = os.fspath(source)
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as fh:
            data = json.load(fh)
        if not isinstance(data, dict):
            raise ValueError(
                f"{path} must hold a JSON object symbol -> text, got {type(data).__name__}."
            )
    bad = sorted(str(k) for k, v in data.items() if not isinstance(v, str) or not v.strip())
    if bad:
        raise ValueError(
            f"Gene summaries must be non-empty strings; bad entries: {_format_list(bad)}."
        )
    if not rekey:
        return data
    out: dict[str, str] = {}
    conflicts: list[str] = []
    for key, text in data.items():
        m = _GENE_SYMBOL_PREFIX.match(text)
        new = m.group(1) if m else key
        if new in out:
            conflicts.append(f"{key} -> {new}")
        else:
            out[new] = text
    if conflicts:
        raise ValueError(
            "Several summaries describe the same gene after re-keying by their 'Gene Symbol' "
            f"prefix: {_format_list(conflicts)}. Use rekey=False."
        )
    return out


def gene_texts(
    genes: Iterable[str],
    *,
    summaries: Mapping[str, str] | None = None,
    annotations: bool = True,
    max_terms: int | Mapping[str, int] | None = None,
    warn: bool = True,
) -> pd.DataFrame:
    """Pick a description text per gene: curated summary first, annotation text otherwise.

    Parameters
    ----------
    genes
        Gene symbols (e.g. the perturbed genes of a dataset).
    summaries
        Curated texts ``symbol -> text`` (e.g. from :func:`read_gene_summaries`); symbols are
        matched with :func:`~ptrag_sc.pp.resolve_gene_symbols` (aliases and old names work).
    annotations
        Fall back on :func:`gene_text_from_annotations` for genes without a summary.
    max_terms
        Passed to :func:`gene_text_from_annotations`.
    warn
        Warn, naming them, about genes that get no text at all.

    Returns
    -------
    :class:`pandas.DataFrame` indexed by the requested symbols (genes without any text are
    left out), with columns ``text``, ``source`` (``"summary"`` or ``"annotation"``) and
    ``matched`` (the summary key or official symbol the text was taken for).

    Examples
    --------
    >>> import ptrag_sc
    >>> df = ptrag_sc.pp.gene_texts(
    ...     ["MAP3K21", "SGK1"],
    ...     summaries={"SGK1": "Gene Symbol SGK1 This gene encodes a serine/threonine kinase."},
    ... )
    >>> df["source"].tolist()
    ['annotation', 'summary']
    """
    queries = list(dict.fromkeys(_as_str_list(genes, "genes")))
    rows: dict[str, tuple[str, str, str]] = {}
    if summaries:
        res = resolve_gene_symbols(queries, list(summaries), warn=False)
        for q, key in res.mapping.items():
            rows[q] = (summaries[key], "summary", key)
    rest = [q for q in queries if q not in rows]
    if annotations and rest:
        table = _annotations()
        ann = resolve_gene_symbols(rest, table.index, warn=False)
        fallback = gene_text_from_annotations(list(ann.mapping), max_terms=max_terms, warn=False)
        for q, sym in ann.mapping.items():
            rows[q] = (fallback[q], "annotation", sym)
    missing = [q for q in queries if q not in rows]
    if warn and missing:
        warnings.warn(
            f"{len(missing)} genes have neither a summary nor an annotation text: "
            f"{_format_list(missing)}.",
            UserWarning,
            stacklevel=2,
        )
    ordered = [q for q in queries if q in rows]
    return pd.DataFrame(
        [rows[q] for q in ordered],
        index=pd.Index(ordered, name="gene"),
        columns=["text", "source", "matched"],
    )
