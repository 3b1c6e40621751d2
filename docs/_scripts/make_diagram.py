"""Draw the PT-RAG overview diagram of docs/concepts.md (docs/_static/ptrag_overview.svg).

Run from the repository root: ``python docs/_scripts/make_diagram.py``. The SVG is committed,
so the docs build needs neither this script nor network access (mermaid would).
"""

from __future__ import annotations

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


def box(ax, x, y, w, h, title, body, kind):
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
    ax.text(x + w / 2, y + h - 0.5, body, ha="center", va="top", fontsize=8.5, linespacing=1.35)


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


def main() -> None:
    plt.rcParams["svg.fonttype"] = "none"  # keep text as text: small, searchable file
    plt.rcParams["font.family"] = "DejaVu Sans"
    fig, ax = plt.subplots(figsize=(12, 6.2))
    ax.set_xlim(0, 12)
    ax.set_ylim(0, 6.2)
    ax.axis("off")

    box(
        ax,
        0.2,
        4.3,
        3.1,
        1.6,
        "Control cells",
        "a set of S cells of cell type c\n$x_{ctrl}$  [S x G genes]\n-> BasalEncoder -> $h_{ctrl}$",
        "input",
    )
    box(
        ax,
        0.2,
        2.3,
        3.1,
        1.6,
        "Perturbation p",
        "gene symbol or 'A+B'\ngene embedding $e_p$ (GenePT-style)\n-> PertEncoder -> $h_{pert}$",
        "input",
    )
    box(
        ax,
        0.2,
        0.2,
        3.1,
        1.8,
        "Memory (training cells)",
        "response memory: one entry per\n(perturbation, cell type), with its\nembedding and measured shift;\n+ the context entry (cell-type mean)",
        "memory",
    )

    box(
        ax,
        3.9,
        2.15,
        3.3,
        1.4,
        "Stage 1: candidates",
        "K nearest entries by cosine similarity\n(never the exact (p, c) entry)\nno gradient; one table per memory",
        "retrieval",
    )
    box(
        ax,
        3.9,
        0.2,
        3.3,
        1.65,
        "Stage 2: keep or drop",
        "per cell and candidate: MLP score\n-> hard Gumbel-Softmax (keep if\np_keep > 0.5 at prediction) -> z;\nkept shifts x relation gains -> $\\Delta$",
        "retrieval",
    )

    box(
        ax,
        7.9,
        3.3,
        3.9,
        2.6,
        "Set transformer",
        "$x_0 = h_{ctrl} + h_{pert} + z$\n(context_mode='add'; the paper: $x_0 = z$)\nbidirectional attention, no positions\n(equivariant to cell order)\nbackbone 'pooled' or 'full'",
        "backbone",
    )
    box(
        ax,
        7.9,
        0.2,
        3.9,
        2.6,
        "Predicted set",
        "$y = ReLU(x_{ctrl} + \\Delta + Decoder(r + h_{ctrl}))$\n[S x G]\n\ntraining loss: energy distance to the\nobserved perturbed set\n+ sparsity weight x mean keep rate",
        "output",
    )

    arrow(ax, (3.3, 5.1), (7.9, 5.1), "$h_{ctrl}$")
    arrow(ax, (3.3, 3.0), (3.9, 3.0), "$e_p$")
    arrow(ax, (3.3, 3.75), (7.9, 4.3), "$h_{pert}$")
    arrow(ax, (3.3, 1.4), (3.9, 2.45))
    arrow(ax, (5.55, 2.15), (5.55, 1.85))
    arrow(ax, (7.2, 1.2), (7.9, 3.5), "z", rad=0.15)
    arrow(ax, (7.2, 0.6), (7.9, 0.6), "$\\Delta$")
    arrow(ax, (9.85, 3.3), (9.85, 2.8), "r")
    ax.text(5.65, 1.93, "K candidates", fontsize=8, style="italic", ha="left")
    fig.savefig(OUT, bbox_inches="tight", metadata={"Date": None})
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
