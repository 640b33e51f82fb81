"""The auto-tuner's report: ``autotune.json``, ``autotune.md`` and the allocation heatmap PNG.

The heatmap has one row per layer and one column per role (keys, values); the colour is the
code width and each cell names its plan (e.g. ``3a128c``: 3 bits, asymmetric, groups of 128,
along the channel axis; ``h`` marks the Hadamard rotation). Calibration and held-out results
sit side by side: the held-out one is the one that counts.
"""

from __future__ import annotations

import math
import os
import platform
from typing import Any, Dict, List, Optional

from validation.autotune.run import AutotuneResult
from validation.autotune.space import ROLES, Candidate

AUTOTUNE_SCHEMA = "kv-cache-p2p/autotune/v1"
HEATMAP_FILENAME = "allocation.png"
SELECTION_HEATMAP_FILENAME = "selection-sensitivity.png"


def cell_label(c: Candidate) -> str:
    """A short label for a heatmap cell: bits, steps (``/7``), scheme (s/a), rotation (h), group, axis (c/t)."""
    st = f"/{c.steps}" if c.steps else ""
    return f"{c.bits}{st}{c.scheme[0]}{'h' if c.rotate == 'hadamard' else ''}{c.group_size}{c.axis[0]}"


def plot_allocation(result: AutotuneResult, path: str) -> str:
    """Draw the per-layer, per-role allocation heatmap to ``path`` (PNG); return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    a = result.assignment
    grid = np.asarray(a.level_bits_grid(), dtype=float)  # [layers, 2]: log2(levels), steps counted
    n = a.num_layers
    if a.keep is not None:  # a third panel: the share of its positions each layer keeps
        fig, (ax, kx) = plt.subplots(1, 2, figsize=(5.6, max(3.0, 0.26 * n + 1.6)), sharey=True,
                                     gridspec_kw={"width_ratios": [2, 1]}, layout="constrained")
        kx.imshow(np.asarray(a.keep, dtype=float)[:, None], cmap="Blues", vmin=0, vmax=1.2, aspect="auto")
        for i, k in enumerate(a.keep):
            kx.text(0, i, f"{k:g}", ha="center", va="center", fontsize=7)
        kx.set_xticks([0], ["kept"])
    else:
        fig, ax = plt.subplots(figsize=(4.2, max(3.0, 0.26 * n + 1.4)))
    im = ax.imshow(grid, cmap="viridis", vmin=2, vmax=8, aspect="auto")
    for i in range(n):
        for j, role in enumerate(ROLES):
            ax.text(j, i, cell_label(a.plan(role, i)), ha="center", va="center", fontsize=7,
                    color="white" if grid[i, j] < 5 else "black")
    ax.set_xticks([0, 1], ["keys", "values"])
    ax.set_yticks(range(n), [str(i) for i in range(n)], fontsize=7)
    ax.set_ylabel("layer")
    held = dict(result.heldout).get(result.options.name)
    cal = result.rounds[result.chosen_round].verification
    keep = f", keep {result.keep_ratio:g}" if result.keep_ratio != 1.0 else ""
    if a.keep is not None:
        keep = f", keep {result.mean_keep:.2f} on average"
    title = f"log2 levels per tensor ({result.options.budget.describe()}{keep})\ncalibration {cal.delta_pct:+.2f}%, {cal.disk_ratio_vs_fp16:.2f}x"
    if held is not None:
        title += f"; held-out {held.delta_pct:+.2f}%, {held.disk_ratio_vs_fp16:.2f}x"
    if a.keep is not None:
        fig.suptitle(title, fontsize=8)
        fig.colorbar(im, ax=[ax, kx], label="log2(levels): code bits, fewer with steps", ticks=[2, 3, 4, 8])
    else:
        ax.set_title(title, fontsize=8)
        fig.colorbar(im, ax=ax, label="log2(levels): code bits, fewer with steps", ticks=[2, 3, 4, 8])
        fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_selection_sensitivity(ratios: List[float], kl: List[List[float]], keep: Optional[List[float]], path: str,
                               title: str = "") -> str:
    """Heatmap of each layer's selection ΔKL: one row per layer, one column per keep ratio below 1
    (``kl`` ``[len(ratios)][layers]``, nats per token, log colour); a box marks the ratio each layer
    chose (``keep``). Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    import numpy as np

    cols = [j for j, r in enumerate(ratios) if r < 1]
    grid = np.asarray([kl[j] for j in cols], dtype=float).T  # [layers, ratios]
    n = grid.shape[0]
    fig, ax = plt.subplots(figsize=(4.6, max(3.0, 0.26 * n + 1.4)))
    im = ax.imshow(np.clip(grid, 1e-6, None), cmap="magma_r", norm=LogNorm(vmin=1e-6, vmax=max(1e-3, float(np.nanmax(grid)))),
                   aspect="auto")
    for i in range(n):
        for c, j in enumerate(cols):
            chosen = keep is not None and keep[i] == ratios[j]
            ax.text(c, i, f"{grid[i, c]:.0e}" if grid[i, c] >= 1e-6 else "0", ha="center", va="center", fontsize=6,
                    color="white" if grid[i, c] > 1e-3 else "black", fontweight="bold" if chosen else "normal")
            if chosen:
                ax.add_patch(matplotlib.patches.Rectangle((c - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="tab:blue", lw=1.5))
    ax.set_xticks(range(len(cols)), [f"{ratios[j]:g}" for j in cols])
    ax.set_xlabel("keep ratio of that layer alone (boxed: chosen)")
    ax.set_yticks(range(n), [str(i) for i in range(n)], fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title(title or "ΔKL when only this layer keeps a share of its positions", fontsize=8)
    fig.colorbar(im, ax=ax, label="ΔKL (nats per token)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _clean(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def _load() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def report_dict(result: AutotuneResult, plots: Dict[str, str], command: str = "") -> Dict[str, Any]:
    """Everything the run measured, JSON-ready."""
    a, o = result.assignment, result.options
    cal = result.rounds[result.chosen_round].verification
    tensors = []
    for role in ROLES:
        for layer in range(a.num_layers):
            c = a.choice[role][layer]
            tensors.append({"role": role, "layer": layer, "candidate": a.plan(role, layer).name,
                            "plan": a.plan(role, layer).plan, "delta_kl": result.sensitivity.kl[role][c][layer],
                            "measured": result.sensitivity.measured[role][c][layer],
                            "bytes": result.sizes.bytes[role][c][layer]})
    doc = {
        "schema": AUTOTUNE_SCHEMA,
        "command": command,
        "budget": {"kind": o.budget.kind, "value": o.budget.value, "description": o.budget.describe(),
                   "margin": o.margin, "met_on_calibration": result.budget_met},
        "preset_file": os.path.abspath(o.output),
        "preset": result.preset,
        "model": result.model_info,
        "corpus": {k: v for k, v in result.corpus_info.items() if k != "text"},
        "windows": {"max_length": o.max_length, "stride": o.stride, "evaluation_span": list(result.evaluation_span),
                    "evaluation_windows": o.eval_windows, "calibration_starts": result.calibration_starts,
                    "sensitivity_tokens_per_window": o.sensitivity_tokens,
                    "disjoint": all(s >= result.evaluation_span[1] for s in result.calibration_starts)},
        "calibration": cal.to_dict(),
        "heldout": {label: v.to_dict() for label, v in result.heldout},
        "reference_compact_on_calibration": result.reference.to_dict() if result.reference else None,
        "best_uniform_of_space": None if result.uniform is None else {
            "keys": result.uniform[0].plan("keys", 0).name, "values": result.uniform[0].plan("values", 0).name,
            "calibration": result.uniform[1].to_dict()},
        "rounds": [{"budget_kl": r.budget_kl, "within_budget": r.within_budget, "keep_ratio": r.keep_ratio,
                    "layer_keep_ratios": r.assignment.keep,
                    "preset_file": r.preset_file,
                    "predicted_ratio_vs_fp16": result.sizes.for_keep_ratio(r.keep_ratio).ratio(r.assignment),
                    **r.verification.to_dict()}
                   for r in result.rounds],
        "selection": {"method": o.selection, "keep_ratios": list(o.keep_ratios), "chosen_keep_ratio": result.keep_ratio,
                      "selection_only_on_calibration": {f"{k:g}": v.to_dict() for k, v in result.selection_only.items()},
                      "validate_perplexity_flags": selection_flags(result),
                      "per_layer": o.per_layer_keep, "layer_keep_ratios": a.keep, "mean_keep": result.mean_keep,
                      "layer_ratios_tried": list(result.layer_ratios),
                      "layer_delta_kl": None if result.selection_kl is None else
                      {f"{k:g}": [float(x) for x in row] for k, row in zip(result.layer_ratios, result.selection_kl)}},
        "chosen_round": result.chosen_round,
        "candidates": {r: [c.name for c in result.candidates[r]] for r in ROLES},
        "sizes": {"source": result.sizes.source, "calls": result.sizes.calls, "overhead_bytes": result.sizes.overhead,
                  "fp16_bytes": result.sizes.fp16_bytes, "predicted_bytes": result.sizes.total(a),
                  "predicted_ratio_vs_fp16": result.sizes.ratio(a)},
        "sensitivity": {"passes": result.sensitivity.passes, "seconds": result.sensitivity.seconds,
                        "partial_forward": result.sensitivity.partial_forward,
                        "partial_check_max_abs_error": result.sensitivity.partial_check_error,
                        "estimated_values": result.sensitivity.estimated_count(), "scored_tokens": result.sensitivity.tokens,
                        "kl": result.sensitivity.kl, "measured": result.sensitivity.measured,
                        "rel_mse": result.sensitivity.rel_mse},
        "tensors": tensors,
        "timings_s": {k: round(v, 2) for k, v in result.timings.items()},
        "host": {"cpus": os.cpu_count(), "load_average_at_end": _load(), "platform": platform.platform()},
        "plots": plots,
        "notes": result.notes,
    }
    return _clean(doc)


def selection_flags(result: AutotuneResult) -> str:
    """The ``validate_perplexity.py`` flags that reproduce the chosen plan's token selection ("" without
    one, or with a ratio per layer: the preset's ``selection`` section carries those)."""
    k = result.keep_ratio
    return "" if k == 1.0 else f"--selection {result.options.selection} --keep-ratio {k:g}"


def _num(x: float, fmt: str, suffix: str = "") -> str:
    """``x`` formatted, or "–" when it was not measured (NaN: e.g. the size of a selection without a codec)."""
    return f"{x:{fmt}}{suffix}" if math.isfinite(x) else "–"


def _row(label: str, v: Any) -> str:
    lo, hi = v.interval() if len(v.window_nll) > 1 else (math.nan, math.nan)
    return (f"| {label} | {len(v.window_nll)} | {_num(v.disk_ratio_vs_fp16, '.3f', 'x')} | {_num(v.bits_per_element, '.3f')} | "
            f"{v.delta:+.4f} | {v.delta_pct:+.2f}% | [{lo:+.4f}, {hi:+.4f}] | {v.kl:.5f} | {_num(100 * v.top1, '.2f', '%')} |")


def markdown(result: AutotuneResult, doc: Dict[str, Any]) -> str:
    """The report as Markdown: budget, calibration and held-out side by side, rounds, allocation."""
    o = result.options
    cal = result.rounds[result.chosen_round].verification
    lines = [f"# Auto-tune: {o.name}", "",
             f"- budget: {o.budget.describe()} (calibration target {o.margin:g} x budget); met on calibration: "
             f"{'yes' if result.budget_met else 'NO'}",
             f"- model: {result.model_info['name']}; corpus: {result.corpus_info.get('name')}",
             f"- evaluation span: tokens [{result.evaluation_span[0]}, {result.evaluation_span[1]}); calibration windows "
             f"start at {', '.join(map(str, result.calibration_starts))} (disjoint: {doc['windows']['disjoint']})",
             f"- preset: `{o.output}`; scored as `validate_perplexity.py --preset {o.output}"
             f"{' ' + selection_flags(result) if selection_flags(result) else ''}`",
             f"- token selection: {_selection_line(result)}",
             f"- wall time: {', '.join(f'{k} {v:.1f}' for k, v in result.timings.items())}; "
             f"load average at the end {doc['host']['load_average_at_end']} on {doc['host']['cpus']} CPUs", "",
             "## Results (the held-out rows count)", "",
             "| plan / windows | windows | ratio vs fp16 (disk) | bits/elem | ΔPPL | ΔPPL % | 95% CI | KL | top-1 |",
             "|---|---|---|---|---|---|---|---|---|",
             _row(f"**{o.name}**, calibration", cal)]
    for label, v in result.heldout:
        lines.append(_row(f"**{label}**, held-out" if label == o.name else f"{label}, held-out", v))
    if result.reference is not None:
        lines.append(_row("compact, calibration", result.reference))
    if result.uniform is not None:
        ua, uv = result.uniform
        keep = f", keep {result.keep_ratio:g}" if result.keep_ratio != 1.0 else ""
        lines.append(_row(f"best uniform of the space ({ua.plan('keys', 0).name} / {ua.plan('values', 0).name}{keep}), "
                          "calibration", uv))
    for k, v in sorted(result.selection_only.items(), reverse=True):
        lines.append(_row(f"selection only, keep {k:g} (no codec), calibration", v))
    lines += ["", "## Rounds (calibration windows, each plan through the binary)", "",
              "| round | keep ratio | KL budget | sum of parts | measured KL | ΔPPL % | predicted ratio | measured ratio | within |",
              "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(result.rounds):
        v = r.verification
        mark = " (chosen)" if i == result.chosen_round else ""
        kept = f"{r.assignment.mean_keep:.3f} per layer" if r.assignment.keep else f"{r.keep_ratio:g}"
        lines.append(f"| {i}{mark} | {kept} | {r.budget_kl:.5f} | {v.predicted_kl:.5f} | {v.kl:.5f} | "
                     f"{v.delta_pct:+.2f}% | {result.sizes.for_keep_ratio(r.keep_ratio).ratio(r.assignment):.3f}x | "
                     f"{v.disk_ratio_vs_fp16:.3f}x | {'yes' if r.within_budget else 'no'} |")
    a = result.assignment
    per_layer = a.keep is not None
    lines += ["", "## Allocation", "", f"![allocation]({HEATMAP_FILENAME})", ""]
    if result.selection_kl is not None:
        lines += [f"![selection sensitivity]({SELECTION_HEATMAP_FILENAME})", ""]
    lines += [
              "| layer | keys | values |" + (" kept |" if per_layer else ""), "|---|---|---|" + ("---|" if per_layer else "")]
    for i in range(a.num_layers):
        lines.append(f"| {i} | {a.plan('keys', i).name} | {a.plan('values', i).name} |" + (f" {a.keep[i]:g} |" if per_layer else ""))
    s = result.sensitivity
    lines += ["", f"Sizes: {result.sizes.source} ({result.sizes.calls} calls). Sensitivity: {s.passes} passes over "
              f"{s.tokens} scored tokens in {s.seconds:.0f} s (partial passes: {s.partial_forward}); "
              f"{s.estimated_count()} values estimated."]
    lines += [f"- {n}" for n in result.notes]
    return "\n".join(lines) + "\n"


def _selection_line(result: AutotuneResult) -> str:
    o = result.options
    if o.selection is None:
        return "none (every context position kept)"
    tried = ", ".join(f"{k:g}" for k in sorted(set(o.keep_ratios), reverse=True))
    if result.layer_keep is not None:
        return (f"{o.selection}, a keep ratio per layer among {', '.join(f'{k:g}' for k in result.layer_ratios)}; "
                f"{result.mean_keep:.3f} of the positions kept on average (the preset's selection section)")
    return f"{o.selection}, keep ratios tried {tried}; chosen {result.keep_ratio:g}"


def write_report(result: AutotuneResult, out_dir: str, command: str = "") -> Dict[str, str]:
    """Write ``autotune.json``, ``autotune.md`` and the heatmap into ``out_dir``; return their paths."""
    from validation.jsonio import write_json_atomic

    os.makedirs(out_dir, exist_ok=True)
    plots = {"allocation_heatmap": plot_allocation(result, os.path.join(out_dir, HEATMAP_FILENAME))}
    if result.selection_kl is not None:
        plots["selection_sensitivity"] = plot_selection_sensitivity(
            result.layer_ratios, result.selection_kl, result.layer_keep, os.path.join(out_dir, SELECTION_HEATMAP_FILENAME))
    doc = report_dict(result, plots, command)
    paths = {"json": os.path.join(out_dir, "autotune.json"), "markdown": os.path.join(out_dir, "autotune.md"), **plots}
    write_json_atomic(paths["json"], doc)
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write(markdown(result, doc))
    return paths
