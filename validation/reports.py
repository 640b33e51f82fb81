"""What a run prints and records: the six-step console report, the RESULTS block, versions."""

from __future__ import annotations

import dataclasses
import math
import platform
from dataclasses import asdict
from typing import Any, Dict, Optional

import numpy as np
import torch

from validation.options import describe_codec
from validation.protocol import ProtocolOutcome
from validation.results import ValidationResult

REPORT_SCHEMA = "kv-cache-p2p/perplexity-validation/v1"
RULE = "=" * 60
THIN_RULE = "-" * 60


class Console:
    """The seed's six-step report on stdout; silent when not verbose (``--quiet``)."""

    def __init__(self, verbose: bool = True) -> None:
        self.verbose = verbose

    def line(self, text: str = "") -> None:
        if self.verbose:
            print(text, flush=True)

    def banner(self, title: str) -> None:
        self.line(RULE)
        self.line(f"  {title}")
        self.line(RULE)

    def step(self, i: int, n: int, text: str) -> None:
        self.line(f"[{i}/{n}] {text}")

    def info(self, text: str) -> None:
        self.line(f"    {text}")


def _fmt_mb(n: int) -> str:
    return f"{n / (1024 * 1024):.2f} MB"


def kv_compress_version() -> Dict[str, Any]:
    """``kv-compress version`` as parsed JSON plus the binary's path, or {"error": ...}."""
    try:
        from validation.compression_bridge import cli_version, find_cli_binary

        info = dict(cli_version())
        info["binary"] = find_cli_binary()
        return info
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        return {"error": str(e)}


def _versions() -> Dict[str, Any]:
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "kv_compress": kv_compress_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }


def _tokenizer_info(tokenizer: Any) -> Dict[str, Any]:
    if tokenizer is None:
        return {"class": None, "note": "synthetic token ids, no tokenizer"}
    return {
        "class": type(tokenizer).__name__,
        "name_or_path": getattr(tokenizer, "name_or_path", None),
        "vocab_size": len(tokenizer),
        "bos_token": getattr(tokenizer, "bos_token", None),
        "eos_token": getattr(tokenizer, "eos_token", None),
    }


def _metrics_dict(m: Any) -> Dict[str, Any]:
    """A CompressionMetrics as a dict without the per-tensor list (large; the aggregate is kept)."""
    d = m.to_dict() if hasattr(m, "to_dict") else asdict(m) if dataclasses.is_dataclass(m) else dict(m)
    d.pop("tensors", None)
    return d


def print_results(result: ValidationResult, console: Console, outcome: Optional[ProtocolOutcome] = None,
                  codec: Optional[Dict[str, Any]] = None, kl_summary: Optional[Dict[str, Any]] = None) -> None:
    """The RESULTS block of the seed, plus KL, top-1 agreement, the bootstrap interval, the codec and SNR extremes."""
    console.banner("RESULTS")
    if result.model_name:
        console.line(f"  Model:                 {result.model_name}")
    if result.corpus_name:
        console.line(f"  Corpus:                {result.corpus_name}")
    console.line(f"  Baseline Perplexity:   {result.baseline_perplexity:.4f}")
    console.line(f"  Compressed Perplexity: {result.compressed_perplexity:.4f}")
    console.line(f"  Delta:                 {result.delta:+.4f} ({result.delta_percent:+.2f}%)")
    console.line(f"  Delta {int(result.ci_level * 100)}% CI:          [{result.delta_ci_low:+.4f}, {result.delta_ci_high:+.4f}] "
                 f"(paired bootstrap over {result.num_windows} windows)")
    console.line(f"  Compression Ratio:     {result.compression_ratio:.2f}x")
    if math.isfinite(result.disk_ratio_vs_fp16):
        console.line(f"  Ratio vs float16:      {result.disk_ratio_vs_fp16:.2f}x on disk "
                     f"({result.bits_per_element:.3f} bits/element)")
    if codec is not None:
        console.line(f"  Codec:                 {describe_codec(codec)}")
    console.line(THIN_RULE)
    console.line(f"  RMSE:                  {result.rmse:.6f}")
    console.line(f"  SNR:                   {result.snr_db:.2f} dB")
    console.line(f"  Cosine Similarity:     {result.cosine_similarity:.6f}")
    if result.quality_level:
        console.line(f"  Quality Level:         {result.quality_level} (kv-compress's verdict on the cache, from SNR)")
    console.line(f"  KL(base||compressed):  {result.kl_divergence:.6f} nats/token")
    console.line(f"  Top-1 Agreement:       {100 * result.top1_agreement:.2f}%")
    if outcome is not None and outcome.diagnostics is not None:
        wk, wv = outcome.diagnostics.worst("key"), outcome.diagnostics.worst("value")
        console.line(f"  Worst SNR:             keys {wk['snr_db']:.2f} dB (layer {wk['layer']} head {wk['head']}), "
                     f"values {wv['snr_db']:.2f} dB (layer {wv['layer']} head {wv['head']})")
    console.line(f"  Scored Tokens:         {result.scored_tokens:,} ({result.num_windows} windows x {result.stride})")
    if outcome is not None:
        t = outcome.timings
        console.line(f"  Time:                  {t['total']:.1f} s (prefill {t['prefill']:.1f}, kv-compress bridge "
                     f"{t['bridge']:.1f}, scoring {t['scoring']:.1f}, metrics {t['metrics']:.1f})")
    if kl_summary:
        console.line(f"  KL percentiles:        p99 {kl_summary['p99']:.5f}, p95 {kl_summary['p95']:.5f}, "
                     f"p90 {kl_summary['p90']:.5f}, median {kl_summary['p50']:.6f}, max {kl_summary['max']:.4f}")
        console.line(f"  RMS dp:                {100 * kl_summary['rms_dp']:.3f}%  "
                     f"(same top p {100 * kl_summary['same_top_p']:.2f} +/- {100 * kl_summary['same_top_p_se']:.2f}%)")
    console.line(RULE)
    console.line(f"  {verdict_line(result)}")
    note = crossing_note(result)
    if note:
        console.line(f"  {note}")
    console.line(RULE)


def verdict_line(result: ValidationResult) -> str:
    """``[OK] PASSED: Delta 0.0495 < 0.5 threshold`` (or FAILED, or the interval's upper end with ``--gate upper``)."""
    what = "Delta" if result.gate == "point" else f"Delta's {int(result.ci_level * 100)}% CI upper end"
    value = result.gated_value
    if result.passed:
        return f"[OK] PASSED: {what} {value:.4f} < {result.threshold:g} threshold"
    return f"[FAIL] FAILED: {what} {value:.4f} >= {result.threshold:g} threshold"


def crossing_note(result: ValidationResult) -> str:
    """A warning when the delta's interval holds the threshold, so the verdict could go either way ("" otherwise)."""
    if not result.ci_crosses_threshold:
        return ""
    interval = f"[{result.delta_ci_low:+.4f}, {result.delta_ci_high:+.4f}]"
    advice = ("pass --gate upper to pass only when the whole interval is below it" if result.gate == "point"
              else "more windows (--max-samples) narrow the interval")
    return (f"[!] NOT FIRM: the delta's {int(result.ci_level * 100)}% CI {interval} crosses the "
            f"{result.threshold:g} threshold; {advice}")


def _quiet_line(result: ValidationResult) -> str:
    verdict = "PASSED" if result.passed else "FAILED"
    gated = "" if result.gate == "point" else f" (CI upper end {result.delta_ci_high:+.4f})"
    firm = " NOT FIRM: CI crosses the threshold;" if result.ci_crosses_threshold else ""
    return (f"{verdict}: delta {result.delta:+.4f} ({result.delta_percent:+.2f}%){gated} "
            f"{'<' if result.passed else '>='} {result.threshold:g};{firm} PPL {result.baseline_perplexity:.4f} -> "
            f"{result.compressed_perplexity:.4f}, KL {result.kl_divergence:.5f}, top-1 {100 * result.top1_agreement:.2f}%, "
            f"ratio {result.compression_ratio:.2f}x"
            + (f" ({result.disk_ratio_vs_fp16:.2f}x vs fp16)" if math.isfinite(result.disk_ratio_vs_fp16) else "")
            + f" [{result.model_name}]")

