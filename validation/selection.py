"""Token selection after the prefill: keep a subset of the context positions of every layer.

Three scorers decide which positions of a prefilled cache survive (docs/perplexity-protocol.md,
"Token selection"):

* ``attention`` (SnapKV's idea with seed 002's rule): the queries of an *observation window*, the
  last ``window`` context tokens, attend to every context position; the attention of the query
  heads of a GQA group is summed onto their KV head and averaged over the window, a distribution
  over the context per (window, KV head). The window's own positions are always kept, then the
  rest by attention. With ``attention_threshold`` the positions are taken in that order until
  their cumulative attention reaches the threshold, bounded by ``min_tokens`` and ``max_tokens``.
* ``knorm``: the positions whose keys have the lowest L2 norm (a query-free baseline).
* ``recent`` (StreamingLLM): the first ``sink_tokens`` (4) positions plus the most recent ones.

With ``keep_ratio R`` every method keeps ``round(R × context)`` positions. Every row (window,
layer, KV head) keeps the same count, so the cache stays rectangular and one causal mask serves
every layer: with a threshold, the count is the largest any row of any layer needs. Kept indices
are sorted, so the kept keys stay in their original order; they already carry their RoPE phases,
and the tokens scored afterwards take position ids that continue from the original context length.

How the queries are obtained: a forward pre-hook on every attention module records, during the
one prefill the protocol runs anyway, the hidden states of the window's tokens and the RoPE
``position_embeddings`` the model passes in; the queries are recomputed from them with the
module's own ``q_proj`` (and ``q_norm`` where the model has one) and its modeling file's
``apply_rotary_pos_emb``. This costs ``window`` rows of one projection per layer and no second
forward pass, and it works with whatever attention kernel runs the model (sdpa included), where
``output_attentions`` would need the eager kernel and materialize context² weights per layer.
``tests/test_selection.py`` checks the result against eager attention's own weights.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

SELECTION_METHODS = ("attention", "knorm", "recent", "snapkv")
# The methods that rank by the observation window's attention (they need its queries).
QUERY_METHODS = ("attention", "snapkv")
# snapkv smooths each row's attention scores over this many neighbouring positions (SnapKV's
# pooling, kvpress's SnapKVPress default), so that a kept position brings its neighbours: a
# span such as a five-digit number survives as a whole.
SNAPKV_KERNEL = 5
DEFAULT_WINDOW = 32
DEFAULT_MIN_TOKENS = 16
SINK_TOKENS = 4

KVLayers = List[Tuple[torch.Tensor, torch.Tensor]]


@dataclass
class SelectionSpec:
    """Which positions to keep: a method and either ``keep_ratio`` or ``attention_threshold``.

    ``keep_ratio`` in (0, 1]: keep ``round(keep_ratio × context)`` positions per row.
    ``layer_keep_ratios``: one such ratio per layer (layer 0 first), so that layers keep
    different counts (an auto-tuned preset's ``selection``; the scoring passes then mask each
    layer by its own length, ``validation.compat.selected_attention``).
    ``attention_threshold`` in (0, 1] (``attention`` only): keep until the cumulative attention
    reaches it. Every count is then bounded by ``min_tokens`` and ``max_tokens`` (None: the
    context length) and by the context length. ``window`` is the observation window in tokens.
    """

    method: str
    keep_ratio: Optional[float] = None
    attention_threshold: Optional[float] = None
    min_tokens: int = DEFAULT_MIN_TOKENS
    max_tokens: Optional[int] = None
    window: int = DEFAULT_WINDOW
    layer_keep_ratios: Optional[Tuple[float, ...]] = None

    def check(self) -> None:
        """Raise ValueError naming the allowed values and the value received."""
        if self.method not in SELECTION_METHODS:
            raise ValueError(f"selection (--selection) must be one of {list(SELECTION_METHODS)}, got {self.method!r}")
        given = [n for n in ("keep_ratio", "attention_threshold", "layer_keep_ratios") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"selection {self.method!r} needs exactly one of keep_ratio (--keep-ratio), "
                             f"attention_threshold (--attention-threshold) or layer_keep_ratios (a preset's "
                             f"selection.keep_ratios), got {given or 'none'}")
        if self.keep_ratio is not None and not (isinstance(self.keep_ratio, (int, float)) and 0 < self.keep_ratio <= 1):
            raise ValueError(f"keep_ratio (--keep-ratio) must be in (0, 1], got {self.keep_ratio!r}")
        if self.layer_keep_ratios is not None:
            bad = [r for r in self.layer_keep_ratios
                   if isinstance(r, bool) or not (isinstance(r, (int, float)) and 0 < r <= 1)]
            if bad or not self.layer_keep_ratios:
                raise ValueError(f"layer_keep_ratios must be a non-empty list of numbers in (0, 1], "
                                 f"got {list(self.layer_keep_ratios)}")
        if self.attention_threshold is not None:
            if self.method != "attention":
                raise ValueError(f"attention_threshold (--attention-threshold) applies to selection 'attention' only, got "
                                 f"selection {self.method!r}; use keep_ratio (--keep-ratio) with {list(SELECTION_METHODS[1:])}")
            if not 0 < self.attention_threshold <= 1:
                raise ValueError(f"attention_threshold (--attention-threshold) must be in (0, 1], got {self.attention_threshold!r}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 1:
            raise ValueError(f"min_tokens (--min-tokens) must be an integer >= 1, got {self.min_tokens!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < self.min_tokens):
            raise ValueError(f"max_tokens (--max-tokens) must be an integer >= min_tokens ({self.min_tokens}), "
                             f"got {self.max_tokens!r}")
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an integer >= 1, got {self.window!r}")

    def bound(self, count: int, context: int) -> int:
        """``count`` clamped to [min_tokens, max_tokens] and then to [1, context]."""
        hi = context if self.max_tokens is None else min(self.max_tokens, context)
        return max(1, min(max(count, self.min_tokens), hi))

    def ratio_count(self, context: int, layer: Optional[int] = None) -> int:
        """The kept count for ``keep_ratio`` (or ``layer_keep_ratios[layer]``): round(R × context),
        then bounded (Python's round: half to even)."""
        ratio = self.keep_ratio if self.layer_keep_ratios is None else self.layer_keep_ratios[layer if layer is not None else 0]
        return self.bound(round(ratio * context), context)

    def layer_counts(self, context: int, num_layers: int) -> List[int]:
        """The kept count of each layer for ``keep_ratio`` or ``layer_keep_ratios`` (ValueError
        when the latter does not list one ratio per layer)."""
        if self.layer_keep_ratios is None:
            return [self.ratio_count(context)] * num_layers
        if len(self.layer_keep_ratios) != num_layers:
            raise ValueError(f"layer_keep_ratios lists {len(self.layer_keep_ratios)} ratios for a cache of "
                             f"{num_layers} layers")
        return [self.ratio_count(context, i) for i in range(num_layers)]


@dataclass
class SelectionMetrics:
    """Seed 002's metrics of one selection, over every layer and row.

    ``attention_coverage``: mean over (layer, window, KV head) of the observation window's
    attention mass on the kept positions (NaN without queries); ``attention_coverage_min`` the
    smallest row's. ``information_loss``: relative L2 error of the window's attention output
    (all query heads, all layers) when it attends to the kept positions only (softmax
    renormalized over them) instead of the whole context (NaN without queries).
    ``bandwidth_savings``: 1 − (kept keys and values in the cache dtype + one bit per context
    position per row for the indices) / (the full keys and values), before any codec.
    ``threshold_tokens``: per layer, the count the threshold asked for (largest row), before
    the layers were made equal; ``threshold_tokens_median_row`` the median row's need.
    """

    method: str
    context_length: int
    tokens_kept: int
    token_savings: int
    token_savings_fraction: float
    attention_coverage: float
    attention_coverage_min: float
    information_loss: float
    bandwidth_savings: float
    per_layer_coverage: List[float] = field(default_factory=list)
    threshold_tokens: List[int] = field(default_factory=list)
    threshold_tokens_median_row: float = math.nan
    per_layer_tokens: List[int] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-serialisable dict."""
        return asdict(self)


@dataclass
class SelectionResult:
    """One layer's selection: sorted ``indices`` [batch, kv_heads, kept] (int64) and the gathered
    ``keys`` / ``values`` [batch, kv_heads, kept, head_dim]; ``metrics`` as for a whole cache."""

    indices: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    metrics: SelectionMetrics


@dataclass
class CacheSelection:
    """A whole cache's selection: per layer the kept (key, value) pairs [batch, kv_heads, kept,
    head_dim] and ``positions`` [batch, kv_heads, kept] (int64, sorted), plus the metrics."""

    layers: KVLayers
    positions: List[torch.Tensor]
    context_length: int
    metrics: SelectionMetrics

    def annotate(self, metrics: Any, full_layers: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Restate a kv-compress report of the selected cache against the FULL cache it came from.

        ``metrics`` (a CompressionMetrics) describes the shorter cache the binary saw. Afterwards
        ``fp16_size_bytes`` is float16 of the full keys and values, ``disk_ratio_vs_fp16`` that over
        the container's bytes (indices included), ``original_size_bytes`` the full cache as the
        bridge would have saved it, ``compression_ratio`` that over the container, and
        ``bits_per_element`` the codes, scales and index bitmaps per element of the full cache.
        The binary's own figures and the selection metrics go to ``metrics.extra["selection"]``.
        """
        self.annotate_counts(metrics, sum(k.numel() + v.numel() for k, v in full_layers), full_layers[0][0].dtype)

    def annotate_counts(self, metrics: Any, full_elems: int, dtype: torch.dtype) -> None:
        """:meth:`annotate` from the full cache's element count and dtype alone (its tensors need not be kept)."""
        kept_elems = sum(k.numel() + v.numel() for k, v in self.layers)
        stored = 4 if dtype == torch.bfloat16 else torch.empty((), dtype=dtype).element_size()
        extra = {**self.metrics.to_dict(), "selected_fp16_size_bytes": metrics.fp16_size_bytes,
                 "selected_original_size_bytes": metrics.original_size_bytes,
                 "selected_bits_per_element": metrics.bits_per_element,
                 "selected_disk_ratio_vs_fp16": metrics.disk_ratio_vs_fp16}
        index_bytes = int((metrics.bytes_by_part or {}).get("raw", 0))
        comp = metrics.compressed_size_bytes
        metrics.fp16_size_bytes = 2 * full_elems
        metrics.original_size_bytes = stored * full_elems
        if comp:
            metrics.disk_ratio_vs_fp16 = metrics.fp16_size_bytes / comp
            metrics.compression_ratio = metrics.original_size_bytes / comp
        if math.isfinite(metrics.bits_per_element):
            metrics.bits_per_element = (metrics.bits_per_element * kept_elems + 8 * index_bytes) / full_elems
            metrics.ratio_vs_fp16 = 16 / metrics.bits_per_element
        extra["disk_ratio_vs_fp16_full"] = metrics.disk_ratio_vs_fp16
        metrics.extra["selection"] = extra


# ---------------------------------------------------------------------------------------------
# Observation-window queries
# ---------------------------------------------------------------------------------------------

def _attention_modules(model: Any) -> List[Tuple[int, torch.nn.Module]]:
    """``(layer_idx, module)`` of every self-attention module that has a ``q_proj``, in layer order."""
    found = []
    for name, mod in model.named_modules():
        if hasattr(mod, "q_proj") and hasattr(mod, "layer_idx") and type(mod).__name__.endswith("Attention"):
            found.append((int(mod.layer_idx), mod))
    if not found:
        raise ValueError(f"{type(model).__name__} has no attention module with q_proj and layer_idx; "
                         f"selection 'attention' supports Llama-style models")
    return sorted(found, key=lambda p: p[0])


def _window_queries(mod: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The RoPE-rotated queries [batch, heads, w, head_dim] of ``hidden`` [batch, w, hidden] under ``mod``."""
    head_dim = getattr(mod, "head_dim", None) or mod.q_proj.out_features // mod.config.num_attention_heads
    q = mod.q_proj(hidden).view(hidden.shape[0], hidden.shape[1], -1, head_dim)
    if getattr(mod, "q_norm", None) is not None:
        q = mod.q_norm(q)
    q = q.transpose(1, 2)
    rotate = getattr(sys.modules[type(mod).__module__], "apply_rotary_pos_emb")
    q, _ = rotate(q, q, cos, sin)
    return q


@contextlib.contextmanager
def capture_window_queries(model: Any, window: int) -> Iterator[Dict[int, torch.Tensor]]:
    """Record, during the forward passes inside the ``with`` block, the observation window's queries.

    Yields a dict filled by the hooks: layer index → queries [batch, heads, w, head_dim] of the
    last ``w = min(window, tokens)`` tokens of the latest forward pass, RoPE applied, in the
    model's dtype. The hooks are removed on exit.
    """
    captured: Dict[int, torch.Tensor] = {}
    handles = []

    def hook(mod: torch.nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        pe = kwargs.get("position_embeddings")
        if hidden is None or pe is None:
            raise ValueError(f"{type(mod).__name__} was called without hidden_states or position_embeddings; "
                             f"selection 'attention' needs both")
        cos, sin = pe
        w = min(window, hidden.shape[1])
        captured[int(mod.layer_idx)] = _window_queries(mod, hidden[:, -w:], cos[:, -w:], sin[:, -w:]).detach()

    try:
        for _, mod in _attention_modules(model):
            handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
        yield captured
    finally:
        for h in handles:
            h.remove()


def window_attention(keys: torch.Tensor, queries: torch.Tensor, scaling: Optional[float] = None) -> torch.Tensor:
    """Causal attention probabilities of the window's queries over the context, in float32.

    ``keys`` [batch, kv_heads, context, head_dim] (RoPE applied, as in the cache); ``queries``
    [batch, heads, w, head_dim], the last ``w`` context positions. Query ``i`` sits at position
    ``context - w + i`` and sees positions up to it. ``scaling`` defaults to head_dim^-0.5.
    Returns [batch, heads, w, context]; each row sums to 1.
    """
    b, hkv, ctx, d = keys.shape
    heads, w = queries.shape[1], queries.shape[2]
    if heads % hkv:
        raise ValueError(f"{heads} query heads do not group onto {hkv} KV heads")
    scale = d ** -0.5 if scaling is None else scaling
    k = keys.float().repeat_interleave(heads // hkv, dim=1)  # [b, heads, ctx, d]
    logits = torch.matmul(queries.float(), k.transpose(-1, -2)) * scale
    pos = torch.arange(ctx, device=keys.device)
    qpos = torch.arange(ctx - w, ctx, device=keys.device)
    logits.masked_fill_(pos[None, :] > qpos[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1)


def kv_head_scores(probs: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[batch, heads, w, context] probabilities → [batch, kv_heads, context]: the query heads of a GQA
    group summed onto their KV head, averaged over the window and the group (each row sums to 1)."""
    b, heads, w, ctx = probs.shape
    return probs.view(b, kv_heads, heads // kv_heads, w, ctx).sum(dim=(2, 3)) / (heads // kv_heads * w)


# ---------------------------------------------------------------------------------------------
# Ranking and counting
# ---------------------------------------------------------------------------------------------

def rank_positions(method: str, keys: torch.Tensor, scores: Optional[torch.Tensor], window: int) -> torch.Tensor:
    """Positions of every row in the order they are kept: [batch, kv_heads, context] (int64).

    ``attention``: the last ``window`` positions first, then the others by decreasing ``scores``
    [batch, kv_heads, context]. ``snapkv``: the same with the scores first averaged over
    ``SNAPKV_KERNEL`` neighbouring positions. ``knorm``: by increasing key norm. ``recent``: the
    first ``SINK_TOKENS`` positions, then from the most recent backwards.
    """
    b, h, ctx, _ = keys.shape
    if method in QUERY_METHODS:
        if scores is None:
            raise ValueError(f"selection {method!r} needs the observation window's queries")
        prio = scores.float().clone()
        if method == "snapkv":
            prio = torch.nn.functional.avg_pool1d(prio.reshape(b * h, 1, ctx), SNAPKV_KERNEL, stride=1,
                                                  padding=SNAPKV_KERNEL // 2, count_include_pad=False).reshape(b, h, ctx)
        prio[..., ctx - min(window, ctx):] = float("inf")
        return torch.argsort(prio, dim=-1, descending=True, stable=True)
    if method == "knorm":
        return torch.argsort(keys.float().norm(dim=-1), dim=-1, stable=True)
    if method == "recent":
        sink = min(SINK_TOKENS, ctx)
        order = torch.cat([torch.arange(sink), torch.arange(ctx - 1, sink - 1, -1)]).to(keys.device)
        return order.expand(b, h, ctx)
    raise ValueError(f"selection must be one of {list(SELECTION_METHODS)}, got {method!r}")


def threshold_needs(order: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per row, the fewest leading positions of ``order`` whose ``scores`` sum to ``threshold``:
    [batch, kv_heads] (int64); ``order`` and ``scores`` are [batch, kv_heads, context]."""
    mass = torch.gather(scores.float(), -1, order).cumsum(-1)  # [b, h, ctx]
    reached = mass >= threshold - 1e-6
    full = torch.full_like(mass[..., 0], mass.shape[-1]).long()
    return torch.where(reached.any(-1), reached.float().argmax(-1).long() + 1, full)


def threshold_count(order: torch.Tensor, scores: torch.Tensor, threshold: float) -> int:
    """The fewest leading positions of ``order`` whose ``scores`` sum to ``threshold`` in every row."""
    return int(threshold_needs(order, scores, threshold).max().item())


def _information_loss(probs: torch.Tensor, values: torch.Tensor, idx: torch.Tensor) -> Tuple[float, float]:
    """(‖O − O_kept‖², ‖O‖²) of the window's attention output O [batch, heads, w, head_dim] when
    the probabilities [batch, heads, w, context] are restricted to ``idx`` [batch, kv_heads, kept]
    and renormalized."""
    hkv = values.shape[1]
    g = probs.shape[1] // hkv
    v = values.float().repeat_interleave(g, dim=1)
    full = torch.matmul(probs, v)
    qidx = idx.repeat_interleave(g, dim=1)  # [b, heads, kept]
    p = torch.gather(probs, -1, qidx[:, :, None, :].expand(-1, -1, probs.shape[2], -1))
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
    vk = torch.gather(v, 2, qidx[..., None].expand(-1, -1, -1, v.shape[-1]))
    kept = torch.matmul(p, vk)
    return float((full - kept).pow(2).sum()), float(full.pow(2).sum())


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t`` [batch, kv_heads, context, head_dim] at ``idx`` [batch, kv_heads, kept] → [..., kept, head_dim]."""
    return torch.gather(t, 2, idx[..., None].expand(-1, -1, -1, t.shape[-1])).contiguous()


# ---------------------------------------------------------------------------------------------
# Whole caches and the seed-002-style API
# ---------------------------------------------------------------------------------------------

def rank_cache(layers: Sequence[Tuple[torch.Tensor, torch.Tensor]], method: str, window: int,
               queries: Optional[Dict[int, torch.Tensor]] = None, scaling: Optional[float] = None
               ) -> Tuple[List[torch.Tensor], List[Optional[torch.Tensor]], List[Optional[torch.Tensor]]]:
    """Rank every layer's positions for ``method``: per layer the order [batch, kv_heads, context]
    (best first, :func:`rank_positions`), and, where ``queries`` has the layer, the window's
    attention probabilities and per-KV-head scores (None otherwise; ``attention`` requires them)."""
    probs: List[Optional[torch.Tensor]] = []
    scores: List[Optional[torch.Tensor]] = []
    orders: List[torch.Tensor] = []
    for i, (k, _) in enumerate(layers):
        q = None if queries is None else queries.get(i)
        if q is None and method in QUERY_METHODS:
            raise ValueError(f"selection {method!r} needs the window's queries of layer {i}")
        p = window_attention(k, q, scaling) if q is not None else None
        s = kv_head_scores(p, k.shape[1]) if p is not None else None
        probs.append(p)
        scores.append(s)
        orders.append(rank_positions(method, k, s, window))
    return orders, probs, scores


def select_cache(layers: Sequence[Tuple[torch.Tensor, torch.Tensor]], spec: SelectionSpec,
                 queries: Optional[Dict[int, torch.Tensor]] = None,
                 scaling: Optional[float] = None) -> CacheSelection:
    """Select the same number of positions in every row of every layer of a prefilled cache.

    ``layers``: [(key, value)] each [batch, kv_heads, context, head_dim]. ``queries``: layer →
    the window's queries [batch, heads, w, head_dim] (required for ``attention``; with the
    other methods they only feed the coverage and information-loss metrics). Returns the kept
    layers, the sorted positions per layer and the metrics.
    """
    spec.check()
    ctx = layers[0][0].shape[2]
    orders, probs, scores = rank_cache(layers, spec.method, spec.window, queries, scaling)
    per_layer: List[int] = []
    row_median = math.nan
    if spec.attention_threshold is not None:
        needs = [threshold_needs(o, s, spec.attention_threshold) for o, s in zip(orders, scores)]
        per_layer = [int(n.max()) for n in needs]
        row_median = float(torch.cat([n.flatten() for n in needs]).float().median())
        counts = [spec.bound(max(per_layer), ctx)] * len(layers)
    else:
        counts = spec.layer_counts(ctx, len(layers))
    kept_layers, positions = keep_top(layers, orders, counts)
    coverage: List[float] = []
    cov_min = math.inf
    loss_num = loss_den = 0.0
    for (_, v), idx, p, s in zip(layers, positions, probs, scores):
        if s is not None:
            row = torch.gather(s.float(), -1, idx).sum(-1)  # [b, h]
            coverage.append(float(row.mean()))
            cov_min = min(cov_min, float(row.min()))
            num, den = _information_loss(p, v, idx)
            loss_num, loss_den = loss_num + num, loss_den + den
    metrics = _count_metrics(spec.method, layers, counts)
    metrics.attention_coverage = sum(coverage) / len(coverage) if coverage else math.nan
    metrics.attention_coverage_min = cov_min if coverage else math.nan
    metrics.information_loss = math.sqrt(loss_num / loss_den) if loss_den > 0 else math.nan
    metrics.per_layer_coverage, metrics.threshold_tokens = coverage, per_layer
    metrics.threshold_tokens_median_row = row_median
    return CacheSelection(kept_layers, positions, ctx, metrics)


def _count_metrics(method: str, layers: Sequence[Tuple[torch.Tensor, torch.Tensor]], counts: Sequence[int]) -> SelectionMetrics:
    """The metrics that follow from the kept counts alone (coverage and loss NaN): ``tokens_kept``
    is the mean count over layers (``per_layer_tokens`` lists them)."""
    b, h, ctx, d = layers[0][0].shape
    size = layers[0][0].element_size()
    full = 2 * len(layers) * b * h * ctx * d * size
    sent = 2 * sum(counts) * b * h * d * size + len(layers) * b * h * math.ceil(ctx / 8)
    count = round(sum(counts) / len(counts))
    return SelectionMetrics(
        method=method, context_length=ctx, tokens_kept=count, token_savings=ctx - count,
        token_savings_fraction=1 - sum(counts) / (ctx * len(counts)), attention_coverage=math.nan,
        attention_coverage_min=math.nan, information_loss=math.nan, bandwidth_savings=1 - sent / full,
        per_layer_tokens=list(counts))


def keep_top(layers: Sequence[Tuple[torch.Tensor, torch.Tensor]], orders: Sequence[torch.Tensor],
             counts: Sequence[int]) -> Tuple[KVLayers, List[torch.Tensor]]:
    """Per layer, the first ``counts[i]`` positions of ``orders[i]`` [batch, kv_heads, context]
    (best first), sorted: the kept layers [batch, kv_heads, count, head_dim] and positions
    [batch, kv_heads, count] (int64)."""
    kept: KVLayers = []
    positions: List[torch.Tensor] = []
    for (k, v), o, n in zip(layers, orders, counts):
        idx = o[..., :n].sort(dim=-1).values
        positions.append(idx)
        kept.append((_gather(k, idx), _gather(v, idx)))
    return kept, positions


def select_ranked(layers: Sequence[Tuple[torch.Tensor, torch.Tensor]], orders: Sequence[torch.Tensor],
                  spec: SelectionSpec) -> CacheSelection:
    """:func:`select_cache` from rankings made earlier (``orders`` per layer [batch, kv_heads,
    context], :func:`rank_cache`): the counts of ``spec`` (``keep_ratio`` or ``layer_keep_ratios``).
    The metrics hold the counts and sizes; coverage and information loss are NaN (no queries)."""
    spec.check()
    if spec.attention_threshold is not None:
        raise ValueError("select_ranked takes keep_ratio or layer_keep_ratios, not attention_threshold")
    ctx = layers[0][0].shape[2]
    counts = spec.layer_counts(ctx, len(layers))
    kept, positions = keep_top(layers, orders, counts)
    return CacheSelection(kept, positions, ctx, _count_metrics(spec.method, layers, counts))


def attention_scaling(model: Any) -> Optional[float]:
    """The attention modules' softmax scale (``module.scaling``; None: head_dim^-0.5)."""
    try:
        mod = _attention_modules(model)[0][1]
    except ValueError:
        return None
    s = getattr(mod, "scaling", None)
    return float(s) if s is not None else None


def selected_prefill(model: Any, spec: Optional[SelectionSpec],
                     prefill: Callable[[], Any], rank_only: bool = False) -> Tuple[Any, Any]:
    """Run ``prefill()`` (it returns an object with ``layers``, [(key, value)] each [batch, kv_heads,
    context, head_dim]) and, with a ``spec``, select its positions; ``(prefill, None)`` without one.
    With ``rank_only`` the second item is the rankings of :func:`rank_cache` (per layer
    [batch, kv_heads, context], best first) instead of a selection.

    The observation window's queries are captured for every method when the model's attention
    modules allow it (they feed coverage and information loss); ``attention`` requires them.
    """
    if spec is None:
        return prefill(), None
    try:
        _attention_modules(model)
        capture: Any = capture_window_queries(model, spec.window)
    except ValueError:
        if spec.method in QUERY_METHODS:
            raise
        capture = contextlib.nullcontext(None)
    with capture as queries:
        pre = prefill()
    if rank_only:
        return pre, rank_cache(pre.layers, spec.method, spec.window, queries, attention_scaling(model))[0]
    return pre, select_cache(pre.layers, spec, queries, attention_scaling(model))


def selection_position_ids(spec: Optional[SelectionSpec], context: int, input_ids: torch.Tensor) -> Dict[str, Any]:
    """Forward keywords for tokens that follow a selected cache: ``position_ids`` [1, n] =
    context + arange(n) for ``input_ids`` [batch, n], so each scored token keeps its real
    position while the cache (and so the mask and cache positions) is shorter; {} without a spec."""
    if spec is None:
        return {}
    n = input_ids.shape[1]
    return {"position_ids": torch.arange(context, context + n, device=input_ids.device)[None]}


def _as4d(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dim() == 2:
        return t[None, None]
    if t.dim() != 4:
        raise ValueError(f"{what} must be [tokens, head_dim] or [batch, heads, tokens, head_dim], got shape {tuple(t.shape)}")
    return t


def select_tokens(keys: torch.Tensor, values: torch.Tensor, queries: Optional[torch.Tensor] = None,
                  attention_threshold: Optional[float] = 0.9, min_tokens: int = DEFAULT_MIN_TOKENS,
                  max_tokens: Optional[int] = None, *, method: str = "attention",
                  keep_ratio: Optional[float] = None, window: Optional[int] = None,
                  scaling: Optional[float] = None) -> SelectionResult:
    """Seed 002's ``compress(keys, values, queries, attention_threshold, min_tokens, max_tokens)`` for one layer.

    ``keys`` / ``values``: [batch, kv_heads, context, head_dim] or [context, head_dim];
    ``queries``: the observation window's queries [batch, heads, w, head_dim] or [w, head_dim]
    (RoPE applied, at the last ``w`` context positions; heads a multiple of kv_heads).
    ``keep_ratio`` (when given) replaces ``attention_threshold``. Returns the sorted kept
    indices [batch, kv_heads, kept], the kept keys and values and the metrics; with 2-D
    inputs the tensors come back 2-D ([kept] indices, [kept, head_dim] keys and values).
    """
    flat = keys.dim() == 2
    k4, v4 = _as4d(keys, "keys"), _as4d(values, "values")
    q4 = _as4d(queries, "queries") if queries is not None else None
    spec = SelectionSpec(method=method, keep_ratio=keep_ratio,
                         attention_threshold=None if keep_ratio is not None or method != "attention" else attention_threshold,
                         min_tokens=min_tokens, max_tokens=max_tokens,
                         window=window or (q4.shape[2] if q4 is not None else DEFAULT_WINDOW))
    sel = select_cache([(k4, v4)], spec, None if q4 is None else {0: q4}, scaling)
    kept_pairs = sel.layers  # one layer: [(key, value)]
    (k, v), idx = kept_pairs[0], sel.positions[0]
    if flat:
        return SelectionResult(idx[0, 0], k[0, 0], v[0, 0], sel.metrics)
    return SelectionResult(idx, k, v, sel.metrics)


def estimate_savings(num_layers: int, num_kv_heads: int, head_dim: int, num_tokens: int, keep_ratio: float,
                     bits_per_element: float = 16.0, batch: int = 1) -> Dict[str, Any]:
    """Bytes and bandwidth a selection saves for a model geometry, without any data (seed 002's ``estimate_savings``).

    ``bits_per_element`` is the codec's measured bits per kept element on disk (16: float16,
    no codec; the default 4-bit codec measures about 3.6 on SmolLM2, docs/benchmarks.md).
    The indices cost one bit per context position per (layer, batch, KV head). Returns the
    float16 bytes of the full cache, the estimated bytes sent, tokens kept and saved, the
    bandwidth savings (a fraction) and the ratio against float16.
    """
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    if min(num_layers, num_kv_heads, head_dim, num_tokens, batch) < 1:
        raise ValueError("num_layers, num_kv_heads, head_dim, num_tokens and batch must be >= 1, got "
                         f"{(num_layers, num_kv_heads, head_dim, num_tokens, batch)}")
    kept = max(1, round(keep_ratio * num_tokens))
    rows = num_layers * batch * num_kv_heads
    full = 2 * rows * num_tokens * head_dim * 2
    sent = 2 * rows * kept * head_dim * bits_per_element / 8 + rows * math.ceil(num_tokens / 8)
    return {"fp16_bytes": full, "estimated_bytes": int(math.ceil(sent)), "tokens_kept": kept,
            "token_savings": num_tokens - kept, "bandwidth_savings": 1 - sent / full, "ratio_vs_fp16": full / sent}


@dataclass
class QualityCheck:
    """Seed 002's ``validate_quality`` answer: passed, warnings, recommendations and the two metrics."""

    passed: bool
    warnings: List[str]
    recommendations: List[str]
    attention_coverage: float
    information_loss: float


def validate_quality(metrics: SelectionMetrics, min_coverage: float = 0.9,
                     max_information_loss: float = 0.1) -> QualityCheck:
    """Judge a selection by its attention coverage and information loss (seed 002's ``validate_quality``).

    Fails when the mean coverage is below ``min_coverage`` or the information loss above
    ``max_information_loss``; each failure adds a warning and a recommendation. Metrics that
    are NaN (no queries) give a warning that they could not be judged and do not fail.
    """
    warnings: List[str] = []
    recs: List[str] = []
    cov, loss = metrics.attention_coverage, metrics.information_loss
    if math.isnan(cov) or math.isnan(loss):
        warnings.append("attention coverage and information loss are unknown: no observation-window queries")
        recs.append("run the selection with the window's queries (selection 'attention' captures them)")
    if not math.isnan(cov) and cov < min_coverage:
        warnings.append(f"attention coverage {cov:.1%} is below {min_coverage:.0%}")
        recs.append(f"keep more tokens ({metrics.tokens_kept} of {metrics.context_length} kept): raise keep_ratio, "
                    f"attention_threshold or max_tokens"
                    + ("" if metrics.method == "attention" else ", or use selection 'attention'"))
    if not math.isnan(cov) and metrics.attention_coverage_min < min_coverage / 2:
        warnings.append(f"one layer's KV head keeps only {metrics.attention_coverage_min:.1%} of its attention")
    if not math.isnan(loss) and loss > max_information_loss:
        warnings.append(f"information loss {loss:.1%} is above {max_information_loss:.0%}")
        recs.append("raise min_tokens or the threshold; a codec with more bits will not recover dropped positions")
    passed = not ((not math.isnan(cov) and cov < min_coverage) or (not math.isnan(loss) and loss > max_information_loss))
    return QualityCheck(passed, warnings, recs, cov, loss)


def summarize_selection(metrics: Sequence[Any]) -> Optional[Dict[str, Any]]:
    """One summary of the selections of a run, from each bridge call's ``extra["selection"]``
    (CompressionMetrics after :meth:`CacheSelection.annotate`); None when no call selected.

    Counts are the calls' range and mean (``per_layer_tokens``: each layer's mean count); coverage and information loss are means over calls
    (``attention_coverage_min`` the smallest row anywhere); ``threshold_tokens`` is per layer
    the largest count any call's threshold asked for; ``bandwidth_savings_on_disk`` is
    1 − container bytes / float16 bytes of the full caches, over every call.
    """
    parts = [(m, (getattr(m, "extra", {}) or {}).get("selection")) for m in metrics]
    parts = [(m, s) for m, s in parts if s]
    if not parts:
        return None
    sel = [s for _, s in parts]

    def mean(key: str) -> float:
        vals = [s[key] for s in sel if s.get(key) is not None and not math.isnan(s[key])]
        return sum(vals) / len(vals) if vals else math.nan

    kept = [s["tokens_kept"] for s in sel]
    layer_kept = [s.get("per_layer_tokens") or [] for s in sel]
    comp = sum(m.compressed_size_bytes for m, _ in parts)
    fp16 = sum(m.fp16_size_bytes for m, _ in parts)
    per_layer = [max(col) for col in zip(*[s["threshold_tokens"] for s in sel])] if all(s["threshold_tokens"] for s in sel) else []
    covs = [s["attention_coverage_min"] for s in sel if not math.isnan(s["attention_coverage_min"])]
    return {"method": sel[0]["method"], "context_length": sel[0]["context_length"],
            "tokens_kept": {"min": min(kept), "max": max(kept), "mean": sum(kept) / len(kept)},
            "keep_fraction": sum(kept) / len(kept) / sel[0]["context_length"],
            "per_layer_tokens": [round(sum(col) / len(col)) for col in zip(*layer_kept)] if all(layer_kept) else [],
            "attention_coverage": mean("attention_coverage"), "attention_coverage_min": min(covs) if covs else math.nan,
            "information_loss": mean("information_loss"), "bandwidth_savings_before_codec": mean("bandwidth_savings"),
            "bandwidth_savings_on_disk": 1 - comp / fp16 if fp16 else math.nan,
            "disk_ratio_vs_fp16_full": fp16 / comp if comp else math.nan, "threshold_tokens": per_layer,
            "threshold_tokens_median_row": mean("threshold_tokens_median_row")}


def describe_selection(summary: Dict[str, Any]) -> str:
    """One console line for :func:`summarize_selection`'s summary."""
    k = summary["tokens_kept"]
    kept = f"{k['min']}" if k["min"] == k["max"] else f"{k['min']}-{k['max']}"
    return (f"Selection {summary['method']}: kept {kept} of {summary['context_length']} context positions "
            f"({summary['keep_fraction']:.1%}); attention coverage {summary['attention_coverage']:.1%} "
            f"(lowest row {summary['attention_coverage_min']:.1%}), information loss {summary['information_loss']:.1%}; "
            f"{summary['disk_ratio_vs_fp16_full']:.2f}x on disk vs float16 of the full cache (indices included)")
