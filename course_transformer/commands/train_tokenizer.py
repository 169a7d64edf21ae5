"""Train the tokenizers of the three objectives with `tokenizers`, saved as `PreTrainedTokenizerFast` folders.

- `bpe`: byte-level BPE in the style of GPT-2, one special token `<|endoftext|>` (id 0) that separates
  documents and serves as bos, eos and pad. Byte-level: every string round-trips exactly, no unknown token.
- `wordpiece`: BERT style, `[PAD] [UNK] [CLS] [SEP] [MASK]` (ids 0-4), `[CLS] text [SEP]` added on encoding.
- `shared`: one byte-level BPE vocabulary for source and target of translation (English and French),
  `<pad> <s> </s> <unk>` (ids 0-3, matching the model config's pad/bos/eos defaults); `</s>` is appended on
  encoding and `<s>` starts the decoder.

    course-transformer train-tokenizer --kind bpe --dataset data/bible/english --vocab-size 4096 --out runs/tok
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from course_transformer.commands.prepare_data import split_texts
from course_transformer.core.io import atomic_write_dir
from course_transformer.core.tokenizers import new_byte_level_bpe

KINDS = ("bpe", "wordpiece", "shared")
BPE_SPECIALS = ["<|endoftext|>"]
WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SHARED_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def _batches(texts: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
    batch = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _byte_level_bpe(texts: Iterable[str], vocab_size: int, specials: list[str]) -> Tokenizer:
    tok = new_byte_level_bpe()  # the shared byte-level set-up (course_transformer.core.tokenizers)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    tok.train_from_iterator(_batches(texts), trainer=trainer)
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE; `<|endoftext|>` is bos, eos, unk and pad (GPT-2 has no pad of its own)."""
    tok = _byte_level_bpe(texts, vocab_size, BPE_SPECIALS)
    eot = BPE_SPECIALS[0]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=eot, eos_token=eot, unk_token=eot, pad_token=eot, model_max_length=1024
    )


def train_wordpiece(texts: Iterable[str], vocab_size: int = 4096, lowercase: bool = False) -> PreTrainedTokenizerFast:
    """BERT style WordPiece with `[CLS] A [SEP]` / `[CLS] A [SEP] B [SEP]` templates."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, lowercase=lowercase, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=WORDPIECE_SPECIALS, show_progress=False)
    tok.train_from_iterator(_batches(texts), trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )


def train_shared(texts: Iterable[str], vocab_size: int = 8000) -> PreTrainedTokenizerFast:
    """One byte-level BPE vocabulary for both languages (the 2017 Transformer shares its embeddings)."""
    tok = _byte_level_bpe(texts, vocab_size, SHARED_SPECIALS)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
    )


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A tokenizer of `kind` trained on `texts`; refuses texts that are all blank (it would learn no merge and
    still look like a tokenizer: 256 bytes and the specials)."""
    if kind not in KINDS:
        raise ValueError(f"tokenizer kind {kind!r} is invalid: allowed values are {', '.join(KINDS)}")
    texts = list(texts)
    if not any(isinstance(text, str) and text.strip() for text in texts):
        raise ValueError(f"no text to train the {kind} tokenizer on: {len(texts)} texts, all empty or blank")
    return {"bpe": train_bpe, "wordpiece": train_wordpiece, "shared": train_shared}[kind](texts, vocab_size)


def dataset_texts(dataset_path: str | Path, columns: list[str], split: str = "train") -> list[str]:
    """Texts of the given columns of one split of a `DatasetDict` saved on disk (both languages for pairs);
    a missing folder, split or column, or a split without text, is refused naming the path and the split."""
    return split_texts(dataset_path, split, columns)


def main(argv: list[str] | None = None) -> PreTrainedTokenizerFast:
    parser = argparse.ArgumentParser(
        prog="course-transformer train-tokenizer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--kind", choices=KINDS, default="bpe")
    parser.add_argument("--dataset", default="data/bible/english", help="a DatasetDict saved with save_to_disk")
    parser.add_argument("--split", default="train", help="split of --dataset to train on")
    parser.add_argument("--columns", default=None, help="comma-separated text columns (default: text, or en,fr)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--out", required=True, help="folder for the tokenizer (save_pretrained)")
    args = parser.parse_args(argv)
    if args.vocab_size < 300:
        parser.error(f"--vocab-size={args.vocab_size} is too small: byte-level BPE needs at least 256 + specials")
    columns = args.columns.split(",") if args.columns else (["en", "fr"] if args.kind == "shared" else ["text"])
    tokenizer = train_tokenizer(args.kind, dataset_texts(args.dataset, columns, args.split), args.vocab_size)
    atomic_write_dir(args.out, lambda tmp: tokenizer.save_pretrained(str(tmp)), overwrite=True)
    print(f"{args.kind} tokenizer with {len(tokenizer)} tokens saved to {args.out}", flush=True)
    return tokenizer


if __name__ == "__main__":
    main()
