"""A saved transformers model folder that every supported release reads the same way.

``save_pretrained`` writes what the release that ran it understands. A folder written by
transformers 5.x fails or silently changes under 4.x in two places, and :func:`make_portable`
rewrites both; the weights and ``tokenizer.json`` are never touched:

* ``tokenizer_config.json`` names ``TokenizersBackend``, a class 4.x lacks ("Tokenizer class
  TokenizersBackend does not exist"). ``PreTrainedTokenizerFast`` exists in every release (5.x
  maps it onto ``TokenizersBackend``) and both load ``tokenizer.json`` as is, so the token ids
  do not depend on the release.
* ``config.json`` keeps the RoPE base only inside ``rope_parameters``; 4.x reads the top-level
  ``rope_theta`` and, finding none, silently uses 10000 (SmolLM2's is 100000).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict

from validation.atomic import write_text_atomic

# A tokenizer class every supported release knows; 5.x maps it onto its TokenizersBackend. Both
# load tokenizer.json as is, so the token ids do not depend on the release.
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def _write_json_atomic(path: Path, data: Dict[str, Any]) -> None:
    # replaces a hard link too: the file it shared is left as it was
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _read_json_object(path: Path) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read a JSON object: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def make_portable(folder: Path) -> None:
    """Rewrite a saved model folder's JSON so that every supported transformers release reads it the same.

    * ``config.json``: ``rope_theta`` at the top level (what 4.x reads; absent, 4.x silently
      uses 10000) and inside ``rope_parameters`` with ``rope_type`` "default" (what 5.x reads),
      whichever of the two the saving release wrote.
    * ``tokenizer_config.json``: ``tokenizer_class`` set to ``PreTrainedTokenizerFast``.

    The weights and ``tokenizer.json`` are not touched. Raises ValueError when the config has
    no RoPE base in either place, or already carries RoPE scaling (this rewrite is for the
    plain-RoPE embedded model only), or a JSON file is missing or not an object.
    """
    config_path, tok_path = folder / "config.json", folder / "tokenizer_config.json"
    config = _read_json_object(config_path)
    params = config.get("rope_parameters")
    params = dict(params) if isinstance(params, dict) else {}
    theta = config.get("rope_theta", params.get("rope_theta"))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise ValueError(f"{config_path}: no positive rope_theta at the top level or in rope_parameters (got {theta!r})")
    if config.get("rope_scaling") or params.get("rope_type", "default") != "default":
        raise ValueError(
            f"{config_path}: RoPE scaling {config.get('rope_scaling') or params} is not supported here; "
            "expected plain RoPE (rope_type 'default')"
        )
    config["rope_theta"] = float(theta)
    config["rope_parameters"] = {**params, "rope_theta": float(theta), "rope_type": "default"}
    tok = _read_json_object(tok_path)
    tok["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    _write_json_atomic(config_path, config)
    _write_json_atomic(tok_path, tok)


def link_or_copy_tree(src: Path, dst: Path) -> None:
    """Hard-link every regular file of ``src`` into the empty folder ``dst`` (copy where links fail)."""
    for item in src.iterdir():
        if item.is_file() and not item.is_symlink():
            try:
                os.link(item, dst / item.name)
            except OSError:
                shutil.copy2(item, dst / item.name)
