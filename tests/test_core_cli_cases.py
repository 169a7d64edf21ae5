"""`convert` refuses broken or impossible jobs: non-zero exit, one clear line on stderr, nothing left on disk.

Refusals that config.json decides (an existing output, a target that cannot express the model, a wrong model
type, weights that do not match) come before any weight is read: the loaders are replaced by a function that
fails the test if called.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from transformers import GPT2LMHeadModel

from course_transformer.core import conversion
from course_transformer.core.tokenizers import byte_level_tokenizer, byte_vocab
from evaluation.tiny import tiny_gpt2_config

pytestmark = pytest.mark.usefixtures("one_thread")
EOT = "<|endoftext|>"
GPT2_SHAPED = dict(hidden_act="gelu_tanh", norm_placement="pre", scale_embeddings=False)


def _gpt2_folder(folder, tokenizer: bool = True):
    torch.manual_seed(0)
    GPT2LMHeadModel(tiny_gpt2_config(vocab_size=257)).save_pretrained(folder)
    if tokenizer:
        byte_level_tokenizer(byte_vocab([EOT]), [], eos_token=EOT, bos_token=EOT).save_pretrained(folder)
    return folder


def _course_folder(folder, **overrides):
    tiny_model("decoder", **{**GPT2_SHAPED, **overrides}).save_pretrained(folder)
    return folder


def _never_load(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    for name in ("load_bert", "load_gpt2", "load_course", "load_pretrained_safely"):
        monkeypatch.setattr(conversion, name, fail)


def _refused(tmp_path, capsys, argv, needle) -> str:
    before = sorted(p.name for p in tmp_path.rglob("*"))
    capsys.readouterr()  # the set-up's progress bars
    status = conversion.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, no temporary folder
    return lines[0]


def test_gpt2_folder_without_tokenizer_files_is_refused(tmp_path, capsys, monkeypatch):
    source = _gpt2_folder(tmp_path / "gpt2", tokenizer=False)
    _never_load(monkeypatch)
    line = _refused(tmp_path, capsys, ["--from-gpt2", source, "--output", tmp_path / "out"], "no tokenizer files")
    assert str(source) in line and "--no-tokenizer" in line


def test_gpt2_folder_with_its_tokenizer_converts_with_it(tmp_path, capsys):
    from transformers import AutoTokenizer

    source = _gpt2_folder(tmp_path / "gpt2")
    assert conversion.main(["--from-gpt2", str(source), "--output", str(tmp_path / "out")]) == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert len(tokenizer) == 257 and len(tokenizer("Hello world")["input_ids"]) == 11


def test_no_tokenizer_converts_the_weights_alone(tmp_path):
    source = _gpt2_folder(tmp_path / "gpt2", tokenizer=False)
    argv = ["--from-gpt2", str(source), "--output", str(tmp_path / "out"), "--no-tokenizer"]
    assert conversion.main(argv) == 0
    assert not any((tmp_path / "out" / name).exists() for name in conversion.TOKENIZER_FILES)


def test_existing_output_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    source = _gpt2_folder(tmp_path / "gpt2")
    (tmp_path / "out").mkdir()
    _never_load(monkeypatch)
    _refused(tmp_path, capsys, ["--from-gpt2", source, "--output", tmp_path / "out"], "out exists; pass --overwrite")


@pytest.mark.parametrize(
    "flag, overrides, needle",
    [
        ("--to-gpt2", dict(position_encoding="rope"), "position_encoding='rope'"),
        ("--to-bert", {}, "architecture='decoder'"),
    ],
)
def test_inexpressible_target_is_refused_before_loading(tmp_path, capsys, monkeypatch, flag, overrides, needle):
    source = _course_folder(tmp_path / "ours", **overrides)
    _never_load(monkeypatch)
    _refused(tmp_path, capsys, [flag, source, "--output", tmp_path / "out", "--no-tokenizer"], needle)


def test_wrong_model_type_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    source = _course_folder(tmp_path / "ours")
    _never_load(monkeypatch)
    _refused(tmp_path, capsys, ["--from-gpt2", source, "--output", tmp_path / "out"], "expected 'gpt2'")


def test_missing_weight_is_refused_by_the_safe_loader(tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file, save_file

    source = _course_folder(tmp_path / "ours")
    weights = source / "model.safetensors"
    state = load_file(weights)
    key = "model.decoder.layers.0.self_attn.q_proj.weight"
    del state[key]
    save_file(state, weights, metadata={"format": "pt"})
    _never_load(monkeypatch)
    line = _refused(tmp_path, capsys, ["--to-gpt2", source, "--output", tmp_path / "out", "--no-tokenizer"], key)
    assert "missing keys" in line and "model.safetensors" in line


def test_gpt2_folder_with_a_missing_weight_is_refused(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    source = _gpt2_folder(tmp_path / "gpt2")
    state = load_file(source / "model.safetensors")
    del state["transformer.h.0.attn.c_attn.weight"]
    save_file(state, source / "model.safetensors", metadata={"format": "pt"})
    _refused(tmp_path, capsys, ["--from-gpt2", source, "--output", tmp_path / "out"], "h.0.attn.c_attn.weight")


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda p: None, "no such file or folder"),
        (lambda p: p.write_text("x"), "not a folder"),
        (lambda p: p.mkdir(), "no config.json"),
    ],
    ids=["missing", "a file", "no config"],
)
def test_bad_source_path_is_named_as_such(tmp_path, capsys, make, needle):
    source = tmp_path / "source"
    make(source)
    line = _refused(tmp_path, capsys, ["--to-gpt2", source, "--output", tmp_path / "out"], needle)
    assert str(source) in line


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path, capsys, monkeypatch):
    source = _course_folder(tmp_path / "ours")  # vocabulary 64 < 257 byte tokens
    byte_level_tokenizer(byte_vocab([EOT]), [], eos_token=EOT).save_pretrained(source)
    _never_load(monkeypatch)
    _refused(tmp_path, capsys, ["--to-gpt2", source, "--output", tmp_path / "out"], "257 tokens but config.json")
