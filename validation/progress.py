"""Progress bars that suit where the code runs: text on a terminal, widgets in a notebook, or none.

``tqdm.auto`` picks the notebook bar inside Jupyter but, when ``ipywidgets`` is missing, prints
``TqdmWarning: IProgress not found`` and falls back to text bars written to the cell's stderr.
:func:`progress_bar` never does either: in a notebook it shows widget bars when ``ipywidgets``
is importable and no bar otherwise; elsewhere it writes tqdm's text bar to stderr.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import warnings
from typing import Any, Iterable, Iterator, Optional


def in_notebook() -> bool:
    """True inside a Jupyter kernel (an IPython shell that talks to a front end over ZMQ)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except AttributeError:
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _widgets_available() -> bool:
    return importlib.util.find_spec("ipywidgets") is not None


def settle_notebook_bars() -> None:
    """In a notebook without ``ipywidgets``, ignore tqdm's "IProgress not found" warning.

    ``tqdm.auto`` (imported by transformers) warns once that it falls back to text bars; this
    package draws none there instead (:func:`progress_bar`, :func:`library_bars_fit`), so the
    warning would only be noise. Nothing changes outside a notebook or with ``ipywidgets``.
    """
    if in_notebook() and not _widgets_available():
        from tqdm.std import TqdmWarning

        warnings.filterwarnings("ignore", message="IProgress not found", category=TqdmWarning)


def progress_bar(iterable: Optional[Iterable[Any]] = None, *, total: Optional[int] = None, desc: str = "",
                 unit: str = "it", enabled: bool = True) -> Any:
    """A tqdm bar over ``iterable`` (or of ``total`` steps, advanced with ``update``).

    ``enabled`` False, or a notebook without ``ipywidgets``, gives a disabled bar: it iterates
    and accepts ``update``/``close`` but draws nothing.
    """
    if enabled and in_notebook():
        if _widgets_available():
            from tqdm.notebook import tqdm as notebook_tqdm

            return notebook_tqdm(iterable, total=total, desc=desc, unit=unit)
        enabled = False
    from tqdm.std import tqdm as text_tqdm

    return text_tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr)


@contextlib.contextmanager
def library_bars_fit() -> Iterator[None]:
    """Within the block, transformers' own bars (e.g. "Loading weights") follow the same rule.

    In a notebook without ``ipywidgets`` they are switched off (they would warn and write text
    bars to stderr) and switched back on afterwards; everywhere else nothing changes.
    """
    if not in_notebook() or _widgets_available():
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
