"""A full run: load the model and corpus (step 1), run the protocol, report (steps 2-6)."""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple

import torch

from validation import distributed
from validation.compression_bridge import VERDICT_MIN_COSINE, VERDICT_MIN_SNR_DB, relative_rmse
from validation.corpora import load_corpus, tokenize_corpus
from validation.diagnostics import HEATMAP_FILENAME, plot_snr_heatmap
from validation.models import (
    ModelChoice,
    _geometry,
    _hash_weight_files,
    _model_device,
    default_dtype,
    hf_cache_snapshot,
    load_model_and_tokenizer,
    resolve_model,
    select_device,
)
from validation.options import ValidationError, ValidationOptions, describe_codec
from validation.protocol import make_windows
from validation.reports import (
    REPORT_SCHEMA,
    Console,
    _fmt_mb,
    _metrics_dict,
    _tokenizer_info,
    _versions,
    crossing_note,
    print_results,
)
from validation.results import ValidationResult, build_result
from validation.selection import describe_selection, summarize_selection
from validation.stats import aggregate_metrics, kld_summary


def evaluate(
    model: Any,
    token_ids: torch.Tensor,
    options: ValidationOptions,
    console: Console,
    *,
    model_choice: ModelChoice,
    corpus_info: Dict[str, Any],
    tokenizer: Any = None,
    load_seconds: float = 0.0,
    extra_timings: Optional[Dict[str, float]] = None,
    progress: bool = True,
) -> Tuple[ValidationResult, Dict[str, Any]]:
    """Steps 2-6 and the RESULTS block for a loaded model and tokenized corpus; returns (result, report dict)."""
    device = _model_device(model)
    layers, kv_heads, head_dim = _geometry(model.config)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and options.max_length > max_pos:
        raise ValidationError(
            f"--max-length must be <= the model's max_position_embeddings ({max_pos}), got {options.max_length}"
        )

    spec = options.selection_spec
    if spec is not None and spec.layer_keep_ratios is not None and len(spec.layer_keep_ratios) != layers:
        raise ValidationError(f"{options.preset}: selection.keep_ratios lists {len(spec.layer_keep_ratios)} ratios, "
                              f"but {model_choice.display_name} has {layers} layers")

    console.step(2, 6, "Generating KV cache...")
    windows, starts = make_windows(token_ids, options.max_length, options.stride, options.max_samples or None)
    context = options.max_length - options.stride
    console.info(f"Corpus: {corpus_info['name']} ({corpus_info['source']}: {corpus_info['reason']})")
    console.info(f"Tokens: {token_ids.numel():,} tokenized; {windows.shape[0]} windows x {options.max_length} "
                 f"({context} context + {options.stride} scored, stride {options.stride})")
    console.info(f"Each batch of {options.batch_windows} windows: prefill -> kv-compress round trip -> "
                 f"scoring on original and reconstructed cache")
    ranks = distributed.current()
    if ranks is not None:
        console.info(f"Data-parallel: {ranks.world_size} ranks ({distributed.BACKEND}); batch b runs on rank "
                     f"b mod {ranks.world_size}, rank 0 gathers and reports")
    outcome = distributed.run_protocol_sharded(
        model, windows, options.stride, starts=starts, group_size=options.group_size, sparsity=options.sparsity,
        batch_windows=options.batch_windows, progress=progress and console.verbose, ctx=ranks,
        selection=spec, **options.codec,
    )
    console.info(f"Generated: {outcome.num_layers} layers, {len(outcome.windows)} x {context} tokens, "
                 f"{_fmt_mb(outcome.cache_bytes)} ({outcome.cache_dtype})")

    result = build_result(outcome, options.threshold, options.seed, options.bootstrap_resamples,
                          model_name=model_choice.display_name, corpus_name=corpus_info["name"], gate=options.gate)
    kl_stats = kld_summary(outcome.token_kl, outcome.token_dp, sum(w.top1_matches for w in outcome.windows))
    agg = aggregate_metrics(outcome.metrics)
    t = outcome.timings

    console.step(3, 6, "Computing baseline perplexity...")
    console.info(f"Baseline perplexity: {result.baseline_perplexity:.4f}")
    console.step(4, 6, "Compressing KV cache...")
    vs_fp16 = agg.get("ratio_vs_fp16", math.nan)
    vs_fp16_text = f", {vs_fp16:.2f}x vs float16" if math.isfinite(vs_fp16) and outcome.cache_dtype != "float16" else ""
    console.info(f"Compression ratio: {result.compression_ratio:.2f}x{vs_fp16_text}  "
                 f"({_fmt_mb(agg['original_size_bytes'])} -> {_fmt_mb(agg['compressed_size_bytes'])}, "
                 f"group size {options.group_size}, sparsity {options.sparsity:g})")
    console.info(f"Codec: {describe_codec(agg.get('codec'))}"
                 + ("" if options.codec else " (the binary's defaults)"))
    console.info(f"Bits per element: {result.bits_per_element:.3f}; on disk {result.disk_ratio_vs_fp16:.2f}x "
                 f"smaller than the cache as float16")
    selection = summarize_selection(outcome.metrics)
    if selection is not None:
        console.info(describe_selection(selection))
    console.info(f"RMSE: {result.rmse:.6f} ({100 * relative_rmse(result.snr_db):.1f}% of the cache's RMS)")
    console.info(f"SNR: {result.snr_db:.2f} dB")
    diag = outcome.diagnostics
    if diag is not None:
        for text in diag.summary_lines():
            console.info(text)
    console.info(f"Bridge: {agg['calls']} compress + {agg['calls']} decompress calls, {t['bridge']:.2f} s "
                 f"({100 * t['bridge'] / t['total']:.1f}% of {t['total']:.1f} s)")
    failed = [m for m in outcome.metrics if not m.passed]
    if failed:
        console.info(f"kv-compress's own quality gate: {agg['quality_level']} in {len(failed)}/{len(outcome.metrics)} "
                     f"calls, e.g. {'; '.join(failed[0].violations) or 'failed'} (reported; the perplexity gate decides)")
    else:
        console.info(f"kv-compress's own quality gate: {agg['quality_level']}, passed in {len(outcome.metrics)}/"
                     f"{len(outcome.metrics)} calls (SNR > {VERDICT_MIN_SNR_DB:g} dB, cosine > {VERDICT_MIN_COSINE:g})")
    console.step(5, 6, "Loading reconstructed KV cache...")
    console.info(f"Reconstructed: {outcome.num_layers} layers, cosine similarity {result.cosine_similarity:.6f}, "
                 f"max error {result.max_error:.4g} ({result.quality_level})")
    console.step(6, 6, "Computing perplexity with compressed KV cache...")
    console.info(f"Compressed perplexity: {result.compressed_perplexity:.4f}")
    plots: Dict[str, str] = {}
    if options.plots and diag is not None:
        plots["snr_heatmap"] = plot_snr_heatmap(
            diag, os.path.join(options.plots, HEATMAP_FILENAME),
            title=f"{model_choice.display_name}: SNR per layer and KV head\n{describe_codec(agg.get('codec'))}",
        )
    print_results(result, console, outcome, codec=agg.get("codec"), kl_summary=kl_stats)
    for name, path in plots.items():
        console.line(f"  Plot ({name}): {path}")

    timings = {"model_load_s": round(load_seconds, 3)}
    timings.update({k: round(v, 3) for k, v in (extra_timings or {}).items()})
    timings.update({f"{k}_s": round(v, 3) for k, v in t.items()})
    timings["bridge_share"] = round(t["bridge"] / t["total"], 4) if t["total"] else None
    report = {
        "schema": REPORT_SCHEMA,
        "passed": result.passed,
        "result": result.to_dict(),
        "gate": {"kind": options.gate, "threshold": options.threshold, "value": result.gated_value,
                 "ci_crosses_threshold": result.ci_crosses_threshold, "note": crossing_note(result) or None},
        "kl_summary": kl_stats,
        "model": {
            "requested": model_choice.requested, "source": model_choice.source,
            "name_or_path": model_choice.name_or_path, "name": model_choice.display_name,
            "reason": model_choice.reason, "revision": model_choice.revision, "files": model_choice.files,
            "architecture": getattr(model.config, "model_type", None), "num_layers": layers,
            "num_kv_heads": kv_heads, "head_dim": head_dim, "vocab_size": getattr(model.config, "vocab_size", None),
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "device": str(device),
        },
        "tokenizer": _tokenizer_info(tokenizer),
        "corpus": {**{k: v for k, v in corpus_info.items()}, "tokens": int(token_ids.numel())},
        "protocol": {
            "max_length": options.max_length, "stride": options.stride, "context_length": context,
            "windows": len(outcome.windows), "window_starts": starts, "scored_tokens": outcome.scored_tokens,
            "batch_windows": options.batch_windows, "seed": options.seed,
            "bootstrap_resamples": options.bootstrap_resamples, "ci_level": result.ci_level,
            "first_scored_token": "predicted from the prefill's last logits (identical for both caches)",
            "kl": "mean over scored tokens of KL(baseline || compressed), nats",
            "data_parallel": None if ranks is None else {
                "world_size": ranks.world_size, "backend": distributed.BACKEND,
                "sharding": "batch b of batch_windows windows is scored by rank b mod world_size"},
        },
        "codec": {"group_size": options.group_size, "sparsity": options.sparsity, "cli": agg.get("codec"),
                  "requested": {"group_size": options.group_size, "sparsity": options.sparsity, **options.codec},
                  "resolved": agg.get("codec"), "description": describe_codec(agg.get("codec")),
                  "bits_per_element": agg.get("bits_per_element"), "disk_ratio_vs_fp16": agg.get("disk_ratio_vs_fp16"),
                  "fp16_size_bytes": agg.get("fp16_size_bytes"), "compression_ratio": agg.get("compression_ratio"),
                  "aggregate": {k: v for k, v in agg.items() if k != "codec"},
                  "per_call": [_metrics_dict(m) for m in outcome.metrics]},
        "selection": selection,
        "diagnostics": diag.to_dict() if diag is not None else None,
        "plots": plots,
        "cache": {"bytes": outcome.cache_bytes, "dtype": outcome.cache_dtype, "num_layers": outcome.num_layers,
                  "num_kv_heads": outcome.num_kv_heads, "head_dim": outcome.head_dim,
                  **({"layer_seq_lens": outcome.layer_seq_lens} if outcome.layer_seq_lens else {})},
        "timings": timings,
        "per_window": [asdict(w) for w in outcome.windows],
        "versions": _versions(),
    }
    return result, report


@dataclass
class RunInputs:
    """A loaded model and tokenized corpus, ready for the protocol (or a sweep).

    ``token_ids`` is [num_tokens]; ``timings`` holds ``model_load_s``, ``corpus_load_s`` and
    ``tokenize_s``; ``run_start`` is the ``time.perf_counter()`` at which loading began.
    """

    choice: ModelChoice
    model: Any
    tokenizer: Any
    token_ids: torch.Tensor
    corpus_info: Dict[str, Any]
    timings: Dict[str, float]
    run_start: float


def load_run_inputs(options: ValidationOptions, console: Console, title: str = "KV Cache Compression Validation",
                    steps: int = 6) -> RunInputs:
    """Check the options, resolve and load the model and corpus, tokenize what the windows need (step 1).

    Raises ValidationError for anything that prevents a measurement.
    """
    options.check()
    run_start = time.perf_counter()
    dev = distributed.rank_device(select_device(options.device, options.cpu), distributed.current())
    dtype = default_dtype(dev)

    choice = resolve_model(options.model, options.hub_timeout)
    t = time.perf_counter()
    corpus = load_corpus(options.dataset, options.text_file, options.hub_timeout)  # fail before the model load
    corpus_seconds = time.perf_counter() - t
    console.banner(f"{title}: {choice.display_name}")
    console.step(1, steps, f"Loading {choice.display_name}...")
    console.info(f"Why this model: {choice.reason}")
    t = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(
        choice.name_or_path, str(dev), dtype=dtype, local_files_only=choice.source in ("hf-cache", "embedded", "local"),
        device_map=options.device_map,
    )
    load_seconds = time.perf_counter() - t
    if choice.source == "local":
        choice.files = _hash_weight_files(choice.name_or_path)
    if choice.source == "hub" or (choice.source == "hf-cache" and not choice.revision):
        snap = hf_cache_snapshot(choice.name_or_path)
        choice.revision = snap[1] if snap else None
    layers, kv_heads, head_dim = _geometry(model.config)
    where = f"device map {options.device_map}" if options.device_map else str(dev)
    console.info(f"Model loaded on {where} ({str(dtype).removeprefix('torch.')}) in {load_seconds:.1f} s")
    console.info(f"Config: {layers} layers, {kv_heads} KV heads, head_dim {head_dim}")

    needed = (options.max_samples - 1) * options.stride + options.max_length if options.max_samples else None
    t = time.perf_counter()
    token_ids, chars = tokenize_corpus(tokenizer, corpus.text, needed)
    tokenize_seconds = time.perf_counter() - t
    corpus_info = {"name": corpus.name, "source": corpus.source, "reason": corpus.reason, "sha256": corpus.sha256,
                   "characters": len(corpus.text), "characters_tokenized": chars, **corpus.details}
    return RunInputs(choice, model, tokenizer, token_ids, corpus_info,
                     {"model_load_s": load_seconds, "corpus_load_s": corpus_seconds, "tokenize_s": tokenize_seconds},
                     run_start)


def run_validation(options: ValidationOptions, verbose: bool = True) -> Tuple[ValidationResult, Dict[str, Any]]:
    """Resolve the model and corpus, run the protocol, print the report; return (result, JSON report).

    Under torchrun (WORLD_SIZE > 1) the windows' batches are shared among the ranks
    (validation.distributed); every rank returns the same result and report, rank 0 alone prints.
    Raises ValidationError for anything that prevents a measurement.
    """
    ranks = distributed.setup()  # under torchrun: join the group; only rank 0 prints
    console = Console(verbose and (ranks is None or ranks.is_main))
    inputs = load_run_inputs(options, console)
    result, report = evaluate(
        inputs.model, inputs.token_ids, options, console, model_choice=inputs.choice, corpus_info=inputs.corpus_info,
        tokenizer=inputs.tokenizer, load_seconds=inputs.timings["model_load_s"],
        extra_timings={k: v for k, v in inputs.timings.items() if k != "model_load_s"},
    )
    report["timings"]["run_total_s"] = round(time.perf_counter() - inputs.run_start, 3)
    report["options"] = asdict(options)
    report["mode"] = "full"
    return result, report

