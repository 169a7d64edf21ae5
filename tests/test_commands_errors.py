"""Command lines that would use a broken model or train on nothing: each refuses with one clear line on stderr, a
non-zero exit status, and nothing left on disk (issue 11).

Every case runs through `course_transformer.cli.main([...])`, as `course-transformer ...` does; the help texts also
in a subprocess from a folder outside the checkout.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tokenizer, tiny_model
from safetensors.torch import load_file, save_file

from course_transformer import cli
from course_transformer.commands.prepare_data import check_splits

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = "model.safetensors"
DROPPED = "model.decoder.layers.0.ffn.down_proj.bias"  # a weight of the tiny decoder


def run(argv: list[str], capsys) -> tuple[int, list[str]]:
    """Exit status and stderr lines of `course-transformer ARGV` (output captured before it is discarded)."""
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err.splitlines()


def snapshot(folder: Path) -> dict[str, int]:
    """Every path under `folder` (temporary files included) with its size: what a failed command must not change."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def saved_decoder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "decoder"
    tiny_model("decoder").save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


def broken_copy(saved: Path, tmp_path: Path, change) -> Path:
    """A copy of `saved` whose weights went through `change(state)` (which edits the dict in place)."""
    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    state = load_file(folder / WEIGHTS)
    change(state)
    save_file(state, folder / WEIGHTS, metadata={"format": "pt"})
    return folder


BROKEN = {
    "missing": (lambda state: state.pop(DROPPED), ["missing keys", DROPPED]),
    "unexpected": (lambda state: state.update(extra=torch.zeros(3)), ["unexpected keys", "extra"]),
    "mis-shaped": (lambda state: state.update({DROPPED: torch.zeros(7)}), ["wrong shapes", DROPPED, "[7]"]),
}


# --------------------------------------------------------------------------------------------------------------
# Commands that load a model
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(BROKEN))
def test_generate_refuses_weights_that_do_not_match_the_config(saved_decoder, tmp_path, capsys, kind):
    change, words = BROKEN[kind]
    folder = broken_copy(saved_decoder, tmp_path, change)
    before = snapshot(tmp_path)
    code, err = run(["generate", str(folder), "the cat", "--max-new-tokens", "2"], capsys)
    assert code == 1 and len(err) == 1, err
    assert str(folder / WEIGHTS) in err[0] and all(word in err[0] for word in words), err
    assert snapshot(tmp_path) == before


def test_generate_on_a_missing_path_says_the_path_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "nonexistent" / "model"
    code, err = run(["generate", str(missing), "the cat"], capsys)
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"course-transformer generate: error: {missing}: no such folder"), err
    assert "repo" not in err[0].lower() and not missing.parent.exists()


def test_generate_on_a_folder_without_tokenizer(saved_decoder, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(saved_decoder, folder, ignore=shutil.ignore_patterns("tokenizer*"))
    code, err = run(["generate", str(folder), "the cat"], capsys)
    assert code == 1 and len(err) == 1 and f"{folder}: no tokenizer" in err[0], err


def test_generate_runs_on_a_sound_folder(saved_decoder, capsys):
    capsys.readouterr()
    assert cli.main(["generate", str(saved_decoder), "the cat", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("'the cat' -> ")


def test_evaluate_refuses_a_broken_folder_before_writing(saved_decoder, tmp_path, capsys):
    folder = broken_copy(saved_decoder, tmp_path, BROKEN["missing"][0])
    texts = tmp_path / "texts.txt"
    texts.write_text("the cat sat on the mat .\n")
    output = tmp_path / "eval"
    before = snapshot(tmp_path)
    argv = ["evaluate", str(folder), "--texts", str(texts), "--output", str(output), "--no-parity", "--no-progress"]
    code, err = run(argv, capsys)
    assert code == 2 and len(err) == 1, err
    assert "missing keys" in err[0] and DROPPED in err[0] and str(folder / WEIGHTS) in err[0]
    assert not output.exists() and snapshot(tmp_path) == before


def test_visualize_refuses_a_broken_folder_and_a_missing_path(saved_decoder, tmp_path, capsys):
    folder = broken_copy(saved_decoder, tmp_path, BROKEN["mis-shaped"][0])
    output = tmp_path / "plot.png"
    before = snapshot(tmp_path)
    code, err = run(["visualize", "--model", str(folder), "--text", "the cat", "--output", str(output)], capsys)
    assert code == 2 and len(err) == 1 and "wrong shapes" in err[0] and DROPPED in err[0], err
    missing = tmp_path / "nonexistent"
    code, err = run(["visualize", "--model", str(missing), "--text", "the cat", "--output", str(output)], capsys)
    assert code == 2 and len(err) == 1 and f"--model {missing}: no such folder" in err[0], err
    assert not output.exists() and snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------------------------------
# Data and tokenizer commands
# --------------------------------------------------------------------------------------------------------------


def save_dataset(folder: Path, splits: dict[str, list[str]]) -> Path:
    from datasets import Dataset, DatasetDict, disable_progress_bars

    disable_progress_bars()
    DatasetDict({name: Dataset.from_dict({"text": texts}) for name, texts in splits.items()}).save_to_disk(folder)
    return folder


@pytest.mark.parametrize(
    ("texts", "words"),
    [([], ["is empty", "0 rows"]), (["", "  ", "\n"], ["3 rows", "blank", "'text'"])],
    ids=["empty", "blank"],
)
def test_train_tokenizer_refuses_a_split_without_text(tmp_path, capsys, texts, words):
    dataset = save_dataset(tmp_path / "corpus", {"train": texts, "validation": ["the cat sat"]})
    out = tmp_path / "tokenizer"
    before = snapshot(tmp_path)
    code, err = run(["train-tokenizer", "--dataset", str(dataset), "--vocab-size", "300", "--out", str(out)], capsys)
    assert code == 1 and len(err) == 1, err
    assert f"{dataset / 'train'}: split 'train'" in err[0] and all(word in err[0] for word in words), err
    assert not out.exists() and snapshot(tmp_path) == before


def test_train_tokenizer_on_a_missing_split_or_path(tmp_path, capsys):
    dataset = save_dataset(tmp_path / "corpus", {"train": ["the cat sat"]})
    out = tmp_path / "tokenizer"
    argv = ["train-tokenizer", "--vocab-size", "300", "--out", str(out), "--dataset"]
    code, err = run([*argv, str(dataset), "--split", "test"], capsys)
    assert code == 1 and len(err) == 1 and f"{dataset}: no split 'test' (its splits are train)" in err[0], err
    code, err = run([*argv, str(tmp_path / "nowhere")], capsys)
    assert code == 1 and len(err) == 1 and f"{tmp_path / 'nowhere'}: no such dataset folder" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_train_tokenizer_writes_the_tokenizer_atomically(tmp_path, capsys):
    dataset = save_dataset(tmp_path / "corpus", {"train": ["the cat sat on the mat"] * 10})
    out = tmp_path / "tokenizer"
    code, err = run(["train-tokenizer", "--dataset", str(dataset), "--vocab-size", "300", "--out", str(out)], capsys)
    assert code == 0 and (out / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "tokenizer"]  # no temporary folder left


@pytest.mark.parametrize(
    ("option", "words"),
    [(["--translations", " , "], ["--translations", "names no text"]), (["--max-train", "0"], ["--max-train=0"])],
    ids=["no-translation", "no-rows"],
)
def test_prepare_data_refuses_inputs_that_leave_nothing(tmp_path, capsys, option, words):
    out = tmp_path / "data"
    code, err = run(["prepare-data", "--out", str(out), "--no-install", *option], capsys)
    assert code == 1 and len(err) == 1 and all(word in err[0] for word in words), err
    assert not out.exists()


def test_an_empty_split_is_refused_naming_it_and_the_source():
    with pytest.raises(ValueError, match=r"bible\.db: english split 'validation' would be empty"):
        check_splits("english", {"train": [{"text": "a"}], "validation": [], "test": []}, Path("bible.db"))


# --------------------------------------------------------------------------------------------------------------
# The entry point outside the checkout
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"]], ids=["cli", "generate"])
def test_help_works_from_another_folder(tmp_path, argv):
    done = subprocess.run(
        [sys.executable, "-m", "course_transformer.cli", *argv], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage: course-transformer")
