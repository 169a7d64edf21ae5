"""Smoke test of the benchmark harness: a tiny run, then the report's structure. Timings are never asserted."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the editable install may predate the `evaluation` package
    sys.path.insert(0, str(ROOT))

from evaluation.benchmark import BenchSettings, compare, run_benchmark  # noqa: E402


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    output = tmp_path_factory.mktemp("bench")
    settings = BenchSettings.preset(
        "tiny",
        families=("decoder", "encoder", "encoder-decoder"),
        gen_families=("decoder",),
        gen_batches=(1, 2),
        repeats=2,
        train_repeats=1,
        gen_repeats=1,
        scaling_seq_lens=(16, 32),
    )
    report = run_benchmark(settings, output)
    return report, output


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15)


def test_files_exist_and_json_matches(tiny_report):
    report, output = tiny_report
    for name in ("bench.json", "bench.md", "ratios.png", "scaling_time.png", "scaling_memory.png"):
        path = output / name
        assert path.is_file() and path.stat().st_size > 0, name
        assert name in report["files"]
    for png in output.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(output.glob(".*.tmp")), "temporary files left behind"
    on_disk = json.loads((output / "bench.json").read_text())
    assert on_disk["schema_version"] == report["schema_version"] == 1
    assert len(on_disk["comparisons"]) == len(report["comparisons"])


def test_environment_recorded(tiny_report):
    env = tiny_report[0]["environment"]
    for key in ("date_utc", "torch", "transformers", "cpu_model", "torch_num_threads", "commit", "python", "device"):
        assert env[key] not in (None, ""), key
    assert env["torch_num_threads"] == tiny_report[0]["settings"]["threads"]


def test_comparisons_structure_and_ratios(tiny_report):
    report = tiny_report[0]
    rows = report["comparisons"]
    seen = {(r["metric"], r["family"], r["backend"]) for r in rows}
    for family in ("decoder", "encoder", "encoder-decoder"):
        for backend in ("eager", "sdpa"):
            assert ("forward_latency_s", family, backend) in seen
            assert ("train_step_s", family, backend) in seen
            assert ("train_tokens_per_s", family, backend) in seen
    assert {r["name"] for r in rows if r["metric"] == "generate_tokens_per_s"} == {"generate b1", "generate b2"}
    for row in rows:
        ours, ref, ratio = row["ours"], row["ref"], row["ratio"]
        for stats in (ours, ref, ratio):
            assert stats["min"] <= stats["median"] <= stats["max"]
            assert _close(stats["median"], statistics.median(stats["samples"]))
        assert len(ours["samples"]) == len(ref["samples"]) == len(ratio["samples"])
        # ratio = ours / ref, pair by pair, and the ratio of the stored medians
        for a, b, q in zip(ours["samples"], ref["samples"], ratio["samples"], strict=True):
            assert _close(q, a / b)
        assert _close(ratio["ratio_of_medians"], ours["median"] / ref["median"])
        if row["metric"] in report["targets"]:
            target = row["target"]
            assert target["op"] == report["targets"][row["metric"]]["op"]
            assert target["met"] == (
                ratio["median"] <= target["value"] if target["op"] == "<=" else ratio["median"] >= target["value"]
            )


def test_attention_cost_memory_scaling(tiny_report):
    report = tiny_report[0]
    variants = {row["variant"]: row for row in report["attention_cost"]}
    assert set(variants) == {"all_layers", "one_layer"}
    assert variants["one_layer"]["target"]["value"] == report["targets"]["attention_output_one_layer"]["value"]
    for row in variants.values():
        for q, a, b in zip(
            row["ratio"]["samples"], row["seconds"]["samples"], row["fast_seconds"]["samples"], strict=True
        ):
            assert _close(q, a / b)
    assert {(r["backend"], r["seq_len"]) for r in report["scaling"]} == {
        ("eager", 16),
        ("eager", 32),
        ("sdpa", 16),
        ("sdpa", 32),
    }
    assert report["memory"] and all(r["ours_bytes"] >= 0 and r["ref_bytes"] >= 0 for r in report["memory"])
    summary = report["summary"]
    assert summary["met"] + summary["missed"] == summary["with_target"] > 0


def test_markdown_states_targets_and_rows(tiny_report):
    report, output = tiny_report
    text = (output / "bench.md").read_text()
    assert "**Targets:**" in text and "<= 1.00" in text and ">= 1.00" in text
    table_rows = [line for line in text.splitlines() if line.startswith("| forward (")]
    assert len(table_rows) == sum(r["metric"] == "forward_latency_s" for r in report["comparisons"])
    assert all(("met by" in line) or ("missed by" in line) for line in table_rows)


def test_gpu_parts_skip_cleanly_without_cuda(tiny_report):
    import torch

    report = tiny_report[0]
    if torch.cuda.is_available():
        pytest.skip("CUDA present: GPU extras run in full/quick modes")
    assert report["gpu"] == []
    reasons = " ".join(item["what"] for item in report["skipped"])
    assert "flash_attention_2" in reasons and "gpu extras" in reasons


def test_compare_throughput():
    row = compare("x", "generate_tokens_per_s", "decoder", "sdpa", {}, [2.0, 4.0], [1.0, 2.0], work=8.0)
    assert row["ours"]["samples"] == [4.0, 2.0] and row["ref"]["samples"] == [8.0, 4.0]
    assert row["ratio"]["median"] == 0.5 and row["target"]["met"] is False
    assert math.isclose(row["target"]["margin"], -0.5)


def test_cli_help():
    result = subprocess.run(
        [sys.executable, "-m", "course_transformer.commands.benchmark", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "--mode" in result.stdout
