"""Auto-tuning a per-layer, per-role kv-compress preset under a quality budget (issue 14).

``python -m validation.autotune --budget 1% --output preset.json`` measures, on calibration
windows disjoint from the evaluation windows, how much each tensor (one role of one layer)
costs in KL under each candidate plan and how many bytes it takes on disk, allocates the
smallest plan whose summed cost fits the budget, checks it through the real binary and repairs
it, and scores the result on the held-out evaluation windows. Modules:

    space        candidate plans, presets built from an assignment, real sizes per candidate
    sensitivity  calibration windows, ΔKL per tensor and candidate (partial passes)
    allocate     the knapsack, the real check of a whole plan, the budget's next step
    run          the run, step by step; report: JSON, Markdown, heatmap; cli: the flags
"""

from validation.autotune.run import AutotuneError, AutotuneOptions, AutotuneResult, Budget, run_autotune

__all__ = ["AutotuneError", "AutotuneOptions", "AutotuneResult", "Budget", "run_autotune"]
