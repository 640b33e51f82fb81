"""The notebook path runs as written: every Python snippet of README.md and docs/*.md, and
examples/kv_cache_roundtrip.ipynb executed in a real Jupyter kernel, with no warning and no
text progress bar on stderr. Also the binary's scale-free verdict on a real model's cache.

Snippets and notebook run in a fresh interpreter whose working directory is a temporary
folder (so the files they write land there) with the repository first on ``PYTHONPATH``:
the same imports as from the repository root.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "examples" / "kv_cache_roundtrip.ipynb"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
# A warning or an error: what a user should never see in a normal run.
_WARNING = re.compile(r"Warning|Traceback|IProgress")
# A text progress bar: fine on a terminal's stderr, wrong in a notebook (widget bars or none).
_TEXT_BAR = re.compile(r"it/s\]|\|\s*\d+/\d+ \[")


def _snippets() -> List[Tuple[str, str]]:
    out = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8")
        for m in _BLOCK.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            out.append((f"{doc.relative_to(REPO)}:{line}", m.group(1)))
    return out


SNIPPETS = _snippets()


@pytest.fixture(scope="module")
def embedded_assets() -> None:
    from validation import assets

    try:
        assets.ensure_embedded_model(fetch=True)
        assets.ensure_embedded_corpus(fetch=True)
    except assets.AssetUnavailableError as e:
        pytest.skip(f"embedded assets unavailable and cannot be fetched: {e}")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("MPLBACKEND", None)
    return env


def test_docs_have_snippets() -> None:
    where = {name.split(":")[0] for name, _ in SNIPPETS}
    assert {"README.md", "docs/python-api.md"} <= where


@pytest.mark.slow
@pytest.mark.parametrize("name, code", SNIPPETS, ids=[name for name, _ in SNIPPETS])
def test_doc_snippet_runs_as_written(name: str, code: str, tmp_path: Path, kv_compress_bin: str,
                                     embedded_assets: None) -> None:
    proc = subprocess.run([sys.executable, "-c", code],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip(), f"{name} printed nothing"
    assert not _WARNING.search(proc.stderr), f"{name} warned:\n{proc.stderr[-3000:]}"


@pytest.mark.slow
def test_notebook_runs_clean(tmp_path: Path, kv_compress_bin: str, embedded_assets: None, monkeypatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for key, value in _env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MPLBACKEND", raising=False)
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    streams = [o for o in outputs if o.output_type == "stream"]
    assert [o.text for o in streams if o.name == "stderr"] == []
    assert [o for o in outputs if o.output_type == "error"] == []
    assert not any(_WARNING.search(o.text) or _TEXT_BAR.search(o.text) for o in streams)
    text = "".join(o.text for o in streams)
    assert "[OK] ACCEPTABLE" in text or "[OK] GOOD" in text or "[OK] EXCELLENT" in text
    assert "restored cache:" in text and "perplexity" in text
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) == 1, "the plot is shown inline once"
    assert not list(NOTEBOOK.parent.glob("kv*.safetensors")), "the notebook writes only to its temporary folder"


@pytest.mark.slow
def test_verdict_is_scale_free_on_the_embedded_cache(tmp_path: Path, kv_compress_bin: str,
                                                       embedded_assets: None) -> None:
    """The default codec is not POOR on a real cache; 2-bit codes without rotation are."""
    from validation import compression_bridge as cb
    from validation.corpora import load_corpus
    from validation.kv_cache_utils import extract_kv_cache, save_kv_cache
    from validation.validate_perplexity import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("embedded", device="cpu")
    text = load_corpus("embedded").text[:4000]
    cache, _ = extract_kv_cache(model, tokenizer, text, max_length=256)
    src = tmp_path / "kv.safetensors"
    save_kv_cache(cache, str(src))
    default = cb.get_compression_metrics(str(src))
    crushed = cb.get_compression_metrics(str(src), bits=2, rotate="none", key_axis="token", sink=0)
    assert default.rmse >= 0.10  # the seed's absolute rule would have called this POOR
    assert default.passed and default.quality_level != "POOR" and default.violations == []
    assert default.snr_db > cb.VERDICT_MIN_SNR_DB
    assert not crushed.passed and crushed.quality_level == "POOR"
    assert any(v.startswith("snr_db") for v in crushed.violations)


@pytest.mark.parametrize("enabled", [True, False], ids=["enabled", "disabled"])
def test_progress_bar_outside_a_notebook(enabled: bool, capsys) -> None:
    from validation.progress import in_notebook, progress_bar

    assert not in_notebook()
    assert sum(progress_bar(range(5), desc="steps", enabled=enabled)) == 10
    err = capsys.readouterr().err
    assert ("steps: 100%" in err) is enabled
