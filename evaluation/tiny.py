"""The one set of tiny configs, for the tests, the parity harness's `bert-tiny` / `gpt2-tiny` and the benchmark's
smoke mode: hidden 32, 4 heads, 2 layers (per stack), a feed-forward of 64, no dropout.

The course config and its Hugging Face references (BERT, GPT-2, BART, Llama) share the shape, so a converted model
and its reference are the same size. Every field can be overridden; the vocabulary often is (the tests' word-level
tokenizer has 64 entries, the parity harness's byte-level one 256 bytes plus its special tokens).

    >>> from evaluation.tiny import tiny_config, tiny_gpt2_config
    >>> tiny_config("encoder").hidden_size, tiny_gpt2_config(vocab_size=257).eos_token_id
    (32, 256)

The named presets in `modeling/presets/tiny-*.json` are a different thing: the demo's CPU-trainable models
(hidden 128, 4 layers, 4,096 tokens), too large for a unit test.
"""

from __future__ import annotations

from transformers import BartConfig, BertConfig, GPT2Config, LlamaConfig

from modeling import CourseTransformerConfig

HIDDEN_SIZE = 32
NUM_HEADS = 4
NUM_LAYERS = 2
INTERMEDIATE_SIZE = 64
VOCAB_SIZE = 64
MAX_POSITIONS = 64

__all__ = [
    "HIDDEN_SIZE",
    "INTERMEDIATE_SIZE",
    "MAX_POSITIONS",
    "NUM_HEADS",
    "NUM_LAYERS",
    "VOCAB_SIZE",
    "tiny_bart_config",
    "tiny_bert_config",
    "tiny_config",
    "tiny_gpt2_config",
]


def tiny_config(architecture: str = "decoder", **overrides) -> CourseTransformerConfig:
    """A tiny course config of `architecture`; pad, bos, eos are 0, 1, 2."""
    fields = dict(
        architecture=architecture,
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        num_attention_heads=NUM_HEADS,
        num_encoder_layers=NUM_LAYERS,
        num_decoder_layers=NUM_LAYERS,
        intermediate_size=INTERMEDIATE_SIZE,
        hidden_dropout_prob=0.0,
        attention_dropout_prob=0.0,
        max_position_embeddings=MAX_POSITIONS,
        position_encoding="learned",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return CourseTransformerConfig(**{**fields, **overrides})


def tiny_bert_config(**overrides) -> BertConfig:
    """A tiny `BertConfig` (two token types, as BERT's checkpoints have)."""
    fields = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        intermediate_size=INTERMEDIATE_SIZE,
        max_position_embeddings=MAX_POSITIONS,
        type_vocab_size=2,
    )
    return BertConfig(**{**fields, **overrides})


def tiny_gpt2_config(**overrides) -> GPT2Config:
    """A tiny `GPT2Config`: GPT-2's own 4x feed-forward (`n_inner=None`), bos = eos = the last token, as GPT-2's
    `<|endoftext|>` is."""
    vocab_size = overrides.pop("vocab_size", VOCAB_SIZE)
    fields = dict(
        vocab_size=vocab_size,
        n_positions=MAX_POSITIONS,
        n_embd=HIDDEN_SIZE,
        n_layer=NUM_LAYERS,
        n_head=NUM_HEADS,
        bos_token_id=vocab_size - 1,
        eos_token_id=vocab_size - 1,
    )
    return GPT2Config(**{**fields, **overrides})


def tiny_bart_config(**overrides) -> BartConfig:
    """A tiny `BartConfig`: 2 layers per stack, no dropout, BART's special ids (pad 1, bos 0, eos 2) and its
    decoder start (eos)."""
    fields = dict(
        vocab_size=VOCAB_SIZE,
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
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
    )
    return BartConfig(**{**fields, **overrides})


def tiny_llama_config(**overrides) -> LlamaConfig:
    """A tiny `LlamaConfig` (SmolLM2's architecture): RoPE, RMSNorm, grouped-query attention with 2 key/value heads
    for the 4 query heads, pad 0."""
    fields = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_HEADS // 2,
        intermediate_size=INTERMEDIATE_SIZE,
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=0,
    )
    return LlamaConfig(**{**fields, **overrides})
