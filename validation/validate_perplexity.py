#!/usr/bin/env python3
"""Does shipping this model's KV cache through ``kv-compress`` hurt the model? Perplexity says.

The protocol (see docs/perplexity-protocol.md): the corpus is tokenized once and cut into
windows of ``max_length`` tokens that advance by ``stride``. In each window the first
``max_length - stride`` tokens are context and the last ``stride`` tokens are scored. A batch of
windows is prefilled once; the resulting ``DynamicCache`` goes through the real bridge
(save → ``kv-compress compress`` → ``kv-compress decompress`` → load, one process pair per
batch); the scored tokens are then evaluated twice, attending to a fresh copy of the original
cache (baseline) and to the reconstructed cache (compressed). The first scored token is
predicted from the prefill's last logits, so the only difference between the two numbers is
the cache.

Usage::

    python validation/validate_perplexity.py                 # default model and corpus
    python validation/validate_perplexity.py --quick-test    # no download, synthetic data, < 1 min
    python validation/validate_perplexity.py --model PATH_OR_ID --text-file notes.txt --output-json r.json
    python validation/validate_perplexity.py --scheme asym --rotate hadamard --plots plots/   # another codec
    python validation/validate_perplexity.py --sweep --plots sweep-results/                   # codec frontier

Every run also reports the SNR of keys and values per layer and KV head (``--plots DIR`` draws
it as a heatmap). ``--sweep`` (validation/sweep.py) scores a grid of codec configurations
against one shared baseline.

This module is the seed's entry point and API, kept thin: the work happens in the modules
of one concern each (see docs/architecture.md):

    options     defaults, ValidationOptions, codec checks
    models      which model runs and why; loading it
    corpora     WikiText-2, the embedded corpus, text files; tokenizing
    protocol    windows, prefill, kv-compress round trip, scoring on both caches
    stats       paired bootstrap, KL summary, combined codec metrics
    results     ValidationResult and the gate
    reports     console report, RESULTS block, versions; jsonio: JSON files
    runner      a full run (steps 1-6); quick_test: the synthetic offline check
    cli         flags and exit status; compat: everything transformers-version-specific

Exit status: 0 passed, 1 quality gate failed, 2 any error (``--sweep``: 0 or 2).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # run as a script: make `validation.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from validation import distributed
from validation.cli import build_parser, main
from validation.jsonio import write_json_atomic
from validation.models import load_model_and_tokenizer
from validation.options import DEFAULT_THRESHOLD, ValidationError, ValidationOptions
from validation.protocol import compute_perplexity
from validation.quick_test import run_quick_test
from validation.results import ValidationResult
from validation.runner import run_validation

__all__ = [
    "ValidationError",
    "ValidationOptions",
    "ValidationResult",
    "build_parser",
    "compute_perplexity",
    "load_model_and_tokenizer",
    "main",
    "run_full_validation",
    "run_quick_test",
]


def run_full_validation(
    device: Optional[str] = None,
    threshold: float = DEFAULT_THRESHOLD,
    verbose: bool = True,
    **options: Any,
) -> ValidationResult:
    """Run the full validation (model → windows → prefill → kv-compress → scoring twice).

    Steps: 1 load the model; 2 generate KV caches (prefill of each window's context);
    3 baseline perplexity; 4 compress the caches with the Go CLI; 5 load the reconstructed
    caches; 6 perplexity with them. Extra keyword arguments are ValidationOptions fields
    (model, dataset, text_file, max_length, stride, max_samples, group_size, ..., output_json, plots)
    including the codec options ``scheme``, ``rotate``, ``key_axis``, ``sink``, ``bits``,
    ``key_bits`` and ``value_bits`` (omitted or None: the kv-compress binary's defaults), and
    the token selection ``selection`` ("attention", "knorm", "recent") with ``keep_ratio`` or
    ``attention_threshold``, ``min_tokens``, ``max_tokens`` (validation/selection.py).
    """
    allowed = {f.name for f in dataclasses.fields(ValidationOptions)} - {"device", "threshold"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValidationError(f"unknown option(s) {unknown}; allowed: {sorted(allowed)}")
    opts = ValidationOptions(device=device, threshold=threshold, **options)
    result, report = run_validation(opts, verbose=verbose)
    if opts.output_json and distributed.is_main():
        write_json_atomic(opts.output_json, report)
    return result


if __name__ == "__main__":
    # Run the package's copy of the CLI, so that every module shares the classes whose errors it catches.
    sys.exit(main())
