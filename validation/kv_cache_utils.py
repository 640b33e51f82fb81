"""Extract, save, load and inspect the KV cache of a causal language model.

A KV cache here is, per decoder layer, one key tensor and one value tensor, both of shape

    [batch, kv_heads, seq_len, head_dim]

(TinyLlama-1.1B: 22 layers, 4 KV heads, head_dim 64, float16 or bfloat16 on disk).

On disk a cache is one safetensors file holding ``layer_{i}_key`` and ``layer_{i}_value`` for
i = 0..num_layers-1, plus a JSON sidecar (``<file>.metadata.json`` by default) recording the
geometry, the batch size, the original dtype and the model name. bfloat16 is written as
float32 (exact: every bfloat16 value is a float32 value) and cast back on load, so a
save/load round trip is bit-identical for float16, float32 and bfloat16. The ``kv-compress``
Go tool reads and writes the same layout (F16, BF16 or F32 tensors).

Everything that touches a transformers cache's internals or the model's cache keyword lives in
:mod:`validation.compat`; ``cache_to_layers`` and ``layers_to_cache`` are re-exported here.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import tempfile
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from safetensors.torch import load_file, save_file
from transformers.cache_utils import DynamicCache

from validation.compat import KVLayers, cache_to_layers, forward, layers_to_cache, output_cache

# TinyLlama-1.1B-Chat geometry: the default expectations of validate_kv_cache_shape.
TINYLLAMA_NUM_LAYERS = 22
TINYLLAMA_NUM_KV_HEADS = 4
TINYLLAMA_NUM_QUERY_HEADS = 32
TINYLLAMA_HEAD_DIM = 64
TINYLLAMA_HIDDEN_SIZE = 2048
TINYLLAMA_VOCAB_SIZE = 32000

METADATA_SUFFIX = ".metadata.json"
METADATA_FORMAT_VERSION = 1

# Cache dtypes this module (and the Go tool) handles, by their metadata name.
DTYPES: Dict[str, torch.dtype] = {
    "float16": torch.float16,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
}
_DTYPE_NAMES: Dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

_TENSOR_NAME = re.compile(r"^layer_(0|[1-9][0-9]*)_(key|value)$")
# A token-selected cache's kept indices per layer (docs/format.md section 9), beside its keys and values.
_POSITIONS_NAME = re.compile(r"^layer_(0|[1-9][0-9]*)_positions$")

# Elements per chunk when computing statistics (32 MiB of float64 at a time).
_STATS_CHUNK = 1 << 22



# -----------------------------------------------------------------------------
# metadata


@dataclass
class KVCacheMetadata:
    """Geometry and provenance of a KV cache whose tensors are [batch, kv_heads, seq_len, head_dim].

    ``dtype`` is the dtype of the cache in memory ("float16", "float32" or "bfloat16");
    ``stored_dtype`` is the dtype of the tensors in the file (float32 for a bfloat16 cache
    saved by this module), or None when not known.
    """

    num_layers: int
    num_kv_heads: int
    seq_len: int
    head_dim: int
    dtype: str
    model_name: str
    batch_size: int = 1
    stored_dtype: Optional[str] = None
    format_version: int = METADATA_FORMAT_VERSION

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "seq_len", "head_dim", "batch_size", "format_version"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("dtype", "stored_dtype"):
            value = getattr(self, name)
            if value is None and name == "stored_dtype":
                continue
            if value not in DTYPES:
                raise ValueError(f"{name} must be one of {sorted(DTYPES)}, got {value!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype named by ``dtype``."""
        return DTYPES[self.dtype]

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "KVCacheMetadata":
        """Build from a dict such as a parsed sidecar; unknown keys are ignored.

        Raises ValueError when a required key is missing or a value is invalid.
        """
        if not isinstance(d, dict):
            raise ValueError(f"metadata must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        required = ("num_layers", "num_kv_heads", "seq_len", "head_dim", "dtype", "model_name")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"metadata is missing required keys {missing}; got keys {sorted(d)}")
        return cls(**{k: v for k, v in d.items() if k in known})


def dtype_name(dtype: torch.dtype) -> str:
    """Metadata name of a torch dtype; ValueError unless float16, float32 or bfloat16."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"KV cache dtype must be one of {sorted(DTYPES)}, got {dtype}") from None


# -----------------------------------------------------------------------------
# geometry


def _layers_metadata(layers: KVLayers, model_name: str, what: str) -> KVCacheMetadata:
    """Metadata of uniform layers; ValueError naming ``what`` (a file or "cache") if they are not uniform."""
    if not layers:
        raise ValueError(f"{what}: the KV cache is empty (0 layers)")
    k0 = layers[0][0]
    for i, (k, v) in enumerate(layers):
        if k.shape != v.shape:
            raise ValueError(f"{what}: layer {i} key shape {tuple(k.shape)} != value shape {tuple(v.shape)}")
        if k.shape != k0.shape:
            raise ValueError(
                f"{what}: layer {i} shape {tuple(k.shape)} differs from layer 0 shape {tuple(k0.shape)}; "
                "every layer must be [batch, kv_heads, seq_len, head_dim] with the same sizes"
            )
        if k.dtype != k0.dtype or v.dtype != k0.dtype:
            raise ValueError(f"{what}: layer {i} dtypes {k.dtype}/{v.dtype} differ from layer 0 dtype {k0.dtype}")
    batch, heads, seq_len, head_dim = k0.shape
    return KVCacheMetadata(
        num_layers=len(layers),
        num_kv_heads=heads,
        seq_len=seq_len,
        head_dim=head_dim,
        dtype=dtype_name(k0.dtype),
        model_name=model_name,
        batch_size=batch,
    )


def metadata_from_cache(
    cache: Any, model_name: str = "unknown", expected_batch_size: Optional[int] = None
) -> KVCacheMetadata:
    """Read a cache's geometry ([batch, kv_heads, seq_len, head_dim] per layer) into metadata.

    Raises ValueError when the cache is empty, its layers differ in shape or dtype, or
    ``expected_batch_size`` is given and differs from the cache's batch size.
    """
    meta = _layers_metadata(cache_to_layers(cache), model_name, "cache")
    if expected_batch_size is not None and meta.batch_size != expected_batch_size:
        raise ValueError(f"batch size must be {expected_batch_size}, got {meta.batch_size}")
    return meta


def validate_kv_cache_shape(
    cache: Any,
    expected_layers: int = TINYLLAMA_NUM_LAYERS,
    expected_kv_heads: int = TINYLLAMA_NUM_KV_HEADS,
    expected_head_dim: int = TINYLLAMA_HEAD_DIM,
) -> Tuple[bool, List[str]]:
    """Check a cache against the expected geometry and return ``(ok, problems)``.

    Every problem is reported, not just the first: layer count, per-layer KV head count and
    head_dim (of keys and values), key/value shape mismatch, and seq_len or batch size that
    differs from layer 0. A cache whose layers are not 4-D tensors yields that one problem.
    """
    try:
        layers = cache_to_layers(cache)
    except ValueError as e:
        return False, [str(e)]

    problems: List[str] = []
    if len(layers) != expected_layers:
        problems.append(f"expected {expected_layers} layers, got {len(layers)}")
    ref_seq = layers[0][0].shape[2] if layers else None
    ref_batch = layers[0][0].shape[0] if layers else None
    for i, (k, v) in enumerate(layers):
        for kind, t in (("key", k), ("value", v)):
            batch, heads, seq_len, head_dim = t.shape
            if heads != expected_kv_heads:
                problems.append(f"layer {i} {kind}: expected {expected_kv_heads} KV heads, got {heads}")
            if head_dim != expected_head_dim:
                problems.append(f"layer {i} {kind}: expected head_dim {expected_head_dim}, got {head_dim}")
            if seq_len != ref_seq:
                problems.append(f"layer {i} {kind}: seq_len {seq_len} differs from layer 0 seq_len {ref_seq}")
            if batch != ref_batch:
                problems.append(f"layer {i} {kind}: batch size {batch} differs from layer 0 batch size {ref_batch}")
        if k.shape != v.shape:
            problems.append(f"layer {i}: key shape {tuple(k.shape)} != value shape {tuple(v.shape)}")
    return not problems, problems


def compute_kv_cache_stats(cache: Any) -> Dict[str, Any]:
    """Size and value statistics of a cache, over every key and value element of every layer.

    Geometry (num_kv_heads, seq_len, head_dim, batch_size, dtype) is that of layer 0.
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

    batch, heads, seq_len, head_dim = layers[0][0].shape
    empty = count == 0
    return {
        "num_layers": len(layers),
        "num_kv_heads": heads,
        "seq_len": seq_len,
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
    where seq_len is the number of prompt tokens (after truncation to ``max_length``); its
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
            "(a sliding-window cache keeps only the last window; pass a shorter max_length)"
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
    seq_len, head_dim]; any batch size is allowed. float16 and float32 are written as they
    are; bfloat16 is written as float32 (exact) with ``dtype: "bfloat16"`` in the sidecar
    so ``load_kv_cache`` restores it. The sidecar goes to ``metadata_path`` (default
    ``path + ".metadata.json"``) and records ``model_name`` (default "unknown").

    Both files are first written to temp files in their own directories, then moved into
    place with ``os.replace``; on error no temp file is left, and a failure while writing
    leaves existing files untouched.
    Raises ValueError for an empty cache, layers of different shapes or dtypes, or a dtype
    other than float16, float32 or bfloat16.
    """
    path = os.fspath(path)
    metadata_path = default_metadata_path(path) if metadata_path is None else os.fspath(metadata_path)
    layers = cache_to_layers(cache)
    meta = _layers_metadata(layers, model_name or "unknown", "cache")
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


# A sidecar is a few hundred bytes of flat JSON; anything far larger is not one.
MAX_METADATA_BYTES = 1 << 20


def read_metadata(metadata_path: str) -> KVCacheMetadata:
    """Read and check a JSON sidecar written by :func:`save_kv_cache`.

    Only a regular file (or a link to one) of at most :data:`MAX_METADATA_BYTES` is read:
    a FIFO, a directory or a device such as ``/dev/zero`` is refused before anything
    blocks or fills memory. It is opened non-blocking and checked with ``fstat`` on the
    open descriptor, so swapping the path between the check and the read changes nothing.

    Raises FileNotFoundError when it does not exist and ValueError naming the file for
    anything else: not a regular file, too large, not UTF-8, not JSON, nested too deeply
    for the parser, or not valid metadata.
    """
    fd = os.open(metadata_path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ValueError(f"{metadata_path}: the KV cache metadata must be a regular file, got {_file_kind(st.st_mode)}")
    with os.fdopen(fd, "rb") as f:
        raw = f.read(MAX_METADATA_BYTES + 1)
    if len(raw) > MAX_METADATA_BYTES:
        raise ValueError(f"{metadata_path}: KV cache metadata must be at most {MAX_METADATA_BYTES:,} bytes, "
                         f"got {st.st_size:,}")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise ValueError(f"{metadata_path}: invalid KV cache metadata: JSON nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{metadata_path}: invalid KV cache metadata: {e}") from e
    try:
        return KVCacheMetadata.from_dict(doc)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{metadata_path}: invalid KV cache metadata: {e}") from e


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return f"file mode {stat.filemode(mode)}"


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
    ``device``, and its metadata. With a sidecar (``metadata_path``, default ``path +
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

    if not explicit and not os.path.exists(metadata_path):
        return layers_to_cache(layers), file_meta

    sidecar = read_metadata(metadata_path)

    for name in ("num_layers", "num_kv_heads", "seq_len", "head_dim", "batch_size"):
        want, got = getattr(sidecar, name), getattr(file_meta, name)
        if want != got:
            raise ValueError(f"{metadata_path}: {name} is {want} but {path} holds {got}")

    if sidecar.torch_dtype != file_meta.torch_dtype:
        layers = [
            (_cast_checked(k, sidecar.torch_dtype, f"layer_{i}_key", path, metadata_path),
             _cast_checked(v, sidecar.torch_dtype, f"layer_{i}_value", path, metadata_path))
            for i, (k, v) in enumerate(layers)
        ]
    sidecar.stored_dtype = file_meta.dtype
    return layers_to_cache(layers), sidecar
