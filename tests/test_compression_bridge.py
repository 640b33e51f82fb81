"""compression_bridge against the real kv-compress binary."""

from __future__ import annotations

import math
import os
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from validation import compression_bridge as cb
from validation.kv_cache_utils import save_kv_cache, layers_to_cache

GOLDEN = Path(__file__).resolve().parent.parent / "pkg" / "compression" / "testdata" / "golden"


@pytest.fixture
def cache_file(tmp_path: Path) -> Path:
    """A TinyLlama-shaped float16 cache (22 layers, 4 KV heads, 16 tokens, head_dim 64) on disk."""
    g = torch.Generator().manual_seed(1)
    layers = [
        (torch.randn(1, 4, 16, 64, generator=g).half(), torch.randn(1, 4, 16, 64, generator=g).half())
        for _ in range(22)
    ]
    path = tmp_path / "cache.safetensors"
    save_kv_cache(layers_to_cache(layers), str(path))
    return path


def script(tmp_path: Path, body: str) -> str:
    """A stand-in executable for a broken binary (the bridge's error paths, not the codec)."""
    p = tmp_path / "fake-kv-compress"
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return str(p)


SEED = dict(scheme="sym", rotate="none", key_axis="token", sink=0, bits=4)


def test_compress_reports_real_sizes(cache_file: Path, tmp_path: Path, kv_compress_bin: str) -> None:
    out = tmp_path / "cache.kvc"
    m = cb.compress_kv_cache(str(cache_file), str(out), group_size=64, **SEED)
    assert m.compressed_size_bytes == out.stat().st_size
    assert m.original_size_bytes == cache_file.stat().st_size
    assert m.compression_ratio == pytest.approx(m.original_size_bytes / m.compressed_size_bytes)
    assert m.schema_version == 1 and m.codec["group_size"] == 64
    assert len(m.tensors) == 44 and {"name", "shape", "dtype", "rmse", "snr_db"} <= set(m.tensors[0])
    assert m.quality_level in {"EXCELLENT", "GOOD", "ACCEPTABLE", "POOR"}
    assert m.passed == (not m.violations)
    assert m.bits_per_element <= 4.25 + 1e-9


def test_omitted_options_take_the_binary_defaults(cache_file: Path, kv_compress_bin: str) -> None:
    """None in Python means "whatever kv-compress defaults to": the two never disagree."""
    default = cb.get_compression_metrics(str(cache_file))
    assert default.codec == cb.cli_version()["default_codec"]
    seed = cb.get_compression_metrics(str(cache_file), **SEED)
    assert seed.codec["rotate"] == "none" and seed.codec["sink"] == 0


def test_decompress_restores_names_shapes_dtypes(cache_file: Path, tmp_path: Path, kv_compress_bin: str) -> None:
    packed, restored = tmp_path / "c.kvc", tmp_path / "r.safetensors"
    cb.compress_kv_cache(str(cache_file), str(packed))
    m = cb.decompress_kv_cache(str(packed), str(restored))
    assert math.isnan(m.rmse) and m.command == "decompress"
    from safetensors.torch import load_file

    a, b = load_file(str(cache_file)), load_file(str(restored))
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype) for k, v in b.items()}


@pytest.mark.parametrize("no_sync", [False, True], ids=["fsync", "no-sync"])
def test_no_sync_writes_the_same_bytes(cache_file: Path, tmp_path: Path, kv_compress_bin: str, no_sync: bool) -> None:
    """--no-sync (what roundtrip_kv_cache passes for its scratch folder) changes durability, not content."""
    ref_packed, ref_restored = tmp_path / "ref.kvc", tmp_path / "ref.safetensors"
    cb.compress_kv_cache(str(cache_file), str(ref_packed))
    cb.decompress_kv_cache(str(ref_packed), str(ref_restored))
    packed, restored = tmp_path / "c.kvc", tmp_path / "r.safetensors"
    cb.compress_kv_cache(str(cache_file), str(packed), no_sync=no_sync)
    m = cb.decompress_kv_cache(str(packed), str(restored), no_sync=no_sync)
    assert m.command == "decompress"
    assert packed.read_bytes() == ref_packed.read_bytes()
    assert restored.read_bytes() == ref_restored.read_bytes()


def test_metrics_writes_nothing(cache_file: Path, kv_compress_bin: str) -> None:
    before = sorted(os.listdir(cache_file.parent))
    m = cb.get_compression_metrics(str(cache_file), group_size=32)
    assert sorted(os.listdir(cache_file.parent)) == before
    assert m.codec["group_size"] == 32 and m.compressed_size_bytes > 0


@pytest.mark.parametrize("group_size", [0, 16, 48, 256, True, 64.0], ids=lambda g: f"g={g!r}")
def test_group_size_checked_before_running(group_size, cache_file: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KV_COMPRESS_PATH", "/nonexistent/never-run")
    with pytest.raises(ValueError, match=r"\[32, 64, 128\], got"):
        cb.compress_kv_cache(str(cache_file), str(tmp_path / "x"), group_size=group_size)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), "0.5"], ids=repr)
def test_sparsity_checked_before_running(sparsity, cache_file: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KV_COMPRESS_PATH", "/nonexistent/never-run")
    with pytest.raises(ValueError, match=r"\[0, 1\), got"):
        cb.compress_kv_cache(str(cache_file), str(tmp_path / "x"), sparsity=sparsity)


def test_nonzero_exit_raises_with_details(tmp_path: Path, kv_compress_bin: str) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x04\x00\x00\x00\x00\x00\x00\x00[1] ")
    out = tmp_path / "out.kvc"
    with pytest.raises(cb.KVCompressError) as exc:
        cb.compress_kv_cache(str(bad), str(out))
    err = exc.value
    assert isinstance(err, subprocess.CalledProcessError)
    assert err.returncode == 3
    text = str(err)
    assert "status 3" in text and str(bad) in text and "compress" in text and "header" in text
    assert not out.exists()


def test_group_size_that_does_not_divide_is_a_clear_error(tmp_path: Path, kv_compress_bin: str) -> None:
    with pytest.raises(cb.KVCompressError, match="group size does not divide"):
        cb.compress_kv_cache(str(GOLDEN / "ties_f32.safetensors"), str(tmp_path / "o"), group_size=128)


def test_missing_binary_says_how_to_build(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("KV_COMPRESS_PATH", raising=False)
    monkeypatch.setattr(cb, "__file__", str(tmp_path / "pkg" / "compression_bridge.py"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="make build-compress"):
        cb.find_cli_binary()
    assert cb.check_cli_available() is False


def test_env_variable_wins(tmp_path: Path, monkeypatch, kv_compress_bin: str) -> None:
    copy = tmp_path / "my-kv-compress"
    copy.write_bytes(Path(kv_compress_bin).read_bytes())
    copy.chmod(0o755)
    monkeypatch.setenv("KV_COMPRESS_PATH", str(copy))
    assert cb.find_cli_binary() == str(copy)
    assert cb.check_cli_available()
    monkeypatch.setenv("KV_COMPRESS_PATH", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="KV_COMPRESS_PATH"):
        cb.find_cli_binary()


def test_repo_binary_found_without_env(monkeypatch, kv_compress_bin: str) -> None:
    monkeypatch.delenv("KV_COMPRESS_PATH", raising=False)
    found = Path(cb.find_cli_binary())
    assert found.name == "kv-compress" and found.is_file()


def test_output_that_is_not_json(tmp_path: Path, monkeypatch, cache_file: Path) -> None:
    monkeypatch.setenv("KV_COMPRESS_PATH", script(tmp_path, "echo 'compressed OK, ratio 3.76'"))
    with pytest.raises(ValueError, match="invalid JSON.*compressed OK"):
        cb.compress_kv_cache(str(cache_file), str(tmp_path / "o"))


def test_hung_binary_times_out(tmp_path: Path, monkeypatch, cache_file: Path) -> None:
    monkeypatch.setenv("KV_COMPRESS_PATH", script(tmp_path, "sleep 30"))
    with pytest.raises(subprocess.TimeoutExpired) as exc:
        cb.compress_kv_cache(str(cache_file), str(tmp_path / "o"), timeout=0.5)
    assert isinstance(exc.value, cb.KVCompressTimeout) and "0.5 s" in str(exc.value)


def test_metrics_from_dict_is_tolerant() -> None:
    m = cb.CompressionMetrics.from_dict({"compression_ratio": 3.9, "rmse": 0.01, "new_field": [1], "passed": True})
    assert m.compression_ratio == 3.9 and m.passed and m.extra == {"new_field": [1]}
    assert math.isnan(m.snr_db) and m.violations == []
    assert m.to_dict()["new_field"] == [1]
    with pytest.raises(ValueError, match="JSON object"):
        cb.CompressionMetrics.from_dict([1, 2])


def test_print_metrics_report(capsys, cache_file: Path, kv_compress_bin: str) -> None:
    m = cb.get_compression_metrics(str(cache_file))
    cb.print_metrics_report(m, title="KV Cache Compression Results")
    out = capsys.readouterr().out
    assert "KV Cache Compression Results" in out and f"{m.compression_ratio:.2f}x" in out and "RMSE" in out


def test_cli_version(kv_compress_bin: str) -> None:
    v = cb.cli_version()
    assert v["format"] == "kv-compress" and v["format_version"] == 2 and v["readable_format_versions"] == [1, 2]
    assert v["encoder"] in ("avx2", "scalar")
    assert tuple(p["name"] for p in v["presets"]) == cb.BUILTIN_PRESETS
    assert v["presets"][1]["codec"] == v["default_codec"]


def test_bench_labels_the_encoder(kv_compress_bin: str) -> None:
    from validation import bench
    from validation import reports

    info = reports.kv_compress_version()
    label = bench._kv_compress_label(info)
    assert label.startswith(str(info["version"])) and f"({info['encoder']} encoder)" in label
    assert bench._kv_compress_label({"version": "abc"}) == "abc"  # binaries before the field
