"""A preset file's ``selection`` section (docs/cli.md, "Token-selection presets") as a SelectionSpec.

kv-compress validates the same section (pkg/compression/selection_preset.go) and reports it;
the selection itself happens here, in Python, before the binary sees the cache.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from validation.selection import DEFAULT_MIN_TOKENS, DEFAULT_WINDOW, SelectionSpec


def preset_selection(preset: Optional[str]) -> Optional[SelectionSpec]:
    """The token selection a preset file's ``selection`` section asks for (docs/cli.md, "Token-selection
    presets"): ``method`` and ``keep_ratio`` or ``keep_ratios`` (one per layer), optionally ``window``
    and ``min_tokens``. None for a built-in preset name, a file without the section, or ``None``.
    ValueError naming the file for a section the spec refuses (kv-compress refuses the same ones).
    """
    if not preset or not os.path.isfile(preset):
        return None
    with open(preset, encoding="utf-8") as f:
        try:
            doc = json.load(f)
        except ValueError as e:
            raise ValueError(f"{preset}: not a JSON preset file: {e}") from None
    sec = doc.get("selection") if isinstance(doc, dict) else None
    if sec is None:
        return None
    allowed = {"method", "keep_ratio", "keep_ratios", "window", "min_tokens"}
    if not isinstance(sec, dict) or set(sec) - allowed:
        raise ValueError(f"{preset}: selection must be an object with fields {sorted(allowed)}, got "
                         f"{sorted(sec) if isinstance(sec, dict) else type(sec).__name__}")
    ratios = sec.get("keep_ratios")
    spec = SelectionSpec(method=sec.get("method"), keep_ratio=sec.get("keep_ratio"),
                         layer_keep_ratios=tuple(ratios) if isinstance(ratios, list) else ratios,
                         min_tokens=sec.get("min_tokens", DEFAULT_MIN_TOKENS), window=sec.get("window", DEFAULT_WINDOW))
    try:
        spec.check()
    except ValueError as e:
        raise ValueError(f"{preset}: selection: {e}") from None
    return spec
