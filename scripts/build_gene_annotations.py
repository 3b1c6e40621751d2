"""Build the compact gene-annotation tables shipped in ``src/ptrag_sc/pp/data``.

The installed package never reads the source tables; it reads the three small files this
script writes:

``gene_annotations.tsv.gz``
    One row per human gene (``symbol``, official full ``name``, NCBI ``type``, ``go``: the
    integer parts of up to ``--max-bp`` + ``--max-mf`` + ``--max-cc`` GO ids, most specific
    first, biological process then molecular function then cellular component).
``go_terms.tsv.gz``
    ``go`` (integer part of the GO id), ``ontology``, ``term`` for the GO terms used above.
``gene_aliases.tsv.gz``
    ``alias``, ``symbol``, ``priority`` (0: curated rename, preferred when an alias is
    ambiguous; 1: org.Hs.eg.db alias/previous symbol).

Source: the ``go_human_orghsegdb`` export of Bioconductor org.Hs.eg.db / GO.db 3.16
(Artistic-2.0; NCBI Gene records; GO annotations CC BY 4.0), see ``pp/data/ATTRIBUTION.md``.

"Most specific" means: among the gene's direct annotations (evidence ``ND`` and the three
root terms and the near-universal ``protein binding`` GO:0005515 dropped), terms that are an
``is_a``/``part_of`` ancestor of another of the gene's terms are removed, and the rest are
ordered by the number of genes annotated to the term or its descendants (fewest first).

Usage::

    python scripts/build_gene_annotations.py [--source /work/shared/data/go_human_orghsegdb]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import re
from collections import defaultdict
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "ptrag_sc" / "pp" / "data"
DEFAULT_SOURCE = Path("/work/shared/data/go_human_orghsegdb")
DEFAULT_SUMMARIES = Path(
    "/work/shared/data/genept_gene_summaries/GeneSummary_NCBI_UniProt_1915genes.json.gz"
)

#: GO roots and near-universal terms that say nothing about a gene.
EXCLUDED_TERMS = {"GO:0008150", "GO:0003674", "GO:0005575", "GO:0005515"}
#: Gene types left out (genomic regions such as deletion syndromes and enhancers).
EXCLUDED_TYPES = {"biological-region"}
#: Type priority when two NCBI records share a symbol.
TYPE_RANK = {"protein-coding": 0, "ncRNA": 1, "pseudo": 3}
ONTOLOGY_ORDER = ("BP", "MF", "CC")


def _write_tsv_gz(df: pd.DataFrame, path: Path) -> None:
    """Write a deterministic gzip TSV (mtime 0, fixed compression level)."""
    buf = io.StringIO()
    df.to_csv(buf, sep="\t", index=False, lineterminator="\n")
    with (
        open(path, "wb") as fh,
        gzip.GzipFile(filename="", mode="wb", fileobj=fh, compresslevel=9, mtime=0) as gz,
    ):
        gz.write(buf.getvalue().encode("utf-8"))


def _ancestors(parents: pd.DataFrame) -> dict[str, frozenset[str]]:
    """Transitive is_a/part_of ancestors of every GO term (within its ontology)."""
    edges = parents[parents["relationship"].isin(["isa", "part of"])]
    direct: dict[str, list[str]] = defaultdict(list)
    for child, parent in zip(edges["child"], edges["parent"], strict=True):
        direct[child].append(parent)
    memo: dict[str, frozenset[str]] = {}

    def visit(term: str) -> frozenset[str]:
        if term in memo:
            return memo[term]
        stack, seen = list(direct.get(term, ())), set()
        while stack:
            t = stack.pop()
            if t not in seen:
                seen.add(t)
                stack.extend(direct.get(t, ()))
        memo[term] = frozenset(seen)
        return memo[term]

    for term in list(direct):
        visit(term)
    return defaultdict(frozenset, memo)


def build(source: Path, summaries: Path | None, *, max_bp: int, max_mf: int, max_cc: int) -> None:
    genes = pd.read_csv(source / "genes.tsv.gz", sep="\t", dtype=str)
    aliases = pd.read_csv(source / "gene_alias.tsv.gz", sep="\t", dtype=str).dropna()
    g2go = pd.read_csv(source / "gene2go.tsv.gz", sep="\t", dtype=str)
    terms = pd.read_csv(source / "go_terms.tsv.gz", sep="\t", dtype=str)
    terms = terms[terms["go_id"].str.match(r"^GO:\d{7}$")]  # drops GO.db's "all" pseudo-term
    parents = pd.read_csv(source / "go_parents.tsv.gz", sep="\t", dtype=str)

    # --- genes: one row per symbol ------------------------------------------------------
    genes = genes[~genes["gene_type"].isin(EXCLUDED_TYPES)].copy()
    genes["_rank"] = genes["gene_type"].map(TYPE_RANK).fillna(2)
    genes["_has_ens"] = genes["ensembl_ids"].isna()
    genes["_eid"] = genes["entrez_id"].astype(int)
    genes = genes.sort_values(["symbol", "_rank", "_has_ens", "_eid"])
    genes = genes.drop_duplicates("symbol", keep="first")

    # --- GO: most specific direct terms per gene ----------------------------------------
    g2go = g2go[(g2go["evidence"] != "ND") & ~g2go["go_id"].isin(EXCLUDED_TERMS)]
    g2go = g2go.drop_duplicates(["symbol", "go_id"])
    anc = _ancestors(parents)
    # number of genes annotated to each term or a descendant (information content proxy)
    term_genes: dict[str, set[str]] = defaultdict(set)
    for sym, go in zip(g2go["symbol"], g2go["go_id"], strict=True):
        term_genes[go].add(sym)
        for a in anc[go]:
            term_genes[a].add(sym)
    n_genes = {t: len(s) for t, s in term_genes.items()}
    ontology = dict(zip(terms["go_id"], terms["ontology"], strict=True))
    caps = {"BP": max_bp, "MF": max_mf, "CC": max_cc}

    per_gene: dict[str, str] = {}
    for sym, sub in g2go.groupby("symbol", sort=True):
        direct = set(sub["go_id"])
        redundant = set().union(*(anc[t] for t in direct)) if direct else set()
        keep = [t for t in direct if t not in redundant]
        chosen: list[str] = []
        for ont in ONTOLOGY_ORDER:
            ts = sorted((t for t in keep if ontology.get(t) == ont), key=lambda t: (n_genes[t], t))
            chosen.extend(ts[: caps[ont]])
        per_gene[sym] = " ".join(str(int(t[3:])) for t in chosen)

    genes["go"] = genes["symbol"].map(per_gene).fillna("")
    # genes with GO annotations but no gene record (should not happen) are reported
    orphan = sorted(set(per_gene) - set(genes["symbol"]))
    if orphan:
        print(f"note: {len(orphan)} annotated symbols without a gene record: {orphan[:10]}")
    out_genes = genes[["symbol", "gene_name", "gene_type", "go"]].rename(
        columns={"gene_name": "name", "gene_type": "type"}
    )
    out_genes = out_genes.sort_values("symbol").reset_index(drop=True)

    used = sorted({int(x) for s in out_genes["go"] for x in s.split()})
    terms = terms[terms["go_id"].str.slice(3).astype(int).isin(used)].copy()
    terms["go"] = terms["go_id"].str.slice(3).astype(int)
    out_terms = terms[["go", "ontology", "term"]].sort_values("go").reset_index(drop=True)

    # --- aliases --------------------------------------------------------------------------
    official = set(out_genes["symbol"])
    al = aliases[aliases["symbol"].isin(official) & (aliases["alias"] != aliases["symbol"])]
    al = al.drop_duplicates(["alias", "symbol"]).assign(priority=1)
    curated = _curated_renames(summaries, al, official)
    out_alias = (
        pd.concat([curated, al[["alias", "symbol", "priority"]]], ignore_index=True)
        .drop_duplicates(["alias", "symbol"], keep="first")
        .sort_values(["alias", "priority", "symbol"])
        .reset_index(drop=True)
    )

    OUT.mkdir(parents=True, exist_ok=True)
    _write_tsv_gz(out_genes, OUT / "gene_annotations.tsv.gz")
    _write_tsv_gz(out_terms, OUT / "go_terms.tsv.gz")
    _write_tsv_gz(out_alias, OUT / "gene_aliases.tsv.gz")
    n_go = (out_genes["go"] != "").sum()
    print(
        f"genes {len(out_genes):,} ({n_go:,} with GO terms), GO terms {len(out_terms):,}, "
        f"aliases {len(out_alias):,} ({(out_alias['priority'] == 0).sum()} curated)"
    )
    for name in ("gene_annotations.tsv.gz", "go_terms.tsv.gz", "gene_aliases.tsv.gz"):
        print(f"  {name}: {(OUT / name).stat().st_size:,} bytes")


def _curated_renames(
    summaries: Path | None, aliases: pd.DataFrame, official: set[str]
) -> pd.DataFrame:
    """Renames documented by the GenePT/Scouter summary file (GEARS-era key -> described gene).

    Each text of that file starts with ``Gene Symbol <current symbol>`` while its key is the
    older name used by GEARS. A rename is added when org.Hs.eg.db cannot resolve the old name
    (e.g. ``KIAA1804 -> MAP3K21``) or resolves it to several genes (``SARS -> SARS1``, not
    ``SARS2``); it is never used to override an unambiguous org.Hs.eg.db alias (``ALG1L`` stays
    ``ALG1L1P``).
    """
    rows: list[tuple[str, str]] = []
    if summaries is not None and summaries.exists():
        data = json.loads(gzip.decompress(summaries.read_bytes()))
        n_targets = aliases.groupby("alias")["symbol"].nunique()
        for key, text in sorted(data.items()):
            m = re.match(r"Gene Symbol (\S+)", text)
            if m is None or m.group(1) == key or key in official:
                continue
            target = m.group(1)
            if target in official and n_targets.get(key, 0) != 1:
                rows.append((key, target))
    else:
        print("note: summaries file not found, no curated renames added")
    return pd.DataFrame(rows, columns=["alias", "symbol"]).assign(priority=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--summaries", type=Path, default=DEFAULT_SUMMARIES)
    parser.add_argument("--max-bp", type=int, default=8)
    parser.add_argument("--max-mf", type=int, default=4)
    parser.add_argument("--max-cc", type=int, default=3)
    args = parser.parse_args()
    build(args.source, args.summaries, max_bp=args.max_bp, max_mf=args.max_mf, max_cc=args.max_cc)


if __name__ == "__main__":
    main()
