"""`course-transformer analyze sinks`: the report's numbers equal the statistics of the full weight matrices (ours
under eager and sdpa, a Hugging Face GPT-2 under eager), the files appear, and bad input is refused with a reason."""

from __future__ import annotations

import json

import pytest
import torch

from course_transformer.commands import analyze, analyze_streaming
from evaluation.streaming_stats import stats_from_weights
from tests.conftest import VOCAB, WORDS, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
TOKENS = 30


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(" ".join(WORDS * 3))  # 90 words, each one token of the word-level tokenizer
    return path


@pytest.fixture(scope="module")
def ours_folder(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("ours")
    tiny_model(position_encoding="rope").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _report(folder, text_file, out, *extra: str) -> dict:
    argv = ["--model", str(folder), "--text-file", str(text_file), "--tokens", str(TOKENS), "--block-size", "7"]
    assert analyze.main(["sinks", *argv, "--out", str(out), *extra]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["sink_mass.png", "sinks.json", "sinks.md"]
    assert (out / "sink_mass.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads((out / "sinks.json").read_text())


def _reference(model, tokenizer, text_file) -> list[dict]:
    """The statistics of each layer's full weights, from the model's own output_attentions (eager)."""
    ids = tokenizer(text_file.read_text())["input_ids"][:TOKENS]
    with torch.no_grad():
        weights = model(input_ids=torch.tensor([ids]), output_attentions=True).attentions
    return [stats_from_weights(w) for w in weights]


def _assert_matches(report: dict, reference: list[dict]) -> None:
    # fp32 sums of ~30 products of O(1) values: a few ulps; 1e-5 leaves room and still catches any masking slip.
    per_layer = report["stats"]["per_layer"]
    assert len(per_layer["first_token_mass"]) == len(reference)
    for layer, ref in enumerate(reference):
        for name in ("first_token_mass", "entropy", "distance"):
            assert per_layer[name][layer] == pytest.approx(ref[name].mean().item(), abs=1e-5), (name, layer)
        first_four = ref["received"][0, :, :4].sum(-1) / TOKENS  # (H,)
        assert report["first_k_mass"]["per_layer"][layer] == pytest.approx(first_four.mean().item(), abs=1e-5)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_ours_report_equals_full_weights(backend, ours_folder, text_file, tokenizer, tmp_path):
    report = _report(ours_folder, text_file, tmp_path / "out", "--attn-implementation", backend)
    assert report["backend"] == backend and report["tokens"] == TOKENS and report["first_k"] == 4
    harmonic = sum(1 / i for i in range(1, TOKENS + 1))
    assert report["uniform_causal"]["first_token_mass"] == pytest.approx(harmonic / TOKENS, rel=1e-12)
    model = tiny_model(position_encoding="rope")
    _assert_matches(report, _reference(model, tokenizer, text_file))
    memory = report["memory"]
    assert memory["full_weights_bytes"] == 2 * 4 * TOKENS * TOKENS * 4  # L x H x T x T fp32
    assert memory["forward_peak_added_bytes"] is None or memory["forward_peak_added_bytes"] >= 0
    markdown = (tmp_path / "out" / "sinks.md").read_text()
    assert "Xiao" in markdown and "| 2 |" in markdown


def test_hugging_face_gpt2_under_eager(gpt2_folder, text_file, tokenizer, tmp_path):
    from transformers import GPT2LMHeadModel

    report = _report(gpt2_folder, text_file, tmp_path / "out")
    assert report["backend"] == "eager"
    model = GPT2LMHeadModel.from_pretrained(gpt2_folder, attn_implementation="eager").eval()
    _assert_matches(report, _reference(model, tokenizer, text_file))


def test_bad_input_is_refused_with_a_reason(ours_folder, gpt2_folder, text_file, tmp_path, capsys):
    base = ["sinks", "--model", str(ours_folder), "--text-file", str(text_file), "--out", str(tmp_path / "x")]
    assert analyze.main([*base, "--tokens", "500"]) == 2
    assert "--tokens=500: the text has only" in capsys.readouterr().err
    assert analyze.main([*base, "--block-size", "0"]) == 2
    assert "--block-size=0" in capsys.readouterr().err
    gpt2 = ["sinks", "--model", str(gpt2_folder), "--text-file", str(text_file), "--out", str(tmp_path / "y")]
    assert analyze.main([*gpt2, "--tokens", "80"]) == 2  # learned positions: 64
    assert "at most 64 tokens" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert "sinks" in analyze.SUBCOMMANDS and analyze_streaming.SINK_TOKENS == 4
