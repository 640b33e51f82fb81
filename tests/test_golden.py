"""The Go golden vectors, checked against the independent torch reference and the real binary.

``pkg/compression/testdata/golden/golden.json`` lists, for small inputs and several
codec settings, the float16 scales, packed codes and reconstruction hash that the
Go codec produces. Both languages test against the same file, so neither can
drift from the written format without a test failing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from safetensors.torch import load_file

from validation.compression_bridge import compress_kv_cache, decompress_kv_cache
from validation.reference_codec import decode_reference, encode_reference, plan_for

GOLDEN = Path(__file__).resolve().parent.parent / "pkg" / "compression" / "testdata" / "golden"


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Little-endian bytes of ``t`` as safetensors stores them."""
    if t.numel() == 0:
        return b""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(tensor_bytes(t)).hexdigest()


def load_cases() -> List[Dict[str, Any]]:
    """The cases of golden.json (format 1's options), golden_v2.json (per-role plans) and golden_nf.json (nf, steps)."""
    cases = []
    for name in ("golden.json", "golden_v2.json", "golden_nf.json"):
        cases += json.loads((GOLDEN / name).read_text())["cases"]
    return cases


CASES = load_cases()
CODEC_KEYS = ("scheme", "rotate", "key_axis", "sink", "bits", "key_bits", "value_bits", "roles")


def case_id(c: Dict[str, Any]) -> str:
    extra = "-".join(f"{k}={c[k]}" for k in CODEC_KEYS if k in c and k != "roles")
    if "roles" in c:
        extra += "-roles=" + "+".join(sorted(c["roles"]))
    return f"{c['input'].split('.')[0]}-G{c['group_size']}-s{c['sparsity']}" + (f"-{extra}" if extra else "")


SEED = {"scheme": "sym", "rotate": "none", "key_axis": "token", "sink": 0, "bits": 4}


def codec_kwargs(c: Dict[str, Any]) -> Dict[str, Any]:
    """The case's codec options as keyword arguments of plan_for and compress_kv_cache.

    An option a case leaves out means the seed's choice (as in Go's zero-valued
    Config), not the binary's current default, so it is passed explicitly.
    """
    return {**SEED, **{k: c[k] for k in CODEC_KEYS if k in c}}


IDS = [case_id(c) for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_matches_golden(case: Dict[str, Any]) -> None:
    tensors = load_file(str(GOLDEN / case["input"]))
    assert set(tensors) == set(case["tensors"])
    for name, want in case["tensors"].items():
        t = tensors[name]
        if want["mode"] == "stored":
            assert sha(t) == want["reconstruction_sha256"], name
            continue
        plan = plan_for(name, tuple(t.shape), **codec_kwargs(case))
        assert (plan.scheme, plan.axis, plan.rotate, plan.sink) == (
            want.get("scheme", "sym"), want.get("axis", "last"), want.get("rotate", "none"), want.get("sink", 0)), name
        assert want["mode"] == f"int{plan.bits}", name
        assert want.get("group_size", case["group_size"]) == (plan.group or case["group_size"]), name
        enc = encode_reference(t, case["group_size"], case["sparsity"], plan=plan)
        assert tensor_bytes(enc.scales).hex() == want["scales"], f"{name}: scales differ"
        assert tensor_bytes(enc.codes).hex() == want["codes"], f"{name}: codes differ"
        assert (tensor_bytes(enc.mins).hex() if enc.mins is not None else "") == want.get("mins", ""), f"{name}: mins differ"
        assert (tensor_bytes(enc.sink_rows).hex() if enc.sink_rows is not None else "") == want.get("sink_rows", ""), name
        assert sha(enc.reconstruction) == want["reconstruction_sha256"], f"{name}: reconstruction differs"
        if plan == plan_for(name, tuple(t.shape)):  # version-1 scheme: the stand-alone decoder agrees
            decoded = decode_reference(enc.codes, enc.scales, case["group_size"], t.shape, t.dtype)
            assert torch.equal(decoded, enc.reconstruction)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_binary_matches_golden(case: Dict[str, Any], kv_compress_bin: str, tmp_path: Path) -> None:
    packed, restored = tmp_path / "x.kvc", tmp_path / "x.safetensors"
    codec = codec_kwargs(case)
    roles = codec.pop("roles", None)
    if roles is not None:  # per-role plans reach the binary through a preset file
        preset = tmp_path / "preset.json"
        preset.write_text(json.dumps({"name": "golden", **roles}))
        codec["preset"] = str(preset)
    compress_kv_cache(str(GOLDEN / case["input"]), str(packed), group_size=case["group_size"], sparsity=case["sparsity"],
                      **codec)
    decompress_kv_cache(str(packed), str(restored))
    out = load_file(str(restored))
    for name, want in case["tensors"].items():
        assert sha(out[name]) == want["reconstruction_sha256"], name


def test_ties_round_half_to_even() -> None:
    """The hand-made tie row decodes to round-half-to-even codes (scale exactly 1)."""
    t = load_file(str(GOLDEN / "ties_f32.safetensors"))["ties"]
    enc = encode_reference(t, 64)
    assert enc.scales[0].item() == 1.0
    row = t[0]
    expected = torch.round(row)  # torch.round is half-to-even
    assert torch.equal(enc.reconstruction[0], expected)
    assert enc.reconstruction[0, 1].item() == 0.0 or row[1].item() != 0.5


def load_container_manifests() -> List[Dict[str, Any]]:
    """Every golden container (containers/vN.json), with its manifest's format version."""
    out = []
    for path in sorted((GOLDEN / "containers").glob("v*.json")):
        doc = json.loads(path.read_text())
        out += [{**c, "format_version": doc["format_version"]} for c in doc["cases"]]
    return out


CONTAINERS = load_container_manifests()


@pytest.mark.parametrize("case", CONTAINERS, ids=[Path(c["container"]).stem for c in CONTAINERS])
def test_binary_restores_golden_containers(case: Dict[str, Any], kv_compress_bin: str, tmp_path: Path) -> None:
    """Each golden container, of every format version, is unchanged on disk and restores to the
    tensors it restored to when it was written."""
    path = GOLDEN / case["container"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == case["container_sha256"], "golden containers are never rewritten"
    restored = tmp_path / "restored.safetensors"
    decompress_kv_cache(str(path), str(restored))
    out = load_file(str(restored))
    assert {name: sha(t) for name, t in out.items()} == case["reconstruction_sha256"]


def test_versions_agree_on_the_reconstruction() -> None:
    """A version-2 container written with a version-1 case's input and flags restores to the same
    tensors: the entropy stage is lossless, so format 2 changed no reconstructed bit."""
    by_version: Dict[int, Dict[tuple, Dict[str, str]]] = {}
    for c in CONTAINERS:
        by_version.setdefault(c["format_version"], {})[(c["input"], tuple(c["flags"]))] = c["reconstruction_sha256"]
    assert 1 in by_version and 2 in by_version, f"golden containers of versions {sorted(by_version)}"
    shared = set(by_version[1]) & set(by_version[2])
    assert len(shared) >= 5, shared
    for key in shared:
        assert by_version[1][key] == by_version[2][key], key
