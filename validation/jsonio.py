"""JSON output: values made JSON-safe (NaN and infinities become null) and atomic file writes."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

from validation.atomic import write_text_atomic


def _json_number(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _jsonable(obj: Any) -> Any:
    """Recursively turn dataclasses, tensors, numpy scalars, NaN into JSON-friendly values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return _json_number(float(obj))
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    if isinstance(obj, (torch.device, Path)):
        return str(obj)
    return obj


def write_json_atomic(path: str, data: Dict[str, Any]) -> None:
    """Write JSON to a temp file beside ``path`` and ``os.replace`` it into place."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(target, json.dumps(_jsonable(data), indent=2, sort_keys=False, allow_nan=False) + "\n")

