"""Per-layer, per-KV-head fidelity of a reconstructed KV cache: SNR tables and a heatmap.

The perplexity gate says *whether* compression hurts; these diagnostics say *where*. For every
decoder layer ``l`` and KV head ``h`` the signal and noise powers of the keys (and separately of
the values) are summed over every batch that goes through the codec,

    signal[l, h] = Σ x²,   noise[l, h] = Σ (x − y)²     (x original, y reconstructed)

where the sums run over the batch, sequence and head_dim axes of the cache tensors
``[batch, kv_heads, seq, head_dim]`` (float64 accumulation), and the SNR is

    snr_db[l, h] = 10 · log10(signal[l, h] / noise[l, h]),

capped at ±:data:`SNR_CAP_DB` like ``kv-compress``'s own report (an exact reconstruction, e.g.
a head whose every position is a sink, reports +200 dB). Accumulating powers rather than
averaging per-batch dB values makes the number independent of how windows are batched.

Typical use::

    acc = SNRAccumulator()
    for original_cache, reconstructed_cache in batches:
        acc.update(cache_to_layers(original_cache), cache_to_layers(reconstructed_cache))
    diag = acc.result()
    print("\\n".join(diag.summary_lines()))
    plot_snr_heatmap(diag, "plots/snr_heatmap.png")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

SNR_CAP_DB = 200.0
HEATMAP_FILENAME = "snr_heatmap.png"

KVLayers = Sequence[Tuple[torch.Tensor, torch.Tensor]]


def snr_db(signal: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Elementwise ``10·log10(signal / noise)`` in dB, capped at ±SNR_CAP_DB (noise 0 → +cap).

    ``signal`` and ``noise`` are arrays of the same shape (e.g. [layers, heads]) of summed
    squares; the result has that shape, float64.
    """
    signal = np.asarray(signal, dtype=np.float64)
    noise = np.asarray(noise, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 10.0 * np.log10(signal / noise)
    out = np.where(noise == 0, SNR_CAP_DB, out)  # exact (also 0/0: nothing to lose)
    out = np.where((signal == 0) & (noise > 0), -SNR_CAP_DB, out)
    return np.clip(out, -SNR_CAP_DB, SNR_CAP_DB)


@dataclass
class CacheDiagnostics:
    """Summed signal and noise power per layer and KV head, for keys and for values.

    Every array is float64 of shape [num_layers, num_kv_heads]; ``elements`` counts the
    elements summed per (layer, head) for keys and values alike.
    """

    key_signal: np.ndarray
    key_noise: np.ndarray
    value_signal: np.ndarray
    value_noise: np.ndarray
    elements: int = 0
    batches: int = 0

    @property
    def num_layers(self) -> int:
        """Decoder layers (rows of every table)."""
        return int(self.key_signal.shape[0])

    @property
    def num_kv_heads(self) -> int:
        """KV heads per layer (columns of every table)."""
        return int(self.key_signal.shape[1])

    @property
    def key_snr_db(self) -> np.ndarray:
        """Key SNR in dB, [num_layers, num_kv_heads]."""
        return snr_db(self.key_signal, self.key_noise)

    @property
    def value_snr_db(self) -> np.ndarray:
        """Value SNR in dB, [num_layers, num_kv_heads]."""
        return snr_db(self.value_signal, self.value_noise)

    @property
    def key_layer_snr_db(self) -> np.ndarray:
        """Key SNR per layer over all its heads (powers summed over heads), [num_layers]."""
        return snr_db(self.key_signal.sum(axis=1), self.key_noise.sum(axis=1))

    @property
    def value_layer_snr_db(self) -> np.ndarray:
        """Value SNR per layer over all its heads (powers summed over heads), [num_layers]."""
        return snr_db(self.value_signal.sum(axis=1), self.value_noise.sum(axis=1))

    @property
    def overall_snr_db(self) -> float:
        """SNR over every key and value element (comparable with kv-compress's ``snr_db``)."""
        signal = self.key_signal.sum() + self.value_signal.sum()
        noise = self.key_noise.sum() + self.value_noise.sum()
        return float(snr_db(np.array(signal), np.array(noise)))

    def worst(self, kind: str) -> Dict[str, Any]:
        """The (layer, head) with the lowest SNR for ``kind`` "key" or "value": {layer, head, snr_db}."""
        table = self._table(kind)
        layer, head = np.unravel_index(int(np.argmin(table)), table.shape)
        return {"layer": int(layer), "head": int(head), "snr_db": float(table[layer, head])}

    def _table(self, kind: str) -> np.ndarray:
        if kind == "key":
            return self.key_snr_db
        if kind == "value":
            return self.value_snr_db
        raise ValueError(f"kind must be one of ['key', 'value'], got {kind!r}")

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready: per-head tables (lists of per-layer lists of per-head dB), per-layer SNRs, worst cells."""
        def rounded(a: np.ndarray) -> Any:
            return np.round(a, 4).tolist()

        key_layer, value_layer = self.key_layer_snr_db, self.value_layer_snr_db
        return {
            "definition": "10*log10(sum x^2 / sum (x - y)^2) per layer and KV head over every window, "
                          f"x original, y reconstructed; capped at +/-{SNR_CAP_DB:g} dB",
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "elements_per_head": self.elements,
            "batches": self.batches,
            "key_snr_db": rounded(self.key_snr_db),
            "value_snr_db": rounded(self.value_snr_db),
            "key_layer_snr_db": rounded(key_layer),
            "value_layer_snr_db": rounded(value_layer),
            "overall_snr_db": round(self.overall_snr_db, 4),
            "worst_key": self.worst("key"),
            "worst_value": self.worst("value"),
            "worst_key_layer": int(np.argmin(key_layer)),
            "worst_value_layer": int(np.argmin(value_layer)),
        }

    def summary_lines(self) -> List[str]:
        """Two console lines: worst cell, per-layer range and median, for keys then values."""
        lines = []
        for kind, table, per_layer in (("keys", self.key_snr_db, self.key_layer_snr_db),
                                       ("values", self.value_snr_db, self.value_layer_snr_db)):
            w = self.worst(kind[:-1])
            lo, hi = int(np.argmin(per_layer)), int(np.argmax(per_layer))
            lines.append(
                f"SNR {kind + ':':<8}worst layer {w['layer']} head {w['head']} at {w['snr_db']:.2f} dB; per layer "
                f"{per_layer[lo]:.2f} dB (layer {lo}) .. {per_layer[hi]:.2f} dB (layer {hi}), "
                f"median head {float(np.median(table)):.2f} dB"
            )
        return lines


class SNRAccumulator:
    """Sums signal and noise power per (layer, KV head) over batches of original/reconstructed caches."""

    def __init__(self) -> None:
        self._sums: Optional[List[np.ndarray]] = None  # key_signal, key_noise, value_signal, value_noise
        self.elements = 0
        self.batches = 0

    def update(self, original: KVLayers, reconstructed: KVLayers) -> None:
        """Add one batch.

        ``original`` and ``reconstructed`` are per-layer ``(key, value)`` pairs of tensors
        [batch, kv_heads, seq, head_dim] (as from ``cache_to_layers``), same geometry on both
        sides; the sums run over batch, seq and head_dim in float64 on the tensors' device.
        Raises ValueError when the geometries differ or do not match earlier batches.
        """
        if len(original) != len(reconstructed) or not original:
            raise ValueError(f"expected the same non-zero number of layers, got {len(original)} original "
                             f"and {len(reconstructed)} reconstructed")
        sums = [np.zeros((len(original), original[0][0].shape[1])) for _ in range(4)]
        elements = 0
        for i, ((k, v), (rk, rv)) in enumerate(zip(original, reconstructed)):
            for j, (x, y) in enumerate(((k, rk), (v, rv))):
                if x.dim() != 4 or x.shape != y.shape:
                    raise ValueError(f"layer {i}: expected matching 4-D [batch, kv_heads, seq, head_dim] tensors, "
                                     f"got {tuple(x.shape)} and {tuple(y.shape)}")
                if x.shape[1] != sums[0].shape[1]:
                    raise ValueError(f"layer {i}: expected {sums[0].shape[1]} KV heads, got {x.shape[1]}")
                x64 = x.detach().to(torch.float64)
                d = x64 - y.detach().to(device=x.device, dtype=torch.float64)
                sums[2 * j][i] = x64.square().sum(dim=(0, 2, 3)).cpu().numpy()
                sums[2 * j + 1][i] = d.square().sum(dim=(0, 2, 3)).cpu().numpy()
                del x64, d
            elements = k.shape[0] * k.shape[2] * k.shape[3]
        if self._sums is None:
            self._sums = sums
        else:
            if self._sums[0].shape != sums[0].shape:
                raise ValueError(f"batch geometry [layers, kv_heads] {list(sums[0].shape)} differs from earlier "
                                 f"batches' {list(self._sums[0].shape)}")
            for acc, s in zip(self._sums, sums):
                acc += s
        self.elements += elements
        self.batches += 1

    def result(self) -> CacheDiagnostics:
        """The accumulated diagnostics; raises ValueError when no batch was added."""
        if self._sums is None:
            raise ValueError("no batch was added to the SNR accumulator")
        return CacheDiagnostics(*(s.copy() for s in self._sums), elements=self.elements, batches=self.batches)


def cache_snr(original: KVLayers, reconstructed: KVLayers) -> CacheDiagnostics:
    """Diagnostics of a single original/reconstructed pair of caches (layers as from ``cache_to_layers``)."""
    acc = SNRAccumulator()
    acc.update(original, reconstructed)
    return acc.result()


# -----------------------------------------------------------------------------
# plotting


def pyplot_agg():
    """matplotlib.pyplot with the non-interactive Agg backend (no display needed)."""
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - matplotlib is in the plot extra
        raise RuntimeError("plots need matplotlib: pip install -e .[plot]") from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_snr_heatmap(diag: CacheDiagnostics, path: str, title: str = "") -> str:
    """Write a PNG heatmap of key and value SNR (two panels, layers × KV heads, annotated in dB).

    Both panels share one colour scale (dB, low = red = worst) so keys and values compare
    directly. Parent folders are created. Returns the path written.
    """
    plt = pyplot_agg()
    keys, values = diag.key_snr_db, diag.value_snr_db
    layers, heads = keys.shape
    finite = np.concatenate([keys.ravel(), values.ravel()])
    vmin, vmax = float(finite.min()), float(finite.max())
    if vmax - vmin < 1e-6:
        vmin, vmax = vmin - 1.0, vmax + 1.0
    panel_w = 0.9 + 0.75 * heads
    fig, axes = plt.subplots(1, 2, figsize=(2 * panel_w + 1.6, 1.6 + 0.28 * layers), constrained_layout=True)
    image = None
    for ax, table, name in ((axes[0], keys, "keys"), (axes[1], values, "values")):
        image = ax.imshow(table, cmap="RdYlGn", vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
        ax.set_title(f"{name} SNR (dB)", fontsize=10)
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(heads))
        ax.set_yticks(range(layers))
        ax.tick_params(labelsize=7)
        w = np.unravel_index(int(np.argmin(table)), table.shape)
        for layer in range(layers):
            for head in range(heads):
                val = table[layer, head]
                ax.text(head, layer, f"{val:.1f}", ha="center", va="center", fontsize=6.5,
                        fontweight="bold" if (layer, head) == w else "normal", color="black")
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="SNR (dB)")
    fig.suptitle(title or "Per-layer, per-KV-head SNR of the reconstructed cache", fontsize=10)
    return save_figure(fig, path)


def save_figure(fig: Any, path: str) -> str:
    """Write ``fig`` as a PNG at ``path`` (creating its folder), close it, return the path."""
    import matplotlib.pyplot as plt

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return str(target)
