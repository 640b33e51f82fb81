"""Write the projection presets that golden containers with a low-rank projection use.

Run from the repository root: ``.venv/bin/python tests/gen_golden_bases.py``, then
``tests/gen_golden_containers.py``. The bases are a PCA of the golden input
``long_f16.safetensors`` itself (per KV head, float64 moments), written by
``validation.lowrank.write_preset`` into ``pkg/compression/testdata/golden/projection/``.
Files already there are never rewritten: the golden containers embed these bases, and the
manifests record the presets' names.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from validation.lowrank import CoefficientPlan, PCAAccumulator, fit_bases, write_preset  # noqa: E402

GOLDEN = REPO / "pkg" / "compression" / "testdata" / "golden"
OUT = GOLDEN / "projection"

# (preset file, rank, roles, coefficient plan, bases dtype)
PRESETS = [
    ("lowrank-v16.json", 16, ("value",), CoefficientPlan(bits=4, scheme="sym", axis="channel", group_size=64), torch.float16),
    ("lowrank-kv8-f32.json", 8, ("key", "value"), CoefficientPlan(bits=8, scheme="asym", axis="channel", group_size=32), torch.float32),
]


def write(name: str, rank: int, roles: Sequence[str], plan: CoefficientPlan, dtype: torch.dtype) -> bool:
    """Write one preset and its bases unless it exists; True when written."""
    path = OUT / name
    if path.exists():
        return False
    tensors = load_file(str(GOLDEN / "long_f16.safetensors"))
    acc = {}
    for tname, t in tensors.items():
        acc[tname] = PCAAccumulator(kv_heads=t.shape[1], head_dim=t.shape[3])
        acc[tname].add(t.float())
    bases = fit_bases(acc, 1, rank=rank, roles=roles)
    write_preset(bases, path, model="golden long_f16.safetensors", coefficients=plan, rank=rank, energy=None,
                 calibration={"corpus": "long_f16.safetensors (the golden input itself)"}, dtype=dtype)
    return True


def main() -> int:
    OUT.mkdir(exist_ok=True)
    written = [p[0] for p in PRESETS if write(*p)]
    print(f"{OUT}: wrote {written or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
