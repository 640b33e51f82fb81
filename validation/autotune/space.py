"""The search space of the auto-tuner: candidate plans per role, presets built from them, their sizes.

A *candidate* is one role plan of a format-2 preset file (``scheme``, ``bits``, ``group_size``,
``rotate``, ``axis`` and optionally ``steps``; docs/cli.md, "Preset files") that a key or a value tensor may get. The
tuner gives every tensor (one role of one layer) one candidate; :func:`assignment_preset` writes
such an assignment as a preset JSON that ``kv-compress --preset FILE`` reads. Knobs that other
work adds to role plans (a token keep ratio, a low rank) join as more fields of
:attr:`Candidate.plan`: nothing here assumes the five fields are all there is.

Sizes are real: :func:`measure_sizes` runs ``kv-compress metrics`` on a prefilled cache once per
candidate (keys and values in the same call) and reads each tensor's ``compressed_bytes`` (codes,
scales, minimums and exact positions after the entropy stage).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from validation.reference_codec import TensorPlan

ROLES = ("keys", "values")
BITS = (2, 3, 4, 8)
SCHEMES = ("sym", "asym")
ROTATIONS = ("none", "hadamard")
AXES = ("token", "channel")
# Group sizes along head_dim ("token" axis) and along the sequence ("channel" axis), as the binary allows.
TOKEN_GROUPS = (32, 64, 128)
CHANNEL_GROUPS = (32, 64, 128, 256, 512, 1024)
SPACES = ("default", "wide")
PLAN_FIELDS = ("scheme", "bits", "group_size", "rotate", "axis")
OPTIONAL_PLAN_FIELDS = ("steps",)
# Steps the default space tries in 4-bit codes (docs/format.md, "Steps"): the divisor of a group's
# range (asym) or magnitude (sym) in place of the width's own (15 and 7). Fewer steps use fewer of
# the 16 codes, which the entropy stage then stores in fewer bits (the built-in compact preset:
# keys 7, values 4).
KEY_STEPS = (5, 7, 8, 9, 10)
VALUE_STEPS = (2, 3, 4, 5)


def max_steps(scheme: str, bits: int) -> int:
    """The most steps a group may span in ``bits``-bit codes: ``2^b - 1`` (asym), ``2^(b-1) - 1`` (sym)."""
    return 2 ** bits - 1 if scheme == "asym" else 2 ** (bits - 1) - 1


class SpaceError(ValueError):
    """A candidate or a search space that the binary would refuse; the message names the allowed values."""


@dataclass(frozen=True)
class Candidate:
    """One role plan a tensor may get.

    ``plan`` holds the preset-file fields (``scheme``, ``bits``, ``group_size``, ``rotate``,
    ``axis``, and ``steps`` when not 0; more knobs may join); ``role`` is "keys" or "values".
    ``steps`` 0 means the width's own divisor; otherwise it is an integer in ``[1, max_steps]``.
    """

    role: str
    scheme: str
    bits: int
    group_size: int
    rotate: str
    axis: str
    steps: int = 0

    def __post_init__(self) -> None:
        for name, value, allowed in (("role", self.role, ROLES), ("scheme", self.scheme, SCHEMES),
                                     ("bits", self.bits, BITS), ("rotate", self.rotate, ROTATIONS),
                                     ("axis", self.axis, AXES)):
            if value not in allowed:
                raise SpaceError(f"candidate {name} must be one of {list(allowed)}, got {value!r}")
        groups = CHANNEL_GROUPS if self.axis == "channel" else TOKEN_GROUPS
        if self.group_size not in groups:
            raise SpaceError(f"candidate group_size along axis {self.axis!r} must be one of {list(groups)}, "
                             f"got {self.group_size!r}")
        hi = max_steps(self.scheme, self.bits)
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or not 0 <= self.steps <= hi:
            raise SpaceError(f"candidate steps for {self.scheme} {self.bits}-bit codes must be 0 (the width's own) "
                             f"or an integer in [1, {hi}], got {self.steps!r}")

    @property
    def plan(self) -> Dict[str, Any]:
        """The role plan as a preset file writes it (``steps`` only when not 0)."""
        out: Dict[str, Any] = {"scheme": self.scheme, "bits": self.bits, "group_size": self.group_size,
                               "rotate": self.rotate, "axis": self.axis}
        if self.steps:
            out["steps"] = self.steps
        return out

    @property
    def name(self) -> str:
        """A short unique label, e.g. ``k3-asym-ch128`` or ``k4s7-asym-ch128`` (role, bits, steps, scheme, rotation, axis, group)."""
        rot = "-had" if self.rotate == "hadamard" else ""
        ax = "ch" if self.axis == "channel" else "tok"
        st = f"s{self.steps}" if self.steps else ""
        return f"{self.role[0]}{self.bits}{st}-{self.scheme}{rot}-{ax}{self.group_size}"

    @property
    def signature(self) -> Tuple[str, str, int, str, str, int]:
        """What decides the reconstruction: two candidates with the same signature restore the same
        tensor bit for bit (e.g. asym 3-bit and asym 4-bit codes with 7 steps) and differ only in size."""
        return (self.role, self.scheme, self.group_size, self.rotate, self.axis, self.steps or max_steps(self.scheme, self.bits))

    @property
    def levels(self) -> int:
        """How many reconstruction levels a group can use: ``steps + 1`` (asym), ``2 steps + 1`` (sym)."""
        s = self.steps or max_steps(self.scheme, self.bits)
        return s + 1 if self.scheme == "asym" else 2 * s + 1

    def tensor_plan(self, sink: int, seq_len: int) -> Tuple[TensorPlan, int]:
        """``(reference_codec.TensorPlan, group size)`` for a tensor ``[..., seq_len, head_dim]``."""
        axis = "seq" if self.axis == "channel" else "last"
        return (TensorPlan(self.scheme, self.bits, axis, self.rotate, min(sink, seq_len), self.group_size,
                           float(self.steps) if self.steps else None), self.group_size)

    def fits(self, head_dim: int) -> bool:
        """Whether the binary accepts this plan for tensors with this head_dim (token groups must divide it)."""
        return self.axis == "channel" or head_dim % self.group_size == 0

    @classmethod
    def from_plan(cls, role: str, plan: Dict[str, Any]) -> "Candidate":
        """The candidate of a preset-file role plan (every field of PLAN_FIELDS present; ``steps`` optional)."""
        missing = [f for f in PLAN_FIELDS if f not in plan]
        if missing:
            raise SpaceError(f"a role plan needs the fields {list(PLAN_FIELDS)}; missing {missing}")
        unknown = sorted(set(plan) - set(PLAN_FIELDS) - set(OPTIONAL_PLAN_FIELDS))
        if unknown:
            raise SpaceError(f"a role plan has the fields {list(PLAN_FIELDS + OPTIONAL_PLAN_FIELDS)}; unknown {unknown}")
        steps = plan.get("steps") or 0
        if isinstance(steps, float) and steps.is_integer():
            steps = int(steps)
        if steps and steps == max_steps(plan["scheme"], int(plan["bits"])):
            steps = 0  # the width's own divisor: the same plan as no steps
        return cls(role, plan["scheme"], int(plan["bits"]), int(plan["group_size"]), plan["rotate"], plan["axis"], steps)


def default_space(role: str, head_dim: int, space: str = "default", bits: Sequence[int] = BITS) -> List[Candidate]:
    """The candidates of ``role`` the search tries, for tensors with ``head_dim``.

    ``default``: the forms that measured best on SmolLM2 (docs/codec-frontier.md) at every width:
    keys asymmetric per channel, unrotated, groups of 128 along the tokens (3-bit also 256);
    values rotated along head_dim, symmetric G = 64 (2-bit: asymmetric; 3-bit: both). With
    4-bit codes it also tries fewer steps (KEY_STEPS, VALUE_STEPS; the built-in ``compact``
    preset's keys and values are among them). ``wide`` adds the other scheme, rotation, axis
    and group combinations (without steps). ``bits`` restricts the widths. Raises SpaceError
    for an unknown space.
    """
    if space not in SPACES:
        raise SpaceError(f"--space must be one of {list(SPACES)}, got {space!r}")
    if role not in ROLES:
        raise SpaceError(f"role must be one of {list(ROLES)}, got {role!r}")
    bad = [b for b in bits if b not in BITS]
    if bad or not bits:
        raise SpaceError(f"--bits must list values from {list(BITS)}, got {list(bits)}")
    out: List[Candidate] = []
    if space == "default":
        if role == "keys":
            for b in bits:
                out.append(Candidate("keys", "asym", b, 128, "none", "channel"))
                if b == 3:
                    out.append(Candidate("keys", "asym", b, 256, "none", "channel"))
                if b == 4:
                    out.extend(Candidate("keys", "asym", b, 128, "none", "channel", s) for s in KEY_STEPS)
        else:
            for b in bits:
                out.append(Candidate("values", "asym" if b == 2 else "sym", b, 64, "hadamard", "token"))
                if b == 3:
                    out.append(Candidate("values", "asym", b, 64, "hadamard", "token"))
                if b == 4:
                    out.extend(Candidate("values", "sym", b, 64, "hadamard", "token", s) for s in VALUE_STEPS)
    else:
        for b in bits:
            for scheme in SCHEMES:
                for rotate in ROTATIONS:
                    for g in (32, 64):
                        out.append(Candidate(role, scheme, b, g, rotate, "token"))
                    for g in (64, 128, 256):
                        out.append(Candidate(role, scheme, b, g, rotate, "channel"))
    return [c for c in out if c.fits(head_dim)]


@dataclass
class Assignment:
    """One candidate per tensor: ``choice[role][layer]`` indexes ``candidates[role]``; ``keep``,
    when set, the share of its context positions each layer keeps (per-layer token selection)."""

    candidates: Dict[str, List[Candidate]]
    choice: Dict[str, List[int]]
    keep: Optional[List[float]] = None

    @property
    def num_layers(self) -> int:
        """Number of layers assigned."""
        return len(self.choice["keys"])

    @property
    def mean_keep(self) -> float:
        """The share of context positions kept over all layers (1.0 without per-layer keep ratios)."""
        return sum(self.keep) / len(self.keep) if self.keep else 1.0

    def plan(self, role: str, layer: int) -> Candidate:
        """The candidate of ``role`` in ``layer``."""
        return self.candidates[role][self.choice[role][layer]]

    def bits_grid(self) -> List[List[int]]:
        """``[layer][role]`` code widths (role order: keys, values)."""
        return [[self.plan(r, i).bits for r in ROLES] for i in range(self.num_layers)]

    def level_bits_grid(self) -> List[List[float]]:
        """``[layer][role]`` log2 of the levels each tensor's plan can use (steps count), for the heatmap."""
        import math

        return [[math.log2(self.plan(r, i).levels) for r in ROLES] for i in range(self.num_layers)]


def assignment_preset(a: Assignment, name: str, description: str, sink: int = 1,
                      extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The preset file (docs/cli.md) that gives every tensor its candidate.

    The most frequent candidate of each role becomes the role plan (``keys`` / ``values``, every
    field explicit); each other candidate becomes one ``layers`` entry listing its layers (with
    ``steps`` explicit when the role plan has steps and the candidate has none). Base
    ``default`` supplies the rest (entropy stage ``auto``); ``sink`` positions stay exact.
    """
    out: Dict[str, Any] = {"name": name, "description": description, "base": "default", "codec": {"sink": sink}}
    layer_entries: Dict[Tuple[str, int], List[int]] = {}
    for role in ROLES:
        common = Counter(a.choice[role]).most_common(1)[0][0]
        out[role] = a.candidates[role][common].plan
        for layer, ci in enumerate(a.choice[role]):
            if ci != common:
                layer_entries.setdefault((role, ci), []).append(layer)
    if layer_entries:
        out["layers"] = [{"layers": layers, role: _layer_plan(a.candidates[role][ci], out[role])}
                         for (role, ci), layers in sorted(layer_entries.items(), key=lambda kv: kv[1][0])]
    if extra:
        out.update(extra)
    return out


def _layer_plan(c: Candidate, role_plan: Dict[str, Any]) -> Dict[str, Any]:
    """``c``'s plan as a ``layers`` entry over ``role_plan``.

    A layer plan's absent field keeps the role plan's value, so a candidate without steps under a
    role plan with steps states its width's own divisor explicitly (the same divisor, so the same
    codes, bit for bit).
    """
    plan = c.plan
    if "steps" in role_plan and "steps" not in plan:
        plan["steps"] = max_steps(c.scheme, c.bits)
    return plan


def uniform_preset(keys: Candidate, values: Candidate, name: str, sink: int = 1) -> Dict[str, Any]:
    """A preset giving every layer's keys ``keys`` and every layer's values ``values``."""
    return {"name": name, "description": f"keys {keys.name}, values {values.name} in every layer",
            "base": "default", "codec": {"sink": sink}, "keys": keys.plan, "values": values.plan}


def write_preset(preset: Dict[str, Any], path: str) -> str:
    """Write ``preset`` as JSON to ``path`` atomically; return the path."""
    from validation.jsonio import write_json_atomic

    write_json_atomic(path, preset)
    return path


@dataclass
class SizeTable:
    """Measured sizes: ``bytes[role][c][layer]`` is the stored size of that tensor with candidate ``c``.

    ``overhead`` is the container's bytes outside the tensors' payloads (header, index), as
    measured; ``fp16_bytes`` the same cache stored as float16 safetensors (the ratio's reference).
    """

    bytes: Dict[str, List[List[int]]]
    overhead: int
    fp16_bytes: int
    calls: int = 0
    source: str = "kv-compress metrics on the calibration cache, one call per candidate"
    notes: List[str] = field(default_factory=list)

    def total(self, a: Assignment) -> int:
        """The container size the assignment would have: payloads (times each layer's keep ratio,
        when it has them; index bitmaps left out) plus the measured overhead."""
        keep = a.keep or [1.0] * a.num_layers
        return self.overhead + int(round(sum(keep[i] * self.bytes[r][a.choice[r][i]][i]
                                             for r in ROLES for i in range(a.num_layers))))

    def ratio(self, a: Assignment) -> float:
        """fp16 size over the predicted container size."""
        return self.fp16_bytes / self.total(a)

    def for_keep_ratio(self, keep: float) -> "SizeTable":
        """The sizes predicted for a cache that keeps ``keep`` of its positions (token selection).

        Every payload shrinks with the positions it holds; the overhead and the float16 reference
        (the full cache) stay. The index bitmaps of the kept positions (one bit per position and
        row) are left out: the real check through the binary counts them.
        """
        if keep == 1.0:
            return self
        scaled = {r: [[int(round(b * keep)) for b in row] for row in self.bytes[r]] for r in ROLES}
        return SizeTable(scaled, self.overhead, self.fp16_bytes, self.calls,
                         self.source + f", scaled by the keep ratio {keep:g}", list(self.notes))


def _layer_of(name: str) -> Tuple[str, int]:
    prefix, idx, kind = name.split("_")
    return ("keys" if kind == "key" else "values"), int(idx)


def measure_sizes(layers: Sequence[Tuple[torch.Tensor, torch.Tensor]], candidates: Dict[str, List[Candidate]],
                  work_dir: Optional[str] = None, sink: int = 1, progress: Any = None) -> SizeTable:
    """Each tensor's real stored size under each candidate, by ``kv-compress metrics`` (nothing written).

    ``layers`` is ``[(key, value)]``, each ``[batch, kv_heads, seq, head_dim]``. Call ``j`` gives
    keys their ``j``-th candidate and values theirs (the shorter list repeats its last), so the
    number of calls is the longer list's length. ``progress`` (a bar) is advanced once per call.
    """
    from validation.compat import layers_to_cache
    from validation.compression_bridge import get_compression_metrics
    from validation.kv_cache_utils import save_kv_cache

    n = len(layers)
    table = {r: [[0] * n for _ in candidates[r]] for r in ROLES}
    overheads: List[int] = []
    fp16 = 0
    calls = max(len(candidates[r]) for r in ROLES)
    with tempfile.TemporaryDirectory(prefix="kv-autotune-sizes-", dir=work_dir) as tmp:
        src = os.path.join(tmp, "cache.safetensors")
        save_kv_cache(layers_to_cache(layers), src)
        for j in range(calls):
            pick = {r: min(j, len(candidates[r]) - 1) for r in ROLES}
            preset = write_preset(uniform_preset(candidates["keys"][pick["keys"]], candidates["values"][pick["values"]],
                                                 f"size-{j}", sink), os.path.join(tmp, f"size-{j}.json"))
            m = get_compression_metrics(src, preset=preset)
            payload = 0
            for t in m.tensors:
                role, layer = _layer_of(t["name"])
                table[role][pick[role]][layer] = int(t["compressed_bytes"])
                payload += int(t["compressed_bytes"])
            overheads.append(m.compressed_size_bytes - payload)
            fp16 = m.fp16_size_bytes
            if progress is not None:
                progress.update(1)
    return SizeTable(table, int(round(sum(overheads) / len(overheads))), fp16, calls)


def load_space_file(path: str, head_dim: int) -> Dict[str, List[Candidate]]:
    """Candidates from a JSON file ``{"keys": [plan, ...], "values": [plan, ...]}`` (each plan with PLAN_FIELDS, ``steps`` optional)."""
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or set(doc) - set(ROLES) or not all(doc.get(r) for r in ROLES):
        raise SpaceError(f"{path}: a space file is an object with non-empty lists {list(ROLES)}")
    out = {r: [Candidate.from_plan(r, p) for p in doc[r]] for r in ROLES}
    for r in ROLES:
        bad = [c.name for c in out[r] if not c.fits(head_dim)]
        if bad:
            raise SpaceError(f"{path}: {r} candidates {bad} have token-axis groups that do not divide head_dim {head_dim}")
    return out
