"""The codec frontier: one row per configuration, its Pareto flag, the recommendation, the table and the plot.

A row's size axis is the on-disk ratio against the same cache stored as float16; its quality
axis the perplexity delta (with its paired-bootstrap interval) over the same windows for
every row. :func:`recommend` applies the frontier's rule: the lowest delta among the rows at
least ``min_ratio`` times smaller on disk; :func:`picks` applies it at each of issue 11's bars
(the default at 4.3x, the compact preset at 5.3x, the best point at 8x).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple

from validation import options as run_options
from validation import protocol
from validation import results
from validation import stats
from validation.diagnostics import pyplot_agg, save_figure

MIN_RATIO = 4.3  # the recommendation (the default codec) needs at least this ratio on disk against float16
COMPACT_RATIO = 5.3  # the compact preset's bar
HIGH_RATIO = 8.0  # the high-ratio end of the frontier that is reported
PART_ORDER = ("codes", "scales", "mins", "sink", "raw", "header")  # bits_by_part's parts, in table order


# -----------------------------------------------------------------------------
# the table


@dataclass
class SweepRow:
    """The measurement of one configuration (one line of sweep.md, one entry of sweep.json).

    ``delta`` is compressed − baseline perplexity over every scored token, ``delta_ci_*`` its
    paired-bootstrap interval; ``snr_db`` the kv-compress aggregate over all calls;
    ``disk_ratio_vs_fp16`` the float16-equivalent bytes over the container bytes.
    """

    index: int
    name: str
    codec: Dict[str, Any]
    resolved_codec: Optional[Dict[str, Any]]
    bits_per_element: float
    disk_ratio_vs_fp16: float
    compression_ratio: float
    baseline_perplexity: float
    compressed_perplexity: float
    delta: float
    delta_percent: float
    delta_ci_low: float
    delta_ci_high: float
    kl_divergence: float
    top1_agreement: float
    passed: bool
    snr_db: float
    rmse: float
    cosine_similarity: float
    pareto: bool = False
    recommended: bool = False
    diagnostics: Optional[Dict[str, Any]] = None
    per_window: List[Dict[str, Any]] = field(default_factory=list)
    timings_s: Dict[str, float] = field(default_factory=dict)
    # Bits per quantized element on disk by part (codes, scales, mins, sink, raw, header, total),
    # after the entropy stage, over every call of the configuration.
    bits_by_part: Dict[str, float] = field(default_factory=dict)


def pareto_flags(ratios: Sequence[float], deltas: Sequence[float]) -> List[bool]:
    """True for every point not dominated by another (one with ratio >= and ΔPPL <=, one of them strictly)."""
    flags = []
    for i, (r, d) in enumerate(zip(ratios, deltas)):
        dominated = any(
            r2 >= r and d2 <= d and (r2 > r or d2 < d) for j, (r2, d2) in enumerate(zip(ratios, deltas)) if j != i
        )
        flags.append(not dominated)
    return flags


def recommend(rows: Sequence[SweepRow], min_ratio: float = MIN_RATIO) -> Optional[SweepRow]:
    """The row with the lowest ΔPPL among those with ``disk_ratio_vs_fp16 >= min_ratio`` (ties: higher ratio), or None."""
    eligible = [r for r in rows if math.isfinite(r.disk_ratio_vs_fp16) and r.disk_ratio_vs_fp16 >= min_ratio]
    if not eligible:
        return None
    return min(eligible, key=lambda r: (r.delta, -r.disk_ratio_vs_fp16))


def picks(rows: Sequence[SweepRow]) -> Dict[str, Optional[str]]:
    """The row names the frontier rule picks at each bar: ``default`` (lowest ΔPPL at >= MIN_RATIO),
    ``compact`` (at >= COMPACT_RATIO) and ``high_ratio`` (at >= HIGH_RATIO); None where no row reaches the bar."""
    out: Dict[str, Optional[str]] = {}
    for key, ratio in (("default", MIN_RATIO), ("compact", COMPACT_RATIO), ("high_ratio", HIGH_RATIO)):
        best = recommend(rows, ratio)
        out[key] = best.name if best else None
    return out


def build_rows(configs: Sequence[Any], outcomes: Sequence[protocol.ProtocolOutcome], threshold: float,
               seed: int = run_options.DEFAULT_SEED, resamples: int = run_options.BOOTSTRAP_RESAMPLES,
               min_ratio: float = MIN_RATIO) -> List[SweepRow]:
    """One SweepRow per configuration (grid order), with Pareto and recommendation flags set.

    ``configs`` are the grid's entries (anything with ``name`` and ``codec``, e.g. ``sweep.SweepConfig``).
    """
    rows = []
    for i, (cfg, outcome) in enumerate(zip(configs, outcomes), 1):
        result = results.build_result(outcome, threshold, seed, resamples)
        agg = stats.aggregate_metrics(outcome.metrics)
        rows.append(SweepRow(
            index=i, name=cfg.name, codec=dict(cfg.codec), resolved_codec=agg.get("codec"),
            bits_per_element=result.bits_per_element, disk_ratio_vs_fp16=result.disk_ratio_vs_fp16,
            compression_ratio=result.compression_ratio, baseline_perplexity=result.baseline_perplexity,
            compressed_perplexity=result.compressed_perplexity, delta=result.delta,
            delta_percent=result.delta_percent, delta_ci_low=result.delta_ci_low, delta_ci_high=result.delta_ci_high,
            kl_divergence=result.kl_divergence, top1_agreement=result.top1_agreement, passed=result.passed,
            snr_db=result.snr_db, rmse=result.rmse, cosine_similarity=result.cosine_similarity,
            diagnostics=outcome.diagnostics.to_dict() if outcome.diagnostics is not None else None,
            per_window=[{"start": w.start, "tokens": w.tokens, "nll_compressed": w.nll_compressed,
                         "kl_sum": w.kl_sum, "top1_matches": w.top1_matches} for w in outcome.windows],
            timings_s={k: round(v, 3) for k, v in outcome.timings.items()},
            bits_by_part=dict(agg.get("bits_per_element_by_part") or {}),
        ))
    for row, flag in zip(rows, pareto_flags([r.disk_ratio_vs_fp16 for r in rows], [r.delta for r in rows])):
        row.pareto = flag
    best = recommend(rows, min_ratio)
    if best is not None:
        best.recommended = True
    return rows


def rows_from_report(report: Dict[str, Any]) -> List[SweepRow]:
    """The SweepRows of a sweep.json document (e.g. to redraw the frontier without measuring again)."""
    names = {f.name for f in fields(SweepRow)}
    rows = []
    for entry in report["configs"]:
        values = {k: (math.nan if v is None else v) for k, v in entry.items() if k in names}
        rows.append(SweepRow(**values))
    return rows


def sorted_rows(rows: Sequence[SweepRow]) -> List[SweepRow]:
    """Highest on-disk ratio first; equal ratios by ΔPPL."""
    return sorted(rows, key=lambda r: (-r.disk_ratio_vs_fp16, r.delta))


def _bits_text(codec: Optional[Dict[str, Any]]) -> str:
    if not codec:
        return "?"
    kb, vb = codec.get("key_bits", codec.get("bits")), codec.get("value_bits", codec.get("bits"))
    return f"{kb}" if kb == vb else f"{kb}/{vb}"


def parts_text(bits_by_part: Dict[str, float]) -> str:
    """``codes + scales + mins + sink + header`` bits per element, e.g. ``2.41+0.20+0+0.04+0.01``; ``?`` when unknown."""
    if not bits_by_part:
        return "?"
    shown = [p for p in PART_ORDER if p != "raw" or bits_by_part.get("raw")]
    return "+".join(f"{bits_by_part.get(p, 0.0):.3g}" for p in shown)


def markdown_table(rows: Sequence[SweepRow], threshold: float, min_ratio: float = MIN_RATIO) -> str:
    """The Markdown table of sweep.md (sorted by on-disk ratio, highest first)."""
    head = ("| # | config | scheme | rotate | key axis | sink | bits (K/V) | G | bits/elem | codes+scales+mins+sink+header "
            "| ratio vs fp16 (disk) | ΔPPL | 95% CI | KL (nats/tok) | top-1 | SNR (dB) | gate | Pareto |")
    lines = [head, "|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|"]
    for r in sorted_rows(rows):
        c = r.resolved_codec or r.codec
        name = f"**{r.name}** (recommended)" if r.recommended else r.name
        gate = "pass" if r.passed else "FAIL"
        lines.append(
            f"| {r.index} | {name} | {c.get('scheme', '?')} | {c.get('rotate', '?')} | {c.get('key_axis', '?')} "
            f"| {c.get('sink', '?')} | {_bits_text(c)} | {c.get('group_size', '?')} | {r.bits_per_element:.3f} "
            f"| {parts_text(r.bits_by_part)} | {r.disk_ratio_vs_fp16:.2f}x | {r.delta:+.3f} | [{r.delta_ci_low:+.3f}, {r.delta_ci_high:+.3f}] "
            f"| {r.kl_divergence:.4f} | {100 * r.top1_agreement:.2f}% | {r.snr_db:.2f} | {gate} "
            f"| {'yes' if r.pareto else ''} |"
        )
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# the frontier plot


def plot_frontier(rows: Sequence[SweepRow], path: str, threshold: float, min_ratio: float = MIN_RATIO,
                  title: str = "") -> str:
    """Write a PNG of ΔPPL (with 95% intervals) against the on-disk ratio vs float16.

    Points are numbered as in sweep.md (the key on the right names them); green passed the
    threshold, red did not; the recommended point is a star. The Pareto front is a line, the
    threshold a horizontal dashed line and ``min_ratio`` a vertical dotted line. The y axis is
    linear up to three times the threshold: a point above that is drawn as a triangle on the
    top edge with its ΔPPL written beside it, so one very lossy point does not flatten the
    rest. Returns the path written.
    """
    plt = pyplot_agg()
    fig, ax = plt.subplots(figsize=(11.5, 6.4))
    fig.subplots_adjust(left=0.08, right=0.76, top=0.9, bottom=0.1)  # final layout first: labels are placed in pixels
    cap = 3 * threshold if threshold > 0 else math.inf
    lows = [r.delta_ci_low for r in rows if math.isfinite(r.delta_ci_low)] + [0.0]
    highs = [min(r.delta_ci_high, cap) for r in rows if math.isfinite(r.delta_ci_high)] + [threshold]
    clipped = [r for r in rows if r.delta > cap]
    top = cap if clipped else max(highs)
    pad = 0.06 * ((top - min(lows)) or 1.0)
    ax.set_ylim(min(lows) - pad, top + (2.5 if clipped else 1) * pad)

    def shown(r: SweepRow) -> float:
        return min(r.delta, top + pad)

    for r in rows:
        colour = "tab:green" if r.passed else "tab:red"
        big = r.recommended
        if r in clipped:
            ax.plot(r.disk_ratio_vs_fp16, shown(r), "^", color=colour, markersize=9, zorder=3)
            ax.annotate(f"ΔPPL {r.delta:+.3g}", (r.disk_ratio_vs_fp16, shown(r)), xytext=(0, -16),
                        textcoords="offset points", fontsize=7, ha="center", color=colour)
            continue
        ax.errorbar(r.disk_ratio_vs_fp16, r.delta, yerr=[[r.delta - r.delta_ci_low], [r.delta_ci_high - r.delta]],
                    fmt="*" if big else "o", markersize=16 if big else 6, color=colour, ecolor=colour, elinewidth=1,
                    capsize=3, alpha=0.9, zorder=3, markeredgecolor="black" if big else colour)
    front = sorted((r for r in rows if r.pareto), key=lambda r: r.disk_ratio_vs_fp16)
    if front:
        ax.plot([r.disk_ratio_vs_fp16 for r in front], [shown(r) for r in front], "-", color="tab:blue", lw=1.5,
                alpha=0.6, zorder=2, label="Pareto front (higher ratio, lower ΔPPL)")
    ax.axhline(threshold, color="tab:red", ls="--", lw=1, label=f"threshold ΔPPL = {threshold:g}")
    ax.axvline(min_ratio, color="gray", ls=":", lw=1.2, label=f"{min_ratio:g}x on disk (recommendation floor)")
    ax.axhline(0, color="black", lw=0.5)
    xs = [r.disk_ratio_vs_fp16 for r in rows] + [min_ratio]
    xpad = 0.04 * (max(xs) - min(xs) or 1.0)
    ax.set_xlim(min(xs) - xpad, max(xs) + 2.5 * xpad)
    _label_points(ax, rows, shown)
    _zoom_inset(ax, rows, threshold, min_ratio, cap)
    ax.set_xlabel("ratio on disk vs the cache stored as float16 (higher = smaller)")
    ax.set_ylabel("ΔPPL = compressed − baseline perplexity (95% bootstrap interval)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=8, framealpha=0.9)
    key = "\n".join(f"{r.index:>2}  {r.name}{'  (recommended)' if r.recommended else ''}"
                    for r in sorted(rows, key=lambda r: r.index))
    fig.text(0.772, 0.5, key, fontsize=7.5, family="monospace", va="center", ha="left")
    ax.set_title(title or "Codec frontier", fontsize=9)
    return save_figure(fig, path)


def _zoom_inset(ax: Any, rows: Sequence[SweepRow], threshold: float, min_ratio: float, cap: float) -> None:
    """When four or more points lie within 8% of ``min_ratio``, redraw them enlarged in an inset (lower right)."""
    near = [r for r in rows if abs(r.disk_ratio_vs_fp16 / min_ratio - 1) <= 0.08 and r.delta <= cap]
    x0, x1 = ax.get_xlim()
    if len(near) < 4 or max(r.disk_ratio_vs_fp16 for r in near) - min(r.disk_ratio_vs_fp16 for r in near) > 0.3 * (x1 - x0):
        return
    inset = ax.inset_axes([0.56, 0.07, 0.41, 0.42])
    for r in near:
        colour = "tab:green" if r.passed else "tab:red"
        inset.errorbar(r.disk_ratio_vs_fp16, r.delta, yerr=[[r.delta - r.delta_ci_low], [r.delta_ci_high - r.delta]],
                       fmt="*" if r.recommended else "o", markersize=12 if r.recommended else 5, color=colour,
                       ecolor=colour, elinewidth=0.8, capsize=2, zorder=3,
                       markeredgecolor="black" if r.recommended else colour)
    xs = [r.disk_ratio_vs_fp16 for r in near] + [min_ratio]
    lo = min([r.delta_ci_low for r in near] + [0.0])
    hi = max(r.delta_ci_high for r in near)
    xpad, ypad = 0.08 * (max(xs) - min(xs) or 0.1), 0.08 * ((hi - lo) or 0.1)
    inset.set_xlim(min(xs) - xpad, max(xs) + 3 * xpad)
    inset.set_ylim(lo - ypad, hi + ypad)
    inset.axvline(min_ratio, color="gray", ls=":", lw=1.2)
    inset.axhline(0, color="black", lw=0.5)
    if lo - ypad < threshold < hi + ypad:
        inset.axhline(threshold, color="tab:red", ls="--", lw=1)
    inset.tick_params(labelsize=7)
    inset.grid(True, alpha=0.3)
    inset.set_title(f"zoom: ratio {min(xs):.2f}-{max(xs):.2f}x", fontsize=7)
    _label_points(inset, near, lambda r: r.delta)
    ax.indicate_inset_zoom(inset, edgecolor="gray", alpha=0.5)


def _label_points(ax: Any, rows: Sequence[SweepRow], y_of: Any) -> None:
    """Number each point at (ratio, ``y_of(row)``); labels of points close together are stacked, not overlapped."""
    trans = ax.transData
    pts = [(r, trans.transform((r.disk_ratio_vs_fp16, y_of(r)))) for r in rows]
    pts.sort(key=lambda p: (round(p[1][0] / 24), p[1][1]))
    placed: List[Tuple[float, float]] = []
    for r, (px, py) in pts:
        lx, ly = px + (13 if r.recommended else 8), py
        while any(abs(lx - qx) < 18 and abs(ly - qy) < 11 for qx, qy in placed):
            ly += 11
        placed.append((lx, ly))
        ax.annotate(str(r.index), xy=(r.disk_ratio_vs_fp16, y_of(r)), xytext=(lx - px, ly - py),
                    textcoords="offset pixels", fontsize=8, va="center", ha="left",
                    arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "gray"} if abs(ly - py) > 6 else None)


