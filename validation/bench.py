"""Time the perplexity validation on the embedded model and corpus (``make bench-python``).

Measures, with the default protocol settings of ``validate_perplexity.py``:

* the end-to-end command (a fresh process, model already cached): what a user waits for;
* in one process with the model loaded once, over the same windows, alternating order:
  the validation protocol (prefill, kv-compress round trip per batch, two scoring passes)
  and a plain sliding-window pass (``compute_perplexity``'s recipe), their ratio (target
  <= 1.5x) and the bridge's share of the protocol's wall time (target <= 10%).

Prints a Markdown table (with the commands) for docs/benchmarks.md; ``--output PATH``
also writes every number as JSON.

    python -m validation.bench [--repeats 2] [--output bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from validation import corpora
from validation import jsonio
from validation import models
from validation import options as run_options
from validation import protocol
from validation import reports
from validation import results
from validation import stats

REPO_ROOT = Path(__file__).resolve().parent.parent
RATIO_TARGET = 1.5
BRIDGE_SHARE_TARGET = 0.10
E2E_TARGET_S = 120.0


def _kv_compress_label(info: Dict[str, Any]) -> str:
    """``kv-compress version`` as one label, e.g. ``"4efbc59 (avx2 encoder)"``.

    Older binaries do not report ``encoder``; then the version alone.
    """
    label = str(info.get("version", "unknown"))
    if info.get("encoder"):
        label += f" ({info['encoder']} encoder)"
    return label


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_cli(options: run_options.ValidationOptions, out_dir: str) -> Dict[str, Any]:
    """Run the validation command in a fresh process; return its wall time, exit code and JSON report."""
    report_path = os.path.join(out_dir, "cli.json")
    cmd = [sys.executable, "validation/validate_perplexity.py", "--model", "embedded", "--dataset", "embedded",
           "--output-json", report_path, "--quiet"]
    if options.device:
        cmd[2:2] = ["--device", options.device]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{shlex.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    with open(report_path, encoding="utf-8") as f:
        report = json.load(f)
    shown = [c if c != report_path else "PATH.json" for c in cmd[1:]]
    return {"command": "python " + " ".join(shown), "wall_s": wall, "exit_code": proc.returncode,
            "verdict": proc.stdout.strip(), "report": report}


def measure_in_process(options: run_options.ValidationOptions, repeats: int) -> Dict[str, Any]:
    """Load the embedded model once; time the protocol and the plain pass over the same windows."""
    dev = models.select_device(options.device, options.cpu)
    choice = models.resolve_model("embedded")
    t = time.perf_counter()
    model, tokenizer = models.load_model_and_tokenizer(choice.name_or_path, str(dev), local_files_only=True)
    load_s = time.perf_counter() - t
    corpus = corpora.load_corpus("embedded")
    needed = (options.max_samples - 1) * options.stride + options.max_length
    ids, _ = corpora.tokenize_corpus(tokenizer, corpus.text, needed)
    windows, starts = protocol.make_windows(ids, options.max_length, options.stride, options.max_samples)
    with torch.inference_mode():  # warm-up: first-call allocations and kernel selection
        model(input_ids=windows[:1, :128].to(dev))

    plain_s: List[float] = []
    protocol_s: List[float] = []
    outcomes: List[protocol.ProtocolOutcome] = []
    plain_ppl = None
    for r in range(repeats):
        order = ("plain", "protocol") if r % 2 == 0 else ("protocol", "plain")
        for what in order:
            t = time.perf_counter()
            if what == "plain":
                nll = protocol.plain_window_nlls(model, windows, options.stride)
                plain_s.append(time.perf_counter() - t)
                plain_ppl = float(torch.exp(nll.sum() / (windows.shape[0] * options.stride)))
            else:
                outcomes.append(protocol.run_protocol(
                    model, windows, options.stride, starts=starts, group_size=options.group_size,
                    sparsity=options.sparsity, batch_windows=options.batch_windows,
                ))
                protocol_s.append(time.perf_counter() - t)
    best = min(range(len(outcomes)), key=lambda i: protocol_s[i])
    outcome = outcomes[best]
    result = results.build_result(outcome, options.threshold, options.seed, options.bootstrap_resamples,
                             model_name=choice.display_name, corpus_name=corpus.name)
    return {
        "model_load_s": load_s,
        "plain_s": plain_s,
        "protocol_s": protocol_s,
        "protocol_timings": [o.timings for o in outcomes],
        "plain_ppl": plain_ppl,
        "result": result.to_dict(),
        "ratio_vs_fp16": stats.aggregate_metrics(outcome.metrics).get("ratio_vs_fp16", float("nan")),
        "windows": len(starts),
        "scored_tokens": outcome.scored_tokens,
        "cache_bytes": outcome.cache_bytes,
        "device": str(dev),
    }


def summarize(cli: Optional[Dict[str, Any]], inproc: Dict[str, Any], options: run_options.ValidationOptions) -> Dict[str, Any]:
    """Medians and ratios from the raw measurements."""
    plain = statistics.median(inproc["plain_s"])
    protocol = statistics.median(inproc["protocol_s"])
    bridge = statistics.median(t["bridge"] for t in inproc["protocol_timings"])
    steps = {}
    for key in ("prefill", "bridge", "scoring", "metrics", "bridge_save", "bridge_compress", "bridge_decompress", "bridge_load"):
        vals = [t[key] for t in inproc["protocol_timings"] if key in t]
        if vals:
            steps[key] = statistics.median(vals)
    summary = {
        "plain_pass_s": plain,
        "protocol_s": protocol,
        "cost_ratio": protocol / plain,
        "cost_ratio_target": RATIO_TARGET,
        "bridge_s": bridge,
        "bridge_share": bridge / protocol,
        "bridge_share_target": BRIDGE_SHARE_TARGET,
        "protocol_steps_s": steps,
        "model_load_s": inproc["model_load_s"],
    }
    if cli is not None:
        timings = cli["report"]["timings"]
        summary.update({
            "cli_wall_s": cli["wall_s"],
            "cli_wall_target_s": E2E_TARGET_S,
            "cli_model_load_s": timings.get("model_load_s"),
            "cli_protocol_s": timings.get("total_s"),
            "cli_bridge_share": timings.get("bridge_share"),
        })
    return summary


def markdown(summary: Dict[str, Any], cli: Optional[Dict[str, Any]], inproc: Dict[str, Any], options: run_options.ValidationOptions,
             env: Dict[str, Any]) -> str:
    """The table for docs/benchmarks.md."""
    r = inproc["result"]
    s = summary
    steps = s["protocol_steps_s"]
    ok = lambda good: "yes" if good else "**no**"  # noqa: E731
    lines = [
        "### Perplexity validation: embedded SmolLM2-135M on embedded Wikipedia text",
        "",
        f"Machine: {env['cpus']} CPUs ({env['cpu_model']}), torch {env['torch']} with {env['threads']} threads, "
        f"transformers {env['transformers']}, kv-compress {env['kv_compress']}, device {inproc['device']}.",
        f"Settings: max_length {options.max_length}, stride {options.stride}, {inproc['windows']} windows "
        f"({inproc['scored_tokens']:,} scored tokens), {options.batch_windows} windows per kv-compress call, "
        f"group size {options.group_size}, sparsity {options.sparsity:g}.",
        "",
        "Commands: `make bench-python` (= `python -m validation.bench`); the end-to-end row runs "
        f"`{cli['command'] if cli else '(skipped)'}`.",
        "",
        "| Measure | Value | Target | Met |",
        "|---|---|---|---|",
    ]
    if cli is not None:
        lines.append(f"| End-to-end command, model cached (wall) | {s['cli_wall_s']:.1f} s | <= {E2E_TARGET_S:.0f} s, "
                     f">= 2,048 tokens | {ok(s['cli_wall_s'] <= E2E_TARGET_S and inproc['scored_tokens'] >= 2048)} |")
        lines.append(f"| ... of which model load | {s['cli_model_load_s']:.1f} s | | |")
    lines += [
        f"| Validation protocol, same windows (median of {len(inproc['protocol_s'])}) | {s['protocol_s']:.1f} s | | |",
        f"| ... prefill / bridge / scoring twice / metrics | {steps.get('prefill', 0):.1f} / {steps.get('bridge', 0):.1f} / "
        f"{steps.get('scoring', 0):.1f} / {steps.get('metrics', 0):.1f} s | | |",
        f"| Plain sliding-window pass, same windows (median of {len(inproc['plain_s'])}) | {s['plain_pass_s']:.1f} s | | |",
        f"| Cost ratio protocol / plain | {s['cost_ratio']:.2f}x | <= {RATIO_TARGET}x | {ok(s['cost_ratio'] <= RATIO_TARGET)} |",
        f"| Bridge share of protocol wall time | {100 * s['bridge_share']:.1f}% ({s['bridge_s']:.2f} s) | "
        f"<= {100 * BRIDGE_SHARE_TARGET:.0f}% | {ok(s['bridge_share'] <= BRIDGE_SHARE_TARGET)} |",
        f"| ... save / compress / decompress / load | {steps.get('bridge_save', 0):.2f} / {steps.get('bridge_compress', 0):.2f} / "
        f"{steps.get('bridge_decompress', 0):.2f} / {steps.get('bridge_load', 0):.2f} s "
        f"for {inproc['cache_bytes'] / 2**20:.0f} MiB of cache | | |",
        f"| Baseline / compressed perplexity | {r['baseline_perplexity']:.4f} / {r['compressed_perplexity']:.4f} | | |",
        f"| Delta (95% paired-bootstrap CI) | {r['delta']:+.4f} ({r['delta_percent']:+.2f}%) "
        f"[{r['delta_ci_low']:+.4f}, {r['delta_ci_high']:+.4f}] | < {r['threshold']:g} | {ok(r['passed'])} |",
        f"| KL(baseline ‖ compressed), top-1 agreement | {r['kl_divergence']:.5f} nats/token, "
        f"{100 * r['top1_agreement']:.2f}% | | |",
        f"| kv-compress ratio (vs float16) / RMSE / SNR / cosine | {r['compression_ratio']:.2f}x "
        f"({inproc['ratio_vs_fp16']:.2f}x) / {r['rmse']:.4f} / "
        f"{r['snr_db']:.2f} dB / {r['cosine_similarity']:.5f} | | |",
        f"| Plain-pass perplexity (self-check vs baseline) | {inproc['plain_ppl']:.4f} | = baseline | "
        f"{ok(abs(inproc['plain_ppl'] - r['baseline_perplexity']) <= 1e-3 * r['baseline_perplexity'])} |",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark; print Markdown; write JSON to ``--output``. Exit 0, or 2 on error."""
    p = argparse.ArgumentParser(prog="python -m validation.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", metavar="PATH", help="write all measurements as JSON here")
    p.add_argument("--repeats", type=int, default=2, help="protocol and plain-pass repetitions (default 2)")
    p.add_argument("--skip-cli", action="store_true", help="skip the end-to-end command run")
    p.add_argument("--device", default="cpu", help="torch device to measure on (default cpu: the targets are CPU targets)")
    p.add_argument("--max-samples", type=int, default=run_options.DEFAULT_WINDOWS, help="windows (default: the CLI default)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")

    threads = models.configure_threads()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    options = run_options.ValidationOptions(device=args.device, max_samples=args.max_samples)
    import transformers

    env = {
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": _cpu_model(), "threads": threads, "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "kv_compress": _kv_compress_label(reports.kv_compress_version()),
    }
    try:
        cli = None
        if not args.skip_cli:
            with tempfile.TemporaryDirectory(prefix="kv-bench-") as tmp:
                print("running the end-to-end command...", file=sys.stderr, flush=True)
                cli = run_cli(options, tmp)
        print("timing the protocol and the plain pass in one process...", file=sys.stderr, flush=True)
        inproc = measure_in_process(options, args.repeats)
    except (run_options.ValidationError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = summarize(cli, inproc, options)
    table = markdown(summary, cli, inproc, options, env)
    print(table)
    if args.output:
        jsonio.write_json_atomic(args.output, {
            "environment": env, "options": vars(args), "summary": summary, "in_process": inproc,
            "cli": {k: v for k, v in (cli or {}).items() if k != "report"},
            "cli_report": (cli or {}).get("report"), "markdown": table,
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
