"""One-off experiment: per-channel keys with their own group size, simulated with the torch reference codec.

``kv-compress`` uses one group size for every tensor, so keys grouped along tokens with
G = 128 (same size on disk as the default's G = 64 symmetric groups) cannot be combined
with values grouped along head_dim 64. This script answers "would it be worth adding?"
without changing the binary. It runs the sweep harness (same windows, same baseline,
same statistics as ``make sweep``) and replaces the binary's round trip by
``validation.reference_codec.encode_reference``, applied tensor by tensor with a
different plan and group size for keys and values. Each plan on its own is one the
binary supports, and the reference matches the binary bit for bit.

The first configuration runs through the real binary (its default codec) as a control.
The table's size columns come from that call, so they are the same for every row and
mean nothing for the others.

    .venv/bin/python docs/experiments/per_role_groups.py   # about 2 minutes on 2 cores

Results are in docs/codec-frontier.md ("What comes next").
"""
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from validation import sweep as sw  # noqa: E402
from validation import validate_perplexity as vp  # noqa: E402
from validation.kv_cache_utils import cache_to_layers, layers_to_cache  # noqa: E402
from validation.reference_codec import TensorPlan, encode_reference  # noqa: E402

VALUES = (TensorPlan("sym", 4, "last", "hadamard", 1), 64)  # the default codec's values
EXPERIMENTS = [  # name, (key plan, key group size), (value plan, value group size); None: real binary, default codec
    ("default (binary): per-channel keys", None, None),
    ("keys sym rotated G64 along head_dim", (TensorPlan("sym", 4, "last", "hadamard", 1), 64), VALUES),
    ("keys asym per-channel G128", (TensorPlan("asym", 4, "seq", "none", 1), 128), VALUES),
    ("keys asym per-channel G128, rotated", (TensorPlan("asym", 4, "seq", "hadamard", 1), 128), VALUES),
    ("keys asym per-channel G256", (TensorPlan("asym", 4, "seq", "none", 1), 256), VALUES),
    ("keys asym per-channel G64", (TensorPlan("asym", 4, "seq", "none", 1), 64), VALUES),
    ("values asym rotated G64", (TensorPlan("sym", 4, "last", "hadamard", 1), 64),
     (TensorPlan("asym", 4, "last", "hadamard", 1), 64)),
]


def main() -> None:
    binary_roundtrip = sw.roundtrip_kv_cache
    calls = itertools.count()  # the sweep calls the round trip once per configuration, in order, per batch
    control_metrics = [None]

    def roundtrip(cache, work_dir, device="cpu", **codec):
        _, keys, values = EXPERIMENTS[next(calls) % len(EXPERIMENTS)]
        if keys is None:
            recon, control_metrics[0] = binary_roundtrip(cache, work_dir, device=device, **codec)
            return recon, control_metrics[0]
        (kp, kg), (vp_, vg) = keys, values
        layers = [(encode_reference(k.float().cpu(), kg, plan=kp).reconstruction.to(k.dtype),
                   encode_reference(v.float().cpu(), vg, plan=vp_).reconstruction.to(v.dtype))
                  for k, v in cache_to_layers(cache)]
        return layers_to_cache(layers), control_metrics[0]

    sw.roundtrip_kv_cache = roundtrip
    # No codec options: the control row runs the binary's default codec.
    configs = [sw.SweepConfig(name, {}) for name, _, _ in EXPERIMENTS]
    options = vp.ValidationOptions(device="cpu", model="embedded", dataset="embedded")
    console = vp.Console(True)
    inputs = vp.load_run_inputs(options, console, title="Per-role group sizes (reference codec)", steps=4)
    outcome, _ = sw.run_sweep(inputs.model, inputs.token_ids, options, configs, console, model_choice=inputs.choice,
                              corpus_info=inputs.corpus_info, tokenizer=inputs.tokenizer,
                              out_dir="sweep-results/per-role-groups", heatmaps=False)
    for r in sorted(outcome.rows, key=lambda r: r.index):
        print(f"{r.name:40s} dPPL {r.delta:+.3f} [{r.delta_ci_low:+.3f}, {r.delta_ci_high:+.3f}]  "
              f"top-1 {100 * r.top1_agreement:.2f}%")


if __name__ == "__main__":
    main()
