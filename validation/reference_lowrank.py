"""An independent torch implementation of kv-compress's low-rank projection (docs/format.md section 10).

It follows the written rules, not the Go code, and agrees with the binary bit for bit: both
fix the order of every sum and round every product to float32 (no fused multiply-add), and
elementwise float32 operations are exactly rounded in IEEE 754 whatever the vector width. A
torch matrix product would not do: BLAS picks its own blocking and may fuse, so its last bits
differ from run to run and machine to machine. Hence the explicit loops below (one float32
operation per step, vectorised over rows), which are slow but exact.

For a tensor ``x`` [..., S, D] viewed as ``outer × S × D``, sink ``N``, a basis ``B``
[H, D, r] and mean ``m`` [H, D] (float16 or float32, read as float32), outer block ``o`` uses
head ``h = o mod H``:

1. The first ``N`` positions are stored as they are.
2. ``d_j = float32(x_j − m_j)``; ``c_k = Σ_{j=0..D−1} float32(d_j · B_jk)``, summed from ``j = 0``
   upwards into a float32 that starts at +0.
3. The coefficients [outer, S − N, r] are quantized as a float32 tensor with the entry's plan
   (no sink): ``reference_codec.encode_reference``; its float32 reconstruction is ``ĉ``.
4. ``y_j = float32(Σ_{k=0..r−1} float32(ĉ_k · B_jk)) + m_j``, the sum from ``k = 0`` upwards
   from +0, the mean added last; then rounded half to even to the tensor's dtype, saturating.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from validation.reference_codec import ReferenceEncoding, TensorPlan, encode_reference, to_dtype_saturating


def _check(basis: torch.Tensor, mean: torch.Tensor, shape) -> None:
    if basis.dim() != 3 or mean.dim() != 2 or tuple(mean.shape) != tuple(basis.shape[:2]):
        raise ValueError(f"basis must be [H, D, r] and mean [H, D], got {list(basis.shape)} and {list(mean.shape)}")
    heads, dim, rank = basis.shape
    if not 1 <= rank <= dim:
        raise ValueError(f"rank must be in [1, {dim}], got {rank}")
    if len(shape) < 2 or shape[-1] != dim:
        raise ValueError(f"a basis for head_dim {dim} does not fit shape {tuple(shape)}")
    if heads != 1 and (len(shape) < 3 or shape[-3] != heads):
        raise ValueError(f"a basis for {heads} heads does not fit shape {tuple(shape)}")
    if not torch.isfinite(basis).all() or basis.abs().max() > 1 or not torch.isfinite(mean).all():
        raise ValueError("basis elements must be finite and within [-1, 1], means finite")


def _heads(outer: int, heads: int) -> torch.Tensor:
    return torch.arange(outer) % heads


def project_reference(rows: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Coefficients [outer, n, r] of float32 rows [outer, n, D]; block ``o`` uses head ``o mod H``."""
    b = basis.to(torch.float32)[_heads(rows.shape[0], basis.shape[0])]  # [outer, D, r]
    m = mean.to(torch.float32)[_heads(rows.shape[0], basis.shape[0])]  # [outer, D]
    d = rows - m[:, None, :]
    acc = torch.zeros(rows.shape[0], rows.shape[1], basis.shape[2], dtype=torch.float32)
    for j in range(basis.shape[1]):
        acc = acc + d[:, :, j:j + 1] * b[:, None, j, :]
    return acc


def reconstruct_reference(coef: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Rows [outer, n, D] (float32) rebuilt from coefficients [outer, n, r]."""
    b = basis.to(torch.float32)[_heads(coef.shape[0], basis.shape[0])]  # [outer, D, r]
    m = mean.to(torch.float32)[_heads(coef.shape[0], basis.shape[0])]
    acc = torch.zeros(coef.shape[0], coef.shape[1], basis.shape[1], dtype=torch.float32)
    for k in range(basis.shape[2]):
        acc = acc + coef[:, :, k:k + 1] * b[:, None, :, k]
    return acc + m[:, None, :]


def encode_lowrank_reference(
    x: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor, group_size: int, *, plan: Optional[TensorPlan] = None
) -> ReferenceEncoding:
    """Encode ``x`` [..., S, D] through ``basis`` [H, D, r] and ``mean`` [H, D] with ``plan``.

    ``plan`` is the entry's plan (its sink is the positions kept exact; the rest applies to the
    coefficients). The result's codes, scales and mins are those of the coefficients; its
    reconstruction has ``x``'s shape and dtype.
    """
    p = plan or TensorPlan()
    shape = tuple(x.shape)
    _check(basis, mean, shape)
    s, d = shape[-2], shape[-1]
    x3 = x.detach().cpu().reshape(-1, s, d)
    xf = x3.to(torch.float32)
    if not torch.isfinite(xf).all():
        raise ValueError("tensor holds NaN or Inf")
    coef = project_reference(xf[:, p.sink:, :].contiguous(), basis, mean)
    cshape = (*shape[:-2], s - p.sink, basis.shape[2])
    enc = encode_reference(coef.reshape(cshape), group_size, plan=replace(p, sink=0))
    chat = enc.reconstruction.reshape(x3.shape[0], s - p.sink, basis.shape[2])
    y = reconstruct_reference(chat, basis, mean)
    recon = x3.clone()
    recon[:, p.sink:, :] = to_dtype_saturating(y, x.dtype)
    sink_rows = x3[:, :p.sink, :].contiguous().reshape(-1).view(torch.uint8).clone() if p.sink else None
    return ReferenceEncoding(codes=enc.codes, scales=enc.scales, mins=enc.mins, sink_rows=sink_rows,
                             reconstruction=recon.reshape(shape))
