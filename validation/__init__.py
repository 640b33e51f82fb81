"""Validation toolkit: measure what compressing an LLM's KV cache with ``kv-compress`` costs.

``validation.kv_cache_utils`` extracts, saves, loads and inspects KV caches;
``validation.compression_bridge`` runs the binary; ``validation.compat`` is the one place that
knows how the installed transformers release passes and stores caches. See docs/python-api.md.

Importing the package inside a Jupyter kernel without ``ipywidgets`` silences tqdm's
"IProgress not found" warning (and only that one): the package then draws no progress bars
there at all (:mod:`validation.progress`), so the text-bar fallback it warns about never happens.
"""

from validation.progress import settle_notebook_bars

settle_notebook_bars()
