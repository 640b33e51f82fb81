"""Draw every codec family on one frontier (docs/img/families-frontier.png); no model runs.

Usage: ``python docs/experiments/plot_families.py [--data docs/experiments/families.json]
[--out docs/img/families-frontier.png]``. The data file holds the points already measured
in docs/codec-frontier.md (ratio vs float16 on disk, ΔPPL), each with the section it comes
from; ΔPPL % is ΔPPL over the file's baseline perplexity.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

HERE = Path(__file__).resolve().parent
STYLE: Dict[str, tuple] = {  # family -> (marker, colour)
    "quantization": ("o", "tab:blue"),
    "selection": ("^", "tab:green"),
    "lowrank": ("s", "tab:red"),
    "autotune": ("*", "tab:purple"),
}
# Labels that would sit on a neighbour's: (dx, dy) in points instead of (4, 3).
OFFSETS: Dict[str, tuple] = {
    "attention keep 0.5": (4, -9), "compact (steps)": (4, -9), "2bit-k2-v4steps2": (4, -9),
    "v-r32-k2": (-40, 4), "compact-vasym": (-62, -10), "attention thr 0.9": (-20, -10), "attention keep 0.75": (4, 6),
}


@dataclass
class Point:
    """One measured configuration: its family, label, ratio on disk and ΔPPL in % of the baseline."""

    family: str
    label: str
    ratio: float
    delta_percent: float


def load(path: Path) -> tuple[List[Point], Dict[str, str]]:
    """The points of ``path`` and the legend text of each family."""
    doc = json.loads(path.read_text())
    base = float(doc["baseline_ppl"])
    families: Dict[str, str] = doc["families"]
    points = []
    for p in doc["points"]:
        if p["family"] not in STYLE:
            raise ValueError(f"{path}: family must be one of {sorted(STYLE)}, got {p['family']!r}")
        points.append(Point(p["family"], p["label"], float(p["ratio_fp16_disk"]),
                            100.0 * float(p["delta_ppl"]) / base))
    return points, families


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(HERE / "families.json"))
    ap.add_argument("--out", default=str(HERE.parent / "img" / "families-frontier.png"))
    args = ap.parse_args(argv)
    points, families = load(Path(args.data))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.6))
    for fam, (marker, colour) in STYLE.items():
        pts = [p for p in points if p.family == fam]
        ax.scatter([p.ratio for p in pts], [p.delta_percent for p in pts], marker=marker, color=colour,
                   s=90 if marker == "*" else 36, label=families[fam], zorder=3)
        for p in pts:
            ax.annotate(p.label, (p.ratio, p.delta_percent), textcoords="offset points", xytext=OFFSETS.get(p.label, (4, 3)),
                        fontsize=6.5, color=colour)
    ax.axhline(1.0, color="black", ls="--", lw=1, label="ΔPPL = 1% of the baseline")
    for x in (5.3, 8.0):
        ax.axvline(x, color="grey", ls=":", lw=1)
        ax.text(x, 150, f" {x:g}×", color="grey", fontsize=8)
    ax.set_xscale("log")
    ax.set_xticks([3, 4, 5, 6, 8, 10, 12])
    ax.set_xticklabels(["3×", "4×", "5×", "6×", "8×", "10×", "12×"])
    ax.set_yscale("symlog", linthresh=0.1, linscale=0.5)
    ax.set_ylim(-0.01, 200)
    ax.set_xlabel("ratio vs float16 on disk (log scale; low-rank bases included)")
    ax.set_ylabel("ΔPPL, % of the baseline (symlog, linear under 0.1%)")
    ax.set_title("SmolLM2-135M, embedded Wikipedia, 4,096 scored tokens: every family on one axis")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
