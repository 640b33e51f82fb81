"""Tests for validation.kv_cache_utils: the cache compatibility layer, extraction, save/load, stats.

Everything runs on the CPU against the random ``tiny_llama`` fixture (TinyLlama's cache
geometry: 22 layers, 4 KV heads, head_dim 64) and in-memory tensors; nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
import os
from types import SimpleNamespace
from typing import List, Tuple

import pytest
import torch
from safetensors.torch import save_file
from transformers import DynamicCache

from validation import compat
from validation.compat import forward, output_cache
from validation import kv_cache_utils as kvu
from validation.kv_cache_utils import (
    KVCacheMetadata,
    cache_to_layers,
    compute_kv_cache_stats,
    extract_kv_cache,
    layers_to_cache,
    load_kv_cache,
    metadata_from_cache,
    save_kv_cache,
    validate_kv_cache_shape,
)

PROMPT = "Robert Boulter is an English film, television and theatre actor."


def random_layers(
    num_layers: int = 3,
    batch: int = 1,
    heads: int = 4,
    seq_len: int = 5,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Random (key, value) pairs of shape [batch, heads, seq_len, head_dim]."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, heads, seq_len, head_dim)
    return [
        ((torch.randn(shape, generator=g) * 3).to(dtype), (torch.randn(shape, generator=g) + 1).to(dtype))
        for _ in range(num_layers)
    ]


def assert_layers_identical(a, b) -> None:
    """Same number of layers, and bit-identical keys and values of the same dtype."""
    assert len(a) == len(b)
    for i, ((ka, va), (kb, vb)) in enumerate(zip(a, b)):
        for x, y in ((ka, kb), (va, vb)):
            assert x.dtype == y.dtype, f"layer {i}: {x.dtype} != {y.dtype}"
            assert torch.equal(x, y), f"layer {i} differs"


def temp_leftovers(directory) -> List[str]:
    """Temp files left by an interrupted atomic write."""
    return [name for name in os.listdir(directory) if name.endswith(".tmp")]


def token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


@pytest.fixture(scope="module")
def extracted(tiny_llama, tiny_tokenizer):
    """The KV cache of PROMPT through tiny_llama, and its metadata."""
    return extract_kv_cache(tiny_llama, tiny_tokenizer, PROMPT, device="cpu")


# -----------------------------------------------------------------------------
# constants and metadata


def test_tinyllama_constants():
    assert kvu.TINYLLAMA_NUM_LAYERS == 22
    assert kvu.TINYLLAMA_NUM_KV_HEADS == 4
    assert kvu.TINYLLAMA_NUM_QUERY_HEADS == 32
    assert kvu.TINYLLAMA_HEAD_DIM == 64
    assert kvu.TINYLLAMA_HIDDEN_SIZE == kvu.TINYLLAMA_NUM_QUERY_HEADS * kvu.TINYLLAMA_HEAD_DIM
    assert kvu.TINYLLAMA_VOCAB_SIZE == 32000


def test_metadata_dict_round_trip_ignores_unknown_keys():
    meta = KVCacheMetadata(22, 4, 128, 64, "bfloat16", "TinyLlama", batch_size=3, stored_dtype="float32")
    d = meta.to_dict()
    assert d["dtype"] == "bfloat16" and d["batch_size"] == 3 and d["format_version"] == 1
    assert KVCacheMetadata.from_dict({**d, "written_by": "kv-compress", "extra": [1]}) == meta


def test_metadata_from_dict_defaults_optional_fields():
    meta = KVCacheMetadata.from_dict(
        {"num_layers": 2, "num_kv_heads": 4, "seq_len": 8, "head_dim": 64, "dtype": "float16", "model_name": "m"}
    )
    assert (meta.batch_size, meta.stored_dtype, meta.format_version) == (1, None, 1)


@pytest.mark.parametrize(
    "change, drop, match",
    [
        ({"dtype": "int8"}, None, r"dtype must be one of \['bfloat16', 'float16', 'float32'\], got 'int8'"),
        ({"seq_len": -1}, None, "seq_len must be a non-negative integer, got -1"),
        ({}, "num_layers", r"missing required keys \['num_layers'\]"),
    ],
    ids=["bad-dtype", "negative-seq-len", "missing-key"],
)
def test_metadata_from_dict_rejects_invalid(change, drop, match):
    d = {**KVCacheMetadata(2, 4, 8, 64, "float16", "m").to_dict(), **change}
    if drop is not None:
        del d[drop]
    with pytest.raises(ValueError, match=match):
        KVCacheMetadata.from_dict(d)


# -----------------------------------------------------------------------------
# compatibility layer


def test_cache_to_layers_reads_model_cache(extracted, tiny_tokenizer):
    cache, _ = extracted
    layers = cache_to_layers(cache)
    assert len(layers) == 22
    for k, v in layers:
        assert k.shape == v.shape == (1, 4, token_count(tiny_tokenizer, PROMPT), 64)


def test_cache_to_layers_accepts_legacy_tuple_and_4x_api():
    layers = random_layers()
    legacy = tuple((k, v) for k, v in layers)
    old_api = SimpleNamespace(key_cache=[k for k, _ in layers], value_cache=[v for _, v in layers])
    for cache in (legacy, old_api):
        got = cache_to_layers(cache)
        assert all(a is k and b is v for (a, b), (k, v) in zip(got, layers))


@pytest.mark.parametrize(
    "cache, error, match",
    [
        (42, TypeError, "got int"),
        (((torch.zeros(1, 4, 2, 64),),), TypeError, r"layer 0: expected a \(key, value\) pair"),
        (SimpleNamespace(layers=[SimpleNamespace(keys=None, values=None)]), ValueError, "layer 0 holds no key"),
        (((torch.zeros(4, 2, 64), torch.zeros(4, 2, 64)),), ValueError, "must be 4-D"),
    ],
    ids=["not-a-cache", "not-a-pair", "unfilled-layer", "3d-tensor"],
)
def test_cache_to_layers_rejects(cache, error, match):
    with pytest.raises(error, match=match):
        cache_to_layers(cache)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16], ids=["f16", "f32", "bf16"])
def test_layers_to_cache_round_trip(dtype):
    layers = random_layers(batch=2, dtype=dtype)
    cache = layers_to_cache(layers)
    assert isinstance(cache, DynamicCache)
    assert cache.get_seq_length() == 5
    assert_layers_identical(cache_to_layers(cache), layers)
    assert_layers_identical(cache_to_layers(layers_to_cache(cache_to_layers(cache))), layers)


def test_layers_to_cache_uses_from_legacy_cache_when_present(monkeypatch):
    """transformers 4.x path: DynamicCache.from_legacy_cache receives a tuple of (key, value) pairs."""

    class LegacyDynamicCache:
        @classmethod
        def from_legacy_cache(cls, past):
            made = cls()
            made.key_cache = [k for k, _ in past]
            made.value_cache = [v for _, v in past]
            return made

    monkeypatch.setattr(compat, "DynamicCache", LegacyDynamicCache)
    layers = random_layers()
    cache = layers_to_cache(layers)
    assert isinstance(cache, LegacyDynamicCache)
    assert_layers_identical(cache_to_layers(cache), layers)


def test_layers_to_cache_rejects_bad_layers():
    with pytest.raises(ValueError, match=r"layer 1 value must be a 4-D tensor .* got \(4, 5, 64\)"):
        layers_to_cache([random_layers(1)[0], (torch.zeros(1, 4, 5, 64), torch.zeros(4, 5, 64))])


def test_model_continues_from_rebuilt_cache(tiny_llama, tiny_tokenizer):
    """A cache rebuilt by layers_to_cache(cache_to_layers(...)) drives the next forward pass like the original."""
    ids = tiny_tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    prefix, rest = ids[:, :-3], ids[:, -3:]
    with torch.no_grad():
        original = output_cache(tiny_llama(prefix, use_cache=True))
        rebuilt = layers_to_cache([(k.clone(), v.clone()) for k, v in cache_to_layers(original)])
        reference = forward(tiny_llama, copy.deepcopy(original), input_ids=rest, use_cache=True).logits
        continued = forward(tiny_llama, rebuilt, input_ids=rest, use_cache=True).logits
        full = tiny_llama(ids).logits
    torch.testing.assert_close(continued, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(continued, full[:, -3:], rtol=1e-4, atol=1e-4)
    assert rebuilt.get_seq_length() == ids.shape[1]


# -----------------------------------------------------------------------------
# extraction


def test_extract_geometry(extracted, tiny_tokenizer):
    cache, meta = extracted
    n = token_count(tiny_tokenizer, PROMPT)
    assert (meta.num_layers, meta.num_kv_heads, meta.head_dim) == (22, 4, 64)
    assert (meta.seq_len, meta.batch_size, meta.dtype) == (n, 1, "float32")
    assert meta.model_name == "unknown"  # the fixture's config has an empty _name_or_path
    assert validate_kv_cache_shape(cache) == (True, [])


def test_extract_matches_direct_forward(extracted, tiny_llama, tiny_tokenizer):
    cache, _ = extracted
    ids = tiny_tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        direct = output_cache(tiny_llama(ids, use_cache=True))
    assert_layers_identical(cache_to_layers(cache), cache_to_layers(direct))


def test_extract_max_length_truncates(tiny_llama, tiny_tokenizer):
    cache, meta = extract_kv_cache(tiny_llama, tiny_tokenizer, PROMPT, max_length=7)
    assert meta.seq_len == 7
    assert all(k.shape[2] == v.shape[2] == 7 for k, v in cache_to_layers(cache))
    # a max_length beyond the prompt changes nothing
    _, meta = extract_kv_cache(tiny_llama, tiny_tokenizer, "The quick brown fox", max_length=10_000)
    assert meta.seq_len == token_count(tiny_tokenizer, "The quick brown fox")


def test_extract_model_name_from_config(tiny_llama, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(tiny_llama.config, "_name_or_path", "TinyLlama/TinyLlama-1.1B-Chat-v1.0")
    _, meta = extract_kv_cache(tiny_llama, tiny_tokenizer, "The quick brown fox")
    assert meta.model_name == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"


@pytest.mark.parametrize(
    "prompt, kwargs, match",
    [
        (["The quick brown fox", "The lazy dog jumps"], {}, "batch size must be 1, got 2"),
        ("", {}, "prompt must be a non-empty string"),
        (PROMPT, {"max_length": 0}, "max_length must be >= 1 or None, got 0"),
    ],
    ids=["two-prompts", "empty-prompt", "zero-max-length"],
)
def test_extract_rejects(tiny_llama, tiny_tokenizer, prompt, kwargs, match):
    with pytest.raises(ValueError, match=match):
        extract_kv_cache(tiny_llama, tiny_tokenizer, prompt, **kwargs)


def test_extract_rejects_prompt_without_tokens(tiny_llama):
    def no_tokens(text, return_tensors=None):
        return {"input_ids": torch.zeros(1, 0, dtype=torch.long)}

    with pytest.raises(ValueError, match="prompt produced no tokens"):
        extract_kv_cache(tiny_llama, no_tokens, " ")


def test_batch_check_rejects_batch_of_two():
    """extract_kv_cache reads its metadata through metadata_from_cache(..., expected_batch_size=1)."""
    cache = layers_to_cache(random_layers(batch=2))
    assert metadata_from_cache(cache).batch_size == 2
    with pytest.raises(ValueError, match="batch size must be 1, got 2"):
        metadata_from_cache(cache, expected_batch_size=1)


def test_metadata_from_cache_rejects_empty_and_ragged():
    with pytest.raises(ValueError, match="empty"):
        metadata_from_cache(())
    layers = random_layers(2) + random_layers(1, heads=2)
    with pytest.raises(ValueError, match=r"layer 2 shape \(1, 2, 5, 64\) differs from layer 0"):
        metadata_from_cache(layers)


def test_metadata_from_cache_records_per_layer_lengths():
    # layers may differ in length only (sliding windows): seq_len is the longest, the rest listed
    layers = random_layers(2) + random_layers(1, seq_len=6)
    meta = metadata_from_cache(layers)
    assert (meta.seq_len, meta.layer_seq_lens, meta.layer_lengths) == (6, [5, 5, 6], [5, 5, 6])


# -----------------------------------------------------------------------------
# save / load


@pytest.mark.parametrize("batch", [1, 2], ids=["batch1", "batch2"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16], ids=["f16", "f32", "bf16"])
def test_save_load_bit_identical(tmp_path, dtype, batch):
    layers = random_layers(num_layers=4, batch=batch, dtype=dtype)
    path = str(tmp_path / "cache.safetensors")
    saved = save_kv_cache(layers_to_cache(layers), path)
    cache, meta = load_kv_cache(path)
    assert isinstance(cache, DynamicCache)
    assert_layers_identical(cache_to_layers(cache), layers)
    assert meta == saved
    assert (meta.num_layers, meta.batch_size, meta.num_kv_heads, meta.seq_len, meta.head_dim) == (4, batch, 4, 5, 64)
    assert meta.dtype == kvu.dtype_name(dtype)
    assert sorted(os.listdir(tmp_path)) == ["cache.safetensors", "cache.safetensors.metadata.json"]


def test_save_load_extracted_cache(tmp_path, extracted):
    cache, meta = extracted
    path = str(tmp_path / "tiny.safetensors")
    save_kv_cache(cache, path, model_name="tiny")
    loaded, loaded_meta = load_kv_cache(path)
    assert_layers_identical(cache_to_layers(loaded), cache_to_layers(cache))
    assert loaded_meta.model_name == "tiny" and loaded_meta.seq_len == meta.seq_len


def test_sidecar_content(tmp_path):
    path = tmp_path / "c.safetensors"
    sidecar = tmp_path / "meta" / "c.json"
    meta = save_kv_cache(random_layers(batch=3, dtype=torch.bfloat16), str(path), str(sidecar), model_name="m/x")
    assert not (tmp_path / "c.safetensors.metadata.json").exists()
    content = json.loads(sidecar.read_text())
    assert content == {
        "num_layers": 3,
        "num_kv_heads": 4,
        "seq_len": 5,
        "head_dim": 64,
        "dtype": "bfloat16",
        "stored_dtype": "float32",
        "model_name": "m/x",
        "batch_size": 3,
        "format_version": 1,
    }
    assert content == meta.to_dict()
    # the file itself holds float32 tensors named layer_{i}_key / layer_{i}_value
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(f"layer_{i}_{kind}" for i in range(3) for kind in ("key", "value"))
        assert f.get_tensor("layer_0_key").dtype == torch.float32
    cache, loaded = load_kv_cache(str(path), str(sidecar))
    assert loaded.model_name == "m/x" and cache_to_layers(cache)[0][0].dtype == torch.bfloat16


def test_load_without_sidecar(tmp_path):
    layers = random_layers(num_layers=2, dtype=torch.float16)
    path = tmp_path / "c.safetensors"
    save_kv_cache(layers, str(path))
    (tmp_path / "c.safetensors.metadata.json").unlink()
    cache, meta = load_kv_cache(str(path))
    assert_layers_identical(cache_to_layers(cache), layers)
    assert meta == KVCacheMetadata(2, 4, 5, 64, "float16", "unknown", batch_size=1, stored_dtype="float16")


def test_load_without_sidecar_keeps_file_dtype(tmp_path):
    """A bfloat16 cache is stored as float32; without its sidecar it loads as float32 (same values)."""
    layers = random_layers(num_layers=2, dtype=torch.bfloat16)
    path = tmp_path / "c.safetensors"
    save_kv_cache(layers, str(path))
    (tmp_path / "c.safetensors.metadata.json").unlink()
    cache, meta = load_kv_cache(str(path))
    assert meta.dtype == "float32"
    assert_layers_identical(cache_to_layers(cache), [(k.float(), v.float()) for k, v in layers])


def test_load_explicit_missing_sidecar_raises(tmp_path):
    path = tmp_path / "c.safetensors"
    save_kv_cache(random_layers(), str(path))
    with pytest.raises(FileNotFoundError):
        load_kv_cache(str(path), str(tmp_path / "nope.json"))


def test_load_rejects_sidecar_that_disagrees(tmp_path):
    path = tmp_path / "c.safetensors"
    save_kv_cache(random_layers(), str(path))
    sidecar = tmp_path / "c.safetensors.metadata.json"
    d = json.loads(sidecar.read_text())
    d["seq_len"] = 99
    sidecar.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="seq_len is 99 but .* holds 5"):
        load_kv_cache(str(path))


def _k(*shape, dtype=torch.float16):
    return torch.zeros(shape or (1, 4, 5, 64), dtype=dtype)


@pytest.mark.parametrize(
    "tensors, match",
    [
        ({"layer_0_key": _k(), "layer_0_value": _k(), "extra": _k()}, "unexpected tensor 'extra'"),
        ({"layer_01_key": _k(), "layer_01_value": _k()}, "unexpected tensor 'layer_01_key'"),
        (
            {"layer_0_key": _k(), "layer_0_value": _k(), "layer_2_key": _k(), "layer_2_value": _k()},
            r"numbered 0..1 contiguously.*missing \[1\]",
        ),
        ({"layer_0_key": _k(), "layer_0_value": _k(), "layer_1_key": _k()}, "layer_1_value is missing"),
        ({"layer_0_key": _k(4, 5, 64), "layer_0_value": _k(4, 5, 64)}, "layer_0_key must be 4-D"),
        ({"layer_0_key": _k(dtype=torch.int8), "layer_0_value": _k(dtype=torch.int8)}, "dtype must be one of"),
        ({"layer_0_key": _k(), "layer_0_value": _k(1, 4, 6, 64)}, "key shape .* != value shape"),
    ],
    ids=["extra-name", "leading-zero", "gap", "missing-value", "3d", "int8", "kv-mismatch"],
)
def test_load_rejects_malformed_file(tmp_path, tensors, match):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=match) as err:
        load_kv_cache(str(path))
    assert str(path) in str(err.value)


def test_load_rejects_file_without_tensors(tmp_path):
    path = tmp_path / "empty.safetensors"
    save_file({}, str(path))
    with pytest.raises(ValueError, match="contains no tensors"):
        load_kv_cache(str(path))


def test_save_into_directory_target_leaves_nothing(tmp_path):
    target = tmp_path / "taken.safetensors"
    target.mkdir()
    (target / "inside").write_text("keep")
    with pytest.raises(OSError):
        save_kv_cache(random_layers(), str(target))
    assert target.is_dir() and (target / "inside").read_text() == "keep"
    assert temp_leftovers(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == ["taken.safetensors"]


def test_failed_write_keeps_existing_files(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    sidecar = tmp_path / "c.safetensors.metadata.json"
    save_kv_cache(random_layers(seed=1), str(path))
    before = (path.read_bytes(), sidecar.read_bytes())

    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(kvu, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        save_kv_cache(random_layers(seed=2), str(path))
    assert (path.read_bytes(), sidecar.read_bytes()) == before
    assert temp_leftovers(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == ["c.safetensors", "c.safetensors.metadata.json"]


def test_save_rejects_unsupported_dtype_before_writing(tmp_path):
    path = tmp_path / "c.safetensors"
    layers = [(torch.zeros(1, 4, 5, 64, dtype=torch.int8), torch.zeros(1, 4, 5, 64, dtype=torch.int8))]
    with pytest.raises(ValueError, match=r"dtype must be one of \['bfloat16', 'float16', 'float32'\], got torch.int8"):
        save_kv_cache(layers, str(path))
    assert os.listdir(tmp_path) == []


# -----------------------------------------------------------------------------
# validation and statistics


def test_validate_reports_every_problem():
    layers = random_layers(num_layers=3, heads=4, seq_len=5, head_dim=64)
    layers[1] = (torch.zeros(1, 8, 5, 64), torch.zeros(1, 8, 5, 64))  # wrong head count (key and value)
    layers[2] = (torch.zeros(1, 4, 6, 64), torch.zeros(1, 4, 6, 32))  # seq_len 6, value head_dim 32
    ok, problems = validate_kv_cache_shape(layers_to_cache(layers), expected_layers=22)
    assert not ok
    text = "\n".join(problems)
    assert "expected 22 layers, got 3" in text
    assert "layer 1 key: expected 4 KV heads, got 8" in text
    assert "layer 1 value: expected 4 KV heads, got 8" in text
    assert "layer 2 value: expected head_dim 64, got 32" in text
    assert "layer 2 key: seq_len 6 differs from layer 0 seq_len 5" in text
    assert "layer 2: key shape (1, 4, 6, 64) != value shape (1, 4, 6, 32)" in text
    assert len(problems) == 7  # the six above plus layer 2 value's seq_len


def test_validate_accepts_matching_geometry():
    cache = layers_to_cache(random_layers(num_layers=2, heads=8, head_dim=128))
    assert validate_kv_cache_shape(cache, expected_layers=2, expected_kv_heads=8, expected_head_dim=128) == (True, [])
    ok, problems = validate_kv_cache_shape(cache)  # TinyLlama defaults: 22 layers, 4 heads, head_dim 64
    assert not ok and len(problems) == 1 + 2 * 2 * 2


@pytest.mark.parametrize("chunk", [1 << 22, 7], ids=["one-chunk", "many-chunks"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["f16", "bf16", "f32"])
def test_stats_match_torch(monkeypatch, dtype, chunk):
    monkeypatch.setattr(kvu, "_STATS_CHUNK", chunk)
    layers = random_layers(num_layers=3, batch=2, seq_len=6, dtype=dtype)
    stats = compute_kv_cache_stats(layers_to_cache(layers))
    flat = torch.cat([t.reshape(-1).double() for pair in layers for t in pair])
    n = 3 * 2 * 2 * 4 * 6 * 64
    assert stats["num_layers"] == 3 and stats["num_kv_heads"] == 4 and stats["seq_len"] == 6
    assert stats["head_dim"] == 64 and stats["batch_size"] == 2
    assert stats["total_elements"] == flat.numel() == n
    assert stats["total_bytes"] == n * torch.tensor([], dtype=dtype).element_size()
    assert stats["total_mb"] == pytest.approx(stats["total_bytes"] / 2**20)
    assert stats["dtype"] == kvu.dtype_name(dtype)
    assert stats["value_mean"] == pytest.approx(flat.mean().item(), rel=1e-9, abs=1e-12)
    assert stats["value_std"] == pytest.approx(flat.std(correction=0).item(), rel=1e-9)
    assert stats["value_min"] == flat.min().item()
    assert stats["value_max"] == flat.max().item()


def test_stats_of_extracted_cache(extracted):
    cache, meta = extracted
    stats = compute_kv_cache_stats(cache)
    assert (stats["num_layers"], stats["num_kv_heads"], stats["head_dim"]) == (22, 4, 64)
    assert stats["seq_len"] == meta.seq_len
    assert stats["total_elements"] == 2 * 22 * 4 * meta.seq_len * 64
    assert stats["total_bytes"] == 4 * stats["total_elements"]
