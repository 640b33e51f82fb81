"""An independent torch implementation of the kv-compress codec, for checking the Go binary.

This follows the written rules of ``docs/format.md`` rather than the Go code, so
agreement bit for bit between the two is evidence that both implement the
specification. All arithmetic is float32 unless stated:

1. ``x`` is the tensor as float32 (float64 rounds to nearest).
2. Sparsity ``s``: with ``k = floor(s · numel)``, every element whose magnitude is
   at most the k-th smallest magnitude is set to zero (ties included).
3. Groups are ``G`` consecutive elements along the last axis (``G`` divides it).
   ``scale = float16(max|x| / 7)`` (round half to even); a zero scale gives code 0.
4. ``code = clamp(round_half_even(x / scale), -8, 7)`` with ``scale`` read back as float32.
5. Codes are packed two per byte, element ``2i`` in the low nibble, two's complement.
6. Reconstruction: ``dtype(float32(code) · scale)``, rounded half to even to the
   original dtype (float64 receives the float32 value exactly).

Shapes: ``x`` is any floating tensor ``[..., D]`` with ``D % G == 0``; codes are
``uint8 [numel / 2]``; scales ``float16 [numel / G]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

QMIN, QMAX = -8, 7


@dataclass
class ReferenceEncoding:
    """The encoding of one tensor: packed codes, float16 scales, and the reconstruction."""

    codes: torch.Tensor  # uint8 [numel / 2]
    scales: torch.Tensor  # float16 [numel / group_size]
    reconstruction: torch.Tensor  # same shape and dtype as the input


def sparsify_reference(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the ``floor(sparsity · numel)`` smallest-magnitude elements of float32 ``x`` (ties included)."""
    k = int(math.floor(sparsity * x.numel()))
    if k <= 0:
        return x
    mags = x.abs().reshape(-1)
    threshold = torch.kthvalue(mags, k).values
    return torch.where(x.abs() <= threshold, torch.zeros_like(x), x)


def encode_reference(x: torch.Tensor, group_size: int, sparsity: float = 0.0) -> ReferenceEncoding:
    """Quantize ``x`` ``[..., D]`` per the kv-compress rules; see the module docstring."""
    if x.dim() == 0 or x.shape[-1] % group_size != 0:
        raise ValueError(f"group_size {group_size} must divide the last dimension of shape {tuple(x.shape)}")
    xf = x.detach().to(torch.float32).cpu()
    if not torch.isfinite(xf).all():
        raise ValueError("tensor holds NaN or Inf")
    xf = sparsify_reference(xf, sparsity)
    groups = xf.reshape(-1, group_size)
    scales16 = (groups.abs().amax(dim=1) / 7).to(torch.float16)
    if torch.isinf(scales16).any():
        raise ValueError("a group scale overflows float16")
    s = scales16.to(torch.float32)[:, None]
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.clamp(torch.round(groups / safe), QMIN, QMAX)
    q = torch.where(s > 0, q, torch.zeros_like(q)).to(torch.int16)
    flat = q.reshape(-1)
    packed = ((flat[0::2] & 0xF) | ((flat[1::2] & 0xF) << 4)).to(torch.uint8)
    recon = (q.to(torch.float32) * s).to(x.dtype).reshape(x.shape)
    return ReferenceEncoding(codes=packed, scales=scales16, reconstruction=recon)


def decode_reference(codes: torch.Tensor, scales: torch.Tensor, group_size: int, shape, dtype: torch.dtype) -> torch.Tensor:
    """Rebuild a tensor of ``shape`` and ``dtype`` from packed uint8 codes and float16 scales."""
    c = codes.to(torch.int16)
    lo, hi = c & 0xF, (c >> 4) & 0xF
    q = torch.stack([lo, hi], dim=1).reshape(-1)
    q = torch.where(q >= 8, q - 16, q).to(torch.float32).reshape(-1, group_size)
    return (q * scales.to(torch.float32)[:, None]).to(dtype).reshape(shape)
