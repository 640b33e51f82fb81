"""Calibration windows and per-tensor sensitivity: ΔKL when only one tensor is degraded.

The calibration windows come from a part of the corpus that the evaluation windows of
``validate_perplexity.py`` (the first ``(windows - 1) * stride + max_length`` tokens) never
touch: :func:`calibration_starts` places them after that range, spread evenly over the rest.

Sensitivity (:func:`measure_sensitivity`): for each layer ``l``, role and candidate, the
tensor is encoded by the torch reference codec (``validation.reference_codec``, bit-exact with
the binary for one tensor's plan), put in place of the original in the prefilled cache, and the
scored tokens are run again. Only layers ``l`` and above see the change, so the pass starts at
layer ``l`` from the hidden states the baseline pass recorded there (:class:`PartialForward`;
checked against a full pass at start-up, and replaced by full passes if the check fails).
ΔKL is the mean over scored tokens of KL(baseline ‖ degraded), nats.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from validation.autotune.space import ROLES, Candidate
from validation.compat import set_cache_tensor
from validation.reference_codec import encode_reference


class CalibrationError(ValueError):
    """The corpus or the options leave no room for calibration windows disjoint from the evaluation's."""


def evaluation_span(eval_windows: int, max_length: int, stride: int) -> int:
    """Tokens ``[0, span)`` that ``eval_windows`` evaluation windows cover (the protocol starts at token 0)."""
    return (max(eval_windows, 1) - 1) * stride + max_length


def calibration_starts(num_tokens: int, count: int, length: int, avoid_end: int) -> List[int]:
    """``count`` window starts in ``[avoid_end, num_tokens - length]``, evenly spread.

    Every window ``[s, s + length)`` lies after token ``avoid_end`` (the end of the evaluation
    span), so calibration and evaluation share no token. Raises CalibrationError when the corpus
    is too short.
    """
    if count < 1:
        raise CalibrationError(f"--calibration-windows must be >= 1, got {count}")
    room = num_tokens - length - avoid_end
    if room < 0:
        raise CalibrationError(
            f"the corpus has {num_tokens} tokens; calibration windows of {length} tokens after the evaluation "
            f"span [0, {avoid_end}) need at least {avoid_end + length}")
    step = room // count if count > 1 else 0
    starts = [avoid_end + (room - step * (count - 1)) // 2 + i * step for i in range(count)] if count > 1 else [avoid_end + room // 2]
    return starts


def _base_model(model: Any) -> Any:
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), torch.nn.ModuleList):
        return inner
    return None


class PartialForward:
    """Scored-token passes that start at a given decoder layer.

    ``record`` runs the full pass on the original cache and keeps the hidden states entering
    every decoder layer ``[batch, tokens, hidden]``; ``run(l)`` runs layers ``l..L-1``, the final
    norm and the head from the recorded input of layer ``l`` (the base model's ``layers`` list is
    swapped for its tail during the call). After each pass the cache is cropped back to the
    context length. ``ok`` is False when the model has no ``model.layers`` or when a pass from
    the middle layer on the unchanged cache did not reproduce the full pass; ``run`` then runs
    the full model.
    """

    def __init__(self, model: Any, cache: Any, inputs: torch.Tensor, context: int) -> None:
        self.model, self.cache, self.inputs, self.context = model, cache, inputs, context
        self.base = _base_model(model)
        self.hidden: Dict[int, torch.Tensor] = {}
        self.ok = False
        self.check_error = math.nan

    def _lengths(self) -> List[int]:
        return [int(k.shape[-2]) for k, _ in cache_layers(self.cache)]

    def _crop(self, lengths: Sequence[int]) -> None:
        """Cut every layer back to its length before the pass (the crop API differs between
        transformers releases); a layer that keeps fewer positions (a selection) keeps its own."""
        for i, (k, v) in enumerate(cache_layers(self.cache)):
            if k.shape[-2] > lengths[i]:
                set_cache_tensor(self.cache, i, "keys", k[..., :lengths[i], :])
            if v.shape[-2] > lengths[i]:
                set_cache_tensor(self.cache, i, "values", v[..., :lengths[i], :])

    def _positions(self) -> Dict[str, Any]:
        """Explicit position ids ``context + arange(tokens)``: the scored tokens keep their real
        positions when a layer holds fewer than ``context`` (the same ids the model would use)."""
        n = self.inputs.shape[1]
        return {"position_ids": torch.arange(self.context, self.context + n, device=self.inputs.device)[None]}

    def _full(self) -> torch.Tensor:
        from validation.compat import forward

        lengths = self._lengths()
        try:
            return forward(self.model, self.cache, input_ids=self.inputs, use_cache=True, **self._positions()).logits
        finally:
            self._crop(lengths)

    def record(self) -> torch.Tensor:
        """The baseline logits ``[batch, tokens, vocab]``; records each layer's input and checks ``run``."""
        if self.base is None:
            return self._full()
        hooks = []
        for i, layer in enumerate(self.base.layers):
            def hook(_m: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any], i: int = i) -> None:
                h = args[0] if args else kwargs.get("hidden_states")
                self.hidden[i] = h.detach().clone()
            hooks.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            logits = self._full()
        finally:
            for h in hooks:
                h.remove()
        if len(self.hidden) == len(self.base.layers):
            mid = len(self.base.layers) // 2
            self.ok = True
            try:
                again = self.run(mid)
                self.check_error = float((again - logits).abs().max())
                self.ok = self.check_error <= 1e-3 * max(1.0, float(logits.abs().max()))
            except Exception:  # noqa: BLE001 - any failure means: use full passes
                self.ok = False
        return logits

    def run(self, layer: int) -> torch.Tensor:
        """Logits ``[batch, tokens, vocab]`` of a pass that starts at decoder ``layer``."""
        if not self.ok:
            return self._full()
        from validation.compat import forward

        full = self.base.layers
        lengths = self._lengths()
        self.base.layers = torch.nn.ModuleList(list(full)[layer:])
        try:
            return forward(self.model, self.cache, inputs_embeds=self.hidden[layer], use_cache=True,
                           **self._positions()).logits
        finally:
            self.base.layers = full
            self._crop(lengths)


def kl_mean(base_logp: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of KL(p ‖ q), nats: ``base_logp`` log-probabilities and ``logits`` ``[..., vocab]``."""
    lq = torch.log_softmax(logits.float(), dim=-1)
    return float((base_logp.exp() * (base_logp - lq)).sum(-1).clamp_min(0).mean())


@dataclass
class Sensitivity:
    """ΔKL per tensor and candidate: ``kl[role][c][layer]`` (nats per scored token).

    ``measured[role][c][layer]`` says whether that value was measured (True) or estimated from
    the tensor's measured candidates and the reconstruction errors (False, when ``--max-minutes``
    cut the stage short). ``rel_mse`` holds each reconstruction's error energy over the tensor's.
    """

    kl: Dict[str, List[List[float]]]
    measured: Dict[str, List[List[bool]]]
    rel_mse: Dict[str, List[List[float]]]
    passes: int = 0
    seconds: float = 0.0
    partial_forward: bool = False
    partial_check_error: float = math.nan
    tokens: int = 0
    notes: List[str] = field(default_factory=list)

    def estimated_count(self) -> int:
        """How many (tensor, candidate) values are estimates."""
        return sum(not m for r in ROLES for row in self.measured[r] for m in row)


def measurement_order(candidates: Dict[str, List[Candidate]]) -> List[Tuple[str, int]]:
    """(role, candidate index) in the order the stage measures them: the widths that decide most first.

    3-bit and 4-bit candidates first (where most tensors end up under a tight budget), then
    2-bit (the savings), then 8-bit (rarely chosen; a cut-short stage estimates them).
    """
    rank = {3: 0, 4: 1, 2: 2, 8: 3}
    order = [(r, i) for r in ROLES for i in range(len(candidates[r]))]
    return sorted(order, key=lambda ri: (rank.get(candidates[ri[0]][ri[1]].bits, 4), ri[1], ROLES.index(ri[0])))


def _estimate(kl: List[float], mse: List[float], measured: List[bool], c: int) -> float:
    """ΔKL of candidate ``c`` of one tensor from its measured candidates: scaled by the error energy ratio.

    Uses the measured candidate whose reconstruction error is closest in log scale (ΔKL is close
    to proportional to the error energy for small errors).
    """
    known = [j for j, m in enumerate(measured) if m]
    if not known:
        return math.nan
    j = min(known, key=lambda j: abs(math.log(max(mse[j], 1e-30)) - math.log(max(mse[c], 1e-30))))
    return kl[j] * mse[c] / max(mse[j], 1e-30)


def measure_sensitivity(
    model: Any,
    layers: Sequence[Tuple[torch.Tensor, torch.Tensor]],
    inputs: torch.Tensor,
    candidates: Dict[str, List[Candidate]],
    sink: int = 1,
    deadline: Optional[float] = None,
    on_pass: Optional[Callable[[int, int], None]] = None,
    estimate_bits: Sequence[int] = (8,),
) -> Sensitivity:
    """ΔKL of every (layer, role, candidate) on the prefilled ``layers`` ``[(key, value)]``.

    Each tensor is ``[windows, kv_heads, context, head_dim]``; ``inputs`` ``[windows, tokens]``
    are the scored tokens that follow the contexts. ``deadline`` (a ``time.perf_counter()``
    value): candidates not measured by then are estimated (:func:`_estimate`). ``on_pass(done,
    total)`` is called after each pass (progress bars, ETA). Candidates with a width in
    ``estimate_bits`` are never run: their error is so small (8 bits: 1/256 of 4-bit's energy)
    that the estimate from the tensor's measured candidates is as good as a pass.
    """
    from validation.compat import layers_to_cache

    t0 = time.perf_counter()
    n = len(layers)
    context = layers[0][0].shape[-2]
    cache = layers_to_cache(layers)
    originals = {(r, i): cache_t for i, (k, v) in enumerate(cache_layers(cache)) for r, cache_t in (("keys", k), ("values", v))}
    pf = PartialForward(model, cache, inputs, context)
    with torch.inference_mode():
        base_logits = pf.record()
        base_logp = torch.log_softmax(base_logits.float(), dim=-1)
        del base_logits
        kl = {r: [[math.nan] * n for _ in candidates[r]] for r in ROLES}
        measured = {r: [[False] * n for _ in candidates[r]] for r in ROLES}
        mse = {r: [[math.nan] * n for _ in candidates[r]] for r in ROLES}
        order = measurement_order(candidates)
        total = len({candidates[r][c].signature for r, c in order if candidates[r][c].bits not in estimate_bits}) * n
        done = 0
        cut = False
        runs = 0
        twin: Dict[Tuple[Any, ...], int] = {}  # signature -> the first candidate of the role with it
        for role, c in order:
            cand = candidates[role][c]
            first = twin.setdefault(cand.signature, c)
            for layer in range(n):
                if first != c:  # the same reconstruction as a candidate already run: the same ΔKL
                    kl[role][c][layer], mse[role][c][layer] = kl[role][first][layer], mse[role][first][layer]
                    measured[role][c][layer] = measured[role][first][layer]
                    continue
                x = layers[layer][0 if role == "keys" else 1]
                plan, group = cand.tensor_plan(sink, x.shape[-2])
                recon = encode_reference(x, group, plan=plan).reconstruction
                err = (recon.float() - x.float()).pow(2).sum().item()
                mse[role][c][layer] = err / max(x.float().pow(2).sum().item(), 1e-30)
                if not cut and deadline is not None and time.perf_counter() > deadline:
                    cut = True
                if candidates[role][c].bits in estimate_bits:
                    continue
                if not cut:
                    set_cache_tensor(cache, layer, role, recon.to(x.dtype))
                    try:
                        kl[role][c][layer] = kl_mean(base_logp, pf.run(layer))
                        runs += 1
                    finally:
                        set_cache_tensor(cache, layer, role, originals[(role, layer)])
                    measured[role][c][layer] = True
                done += 1
                if on_pass is not None:
                    on_pass(done, total)
    for role in ROLES:
        for c in range(len(candidates[role])):
            for layer in range(n):
                if not measured[role][c][layer]:
                    kl[role][c][layer] = _estimate([kl[role][j][layer] for j in range(len(candidates[role]))],
                                                   [mse[role][j][layer] for j in range(len(candidates[role]))],
                                                   [measured[role][j][layer] for j in range(len(candidates[role]))], c)
    out = Sensitivity(kl, measured, mse, passes=runs,
                      seconds=time.perf_counter() - t0, partial_forward=pf.ok, partial_check_error=pf.check_error,
                      tokens=int(inputs.numel()))
    if not pf.ok:
        out.notes.append("passes ran the whole model (the partial pass from a middle layer did not match a full pass)")
    if cut:
        out.notes.append(f"--max-minutes cut the stage: {out.estimated_count()} values estimated from the "
                         "measured candidates of the same tensor, scaled by the reconstruction error")
    skipped = [c.name for r in ROLES for c in candidates[r] if c.bits in estimate_bits]
    if skipped:
        out.notes.append(f"{', '.join(skipped)}: ΔKL estimated from the tensor's measured candidates, scaled by the "
                         "reconstruction error (not run)")
    return out


def measure_selection_sensitivity(
    model: Any,
    layers: Sequence[Tuple[torch.Tensor, torch.Tensor]],
    orders: Sequence[torch.Tensor],
    inputs: torch.Tensor,
    ratios: Sequence[float],
    method: str,
    deadline: Optional[float] = None,
    on_pass: Optional[Callable[[int, int], None]] = None,
) -> np.ndarray:
    """ΔKL ``[len(ratios), layers]`` when only layer ``l`` keeps ``ratio`` of its positions.

    ``layers`` ``[(key, value)]`` each ``[windows, kv_heads, context, head_dim]``; ``orders`` per
    layer ``[windows, kv_heads, context]``, each row's positions best first (the ranking of
    ``method``, :func:`validation.selection.rank_cache`); ``inputs`` ``[windows, tokens]``. The
    kept count is what :class:`validation.selection.SelectionSpec` gives (``min_tokens`` and
    rounding included). The layer's cache is shorter than the others for the pass
    (``validation.compat.selected_attention`` masks it by its own length), which starts at that
    layer (:class:`PartialForward`). A ratio of 1 costs 0 without a pass; passes not run by
    ``deadline`` are NaN.
    """
    from validation.compat import SELECTED_ATTR, layers_to_cache
    from validation.selection import SelectionSpec, keep_top

    n = len(layers)
    context = layers[0][0].shape[-2]
    cache = layers_to_cache(layers)
    setattr(cache, SELECTED_ATTR, True)
    pf = PartialForward(model, cache, inputs, context)
    out = np.full((len(ratios), n), np.nan)
    total = sum(1 for r in ratios if r < 1) * n
    done = 0
    with torch.inference_mode():
        base_logp = torch.log_softmax(pf.record().float(), dim=-1)
        for j, ratio in enumerate(ratios):
            if ratio >= 1:
                out[j] = 0.0
                continue
            count = SelectionSpec(method, keep_ratio=ratio).ratio_count(context)
            for layer in range(n):
                if deadline is not None and time.perf_counter() > deadline:
                    return out
                (k, v), = keep_top([layers[layer]], [orders[layer]], [count])[0]
                set_cache_tensor(cache, layer, "keys", k)
                set_cache_tensor(cache, layer, "values", v)
                try:
                    out[j, layer] = kl_mean(base_logp, pf.run(layer))
                finally:
                    set_cache_tensor(cache, layer, "keys", layers[layer][0])
                    set_cache_tensor(cache, layer, "values", layers[layer][1])
                done += 1
                if on_pass is not None:
                    on_pass(done, total)
    return out


def cache_layers(cache: Any) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The cache's own ``[(key, value)]`` tensors (no copies)."""
    from validation.compat import cache_to_layers

    return cache_to_layers(cache)


def kl_array(s: Sensitivity) -> Dict[str, np.ndarray]:
    """``kl[role]`` as ``[candidates, layers]`` float64 arrays, negatives clipped to 0."""
    return {r: np.clip(np.asarray(s.kl[r], dtype=np.float64), 0.0, None) for r in ROLES}
