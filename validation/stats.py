"""Statistics over scored tokens and bridge calls: the paired bootstrap, the KL summary, combined codec metrics."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from validation.options import BOOTSTRAP_RESAMPLES, DEFAULT_SEED
from validation.protocol import ProtocolOutcome


def paired_bootstrap_interval(
    outcome: ProtocolOutcome, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = DEFAULT_SEED, level: float = 0.95
) -> Tuple[float, float]:
    """Percentile interval for delta = PPL_compressed − PPL_baseline, resampling windows with replacement.

    Both perplexities of a resample use the same windows (paired). Seeded, so reproducible.
    """
    nb = np.array([w.nll_baseline for w in outcome.windows])
    nc = np.array([w.nll_compressed for w in outcome.windows])
    nt = np.array([w.tokens for w in outcome.windows], dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(nb), size=(resamples, len(nb)))
    tokens = nt[idx].sum(axis=1)
    delta = np.exp(nc[idx].sum(axis=1) / tokens) - np.exp(nb[idx].sum(axis=1) / tokens)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(delta, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


_QUALITY_ORDER = ("POOR", "ACCEPTABLE", "GOOD", "EXCELLENT")


def aggregate_metrics(metrics: Sequence[Any]) -> Dict[str, Any]:
    """Combine per-call CompressionMetrics into one set for the whole run.

    Sizes add up (ratio = total original / total compressed; ``ratio_vs_fp16``, the ratio
    against the same tensors stored as float16, is combined the same way); RMSE is the element-weighted
    root mean square; ``disk_ratio_vs_fp16`` is the summed float16-equivalent file sizes over the
    summed container sizes and ``bits_per_element`` the element-weighted mean (elements counted
    through ``fp16_size_bytes``); SNR uses the summed signal and noise power; cosine similarity is the
    minimum; max error the maximum; quality the worst level; passed all; violations the union.
    """
    if not metrics:
        return {}
    orig = sum(m.original_size_bytes for m in metrics)
    comp = sum(m.compressed_size_bytes for m in metrics)
    weights = [m.original_size_bytes / orig if orig else 1.0 / len(metrics) for m in metrics]
    mse = sum(w * m.rmse ** 2 for w, m in zip(weights, metrics))
    signal = sum(w * (m.rmse ** 2) * 10 ** (m.snr_db / 10) for w, m in zip(weights, metrics) if math.isfinite(m.snr_db))
    if mse == 0:
        snr = math.inf
    elif signal > 0:
        snr = 10 * math.log10(signal / mse)
    else:
        snr = min(m.snr_db for m in metrics)
    levels = [m.quality_level for m in metrics]
    ranked = [lv for lv in levels if lv in _QUALITY_ORDER]
    quality = min(ranked, key=_QUALITY_ORDER.index) if ranked else (levels[0] if levels else "")
    violations: List[Any] = []
    for m in metrics:
        for v in m.violations or []:
            if v not in violations:
                violations.append(v)
    fp16 = [(getattr(m, "ratio_vs_fp16", math.nan), m.compressed_size_bytes) for m in metrics]
    vs_fp16 = (sum(r * c for r, c in fp16) / comp) if comp and all(math.isfinite(r) for r, _ in fp16) else math.nan
    # on-disk ratio against the same tensors as a float16 safetensors file, and bits per quantized
    # element weighted by each call's element count (proportional to its float16 size)
    fp16_bytes = [int(getattr(m, "fp16_size_bytes", 0) or 0) for m in metrics]
    fp16_total = sum(fp16_bytes)
    disk_vs_fp16 = fp16_total / comp if comp and all(fp16_bytes) else math.nan
    bpe = [float(getattr(m, "bits_per_element", math.nan)) for m in metrics]
    bits_per_element = (sum(b * f for b, f in zip(bpe, fp16_bytes)) / fp16_total
                        if fp16_total and all(fp16_bytes) and all(math.isfinite(b) for b in bpe) else math.nan)
    bytes_by_part, bits_by_part = _parts(metrics)
    return {
        "compression_ratio": orig / comp if comp else math.nan,
        "ratio_vs_fp16": vs_fp16,
        "disk_ratio_vs_fp16": disk_vs_fp16,
        "fp16_size_bytes": fp16_total,
        "bits_per_element": bits_per_element,
        "original_size_bytes": orig,
        "compressed_size_bytes": comp,
        "rmse": math.sqrt(mse),
        "snr_db": snr,
        "cosine_similarity": min(m.cosine_similarity for m in metrics),
        "max_error": max(m.max_error for m in metrics),
        "quality_level": quality,
        "passed": all(m.passed for m in metrics),
        "violations": violations,
        "processing_time_ms": sum(m.processing_time_ms for m in metrics),
        "calls": len(metrics),
        "codec": getattr(metrics[0], "codec", None),
        "bytes_by_part": bytes_by_part,
        "bits_per_element_by_part": bits_by_part,
    }


def _parts(metrics: Sequence[Any]) -> Tuple[Dict[str, int], Dict[str, float]]:
    """The container bytes by part (codes, scales, mins, sink, raw, header) summed over calls, and the
    same in bits per quantized element over all calls (plus ``total``); empty when a call lacks them.

    A call's quantized element count is its total bytes × 8 over its ``bits_per_element_by_part["total"]``.
    """
    total_bytes: Dict[str, int] = {}
    elements = 0.0
    for m in metrics:
        parts = getattr(m, "bytes_by_part", None) or {}
        bits = getattr(m, "bits_per_element_by_part", None) or {}
        stored = sum(v for k, v in parts.items() if k != "total")
        if not parts or not bits.get("total"):
            return {}, {}
        elements += stored * 8 / bits["total"]
        for k, v in parts.items():
            total_bytes[k] = total_bytes.get(k, 0) + int(v)
    if not elements:
        return total_bytes, {}
    by_part = {k: v * 8 / elements for k, v in total_bytes.items()}
    by_part["total"] = sum(by_part.values())
    return total_bytes, by_part



# Percentiles of the per-token KL that llama.cpp's --kl-divergence summary prints.
KLD_PERCENTILES = (99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0)


def kld_summary(token_kl: Optional[np.ndarray], token_dp: Optional[np.ndarray], top1_matches: int) -> Dict[str, Any]:
    """llama.cpp's KL-divergence summary of one run, from per-token values.

    ``token_kl`` and ``token_dp`` are [scored_tokens]: KL(baseline ‖ compressed) in nats and
    p_compressed(label) − p_baseline(label) per scored token; ``top1_matches`` counts the
    scored tokens whose most likely next token is the same under both caches. Returns the mean,
    maximum, minimum and percentiles (``p99`` … ``p1``, linear interpolation) of the KL; the RMS
    of Δp and its mean; and "same top p", the top-1 agreement, with its binomial standard error
    ``sqrt(p (1 - p) / n)``. Empty dict when no per-token values were kept.
    """
    if token_kl is None or token_dp is None or len(token_kl) == 0:
        return {}
    kl = np.asarray(token_kl, dtype=np.float64)
    dp = np.asarray(token_dp, dtype=np.float64)
    n = kl.size
    same = top1_matches / n
    out: Dict[str, Any] = {"tokens": int(n), "mean": float(kl.mean()), "max": float(kl.max()), "min": float(kl.min())}
    for q, v in zip(KLD_PERCENTILES, np.percentile(kl, KLD_PERCENTILES)):
        out[f"p{q:g}"] = float(v)
    out["rms_dp"] = float(np.sqrt(np.mean(dp * dp)))
    out["mean_dp"] = float(dp.mean())
    out["same_top_p"] = float(same)
    out["same_top_p_se"] = float(math.sqrt(same * (1.0 - same) / n))
    return out
