"""Tests for validation.diagnostics: per-layer, per-KV-head SNR of a reconstructed cache and its heatmap.

The SNR arithmetic is checked against a direct torch computation; the codec-dependent
checks run the real ``kv-compress`` binary through the protocol (``kv_compress_bin``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from validation import protocol
from validation import quick_test
from validation import stats
from validation.diagnostics import (
    SNR_CAP_DB,
    CacheDiagnostics,
    SNRAccumulator,
    cache_snr,
    plot_snr_heatmap,
    snr_db,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def noisy_layers(num_layers: int = 3, batch: int = 2, heads: int = 3, seq: int = 5, head_dim: int = 64,
                 seed: int = 0) -> tuple[list, list]:
    """Original and perturbed layers [(key, value)], each [batch, heads, seq, head_dim]; noise grows with layer and head."""
    g = torch.Generator().manual_seed(seed)
    original, noisy = [], []
    for layer in range(num_layers):
        pair, pert = [], []
        for _ in range(2):
            x = torch.randn(batch, heads, seq, head_dim, generator=g)
            scale = (0.01 * (1 + layer) * (1 + torch.arange(heads, dtype=torch.float32))).view(1, heads, 1, 1)
            pair.append(x)
            pert.append(x + scale * torch.randn(x.shape, generator=g))
        original.append(tuple(pair))
        noisy.append(tuple(pert))
    return original, noisy


def direct_snr(original: list, noisy: list, which: int) -> torch.Tensor:
    """[layers, heads] SNR in dB by the textbook formula, float64 torch."""
    rows = []
    for (o, n) in zip(original, noisy):
        x, y = o[which].double(), n[which].double()
        rows.append(10 * torch.log10(x.pow(2).sum(dim=(0, 2, 3)) / (x - y).pow(2).sum(dim=(0, 2, 3))))
    return torch.stack(rows)


def test_snr_matches_a_direct_torch_computation() -> None:
    original, noisy = noisy_layers()
    diag = cache_snr(original, noisy)
    assert diag.key_snr_db.shape == (3, 3) and diag.value_snr_db.shape == (3, 3)
    np.testing.assert_allclose(diag.key_snr_db, direct_snr(original, noisy, 0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(diag.value_snr_db, direct_snr(original, noisy, 1).numpy(), rtol=1e-12)
    # noise grows with layer and head, so the worst cell is the last of both
    assert diag.worst("key")["layer"] == 2 and diag.worst("key")["head"] == 2
    assert diag.elements == 2 * 5 * 64 and diag.batches == 1


def test_accumulating_batches_equals_one_concatenated_batch() -> None:
    original, noisy = noisy_layers(batch=4)
    acc = SNRAccumulator()
    for part in (slice(0, 1), slice(1, 4)):
        acc.update([(k[part], v[part]) for k, v in original], [(k[part], v[part]) for k, v in noisy])
    split, whole = acc.result(), cache_snr(original, noisy)
    np.testing.assert_allclose(split.key_snr_db, whole.key_snr_db, rtol=1e-12)
    np.testing.assert_allclose(split.value_snr_db, whole.value_snr_db, rtol=1e-12)
    assert split.batches == 2 and split.elements == whole.elements


@pytest.mark.parametrize(
    "signal, noise, expected",
    [(1.0, 0.0, SNR_CAP_DB), (0.0, 0.0, SNR_CAP_DB), (0.0, 1.0, -SNR_CAP_DB), (100.0, 1.0, 20.0), (1.0, 1e30, -SNR_CAP_DB)],
    ids=["exact", "all-zero", "signal-zero", "20dB", "capped-below"],
)
def test_snr_db_edge_cases(signal: float, noise: float, expected: float) -> None:
    assert float(snr_db(np.array(signal), np.array(noise))) == pytest.approx(expected)


def test_to_dict_is_json_ready_and_names_the_worst_cells() -> None:
    original, noisy = noisy_layers(num_layers=4, heads=2)
    d = cache_snr(original, noisy).to_dict()
    assert d["num_layers"] == 4 and d["num_kv_heads"] == 2
    assert len(d["key_snr_db"]) == 4 and all(len(row) == 2 for row in d["key_snr_db"])
    assert len(d["value_layer_snr_db"]) == 4
    assert d["worst_key"] == {"layer": 3, "head": 1, "snr_db": pytest.approx(min(min(r) for r in d["key_snr_db"]), abs=1e-3)}
    assert isinstance(d["overall_snr_db"], float)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda o, n: (o, n[:-1]), "same non-zero number of layers"),
        (lambda o, n: (o, [(k[..., :32], v) for k, v in n]), "matching 4-D"),
        (lambda o, n: (o, [(k[0], v) for k, v in n]), "matching 4-D"),
    ],
    ids=["layer-count", "shape", "not-4d"],
)
def test_mismatched_geometry_is_refused(mutate, message: str) -> None:
    original, noisy = noisy_layers()
    with pytest.raises(ValueError, match=message):
        SNRAccumulator().update(*mutate(original, noisy))


def test_batches_of_different_head_counts_are_refused() -> None:
    acc = SNRAccumulator()
    acc.update(*noisy_layers(heads=3))
    with pytest.raises(ValueError, match=r"\[3, 2\] differs from earlier batches' \[3, 3\]"):
        acc.update(*noisy_layers(heads=2))
    with pytest.raises(ValueError, match="no batch"):
        SNRAccumulator().result()
    with pytest.raises(ValueError, match=r"kind must be one of \['key', 'value'\], got 'keys'"):
        acc.result().worst("keys")


def test_heatmap_png_is_written(tmp_path: Path) -> None:
    original, noisy = noisy_layers(num_layers=22, heads=4)
    target = tmp_path / "new" / "folder" / "heat.png"
    written = plot_snr_heatmap(cache_snr(original, noisy), str(target), title="test")
    assert written == str(target)
    data = target.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


# -----------------------------------------------------------------------------
# through the real binary


def _windows(max_length: int = 96, stride: int = 32, count: int = 4) -> tuple[torch.Tensor, list[int]]:
    ids = quick_test.synthetic_token_ids((count - 1) * stride + max_length, 512, 0)
    return protocol.make_windows(ids, max_length, stride, count)


@pytest.fixture(scope="module")
def two_widths(kv_compress_bin: str, tiny_llama) -> dict[int, protocol.ProtocolOutcome]:
    """The protocol on the tiny Llama with 8-bit and with 2-bit codes (otherwise the same explicit codec)."""
    windows, starts = _windows()
    out = {}
    for bits in (8, 2):
        out[bits] = protocol.run_protocol(tiny_llama, windows, 32, starts=starts, batch_windows=2, scheme="sym",
                                    rotate="none", key_axis="token", sink=0, bits=bits, key_bits=bits, value_bits=bits)
    return out


def test_protocol_reports_snr_per_layer_and_head(two_widths: dict[int, protocol.ProtocolOutcome]) -> None:
    diag = two_widths[8].diagnostics
    assert isinstance(diag, CacheDiagnostics)
    assert diag.key_snr_db.shape == (22, 4) and diag.value_snr_db.shape == (22, 4)  # conftest geometry
    assert diag.batches == 2 and diag.elements == 4 * 64 * 64  # 4 windows x 64 context tokens x head_dim
    assert np.isfinite(diag.key_snr_db).all() and np.isfinite(diag.value_snr_db).all()


def test_eight_bit_codes_beat_two_bit_codes_on_every_layer_and_head(two_widths: dict[int, protocol.ProtocolOutcome]) -> None:
    hi, lo = two_widths[8].diagnostics, two_widths[2].diagnostics
    assert (hi.key_snr_db > lo.key_snr_db + 20).all()
    assert (hi.value_snr_db > lo.value_snr_db + 20).all()


def test_overall_snr_agrees_with_the_binary(two_widths: dict[int, protocol.ProtocolOutcome]) -> None:
    """Our per-head sums, added up, give the SNR kv-compress reports over the same tensors."""
    for outcome in two_widths.values():
        ours = outcome.diagnostics.overall_snr_db
        theirs = stats.aggregate_metrics(outcome.metrics)["snr_db"]
        assert ours == pytest.approx(theirs, abs=0.05)


def test_diagnostics_can_be_switched_off(kv_compress_bin: str, tiny_llama) -> None:
    windows, starts = _windows(count=2)
    outcome = protocol.run_protocol(tiny_llama, windows, 32, starts=starts, snr_diagnostics=False)
    assert outcome.diagnostics is None and math.isfinite(outcome.compressed_perplexity)
