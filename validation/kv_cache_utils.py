"""Extract, save, load and inspect the KV cache of a causal language model.

A KV cache here is, per decoder layer, one key tensor and one value tensor, both of shape

    [batch, kv_heads, seq_len, head_dim]

(TinyLlama-1.1B: 22 layers, 4 KV heads, head_dim 64, float16 or bfloat16 on disk). A model
with sliding-window layers (Gemma 3: a 512-token window on five layers of every six) keeps
only the last ``window - 1`` tokens in those layers, so layers may differ in length: the
metadata's ``seq_len`` is the number of tokens the cache covers and ``layer_seq_lens`` the
length each layer holds (written only when some layer holds fewer than ``seq_len``).

On disk a cache is one safetensors file holding ``layer_{i}_key`` and ``layer_{i}_value`` for
i = 0..num_layers-1, plus a JSON sidecar (``<file>.metadata.json`` by default) recording the
geometry, the batch size, the original dtype and the model name. bfloat16 is written as
float32 (exact: every bfloat16 value is a float32 value) and cast back on load, so a
save/load round trip is bit-identical for float16, float32 and bfloat16. The ``kv-compress``
Go tool reads and writes the same layout (F16, BF16 or F32 tensors).

The metadata (:class:`KVCacheMetadata`, the sidecar reader) lives in :mod:`validation.kv_metadata`
and is re-exported here. Everything that touches a transformers cache's internals or the model's cache keyword lives in
:mod:`validation.compat`; ``cache_to_layers`` and ``layers_to_cache`` are re-exported here.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from safetensors.torch import load_file, save_file
from transformers.cache_utils import DynamicCache

from validation.compat import (
    KVLayers,
    cache_sliding_windows,
    cache_to_layers,
    cache_token_counts,
    forward,
    layers_to_cache,
    output_cache,
)
from validation.kv_metadata import (  # re-exported: callers import them from here
    _DTYPE_NAMES,
    DTYPES,
    MAX_METADATA_BYTES,
    METADATA_FORMAT_VERSION,
    METADATA_SUFFIX,
    KVCacheMetadata,
    _layers_metadata,
    dtype_name,
    read_metadata,
)

# TinyLlama-1.1B-Chat geometry: the default expectations of validate_kv_cache_shape.
TINYLLAMA_NUM_LAYERS = 22
TINYLLAMA_NUM_KV_HEADS = 4
TINYLLAMA_NUM_QUERY_HEADS = 32
TINYLLAMA_HEAD_DIM = 64
TINYLLAMA_HIDDEN_SIZE = 2048
TINYLLAMA_VOCAB_SIZE = 32000

_TENSOR_NAME = re.compile(r"^layer_(0|[1-9][0-9]*)_(key|value)$")
# A token-selected cache's kept indices per layer (docs/format.md section 9), beside its keys and values.
_POSITIONS_NAME = re.compile(r"^layer_(0|[1-9][0-9]*)_positions$")

# Elements per chunk when computing statistics (32 MiB of float64 at a time).
_STATS_CHUNK = 1 << 22



# -----------------------------------------------------------------------------
# geometry


def metadata_from_cache(
    cache: Any, model_name: str = "unknown", expected_batch_size: Optional[int] = None
) -> KVCacheMetadata:
    """Read a cache's geometry ([batch, kv_heads, layer_len, head_dim] per layer) into metadata.

    ``seq_len`` is the number of tokens the cache has seen (a transformers 5.x sliding layer
    counts the tokens it no longer holds); ``layer_seq_lens`` the per-layer lengths when they
    differ from it. Raises ValueError when the cache is empty, its layers differ in batch,
    heads, head_dim or dtype, or ``expected_batch_size`` is given and differs from the cache's.
    """
    meta = _layers_metadata(cache_to_layers(cache), model_name, "cache", max(cache_token_counts(cache), default=0))
    meta.sliding_windows = cache_sliding_windows(cache)
    if expected_batch_size is not None and meta.batch_size != expected_batch_size:
        raise ValueError(f"batch size must be {expected_batch_size}, got {meta.batch_size}")
    return meta


def validate_kv_cache_shape(
    cache: Any,
    expected_layers: int = TINYLLAMA_NUM_LAYERS,
    expected_kv_heads: int = TINYLLAMA_NUM_KV_HEADS,
    expected_head_dim: int = TINYLLAMA_HEAD_DIM,
    expected_seq_lens: Optional[Sequence[int]] = None,
) -> Tuple[bool, List[str]]:
    """Check a cache against the expected geometry and return ``(ok, problems)``.

    Every problem is reported, not just the first: layer count, per-layer KV head count and
    head_dim (of keys and values), key/value shape mismatch, batch size that differs from
    layer 0, and the sequence lengths: with ``expected_seq_lens`` (one length per layer, e.g.
    from :func:`validation.compat.expected_layer_lengths` for a model with sliding-window
    layers) each layer must hold exactly its length; without it every layer must hold layer
    0's. A cache whose layers are not 4-D tensors yields that one problem.
    """
    try:
        layers = cache_to_layers(cache)
    except ValueError as e:
        return False, [str(e)]

    problems: List[str] = []
    if len(layers) != expected_layers:
        problems.append(f"expected {expected_layers} layers, got {len(layers)}")
    if expected_seq_lens is not None and len(expected_seq_lens) != len(layers):
        problems.append(f"expected_seq_lens has {len(expected_seq_lens)} entries for {len(layers)} layers")
        expected_seq_lens = None
    ref_seq = layers[0][0].shape[2] if layers else None
    ref_batch = layers[0][0].shape[0] if layers else None
    for i, (k, v) in enumerate(layers):
        for kind, t in (("key", k), ("value", v)):
            batch, heads, seq_len, head_dim = t.shape
            if heads != expected_kv_heads:
                problems.append(f"layer {i} {kind}: expected {expected_kv_heads} KV heads, got {heads}")
            if head_dim != expected_head_dim:
                problems.append(f"layer {i} {kind}: expected head_dim {expected_head_dim}, got {head_dim}")
            if expected_seq_lens is not None:
                if seq_len != expected_seq_lens[i]:
                    problems.append(f"layer {i} {kind}: expected seq_len {expected_seq_lens[i]}, got {seq_len}")
            elif seq_len != ref_seq:
                problems.append(f"layer {i} {kind}: seq_len {seq_len} differs from layer 0 seq_len {ref_seq}")
            if batch != ref_batch:
                problems.append(f"layer {i} {kind}: batch size {batch} differs from layer 0 batch size {ref_batch}")
        if k.shape != v.shape:
            problems.append(f"layer {i}: key shape {tuple(k.shape)} != value shape {tuple(v.shape)}")
    return not problems, problems


def compute_kv_cache_stats(cache: Any) -> Dict[str, Any]:
    """Size and value statistics of a cache, over every key and value element of every layer.

    Geometry (num_kv_heads, head_dim, batch_size, dtype) is that of layer 0; ``seq_len`` is
    the number of tokens the cache covers and ``layer_seq_lens`` the per-layer lengths.
    ``value_std`` is the population standard deviation (correction 0). Sums are accumulated
    in float64 over chunks of at most 4M elements, so memory use stays bounded.
    """
    layers = cache_to_layers(cache)
    if not layers:
        raise ValueError("cache: the KV cache is empty (0 layers)")

    count, mean, m2 = 0, 0.0, 0.0  # running count, mean and sum of squared deviations (Chan et al.)
    lo, hi = math.inf, -math.inf
    total_bytes = 0
    for k, v in layers:
        for t in (k, v):
            total_bytes += t.numel() * t.element_size()
            flat = t.detach().reshape(-1)
            for chunk in flat.split(_STATS_CHUNK):
                c = chunk.to(torch.float64)
                n = c.numel()
                if n == 0:
                    continue
                c_mean = c.mean().item()
                c_m2 = ((c - c_mean) ** 2).sum().item()
                delta = c_mean - mean
                total = count + n
                mean += delta * n / total
                m2 += c_m2 + delta * delta * count * n / total
                count = total
                lo = min(lo, c.min().item())
                hi = max(hi, c.max().item())

    batch, heads, _, head_dim = layers[0][0].shape
    empty = count == 0
    return {
        "num_layers": len(layers),
        "num_kv_heads": heads,
        "seq_len": max(cache_token_counts(cache)),
        "layer_seq_lens": [int(k.shape[2]) for k, _ in layers],
        "head_dim": head_dim,
        "batch_size": batch,
        "total_elements": count,
        "total_bytes": total_bytes,
        "total_mb": total_bytes / (1024 * 1024),
        "dtype": str(layers[0][0].dtype).removeprefix("torch."),
        "value_mean": math.nan if empty else mean,
        "value_std": math.nan if empty else math.sqrt(m2 / count),
        "value_min": math.nan if empty else lo,
        "value_max": math.nan if empty else hi,
    }


# -----------------------------------------------------------------------------
# extraction


def detect_device() -> str:
    """The best available device: "cuda", then "mps", then "cpu"."""
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def _model_device(model: torch.nn.Module) -> Optional[torch.device]:
    """Device of the model's first parameter (its input embedding for HF models), or None if it has none."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return None


def model_name_of(model: Any) -> str:
    """``model.config._name_or_path`` or ``model.name_or_path``, else "unknown"."""
    config = getattr(model, "config", None)
    for name in (getattr(config, "_name_or_path", None), getattr(model, "name_or_path", None)):
        if isinstance(name, str) and name:
            return name
    return "unknown"


def extract_kv_cache(
    model: Any,
    tokenizer: Any,
    prompt: str,
    max_length: Optional[int] = None,
    device: Optional[str] = None,
) -> Tuple[DynamicCache, KVCacheMetadata]:
    """Run one forward pass over ``prompt`` and return its KV cache and metadata.

    The cache holds, per layer, key and value tensors of shape [1, kv_heads, seq_len, head_dim]
    where seq_len is the number of prompt tokens (after truncation to ``max_length``); a
    sliding-window layer holds only its window's last tokens, so layers may be shorter
    (``metadata.layer_seq_lens``) while ``metadata.seq_len`` counts every prompt token. Its
    geometry is read from the cache itself. With ``device`` None the model stays where it is
    and the inputs go to its device (``detect_device()`` — cuda, mps, cpu — is used only for a
    model without parameters); with ``device`` given, the model is moved there unless it is
    dispatched over several devices (``hf_device_map``). The model's train/eval mode is left
    as is: call ``model.eval()`` first for a deterministic cache.

    Raises ValueError for an empty prompt, a batch size other than 1 (e.g. a list of two
    prompts), ``max_length`` < 1, or a model that returns no cache.
    """
    if isinstance(prompt, (list, tuple)):
        if len(prompt) != 1:
            raise ValueError(f"batch size must be 1, got {len(prompt)}")
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if not prompt:
        raise ValueError("prompt must be a non-empty string, got ''")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1 or None, got {max_length}")

    model_device = _model_device(model)
    if device is None:
        target = model_device if model_device is not None else torch.device(detect_device())
    else:
        target = torch.device(device)
        if model_device is not None and model_device != target and not getattr(model, "hf_device_map", None):
            model.to(target)

    encoded = tokenizer(prompt, return_tensors="pt")
    input_ids = encoded["input_ids"]
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"batch size must be 1, got {input_ids.shape[0] if input_ids.dim() else 0}")
    attention_mask = encoded.get("attention_mask")
    if max_length is not None:
        input_ids = input_ids[:, :max_length]
        attention_mask = attention_mask[:, :max_length] if attention_mask is not None else None
    if input_ids.shape[1] == 0:
        raise ValueError(f"prompt produced no tokens: {prompt!r}")

    kwargs = {"input_ids": input_ids.to(target), "use_cache": True}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask.to(target)
    with torch.no_grad():
        outputs = forward(model, **kwargs)

    cache = output_cache(outputs)
    if cache is None or not cache_to_layers(cache):
        raise ValueError("model returned an empty KV cache; does it support use_cache=True?")
    if not isinstance(cache, DynamicCache):  # e.g. a legacy tuple from an old model implementation
        cache = layers_to_cache(cache_to_layers(cache))
    metadata = metadata_from_cache(cache, model_name=model_name_of(model), expected_batch_size=1)
    if metadata.seq_len != input_ids.shape[1]:
        raise ValueError(
            f"cache seq_len {metadata.seq_len} != prompt token count {input_ids.shape[1]} "
            "(every layer should have seen every prompt token)"
        )
    return cache, metadata


# -----------------------------------------------------------------------------
# save / load


def default_metadata_path(path: str) -> str:
    """The sidecar path for a cache file: ``path + ".metadata.json"``."""
    return os.fspath(path) + METADATA_SUFFIX


def _atomic_write(targets: Sequence[Tuple[str, Callable[[str], None]]]) -> None:
    """Write each ``(path, write)`` via ``write(tmp)`` on a temp file beside ``path``, then ``os.replace``.

    Every temp file is written before any is moved into place, so a failure while writing
    leaves every target as it was; on any error the remaining temp files are removed.
    """
    pending: List[Tuple[str, str]] = []  # (tmp, path)
    try:
        for path, write in targets:
            full = os.path.abspath(path)
            fd, tmp = tempfile.mkstemp(
                prefix="." + os.path.basename(full) + ".", suffix=".tmp", dir=os.path.dirname(full)
            )
            os.close(fd)
            pending.append((tmp, path))
            write(tmp)
        while pending:
            tmp, path = pending[0]
            os.replace(tmp, path)
            pending.pop(0)
    except BaseException:
        for tmp, _ in pending:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        raise


def save_kv_cache(
    cache: Any,
    path: str,
    metadata_path: Optional[str] = None,
    model_name: Optional[str] = None,
    positions: Optional[Sequence[torch.Tensor]] = None,
    context_length: Optional[int] = None,
) -> KVCacheMetadata:
    """Write a cache to a safetensors file plus a JSON sidecar, atomically; return its metadata.

    A token-selected cache also passes ``positions``, one [batch, kv_heads, kept] integer tensor
    per layer (the kept indices, sorted), and the original ``context_length``: they are written
    as ``layer_{i}_positions`` (int32) and the safetensors ``__metadata__`` ``context_length``,
    which kv-compress stores as a bitmap (docs/format.md section 9).

    Tensors are named ``layer_{i}_key`` / ``layer_{i}_value``, shape [batch, kv_heads,
    layer_len, head_dim]; any batch size is allowed. Layers may differ in length (sliding
    windows): the sidecar then lists ``layer_seq_lens`` beside ``seq_len``, the number of
    tokens the cache covers, and ``sliding_windows`` when the cache's layers carry them.
    float16 and float32 are written as they are; bfloat16 is written as float32 (exact) with ``dtype: "bfloat16"`` in the sidecar
    so ``load_kv_cache`` restores it. The sidecar goes to ``metadata_path`` (default
    ``path + ".metadata.json"``) and records ``model_name`` (default "unknown").

    Both files are first written to temp files in their own directories, then moved into
    place with ``os.replace``; on error no temp file is left, and a failure while writing
    leaves existing files untouched.
    Raises ValueError for an empty cache, layers of different batch, heads, head_dim or dtypes, or a dtype
    other than float16, float32 or bfloat16.
    """
    path = os.fspath(path)
    metadata_path = default_metadata_path(path) if metadata_path is None else os.fspath(metadata_path)
    layers = cache_to_layers(cache)
    meta = _layers_metadata(layers, model_name or "unknown", "cache", max(cache_token_counts(cache), default=0))
    meta.sliding_windows = cache_sliding_windows(cache)
    stored = torch.float32 if meta.dtype == "bfloat16" else meta.torch_dtype
    meta.stored_dtype = dtype_name(stored)

    tensors: Dict[str, torch.Tensor] = {}
    for i, (k, v) in enumerate(layers):
        tensors[f"layer_{i}_key"] = k.detach().to(device="cpu", dtype=stored).contiguous()
        tensors[f"layer_{i}_value"] = v.detach().to(device="cpu", dtype=stored).contiguous()
    file_metadata = None
    if positions is not None:
        if context_length is None or len(positions) != len(layers):
            raise ValueError(f"positions need one tensor per layer ({len(layers)}, got {len(positions)}) and a "
                             f"context_length (got {context_length!r})")
        for i, p in enumerate(positions):
            tensors[f"layer_{i}_positions"] = p.detach().to(device="cpu", dtype=torch.int32).contiguous()
        file_metadata = {"context_length": str(int(context_length))}
    sidecar = json.dumps(meta.to_dict(), indent=2, sort_keys=True) + "\n"

    for p in (path, metadata_path):
        os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)

    def write_sidecar(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(sidecar)

    _atomic_write([(path, lambda tmp: save_file(tensors, tmp, metadata=file_metadata)), (metadata_path, write_sidecar)])
    return meta


def _read_layers(path: str, device: str) -> KVLayers:
    """Load ``layer_{i}_key`` / ``layer_{i}_value`` tensors, i = 0..n-1, each 4-D; ValueError otherwise."""
    try:
        tensors = load_file(path, device=device)
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error type for a corrupt header
        raise ValueError(f"{path}: not a readable safetensors file: {e}") from e
    if not tensors:
        raise ValueError(f"{path}: contains no tensors; expected layer_{{i}}_key / layer_{{i}}_value")

    found: Dict[int, Dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = _TENSOR_NAME.match(name)
        if m is None and _POSITIONS_NAME.match(name):
            continue  # a selected cache's indices: read_positions returns them
        if m is None:
            raise ValueError(
                f"{path}: unexpected tensor {name!r}; tensors must be named layer_{{i}}_key / layer_{{i}}_value"
            )
        found.setdefault(int(m.group(1)), {})[m.group(2)] = t

    n = len(found)
    missing_layers = sorted(set(range(n)) - set(found))
    if missing_layers:
        raise ValueError(
            f"{path}: layers must be numbered 0..{n - 1} contiguously, got indices {sorted(found)} "
            f"(missing {missing_layers})"
        )
    layers: KVLayers = []
    for i in range(n):
        pair = found[i]
        for kind in ("key", "value"):
            if kind not in pair:
                raise ValueError(f"{path}: layer_{i}_{kind} is missing")
            t = pair[kind]
            if t.dim() != 4:
                raise ValueError(
                    f"{path}: layer_{i}_{kind} must be 4-D [batch, kv_heads, seq_len, head_dim], "
                    f"got shape {tuple(t.shape)}"
                )
            if t.dtype not in _DTYPE_NAMES:
                raise ValueError(
                    f"{path}: layer_{i}_{kind} dtype must be one of {sorted(DTYPES)}, got {t.dtype}"
                )
        layers.append((pair["key"], pair["value"]))
    return layers


def _has_positions(path: str) -> bool:
    """Whether the file holds ``layer_{i}_positions`` tensors (a token-selected cache)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return any(_POSITIONS_NAME.match(name) for name in f.keys())


def read_positions(path: str) -> Tuple[List[torch.Tensor], Optional[int]]:
    """A token-selected cache file's kept indices: ``layer_{i}_positions`` [batch, kv_heads, kept]
    (int64) in layer order and the ``__metadata__`` ``context_length``; ``([], None)`` for a
    cache without selection. ValueError when the indices are not strictly increasing within
    [0, context_length) or the context length is missing."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        names = {int(m.group(1)): n for n in f.keys() if (m := _POSITIONS_NAME.match(n))}
        if sorted(names) != list(range(len(names))):
            raise ValueError(f"{path}: positions tensors must be numbered 0..n-1, got layers {sorted(names)}")
        out = [f.get_tensor(names[i]).long() for i in range(len(names))]
    raw = meta.get("context_length")
    ctx = int(raw) if raw is not None and raw.isdigit() else None
    if out and ctx is None:
        raise ValueError(f"{path}: positions tensors without a __metadata__ context_length (got {raw!r})")
    for i, p in enumerate(out):  # kv-compress checks these too; a file may come from elsewhere
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= ctx or not bool((p.diff(dim=-1) > 0).all())):
            raise ValueError(f"{path}: layer_{i}_positions must be strictly increasing indices in [0, {ctx})")
    return out, ctx


def _cast_checked(t: torch.Tensor, dtype: torch.dtype, name: str, path: str, metadata_path: str) -> torch.Tensor:
    """``t.to(dtype)``; ValueError when a finite value becomes Inf (it does not fit in ``dtype``)."""
    out = t.to(dtype)
    if out.is_floating_point() and t.is_floating_point() and dtype.itemsize < t.dtype.itemsize:
        overflow = torch.isinf(out) & torch.isfinite(t)
        if bool(overflow.any()):
            worst = t[overflow].abs().max().item()
            raise ValueError(
                f"{metadata_path}: dtype {dtype_name(dtype)!r} cannot hold {name} of {path} "
                f"(|x| up to {worst:.6g}, {int(overflow.sum())} values beyond {torch.finfo(dtype).max:g}); "
                f"the sidecar must name the dtype the values were saved from"
            )
    return out


def load_kv_cache(
    path: str, metadata_path: Optional[str] = None, device: str = "cpu"
) -> Tuple[DynamicCache, KVCacheMetadata]:
    """Load a cache written by ``save_kv_cache`` or by ``kv-compress`` (F16, BF16 or F32 tensors).

    Returns a ``DynamicCache`` whose layers are [batch, kv_heads, seq_len, head_dim] on
    ``device``, and its metadata. Layers shorter than ``seq_len`` (the sidecar's, else the
    longest layer's) come back as sliding-window layers that have seen ``seq_len`` tokens (see
    :func:`validation.compat.layers_to_cache`), so a model continues from them as from the
    cache that was saved. With a sidecar (``metadata_path``, default ``path +
    ".metadata.json"``), tensors are cast to the sidecar's dtype (bfloat16 saved as float32
    comes back as bfloat16) and the sidecar's geometry must match the tensors. Without one,
    geometry and dtype come from the tensors and model_name is "unknown". An explicit
    ``metadata_path`` that does not exist raises FileNotFoundError.

    Raises ValueError naming the file for tensors not named ``layer_{i}_key`` /
    ``layer_{i}_value`` with i = 0..n-1, non-4-D tensors, unsupported dtypes, layers of
    different shapes, a sidecar that disagrees with the tensors, a sidecar dtype the
    values do not fit in (float32 values beyond float16's range would become Inf), or a
    sidecar that :func:`read_metadata` refuses.
    """
    path = os.fspath(path)
    explicit = metadata_path is not None
    metadata_path = os.fspath(metadata_path) if explicit else default_metadata_path(path)

    layers = _read_layers(path, device)
    file_meta = _layers_metadata(layers, "unknown", path)
    file_meta.stored_dtype = file_meta.dtype
    selected = _has_positions(path)

    if not explicit and not os.path.exists(metadata_path):
        return layers_to_cache(layers, selected=selected), file_meta

    sidecar = read_metadata(metadata_path)

    for name in ("num_layers", "num_kv_heads", "head_dim", "batch_size"):
        want, got = getattr(sidecar, name), getattr(file_meta, name)
        if want != got:
            raise ValueError(f"{metadata_path}: {name} is {want} but {path} holds {got}")
    if sidecar.layer_lengths != file_meta.layer_lengths:
        if sidecar.layer_seq_lens is None and file_meta.layer_seq_lens is None:
            raise ValueError(f"{metadata_path}: seq_len is {sidecar.seq_len} but {path} holds {file_meta.seq_len}")
        raise ValueError(f"{metadata_path}: layer_seq_lens is {sidecar.layer_lengths} "
                         f"but {path} holds {file_meta.layer_lengths}")

    if sidecar.torch_dtype != file_meta.torch_dtype:
        layers = [
            (_cast_checked(k, sidecar.torch_dtype, f"layer_{i}_key", path, metadata_path),
             _cast_checked(v, sidecar.torch_dtype, f"layer_{i}_value", path, metadata_path))
            for i, (k, v) in enumerate(layers)
        ]
    sidecar.stored_dtype = file_meta.dtype
    if selected:
        return layers_to_cache(layers, selected=True), sidecar
    try:
        return layers_to_cache(layers, seq_len=sidecar.seq_len, sliding_windows=sidecar.sliding_windows), sidecar
    except ValueError as e:
        raise ValueError(f"{metadata_path}: {e} (in {path})") from None
