"""scripts/plot_cross_attention.py on a tiny random encoder-decoder (2 + 2 layers, 4 heads, no training):
the maps are (target_len, source_len) softmax rows, row t is the step that predicts target token t (the
training convention), the figure has one panel per layer plus the best head, the alignment measure gives known
answers, and a decoder-only model is refused with the field and the allowed value."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tokenizer, tiny_model

from course_transformer.commands.training_lib import load_config, model_config
from scripts import plot_cross_attention as pca

SOURCE = "the cat sat on the mat ."
TARGET = "le chat est sur le tapis"


@pytest.fixture(scope="module")
def seq2seq():
    return tiny_model("encoder-decoder", decoder_start_token_id=1), build_tokenizer()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, seq2seq):
    model, tokenizer = seq2seq
    folder = tmp_path_factory.mktemp("tiny-enfr") / "final"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_reference_maps_are_target_by_source_distributions(seq2seq):
    model, tokenizer = seq2seq
    record = pca.cross_attention(model, tokenizer, SOURCE, TARGET)
    S, T = len(SOURCE.split()) + 1, len(TARGET.split()) + 1  # + </s> on both sides
    assert record.attention.shape == (2, 4, T, S)
    np.testing.assert_allclose(record.attention.sum(-1), 1.0, atol=1e-5)
    assert (record.attention >= 0).all()
    assert record.source_tokens == [*SOURCE.split(), "</s>"]
    assert record.target_tokens == [*TARGET.split(), "</s>"]  # row t is labelled with the token it predicts
    assert record.source_words.tolist() == [*range(len(SOURCE.split())), -1]


@torch.no_grad()
def test_rows_follow_the_training_shift(seq2seq):
    """The plotted maps are those of a training forward pass on (source, labels = target)."""
    model, tokenizer = seq2seq
    record = pca.cross_attention(model, tokenizer, SOURCE, TARGET)
    enc = tokenizer(SOURCE, return_tensors="pt")
    labels = tokenizer(TARGET, return_tensors="pt")["input_ids"]
    out = model(**enc, labels=labels, output_attentions=True)
    expected = torch.stack(out.cross_attentions, dim=1)[0].numpy()  # (L, H, T, S)
    np.testing.assert_allclose(record.attention, expected, atol=1e-6)


def test_greedy_maps_cover_the_generated_tokens(seq2seq):
    model, tokenizer = seq2seq
    record = pca.cross_attention(model, tokenizer, SOURCE, max_new_tokens=6)
    assert record.mode == "greedy"
    L, H, T, S = record.attention.shape
    assert L == 2 and H == 4 and len(SOURCE.split()) + 1 == S
    assert 1 <= T <= 6 and len(record.target_tokens) == T
    np.testing.assert_allclose(record.attention.sum(-1), 1.0, atol=1e-5)


def _record(source: str, target: str, attention: np.ndarray) -> pca.CrossAttention:
    return pca.CrossAttention(
        mode="reference",
        source=source,
        target=target,
        source_tokens=source.split() + ["</s>"],
        target_tokens=target.split() + ["</s>"],
        attention=attention,
        source_words=np.array([*range(len(source.split())), -1]),
        target_words=np.array([*range(len(target.split())), -1]),
    )


def test_alignment_measure_known_answer():
    source, target = "And God said", "Et Dieu dit"  # God -> Dieu: row 1, column 1
    attention = np.full((1, 2, 4, 4), 0.25)
    attention[0, 0, 1] = [0.0, 0.9, 0.1, 0.0]  # head 1: "Dieu" reads "God"
    attention[0, 1, 1] = [0.1, 0.3, 0.6, 0.0]  # head 2: "Dieu" reads "said" most
    record = _record(source, target, attention)
    assert pca.anchor_cells(record) == [("God", "Dieu", 1, [1])]
    scores = pca.alignment_scores([record])
    assert scores["pairs"] == 1
    assert scores["head_hit_rate"] == [[1.0, 0.0]]
    assert scores["best_head"] == {"layer": 1, "head": 1, "hit_rate": 1.0}
    assert scores["chance"] == 0.25  # one of four source tokens
    assert scores["diagonal"] == 1.0  # row 1 of 4 -> column 1 of 4
    assert scores["layer_mean_hit_rate"] == [1.0]  # mean of the two heads: 0.6 on "God", 0.35 on "said"
    assert scores["layer_mean_hit_rate_by_pair"] == {"God->Dieu": [1.0]}
    assert scores["layer_mean_hit_rate_spelled_differently"] == {"pairs": 1, "hit_rate": [1.0]}
    # An elided article is skipped: the row of "l'Éternel" is its "Éternel" token; punctuation is no column.
    elided = pca.CrossAttention(
        mode="reference",
        source="the LORD: said",
        target="l'Éternel dit",
        source_tokens=["the", "LORD", ":", "said", "</s>"],
        target_tokens=["l", "'", "Éternel", "dit", "</s>"],
        attention=np.full((1, 1, 5, 5), 0.2),
        source_words=np.array([0, 1, 1, 2, -1]),
        target_words=np.array([0, 0, 0, 1, -1]),
    )
    assert pca.anchor_cells(elided) == [("LORD", "Éternel", 2, [1])]
    # A word that occurs twice is ambiguous and is not scored.
    assert pca.anchor_cells(_record("God and God", "Dieu", np.full((1, 1, 2, 4), 0.25))) == []


def test_render_has_one_panel_per_layer_plus_the_best_head(seq2seq, tmp_path):
    model, tokenizer = seq2seq
    records = [pca.cross_attention(model, tokenizer, SOURCE, TARGET), pca.cross_attention(model, tokenizer, SOURCE)]
    path = tmp_path / "ca.png"
    assert pca.render(records[:1], (1, 2), "test", path, "title") == 2 + 1
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pca.render(records, (0, 0), "test", path, "title") == 2 * (2 + 1)


def test_cli_writes_the_figure_and_summary(saved, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [str(saved), "--source", SOURCE, "--target", TARGET, "--align-examples", "0", "--output-dir", str(out)]
    assert pca.main([*argv, "--max-new-tokens", "5"]) == 0
    summary = json.loads((out / "cross_attention.json").read_text())
    assert summary["figure"]["panels"] == 2 * (2 + 1)  # reference and greedy rows
    assert summary["plotted_head"]["why"] == "sharpest (lowest entropy)"  # no lexicon pair in the tiny vocabulary
    assert [p["mode"] for p in summary["plotted"]] == ["reference", "greedy"]
    assert (out / "cross_attention.png").read_bytes()[:4] == b"\x89PNG"
    assert pca.main([*argv, "--mode", "reference"]) == 0
    assert json.loads((out / "cross_attention.json").read_text())["figure"]["panels"] == 3
    assert "wrote" in capsys.readouterr().out


def test_decoder_only_model_is_refused(tmp_path, capsys):
    decoder = tiny_model("decoder")
    with pytest.raises(
        ValueError, match=r"config\.architecture='decoder' is invalid.*allowed values are 'encoder-decoder'"
    ):
        pca.require_encoder_decoder(decoder)
    with pytest.raises(ValueError, match="architecture='decoder'"):
        pca.cross_attention(decoder, build_tokenizer(), SOURCE, TARGET)
    folder = tmp_path / "decoder"
    decoder.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    assert pca.main([str(folder), "--source", SOURCE, "--output-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "config.architecture='decoder' is invalid" in error and "'encoder-decoder'" in error
    assert not (tmp_path / "out").exists()


def test_enfr_cpu_recipe_is_a_small_2017_transformer():
    recipe = Path(__file__).resolve().parents[1] / "configs" / "train" / "enfr-cpu.yaml"
    config = load_config(recipe, ["dataset=."])
    mc = model_config(config, config.vocab_size, {})
    assert mc.architecture == "encoder-decoder" and mc.norm_placement == "post"
    assert mc.position_encoding == "sinusoidal" and mc.tie_word_embeddings and mc.scale_embeddings
    assert (config.objective, config.tokenizer_kind, config.lr_schedule) == ("seq2seq", "shared", "inverse_sqrt")
    assert config.label_smoothing == 0.1
