"""``python -m validation.calibrate``: fit PCA bases for kv-compress's low-rank projection.

The model is run over calibration windows that never overlap the windows a validation run
scores: by default the embedded Wikipedia text from the end of the default protocol's scored
region (16 windows of 1,024 tokens, stride 256: tokens [0, 4864)) onwards, or another embedded
domain (``--dataset c4``) from its start. Each layer's keys and values are accumulated per KV head
(float64 moments), and a PCA per head gives the basis: a fixed ``--rank`` or the smallest rank
that keeps ``--energy`` of the variance. The preset and its bases file are written by
:func:`validation.lowrank.write_preset`; ``kv-compress --preset FILE`` and
``validate_perplexity.py --preset FILE`` use them.

Exit status: 0 written, 2 bad flags or an unavailable model or corpus.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from validation.lowrank import ROLES, CoefficientPlan, PCAAccumulator, fit_bases, write_preset
from validation.options import EMBEDDED_ALIASES, DEFAULT_MAX_LENGTH, DEFAULT_STRIDE, DEFAULT_WINDOWS, ValidationError

# The default validation run scores tokens [0, SCORED_END) of the embedded text.
SCORED_END = (DEFAULT_WINDOWS - 1) * DEFAULT_STRIDE + DEFAULT_MAX_LENGTH
ROLE_FLAGS = {"v": ("value",), "k": ("key",), "kv": ("key", "value")}


def build_parser() -> argparse.ArgumentParser:
    """The command line: what to fit, on which data, and how to quantize the coefficients."""
    p = argparse.ArgumentParser(prog="python -m validation.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", "-o", required=True, help="preset JSON to write; the bases go beside it as <stem>.bases.safetensors")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, help="coefficients per row (1..head_dim-1)")
    how.add_argument("--energy", type=float, help="keep the smallest rank that explains this share of the variance, e.g. 0.95")
    p.add_argument("--roles", choices=sorted(ROLE_FLAGS), default="v",
                   help="project values (v, the default), keys (k) or both (kv); keys lose most (seed 004's warning)")
    p.add_argument("--identity-layers", default="", help="comma-separated layers left unprojected, e.g. 0,1")
    p.add_argument("--bits", type=int, choices=(2, 3, 4, 8), default=4, help="code width of the coefficients")
    p.add_argument("--scheme", choices=("sym", "asym"), default="sym", help="quantization scheme of the coefficients")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128, 256, 512, 1024), default=64,
                   help="coefficients per scale, along the tokens")
    p.add_argument("--base", default="default", choices=("default", "compact", "near-lossless", "seed"),
                   help="built-in preset for everything not projected (keys, identity layers)")
    p.add_argument("--merge", metavar="PRESET.json", default=None,
                   help="take base, codec, keys, values and layers from this preset file for what is not projected "
                        "(the projected tensors' own layer plans come after its layers)")
    p.add_argument("--bases-dtype", choices=("f16", "f32"), default="f16", help="stored dtype of bases and means")
    p.add_argument("--model", default="embedded", help="model to calibrate (default: the embedded SmolLM2-135M)")
    p.add_argument("--dataset", default="embedded",
                   help="embedded (Wikipedia, after the scored tokens) or another embedded domain (c4, code, ...) from its start")
    p.add_argument("--start", type=int, default=None, help=f"first calibration token (default {SCORED_END} for embedded, 0 otherwise)")
    p.add_argument("--windows", type=int, default=4, help="calibration windows (at most what the text holds)")
    p.add_argument("--window-length", type=int, default=DEFAULT_MAX_LENGTH, help="tokens per calibration window")
    p.add_argument("--cpu", action="store_true", help="force the CPU")
    p.add_argument("--name", default=None, help="preset name (default: the output's stem)")
    return p


def _layers(spec: str) -> List[int]:
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValidationError(f"--identity-layers must be comma-separated layer numbers, got {spec!r}") from None


def _merge(path: Optional[str]) -> Dict[str, Any]:
    """The base, codec, keys, values and layers of preset file ``path`` (empty without one)."""
    if path is None:
        return {}
    import json

    try:
        doc = json.loads(open(path, encoding="utf-8").read())
    except (OSError, ValueError) as e:
        raise ValidationError(f"--merge {path}: {e}") from None
    if not isinstance(doc, dict) or "projection" in doc:
        raise ValidationError(f"--merge {path}: want a preset object without a projection of its own")
    return {k: doc[k] for k in ("base", "codec", "keys", "values", "layers") if k in doc}


def calibration_windows(num_tokens: int, start: int, length: int, count: int) -> List[int]:
    """Starts of up to ``count`` consecutive windows of ``length`` tokens from ``start`` within ``num_tokens``."""
    if start < 0 or length < 2 or count < 1:
        raise ValidationError(f"need start >= 0, window length >= 2 and windows >= 1, got {start}, {length}, {count}")
    starts = [start + k * length for k in range(count) if start + (k + 1) * length <= num_tokens]
    if not starts:
        raise ValidationError(f"the text has {num_tokens} tokens: no window of {length} fits from token {start}")
    return starts


def collect(model: Any, ids: torch.Tensor, starts: Sequence[int], length: int) -> Dict[str, PCAAccumulator]:
    """Prefill each window and accumulate every layer's keys and values, per KV head."""
    from validation.compat import cache_to_layers, output_cache

    acc: Dict[str, PCAAccumulator] = {}
    device = next(model.parameters()).device
    with torch.inference_mode():
        for s in starts:
            out = model(input_ids=ids[s:s + length].unsqueeze(0).to(device), use_cache=True)
            layers = cache_to_layers(output_cache(out))
            del out
            for i, (k, v) in enumerate(layers):
                for role, t in (("key", k), ("value", v)):
                    name = f"layer_{i}_{role}"
                    if name not in acc:
                        acc[name] = PCAAccumulator(kv_heads=t.shape[1], head_dim=t.shape[3])
                    acc[name].add(t.cpu())
    return acc


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the calibration; print one line saying what was written."""
    args = build_parser().parse_args(argv)
    from validation.corpora import load_corpus, tokenize_corpus
    from validation.models import load_model_and_tokenizer

    try:
        t0 = time.time()
        model, tokenizer = load_model_and_tokenizer(args.model, "cpu" if args.cpu else None)
        corpus = load_corpus(args.dataset)
        ids, _ = tokenize_corpus(tokenizer, corpus.text)
        start = args.start if args.start is not None else (SCORED_END if args.dataset in ("embedded", "wiki") else 0)
        starts = calibration_windows(ids.numel(), start, args.window_length, args.windows)
        acc = collect(model, ids, starts, args.window_length)
        bases = fit_bases(acc, len(acc) // 2, rank=args.rank, energy=args.energy, roles=ROLE_FLAGS[args.roles],
                          identity_layers=_layers(args.identity_layers))
        calibration = {"corpus": corpus.name, "corpus_sha256": corpus.sha256, "tokens": [starts[0], starts[-1] + args.window_length],
                       "windows": len(starts), "window_length": args.window_length,
                       "disjoint_from": f"validation's default scored tokens [0, {SCORED_END})" if start >= SCORED_END else "another corpus",
                       "roles": list(ROLE_FLAGS[args.roles]), "identity_layers": _layers(args.identity_layers)}
        model_name = "SmolLM2-135M-Instruct (embedded)" if args.model.lower() in EMBEDDED_ALIASES else args.model
        preset = write_preset(bases, args.output, model=model_name,
                              coefficients=CoefficientPlan(bits=args.bits, scheme=args.scheme, group_size=args.group_size),
                              rank=args.rank, energy=args.energy, calibration=calibration,
                              dtype=torch.float16 if args.bases_dtype == "f16" else torch.float32, name=args.name,
                              base=args.base, merge=_merge(args.merge))
    except (ValidationError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ranks = [lay["values"] for lay in preset["projection"]["layers"]]
    print(f"wrote {args.output} and {preset['projection']['bases']}: {len(bases.tensors)} projected tensors, "
          f"value ranks {min(ranks)}..{max(ranks)}, {len(starts)} windows from token {starts[0]} "
          f"({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
