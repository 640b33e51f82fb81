"""What a validation run is configured with: defaults, the options dataclass and its checks.

Every other module of the protocol takes its defaults from here, so the CLI, the seed API
(``run_full_validation``) and the sweep cannot drift apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

from validation.compression_bridge import codec_args
from validation.selection import SELECTION_METHODS, SelectionSpec
from validation.selection_preset import preset_selection

DEFAULT_MODEL = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
EMBEDDED_ALIASES = ("embedded", "smollm2")
# accelerate's placements for --device-map (a model larger than one GPU: "auto").
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
# The embedded corpora by domain (exllamav2==0.3.2's calibration texts); "embedded" is "wiki".
CORPUS_DOMAINS = ("wiki", "c4", "code", "multilingual", "technical", "tiny")
DATASET_CHOICES = ("wikitext", "embedded", *CORPUS_DOMAINS)
WIKITEXT_IDS = ("Salesforce/wikitext", "wikitext")
WIKITEXT_CONFIG = "wikitext-2-raw-v1"
GROUP_SIZES = (32, 64, 128)
# Codec options besides group size and sparsity; None = the kv-compress binary's default.
CODEC_KEYS = ("scheme", "rotate", "key_axis", "sink", "bits", "key_bits", "value_bits", "entropy", "preset")
# The seed's scheme (symmetric INT4, G = 64, no rotation), pinned where a check is specific to it.
SEED_CODEC: Dict[str, Any] = {"scheme": "sym", "rotate": "none", "key_axis": "token", "sink": 0, "bits": 4,
                              "key_bits": 4, "value_bits": 4}
# How the gate reads the delta: its point estimate, or the upper end of its bootstrap interval.
GATES = ("point", "upper")

DEFAULT_THRESHOLD = 0.5
DEFAULT_GATE = "point"
DEFAULT_MAX_LENGTH = 1024
DEFAULT_STRIDE = 256
DEFAULT_WINDOWS = 16
DEFAULT_BATCH_WINDOWS = 4
DEFAULT_GROUP_SIZE = 64
DEFAULT_SEED = 0
DEFAULT_HUB_TIMEOUT = 2.0
BOOTSTRAP_RESAMPLES = 2000


class ValidationError(RuntimeError):
    """A run cannot proceed (bad option, unavailable model or corpus, bridge failure): exit status 2."""


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
    device_map: Optional[str] = None
    cpu: bool = False
    threshold: float = DEFAULT_THRESHOLD
    gate: str = DEFAULT_GATE
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
    entropy: Optional[str] = None
    preset: Optional[str] = None
    plots: Optional[str] = None
    # Token selection (validation/selection.py): a method and keep_ratio or attention_threshold.
    selection: Optional[str] = None
    keep_ratio: Optional[float] = None
    attention_threshold: Optional[float] = None
    min_tokens: Optional[int] = None
    max_tokens: Optional[int] = None

    @property
    def selection_spec(self) -> Optional[SelectionSpec]:
        """The token selection the options ask for (None: keep every position): ``--selection``
        and its flags, else the ``selection`` section of a ``--preset`` file."""
        if self.selection is None:
            return preset_selection(self.preset)
        extra = {} if self.min_tokens is None else {"min_tokens": self.min_tokens}
        return SelectionSpec(method=self.selection, keep_ratio=self.keep_ratio,
                             attention_threshold=self.attention_threshold, max_tokens=self.max_tokens, **extra)

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
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            raise ValidationError(f"--threshold must be a positive finite number, got {self.threshold}")
        if self.gate not in GATES:
            raise ValidationError(f"--gate must be one of {list(GATES)}, got {self.gate!r}")
        if self.dataset is not None and self.dataset not in DATASET_CHOICES:
            raise ValidationError(f"--dataset must be one of {list(DATASET_CHOICES)}, got {self.dataset!r}")
        if self.dataset is not None and self.text_file is not None:
            raise ValidationError(
                f"use either --dataset or --text-file, not both (got --dataset {self.dataset} "
                f"--text-file {self.text_file})"
            )
        if self.device_map is not None and self.device_map not in DEVICE_MAPS:
            raise ValidationError(f"--device-map must be one of {list(DEVICE_MAPS)}, got {self.device_map!r}")
        if self.cpu and self.device is not None and not self.device.startswith("cpu"):
            raise ValidationError(f"--cpu conflicts with --device {self.device}")
        if self.hub_timeout <= 0:
            raise ValidationError(f"--hub-timeout must be > 0 seconds, got {self.hub_timeout}")
        check_codec(self.codec)
        if self.selection is None:
            try:
                preset_selection(self.preset)
            except ValueError as e:
                raise ValidationError(str(e)) from None
            given = [f for f in ("keep_ratio", "attention_threshold", "min_tokens", "max_tokens") if getattr(self, f) is not None]
            if given:
                raise ValidationError(f"{['--' + f.replace('_', '-') for f in given]} need --selection, one of "
                                      f"{list(SELECTION_METHODS)}")
        else:
            try:
                self.selection_spec.check()
            except ValueError as e:
                raise ValidationError(str(e)) from None


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
    if codec.get("roles"):
        parts.append("per-role plans")
    if codec.get("entropy"):
        parts.append(f"entropy {codec['entropy']}")
    if codec.get("preset"):
        parts.insert(0, f"preset {codec['preset']}:")
    return ", ".join(parts).replace(":,", ":")

