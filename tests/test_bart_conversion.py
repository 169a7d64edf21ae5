"""Conversion BART <-> course Transformer: logits, attentions and greedy generation against Hugging Face BART,
bitwise round trips, the position offset, refusals and the command line."""

from __future__ import annotations

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration, BartModel

import modeling
from course_transformer.core.conversion import bart_config_to_course, course_config_to_bart, from_bart, to_bart
from evaluation.tiny import HIDDEN_SIZE, INTERMEDIATE_SIZE, MAX_POSITIONS, NUM_HEADS, NUM_LAYERS
from tests.test_conversion import TOL, VOCAB, assert_state_dicts_bitwise_equal, padded_batch, randomize_

pytestmark = pytest.mark.usefixtures("one_thread")

PAD, BOS, EOS = 1, 0, 2  # BART's special ids; decoder_start is EOS, as in BART


def tiny_bart_config(**overrides) -> BartConfig:
    """BART at the size of `evaluation.tiny` (hidden 32, 4 heads, 2 layers per stack, FFN 64), no dropout."""
    fields = dict(
        vocab_size=VOCAB,
        d_model=HIDDEN_SIZE,
        encoder_layers=NUM_LAYERS,
        decoder_layers=NUM_LAYERS,
        encoder_attention_heads=NUM_HEADS,
        decoder_attention_heads=NUM_HEADS,
        encoder_ffn_dim=INTERMEDIATE_SIZE,
        decoder_ffn_dim=INTERMEDIATE_SIZE,
        max_position_embeddings=MAX_POSITIONS,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        decoder_start_token_id=EOS,
    )
    return BartConfig(**{**fields, **overrides})


def tiny_bart(cls=BartForConditionalGeneration, seed: int = 0, backend: str = "eager", **overrides):
    config = tiny_bart_config(**overrides)
    config._attn_implementation = backend
    return randomize_(cls(config), seed)


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
