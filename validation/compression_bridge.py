"""Bridge to the Go ``kv-compress`` binary: run it, check it, parse its JSON.

The Go tool is the component under measurement, so this module never
re-implements it: every call runs the real binary through ``subprocess`` with
an argument list (never a shell) and turns its single JSON object on stdout
into a :class:`CompressionMetrics`. The CLI contract is documented in
``docs/cli.md``; the arithmetic the binary performs is reproduced
independently in :mod:`validation.reference_codec` for tests.

Typical use::

    from validation.compression_bridge import compress_kv_cache, print_metrics_report
    metrics = compress_kv_cache("kv_cache.safetensors", "kv_cache.kvc", group_size=64)
    print_metrics_report(metrics)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

BINARY_NAME = "kv-compress"
ENV_BINARY = "KV_COMPRESS_PATH"
ALLOWED_GROUP_SIZES: Tuple[int, ...] = (32, 64, 128)
ALLOWED_SCHEMES: Tuple[str, ...] = ("sym", "asym")
ALLOWED_ROTATIONS: Tuple[str, ...] = ("none", "hadamard")
ALLOWED_KEY_AXES: Tuple[str, ...] = ("token", "channel")
ALLOWED_BITS: Tuple[int, ...] = (2, 3, 4, 8)
ALLOWED_ENTROPY: Tuple[str, ...] = ("auto", "lz4", "none")
# Built-in presets of the binary (``kv-compress version`` lists them); any other
# ``preset`` must be the path of a JSON preset file (schema in docs/cli.md).
BUILTIN_PRESETS: Tuple[str, ...] = ("seed", "default", "compact", "near-lossless")
DEFAULT_TIMEOUT_S = 600.0
BUILD_HINT = "build it with `make build-compress` from the repository root, or set KV_COMPRESS_PATH"


class KVCompressError(subprocess.CalledProcessError):
    """The binary exited with a non-zero status.

    ``returncode`` is its exit code (2 usage error, 3 invalid input file, 4 quality
    gate failed, 1 anything else), ``cmd`` the argument list and ``stderr`` its
    one-line diagnostic; all three appear in ``str(err)``.
    """

    def __str__(self) -> str:
        cmd = " ".join(str(c) for c in self.cmd) if isinstance(self.cmd, (list, tuple)) else str(self.cmd)
        detail = (self.stderr or "").strip() or "(no stderr)"
        return f"kv-compress exited with status {self.returncode}: {detail} [command: {cmd}]"


class KVCompressTimeout(subprocess.TimeoutExpired):
    """The binary did not finish within the timeout and was killed."""

    def __str__(self) -> str:
        cmd = " ".join(str(c) for c in self.cmd) if isinstance(self.cmd, (list, tuple)) else str(self.cmd)
        return f"kv-compress did not finish within {self.timeout:g} s and was killed [command: {cmd}]"


@dataclass
class CompressionMetrics:
    """The JSON report of ``kv-compress compress`` / ``metrics`` / ``decompress``.

    The first eleven fields are the seed contract. Sizes are whole files in
    bytes. ``decompress`` reports sizes and timing only, so its quality fields
    stay NaN. Fields this version does not know are kept in ``extra``.
    """

    compression_ratio: float = 0.0
    original_size_bytes: int = 0
    compressed_size_bytes: int = 0
    rmse: float = math.nan
    snr_db: float = math.nan
    cosine_similarity: float = math.nan
    max_error: float = math.nan
    quality_level: str = "UNKNOWN"
    processing_time_ms: float = 0.0
    passed: bool = False
    violations: List[str] = field(default_factory=list)
    schema_version: int = 0
    command: str = ""
    bits_per_element: float = math.nan
    ratio_vs_fp16: float = math.nan
    throughput_mb_per_s: float = math.nan
    fp16_size_bytes: int = 0
    disk_ratio_vs_fp16: float = math.nan
    codec: Dict[str, Any] = field(default_factory=dict)
    preset: str = ""
    preset_modified_by: List[str] = field(default_factory=list)
    bytes_by_part: Dict[str, int] = field(default_factory=dict)
    bits_per_element_by_part: Dict[str, float] = field(default_factory=dict)
    entropy_stages: Dict[str, Dict[str, int]] = field(default_factory=dict)
    timings_ms: Dict[str, float] = field(default_factory=dict)
    tensors: List[Dict[str, Any]] = field(default_factory=list)
    extra: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "CompressionMetrics":
        """Build from the binary's JSON; unknown keys go to ``extra``, missing ones keep defaults."""
        if not isinstance(d, dict):
            raise ValueError(f"kv-compress report must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        extra = {k: v for k, v in d.items() if k not in known}
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-serialisable dict (``extra`` merged back in)."""
        d = dataclasses.asdict(self)
        d.update(d.pop("extra"))
        return d


def find_cli_binary() -> str:
    """Locate the ``kv-compress`` binary.

    Search order: ``$KV_COMPRESS_PATH``; ``../bin/kv-compress`` relative to this
    file; ``./bin/kv-compress`` relative to the working directory; ``PATH``.

    Raises:
        FileNotFoundError: nothing executable was found (or ``KV_COMPRESS_PATH``
            names a file that is missing or not executable).
    """
    env = os.environ.get(ENV_BINARY)
    if env:
        if os.path.isfile(env) and os.access(env, os.X_OK):
            return env
        raise FileNotFoundError(f"{ENV_BINARY}={env!r} is not an executable file; unset it or {BUILD_HINT}")
    candidates = [
        Path(__file__).resolve().parent.parent / "bin" / BINARY_NAME,
        Path.cwd() / "bin" / BINARY_NAME,
    ]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which(BINARY_NAME)
    if found:
        return found
    raise FileNotFoundError(
        f"{BINARY_NAME} binary not found (looked at ${ENV_BINARY}, {candidates[0]}, {candidates[1]}, PATH); {BUILD_HINT}"
    )


def check_cli_available() -> bool:
    """True when the binary is found and answers ``kv-compress version``."""
    try:
        _run(["version"], timeout=30)
        return True
    except (FileNotFoundError, OSError, subprocess.SubprocessError, ValueError):
        return False


def cli_version() -> Dict[str, Any]:
    """The JSON of ``kv-compress version`` (version, format version, Go version)."""
    return _run(["version"], timeout=30)


def _check_group_size(group_size: int) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in ALLOWED_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {list(ALLOWED_GROUP_SIZES)}, got {group_size!r}")


def _check_sparsity(sparsity: float) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not (0.0 <= sparsity < 1.0):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")


def _run(args: Sequence[str], timeout: Optional[float] = DEFAULT_TIMEOUT_S) -> Dict[str, Any]:
    """Run the binary with ``args`` and return its parsed JSON report."""
    cmd = [find_cli_binary(), *[str(a) for a in args]]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise KVCompressTimeout(cmd, e.timeout, output=e.output, stderr=e.stderr) from None
    if proc.returncode != 0:
        raise KVCompressError(proc.returncode, cmd, output=proc.stdout, stderr=proc.stderr)
    out = proc.stdout.strip()
    try:
        doc = json.loads(out)
    except json.JSONDecodeError as e:
        raise ValueError(f"kv-compress printed invalid JSON ({e.msg}): {out[:200]!r}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"kv-compress printed JSON that is not an object: {out[:200]!r}")
    return doc


def _check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if isinstance(value, bool) or value not in allowed or type(value) is not type(allowed[0]):
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def codec_args(
    group_size: int = 64,
    sparsity: float = 0.0,
    scheme: Optional[str] = None,
    rotate: Optional[str] = None,
    key_axis: Optional[str] = None,
    sink: Optional[int] = None,
    bits: Optional[int] = None,
    key_bits: Optional[int] = None,
    value_bits: Optional[int] = None,
    preset: Optional[Union[str, os.PathLike]] = None,
    entropy: Optional[str] = None,
) -> List[str]:
    """Validate codec options and turn them into ``kv-compress`` flags.

    ``None`` leaves an option to the binary's default (or to the preset's), so
    the Python side never disagrees with the Go side about what a codec is.
    ``preset`` is a built-in name (``BUILTIN_PRESETS``) or a JSON preset file;
    the other options apply on top of it, as the binary's flags do.
    """
    _check_group_size(group_size)
    _check_sparsity(sparsity)
    args = ["--group-size", str(group_size), "--sparsity", repr(float(sparsity))]
    if preset is not None:
        name = os.fspath(preset)
        if name not in BUILTIN_PRESETS and not os.path.isfile(name):
            raise ValueError(f"preset must be one of {list(BUILTIN_PRESETS)} or an existing JSON preset file, got {name!r}")
        args += ["--preset", name]
    if entropy is not None:
        _check_choice("entropy", entropy, ALLOWED_ENTROPY)
        args += ["--entropy", entropy]
    for flag, value, allowed in (
        ("scheme", scheme, ALLOWED_SCHEMES),
        ("rotate", rotate, ALLOWED_ROTATIONS),
        ("key-axis", key_axis, ALLOWED_KEY_AXES),
        ("bits", bits, ALLOWED_BITS),
        ("key-bits", key_bits, ALLOWED_BITS),
        ("value-bits", value_bits, ALLOWED_BITS),
    ):
        if value is not None:
            _check_choice(flag.replace("-", "_"), value, allowed)
            args += [f"--{flag}", str(value)]
    if sink is not None:
        if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
            raise ValueError(f"sink must be a non-negative integer, got {sink!r}")
        args += ["--sink", str(sink)]
    return args


def _codec_args(group_size: int, sparsity: float, verbose: bool, **codec: Any) -> List[str]:
    args = codec_args(group_size, sparsity, **codec)
    if verbose:
        args.append("--verbose")
    return args


def compress_kv_cache(
    input_path: str,
    output_path: str,
    group_size: int = 64,
    sparsity: float = 0.0,
    verbose: bool = False,
    timeout: Optional[float] = DEFAULT_TIMEOUT_S,
    **codec: Any,
) -> CompressionMetrics:
    """Compress a safetensors KV cache into a kv-compress container.

    Args:
        input_path: safetensors file, e.g. tensors ``layer_{i}_key`` / ``layer_{i}_value``
            of shape ``[batch, kv_heads, seq_len, head_dim]``.
        output_path: container to write (atomically; never the input).
        group_size: elements per quantization group along the last axis: 32, 64 or 128.
        sparsity: fraction in [0, 1) of smallest-magnitude elements zeroed first.
        verbose: let the binary print per-tensor diagnostics (to its stderr, captured).
        timeout: seconds before the binary is killed (``None``: no limit).
        **codec: ``scheme`` ("sym" | "asym"), ``rotate`` ("none" | "hadamard"),
            ``key_axis`` ("token" | "channel"), ``sink`` (positions kept exact),
            ``bits`` / ``key_bits`` / ``value_bits`` (2, 3, 4 or 8), ``entropy``
            ("auto" | "lz4" | "none"), ``preset`` (a built-in name or a JSON
            preset file, the base the other options modify); omitted ones take
            the binary's defaults (see docs/cli.md).

    Returns:
        CompressionMetrics with sizes, quality and timing.

    Raises:
        ValueError: a bad argument (before the binary runs) or output that is not JSON.
        FileNotFoundError: the binary is missing.
        KVCompressError: the binary failed (a ``subprocess.CalledProcessError``).
        KVCompressTimeout: the binary hung (a ``subprocess.TimeoutExpired``).
    """
    args = ["compress", "-i", str(input_path), "-o", str(output_path), *_codec_args(group_size, sparsity, verbose, **codec)]
    return CompressionMetrics.from_dict(_run(args, timeout))


def decompress_kv_cache(
    input_path: str,
    output_path: str,
    verbose: bool = False,
    timeout: Optional[float] = DEFAULT_TIMEOUT_S,
) -> CompressionMetrics:
    """Restore a container to a safetensors file with the original names, shapes and dtypes.

    Returns CompressionMetrics with sizes and timing; the quality fields are NaN
    (the original is not available to the decompressor).
    """
    args = ["decompress", "-i", str(input_path), "-o", str(output_path)]
    if verbose:
        args.append("--verbose")
    return CompressionMetrics.from_dict(_run(args, timeout))


def get_compression_metrics(
    input_path: str,
    group_size: int = 64,
    verbose: bool = False,
    sparsity: float = 0.0,
    timeout: Optional[float] = DEFAULT_TIMEOUT_S,
    **codec: Any,
) -> CompressionMetrics:
    """Compress in memory and report, writing nothing (``kv-compress metrics``); ``codec`` as for compress."""
    args = ["metrics", "-i", str(input_path), *_codec_args(group_size, sparsity, verbose, **codec)]
    return CompressionMetrics.from_dict(_run(args, timeout))


def inspect_file(path: str, timeout: Optional[float] = DEFAULT_TIMEOUT_S) -> Dict[str, Any]:
    """``kv-compress inspect``: tensors, dtypes, shapes and, for containers, codec parameters."""
    return _run(["inspect", "-i", str(path)], timeout)


def roundtrip_kv_cache(
    cache: Any,
    work_dir: Optional[str] = None,
    group_size: int = 64,
    sparsity: float = 0.0,
    device: str = "cpu",
    timeout: Optional[float] = DEFAULT_TIMEOUT_S,
    **codec: Any,
) -> Tuple[Any, CompressionMetrics]:
    """Send a cache through the real binary and back: save → compress → decompress → load.

    Args:
        cache: a DynamicCache (or legacy tuple) with tensors ``[batch, kv_heads, seq, head_dim]``;
            any batch size (several evaluation windows can travel in one file).
        work_dir: folder for the three files (a temporary folder, removed afterwards, when None).
        device: where the reconstructed tensors are loaded.

    Returns:
        ``(reconstructed DynamicCache, compress metrics)``; the metrics'
        ``extra["bridge_timings_ms"]`` holds the wall time of each of the four steps.
    """
    from validation.kv_cache_utils import load_kv_cache, save_kv_cache

    codec_args(group_size, sparsity, **codec)  # fail before any file is written
    with tempfile.TemporaryDirectory(prefix="kvc-", dir=work_dir) as tmp:
        src = os.path.join(tmp, "cache.safetensors")
        packed = os.path.join(tmp, "cache.kvc")
        restored = os.path.join(tmp, "restored.safetensors")
        timings: Dict[str, float] = {}
        t = time.perf_counter()
        save_kv_cache(cache, src)
        timings["save"] = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        metrics = compress_kv_cache(src, packed, group_size=group_size, sparsity=sparsity, timeout=timeout, **codec)
        timings["compress"] = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        decompress_kv_cache(packed, restored, timeout=timeout)
        timings["decompress"] = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        rebuilt, _ = load_kv_cache(restored, metadata_path=src + ".metadata.json", device=device)
        timings["load"] = (time.perf_counter() - t) * 1e3
    metrics.extra["bridge_timings_ms"] = timings
    return rebuilt, metrics


def print_metrics_report(metrics: CompressionMetrics, title: str = "Compression Metrics") -> None:
    """Print a human-readable summary of ``metrics`` to stdout."""
    width = 60
    print("=" * width)
    print(f"  {title}")
    print("=" * width)
    rows = [
        ("Compression ratio", f"{metrics.compression_ratio:.2f}x"),
        ("Original size", f"{metrics.original_size_bytes:,} bytes"),
        ("Compressed size", f"{metrics.compressed_size_bytes:,} bytes"),
        ("Bits per element", f"{metrics.bits_per_element:.3f}"),
        ("RMSE", f"{metrics.rmse:.6f}"),
        ("SNR", f"{metrics.snr_db:.2f} dB"),
        ("Cosine similarity", f"{metrics.cosine_similarity:.6f}"),
        ("Max error", f"{metrics.max_error:.6f}"),
        ("Quality level", metrics.quality_level),
        ("Processing time", f"{metrics.processing_time_ms:.1f} ms"),
    ]
    for name, value in rows:
        print(f"  {name + ':':<22}{value}")
    print("-" * width)
    if metrics.passed:
        print("  [OK] quality thresholds met (RMSE < 0.10, SNR > 18 dB, cosine > 0.99)")
    else:
        print("  [FAIL] " + ("; ".join(metrics.violations) or "quality thresholds not met"))
    print("=" * width)
