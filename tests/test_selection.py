"""Token selection (validation/selection.py): scoring, counts, metrics, and true positions.

The window-attention scores are checked against eager attention's own weights; a selected
cache scored with explicit position ids is checked against one full forward pass whose
attention mask hides the dropped positions; keep-all selection must give exactly the
numbers of no selection through the real binary; one window of the protocol is recomputed
by hand (prefill, gather, kv-compress round trip, forward with position ids).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from validation import protocol
from validation.compat import cache_to_layers, forward, layers_to_cache, output_cache
from validation.compression_bridge import roundtrip_kv_cache
from validation.options import ValidationError, ValidationOptions
from validation.selection import (
    SELECTION_METHODS,
    SelectionSpec,
    attention_scaling,
    capture_window_queries,
    estimate_savings,
    select_cache,
    select_tokens,
    validate_quality,
    window_attention,
)

VOCAB = 256


def eager_llama(layers: int = 2, kv_heads: int = 2, head_dim: int = 64, seed: int = 0):
    """A random float32 Llama (GQA 2:1) with eager attention, so it can return attention weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=2 * kv_heads * head_dim, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=2 * kv_heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, max_position_embeddings=1024, attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    # Sharper attention than a random init gives, so that selection matters.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6)
    return model


@pytest.fixture(scope="module")
def model():
    return eager_llama()


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, length), generator=g)


def test_window_queries_match_eager_attention(model) -> None:
    """The captured queries (q_proj + RoPE by hook) give eager attention's weights for the window's rows."""
    x = ids(2, 40)
    window = 8
    with torch.inference_mode(), capture_window_queries(model, window) as queries:
        out = model(input_ids=x, use_cache=True, output_attentions=True)
    layers = cache_to_layers(output_cache(out))
    assert sorted(queries) == list(range(len(layers)))
    for i, (k, _) in enumerate(layers):
        probs = window_attention(k, queries[i], attention_scaling(model))
        want = out.attentions[i][:, :, -window:, :].float()
        assert probs.shape == want.shape == (2, 4, window, 40)
        torch.testing.assert_close(probs, want, atol=2e-6, rtol=1e-4)


def masked_full_forward_logits(model, x: torch.Tensor, context: int, positions) -> torch.Tensor:
    """Logits of tokens context..end-1 from ONE forward over x [1, length] (no cache) whose mask lets
    those tokens see only the kept context positions of each head (and the scored tokens up to
    themselves); context tokens see the whole causal context, as in a prefill."""
    length = x.shape[1]
    kv_heads = positions[0].shape[1]
    heads = model.config.num_attention_heads
    logits = []
    # One KV head's kept set differs from another's: a per-layer, per-head mask needs one pass per layer
    # set; with a shared mask per head the model takes a [1, heads, q, k] additive mask for all layers,
    # so the test keeps the same positions in every layer (checked below).
    assert all(torch.equal(p, positions[0]) for p in positions)
    allowed = torch.ones(heads, length, length).tril().bool()
    for h in range(heads):
        keep = torch.zeros(context, dtype=torch.bool)
        keep[positions[0][0, h // (heads // kv_heads)]] = True
        allowed[h, context:, :context] = keep
    mask = torch.zeros(1, heads, length, length).masked_fill(~allowed[None], torch.finfo(torch.float32).min)
    with torch.inference_mode():
        logits = model(input_ids=x, attention_mask=mask, use_cache=False).logits
    return logits[0, context:]


def test_selected_cache_scoring_matches_masked_full_forward(model) -> None:
    """Scoring after a shorter cache with position ids = context + arange gives the logits of the
    full model whose mask hides the dropped positions: the positions stay true."""
    context, scored = 48, 12
    x = ids(1, context + scored, seed=3)
    with torch.inference_mode():
        pre = model(input_ids=x[:, :context], use_cache=True)
        layers = cache_to_layers(output_cache(pre))
        # the same positions in every layer (see masked_full_forward_logits): rank by layer 0's key norm
        sel0 = select_cache(layers[:1], SelectionSpec("knorm", keep_ratio=0.5))
        idx = sel0.positions[0]
        cut = [(torch.gather(k, 2, idx[..., None].expand(-1, -1, -1, k.shape[-1])),
                torch.gather(v, 2, idx[..., None].expand(-1, -1, -1, v.shape[-1]))) for k, v in layers]
        pos = torch.arange(context, context + scored)[None]
        got = forward(model, layers_to_cache(cut), input_ids=x[:, context:], position_ids=pos, use_cache=True).logits[0]
        wrong = forward(model, layers_to_cache(cut), input_ids=x[:, context:], use_cache=True).logits[0]
    want = masked_full_forward_logits(model, x, context, [idx] * len(layers))
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert (wrong - want).abs().max() > 1e-2, "without position ids the scored tokens would sit at the wrong positions"


def windows_for(length: int, stride: int, count: int, seed: int = 5):
    x = ids(1, (count - 1) * stride + length, seed=seed)[0]
    return protocol.make_windows(x, length, stride)


@pytest.mark.parametrize("method", SELECTION_METHODS)
def test_keep_all_gives_exactly_no_selection(kv_compress_bin: str, model, method: str) -> None:
    """Selection that keeps every position: the same NLL, KL and top-1 as no selection, bit for bit."""
    windows, starts = windows_for(64, 16, 3)
    plain = protocol.run_protocol(model, windows, 16, starts=starts, batch_windows=2)
    kept = protocol.run_protocol(model, windows, 16, starts=starts, batch_windows=2,
                                 selection=SelectionSpec(method, keep_ratio=1.0))
    assert [w.nll_compressed for w in kept.windows] == [w.nll_compressed for w in plain.windows]
    assert [w.kl_sum for w in kept.windows] == [w.kl_sum for w in plain.windows]
    assert [w.top1_matches for w in kept.windows] == [w.top1_matches for w in plain.windows]
    sel = kept.metrics[0].extra["selection"]
    assert sel["tokens_kept"] == 48 and sel["token_savings"] == 0
    assert sel["attention_coverage"] == pytest.approx(1.0, abs=1e-5) and sel["information_loss"] < 1e-5


def test_one_window_recomputed_by_hand(kv_compress_bin: str, model, tmp_path: Path) -> None:
    """The protocol's compressed NLL of one window equals: unmodified prefill, queries of the last
    32 context tokens, positions chosen, cache gathered by hand, kv-compress round trip, forward
    with explicit position ids."""
    windows, starts = windows_for(96, 32, 1, seed=9)
    spec = SelectionSpec("attention", keep_ratio=0.4, window=32)
    outcome = protocol.run_protocol(model, windows, 32, starts=starts, batch_windows=1, selection=spec)
    context = 64
    x = windows[:1]
    with torch.inference_mode():
        with capture_window_queries(model, 32) as queries:
            pre = model(input_ids=x[:, :context], use_cache=True)
        layers = cache_to_layers(output_cache(pre))
        positions = select_cache(layers, spec, queries, attention_scaling(model)).positions
        cut = []
        for (k, v), p in zip(layers, positions):
            assert p.shape == (1, 2, round(0.4 * context)) and bool((p.diff(dim=-1) > 0).all())
            cut.append((torch.stack([k[0, h, p[0, h]] for h in range(2)])[None],
                        torch.stack([v[0, h, p[0, h]] for h in range(2)])[None]))
        recon, metrics = roundtrip_kv_cache(layers_to_cache(cut), str(tmp_path), positions=positions,
                                            context_length=context)
        logits = forward(model, recon, input_ids=x[:, context:-1], use_cache=True,
                         position_ids=torch.arange(context, 95)[None]).logits[0]
        first = pre.logits[0, -1]
    labels = x[0, context:]
    nll = -torch.log_softmax(first.float(), -1)[labels[0]].double().item()
    nll -= torch.log_softmax(logits.float(), -1).gather(-1, labels[1:, None]).double().sum().item()
    assert outcome.windows[0].nll_compressed == pytest.approx(nll, rel=1e-6)
    assert outcome.windows[0].nll_compressed != pytest.approx(outcome.windows[0].nll_baseline, rel=1e-6)
    assert metrics.disk_ratio_vs_fp16 < outcome.metrics[0].disk_ratio_vs_fp16  # the full cache's float16 is larger


def test_threshold_reaches_its_coverage_in_every_row(model) -> None:
    with torch.inference_mode(), capture_window_queries(model, 16) as queries:
        out = model(input_ids=ids(2, 80, seed=4), use_cache=True)
    layers = cache_to_layers(output_cache(out))
    scaling = attention_scaling(model)
    coverages = []
    for t in (0.5, 0.8, 0.95):
        sel = select_cache(layers, SelectionSpec("attention", attention_threshold=t, min_tokens=1, window=16), queries, scaling)
        m = sel.metrics
        assert m.tokens_kept == max(m.threshold_tokens) and len(m.threshold_tokens) == len(layers)
        assert 1 <= m.threshold_tokens_median_row <= m.tokens_kept
        assert m.attention_coverage_min >= t - 1e-5
        assert 0 <= m.information_loss <= 1 and m.token_savings == 80 - m.tokens_kept
        assert all(p.shape[-1] == m.tokens_kept for p in sel.positions)
        coverages.append(m.attention_coverage)
    assert coverages == sorted(coverages)
    # at the same count, attention keeps more attention than the query-free baselines
    n = select_cache(layers, SelectionSpec("attention", attention_threshold=0.8, min_tokens=1, window=16), queries,
                     scaling).metrics.tokens_kept
    cov = {m: select_cache(layers, SelectionSpec(m, keep_ratio=n / 80, min_tokens=1, window=16), queries,
                           scaling).metrics.attention_coverage for m in SELECTION_METHODS}
    assert cov["attention"] > cov["knorm"] and cov["attention"] > cov["recent"]


def test_recent_keeps_sinks_and_tail_and_knorm_the_smallest_keys() -> None:
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 2, 20, 8, generator=g), torch.randn(1, 2, 20, 8, generator=g)
    r = select_tokens(k, v, method="recent", keep_ratio=0.5, min_tokens=1)
    assert r.indices[0, 0].tolist() == [0, 1, 2, 3, 14, 15, 16, 17, 18, 19]
    assert torch.equal(r.keys, k[:, :, r.indices[0, 0]])
    kn = select_tokens(k, v, method="knorm", keep_ratio=0.25, min_tokens=1)
    norms = k.norm(dim=-1)
    for h in range(2):
        assert set(kn.indices[0, h].tolist()) == set(norms[0, h].argsort()[:5].tolist())
    assert math.isnan(kn.metrics.attention_coverage)
    flat = select_tokens(k[0, 0], v[0, 0], torch.randn(4, 8, generator=g), attention_threshold=0.9, min_tokens=2)
    assert flat.indices.dim() == 1 and flat.keys.shape == (flat.metrics.tokens_kept, 8)


@pytest.mark.parametrize("spec, message", [
    (SelectionSpec("snap", keep_ratio=0.5), r"must be one of \['attention', 'knorm', 'recent', 'snapkv'\], got 'snap'"),
    (SelectionSpec("knorm"), r"needs exactly one of keep_ratio"),
    (SelectionSpec("attention", keep_ratio=0.5, attention_threshold=0.9), r"needs exactly one of keep_ratio"),
    (SelectionSpec("recent", attention_threshold=0.9), r"applies to selection 'attention' only, got selection 'recent'"),
    (SelectionSpec("knorm", keep_ratio=1.5), r"keep_ratio \(--keep-ratio\) must be in \(0, 1\], got 1.5"),
    (SelectionSpec("attention", attention_threshold=0.0), r"must be in \(0, 1\], got 0.0"),
    (SelectionSpec("knorm", keep_ratio=0.5, min_tokens=0), r"min_tokens \(--min-tokens\) must be an integer >= 1, got 0"),
    (SelectionSpec("knorm", keep_ratio=0.5, min_tokens=8, max_tokens=4), r"max_tokens .* >= min_tokens \(8\), got 4"),
], ids=["unknown-method", "no-count", "both-counts", "threshold-on-recent", "ratio-above-1", "threshold-0",
        "min-0", "max-below-min"])
def test_spec_errors_name_allowed_values(spec: SelectionSpec, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spec.check()


def test_options_refuse_selection_flags_without_selection() -> None:
    with pytest.raises(ValidationError, match=r"\['--keep-ratio'\] need --selection, one of"):
        ValidationOptions(keep_ratio=0.5).check()
    with pytest.raises(ValidationError, match=r"got 'top'"):
        ValidationOptions(selection="top", keep_ratio=0.5).check()
    ValidationOptions(selection="recent", keep_ratio=0.5, min_tokens=4).check()


def test_estimate_savings_and_validate_quality() -> None:
    est = estimate_savings(30, 3, 64, 768, keep_ratio=0.5, bits_per_element=3.6)
    assert est["tokens_kept"] == 384 and est["token_savings"] == 384
    full = 2 * 30 * 3 * 768 * 64 * 2
    assert est["fp16_bytes"] == full
    assert est["ratio_vs_fp16"] == pytest.approx(full / (2 * 90 * 384 * 64 * 3.6 / 8 + 90 * 96))
    assert 0.88 < est["bandwidth_savings"] < 0.9
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\], got 0"):
        estimate_savings(1, 1, 64, 10, keep_ratio=0)
    g = torch.Generator().manual_seed(1)
    k, v, q = (torch.randn(1, 1, 64, 16, generator=g) * 3 for _ in range(3))
    good = validate_quality(select_tokens(k, v, q[:, :, -8:], keep_ratio=1.0, min_tokens=1).metrics)
    assert good.passed and not good.warnings and good.attention_coverage == pytest.approx(1.0, abs=1e-5)
    bad = validate_quality(select_tokens(k, v, q[:, :, -8:], method="recent", keep_ratio=0.1, min_tokens=1).metrics)
    assert not bad.passed and bad.warnings and bad.recommendations
    assert any("selection 'attention'" in r for r in bad.recommendations)


@pytest.mark.parametrize("argv, message", [
    (["--selection", "h2o", "--keep-ratio", "0.5"],
     r"argument --selection: invalid choice: 'h2o' \(choose from '?attention'?, '?knorm'?, '?recent'?, '?snapkv'?\)"),
    (["--keep-ratio", "0.5"], r"\['--keep-ratio'\] need --selection, one of \['attention', 'knorm', 'recent', 'snapkv'\]"),
    (["--selection", "knorm"], r"needs exactly one of keep_ratio \(--keep-ratio\), attention_threshold \(--attention-threshold\) or layer_keep_ratios"),
    (["--selection", "recent", "--attention-threshold", "0.9"], r"applies to selection 'attention' only, got selection 'recent'"),
    (["--selection", "attention", "--keep-ratio", "0"], r"keep_ratio \(--keep-ratio\) must be in \(0, 1\], got 0.0"),
    (["--selection", "attention", "--keep-ratio", "0.5", "--sweep"], r"--selection attention applies to a validation run"),
], ids=["unknown-method", "ratio-without-selection", "no-count", "threshold-with-recent", "ratio-zero", "with-sweep"])
def test_cli_selection_errors_exit_2_with_one_line(capsys, argv: list, message: str) -> None:
    """Bad selection flags stop before any model loads: exit 2, one line naming the allowed values."""
    import re

    from validation.cli import main

    try:
        status = main(argv)
    except SystemExit as e:  # argparse
        status = e.code
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and re.search(message, err[0]), err


def test_positions_files_round_trip_and_refuse_bad_indices(kv_compress_bin: str, tmp_path: Path) -> None:
    """save_kv_cache writes the indices and context length that kv-compress keeps and read_positions
    returns; a file whose indices are unsorted or out of range is refused by both sides."""
    from safetensors.torch import save_file

    from validation.compression_bridge import KVCompressError, compress_kv_cache, decompress_kv_cache
    from validation.kv_cache_utils import load_kv_cache, read_positions, save_kv_cache

    g = torch.Generator().manual_seed(2)
    layers = [(torch.randn(1, 2, 6, 64, generator=g).half(), torch.randn(1, 2, 6, 64, generator=g).half()) for _ in range(2)]
    pos = [torch.tensor([[[0, 2, 3, 5, 8, 9], [1, 2, 4, 6, 7, 9]]])] * 2
    src, packed, back = tmp_path / "sel.safetensors", tmp_path / "sel.kvc", tmp_path / "back.safetensors"
    save_kv_cache(layers, str(src), positions=pos, context_length=10)
    assert [p.tolist() for p in read_positions(str(src))[0]] == [p.tolist() for p in pos]
    compress_kv_cache(str(src), str(packed))
    decompress_kv_cache(str(packed), str(back))
    restored, ctx = read_positions(str(back))
    assert ctx == 10 and all(torch.equal(a, b) for a, b in zip(restored, pos))
    cache, meta = load_kv_cache(str(back))
    assert meta.seq_len == 6 and meta.num_layers == 2
    save_kv_cache(layers, str(tmp_path / "plain.safetensors"))
    assert read_positions(str(tmp_path / "plain.safetensors")) == ([], None)

    bad = {f"layer_{i}_{kind}": t.contiguous() for i, (k, v) in enumerate(layers) for kind, t in (("key", k), ("value", v))}
    for name, rows in (("unsorted", [[0, 3, 2, 5, 8, 9], [1, 2, 4, 6, 7, 9]]), ("range", [[0, 2, 3, 5, 8, 10], [1, 2, 4, 6, 7, 9]])):
        for i in range(2):
            bad[f"layer_{i}_positions"] = torch.tensor([rows], dtype=torch.int32)
        path = tmp_path / f"{name}.safetensors"
        save_file(bad, str(path), metadata={"context_length": "10"})
        with pytest.raises(ValueError, match=r"strictly increasing indices in \[0, 10\)"):
            read_positions(str(path))
        with pytest.raises(KVCompressError, match="exited with status 3"):
            compress_kv_cache(str(path), str(tmp_path / f"{name}.kvc"))
