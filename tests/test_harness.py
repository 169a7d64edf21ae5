"""The evaluation harness: bits per byte against a hand computation, windows, masked LMs, the report and the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import WORDS, build_tokenizer, tiny_model

from course_transformer.commands import evaluate_model as evaluate_cli
from evaluation import lm_quality as lq
from evaluation.harness import HarnessInputError, run_harness

ROOT = Path(__file__).resolve().parent.parent

TEXTS = [
    "the pizza came out of the oven and it tasted good .",
    "a cat sat on the mat .",
    "the dog ran to the park and the cat came out .",
    "le chat est sur le tapis .",
    "naïve café",  # unknown words ([UNK]) and 2-byte characters: bytes are UTF-8 bytes of the raw text
    "le chien court au parc .",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def hand_nats(model, stream: list[int], scored: list[bool], context: int, stride: int) -> float:
    """Target t is scored by the first window (start k * stride) whose reach k * stride + context covers it, with
    the tokens from that start up to t as context: one plain forward pass per target."""
    nats = 0.0
    for t in range(1, len(stream)):
        if not scored[t]:
            continue
        begin = max(0, math.ceil((t - context) / stride)) * stride
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([stream[begin:t]])).logits[0, -1].double()
        nats -= torch.log_softmax(logits, -1)[stream[t]].item()
    return nats


@pytest.mark.parametrize(("context", "stride"), [(8, 3), (8, 8), (64, 32)])
def test_bits_per_byte_equals_a_hand_computation(tokenizer, context, stride):
    model = tiny_model("decoder", seed=3)
    result = lq.causal_lm_quality(model, tokenizer, TEXTS, context_length=context, stride=stride, progress=False)

    stream, scored = [], []
    for text in (
        TEXTS
    ):  # ours: EOS (</s>) before every text, as course_transformer/commands/train.py joins texts; never scored
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        stream += [tokenizer.eos_token_id] + ids
        scored += [False] + [True] * len(ids)
    nats = hand_nats(model, stream, scored, context, stride)
    num_bytes = sum(len(text.encode("utf-8")) for text in TEXTS)
    assert result["tokens"] == sum(scored)
    assert result["bytes"] == num_bytes and num_bytes > sum(len(t) for t in TEXTS)  # bytes, not characters
    assert result["separator"] == "</s>"
    assert result["round_trip"] < 1  # [UNK] and the word-level decoder do not give the texts back
    assert result["metrics"]["bits_per_byte"] == pytest.approx(nats / math.log(2) / num_bytes, abs=1e-5)
    assert result["metrics"]["loss"] == pytest.approx(nats / sum(scored), abs=1e-5)
    assert result["metrics"]["perplexity"] == pytest.approx(math.exp(result["metrics"]["loss"]), rel=1e-12)


@pytest.mark.parametrize(("length", "context", "stride"), [(2, 4, 4), (50, 8, 3), (50, 8, 8), (9, 8, 1), (17, 16, 8)])
def test_windows_score_every_target_once_with_contiguous_context(length, context, stride):
    windows = lq.sliding_windows(length, context, stride)
    scored = [t for w in windows for t in range(w.first, w.end + 1)]
    assert scored == list(range(1, length))  # every target once, in order
    for w in windows:
        assert w.end - w.begin <= context and w.begin < w.first  # inputs fit; each target has context
    with pytest.raises(ValueError, match="stride=9 is invalid"):
        lq.sliding_windows(length, 8, 9)


def _uniform(model):
    """All logits 0: every token has probability 1/V."""
    with torch.no_grad():
        head = model.get_output_embeddings()
        head.weight.zero_()
        if head.bias is not None:
            head.bias.zero_()
    return model


def test_uniform_logits_give_ln_vocab(tokenizer):
    model = _uniform(tiny_model("decoder"))
    vocab = model.config.vocab_size
    result = lq.causal_lm_quality(model, tokenizer, TEXTS, context_length=16, stride=8, progress=False)
    assert result["metrics"]["loss"] == pytest.approx(math.log(vocab), abs=1e-6)
    assert result["metrics"]["perplexity"] == pytest.approx(vocab, rel=1e-6)
    expected_bpb = result["tokens"] * math.log2(vocab) / result["bytes"]
    assert result["metrics"]["bits_per_byte"] == pytest.approx(expected_bpb, rel=1e-6)

    masked = _uniform(tiny_model("encoder"))
    for method in ("masked", "pseudo"):
        mlm = lq.masked_lm_quality(masked, tokenizer, TEXTS, method=method, progress=False)
        loss = mlm["metrics"]["mlm_loss" if method == "masked" else "pseudo_loss"]
        assert loss == pytest.approx(math.log(vocab), abs=1e-6)


def test_masked_lm_is_reproducible_and_pseudo_scores_every_token(tokenizer):
    model = tiny_model("encoder", seed=1)
    first = lq.masked_lm_quality(model, tokenizer, TEXTS, seed=7, progress=False)
    again = lq.masked_lm_quality(model, tokenizer, TEXTS, seed=7, progress=False)
    assert first["nats"] == again["nats"] and first["tokens"] == again["tokens"]
    words = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS]
    assert first["tokens"] == sum(max(1, round(0.15 * n)) for n in words)
    assert "bits_per_byte" not in first["metrics"]  # a masked-token loss is not a code length

    pseudo = lq.masked_lm_quality(model, tokenizer, TEXTS, method="pseudo", progress=False)
    assert pseudo["tokens"] == sum(words)
    assert pseudo["metrics"]["pseudo_bits_per_byte"] == pytest.approx(
        pseudo["nats"] / math.log(2) / pseudo["bytes"], rel=1e-12
    )
    with pytest.raises(ValueError, match="max_pseudo_tokens=10"):
        lq.masked_lm_quality(model, tokenizer, TEXTS, method="pseudo", max_pseudo_tokens=10, progress=False)


def test_separators(tokenizer):
    model = tiny_model("decoder")
    assert lq.separator_ids(model, tokenizer) == ([tokenizer.eos_token_id], "</s>")
    assert lq.separator_ids(model, tokenizer, "the") == ([tokenizer.convert_tokens_to_ids("the")], "the")
    with pytest.raises(ValueError, match="separator=' ' is invalid"):
        lq.separator_ids(model, tokenizer, " ")


# --------------------------------------------------------------------------------------------------------------
# The harness on saved folders
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_tokenizer():
    from course_transformer.commands.train_tokenizer import train_tokenizer

    return train_tokenizer("bpe", [" ".join(WORDS)] * 20 + TEXTS, 300)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, bpe_tokenizer):
    """A tiny decoder of ours, its GPT-2 export (a reference), a tiny masked LM, and a texts file."""
    from course_transformer.core.conversion import save_converted, to_gpt2

    root = tmp_path_factory.mktemp("harness")
    special = {"pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0}  # <|endoftext|>
    special.update(norm_placement="pre", scale_embeddings=False)  # GPT-2-shaped, so the parity step runs
    decoder = tiny_model("decoder", vocab_size=len(bpe_tokenizer), hidden_act="gelu_tanh", **special)
    decoder.save_pretrained(root / "decoder")
    bpe_tokenizer.save_pretrained(root / "decoder")
    reference = to_gpt2(tiny_model("decoder", seed=5, vocab_size=len(bpe_tokenizer), hidden_act="gelu", **special))
    save_converted(reference, root / "gpt2", tokenizer_source=root / "decoder")
    encoder = tiny_model("encoder")
    encoder.save_pretrained(root / "encoder")
    build_tokenizer().save_pretrained(root / "encoder")
    (root / "texts.txt").write_text("\n".join(TEXTS) + "\n\n")
    return root


def test_end_to_end_cli_on_a_saved_model(saved, tmp_path, capsys):
    from course_transformer.commands.publish import read_results

    out = tmp_path / "eval"
    argv = [str(saved / "decoder"), "--texts", str(saved / "texts.txt"), "--reference", str(saved / "gpt2")]
    code = evaluate_cli.main([*argv, "--output", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "bits_per_byte" in captured.out and "parity after export (gpt2): PASS" in captured.out

    report = json.loads((out / "report.json").read_text())
    rows = read_results(out / "report.json")  # what `publish --results` accepts
    assert {r["metric"] for r in rows} == {"loss", "perplexity", "bits_per_byte"}
    assert all(r["dataset"] == str(saved / "texts.txt") for r in rows)
    ours, gpt2 = report["lm_quality"]
    assert ours["model_class"] == "CourseTransformerForCausalLM" and gpt2["model_class"] == "GPT2LMHeadModel"
    assert ours["bytes"] == gpt2["bytes"] == sum(len(t.encode()) for t in TEXTS)  # same texts for every model
    assert ours["separator"] == "<|endoftext|>" and gpt2["separator"] == "\n"
    assert ours["context_length"] == gpt2["context_length"] == 64
    assert report["parity"]["passed"] and report["parity"]["export_max_logit_difference"] < 1e-5
    assert report["attention"]["num_layers"] == 2 and report["errors"] == []
    assert (out / "report.md").read_text().startswith("# Evaluation:")
    assert (out / "attention" / "report.md").is_file() and (out / "parity" / "parity.md").is_file()
    assert not list(tmp_path.glob(".eval.tmp-*"))

    # Run again into the same folder: refused without --overwrite (nothing touched), replaced with it.
    assert evaluate_cli.main([*argv, "--output", str(out), "--no-progress", "--no-attention"]) == 2
    assert "output_dir=" in capsys.readouterr().err
    again = [*argv, "--output", str(out), "--overwrite", "--no-attention", "--no-parity", "--no-progress"]
    assert evaluate_cli.main(again) == 0
    assert json.loads((out / "report.json").read_text())["attention"] == {
        "skipped": "attention=False (--no-attention)"
    }


def test_masked_model_and_skipped_parity(saved, tmp_path):
    report = run_harness(
        saved / "encoder", tmp_path / "mlm", texts=TEXTS, attention=False, mlm_method="pseudo", progress=False
    )
    (quality,) = report["lm_quality"]
    assert quality["objective"] == "masked_lm" and "pseudo_bits_per_byte" in quality["metrics"]
    assert "not BERT-shaped" in report["parity"]["skipped"]  # the tiny encoder has no embedding LayerNorm
    assert {r["metric"] for r in report["results"]} == {"pseudo_loss", "pseudo_perplexity", "pseudo_bits_per_byte"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": "missing"}, "model_path='{root}/missing' is invalid: no such folder"),
        ({"model": ""}, "model_path='{root}' is invalid: not a saved model: the folder has no config.json"),
        ({"texts": "empty.txt"}, "texts_file='{root}/empty.txt' is invalid: the file has no non-empty line"),
        ({"reference": "gpt5"}, "reference='gpt5' is invalid: allowed values are smollm2 or a saved causal"),
        ({"dataset": "no-data"}, "dataset='{root}/no-data' is invalid: no such folder; prepare the corpus with "),
        ({"stride": "65"}, "stride=65 is invalid: allowed: 1 <= stride <= context_length=64"),
        ({"context-length": "65"}, "context_length=65 is invalid: {root}/decoder accepts at most 64 positions"),
        ({"model": "gpt2", "mlm-method": "gibbs"}, "invalid choice: 'gibbs'"),
    ],
)
def test_bad_inputs_are_named_and_leave_nothing_behind(saved, tmp_path, capsys, change, message):
    (saved / "empty.txt").write_text("\n  \n")
    model = str(saved / change.pop("model", "decoder"))
    argv = [model, "--output", str(tmp_path / "out"), "--no-progress"]
    for key, value in change.items():
        argv += [f"--{key}", str(saved / value) if key in ("texts", "dataset") else value]
    if "texts" not in change and "dataset" not in change:
        argv += ["--texts", str(saved / "texts.txt")]
    try:
        code = evaluate_cli.main(argv)
    except SystemExit as exit_:  # argparse's own usage errors
        code = exit_.code
    assert code == 2
    assert message.format(root=saved) in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_run_harness_refuses_empty_texts_in_python(saved, tmp_path):
    with pytest.raises(HarnessInputError, match=r"texts='\[...\]' is invalid: no non-empty text"):
        run_harness(saved / "decoder", tmp_path / "out", texts=["", "   "])
    assert not (tmp_path / "out").exists()


def test_cli_help_lists_the_options_and_defaults():
    result = subprocess.run(
        [sys.executable, "-m", "course_transformer.cli", "evaluate", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    for text in ("--max-texts", "--reference NAME|PATH", "--texts FILE", "(default: test)", "(default: outputs/eval)"):
        assert text in result.stdout
