"""The window protocol: windows, prefill, the kv-compress round trip, scoring on both caches.

See docs/perplexity-protocol.md. The corpus is cut into windows of ``max_length`` tokens that
advance by ``stride``; in each the first ``max_length - stride`` tokens are context and the last
``stride`` are scored. A batch of windows is prefilled once; its cache goes through the real
binary; the scored tokens are evaluated twice, attending to a fresh copy of the original cache
(baseline) and to the reconstruction (compressed). The first scored token is predicted from
the prefill's last logits, so the cache is the only difference between the two numbers.
"""

from __future__ import annotations

import inspect
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from validation.compat import cache_to_layers, forward, layers_to_cache, output_cache, sliding_windows_of
from validation.corpora import load_corpus, load_wikitext, tokenize_corpus
from validation.diagnostics import CacheDiagnostics, SNRAccumulator
from validation.models import _geometry, _model_device
from validation.selection import SelectionSpec, selected_prefill, selection_position_ids
from validation.options import (
    DEFAULT_BATCH_WINDOWS,
    DEFAULT_GROUP_SIZE,
    DEFAULT_MAX_LENGTH,
    WIKITEXT_CONFIG,
    ValidationError,
    check_codec,
)


@dataclass
class WindowScore:
    """Scores of one window: NLL sums (nats) over its ``tokens`` scored tokens, KL sum, top-1 matches."""

    start: int
    tokens: int
    nll_baseline: float
    nll_compressed: float
    kl_sum: float
    top1_matches: int


@dataclass
class ProtocolOutcome:
    """Everything the windowed protocol measured.

    ``cache_bytes`` is the in-memory size of all prefill caches (every window's
    [batch, kv_heads, context, head_dim] keys and values of every layer). ``timings`` holds
    seconds per phase, summed over batches: prefill, bridge, scoring, metrics, total, and the
    bridge's own steps (bridge_save, bridge_compress, bridge_decompress, bridge_load).
    ``metrics`` is one CompressionMetrics per bridge call. ``diagnostics`` holds the per-layer,
    per-KV-head key and value SNR accumulated over every batch (None when not computed).
    """

    windows: List[WindowScore]
    metrics: List[Any]
    timings: Dict[str, float]
    max_length: int
    stride: int
    batch_windows: int
    cache_bytes: int
    cache_dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    diagnostics: Optional[CacheDiagnostics] = None
    token_kl: Optional[np.ndarray] = None  # [scored_tokens] KL per scored token, window order (None: not kept)
    token_dp: Optional[np.ndarray] = None  # [scored_tokens] p_compressed(label) - p_baseline(label)
    layer_seq_lens: Optional[List[int]] = None  # per layer, context tokens held (None: every layer holds all)

    @property
    def context_length(self) -> int:
        """Context tokens per window (``max_length - stride``)."""
        return self.max_length - self.stride

    @property
    def scored_tokens(self) -> int:
        """Scored tokens over all windows."""
        return sum(w.tokens for w in self.windows)

    @property
    def baseline_perplexity(self) -> float:
        """exp(mean NLL) over every scored token, attending to the original cache."""
        return math.exp(sum(w.nll_baseline for w in self.windows) / self.scored_tokens)

    @property
    def compressed_perplexity(self) -> float:
        """exp(mean NLL) over every scored token, attending to the reconstructed cache."""
        return math.exp(sum(w.nll_compressed for w in self.windows) / self.scored_tokens)

    @property
    def kl_divergence(self) -> float:
        """Mean KL(baseline ‖ compressed) per scored token, in nats."""
        return sum(w.kl_sum for w in self.windows) / self.scored_tokens

    @property
    def top1_agreement(self) -> float:
        """Fraction of scored tokens where both caches give the same most likely next token."""
        return sum(w.top1_matches for w in self.windows) / self.scored_tokens


def plan_windows(num_tokens: int, max_length: int, stride: int, max_windows: Optional[int] = None) -> List[int]:
    """Start offsets of the full windows ``[k * stride, k * stride + max_length)`` inside ``num_tokens``.

    At most ``max_windows`` (None or 0: all). A trailing partial window is dropped.
    """
    if num_tokens < max_length:
        return []
    count = (num_tokens - max_length) // stride + 1
    if max_windows:
        count = min(count, max_windows)
    return [k * stride for k in range(count)]


def make_windows(token_ids: torch.Tensor, max_length: int, stride: int, max_windows: Optional[int] = None) -> Tuple[torch.Tensor, List[int]]:
    """Stack the planned windows of ``token_ids`` [num_tokens] into [num_windows, max_length]; also return the starts.

    Raises ValidationError when not even one full window fits.
    """
    ids = token_ids.reshape(-1)
    starts = plan_windows(ids.numel(), max_length, stride, max_windows)
    if not starts:
        raise ValidationError(
            f"the corpus has {ids.numel()} tokens, fewer than one window of --max-length {max_length}"
        )
    return torch.stack([ids[s:s + max_length] for s in starts]), starts


def plain_window_nlls(
    model: Any, windows: torch.Tensor, stride: int, progress: bool = False
) -> torch.Tensor:
    """Summed NLL (nats, float64) of the last ``stride`` tokens of each window, by the standard recipe.

    ``windows`` is [num_windows, max_length]. Each window is one forward pass over all its
    tokens with ``labels`` equal to the ids and the context positions set to -100; the
    model's mean loss over the ``stride`` scored tokens times ``stride`` is the window's sum.
    Returns [num_windows].
    """
    from validation.progress import progress_bar

    device = _model_device(model)
    context = windows.shape[1] - stride
    out = torch.empty(windows.shape[0], dtype=torch.float64)
    with torch.inference_mode():
        for i in progress_bar(range(windows.shape[0]), desc="plain pass", unit="window", enabled=progress):
            input_ids = windows[i:i + 1].to(device)
            labels = input_ids.clone()
            labels[:, :context] = -100
            loss = model(input_ids=input_ids, labels=labels, use_cache=False).loss
            out[i] = loss.double().item() * stride
    return out


def compute_perplexity(
    model: Any,
    tokenizer: Any,
    dataset_name: str = "wikitext",
    dataset_config: str = WIKITEXT_CONFIG,
    split: str = "test",
    stride: int = 512,
    max_samples: Optional[int] = None,
    verbose: bool = True,
    *,
    max_length: Optional[int] = None,
    text: Optional[str] = None,
    token_ids: Optional[torch.Tensor] = None,
) -> float:
    """Perplexity by the standard sliding-window recipe (no cache involved).

    Windows of ``max_length`` tokens (default min(1024, the model's max positions)) advance by
    ``stride``; in each, the context labels are -100 and the last ``stride`` tokens are scored.
    The corpus is ``token_ids`` [num_tokens] if given, else ``text``, else ``dataset_name``
    ("wikitext": the ``dataset_config``/``split`` of WikiText through datasets, or "embedded").
    ``max_samples`` caps the number of windows. Returns exp(total NLL / scored tokens).
    """
    max_pos = getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH
    max_length = max_length or min(DEFAULT_MAX_LENGTH, max_pos)
    if not 1 <= stride < max_length:
        raise ValidationError(f"stride must be in [1, {max_length - 1}], got {stride}")
    if token_ids is None:
        if text is None:
            if dataset_name == "wikitext":
                if dataset_config != WIKITEXT_CONFIG or split != "test":
                    body, _, why = load_wikitext(config=dataset_config, split=split)
                    if body is None:
                        raise ValidationError(f"wikitext {dataset_config}/{split} is unavailable: {why}")
                    text = body
                else:
                    text = load_corpus("wikitext").text
            else:
                text = load_corpus(dataset_name).text
        needed = (max_samples - 1) * stride + max_length if max_samples else None
        token_ids, _ = tokenize_corpus(tokenizer, text, needed)
    windows, _ = make_windows(token_ids, max_length, stride, max_samples)
    nlls = plain_window_nlls(model, windows, stride, progress=verbose)
    return math.exp(nlls.sum().item() / (windows.shape[0] * stride))


def _supports_logits_to_keep(model: Any) -> Optional[str]:
    params = inspect.signature(model.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return name
    return None


def _work_root(needed_bytes: int) -> Optional[str]:
    """/dev/shm when it exists and has room for ~3x the cache (RAM-backed files keep the bridge fast), else None."""
    shm = "/dev/shm"
    try:
        if os.path.isdir(shm) and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 3 * needed_bytes + (256 << 20):
            return shm
    except OSError:
        pass
    return None


def make_work_dir(model: Any, batch_windows: int, num_windows: int, context: int, prefix: str) -> str:
    """A fresh temporary folder for one batch's bridge files: in /dev/shm when it has room for them."""
    n_layers, n_kv, h_dim = _geometry(model.config)
    elem = torch.finfo(next(model.parameters()).dtype).bits // 8
    batch_bytes = 2 * n_layers * min(batch_windows, num_windows) * n_kv * context * h_dim * elem
    return tempfile.mkdtemp(prefix=prefix, dir=_work_root(batch_bytes))


@dataclass
class Prefill:
    """One batch's prefill: what the model returned for the context tokens."""

    first_logits: torch.Tensor  # [batch, vocab]: predicts the first scored token
    cache: Any  # the DynamicCache the model returned
    layers: List[Tuple[torch.Tensor, torch.Tensor]]  # [(key, value)], each [batch, kv_heads, layer_len, head_dim]
    geometry: Dict[str, Any]  # num_layers, num_kv_heads, head_dim, dtype, layer_seq_lens
    nbytes: int  # bytes of every key and value tensor
    seq_len: int = 0  # context tokens the cache covers (a sliding layer holds fewer: layer_len <= seq_len)
    sliding_windows: Optional[List[Optional[int]]] = None  # per layer, from the model's config (None: full)

    def rebuild(self, layers: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> Any:
        """A fresh cache holding ``layers`` (copies) laid out like the prefill's: the same
        sliding-window layers, each having seen ``seq_len`` tokens, so the model continues from it
        exactly as from the cache it returned."""
        return layers_to_cache(layers, seq_len=self.seq_len, sliding_windows=self.sliding_windows)


def prefill_contexts(model: Any, contexts: torch.Tensor, keep_arg: Optional[str]) -> Prefill:
    """Run the model over ``contexts`` ``[batch, context]`` with a cache, keeping only the last logits.

    Sliding-window layers (Gemma 3) hold only their window's last tokens: ``geometry``'s
    ``layer_seq_lens`` lists each layer's length and ``sliding_windows`` the windows the
    model's config gives its layers.
    """
    out = model(input_ids=contexts, use_cache=True, **({keep_arg: 1} if keep_arg else {}))
    first_logits = out.logits[:, -1, :]
    cache = output_cache(out)
    del out
    layers = cache_to_layers(cache)
    k0 = layers[0][0]
    geometry = {"num_layers": len(layers), "num_kv_heads": k0.shape[1], "head_dim": k0.shape[3],
                "dtype": str(k0.dtype).removeprefix("torch."),
                "layer_seq_lens": [int(k.shape[2]) for k, _ in layers]}
    nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
    windows = sliding_windows_of(model.config, len(layers)) if hasattr(model, "config") else None
    return Prefill(first_logits, cache, layers, geometry, nbytes, int(contexts.shape[1]), windows)


def check_reconstruction(layers: Sequence[Tuple[torch.Tensor, torch.Tensor]], recon_cache: Any, what: str = "") -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The reconstructed cache's layers, after checking they have the original geometry."""
    recon_layers = cache_to_layers(recon_cache)
    if len(recon_layers) != len(layers) or any(
        rk.shape != k.shape or rv.shape != v.shape for (k, v), (rk, rv) in zip(layers, recon_layers)
    ):
        raise ValidationError(f"{what}the reconstructed KV cache does not have the original cache's geometry")
    return recon_layers


@dataclass
class WindowStats:
    """One window's comparison of the two caches.

    ``token_kl`` and ``token_dp`` are [stride] float64 arrays: per scored token, KL(baseline ‖
    compressed) in nats and p_compressed(label) − p_baseline(label). The first scored token's
    entries are 0 (its logits come from the prefill, shared by both caches).
    """

    nll_baseline: float
    nll_compressed: float
    kl_sum: float
    top1_matches: int
    token_kl: np.ndarray
    token_dp: np.ndarray

    def score(self, start: int, tokens: int) -> WindowScore:
        """The WindowScore of these statistics for the window starting at ``start``."""
        return WindowScore(start, tokens, self.nll_baseline, self.nll_compressed, self.kl_sum, self.top1_matches)


def _window_stats(
    first_logits: torch.Tensor, logits_b: torch.Tensor, logits_c: torch.Tensor, labels: torch.Tensor
) -> WindowStats:
    """NLL sums, KL sum, top-1 matches and per-token KL and Δp for one window.

    ``first_logits`` [vocab] predicts ``labels[0]`` and is shared by both caches (it comes from
    the prefill), so it adds the same NLL to both, zero KL and one top-1 match. ``logits_b`` and
    ``logits_c`` [stride - 1, vocab] predict ``labels[1:]``; ``labels`` is [stride].
    """
    first_nll = -torch.log_softmax(first_logits.float(), dim=-1)[labels[0]].double().item()
    zero = np.zeros(1)
    if logits_b.shape[0] == 0:
        return WindowStats(first_nll, first_nll, 0.0, 1, zero, zero)
    idx = labels[1:, None]
    top1 = 1 + int((logits_b.argmax(-1) == logits_c.argmax(-1)).sum().item())
    lb = torch.log_softmax(logits_b.float(), dim=-1)
    lc = torch.log_softmax(logits_c.float(), dim=-1)
    tok_b = lb.gather(-1, idx).squeeze(-1)  # log p_baseline(label), [stride - 1]
    tok_c = lc.gather(-1, idx).squeeze(-1)
    nll_b = first_nll - tok_b.double().sum().item()
    nll_c = first_nll - tok_c.double().sum().item()
    # KL(baseline || compressed) = sum_v p_b (log p_b - log p_c), per position
    kl_terms = lb.exp().mul_(lb - lc)  # p_b * (log p_b - log p_c), [stride - 1, vocab]
    kl_tok = kl_terms.sum(-1).clamp_min(0).double()
    dp_tok = (tok_c.double().exp() - tok_b.double().exp())
    return WindowStats(nll_b, nll_c, kl_tok.sum().item(), top1,
                       np.concatenate([zero, kl_tok.cpu().numpy()]), np.concatenate([zero, dp_tok.cpu().numpy()]))


def run_protocol(
    model: Any,
    windows: torch.Tensor,
    stride: int,
    *,
    starts: Optional[Sequence[int]] = None,
    group_size: int = DEFAULT_GROUP_SIZE,
    sparsity: float = 0.0,
    batch_windows: int = DEFAULT_BATCH_WINDOWS,
    work_dir: Optional[str] = None,
    progress: bool = False,
    snr_diagnostics: bool = True,
    selection: Optional[SelectionSpec] = None,
    **codec: Any,
) -> ProtocolOutcome:
    """Score ``windows`` [num_windows, max_length] with the original and the kv-compress-reconstructed cache.

    Per batch of up to ``batch_windows`` windows: one prefill of the [batch, max_length - stride]
    contexts (cache layers [batch, kv_heads, context, head_dim]); one ``roundtrip_kv_cache``
    through the real binary; two scoring passes over the [batch, stride - 1] inputs that predict
    the scored tokens 2..stride, one on a fresh copy of the original cache and one on the
    reconstructed cache. Scored token 1 is predicted by the prefill's last logits for both.
    ``codec`` (scheme, rotate, key_axis, sink, bits, key_bits, value_bits) goes to the binary;
    omitted options take its defaults. With ``snr_diagnostics`` the per-layer, per-KV-head key
    and value SNR of every batch is accumulated into ``outcome.diagnostics``.

    With ``selection`` (validation/selection.py) each batch's cache keeps only the selected
    positions before the binary sees it; the compressed pass attends to that shorter cache
    with position ids that continue from the original context length, and each call's
    metrics carry the selection's metrics and sizes against the full cache.
    """
    from validation.compression_bridge import roundtrip_kv_cache
    from validation.progress import progress_bar

    check_codec(codec, group_size, sparsity)
    snr = SNRAccumulator() if snr_diagnostics else None
    num_windows, max_length = windows.shape
    context = max_length - stride
    if context < 1:
        raise ValidationError(f"stride must be < max_length ({max_length}) to leave context, got {stride}")
    starts = list(starts) if starts is not None else list(range(0, num_windows * stride, stride))
    device = _model_device(model)
    keep_arg = _supports_logits_to_keep(model)
    timings = {"prefill": 0.0, "bridge": 0.0, "scoring": 0.0, "metrics": 0.0}
    scores: List[WindowScore] = []
    token_kl: List[np.ndarray] = []
    token_dp: List[np.ndarray] = []
    metrics_list: List[Any] = []
    cache_bytes = 0
    geometry: Dict[str, Any] = {}

    owned_tmp = None
    if work_dir is None:
        owned_tmp = work_dir = make_work_dir(model, batch_windows, num_windows, context, "kv-validate-")
    bridge_steps: Dict[str, float] = {}
    wall_start = time.perf_counter()
    bar = progress_bar(total=num_windows, desc="windows", unit="window", enabled=progress)
    try:
        for b0 in range(0, num_windows, batch_windows):
            batch = windows[b0:b0 + batch_windows].to(device)
            bsz = batch.shape[0]
            with torch.inference_mode():
                t = time.perf_counter()
                pre, chosen = selected_prefill(model, selection, lambda: prefill_contexts(model, batch[:, :context], keep_arg))
                first_logits, prefill_cache, layers = pre.first_logits, pre.cache, pre.layers
                timings["prefill"] += time.perf_counter() - t
                geometry = pre.geometry
                cache_bytes += pre.nbytes

                t = time.perf_counter()
                recon_cache, metrics = roundtrip_kv_cache(
                    prefill_cache if chosen is None else chosen.layers, work_dir, group_size=group_size,
                    sparsity=sparsity, device=str(device), positions=None if chosen is None else chosen.positions,
                    context_length=None if chosen is None else context, **codec
                )
                if chosen is not None:
                    chosen.annotate(metrics, layers)
                timings["bridge"] += time.perf_counter() - t
                metrics_list.append(metrics)
                for step, ms in (getattr(metrics, "extra", {}) or {}).get("bridge_timings_ms", {}).items():
                    bridge_steps[step] = bridge_steps.get(step, 0.0) + ms / 1e3
                sent = layers if chosen is None else chosen.layers
                recon_layers = check_reconstruction(sent, recon_cache)
                if chosen is None:  # the prefill's layout: sliding-window layers stay sliding
                    recon_cache = pre.rebuild(recon_layers)
                if snr is not None:
                    t = time.perf_counter()
                    snr.update(sent, recon_layers)
                    timings["diagnostics"] = timings.get("diagnostics", 0.0) + time.perf_counter() - t
                del recon_layers

                t = time.perf_counter()
                baseline_cache = pre.rebuild(layers)  # fresh cache holding copies of the original tensors
                del prefill_cache, layers, sent, chosen, pre
                scored_in = batch[:, context:max_length - 1]  # [batch, stride - 1]
                if scored_in.shape[1] > 0:
                    logits_b = forward(model, baseline_cache, input_ids=scored_in, use_cache=True).logits
                    del baseline_cache
                    logits_c = forward(model, recon_cache, input_ids=scored_in, use_cache=True,
                                       **selection_position_ids(selection, context, scored_in)).logits
                    del recon_cache
                else:
                    vocab = first_logits.shape[-1]
                    logits_b = logits_c = first_logits.new_empty(bsz, 0, vocab)
                timings["scoring"] += time.perf_counter() - t

                t = time.perf_counter()
                labels = batch[:, context:]  # [batch, stride]
                for j in range(bsz):
                    ws = _window_stats(first_logits[j], logits_b[j], logits_c[j], labels[j])
                    scores.append(ws.score(starts[b0 + j], stride))
                    token_kl.append(ws.token_kl)
                    token_dp.append(ws.token_dp)
                del logits_b, logits_c
                timings["metrics"] += time.perf_counter() - t
            bar.update(bsz)
            done = sum(w.tokens for w in scores)
            bar.set_postfix(base=f"{math.exp(sum(w.nll_baseline for w in scores) / done):.3f}",
                            comp=f"{math.exp(sum(w.nll_compressed for w in scores) / done):.3f}")
    finally:
        bar.close()
        if owned_tmp is not None:
            shutil.rmtree(owned_tmp, ignore_errors=True)
    timings["total"] = time.perf_counter() - wall_start
    timings.update({f"bridge_{k}": v for k, v in bridge_steps.items()})
    return ProtocolOutcome(
        windows=scores, metrics=metrics_list, timings=timings, max_length=max_length, stride=stride,
        batch_windows=batch_windows, cache_bytes=cache_bytes, cache_dtype=geometry.get("dtype", ""),
        num_layers=geometry.get("num_layers", 0), num_kv_heads=geometry.get("num_kv_heads", 0),
        head_dim=geometry.get("head_dim", 0), diagnostics=snr.result() if snr is not None and snr.batches else None,
        token_kl=np.concatenate(token_kl) if token_kl else None, token_dp=np.concatenate(token_dp) if token_dp else None,
        layer_seq_lens=per_layer_lengths(geometry, context),
    )


def per_layer_lengths(geometry: Dict[str, Any], context: int) -> Optional[List[int]]:
    """The prefill's per-layer lengths when some layer holds fewer than ``context`` tokens, else None."""
    lens = geometry.get("layer_seq_lens")
    return list(lens) if lens and any(n != context for n in lens) else None

