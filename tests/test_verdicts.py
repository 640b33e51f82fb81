"""Verdicts a user can trust: the gate's two readings, the not-firm note, the KL summary, exit codes."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from validation import cli, protocol, reports, results, stats
from validation.options import ValidationError, ValidationOptions

REPO = Path(__file__).resolve().parent.parent


def outcome_from(pairs: list[tuple[float, float]], tokens: int = 10) -> protocol.ProtocolOutcome:
    """A ProtocolOutcome with the given per-window (baseline, compressed) NLL sums."""
    windows = [protocol.WindowScore(i * tokens, tokens, b, c, 0.0, tokens) for i, (b, c) in enumerate(pairs)]
    return protocol.ProtocolOutcome(windows, [], {}, 4 * tokens, tokens, 1, 0, "float32", 1, 1, 1)


# Windows whose perplexity deltas spread widely around +0.33, like the run the issue quotes.
SPREAD = [(30.0, 30.0), (30.0, 30.05), (30.0, 30.4), (30.0, 30.1), (30.0, 30.02), (30.0, 30.3)]


def _result(gate: str, threshold: float) -> results.ValidationResult:
    return results.build_result(outcome_from(SPREAD), threshold=threshold, resamples=500, gate=gate)


def test_point_gate_passes_but_says_the_interval_crosses() -> None:
    base = _result("point", threshold=1.0)
    lo, hi = base.delta_ci_low, base.delta_ci_high
    assert lo < base.delta < hi
    threshold = (base.delta + hi) / 2  # above the estimate, inside the interval
    r = _result("point", threshold)
    assert r.passed and r.ci_crosses_threshold
    note = reports.crossing_note(r)
    assert "NOT FIRM" in note and "--gate upper" in note
    assert "NOT FIRM" in reports._quiet_line(r)


def test_upper_gate_fails_where_the_interval_crosses() -> None:
    base = _result("point", threshold=1.0)
    threshold = (base.delta + base.delta_ci_high) / 2
    r = _result("upper", threshold)
    assert not r.passed and r.ci_crosses_threshold
    assert r.gated_value == r.delta_ci_high
    assert reports.verdict_line(r).startswith("[FAIL] FAILED: Delta's 95% CI upper end")
    clear = _result("upper", base.delta_ci_high * 1.01 + 1e-9)
    assert clear.passed and not clear.ci_crosses_threshold and reports.crossing_note(clear) == ""


def test_unknown_gate_is_refused() -> None:
    with pytest.raises(ValueError, match=r"gate must be one of \['point', 'upper'\], got 'median'"):
        _result("median", 0.5)
    with pytest.raises(ValidationError, match="--gate must be one of"):
        ValidationOptions(gate="median").check()


@pytest.mark.parametrize("threshold", [0.0, -0.5, math.inf, math.nan], ids=["zero", "negative", "inf", "nan"])
def test_threshold_must_be_positive(threshold: float) -> None:
    with pytest.raises(ValidationError, match="--threshold must be a positive finite number"):
        ValidationOptions(threshold=threshold).check()


def test_kld_summary_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    kl = rng.exponential(0.01, size=1000)
    dp = rng.normal(0, 0.02, size=1000)
    s = stats.kld_summary(kl, dp, top1_matches=970)
    assert s["mean"] == pytest.approx(kl.mean())
    assert s["p99"] == pytest.approx(np.percentile(kl, 99))
    assert s["p50"] == pytest.approx(np.median(kl))
    assert s["p1"] <= s["p5"] <= s["p10"] <= s["p50"] <= s["p90"] <= s["p95"] <= s["p99"] <= s["max"]
    assert s["rms_dp"] == pytest.approx(math.sqrt((dp ** 2).mean()))
    assert s["same_top_p"] == pytest.approx(0.97)
    assert s["same_top_p_se"] == pytest.approx(math.sqrt(0.97 * 0.03 / 1000))
    assert stats.kld_summary(None, None, 0) == {}


def test_window_stats_per_token_values_add_up() -> None:
    g = torch.Generator().manual_seed(1)
    vocab, stride = 50, 8
    first = torch.randn(vocab, generator=g)
    lb = torch.randn(stride - 1, vocab, generator=g)
    lc = lb + 0.1 * torch.randn(stride - 1, vocab, generator=g)
    labels = torch.randint(0, vocab, (stride,), generator=g)
    ws = protocol._window_stats(first, lb, lc, labels)
    assert ws.token_kl.shape == (stride,) and ws.token_dp.shape == (stride,)
    assert ws.token_kl[0] == 0 and ws.token_dp[0] == 0
    assert ws.token_kl.sum() == pytest.approx(ws.kl_sum)
    pb = torch.softmax(lb, -1)[torch.arange(stride - 1), labels[1:]]
    pc = torch.softmax(lc, -1)[torch.arange(stride - 1), labels[1:]]
    np.testing.assert_allclose(ws.token_dp[1:], (pc - pb).double().numpy(), rtol=1e-5, atol=1e-7)


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "validation/validate_perplexity.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--quick-test", "--threshold", "0"], "--threshold must be a positive finite number"),
        (["--quick-test", "--gate", "upper", "--threshold", "-1"], "--threshold must be a positive"),
        (["--quick-test", "--device", "cuda:7"] if not torch.cuda.is_available() else ["--quick-test", "--device", "cuda:99"],
         "--device cuda"),
        (["--quick-test", "--sweep"], "use either --sweep or --quick-test"),
    ],
    ids=["zero-threshold", "negative-threshold", "unavailable-device", "sweep-and-quick"],
)
def test_argument_errors_exit_2_before_any_work(args: list[str], message: str) -> None:
    proc = _script(*args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "[A]" not in proc.stdout  # nothing ran: the quick test's first part never started
    assert len(proc.stderr.strip().splitlines()) == 1


def test_unexpected_exception_exits_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    def boom(*_a, **_k):
        raise TypeError("something nobody expected")

    monkeypatch.setattr(cli, "run_quick_test", boom)
    assert cli.main(["--quick-test"]) == 2
    err = capsys.readouterr().err
    assert "unexpected TypeError: something nobody expected" in err
    assert "Traceback" not in err
