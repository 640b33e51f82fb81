"""The one place that knows how the installed transformers release spells caches and keywords.

transformers changed several things this package depends on, and each changed at a different
release:

* **The forward keyword for the cache.** Up to 5.2x a model takes ``past_key_values=``; 5.24+
  takes ``cache=`` and warns (FutureWarning) on the old name, which 5.40 removes. 4.46-4.57
  accept ``cache=`` through ``**kwargs`` and silently ignore it, so the model would attend to
  no cache at all. :func:`cache_keyword` therefore decides from the model's forward
  *signature*: ``cache`` must be a named parameter, not something swallowed by ``**kwargs``.
* **The output attribute.** 5.24+ returns ``outputs.cache`` (``outputs.past_key_values`` is a
  deprecated alias that logs a warning); older releases return ``outputs.past_key_values``.
  :func:`output_cache` reads whichever the output class declares.
* **The cache object.** 4.56+/5.x: ``cache.layers[i].keys`` / ``.values``, built with
  ``DynamicCache()`` + ``cache.update``; 4.46-4.55: ``cache.key_cache[i]`` /
  ``cache.value_cache[i]`` and ``DynamicCache.from_legacy_cache``. :func:`cache_to_layers`
  and :func:`layers_to_cache` convert between either and plain ``[(key, value), ...]`` lists.
* **Where the config keeps the RoPE base.** 5.x: ``config.rope_parameters["rope_theta"]``;
  4.x: ``config.rope_theta`` (10000 when ``config.json`` lacks it, whatever else it holds).
  :func:`rope_theta` reads the one the installed release's model uses.
* **How attention is dispatched.** 4.48+ look the attention function up by
  ``config._attn_implementation`` in ``AttentionInterface``; :class:`selected_attention` registers
  one that masks each layer by its own cache length, for caches whose layers kept different
  numbers of positions (per-layer token selection). Older releases refuse such caches.
* **The dtype keyword of ``from_pretrained``/``from_config``.** ``dtype=`` from 4.56, before
  that ``torch_dtype=`` (older releases pass an unknown ``dtype`` on to the model's
  constructor, which fails). :func:`dtype_kwargs` picks by release.

Nothing else in ``validation/`` passes a cache to a model or reads one back except through
these functions (``tests/test_compat.py`` checks it by grepping the package).
"""

from __future__ import annotations

import dataclasses
import inspect
from functools import lru_cache
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import transformers
from transformers.cache_utils import Cache, DynamicCache

# Oldest transformers release whose real runs this package supports: pyproject's bound, 4.46.1
# (4.46.0 is not on PyPI), which `make test-compat` installs and runs. Below it, 4.45 runs but
# logs a warning on every forward pass ("Starting from v4.46, the `logits` model output will
# have the same type as the model"); 4.36 warns on torch's pytree API and its tokenizers cannot
# read the embedded folder's tokenizer.json (docs/benchmarks.md, compatibility matrix).
MIN_TRANSFORMERS = (4, 46)

KVLayers = List[Tuple[torch.Tensor, torch.Tensor]]


def transformers_version() -> Tuple[int, int]:
    """The installed transformers release as ``(major, minor)``."""
    parts = transformers.__version__.split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def dtype_kwargs(dtype: Any) -> Dict[str, Any]:
    """Keyword arguments that give ``from_pretrained``/``from_config`` the weights' dtype.

    ``{"dtype": dtype}`` from transformers 4.56 on, ``{"torch_dtype": dtype}`` before.
    """
    return {"dtype": dtype} if transformers_version() >= (4, 56) else {"torch_dtype": dtype}


def rope_theta(config: Any) -> float:
    """The RoPE base the installed release's model will use for ``config``.

    5.x: ``config.rope_parameters["rope_theta"]``. 4.x: ``config.rope_theta``, decided by
    release and not by which attribute exists, because 4.x keeps an unknown
    ``rope_parameters`` entry of ``config.json`` as a plain attribute it never reads.
    Raises ValueError when the config lacks the attribute the installed release reads.
    """
    if transformers_version() >= (5, 0):
        params = getattr(config, "rope_parameters", None)
        theta = params.get("rope_theta") if isinstance(params, dict) else None
    else:
        theta = getattr(config, "rope_theta", None)
    if theta is None:
        where = "rope_parameters['rope_theta']" if transformers_version() >= (5, 0) else "rope_theta"
        raise ValueError(f"{type(config).__name__} has no {where} (transformers {transformers.__version__})")
    return float(theta)


@lru_cache(maxsize=64)
def _forward_keyword(forward: Any) -> str:
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):  # a builtin or C-implemented callable: assume the long-lived name
        return "past_key_values"
    named = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    if "cache" in named:
        return "cache"
    return "past_key_values"


def cache_keyword(model: Any) -> str:
    """``"cache"`` when ``model.forward`` names a ``cache`` parameter, else ``"past_key_values"``.

    Decided by signature, never by release number: 4.46-4.57 accept ``cache=`` through
    ``**kwargs`` and ignore it, so only a named parameter counts.
    """
    forward = getattr(type(model), "forward", None) or getattr(model, "forward")
    return _forward_keyword(forward)


def cache_kwargs(model: Any, cache: Any) -> Dict[str, Any]:
    """``{keyword: cache}`` for a call of ``model(...)`` or ``model.generate(...)``."""
    return {cache_keyword(model): cache}


def forward(model: Any, cache: Any = None, **kwargs: Any) -> Any:
    """``model(**kwargs)`` with ``cache`` passed under the keyword this model takes (none if ``cache`` is None).

    A cache from ``layers_to_cache(..., selected=True)`` whose layers keep different numbers of
    positions runs under :func:`selected_attention` (each layer masks by its own length).
    """
    if cache is None:
        return model(**kwargs)
    kwargs.update(cache_kwargs(model, cache))
    if getattr(cache, SELECTED_ATTR, False) and len({int(k.shape[2]) for k, _ in cache_to_layers(cache)}) > 1:
        with selected_attention(model):
            return model(**kwargs)
    return model(**kwargs)


# The attribute layers_to_cache(selected=True) sets on the cache it builds.
SELECTED_ATTR = "kv_selected"
SELECTED_ATTENTION = "kv_selected_attention"
_SELECTED_BASES = ("sdpa", "eager")


def _selected_attention_forward(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                attention_mask: Optional[torch.Tensor], **kwargs: Any) -> Any:
    """Attention over a layer that keeps only some context positions: the ``n`` new queries
    [batch, heads, n, head_dim] see every one of the layer's ``L - n`` kept positions and the new
    keys causally (query ``i`` sees key ``j`` when ``j <= L - n + i``), whatever mask the model
    built from layer 0's length. Batches without padding only (the perplexity protocol's)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import eager_attention_forward

    n, length = query.shape[-2], key.shape[-2]
    visible = torch.ones(n, length, dtype=torch.bool, device=query.device).tril(diagonal=length - n)[None, None]
    kwargs.pop("is_causal", None)
    if getattr(module, "_kv_selected_base", "sdpa") == "eager":
        bias = torch.zeros(visible.shape, dtype=query.dtype, device=query.device)
        bias.masked_fill_(~visible, torch.finfo(query.dtype).min)
        return eager_attention_forward(module, query, key, value, bias, **kwargs)
    return sdpa_attention_forward(module, query, key, value, visible, is_causal=False, **kwargs)


class selected_attention:
    """Context manager: the model's attention layers mask each layer by its own cache length.

    For caches whose layers keep different numbers of context positions (per-layer token
    selection): transformers builds one mask from layer 0's length, which would be wrong for
    the others. Registers :func:`_selected_attention_forward` in transformers'
    ``AttentionInterface`` (4.48+) and switches ``config._attn_implementation`` to it for the
    duration. Raises ValueError on older releases, for models with sliding-window layers, and
    for attention implementations other than ``sdpa`` and ``eager``.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.configs: List[Tuple[Any, Any]] = []

    def __enter__(self) -> "selected_attention":
        try:
            from transformers import AttentionInterface
        except ImportError:
            raise ValueError("layers that keep different numbers of positions need transformers >= 4.48 "
                             f"(AttentionInterface); installed {transformers.__version__}") from None
        config = self.model.config
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        if sliding_windows_of(text, int(getattr(text, "num_hidden_layers", -1))) is not None:
            raise ValueError("per-layer token selection is not supported on models with sliding-window layers")
        configs = {id(c): c for c in (config, text)}
        base = getattr(text, "_attn_implementation", None) or "sdpa"
        if base not in _SELECTED_BASES + (SELECTED_ATTENTION,):
            raise ValueError(f"per-layer token selection needs attn_implementation one of {list(_SELECTED_BASES)}, "
                             f"got {base!r}")
        AttentionInterface.register(SELECTED_ATTENTION, _selected_attention_forward)
        for mod in self.model.modules():
            if hasattr(mod, "layer_idx") and hasattr(mod, "config"):
                mod._kv_selected_base = base if base != SELECTED_ATTENTION else getattr(mod, "_kv_selected_base", "sdpa")
        for c in configs.values():
            self.configs.append((c, c._attn_implementation))
            c._attn_implementation = SELECTED_ATTENTION
        return self

    def __exit__(self, *exc: Any) -> None:
        for c, impl in self.configs:
            c._attn_implementation = impl
        self.configs.clear()


def output_cache(outputs: Any) -> Any:
    """The cache a forward pass returned, read without touching deprecated aliases (None if it has none).

    5.24+ output classes declare ``cache``; older ones ``past_key_values``. A plain tuple
    output (``return_dict=False``) is not supported: its layout differs per model.
    """
    field_names = {f.name for f in dataclasses.fields(outputs)} if dataclasses.is_dataclass(outputs) else set()
    for name in ("cache", "past_key_values"):
        if name in field_names:
            return outputs[name] if name in outputs.keys() else None
    # Not a dataclass output (a custom model): fall back on what it holds, preferring the new name.
    for name in ("cache", "past_key_values"):
        if hasattr(outputs, "keys") and name in outputs.keys():
            return outputs[name]
    return getattr(outputs, "past_key_values", None)


def cache_to_layers(cache: Any) -> KVLayers:
    """Return the cache as ``[(key, value), ...]``, one pair per layer, each [batch, kv_heads, seq_len, head_dim].

    Accepts a transformers ``DynamicCache`` of the 5.x API (``cache.layers[i].keys`` /
    ``.values``) or of the 4.46-4.55 API (``cache.key_cache[i]`` / ``cache.value_cache[i]``),
    or a legacy tuple/list of ``(key, value)`` pairs. The tensors are the cache's own, not
    copies. Raises TypeError for anything else (including non-dynamic transformers caches,
    whose tensors are padded) and ValueError for a layer without 4-D key and value tensors.
    """
    if isinstance(cache, Cache) and not isinstance(cache, DynamicCache):
        raise TypeError(f"expected a DynamicCache or a tuple of (key, value) pairs, got {type(cache).__name__}")

    if hasattr(cache, "layers") and not isinstance(cache, (tuple, list)):  # transformers >= 4.56 and 5.x
        pairs = [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in cache.layers]
    elif hasattr(cache, "key_cache") and hasattr(cache, "value_cache"):  # transformers 4.46-4.55
        if len(cache.key_cache) != len(cache.value_cache):
            raise ValueError(
                f"cache has {len(cache.key_cache)} key layers but {len(cache.value_cache)} value layers"
            )
        pairs = list(zip(cache.key_cache, cache.value_cache))
    elif isinstance(cache, (tuple, list)):  # legacy format: ((k0, v0), (k1, v1), ...)
        pairs = []
        for i, item in enumerate(cache):
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise TypeError(f"layer {i}: expected a (key, value) pair, got {type(item).__name__}")
            pairs.append((item[0], item[1]))
    else:
        raise TypeError(f"expected a DynamicCache or a tuple of (key, value) pairs, got {type(cache).__name__}")

    layers: KVLayers = []
    for i, (k, v) in enumerate(pairs):
        for kind, t in (("key", k), ("value", v)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"layer {i} holds no {kind} tensor (got {type(t).__name__}); is the cache filled?")
            if t.dim() != 4:
                raise ValueError(
                    f"layer {i} {kind} must be 4-D [batch, kv_heads, seq_len, head_dim], got shape {tuple(t.shape)}"
                )
        layers.append((k, v))
    return layers


def cache_token_counts(cache: Any) -> List[int]:
    """Per layer, how many tokens the layer has seen: its stored length, or more for a sliding layer.

    A transformers 5.x sliding-window layer (``DynamicSlidingWindowLayer``) keeps only its last
    ``sliding_window - 1`` keys and values but counts every token in ``cumulative_length``; a
    full layer (and every layer of a legacy tuple or a 4.x cache) has seen exactly what it stores.
    """
    layers = cache_to_layers(cache)
    objects = getattr(cache, "layers", None) if not isinstance(cache, (tuple, list)) else None
    counts: List[int] = []
    for i, (k, _) in enumerate(layers):
        stored = int(k.shape[2])
        seen = getattr(objects[i], "cumulative_length", None) if objects is not None and i < len(objects) else None
        counts.append(max(stored, int(seen)) if isinstance(seen, int) and not isinstance(seen, bool) else stored)
    return counts


def cache_sliding_windows(cache: Any) -> Optional[List[Optional[int]]]:
    """Per layer, the sliding window of a transformers 5.x sliding-window layer (None: a full layer).

    None when no layer slides (and for a legacy tuple or a 4.x cache, which carry no windows).
    """
    objects = getattr(cache, "layers", None) if not isinstance(cache, (tuple, list)) else None
    if not objects:
        return None
    windows: List[Optional[int]] = []
    for layer in objects:
        w = getattr(layer, "sliding_window", None) if getattr(layer, "is_sliding", False) else None
        windows.append(int(w) if isinstance(w, int) and not isinstance(w, bool) else None)
    return windows if any(w is not None for w in windows) else None


def sliding_windows_of(config: Any, num_layers: int) -> Optional[List[Optional[int]]]:
    """Per layer, the sliding window a model's config gives it (None for a full-attention layer).

    Read from ``config.layer_types`` ("sliding_attention") and ``config.sliding_window``, as
    transformers 5.x builds its own caches. None when the config names no sliding layer, or
    its layer count is not ``num_layers``.
    """
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types = getattr(text, "layer_types", None)
    window = getattr(text, "sliding_window", None)
    if not isinstance(types, (list, tuple)) or len(types) != num_layers or not isinstance(window, int):
        return None
    windows = [window if t == "sliding_attention" else None for t in types]
    return windows if any(w is not None for w in windows) else None


def expected_layer_lengths(config: Any, num_layers: int, seq_len: int) -> List[int]:
    """Per layer, how many of ``seq_len`` tokens a model's cache holds: ``min(seq_len, window - 1)``
    for a sliding-window layer (transformers keeps ``window - 1``), ``seq_len`` for a full one."""
    windows = sliding_windows_of(config, num_layers) or [None] * num_layers
    return [seq_len if w is None else min(seq_len, w - 1) for w in windows]


def layers_to_cache(
    layers: Sequence[Tuple[torch.Tensor, torch.Tensor]],
    *,
    seq_len: Optional[int] = None,
    sliding_windows: Optional[Sequence[Optional[int]]] = None,
    selected: bool = False,
) -> DynamicCache:
    """Build a ``DynamicCache`` for the installed transformers from ``[(key, value), ...]``.

    Each tensor is [batch, kv_heads, layer_len, head_dim]; ``layer_len`` may differ per layer.
    ``seq_len`` is how many tokens the cache covers (default: the longest layer). A layer
    shorter than ``seq_len`` holds only the last tokens of a sliding window: it becomes a
    sliding-window layer that has seen ``seq_len`` tokens, with the window ``sliding_windows[i]``
    or, when not given, ``layer_len + 1`` (transformers keeps ``window - 1`` tokens). A layer
    given a window in ``sliding_windows`` is a sliding layer even when it holds every token.
    The model then places the next token at position ``seq_len`` and masks each layer as the
    unmodified cache would.

    ``selected``: the layers hold the positions a token selection kept (validation/selection.py),
    as many per layer as it chose; none is a sliding layer, whatever its length, and
    :func:`forward` masks each by its own length (:func:`selected_attention`).

    transformers 4.x: built with ``DynamicCache.from_legacy_cache``, uniform layers only.
    transformers 5.x: ``DynamicCache()`` whose layers are filled with ``update``, so the cache
    holds copies. Raises ValueError for a malformed layer, a ``seq_len`` below a layer's length,
    a window that the layer's length contradicts, or sliding windows given for layers of
    differing lengths on transformers 4.x (4.x keeps undeclared unequal layers as they are).
    """
    pairs: KVLayers = []
    for i, pair in enumerate(layers):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"layer {i}: expected a (key, value) pair, got {type(pair).__name__}")
        k, v = pair
        for kind, t in (("key", k), ("value", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(
                    f"layer {i} {kind} must be a 4-D tensor [batch, kv_heads, seq_len, head_dim], got {shape}"
                )
        pairs.append((k, v))
    lengths = [int(k.shape[2]) for k, _ in pairs]
    if selected:
        if sliding_windows is not None and any(w is not None for w in sliding_windows):
            raise ValueError("a selected cache has no sliding-window layers")
        cache = _full_layers_cache(pairs)
        setattr(cache, SELECTED_ATTR, True)
        return cache
    total = max(lengths) if seq_len is None and lengths else seq_len
    if sliding_windows is not None and len(sliding_windows) != len(pairs):
        raise ValueError(f"sliding_windows has {len(sliding_windows)} entries for {len(pairs)} layers")
    windows = _layer_windows(lengths, total, sliding_windows)

    from_legacy = getattr(DynamicCache, "from_legacy_cache", None)
    if from_legacy is not None:  # transformers 4.x
        # Sliding layers asked for by name cannot be built on 4.x; a legacy cache of unequal layers
        # that nobody declared sliding is kept as 4.x always kept it, so validation can report it.
        if sliding_windows is not None and any(w is not None for w in windows) and len(set(lengths)) > 1:
            raise ValueError(f"layers of different lengths {sorted(set(lengths))} need transformers 5.x "
                             f"(installed: {transformers.__version__})")
        return from_legacy(tuple(pairs))
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    cache = DynamicCache()  # transformers 5.x: layers are appended lazily by update() unless present
    for w in windows:
        cache.layers.append(DynamicLayer() if w is None else DynamicSlidingWindowLayer(sliding_window=w))
    for i, (k, v) in enumerate(pairs):
        cache.update(k, v, i)
        if windows[i] is not None:
            cache.layers[i].cumulative_length = total
    return cache


def _full_layers_cache(pairs: KVLayers) -> DynamicCache:
    """A DynamicCache of full (non-sliding) layers holding ``pairs``, any lengths."""
    from_legacy = getattr(DynamicCache, "from_legacy_cache", None)
    if from_legacy is not None:  # transformers 4.x keeps the tuples as they are
        return from_legacy(tuple(pairs))
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache()
    for _ in pairs:
        cache.layers.append(DynamicLayer())
    for i, (k, v) in enumerate(pairs):
        cache.update(k, v, i)
    return cache


def _layer_windows(lengths: Sequence[int], total: Optional[int],
                   given: Optional[Sequence[Optional[int]]]) -> List[Optional[int]]:
    """Per layer, the sliding window it gets (None: a full layer); see layers_to_cache."""
    windows: List[Optional[int]] = []
    for i, n in enumerate(lengths):
        w = given[i] if given is not None else None
        if total is not None and n > total:
            raise ValueError(f"layer {i} holds {n} tokens, more than seq_len {total}")
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 2):
            raise ValueError(f"layer {i}: sliding window must be an integer >= 2, got {w!r}")
        if w is None and total is not None and n < total:
            w = n + 1  # a sliding layer keeps window - 1 tokens
        if w is not None and total is not None and n != min(total, w - 1) and n != min(total, w):
            raise ValueError(f"layer {i} holds {n} of {total} tokens, which a sliding window of {w} cannot keep "
                             f"(expected {min(total, w - 1)})")
        windows.append(w)
    return windows


def set_cache_tensor(cache: Any, layer: int, role: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` ``[batch, kv_heads, seq_len, head_dim]`` in place of a DynamicCache's keys
    (``role`` "keys") or values of ``layer``, in place (the auto-tuner's one-tensor swaps)."""
    if role not in ("keys", "values"):
        raise ValueError(f"role must be one of ['keys', 'values'], got {role!r}")
    if hasattr(cache, "layers"):  # transformers >= 4.56 and 5.x
        setattr(cache.layers[layer], role, tensor)
    else:  # transformers 4.46-4.55
        getattr(cache, "key_cache" if role == "keys" else "value_cache")[layer] = tensor
