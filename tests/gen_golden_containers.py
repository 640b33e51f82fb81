"""Add golden containers of the binary's current format version to ``pkg/compression/testdata/golden/containers``.

Run from the repository root after ``make build-compress``:
``.venv/bin/python tests/gen_golden_containers.py``. For each case below it
compresses one golden input with the real binary, restores it, and records in
``vN.json`` (N = the binary's format version) the container's SHA-256 and the
SHA-256 of every restored tensor. Containers already listed are never
rewritten: a released version keeps decoding to the same bytes forever
(``pkg/compression/golden_containers_test.go`` and ``tests/test_golden.py``
check every manifest). New cases are appended.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "pkg" / "compression" / "testdata" / "golden"
BIN = REPO / "bin" / "kv-compress"

# (input file, case name, compress flags). Version 1's cases, then cases for
# what version 2 added (entropy stages, presets, per-role plans, nf, steps).
CASES: List[Tuple[str, str, List[str]]] = [
    ("cache_f16.safetensors", "default", []),
    ("cache_f16.safetensors", "seed", ["--seed-scheme"]),
    ("cache_bf16.safetensors", "asym-g32", ["--seed-scheme", "--scheme", "asym", "--group-size", "32"]),
    ("cache_f32.safetensors", "hadamard-asym-sink1", ["--scheme", "asym", "--key-axis", "token"]),
    ("long_f16.safetensors", "asym-channel-g32", ["--scheme", "asym", "--rotate", "none", "--group-size", "32"]),
    ("long_f16.safetensors", "bits2", ["--seed-scheme", "--bits", "2", "--group-size", "32"]),
    ("long_f16.safetensors", "k8v3", ["--key-bits", "8", "--value-bits", "3"]),
    ("mixed.safetensors", "bits8-sink1", ["--bits", "8", "--group-size", "32"]),
    ("ties_f32.safetensors", "seed-g32", ["--seed-scheme", "--group-size", "32"]),
    ("long_f16.safetensors", "sparse-zstd", ["--sparsity", "0.97", "--rotate", "none"]),
    ("long_f16.safetensors", "preset-compact", ["--preset", "compact"]),
    ("cache_f16.safetensors", "preset-near-lossless", ["--preset", "near-lossless"]),
    # Token selection (docs/format.md section 9): positions tensors stored as bitmaps.
    ("selected_f16.safetensors", "selection", []),
    # The nf scheme and steps (issue 11); a preset file's path is relative to the repository root.
    ("long_f16.safetensors", "nf3", ["--scheme", "nf", "--bits", "3"]),
    ("cache_f16.safetensors", "nf4-g32", ["--scheme", "nf", "--bits", "4", "--group-size", "32"]),
    ("long_f16.safetensors", "preset-nf-steps", ["--preset", "pkg/compression/testdata/golden/presets/nf-steps.json"]),
    # The compact preset once it became steps in 4-bit codes (long_f16 holds the earlier compact's container).
    ("cache_f16.safetensors", "preset-compact-steps", ["--preset", "compact"]),
    # Low-rank projection (issue 12): presets written by tests/gen_golden_bases.py, preset paths relative to the repository root.
    ("long_f16.safetensors", "lowrank-v16", ["--preset", "pkg/compression/testdata/golden/projection/lowrank-v16.json"]),
    ("long_f16.safetensors", "lowrank-kv8-f32", ["--preset", "pkg/compression/testdata/golden/projection/lowrank-kv8-f32.json"]),
]

# Golden inputs this script writes itself when they are missing (the Go golden
# test writes the others); once committed they are never rewritten.
SELECTED_INPUT = "selected_f16.safetensors"


def write_selected_input(path: Path) -> None:
    """A token-selected cache: 2 layers of keys/values [1, 2, 24, 64] float16 and
    ``layer_{i}_positions`` [1, 2, 24] int32, sorted indices drawn from a context of 48
    (metadata ``context_length``); one head keeps the first and last positions."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(12)
    tensors = {}
    for i in range(2):
        tensors[f"layer_{i}_key"] = (torch.randn(1, 2, 24, 64, generator=g) * 2).to(torch.float16)
        tensors[f"layer_{i}_value"] = torch.randn(1, 2, 24, 64, generator=g).to(torch.float16)
        rows = [torch.randperm(48, generator=g)[:24].sort().values for _ in range(2)]
        rows[0] = torch.cat([torch.arange(12), torch.arange(36, 48)])
        tensors[f"layer_{i}_positions"] = torch.stack(rows).unsqueeze(0).to(torch.int32).contiguous()
    save_file(tensors, str(path), metadata={"context_length": "48"})



@dataclass
class ContainerCase:
    """One manifest entry: a container and the hashes it restores to."""

    container: str
    input: str
    flags: List[str]
    container_sha256: str
    reconstruction_sha256: Dict[str, str] = field(default_factory=dict)


def sha256(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def tensor_hashes(path: Path) -> Dict[str, str]:
    """SHA-256 of each tensor's raw bytes in a safetensors file, read without any library."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    return {name: sha256(data[v["data_offsets"][0]:v["data_offsets"][1]])
            for name, v in header.items() if name != "__metadata__"}


def binary_format_version() -> int:
    """The container version the built binary writes (from ``kv-compress version``)."""
    out = subprocess.run([str(BIN), "version"], check=True, capture_output=True, text=True).stdout
    return int(json.loads(out)["format_version"])


def main() -> int:
    version = binary_format_version()
    manifest = GOLDEN / "containers" / f"v{version}.json"
    doc = json.loads(manifest.read_text()) if manifest.exists() else {
        "format_version": version, "written_by": "", "cases": []}
    known = {c["container"] for c in doc["cases"]}
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    added = 0
    if not (GOLDEN / SELECTED_INPUT).exists():
        write_selected_input(GOLDEN / SELECTED_INPUT)
    with tempfile.TemporaryDirectory() as tmp:
        for inp, name, flags in CASES:
            rel = f"containers/v{version}_{inp.split('.')[0]}_{name}.kvc"
            if rel in known:
                continue
            target = GOLDEN / rel
            if target.exists():
                print(f"{target}: exists but is not in {manifest.name}; remove it or add it by hand", file=sys.stderr)
                return 1
            subprocess.run([str(BIN), "compress", "-i", str(GOLDEN / inp), "-o", str(target), *flags],
                           check=True, capture_output=True, cwd=REPO)
            restored = Path(tmp) / "restored.safetensors"
            subprocess.run([str(BIN), "decompress", "-i", str(target), "-o", str(restored)], check=True, capture_output=True)
            case = ContainerCase(rel, inp, flags, sha256(target.read_bytes()), tensor_hashes(restored))
            doc["cases"].append(asdict(case))
            added += 1
    if added:
        doc["written_by"] = (doc["written_by"] + ", " if doc["written_by"] else "") + f"kv-compress {rev}"
        manifest.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{manifest}: {added} containers added, {len(doc['cases'])} in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
