"""The shared mechanisms of `course_transformer.core`: the atomic writer and the byte-level BPE builder."""

from __future__ import annotations

import json
import stat

import pytest
from transformers import GPT2TokenizerFast

from course_transformer.core.io import atomic_write_bytes, atomic_write_dir, atomic_write_text, replace_dir
from course_transformer.core.tokenizers import (
    byte_level_tokenizer,
    byte_vocab,
    bytes_to_unicode,
    load_byte_level_files,
    new_byte_level_bpe,
)

EOT = "<|endoftext|>"


def _fail(folder):
    (folder / "partial").write_text("x")
    raise RuntimeError("disk full")


def test_atomic_write_dir_writes_refuses_and_replaces(tmp_path):
    out = atomic_write_dir(tmp_path / "out", lambda f: (f / "a").write_text("1"))
    assert (out / "a").read_text() == "1" and stat.S_IMODE(out.stat().st_mode) == 0o755
    with pytest.raises(FileExistsError, match="exists"):
        atomic_write_dir(out, lambda f: (f / "a").write_text("2"))
    atomic_write_dir(out, lambda f: (f / "b").write_text("2"), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing moved aside is left behind


def test_failed_write_leaves_no_output_and_keeps_the_old_one(tmp_path):
    with pytest.raises(RuntimeError):
        atomic_write_dir(tmp_path / "out", _fail)
    assert list(tmp_path.iterdir()) == []
    atomic_write_dir(tmp_path / "out", lambda f: (f / "a").write_text("old"))
    with pytest.raises(RuntimeError):
        atomic_write_dir(tmp_path / "out", _fail, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "a").read_text() == "old"


def test_replace_dir_with_fsync(tmp_path):
    (tmp_path / "tmp").mkdir()
    (tmp_path / "tmp" / "a").write_text("new")
    (tmp_path / "target").mkdir()
    replace_dir(tmp_path / "tmp", tmp_path / "target", fsync=True)
    assert [p.name for p in tmp_path.iterdir()] == ["target"] and (tmp_path / "target" / "a").read_text() == "new"


def test_atomic_write_bytes_and_text(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    atomic_write_bytes(path, b"a")
    atomic_write_text(path, "é")
    assert path.read_bytes() == "é".encode() and [p.name for p in path.parent.iterdir()] == ["f.txt"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_bytes_to_unicode_is_gpt2s_table():
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"


def test_byte_vocab_round_trips_any_text():
    tokenizer = byte_level_tokenizer(byte_vocab([EOT]), [], eos_token=EOT)
    assert len(tokenizer) == 257 and tokenizer.convert_tokens_to_ids(EOT) == 256
    text = "Héllo wörld\n\t🙂"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text.encode()) and tokenizer.decode(ids) == text


def test_empty_vocabulary_is_refused():
    with pytest.raises(ValueError, match="0 entries"):
        byte_level_tokenizer({}, [])


def test_files_load_like_transformers_gpt2_tokenizer(tmp_path):
    vocab = byte_vocab()
    to_char = bytes_to_unicode()
    merges = [(to_char[ord("h")], to_char[ord("e")]), ("he", to_char[ord("l")])]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    vocab[EOT] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    ours = load_byte_level_files(tmp_path / "vocab.json", tmp_path / "merges.txt", eos_token=EOT)
    theirs = GPT2TokenizerFast(vocab=str(tmp_path / "vocab.json"), merges=str(tmp_path / "merges.txt"))
    text = "hello help, the hel"
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    assert vocab["hel"] in ours(text)["input_ids"]


def test_new_byte_level_bpe_trains_with_the_shared_set_up():
    from tokenizers import pre_tokenizers, trainers

    tokenizer = new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(["hello hello world"] * 20, trainer=trainer)
    assert tokenizer.decode(tokenizer.encode("hello world").ids) == "hello world"
