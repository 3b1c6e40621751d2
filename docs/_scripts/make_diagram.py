"""Draw the PT-RAG overview diagram of docs/concepts.md (docs/_static/ptrag_overview.svg).

Run from the repository root: ``python docs/_scripts/make_diagram.py`` (or
``python docs/_scripts/make_diagram.py /tmp/preview.png`` to look at it first). The SVG is committed,
so the docs build needs neither this script nor network access (mermaid would).
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

OUT = Path(__file__).resolve().parents[1] / "_static" / "ptrag_overview.svg"

COLORS = {
    "input": "#e8f1fb",
    "memory": "#fdf2e3",
    "retrieval": "#fbe9ec",
    "backbone": "#eaf6ea",
    "output": "#f1ecf8",
}


def box(ax, x, y, w, h, title, body, kind, align="center"):
    ax.add_patch(
        FancyBboxPatch(
            (x, y),
            w,
            h,
            boxstyle="round,pad=0.02,rounding_size=0.08",
            facecolor=COLORS[kind],
            edgecolor="#555555",
            linewidth=1.0,
        )
    )
    ax.text(x + w / 2, y + h - 0.17, title, ha="center", va="top", fontsize=10.5, weight="bold")
    left = align == "left"
    ax.text(x + (0.15 if left else w / 2), y + h - 0.5, body, ha=align, va="top", fontsize=8.5, linespacing=1.35)


def arrow(ax, start, end, text=None, rad=0.0):
    ax.add_patch(
        FancyArrowPatch(
            start,
            end,
            arrowstyle="-|>",
            mutation_scale=12,
            linewidth=1.1,
            color="#333333",
            connectionstyle=f"arc3,rad={rad}",
        )
    )
    if text:
        mx, my = (start[0] + end[0]) / 2, (start[1] + end[1]) / 2
        ax.text(mx + 0.05, my + 0.08, text, fontsize=8, style="italic", color="#333333")


def main(out: Path = OUT) -> None:
    plt.rcParams["svg.fonttype"] = "none"  # keep text as text: small, searchable file
    plt.rcParams["font.family"] = "DejaVu Sans"
    fig, ax = plt.subplots(figsize=(13, 7.8))
    ax.set_xlim(0, 13)
    ax.set_ylim(0, 7.8)
    ax.axis("off")

    # Inputs and the memory (left column).
    box(
        ax,
        0.2,
        6.2,
        3.4,
        1.4,
        "Control cells",
        "a set of S cells of cell type c\n$x_{ctrl}$  [S x G genes]\n-> BasalEncoder -> $h_{ctrl}$",
        "input",
    )
    box(
        ax,
        0.2,
        4.45,
        3.4,
        1.4,
        "Perturbation p",
        "gene symbol or 'A+B'\ngene embedding $e_p$ (GenePT-style)\n-> PertEncoder -> $h_{pert}$",
        "input",
    )
    box(
        ax,
        0.2,
        0.2,
        3.4,
        3.9,
        "Response memory",
        "training cells only: one entry per\n(perturbation, cell type) with its\nembedding and pseudobulk shift\n\n"
        "fitted once, own entry left out:\n- context: mean shift of c's\n  other perturbations\n"
        "- evidence: stacked ridge maps,\n  neighbours, other cell types;\n  x trust of c x gate of the query\n"
        "  (how well it predicted similar\n  perturbations); confidence",
        "memory",
        align="left",
    )

    # Retrieval and the mean (middle column).
    box(
        ax,
        4.2,
        4.45,
        3.9,
        1.4,
        "Stage 1: candidates",
        "K nearest entries by cosine similarity\n(never the exact (p, c) entry)\nno gradient; one table per memory",
        "retrieval",
    )
    box(
        ax,
        4.2,
        2.35,
        3.9,
        1.75,
        "Stage 2: keep or drop",
        "per cell and candidate: MLP score\n-> hard Gumbel-Softmax (keep if\np_keep > 0.5 at prediction)\n"
        "-> z, added to the cells' encodings",
        "retrieval",
    )
    box(
        ax,
        4.2,
        0.2,
        3.9,
        1.8,
        "Mean shift $\\Delta$ of the set",
        "$\\Delta$ = context + evidence\n"
        "A+B: sum of the members' shifts\n(unmeasured member: the context)\nmeasured own gene: its typical\nrelative change",
        "memory",
    )

    # Generation (right column).
    box(
        ax,
        8.7,
        5.9,
        4.1,
        1.7,
        "Set transformer",
        "$x_0 = h_{ctrl} + h_{pert} + z$  (paper: $x_0 = z$)\nbidirectional attention, no positions\n"
        "(equivariant to cell order)\nbackbone 'pooled' or 'full'",
        "backbone",
    )
    box(
        ax,
        8.7,
        0.2,
        4.1,
        2.6,
        "Predicted set and loss",
        "y = min(ReLU(shift($x_{ctrl}$, $\\Delta$)\n      + LowRank(r - mean r)), ceiling)\n\n"
        "loss = energy(y, observed set moved\n             to its group's pseudobulk mean)\n"
        "   + pseudobulk_weight x mean-shift error\n   + sparsity_weight x expected keep rate",
        "output",
    )

    arrow(ax, (3.6, 6.9), (8.7, 6.9), "$h_{ctrl}$")
    arrow(ax, (3.6, 5.15), (4.2, 5.15), "$e_p$")
    arrow(ax, (3.6, 5.6), (8.7, 6.4), "$h_{pert}$")
    arrow(ax, (3.6, 3.8), (4.2, 4.6))
    ax.text(3.62, 4.25, "entries", fontsize=8, style="italic", color="#333333")
    arrow(ax, (6.15, 4.45), (6.15, 4.1))
    ax.text(6.25, 4.2, "K candidates", fontsize=8, style="italic", color="#333333")
    arrow(ax, (8.1, 3.6), (8.7, 6.05), "z", rad=0.2)
    arrow(ax, (3.6, 1.1), (4.2, 1.1))
    arrow(ax, (8.1, 1.1), (8.7, 1.1), "$\\Delta$")
    arrow(ax, (10.75, 5.9), (10.75, 2.8))
    ax.text(10.85, 4.3, "r", fontsize=8, style="italic", color="#333333")
    fig.savefig(out, bbox_inches="tight", metadata={"Date": None})
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)  # another path (e.g. .png) to preview
