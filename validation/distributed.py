"""Data-parallel runs: the windows' batches are shared among ``torch.distributed`` ranks.

Launched as ``torchrun --nproc-per-node N validation/validate_perplexity.py ...`` (or anything
else that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``),
every rank loads the model and the corpus and plans the same windows. Batch ``b`` of
``batch_windows`` windows is scored by rank ``b mod N``, so each batch holds exactly the
windows it holds in a single-process run and gives the same numbers. The ranks' outcomes are
exchanged with ``all_gather_object`` over a gloo group (CPU tensors and pickled objects, so it
works the same whether the model runs on CPUs or GPUs), put back in batch order, and every rank
computes the same result; only rank 0 prints and writes the report. On CUDA, rank ``r`` uses
``cuda:LOCAL_RANK``.

Without those variables (or with ``WORLD_SIZE=1``) nothing here changes a run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, List, Optional, Sequence

import numpy as np
import torch

from validation.diagnostics import CacheDiagnostics
from validation.options import ValidationError
from validation.protocol import ProtocolOutcome, run_protocol

BACKEND = "gloo"


@dataclass(frozen=True)
class Rank:
    """This process's place in a data-parallel run."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Rank 0 prints and writes; the others only score."""
        return self.rank == 0


_CURRENT: Optional[Rank] = None
_OWNS_GROUP = False


def _env_int(name: str, default: Optional[int] = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise ValidationError(f"WORLD_SIZE is set but {name} is not (launch with torchrun)")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValidationError(f"{name} must be an integer, got {value!r}") from None


def from_env() -> Optional[Rank]:
    """The Rank that torchrun's environment describes, or None for a single-process run."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return None
    rank = _env_int("RANK")
    if not 0 <= rank < world:
        raise ValidationError(f"RANK must be in [0, {world - 1}], got {rank}")
    return Rank(rank, world, _env_int("LOCAL_RANK", rank))


def setup() -> Optional[Rank]:
    """Join the process group torchrun describes (once per process) and return this Rank; None when single."""
    global _CURRENT, _OWNS_GROUP
    ctx = from_env()
    if ctx is None:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(BACKEND, rank=ctx.rank, world_size=ctx.world_size)
        _OWNS_GROUP = True
    _CURRENT = ctx
    return ctx


def current() -> Optional[Rank]:
    """The Rank set up by :func:`setup` in this process, or None."""
    return _CURRENT


def is_main() -> bool:
    """True in a single-process run and on rank 0."""
    return _CURRENT is None or _CURRENT.is_main


def shutdown() -> None:
    """Leave the process group if :func:`setup` created it (so that exiting prints no warning)."""
    global _CURRENT, _OWNS_GROUP
    if _OWNS_GROUP:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _CURRENT, _OWNS_GROUP = None, False


def rank_device(device: torch.device, ctx: Optional[Rank]) -> torch.device:
    """``cuda:LOCAL_RANK`` for a CUDA run with several ranks; ``device`` otherwise."""
    if ctx is None or device.type != "cuda":
        return device
    if ctx.local_rank >= torch.cuda.device_count():
        raise ValidationError(f"LOCAL_RANK {ctx.local_rank} has no GPU: {torch.cuda.device_count()} visible")
    return torch.device("cuda", ctx.local_rank)


def shard_indices(num_windows: int, batch_windows: int, rank: int, world_size: int) -> List[int]:
    """Indices of the windows rank ``rank`` scores: every batch ``b`` with ``b mod world_size == rank``."""
    out: List[int] = []
    for b, start in enumerate(range(0, num_windows, batch_windows)):
        if b % world_size == rank:
            out.extend(range(start, min(start + batch_windows, num_windows)))
    return out


def merge_outcomes(parts: Sequence[ProtocolOutcome], batch_windows: int) -> ProtocolOutcome:
    """One ProtocolOutcome from the ranks' outcomes (``parts[r]`` from rank r), in single-process batch order.

    Windows, per-call metrics and per-token KL / Δp are interleaved batch by batch; SNR sums,
    cache bytes and phase timings add up; ``timings["total"]`` is the slowest rank's.
    """
    world = len(parts)
    done = [p for p in parts if p.windows]
    if not done:
        raise ValidationError("no rank scored any window")
    stride = done[0].stride
    windows, metrics, kl, dp = [], [], [], []
    counts = [len(p.metrics) for p in parts]
    for b in range(sum(counts)):
        r, k = b % world, b // world
        p = parts[r]
        lo, hi = k * batch_windows, min((k + 1) * batch_windows, len(p.windows))
        windows.extend(p.windows[lo:hi])
        metrics.append(p.metrics[k])
        if p.token_kl is not None:
            kl.append(p.token_kl[lo * stride:hi * stride])
            dp.append(p.token_dp[lo * stride:hi * stride])
    timings: dict = {}
    for p in parts:
        for key, value in p.timings.items():
            timings[key] = max(timings.get(key, 0.0), value) if key == "total" else timings.get(key, 0.0) + value
    diags = [p.diagnostics for p in parts if p.diagnostics is not None]
    diagnostics = None
    if diags:
        diagnostics = CacheDiagnostics(*(np.sum([getattr(d, f) for d in diags], axis=0) for f in
                                         ("key_signal", "key_noise", "value_signal", "value_noise")),
                                       elements=sum(d.elements for d in diags), batches=sum(d.batches for d in diags))
    return replace(done[0], windows=windows, metrics=metrics, timings=timings,
                   cache_bytes=sum(p.cache_bytes for p in parts), diagnostics=diagnostics,
                   token_kl=np.concatenate(kl) if kl else None, token_dp=np.concatenate(dp) if dp else None)


def run_protocol_sharded(model: Any, windows: torch.Tensor, stride: int, *, starts: Sequence[int],
                         batch_windows: int, ctx: Optional[Rank] = None, **kwargs: Any) -> ProtocolOutcome:
    """:func:`validation.protocol.run_protocol` on this rank's share of ``windows`` [num_windows, max_length],
    gathered from every rank; exactly ``run_protocol`` when ``ctx`` is None."""
    if ctx is None:
        return run_protocol(model, windows, stride, starts=starts, batch_windows=batch_windows, **kwargs)
    import torch.distributed as dist

    mine = shard_indices(windows.shape[0], batch_windows, ctx.rank, ctx.world_size)
    local = run_protocol(model, windows[mine], stride, starts=[starts[i] for i in mine],
                         batch_windows=batch_windows, **kwargs)
    local.metrics = list(local.metrics)
    parts: List[Any] = [None] * ctx.world_size
    dist.all_gather_object(parts, local)
    return merge_outcomes(parts, batch_windows)
