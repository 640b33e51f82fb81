"""Caches whose layers differ in length: sliding-window layers (Gemma 3) end to end.

A small random Gemma 3 built from a config (4 layers, the first three with an 8-token sliding
window, head_dim 256, one KV head) stands in for Gemma 3 270M: nothing is downloaded. Every
check compares against what the unmodified model does: one forward pass over the whole
sequence, or continuing from the cache the model itself returned.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from validation.compat import (
    cache_to_layers,
    cache_token_counts,
    expected_layer_lengths,
    forward,
    layers_to_cache,
    output_cache,
    sliding_windows_of,
    transformers_version,
)
from validation.compression_bridge import roundtrip_kv_cache
from validation.kv_cache_utils import (
    compute_kv_cache_stats,
    extract_kv_cache,
    load_kv_cache,
    metadata_from_cache,
    save_kv_cache,
    validate_kv_cache_shape,
)
from validation.protocol import make_windows, plain_window_nlls, run_protocol

pytestmark = pytest.mark.skipif(transformers_version() < (5, 0), reason="per-layer cache lengths need transformers 5.x")

from conftest import GEMMA_HEAD_DIM as HEAD_DIM
from conftest import GEMMA_LAYERS as LAYERS
from conftest import GEMMA_WINDOW as WINDOW
from conftest import TINY_VOCAB as VOCAB
from conftest import make_tiny_gemma3


@pytest.fixture(scope="module")
def gemma():
    return make_tiny_gemma3()


def _ids(n: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, n), generator=g)


def _prefill(model, ids: torch.Tensor):
    with torch.no_grad():
        return output_cache(model(input_ids=ids, use_cache=True))


def test_config_windows_and_expected_lengths(gemma):
    assert sliding_windows_of(gemma.config, LAYERS) == [WINDOW] * (LAYERS - 1) + [None]
    assert expected_layer_lengths(gemma.config, LAYERS, 30) == [WINDOW - 1] * (LAYERS - 1) + [30]
    assert expected_layer_lengths(gemma.config, LAYERS, 5) == [5] * LAYERS


@pytest.mark.parametrize("n", [5, 30], ids=["inside-window", "past-window"])
def test_extract_records_per_layer_lengths(gemma, tiny_tokenizer, n):
    text = "The quick brown fox jumps over the lazy dog. " * 10
    cache, meta = extract_kv_cache(gemma, tiny_tokenizer, text, max_length=n)
    assert meta.seq_len == n
    assert meta.layer_lengths == expected_layer_lengths(gemma.config, LAYERS, n)
    assert (meta.layer_seq_lens is None) == (n < WINDOW)
    assert (meta.num_kv_heads, meta.head_dim) == (1, HEAD_DIM)
    ok, problems = validate_kv_cache_shape(cache, LAYERS, 1, HEAD_DIM, expected_seq_lens=meta.layer_lengths)
    assert ok, problems
    stats = compute_kv_cache_stats(cache)
    assert stats["seq_len"] == n and stats["layer_seq_lens"] == meta.layer_lengths


def test_validate_reports_wrong_layer_lengths(gemma):
    cache = _prefill(gemma, _ids(30))
    ok, problems = validate_kv_cache_shape(cache, LAYERS, 1, HEAD_DIM)  # uniform expected: the sliding layers differ
    assert not ok and "layer 3 key: seq_len 30 differs from layer 0 seq_len 7" in problems
    ok, problems = validate_kv_cache_shape(cache, LAYERS, 1, HEAD_DIM, expected_seq_lens=[7, 7, 7, 29])
    assert problems == ["layer 3 key: expected seq_len 29, got 30", "layer 3 value: expected seq_len 29, got 30"]


@pytest.mark.parametrize("n", [5, 8, 30], ids=["inside-window", "at-window", "past-window"])
def test_saved_cache_continues_like_the_original(gemma, tmp_path, n):
    ids = _ids(n + 12)
    original = _prefill(gemma, ids[:, :n])
    path = tmp_path / "c.safetensors"
    meta = save_kv_cache(copy.deepcopy(original), str(path), model_name="tiny-gemma3")
    sidecar = json.loads((tmp_path / "c.safetensors.metadata.json").read_text())
    assert sidecar["seq_len"] == n
    assert sidecar.get("layer_seq_lens") == (None if n < WINDOW else expected_layer_lengths(gemma.config, LAYERS, n))
    assert sidecar["sliding_windows"] == [WINDOW] * (LAYERS - 1) + [None]
    loaded, loaded_meta = load_kv_cache(str(path))
    assert loaded_meta.layer_lengths == meta.layer_lengths
    assert cache_token_counts(loaded) == [n] * LAYERS
    with torch.no_grad():
        single = gemma(input_ids=ids).logits[:, n:]
        from_original = forward(gemma, original, input_ids=ids[:, n:], use_cache=True).logits
        from_loaded = forward(gemma, loaded, input_ids=ids[:, n:], use_cache=True).logits
    torch.testing.assert_close(from_original, single, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(from_loaded, from_original, rtol=0, atol=0)
    # the continued caches keep the same layout as each other
    assert [k.shape for k, _ in cache_to_layers(loaded)] == [k.shape for k, _ in cache_to_layers(original)]


def test_load_rejects_sidecar_with_other_layer_lengths(gemma, tmp_path):
    path = tmp_path / "c.safetensors"
    save_kv_cache(_prefill(gemma, _ids(30)), str(path))
    sidecar = tmp_path / "c.safetensors.metadata.json"
    d = json.loads(sidecar.read_text())
    d["layer_seq_lens"] = [7, 7, 6, 30]
    sidecar.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"layer_seq_lens is \[7, 7, 6, 30\] but .* holds \[7, 7, 7, 30\]"):
        load_kv_cache(str(path))
    d["layer_seq_lens"] = [7, 7, 7, 31]
    sidecar.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"layer_seq_lens must be a list of num_layers \(4\) integers in \[0, seq_len = 30\]"):
        load_kv_cache(str(path))


@pytest.mark.parametrize(
    "lengths, seq_len, windows, message",
    [
        ([7, 30], 20, None, "layer 1 holds 30 tokens, more than seq_len 20"),
        ([5, 30], 30, [8, None], "layer 0 holds 5 of 30 tokens, which a sliding window of 8 cannot keep"),
        ([7, 30], 30, [1, None], "sliding window must be an integer >= 2, got 1"),
    ],
    ids=["longer-than-seq", "window-contradicts", "window-too-small"],
)
def test_layers_to_cache_rejects_impossible_layouts(lengths, seq_len, windows, message):
    layers = [(torch.zeros(1, 1, n, 4), torch.zeros(1, 1, n, 4)) for n in lengths]
    with pytest.raises(ValueError, match=message):
        layers_to_cache(layers, seq_len=seq_len, sliding_windows=windows)


@pytest.mark.parametrize("group_size", [32, 64, 128], ids=lambda g: f"G{g}")
def test_kv_compress_keeps_per_layer_shapes(gemma, kv_compress_bin, tmp_path, group_size):
    n = 30
    ids = _ids(n + 6, batch=2)
    original = _prefill(gemma, ids[:, :n])
    layers = cache_to_layers(original)
    recon, metrics = roundtrip_kv_cache(original, str(tmp_path), group_size=group_size)
    recon_layers = cache_to_layers(recon)
    assert [k.shape for k, _ in recon_layers] == [k.shape for k, _ in layers]
    assert [k.shape[2] for k, _ in recon_layers] == [7, 7, 7, n]
    assert metrics.codec["group_size"] == group_size
    assert cache_token_counts(recon) == [n] * LAYERS
    for (k, v), (rk, rv) in zip(layers, recon_layers):
        for x, y in ((k, rk), (v, rv)):
            snr = 10 * math.log10(x.pow(2).sum().item() / (x - y).pow(2).sum().item())
            assert snr > 10, f"SNR {snr:.1f} dB"
    meta = metadata_from_cache(recon)
    assert meta.seq_len == n and meta.layer_lengths == [7, 7, 7, n]
    with torch.no_grad():
        logits = forward(gemma, recon, input_ids=ids[:, n:], use_cache=True).logits
    assert torch.isfinite(logits).all()


def test_protocol_baseline_matches_plain_sliding_pass(gemma, kv_compress_bin):
    # context 24 > window 8: the prefill's sliding layers hold 7 tokens, the full layer 24
    token_ids = _ids(200)[0]
    windows, starts = make_windows(token_ids, 32, 8, 6)
    outcome = run_protocol(gemma, windows, 8, starts=starts, batch_windows=4, group_size=64)
    plain = plain_window_nlls(gemma, windows, 8)
    got = torch.tensor([w.nll_baseline for w in outcome.windows], dtype=torch.float64)
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-4)
    assert all(math.isfinite(w.nll_compressed) for w in outcome.windows)
    assert outcome.layer_seq_lens == [WINDOW - 1] * (LAYERS - 1) + [24]
    assert outcome.kl_divergence >= 0 and 0 <= outcome.top1_agreement <= 1
    diag = outcome.diagnostics
    assert diag is not None and diag.key_signal.shape == (LAYERS, 1)
