"""Per-layer token selection: layers that keep different numbers of positions.

The scoring passes over such a cache run under ``validation.compat.selected_attention``
(each layer masked by its own length); they are checked against one forward pass without a
cache whose attention hides, per layer and per KV head, the positions that layer dropped.
Then the pieces the auto-tuner builds on: the per-layer counts, the preset's ``selection``
section, the binary's round trip, the selection sensitivity and the joint allocation.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch

from validation.autotune import allocate as al
from validation.selection_preset import preset_selection
from validation.autotune.sensitivity import measure_selection_sensitivity
from validation.autotune.space import ROLES, SizeTable, default_space
from validation.compat import (
    SELECTED_ATTR,
    cache_to_layers,
    forward,
    layers_to_cache,
    output_cache,
    selected_attention,
    transformers_version,
)
from validation.selection import (
    SelectionSpec,
    capture_window_queries,
    rank_cache,
    select_cache,
    select_ranked,
)

VOCAB = 256


def llama(layers: int = 3, kv_heads: int = 2, head_dim: int = 32, attn: str = "sdpa", seed: int = 0):
    """A random float32 Llama (GQA 2:1) whose attention is sharp enough for selection to matter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=2 * kv_heads * head_dim, intermediate_size=96,
                         num_hidden_layers=layers, num_attention_heads=2 * kv_heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, max_position_embeddings=512, attn_implementation=attn)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6)
    return model


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, length), generator=g)


def prefill(model, x: torch.Tensor, window: int = 8):
    """The cache layers of ``x`` [batch, context] and each layer's attention ranking (best first)."""
    with torch.inference_mode(), capture_window_queries(model, window) as queries:
        out = model(input_ids=x, use_cache=True)
    layers = cache_to_layers(output_cache(out))
    from validation.selection import attention_scaling

    orders = rank_cache(layers, "attention", window, queries, attention_scaling(model))[0]
    return layers, orders


def masked_reference_logits(model, x: torch.Tensor, context: int, positions: List[torch.Tensor]) -> torch.Tensor:
    """Logits [batch, scored, vocab] of the scored tokens x[:, context:] from ONE forward without a
    cache, whose layer ``l`` lets a scored token see only ``positions[l]`` [batch, kv_heads, kept] of
    the context (for its query head's KV head) and the scored tokens up to itself."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, length = x.shape
    heads = model.config.num_attention_heads
    group = heads // positions[0].shape[1]
    masks = []
    for p in positions:
        allowed = torch.ones(b, heads, length, length, dtype=torch.bool).tril()
        keep = torch.zeros(b, heads, context, dtype=torch.bool)
        keep.scatter_(2, p.repeat_interleave(group, dim=1), True)
        allowed[:, :, context:, :context] = keep[:, :, None, :]
        masks.append(allowed)

    def attend(module, query, key, value, attention_mask, **kw):
        kw.pop("is_causal", None)
        return sdpa_attention_forward(module, query, key, value, masks[module.layer_idx], is_causal=False, **kw)

    AttentionInterface.register("test_layer_masks", attend)
    before = model.config._attn_implementation
    model.config._attn_implementation = "test_layer_masks"
    try:
        with torch.inference_mode():
            return model(input_ids=x, use_cache=False).logits[:, context:]
    finally:
        model.config._attn_implementation = before


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_layers_of_different_lengths_score_as_the_masked_full_pass(attn: str) -> None:
    """Scoring after a cache whose layers keep 100%, 50% and 25% of the context equals one forward
    that hides exactly those positions per layer and head; the model's own mask (built from layer
    0's length) would not, so the cache must carry its mark."""
    model = llama(attn=attn)
    context, scored = 40, 10
    x = ids(2, context + scored, seed=3)
    layers, orders = prefill(model, x[:, :context])
    sel = select_ranked(layers, orders, SelectionSpec("attention", layer_keep_ratios=(1.0, 0.5, 0.25)))
    assert [k.shape[2] for k, _ in sel.layers] == [40, 20, 16]  # 0.25 x 40 = 10, raised to min_tokens 16
    pos = {"position_ids": torch.arange(context, context + scored)[None]}
    if transformers_version() < (4, 48):  # no AttentionInterface: a clear refusal, never a wrong mask
        with torch.inference_mode(), pytest.raises(ValueError, match=r"need transformers >= 4.48 \(AttentionInterface\)"):
            forward(model, layers_to_cache(sel.layers, selected=True), input_ids=x[:, context:], use_cache=True, **pos)
        return
    with torch.inference_mode():
        got = forward(model, layers_to_cache(sel.layers, selected=True), input_ids=x[:, context:], use_cache=True, **pos).logits
    want = masked_reference_logits(model, x, context, sel.positions)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert model.config._attn_implementation == attn, "the attention implementation is restored after the pass"
    unmarked = layers_to_cache(sel.layers, selected=True)
    delattr(unmarked, SELECTED_ATTR)
    with torch.inference_mode(), pytest.raises(Exception):
        forward(model, unmarked, input_ids=x[:, context:], use_cache=True, **pos)


def test_selected_attention_refuses_what_it_cannot_mask() -> None:
    model = llama(attn="sdpa")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match=r"attn_implementation one of \['sdpa', 'eager'\], got 'flex_attention'"):
        with selected_attention(model):
            pass
    assert model.config._attn_implementation == "flex_attention"


def test_equal_lengths_take_the_model_own_path() -> None:
    """A selected cache whose layers all keep the same count scores exactly as before (no custom attention)."""
    model = llama()
    context, scored = 32, 6
    x = ids(1, context + scored, seed=4)
    layers, orders = prefill(model, x[:, :context])
    spec = SelectionSpec("attention", keep_ratio=0.5)
    a = select_ranked(layers, orders, spec)
    b = select_ranked(layers, orders, SelectionSpec("attention", layer_keep_ratios=(0.5, 0.5, 0.5)))
    assert all(torch.equal(p, q) for p, q in zip(a.positions, b.positions))
    pos = {"position_ids": torch.arange(context, context + scored)[None]}
    with torch.inference_mode():
        plain = forward(model, layers_to_cache(a.layers), input_ids=x[:, context:], use_cache=True, **pos).logits
        marked = forward(model, layers_to_cache(b.layers, selected=True), input_ids=x[:, context:], use_cache=True, **pos).logits
    assert torch.equal(plain, marked)


def test_select_cache_counts_per_layer_and_reports_them() -> None:
    model = llama()
    x = ids(2, 48, seed=5)
    with torch.inference_mode(), capture_window_queries(model, 8) as queries:
        layers = cache_to_layers(output_cache(model(input_ids=x, use_cache=True)))
    from validation.selection import attention_scaling

    sel = select_cache(layers, SelectionSpec("attention", layer_keep_ratios=(1.0, 0.75, 0.5)), queries,
                       attention_scaling(model))
    m = sel.metrics
    assert m.per_layer_tokens == [48, 36, 24] and m.tokens_kept == 36
    assert m.token_savings_fraction == pytest.approx(1 - 108 / 144)
    assert all(p.shape == (2, 2, n) for p, n in zip(sel.positions, m.per_layer_tokens))
    assert 0 < m.attention_coverage <= 1 and len(m.per_layer_coverage) == 3
    with pytest.raises(ValueError, match="layer_keep_ratios lists 2 ratios for a cache of 3 layers"):
        select_cache(layers, SelectionSpec("attention", layer_keep_ratios=(1.0, 0.5)), queries)


@pytest.mark.parametrize("ratios, needle", [
    ((), r"non-empty list of numbers in \(0, 1\], got \[\]"),
    ((1.0, 0.0), r"got \[1.0, 0.0\]"),
    ((1.5,), r"got \[1.5\]"),
], ids=["empty", "zero", "above-one"])
def test_layer_keep_ratios_errors_name_allowed_values(ratios, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        SelectionSpec("attention", layer_keep_ratios=ratios).check()
    with pytest.raises(ValueError, match="needs exactly one of keep_ratio"):
        SelectionSpec("attention", keep_ratio=0.5, layer_keep_ratios=(0.5,)).check()


def test_preset_selection_section(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"name": "t", "selection": {"method": "knorm", "keep_ratios": [1, 0.5], "window": 4}}))
    spec = preset_selection(str(path))
    assert spec.method == "knorm" and spec.layer_keep_ratios == (1, 0.5) and spec.window == 4 and spec.keep_ratio is None
    assert preset_selection("compact") is None and preset_selection(None) is None
    path.write_text(json.dumps({"name": "t"}))
    assert preset_selection(str(path)) is None
    path.write_text(json.dumps({"selection": {"method": "attention", "keep_ratio": 2}}))
    with pytest.raises(ValueError, match=r"p.json: selection: keep_ratio \(--keep-ratio\) must be in \(0, 1\], got 2"):
        preset_selection(str(path))
    path.write_text(json.dumps({"selection": {"method": "attention", "keep_ratio": 0.5, "ratio": 1}}))
    with pytest.raises(ValueError, match=r"selection must be an object with fields .* got \['keep_ratio', 'method', 'ratio'\]"):
        preset_selection(str(path))


def test_ragged_cache_round_trips_through_the_binary(kv_compress_bin: str, tmp_path: Path) -> None:
    """The binary keeps each layer's count and indices; the cache it gives back is marked selected."""
    from validation.compression_bridge import roundtrip_kv_cache

    model = llama(head_dim=64)  # the codec's value groups of 64 run along head_dim
    x = ids(2, 64, seed=6)
    layers, orders = prefill(model, x)
    sel = select_ranked(layers, orders, SelectionSpec("attention", layer_keep_ratios=(0.5, 1.0, 0.3)))
    recon, metrics = roundtrip_kv_cache(sel.layers, str(tmp_path), positions=sel.positions, context_length=64,
                                        preset="compact")
    back = cache_to_layers(recon)
    assert [k.shape[2] for k, _ in back] == [32, 64, 19] and getattr(recon, SELECTED_ATTR, False)
    assert metrics.compressed_size_bytes > 0


# -----------------------------------------------------------------------------
# the auto-tuner's pieces


def test_selection_sensitivity_is_zero_at_keep_one_and_grows_as_fewer_are_kept() -> None:
    model = llama(layers=2)
    context = 48
    x = ids(3, context + 8, seed=7)
    layers, orders = prefill(model, x[:, :context])
    kl = measure_selection_sensitivity(model, layers, orders, x[:, context:], [1.0, 0.75, 0.35], "attention")
    assert kl.shape == (3, 2) and np.all(kl[0] == 0) and np.all(np.isfinite(kl))
    assert np.all(kl[1:] > 0) and np.all(kl[2] > kl[1])
    # the one-layer pass equals a whole pass over a cache with only that layer cut
    from validation.autotune.sensitivity import kl_mean

    sel = select_ranked(layers, orders, SelectionSpec("attention", layer_keep_ratios=(1.0, 0.35)))
    pos = {"position_ids": torch.arange(context, context + 8)[None]}
    with torch.inference_mode():
        base = forward(model, layers_to_cache(layers), input_ids=x[:, context:], use_cache=True).logits
        cut = forward(model, layers_to_cache(sel.layers, selected=True), input_ids=x[:, context:], use_cache=True, **pos).logits
    assert kl_mean(torch.log_softmax(base.float(), -1), cut) == pytest.approx(kl[2, 1], rel=1e-3, abs=1e-7)


def _layer_tables(seed: int, layers: int = 3):
    rng = np.random.default_rng(seed)
    candidates = {"keys": default_space("keys", 64, bits=(2, 4))[:2], "values": default_space("values", 64, bits=(2, 4))[:2]}
    kl = {r: rng.uniform(0, 0.01, size=(2, layers)) for r in ROLES}
    sizes = SizeTable({r: rng.integers(100, 1000, size=(2, layers)).tolist() for r in ROLES}, 50, 10_000)
    ratios = [1.0, 0.5, 0.25]
    sel = np.vstack([np.zeros(layers), rng.uniform(0, 0.005, layers), rng.uniform(0.005, 0.02, layers)])
    return candidates, kl, sizes, ratios, sel


@pytest.mark.parametrize("seed", range(4), ids=lambda s: f"seed{s}")
def test_joint_allocation_is_the_optimum(seed: int) -> None:
    """Brute force over every (keep ratio, key, value) per layer: the knapsack finds the smallest plan within budget."""
    candidates, kl, sizes, ratios, sel = _layer_tables(seed)
    bitmap = 7
    budget = 0.02
    a = al.allocate_layers(kl, sel, ratios, sizes, candidates, budget, bitmap, resolution=20000)
    assert a is not None and a.keep is not None and al.predicted_kl(kl, a, sel, ratios) <= budget + 1e-12

    def size(keep: List[float], ck, cv) -> float:
        return sum(round(keep[i] * (sizes.bytes["keys"][ck[i]][i] + sizes.bytes["values"][cv[i]][i]))
                   + (bitmap if keep[i] < 1 else 0) for i in range(3))

    best = math.inf
    for keep in itertools.product(range(3), repeat=3):
        for ck in itertools.product(range(2), repeat=3):
            for cv in itertools.product(range(2), repeat=3):
                cost = sum(sel[keep[i], i] + kl["keys"][ck[i], i] + kl["values"][cv[i], i] for i in range(3))
                if cost <= budget:
                    best = min(best, size([ratios[k] for k in keep], ck, cv))
    got = size(a.keep, a.choice["keys"], a.choice["values"])
    assert got <= best * 1.02
    plain = al.allocate(kl, sizes, candidates, budget, resolution=20000)
    assert plain is None or got <= size([1.0] * 3, plain.choice["keys"], plain.choice["values"])
    assert sizes.total(a) == sizes.overhead + round(sum(a.keep[i] * sizes.bytes[r][a.choice[r][i]][i]
                                                        for r in ROLES for i in range(3)))


def test_snapkv_keeps_the_neighbours_of_a_peak() -> None:
    """snapkv averages each row's scores over 5 neighbours: a lone peak brings the positions beside it
    ahead of a flat shoulder elsewhere, where attention ranks the shoulder first."""
    from validation.selection import SNAPKV_KERNEL, rank_positions

    ctx, window = 40, 4
    scores = torch.full((1, 1, ctx), 0.01)
    scores[..., 10] = 0.5  # a peak with weak neighbours
    scores[..., 20:24] = 0.05  # a shoulder of moderate scores
    keys = torch.zeros(1, 1, ctx, 8)
    att = rank_positions("attention", keys, scores, window)[0, 0, window:window + 5].tolist()
    snap = rank_positions("snapkv", keys, scores, window)[0, 0, window:window + 5].tolist()
    assert att[0] == 10 and set(att[1:5]) == {20, 21, 22, 23}
    assert SNAPKV_KERNEL == 5 and set(snap) == {8, 9, 10, 11, 12}
    with pytest.raises(ValueError, match="selection 'snapkv' needs the observation window's queries"):
        rank_positions("snapkv", keys, None, window)

