"""Validation toolkit: measure what compressing an LLM's KV cache with ``kv-compress`` costs.

``validation.kv_cache_utils`` extracts, saves, loads and inspects KV caches; it is the one
place that knows how a transformers ``DynamicCache`` stores its tensors.
"""
