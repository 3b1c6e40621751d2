"""Worker of ``test_ddp.py``: trains tiny models data-parallel over 2 CPU processes (gloo).

Run as ``python _ddp_worker.py STRATEGY OUT_DIR``. With ``strategy="ddp"`` Lightning starts this
script again for rank 1, as it does for any user script; every rank writes
``OUT_DIR/rank{r}.json``, and rank 0 also the predictions of the first model.
"""

import json
import os
import sys

import numpy as np
import torch


def _record(model, rank: int) -> dict:
    info = {
        "global_step": int(model.trainer.global_step),
        "best_step": model.best_step_,
        "validation_loss": float(model.trainer.callback_metrics["validation_loss"]),
    }
    if rank == 0:
        info["history"] = {k: v.iloc[:, 0].astype(float).tolist() for k, v in model.history.items()}
    return info


def main() -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import scvi
    from conftest import SMALL_MODEL, ddp_split, make_small_adata

    import ptrag_sc

    strategy, out = sys.argv[1], sys.argv[2]
    ptrag_sc.settings.progress_bar = False
    adata = make_small_adata()
    adata.obs["split"] = ddp_split(adata)
    ptrag_sc.PTRAG.setup_anndata(adata)
    devices = {"accelerator": "cpu", "devices": 2, "strategy": strategy}
    rank = int(os.environ.get("LOCAL_RANK", 0))
    info = {"rank": rank}

    # 1. STATE with gene embeddings, 2 ranks x 2 sets: the sets one process draws with 4.
    scvi.settings.seed = 0
    model = ptrag_sc.PTRAG(adata, perturbation_embeddings=adata.uns["gene_embeddings"], retrieval="none", **SMALL_MODEL)
    model.train(max_steps=20, check_val_every_n_steps=10, split_key="split", batch_size=2, **devices)
    info["none"] = _record(model, rank)
    if rank == 0:
        np.save(os.path.join(out, "prediction.npy"), model.predict(adata, inplace=False))

    # 2. The default PT-RAG model without a seed: every rank must still draw the same plan.
    scvi.settings.seed = None
    model = ptrag_sc.PTRAG(adata, perturbation_embeddings=adata.uns["gene_embeddings"], **SMALL_MODEL)
    model.train(max_steps=12, check_val_every_n_steps=4, batch_size=2, **devices)
    info["ptrag"] = _record(model, rank)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(info, f)


if __name__ == "__main__":
    main()
