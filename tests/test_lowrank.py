"""Low-rank projection (issue 12): calibration, preset files, and the binary against the torch reference.

The binary's reconstruction of every projected tensor must equal, bit for bit,
``validation.reference_lowrank.encode_lowrank_reference`` run on the plan the container's index
records, for golden containers and for fresh synthetic caches over several plans; hostile bases
are refused with exit 3.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pytest
import torch
from safetensors.torch import load_file, save_file

from validation.calibrate import SCORED_END, calibration_windows
from validation.lowrank import CoefficientPlan, PCAAccumulator, fit_bases, load_bases, rank_for_energy, write_preset
from validation.options import ValidationError
from validation.reference_codec import TensorPlan
from validation.reference_lowrank import encode_lowrank_reference, project_reference, reconstruct_reference

GOLDEN = Path(__file__).resolve().parent.parent / "pkg" / "compression" / "testdata" / "golden"


def run_bin(binary: str, *args: str, cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    return subprocess.run([binary, *args], capture_output=True, text=True, cwd=cwd)


def index_of(container: Path) -> List[Dict[str, Any]]:
    """The ``tensors`` index of a container, read from its safetensors header."""
    raw = container.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(json.loads(raw[8:8 + n])["__metadata__"]["tensors"])


def plan_of(entry: Dict[str, Any], codec_group: int) -> TensorPlan:
    """The plan an index entry records (absent fields take format 1's defaults)."""
    return TensorPlan(scheme=entry.get("scheme", "sym"), bits=int(entry["mode"][3:]), axis=entry.get("axis", "last"),
                      rotate=entry.get("rotate", "none"), sink=entry.get("sink", 0), group=entry.get("group_size") or codec_group)


def check_against_reference(container: Path, source: Dict[str, torch.Tensor], restored: Dict[str, torch.Tensor],
                            bases: Dict[str, Any]) -> int:
    """Assert every projected tensor of ``container`` restores as the reference says; return how many."""
    count = 0
    for e in index_of(container):
        if "projection" not in e:
            continue
        basis, mean = bases[e["name"]]
        assert e["projection"]["rank"] == basis.shape[2] and e["projection"]["heads"] == basis.shape[0]
        ref = encode_lowrank_reference(source[e["name"]], basis, mean, 64, plan=plan_of(e, 64))
        got = restored[e["name"]]
        assert got.dtype == ref.reconstruction.dtype
        same = got.contiguous().view(torch.uint8).reshape(-1) == ref.reconstruction.contiguous().view(torch.uint8).reshape(-1)
        assert bool(same.all()), f"{e['name']}: {int((~same).sum())} bytes differ from the reference"
        count += 1
    return count


@pytest.mark.parametrize("preset", ["lowrank-v16", "lowrank-kv8-f32"])
def test_golden_projection_matches_reference(preset: str, kv_compress_bin: str, tmp_path: Path) -> None:
    container = GOLDEN / "containers" / f"v2_long_f16_{preset}.kvc"
    restored = tmp_path / "restored.safetensors"
    r = run_bin(kv_compress_bin, "decompress", "-i", str(container), "-o", str(restored))
    assert r.returncode == 0, r.stderr
    _, bases = load_bases(GOLDEN / "projection" / f"{preset}.json")
    n = check_against_reference(container, load_file(str(GOLDEN / "long_f16.safetensors")), load_file(str(restored)), bases)
    assert n == len(bases) >= 1


def synthetic_cache(layers: int, heads: int, seq: int, dim: int, dtype: torch.dtype, seed: int) -> Dict[str, torch.Tensor]:
    """[1, heads, seq, dim] keys and values with a decaying spectrum (a few strong directions), like real caches."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    scale = torch.tensor([2.0 / (1 + k) for k in range(dim)])
    for i in range(layers):
        for role in ("key", "value"):
            q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
            z = torch.randn(1, heads, seq, dim, generator=g) * scale
            out[f"layer_{i}_{role}"] = (z.double() @ q.T).to(dtype) + 0.1
    return out


def fitted(cache: Dict[str, torch.Tensor]) -> Dict[str, PCAAccumulator]:
    acc = {}
    for name, t in cache.items():
        acc[name] = PCAAccumulator(kv_heads=t.shape[1], head_dim=t.shape[3])
        acc[name].add(t.float())
    return acc


PLANS = [
    ("v r16 sym4 channel f16", 16, ("value",), CoefficientPlan(), torch.float16, []),
    ("kv r24 asym8 channel f32 sink0", 24, ("key", "value"), CoefficientPlan(bits=8, scheme="asym", group_size=32), torch.float32, ["--sink", "0"]),
    ("v r32 sym4 token g32 hadamard", 32, ("value",), CoefficientPlan(axis="token", group_size=32, rotate="hadamard"), torch.float16, []),
    ("v r12 asym3 channel g128 bf16 cache", 12, ("value",), CoefficientPlan(bits=3, scheme="asym", group_size=128), torch.float16, []),
    ("v r48 sym2 channel", 48, ("value",), CoefficientPlan(bits=2), torch.float32, ["--sink", "3"]),
]


@pytest.mark.parametrize("rank,roles,plan,dtype,flags", [p[1:] for p in PLANS], ids=[p[0] for p in PLANS])
def test_binary_matches_reference(rank: int, roles: Sequence[str], plan: CoefficientPlan, dtype: torch.dtype,
                                  flags: List[str], kv_compress_bin: str, tmp_path: Path) -> None:
    cache_dtype = torch.bfloat16 if "bf16" in str(plan) or rank == 12 else torch.float16
    cache = synthetic_cache(2, 3, 150, 64, cache_dtype, seed=rank)
    save_file(cache, str(tmp_path / "cache.safetensors"))
    bases = fit_bases(fitted(cache), 2, rank=rank, roles=roles)
    write_preset(bases, tmp_path / "p.json", model="synthetic", coefficients=plan, rank=rank, energy=None,
                 calibration={"corpus": "synthetic"}, dtype=dtype)
    r = run_bin(kv_compress_bin, "compress", "-i", str(tmp_path / "cache.safetensors"), "-o", str(tmp_path / "c.kvc"),
                "--preset", str(tmp_path / "p.json"), *flags)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["bytes_by_part"]["bases"] > 0
    r = run_bin(kv_compress_bin, "decompress", "-i", str(tmp_path / "c.kvc"), "-o", str(tmp_path / "r.safetensors"))
    assert r.returncode == 0, r.stderr
    _, stored = load_bases(tmp_path / "p.json")
    n = check_against_reference(tmp_path / "c.kvc", cache, load_file(str(tmp_path / "r.safetensors")), stored)
    assert n == 2 * len(roles)


def test_reference_projection_is_exact_at_full_rank() -> None:
    """With a full orthonormal basis the projection and reconstruction undo each other (to float32 rounding)."""
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    basis, mean = q.float()[None], torch.randn(1, 16)
    rows = torch.randn(2, 5, 16)
    back = reconstruct_reference(project_reference(rows, basis, mean), basis, mean)
    assert torch.allclose(back, rows, atol=1e-5)


def test_rank_for_energy() -> None:
    vals = torch.tensor([[8.0, 1.0, 0.5, 0.5], [4.0, 4.0, 1.0, 1.0]])
    assert rank_for_energy(vals, 0.8) == 2  # head 0 needs 1, head 1 needs 2: the larger
    assert rank_for_energy(vals, 1.0) == 4
    with pytest.raises(ValueError, match="energy must be in"):
        rank_for_energy(vals, 1.5)


def test_fit_bases_identity_layers_and_full_rank() -> None:
    cache = synthetic_cache(3, 2, 64, 32, torch.float32, seed=1)
    bases = fit_bases(fitted(cache), 3, rank=8, roles=("value",), identity_layers=[1])
    assert sorted(bases.tensors) == ["layer_0_value", "layer_2_value"]
    basis, _ = bases.tensors["layer_0_value"]
    gram = basis.transpose(1, 2) @ basis
    assert torch.allclose(gram, torch.eye(8, dtype=gram.dtype).expand_as(gram), atol=1e-9)
    assert fit_bases(fitted(cache), 3, energy=1.0).tensors == {}  # full rank everywhere: nothing projected
    with pytest.raises(ValueError, match="exactly one of rank and energy"):
        fit_bases(fitted(cache), 3)


def test_calibration_windows_are_disjoint_from_scored_ones() -> None:
    starts = calibration_windows(9589, SCORED_END, 1024, 4)
    assert starts[0] >= SCORED_END == 4864 and len(starts) == 4
    assert calibration_windows(9589, SCORED_END, 1024, 10)[-1] + 1024 <= 9589
    with pytest.raises(ValidationError, match="no window of 1024 fits"):
        calibration_windows(5000, SCORED_END, 1024, 1)


@pytest.mark.parametrize("damage,exit_code,says", [
    ("nan", 3, "basis element"),
    ("huge-rank", 3, "rank"),
    ("wrong-shape", 3, "want [heads, head_dim, rank]"),
    ("sha", 3, "SHA-256"),
], ids=["nan-basis", "rank-beyond-head-dim", "mean-shape", "sha-mismatch"])
def test_hostile_bases_refused(damage: str, exit_code: int, says: str, kv_compress_bin: str, tmp_path: Path) -> None:
    cache = synthetic_cache(1, 2, 40, 32, torch.float16, seed=3)
    save_file(cache, str(tmp_path / "cache.safetensors"))
    bases = fit_bases(fitted(cache), 1, rank=8)
    preset = write_preset(bases, tmp_path / "p.json", model="synthetic", coefficients=CoefficientPlan(), rank=8,
                          energy=None, calibration={}, dtype=torch.float32)
    bases_path = tmp_path / preset["projection"]["bases"]
    raw = load_file(str(bases_path))
    if damage == "nan":
        raw["layer_0_value.basis"][0, 0, 0] = float("nan")
    elif damage == "huge-rank":
        raw["layer_0_value.basis"] = torch.zeros(2, 32, 40)
    elif damage == "wrong-shape":
        raw["layer_0_value.mean"] = torch.zeros(2, 31)
    if damage != "sha":
        save_file(raw, str(bases_path))
        import hashlib
        preset["projection"]["sha256"] = hashlib.sha256(bases_path.read_bytes()).hexdigest()
        preset["projection"].pop("layers")
    else:
        preset["projection"]["sha256"] = "0" * 64
    (tmp_path / "p.json").write_text(json.dumps(preset))
    out = tmp_path / "c.kvc"
    r = run_bin(kv_compress_bin, "compress", "-i", str(tmp_path / "cache.safetensors"), "-o", str(out), "--preset", str(tmp_path / "p.json"))
    assert r.returncode == exit_code, r.stderr
    assert says in r.stderr and "p.json" in r.stderr and not out.exists()
    assert json.loads(r.stdout)["exit_code"] == exit_code


def test_merge_sets_what_is_not_projected(kv_compress_bin: str, tmp_path: Path) -> None:
    """--merge: the keys follow the merged preset (2-bit here), the projected values their own plan."""
    from validation.calibrate import _merge

    merged = _merge(str(GOLDEN.parent.parent.parent.parent / "docs" / "experiments" / "presets" / "compact-2bit-vasym.json"))
    cache = synthetic_cache(1, 2, 128, 64, torch.float16, seed=5)
    save_file(cache, str(tmp_path / "cache.safetensors"))
    preset = write_preset(fit_bases(fitted(cache), 1, rank=16), tmp_path / "m.json", model="synthetic",
                          coefficients=CoefficientPlan(bits=4), rank=16, energy=None, calibration={}, merge=merged)
    assert preset["base"] == "compact" and preset["codec"] == {"bits": 2} and preset["layers"][-1]["values"]["bits"] == 4
    r = run_bin(kv_compress_bin, "compress", "-i", str(tmp_path / "cache.safetensors"), "-o", str(tmp_path / "c.kvc"),
                "--preset", str(tmp_path / "m.json"))
    assert r.returncode == 0, r.stderr
    modes = {e["name"]: (e["mode"], "projection" in e) for e in index_of(tmp_path / "c.kvc")}
    assert modes == {"layer_0_key": ("int2", False), "layer_0_value": ("int4", True)}
