"""The seed's ``ValidationResult`` and how a protocol outcome becomes one (the gate included)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict

from validation.jsonio import _json_number
from validation.options import BOOTSTRAP_RESAMPLES, DEFAULT_GATE, DEFAULT_SEED, DEFAULT_THRESHOLD, GATES
from validation.protocol import ProtocolOutcome
from validation.stats import aggregate_metrics, paired_bootstrap_interval


@dataclass
class ValidationResult:
    """Final validation result.

    The first ten fields are the seed's; the rest are reported beside them. ``kl_divergence``
    is the mean KL(baseline ‖ compressed) of the next-token distributions over the scored
    tokens, in nats; ``top1_agreement`` the fraction of scored tokens whose argmax is the same;
    ``delta_ci_low``/``delta_ci_high`` a paired-bootstrap interval for ``delta`` over windows.
    """

    baseline_perplexity: float
    compressed_perplexity: float
    delta: float
    delta_percent: float
    compression_ratio: float
    rmse: float
    snr_db: float
    cosine_similarity: float
    passed: bool
    threshold: float = DEFAULT_THRESHOLD
    kl_divergence: float = math.nan
    top1_agreement: float = math.nan
    delta_ci_low: float = math.nan
    delta_ci_high: float = math.nan
    ci_level: float = 0.95
    num_windows: int = 0
    scored_tokens: int = 0
    max_length: int = 0
    stride: int = 0
    max_error: float = math.nan
    quality_level: str = ""
    model_name: str = ""
    corpus_name: str = ""
    bits_per_element: float = math.nan
    disk_ratio_vs_fp16: float = math.nan
    gate: str = DEFAULT_GATE
    ci_crosses_threshold: bool = False

    @property
    def gated_value(self) -> float:
        """The number the gate compares with ``threshold``: ``delta`` (gate "point") or ``delta_ci_high`` ("upper")."""
        return self.delta_ci_high if self.gate == "upper" else self.delta

    def to_dict(self) -> Dict[str, Any]:
        """JSON-serialisable dict of every field (NaN and infinities become None)."""
        return {k: _json_number(v) for k, v in asdict(self).items()}


def build_result(
    outcome: ProtocolOutcome,
    threshold: float = DEFAULT_THRESHOLD,
    seed: int = DEFAULT_SEED,
    resamples: int = BOOTSTRAP_RESAMPLES,
    model_name: str = "",
    corpus_name: str = "",
    gate: str = DEFAULT_GATE,
) -> ValidationResult:
    """The ValidationResult of a protocol run.

    ``gate`` "point": passed = delta < threshold; "upper": passed = the upper end of the delta's
    paired-bootstrap interval < threshold. ``ci_crosses_threshold`` is set whenever the interval
    holds the threshold, whichever gate decides, so a report can say the verdict is not firm.
    """
    if gate not in GATES:
        raise ValueError(f"gate must be one of {list(GATES)}, got {gate!r}")
    base, comp = outcome.baseline_perplexity, outcome.compressed_perplexity
    delta = comp - base
    lo, hi = paired_bootstrap_interval(outcome, resamples, seed)
    gated = hi if gate == "upper" else delta
    agg = aggregate_metrics(outcome.metrics)
    return ValidationResult(
        baseline_perplexity=base,
        compressed_perplexity=comp,
        delta=delta,
        delta_percent=100.0 * delta / base,
        compression_ratio=agg.get("compression_ratio", math.nan),
        rmse=agg.get("rmse", math.nan),
        snr_db=agg.get("snr_db", math.nan),
        cosine_similarity=agg.get("cosine_similarity", math.nan),
        passed=bool(gated < threshold),
        threshold=threshold,
        kl_divergence=outcome.kl_divergence,
        top1_agreement=outcome.top1_agreement,
        delta_ci_low=lo,
        delta_ci_high=hi,
        num_windows=len(outcome.windows),
        scored_tokens=outcome.scored_tokens,
        max_length=outcome.max_length,
        stride=outcome.stride,
        max_error=agg.get("max_error", math.nan),
        quality_level=agg.get("quality_level", ""),
        model_name=model_name,
        corpus_name=corpus_name,
        bits_per_element=agg.get("bits_per_element", math.nan),
        disk_ratio_vs_fp16=agg.get("disk_ratio_vs_fp16", math.nan),
        gate=gate,
        ci_crosses_threshold=bool(lo < threshold <= hi),
    )

