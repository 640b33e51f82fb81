"""The auto-tuner's run: calibration, sizes, sensitivity, allocation with real checks, held-out result.

Steps (docs/python-api.md, "Auto-tuning"):

1. load the model and the whole corpus; place the calibration windows after the evaluation
   span, prefill them and run their baseline pass (:class:`CalibrationSet`);
2. one real check of the built-in ``compact`` preset on them (a reference point, and the time
   one check takes, for the time plan);
3. each candidate's real size per tensor (``kv-compress metrics``, :func:`measure_sizes`);
4. each tensor's ΔKL under each candidate (:func:`measure_sensitivity`);
5. allocation rounds: solve for a KL budget, check the whole plan through the binary, move the
   KL budget toward the target (a plan over the target is repaired by a tighter budget: the
   tensors with the worst ΔKL per byte saved step back first), keep the smallest plan within it;
6. the held-out result: the evaluation windows of ``validate_perplexity.py`` scored with the
   tuned preset (and any ``--compare`` presets) exactly as that protocol scores them.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from validation.autotune.allocate import (
    CalibrationSet,
    SearchRound,
    Verification,
    allocate,
    allocate_layers,
    best_uniform,
    next_budget,
    predicted_kl,
)
from validation.autotune.sensitivity import (
    Sensitivity,
    calibration_starts,
    evaluation_span,
    kl_array,
    measure_selection_sensitivity,
    measure_sensitivity,
)
from validation.autotune.space import (
    ROLES,
    Assignment,
    Candidate,
    SizeTable,
    assignment_preset,
    default_space,
    load_space_file,
    measure_sizes,
    write_preset,
)
from validation.progress import progress_bar
from validation.reports import Console


class AutotuneError(ValueError):
    """A bad option or an impossible search; the message names the allowed values and the value received."""


@dataclass
class Budget:
    """The quality budget: ``kind`` "ppl_pct" (ΔPPL in % of the baseline), "ppl_abs" (ΔPPL) or "kl" (nats/token)."""

    kind: str
    value: float

    @classmethod
    def parse(cls, budget: Optional[str], budget_kl: Optional[float]) -> "Budget":
        """``--budget 1%`` / ``--budget 0.18`` / ``--budget-kl 0.01``; exactly one (default ``1%``)."""
        if budget is not None and budget_kl is not None:
            raise AutotuneError(f"use either --budget or --budget-kl, not both (got --budget {budget} --budget-kl {budget_kl})")
        if budget_kl is not None:
            if not (math.isfinite(budget_kl) and budget_kl > 0):
                raise AutotuneError(f"--budget-kl must be a positive number of nats per token, got {budget_kl}")
            return cls("kl", float(budget_kl))
        text = (budget or "1%").strip()
        pct = text.endswith("%")
        try:
            value = float(text[:-1] if pct else text)
        except ValueError:
            raise AutotuneError(f"--budget must be a percentage of the baseline perplexity (e.g. 1%) or an absolute "
                                f"ΔPPL (e.g. 0.18), got {text!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise AutotuneError(f"--budget must be > 0, got {text!r}")
        return cls("ppl_pct" if pct else "ppl_abs", value)

    def describe(self) -> str:
        """E.g. "ΔPPL <= 1% of the baseline"."""
        return {"ppl_pct": f"ΔPPL <= {self.value:g}% of the baseline perplexity",
                "ppl_abs": f"ΔPPL <= {self.value:g}", "kl": f"KL <= {self.value:g} nats per token"}[self.kind]

    def metric(self) -> str:
        """The Verification attribute compared with :meth:`target`."""
        return {"ppl_pct": "delta_pct", "ppl_abs": "delta", "kl": "kl"}[self.kind]

    def target(self, margin: float) -> float:
        """What the calibration measurement must stay at or under: ``margin`` times the budget."""
        return self.value * margin

    def initial_kl(self, margin: float, baseline_ppl: float) -> float:
        """The first round's KL budget: ΔNLL is close to KL, so ln(1 + budget) for a perplexity budget."""
        if self.kind == "kl":
            return self.value * margin
        pct = self.value if self.kind == "ppl_pct" else 100.0 * self.value / baseline_ppl
        return math.log1p(pct * margin / 100.0)

    def met(self, v: Verification, margin: float = 1.0) -> bool:
        """Whether a measurement is within ``margin`` times the budget."""
        return getattr(v, self.metric()) <= self.target(margin)


@dataclass
class AutotuneOptions:
    """Everything a tuning run is configured with (the flags of ``python -m validation.autotune``)."""

    budget: Budget = field(default_factory=lambda: Budget("ppl_pct", 1.0))
    output: str = "autotune-results/preset.json"
    report_dir: Optional[str] = None
    model: Optional[str] = "embedded"
    dataset: Optional[str] = "embedded"
    text_file: Optional[str] = None
    max_length: int = 1024
    stride: int = 256
    eval_windows: int = 16
    calibration_windows: int = 16
    sensitivity_tokens: int = 32
    batch_windows: int = 4
    space: str = "default"
    space_file: Optional[str] = None
    bits: Tuple[int, ...] = (2, 3, 4, 8)
    rounds: int = 6
    margin: float = 0.9
    max_minutes: float = 15.0
    heldout: bool = True
    compare: List[str] = field(default_factory=list)
    sink: int = 1
    device: Optional[str] = None
    name: str = "autotuned"
    selection: Optional[str] = None  # token selection method (validation/selection.py), None: keep every position
    keep_ratios: Tuple[float, ...] = (1.0,)  # keep ratios the search tries with ``selection``
    keep_rounds: bool = False  # keep every round's preset file (OUTPUT.roundN.json) for held-out scoring later
    per_layer_keep: bool = False  # each layer picks its own keep ratio among keep_ratios (and 1)

    def selection_spec(self, keep_ratio: float) -> Any:
        """The SelectionSpec of ``keep_ratio`` (None for 1.0: the whole context, no selection)."""
        from validation.selection import SelectionSpec

        return None if keep_ratio == 1.0 or self.selection is None else SelectionSpec(self.selection, keep_ratio=keep_ratio)

    def check(self) -> None:
        """Raise AutotuneError naming the allowed values and the value received for a bad option."""
        for flag, value, lo in (("--max-length", self.max_length, 2), ("--eval-windows", self.eval_windows, 1),
                                ("--calibration-windows", self.calibration_windows, 1),
                                ("--sensitivity-tokens", self.sensitivity_tokens, 1),
                                ("--batch-windows", self.batch_windows, 1), ("--rounds", self.rounds, 1)):
            if value < lo:
                raise AutotuneError(f"{flag} must be >= {lo}, got {value}")
        if not 1 <= self.stride < self.max_length:
            raise AutotuneError(f"--stride must be in [1, {self.max_length - 1}], got {self.stride}")
        if self.sensitivity_tokens > self.stride - 1:
            raise AutotuneError(f"--sensitivity-tokens must be in [1, stride - 1 = {self.stride - 1}], got {self.sensitivity_tokens}")
        if not 0 < self.margin <= 1:
            raise AutotuneError(f"--margin must be in (0, 1], got {self.margin}")
        if not (math.isfinite(self.max_minutes) and self.max_minutes > 0):
            raise AutotuneError(f"--max-minutes must be > 0, got {self.max_minutes}")
        if self.sink < 0:
            raise AutotuneError(f"--sink must be >= 0, got {self.sink}")
        from validation.selection import SELECTION_METHODS

        if self.selection is not None and self.selection not in SELECTION_METHODS:
            raise AutotuneError(f"--selection must be one of {list(SELECTION_METHODS)}, got {self.selection!r}")
        bad = [r for r in self.keep_ratios if isinstance(r, bool) or not (isinstance(r, (int, float)) and 0 < r <= 1)]
        if bad or not self.keep_ratios:
            raise AutotuneError(f"--keep-ratios must list numbers in (0, 1], got {list(self.keep_ratios)}")
        if self.per_layer_keep and (self.selection is None or all(r == 1.0 for r in self.keep_ratios)):
            raise AutotuneError(f"--keep-per-layer needs --selection (one of {list(SELECTION_METHODS)}) and --keep-ratios "
                                f"below 1, got --selection {self.selection} --keep-ratios "
                                f"{','.join(f'{r:g}' for r in self.keep_ratios)}")
        if self.selection is None and any(r != 1.0 for r in self.keep_ratios):
            raise AutotuneError(f"--keep-ratios {','.join(f'{r:g}' for r in self.keep_ratios)} needs --selection "
                                f"(one of {list(SELECTION_METHODS)})")


@dataclass
class AutotuneResult:
    """What a run found and measured (the report's content)."""

    options: AutotuneOptions
    preset: Dict[str, Any]
    assignment: Assignment
    candidates: Dict[str, List[Candidate]]
    sizes: SizeTable
    sensitivity: Sensitivity
    rounds: List[SearchRound]
    chosen_round: int
    calibration_starts: List[int]
    evaluation_span: Tuple[int, int]
    reference: Optional[Verification]
    uniform: Optional[Tuple[Assignment, Verification]]
    heldout: List[Tuple[str, Verification]]
    timings: Dict[str, float]
    model_info: Dict[str, Any]
    corpus_info: Dict[str, Any]
    budget_met: bool
    notes: List[str] = field(default_factory=list)
    selection_only: Dict[float, Verification] = field(default_factory=dict)  # keep ratio -> selection alone, calibration
    layer_ratios: List[float] = field(default_factory=list)  # --keep-per-layer: the ratios each layer chose from
    selection_kl: Optional[Any] = None  # --keep-per-layer: ΔKL [len(layer_ratios), layers] of one layer's selection

    @property
    def keep_ratio(self) -> float:
        """The chosen plan's keep ratio (1.0: no token selection, or one ratio per layer: :attr:`layer_keep`)."""
        return self.rounds[self.chosen_round].keep_ratio

    @property
    def layer_keep(self) -> Optional[List[float]]:
        """The chosen plan's keep ratio per layer (None unless ``--keep-per-layer``)."""
        return self.assignment.keep

    @property
    def mean_keep(self) -> float:
        """The share of context positions the chosen plan keeps, over all layers."""
        return self.assignment.mean_keep if self.layer_keep else self.keep_ratio


def _candidates(opts: AutotuneOptions, head_dim: int) -> Dict[str, List[Candidate]]:
    if opts.space_file:
        return load_space_file(opts.space_file, head_dim)
    out = {r: default_space(r, head_dim, opts.space, opts.bits) for r in ROLES}
    for r in ROLES:
        if not out[r]:
            raise AutotuneError(f"no {r} candidate of space {opts.space!r} with bits {list(opts.bits)} fits head_dim {head_dim}")
    return out


def run_autotune(opts: AutotuneOptions, console: Optional[Console] = None, progress: bool = True) -> AutotuneResult:
    """Tune a preset under ``opts.budget``; write it to ``opts.output`` and return the result (report not written)."""
    import torch

    from validation.options import ValidationOptions
    from validation.runner import load_run_inputs

    opts.check()
    console = console or Console(False)
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    deadline = t_start + 60.0 * opts.max_minutes
    timings: Dict[str, float] = {}
    vopts = ValidationOptions(model=opts.model, dataset=opts.dataset, text_file=opts.text_file, max_length=opts.max_length,
                              stride=opts.stride, max_samples=0, device=opts.device)
    inputs = load_run_inputs(vopts, console, title="Auto-tune under a quality budget", steps=6)
    model, ids = inputs.model, inputs.token_ids.reshape(-1)
    timings["load_s"] = time.perf_counter() - t_start
    span = evaluation_span(opts.eval_windows, opts.max_length, opts.stride)
    try:
        starts = calibration_starts(ids.numel(), opts.calibration_windows, opts.max_length, span)
    except ValueError as e:
        raise AutotuneError(str(e)) from None
    head_dim = model.config.head_dim if getattr(model.config, "head_dim", None) else \
        model.config.hidden_size // model.config.num_attention_heads
    candidates = _candidates(opts, head_dim)
    console.info(f"Budget: {opts.budget.describe()} (the search aims at {opts.margin:g} x on calibration)")
    console.info(f"Evaluation span: tokens [0, {span}); calibration windows at {starts[0]}..{starts[-1] + opts.max_length} "
                 f"of {ids.numel()} tokens")
    console.info("Candidates: " + "; ".join(f"{r}: {', '.join(c.name for c in candidates[r])}" for r in ROLES))

    console.step(2, 6, "Prefilling the calibration windows and their baseline pass...")
    t = time.perf_counter()
    bar = progress_bar(total=len(starts), desc="calibration prefill", unit="window", enabled=progress)
    calib = CalibrationSet.build(model, ids, starts, opts.max_length, opts.stride, opts.batch_windows, bar,
                                 rank=opts.selection if opts.per_layer_keep else None)
    bar.close()
    timings["calibration_prefill_s"] = time.perf_counter() - t
    reference = calib.verify(model, "compact", "compact (built-in)")
    per_check = reference.seconds
    console.info(f"compact on calibration: ΔPPL {reference.delta:+.4f} ({reference.delta_pct:+.2f}%), KL {reference.kl:.5f}, "
                 f"{reference.disk_ratio_vs_fp16:.2f}x; one check takes {per_check:.1f} s")

    console.step(3, 6, "Measuring each candidate's size through the binary...")
    t = time.perf_counter()
    first = calib.batches[0]["layers"]
    bar = progress_bar(total=max(len(candidates[r]) for r in ROLES), desc="sizes", unit="call", enabled=progress)
    sizes = measure_sizes(first, candidates, sink=opts.sink, progress=bar)
    bar.close()
    timings["sizes_s"] = time.perf_counter() - t

    console.step(4, 6, "Measuring each tensor's sensitivity (ΔKL with only that tensor degraded)...")
    t = time.perf_counter()
    layers = [(torch.cat([b["layers"][i][0] for b in calib.batches]), torch.cat([b["layers"][i][1] for b in calib.batches]))
              for i in range(len(first))]
    ctx = calib.context
    sens_inputs = torch.cat([b["tokens"][:, ctx:ctx + opts.sensitivity_tokens] for b in calib.batches])
    n_keep = 1 if opts.per_layer_keep else len(set(opts.keep_ratios))
    prefill_s = timings["calibration_prefill_s"]  # a selected prefill scores the selected cache instead of the baseline
    reserve = ((opts.rounds * n_keep + 2) * per_check + (n_keep - 1) * prefill_s) * 1.2
    layer_ratios = sorted(set(opts.keep_ratios) | {1.0}, reverse=True) if opts.per_layer_keep else []
    n_passes = (len({c.signature for r in ROLES for c in candidates[r] if c.bits != 8}) + len(layer_ratios) - bool(layer_ratios)) * len(first)
    bar = progress_bar(total=n_passes, desc="sensitivity", unit="pass", enabled=progress)
    eta_said = [False]
    codec_done = [0]

    def on_pass(done: int, total: int) -> None:
        codec_done[0] = done
        bar.update(1)
        if not eta_said[0] and done >= max(10, total // 20):
            eta_said[0] = True
            rate = (time.perf_counter() - t) / done
            left = rate * (total - done) + reserve
            console.info(f"Time estimate: {rate:.2f} s per pass, about {left / 60:.1f} more minutes "
                         f"(bounded by --max-minutes {opts.max_minutes:g})")

    sens = measure_sensitivity(model, layers, sens_inputs, candidates, opts.sink, deadline=deadline - reserve, on_pass=on_pass)
    sel_kl = None
    if opts.per_layer_keep:
        orders = [torch.cat([b["orders"][i] for b in calib.batches]) for i in range(len(first))]
        offset = codec_done[0]
        sel_kl = measure_selection_sensitivity(model, layers, orders, sens_inputs, layer_ratios, opts.selection,
                                               deadline=deadline - reserve, on_pass=lambda d, t: on_pass(offset + d, n_passes))
        del orders
        missing = int(np.isnan(sel_kl).sum())
        if missing:
            sens.notes.append(f"--max-minutes cut the selection passes: {missing} (layer, keep ratio) pairs not "
                              "measured, not offered")
    bar.close()
    del layers
    timings["sensitivity_s"] = time.perf_counter() - t
    for note in sens.notes:
        console.info(note)

    console.step(5, 6, "Allocating under the budget and checking each plan through the binary...")
    t = time.perf_counter()
    kl = kl_array(sens)
    work = os.path.dirname(os.path.abspath(opts.output))
    os.makedirs(work, exist_ok=True)
    notes: List[str] = []
    rounds: List[SearchRound] = []
    sets: Dict[float, CalibrationSet] = {}
    selection_only: Dict[float, Verification] = {}
    for keep in ([1.0] if opts.per_layer_keep else sorted(set(opts.keep_ratios), reverse=True)):
        if keep != 1.0:
            if time.perf_counter() + prefill_s + per_check > deadline:
                notes.append(f"--max-minutes left no time for keep ratio {keep:g}")
                continue
            bar = progress_bar(total=len(starts), desc=f"prefill, keep {keep:g}", unit="window", enabled=progress)
            sets[keep] = CalibrationSet.build(model, ids, starts, opts.max_length, opts.stride, opts.batch_windows, bar,
                                              selection=opts.selection_spec(keep), baseline=calib)
            bar.close()
            sel = sets[keep].selection_only
            assert sel is not None
            selection_only[keep] = sel
            console.info(f"keep {keep:g} ({opts.selection}) without a codec: ΔPPL {sel.delta:+.4f} ({sel.delta_pct:+.2f}%), "
                         f"KL {sel.kl:.5f}")
        else:
            sets[keep] = calib
        rounds += _search_rounds(opts, model, sets[keep], kl, sizes.for_keep_ratio(keep), candidates, keep,
                                 selection_only.get(keep), reference.baseline_ppl, deadline, per_check, console, notes,
                                 sel_kl, layer_ratios, _bitmap_bytes(first))
    if not rounds:
        raise AutotuneError("no plan of the candidates fits a KL budget the search could reach: widen --bits or --space, "
                            "or try higher --keep-ratios")
    ok_rounds = [j for j, r in enumerate(rounds) if r.within_budget]
    if ok_rounds:
        chosen = max(ok_rounds, key=lambda j: rounds[j].verification.disk_ratio_vs_fp16)
    else:
        chosen = min(range(len(rounds)), key=lambda j: getattr(rounds[j].verification, opts.budget.metric()))
        notes.append("no round met the budget on calibration: the preset is the round closest to it")
    assignment = rounds[chosen].assignment
    keep = rounds[chosen].keep_ratio
    uniform = None
    ua = best_uniform(kl, sizes.for_keep_ratio(keep), candidates, rounds[chosen].budget_kl)
    if ua is not None and time.perf_counter() + per_check <= deadline + 60:
        upath = write_preset(assignment_preset(ua, "uniform", "best uniform", opts.sink), opts.output + ".uniform.json")
        uniform = (ua, sets[keep].verify(model, upath, "best uniform of the space"))
        os.remove(upath)
    timings["allocation_s"] = time.perf_counter() - t
    timings["search_s"] = time.perf_counter() - t_start
    timings["search_cpu_s"] = time.process_time() - cpu_start
    cal = rounds[chosen].verification
    description = (f"auto-tuned under {opts.budget.describe()} on {len(starts)} calibration windows of "
                   f"{inputs.choice.display_name}: {cal.delta_pct:+.2f}% ΔPPL, {cal.disk_ratio_vs_fp16:.2f}x on calibration")
    if keep != 1.0:
        description += (f", with token selection {opts.selection} at keep ratio {keep:g} (validate_perplexity.py "
                        f"--selection {opts.selection} --keep-ratio {keep:g}; kv-compress alone applies the codec only)")
    if assignment.keep is not None:
        description += (f", with token selection {opts.selection} keeping {assignment.mean_keep:.3f} of the positions on average, a ratio "
                        f"per layer (the preset's selection; validate_perplexity.py --preset applies it, kv-compress "
                        f"alone applies the codec only)")
    preset = assignment_preset(assignment, opts.name, description, opts.sink, extra=_selection_extra(opts, assignment))
    write_preset(preset, opts.output)

    heldout: List[Tuple[str, Verification]] = []
    if opts.heldout:
        console.step(6, 6, "Held-out result: the evaluation windows of validate_perplexity.py...")
        t = time.perf_counter()
        eval_starts = list(range(0, opts.eval_windows * opts.stride, opts.stride))
        jobs = [(keep, opts.name, opts.output)] + [(1.0, c, c) for c in opts.compare]
        evs: Dict[float, CalibrationSet] = {}
        for k in sorted({j[0] for j in jobs}, reverse=True):
            bar = progress_bar(total=len(eval_starts), desc="held-out prefill" + (f", keep {k:g}" if k != 1.0 else ""),
                               unit="window", enabled=progress)
            evs[k] = CalibrationSet.build(model, ids, eval_starts, opts.max_length, opts.stride, opts.batch_windows, bar,
                                          selection=opts.selection_spec(k), baseline=evs.get(1.0),
                                          rank=opts.selection if opts.per_layer_keep and k == 1.0 else None)
            bar.close()
        for k, label, p in jobs:
            per_layer = assignment.keep if p == opts.output else None
            v = evs[k].verify(model, p, label, layer_keep=per_layer, method=opts.selection)
            heldout.append((label, v))
            console.info(f"held-out {label}: ΔPPL {v.delta:+.4f} ({v.delta_pct:+.2f}%), KL {v.kl:.5f}, "
                         f"{v.disk_ratio_vs_fp16:.3f}x on disk")
        timings["heldout_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start
    timings["total_cpu_s"] = time.process_time() - cpu_start
    model_info = {"name": inputs.choice.display_name, "source": inputs.choice.source,
                  "num_layers": len(first), "head_dim": head_dim, "num_kv_heads": int(first[0][0].shape[1])}
    met = rounds[chosen].within_budget
    return AutotuneResult(opts, preset, assignment, candidates, sizes, sens, rounds, chosen, starts, (0, span),
                          reference, uniform, heldout, timings, model_info, inputs.corpus_info, met, notes + sens.notes,
                          selection_only, list(layer_ratios), None if sel_kl is None else sel_kl.tolist())


def _bitmap_bytes(layers: List[Tuple[Any, Any]]) -> int:
    """A layer's index bitmap in the size table's cache: one bit per context position and row."""
    b, h, ctx, _ = layers[0][0].shape
    return int(b * h * math.ceil(ctx / 8))


def _selection_extra(opts: AutotuneOptions, a: Assignment) -> Optional[Dict[str, Any]]:
    """The preset's ``selection`` section for a plan with per-layer keep ratios (None without)."""
    if a.keep is None:
        return None
    return {"selection": {"method": opts.selection, "keep_ratios": [float(k) for k in a.keep]}}


def _search_rounds(opts: AutotuneOptions, model: Any, calib: CalibrationSet, kl: Dict[str, Any], sizes: SizeTable,
                   candidates: Dict[str, List[Candidate]], keep: float, selection_only: Optional[Verification],
                   baseline_ppl: float, deadline: float, per_check: float, console: Console,
                   notes: List[str], sel_kl: Optional[Any] = None, layer_ratios: Sequence[float] = (),
                   bitmap_bytes: int = 0) -> List[SearchRound]:
    """Up to ``opts.rounds`` allocations on ``calib`` (one keep ratio), each checked through the binary.

    The first KL budget is the budget's own, less what the selection alone costs; each next one
    moves toward the target on the measured metric (:func:`next_budget`). With ``sel_kl``
    (``--keep-per-layer``) each layer also picks its keep ratio among ``layer_ratios``
    (:func:`allocate_layers`), and each check selects those counts before the binary.
    """
    target = opts.budget.target(opts.margin)
    budget_kl = opts.budget.initial_kl(opts.margin, baseline_ppl)
    if selection_only is not None:
        budget_kl -= selection_only.kl
        if budget_kl <= 0:
            notes.append(f"keep ratio {keep:g}: the selection alone (KL {selection_only.kl:.5f}) spends the whole budget")
            return []
    rounds: List[SearchRound] = []
    for i in range(opts.rounds):
        if rounds and time.perf_counter() + per_check > deadline:
            notes.append(f"--max-minutes left time for {i} of {opts.rounds} allocation rounds at keep ratio {keep:g}")
            break
        if sel_kl is not None:
            a = allocate_layers(kl, sel_kl, layer_ratios, sizes, candidates, budget_kl, bitmap_bytes)
        else:
            a = allocate(kl, sizes, candidates, budget_kl)
        if a is None:
            budget_kl *= 2
            continue
        tag = f"keep{keep:g}-round{i}" if keep != 1.0 else f"round{i}"
        path = write_preset(assignment_preset(a, f"{opts.name}-{tag}", "auto-tune round", opts.sink,
                                              extra=_selection_extra(opts, a)), opts.output + f".{tag}.json")
        label = f"round {i}" + (f", keep {keep:g}" if keep != 1.0 else "")
        if a.keep is not None:
            label += f", keep {a.mean_keep:.3f} on average"
        v = calib.verify(model, path, label, layer_keep=a.keep, method=opts.selection)
        if not opts.keep_rounds:
            os.remove(path)
        v.predicted_kl, v.budget_kl = predicted_kl(kl, a, sel_kl, layer_ratios), budget_kl
        ok = opts.budget.met(v, opts.margin)
        rounds.append(SearchRound(budget_kl, a, v, ok, keep, path if opts.keep_rounds else None))
        console.info(f"{label}: KL budget {budget_kl:.5f} (sum of parts {v.predicted_kl:.5f}) -> measured KL {v.kl:.5f}, "
                     f"ΔPPL {v.delta:+.4f} ({v.delta_pct:+.2f}%), {v.disk_ratio_vs_fp16:.3f}x ({'within' if ok else 'over'})")
        budget_kl = next_budget(rounds, target, opts.budget.metric())
    return rounds

