"""The one byte-level BPE tokenizer builder (GPT-2 style), shared by conversion, the parity harness and training.

Byte-level BPE works on the UTF-8 bytes of the text, each byte spelled as one printable character
(`bytes_to_unicode`, GPT-2's table, taken from transformers rather than copied), so that no input is ever unknown.
The pre-tokenizer splits words GPT-2's way and maps bytes to those characters; the decoder maps them back.

>>> from course_transformer.core.tokenizers import byte_level_tokenizer, byte_vocab
>>> tokenizer = byte_level_tokenizer(byte_vocab(["<|endoftext|>"]), [], eos_token="<|endoftext|>")
>>> tokenizer.decode(tokenizer("héllo")["input_ids"])
'héllo'
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# transformers 5 dropped the copy in models/gpt2/tokenization_gpt2.py; this one feeds its slow->fast converters.
from transformers.convert_slow_tokenizer import bytes_to_unicode

__all__ = [
    "byte_level_components",
    "byte_level_tokenizer",
    "byte_vocab",
    "bytes_to_unicode",
    "load_byte_level_files",
    "new_byte_level_bpe",
]


def byte_level_components() -> tuple[pre_tokenizers.ByteLevel, decoders.ByteLevel]:
    """GPT-2's pre-tokenizer (no prefix space: "Hello" and " Hello" stay different words) and its decoder."""
    return pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()


def new_byte_level_bpe(vocab: dict[str, int] | None = None, merges: list[tuple[str, str]] | None = None) -> Tokenizer:
    """A `tokenizers.Tokenizer` with a BPE model and the byte-level set-up; without `vocab`, an empty one to train
    (pass `initial_alphabet=pre_tokenizers.ByteLevel.alphabet()` to the trainer so that all 256 bytes are in)."""
    model = models.BPE() if vocab is None else models.BPE(vocab=vocab, merges=merges or [])
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer, tokenizer.decoder = byte_level_components()
    return tokenizer


def byte_vocab(specials: list[str] = ()) -> dict[str, int]:
    """The 256 byte tokens (ids 0..255, in the table's order, printable bytes first, as GPT-2's own vocabulary
    starts: "!" is 0), then `specials`: a vocabulary without merges."""
    vocab = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    for token in specials:
        vocab[token] = len(vocab)
    return vocab


def byte_level_tokenizer(
    vocab: dict[str, int], merges: list[tuple[str, str]], post_processor=None, **special_tokens
) -> PreTrainedTokenizerFast:
    """A fast tokenizer from a GPT-2 style `vocab` and `merges`; `special_tokens` are `eos_token=...` and the like.

    Refuses an empty vocabulary: such a tokenizer encodes every text as [] without a word.
    """
    if not vocab:
        raise ValueError("byte-level BPE needs a non-empty vocabulary (got 0 entries)")
    tokenizer = new_byte_level_bpe(vocab, merges)
    if post_processor is not None:
        tokenizer.post_processor = post_processor
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special_tokens)


def load_byte_level_files(
    vocab_file: str | Path, merges_file: str | Path, **special_tokens
) -> PreTrainedTokenizerFast:
    """`byte_level_tokenizer` from GPT-2's `vocab.json` and `merges.txt` (first line `#version: ...`)."""
    vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
    lines = Path(merges_file).read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    return byte_level_tokenizer(vocab, merges, **special_tokens)
