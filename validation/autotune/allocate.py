"""Allocation under a ΔKL budget, and the real check of a whole plan through the binary.

:func:`allocate` solves the multiple-choice knapsack "one candidate per tensor, smallest total
size on disk, summed ΔKL at most B" exactly on a grid of B / resolution nats (dynamic
programming; each ΔKL is rounded *up* to the grid, so the sum of parts never exceeds B).

:class:`CalibrationSet` holds the prefilled calibration windows and their baseline logits;
:meth:`CalibrationSet.verify` sends the whole plan's preset through the real binary (save →
compress → decompress → load) and scores the windows as the perplexity protocol does
(``validation.protocol``), so the sum-of-parts estimate meets a real measurement.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from validation.autotune.space import ROLES, Assignment, Candidate, SizeTable

DEFAULT_RESOLUTION = 4000


_INF = np.iinfo(np.int64).max // 4


def _add_group(dp: np.ndarray, units: Sequence[int], sizes: Sequence[int], resolution: int) -> Tuple[np.ndarray, np.ndarray]:
    """One group of the multiple-choice knapsack: ``dp[j]`` is the least bytes of the groups so far
    with summed cost units ``<= j``; option ``o`` costs ``units[o]`` and ``sizes[o]`` bytes. Returns the
    table with this group added and, per ``j``, the option it took (-1: none fits)."""
    best = np.full(resolution + 1, _INF, dtype=np.int64)
    arg = np.full(resolution + 1, -1, dtype=np.int32)
    for o, (w, b) in enumerate(zip(units, sizes)):
        if w > resolution:
            continue
        shifted = np.full(resolution + 1, _INF, dtype=np.int64)
        shifted[w:] = dp[:resolution + 1 - w]
        cand = np.where(shifted < _INF, shifted + int(b), _INF)
        better = cand < best
        best[better], arg[better] = cand[better], o
    return best, arg


def allocate(kl: Dict[str, np.ndarray], sizes: SizeTable, candidates: Dict[str, List[Candidate]], budget_kl: float,
             resolution: int = DEFAULT_RESOLUTION) -> Optional[Assignment]:
    """The assignment of least total size whose summed ΔKL is at most ``budget_kl`` (None if none fits).

    ``kl[role]`` is ``[candidates, layers]`` (nats, >= 0); sizes come from ``sizes.bytes``.
    """
    if not budget_kl > 0:
        raise ValueError(f"budget_kl must be > 0, got {budget_kl}")
    n = kl["keys"].shape[1]
    unit = budget_kl / resolution
    dp = np.zeros(resolution + 1, dtype=np.int64)  # dp[j]: least bytes with summed units <= j
    picks: List[np.ndarray] = []
    tensors = [(r, i) for r in ROLES for i in range(n)]
    for role, layer in tensors:
        w = np.ceil(kl[role][:, layer] / unit - 1e-9).astype(np.int64)
        b = [sizes.bytes[role][c][layer] for c in range(len(candidates[role]))]
        dp, arg = _add_group(dp, [int(x) for x in w], b, resolution)
        picks.append(arg)
    if dp[resolution] >= _INF:
        return None
    choice = {r: [0] * n for r in ROLES}
    j = resolution
    for (role, layer), arg in zip(reversed(tensors), reversed(picks)):
        c = int(arg[j])
        choice[role][layer] = c
        j -= int(np.ceil(kl[role][c, layer] / unit - 1e-9))
    return Assignment(candidates, choice)


def allocate_layers(kl: Dict[str, np.ndarray], sel_kl: np.ndarray, ratios: Sequence[float], sizes: SizeTable,
                    candidates: Dict[str, List[Candidate]], budget_kl: float, bitmap_bytes: int = 0,
                    resolution: int = DEFAULT_RESOLUTION) -> Optional[Assignment]:
    """:func:`allocate` with a keep ratio per layer as a third choice beside the keys' and values' candidates.

    ``sel_kl`` ``[len(ratios), layers]`` is the ΔKL of each layer keeping each ratio of its
    positions (:func:`measure_selection_sensitivity`); a layer's option ``(ratio, key, value)``
    costs ``sel_kl + kl["keys"] + kl["values"]`` and takes ``ratio`` times its two tensors'
    sizes plus ``bitmap_bytes`` for the kept positions' index when ``ratio < 1``. Options that
    another option beats on both counts are dropped before the knapsack. The assignment's
    ``keep`` lists each layer's ratio.
    """
    if not budget_kl > 0:
        raise ValueError(f"budget_kl must be > 0, got {budget_kl}")
    n = kl["keys"].shape[1]
    unit = budget_kl / resolution
    nk, nv = len(candidates["keys"]), len(candidates["values"])
    dp = np.zeros(resolution + 1, dtype=np.int64)
    picks: List[Tuple[np.ndarray, List[Tuple[int, int, int, int]]]] = []
    for layer in range(n):
        opts: List[Tuple[int, int, int, int, int]] = []  # (units, bytes, ratio, key, value)
        for ri, ratio in enumerate(ratios):
            if not math.isfinite(sel_kl[ri, layer]):
                continue
            for ck in range(nk):
                for cv in range(nv):
                    w = sel_kl[ri, layer] + kl["keys"][ck, layer] + kl["values"][cv, layer]
                    units = int(np.ceil(w / unit - 1e-9))
                    if units > resolution:
                        continue
                    size = ratio * (sizes.bytes["keys"][ck][layer] + sizes.bytes["values"][cv][layer])
                    opts.append((units, int(round(size)) + (bitmap_bytes if ratio < 1 else 0), ri, ck, cv))
        opts.sort()
        front: List[Tuple[int, int, int, int]] = []  # (units, bytes, ...) with bytes falling as units grow
        for units, size, ri, ck, cv in opts:
            if not front or size < front[-1][1]:
                front.append((units, size, ri, ck * nv + cv))
        dp, arg = _add_group(dp, [f[0] for f in front], [f[1] for f in front], resolution)
        picks.append((arg, [(u, ri, kv // nv, kv % nv) for u, _, ri, kv in front]))
    if dp[resolution] >= _INF:
        return None
    choice = {r: [0] * n for r in ROLES}
    keep = [1.0] * n
    j = resolution
    for layer in reversed(range(n)):
        arg, front = picks[layer]
        units, ri, ck, cv = front[int(arg[j])]
        choice["keys"][layer], choice["values"][layer], keep[layer] = ck, cv, float(ratios[ri])
        j -= units
    return Assignment(candidates, choice, keep)


def predicted_kl(kl: Dict[str, np.ndarray], a: Assignment, sel_kl: Optional[np.ndarray] = None,
                 ratios: Sequence[float] = ()) -> float:
    """Summed ΔKL of the assignment's tensors (the sum of parts), with each layer's selection
    cost from ``sel_kl`` ``[len(ratios), layers]`` when the assignment keeps ratios per layer."""
    total = float(sum(kl[r][a.choice[r][i], i] for r in ROLES for i in range(a.num_layers)))
    if a.keep is not None and sel_kl is not None:
        total += float(sum(sel_kl[list(ratios).index(k), i] for i, k in enumerate(a.keep)))
    return total


def best_uniform(kl: Dict[str, np.ndarray], sizes: SizeTable, candidates: Dict[str, List[Candidate]],
                 budget_kl: float) -> Optional[Assignment]:
    """The smallest assignment with one candidate per role for every layer whose summed ΔKL fits ``budget_kl``."""
    n = kl["keys"].shape[1]
    best, best_size = None, math.inf
    for ck in range(len(candidates["keys"])):
        for cv in range(len(candidates["values"])):
            a = Assignment(candidates, {"keys": [ck] * n, "values": [cv] * n})
            if predicted_kl(kl, a) <= budget_kl and sizes.total(a) < best_size:
                best, best_size = a, sizes.total(a)
    return best


@dataclass
class Verification:
    """One whole plan measured on the calibration windows through the real binary.

    Perplexities and KL as the perplexity protocol computes them (``validation.protocol``);
    ``disk_ratio_vs_fp16`` and ``compressed_bytes`` from the binary's reports, summed over calls.
    """

    label: str
    baseline_ppl: float
    compressed_ppl: float
    kl: float
    top1: float
    disk_ratio_vs_fp16: float
    compressed_bytes: int
    bits_per_element: float
    predicted_kl: float = math.nan
    budget_kl: float = math.nan
    seconds: float = 0.0
    window_nll: List[Tuple[float, float]] = field(default_factory=list)  # per window: (baseline, compressed) NLL sums

    def interval(self, resamples: int = 2000, seed: int = 0) -> Tuple[float, float]:
        """95% paired-bootstrap interval of ΔPPL over windows, as ``validate_perplexity.py`` computes it."""
        from types import SimpleNamespace

        from validation.protocol import WindowScore
        from validation.stats import paired_bootstrap_interval

        tokens = self.tokens_per_window
        windows = [WindowScore(0, tokens, b, c, 0.0, 0) for b, c in self.window_nll]
        return paired_bootstrap_interval(SimpleNamespace(windows=windows), resamples, seed)  # type: ignore[arg-type]

    tokens_per_window: int = 0

    @property
    def delta(self) -> float:
        """ΔPPL, compressed minus baseline."""
        return self.compressed_ppl - self.baseline_ppl

    @property
    def delta_pct(self) -> float:
        """ΔPPL in percent of the baseline."""
        return 100.0 * self.delta / self.baseline_ppl

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready fields, ΔPPL included."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "window_nll"}
        lo, hi = self.interval() if len(self.window_nll) > 1 else (math.nan, math.nan)
        d.update(delta=self.delta, delta_pct=self.delta_pct, delta_ci=[lo, hi], windows=len(self.window_nll))
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


@dataclass
class CalibrationSet:
    """Prefilled calibration windows, batch by batch, with their baseline scoring pass.

    Per batch: ``layers`` ``[(key, value)]`` each ``[batch, kv_heads, context, head_dim]``;
    ``first_logits`` ``[batch, vocab]``; ``baseline_logits`` ``[batch, stride - 1, vocab]``;
    ``tokens`` ``[batch, max_length]``.
    """

    starts: List[int]
    max_length: int
    stride: int
    batches: List[Dict[str, Any]] = field(default_factory=list)
    selection: Optional[Any] = None  # a validation.selection.SelectionSpec, or None: the whole context is kept
    selection_only: Optional["Verification"] = None  # the selected, uncompressed cache against the baseline

    @property
    def context(self) -> int:
        """Context tokens per window (before any selection)."""
        return self.max_length - self.stride

    @property
    def keep_ratio(self) -> float:
        """The share of context positions the cache keeps (1.0 without selection)."""
        if self.selection is None or not self.batches:
            return 1.0
        return self.batches[0]["layers"][0][0].shape[-2] / self.context

    @classmethod
    def build(cls, model: Any, token_ids: torch.Tensor, starts: Sequence[int], max_length: int, stride: int,
              batch_windows: int, progress: Any = None, selection: Optional[Any] = None,
              baseline: Optional["CalibrationSet"] = None, rank: Optional[str] = None) -> "CalibrationSet":
        """Prefill every window's context and run its baseline scoring pass (``token_ids`` ``[num_tokens]``).

        With ``selection`` (a :class:`validation.selection.SelectionSpec`) each batch keeps only the
        selected positions, as ``validate_perplexity.py --selection`` does: ``layers`` then hold
        ``[batch, kv_heads, kept, head_dim]`` and ``positions`` the kept indices per layer; the baseline
        pass still attends to the whole context, and :attr:`selection_only` scores the selected cache
        without any codec (what the selection alone costs). ``baseline``, a set built on the same
        windows, lends its baseline logits instead of a second baseline pass (the same tensors,
        not copies: ``[batch, stride - 1, vocab]`` per batch is the largest thing a set holds).
        ``rank`` (a selection method, without ``selection``): keep every position but rank each
        layer's positions as that method does (``orders`` per batch, per layer [batch, kv_heads,
        context], best first), so that :meth:`verify` can select per-layer counts later.
        """
        if baseline is not None and (baseline.starts != list(starts) or baseline.max_length != max_length
                                     or baseline.stride != stride or len(baseline.batches) != -(-len(starts) // batch_windows)):
            raise ValueError("baseline must be a CalibrationSet of the same windows, lengths and batches")
        from validation.compat import forward, layers_to_cache
        from validation.protocol import _supports_logits_to_keep, _window_stats, prefill_contexts
        from validation.selection import SelectionSpec, selected_prefill, selection_position_ids

        if rank is not None and selection is not None:
            raise ValueError("give either selection or rank, not both")
        out = cls(list(starts), max_length, stride, selection=selection)
        ranking = None if rank is None else SelectionSpec(rank, keep_ratio=1.0)
        keep = _supports_logits_to_keep(model)
        context = max_length - stride
        windows = torch.stack([token_ids[s:s + max_length] for s in starts])
        sel_nll: List[Tuple[float, float]] = []
        sel_kl = 0.0
        with torch.inference_mode():
            for b0 in range(0, len(starts), batch_windows):
                batch = windows[b0:b0 + batch_windows]
                pre, chosen = selected_prefill(model, selection or ranking,
                                               lambda: prefill_contexts(model, batch[:, :context], keep), rank_only=rank is not None)
                scored_in = batch[:, context:max_length - 1]
                if baseline is not None:
                    logits_b = baseline.batches[b0 // batch_windows]["baseline_logits"]
                else:
                    logits_b = forward(model, layers_to_cache(pre.layers), input_ids=scored_in, use_cache=True).logits
                entry: Dict[str, Any] = {"layers": pre.layers, "first_logits": pre.first_logits,
                                         "baseline_logits": logits_b, "tokens": batch}
                if rank is not None:
                    entry["orders"] = chosen
                    chosen = None
                if chosen is not None:
                    entry.update(layers=chosen.layers, positions=chosen.positions, selection=chosen,
                                 full_elements=sum(k.numel() + v.numel() for k, v in pre.layers),
                                 full_dtype=next(k.dtype for k, _ in pre.layers))
                    logits_s = forward(model, layers_to_cache(chosen.layers, selected=True), input_ids=scored_in, use_cache=True,
                                       **selection_position_ids(selection, context, scored_in)).logits
                    for j in range(batch.shape[0]):
                        ws = _window_stats(pre.first_logits[j], logits_b[j], logits_s[j], batch[j, context:])
                        sel_nll.append((ws.nll_baseline, ws.nll_compressed))
                        sel_kl += ws.kl_sum
                    del logits_s
                out.batches.append(entry)
                if progress is not None:
                    progress.update(batch.shape[0])
        if sel_nll:
            tokens = stride * len(sel_nll)
            out.selection_only = Verification(
                "selection only", math.exp(sum(b for b, _ in sel_nll) / tokens), math.exp(sum(c for _, c in sel_nll) / tokens),
                sel_kl / tokens, math.nan, math.nan, 0, math.nan, window_nll=sel_nll, tokens_per_window=stride)
        return out

    def verify(self, model: Any, preset_path: str, label: str, work_dir: Optional[str] = None,
               layer_keep: Optional[Sequence[float]] = None, method: Optional[str] = None) -> Verification:
        """Score the windows attending to the binary's reconstruction of their caches under ``preset_path``.

        ``layer_keep`` (a set built with ``rank``): first keep, per layer, that share of its
        positions in the order ``rank`` gave them (``method`` names it), as a preset's per-layer
        selection does.
        """
        from validation.compat import forward, layers_to_cache
        from validation.compression_bridge import roundtrip_kv_cache
        from validation.protocol import _window_stats, check_reconstruction
        from validation.selection import SelectionSpec, select_ranked, selection_position_ids
        from validation.stats import aggregate_metrics

        spec = self.selection
        if layer_keep is not None:
            if not self.batches or "orders" not in self.batches[0]:
                raise ValueError("layer_keep needs a CalibrationSet built with rank")
            spec = SelectionSpec(method or "attention", layer_keep_ratios=tuple(layer_keep))

        t0 = time.perf_counter()
        nll_b = nll_c = kl_sum = 0.0
        top1 = tokens = 0
        metrics = []
        per_window: List[Tuple[float, float]] = []
        with tempfile.TemporaryDirectory(prefix="kv-autotune-verify-", dir=work_dir) as tmp, torch.inference_mode():
            for batch in self.batches:
                chosen = batch.get("selection")
                if layer_keep is not None:  # the set holds the full layers: cut them here
                    chosen = select_ranked(batch["layers"], batch["orders"], spec)
                sent = batch["layers"] if chosen is None else chosen.layers
                recon, m = roundtrip_kv_cache(sent, tmp, preset=preset_path,
                                              positions=None if chosen is None else chosen.positions,
                                              context_length=None if chosen is None else self.context)
                if layer_keep is not None:
                    chosen.annotate(m, batch["layers"])
                elif chosen is not None:
                    chosen.annotate_counts(m, batch["full_elements"], batch["full_dtype"])
                metrics.append(m)
                check_reconstruction(sent, recon, f"{label}: ")
                toks = batch["tokens"]
                scored_in = toks[:, self.context:self.max_length - 1]
                logits_c = forward(model, recon, input_ids=scored_in, use_cache=True,
                                   **selection_position_ids(spec, self.context, scored_in)).logits
                labels = toks[:, self.context:]
                for j in range(toks.shape[0]):
                    ws = _window_stats(batch["first_logits"][j], batch["baseline_logits"][j], logits_c[j], labels[j])
                    nll_b, nll_c, kl_sum = nll_b + ws.nll_baseline, nll_c + ws.nll_compressed, kl_sum + ws.kl_sum
                    top1 += ws.top1_matches
                    tokens += self.stride
                    per_window.append((ws.nll_baseline, ws.nll_compressed))
        agg = aggregate_metrics(metrics)
        return Verification(label, math.exp(nll_b / tokens), math.exp(nll_c / tokens), kl_sum / tokens, top1 / tokens,
                            float(agg.get("disk_ratio_vs_fp16", math.nan)), int(agg["compressed_size_bytes"]),
                            float(agg.get("bits_per_element", math.nan)), seconds=time.perf_counter() - t0,
                            window_nll=per_window, tokens_per_window=self.stride)


@dataclass
class SearchRound:
    """One allocation and its real check: the KL budget it was solved for, the plan, the measurement."""

    budget_kl: float
    assignment: Assignment
    verification: Verification
    within_budget: bool
    keep_ratio: float = 1.0  # the token selection the plan was checked with (1.0: every position kept)
    preset_file: Optional[str] = None  # the round's preset, when --keep-rounds kept it


def next_budget(rounds: Sequence[SearchRound], target: float, metric: str) -> float:
    """The KL budget of the next round, toward ``target`` on the measured metric.

    ``metric`` is "delta_pct" or "kl". Until the rounds of the last round's keep ratio bracket the
    target, a secant step from the last round (at most 4x either way). Once one round is within
    the target and one is not, the closest two on either side are interpolated in log space
    (regula falsi), kept at least a fifth of the bracket away from its ends so that a curve
    steeper than a line (ΔPPL grows faster than the KL budget once keys lose bits) cannot pin
    every step to one end.
    """
    def value(r: SearchRound) -> float:
        return getattr(r.verification, metric)

    last = rounds[-1]
    rounds = [r for r in rounds if r.keep_ratio == last.keep_ratio]  # one bracket per selection
    ok = [r for r in rounds if r.within_budget]
    bad = [r for r in rounds if not r.within_budget]
    meas = max(value(last), 1e-9)
    guess = last.budget_kl * min(4.0, max(0.25, (target / meas) ** 0.9))
    if ok and bad:
        lo_r = max(ok, key=lambda r: r.budget_kl)
        above = [r for r in bad if r.budget_kl > lo_r.budget_kl]
        if above:
            hi_r = min(above, key=lambda r: r.budget_kl)
            lo, hi = math.log(lo_r.budget_kl), math.log(hi_r.budget_kl)
            span = value(hi_r) - value(lo_r)
            frac = (target - value(lo_r)) / span if span > 0 else 0.5
            guess = math.exp(lo + min(0.8, max(0.2, frac)) * (hi - lo))
    return guess
