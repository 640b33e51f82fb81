"""Tests for validation.sweep: many codecs scored against one shared baseline, the table, the frontier.

Every configuration goes through the real ``kv-compress`` binary (``kv_compress_bin``); the model
is conftest's random tiny Llama, so nothing is downloaded. The test marked ``slow`` uses the
embedded SmolLM2.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from validation import sweep
from validation import validate_perplexity as vp
from validation import frontier
from validation import models
from validation import options as run_options
from validation import protocol
from validation import quick_test
from validation import reports
from validation import results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL_KEYS = {"scheme", "rotate", "key_axis", "sink", "bits", "key_bits", "value_bits", "group_size", "sparsity"}


def codec(scheme: str = "sym", rotate: str = "none", bits: int = 4, group_size: int = 64, **over) -> dict:
    """A grid codec with every key explicit."""
    c = {"scheme": scheme, "rotate": rotate, "key_axis": "token", "sink": 0, "bits": bits, "key_bits": bits,
         "value_bits": bits, "group_size": group_size, "sparsity": 0.0}
    c.update(over)
    return c


GRID = [
    sweep.SweepConfig("sym-8bit", codec(bits=8)),
    sweep.SweepConfig("asym-had-kchan", codec("asym", "hadamard", key_axis="channel", sink=1)),
    sweep.SweepConfig("sym-2bit-g32", codec(bits=2, group_size=32)),
]


def tiny_options(**over) -> run_options.ValidationOptions:
    base = dict(max_length=96, stride=32, max_samples=4, batch_windows=2, cpu=True, threshold=0.5)
    base.update(over)
    return run_options.ValidationOptions(**base)


@pytest.fixture(scope="module")
def tiny_sweep(kv_compress_bin: str, tiny_llama, tmp_path_factory: pytest.TempPathFactory):
    """The three-configuration GRID swept on the tiny Llama: (SweepOutcome, report, output folder)."""
    out = tmp_path_factory.mktemp("sweep")
    options = tiny_options()
    ids = quick_test.synthetic_token_ids(3 * 32 + 96, 512, 0)
    choice = models.ModelChoice(None, "synthetic", "tiny", "tiny Llama", "test")
    outcome, report = sweep.run_sweep(
        tiny_llama, ids, options, GRID, reports.Console(False), model_choice=choice,
        corpus_info={"name": "synthetic ids", "source": "synthetic", "reason": "test"}, out_dir=str(out),
        progress=False, command="pytest",
    )
    return outcome, report, out


# -----------------------------------------------------------------------------
# the measurement


def test_every_config_shares_the_baseline(tiny_sweep) -> None:
    outcome, report, _ = tiny_sweep
    baselines = {r.baseline_perplexity for r in outcome.rows}
    assert len(baselines) == 1  # bit-identical, not merely close
    assert report["baseline"]["perplexity"] == outcome.baseline_perplexity
    assert [c["baseline_perplexity"] for c in report["configs"]] == [outcome.baseline_perplexity] * len(GRID)
    assert outcome.num_windows == 4 and outcome.scored_tokens == 128


def test_shared_baseline_equals_a_single_run(kv_compress_bin: str, tiny_llama, tiny_sweep) -> None:
    outcome, report, _ = tiny_sweep
    windows, starts = protocol.make_windows(quick_test.synthetic_token_ids(3 * 32 + 96, 512, 0), 96, 32)
    single = protocol.run_protocol(tiny_llama, windows, 32, starts=starts, batch_windows=2, **{
        k: v for k, v in GRID[0].codec.items() if k not in ("group_size", "sparsity")})
    assert outcome.baseline_perplexity == pytest.approx(single.baseline_perplexity, rel=1e-9)
    row = outcome.row("sym-8bit")
    assert row.compressed_perplexity == pytest.approx(single.compressed_perplexity, rel=1e-9)
    assert row.disk_ratio_vs_fp16 == pytest.approx(results.build_result(single).disk_ratio_vs_fp16, rel=1e-12)


def test_more_bits_hurt_less(tiny_sweep) -> None:
    outcome, _, _ = tiny_sweep
    hi, lo = outcome.row("sym-8bit"), outcome.row("sym-2bit-g32")
    # a random model's perplexity can move either way under noise, so compare magnitudes
    assert abs(hi.delta) < abs(lo.delta)
    assert hi.kl_divergence < lo.kl_divergence and hi.top1_agreement > lo.top1_agreement
    assert hi.snr_db > lo.snr_db + 20
    assert hi.bits_per_element > lo.bits_per_element and hi.disk_ratio_vs_fp16 < lo.disk_ratio_vs_fp16
    for r in outcome.rows:
        assert r.delta_ci_low <= r.delta <= r.delta_ci_high
        assert r.delta == pytest.approx(r.compressed_perplexity - r.baseline_perplexity)


def test_codecs_reach_the_binary(tiny_sweep) -> None:
    outcome, _, _ = tiny_sweep
    for cfg, row in zip(GRID, outcome.rows):
        resolved = row.resolved_codec
        for key in ALL_KEYS - {"sparsity"}:
            assert resolved[key] == cfg.codec[key], (cfg.name, key)


def test_recommendation_follows_the_ratio_rule(tiny_sweep) -> None:
    outcome, _, _ = tiny_sweep
    eligible = [r for r in outcome.rows if r.disk_ratio_vs_fp16 >= frontier.MIN_RATIO]
    assert eligible, f"the 2-bit point is always above {frontier.MIN_RATIO}x"
    best = outcome.row(outcome.recommended)
    assert best.recommended and best.disk_ratio_vs_fp16 >= frontier.MIN_RATIO
    assert best.delta == min(r.delta for r in eligible)
    assert sum(r.recommended for r in outcome.rows) == 1


def test_bits_on_disk_by_part(tiny_sweep) -> None:
    """Each row splits its bits per element on disk into codes, scales, minimums, sink and header, which
    add up to the row's bits per element and the header; only the asym row has minimums, only the sink row a sink."""
    outcome, report, _ = tiny_sweep
    for row, entry in zip(outcome.rows, report["configs"]):
        parts = row.bits_by_part
        assert parts["codes"] > 0 and parts["scales"] > 0 and parts["header"] > 0, row.name
        assert sum(v for k, v in parts.items() if k != "total") == pytest.approx(parts["total"])
        stored = parts["total"] - parts["header"] - parts.get("raw", 0)  # bits_per_element leaves the header out
        assert stored == pytest.approx(row.bits_per_element, rel=1e-6), row.name
        assert (parts.get("mins", 0) > 0) == (row.codec["scheme"] == "asym"), row.name
        assert (parts.get("sink", 0) > 0) == (row.codec["sink"] > 0), row.name
        assert entry["bits_by_part"] == parts
    assert report["picks"]["default"] == outcome.recommended


@pytest.mark.parametrize(
    "points, expected",
    [
        ([("a", 4.4, 0.05), ("b", 5.4, 0.2), ("c", 5.3, 0.1), ("d", 9.0, 6.0)],
         {"default": "a", "compact": "c", "high_ratio": "d"}),
        ([("a", 4.0, 0.05), ("b", 4.3, 0.3)], {"default": "b", "compact": None, "high_ratio": None}),
    ],
    ids=["every-bar", "only-default"],
)
def test_picks(points: list[tuple[str, float, float]], expected) -> None:
    assert frontier.picks([_row(*p) for p in points]) == expected


# -----------------------------------------------------------------------------
# outputs


def test_outputs_are_written(tiny_sweep) -> None:
    outcome, report, out = tiny_sweep
    for name in ("sweep.json", "sweep.md", "frontier.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "frontier.png").read_bytes().startswith(PNG_MAGIC)
    heatmaps = sorted(p.name for p in (out / "heatmaps").glob("*.png"))
    assert heatmaps == ["asym-had-kchan.png", "sym-2bit-g32.png", "sym-8bit.png"]
    on_disk = json.loads((out / "sweep.json").read_text())
    assert on_disk["schema"] == sweep.SWEEP_SCHEMA and on_disk["recommended"] == outcome.recommended
    assert [c["name"] for c in on_disk["configs"]] == [c.name for c in GRID]
    first = on_disk["configs"][0]
    assert {"bits_per_element", "disk_ratio_vs_fp16", "delta", "delta_ci_low", "delta_ci_high", "kl_divergence",
            "top1_agreement", "passed", "snr_db", "pareto", "codec", "resolved_codec"} <= set(first)
    assert len(first["diagnostics"]["key_snr_db"]) == 22 and len(first["diagnostics"]["key_snr_db"][0]) == 4


def test_markdown_table_is_sorted_by_ratio_and_marks_rows(tiny_sweep) -> None:
    outcome, _, out = tiny_sweep
    text = (out / "sweep.md").read_text()
    rows = [line for line in text.splitlines() if re.match(r"^\| \d+ \|", line)]
    assert len(rows) == len(GRID)
    ratios = [float(re.search(r"\| ([0-9.]+)x \|", line).group(1)) for line in rows]
    assert ratios == sorted(ratios, reverse=True)
    assert sum("(recommended)" in line for line in rows) == 1
    assert f"**{outcome.recommended}** (recommended)" in text
    pareto = [line.rstrip().endswith("| yes |") for line in rows]
    by_name = {r.name: r.pareto for r in outcome.rows}
    assert pareto == [by_name[re.search(r"\| \d+ \| \**([\w.+-]+)", line).group(1)] for line in rows]
    assert "Command: `pytest`" in text


@pytest.mark.parametrize(
    "ratios, deltas, expected",
    [
        ([2.0, 3.0, 4.0], [0.1, 0.2, 0.3], [True, True, True]),
        ([2.0, 3.0, 4.0], [0.3, 0.2, 0.1], [False, False, True]),
        ([3.7, 3.7, 2.0], [0.2, 0.2, 0.5], [True, True, False]),
        ([4.0], [9.0], [True]),
    ],
    ids=["monotone-tradeoff", "one-dominates", "ties-both-kept", "single-point"],
)
def test_pareto_flags(ratios: list[float], deltas: list[float], expected: list[bool]) -> None:
    assert frontier.pareto_flags(ratios, deltas) == expected


def _row(name: str, ratio: float, delta: float) -> frontier.SweepRow:
    nan = math.nan
    return frontier.SweepRow(0, name, {}, None, nan, ratio, nan, 10.0, 10.0 + delta, delta, nan, nan, nan, nan, nan,
                          delta < 0.5, nan, nan, nan)


@pytest.mark.parametrize(
    "points, expected",
    [
        ([("a", 4.41, 0.3), ("b", 4.2, 0.1), ("c", 4.41, 0.2)], "c"),
        ([("a", 4.2, 0.1), ("b", 2.0, 0.0)], None),
        ([("a", 4.30, 0.2), ("b", 4.5, 0.2)], "b"),
        ([("a", 8.0, -5.0), ("b", 4.4, 0.1)], "a"),
    ],
    ids=["lowest-delta-above-ratio", "none-eligible", "tie-prefers-higher-ratio", "rule-is-lowest-delta"],
)
def test_recommend(points: list[tuple[str, float, float]], expected) -> None:
    best = frontier.recommend([_row(*p) for p in points])
    assert (best.name if best else None) == expected


def test_frontier_png_with_a_wide_range(tmp_path: Path) -> None:
    rows = [_row("a", 1.9, 0.01), _row("b", 3.76, 0.2), _row("c", 6.5, 40.0)]
    for r in rows:
        r.delta_ci_low, r.delta_ci_high = r.delta - 0.05, r.delta + 0.05
    rows[1].recommended = True
    for r, flag in zip(rows, frontier.pareto_flags([1.9, 3.76, 6.5], [0.01, 0.2, 40.0])):
        r.pareto = flag
    path = frontier.plot_frontier(rows, str(tmp_path / "f" / "frontier.png"), threshold=0.5)
    data = Path(path).read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


# -----------------------------------------------------------------------------
# the grid


def test_default_grid_is_explicit_and_valid() -> None:
    sweep.check_grid(sweep.DEFAULT_GRID)
    names = [c.name for c in sweep.DEFAULT_GRID]
    assert len(names) == len(set(names)) >= 12
    for cfg in sweep.DEFAULT_GRID:
        assert set(cfg.codec) == ALL_KEYS, cfg.name  # never relies on the binary's defaults
        assert 64 % cfg.codec["group_size"] == 0, cfg.name  # head_dim 64 models
    assert codec() in [c.codec for c in sweep.DEFAULT_GRID]  # the seed's scheme
    assert {8, 3, 2} <= {c.codec["bits"] for c in sweep.DEFAULT_GRID}


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", r"not valid JSON \(Expecting property name"),
        ('{"name": "x", "codec": {}}', r"expected a non-empty JSON list .*, got a JSON dict"),
        ("[]", "got an empty list"),
        ('[{"name": "x"}]', r"entry 1: expected an object with exactly the keys \['codec', 'name'\], got \['name'\]"),
        ('[{"name": "", "codec": {}}]', "entry 1: \"name\" must be a non-empty string, got ''"),
        ('[{"name": "a", "codec": {}}, {"name": "a", "codec": {}}]', "entry 2: name 'a' is already used by entry 1"),
        ('[{"name": "a", "codec": {"shceme": "sym"}}]', r"entry 1 \(a\): unknown codec key\(s\) \['shceme'\]; allowed"),
        ('[{"name": "a", "codec": {"scheme": "nf4"}}]', r"scheme must be one of \['sym', 'asym', 'nf'\], got 'nf4'"),
        ('[{"name": "a", "codec": {"bits": 5}}]', r"bits must be one of \[2, 3, 4, 8\], got 5"),
        ('[{"name": "a", "codec": {"group_size": 48}}]', r"group_size must be one of \[32, 64, 128\], got 48"),
        ('[{"name": "a", "codec": [1]}]', "\"codec\" must be an object, got list"),
    ],
    ids=["not-json", "not-a-list", "empty", "missing-codec", "empty-name", "duplicate", "unknown-key", "bad-scheme",
         "bad-bits", "bad-group-size", "codec-not-object"],
)
def test_bad_grid_file_is_a_clear_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "grid.json"
    path.write_text(content)
    with pytest.raises(vp.ValidationError, match=message) as err:
        sweep.load_grid(str(path))
    assert str(path) in str(err.value)


def test_missing_grid_file(tmp_path: Path) -> None:
    with pytest.raises(vp.ValidationError, match="no such file"):
        sweep.load_grid(str(tmp_path / "nope.json"))


# -----------------------------------------------------------------------------
# command line


def exit_status(argv: list[str]) -> int:
    try:
        return vp.main(argv)
    except SystemExit as e:
        return int(e.code)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sweep", "--sweep-grid", "{tmp}/bad.json"], r"--sweep-grid .*bad.json: entry 1 \(a\): scheme must be one"),
        (["--sweep", "--sweep-grid", "{tmp}/missing.json"], "no such file"),
        (["--sweep-grid", "{tmp}/bad.json"], "needs --sweep"),
        (["--sweep", "--scheme", "asym"], r"--sweep takes its codecs from the grid; drop the codec flags \['--scheme'\]"),
        (["--sweep", "--quick-test"], "either --sweep or --quick-test"),
    ],
    ids=["bad-grid", "missing-grid", "grid-without-sweep", "codec-flags-with-sweep", "sweep-and-quick-test"],
)
def test_cli_sweep_errors_exit_2(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    (tmp_path / "bad.json").write_text('[{"name": "a", "codec": {"scheme": "nf4"}}]')
    assert exit_status([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(message, err[0]), err[0]


def test_cli_sweep_end_to_end(kv_compress_bin: str, tiny_model_dir: Path, tmp_path: Path, capsys,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(60)))
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([{"name": "sym-8bit", "codec": codec(bits=8)},
                                {"name": "sym-4bit", "codec": codec()}]))
    out = tmp_path / "results"
    status = exit_status(["--sweep", "--sweep-grid", str(grid), "--plots", str(out), "--model", str(tiny_model_dir),
                          "--text-file", str(text), "--cpu", "--max-length", "64", "--stride", "16",
                          "--max-samples", "3", "--batch-windows", "3", "--threshold=1e-9", "--quiet"])
    assert status == 0  # the sweep reports, it does not gate
    line = capsys.readouterr().out.strip()
    assert line.startswith("SWEEP: 2 configs, 48 scored tokens")
    report = json.loads((out / "sweep.json").read_text())
    assert [c["name"] for c in report["configs"]] == ["sym-8bit", "sym-4bit"]
    assert report["model"]["source"] == "local" and report["protocol"]["windows"] == 3
    assert report["command"].startswith("python validation/validate_perplexity.py --sweep")
    assert (out / "frontier.png").stat().st_size > 0 and (out / "sweep.md").stat().st_size > 0


# -----------------------------------------------------------------------------
# the embedded model (slow)


@pytest.mark.slow
def test_embedded_model_sweep(kv_compress_bin: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from validation import assets

    try:
        assets.ensure_embedded_model(fetch=True)
        assets.ensure_embedded_corpus(fetch=True)
    except assets.AssetUnavailableError as e:
        pytest.skip(f"embedded assets unavailable and cannot be fetched: {e}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    options = run_options.ValidationOptions(model="embedded", dataset="embedded", max_length=160, stride=32, max_samples=2,
                                   batch_windows=2, cpu=True, plots=str(tmp_path))
    grid = [sweep.SweepConfig("sym-8bit", codec(bits=8)), sweep.SweepConfig("sym-2bit", codec(bits=2, group_size=32))]
    grid_file = tmp_path / "grid.json"
    grid_file.write_text(json.dumps([{"name": c.name, "codec": c.codec} for c in grid]))
    outcome = sweep.run_sweep_cli(options, grid_file=str(grid_file), verbose=False)
    hi, lo = outcome.row("sym-8bit"), outcome.row("sym-2bit")
    assert 1.0 < outcome.baseline_perplexity < 200.0
    assert abs(hi.delta) < lo.delta and lo.delta > 0  # a trained model degrades with 2-bit codes
    assert hi.kl_divergence < lo.kl_divergence
    assert len(hi.diagnostics["key_snr_db"]) == 30 and len(hi.diagnostics["key_snr_db"][0]) == 3
