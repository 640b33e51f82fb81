"""Hostile and broken inputs at the Python edges: the bridge's subprocess handling and the JSON sidecar.

The real binary runs wherever it can produce the case. A stand-in script is used only for what
the real one never does (print bytes that are not UTF-8, flood stderr, hang while writing): those
tests check the bridge's handling of a misbehaving process, not the codec.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict

import pytest
import torch

from validation import compression_bridge as cb
from validation.kv_cache_utils import MAX_METADATA_BYTES, layers_to_cache, load_kv_cache, save_kv_cache


@pytest.fixture
def cache_file(tmp_path: Path) -> Path:
    """A small float32 cache: 2 layers of [1, 2, 8, 64]."""
    g = torch.Generator().manual_seed(3)
    layers = [(torch.randn(1, 2, 8, 64, generator=g), torch.randn(1, 2, 8, 64, generator=g)) for _ in range(2)]
    path = tmp_path / "cache.safetensors"
    save_kv_cache(layers_to_cache(layers), str(path))
    return path


def fake_binary(tmp_path: Path, body: str) -> str:
    """An executable Python script standing in for a misbehaving kv-compress."""
    p = tmp_path / "fake-kv-compress"
    p.write_text(f"#!{sys.executable}\nimport os, sys, time\n{body}\n")
    p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return str(p)


# -----------------------------------------------------------------------------
# the bridge


CALLS: Dict[str, Callable[[str, Path], object]] = {
    "compress": lambda src, tmp: cb.compress_kv_cache(src, str(tmp / "o.kvc")),
    "decompress": lambda src, tmp: cb.decompress_kv_cache(src, str(tmp / "o.safetensors")),
    "metrics": lambda src, tmp: cb.get_compression_metrics(src),
    "inspect": lambda src, tmp: cb.inspect_file(src),
}


@pytest.mark.parametrize("call", sorted(CALLS), ids=str)
def test_missing_input_is_file_not_found(call: str, tmp_path: Path, kv_compress_bin: str) -> None:
    missing = tmp_path / "no-such-cache.safetensors"
    with pytest.raises(FileNotFoundError) as exc:
        CALLS[call](str(missing), tmp_path)
    assert not isinstance(exc.value, subprocess.CalledProcessError)
    assert exc.value.filename == str(missing) and str(missing) in str(exc.value)
    assert sorted(os.listdir(tmp_path)) == []  # nothing written


def test_real_binary_error_keeps_working(tmp_path: Path, kv_compress_bin: str) -> None:
    """An existing but invalid input still reaches the binary and gives its exit status and message."""
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(cb.KVCompressError) as exc:
        cb.compress_kv_cache(str(bad), str(tmp_path / "o.kvc"))
    assert exc.value.returncode == 3 and str(bad) in str(exc.value)
    assert exc.value.stderr_bytes == len(exc.value.stderr.encode())  # short: nothing cut


@pytest.mark.parametrize("exit_code", [0, 3], ids=["exit-0", "exit-3"])
def test_output_that_is_not_utf8(exit_code: int, tmp_path: Path, monkeypatch, cache_file: Path) -> None:
    monkeypatch.setenv("KV_COMPRESS_PATH", fake_binary(
        tmp_path, f"sys.stdout.buffer.write(b'{{\"rmse\": \\xff\\xfe}}'); sys.stderr.buffer.write(b'bad \\xc3('); "
                  f"sys.exit({exit_code})"))
    with pytest.raises(cb.KVCompressError) as exc:
        cb.get_compression_metrics(str(cache_file))
    err = exc.value
    assert err.returncode == exit_code
    assert "not UTF-8" in str(err) and "0xff at offset 9" in str(err)
    assert "bad \ufffd(" in err.stderr  # stderr decoded with replacement, never raising


def test_huge_stderr_is_capped(tmp_path: Path, monkeypatch, cache_file: Path) -> None:
    size = 20_000_000
    monkeypatch.setenv("KV_COMPRESS_PATH", fake_binary(
        tmp_path, f"sys.stderr.write('START' + 'x' * {size} + 'END'); sys.exit(1)"))
    with pytest.raises(cb.KVCompressError) as exc:
        cb.get_compression_metrics(str(cache_file))
    err = exc.value
    text = str(err)
    limit = cb.STDERR_HEAD_BYTES + cb.STDERR_TAIL_BYTES
    assert len(text) < limit + 1000 and len(err.stderr) < limit + 200
    assert err.stderr_bytes == size + 8
    assert text.count("START") == 1 and "END" in text
    assert f"{size + 8 - limit:,} of {size + 8:,} bytes of stderr cut" in text


def test_killed_binary_leaves_no_temporary_output(tmp_path: Path, monkeypatch, cache_file: Path) -> None:
    """A binary killed on timeout while writing ``.<name>.tmp-*`` (pkg/atomicfile's name) leaves nothing behind."""
    out = tmp_path / "out" / "cache.kvc"
    out.parent.mkdir()
    unrelated = out.parent / ".cache.kvc.tmp-other-run"  # there before the call: not ours to remove
    unrelated.write_bytes(b"x")
    monkeypatch.setenv("KV_COMPRESS_PATH", fake_binary(tmp_path, (
        "out = sys.argv[sys.argv.index('-o') + 1]\n"
        "tmp = os.path.join(os.path.dirname(out), '.' + os.path.basename(out) + '.tmp-12345')\n"
        "f = open(tmp, 'wb'); f.write(b'partial'); f.flush()\n"
        "time.sleep(60)")))
    t = time.perf_counter()
    with pytest.raises(cb.KVCompressTimeout):
        cb.compress_kv_cache(str(cache_file), str(out), timeout=2.0)
    assert time.perf_counter() - t < 30
    assert sorted(p.name for p in out.parent.iterdir()) == [unrelated.name]


# -----------------------------------------------------------------------------
# the sidecar


def test_float16_sidecar_for_overflowing_float32_is_an_error(tmp_path: Path) -> None:
    k = torch.randn(1, 2, 4, 64)
    k[0, 1, 2, 3] = 1e6  # beyond float16's 65504
    path = tmp_path / "big.safetensors"
    save_kv_cache(layers_to_cache([(k, torch.randn(1, 2, 4, 64))]), str(path))
    sidecar = Path(str(path) + ".metadata.json")
    meta = json.loads(sidecar.read_text())
    assert meta["dtype"] == "float32"
    meta["dtype"] = "float16"
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"'float16' cannot hold layer_0_key .*1e\+06.*1 values beyond 65504"):
        load_kv_cache(str(path))


def test_float16_sidecar_for_float32_in_range_casts(tmp_path: Path) -> None:
    k = torch.randn(1, 2, 4, 64)
    path = tmp_path / "ok.safetensors"
    save_kv_cache(layers_to_cache([(k, k.clone())]), str(path))
    sidecar = Path(str(path) + ".metadata.json")
    meta = json.loads(sidecar.read_text())
    meta["dtype"] = "float16"
    sidecar.write_text(json.dumps(meta))
    cache, loaded = load_kv_cache(str(path))
    assert loaded.dtype == "float16" and cache.layers[0].keys.dtype == torch.float16
    assert torch.equal(cache.layers[0].keys, k.half())


def test_deeply_nested_sidecar_is_a_value_error(cache_file: Path) -> None:
    depth = 200_000
    Path(str(cache_file) + ".metadata.json").write_text("[" * depth + "]" * depth)
    with pytest.raises(ValueError, match="nested too deeply"):
        load_kv_cache(str(cache_file))


@pytest.mark.parametrize("kind", ["fifo", "directory", "dev-zero", "too-large"], ids=str)
def test_sidecar_that_is_not_a_small_regular_file_is_refused(kind: str, cache_file: Path, tmp_path: Path) -> None:
    sidecar = tmp_path / "sidecar.json"
    if kind == "fifo":
        os.mkfifo(sidecar)  # nobody writes to it: a blocking open would hang the test
        want = "regular file, got a FIFO"
    elif kind == "directory":
        sidecar.mkdir()
        want = "regular file, got a directory"
    elif kind == "dev-zero":
        sidecar = Path("/dev/zero")
        want = "regular file, got a character device"
    else:
        sidecar.write_bytes(b" " * (MAX_METADATA_BYTES + 1))
        want = f"at most {MAX_METADATA_BYTES:,} bytes"
    with pytest.raises(ValueError, match=want):
        load_kv_cache(str(cache_file), metadata_path=str(sidecar))


def test_default_sidecar_that_is_a_directory_is_refused(cache_file: Path) -> None:
    Path(str(cache_file) + ".metadata.json").unlink()
    Path(str(cache_file) + ".metadata.json").mkdir()
    with pytest.raises(ValueError, match="regular file, got a directory"):
        load_kv_cache(str(cache_file))


def test_sidecar_that_is_not_utf8(cache_file: Path) -> None:
    Path(str(cache_file) + ".metadata.json").write_bytes(b'{"dtype": "\xff"}')
    with pytest.raises(ValueError, match="invalid KV cache metadata"):
        load_kv_cache(str(cache_file))
