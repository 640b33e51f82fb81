"""KV cache metadata: the JSON sidecar's fields, their checks, and reading a sidecar safely.

A cache is, per decoder layer, key and value tensors of shape [batch, kv_heads, layer_len,
head_dim]. Every layer shares batch, kv_heads, head_dim and dtype; ``layer_len`` is the same
for every layer except in models with sliding-window layers, which keep only the last
``window - 1`` tokens. :class:`KVCacheMetadata` records ``seq_len`` (the tokens the cache
covers, the seed's single length) and, when some layer holds fewer, ``layer_seq_lens``.
Split from :mod:`validation.kv_cache_utils`, which re-exports every name here.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, List, Optional

import torch

from validation.compat import KVLayers

METADATA_SUFFIX = ".metadata.json"
METADATA_FORMAT_VERSION = 1

# Cache dtypes this module (and the Go tool) handles, by their metadata name.
DTYPES: Dict[str, torch.dtype] = {
    "float16": torch.float16,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
}
_DTYPE_NAMES: Dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


# -----------------------------------------------------------------------------
# metadata


@dataclass
class KVCacheMetadata:
    """Geometry and provenance of a KV cache whose tensors are [batch, kv_heads, seq_len, head_dim].

    ``dtype`` is the dtype of the cache in memory ("float16", "float32" or "bfloat16");
    ``stored_dtype`` is the dtype of the tensors in the file (float32 for a bfloat16 cache
    saved by this module), or None when not known. ``seq_len`` is how many tokens the cache
    covers; ``layer_seq_lens`` (None when every layer holds ``seq_len``) is the length of each
    layer, at most ``seq_len``: a sliding-window layer holds only its window's last tokens.
    ``sliding_windows`` (None when no layer slides) gives each layer's window, null for a
    full-attention layer; both are written to the sidecar only when set.
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
    layer_seq_lens: Optional[List[int]] = None
    sliding_windows: Optional[List[Optional[int]]] = None

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
        lens = self.layer_seq_lens
        if lens is not None:
            if not isinstance(lens, list) or len(lens) != self.num_layers or any(
                isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self.seq_len for n in lens
            ):
                raise ValueError(
                    f"layer_seq_lens must be a list of num_layers ({self.num_layers}) integers in "
                    f"[0, seq_len = {self.seq_len}], got {lens!r}"
                )
            if all(n == self.seq_len for n in lens):
                self.layer_seq_lens = None  # uniform: the single seq_len says it all
        wins = self.sliding_windows
        if wins is not None:
            if not isinstance(wins, list) or len(wins) != self.num_layers or any(
                w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 2) for w in wins
            ):
                raise ValueError(
                    f"sliding_windows must be a list of num_layers ({self.num_layers}) entries, each null "
                    f"(a full layer) or an integer >= 2, got {wins!r}"
                )
            if all(w is None for w in wins):
                self.sliding_windows = None

    @property
    def layer_lengths(self) -> List[int]:
        """The length each layer holds: ``layer_seq_lens``, or ``seq_len`` for every layer."""
        return list(self.layer_seq_lens) if self.layer_seq_lens is not None else [self.seq_len] * self.num_layers

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype named by ``dtype``."""
        return DTYPES[self.dtype]

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-serialisable dict of every field (``layer_seq_lens`` only when the layers differ)."""
        d = asdict(self)
        for name in ("layer_seq_lens", "sliding_windows"):
            if d[name] is None:
                del d[name]
        return d

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


def _layers_metadata(layers: KVLayers, model_name: str, what: str, seq_len: Optional[int] = None) -> KVCacheMetadata:
    """Metadata of layers that share batch, heads, head_dim and dtype; ValueError naming ``what`` otherwise.

    Layers may differ in length (sliding-window layers); ``seq_len`` (default: the longest
    layer) is the number of tokens the cache covers and must be at least every layer's length.
    """
    if not layers:
        raise ValueError(f"{what}: the KV cache is empty (0 layers)")
    k0 = layers[0][0]
    for i, (k, v) in enumerate(layers):
        if k.shape != v.shape:
            raise ValueError(f"{what}: layer {i} key shape {tuple(k.shape)} != value shape {tuple(v.shape)}")
        if (k.shape[0], k.shape[1], k.shape[3]) != (k0.shape[0], k0.shape[1], k0.shape[3]):
            raise ValueError(
                f"{what}: layer {i} shape {tuple(k.shape)} differs from layer 0 shape {tuple(k0.shape)}; "
                "every layer must be [batch, kv_heads, seq_len, head_dim] with the same batch, kv_heads and "
                "head_dim (only seq_len may differ)"
            )
        if k.dtype != k0.dtype or v.dtype != k0.dtype:
            raise ValueError(f"{what}: layer {i} dtypes {k.dtype}/{v.dtype} differ from layer 0 dtype {k0.dtype}")
    lengths = [int(k.shape[2]) for k, _ in layers]
    total = max(lengths) if seq_len is None else seq_len
    if total < max(lengths):
        raise ValueError(f"{what}: seq_len {total} is less than the longest layer ({max(lengths)} tokens)")
    batch, heads, _, head_dim = k0.shape
    return KVCacheMetadata(
        num_layers=len(layers),
        num_kv_heads=heads,
        seq_len=total,
        head_dim=head_dim,
        dtype=dtype_name(k0.dtype),
        model_name=model_name,
        batch_size=batch,
        layer_seq_lens=lengths,
    )


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


