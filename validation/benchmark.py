"""Leaderboard: the same codec presets on several models and corpora, in one table and one plot.

``python -m validation.benchmark --models embedded,gemma3-270m --presets seed,default,compact
--datasets wiki,code`` loads each model once; for each corpus it cuts the usual windows
(docs/perplexity-protocol.md) and runs the sweep protocol (validation.sweep.run_sweep_protocol):
one prefill and one baseline scoring pass per batch of windows, then every preset's round
trip through the real ``kv-compress`` binary and its scoring pass against that same baseline.
With ``--check-baseline`` (the default) the protocol's baseline is also checked against a
plain sliding-window pass over the same windows (``plain_window_nlls``: no cache at all).

Outputs in ``--out-dir`` (default ``benchmark-results/``):

* ``leaderboard.json``: every cell (model × preset × corpus) with bits per element on disk,
  the on-disk ratio vs float16, baseline and compressed perplexity, ΔPPL with its paired
  bootstrap interval, ΔPPL %, KL and top-1 agreement, plus each model's geometry and each
  (model, corpus) baseline check;
* ``leaderboard.md``: one row per model × preset, a column group per corpus;
* ``leaderboard.png``: ΔPPL % against bits per element, one panel per corpus, one marker per model.

``--merge A.json B.json ...`` measures nothing: it joins leaderboard.json files written with
the same window protocol (for instance one model per machine, or per night) into one table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from validation import corpora, jsonio, models, protocol, reports
from validation import options as run_options
from validation.compression_bridge import BUILTIN_PRESETS
from validation.frontier import build_rows
from validation.sweep import SweepConfig, run_sweep_protocol

LEADERBOARD_SCHEMA = "kv-cache-p2p/leaderboard/v1"
DEFAULT_OUT_DIR = "benchmark-results"
DEFAULT_MODELS = ("embedded",)
DEFAULT_PRESETS = ("seed", "default", "compact")
DEFAULT_DATASETS = ("wiki",)
DEFAULT_WINDOWS = 8


@dataclass
class Cell:
    """One model × preset × corpus measurement (``delta`` = compressed − baseline perplexity)."""

    model: str
    preset: str
    dataset: str
    bits_per_element: float
    disk_ratio_vs_fp16: float
    baseline_perplexity: float
    compressed_perplexity: float
    delta: float
    delta_percent: float
    delta_ci_low: float
    delta_ci_high: float
    kl_divergence: float
    top1_agreement: float
    snr_db: float
    scored_tokens: int
    windows: int


@dataclass
class BaselineCheck:
    """The protocol's baseline against a plain sliding-window pass over the same windows.

    ``max_abs_window_nll_diff`` is the largest difference of one window's summed NLL (nats).
    """

    model: str
    dataset: str
    protocol_perplexity: float
    plain_perplexity: float
    max_abs_window_nll_diff: float
    seconds: float


@dataclass
class Leaderboard:
    """Everything one benchmark run measured, in the order it ran."""

    cells: List[Cell] = field(default_factory=list)
    checks: List[BaselineCheck] = field(default_factory=list)
    models: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    corpora: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)

    def cell(self, model: str, preset: str, dataset: str) -> Optional[Cell]:
        """The cell for that model, preset and corpus, or None."""
        return next((c for c in self.cells if (c.model, c.preset, c.dataset) == (model, preset, dataset)), None)


def parse_list(value: str, flag: str, allowed: Optional[Sequence[str]] = None) -> List[str]:
    """A comma-separated flag value as a list without blanks or repeats; ValidationError naming the allowed values."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise run_options.ValidationError(f"{flag} needs at least one name, got {value!r}")
    if len(set(items)) != len(items):
        raise run_options.ValidationError(f"{flag} names {sorted({i for i in items if items.count(i) > 1})} twice")
    if allowed is not None:
        bad = [i for i in items if i not in allowed]
        if bad:
            raise run_options.ValidationError(f"{flag} must name items of {list(allowed)}, got {bad}")
    return items


def run_benchmark(
    model_names: Sequence[str],
    presets: Sequence[str],
    datasets: Sequence[str],
    options: run_options.ValidationOptions,
    console: reports.Console,
    check_baseline: bool = True,
    on_corpus_done: Optional[Callable[[Leaderboard], None]] = None,
) -> Leaderboard:
    """Measure every preset on every model and corpus (see the module docstring).

    Nothing is written here; ``on_corpus_done(board)`` is called after each model × corpus, so
    the caller can save what has been measured so far (a long run interrupted keeps its results).

    ``options`` gives the windows (max_length, stride, max_samples, batch_windows), the group
    size, threshold, seed, device and device map. Raises ValidationError for a model or
    corpus that cannot be loaded.
    """
    board = Leaderboard()
    configs = [SweepConfig(p, {"preset": p}) for p in presets]
    dev = models.select_device(options.device, options.cpu)
    start = time.perf_counter()
    for m, name in enumerate(model_names, 1):
        choice = models.resolve_model(name, options.hub_timeout)
        console.step(m, len(model_names), f"Loading {choice.display_name}...")
        t = time.perf_counter()
        model, tokenizer = models.load_model_and_tokenizer(
            choice.name_or_path, str(dev), dtype=models.default_dtype(dev),
            local_files_only=choice.source in ("hf-cache", "embedded", "local"), device_map=options.device_map,
        )
        layers, kv_heads, head_dim = models._geometry(model.config)
        board.models[name] = {"name": choice.display_name, "source": choice.source, "revision": choice.revision,
                              "num_layers": layers, "num_kv_heads": kv_heads, "head_dim": head_dim,
                              "sliding_window": getattr(model.config, "sliding_window", None),
                              "layer_types": getattr(model.config, "layer_types", None),
                              "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                              "load_s": round(time.perf_counter() - t, 3)}
        console.info(f"{layers} layers, {kv_heads} KV heads, head_dim {head_dim}; loaded in {board.models[name]['load_s']:.1f} s")
        for dataset in datasets:
            corpus = corpora.load_corpus(dataset, None, options.hub_timeout)
            needed = (options.max_samples - 1) * options.stride + options.max_length if options.max_samples else None
            ids, _ = corpora.tokenize_corpus(tokenizer, corpus.text, needed)
            windows, starts = protocol.make_windows(ids, options.max_length, options.stride, options.max_samples or None)
            if windows.shape[0] == 0:
                raise run_options.ValidationError(
                    f"--datasets {dataset}: {ids.numel()} tokens with {name}'s tokenizer, fewer than one "
                    f"window of --max-length {options.max_length}")
            board.corpora.setdefault(dataset, {"name": corpus.name, "sha256": corpus.sha256})
            console.info(f"{name} on {dataset}: {windows.shape[0]} windows x {options.max_length} tokens, "
                         f"{len(configs)} presets")
            t = time.perf_counter()
            outcomes, _ = run_sweep_protocol(
                model, windows, options.stride, configs, starts=starts, group_size=options.group_size,
                batch_windows=options.batch_windows, progress=console.verbose,
            )
            board.timings[f"{name}/{dataset}_s"] = round(time.perf_counter() - t, 3)
            rows = build_rows(configs, outcomes, options.threshold, options.seed, options.bootstrap_resamples)
            for row, outcome in zip(rows, outcomes):
                board.cells.append(Cell(
                    name, row.name, dataset, row.bits_per_element, row.disk_ratio_vs_fp16, row.baseline_perplexity,
                    row.compressed_perplexity, row.delta, row.delta_percent, row.delta_ci_low, row.delta_ci_high,
                    row.kl_divergence, row.top1_agreement, row.snr_db, outcome.scored_tokens, len(outcome.windows)))
            if check_baseline:
                board.checks.append(check_against_plain(model, windows, options.stride, outcomes[0], name, dataset))
                c = board.checks[-1]
                console.info(f"baseline check: protocol PPL {c.protocol_perplexity:.4f}, plain sliding-window "
                             f"PPL {c.plain_perplexity:.4f} (largest window NLL difference {c.max_abs_window_nll_diff:.2e} nats)")
            if on_corpus_done is not None:
                on_corpus_done(board)
        del model, tokenizer
    board.timings["total_s"] = round(time.perf_counter() - start, 3)
    return board


def check_against_plain(model: Any, windows: torch.Tensor, stride: int, outcome: protocol.ProtocolOutcome,
                        model_name: str, dataset: str) -> BaselineCheck:
    """Score ``windows`` [num_windows, max_length] by the plain recipe and compare with ``outcome``'s baseline."""
    t = time.perf_counter()
    plain = protocol.plain_window_nlls(model, windows, stride)
    ours = torch.tensor([w.nll_baseline for w in outcome.windows], dtype=torch.float64)
    tokens = windows.shape[0] * stride
    return BaselineCheck(model_name, dataset, outcome.baseline_perplexity, math.exp(plain.sum().item() / tokens),
                         float((ours - plain).abs().max()), round(time.perf_counter() - t, 3))


# -----------------------------------------------------------------------------
# outputs


def _f(x: float, fmt: str) -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, fmt)


def markdown_table(board: Leaderboard, models_order: Sequence[str], presets: Sequence[str],
                   datasets: Sequence[str]) -> str:
    """One row per model × preset; bits per element and on-disk ratio vs float16 (container bytes,
    headers included; the mean over corpora), then ΔPPL, ΔPPL %, KL and top-1 for each corpus."""
    head = ["model", "preset", "bits/elem", "vs fp16"]
    for d in datasets:
        head += [f"{d} ΔPPL", f"{d} ΔPPL %", f"{d} KL", f"{d} top-1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for m in models_order:
        for p in presets:
            cells = [board.cell(m, p, d) for d in datasets]
            first = next((c for c in cells if c is not None), None)
            if first is None:
                continue
            measured = [c for c in cells if c is not None]
            bits = sum(c.bits_per_element for c in measured) / len(measured)
            ratio = sum(c.disk_ratio_vs_fp16 for c in measured) / len(measured)
            row = [m, p, _f(bits, ".3f"), _f(ratio, ".2f") + "x"]
            for c in cells:
                row += (["–"] * 4 if c is None else
                        [_f(c.delta, "+.4f"), _f(c.delta_percent, "+.2f"), _f(c.kl_divergence, ".5f"),
                         _f(100 * c.top1_agreement, ".2f") + " %"])
            lines.append("| " + " | ".join(row) + " |")
    base = ["", "Baseline perplexity (the same for every preset of a model and corpus):", ""]
    for m in models_order:
        for d in datasets:
            c = next((c for c in board.cells if c.model == m and c.dataset == d), None)
            if c is not None:
                base.append(f"- {m} on {d}: {c.baseline_perplexity:.4f} over {c.scored_tokens:,} scored tokens "
                            f"({c.windows} windows)")
    return "\n".join(lines + base) + "\n"


def plot_leaderboard(board: Leaderboard, path: str, models_order: Sequence[str], datasets: Sequence[str]) -> str:
    """PNG: ΔPPL % against bits per element on disk, one panel per corpus, one marker and colour per model."""
    from validation.diagnostics import pyplot_agg

    plt = pyplot_agg()
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.6), squeeze=False)
    markers = "osD^vP*X"
    for ax, d in zip(axes[0], datasets):
        for i, m in enumerate(models_order):
            cells = sorted((c for c in board.cells if c.model == m and c.dataset == d), key=lambda c: c.bits_per_element)
            if not cells:
                continue
            ax.plot([c.bits_per_element for c in cells], [c.delta_percent for c in cells], "-" + markers[i % len(markers)],
                    label=board.models.get(m, {}).get("name", m), alpha=0.85)
            for c in cells:
                ax.annotate(c.preset, (c.bits_per_element, c.delta_percent), xytext=(4, 4), textcoords="offset points",
                            fontsize=7)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_title(f"corpus: {d}")
        ax.set_xlabel("bits per element on disk")
        ax.set_ylabel("ΔPPL % (compressed vs original cache)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(board: Leaderboard, out_dir: str, models_order: Sequence[str], presets: Sequence[str],
                  datasets: Sequence[str], options: run_options.ValidationOptions, command: str) -> Dict[str, Any]:
    """Write leaderboard.json, leaderboard.md and leaderboard.png into ``out_dir``; return the JSON document."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / "leaderboard.json"), "markdown": str(out / "leaderboard.md"),
             "plot": str(out / "leaderboard.png")}
    table = markdown_table(board, models_order, presets, datasets)
    per_corpus = (f"{options.max_samples} per corpus" if options.max_samples
                  else "windows per corpus as in the table's baseline lines")
    protocol_text = (f"windows of {options.max_length} tokens ({options.max_length - options.stride} context + "
                     f"{options.stride} scored), {per_corpus}, group size {options.group_size}")
    doc = {
        "schema": LEADERBOARD_SCHEMA,
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "protocol": {"max_length": options.max_length, "stride": options.stride, "windows": options.max_samples,
                     "batch_windows": options.batch_windows, "group_size": options.group_size, "seed": options.seed},
        "models": board.models,
        "corpora": board.corpora,
        "presets": list(presets),
        "cells": [asdict(c) for c in board.cells],
        "baseline_checks": [asdict(c) for c in board.checks],
        "files": files,
        "timings": board.timings,
        "versions": reports._versions(),
    }
    jsonio.write_json_atomic(files["json"], doc)
    md = f"# KV cache codec leaderboard\n\n`{command}`\n\n{protocol_text}.\n\n{table}"
    if board.checks:
        md += "\nBaseline checked against a plain sliding-window pass over the same windows:\n\n"
        md += "\n".join(f"- {c.model} on {c.dataset}: protocol PPL {c.protocol_perplexity:.4f}, plain PPL "
                        f"{c.plain_perplexity:.4f}, largest window NLL difference {c.max_abs_window_nll_diff:.2e} nats"
                        for c in board.checks) + "\n"
    tmp = files["markdown"] + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(md)
    os.replace(tmp, files["markdown"])
    plot_leaderboard(board, files["plot"], models_order, datasets)
    return doc


def merge_documents(paths: Sequence[str]) -> tuple:
    """Join leaderboard.json documents into ``(board, models, presets, datasets, protocol)``.

    Raises ValidationError when a file is unreadable or not a leaderboard, when two files
    used different window protocols, or when two files measured the same model × preset × corpus.
    """
    board = Leaderboard()
    models_order: List[str] = []
    presets: List[str] = []
    datasets: List[str] = []
    proto: Optional[Dict[str, Any]] = None
    cell_names = {f.name for f in fields(Cell)}
    check_names = {f.name for f in fields(BaselineCheck)}
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            raise run_options.ValidationError(f"--merge {path}: cannot read a leaderboard: {e}") from None
        if not isinstance(doc, dict) or doc.get("schema") != LEADERBOARD_SCHEMA:
            raise run_options.ValidationError(f"--merge {path}: not a {LEADERBOARD_SCHEMA} document")
        windows_protocol = {k: doc["protocol"].get(k) for k in ("max_length", "stride", "group_size")}
        if proto is not None and windows_protocol != proto:
            raise run_options.ValidationError(f"--merge {path}: protocol {windows_protocol} differs from {proto}")
        proto = windows_protocol
        for entry in doc["cells"]:
            cell = Cell(**{k: entry[k] for k in cell_names})
            if board.cell(cell.model, cell.preset, cell.dataset) is not None:
                raise run_options.ValidationError(
                    f"--merge {path}: {cell.model} × {cell.preset} × {cell.dataset} is measured twice")
            board.cells.append(cell)
            for value, seen in ((cell.model, models_order), (cell.preset, presets), (cell.dataset, datasets)):
                if value not in seen:
                    seen.append(value)
        board.checks += [BaselineCheck(**{k: c[k] for k in check_names}) for c in doc.get("baseline_checks", [])]
        board.models.update(doc.get("models", {}))
        board.corpora.update(doc.get("corpora", {}))
        board.timings.update({f"{os.path.basename(path)}:{k}": v for k, v in doc.get("timings", {}).items()})
    return board, models_order, presets, datasets, proto or {}


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m validation.benchmark``."""
    p = argparse.ArgumentParser(prog="python -m validation.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help="comma-separated: embedded, gemma3-270m, Hugging Face ids or folders (default embedded)")
    p.add_argument("--presets", default=",".join(DEFAULT_PRESETS),
                   help=f"comma-separated built-in presets of {list(BUILTIN_PRESETS)} (default seed,default,compact)")
    p.add_argument("--datasets", default=",".join(DEFAULT_DATASETS),
                   help=f"comma-separated corpora of {list(run_options.DATASET_CHOICES)} (default wiki)")
    p.add_argument("--max-length", type=int, default=run_options.DEFAULT_MAX_LENGTH)
    p.add_argument("--stride", type=int, default=run_options.DEFAULT_STRIDE)
    p.add_argument("--max-samples", type=int, default=DEFAULT_WINDOWS, help=f"windows per corpus (default {DEFAULT_WINDOWS})")
    p.add_argument("--batch-windows", type=int, default=run_options.DEFAULT_BATCH_WINDOWS)
    p.add_argument("--group-size", type=int, choices=run_options.GROUP_SIZES, default=run_options.DEFAULT_GROUP_SIZE)
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--cpu", action="store_true", help="force the CPU")
    p.add_argument("--device-map", choices=run_options.DEVICE_MAPS,
                   help="spread a model larger than one GPU over every visible device (accelerate)")
    p.add_argument("--no-check-baseline", action="store_true",
                   help="skip the plain sliding-window pass that checks each baseline")
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help=f"where the outputs go (default {DEFAULT_OUT_DIR}/)")
    p.add_argument("--output-json", metavar="PATH", help="also write leaderboard.json's document here")
    p.add_argument("--quiet", action="store_true", help="print only the summary line")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="measure nothing: join these leaderboard.json files (same window protocol) into one")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark; exit 0 when written, 2 for a usage error or a model/corpus that cannot be loaded."""
    args = build_parser().parse_args(argv)
    command = "python -m validation.benchmark " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        if args.merge:
            board, model_names, presets, datasets, proto = merge_documents(args.merge)
            windows = sorted({c.windows for c in board.cells})
            options = run_options.ValidationOptions(max_length=proto["max_length"], stride=proto["stride"],
                                                    group_size=proto["group_size"],
                                                    max_samples=windows[0] if len(windows) == 1 else None)
            doc = write_outputs(board, args.out_dir, model_names, presets, datasets, options, command)
            if args.output_json:
                jsonio.write_json_atomic(args.output_json, doc)
            print(f"LEADERBOARD: merged {len(args.merge)} files -> {doc['files']['markdown']}")
            return 0
        model_names = parse_list(args.models, "--models")
        presets = parse_list(args.presets, "--presets", BUILTIN_PRESETS)
        datasets = parse_list(args.datasets, "--datasets", run_options.DATASET_CHOICES)
        options = run_options.ValidationOptions(
            max_length=args.max_length, stride=args.stride, max_samples=args.max_samples,
            batch_windows=args.batch_windows, group_size=args.group_size, device=args.device, cpu=args.cpu,
            device_map=args.device_map)
        options.check()
        models.configure_threads()
        console = reports.Console(not args.quiet)
        board = run_benchmark(
            model_names, presets, datasets, options, console, not args.no_check_baseline,
            on_corpus_done=lambda b: write_outputs(b, args.out_dir, model_names, presets, datasets, options, command),
        )
        doc = write_outputs(board, args.out_dir, model_names, presets, datasets, options, command)
    except run_options.ValidationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.output_json:
        jsonio.write_json_atomic(args.output_json, doc)
    print(f"LEADERBOARD: {len(model_names)} models x {len(presets)} presets x {len(datasets)} corpora -> "
          f"{doc['files']['markdown']} ({board.timings['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
