"""Tiny configs, models and a word-level tokenizer shared by the tests (hidden 32, 2 layers, 4 heads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import modeling  # noqa: E402
from modeling import CourseTransformerConfig  # noqa: E402

VOCAB = 64
WORDS = [
    "the",
    "pizza",
    "came",
    "out",
    "of",
    "the",
    "oven",
    "and",
    "it",
    "tasted",
    "good",
    ".",
    "a",
    "cat",
    "sat",
    "on",
    "mat",
    "dog",
    "ran",
    "to",
    "park",
    "le",
    "chat",
    "est",
    "sur",
    "tapis",
    "chien",
    "court",
    "au",
    "parc",
]


def tiny_config(architecture: str = "decoder", **overrides) -> CourseTransformerConfig:
    fields = dict(
        architecture=architecture,
        vocab_size=VOCAB,
        hidden_size=32,
        num_attention_heads=4,
        num_encoder_layers=2,
        num_decoder_layers=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_dropout_prob=0.0,
        max_position_embeddings=64,
        position_encoding="learned",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    fields.update(overrides)
    return CourseTransformerConfig(**fields)


HEAD_FOR_ARCH = {
    "decoder": modeling.CourseTransformerForCausalLM,
    "encoder": modeling.CourseTransformerForMaskedLM,
    "encoder-decoder": modeling.CourseTransformerForSeq2SeqLM,
}


def tiny_model(architecture: str = "decoder", seed: int = 0, attn_implementation: str = "eager", **overrides):
    """A seeded tiny model with the LM head of its architecture, in eval mode."""
    config = tiny_config(architecture, **overrides)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return HEAD_FOR_ARCH[architecture](config).eval()


def model_inputs(model, ids: torch.Tensor, mask: torch.Tensor | None = None, **kwargs) -> dict:
    """Forward kwargs for any architecture; the encoder-decoder gets a fixed decoder prefix."""
    inputs = {"input_ids": ids, "attention_mask": mask, **kwargs}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = torch.tensor([[1, 5, 9, 13]]).expand(ids.shape[0], -1)
    return inputs


def build_tokenizer():
    """A word-level fast tokenizer over WORDS, with the special tokens every objective needs."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "<s>", "</s>", "[UNK]", "[MASK]", "[CLS]", "[SEP]"]
    vocab = {token: i for i, token in enumerate(specials + sorted(set(WORDS)))}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="[UNK]",
        mask_token="[MASK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from threads and lose much on shared cores (about 20x measured on 2 busy cores);
    one thread also leaves a core free. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
