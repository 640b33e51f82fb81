"""The figure setup and finishing steps that the frontier plots in this folder share.

Imported by lowrank_frontier.py and plot_families.py (run as scripts, so this folder is on
``sys.path``); matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

from typing import Any, Tuple


def new_figure(width: float, height: float) -> Tuple[Any, Any]:
    """A (figure, axes) pair of ``width`` × ``height`` inches, drawn off screen (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def finish(fig: Any, ax: Any, title: str, out: str) -> None:
    """Title, grid and legend (lower right) the axes, then save the figure to ``out`` at 110 dpi."""
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
