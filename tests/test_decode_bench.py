"""`course-transformer benchmark --mode decode`: the report's structure, its token check and its limit arithmetic,
on tiny shapes without compile (the real run takes ~10 minutes; its numbers are in docs/benchmarks.md)."""

from __future__ import annotations

import json

import pytest

from course_transformer.commands.benchmark import main
from evaluation.decode_bench import bytes_per_step, ours_from, reference_model


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("decode")
    assert main(["--mode", "decode-tiny", "--output", str(out), "--threads", "1"]) == 0
    return json.loads((out / "bench.json").read_text()), out


def test_every_variant_ran_and_matched_hf_tokens(report):
    data, out = report
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md", "decode.png"]
    assert [f["family"] for f in data["families"]] == ["decoder", "encoder-decoder"]
    for family in data["families"]:
        assert [b["batch"] for b in family["batches"]] == [1, 2]
        for batch in family["batches"]:
            assert set(batch["variants"]) == {"hf", "ours", "ours_fast", "ours_transposed"}  # no compile here
            assert set(batch["prefill"]) == set(batch["variants"]) and batch["prefill"]["hf"]["vs_hf"] == 1.0
            for row in batch["variants"].values():
                assert row["tokens_equal_hf"] is True
                assert len(row["seconds"]["samples"]) == data["settings"]["repeats"]
    assert "| decoder | 1 | ours, enable_fast_decoding() |" in (out / "bench.md").read_text()


def test_limit_and_shares_follow_from_the_measured_bandwidth(report):
    data, _ = report
    bandwidth = data["read_bandwidth_bytes_per_s"]
    assert bandwidth > 1e8  # any machine streams more than 100 MB/s
    for family in data["families"]:
        for batch in family["batches"]:
            limit = bandwidth / family["bytes_per_step"] * batch["batch"]
            assert batch["limit_tokens_per_s"] == pytest.approx(limit, rel=1e-12)
            hf = batch["variants"]["hf"]["tokens_per_s"]["median"]
            for row in batch["variants"].values():
                rate = row["tokens_per_s"]["median"]
                assert row["share_of_limit"] == pytest.approx(rate / limit, rel=1e-12)
                assert row["vs_hf_default"] == pytest.approx(rate / hf, rel=1e-12)
    assert all(row["F.linear"] > 0 and row["oneDNN packed"] > 0 for row in data["gemv"])


@pytest.mark.parametrize("family", ["decoder", "encoder-decoder"])
def test_bytes_per_step_counts_what_one_step_reads(family):
    """Counted independently on HF's modules: GPT-2's Conv1D layers and LM head; BART's decoder layers without the
    cross-attention keys and values (projected once from the encoder output), and its LM head."""
    reference = reference_model(family, tiny=True, seed=0)
    if family == "decoder":
        layers = [m for name, m in reference.transformer.h.named_modules() if type(m).__name__ == "Conv1D"]
        expected = sum(p.nbytes for m in layers for p in m.parameters()) + reference.lm_head.weight.nbytes
    else:
        expected = reference.lm_head.weight.nbytes
        for layer in reference.model.decoder.layers:
            for name, module in layer.named_modules():
                if type(module).__name__ == "Linear" and name not in ("encoder_attn.k_proj", "encoder_attn.v_proj"):
                    expected += sum(p.nbytes for p in module.parameters())
    assert bytes_per_step(ours_from(reference)) == expected


def test_encoder_family_is_refused(tmp_path, capsys):
    assert main(["--mode", "decode-tiny", "--output", str(tmp_path / "x"), "--families", "encoder"]) == 2
    assert "'encoder' does not decode; allowed: decoder, encoder-decoder" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
