"""The command line: ``python -m validation.autotune --budget 1% --output preset.json``.

Exit status: 0 a preset was written and met the budget on the calibration windows; 1 a preset
was written but no round met the budget (the closest one); 2 any error (bad flags, the corpus
too short for disjoint calibration windows, a bridge failure). Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import List, Optional, Sequence

from validation.autotune.run import AutotuneError, AutotuneOptions, Budget, run_autotune
from validation.autotune.space import BITS, SPACES, SpaceError
from validation.selection import SELECTION_METHODS


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line on stderr and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see --help)\n")


def _bits(text: str) -> List[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bits must be a comma-separated list from {list(BITS)}, got {text!r}") from None
    bad = [b for b in out if b not in BITS]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"--bits must be a comma-separated list from {list(BITS)}, got {text!r}")
    return out


DEFAULT_KEEP_RATIOS = (1.0, 0.9, 0.8)
# With --keep-per-layer a ratio costs one pass per layer, and most layers take far lower ones.
DEFAULT_LAYER_KEEP_RATIOS = (1.0, 0.9, 0.75, 0.5, 0.3, 0.2)


def _keep_ratios(text: str) -> List[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--keep-ratios must be a comma-separated list of numbers in (0, 1], "
                                         f"got {text!r}") from None
    if not out or any(not 0 < r <= 1 for r in out):
        raise argparse.ArgumentTypeError(f"--keep-ratios must be a comma-separated list of numbers in (0, 1], got {text!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``python -m validation.autotune``."""
    d = AutotuneOptions()
    p = _Parser(prog="python -m validation.autotune",
                description="Tune a per-layer, per-role kv-compress preset that is as small as possible on disk "
                            "under a quality budget, on calibration windows disjoint from the evaluation windows.",
                epilog="Exit status: 0 budget met on calibration, 1 preset written but budget not met, 2 any error.")
    p.add_argument("--budget", help="ΔPPL budget: a percentage of the baseline perplexity (1%%, the default) or an "
                                    "absolute ΔPPL (0.18)")
    p.add_argument("--budget-kl", type=float, metavar="X", help="budget on the mean KL(baseline || compressed), nats per token")
    p.add_argument("--output", default=d.output, metavar="FILE", help=f"preset JSON to write (default {d.output})")
    p.add_argument("--report-dir", metavar="DIR", help="where autotune.json, autotune.md and allocation.png go "
                                                       "(default: the folder of --output)")
    p.add_argument("--model", default=d.model, help="'embedded' (default), a Hugging Face id or a local folder")
    p.add_argument("--dataset", default=d.dataset, help="corpus as validate_perplexity.py names it (default embedded)")
    p.add_argument("--text-file", help="a UTF-8 text file as the corpus (instead of --dataset)")
    p.add_argument("--max-length", type=int, default=d.max_length, help=f"window length (default {d.max_length})")
    p.add_argument("--stride", type=int, default=d.stride, help=f"scored tokens per window (default {d.stride})")
    p.add_argument("--eval-windows", type=int, default=d.eval_windows,
                   help=f"evaluation windows of validate_perplexity.py that calibration must avoid and the held-out "
                        f"result scores (default {d.eval_windows})")
    p.add_argument("--calibration-windows", type=int, default=d.calibration_windows,
                   help=f"calibration windows, after the evaluation span (default {d.calibration_windows})")
    p.add_argument("--sensitivity-tokens", type=int, default=d.sensitivity_tokens,
                   help=f"scored tokens per calibration window in the sensitivity stage (default {d.sensitivity_tokens})")
    p.add_argument("--batch-windows", type=int, default=d.batch_windows, help=f"windows per prefill (default {d.batch_windows})")
    p.add_argument("--space", choices=SPACES, default=d.space, help="candidate plans: default (the forms that measured "
                                                                    "best) or wide (every scheme/rotation/axis/group)")
    p.add_argument("--space-file", metavar="FILE", help='JSON {"keys": [plan, ...], "values": [plan, ...]} of candidates')
    p.add_argument("--bits", type=_bits, default=list(d.bits), help="code widths to try, e.g. 2,3,4 (default 2,3,4,8)")
    p.add_argument("--rounds", type=int, default=d.rounds, help=f"allocation rounds checked through the binary (default {d.rounds})")
    p.add_argument("--margin", type=float, default=d.margin,
                   help=f"aim at this fraction of the budget on calibration, (0, 1] (default {d.margin})")
    p.add_argument("--max-minutes", type=float, default=d.max_minutes,
                   help=f"bound on the search's wall time; the sensitivity stage estimates what it cannot measure "
                        f"in time (default {d.max_minutes:g})")
    p.add_argument("--no-heldout", action="store_true", help="skip the held-out result")
    p.add_argument("--keep-rounds", action="store_true", help="keep each round's preset (OUTPUT.roundN.json, "
                                                              "OUTPUT.keepR-roundN.json) so it can be scored later")
    p.add_argument("--compare", action="append", default=[], metavar="PRESET",
                   help="also score this preset (name or file) on the held-out windows; repeatable")
    p.add_argument("--selection", choices=SELECTION_METHODS, help="also try token selection with this method "
                   "(validation/selection.py) at each of --keep-ratios; the preset then needs validate_perplexity.py "
                   "--selection METHOD --keep-ratio R, which the report names")
    p.add_argument("--keep-ratios", type=_keep_ratios, metavar="R,R,...",
                   help="keep ratios in (0, 1] tried with --selection (default with --selection: 1,0.9,0.8; with "
                        "--keep-per-layer: 1,0.9,0.75,0.5,0.3,0.2; 1 is no selection)")
    p.add_argument("--keep-per-layer", action="store_true",
                   help="with --selection: each layer picks its own keep ratio among --keep-ratios and 1 (its "
                        "selection cost is measured like a codec candidate's); the preset's selection section "
                        "carries the ratios, which validate_perplexity.py --preset applies")
    p.add_argument("--sink", type=int, default=d.sink, help=f"leading positions kept exact (default {d.sink})")
    p.add_argument("--name", default=d.name, help=f"the preset's name (default {d.name})")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="print only the summary line")
    return p


def options_from_args(args: argparse.Namespace) -> AutotuneOptions:
    """The AutotuneOptions the flags ask for (checked by run_autotune)."""
    return AutotuneOptions(
        budget=Budget.parse(args.budget, args.budget_kl), output=args.output, report_dir=args.report_dir,
        model=args.model, dataset=None if args.text_file else args.dataset, text_file=args.text_file,
        max_length=args.max_length, stride=args.stride, eval_windows=args.eval_windows,
        calibration_windows=args.calibration_windows, sensitivity_tokens=args.sensitivity_tokens,
        batch_windows=args.batch_windows, space=args.space, space_file=args.space_file, bits=tuple(args.bits),
        rounds=args.rounds, margin=args.margin, max_minutes=args.max_minutes, heldout=not args.no_heldout,
        compare=args.compare, sink=args.sink, device=args.device, name=args.name, selection=args.selection,
        keep_rounds=args.keep_rounds, per_layer_keep=args.keep_per_layer, keep_ratios=tuple(args.keep_ratios) if args.keep_ratios else (
            (DEFAULT_LAYER_KEEP_RATIOS if args.keep_per_layer else DEFAULT_KEEP_RATIOS) if args.selection else (1.0,)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse flags, tune, write the preset and the report; return the exit status."""
    from validation.autotune.report import write_report
    from validation.models import configure_threads
    from validation.options import ValidationError
    from validation.reports import Console

    args = build_parser().parse_args(argv)
    configure_threads()
    try:
        opts = options_from_args(args)
        opts.check()
        for c in opts.compare:
            if not (os.path.isfile(c) or c in ("seed", "default", "compact", "near-lossless")):
                raise AutotuneError(f"--compare must be a built-in preset [seed, default, compact, near-lossless] or a "
                                    f"preset file, got {c!r}")
        result = run_autotune(opts, Console(not args.quiet), progress=not args.quiet)
        command = " ".join(["python -m validation.autotune", *(argv if argv is not None else sys.argv[1:])])
        paths = write_report(result, opts.report_dir or os.path.dirname(os.path.abspath(opts.output)), command)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 2
    except (AutotuneError, SpaceError, ValidationError, OSError, ValueError, RuntimeError, subprocess.CalledProcessError) as e:
        print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 2
    cal = result.rounds[result.chosen_round].verification
    held = dict(result.heldout).get(opts.name)
    summary = (f"{opts.name}: {cal.disk_ratio_vs_fp16:.2f}x, ΔPPL {cal.delta_pct:+.2f}% on calibration"
               + (f"; {held.disk_ratio_vs_fp16:.2f}x, ΔPPL {held.delta_pct:+.2f}% held-out" if held else "")
               + (f"; token selection {opts.selection} at keep ratio {result.keep_ratio:g}" if result.keep_ratio != 1.0 else "")
               + (f"; token selection {opts.selection} keeping {result.mean_keep:.3f} on average, per layer"
                  if result.layer_keep else "")
               + f"; budget {opts.budget.describe()} {'met' if result.budget_met else 'NOT met'}; "
               f"search {result.timings['search_s'] / 60:.1f} min; preset {opts.output}; report {paths['markdown']}")
    print(summary)
    return 0 if result.budget_met else 1
