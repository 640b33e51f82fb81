"""An independent torch implementation of the kv-compress codec, for checking the Go binary.

This follows the written rules of ``docs/format.md`` rather than the Go code, so
agreement bit for bit between the two is evidence that both implement the
specification. All arithmetic is float32 unless stated. For one tensor ``x`` of
shape ``[..., S, D]`` (a vector is ``[1, D]``), with ``N`` sink positions:

1. ``x`` becomes float32 (float64 rounds to nearest); NaN or Inf is refused.
2. The first ``N`` positions of the sequence axis (``x[..., :N, :]``) are kept as
   they are; the rest, ``w = x[..., N:, :]``, is quantized.
3. Sparsity ``s``: with ``k = floor(s · numel(w))``, every element of ``w`` whose
   magnitude is at most the k-th smallest magnitude becomes zero.
4. Rotation ``hadamard``: each run of ``n`` elements along the last axis
   (``n`` = the largest power of two dividing ``D``) becomes
   ``c · H(signs ⊙ v)``, with ``H`` the butterfly Walsh–Hadamard transform,
   ``c = float32(1/√n)`` and fixed ±1 signs from SplitMix64 (see ``hadamard_signs``).
5. Rows: along the last axis (``axis="last"``), or, for key tensors with
   ``key_axis="channel"``, along the sequence axis (``axis="seq"``, one row per
   channel). Each row is cut into groups of ``G``; along the sequence axis the
   last group of a row may be shorter.
6. ``sym`` with ``b`` bits: ``qmax = 2^(b-1) − 1``, ``scale = float16(max|v| / qmax)``,
   ``code = clamp(round(v / scale), −qmax − 1, qmax)``.
   ``asym``: ``scale = float16((max − min) / (2^b − 1))``, ``minimum = float16(min)``,
   ``code = clamp(round((v − minimum) / scale), 0, 2^b − 1)``.
   Rounding is half to even; a zero scale gives code 0. A plan's ``steps`` (format 2)
   replaces the divisor ``qmax`` (sym) or ``2^b − 1`` (asym) by ``float32(steps)``;
   codes are still clamped to the width's range.
   ``nf`` with ``b`` bits (2, 3 or 4): ``scale = float16(max|v|)``, ``t = v / scale``
   (``t = 0`` for a zero scale), ``code`` = the number of ``NF_THRESHOLDS[b]`` strictly
   below ``t``, codes in ``[0, 2^b − 1]``.
7. Codes (two's complement for ``sym``) are packed LSB-first into a bit stream.
8. Reconstruction: ``code · scale`` (plus ``minimum`` for ``asym``: two roundings;
   ``NF_LEVELS[b][code] · scale`` for ``nf``, a zero product made +0),
   back to the tensor layout, inverse rotation ``signs ⊙ (c · H v)``, then rounded
   half to even to the original dtype, saturating: a value that would round past
   the dtype's largest finite value (65504 for float16) becomes that value, never
   Inf (``to_dtype_saturating``); the sink rows are the original values.

Format version 2 adds per-role, per-layer plans (``plan_for(..., roles=...)``, the
``keys`` / ``values`` / ``layers`` objects of a preset file): a tensor may carry its own
scheme, width, rotation, axis, sink and group size (``TensorPlan.group``). The entropy
stage of version 2 is lossless and outside this module: it does not change a bit of
the reconstruction.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

_MASK64 = (1 << 64) - 1
# The nf scheme's tables (docs/format.md): Lloyd-Max levels of N(0, 1) divided by the outer
# level, as float32 (the decimals are the float32 values to the last bit), and the float32
# midpoints of neighbouring levels.
NF_LEVELS: Dict[int, Tuple[str, ...]] = {
    2: ("-1", "-0.299771428", "0.299771428", "1"),
    3: ("-1", "-0.624508917", "-0.351312429", "-0.113894224", "0.113894224", "0.351312429", "0.624508917", "1"),
    4: ("-1", "-0.757163525", "-0.59212929", "-0.459721863", "-0.344852537", "-0.240343124", "-0.14200753",
        "-0.0469865762", "0.0469865762", "0.14200753", "0.240343124", "0.344852537", "0.459721863", "0.59212929",
        "0.757163525", "1"),
}
NF_THRESHOLDS: Dict[int, Tuple[str, ...]] = {
    2: ("-0.649885714", "0", "0.649885714"),
    3: ("-0.812254429", "-0.487910688", "-0.232603326", "0", "0.232603326", "0.487910688", "0.812254429"),
    4: ("-0.878581762", "-0.674646378", "-0.525925577", "-0.402287185", "-0.29259783", "-0.191175327",
        "-0.0944970548", "0", "0.0944970548", "0.191175327", "0.29259783", "0.402287185", "0.525925577",
        "0.674646378", "0.878581762"),
}


def nf_table(bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """float32 levels ``[2^bits]`` and thresholds ``[2^bits − 1]`` of the nf scheme; ValueError for other widths."""
    if bits not in NF_LEVELS:
        raise ValueError(f"scheme nf takes bits {sorted(NF_LEVELS)}, got {bits}")
    as_f32 = lambda xs: torch.tensor([float(x) for x in xs], dtype=torch.float64).to(torch.float32)  # noqa: E731
    return as_f32(NF_LEVELS[bits]), as_f32(NF_THRESHOLDS[bits])

SIGN_SEED = 0x6B762D636F6D7072  # "kv-compr"
_KEY = re.compile(r"^layer_(0|[1-9][0-9]*)_key$")
_VALUE = re.compile(r"^layer_(0|[1-9][0-9]*)_value$")


@dataclass
class ReferenceEncoding:
    """The encoding of one tensor.

    codes: uint8 ``[ceil(numel_quantized · bits / 8)]``; scales (and mins for asym):
    float16 ``[groups]``; sink_rows: the original bytes of the kept positions as
    uint8 (None without a sink); reconstruction: same shape and dtype as the input.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    reconstruction: torch.Tensor
    mins: Optional[torch.Tensor] = None
    sink_rows: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class TensorPlan:
    """How one tensor is encoded: what ``kv-compress`` records in the tensor's index entry."""

    scheme: str = "sym"
    bits: int = 4
    axis: str = "last"
    rotate: str = "none"
    sink: int = 0
    group: Optional[int] = None  # the tensor's own group size (format 2); None: the codec's
    steps: Optional[float] = None  # sym/asym divisor in place of the width's own (format 2); None: the width's


def role(name: str) -> str:
    """``"key"`` for ``layer_{i}_key``, ``"value"`` for ``layer_{i}_value``, else ``"other"``."""
    if _KEY.match(name):
        return "key"
    if _VALUE.match(name):
        return "value"
    return "other"


def _layer(name: str) -> int:
    m = _KEY.match(name) or _VALUE.match(name)
    return int(m.group(1)) if m else -1


def plan_for(name: str, shape, *, scheme: str = "sym", rotate: str = "none", key_axis: str = "token",
             sink: int = 0, bits: int = 4, key_bits: Optional[int] = None, value_bits: Optional[int] = None,
             roles: Optional[Dict[str, Any]] = None) -> TensorPlan:
    """The per-tensor plan the binary derives from its flags and a tensor's name and shape.

    ``roles`` is a preset file's per-role part (``{"keys": {...}, "values": {...},
    "layers": [{"layers": [i, ...], "keys": {...}, "values": {...}}]}``, fields
    ``scheme``, ``bits``, ``group_size``, ``rotate``, ``axis`` ("token" | "channel"),
    ``sink``, ``steps``): the role's plan applies first, then every layer plan listing the
    tensor's layer, in order; an absent field keeps the value below it.
    """
    r = role(name)
    b = {"key": key_bits or bits, "value": value_bits or bits}.get(r, bits)
    axis = "seq" if r == "key" and key_axis == "channel" and len(shape) >= 2 else "last"
    plan = {"scheme": scheme, "bits": b, "axis": axis, "rotate": rotate, "group": None, "steps": None}
    want_sink = sink
    key = {"key": "keys", "value": "values"}.get(r)
    if roles and key:
        layer = _layer(name)
        for rp in [roles.get(key)] + [lp.get(key) for lp in roles.get("layers") or [] if layer in lp["layers"]]:
            if not rp:
                continue
            for field_name, plan_key in (("scheme", "scheme"), ("bits", "bits"), ("rotate", "rotate"), ("group_size", "group"),
                                         ("steps", "steps")):
                if rp.get(field_name):
                    plan[plan_key] = rp[field_name]
            if rp.get("axis") == "channel" and len(shape) >= 2:
                plan["axis"] = "seq"
            elif rp.get("axis") == "token":
                plan["axis"] = "last"
            if rp.get("sink") is not None:
                want_sink = rp["sink"]
    kept = min(want_sink, shape[-2]) if len(shape) >= 2 else 0
    return TensorPlan(sink=kept, **plan)


def splitmix64(seed: int, i: int) -> int:
    """The i-th output (from 0) of SplitMix64 seeded with ``seed``."""
    z = (seed + (i + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def hadamard_signs(n: int) -> torch.Tensor:
    """float32 ``[n]``: −1 where output j of SplitMix64(SIGN_SEED) is odd, else +1."""
    return torch.tensor([-1.0 if splitmix64(SIGN_SEED, j) & 1 else 1.0 for j in range(n)], dtype=torch.float32)


def fwht(v: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh–Hadamard transform of ``v`` ``[M, n]`` (n a power of two), butterfly order."""
    m, n = v.shape
    h = 1
    while h < n:
        v = v.reshape(m, n // (2 * h), 2, h)
        a, b = v[:, :, 0, :], v[:, :, 1, :]
        v = torch.stack((a + b, a - b), dim=2).reshape(m, n)
        h *= 2
    return v


def _rotate(v: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Rotate each block of ``v`` ``[M, D]`` along the last axis."""
    m, d = v.shape
    n = d & -d
    c = torch.tensor(1 / math.sqrt(n), dtype=torch.float32)
    signs = hadamard_signs(n)
    blocks = v.reshape(-1, n)
    if inverse:
        out = fwht(blocks) * c * signs
    else:
        out = fwht(blocks * signs) * c
    return out.reshape(m, d)


def sparsify_reference(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the ``floor(sparsity · numel)`` smallest-magnitude elements of float32 ``x`` (ties included)."""
    k = int(math.floor(sparsity * x.numel()))
    if k <= 0:
        return x
    threshold = torch.kthvalue(x.abs().reshape(-1), k).values
    return torch.where(x.abs() <= threshold, torch.zeros_like(x), x)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative codes (< 2^bits) LSB-first into uint8 ``[ceil(len · bits / 8)]``."""
    c = codes.reshape(-1).to(torch.int64)
    stream = ((c[:, None] >> torch.arange(bits)) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    stream = torch.cat([stream, torch.zeros(pad, dtype=torch.int64)])
    return (stream.reshape(-1, 8) << torch.arange(8)).sum(dim=1).to(torch.uint8)


def _unpack(data: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    stream = ((data.to(torch.int64)[:, None] >> torch.arange(8)) & 1).reshape(-1)[: count * bits]
    return (stream.reshape(count, bits) << torch.arange(bits)).sum(dim=1)


def _group_stats(rows: torch.Tensor, group: int):
    """Split rows ``[R, L]`` into groups of ``group`` (the last may be shorter).

    Returns a list of ``[R, k, g]`` blocks in row-major group order, concatenated
    per row afterwards by the caller.
    """
    r, length = rows.shape
    full = length // group * group
    parts = []
    if full:
        parts.append(rows[:, :full].reshape(r, full // group, group))
    if full < length:
        parts.append(rows[:, full:].reshape(r, 1, length - full))
    return parts


def encode_reference(x: torch.Tensor, group_size: int, sparsity: float = 0.0, *, plan: Optional[TensorPlan] = None) -> ReferenceEncoding:
    """Encode ``x`` ``[..., S, D]`` with ``plan`` (default: sym, 4 bits, last axis); see the module docstring."""
    p = plan or TensorPlan()
    group_size = p.group or group_size
    if x.dim() == 0:
        raise ValueError("a scalar has no axis to group along")
    if p.axis == "last" and x.shape[-1] % group_size != 0:
        raise ValueError(f"group_size {group_size} must divide the last dimension of shape {tuple(x.shape)}")
    shape = tuple(x.shape)
    d = shape[-1]
    s = shape[-2] if x.dim() >= 2 else 1
    x3 = x.detach().cpu().reshape(-1, s, d)
    xf = x3.to(torch.float32)
    if not torch.isfinite(xf).all():
        raise ValueError("tensor holds NaN or Inf")
    sink_rows = None
    if p.sink:
        sink_rows = x3[:, : p.sink, :].contiguous().reshape(-1).view(torch.uint8).clone()
    w = sparsify_reference(xf[:, p.sink :, :].contiguous(), sparsity)
    outer, keep = w.shape[0], w.shape[1]
    if p.rotate == "hadamard":
        w = _rotate(w.reshape(-1, d), inverse=False).reshape(outer, keep, d)
    rows = w.transpose(1, 2).reshape(outer * d, keep) if p.axis == "seq" else w.reshape(outer * keep, d)

    lo, hi = (0, 2**p.bits - 1) if p.scheme == "asym" else (-(2 ** (p.bits - 1)), 2 ** (p.bits - 1) - 1)
    divisor = float(torch.tensor(p.steps, dtype=torch.float32)) if p.steps else float(hi)
    nf = nf_table(p.bits) if p.scheme == "nf" else None
    scale_parts, min_parts, code_parts, deq_parts = [], [], [], []
    for g in _group_stats(rows, group_size):
        if nf is not None:
            levels, thresholds = nf
            scale16 = g.abs().amax(dim=2, keepdim=True).to(torch.float16)
            if torch.isinf(scale16).any():
                raise ValueError("a group scale overflows float16")
            sc = scale16.to(torch.float32)
            safe = torch.where(sc > 0, sc, torch.ones_like(sc))
            t = torch.where(sc > 0, g / safe, torch.zeros_like(g))
            q = (t.unsqueeze(-1) > thresholds).sum(dim=-1)  # thresholds strictly below t
            scale_parts.append(scale16)
            min_parts.append(None)
            code_parts.append(q.to(torch.int64))
            deq_parts.append(levels[q] * sc + 0.0)  # a zero product is +0
            continue
        if p.scheme == "asym":
            mn, mx = g.amin(dim=2, keepdim=True), g.amax(dim=2, keepdim=True)
            mn = mn + 0.0  # a zero minimum is +0, whichever signed zero came first,
            mx = mx + 0.0  # and so is a zero maximum: a group of zeros gets scale +0, never -0
            scale16 = ((mx - mn) / divisor).to(torch.float16)
            min16 = mn.to(torch.float16)
            mv = min16.to(torch.float32)
            num = g - mv
        else:
            scale16 = (g.abs().amax(dim=2, keepdim=True) / divisor).to(torch.float16)
            min16, mv, num = None, None, g
        if torch.isinf(scale16).any() or (min16 is not None and torch.isinf(min16).any()):
            raise ValueError("a group scale or minimum overflows float16")
        sc = scale16.to(torch.float32)
        safe = torch.where(sc > 0, sc, torch.ones_like(sc))
        q = torch.where(sc > 0, torch.clamp(torch.round(num / safe), lo, hi), torch.zeros_like(num))
        q = q + 0.0  # codes are integers: round(−0.3) is −0.0, code 0 reconstructs as +0.0
        deq = q * sc
        if mv is not None:
            deq = deq + mv
        scale_parts.append(scale16)
        min_parts.append(min16)
        code_parts.append(q.to(torch.int64))
        deq_parts.append(deq)
    r = rows.shape[0]
    scales = torch.cat([t.reshape(r, -1) for t in scale_parts], dim=1).reshape(-1)
    mins = torch.cat([t.reshape(r, -1) for t in min_parts], dim=1).reshape(-1) if p.scheme == "asym" else None
    codes = torch.cat([t.reshape(r, -1) for t in code_parts], dim=1).reshape(-1)
    deq = torch.cat([t.reshape(r, -1) for t in deq_parts], dim=1)

    y = deq.reshape(outer, d, keep).transpose(1, 2) if p.axis == "seq" else deq.reshape(outer, keep, d)
    if p.rotate == "hadamard":
        y = _rotate(y.reshape(-1, d), inverse=True).reshape(outer, keep, d)
    recon = x3.clone()
    recon[:, p.sink :, :] = to_dtype_saturating(y, x.dtype)
    return ReferenceEncoding(
        codes=_pack(codes & (2**p.bits - 1), p.bits),
        scales=scales,
        mins=mins,
        sink_rows=sink_rows,
        reconstruction=recon.reshape(shape),
    )


def to_dtype_saturating(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round float32 ``y`` (any shape) half to even to ``dtype``, saturating at its largest finite value.

    Clamping to ``±finfo(dtype).max`` first and rounding after is the same as
    saturating the rounded value, because rounding is monotonic. Float32 and
    float64 receive the float32 values as they are (they are finite).
    """
    if dtype in (torch.float16, torch.bfloat16):
        m = torch.finfo(dtype).max
        y = torch.clamp(y, -m, m)
    return y.to(dtype)


def decode_reference(codes: torch.Tensor, scales: torch.Tensor, group_size: int, shape, dtype: torch.dtype) -> torch.Tensor:
    """Rebuild a version-1 tensor (sym, 4 bits, last axis) from packed uint8 codes and float16 scales."""
    numel = math.prod(shape)
    q = _unpack(codes, 4, numel)
    q = torch.where(q >= 8, q - 16, q).to(torch.float32).reshape(-1, group_size)
    return to_dtype_saturating(q * scales.to(torch.float32)[:, None], dtype).reshape(shape)
