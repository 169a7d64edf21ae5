"""Conversion BART <-> course Transformer: logits, attentions and greedy generation against Hugging Face BART,
bitwise round trips, the position offset, refusals and the command line."""

from __future__ import annotations

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration, BartModel

import modeling
from course_transformer.core import conversion
from course_transformer.core.conversion import bart_config_to_course, course_config_to_bart, from_bart, to_bart
from evaluation.tiny import HIDDEN_SIZE, MAX_POSITIONS, NUM_HEADS, tiny_config
from evaluation.tiny import tiny_bart_config as shared_tiny_bart_config
from tests.test_conversion import TOL, VOCAB, assert_state_dicts_bitwise_equal, padded_batch, randomize_

pytestmark = pytest.mark.usefixtures("one_thread")

PAD, BOS, EOS = 1, 0, 2  # BART's special ids; decoder_start is EOS, as in BART


def tiny_bart_config(**overrides) -> BartConfig:
    """`evaluation.tiny`'s BART with this file's vocabulary."""
    return shared_tiny_bart_config(**{"vocab_size": VOCAB, **overrides})


def tiny_bart(cls=BartForConditionalGeneration, seed: int = 0, backend: str = "eager", **overrides):
    config = tiny_bart_config(**overrides)
    config._attn_implementation = backend
    model = randomize_(cls(config), seed)
    if not config.tie_word_embeddings:
        # Untied, BART keeps `shared` as a separate, unread table equal to the encoder's (as set_input_embeddings
        # leaves it); randomize_ made them differ, which from_bart refuses (see the refusal test).
        base = model.model if cls is BartForConditionalGeneration else model
        with torch.no_grad():
            base.shared.weight.copy_(base.encoder.embed_tokens.weight)
    return model


def seq2seq_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """The source: three right-padded rows (lengths 11, 7, 4); the decoder: <start> + 5 tokens, the last row
    right-padded after 3."""
    batch = padded_batch(seed)
    generator = torch.Generator().manual_seed(seed + 100)
    decoder_ids = torch.randint(3, VOCAB - 1, (3, 6), generator=generator)
    decoder_ids[:, 0] = EOS
    decoder_mask = torch.ones_like(decoder_ids)
    decoder_mask[2, 3:] = 0
    decoder_ids[2, 3:] = PAD
    return {**batch, "decoder_input_ids": decoder_ids, "decoder_attention_mask": decoder_mask}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------------------------
# Import: parity with Hugging Face BART
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@torch.no_grad()
def test_bart_logits_match_on_a_padded_batch(backend):
    reference = tiny_bart(backend=backend)
    ours = from_bart(reference, attn_implementation=backend)
    assert isinstance(ours, modeling.CourseTransformerForSeq2SeqLM)
    assert ours.config._attn_implementation == backend
    config = ours.config
    assert (config.architecture, config.norm_placement, config.position_encoding, config.hidden_act) == (
        "encoder-decoder",
        "post",
        "learned",
        "gelu",
    )
    assert config.embedding_layer_norm and not config.scale_embeddings and config.type_vocab_size == 0
    # One token embedding for both stacks and the head, as BART's `shared`.
    encoder_tokens = ours.model.encoder.embeddings.word_embeddings.weight
    assert ours.model.decoder.embeddings.word_embeddings.weight is encoder_tokens
    assert ours.lm_head.weight is encoder_tokens
    batch = seq2seq_batch()
    expected, got = reference(**batch), ours(**batch)
    assert max_diff(got.encoder_last_hidden_state, expected.encoder_last_hidden_state) <= TOL
    assert max_diff(got.logits, expected.logits) <= TOL
    # The tolerance catches a small mistake: one cross-attention value bias off by 1e-3 moves the logits past it.
    ours.model.decoder.layers[-1].cross_attn.v_proj.bias[0] += 1e-3
    assert max_diff(ours(**batch).logits, expected.logits) > TOL


@torch.no_grad()
def test_bart_attentions_and_hidden_states_match_per_layer():
    """Encoder self-, decoder self- and cross-attention weights of every layer, under our eager and sdpa paths
    (ours returns exact weights under sdpa too), against BART's eager ones."""
    reference = tiny_bart(seed=3)
    batch = seq2seq_batch(seed=2)
    expected = reference(**batch, output_attentions=True, output_hidden_states=True)
    for backend in ("eager", "sdpa"):
        ours = from_bart(reference, attn_implementation=backend)
        got = ours(**batch, output_attentions=True, output_hidden_states=True)
        for name in (
            "encoder_attentions",
            "decoder_attentions",
            "cross_attentions",
            "encoder_hidden_states",
            "decoder_hidden_states",
        ):
            theirs, ours = getattr(expected, name), getattr(got, name)
            assert len(theirs) == len(ours) > 0, name
            for i, (x, y) in enumerate(zip(ours, theirs, strict=True)):
                assert max_diff(x, y) <= TOL, f"{backend} {name}[{i}]"
        # The padded source tokens get no cross-attention weight in any head.
        assert got.cross_attentions[0][2, :, :, 4:].abs().max() == 0


@torch.no_grad()
def test_bart_base_model_converts_to_the_bare_encoder_decoder():
    reference = tiny_bart(BartModel, seed=5)
    ours = from_bart(reference)
    assert type(ours) is modeling.CourseTransformerModel and ours.config.is_encoder_decoder
    batch = seq2seq_batch(seed=3)
    expected, got = reference(**batch), ours(**batch)
    assert max_diff(got.last_hidden_state, expected.last_hidden_state) <= TOL
    assert max_diff(got.encoder_last_hidden_state, expected.encoder_last_hidden_state) <= TOL


def test_position_table_drops_bart_two_unread_rows():
    reference = tiny_bart(seed=7)
    ours = from_bart(reference)
    for stack in ("encoder", "decoder"):
        theirs = getattr(reference.model, stack).embed_positions.weight  # (P + 2, C)
        table = getattr(ours.model, stack).embeddings.position_embeddings.weight  # (P, C)
        assert theirs.shape[0] == MAX_POSITIONS + 2 and table.shape[0] == MAX_POSITIONS
        assert torch.equal(table, theirs[2:])


def sharpen_(model, factor: float = 4.0):
    """Scale every projection matrix (not the embeddings): at randomize_'s 0.05 the attention is nearly uniform and
    every source generates the same <eos> at once; scaled, the tokens depend on the source."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name and "shared" not in name:
                param.mul_(factor)
    return model


@pytest.mark.parametrize("seed, tied", [(12, True), (11, False)])  # untied seed 11: one row stops early at <eos>
def test_greedy_generation_gives_the_same_tokens_from_a_padded_source(seed, tied):
    """KV-cached greedy decoding with the source mask; the generation config (BART's forced_eos_token_id) is
    copied, so the defaults of `generate` agree too."""
    reference = sharpen_(tiny_bart(seed=seed, tie_word_embeddings=tied))
    ours = from_bart(reference)
    assert ours.generation_config.forced_eos_token_id == EOS == reference.generation_config.forced_eos_token_id
    batch = padded_batch(seed=4)  # source lengths 11, 7, 4
    settings = dict(max_new_tokens=10, do_sample=False)
    expected = reference.generate(**batch, **settings)
    got = ours.generate(**batch, **settings)
    assert torch.equal(got, expected)
    # Not a vacuous match: ten new tokens, and each source row generated a different sequence.
    assert expected.shape[1] == 11 and len({tuple(row.tolist()) for row in expected}) == 3


@torch.no_grad()
def test_left_padded_source_matches_with_bart_positions():
    """BART numbers a left-padded source from the first pad; given those positions, ours agrees."""
    reference = tiny_bart(seed=13)
    ours = from_bart(reference)
    batch = seq2seq_batch(seed=5)
    batch["input_ids"], batch["attention_mask"] = batch["input_ids"].flip(-1), batch["attention_mask"].flip(-1)
    expected = reference(**batch).logits
    positions = torch.arange(batch["input_ids"].shape[1])[None]  # (1, T): what BART uses
    assert max_diff(ours(**batch, position_ids=positions).logits, expected) <= TOL


@torch.no_grad()
def test_scaled_untied_bart_converts():
    reference = tiny_bart(seed=17, scale_embedding=True, tie_word_embeddings=False, activation_function="relu")
    ours = from_bart(reference)
    assert ours.config.scale_embeddings and not ours.config.tie_word_embeddings and ours.config.hidden_act == "relu"
    assert ours.lm_head.weight is not ours.model.encoder.embeddings.word_embeddings.weight
    batch = seq2seq_batch(seed=6)
    assert max_diff(ours(**batch).logits, reference(**batch).logits) <= TOL
    native = to_bart(ours)
    assert_state_dicts_bitwise_equal(from_bart(native), ours)
    assert torch.equal(native.model.shared.weight, reference.model.shared.weight)


# ---------------------------------------------------------------------------------------------------------------
# Export and round trips
# ---------------------------------------------------------------------------------------------------------------


def zero_unread_position_rows_(model) -> None:
    base = model.model if isinstance(model, BartForConditionalGeneration) else model
    with torch.no_grad():
        for stack in (base.encoder, base.decoder):
            stack.embed_positions.weight[:2].zero_()


@pytest.mark.parametrize("cls", [BartForConditionalGeneration, BartModel])
def test_bart_round_trips_are_bitwise_exact(cls):
    reference = tiny_bart(cls, seed=19)
    ours = from_bart(reference)
    native = to_bart(ours)
    assert type(native) is cls
    assert_state_dicts_bitwise_equal(from_bart(native), ours)  # ours -> BART -> ours: every tensor
    # BART -> ours -> BART: the two unread position rows come back as zeros, everything else bitwise.
    base = native.model if cls is BartForConditionalGeneration else native
    for stack in (base.encoder, base.decoder):
        assert stack.embed_positions.weight[:2].abs().max() == 0
    zero_unread_position_rows_(reference)
    assert_state_dicts_bitwise_equal(native, reference)
    batch = seq2seq_batch(seed=7)
    with torch.no_grad():
        out = "logits" if cls is BartForConditionalGeneration else "last_hidden_state"
        assert max_diff(getattr(native(**batch), out), getattr(ours(**batch), out)) <= TOL


def test_the_benchmark_pair_is_one_architecture():
    """evaluation/benchmark.py builds its BART reference and our BART-shaped model independently; the converter
    maps one config onto the other."""
    from evaluation.benchmark import BenchSettings, _ours_config, _ref_config

    settings = BenchSettings.preset("tiny")
    ours = _ours_config(settings, "encoder-decoder", "eager")
    reference = _ref_config(settings, "encoder-decoder", "eager")
    converted = bart_config_to_course(reference).to_dict()
    expected = ours.to_dict()
    ignored = {"transformers_version", "classifier_dropout", "sep_token_id", "mask_token_id"}
    differences = {
        k: (expected.get(k), converted.get(k))
        for k in expected.keys() | converted.keys()
        if k not in ignored and expected.get(k) != converted.get(k)
    }
    assert differences == {}
    exported = course_config_to_bart(ours).to_dict()
    reference_fields = reference.to_dict()
    assert {
        k: (reference_fields[k], exported.get(k))
        for k in reference_fields
        if k not in ignored | {"forced_eos_token_id", "classifier_dropout"} and reference_fields[k] != exported.get(k)
    } == {}


def test_our_own_seq2seq_model_exports_to_bart():
    config = modeling.load_preset(
        "vaswani-base",
        vocab_size=VOCAB,
        hidden_size=HIDDEN_SIZE,
        num_attention_heads=NUM_HEADS,
        intermediate_size=48,
        num_encoder_layers=1,
        num_decoder_layers=3,
        max_position_embeddings=MAX_POSITIONS,
        position_encoding="learned",
        embedding_layer_norm=True,
        hidden_act="gelu_tanh",
        layer_norm_eps=1e-5,  # the preset's 1e-6 is refused: BART's LayerNorms use 1e-5
        hidden_dropout_prob=0.0,
        attention_dropout_prob=0.0,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        decoder_start_token_id=EOS,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ours = randomize_(modeling.CourseTransformerForSeq2SeqLM(config))
    native = to_bart(ours)
    assert (native.config.encoder_layers, native.config.decoder_layers, native.config.decoder_ffn_dim) == (1, 3, 48)
    assert native.config.activation_function == "gelu_new" and native.config.scale_embedding  # the 2017 sqrt(d)
    assert native.final_logits_bias.abs().max() == 0
    batch = seq2seq_batch(seed=8)
    with torch.no_grad():
        assert max_diff(native(**batch).logits, ours(**batch).logits) <= TOL
    assert_state_dicts_bitwise_equal(from_bart(native), ours)


# ---------------------------------------------------------------------------------------------------------------
# Refusals: field, value and what is allowed
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, field, value, allowed",
    [
        (dict(decoder_attention_heads=2), "BartConfig.decoder_attention_heads", "2", "encoder_attention_heads=4"),
        (dict(decoder_ffn_dim=48), "BartConfig.decoder_ffn_dim", "48", "encoder_ffn_dim=64"),
        (dict(activation_function="silu"), "BartConfig.activation_function", "'silu'", "supported: gelu"),
        (dict(is_decoder=True), "BartConfig.is_decoder", "True", "only the encoder-decoder BART"),
    ],
)
def test_bart_configs_we_cannot_hold_are_refused(overrides, field, value, allowed):
    with pytest.raises(ValueError) as error:
        bart_config_to_course(tiny_bart_config(**overrides))
    message = str(error.value)
    assert f"{field}={value}" in message and allowed in message, message


def test_training_only_fields_convert_with_a_warning(caplog):
    with caplog.at_level("WARNING", logger=conversion.__name__):
        config = bart_config_to_course(tiny_bart_config(activation_dropout=0.1, encoder_layerdrop=0.2))
    assert config.hidden_dropout_prob == 0.0
    assert "activation_dropout=0.1" in caplog.text and "encoder_layerdrop=0.2" in caplog.text
    assert "decoder_layerdrop" not in caplog.text  # zero: nothing dropped, nothing said


def test_non_zero_final_logits_bias_is_refused_before_building():
    reference = tiny_bart(seed=23)
    with torch.no_grad():
        reference.final_logits_bias[0, 5] = 0.5
    with pytest.raises(ValueError, match=r"final_logits_bias=.*max \|b\| = 0\.5.*only an all-zero"):
        from_bart(reference)


def test_untied_shared_table_that_differs_is_refused():
    reference = tiny_bart(seed=29, tie_word_embeddings=False)
    with torch.no_grad():
        reference.model.shared.weight[0, 0] += 1.0
    with pytest.raises(ValueError, match="shared.weight=.*must equal encoder.embed_tokens"):
        from_bart(reference)


def _bart_shaped(**fields) -> modeling.CourseTransformerConfig:
    """The tiny encoder-decoder with BART's choices (post-norm and eps 1e-5 are the config's defaults)."""
    bart = dict(architecture="encoder-decoder", vocab_size=VOCAB, embedding_layer_norm=True, scale_embeddings=False)
    return tiny_config(**{**bart, **fields})


@pytest.mark.parametrize(
    "fields, field, value",
    [
        (dict(architecture="decoder"), "architecture", "'decoder'"),
        (dict(norm_placement="pre"), "norm_placement", "'pre'"),
        (dict(position_encoding="sinusoidal"), "position_encoding", "'sinusoidal'"),
        (dict(position_encoding="rope"), "position_encoding", "'rope'"),
        (dict(embedding_layer_norm=False), "embedding_layer_norm", "False"),
        (dict(type_vocab_size=2), "type_vocab_size", "2"),
        (dict(use_bias=False), "use_bias", "False"),
        (dict(layer_norm_eps=1e-6), "layer_norm_eps", "1e-06"),
        (dict(pruned_heads={"encoder.0.self": [1]}), "pruned_heads", "{'encoder.0.self': [1]}"),
    ],
)
def test_course_configs_bart_cannot_express_are_refused(fields, field, value):
    assert course_config_to_bart(_bart_shaped()).d_model == HIDDEN_SIZE  # the base case exports
    with pytest.raises(ValueError) as error:
        course_config_to_bart(_bart_shaped(**fields))
    message = str(error.value)
    assert f"{field}={value} in BART" in message, message


def test_wrong_model_classes_are_type_errors():
    with pytest.raises(TypeError, match="from_bart takes BartModel or BartForConditionalGeneration"):
        from_bart(modeling.CourseTransformerModel(_bart_shaped()))
    config = _bart_shaped(architecture="decoder")
    with pytest.raises(TypeError, match="to_bart takes CourseTransformerModel or CourseTransformerForSeq2SeqLM"):
        to_bart(modeling.CourseTransformerForCausalLM(config))


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def test_cli_converts_bart_folders_both_ways(tmp_path, capsys):
    reference = tiny_bart(seed=31)
    zero_unread_position_rows_(reference)  # so that the folder round trip is bitwise in every tensor
    reference.save_pretrained(tmp_path / "bart")
    args = ["--from-bart", str(tmp_path / "bart"), "--output", str(tmp_path / "ours"), "--no-tokenizer"]
    assert conversion.main(args) == 0
    assert "BartForConditionalGeneration" in capsys.readouterr().out
    ours = modeling.CourseTransformerForSeq2SeqLM.from_pretrained(tmp_path / "ours", attn_implementation="eager")
    assert ours.generation_config.forced_eos_token_id == EOS  # generation_config.json travelled
    batch = seq2seq_batch(seed=9)
    with torch.no_grad():
        assert max_diff(ours(**batch).logits, reference(**batch).logits) <= TOL
    args = ["--to-bart", str(tmp_path / "ours"), "--output", str(tmp_path / "back"), "--no-tokenizer"]
    assert conversion.main(args) == 0
    back = BartForConditionalGeneration.from_pretrained(tmp_path / "back", attn_implementation="eager")
    assert_state_dicts_bitwise_equal(back, reference)
    # A BART-shaped model is not a GPT-2: exit 2 naming the field, nothing written.
    assert conversion.main(["--to-gpt2", str(tmp_path / "ours"), "--output", str(tmp_path / "gpt2")]) == 2
    assert "architecture='encoder-decoder'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "bart", "ours"]
