"""Plot ΔPPL against the ratio on disk for quantization and low-rank projection (docs/img/lowrank-frontier.png).

Usage: ``python docs/experiments/lowrank_frontier.py RUN.json ... --out docs/img/lowrank-frontier.png``
where each RUN.json is ``validate_perplexity.py --output-json`` of a low-rank preset (the
preset's name labels the point). The quantization points are the format-2 runs recorded in
docs/codec-frontier.md (same model, corpus, windows and baseline).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List, Sequence, Tuple

# (label, ratio vs fp16 on disk, ΔPPL %) of the format-2 quantization runs in docs/codec-frontier.md.
QUANTIZATION: List[Tuple[str, float, float]] = [
    ("default", 4.40, 0.27),
    ("compact", 5.41, 1.36),
    ("compact-vasym", 5.02, 0.89),
    ("compact-k256-v4ends", 5.51, 1.47),
    ("2bit-vasym", 9.22, 34.40),
    ("2bit-k256", 11.96, 38.26),
]


def load_runs(paths: Sequence[str]) -> List[Tuple[str, float, float]]:
    """(preset name, ratio on disk, ΔPPL %) of each run JSON."""
    out = []
    for p in paths:
        d = json.loads(Path(p).read_text())
        c = d["codec"]
        fp16 = sum(x["fp16_size_bytes"] for x in c["per_call"])
        size = sum(x["compressed_size_bytes"] for x in c["per_call"])
        name = c["per_call"][0].get("preset") or Path(p).stem
        out.append((name, fp16 / size, d["result"]["delta_percent"]))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for label, pts, marker, colour in (("quantization", QUANTIZATION, "o", "tab:blue"),
                                       ("low-rank projection (+ quantized coefficients)", load_runs(args.runs), "s", "tab:red")):
        ax.scatter([p[1] for p in pts], [p[2] for p in pts], marker=marker, color=colour, label=label, zorder=3)
        for name, x, y in pts:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.axvline(8, color="grey", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("ratio vs float16 on disk (bases included)")
    ax.set_ylabel("ΔPPL % (log scale)")
    ax.set_title("SmolLM2-135M, embedded Wikipedia, 4,096 scored tokens")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
