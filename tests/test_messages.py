"""Error messages name labels plainly (no ``np.str_('A172')`` reprs) and hint at a case slip."""

from __future__ import annotations

import pytest
import scvi
from conftest import SMALL_MODEL, make_small_adata

import ptrag_sc

LINES = "cell_line_0, cell_line_1, cell_line_2"


@pytest.fixture(scope="module")
def model():
    adata = make_small_adata()
    ptrag_sc.PTRAG.setup_anndata(adata)
    scvi.settings.seed = 0
    model = ptrag_sc.PTRAG(adata, perturbation_embeddings=adata.uns["gene_embeddings"], **SMALL_MODEL)
    model.train(max_steps=2)
    return model


def test_screen_cell_type_errors_are_plain(model):
    with pytest.raises(ValueError, match="did you mean") as exc:
        ptrag_sc.tl.screen(model, cell_type="CELL_LINE_0")
    message = str(exc.value)
    assert "np.str_" not in message
    assert f"(cell types with control cells: {LINES})." in message
    assert message.endswith("Cell type names are case-sensitive: did you mean cell_line_0?")
    with pytest.raises(ValueError, match=rf"3 cell types \({LINES}\): pass"):
        ptrag_sc.tl.screen(model)
    with pytest.raises(ValueError, match="No control cells of cell type") as exc:
        ptrag_sc.tl.screen(model, cell_type="liver")
    assert "did you mean" not in str(exc.value)


def test_trained_cell_types_are_listed_plainly(model):
    controls = model.adata[model.adata.obs["gene"] == "non-targeting"]
    without = controls.copy()
    del without.obs["cell_line"]
    for call in (
        lambda: model.predict(without, perturbations=[model.training_perturbations_[0]]),
        lambda: ptrag_sc.tl.screen(model, adata=without),
    ):
        with pytest.raises(ValueError, match=rf"trained: {LINES}\)"):
            call()
