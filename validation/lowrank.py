"""PCA bases for kv-compress's low-rank projection, and the preset files that name them.

The projection (docs/format.md section 10) maps each row ``x`` [head_dim] of a key or value
tensor, per KV head, to ``r`` coefficients ``c = (x − mean) · B`` (``B`` [head_dim, r], orthonormal
columns); kv-compress quantizes the coefficients and rebuilds ``ĉ · Bᵀ + mean``. This module fits
``B`` and ``mean`` by PCA on calibration caches and writes them as a preset:

* ``NAME.json``: a kv-compress preset file (docs/cli.md) whose ``projection`` object names the
  bases file, its SHA-256, the model's geometry, the ranks per layer and the calibration data;
  its ``layers`` plans give the projected tensors' coefficients their own quantization;
* ``NAME.bases.safetensors``: per projected tensor ``layer_{i}_{key|value}.basis``
  [kv_heads, head_dim, r] and ``.mean`` [kv_heads, head_dim], float16 by default.

The bases live in a sidecar rather than in the JSON: a SmolLM2 rank-32 value set is 368 KB as
float16 and would be several MB of decimal text (docs/decisions/ADR-008-low-rank-projection.md).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

ROLES = ("key", "value")


@dataclass
class PCAAccumulator:
    """Running first and second moments of one tensor's rows, per KV head, in float64.

    ``add`` takes a tensor [batch, kv_heads, seq, head_dim]; ``fit`` returns per head the
    eigenvalues (descending) [kv_heads, head_dim], eigenvectors [kv_heads, head_dim, head_dim]
    (columns in the same order) and the mean [kv_heads, head_dim].
    """

    kv_heads: int
    head_dim: int
    count: int = 0
    total: Optional[torch.Tensor] = None  # [kv_heads, head_dim]
    outer: Optional[torch.Tensor] = None  # [kv_heads, head_dim, head_dim]

    def add(self, x: torch.Tensor) -> None:
        """Accumulate the rows of ``x`` [batch, kv_heads, seq, head_dim]."""
        if x.dim() != 4 or x.shape[1] != self.kv_heads or x.shape[3] != self.head_dim:
            raise ValueError(f"expected [batch, {self.kv_heads}, seq, {self.head_dim}], got {list(x.shape)}")
        rows = x.detach().to(torch.float64).permute(1, 0, 2, 3).reshape(self.kv_heads, -1, self.head_dim)
        if self.total is None:
            self.total = torch.zeros(self.kv_heads, self.head_dim, dtype=torch.float64)
            self.outer = torch.zeros(self.kv_heads, self.head_dim, self.head_dim, dtype=torch.float64)
        self.total += rows.sum(dim=1)
        self.outer += rows.transpose(1, 2) @ rows
        self.count += rows.shape[1]

    def fit(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(eigenvalues [H, D] descending, eigenvectors [H, D, D], mean [H, D]) of the centred rows."""
        if self.count < 2 or self.total is None or self.outer is None:
            raise ValueError(f"PCA needs at least 2 rows, got {self.count}")
        mean = self.total / self.count
        cov = self.outer / self.count - mean.unsqueeze(2) * mean.unsqueeze(1)
        cov = (cov + cov.transpose(1, 2)) / 2
        vals, vecs = torch.linalg.eigh(cov)  # ascending
        vals, vecs = vals.flip(-1).clamp_min(0), vecs.flip(-1)
        return vals, vecs, mean


def rank_for_energy(eigenvalues: torch.Tensor, energy: float) -> int:
    """Smallest r whose top-r eigenvalues explain at least ``energy`` of the total, for every head.

    ``eigenvalues`` is [kv_heads, head_dim], each row descending; ``energy`` in (0, 1].
    """
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    total = eigenvalues.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    frac = eigenvalues.cumsum(dim=-1) / total
    per_head = (frac < energy - 1e-12).sum(dim=-1) + 1
    return int(min(per_head.max().item(), eigenvalues.shape[-1]))


def explained_energy(eigenvalues: torch.Tensor, rank: int) -> float:
    """Fraction of the variance that the top ``rank`` directions keep, averaged over heads ([H, D] input)."""
    total = eigenvalues.sum(dim=-1).clamp_min(1e-300)
    return float((eigenvalues[:, :rank].sum(dim=-1) / total).mean().item())


@dataclass
class CoefficientPlan:
    """How the projected tensors' coefficients are quantized (a kv-compress role plan).

    Groups run along the tokens, one coefficient at a time (``axis`` "channel"), since each
    principal direction has its own variance; no rotation (it would mix them again).
    """

    bits: int = 4
    scheme: str = "sym"
    axis: str = "channel"
    group_size: int = 64
    rotate: str = "none"

    def to_dict(self) -> Dict[str, Any]:
        """The role-plan object of a preset file."""
        return {"bits": self.bits, "scheme": self.scheme, "axis": self.axis, "group_size": self.group_size,
                "rotate": self.rotate}


@dataclass
class Bases:
    """Fitted bases: ``tensors`` maps ``layer_{i}_{key|value}`` to (basis [H, D, r], mean [H, D]), float64."""

    num_layers: int
    kv_heads: int
    head_dim: int
    tensors: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    energy: Dict[str, float] = field(default_factory=dict)  # explained energy per tensor

    def rank_of(self, name: str) -> int:
        """The rank of tensor ``name``; 0 when it stays identity."""
        return int(self.tensors[name][0].shape[-1]) if name in self.tensors else 0


def fit_bases(
    accumulators: Dict[str, PCAAccumulator],
    num_layers: int,
    *,
    rank: Optional[int] = None,
    energy: Optional[float] = None,
    roles: Sequence[str] = ("value",),
    identity_layers: Sequence[int] = (),
) -> Bases:
    """Bases for every ``layer_{i}_{role}`` of ``roles`` whose layer is not in ``identity_layers``.

    Exactly one of ``rank`` (1..head_dim) and ``energy`` (0, 1] chooses each tensor's rank; by
    energy, the smallest rank that keeps that share of the variance for every head. A rank
    equal to head_dim keeps the tensor identity (projection would only cost bytes).
    """
    if (rank is None) == (energy is None):
        raise ValueError(f"give exactly one of rank and energy, got rank={rank!r}, energy={energy!r}")
    bad = [r for r in roles if r not in ROLES]
    if bad:
        raise ValueError(f"roles must be among {list(ROLES)}, got {bad}")
    first = next(iter(accumulators.values()))
    out = Bases(num_layers=num_layers, kv_heads=first.kv_heads, head_dim=first.head_dim)
    if rank is not None and not 1 <= rank <= first.head_dim:
        raise ValueError(f"rank must be in [1, {first.head_dim}], got {rank}")
    for layer in range(num_layers):
        if layer in identity_layers:
            continue
        for role in roles:
            name = f"layer_{layer}_{role}"
            vals, vecs, mean = accumulators[name].fit()
            r = rank if rank is not None else rank_for_energy(vals, float(energy))
            if r >= first.head_dim:
                continue
            out.tensors[name] = (vecs[:, :, :r].contiguous(), mean)
            out.energy[name] = explained_energy(vals, r)
    return out


def _round_basis(basis: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``basis`` in ``dtype``, every element within [-1, 1] as kv-compress requires."""
    return basis.clamp(-1.0, 1.0).to(dtype)


def write_preset(
    bases: Bases,
    path: os.PathLike | str,
    *,
    model: str,
    coefficients: CoefficientPlan,
    rank: Optional[int],
    energy: Optional[float],
    calibration: Dict[str, Any],
    dtype: torch.dtype = torch.float16,
    name: Optional[str] = None,
    description: str = "",
    base: str = "default",
    merge: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Write ``path`` (the preset JSON) and its bases file ``<stem>.bases.safetensors`` beside it.

    Returns the preset as written. ``dtype`` (float16 or float32) is the bases' stored dtype.
    ``merge`` (a preset file's ``base``, ``codec``, ``keys``, ``values``, ``layers``) sets what is
    not projected; ``base`` applies when it names none. Its layer plans come first, so the
    projected tensors' coefficient plans override them.
    """
    merge = merge or {}
    from safetensors.torch import save_file

    if dtype not in (torch.float16, torch.float32):
        raise ValueError(f"dtype must be torch.float16 or torch.float32, got {dtype}")
    path = Path(path)
    stem = path.name[:-5] if path.name.endswith(".json") else path.name
    bases_path = path.with_name(stem + ".bases.safetensors")
    tensors: Dict[str, torch.Tensor] = {}
    for tname, (basis, mean) in sorted(bases.tensors.items()):
        tensors[f"{tname}.basis"] = _round_basis(basis, dtype).contiguous()
        tensors[f"{tname}.mean"] = mean.to(dtype).contiguous()
    tmp = bases_path.with_name("." + bases_path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "kv-compress-bases", "model": model})
    os.chmod(tmp, 0o644)
    os.replace(tmp, bases_path)
    digest = hashlib.sha256(bases_path.read_bytes()).hexdigest()
    layers = [{"layer": i, "keys": bases.rank_of(f"layer_{i}_key"), "values": bases.rank_of(f"layer_{i}_value")}
              for i in range(bases.num_layers)]
    projected = sorted({i for i in range(bases.num_layers) for role in ROLES if f"layer_{i}_{role}" in bases.tensors})
    plans: List[Dict[str, Any]] = []
    for role, key in (("key", "keys"), ("value", "values")):
        which = [i for i in projected if f"layer_{i}_{role}" in bases.tensors]
        if which:
            plans.append({"layers": which, key: coefficients.to_dict()})
    preset = {
        "name": name or stem,
        "description": description or f"low-rank projection ({_what(rank, energy)}) of {model}'s cache, "
                                      f"coefficients {coefficients.bits}-bit",
        "base": merge.get("base", base),
        **{k: merge[k] for k in ("codec", "keys", "values") if k in merge},
        "layers": [*merge.get("layers", []), *plans],
        "projection": {
            "bases": bases_path.name, "sha256": digest, "model": model, "head_dim": bases.head_dim,
            "n_layers": bases.num_layers, "n_kv_heads": bases.kv_heads, "rank": rank or 0, "energy": energy or 0,
            "layers": layers, "calibration": {**calibration, "explained_energy": _rounded(bases.energy)},
        },
    }
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(preset, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return preset


def _what(rank: Optional[int], energy: Optional[float]) -> str:
    return f"rank {rank}" if rank is not None else f"{energy:.0%} of the energy"


def _rounded(d: Dict[str, float]) -> Dict[str, float]:
    return {k: round(v, 5) for k, v in sorted(d.items())}


def load_bases(preset_path: os.PathLike | str) -> Tuple[Dict[str, Any], Dict[str, Tuple[torch.Tensor, torch.Tensor]]]:
    """A preset file and its bases: (the preset dict, {tensor: (basis [H, D, r], mean [H, D])}).

    Raises ValueError when the bases file's SHA-256 is not the one the preset names.
    """
    from safetensors.torch import load_file

    path = Path(preset_path)
    preset = json.loads(path.read_text(encoding="utf-8"))
    proj = preset.get("projection")
    if not isinstance(proj, dict):
        raise ValueError(f"{path}: no projection object")
    bases_path = path.parent / proj["bases"]
    digest = hashlib.sha256(bases_path.read_bytes()).hexdigest()
    if digest != proj["sha256"]:
        raise ValueError(f"{bases_path}: SHA-256 {digest}, the preset says {proj['sha256']}")
    raw = load_file(str(bases_path))
    out = {}
    for key, t in raw.items():
        if key.endswith(".basis"):
            tname = key[: -len(".basis")]
            out[tname] = (t, raw[tname + ".mean"])
    return preset, out
