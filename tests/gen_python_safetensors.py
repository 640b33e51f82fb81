"""Write safetensors files with the Python ``safetensors`` library for the Go reader's tests.

Run from the repository root: ``.venv/bin/python tests/gen_python_safetensors.py``.
Each ``NAME.safetensors`` gets a ``NAME.json`` manifest (dtype, shape and SHA-256 of
each tensor's bytes) that ``pkg/safetensors`` checks against what it reads.
The files are committed; ``tests/test_interop.py`` checks they are still what
this script produces.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent.parent / "pkg" / "safetensors" / "testdata" / "python"


def cases() -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str] | None]]:
    """The files to write: name -> (tensors, metadata)."""
    g = torch.Generator().manual_seed(7)
    cache = {}
    for i in range(2):
        cache[f"layer_{i}_key"] = torch.randn(1, 2, 5, 64, generator=g).to(torch.float16)
        cache[f"layer_{i}_value"] = torch.randn(1, 2, 5, 64, generator=g).to(torch.float16)
    return {
        "empty": ({}, None),
        "metadata_only": ({}, {"format": "pt", "note": "no tensors"}),
        "scalar": ({"s": torch.tensor(3.5, dtype=torch.float32)}, None),
        "zero_sized": ({"z": torch.zeros(0, 64, dtype=torch.float16), "a": torch.arange(3, dtype=torch.int64)}, None),
        "cache_f16": (cache, {"model": "test"}),
        "cache_bf16": ({k: v.to(torch.bfloat16) for k, v in cache.items()}, None),
        "mixed": (
            {
                "f32": torch.randn(3, 64, generator=g),
                "f64": torch.randn(2, 32, generator=g, dtype=torch.float64),
                "i8": torch.arange(-4, 4, dtype=torch.int8),
                "b": torch.tensor([True, False, True]),
                "u8": torch.arange(5, dtype=torch.uint8),
            },
            None,
        ),
    }


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The little-endian bytes of ``t`` as safetensors stores them (any shape, scalars included)."""
    if t.numel() == 0:
        return b""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, (tensors, meta) in cases().items():
        save_file(tensors, str(OUT / f"{name}.safetensors"), metadata=meta)
        dtypes = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
                  torch.int64: "I64", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
        manifest = {
            "metadata": meta or {},
            "tensors": {
                k: {
                    "dtype": dtypes[v.dtype],
                    "shape": list(v.shape),
                    "sha256": hashlib.sha256(tensor_bytes(v)).hexdigest(),
                }
                for k, v in tensors.items()
            },
        }
        (OUT / f"{name}.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
