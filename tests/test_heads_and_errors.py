"""Config validation, bad model input, classification heads, pipelines, gradient checkpointing, presets."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_config, tiny_model
from transformers import pipeline

import modeling
from modeling import (
    CourseTransformerConfig,
    CourseTransformerForCausalLM,
    CourseTransformerForSeq2SeqLM,
    CourseTransformerForSequenceClassification,
    CourseTransformerForTokenClassification,
)

BAD_CONFIGS = [
    ({"hidden_size": 30, "num_attention_heads": 4}, "hidden_size=30"),
    ({"position_encoding": "absolute"}, "position_encoding='absolute'"),
    ({"position_encoding": "rope", "hidden_size": 36, "num_attention_heads": 12}, "even head dim"),
    ({"architecture": "gpt"}, "architecture='gpt'"),
    ({"norm_placement": "middle"}, "norm_placement='middle'"),
    ({"hidden_act": "swish"}, "hidden_act='swish'"),
    ({"vocab_size": 0}, "vocab_size=0"),
    ({"num_decoder_layers": -1}, "num_decoder_layers=-1"),
    ({"hidden_dropout_prob": 1.5}, "hidden_dropout_prob=1.5"),
    ({"layer_norm_eps": 0.0}, "layer_norm_eps=0.0"),
    ({"pad_token_id": VOCAB}, f"pad_token_id={VOCAB}"),
    ({"classifier_pooling": "pooler", "add_pooling_layer": False}, "add_pooling_layer"),
    ({"hidden_size": 32.0}, "hidden_size=32.0"),
]


@pytest.mark.parametrize("overrides,needle", BAD_CONFIGS)
def test_invalid_config_raises_naming_field_and_value(overrides, needle):
    with pytest.raises(ValueError) as err:
        tiny_config(**{"architecture": "decoder", **overrides})
    assert needle in str(err.value)
    assert "CourseTransformerConfig." in str(err.value)


def test_config_derives_flags():
    assert tiny_config("encoder-decoder").is_encoder_decoder
    assert tiny_config("encoder-decoder").decoder_start_token_id == 1
    assert tiny_config("decoder").is_decoder and not tiny_config("decoder").is_encoder_decoder
    assert tiny_config("decoder", num_decoder_layers=3).num_hidden_layers == 3
    assert tiny_config("encoder", num_encoder_layers=5).num_hidden_layers == 5


@pytest.mark.parametrize(
    "call,needle",
    [
        (lambda m: m(torch.tensor([[1, VOCAB]])), f"outside [0, {VOCAB})"),
        (lambda m: m(torch.tensor([[1, -1]])), "contains -1"),
        (lambda m: m(torch.randint(3, VOCAB, (1, 65))), "max_position_embeddings=64"),
        (lambda m: m(torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4)), "attention_mask has shape"),
        (lambda m: m(torch.ones(1, 3)), "integer tensor"),
        (lambda m: m(torch.ones(3, dtype=torch.long)), "shape (batch, length)"),
        (lambda m: m(), "exactly one of input_ids"),
        (
            lambda m: m(torch.ones(1, 3, dtype=torch.long), token_type_ids=torch.ones(1, 3, dtype=torch.long)),
            "type_vocab_size=0",
        ),
        (lambda m: m(torch.ones(1, 3, dtype=torch.long), head_mask=torch.ones(3, 4)), "head_mask has shape"),
    ],
)
def test_bad_model_input_fails_clearly_before_work(call, needle, monkeypatch):
    model = tiny_model("decoder")
    # "before any heavy work": the first layer must never run
    monkeypatch.setattr(model.model.decoder.layers[0], "forward", lambda *a, **k: pytest.fail("layer ran"))
    with pytest.raises((ValueError, TypeError)) as err:
        call(model)
    assert needle in str(err.value)


def test_encoder_decoder_without_decoder_inputs_fails_clearly():
    model = tiny_model("encoder-decoder")
    with pytest.raises(ValueError, match="decoder_input_ids"):
        model(torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="decoder_input_ids"):
        model.model(torch.ones(1, 4, dtype=torch.long))
    # with labels the decoder inputs are derived (teacher forcing) and a loss comes back
    out = model(torch.ones(1, 4, dtype=torch.long), labels=torch.tensor([[5, 6, 2]]))
    assert out.loss is not None and out.logits.shape == (1, 3, VOCAB)


def test_head_classes_refuse_wrong_architecture():
    with pytest.raises(ValueError, match="architecture='encoder'"):
        CourseTransformerForCausalLM(tiny_config("encoder"))
    with pytest.raises(ValueError, match="architecture='decoder'"):
        CourseTransformerForSeq2SeqLM(tiny_config("decoder"))


@pytest.mark.parametrize("pooling", ["auto", "pooler", "first", "last", "mean"])
@pytest.mark.parametrize("arch", ["encoder", "decoder"])
def test_sequence_classification_pools_ignore_padding(arch, pooling):
    config = tiny_config(arch, classifier_pooling=pooling, add_pooling_layer=(pooling == "pooler"), num_labels=3)
    torch.manual_seed(0)
    model = CourseTransformerForSequenceClassification(config).eval()
    ids = torch.randint(3, VOCAB, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 3)], 1).long()
    alone = model(ids).logits
    batch = model(padded, attention_mask=mask, labels=torch.tensor([2]))
    torch.testing.assert_close(batch.logits, alone, atol=1e-5, rtol=0)
    assert batch.logits.shape == (1, 3) and batch.loss > 0


def test_token_classification_and_loss_goes_down():
    torch.manual_seed(0)
    model = CourseTransformerForTokenClassification(tiny_config("encoder", num_labels=4))
    ids = torch.randint(3, VOCAB, (4, 8))
    labels = ids % 4  # a learnable per-token labelling
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("arch", ["decoder", "encoder", "encoder-decoder"])
def test_gradient_checkpointing_gives_the_same_gradients(arch):
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(arch)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable()
        kwargs = {"decoder_input_ids": ids} if arch == "encoder-decoder" else {}
        model(ids, labels=labels, **kwargs).loss.backward()
        grads.append(model.get_input_embeddings().weight.grad.clone())
        if checkpointing:
            stack = model.model.encoder or model.model.decoder
            assert stack.layers[0].gradient_checkpointing
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=0)


def test_pipelines_in_process(tokenizer):
    enc = tiny_model("encoder", num_labels=2)
    feats = pipeline("feature-extraction", model=enc.model, tokenizer=tokenizer)
    out = feats("the cat sat on mat")
    assert torch.tensor(out).shape == (1, 6, 32)  # 5 words + </s>
    torch.manual_seed(0)
    cls = CourseTransformerForSequenceClassification(tiny_config("encoder", num_labels=2)).eval()
    result = pipeline("text-classification", model=cls, tokenizer=tokenizer)("the dog ran to park")
    assert result[0]["label"] in ("LABEL_0", "LABEL_1") and 0 < result[0]["score"] <= 1
    torch.manual_seed(0)
    tagger = CourseTransformerForTokenClassification(tiny_config("encoder", num_labels=3)).eval()
    tags = pipeline("token-classification", model=tagger, tokenizer=tokenizer)("the dog ran")
    assert all(t["entity"].startswith("LABEL_") for t in tags)
    gen = pipeline("text-generation", model=tiny_model("decoder"), tokenizer=tokenizer)
    text = gen("the pizza", do_sample=False, max_new_tokens=3)[0]["generated_text"]
    assert text.startswith("the pizza")


def test_presets_reproduce_named_architectures():
    bert, gpt2, vaswani = (modeling.load_preset(n) for n in ("bert-base", "gpt2-124m", "vaswani-base"))
    assert (bert.num_encoder_layers, bert.hidden_size, bert.num_attention_heads) == (12, 768, 12)
    assert bert.norm_placement == "post" and bert.embedding_layer_norm and bert.type_vocab_size == 2
    assert gpt2.norm_placement == "pre" and gpt2.hidden_act == "gelu_tanh" and gpt2.max_position_embeddings == 1024
    assert (vaswani.num_encoder_layers, vaswani.num_decoder_layers, vaswani.hidden_size) == (6, 6, 512)
    assert vaswani.position_encoding == "sinusoidal" and vaswani.hidden_act == "relu" and vaswani.scale_embeddings
    # parameter count of the GPT-2 shape: 124M (Radford et al. 2019 report 117M with a different count of
    # embeddings; the released checkpoint has 124,439,808 parameters)
    with torch.device("meta"):
        model = CourseTransformerForCausalLM(gpt2)
    assert model.num_parameters() == 124_439_808
    with pytest.raises(ValueError, match="available presets"):
        modeling.load_preset("gpt5")


def test_config_round_trips_through_json(tmp_path):
    config = tiny_config("encoder-decoder", position_encoding="alibi")
    config.save_pretrained(tmp_path)
    again = CourseTransformerConfig.from_pretrained(tmp_path)
    assert again.to_dict() == config.to_dict()
