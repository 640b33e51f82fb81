"""Python and Go read each other's files, and the binary's reconstruction equals the torch reference bit for bit."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import make_tiny_llama
from validation.compat import forward
from validation import compression_bridge as cb
from validation.kv_cache_utils import cache_to_layers, extract_kv_cache, layers_to_cache, save_kv_cache
from validation.reference_codec import encode_reference, plan_for

REPO = Path(__file__).resolve().parent.parent
PY_FILES = REPO / "pkg" / "safetensors" / "testdata" / "python"

DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}


def random_layers(n_layers: int, heads: int, seq: int, dim: int, dtype: torch.dtype, seed: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Gaussian keys (with two outlier channels) and values, ``[1, heads, seq, dim]`` each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_layers):
        k = torch.randn(1, heads, seq, dim, generator=g)
        k[..., :2] *= 10
        v = torch.randn(1, heads, seq, dim, generator=g)
        out.append((k.to(dtype), v.to(dtype)))
    return out


def resolved_codec(metrics: cb.CompressionMetrics) -> dict:
    """The codec options the binary reports it used, as plan_for keyword arguments."""
    c = metrics.codec
    return dict(scheme=c["scheme"], rotate=c["rotate"], key_axis=c["key_axis"], sink=c["sink"], bits=c["bits"],
                key_bits=c["key_bits"], value_bits=c["value_bits"], roles=c.get("roles"))


def assert_bit_exact(original, rebuilt, metrics: cb.CompressionMetrics) -> None:
    """Every reconstructed layer equals the reference codec, run with the options the
    binary reports, applied to the original, bit for bit."""
    group_size = metrics.codec["group_size"]
    codec = resolved_codec(metrics)
    for i, ((k, v), (k2, v2)) in enumerate(zip(cache_to_layers(original), cache_to_layers(rebuilt))):
        for name, a, b in (("key", k, k2), ("value", v, v2)):
            plan = plan_for(f"layer_{i}_{name}", tuple(a.shape), **codec)
            ref = encode_reference(a, group_size, plan=plan).reconstruction
            assert b.dtype == a.dtype and b.shape == a.shape, f"layer {i} {name}"
            assert torch.equal(b.view(torch.int16 if b.element_size() == 2 else torch.int32),
                               ref.view(torch.int16 if ref.element_size() == 2 else torch.int32)), f"layer {i} {name} differs"


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("group_size", [32, 64, 128], ids=lambda g: f"G{g}")
def test_random_cache_bit_exact(dtype: str, group_size: int, tmp_path: Path, kv_compress_bin: str) -> None:
    dim = max(64, group_size)  # groups never span rows, so G = 128 needs head_dim 128
    cache = layers_to_cache(random_layers(22 if dim == 64 else 4, 4, 24, dim, DTYPES[dtype], seed=group_size))
    rebuilt, metrics = cb.roundtrip_kv_cache(cache, str(tmp_path), group_size=group_size)
    assert_bit_exact(cache, rebuilt, metrics)
    assert set(metrics.extra["bridge_timings_ms"]) == {"save", "compress", "decompress", "load"}


@pytest.mark.parametrize("group_size", [32, 64], ids=lambda g: f"G{g}")
def test_model_cache_bit_exact_and_usable(group_size: int, tiny_llama, tiny_tokenizer, tmp_path: Path, kv_compress_bin: str) -> None:
    prompt = "Robert Boulter is an English film, television and theatre actor."
    cache, meta = extract_kv_cache(tiny_llama, tiny_tokenizer, prompt, device="cpu")
    assert (meta.num_layers, meta.num_kv_heads, meta.head_dim) == (22, 4, 64)
    rebuilt, metrics = cb.roundtrip_kv_cache(cache, str(tmp_path), group_size=group_size)
    assert_bit_exact(cache, rebuilt, metrics)
    # The model continues from the reconstructed cache.
    next_ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        out = forward(tiny_llama, rebuilt, input_ids=next_ids, use_cache=True)
    assert torch.isfinite(out.logits).all() and out.logits.shape == (1, 3, tiny_llama.config.vocab_size)


def test_model_cache_bit_exact_g128(tiny_tokenizer, tmp_path: Path, kv_compress_bin: str) -> None:
    model = make_tiny_llama(num_layers=2, num_kv_heads=2, head_dim=128, seed=3)
    cache, _ = extract_kv_cache(model, tiny_tokenizer, "The quick brown fox jumps over the lazy dog.", device="cpu")
    rebuilt, metrics = cb.roundtrip_kv_cache(cache, str(tmp_path), group_size=128)
    assert_bit_exact(cache, rebuilt, metrics)


def test_python_testdata_is_current(tmp_path: Path) -> None:
    """The Go reader's Python-written fixtures are what the installed safetensors writes today."""
    gen = REPO / "tests" / "gen_python_safetensors.py"
    code = gen.read_text().replace('OUT = Path(__file__).resolve().parent.parent / "pkg" / "safetensors" / "testdata" / "python"',
                                   f"OUT = Path({str(tmp_path)!r})")
    script = tmp_path / "gen.py"
    script.write_text(code)
    subprocess.run([sys.executable, str(script)], check=True)
    for f in sorted(PY_FILES.glob("*.safetensors")):
        fresh = tmp_path / f.name
        # Metadata key order is not stable across writes, so compare content, not bytes.
        with safe_open(str(f), framework="pt") as a, safe_open(str(fresh), framework="pt") as b:
            assert a.metadata() == b.metadata(), f"{f.name} is stale: rerun {gen.name}"
        old, new = load_file(str(f)), load_file(str(fresh))
        assert old.keys() == new.keys(), f"{f.name} is stale: rerun {gen.name}"
        for k in old:
            assert old[k].dtype == new[k].dtype and torch.equal(old[k], new[k]), f"{f.name}:{k} is stale"


@pytest.mark.parametrize("path", sorted(PY_FILES.glob("*.safetensors")), ids=lambda p: p.stem)
def test_go_reads_python_files(path: Path, kv_compress_bin: str) -> None:
    info = cb.inspect_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        meta = f.metadata() or {}
    assert {t["name"] for t in info["tensors"]} == names
    assert info["metadata"] == meta
    tensors = load_file(str(path))
    for t in info["tensors"]:
        assert tuple(t["shape"]) == tuple(tensors[t["name"]].shape)


def test_python_reads_go_container(tmp_path: Path, kv_compress_bin: str) -> None:
    src = tmp_path / "c.safetensors"
    save_kv_cache(layers_to_cache(random_layers(2, 2, 8, 64, torch.float16, 0)), str(src))
    packed = tmp_path / "c.kvc"
    cb.compress_kv_cache(str(src), str(packed), scheme="sym", rotate="none", sink=0)
    with safe_open(str(packed), framework="pt") as f:
        meta = f.metadata()
        payloads = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["format"] == "kv-compress" and meta["format_version"] == "2"
    assert set(payloads) == {f"layer_{i}_{kind}.{part}" for i in range(2) for kind in ("key", "value") for part in ("codes", "scales")}
    assert all(t.dtype == torch.uint8 and t.dim() == 1 for t in payloads.values())


def test_bfloat16_cache_survives_the_float32_file(tmp_path: Path, kv_compress_bin: str) -> None:
    cache = layers_to_cache(random_layers(3, 2, 8, 64, torch.bfloat16, 4))
    rebuilt, metrics = cb.roundtrip_kv_cache(cache, str(tmp_path), group_size=64)
    assert all(k.dtype == torch.bfloat16 for k, _ in cache_to_layers(rebuilt))
    assert_bit_exact(cache, rebuilt, metrics)


SCHEMES = {
    "hadamard": dict(rotate="hadamard"),
    "asym": dict(scheme="asym"),
    "channel-keys-sink": dict(scheme="asym", key_axis="channel", sink=1),
    "sym-channel-keys-rotated": dict(rotate="hadamard", key_axis="channel", sink=1),
    "all": dict(scheme="asym", rotate="hadamard", key_axis="channel", sink=2, key_bits=8, value_bits=3),
    "int2": dict(bits=2),
}


@pytest.mark.parametrize("codec", list(SCHEMES.values()), ids=list(SCHEMES))
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_schemes_bit_exact(codec, dtype: str, tmp_path: Path, kv_compress_bin: str) -> None:
    cache = layers_to_cache(random_layers(3, 2, 45, 64, DTYPES[dtype], seed=7))
    rebuilt, metrics = cb.roundtrip_kv_cache(cache, str(tmp_path), group_size=32, **codec)
    assert_bit_exact(cache, rebuilt, metrics)
    for k, v in codec.items():
        assert metrics.codec[k] == v


PRESET_FILE = {
    "name": "per-role-test",
    "codec": {"bits": 4, "sink": 1},
    "keys": {"scheme": "asym", "rotate": "none", "axis": "channel", "group_size": 256},
    "values": {"bits": 3, "group_size": 32},
    "layers": [{"layers": [1], "keys": {"bits": 8, "sink": 3}, "values": {"scheme": "asym", "axis": "channel", "group_size": 512}}],
}


# Format 2's nf scheme and steps (issue 11): nf values per layer, asym keys with steps, sym steps.
PRESET_FILE_NF: Dict[str, Any] = {
    "name": "nf-steps", "base": "default",
    "keys": {"scheme": "asym", "axis": "channel", "group_size": 256, "steps": 9.5},
    "values": {"scheme": "nf", "bits": 3},
    "layers": [{"layers": [0], "keys": {"scheme": "sym", "steps": 3.7}, "values": {"bits": 2}},
               {"layers": [2], "values": {"scheme": "sym", "bits": 4, "steps": 4}}],
}


@pytest.mark.parametrize("preset", ["seed", "default", "compact", "near-lossless", "file", "file-nf"])
def test_presets_bit_exact(preset: str, tmp_path: Path, kv_compress_bin: str) -> None:
    """Every built-in preset and per-role, per-layer preset files (one with nf and steps) reconstruct
    exactly as the torch reference does with the plans the binary reports (groups of up to 512 along
    600 tokens)."""
    if preset.startswith("file"):
        path = tmp_path / "preset.json"
        path.write_text(json.dumps(PRESET_FILE_NF if preset == "file-nf" else PRESET_FILE))
        preset = str(path)
    cache = layers_to_cache(random_layers(3, 2, 600, 64, torch.float16, seed=21))
    rebuilt, metrics = cb.roundtrip_kv_cache(cache, str(tmp_path), preset=preset)
    assert metrics.preset == metrics.codec["preset"] and metrics.preset_modified_by == []
    assert sum(metrics.bytes_by_part.values()) == metrics.compressed_size_bytes
    if metrics.preset == "seed":
        assert set(metrics.entropy_stages) <= {"lz4", "stored"}
    else:
        assert {"huff0", "zstd"} & set(metrics.entropy_stages), metrics.entropy_stages
    assert_bit_exact(cache, rebuilt, metrics)


@pytest.mark.parametrize("codec", [SCHEMES["asym"], SCHEMES["channel-keys-sink"]], ids=["asym", "channel-keys-sink"])
def test_signed_zero_groups_bit_exact(codec, tmp_path: Path, kv_compress_bin: str) -> None:
    # Groups of zeros that start with -0.0: the scale must be +0 in both implementations
    # (a -0 scale is refused by the decoder), and the zeros must come back.
    layers = random_layers(2, 2, 40, 64, torch.float32, seed=11)
    for k, v in layers:
        for t in (k, v):
            t[:, :, 7, :] = 0.0
            t[:, :, :, 5] = 0.0
            t[:, :, 7, ::2] = -0.0
            t[:, :, ::2, 5] = -0.0
    cache = layers_to_cache(layers)
    rebuilt, metrics = cb.roundtrip_kv_cache(cache, str(tmp_path), group_size=32, rotate="none", **codec)
    assert_bit_exact(cache, rebuilt, metrics)
    for k2, v2 in cache_to_layers(rebuilt):
        assert torch.all(v2[:, :, 7, :] == 0)  # values: the zero row is a group
        zero_group = k2[:, :, 1:, 5] if metrics.codec["key_axis"] == "channel" else k2[:, :, 7, :]
        assert torch.all(zero_group == 0)  # keys: the zero channel (after the sink) or the zero row


@pytest.mark.parametrize("codec", [SCHEMES["asym"], SCHEMES["all"]], ids=["asym", "all"])
def test_cache_shorter_than_the_sink(codec, tmp_path: Path, kv_compress_bin: str) -> None:
    # Every position is kept exact, so there are no groups: the container must still decode
    # (an asym one once carried an empty minimums payload that the decoder refused).
    cache = layers_to_cache(random_layers(2, 2, 1, 64, torch.float32, seed=3))
    rebuilt, metrics = cb.roundtrip_kv_cache(cache, str(tmp_path), group_size=32, **{**codec, "sink": 2})
    for (k, v), (k2, v2) in zip(cache_to_layers(cache), cache_to_layers(rebuilt)):
        assert torch.equal(k, k2) and torch.equal(v, v2)


@pytest.mark.parametrize("codec", list(SCHEMES.values()), ids=list(SCHEMES))
def test_float16_limit_saturates_bit_exact(codec, tmp_path: Path, kv_compress_bin: str) -> None:
    # Values at float16's limit used to reconstruct to ±Inf (and compress failed after
    # writing); both implementations now saturate to ±65504, bit for bit. (Without
    # rotation: a rotated row of 65504s leaves float16's range and is refused.)
    layers = random_layers(2, 2, 40, 64, torch.float16, seed=5)
    for k, v in layers:
        for t in (k, v):
            t[:, :, :, 3] = 65504.0
            t[:, :, 5, :] = -65504.0
    cache = layers_to_cache(layers)
    rebuilt, metrics = cb.roundtrip_kv_cache(cache, str(tmp_path), group_size=32, **{**codec, "rotate": "none"})
    assert_bit_exact(cache, rebuilt, metrics)
    for k2, v2 in cache_to_layers(rebuilt):
        assert torch.isfinite(k2).all() and torch.isfinite(v2).all()
        assert k2.abs().max().item() <= 65504.0 and v2.abs().max().item() <= 65504.0
    assert all(math.isfinite(getattr(metrics, f)) for f in ("rmse", "snr_db", "cosine_similarity", "max_error"))


def test_schemes_on_a_model_cache(tiny_llama, tiny_tokenizer, tmp_path: Path, kv_compress_bin: str) -> None:
    codec = dict(scheme="asym", rotate="hadamard", key_axis="channel", sink=1)
    cache, _ = extract_kv_cache(tiny_llama, tiny_tokenizer, "Valkyria Chronicles III is a tactical role-playing game.", device="cpu")
    rebuilt, metrics = cb.roundtrip_kv_cache(cache, str(tmp_path), group_size=64, **codec)
    assert_bit_exact(cache, rebuilt, metrics)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(scheme="nf4"), r"scheme must be one of \['sym', 'asym', 'nf'\], got 'nf4'"),
        (dict(rotate="random"), r"rotate must be one of \['none', 'hadamard'\], got 'random'"),
        (dict(key_axis="head"), r"key_axis must be one of \['token', 'channel'\], got 'head'"),
        (dict(bits=5), r"bits must be one of \[2, 3, 4, 8\], got 5"),
        (dict(value_bits="4"), r"value_bits must be one of \[2, 3, 4, 8\], got '4'"),
        (dict(sink=-1), r"sink must be a non-negative integer, got -1"),
    ],
    ids=["scheme", "rotate", "key_axis", "bits", "value_bits-str", "sink"],
)
def test_codec_options_checked(kwargs, message, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KV_COMPRESS_PATH", "/nonexistent/never-run")
    with pytest.raises(ValueError, match=message):
        cb.compress_kv_cache(str(tmp_path / "in"), str(tmp_path / "out"), **kwargs)
