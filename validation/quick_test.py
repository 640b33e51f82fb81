"""The quick test: the real binary and the complete protocol on synthetic data, no download, no GPU."""

from __future__ import annotations

import hashlib
import math
import tempfile
import time
from typing import Any, Dict, Optional

import torch

from validation.compat import cache_to_layers, layers_to_cache
from validation.jsonio import write_json_atomic
from validation.models import ModelChoice, _geometry, select_device
from validation.options import (
    DEFAULT_GATE,
    DEFAULT_GROUP_SIZE,
    DEFAULT_SEED,
    DEFAULT_THRESHOLD,
    SEED_CODEC,
    ValidationOptions,
)
from validation.reports import Console, _fmt_mb, _metrics_dict
from validation.results import ValidationResult
from validation.runner import evaluate


QUICK_CACHE_SHAPE = (22, 4, 256, 64)  # TinyLlama-1.1B: layers, KV heads, tokens, head_dim


def synthetic_tinyllama_cache(seq_len: int = QUICK_CACHE_SHAPE[2], seed: int = DEFAULT_SEED, dtype: torch.dtype = torch.float16):
    """A DynamicCache shaped like TinyLlama's: 22 layers of [1, 4, seq_len, 64] keys and values.

    Keys and values are Gaussian with a per-layer, per-head standard deviation between 0.25
    and 1, the range of a real model's cache after normalisation. Deterministic for a seed.
    """
    layers_n, heads, _, head_dim = QUICK_CACHE_SHAPE
    g = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(layers_n):
        k_scale = 0.25 + 0.75 * torch.rand(1, heads, 1, 1, generator=g)
        v_scale = 0.25 + 0.75 * torch.rand(1, heads, 1, 1, generator=g)
        k = torch.randn(1, heads, seq_len, head_dim, generator=g) * k_scale
        v = torch.randn(1, heads, seq_len, head_dim, generator=g) * v_scale
        layers.append((k.to(dtype), v.to(dtype)))
    return layers_to_cache(layers)


def group_error_bound_ok(original: torch.Tensor, restored: torch.Tensor, group_size: int) -> bool:
    """Whether every element's error is within the symmetric INT4 bound of its group.

    Groups are ``group_size`` consecutive elements along the last axis of [.., head_dim];
    the scale is absmax / 7 (stored as float16), so |error| <= absmax / 14 up to float16
    rounding of the scale and of the output; the bound used is absmax * (1/14 + 2^-8).
    """
    a = original.float().reshape(-1, group_size)
    b = restored.float().reshape(-1, group_size)
    absmax = a.abs().amax(dim=-1, keepdim=True)
    return bool(((a - b).abs() <= absmax * (1.0 / 14 + 2.0 ** -8) + 1e-6).all())


def make_quick_model(seed: int = DEFAULT_SEED, vocab_size: int = 256, num_layers: int = 4):
    """A small random LlamaForCausalLM (float32, CPU) with TinyLlama's KV geometry per layer (4 KV heads, head_dim 64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=4, head_dim=64, max_position_embeddings=1024,
        bos_token_id=0, eos_token_id=1,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.eval()
    return model


def synthetic_token_ids(num_tokens: int, vocab_size: int, seed: int = DEFAULT_SEED) -> torch.Tensor:
    """Deterministic ids [num_tokens]: a Zipf-like unigram draw, so some tokens are much more frequent."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, vocab_size + 1, dtype=torch.float64)
    return torch.multinomial(weights, num_tokens, replacement=True, generator=g).to(torch.long)


def check_synthetic_roundtrip(console: Console, work_dir: Optional[str] = None) -> Dict[str, Any]:
    """Send the synthetic TinyLlama-shaped cache through the real binary and check its metrics.

    Checks: geometry and dtype preserved; every element within the INT4 error bound of its
    group; compression ratio > 3; the CLI's own quality gate passed, its cosine >= 0.99 and
    SNR >= 18 dB; our own cosine
    (computed here from the tensors) >= 0.99. Returns the
    measured values and ``ok``. The per-element bound is the seed scheme's (symmetric INT4
    along head_dim, no rotation), so this check runs that scheme explicitly (SEED_CODEC)
    whatever the binary's default codec is.
    """
    from validation.compression_bridge import roundtrip_kv_cache

    cache = synthetic_tinyllama_cache()
    original = cache_to_layers(cache)
    with tempfile.TemporaryDirectory(prefix="kv-quick-", dir=work_dir) as tmp:
        t = time.perf_counter()
        recon, metrics = roundtrip_kv_cache(cache, tmp, group_size=DEFAULT_GROUP_SIZE, **SEED_CODEC)
        seconds = time.perf_counter() - t
    restored = cache_to_layers(recon)
    geometry_ok = len(restored) == len(original) and all(
        rk.shape == k.shape and rk.dtype == k.dtype and rv.shape == v.shape for (k, v), (rk, rv) in zip(original, restored)
    )
    dot = sq_a = sq_b = 0.0
    for (k, v), (rk, rv) in zip(original, restored):
        for a, b in ((k, rk), (v, rv)):
            a64, b64 = a.double(), b.double()
            dot += (a64 * b64).sum().item()
            sq_a += (a64 * a64).sum().item()
            sq_b += (b64 * b64).sum().item()
    own_cosine = dot / math.sqrt(sq_a * sq_b) if sq_a and sq_b else math.nan
    bound_ok = geometry_ok and all(
        group_error_bound_ok(a, b, DEFAULT_GROUP_SIZE)
        for (k, v), (rk, rv) in zip(original, restored) for a, b in ((k, rk), (v, rv))
    )
    checks = {
        "geometry_and_dtype_preserved": geometry_ok,
        "per_group_error_within_int4_bound": bound_ok,
        "compression_ratio_gt_3": metrics.compression_ratio > 3.0,
        "cli_quality_gate_passed": bool(metrics.passed),
        "cli_cosine_ge_0.99": metrics.cosine_similarity >= 0.99,
        "cli_snr_ge_18db": metrics.snr_db >= 18.0,
        "own_cosine_ge_0.99": own_cosine >= 0.99,
    }
    ok = all(checks.values())
    console.info(f"Cache: {QUICK_CACHE_SHAPE[0]} layers x [1, {QUICK_CACHE_SHAPE[1]}, {QUICK_CACHE_SHAPE[2]}, "
                 f"{QUICK_CACHE_SHAPE[3]}] float16, {_fmt_mb(metrics.original_size_bytes)}")
    console.info(f"kv-compress: ratio {metrics.compression_ratio:.2f}x, RMSE {metrics.rmse:.6f}, SNR {metrics.snr_db:.2f} dB, "
                 f"cosine {metrics.cosine_similarity:.6f} (ours {own_cosine:.6f}), {seconds:.2f} s")
    console.info("Checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in checks.items()))
    return {"ok": ok, "checks": checks, "metrics": _metrics_dict(metrics), "own_cosine": own_cosine, "seconds": seconds}


def run_quick_test(verbose: bool = True, *, threshold: float = DEFAULT_THRESHOLD, output_json: Optional[str] = None,
                   seed: int = DEFAULT_SEED, plots: Optional[str] = None, group_size: int = DEFAULT_GROUP_SIZE,
                   sparsity: float = 0.0, device: Optional[str] = None, cpu: bool = False,
                   gate: str = DEFAULT_GATE, **codec: Any) -> ValidationResult:
    """Run a quick test with synthetic data (no model download required).

    Part A sends a synthetic TinyLlama-shaped cache (22 layers x 4 KV heads x 256 tokens x
    head_dim 64, float16) through the real ``kv-compress`` and checks its metrics. Part B runs
    the complete protocol (prefill, kv-compress round trip per batch, scoring twice) with a
    small random Llama built from a LlamaConfig on synthetic token ids. Needs no GPU and no
    network. ``passed`` is delta < threshold and every part-A check holding. Part A always runs
    the seed scheme (its error bound is that scheme's); part B runs ``group_size``,
    ``sparsity`` and ``codec`` (omitted options: the binary's defaults). ``plots``: folder for
    part B's SNR heatmap. ``device``/``cpu`` choose where part B's model runs (default: the
    CPU, so the quick test is the same everywhere; ``device="cuda"`` runs it on the GPU).
    Every option is checked before any work starts.
    """
    options = ValidationOptions(max_length=128, stride=32, max_samples=8, batch_windows=4, threshold=threshold,
                                seed=seed, device=device, cpu=cpu, plots=plots, group_size=group_size,
                                sparsity=sparsity, gate=gate, **codec)
    options.check()
    dev = select_device(options.device or "cpu", options.cpu)
    console = Console(verbose)
    start = time.perf_counter()
    console.banner("KV Cache Compression Validation: quick test (synthetic, offline)")
    console.line("[A] Synthetic TinyLlama-shaped KV cache through kv-compress...")
    synthetic = check_synthetic_roundtrip(console)

    console.line("[B] Random Llama through the complete protocol...")
    console.step(1, 6, "Building a random LlamaForCausalLM from a LlamaConfig...")
    t = time.perf_counter()
    model = make_quick_model(seed).to(dev)
    load_seconds = time.perf_counter() - t
    layers, kv_heads, head_dim = _geometry(model.config)
    console.info(f"Model built on {dev} (float32): {layers} layers, {kv_heads} KV heads, head_dim {head_dim}, "
                 f"vocab {model.config.vocab_size}")
    needed = (options.max_samples - 1) * options.stride + options.max_length
    token_ids = synthetic_token_ids(needed, model.config.vocab_size, seed)
    choice = ModelChoice(None, "synthetic", "LlamaConfig(random init)", "random Llama (quick test)",
                         "--quick-test: random weights, no download", revision=f"seed {seed}")
    corpus_info = {"name": "synthetic token ids (Zipf unigram)", "source": "synthetic", "reason": "--quick-test",
                   "sha256": hashlib.sha256(token_ids.numpy().tobytes()).hexdigest()}
    result, report = evaluate(model, token_ids, options, console, model_choice=choice, corpus_info=corpus_info,
                              load_seconds=load_seconds, progress=False)
    if not synthetic["ok"]:
        result.passed = False
        console.line(f"  [FAIL] synthetic cache checks failed: {synthetic['checks']}")
    report["mode"] = "quick-test"
    report["synthetic_cache"] = synthetic
    report["passed"] = result.passed
    report["timings"]["run_total_s"] = round(time.perf_counter() - start, 3)
    console.line(f"  Quick test finished in {time.perf_counter() - start:.1f} s")
    if output_json:
        write_json_atomic(output_json, report)
    return result

