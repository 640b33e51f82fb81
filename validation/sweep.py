"""Codec frontier: many kv-compress configurations scored against one shared baseline.

``python validation/validate_perplexity.py --sweep [--sweep-grid GRID.json] [--plots DIR]`` runs
this module. The windows are those of a normal run (docs/perplexity-protocol.md). Per batch of
windows:

1. one prefill of the contexts gives the cache, layers ``[batch, kv_heads, context, head_dim]``,
   and the logits that predict scored token 1;
2. one scoring pass over the ``[batch, stride - 1]`` scored inputs, attending to a fresh copy of
   that cache, gives the baseline logits ``[batch, stride - 1, vocab]``;
3. for every configuration of the grid: one round trip of the *same* cache through the real
   binary (``roundtrip_kv_cache``: save → compress → decompress → load), one scoring pass
   attending to the reconstruction, and the per-window NLL, KL and top-1 statistics against
   the baseline logits of step 2; the per-layer, per-KV-head SNR is accumulated too.

So every configuration is measured on the same windows against the same baseline numbers,
and the prefill and baseline are computed once instead of once per configuration. Each
configuration's ΔPPL interval is the usual paired bootstrap over windows
(``paired_bootstrap_interval``, same seed for all).

Outputs, in DIR (``--plots``, default ``sweep-results/``): ``sweep.json`` (everything),
``sweep.md`` (a table sorted by on-disk ratio, Pareto-optimal rows and the recommendation
marked), ``frontier.png`` (ΔPPL against ratio) and ``heatmaps/<config>.png`` (per-layer SNR).
The recommended configuration is the one with the lowest ΔPPL among those at least
:data:`MIN_RATIO` times smaller on disk than the cache stored as float16.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from validation import jsonio
from validation import models
from validation import options as run_options
from validation import protocol
from validation import reports
from validation import runner
from validation.compression_bridge import codec_args, roundtrip_kv_cache
from validation.diagnostics import SNRAccumulator, plot_snr_heatmap
from validation.compat import forward
from validation.frontier import (
    COMPACT_RATIO,
    HIGH_RATIO,
    MIN_RATIO,
    SweepRow,
    build_rows,
    markdown_table,
    picks,
    plot_frontier,
    sorted_rows,
)

SWEEP_SCHEMA = "kv-cache-p2p/codec-sweep/v1"
DEFAULT_OUT_DIR = "sweep-results"
GRID_CODEC_KEYS = ("group_size", "sparsity") + run_options.CODEC_KEYS


def _codec(scheme: str, rotate: str, group_size: int, *, key_axis: str = "token", sink: int = 0, bits: int = 4,
           key_bits: Optional[int] = None, value_bits: Optional[int] = None) -> Dict[str, Any]:
    """A grid codec with every key explicit, so the sweep never depends on the binary's defaults."""
    return {"scheme": scheme, "rotate": rotate, "group_size": group_size, "key_axis": key_axis, "sink": sink,
            "bits": bits, "key_bits": key_bits if key_bits is not None else bits,
            "value_bits": value_bits if value_bits is not None else bits, "sparsity": 0.0}


@dataclass
class SweepConfig:
    """One point of the grid: a name (unique, used in tables and file names) and its codec options.

    ``codec`` keys are GRID_CODEC_KEYS (group_size, sparsity, scheme, rotate, key_axis, sink,
    bits, key_bits, value_bits); a key left out takes the run's ``--group-size``/``--sparsity``
    or, for the others, the binary's default.
    """

    name: str
    codec: Dict[str, Any]

    def bridge_kwargs(self, group_size: int, sparsity: float) -> Dict[str, Any]:
        """Keyword arguments for ``roundtrip_kv_cache`` (group_size and sparsity filled in)."""
        kwargs = {"group_size": group_size, "sparsity": sparsity}
        kwargs.update({k: v for k, v in self.codec.items() if v is not None})
        return kwargs


# The built-in grid: the seed's scheme, the candidates of issue 6 at ~3.56-3.76x, the mixed
# 8/4-bit point, two low-bit points and an 8-bit point for the ends of the frontier. Every
# group size here divides head_dim 64 (G = 128 would not).
DEFAULT_GRID: List[SweepConfig] = [
    SweepConfig("seed-sym-g64", _codec("sym", "none", 64)),
    SweepConfig("sym-g32", _codec("sym", "none", 32)),
    SweepConfig("asym-g64", _codec("asym", "none", 64)),
    SweepConfig("sym-had-g64", _codec("sym", "hadamard", 64)),
    SweepConfig("sym-had-g64-sink1", _codec("sym", "hadamard", 64, sink=1)),
    SweepConfig("asym-had-g64", _codec("asym", "hadamard", 64)),
    SweepConfig("asym-g64-kchan-sink1", _codec("asym", "none", 64, key_axis="channel", sink=1)),
    SweepConfig("asym-had-g64-kchan-sink1", _codec("asym", "hadamard", 64, key_axis="channel", sink=1)),
    SweepConfig("sym-had-g64-kchan-sink1", _codec("sym", "hadamard", 64, key_axis="channel", sink=1)),
    SweepConfig("sym-had-g32", _codec("sym", "hadamard", 32)),
    SweepConfig("k8v4-sym-g64", _codec("sym", "none", 64, key_bits=8, value_bits=4)),
    SweepConfig("asym-had-3bit-g64", _codec("asym", "hadamard", 64, bits=3)),
    SweepConfig("sym-had-2bit-g32", _codec("sym", "hadamard", 32, bits=2)),
    SweepConfig("sym-8bit-g64", _codec("sym", "none", 64, bits=8)),
]


# -----------------------------------------------------------------------------
# the grid


def check_grid(configs: Sequence[SweepConfig], where: str = "sweep grid") -> None:
    """Raise ValidationError unless names are unique non-empty strings and every codec is valid.

    Messages name the entry (1-based), the allowed values and the value received.
    """
    if not configs:
        raise run_options.ValidationError(f"{where}: expected at least one configuration, got none")
    seen: Dict[str, int] = {}
    for i, cfg in enumerate(configs, 1):
        if not isinstance(cfg.name, str) or not cfg.name.strip():
            raise run_options.ValidationError(f"{where}: entry {i}: \"name\" must be a non-empty string, got {cfg.name!r}")
        if cfg.name in seen:
            raise run_options.ValidationError(f"{where}: entry {i}: name {cfg.name!r} is already used by entry {seen[cfg.name]}")
        seen[cfg.name] = i
        if not isinstance(cfg.codec, dict):
            raise run_options.ValidationError(f"{where}: entry {i} ({cfg.name}): \"codec\" must be an object, "
                                     f"got {type(cfg.codec).__name__}")
        unknown = sorted(set(cfg.codec) - set(GRID_CODEC_KEYS))
        if unknown:
            raise run_options.ValidationError(f"{where}: entry {i} ({cfg.name}): unknown codec key(s) {unknown}; "
                                     f"allowed: {list(GRID_CODEC_KEYS)}")
        try:
            codec_args(**cfg.bridge_kwargs(run_options.DEFAULT_GROUP_SIZE, 0.0))
        except ValueError as e:
            raise run_options.ValidationError(f"{where}: entry {i} ({cfg.name}): {e}") from None


def load_grid(path: str) -> List[SweepConfig]:
    """Read a grid file: a JSON list of ``{"name": str, "codec": {...}}`` objects; ValidationError if malformed."""
    where = f"--sweep-grid {path}"
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise run_options.ValidationError(f"{where}: no such file") from None
    except json.JSONDecodeError as e:
        raise run_options.ValidationError(f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise run_options.ValidationError(f"{where}: cannot be read ({e})") from None
    if not isinstance(doc, list) or not doc:
        got = "an empty list" if isinstance(doc, list) else f"a JSON {type(doc).__name__}"
        raise run_options.ValidationError(f"{where}: expected a non-empty JSON list of {{\"name\", \"codec\"}} objects, got {got}")
    configs = []
    for i, entry in enumerate(doc, 1):
        if not isinstance(entry, dict) or set(entry) != {"name", "codec"}:
            got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise run_options.ValidationError(f"{where}: entry {i}: expected an object with exactly the keys "
                                     f"['codec', 'name'], got {got}")
        configs.append(SweepConfig(entry["name"], entry["codec"]))
    check_grid(configs, where)
    return configs


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("._") or "config"


# -----------------------------------------------------------------------------
# the measurement


def run_sweep_protocol(
    model: Any,
    windows: torch.Tensor,
    stride: int,
    configs: Sequence[SweepConfig],
    *,
    starts: Optional[Sequence[int]] = None,
    group_size: int = run_options.DEFAULT_GROUP_SIZE,
    sparsity: float = 0.0,
    batch_windows: int = run_options.DEFAULT_BATCH_WINDOWS,
    work_dir: Optional[str] = None,
    progress: bool = False,
) -> Tuple[List[protocol.ProtocolOutcome], Dict[str, float]]:
    """Score ``windows`` [num_windows, max_length] once with the original cache and once per configuration.

    Returns one ProtocolOutcome per configuration (same order as ``configs``; every outcome has
    identical ``nll_baseline`` values, computed from the same baseline logits) and the shared
    timings in seconds: prefill, baseline scoring, total. Per-configuration timings (bridge,
    scoring, metrics, diagnostics) are in each outcome's ``timings``.
    """
    from validation.progress import progress_bar

    check_grid(configs)
    num_windows, max_length = windows.shape
    context = max_length - stride
    if context < 1:
        raise run_options.ValidationError(f"stride must be < max_length ({max_length}) to leave context, got {stride}")
    starts = list(starts) if starts is not None else list(range(0, num_windows * stride, stride))
    device = models._model_device(model)
    keep_arg = protocol._supports_logits_to_keep(model)
    shared = {"prefill": 0.0, "baseline_scoring": 0.0}
    per_cfg = [{"bridge": 0.0, "scoring": 0.0, "metrics": 0.0, "diagnostics": 0.0} for _ in configs]
    scores: List[List[protocol.WindowScore]] = [[] for _ in configs]
    token_kl: List[List[np.ndarray]] = [[] for _ in configs]
    token_dp: List[List[np.ndarray]] = [[] for _ in configs]
    metrics: List[List[Any]] = [[] for _ in configs]
    snr = [SNRAccumulator() for _ in configs]
    kwargs = [cfg.bridge_kwargs(group_size, sparsity) for cfg in configs]
    cache_bytes = 0
    geometry: Dict[str, Any] = {}

    owned_tmp = None
    if work_dir is None:
        owned_tmp = work_dir = protocol.make_work_dir(model, batch_windows, num_windows, context, "kv-sweep-")
    wall = time.perf_counter()
    bar = progress_bar(total=num_windows * len(configs), desc="windows x configs", unit="window", enabled=progress)
    try:
        for b0 in range(0, num_windows, batch_windows):
            batch = windows[b0:b0 + batch_windows].to(device)
            bsz = batch.shape[0]
            labels = batch[:, context:]  # [batch, stride]
            scored_in = batch[:, context:max_length - 1]  # [batch, stride - 1]
            with torch.inference_mode():
                t = time.perf_counter()
                pre = protocol.prefill_contexts(model, batch[:, :context], keep_arg)
                first_logits, prefill_cache, layers = pre.first_logits, pre.cache, pre.layers
                shared["prefill"] += time.perf_counter() - t
                geometry = pre.geometry
                cache_bytes += pre.nbytes

                t = time.perf_counter()
                if scored_in.shape[1] > 0:  # baseline logits [batch, stride - 1, vocab], attending to a copy
                    logits_b = forward(model, pre.rebuild(layers), input_ids=scored_in, use_cache=True).logits
                else:
                    logits_b = first_logits.new_empty(bsz, 0, first_logits.shape[-1])
                shared["baseline_scoring"] += time.perf_counter() - t

                for c, cfg in enumerate(configs):
                    timing = per_cfg[c]
                    t = time.perf_counter()
                    recon_cache, m = roundtrip_kv_cache(prefill_cache, work_dir, device=str(device), **kwargs[c])
                    timing["bridge"] += time.perf_counter() - t
                    metrics[c].append(m)
                    recon_layers = protocol.check_reconstruction(layers, recon_cache, what=f"config {cfg.name}: ")
                    recon_cache = pre.rebuild(recon_layers)  # sliding-window layers stay sliding
                    t = time.perf_counter()
                    snr[c].update(layers, recon_layers)
                    timing["diagnostics"] += time.perf_counter() - t
                    del recon_layers

                    t = time.perf_counter()
                    if scored_in.shape[1] > 0:
                        logits_c = forward(model, recon_cache, input_ids=scored_in, use_cache=True).logits
                    else:
                        logits_c = logits_b
                    del recon_cache
                    timing["scoring"] += time.perf_counter() - t

                    t = time.perf_counter()
                    for j in range(bsz):
                        ws = protocol._window_stats(first_logits[j], logits_b[j], logits_c[j], labels[j])
                        scores[c].append(ws.score(starts[b0 + j], stride))
                        token_kl[c].append(ws.token_kl)
                        token_dp[c].append(ws.token_dp)
                    del logits_c
                    timing["metrics"] += time.perf_counter() - t
                    bar.update(bsz)
                    bar.set_postfix(config=cfg.name)
                del prefill_cache, layers, logits_b, first_logits
    finally:
        bar.close()
        if owned_tmp is not None:
            shutil.rmtree(owned_tmp, ignore_errors=True)
    shared["total"] = time.perf_counter() - wall
    outcomes = []
    for c in range(len(configs)):
        timing = dict(per_cfg[c])
        timing["total"] = sum(timing.values())
        outcomes.append(protocol.ProtocolOutcome(
            windows=scores[c], metrics=metrics[c], timings=timing, max_length=max_length, stride=stride,
            batch_windows=batch_windows, cache_bytes=cache_bytes, cache_dtype=geometry.get("dtype", ""),
            num_layers=geometry.get("num_layers", 0), num_kv_heads=geometry.get("num_kv_heads", 0),
            head_dim=geometry.get("head_dim", 0), diagnostics=snr[c].result() if snr[c].batches else None,
            token_kl=np.concatenate(token_kl[c]) if token_kl[c] else None,
            token_dp=np.concatenate(token_dp[c]) if token_dp[c] else None,
            layer_seq_lens=protocol.per_layer_lengths(geometry, context),
        ))
    return outcomes, shared


# -----------------------------------------------------------------------------
# the run


@dataclass
class SweepOutcome:
    """What ``run_sweep`` measured: rows in grid order, the recommendation, the shared baseline, output paths."""

    rows: List[SweepRow]
    recommended: Optional[str]
    baseline_perplexity: float
    threshold: float
    min_ratio: float
    scored_tokens: int
    num_windows: int
    files: Dict[str, str] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)

    def row(self, name: str) -> SweepRow:
        """The row of configuration ``name``; KeyError naming the configurations otherwise."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no configuration {name!r}; have {[r.name for r in self.rows]}")

    def verdict_line(self) -> str:
        """One line for ``--quiet``: the recommendation and its ΔPPL."""
        head = (f"SWEEP: {len(self.rows)} configs, {self.scored_tokens} scored tokens, baseline PPL "
                f"{self.baseline_perplexity:.4f}; ")
        if self.recommended is None:
            return head + f"no configuration reaches {self.min_ratio:g}x on disk"
        r = self.row(self.recommended)
        return head + (f"recommended {r.name}: delta {r.delta:+.4f} [{r.delta_ci_low:+.4f}, {r.delta_ci_high:+.4f}] at "
                       f"{r.disk_ratio_vs_fp16:.2f}x vs fp16 ({'passed' if r.passed else 'FAILED'} {self.threshold:g})")


def run_sweep(
    model: Any,
    token_ids: torch.Tensor,
    options: run_options.ValidationOptions,
    configs: Sequence[SweepConfig],
    console: reports.Console,
    *,
    model_choice: models.ModelChoice,
    corpus_info: Dict[str, Any],
    tokenizer: Any = None,
    out_dir: str = DEFAULT_OUT_DIR,
    min_ratio: float = MIN_RATIO,
    command: str = "",
    extra_timings: Optional[Dict[str, float]] = None,
    progress: bool = True,
    heatmaps: bool = True,
) -> Tuple[SweepOutcome, Dict[str, Any]]:
    """Sweep ``configs`` over the windows of ``token_ids`` [num_tokens]; write sweep.json, sweep.md, frontier.png.

    ``options`` gives the windows (max_length, stride, max_samples, batch_windows), the
    threshold, the bootstrap seed and the group size / sparsity of configs that leave them out.
    Returns the outcome and the JSON document written to ``out_dir/sweep.json``.
    """
    check_grid(configs)
    layers, kv_heads, head_dim = models._geometry(model.config)
    windows, starts = protocol.make_windows(token_ids, options.max_length, options.stride, options.max_samples or None)
    context = options.max_length - options.stride
    console.step(2, 4, f"Prefill and baseline once per batch, then {len(configs)} configurations through kv-compress...")
    console.info(f"Corpus: {corpus_info['name']} ({corpus_info['source']}: {corpus_info['reason']})")
    console.info(f"Tokens: {token_ids.numel():,} tokenized; {windows.shape[0]} windows x {options.max_length} "
                 f"({context} context + {options.stride} scored), {options.batch_windows} windows per batch")
    outcomes, shared = run_sweep_protocol(
        model, windows, options.stride, configs, starts=starts, group_size=options.group_size,
        sparsity=options.sparsity, batch_windows=options.batch_windows, progress=progress and console.verbose,
    )
    console.info(f"Shared: prefill {shared['prefill']:.1f} s, baseline scoring {shared['baseline_scoring']:.1f} s; "
                 f"all configurations {shared['total']:.1f} s")

    console.step(3, 4, "Statistics (paired bootstrap per configuration)...")
    t = time.perf_counter()
    rows = build_rows(configs, outcomes, options.threshold, options.seed, options.bootstrap_resamples, min_ratio)
    stats_seconds = time.perf_counter() - t
    base = outcomes[0]
    best = next((r for r in rows if r.recommended), None)
    sweep = SweepOutcome(rows, best.name if best else None, base.baseline_perplexity, options.threshold, min_ratio,
                         base.scored_tokens, len(base.windows))

    console.step(4, 4, f"Writing {out_dir}...")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = (f"{model_choice.display_name} on {corpus_info['name']}\n{sweep.num_windows} windows, "
             f"{sweep.scored_tokens:,} scored tokens, baseline PPL {sweep.baseline_perplexity:.3f}")
    files = {"json": str(out / "sweep.json"), "markdown": str(out / "sweep.md")}
    t = time.perf_counter()
    files["frontier"] = plot_frontier(rows, str(out / "frontier.png"), options.threshold, min_ratio, title=title)
    if heatmaps:
        for r, outcome in zip(rows, outcomes):
            if outcome.diagnostics is not None:
                files[f"heatmap:{r.name}"] = plot_snr_heatmap(
                    outcome.diagnostics, str(out / "heatmaps" / f"{_file_stem(r.name)}.png"),
                    title=f"{model_choice.display_name}, {r.name}: SNR per layer and KV head\n"
                          f"{run_options.describe_codec(r.resolved_codec)}",
                )
    plot_seconds = time.perf_counter() - t
    sweep.files = files
    sweep.timings = {**{f"{k}_s": round(v, 3) for k, v in shared.items()}, "statistics_s": round(stats_seconds, 3),
                     "plots_s": round(plot_seconds, 3),
                     **{k: round(v, 3) for k, v in (extra_timings or {}).items()}}

    report = {
        "schema": SWEEP_SCHEMA,
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "threshold": options.threshold,
        "min_ratio": min_ratio,
        "recommended": sweep.recommended,
        "recommendation_rule": f"lowest delta among configurations with disk_ratio_vs_fp16 >= {min_ratio:g}",
        "picks": picks(rows),
        "picks_rule": (f"lowest delta at disk_ratio_vs_fp16 >= {MIN_RATIO:g} (default), >= {COMPACT_RATIO:g} (compact), "
                       f">= {HIGH_RATIO:g} (high_ratio)"),
        "pareto": [r.name for r in sorted_rows(rows) if r.pareto],
        "baseline": {"perplexity": sweep.baseline_perplexity,
                     "per_window_nll": [{"start": w.start, "tokens": w.tokens, "nll": w.nll_baseline}
                                        for w in base.windows]},
        "configs": [asdict(r) for r in rows],
        "model": {"requested": model_choice.requested, "source": model_choice.source,
                  "name_or_path": model_choice.name_or_path, "name": model_choice.display_name,
                  "reason": model_choice.reason, "revision": model_choice.revision, "files": model_choice.files,
                  "num_layers": layers, "num_kv_heads": kv_heads, "head_dim": head_dim,
                  "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                  "device": str(models._model_device(model))},
        "tokenizer": reports._tokenizer_info(tokenizer),
        "corpus": {**corpus_info, "tokens": int(token_ids.numel())},
        "protocol": {"max_length": options.max_length, "stride": options.stride, "context_length": context,
                     "windows": sweep.num_windows, "window_starts": starts, "scored_tokens": sweep.scored_tokens,
                     "batch_windows": options.batch_windows, "seed": options.seed,
                     "bootstrap_resamples": options.bootstrap_resamples,
                     "shared": "one prefill and one baseline scoring pass per batch; every configuration's round "
                               "trip and scoring use that batch's cache and baseline logits"},
        "cache": {"bytes": base.cache_bytes, "dtype": base.cache_dtype},
        "files": files,
        "timings": sweep.timings,
        "versions": reports._versions(),
    }
    jsonio.write_json_atomic(files["json"], report)
    _write_text_atomic(files["markdown"], _markdown_document(sweep, rows, title, command))
    if options.output_json:
        jsonio.write_json_atomic(options.output_json, report)

    _print_summary(console, sweep)
    return sweep, report


def _markdown_document(sweep: SweepOutcome, rows: Sequence[SweepRow], title: str, command: str) -> str:
    best = sweep.row(sweep.recommended) if sweep.recommended else None
    if best is not None:
        verdict = (f"**Recommended: `{best.name}`** ({run_options.describe_codec(best.resolved_codec)}): ΔPPL "
                   f"{best.delta:+.3f} [{best.delta_ci_low:+.3f}, {best.delta_ci_high:+.3f}] at "
                   f"{best.disk_ratio_vs_fp16:.2f}x on disk ({best.bits_per_element:.3f} bits/element), "
                   f"{'passes' if best.passed else 'fails'} the {sweep.threshold:g} gate.")
    else:
        verdict = f"**No configuration reaches {sweep.min_ratio:g}x on disk**, so none is recommended."
    chosen = picks(rows)
    bars = (("default", MIN_RATIO), ("compact", COMPACT_RATIO), ("high_ratio", HIGH_RATIO))
    pick_lines = [f"- lowest ΔPPL at >= {ratio:g}x ({key}): "
                  + (f"`{chosen[key]}`, ΔPPL {sweep.row(chosen[key]).delta:+.3f} "
                     f"({100 * sweep.row(chosen[key]).delta / sweep.baseline_perplexity:+.2f}%) at "
                     f"{sweep.row(chosen[key]).disk_ratio_vs_fp16:.2f}x" if chosen[key] else "none reaches it")
                  for key, ratio in bars]
    lines = [
        "# Codec sweep",
        "",
        title.replace("\n", ": ") + ".",
        "",
        *([f"Command: `{command}`", ""] if command else []),
        "Every configuration was scored on the same windows against the same baseline (one prefill and one "
        "baseline pass per batch of windows; one kv-compress round trip per batch per configuration). "
        "ΔPPL = compressed − baseline perplexity; the interval is the 95% paired bootstrap over windows. "
        "`ratio vs fp16 (disk)` is the size of the cache as a float16 safetensors file over the container's size. "
        f"Rows are sorted by that ratio; **Pareto** marks rows no other row beats on both ratio and ΔPPL; the "
        f"recommendation is the lowest ΔPPL among rows at >= {sweep.min_ratio:g}x.",
        "",
        markdown_table(rows, sweep.threshold, sweep.min_ratio),
        "",
        verdict,
        "",
        *pick_lines,
        "",
    ]
    return "\n".join(lines)


def _write_text_atomic(path: str, text: str) -> None:
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _print_summary(console: reports.Console, sweep: SweepOutcome) -> None:
    console.banner(f"SWEEP RESULTS (baseline PPL {sweep.baseline_perplexity:.4f}, {sweep.scored_tokens:,} tokens)")
    console.line(f"  {'#':>2} {'config':<26}{'bits':>7}{'ratio':>8}{'dPPL':>9}  {'95% CI':<18}{'KL':>8}{'top-1':>8}"
                 f"{'SNR':>7}  gate")
    for r in sorted_rows(sweep.rows):
        mark = (" *" if r.recommended else "") + (" P" if r.pareto else "")
        console.line(f"  {r.index:>2} {r.name:<26}{r.bits_per_element:>7.3f}{r.disk_ratio_vs_fp16:>7.2f}x"
                     f"{r.delta:>+9.3f}  [{r.delta_ci_low:+.3f}, {r.delta_ci_high:+.3f}] {r.kl_divergence:>8.4f}"
                     f"{100 * r.top1_agreement:>7.2f}%{r.snr_db:>7.2f}  {'pass' if r.passed else 'FAIL'}{mark}")
    console.line(reports.THIN_RULE)
    console.line("  * recommended (lowest dPPL at >= %gx on disk), P Pareto-optimal" % sweep.min_ratio)
    if sweep.recommended:
        r = sweep.row(sweep.recommended)
        console.line(f"  Recommended: {r.name} ({run_options.describe_codec(r.resolved_codec)})")
        console.line(f"  dPPL {r.delta:+.4f} [{r.delta_ci_low:+.4f}, {r.delta_ci_high:+.4f}] at "
                     f"{r.disk_ratio_vs_fp16:.2f}x vs fp16 on disk")
    else:
        console.line(f"  No configuration reaches {sweep.min_ratio:g}x on disk")
    for key in ("markdown", "json", "frontier"):
        console.line(f"  {key}: {sweep.files[key]}")
    console.line(reports.RULE)


def run_sweep_cli(options: run_options.ValidationOptions, grid_file: Optional[str] = None, verbose: bool = True,
                  command: str = "") -> SweepOutcome:
    """``validate_perplexity.py --sweep``: load the model and corpus as a normal run does, then sweep.

    The grid is ``grid_file`` (see load_grid) or DEFAULT_GRID; outputs go to ``options.plots``
    (default ``sweep-results``). Raises ValidationError on a bad grid or anything that
    prevents a measurement.
    """
    configs = load_grid(grid_file) if grid_file else list(DEFAULT_GRID)
    check_grid(configs)
    console = reports.Console(verbose)
    inputs = runner.load_run_inputs(options, console, title="KV Cache Codec Sweep", steps=4)
    sweep, _ = run_sweep(
        inputs.model, inputs.token_ids, options, configs, console, model_choice=inputs.choice,
        corpus_info=inputs.corpus_info, tokenizer=inputs.tokenizer, out_dir=options.plots or DEFAULT_OUT_DIR,
        command=command, extra_timings=inputs.timings,
    )
    return sweep
