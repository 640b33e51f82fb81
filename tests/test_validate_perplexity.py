"""Tests for validation.validate_perplexity: the windowed protocol, its statistics and the CLI.

Every test that compresses a cache runs the real ``kv-compress`` binary through the real
bridge (``kv_compress_bin`` fixture). Models are the small random Llamas of conftest, so
nothing is downloaded; tests marked ``slow`` use the embedded SmolLM2 and skip when it is
absent and cannot be fetched.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from validation.compat import forward
from validation import validate_perplexity as vp
from validation import cli
from validation import corpora
from validation import models
from validation import options as run_options
from validation import protocol
from validation import quick_test
from validation import results
from validation import stats
from validation.compression_bridge import CompressionMetrics

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "validation" / "validate_perplexity.py"
TINY_VOCAB = 512


def token_ids(n: int, seed: int = 0) -> torch.Tensor:
    """Deterministic synthetic ids [n] for the conftest tiny Llama (vocab 512)."""
    return quick_test.synthetic_token_ids(n, TINY_VOCAB, seed)


def windows_for(max_length: int, stride: int, count: int, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    ids = token_ids((count - 1) * stride + max_length, seed)
    return protocol.make_windows(ids, max_length, stride, count)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A UTF-8 text file long enough for a few small windows with the tiny tokenizer."""
    path = tmp_path_factory.mktemp("corpus") / "notes.txt"
    paragraphs = [
        f"Paragraph {i}: the quick brown fox jumps over the lazy dog; Robert Boulter is an English actor. "
        f"Tropical Storm Fay formed in the western Caribbean Sea — café {i}."
        for i in range(40)
    ]
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return path


@pytest.fixture()
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No hub access and empty Hugging Face caches, so resolution is decided locally and fast."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))


# -----------------------------------------------------------------------------
# windows


@pytest.mark.parametrize(
    "num_tokens, max_length, stride, max_windows, expected",
    [
        (1024, 1024, 256, None, [0]),
        (1023, 1024, 256, None, []),
        (2048, 1024, 256, None, [0, 256, 512, 768, 1024]),
        (2048, 1024, 256, 2, [0, 256]),
        (2047, 1024, 256, 0, [0, 256, 512, 768]),
        (10, 4, 3, None, [0, 3, 6]),
    ],
    ids=["exactly-one", "too-short", "all-full-windows", "capped", "zero-means-all-tail-dropped", "odd-sizes"],
)
def test_plan_windows(num_tokens: int, max_length: int, stride: int, max_windows, expected: list[int]) -> None:
    assert protocol.plan_windows(num_tokens, max_length, stride, max_windows) == expected


def test_make_windows_stacks_overlapping_slices() -> None:
    ids = torch.arange(20)
    windows, starts = protocol.make_windows(ids, 8, 4)
    assert starts == [0, 4, 8, 12]
    assert windows.shape == (4, 8)
    assert torch.equal(windows[1], torch.arange(4, 12))


def test_make_windows_on_too_short_corpus_names_the_sizes() -> None:
    with pytest.raises(vp.ValidationError, match="7 tokens, fewer than one window of --max-length 8"):
        protocol.make_windows(torch.arange(7), 8, 4)


def test_tokenize_prefix_matches_whole_text(tiny_tokenizer) -> None:
    text = "\n\n".join(f"Robert Boulter had a guest role in The Bill, part {i}." for i in range(300))
    full = torch.tensor(tiny_tokenizer(text)["input_ids"])
    ids, chars = corpora.tokenize_corpus(tiny_tokenizer, text, needed_tokens=200)
    assert chars < len(text)
    assert ids.numel() >= 200
    assert torch.equal(ids[:200], full[:200])
    whole, chars = corpora.tokenize_corpus(tiny_tokenizer, text)
    assert chars == len(text) and torch.equal(whole, full)


# -----------------------------------------------------------------------------
# the protocol, through the real binary


@pytest.mark.parametrize(
    "max_length, stride, count, batch_windows",
    [(96, 32, 5, 2), (80, 48, 3, 3), (64, 16, 4, 1)],
    ids=["L96-s32-uneven-batches", "L80-s48-one-batch", "L64-s16-one-window-per-call"],
)
def test_baseline_through_cache_equals_plain_forward(
    kv_compress_bin: str, tiny_llama, max_length: int, stride: int, count: int, batch_windows: int
) -> None:
    """Self-check: prefill + cached scoring gives the plain no-cache pass's NLL within 1e-4 relative (float32)."""
    windows, starts = windows_for(max_length, stride, count)
    outcome = protocol.run_protocol(tiny_llama, windows, stride, starts=starts, batch_windows=batch_windows)
    plain = protocol.plain_window_nlls(tiny_llama, windows, stride)

    assert [w.start for w in outcome.windows] == starts
    assert all(w.tokens == stride for w in outcome.windows)
    for w, reference in zip(outcome.windows, plain.tolist()):
        assert w.nll_baseline == pytest.approx(reference, rel=1e-4)
    # one compress + decompress round trip per batch of windows, not per window
    assert len(outcome.metrics) == math.ceil(count / batch_windows)
    assert outcome.scored_tokens == count * stride


def test_compute_perplexity_is_the_plain_pass(kv_compress_bin: str, tiny_llama) -> None:
    windows, starts = windows_for(96, 32, 4)
    ids = token_ids(3 * 32 + 96)
    ppl = vp.compute_perplexity(tiny_llama, None, stride=32, max_samples=4, verbose=False, max_length=96, token_ids=ids)
    outcome = protocol.run_protocol(tiny_llama, windows, 32, starts=starts, batch_windows=4)
    assert ppl == pytest.approx(outcome.baseline_perplexity, rel=1e-4)


def test_compressed_cache_changes_predictions_a_little(kv_compress_bin: str, tiny_llama) -> None:
    windows, starts = windows_for(96, 32, 4)
    outcome = protocol.run_protocol(tiny_llama, windows, 32, starts=starts, batch_windows=2)
    result = results.build_result(outcome, threshold=0.5)

    assert outcome.kl_divergence > 0.0
    assert 0.5 < outcome.top1_agreement <= 1.0
    assert result.compressed_perplexity != result.baseline_perplexity
    assert result.delta == pytest.approx(result.compressed_perplexity - result.baseline_perplexity)
    assert result.delta_percent == pytest.approx(100 * result.delta / result.baseline_perplexity)
    assert result.delta_ci_low <= result.delta <= result.delta_ci_high
    assert result.compression_ratio > 3.0 and result.snr_db > 10.0 and 0.9 < result.cosine_similarity < 1.0
    assert set(outcome.timings) >= {"prefill", "bridge", "scoring", "metrics", "total", "bridge_compress"}


def test_more_sparsity_hurts_more(kv_compress_bin: str, tiny_llama) -> None:
    windows, starts = windows_for(96, 32, 2)
    dense = protocol.run_protocol(tiny_llama, windows, 32, starts=starts, sparsity=0.0)
    sparse = protocol.run_protocol(tiny_llama, windows, 32, starts=starts, sparsity=0.5)
    assert sparse.kl_divergence > dense.kl_divergence
    assert [w.nll_baseline for w in sparse.windows] == [w.nll_baseline for w in dense.windows]


def test_stride_one_scores_only_the_prefill_token(kv_compress_bin: str, tiny_llama) -> None:
    """With stride 1 the single scored token comes from the prefill, so both caches agree exactly."""
    windows, starts = windows_for(48, 1, 3)
    outcome = protocol.run_protocol(tiny_llama, windows, 1, starts=starts, batch_windows=3)
    assert outcome.scored_tokens == 3
    assert outcome.baseline_perplexity == outcome.compressed_perplexity
    assert outcome.kl_divergence == 0.0 and outcome.top1_agreement == 1.0


@pytest.mark.gpu
def test_protocol_on_cuda_half_precision(kv_compress_bin: str) -> None:
    from conftest import make_tiny_llama

    model = make_tiny_llama(dtype=torch.float16).to("cuda")
    windows, starts = windows_for(96, 32, 4)
    outcome = protocol.run_protocol(model, windows, 32, starts=starts, batch_windows=2)
    plain = protocol.plain_window_nlls(model, windows, 32)
    assert outcome.cache_dtype == "float16"
    for w, reference in zip(outcome.windows, plain.tolist()):
        assert w.nll_baseline == pytest.approx(reference, rel=1e-2)
    assert math.isfinite(outcome.compressed_perplexity)


# -----------------------------------------------------------------------------
# statistics


def outcome_from(pairs: list[tuple[float, float]], tokens: int = 10) -> protocol.ProtocolOutcome:
    """A ProtocolOutcome with the given per-window (baseline, compressed) NLL sums."""
    windows = [protocol.WindowScore(i * tokens, tokens, b, c, 0.0, tokens) for i, (b, c) in enumerate(pairs)]
    return protocol.ProtocolOutcome(windows, [], {}, 4 * tokens, tokens, 1, 0, "float32", 1, 1, 1)


def test_bootstrap_is_seeded_and_brackets_the_estimate() -> None:
    outcome = outcome_from([(20.0, 20.5), (25.0, 25.1), (22.0, 22.9), (18.0, 18.2), (30.0, 30.6)])
    first = stats.paired_bootstrap_interval(outcome, resamples=500, seed=7)
    assert first == stats.paired_bootstrap_interval(outcome, resamples=500, seed=7)
    assert first != stats.paired_bootstrap_interval(outcome, resamples=500, seed=8)
    delta = outcome.compressed_perplexity - outcome.baseline_perplexity
    assert first[0] <= delta <= first[1]
    assert first[0] > 0  # every window got worse


def test_bootstrap_of_identical_windows_is_a_point() -> None:
    outcome = outcome_from([(20.0, 21.0)] * 4)
    lo, hi = stats.paired_bootstrap_interval(outcome, resamples=200)
    delta = math.exp(2.1) - math.exp(2.0)
    assert lo == pytest.approx(delta) and hi == pytest.approx(delta)


@pytest.mark.parametrize(
    "compressed_nll, threshold, passed",
    [(20.0, 0.5, True), (21.0, 0.5, False), (21.0, 10.0, True), (19.0, 0.0, True), (20.0, 0.0, False)],
    ids=["no-change", "over-threshold", "custom-threshold", "improvement", "zero-delta-not-below-zero"],
)
def test_passed_means_delta_strictly_below_threshold(compressed_nll: float, threshold: float, passed: bool) -> None:
    # 10 tokens per window: baseline PPL exp(2.0) = 7.389; compressed NLL 21 -> PPL exp(2.1) = 8.166 (delta 0.78)
    outcome = outcome_from([(20.0, compressed_nll)] * 3)
    result = results.build_result(outcome, threshold=threshold)
    assert result.passed is passed
    assert result.threshold == threshold
    assert result.num_windows == 3 and result.scored_tokens == 30


def test_validation_result_keeps_the_seed_fields_first() -> None:
    names = [f.name for f in vp.dataclasses.fields(vp.ValidationResult)]
    assert names[:10] == [
        "baseline_perplexity", "compressed_perplexity", "delta", "delta_percent", "compression_ratio",
        "rmse", "snr_db", "cosine_similarity", "passed", "threshold",
    ]
    seed_style = vp.ValidationResult(10.0, 10.1, 0.1, 1.0, 3.76, 0.05, 25.0, 0.999, True)
    assert seed_style.threshold == 0.5
    assert seed_style.to_dict()["kl_divergence"] is None  # NaN is written as null


def test_aggregate_metrics_weights_by_size() -> None:
    a = CompressionMetrics(compression_ratio=4.0, original_size_bytes=400, compressed_size_bytes=100, rmse=0.1,
                           snr_db=20.0, cosine_similarity=0.995, max_error=0.3, quality_level="ACCEPTABLE",
                           processing_time_ms=5.0, passed=True, violations=[], ratio_vs_fp16=2.0)
    b = CompressionMetrics(compression_ratio=2.0, original_size_bytes=200, compressed_size_bytes=100, rmse=0.2,
                           snr_db=10.0, cosine_similarity=0.98, max_error=0.9, quality_level="POOR",
                           processing_time_ms=3.0, passed=False, violations=["snr_db 10 <= 18"], ratio_vs_fp16=1.0)
    agg = stats.aggregate_metrics([a, b])
    assert agg["compression_ratio"] == pytest.approx(3.0)
    assert agg["ratio_vs_fp16"] == pytest.approx(1.5)  # (200 + 100 fp16-equivalent bytes) / 200 compressed
    assert agg["rmse"] == pytest.approx(math.sqrt((2 / 3) * 0.01 + (1 / 3) * 0.04))
    signal = (2 / 3) * 0.01 * 100 + (1 / 3) * 0.04 * 10
    assert agg["snr_db"] == pytest.approx(10 * math.log10(signal / agg["rmse"] ** 2))
    assert (agg["cosine_similarity"], agg["max_error"], agg["quality_level"]) == (0.98, 0.9, "POOR")
    assert agg["passed"] is False and agg["violations"] == ["snr_db 10 <= 18"] and agg["calls"] == 2


# -----------------------------------------------------------------------------
# choosing the model and the corpus


def test_hub_probe_respects_offline_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models.hub_reachable("TinyLlama/TinyLlama-1.1B-Chat-v1.0") == (False, "HF_HUB_OFFLINE is set")


def test_hub_probe_gives_up_quickly_on_a_dead_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    ok, why = models.hub_reachable("owner/model", timeout=1.0)
    assert not ok and "127.0.0.1:9" in why


@pytest.mark.parametrize(
    "requested, message",
    [
        ("/nonexistent/model/folder", "no such folder"),
        ("nobody/not-a-model", "cannot be loaded"),
    ],
    ids=["missing-folder", "unreachable-hub-id"],
)
def test_explicit_model_that_cannot_load_is_an_error(offline_hub, requested: str, message: str) -> None:
    with pytest.raises(vp.ValidationError, match=message):
        models.resolve_model(requested, hub_timeout=0.5)


def test_local_folder_without_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(vp.ValidationError, match="no config.json"):
        models.resolve_model(str(tmp_path))


def test_text_file_is_used_as_is(corpus_file: Path) -> None:
    corpus = corpora.load_corpus(text_file=str(corpus_file))
    assert corpus.text == corpus_file.read_text(encoding="utf-8")
    assert corpus.source == "file" and corpus.name == "notes.txt"
    assert corpus.details["file_sha256"] == corpus.sha256  # the bytes are the text


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"text_file": "{tmp}/missing.txt"}, "no such file"),
        ({"text_file": "{tmp}/latin1.txt"}, "not UTF-8"),
        ({"dataset": "pile"}, r"must be one of \['wikitext', 'embedded', 'wiki', 'c4', .*\], got 'pile'"),
        ({"dataset": "wikitext"}, "--dataset wikitext is unavailable"),
    ],
    ids=["missing-file", "not-utf8", "unknown-dataset", "explicit-wikitext-offline"],
)
def test_corpus_errors(offline_hub, tmp_path: Path, kwargs: dict, message: str) -> None:
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    kwargs = {k: v.format(tmp=tmp_path) for k, v in kwargs.items()}
    with pytest.raises(vp.ValidationError, match=message):
        corpora.load_corpus(**kwargs, hub_timeout=0.5)


# -----------------------------------------------------------------------------
# command line


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--group-size", "7"], "invalid choice: 7"),
        (["--stride", "0"], r"--stride must be in \[1, max_length - 1\] = \[1, 1023\], got 0"),
        (["--max-length", "64", "--stride", "64"], "got 64"),
        (["--sparsity", "1.5"], r"--sparsity must be in \[0, 1\), got 1.5"),
        (["--batch-windows", "0"], "--batch-windows must be >= 1, got 0"),
        (["--dataset", "pile"], "invalid choice: 'pile'"),
        (["--dataset", "wikitext", "--text-file", "x.txt"], "either --dataset or --text-file"),
        (["--cpu", "--device", "cuda"], "--cpu conflicts with --device cuda"),
        (["--model", "/nonexistent/model/folder"], "no such folder"),
        (["--model", "nobody/not-a-model", "--hub-timeout", "0.5"], "cannot be loaded"),
        (["--threshold", "abc"], "invalid float value"),
        (["--scheme", "nf4"], r"argument --scheme: invalid choice: 'nf4' \(choose from '?sym'?, '?asym'?, '?nf'?\)"),
        (["--rotate", "givens"], "argument --rotate: invalid choice: 'givens'"),
        (["--key-axis", "row"], "argument --key-axis: invalid choice: 'row'"),
        (["--bits", "5"], "argument --bits: invalid choice: 5"),
        (["--key-bits", "16"], "argument --key-bits: invalid choice: 16"),
        (["--sink", "-1"], "--sink must be a non-negative integer, got -1"),
    ],
    ids=["group-size", "stride-zero", "stride-equals-length", "sparsity", "batch-windows", "dataset", "dataset-and-file",
         "cpu-vs-device", "missing-model-folder", "unreachable-model-id", "threshold-not-a-number", "scheme", "rotate",
         "key-axis", "bits", "key-bits", "sink-negative"],
)
def test_bad_input_exits_2_with_one_line(offline_hub, capsys, argv: list[str], message: str) -> None:
    assert exit_status(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(message, err[0]), err[0]


def exit_status(argv: list[str]) -> int:
    """``main(argv)``'s exit status, whether it returns it or argparse exits."""
    try:
        return vp.main(argv)
    except SystemExit as e:
        return int(e.code)


def _run_local(tiny_model_dir: Path, corpus_file: Path, out: Path, *extra: str) -> int:
    return vp.main([
        "--model", str(tiny_model_dir), "--text-file", str(corpus_file), "--cpu", "--max-length", "64",
        "--stride", "16", "--max-samples", "5", "--batch-windows", "2", "--output-json", str(out), *extra,
    ])


# The threshold must be positive, so the failing gate comes from a codec that wrecks the cache
# (2-bit codes, groups of 64, no rotation) against a threshold far below any delta it gives.
@pytest.mark.parametrize(
    "threshold, codec, code",
    [("1e9", (), 0), ("1e-9", ("--bits", "2", "--rotate", "none", "--sink", "0"), 1)],
    ids=["gate-passes-exit-0", "gate-fails-exit-1"],
)
def test_cli_local_model_and_text_file(
    kv_compress_bin: str, offline_hub, tiny_model_dir: Path, corpus_file: Path, tmp_path: Path, capsys,
    threshold: str, codec: tuple, code: int,
) -> None:
    out = tmp_path / "report.json"
    assert _run_local(tiny_model_dir, corpus_file, out, f"--threshold={threshold}", *codec) == code
    stdout = capsys.readouterr().out
    for marker in ("[1/6]", "[2/6]", "[3/6]", "[4/6]", "[5/6]", "[6/6]", "RESULTS", "Baseline Perplexity:"):
        assert marker in stdout
    assert ("[OK] PASSED" in stdout) == (code == 0)

    report = json.loads(out.read_text())
    assert not list(tmp_path.glob(".report.json.*"))  # atomic write leaves no temp file
    assert report["passed"] is (code == 0)
    assert report["model"]["source"] == "local" and report["model"]["num_layers"] == 22
    assert "model.safetensors" in report["model"]["files"]
    assert report["model"]["dtype"] == "float32" and report["model"]["device"] == "cpu"
    assert report["tokenizer"]["class"] and report["corpus"]["source"] == "file"
    assert report["corpus"]["sha256"] == corpora.load_corpus(text_file=str(corpus_file)).sha256
    assert report["protocol"]["windows"] == 5 and report["protocol"]["scored_tokens"] == 80
    assert report["protocol"]["window_starts"] == [0, 16, 32, 48, 64]
    assert report["codec"]["group_size"] == 64 and report["codec"]["aggregate"]["calls"] == 3
    assert report["versions"]["kv_compress"]["format"] == "kv-compress"
    assert {"model_load_s", "prefill_s", "bridge_s", "scoring_s", "run_total_s"} <= set(report["timings"])
    result = report["result"]
    assert result["scored_tokens"] == 80 and result["threshold"] == float(threshold)
    assert len(report["per_window"]) == 5


def test_cli_quiet_prints_only_the_verdict(kv_compress_bin: str, offline_hub, tiny_model_dir: Path,
                                           corpus_file: Path, tmp_path: Path, capsys) -> None:
    assert _run_local(tiny_model_dir, corpus_file, tmp_path / "r.json", "--quiet", "--threshold", "1e9") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("PASSED: delta ")


@pytest.mark.parametrize("cwd", ["repo-root", "validation-dir"])
def test_script_quick_test_runs_from_both_directories(kv_compress_bin: str, tmp_path: Path, cwd: str) -> None:
    out = tmp_path / "quick.json"
    if cwd == "repo-root":
        cmd, where = [sys.executable, "validation/validate_perplexity.py"], REPO_ROOT
    else:
        cmd, where = [sys.executable, "validate_perplexity.py"], REPO_ROOT / "validation"
    env = {**os.environ, "KV_COMPRESS_PATH": kv_compress_bin, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([*cmd, "--quick-test", "--quiet", "--output-json", str(out)], cwd=where, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("PASSED")
    report = json.loads(out.read_text())
    assert report["mode"] == "quick-test"
    assert report["synthetic_cache"]["ok"] is True
    assert report["model"]["num_layers"] == 4 and report["protocol"]["windows"] == 8


def test_run_quick_test_api(kv_compress_bin: str) -> None:
    result = vp.run_quick_test(verbose=False)
    assert isinstance(result, vp.ValidationResult)
    assert result.passed and result.scored_tokens == 256
    assert result.compression_ratio > 3.0 and 0.0 <= result.kl_divergence < 0.01


# -----------------------------------------------------------------------------
# the embedded model (slow)


@pytest.fixture(scope="module")
def embedded_ready() -> None:
    from validation import assets

    try:
        assets.ensure_embedded_model(fetch=True)
        assets.ensure_embedded_corpus(fetch=True)
    except assets.AssetUnavailableError as e:
        pytest.skip(f"embedded assets unavailable and cannot be fetched: {e}")


@pytest.mark.slow
def test_default_model_offline_is_the_embedded_one(embedded_ready, offline_hub) -> None:
    if models.hf_cache_snapshot(run_options.DEFAULT_MODEL) is not None:
        pytest.skip("TinyLlama is in the local Hugging Face cache, so it is the default here")
    choice = models.resolve_model(None, hub_timeout=0.5)
    assert choice.source == "embedded" and choice.requested is None
    assert "HF_HUB_OFFLINE" in choice.reason and "embedded" in choice.reason
    assert choice.revision and "sha256:" in choice.revision


@pytest.mark.slow
def test_default_corpus_offline_is_the_embedded_one(embedded_ready, offline_hub) -> None:
    corpus = corpora.load_corpus(hub_timeout=0.5)
    assert corpus.source == "embedded" and "embedded" in corpus.reason
    assert "<doc" not in corpus.text[:10000]


@pytest.mark.slow
def test_embedded_model_short_run(kv_compress_bin: str, embedded_ready, offline_hub, tmp_path: Path) -> None:
    out = tmp_path / "embedded.json"
    result = vp.run_full_validation(
        device="cpu", threshold=0.5, verbose=False, model="embedded", dataset="embedded", max_length=192,
        stride=48, max_samples=2, batch_windows=2, output_json=str(out),
    )
    assert result.scored_tokens == 96 and result.num_windows == 2
    assert 1.0 < result.baseline_perplexity < 200.0 and math.isfinite(result.compressed_perplexity)
    report = json.loads(out.read_text())
    assert report["model"]["source"] == "embedded" and report["model"]["num_kv_heads"] == 3
    assert report["corpus"]["file_sha256"] == report["corpus"]["file_sha256"].lower()
    assert report["tokenizer"]["vocab_size"] == 49152


# -----------------------------------------------------------------------------
# codec options, resolved codec and per-layer diagnostics


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--scheme", "asym", "--rotate", "hadamard", "--key-axis", "channel", "--sink", "1"],
         {"scheme": "asym", "rotate": "hadamard", "key_axis": "channel", "sink": 1}),
        (["--scheme", "sym", "--rotate", "none", "--key-bits", "8", "--value-bits", "4"],
         {"scheme": "sym", "rotate": "none", "key_bits": 8, "value_bits": 4}),
        (["--bits", "2", "--group-size", "32"], {"bits": 2, "key_bits": 2, "value_bits": 2, "group_size": 32}),
    ],
    ids=["asym-hadamard-channel-sink", "mixed-key-value-bits", "two-bit-g32"],
)
def test_codec_flags_reach_the_binary(
    kv_compress_bin: str, offline_hub, tiny_model_dir: Path, corpus_file: Path, tmp_path: Path, capsys,
    flags: list[str], expected: dict,
) -> None:
    out = tmp_path / "report.json"
    assert _run_local(tiny_model_dir, corpus_file, out, "--threshold", "1e9", *flags) == 0
    stdout = capsys.readouterr().out
    report = json.loads(out.read_text())
    resolved = report["codec"]["resolved"]
    for key, value in expected.items():
        assert resolved[key] == value, (key, resolved)
    sent = {flag[2:].replace("-", "_"): value for flag, value in zip(flags[::2], flags[1::2])}
    assert {k: str(v) for k, v in report["codec"]["requested"].items() if k in sent} == sent
    for call in report["codec"]["per_call"]:  # every batch ran the same codec
        assert {k: call["codec"][k] for k in expected} == expected
    result = report["result"]
    assert result["bits_per_element"] > 0 and result["disk_ratio_vs_fp16"] > 1.0
    assert result["bits_per_element"] == pytest.approx(report["codec"]["bits_per_element"])
    assert "Codec:" in stdout and "Ratio vs float16:" in stdout and run_options.describe_codec(resolved) in stdout


def test_default_run_leaves_the_codec_to_the_binary_and_reports_snr(
    kv_compress_bin: str, offline_hub, tiny_model_dir: Path, corpus_file: Path, tmp_path: Path, capsys,
) -> None:
    out, plots = tmp_path / "report.json", tmp_path / "plots" / "nested"
    assert _run_local(tiny_model_dir, corpus_file, out, "--threshold", "1e9", "--plots", str(plots)) == 0
    stdout = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["codec"]["requested"] == {"group_size": 64, "sparsity": 0.0}  # nothing else sent to the binary
    assert {"scheme", "rotate", "key_axis", "sink", "bits"} <= set(report["codec"]["resolved"])
    assert report["codec"]["disk_ratio_vs_fp16"] == pytest.approx(
        report["codec"]["aggregate"]["fp16_size_bytes"] / report["codec"]["aggregate"]["compressed_size_bytes"])

    diag = report["diagnostics"]
    assert len(diag["key_snr_db"]) == 22 and all(len(row) == 4 for row in diag["key_snr_db"])
    assert len(diag["value_snr_db"]) == 22 and len(diag["value_layer_snr_db"]) == 22
    worst = diag["worst_key"]
    assert diag["key_snr_db"][worst["layer"]][worst["head"]] == pytest.approx(worst["snr_db"], abs=1e-3)
    assert "SNR keys:" in stdout and "SNR values:" in stdout and "Worst SNR:" in stdout

    heatmap = Path(report["plots"]["snr_heatmap"])
    assert heatmap == plots / "snr_heatmap.png"
    assert heatmap.read_bytes().startswith(b"\x89PNG") and heatmap.stat().st_size > 10_000


def test_run_full_validation_takes_codec_keywords(
    kv_compress_bin: str, offline_hub, tiny_model_dir: Path, corpus_file: Path, tmp_path: Path,
) -> None:
    out = tmp_path / "r.json"
    result = vp.run_full_validation(
        device="cpu", threshold=1e9, verbose=False, model=str(tiny_model_dir), text_file=str(corpus_file),
        max_length=64, stride=16, max_samples=2, batch_windows=2, output_json=str(out),
        scheme="asym", rotate="hadamard", bits=8,
    )
    assert result.passed and result.disk_ratio_vs_fp16 > 1.0
    resolved = json.loads(out.read_text())["codec"]["resolved"]
    assert (resolved["scheme"], resolved["rotate"], resolved["bits"]) == ("asym", "hadamard", 8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"schem": "asym"}, r"unknown option\(s\) \['schem'\]"),
        ({"scheme": "nf4"}, r"--scheme must be one of \['sym', 'asym', 'nf'\], got 'nf4'"),
        ({"sink": -2}, "--sink must be a non-negative integer, got -2"),
        ({"value_bits": 1}, r"--value-bits must be one of \[2, 3, 4, 8\], got 1"),
    ],
    ids=["unknown-keyword", "bad-scheme", "bad-sink", "bad-value-bits"],
)
def test_run_full_validation_rejects_bad_codec_options(kwargs: dict, message: str) -> None:
    with pytest.raises(vp.ValidationError, match=message):
        vp.run_full_validation(device="cpu", verbose=False, model="/nonexistent", **kwargs)


def test_aggregate_metrics_disk_ratio_and_bits_per_element() -> None:
    a = CompressionMetrics(original_size_bytes=800, compressed_size_bytes=100, fp16_size_bytes=400, bits_per_element=4.0,
                           rmse=0.1, snr_db=20.0, cosine_similarity=0.99, max_error=0.1, quality_level="GOOD")
    b = CompressionMetrics(original_size_bytes=400, compressed_size_bytes=100, fp16_size_bytes=200, bits_per_element=7.0,
                           rmse=0.1, snr_db=20.0, cosine_similarity=0.99, max_error=0.1, quality_level="GOOD")
    agg = stats.aggregate_metrics([a, b])
    assert agg["disk_ratio_vs_fp16"] == pytest.approx(600 / 200)
    assert agg["fp16_size_bytes"] == 600
    assert agg["bits_per_element"] == pytest.approx((4.0 * 400 + 7.0 * 200) / 600)
    missing = stats.aggregate_metrics([CompressionMetrics(original_size_bytes=8, compressed_size_bytes=2)])
    assert math.isnan(missing["disk_ratio_vs_fp16"]) and math.isnan(missing["bits_per_element"])


@pytest.mark.parametrize(
    "codec, text",
    [
        ({"scheme": "asym", "bits": 4, "key_bits": 4, "value_bits": 4, "group_size": 64, "rotate": "hadamard",
          "key_axis": "channel", "sink": 1, "sparsity": 0}, "asym 4-bit, G64, rotate hadamard, key axis channel, sink 1"),
        ({"scheme": "sym", "bits": 4, "key_bits": 8, "value_bits": 4, "group_size": 32},
         "sym keys 8-bit / values 4-bit, G32, rotate none, key axis token, sink 0"),
        (None, "unknown"),
    ],
    ids=["full", "mixed-bits-old-fields-missing", "none"],
)
def test_describe_codec(codec, text: str) -> None:
    assert run_options.describe_codec(codec).startswith(text)


@pytest.mark.slow
def test_load_model_and_tokenizer_embedded_alias(embedded_ready, offline_hub, kv_compress_bin: str, tmp_path: Path) -> None:
    """The notebook path of docs/python-api.md: load the embedded model by name, extract, compress, continue."""
    from validation.compression_bridge import roundtrip_kv_cache
    from validation.kv_cache_utils import extract_kv_cache

    model, tokenizer = vp.load_model_and_tokenizer("embedded", device="cpu")
    cache, meta = extract_kv_cache(model, tokenizer, "The Eiffel Tower is 330 metres tall.")
    assert (meta.num_layers, meta.num_kv_heads, meta.head_dim) == (30, 3, 64)
    restored, metrics = roundtrip_kv_cache(cache, str(tmp_path))
    ids = tokenizer(" It", return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = forward(model, restored, input_ids=ids, use_cache=True).logits
    assert torch.isfinite(logits).all() and metrics.compressed_size_bytes < metrics.original_size_bytes


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        ([], {}),
        (["--seed-scheme"], {"preset": "seed"}),
        (["--seed-scheme", "--sink", "2", "--bits", "8"], {"preset": "seed", "sink": 2, "bits": 8}),
        (["--preset", "compact", "--entropy", "lz4"], {"preset": "compact", "entropy": "lz4"}),
        (["--key-axis", "token"], {"key_axis": "token"}),
    ],
    ids=["binary-defaults", "seed", "seed-with-explicit-flags", "preset-and-entropy", "one-flag"],
)
def test_codec_from_args(argv, want) -> None:
    assert cli.codec_from_args(cli.build_parser().parse_args(argv)) == want


def test_seed_scheme_conflicts_with_another_preset() -> None:
    with pytest.raises(vp.ValidationError, match="conflicts with --preset compact"):
        cli.codec_from_args(cli.build_parser().parse_args(["--seed-scheme", "--preset", "compact"]))


@pytest.mark.parametrize("preset", ["tiny", "no/such/file.json"], ids=["unknown-name", "missing-file"])
def test_bad_preset_is_refused_before_any_work(preset: str) -> None:
    with pytest.raises(vp.ValidationError, match="preset must be one of"):
        cli.options_from_args(cli.build_parser().parse_args(["--preset", preset]), {"preset": preset}).check()
