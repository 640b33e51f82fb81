"""The command line of ``validate_perplexity.py``: flags, the run they ask for, the exit status.

Exit status: 0 passed, 1 quality gate failed, 2 any error (bad flags, an unavailable model or
corpus, a bridge failure, or an uncaught exception).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import traceback
from typing import Any, Dict, Optional, Sequence

from validation import distributed
from validation.compression_bridge import ALLOWED_BITS, ALLOWED_ENTROPY, ALLOWED_KEY_AXES, ALLOWED_ROTATIONS, ALLOWED_SCHEMES
from validation.jsonio import write_json_atomic
from validation.models import configure_threads
from validation.options import (
    CODEC_KEYS,
    DATASET_CHOICES,
    DEFAULT_BATCH_WINDOWS,
    DEFAULT_GATE,
    DEFAULT_GROUP_SIZE,
    DEFAULT_HUB_TIMEOUT,
    DEFAULT_MAX_LENGTH,
    DEFAULT_MODEL,
    DEFAULT_SEED,
    DEFAULT_STRIDE,
    DEFAULT_THRESHOLD,
    DEFAULT_WINDOWS,
    DEVICE_MAPS,
    GATES,
    GROUP_SIZES,
    ValidationError,
    ValidationOptions,
)
from validation.quick_test import run_quick_test
from validation.reports import _quiet_line
from validation.runner import run_validation
from validation.selection import DEFAULT_MIN_TOKENS, SELECTION_METHODS


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line on stderr and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (seed flags plus model, corpus, protocol and codec options)."""
    p = _Parser(
        prog="validate_perplexity.py",
        description="Perplexity of a model attending to its original KV cache vs the kv-compress reconstruction.",
        epilog="Exit status: 0 passed, 1 quality gate failed (delta >= threshold), 2 any error.",
    )
    p.add_argument("--quick-test", action="store_true", help="synthetic cache + random Llama, no download, < 1 min")
    p.add_argument("--cpu", action="store_true", help="force the CPU even when CUDA is available")
    p.add_argument("--device", help="torch device (cpu, cuda, cuda:1); default: cuda if available, else cpu")
    p.add_argument("--device-map", choices=DEVICE_MAPS,
                   help="spread a model larger than one GPU over every visible device with accelerate (auto)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="maximum acceptable perplexity delta, > 0 (default 0.5)")
    p.add_argument("--gate", choices=GATES, default=DEFAULT_GATE,
                   help="what must be below --threshold: the delta's point estimate (point, default) or the upper "
                        "end of its 95%% bootstrap interval (upper)")
    p.add_argument("--quiet", action="store_true", help="print only the verdict line")
    p.add_argument("--model", help=f"Hugging Face id, local folder, 'embedded' (SmolLM2-135M) or 'gemma3-270m' (default: {DEFAULT_MODEL} if cached "
                                   "or reachable, else the embedded SmolLM2-135M)")
    p.add_argument("--dataset", choices=DATASET_CHOICES, help="wikitext (WikiText-2 raw test), embedded (= wiki), "
                   "or an embedded domain from exllamav2: wiki, c4 (web), code, multilingual, technical, tiny "
                   "(children's stories); default: wikitext if cached or reachable, else embedded")
    p.add_argument("--text-file", help="evaluate this UTF-8 text file as is")
    p.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, help=f"window length in tokens (default {DEFAULT_MAX_LENGTH})")
    p.add_argument("--stride", type=int, default=DEFAULT_STRIDE, help=f"window step = scored tokens per window (default {DEFAULT_STRIDE})")
    p.add_argument("--max-samples", type=int, default=DEFAULT_WINDOWS, help=f"number of windows, 0 = all (default {DEFAULT_WINDOWS})")
    p.add_argument("--batch-windows", type=int, default=DEFAULT_BATCH_WINDOWS,
                   help=f"windows per prefill and per kv-compress call (default {DEFAULT_BATCH_WINDOWS})")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=DEFAULT_GROUP_SIZE, help="INT4 group size (default 64)")
    p.add_argument("--sparsity", type=float, default=0.0, help="fraction of smallest elements zeroed, [0, 1) (default 0)")
    codec = p.add_argument_group("codec", "kv-compress codec options; each one omitted takes the binary's default "
                                          "(see docs/cli.md)")
    codec.add_argument("--scheme", choices=ALLOWED_SCHEMES, help="sym (scale per group), asym (scale and minimum) or nf (non-uniform Gaussian levels, 2 to 4 bits)")
    codec.add_argument("--rotate", choices=ALLOWED_ROTATIONS, help="none, or a random-sign Hadamard rotation along head_dim")
    codec.add_argument("--key-axis", choices=ALLOWED_KEY_AXES,
                       help="group keys along head_dim (token) or along the sequence per channel (channel)")
    codec.add_argument("--sink", type=int, metavar="N", help="first N positions of every tensor kept exact")
    codec.add_argument("--preset", metavar="NAME|FILE",
                       help="kv-compress preset: seed, default, compact, near-lossless, or a JSON preset file "
                            "(docs/cli.md); the other codec flags apply on top of it")
    codec.add_argument("--entropy", choices=ALLOWED_ENTROPY, help="entropy stage: auto (default), lz4 or none")
    codec.add_argument("--seed-scheme", action="store_true",
                       help="same as --preset seed: sym, G = 64, no rotation, key axis token, no sink, LZ4 "
                            "(explicit codec flags still apply)")
    codec.add_argument("--bits", type=int, choices=ALLOWED_BITS, help="code width of keys and values")
    codec.add_argument("--key-bits", type=int, choices=ALLOWED_BITS, help="code width of keys (overrides --bits)")
    codec.add_argument("--value-bits", type=int, choices=ALLOWED_BITS, help="code width of values (overrides --bits)")
    sel = p.add_argument_group("token selection", "keep a subset of the context positions after the prefill "
                               "(validation/selection.py); scored tokens keep their real positions")
    sel.add_argument("--selection", choices=SELECTION_METHODS,
                     help="attention (observation-window attention), snapkv (the same, scores pooled over 5 "
                          "neighbours as SnapKV does), knorm (lowest key norm) or recent (first 4 + most recent, "
                          "StreamingLLM)")
    sel.add_argument("--keep-ratio", type=float, metavar="R", help="keep round(R x context) positions, R in (0, 1]")
    sel.add_argument("--attention-threshold", type=float, metavar="T",
                     help="attention only: keep until the cumulative attention reaches T, in (0, 1]")
    sel.add_argument("--min-tokens", type=int, metavar="N", help=f"keep at least N positions (default {DEFAULT_MIN_TOKENS})")
    sel.add_argument("--max-tokens", type=int, metavar="N", help="keep at most N positions (default: the context)")
    p.add_argument("--plots", metavar="DIR", help="write PNG plots here (the per-layer SNR heatmap; with --sweep, "
                                                 "also the tables and the frontier; default for --sweep: sweep-results)")
    p.add_argument("--sweep", action="store_true", help="score a grid of codec configurations against one shared "
                                                        "baseline and write sweep.json, sweep.md and frontier.png")
    p.add_argument("--sweep-grid", metavar="FILE", help="JSON list of {\"name\": ..., \"codec\": {...}} for --sweep "
                                                       "(default: the built-in grid of validation/sweep.py)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed for the bootstrap and the quick test (default 0)")
    p.add_argument("--output-json", metavar="PATH", help="write the full report as JSON (atomically)")
    p.add_argument("--hub-timeout", type=float, default=DEFAULT_HUB_TIMEOUT, help="seconds to wait for the Hugging Face hub (default 2)")
    return p


def codec_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    """The codec options given on the command line; ``--seed-scheme`` is ``--preset seed``
    (the binary fills in the seed's scheme, rotation, key axis, sink and LZ4 wherever no
    flag names them)."""
    codec = {k: getattr(args, k) for k in CODEC_KEYS if getattr(args, k) is not None}
    if args.seed_scheme:
        if codec.get("preset", "seed") != "seed":
            raise ValidationError(f"--seed-scheme is --preset seed; it conflicts with --preset {codec['preset']}")
        codec["preset"] = "seed"
    return codec


def options_from_args(args: argparse.Namespace, codec: Dict[str, Any]) -> ValidationOptions:
    """The ValidationOptions the flags ask for (codec options included), not yet checked."""
    return ValidationOptions(
        model=args.model, dataset=args.dataset, text_file=args.text_file, max_length=args.max_length,
        stride=args.stride, max_samples=args.max_samples, batch_windows=args.batch_windows,
        group_size=args.group_size, sparsity=args.sparsity, device=args.device, device_map=args.device_map, cpu=args.cpu,
        threshold=args.threshold, gate=args.gate, seed=args.seed, output_json=args.output_json,
        hub_timeout=args.hub_timeout, plots=args.plots, selection=args.selection, keep_ratio=args.keep_ratio,
        attention_threshold=args.attention_threshold, min_tokens=args.min_tokens, max_tokens=args.max_tokens, **codec,
    )


def _check_args(args: argparse.Namespace, codec: Dict[str, Any]) -> ValidationOptions:
    """Every argument error, raised before any work (no model load, no binary call)."""
    if args.sweep_grid and not args.sweep:
        raise ValidationError(f"--sweep-grid {args.sweep_grid} needs --sweep")
    if args.selection and (args.sweep or args.quick_test):
        raise ValidationError(f"--selection {args.selection} applies to a validation run, not to --sweep or --quick-test")
    if args.sweep and args.quick_test:
        raise ValidationError("use either --sweep or --quick-test, not both")
    if args.sweep and codec:
        raise ValidationError(f"--sweep takes its codecs from the grid; drop the codec flags "
                              f"{['--' + k.replace('_', '-') for k in codec]} or use --sweep-grid")
    if distributed.from_env() is not None and (args.sweep or args.quick_test):
        raise ValidationError("a data-parallel run (torchrun, WORLD_SIZE > 1) shards the windows of one codec; "
                              "run --sweep and --quick-test as a single process")
    options = options_from_args(args, codec)
    options.check()
    return options


def _run(args: argparse.Namespace, argv: Optional[Sequence[str]]) -> int:
    codec = codec_from_args(args)
    options = _check_args(args, codec)
    if args.sweep:
        from validation import sweep

        argv_used = list(argv) if argv is not None else sys.argv[1:]
        command = " ".join(["python validation/validate_perplexity.py", *argv_used])
        outcome = sweep.run_sweep_cli(options, grid_file=args.sweep_grid, verbose=not args.quiet, command=command)
        if args.quiet:
            print(outcome.verdict_line())
        return 0
    if args.quick_test:
        result = run_quick_test(verbose=not args.quiet, threshold=args.threshold, output_json=args.output_json,
                                seed=args.seed, plots=args.plots, group_size=args.group_size,
                                sparsity=args.sparsity, device=args.device, cpu=args.cpu, gate=args.gate, **codec)
    else:
        result, report = run_validation(options, verbose=not args.quiet)
        if options.output_json and distributed.is_main():
            write_json_atomic(options.output_json, report)
    if args.quiet and distributed.is_main():
        print(_quiet_line(result))
    return 0 if result.passed else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse flags, run, print; return the exit status (0 passed, 1 gate failed, 2 any error).

    Errors are one line on stderr. An unexpected exception is an error too (exit 2, not
    Python's 1, which means a failed gate); ``KV_VALIDATE_DEBUG=1`` adds its traceback.
    """
    args = build_parser().parse_args(argv)
    configure_threads()
    with contextlib.suppress(Exception):  # our own progress bar and step lines replace transformers' bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return _run(args, argv)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 2
    except (ValidationError, OSError, ValueError, RuntimeError, subprocess.CalledProcessError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - any other failure is still an error, not a failed gate
        if os.environ.get("KV_VALIDATE_DEBUG"):
            traceback.print_exc()
        message = " ".join(str(e).split())
        print(f"error: unexpected {type(e).__name__}: {message} (set KV_VALIDATE_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
