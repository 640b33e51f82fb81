"""The transformers compatibility layer: keyword choice by signature, output reading, one place."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from validation import compat

PACKAGE = Path(__file__).resolve().parent.parent / "validation"


class _NamedCache(torch.nn.Module):
    def forward(self, input_ids=None, cache=None, use_cache=None, **kwargs: Any):  # noqa: D401 - test double
        return {"cache": cache, "kwargs": kwargs}


class _KwargsOnly(torch.nn.Module):
    def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs: Any):
        return {"past_key_values": past_key_values, "kwargs": kwargs}


@pytest.mark.parametrize(
    "model, keyword",
    [(_NamedCache(), "cache"), (_KwargsOnly(), "past_key_values")],
    ids=["named-cache-parameter", "cache-only-in-kwargs"],
)
def test_cache_keyword_is_decided_by_the_forward_signature(model: torch.nn.Module, keyword: str) -> None:
    assert compat.cache_keyword(model) == keyword
    sentinel = object()
    out = compat.forward(model, sentinel, input_ids=None)
    assert out[keyword] is sentinel
    # The cache never lands in **kwargs, where 4.46-4.57 would swallow it.
    assert sentinel not in out["kwargs"].values()


def test_real_model_round_trip_without_warnings(tiny_llama) -> None:
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        full = compat.forward(tiny_llama, None, input_ids=ids, use_cache=True)
        cache = compat.output_cache(full)
        assert cache is not None
        layers = compat.cache_to_layers(cache)
        assert len(layers) == tiny_llama.config.num_hidden_layers
        prefix = compat.output_cache(compat.forward(tiny_llama, None, input_ids=ids[:, :4], use_cache=True))
        rebuilt = compat.layers_to_cache([(k.clone(), v.clone()) for k, v in compat.cache_to_layers(prefix)])
        cont = compat.forward(tiny_llama, rebuilt, input_ids=ids[:, 4:], use_cache=True)
    torch.testing.assert_close(cont.logits, full.logits[:, 4:], rtol=1e-4, atol=1e-4)


def test_dtype_kwargs_names_one_keyword() -> None:
    kw = compat.dtype_kwargs(torch.float32)
    assert list(kw.values()) == [torch.float32]
    expected = "dtype" if compat.transformers_version() >= (4, 56) else "torch_dtype"
    assert list(kw) == [expected]


def test_only_compat_touches_cache_keywords() -> None:
    pattern = re.compile(r"past_key_values\s*=|\.past_key_values\b|[(,]\s*cache=|\.key_cache\b|\.value_cache\b|\.layers\[")
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "compat.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}")
    assert offenders == []


def test_pyproject_bound_is_the_supported_minimum() -> None:
    """pyproject's transformers bound (what make test-compat installs) and MIN_TRANSFORMERS agree."""
    text = (PACKAGE.parent / "pyproject.toml").read_text()
    found = re.findall(r'"transformers>=(\d+)\.(\d+)\.(\d+)"', text)
    assert len(found) == 1, f"expected one transformers>=X.Y.Z bound in pyproject.toml, found {found}"
    assert tuple(int(x) for x in found[0][:2]) == compat.MIN_TRANSFORMERS
    assert compat.transformers_version() >= compat.MIN_TRANSFORMERS
