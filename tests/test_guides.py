"""Guide assignment (``pp.assign_guides``): the rule, its outputs and errors, on toy and real data."""

from __future__ import annotations

import doctest
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import SHARED_DATA

from ptrag_sc import pp
from ptrag_sc.pp import _guides

PAPALEXI = (SHARED_DATA / "papalexi2021_thp1_sceptredata/papalexi2021_thp1_lowmoi_299genes.h5ad")

# One row per case: counts of guides (A1, A2, B1, NT1) and the expected (status, guide).
CASES = [
    ([10, 2, 0, 0], "assigned", "A1"),  # 10 >= 5 and 10 >= 3 * 2
    ([6, 2, 0, 0], "assigned", "A1"),  # exactly at the ratio
    ([5, 0, 0, 0], "assigned", "A1"),  # exactly at min_umi, no second guide
    ([0, 0, 0, 7], "assigned", "NT1"),  # control guide
    ([10, 4, 0, 0], "multiplet", None),  # 10 < 3 * 4 (second guide of the same gene)
    ([0, 0, 9, 9], "multiplet", None),  # tie
    ([4, 0, 0, 0], "unassigned", None),  # below min_umi
    ([4, 4, 0, 0], "unassigned", None),  # below min_umi, whatever the ratio
    ([0, 0, 0, 0], "unassigned", None),  # no guide UMI at all
    ([1, 0, 30, 2], "assigned", "B1"),  # top guide is not the first column
]
GUIDES = ["A1", "A2", "B1", "NT1"]
TARGETS = ["GENEA", "GENEA", "GENEB", "non-targeting"]


def toy(fmt: str = "dense", cases=CASES) -> ad.AnnData:
    counts = np.array([c[0] for c in cases], dtype=np.float32)
    X = {"dense": counts, "csr": sp.csr_matrix(counts), "csc": sp.csc_matrix(counts), "csr_array": sp.csr_array(counts)}[fmt]
    var = pd.DataFrame({"target_gene": TARGETS}, index=GUIDES)
    return ad.AnnData(X, obs=pd.DataFrame(index=[f"c{i}" for i in range(len(cases))]), var=var)


@pytest.mark.parametrize("fmt", ["dense", "csr", "csc", "csr_array"])
def test_rule_on_every_case(fmt):
    guides = toy(fmt)
    assert pp.assign_guides(guides) is None
    obs = guides.obs
    status = [c[1] for c in CASES]
    assert obs["guide_status"].tolist() == status
    expected_guide = [c[2] if c[2] else c[1] for c in CASES]
    assert obs["guide_id"].astype(str).tolist() == expected_guide
    target_of = dict(zip(GUIDES, TARGETS, strict=True))
    assert obs["guide_target"].astype(str).tolist() == [target_of[c[2]] if c[2] else c[1] for c in CASES]
    counts = np.array([c[0] for c in CASES], dtype=float)
    np.testing.assert_array_equal(obs["guide_top_umi"], np.sort(counts, 1)[:, -1])
    np.testing.assert_array_equal(obs["guide_second_umi"], np.sort(counts, 1)[:, -2])
    assert list(obs["guide_status"].cat.categories) == ["assigned", "unassigned", "multiplet"]


def _reference(counts: np.ndarray, min_umi: float, min_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell loop, the obvious way, to check the vectorised implementation."""
    status, guide = [], []
    for row in counts:
        order = np.argsort(-row, kind="stable")
        top, second = row[order[0]], (row[order[1]] if row.size > 1 else 0.0)
        if top < min_umi:
            status.append("unassigned")
            guide.append(-1)
        elif top >= min_ratio * second and top > second:
            status.append("assigned")
            guide.append(order[0])
        else:
            status.append("multiplet")
            guide.append(-1)
    return np.array(status), np.array(guide)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize(("min_umi", "min_ratio"), [(5, 3.0), (1, 1.0), (2.5, 1.5)])
def test_matches_a_per_cell_reference(sparse, min_umi, min_ratio):
    rng = np.random.default_rng(0)
    # Small integers so that ties and near-threshold cells are frequent.
    counts = rng.poisson(1.0, (400, 7)) * rng.integers(0, 2, (400, 7))
    counts[np.arange(400), rng.integers(0, 7, 400)] += rng.integers(0, 15, 400)
    counts = counts.astype(np.float32)
    var = pd.DataFrame({"target_gene": [f"G{i // 2}" for i in range(6)] + ["non-targeting"]}, index=[f"g{i}" for i in range(7)])
    guides = ad.AnnData(sp.csr_matrix(counts) if sparse else counts, var=var)
    result = pp.assign_guides(guides, min_umi=min_umi, min_ratio=min_ratio, inplace=False)
    status, guide = _reference(counts, min_umi, min_ratio)
    assert (result["guide_status"].astype(str).to_numpy() == status).all()
    assigned = status == "assigned"
    assert (result["guide_id"].astype(str).to_numpy()[assigned] == guides.var_names.to_numpy()[guide[assigned]]).all()
    assert {"unassigned", "multiplet", "assigned"} <= set(status)  # every branch is exercised


def test_controls_labels_and_prefix():
    guides = toy()
    guides.var["target_gene"] = ["GENEA", "GENEA", "safe-targeting", "non-targeting"]
    result = pp.assign_guides(
        guides,
        control_targets=("non-targeting", "safe-targeting"),
        control_group="ctrl",
        unassigned="none",
        multiplet="double",
        key_added="sg",
        inplace=False,
    )
    assert list(result.columns) == ["sg_id", "sg_target", "sg_top_umi", "sg_second_umi", "sg_status"]
    assert result["sg_target"].astype(str).tolist() == [
        "GENEA", "GENEA", "GENEA", "ctrl", "double", "double", "none", "none", "none", "ctrl"
    ]
    assert set(result["sg_status"].astype(str)) == {"assigned", "none", "double"}
    assert "sg_id" not in guides.obs  # inplace=False leaves the AnnData alone
    # a single string is one control target, not a list of characters
    single = pp.assign_guides(toy(), control_targets="non-targeting", inplace=False)
    assert (single["guide_target"] == "non-targeting").sum() == 1


def test_copy_and_layer():
    guides = toy("csr")
    guides.layers["umi"] = guides.X.copy()
    guides.X = sp.csr_matrix(guides.shape, dtype=np.float32)
    out = pp.assign_guides(guides, layer="umi", copy=True)
    assert isinstance(out, ad.AnnData)
    assert "guide_status" in out.obs
    assert "guide_status" not in guides.obs
    assert out.obs["guide_status"].tolist() == [c[1] for c in CASES]
    # from X (all zero) every cell is unassigned
    pp.assign_guides(guides)
    assert (guides.obs["guide_status"] == "unassigned").all()


def test_duplicated_obs_names_are_written_by_position():
    guides = toy()
    guides.obs_names = ["same"] * guides.n_obs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pp.assign_guides(guides)
    assert guides.obs["guide_status"].tolist() == [c[1] for c in CASES]


def test_warns_without_control_guides():
    guides = toy()
    with pytest.warns(UserWarning, match="No guide targets any of"):
        pp.assign_guides(guides, control_targets=("NT",))


@pytest.mark.parametrize(
    ("change", "kwargs", "error", "match"),
    [
        (None, {"target_key": "gene"}, KeyError, r"target_key='gene'.*Existing columns: \['target_gene'\]"),
        (None, {"min_ratio": 0.5}, ValueError, "`min_ratio` must be at least 1"),
        (None, {"min_ratio": float("nan")}, ValueError, "`min_ratio` must be finite"),
        (None, {"min_umi": 0}, ValueError, "`min_umi` must be positive"),
        (None, {"min_umi": "five"}, TypeError, "`min_umi` must be a number"),
        (None, {"layer": "umi"}, KeyError, r"`layer='umi'` is not in `guides.layers`"),
        (None, {"copy": True, "inplace": False}, ValueError, "cannot be combined"),
        (None, {"multiplet": "unassigned"}, ValueError, "must differ"),
        (None, {"multiplet": "GENEA"}, ValueError, "`multiplet='GENEA'` is the target of a guide"),
        (None, {"unassigned": "A1"}, ValueError, "`unassigned='A1'` is the name of a guide"),
        (None, {"unassigned": "non-targeting"}, ValueError, "equals `control_group`"),
        (None, {"unassigned": "assigned"}, ValueError, "status of assigned cells"),
        ("negative", {}, ValueError, r"`guides.X` holds negative guide counts in 1\+ cell\(s\) \(first rows: \[2\]"),
        ("nan", {}, ValueError, r"NaN or infinite guide counts .* \[2\]"),
        ("no_target", {}, ValueError, r"no target for 1 guide\(s\): B1"),
    ],
)
@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_errors_name_the_argument(change, kwargs, error, match, fmt):
    guides = toy()
    if change == "negative":
        guides.X[2, 1] = -1
    elif change == "nan":
        guides.X[2, 3] = np.nan
    elif change == "no_target":
        guides.var.loc["B1", "target_gene"] = None
    if fmt == "csr":
        guides.X = sp.csr_matrix(guides.X)
    with pytest.raises(error, match=match):
        pp.assign_guides(guides, **kwargs)
    assert "guide_status" not in guides.obs


def test_rejects_non_anndata():
    with pytest.raises(TypeError, match="guide modality"):
        pp.assign_guides(np.zeros((3, 2)))


def test_docstring_example():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = doctest.testmod(_guides, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


# Figures of the data's PROVENANCE.md (rule top >= 5 & top >= 3 * second).
PAPALEXI_TARGETS = {
    "non-targeting": 2241, "IFNGR1": 1217, "IFNGR2": 1157, "CD86": 1119, "IRF1": 1040, "ATF2": 1034,
    "JAK2": 989, "MARCH8": 921, "TNFRSF14": 888, "CAV1": 835, "ETV7": 796, "CMTM6": 762, "NFKBIA": 715,
    "STAT2": 625, "STAT5A": 618, "POU2F2": 607, "SMAD4": 597, "PDCD1LG2": 591, "IRF7": 531, "UBE2L6": 487,
    "STAT3": 472, "STAT1": 404, "BRD4": 324, "CUL3": 244, "MYC": 93, "SPI1": 44,
}  # fmt: skip


def papalexi_guides(raw: ad.AnnData) -> ad.AnnData:
    var = pd.DataFrame({"target_gene": np.asarray(raw.uns["grna_target"]).astype(str)}, index=np.asarray(raw.uns["grna_ids"]).astype(str))
    return ad.AnnData(raw.obsm["grna_counts"], obs=pd.DataFrame(index=raw.obs_names), var=var)


@pytest.mark.skipif(not PAPALEXI.exists(), reason="Papalexi 2021 test data not available")
def test_papalexi_assignment_matches_provenance():
    raw = ad.read_h5ad(PAPALEXI)
    guides = papalexi_guides(raw)
    assert sp.issparse(guides.X)
    assert guides.shape == (20729, 110)
    pp.assign_guides(guides)
    obs = guides.obs
    assert obs["guide_status"].value_counts().to_dict() == {"assigned": 19351, "multiplet": 1378, "unassigned": 0}
    assert round(19351 / 20729, 4) == 0.9335  # "keeps 93% of cells"
    assigned = obs["guide_status"] == "assigned"
    assert obs.loc[assigned, "guide_target"].astype(str).value_counts().to_dict() == PAPALEXI_TARGETS
    assert "CD274" not in set(obs["guide_target"])  # its 3 guides are hardly ever detected
    # Top/second counts agree with the file's own columns, and so does the top guide.
    np.testing.assert_array_equal(obs["guide_top_umi"], raw.obs["grna_top_umi"])
    np.testing.assert_array_equal(obs["guide_second_umi"], raw.obs["grna_second_umi"])
    assert (obs.loc[assigned, "guide_id"].astype(str) == raw.obs.loc[assigned, "grna_top"].astype(str)).all()
    # dense input gives the same answer
    dense = pp.assign_guides(ad.AnnData(guides.X.toarray(), var=guides.var), inplace=False)
    assert (dense["guide_status"].astype(str).to_numpy() == obs["guide_status"].astype(str).to_numpy()).all()
