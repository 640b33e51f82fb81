"""The leaderboard command (validation.benchmark) and the --device-map plumbing of model loading.

The end-to-end test runs two small random models (a Llama and a Gemma 3 with sliding-window
layers, saved as local folders) through two presets of the real binary on the embedded
corpus; it skips when that corpus is not cached (``make assets`` fetches it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from validation import assets, benchmark, models
from validation import options as run_options
from validation.compat import transformers_version


def test_parse_list_rejects_blanks_repeats_and_unknown_names():
    assert benchmark.parse_list(" seed, default ,", "--presets", ("seed", "default")) == ["seed", "default"]
    with pytest.raises(run_options.ValidationError, match=r"--presets needs at least one name, got ' , '"):
        benchmark.parse_list(" , ", "--presets")
    with pytest.raises(run_options.ValidationError, match=r"--models names \['a'\] twice"):
        benchmark.parse_list("a,b,a", "--models")
    with pytest.raises(run_options.ValidationError, match=r"--datasets must name items of \['wiki', 'code'\], got \['web'\]"):
        benchmark.parse_list("wiki,web", "--datasets", ("wiki", "code"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--presets", "seed,turbo"], r"--presets must name items of .*got \['turbo'\]"),
        (["--datasets", "wiki,web"], r"--datasets must name items of .*got \['web'\]"),
        (["--stride", "0"], r"--stride must be in \[1, max_length - 1\]"),
    ],
    ids=["bad-preset", "bad-dataset", "bad-stride"],
)
def test_cli_usage_errors_exit_2(capsys, argv, message):
    assert benchmark.main(argv + ["--quiet"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    import re
    assert re.search(message, lines[0]), lines[0]


def test_model_load_kwargs_device_map():
    kwargs = models.model_load_kwargs(torch.float32, "auto", local_files_only=True)
    assert kwargs["device_map"] == "auto" and kwargs["local_files_only"] is True
    assert "device_map" not in models.model_load_kwargs(torch.float32)
    with pytest.raises(run_options.ValidationError, match=r"--device-map must be one of \['auto', .*got 'everywhere'"):
        models.model_load_kwargs(torch.float32, "everywhere")
    with pytest.raises(run_options.ValidationError, match=r"--device-map must be one of .*got 'gpu'"):
        run_options.ValidationOptions(device_map="gpu").check()


def test_device_map_auto_loads_on_cpu(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch):
    # the real from_pretrained runs (accelerate places the modules; with no GPU, all on the CPU);
    # the wrapper only records what it was given
    from transformers import AutoModelForCausalLM

    seen = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        seen.append(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(recording))
    model, tokenizer = models.load_model_and_tokenizer(str(tiny_model_dir), "cpu", local_files_only=True,
                                                       device_map="auto")
    assert seen and seen[-1]["device_map"] == "auto"
    assert next(model.parameters()).device.type == "cpu" and not model.training
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.fixture()
def tiny_gemma_dir(tmp_path: Path, tiny_tokenizer) -> Path:
    if transformers_version() < (5, 0):
        pytest.skip("Gemma 3 caches of several lengths need transformers 5.x")
    from conftest import make_tiny_gemma3

    folder = tmp_path / "tiny-gemma3"
    make_tiny_gemma3().save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_benchmark_end_to_end(kv_compress_bin: str, tiny_model_dir: Path, tiny_gemma_dir: Path, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch, capsys):
    try:
        assets.ensure_embedded_corpus(fetch=False)
    except assets.AssetUnavailableError as e:
        pytest.skip(f"embedded corpus not cached: {e}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "board"
    argv = ["--models", f"{tiny_model_dir},{tiny_gemma_dir}", "--presets", "seed,default", "--datasets", "wiki",
            "--max-length", "48", "--stride", "16", "--max-samples", "2", "--cpu", "--out-dir", str(out), "--quiet"]
    assert benchmark.main(argv) == 0
    assert capsys.readouterr().out.startswith("LEADERBOARD: 2 models x 2 presets x 1 corpora")
    doc = json.loads((out / "leaderboard.json").read_text())
    cells = doc["cells"]
    assert [(Path(c["model"]).name, c["preset"], c["dataset"]) for c in cells] == [
        (tiny_model_dir.name, "seed", "wiki"), (tiny_model_dir.name, "default", "wiki"),
        ("tiny-gemma3", "seed", "wiki"), ("tiny-gemma3", "default", "wiki")]
    for c in cells:
        assert c["scored_tokens"] == 32 and c["windows"] == 2
        assert 0 < c["bits_per_element"] < 16 and math.isfinite(c["delta"]) and c["kl_divergence"] >= 0
        assert math.isclose(c["delta"], c["compressed_perplexity"] - c["baseline_perplexity"], rel_tol=1e-9, abs_tol=1e-12)
    # the Gemma model's context (32 tokens) passes its 8-token window: its baseline still equals the plain pass
    assert doc["models"][str(tiny_gemma_dir)]["sliding_window"] == 8
    for check in doc["baseline_checks"]:
        assert check["max_abs_window_nll_diff"] < 1e-3, check
        assert math.isclose(check["protocol_perplexity"], check["plain_perplexity"], rel_tol=1e-5)
    md = (out / "leaderboard.md").read_text()
    assert "| model | preset | bits/elem | vs fp16 | wiki ΔPPL | wiki ΔPPL % | wiki KL | wiki top-1 |" in md
    assert md.count("\n| ") == 1 + 4  # header + one row per model x preset (the separator starts with "|-")
    assert (out / "leaderboard.png").stat().st_size > 0

    # split by model into two files, then --merge joins them back into the same cells
    for i, model_dir in enumerate((tiny_model_dir, tiny_gemma_dir)):
        part = dict(doc, cells=[c for c in cells if c["model"] == str(model_dir)],
                    baseline_checks=[c for c in doc["baseline_checks"] if c["model"] == str(model_dir)])
        (tmp_path / f"part{i}.json").write_text(json.dumps(part))
    merged_dir = tmp_path / "merged"
    argv = ["--merge", str(tmp_path / "part0.json"), str(tmp_path / "part1.json"), "--out-dir", str(merged_dir)]
    assert benchmark.main(argv) == 0
    merged = json.loads((merged_dir / "leaderboard.json").read_text())
    assert merged["cells"] == cells and len(merged["baseline_checks"]) == 2
    assert (merged_dir / "leaderboard.md").read_text().count("\n| ") == 1 + 4
    # the same cell twice, or another window protocol, is refused
    assert benchmark.main(["--merge", str(tmp_path / "part0.json"), str(tmp_path / "part0.json"),
                           "--out-dir", str(tmp_path / "dup")]) == 2
    assert "is measured twice" in capsys.readouterr().err
    other = json.loads((tmp_path / "part1.json").read_text())
    other["protocol"]["stride"] = 8
    (tmp_path / "part1.json").write_text(json.dumps(other))
    assert benchmark.main(["--merge", str(tmp_path / "part0.json"), str(tmp_path / "part1.json"),
                           "--out-dir", str(tmp_path / "mixed")]) == 2
    assert "differs from" in capsys.readouterr().err
