"""The real GPT-2 byte-level BPE vocabulary, rebuilt offline from the copy that ships inside openai-whisper.

The Hugging Face Hub cannot be reached, but the `openai-whisper` sdist on PyPI (MIT) carries
`whisper/assets/gpt2.tiktoken`: one line per token, `base64(token bytes) rank`, 50,256 ranks, where the rank is the
GPT-2 token id. Hugging Face's GPT-2 tokenizer wants `vocab.json` (token string -> id) and `merges.txt` (the merge
rules in priority order) instead. Both are recovered from the ranks:

* token strings: GPT-2 maps each byte to a printable unicode character (`bytes_to_unicode`, from OpenAI's
  `encoder.py`) so that the vocabulary is plain text;
* merges: BPE builds every multi-byte token from exactly two smaller tokens, by the merge of the token's own rank.
  Re-running BPE on the token's bytes with only the merges of lower rank stops at those two parts, which gives
  the merge rule `left right` for that rank.

Steps (each failure names its step): download the sdist with pip, extract only that one file, rebuild the two
files, build the tokenizer and check that "Hello world" encodes as [15496, 995]. Everything is cached under
`data/gpt2-vocab/` (gitignored), so the download happens once.

    >>> from evaluation.gpt2_vocab import load_gpt2_tokenizer
    >>> load_gpt2_tokenizer()("Hello world")["input_ids"]
    [15496, 995]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tarfile
import tempfile
from pathlib import Path

from course_transformer.core.io import atomic_write_bytes, atomic_write_text, download_sdist
from course_transformer.core.tokenizers import bytes_to_unicode

WHISPER_REQUIREMENT = "openai-whisper==20250625"
TIKTOKEN_MEMBER = "whisper/assets/gpt2.tiktoken"


def _default_cache_dir() -> Path:
    """`data/gpt2-vocab` of the checkout this package runs from (what `make install` builds); for an installed
    package (no checkout around it) the user's cache, never a `data` folder inside site-packages."""
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file():
        return checkout / "data" / "gpt2-vocab"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "course-transformer" / "gpt2-vocab"


DEFAULT_CACHE_DIR = _default_cache_dir()
END_OF_TEXT = "<|endoftext|>"
END_OF_TEXT_ID = 50256
EXPECTED = {"Hello world": [15496, 995]}


class VocabularyError(RuntimeError):
    """A step of the rebuild failed; the message names the step."""


def download_tiktoken(cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """Return `cache_dir/gpt2.tiktoken`, fetching the whisper sdist with pip and extracting that file if needed."""
    cache_dir = Path(cache_dir)
    target = cache_dir / "gpt2.tiktoken"
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        try:
            archive_path = download_sdist(WHISPER_REQUIREMENT, tmp)
        except RuntimeError as error:
            raise VocabularyError(
                f"step 'download': {error}\nthe GPT-2 vocabulary comes from the {WHISPER_REQUIREMENT} sdist on PyPI"
            ) from None
        try:
            with tarfile.open(archive_path) as archive:
                # Read the one member we need; nothing else is extracted (no path traversal, no code on disk).
                member = next(m for m in archive.getmembers() if m.isfile() and m.name.endswith(TIKTOKEN_MEMBER))
                data = archive.extractfile(member).read()
        except (tarfile.TarError, StopIteration, OSError) as error:
            raise VocabularyError(
                f"step 'extract': no readable {TIKTOKEN_MEMBER} in {archive_path.name}: {error}"
            ) from error
    atomic_write_bytes(target, data)  # a reader never sees half a file
    return target


def load_ranks(path: Path) -> dict[bytes, int]:
    """Parse `base64(token) rank` lines into {token bytes: rank}."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as error:
            raise VocabularyError(f"step 'parse': {path}:{number} is not 'base64 rank': {line[:80]!r}") from error
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise VocabularyError(f"step 'parse': the ranks in {path} are not 0..{len(ranks) - 1} without gaps")
    return ranks


def _split_by_lower_ranks(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    """Byte-pair encode `token` using only merges of rank < max_rank (the lowest rank merges first)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best_rank, best_index = None, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best_rank is None or rank < best_rank):
                best_rank, best_index = rank, i
        if best_index is None:
            break
        parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    return parts


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge rules in rank order: each multi-byte token is the merge of the two parts that BPE with the lower
    ranks leaves it in."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = _split_by_lower_ranks(token, ranks, rank)
        if len(parts) != 2:
            raise VocabularyError(f"step 'merges': token {token!r} (rank {rank}) splits into {len(parts)} parts")
        merges.append((parts[0], parts[1]))
    return merges


def build_vocab_files(cache_dir: Path = DEFAULT_CACHE_DIR, download: bool = True) -> tuple[Path, Path]:
    """Write (once) and return `vocab.json` and `merges.txt` in the Hugging Face GPT-2 format."""
    cache_dir = Path(cache_dir)
    vocab_path, merges_path = cache_dir / "vocab.json", cache_dir / "merges.txt"
    if vocab_path.is_file() and merges_path.is_file():
        return vocab_path, merges_path
    source = cache_dir / "gpt2.tiktoken"
    if not source.is_file():
        if not download:
            raise VocabularyError(f"step 'download': {source} is absent and downloading was not allowed")
        source = download_tiktoken(cache_dir)
    ranks = load_ranks(source)
    to_char = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_char[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab[END_OF_TEXT] = len(ranks)  # 50256 in GPT-2
    merges = recover_merges(ranks)
    atomic_write_text(vocab_path, json.dumps(vocab, ensure_ascii=False))
    atomic_write_text(merges_path, "#version: 0.2\n" + "".join(f"{text(a)} {text(b)}\n" for a, b in merges))
    return vocab_path, merges_path


def load_gpt2_tokenizer(cache_dir: Path | None = None, download: bool = True):
    """GPT-2's tokenizer (50,257 tokens, right padding with <|endoftext|> as the pad token), checked on a known
    encoding. Raises `VocabularyError` naming the failed step."""
    from transformers import GPT2TokenizerFast

    vocab_path, merges_path = build_vocab_files(Path(cache_dir or DEFAULT_CACHE_DIR), download=download)
    try:
        tokenizer = GPT2TokenizerFast(vocab=str(vocab_path), merges=str(merges_path), pad_token=END_OF_TEXT)
    except Exception as error:  # noqa: BLE001 - reported with the step name
        raise VocabularyError(
            f"step 'tokenizer': GPT2TokenizerFast could not load {vocab_path.parent}: {error}"
        ) from error
    for text, expected in EXPECTED.items():
        got = tokenizer(text)["input_ids"]
        if got != expected:
            raise VocabularyError(f"step 'check': {text!r} encodes as {got}, GPT-2 gives {expected}")
    if tokenizer.convert_tokens_to_ids(END_OF_TEXT) != END_OF_TEXT_ID:
        raise VocabularyError(f"step 'check': {END_OF_TEXT} is not id {END_OF_TEXT_ID}")
    return tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    args = parser.parse_args(argv)
    try:
        tokenizer = load_gpt2_tokenizer(args.cache_dir)
    except VocabularyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"GPT-2 vocabulary ready in {args.cache_dir}: {len(tokenizer)} tokens, 'Hello world' -> "
        f"{tokenizer('Hello world')['input_ids']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
