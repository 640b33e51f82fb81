"""The auto-tuner (validation/autotune): options, windows, allocation, presets, and a run end to end.

The end-to-end test runs ``python -m validation.autotune`` on a small random Llama saved as a
local folder, over a text file, through the real ``kv-compress`` binary; the preset it writes is
then read by the binary (``compress`` + ``inspect``) and by ``validate_perplexity.py --preset``.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from validation.autotune import allocate as al
from validation.autotune import cli
from validation.autotune.run import AutotuneError, Budget
from validation.autotune.sensitivity import (
    CalibrationError,
    PartialForward,
    calibration_starts,
    evaluation_span,
    kl_mean,
)
from validation.compat import set_cache_tensor
from validation.autotune.space import (
    ROLES,
    Assignment,
    Candidate,
    SizeTable,
    SpaceError,
    assignment_preset,
    default_space,
    write_preset,
)


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    """A random 4-layer Llama (head_dim 64) and the tiny tokenizer as a local folder: few tensors, a short search."""
    from conftest import make_tiny_llama

    folder = tmp_path_factory.mktemp("autotune-model")
    make_tiny_llama(num_layers=4, num_kv_heads=2).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A UTF-8 text file long enough for evaluation windows plus disjoint calibration windows."""
    path = tmp_path_factory.mktemp("autotune-corpus") / "notes.txt"
    paragraphs = [f"Paragraph {i}: the quick brown fox jumps over the lazy dog; Robert Boulter is an English "
                  f"actor. Tropical Storm Fay formed in the western Caribbean Sea number {i * 7 % 13}." for i in range(120)]
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return path


# -----------------------------------------------------------------------------
# options and errors


@pytest.mark.parametrize("budget, budget_kl, kind, value", [
    (None, None, "ppl_pct", 1.0), ("1%", None, "ppl_pct", 1.0), ("0.5 %", None, "ppl_pct", 0.5),
    ("0.18", None, "ppl_abs", 0.18), (None, 0.01, "kl", 0.01),
], ids=["default-1pct", "pct", "pct-space", "absolute", "kl"])
def test_budget_parse(budget, budget_kl, kind, value) -> None:
    b = Budget.parse(budget, budget_kl)
    assert (b.kind, b.value) == (kind, pytest.approx(value))


@pytest.mark.parametrize("budget, budget_kl, needle", [
    ("abc", None, "percentage of the baseline perplexity (e.g. 1%) or an absolute"),
    ("-1%", None, "must be > 0, got '-1%'"),
    ("1%", 0.01, "either --budget or --budget-kl"),
    (None, -0.5, "positive number of nats per token, got -0.5"),
], ids=["not-a-number", "negative", "both", "kl-negative"])
def test_budget_errors_name_allowed_values(budget, budget_kl, needle) -> None:
    with pytest.raises(AutotuneError, match=None) as e:
        Budget.parse(budget, budget_kl)
    assert needle in str(e.value)


@pytest.mark.parametrize("argv, needle", [
    (["--bits", "2,5"], "from [2, 3, 4, 8], got '2,5'"),
    (["--space", "huge"], "invalid choice: 'huge'"),
    (["--margin", "1.5"], "--margin must be in (0, 1], got 1.5"),
    (["--sensitivity-tokens", "300"], "--sensitivity-tokens must be in [1, stride - 1 = 255], got 300"),
    (["--compare", "no-such-preset"], "built-in preset [seed, default, compact, near-lossless] or a preset file, got 'no-such-preset'"),
    (["--budget", "x%"], "--budget must be a percentage"),
    (["--keep-ratios", "0.8"], "--keep-ratios 0.8 needs --selection (one of ['attention', 'knorm', 'recent', 'snapkv'])"),
    (["--selection", "attention", "--keep-ratios", "0.8,1.5"], "numbers in (0, 1], got '0.8,1.5'"),
    (["--selection", "snap"], "invalid choice: 'snap'"),
], ids=["bits", "space", "margin", "sensitivity-tokens", "compare", "budget", "keep-without-selection", "keep-range",
        "selection-method"])
def test_cli_errors_exit_2_with_one_line(argv, needle, capsys, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) if argv[0] in ("--bits", "--space") or "--selection" in argv else _nothing():
        code = cli.main([*argv, "--output", str(tmp_path / "p.json")])
        assert code == 2
    err = capsys.readouterr().err
    assert needle in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p.json").exists()


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


@pytest.mark.parametrize("kwargs, needle", [
    (dict(role="keys", scheme="sym", bits=5, group_size=64, rotate="none", axis="token"), "bits must be one of [2, 3, 4, 8], got 5"),
    (dict(role="keys", scheme="sym", bits=4, group_size=256, rotate="none", axis="token"), "must be one of [32, 64, 128], got 256"),
    (dict(role="other", scheme="sym", bits=4, group_size=64, rotate="none", axis="token"), "role must be one of ['keys', 'values']"),
    (dict(role="values", scheme="sym", bits=4, group_size=64, rotate="none", axis="token", steps=8),
     "steps for sym 4-bit codes must be 0 (the width's own) or an integer in [1, 7], got 8"),
    (dict(role="keys", scheme="asym", bits=4, group_size=128, rotate="none", axis="channel", steps=16),
     "steps for asym 4-bit codes must be 0 (the width's own) or an integer in [1, 15], got 16"),
    (dict(role="keys", scheme="asym", bits=4, group_size=128, rotate="none", axis="channel", steps=6.5),
     "or an integer in [1, 15], got 6.5"),
], ids=["bits", "token-group", "role", "sym-steps-too-many", "asym-steps-too-many", "steps-fraction"])
def test_candidate_errors_name_allowed_values(kwargs, needle) -> None:
    with pytest.raises(SpaceError) as e:
        Candidate(**kwargs)
    assert needle in str(e.value)


def test_default_space_fits_head_dim_and_has_every_width() -> None:
    for role in ROLES:
        space = default_space(role, 64)
        assert {c.bits for c in space} == {2, 3, 4, 8}
        assert all(c.fits(64) for c in space)
        assert len({c.name for c in space}) == len(space)
    assert all(c.group_size <= 32 or c.axis == "channel" for c in default_space("values", 32))
    with pytest.raises(SpaceError, match=r"--space must be one of \['default', 'wide'\], got 'x'"):
        default_space("keys", 64, "x")


def test_default_space_holds_the_compact_plans_with_steps() -> None:
    """The built-in compact preset's role plans (4-bit codes, keys 7 steps, values 4) are candidates,
    and a plan with steps round-trips through the preset-file form."""
    keys = Candidate.from_plan("keys", {"scheme": "asym", "bits": 4, "group_size": 128, "rotate": "none",
                                        "axis": "channel", "steps": 7})
    values = Candidate.from_plan("values", {"scheme": "sym", "bits": 4, "group_size": 64, "rotate": "hadamard",
                                            "axis": "token", "steps": 4.0})
    assert keys in default_space("keys", 64) and values in default_space("values", 64)
    assert (keys.name, values.name) == ("k4s7-asym-ch128", "v4s4-sym-had-tok64")
    assert (keys.levels, values.levels) == (8, 9)
    assert Candidate.from_plan("values", values.plan) == values and values.plan["steps"] == 4
    # steps equal to the width's own divisor are the plan without steps
    assert Candidate.from_plan("keys", {**keys.plan, "steps": 15}) == Candidate("keys", "asym", 4, 128, "none", "channel")
    assert "steps" not in Candidate("keys", "asym", 4, 128, "none", "channel").plan
    assert not any(c.steps for c in default_space("keys", 64, bits=(2, 3, 8)))
    with pytest.raises(SpaceError, match=r"unknown \['stepz'\]"):
        Candidate.from_plan("keys", {**keys.plan, "stepz": 3})


# -----------------------------------------------------------------------------
# windows


@pytest.mark.parametrize("num_tokens, count, length, avoid_end", [
    (10_000, 8, 1024, 4864), (6_000, 1, 1024, 4864), (5_888, 3, 1024, 4864), (400, 2, 64, 112),
], ids=["spread", "one", "exactly-fits", "tiny"])
def test_calibration_windows_are_disjoint_from_evaluation(num_tokens, count, length, avoid_end) -> None:
    starts = calibration_starts(num_tokens, count, length, avoid_end)
    assert len(starts) == count
    assert all(s >= avoid_end and s + length <= num_tokens for s in starts)
    assert starts == sorted(starts)


def test_calibration_windows_refuse_a_short_corpus() -> None:
    with pytest.raises(CalibrationError, match="need at least 5888"):
        calibration_starts(5_000, 2, 1024, evaluation_span(16, 1024, 256))
    assert evaluation_span(16, 1024, 256) == 4864


# -----------------------------------------------------------------------------
# allocation


def _tables(seed: int, layers: int = 3, cands: int = 3):
    rng = np.random.default_rng(seed)
    keys = default_space("keys", 64, bits=(2, 3, 4))[:cands]
    values = default_space("values", 64, bits=(2, 3, 4))[:cands]
    candidates = {"keys": keys, "values": values}
    kl = {r: rng.uniform(0, 0.01, size=(cands, layers)) for r in ROLES}
    sizes = SizeTable({r: rng.integers(100, 1000, size=(cands, layers)).tolist() for r in ROLES}, 50, 10_000)
    return candidates, kl, sizes


@pytest.mark.parametrize("seed", range(5), ids=lambda s: f"seed{s}")
def test_allocation_is_the_optimum_of_the_knapsack(seed: int) -> None:
    candidates, kl, sizes = _tables(seed)
    budget = float(sum(kl[r].mean(axis=0).sum() for r in ROLES))  # between the cheapest and the dearest plan
    a = al.allocate(kl, sizes, candidates, budget, resolution=20000)
    assert a is not None and al.predicted_kl(kl, a) <= budget
    best = math.inf
    n = 3
    for ck in itertools.product(range(3), repeat=n):
        for cv in itertools.product(range(3), repeat=n):
            b = Assignment(candidates, {"keys": list(ck), "values": list(cv)})
            if al.predicted_kl(kl, b) <= budget:
                best = min(best, sizes.total(b))
    # the grid rounds each cost up, so the DP may miss the exact optimum by a hair of budget
    assert sizes.total(a) <= best * 1.02
    uni = al.best_uniform(kl, sizes, candidates, budget)
    assert uni is None or sizes.total(a) <= sizes.total(uni)


def test_allocation_returns_none_when_nothing_fits() -> None:
    candidates, kl, sizes = _tables(0)
    assert al.allocate(kl, sizes, candidates, 1e-9) is None
    with pytest.raises(ValueError, match="budget_kl must be > 0, got 0"):
        al.allocate(kl, sizes, candidates, 0.0)


def test_next_budget_stays_inside_the_bracket() -> None:
    def rnd(b: float, pct: float, ok: bool) -> al.SearchRound:
        v = al.Verification("x", 10.0, 10.0 * (1 + pct / 100), 0.0, 1.0, 5.0, 1, 3.0)
        return al.SearchRound(b, None, v, ok)  # type: ignore[arg-type]

    rounds = [rnd(0.01, 0.5, True), rnd(0.03, 2.0, False)]
    nxt = al.next_budget(rounds, 0.9, "delta_pct")
    assert 0.01 < nxt < 0.03
    # interpolated in log space between the two sides: 0.9 lies 4/15 of the way from 0.5 to 2.0
    assert nxt == pytest.approx(0.01 * 3 ** (4 / 15))


def test_next_budget_does_not_stick_to_one_end_of_the_bracket() -> None:
    def rnd(b: float, pct: float, ok: bool, keep: float = 1.0) -> al.SearchRound:
        v = al.Verification("x", 10.0, 10.0 * (1 + pct / 100), 0.0, 1.0, 5.0, 1, 3.0)
        return al.SearchRound(b, None, v, ok, keep)  # type: ignore[arg-type]

    # the measured run of this shape: 0.39% inside, 1.75% over; a secant step from the inside round
    # alone would land at 97% of the way to the over round
    rounds = [rnd(0.00896, 0.26, True), rnd(0.02756, 2.11, False), rnd(0.01282, 0.39, True), rnd(0.02693, 1.75, False)]
    nxt = al.next_budget(rounds, 0.9, "delta_pct")
    lo, hi = math.log(0.01282), math.log(0.02693)
    assert lo + 0.2 * (hi - lo) <= math.log(nxt) <= lo + 0.8 * (hi - lo)
    # a round of another keep ratio does not count toward this one's bracket
    nxt_other = al.next_budget(rounds + [rnd(0.004, 1.1, False, 0.8)], 0.9, "delta_pct")
    assert nxt_other == pytest.approx(0.004 * (0.9 / 1.1) ** 0.9)


# -----------------------------------------------------------------------------
# presets through the binary


def test_assignment_preset_is_read_by_the_binary_tensor_by_tensor(kv_compress_bin: str, tmp_path: Path) -> None:
    from validation.kv_cache_utils import save_kv_cache
    from validation.compat import layers_to_cache

    n = 4
    candidates = {r: default_space(r, 64) for r in ROLES}
    rng = np.random.default_rng(1)
    choice = {r: rng.integers(0, len(candidates[r]), size=n).tolist() for r in ROLES}
    a = Assignment(candidates, choice)
    preset = write_preset(assignment_preset(a, "t", "test"), str(tmp_path / "p.json"))
    torch.manual_seed(0)
    layers = [(torch.randn(1, 2, 40, 64), torch.randn(1, 2, 40, 64)) for _ in range(n)]
    src, out = tmp_path / "c.safetensors", tmp_path / "c.kvc"
    save_kv_cache(layers_to_cache(layers), str(src))
    run = subprocess.run([kv_compress_bin, "compress", "-i", str(src), "-o", str(out), "--preset", preset],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["preset"] == "t"
    info = json.loads(subprocess.run([kv_compress_bin, "inspect", "-i", str(out)], capture_output=True, text=True,
                                     check=True).stdout)
    modes = {t["name"]: t.get("mode") for t in info["tensors"]}
    for role, kind in (("keys", "key"), ("values", "value")):
        for i in range(n):
            assert modes[f"layer_{i}_{kind}"] == f"int{a.plan(role, i).bits}"


@pytest.mark.parametrize("keys_steps, values_steps", [(7, 4), (5, 3), (10, 5), (0, 0)],
                         ids=["compact", "fewest", "most", "no-steps"])
def test_steps_candidates_reconstruct_as_the_torch_reference(keys_steps: int, values_steps: int,
                                                              kv_compress_bin: str, tmp_path: Path) -> None:
    """A per-layer assignment mixing candidates with and without steps: the binary's reconstruction of
    every tensor equals the torch reference run with that tensor's Candidate.tensor_plan, bit for bit
    (what the sensitivity stage relies on)."""
    from validation import compression_bridge as cb
    from validation.compat import cache_to_layers, layers_to_cache
    from validation.reference_codec import encode_reference

    n = 3
    candidates = {"keys": [Candidate("keys", "asym", 4, 128, "none", "channel", keys_steps),
                           Candidate("keys", "asym", 3, 128, "none", "channel")],
                  "values": [Candidate("values", "sym", 4, 64, "hadamard", "token", values_steps),
                             Candidate("values", "asym", 2, 64, "hadamard", "token")]}
    a = Assignment(candidates, {"keys": [0, 1, 0], "values": [0, 0, 1]})
    preset = write_preset(assignment_preset(a, "t", "test", sink=1), str(tmp_path / "p.json"))
    g = torch.Generator().manual_seed(keys_steps + 10 * values_steps)
    layers = []
    for _ in range(n):
        k = torch.randn(1, 2, 300, 64, generator=g)
        k[..., :2] *= 10
        layers.append((k.to(torch.float16), torch.randn(1, 2, 300, 64, generator=g).to(torch.float16)))
    rebuilt, _ = cb.roundtrip_kv_cache(layers_to_cache(layers), str(tmp_path), preset=preset)
    for i, (k2, v2) in enumerate(cache_to_layers(rebuilt)):
        for role, x, y in (("keys", layers[i][0], k2), ("values", layers[i][1], v2)):
            plan, group = a.plan(role, i).tensor_plan(1, x.shape[-2])
            ref = encode_reference(x, group, plan=plan).reconstruction
            assert torch.equal(y.view(torch.int16), ref.view(torch.int16)), f"layer {i} {role} {a.plan(role, i).name}"


# -----------------------------------------------------------------------------
# partial passes


def test_sensitivity_runs_each_reconstruction_once(tiny_llama) -> None:
    """asym 3-bit codes and asym 4-bit codes with 7 steps restore the same tensor (as do sym 3-bit and
    sym 4-bit with 3 steps): the stage runs one pass per layer for each pair and gives both the same ΔKL."""
    from validation.autotune.sensitivity import measure_sensitivity
    from validation.compat import cache_to_layers, output_cache

    torch.manual_seed(0)
    ids = torch.randint(2, 500, (2, 40))
    with torch.inference_mode():
        layers = cache_to_layers(output_cache(tiny_llama(input_ids=ids[:, :32], use_cache=True)))
    cands = {"keys": [Candidate("keys", "asym", 3, 128, "none", "channel"), Candidate("keys", "asym", 4, 128, "none", "channel", 7),
                      Candidate("keys", "asym", 4, 128, "none", "channel", 5)],
             "values": [Candidate("values", "sym", 3, 64, "hadamard", "token"),
                        Candidate("values", "sym", 4, 64, "hadamard", "token", 3)]}
    assert cands["keys"][0].signature == cands["keys"][1].signature != cands["keys"][2].signature
    assert cands["values"][0].signature == cands["values"][1].signature
    s = measure_sensitivity(tiny_llama, layers, ids[:, 32:], cands)
    n = len(layers)
    assert s.passes == 3 * n  # keys: two reconstructions; values: one
    assert s.kl["keys"][0] == s.kl["keys"][1] and s.kl["values"][0] == s.kl["values"][1]
    assert s.kl["keys"][2] != s.kl["keys"][1] and all(all(row) for r in ROLES for row in s.measured[r])


def test_a_selected_set_borrows_the_baseline_of_the_full_set(tiny_llama) -> None:
    """The baseline pass attends to the whole context with or without selection, so a selected set built
    on the same windows shares the full set's baseline logits instead of computing (and holding) them twice."""
    from validation.selection import SelectionSpec

    torch.manual_seed(0)
    ids = torch.randint(2, 500, (200,))
    starts = [0, 40, 80]
    full = al.CalibrationSet.build(tiny_llama, ids, starts, 64, 16, 2)
    spec = SelectionSpec("knorm", keep_ratio=0.5)
    shared = al.CalibrationSet.build(tiny_llama, ids, starts, 64, 16, 2, selection=spec, baseline=full)
    own = al.CalibrationSet.build(tiny_llama, ids, starts, 64, 16, 2, selection=spec)
    for f, s, o in zip(full.batches, shared.batches, own.batches):
        assert s["baseline_logits"] is f["baseline_logits"]
        assert torch.allclose(o["baseline_logits"], f["baseline_logits"], atol=1e-5)
        assert s["layers"][0][0].shape[-2] == 24 and torch.equal(s["layers"][0][0], o["layers"][0][0])
    assert shared.selection_only.kl == pytest.approx(own.selection_only.kl, rel=1e-4)
    with pytest.raises(ValueError, match="same windows"):
        al.CalibrationSet.build(tiny_llama, ids, starts[:2], 64, 16, 2, selection=spec, baseline=full)


def test_partial_forward_matches_the_full_pass(tiny_llama) -> None:
    from validation.compat import cache_to_layers, layers_to_cache, output_cache

    torch.manual_seed(0)
    ids = torch.randint(2, 500, (2, 40))
    with torch.inference_mode():
        layers = cache_to_layers(output_cache(tiny_llama(input_ids=ids[:, :32], use_cache=True)))
        cache = layers_to_cache(layers)
        pf = PartialForward(tiny_llama, cache, ids[:, 32:], 32)
        base = pf.record()
        assert pf.ok and pf.check_error <= 1e-5
        k = layers[5][0]
        set_cache_tensor(cache, 5, "keys", k + 0.5 * torch.randn_like(k))
        part = pf.run(5)
        full = layers_to_cache([(k + 0 if i != 5 else cache_to_layers(cache)[5][0], v) for i, (k, v) in enumerate(layers)])
        from validation.compat import forward

        ref = forward(tiny_llama, full, input_ids=ids[:, 32:], use_cache=True).logits
        assert torch.allclose(part, ref, atol=1e-4)
        assert kl_mean(torch.log_softmax(base.float(), -1), part) > 0
        assert all(t.shape[-2] == 32 for kv in cache_to_layers(cache) for t in kv)


# -----------------------------------------------------------------------------
# end to end


def test_autotune_end_to_end_through_the_binary(kv_compress_bin: str, small_model_dir: Path, long_corpus: Path,
                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "tuned.json"
    space = tmp_path / "space.json"  # a few candidates per role keep the run short; the compact's steps among them
    space.write_text(json.dumps({r: [c.plan for c in default_space(r, 64, bits=(3, 4))
                                     if c.group_size != 256 and c.steps in (0, 7 if r == "keys" else 4)]
                                 for r in ROLES}))
    code = cli.main(["--model", str(small_model_dir), "--text-file", str(long_corpus), "--max-length", "64",
                     "--stride", "16", "--eval-windows", "3", "--calibration-windows", "3", "--sensitivity-tokens", "8",
                     "--batch-windows", "2", "--space-file", str(space), "--rounds", "2", "--budget-kl", "0.02",
                     "--compare", "default", "--output", str(out), "--quiet"])
    summary = capsys.readouterr().out.strip().splitlines()
    assert code in (0, 1) and len(summary) == 1 and "autotuned:" in summary[0]
    doc = json.loads((tmp_path / "autotune.json").read_text())
    preset = json.loads(out.read_text())
    assert preset == doc["preset"] and preset["base"] == "default"
    # calibration and evaluation share no token
    span_end = doc["windows"]["evaluation_span"][1]
    assert doc["windows"]["disjoint"] and all(s >= span_end for s in doc["windows"]["calibration_starts"])
    # the budget holds on calibration whenever the run says so, and the chosen round is the one reported
    assert doc["budget"]["met_on_calibration"] == (code == 0)
    if code == 0:
        assert doc["calibration"]["kl"] <= 0.02 * doc["budget"]["margin"] + 1e-12
        assert doc["rounds"][doc["chosen_round"]]["within_budget"]
    assert set(doc["heldout"]) == {"autotuned", "default"}
    assert (tmp_path / "allocation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "held-out" in (tmp_path / "autotune.md").read_text()
    assert len(doc["tensors"]) == 2 * 4 and all(t["bytes"] > 0 for t in doc["tensors"])
    assert doc["candidates"] == {"keys": ["k3-asym-ch128", "k4-asym-ch128", "k4s7-asym-ch128"],
                                 "values": ["v3-sym-had-tok64", "v3-asym-had-tok64", "v4-sym-had-tok64", "v4s4-sym-had-tok64"]}
    # every plan in the written preset is one of the candidates, steps included
    cands = {r: [Candidate.from_plan(r, p) for p in json.loads(space.read_text())[r]] for r in ROLES}
    assert all(Candidate.from_plan(r, preset[r]) in cands[r] for r in ROLES)
    assert all(Candidate.from_plan(r, entry[r]) in cands[r] for entry in preset.get("layers", []) for r in ROLES if r in entry)
    # the preset runs through validate_perplexity.py, and its size matches the held-out measurement
    vdoc = _score_preset(small_model_dir, long_corpus, tmp_path, out, 3)
    assert vdoc["result"]["compressed_perplexity"] == pytest.approx(doc["heldout"]["autotuned"]["compressed_ppl"], rel=1e-4)
    assert vdoc["codec"]["disk_ratio_vs_fp16"] == pytest.approx(doc["heldout"]["autotuned"]["disk_ratio_vs_fp16"], rel=1e-6)


def _score_preset(model_dir: Path, corpus: Path, tmp_path: Path, preset: Path, windows: int, *extra: str) -> dict:
    """validate_perplexity.py's JSON report for ``preset`` on the first ``windows`` windows (the tuner's held-out ones)."""
    from validation import validate_perplexity as vp

    report = tmp_path / "vp.json"
    rc = vp.main(["--model", str(model_dir), "--text-file", str(corpus), "--cpu", "--max-length", "64",
                  "--stride", "16", "--max-samples", str(windows), "--batch-windows", "2", "--threshold", "1e9", "--quiet",
                  "--preset", str(preset), *extra, "--output-json", str(report)])
    assert rc == 0
    return json.loads(report.read_text())


def _tune_one_plan(model_dir: Path, corpus: Path, tmp_path: Path, out: Path, *extra: str) -> int:
    """One round of the tuner with attention selection, one key and one value plan, and a budget every plan meets."""
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"keys": [Candidate("keys", "asym", 4, 128, "none", "channel", 7).plan],
                                 "values": [Candidate("values", "sym", 4, 64, "hadamard", "token", 4).plan]}))
    return cli.main(["--model", str(model_dir), "--text-file", str(corpus), "--max-length", "64",
                     "--stride", "16", "--eval-windows", "2", "--calibration-windows", "2", "--sensitivity-tokens", "4",
                     "--batch-windows", "2", "--space-file", str(space), "--rounds", "1", "--budget-kl", "50",
                     "--selection", "attention", *extra, "--output", str(out), "--quiet"])


def test_autotune_with_token_selection_matches_validate_perplexity(kv_compress_bin: str, small_model_dir: Path,
                                                                   long_corpus: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Keep ratios join the search: with a budget every plan meets, the smallest plan on disk wins, which is the
    one with the fewest positions kept; its held-out score is what validate_perplexity.py gives with the same
    preset and selection flags."""
    from validation import validate_perplexity as vp

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "tuned.json"
    code = _tune_one_plan(small_model_dir, long_corpus, tmp_path, out, "--keep-ratios", "1,0.5", "--keep-rounds")
    summary = capsys.readouterr().out.strip()
    assert code == 0 and "token selection attention at keep ratio 0.5" in summary
    doc = json.loads((tmp_path / "autotune.json").read_text())
    sel = doc["selection"]
    assert sel["method"] == "attention" and sel["keep_ratios"] == [1.0, 0.5] and sel["chosen_keep_ratio"] == 0.5
    assert sel["validate_perplexity_flags"] == "--selection attention --keep-ratio 0.5"
    assert set(sel["selection_only_on_calibration"]) == {"0.5"}
    assert sel["selection_only_on_calibration"]["0.5"]["kl"] > 0
    keeps = [r["keep_ratio"] for r in doc["rounds"]]
    assert keeps == [1.0, 0.5]
    full, half = doc["rounds"]
    # --keep-rounds: each round's preset stays, and the chosen one is the preset written
    assert [Path(r["preset_file"]).name for r in doc["rounds"]] == ["tuned.json.round0.json", "tuned.json.keep0.5-round0.json"]
    assert json.loads(Path(half["preset_file"]).read_text())["keys"] == json.loads(out.read_text())["keys"]
    # the same codec on half the positions: a smaller container (index bitmaps and header included), a larger ratio
    assert half["compressed_bytes"] < full["compressed_bytes"] and half["disk_ratio_vs_fp16"] > full["disk_ratio_vs_fp16"]
    assert doc["calibration"]["disk_ratio_vs_fp16"] == half["disk_ratio_vs_fp16"]
    md = (tmp_path / "autotune.md").read_text()
    assert "--selection attention --keep-ratio 0.5" in md and "nan" not in md.lower()
    assert "| selection only, keep 0.5 (no codec), calibration | 2 | – | – |" in md
    report = tmp_path / "vp.json"
    rc = vp.main(["--model", str(small_model_dir), "--text-file", str(long_corpus), "--cpu", "--max-length", "64",
                  "--stride", "16", "--max-samples", "2", "--batch-windows", "2", "--threshold", "1e9", "--quiet",
                  "--preset", str(out), "--selection", "attention", "--keep-ratio", "0.5", "--output-json", str(report)])
    assert rc == 0
    vdoc = json.loads(report.read_text())
    held = doc["heldout"]["autotuned"]
    assert vdoc["result"]["compressed_perplexity"] == pytest.approx(held["compressed_ppl"], rel=1e-4)
    assert vdoc["result"]["baseline_perplexity"] == pytest.approx(held["baseline_ppl"], rel=1e-6)
    assert vdoc["codec"]["disk_ratio_vs_fp16"] == pytest.approx(held["disk_ratio_vs_fp16"], rel=1e-6)


def test_autotune_keep_per_layer_end_to_end(kv_compress_bin: str, small_model_dir: Path, long_corpus: Path,
                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """--keep-per-layer writes a preset whose selection section lists one ratio per layer; kv-compress
    accepts it, and validate_perplexity.py --preset alone (no selection flags) reproduces the held-out score."""
    from validation.compat import layers_to_cache

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "tuned.json"
    code = _tune_one_plan(small_model_dir, long_corpus, tmp_path, out, "--keep-per-layer", "--keep-ratios", "1,0.5")
    summary = capsys.readouterr().out.strip()
    assert code == 0 and "keeping 0.500 on average, per layer" in summary, summary
    preset = json.loads(out.read_text())
    # a budget every plan meets: every layer keeps the smallest ratio offered
    assert preset["selection"] == {"method": "attention", "keep_ratios": [0.5, 0.5, 0.5, 0.5]}
    doc = json.loads((tmp_path / "autotune.json").read_text())
    held = doc["heldout"]["autotuned"]
    vdoc = _score_preset(small_model_dir, long_corpus, tmp_path, out, 2)
    assert vdoc["result"]["compressed_perplexity"] == pytest.approx(held["compressed_ppl"], rel=1e-4)
    assert vdoc["codec"]["disk_ratio_vs_fp16"] == pytest.approx(held["disk_ratio_vs_fp16"], rel=1e-6)
    assert vdoc["selection"]["per_layer_tokens"] == [24, 24, 24, 24]
    # kv-compress takes the same preset for a cache without positions (the codec only) and says so
    from validation.kv_cache_utils import save_kv_cache

    cache = tmp_path / "c.safetensors"
    save_kv_cache(layers_to_cache([(torch.randn(1, 2, 32, 64), torch.randn(1, 2, 32, 64)) for _ in range(4)]), str(cache))
    m = json.loads(subprocess.run([kv_compress_bin, "metrics", "-i", str(cache), "--preset", str(out)],
                                  capture_output=True, text=True, check=True).stdout)
    assert m["preset_selection"]["keep_ratios"] == [0.5] * 4 and m["input_selected"] is False


def test_preset_selection_errors_exit_2_naming_the_file(small_model_dir: Path, long_corpus: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """A preset whose selection section is malformed, or lists ratios for another number of layers, stops
    validate_perplexity.py with exit 2 and one line naming the preset file; no report is written."""
    from validation import validate_perplexity as vp

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = [({"method": "attention", "keep_ratios": [1.5]}, r"selection: layer_keep_ratios must be .* got \[1.5\]"),
             ({"method": "attention", "keep_ratios": [0.5, 0.5]}, r"selection.keep_ratios lists 2 ratios, but .* has 4 layers")]
    for section, message in cases:
        preset = tmp_path / "p.json"
        preset.write_text(json.dumps({"name": "p", "selection": section}))
        report = tmp_path / "vp.json"
        rc = vp.main(["--model", str(small_model_dir), "--text-file", str(long_corpus), "--cpu", "--max-length", "64",
                      "--stride", "16", "--max-samples", "2", "--quiet", "--preset", str(preset), "--output-json", str(report)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and str(preset) in err[0], err
        assert __import__("re").search(message, err[0]), err[0]
        assert not report.exists()

