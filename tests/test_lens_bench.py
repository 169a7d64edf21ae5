"""`course-transformer benchmark --mode lens-tiny`: the report's structure, ratios recomputed from the samples, the
output check catching a real difference, and the memory arithmetic (fits, longest T, the T·b check). No timing
assertions: the numbers of a tiny model on a shared machine mean nothing; the real run is `--mode lens`."""

from __future__ import annotations

import json
import math
import os
import statistics

import pytest

from course_transformer.commands.benchmark import main
from evaluation.lens_bench import (
    GOALS,
    NOTHING,
    SDPA,
    LensSettings,
    Runner,
    Variant,
    block_memory_check,
    fit_growth,
    load_model,
    round_robin,
    solve_length,
    token_ids,
)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One tiny run without --output, from a scratch folder: it lands in outputs/lens-bench there."""
    folder = tmp_path_factory.mktemp("lens")
    previous = os.getcwd()
    os.chdir(folder)
    try:
        assert main(["--mode", "lens-tiny", "--threads", "1"]) == 0
    finally:
        os.chdir(previous)
    out = folder / "outputs" / "lens-bench"
    return json.loads((out / "bench.json").read_text()), out


def _timed_cases(data):
    cases = data["cases"]
    return [cases["overhead"], *cases["all_weights"]["rows"], cases["statistics"], cases["per_head"]]


def test_files_and_structure(report):
    data, out = report
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md", "lens.png"] == sorted(data["files"])
    assert data["mode"] == "lens-tiny" and data["model"]["layers"] == 4 and data["model"]["heads"] == 4
    settings = data["settings"]
    assert set(data["cases"]) == {"overhead", "all_weights", "statistics", "per_head"}  # no --long
    overhead = data["cases"]["overhead"]
    assert list(overhead["seconds"]) == ["sdpa", "lens_nothing_asked", "lens_one_layer_weights"]
    assert all(len(s["samples"]) == settings["repeats"] for s in overhead["seconds"].values())
    rows = data["cases"]["all_weights"]["rows"]
    assert [row["seq_len"] for row in rows] == settings["weights_lengths"]
    for row in rows:
        assert {m["variant"] for m in row["memory"]} == {"sdpa", "lens_all_weights", "eager_all_weights"}
        assert all(m["tensor_peak_bytes"] > 0 for m in row["memory"])
    stats = data["cases"]["statistics"]
    assert stats["seq_len"] == settings["stats_length"] and stats["block_size"] == settings["stats_block"]
    points = {(p["seq_len"], p["block_size"]) for p in stats["memory_check"]["points"]}
    lengths = (settings["stats_length"] // 2, settings["stats_length"])
    assert points == {(t, b) for t in lengths for b in settings["stats_blocks"]}
    assert set(data["cases"]["per_head"]["seconds"]) == {
        "sdpa_call", "lens_call_nothing_asked", "lens_call_weights", "lens_call_statistics", "repeat_kv",
        "causal_mask", "kernel_with_lse", "weights_all_heads", "weights_one_head",
    }  # fmt: skip
    markdown = (out / "bench.md").read_text()
    assert "## Goals" in markdown and "extrapolated" in markdown
    assert len(data["verdicts"]) == 5  # output identity, three time ratios, the T·b memory check
    for verdict in data["verdicts"]:
        word = "met" if verdict["met"] else "**MISS**"
        assert f"| {verdict['what']} |" in markdown and word in markdown


def test_ratios_are_computed_from_the_samples(report):
    data, _ = report
    for case in _timed_cases(data):
        reference = case["seconds"][case["reference"]]["samples"]
        for name, row in case["ratios"].items():
            samples = case["seconds"][name]["samples"]
            pairs = [a / b for a, b in zip(samples, reference, strict=True)]
            assert row["samples"] == pytest.approx(pairs, rel=1e-12)
            assert row["median"] == pytest.approx(statistics.median(pairs), rel=1e-12)
            assert (row["min"], row["max"]) == pytest.approx((min(pairs), max(pairs)), rel=1e-12)
            medians = statistics.median(samples) / statistics.median(reference)
            assert row["ratio_of_medians"] == pytest.approx(medians, rel=1e-12)
            if "goal" in row:
                assert row["goal"]["met"] == (row["median"] <= row["goal"]["value"])
    ratios = data["cases"]["overhead"]["ratios"]
    assert ratios["lens_nothing_asked"]["goal"]["value"] == GOALS["nothing_asked"]
    assert ratios["lens_one_layer_weights"]["goal"]["value"] == GOALS["one_layer_weights"]
    for row in data["cases"]["all_weights"]["rows"]:
        lens, eager = (row["seconds"][n]["samples"] for n in ("lens_all_weights", "eager_all_weights"))
        expected = statistics.median(a / b for a, b in zip(lens, eager, strict=True))
        assert row["lens_vs_eager"]["median"] == pytest.approx(expected, rel=1e-12)
    by_what = {v["what"]: v for v in data["verdicts"]}
    stats = data["cases"]["statistics"]
    verdict = by_what[f"lens_statistics_b{stats['block_size']}: time / sdpa, T={stats['seq_len']}"]
    assert verdict["measured"] == stats["ratios"][f"lens_statistics_b{stats['block_size']}"]["median"]


def test_output_check_is_real(report):
    """The report's 0.0 comes from the timed calls' outputs; the same comparison sees a one-head ablation."""
    data, _ = report
    assert data["cases"]["overhead"]["output_max_abs_diff"]["lens_nothing_asked"] == 0.0
    assert data["verdicts"][0]["measured"] == 0.0 and data["verdicts"][0]["met"] is True
    assert data["cases"]["all_weights"]["weights_max_abs_diff"] < 1e-5  # lens and eager weights agree
    settings = LensSettings.tiny()
    model, _ = load_model(settings)
    ablated = Variant("ablated", "lens", lens={"ablate": {1: [0]}})
    _, last = round_robin(Runner(model), token_ids(settings, model, 16), [SDPA, NOTHING, ablated], 0, 1)
    assert (last["lens_nothing_asked"] - last["sdpa"]).abs().max().item() == 0.0
    assert (last["ablated"] - last["sdpa"]).abs().max().item() > 1e-4
    assert model.config._attn_implementation == "sdpa"  # every variant restores the implementation


def test_growth_fit_and_longest_length():
    points = [(t, 3.0 * t * t + 5.0 * t + 7.0) for t in (100, 200, 400, 800)]
    fit = fit_growth(points)
    assert (fit["a"], fit["b"], fit["c"]) == pytest.approx((3.0, 5.0, 7.0), rel=1e-6, abs=1e-3)
    budget = 3.0 * 1000**2 + 5.0 * 1000 + 7.0
    assert solve_length(fit, budget) in (999, 1000)  # floor of the root, rounding either side of 1000
    assert fit_growth([(512, 4.0 * 512**2)])["a"] == pytest.approx(4.0)  # one point: a·T² alone
    assert solve_length({"a": 0.0, "b": 0.0, "c": 1.0}, 10.0) is None


def test_longest_length_in_the_report_follows_its_fit(report):
    data, _ = report
    fits = data["cases"]["all_weights"]["fits"]
    facts = data["model"]
    assert fits["weights_alone_bytes_per_t2"] == facts["layers"] * facts["heads"] * 4
    assert fits["weights_alone_longest_t"] == int(math.sqrt(fits["budget_bytes"] / fits["weights_alone_bytes_per_t2"]))
    assert "extrapolated" in fits["method"]
    for entry in fits["variants"].values():
        peak = entry["tensor_peak_bytes"]
        assert peak["longest_t"] == solve_length(peak["fit"], fits["budget_bytes"] - entry["rss_before_bytes"])


def test_block_memory_check_separates_blocks_from_a_t_squared_term():
    heads = 9

    def memory(k: float, m: float) -> list[dict]:
        rows = []
        for t in (2048, 4096):
            rows.append({"seq_len": t, "block_size": None, "tensor_peak_bytes": 1000 * t})
            for b in (256, 1024):
                extra = k * heads * b * t * 4 + m * t * t
                rows.append({"seq_len": t, "block_size": b, "tensor_peak_bytes": 1000 * t + extra})
        return rows

    blocks_only = block_memory_check(memory(k=3.0, m=0.0), heads, layers=30)
    assert blocks_only["live_blocks_k"] == pytest.approx(3.0, rel=1e-6)
    assert abs(blocks_only["bytes_per_t2_m"]) < 1e-3 and blocks_only["o_t_block_per_head"] is True
    with_mask = block_memory_check(memory(k=3.0, m=4.0), heads, layers=30)  # one fp32 T×S tensor per layer
    assert with_mask["bytes_per_t2_m"] == pytest.approx(4.0, rel=1e-6)
    assert with_mask["o_t_block_per_head"] is False


def test_other_modes_still_require_output(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--mode", "tiny"])
    assert exit_info.value.code == 2
    assert "--output" in capsys.readouterr().err
