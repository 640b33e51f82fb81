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
import errno
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
ALLOWED_SCHEMES: Tuple[str, ...] = ("sym", "asym", "nf")
ALLOWED_ROTATIONS: Tuple[str, ...] = ("none", "hadamard")
ALLOWED_KEY_AXES: Tuple[str, ...] = ("token", "channel")
ALLOWED_BITS: Tuple[int, ...] = (2, 3, 4, 8)
ALLOWED_ENTROPY: Tuple[str, ...] = ("auto", "lz4", "none")
# Built-in presets of the binary (``kv-compress version`` lists them); any other
# ``preset`` must be the path of a JSON preset file (schema in docs/cli.md).
BUILTIN_PRESETS: Tuple[str, ...] = ("seed", "default", "compact", "near-lossless")
DEFAULT_TIMEOUT_S = 600.0
# The binary's scale-free verdict (docs/cli.md): passed = SNR > 18 dB and cosine > 0.99.
VERDICT_MIN_SNR_DB = 18.0
VERDICT_MIN_COSINE = 0.99
BUILD_HINT = "build it with `make build-compress` from the repository root, or set KV_COMPRESS_PATH"


# How much of the binary's stderr an exception keeps: the head and the tail, with a note of the cut.
STDERR_HEAD_BYTES = 2048
STDERR_TAIL_BYTES = 1024


class KVCompressError(subprocess.CalledProcessError):
    """The binary exited with a non-zero status, or printed output that cannot be read.

    ``returncode`` is its exit code (2 usage error, 3 invalid input file, 4 quality
    gate failed, 1 anything else; 0 when it exited cleanly but its stdout was not
    UTF-8), ``cmd`` the argument list and ``stderr`` its diagnostic, decoded with
    replacement characters and capped at :data:`STDERR_HEAD_BYTES` +
    :data:`STDERR_TAIL_BYTES` bytes (``stderr_bytes`` is the full size; a note in the
    text says how much was cut). ``reason`` says what went wrong when the exit
    status alone does not. All of these appear in ``str(err)``.
    """

    def __init__(
        self,
        returncode: int,
        cmd: Any,
        output: Any = None,
        stderr: Any = None,
        reason: str = "",
        stderr_bytes: Optional[int] = None,
    ) -> None:
        super().__init__(returncode, cmd, output=output, stderr=stderr)
        self.reason = reason
        self.stderr_bytes = len(stderr or "") if stderr_bytes is None else stderr_bytes

    def __str__(self) -> str:
        cmd = " ".join(str(c) for c in self.cmd) if isinstance(self.cmd, (list, tuple)) else str(self.cmd)
        detail = (self.stderr or "").strip() or "(no stderr)"
        what = self.reason or f"exited with status {self.returncode}"
        return f"kv-compress {what}: {detail} [command: {cmd}]"


class KVCompressTimeout(subprocess.TimeoutExpired):
    """The binary did not finish within the timeout and was killed (its temporary output removed)."""

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


def _read_capped(f: Any) -> Tuple[str, int]:
    """The head and tail of a file the binary wrote its stderr to, and its full size in bytes.

    At most ``STDERR_HEAD_BYTES + STDERR_TAIL_BYTES`` bytes are read, however much was
    written; bytes that are not UTF-8 become U+FFFD.
    """
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    if size <= STDERR_HEAD_BYTES + STDERR_TAIL_BYTES:
        return f.read().decode("utf-8", errors="replace"), size
    head = f.read(STDERR_HEAD_BYTES).decode("utf-8", errors="replace")
    f.seek(size - STDERR_TAIL_BYTES)
    tail = f.read().decode("utf-8", errors="replace")
    cut = size - STDERR_HEAD_BYTES - STDERR_TAIL_BYTES
    return f"{head} ... [{cut:,} of {size:,} bytes of stderr cut] ... {tail}", size


# The binary writes its output to a temporary file beside it, named by pkg/atomicfile
# (".<name>.tmp-<random>"), and renames it into place; a killed binary leaves it behind.
def _temp_outputs(output: Optional[str]) -> set:
    if output is None:
        return set()
    full = os.path.abspath(output)
    folder, name = os.path.dirname(full), "." + os.path.basename(full) + ".tmp-"
    try:
        return {os.path.join(folder, e) for e in os.listdir(folder) if e.startswith(name)}
    except OSError:
        return set()


def _remove_new_temp_outputs(output: Optional[str], before: set) -> None:
    for leftover in _temp_outputs(output) - before:
        try:
            os.unlink(leftover)
        except OSError:
            pass


def _require_input(path: str) -> None:
    """FileNotFoundError (the seed's contract) for an input that does not exist, before the binary runs."""
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "kv-compress input file not found", str(path))


def _run(args: Sequence[str], timeout: Optional[float] = DEFAULT_TIMEOUT_S, output: Optional[str] = None) -> Dict[str, Any]:
    """Run the binary with ``args`` and return its parsed JSON report.

    stderr goes to an anonymous temporary file, so a binary that floods it costs disk, not
    memory, and only its head and tail reach an exception. ``output`` is the file the
    command writes: if the binary is killed (timeout, Ctrl-C), the temporary file it was
    writing beside ``output`` is removed.
    """
    cmd = [find_cli_binary(), *[str(a) for a in args]]
    before = _temp_outputs(output)
    with tempfile.TemporaryFile(prefix="kv-compress-stderr-") as err_file:
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err_file, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as e:
            _remove_new_temp_outputs(output, before)
            raise KVCompressTimeout(cmd, e.timeout, output=e.output, stderr=_read_capped(err_file)[0]) from None
        except BaseException:
            _remove_new_temp_outputs(output, before)
            raise
        stderr, stderr_bytes = _read_capped(err_file)
    if proc.returncode < 0:  # killed by a signal: it could not clean up after itself
        _remove_new_temp_outputs(output, before)
    try:
        out = proc.stdout.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise KVCompressError(
            proc.returncode, cmd, output=proc.stdout, stderr=stderr, stderr_bytes=stderr_bytes,
            reason=f"printed output that is not UTF-8 (byte 0x{proc.stdout[e.start]:02x} at offset {e.start}; "
                   f"exit status {proc.returncode})",
        ) from None
    if proc.returncode != 0:
        raise KVCompressError(proc.returncode, cmd, output=out, stderr=stderr, stderr_bytes=stderr_bytes)
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
    no_sync: bool = False,
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
        no_sync: pass ``--no-sync`` (skip the fsync before the rename): only
            for scratch folders whose files need not survive a crash.
        **codec: ``scheme`` ("sym" | "asym" | "nf"), ``rotate`` ("none" | "hadamard"),
            ``key_axis`` ("token" | "channel"), ``sink`` (positions kept exact),
            ``bits`` / ``key_bits`` / ``value_bits`` (2, 3, 4 or 8), ``entropy``
            ("auto" | "lz4" | "none"), ``preset`` (a built-in name or a JSON
            preset file, the base the other options modify); omitted ones take
            the binary's defaults (see docs/cli.md).

    Returns:
        CompressionMetrics with sizes, quality and timing.

    Raises:
        ValueError: a bad argument (before the binary runs) or output that is not JSON.
        FileNotFoundError: ``input_path`` does not exist, or the binary is missing.
        KVCompressError: the binary failed, or printed output that is not UTF-8 (a
            ``subprocess.CalledProcessError``; its stderr capped to a few KB).
        KVCompressTimeout: the binary hung and was killed; the temporary file it was
            writing is removed (a ``subprocess.TimeoutExpired``).
    """
    args = ["compress", "-i", str(input_path), "-o", str(output_path), *_codec_args(group_size, sparsity, verbose, **codec)]
    if no_sync:
        args.append("--no-sync")
    _require_input(input_path)
    return CompressionMetrics.from_dict(_run(args, timeout, output=str(output_path)))


def decompress_kv_cache(
    input_path: str,
    output_path: str,
    verbose: bool = False,
    timeout: Optional[float] = DEFAULT_TIMEOUT_S,
    no_sync: bool = False,
) -> CompressionMetrics:
    """Restore a container to a safetensors file with the original names, shapes and dtypes.

    ``no_sync`` passes ``--no-sync``, for scratch folders only, as for compress.
    Returns CompressionMetrics with sizes and timing; the quality fields are NaN
    (the original is not available to the decompressor).
    """
    args = ["decompress", "-i", str(input_path), "-o", str(output_path)]
    if verbose:
        args.append("--verbose")
    if no_sync:
        args.append("--no-sync")
    _require_input(input_path)
    return CompressionMetrics.from_dict(_run(args, timeout, output=str(output_path)))


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
    _require_input(input_path)
    return CompressionMetrics.from_dict(_run(args, timeout))


def inspect_file(path: str, timeout: Optional[float] = DEFAULT_TIMEOUT_S) -> Dict[str, Any]:
    """``kv-compress inspect``: tensors, dtypes, shapes and, for containers, codec parameters."""
    _require_input(path)
    return _run(["inspect", "-i", str(path)], timeout)


def roundtrip_kv_cache(
    cache: Any,
    work_dir: Optional[str] = None,
    group_size: int = 64,
    sparsity: float = 0.0,
    device: str = "cpu",
    timeout: Optional[float] = DEFAULT_TIMEOUT_S,
    positions: Optional[Sequence[Any]] = None,
    context_length: Optional[int] = None,
    **codec: Any,
) -> Tuple[Any, CompressionMetrics]:
    """Send a cache through the real binary and back: save → compress → decompress → load.

    A token-selected cache (validation/selection.py) also passes ``positions``, its kept
    indices [batch, kv_heads, kept] per layer, and the original ``context_length``; they travel
    in the container, and the indices the binary restores must equal them (else ValueError).

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
        save_kv_cache(cache, src, positions=positions, context_length=context_length)
        timings["save"] = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        # The folder is scratch, removed on the way out: no fsync (--no-sync).
        metrics = compress_kv_cache(src, packed, group_size=group_size, sparsity=sparsity, timeout=timeout, no_sync=True, **codec)
        timings["compress"] = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        decompress_kv_cache(packed, restored, timeout=timeout, no_sync=True)
        timings["decompress"] = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        rebuilt, _ = load_kv_cache(restored, metadata_path=src + ".metadata.json", device=device)
        if positions is not None:
            _check_positions(restored, positions, context_length)
        timings["load"] = (time.perf_counter() - t) * 1e3
    metrics.extra["bridge_timings_ms"] = timings
    return rebuilt, metrics


def _check_positions(restored: str, positions: Sequence[Any], context_length: Optional[int]) -> None:
    """ValueError unless the restored file holds exactly ``positions`` and ``context_length``."""
    from validation.kv_cache_utils import read_positions

    back, ctx = read_positions(restored)
    if ctx != context_length or len(back) != len(positions) or any(
            not bool((b == p.to(b.device, b.dtype)).all()) if b.shape == p.shape else True for b, p in zip(back, positions)):
        raise ValueError(f"kv-compress restored other positions than it was given (context length {ctx}, "
                         f"expected {context_length})")


def relative_rmse(snr_db: float) -> float:
    """The RMSE as a fraction of the original's RMS, ``10 ** (-snr_db / 20)`` (NaN stays NaN)."""
    return 10.0 ** (-snr_db / 20.0) if not math.isnan(snr_db) else math.nan


def print_metrics_report(metrics: CompressionMetrics, title: str = "Compression Metrics") -> None:
    """Print a human-readable summary of ``metrics`` to stdout.

    The verdict line is the binary's own: scale-free, on SNR (the RMSE relative to the
    signal's RMS) and cosine, as docs/cli.md describes.
    """
    width = 60
    print("=" * width)
    print(f"  {title}")
    print("=" * width)
    rel = relative_rmse(metrics.snr_db)
    rows = [
        ("Compression ratio", f"{metrics.compression_ratio:.2f}x"),
        ("Original size", f"{metrics.original_size_bytes:,} bytes"),
        ("Compressed size", f"{metrics.compressed_size_bytes:,} bytes"),
        ("Bits per element", f"{metrics.bits_per_element:.3f}"),
        ("RMSE", f"{metrics.rmse:.6f} ({100 * rel:.1f}% of the signal's RMS)"),
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
        print(f"  [OK] {metrics.quality_level}: SNR > {VERDICT_MIN_SNR_DB:g} dB "
              f"(RMSE under 12.6% of the signal's RMS) and cosine > {VERDICT_MIN_COSINE:g}")
    else:
        print(f"  [{metrics.quality_level}] " + ("; ".join(metrics.violations) or "quality thresholds not met"))
    print("=" * width)
