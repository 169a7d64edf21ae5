"""The parity harness: it writes its reports, passes on a faithful conversion and fails on a perturbed one."""

from __future__ import annotations

import json

import pytest
import torch

from evaluation import gpt2_vocab, parity

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def read_report(folder) -> dict:
    for name in ("parity.json", "parity.md", "parity.png"):
        assert (folder / name).is_file(), name
    assert (folder / "parity.png").read_bytes()[:8] == PNG_MAGIC
    return json.loads((folder / "parity.json").read_text())


@pytest.mark.parametrize("reference, heads", [("bert-tiny", 4), ("gpt2-tiny", 4)])
def test_cli_writes_reports_and_passes(tmp_path, reference, heads):
    assert parity.main(["--reference", reference, "--output", str(tmp_path)]) == 0
    report = read_report(tmp_path)
    assert report["passed"] and report["dtype"] == "float32" and report["tolerance"] == 1e-5
    eager = report["eager"]
    assert len(eager["layers"]) == 2 and all(len(x["attention_per_head"]) == heads for x in eager["layers"])
    assert len(eager["hidden_states"]) == 3  # embeddings + one per layer
    assert eager["outputs"]["logits"]["max"] <= 1e-5
    assert eager["max_abs_diff"] <= 1e-5
    # Weights asked for under sdpa come from the fused kernel's log-sum-exp: rounding-level from eager, not 0.
    assert report["sdpa_vs_eager_ours"]["max_abs_diff"] <= 1e-5
    assert report["round_trip"]["reference_to_ours_to_reference_exact"]
    assert report["round_trip"]["ours_to_reference_to_ours_exact"]
    # The batch is really padded, and padded keys got exactly zero weight in the reference.
    lengths = [len(t) for t in report["tokens"]]
    assert min(lengths) < max(lengths) == report["batch_shape"][1]
    markdown = (tmp_path / "parity.md").read_text()
    assert "| layer |" in markdown and "PASS" in markdown


def test_perturbed_weight_makes_the_cli_fail(tmp_path, capsys):
    assert parity.main(["--reference", "gpt2-tiny", "--output", str(tmp_path), "--perturb", "1e-3"]) == 1
    report = read_report(tmp_path)
    assert not report["passed"]
    assert report["perturbation"].endswith("self_attn.q_proj.weight[0, 0] += 0.001")
    assert report["eager"]["layers"][0]["attention_max"] > 1e-5  # visible from the first layer on
    assert report["eager"]["failures"]
    assert "FAIL" in (tmp_path / "parity.md").read_text()
    assert "layer 0 attention" in capsys.readouterr().err


def test_bfloat16_run_reports_against_its_stated_tolerance(tmp_path):
    assert parity.main(["--reference", "bert-tiny", "--output", str(tmp_path), "--dtype", "bfloat16"]) == 0
    report = read_report(tmp_path)
    assert report["dtype"] == "bfloat16" and report["tolerance"] == parity.TOLERANCES["bfloat16"] > 1e-5
    assert report["round_trip"]["passed"]


def test_local_folder_reference_without_tokenizer(tmp_path):
    """PATH references: any saved GPT-2 folder; with no tokenizer the byte-level ids are used and noted."""
    model = parity.load_reference("gpt2-tiny", seed=3).model
    model.save_pretrained(tmp_path / "gpt2")
    assert parity.main(["--reference", str(tmp_path / "gpt2"), "--output", str(tmp_path / "out")]) == 0
    report = read_report(tmp_path / "out")
    assert report["passed"] and report["reference_class"] == "GPT2LMHeadModel"
    assert any("byte-level" in note for note in report["notes"])


def test_unknown_reference_fails_naming_the_step(tmp_path, capsys):
    assert parity.main(["--reference", str(tmp_path / "missing"), "--output", str(tmp_path / "out")]) == 2
    assert "step 'load reference'" in capsys.readouterr().err


def test_run_parity_compares_all_positions_including_padding(tmp_path):
    """The harness compares padded rows and columns too; a model that disagrees only there must fail."""
    reference = parity.load_reference("bert-tiny")
    report = parity.run_parity(reference, tmp_path, figure=False)
    assert report["passed"]
    real = report["eager"]["hidden_states"][-1]["max_real_tokens"]
    assert real <= report["eager"]["hidden_states"][-1]["max"]

    # Now corrupt only the padded positions of our output: the comparison must notice.
    ours = {"hidden_states": [torch.zeros(1, 2, 3)], "attentions": [], "outputs": {}}
    ref = {"hidden_states": [torch.zeros(1, 2, 3)], "attentions": [], "outputs": {}}
    ours["hidden_states"][0][0, 1] = 1.0  # position 1 is padding
    result = parity.compare(ours, ref, torch.tensor([[1, 0]]), 1e-5)
    assert not result["passed"] and result["hidden_states"][0]["max_real_tokens"] == 0.0


def test_minilm_real_checkpoint_parity(tmp_path):
    if parity.importlib.util.find_spec(parity.MINILM_PACKAGE) is None:
        pytest.skip(f"{parity.MINILM_REQUIREMENT} is not installed (`make install` installs it)")
    assert parity.main(["--reference", "bert-minilm", "--output", str(tmp_path)]) == 0
    report = read_report(tmp_path)
    assert report["reference_class"] == "BertModel" and len(report["eager"]["layers"]) == 6
    assert all(len(x["attention_per_head"]) == 12 for x in report["eager"]["layers"])
    assert report["eager"]["max_abs_diff"] <= 1e-5
    assert "pooler_output" in report["eager"]["outputs"]
    assert report["passed"]


def test_bpe_merges_are_recovered_from_ranks():
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"bc": 4, b"abc": 5, b"cab": 6}
    # "abc" is built by the lowest merge available below rank 5: a+b (3) beats b+c (4), then ab+c.
    assert gpt2_vocab.recover_merges(ranks) == [(b"a", b"b"), (b"b", b"c"), (b"ab", b"c"), (b"c", b"ab")]


@pytest.mark.skipif(
    not (gpt2_vocab.DEFAULT_CACHE_DIR / "gpt2.tiktoken").is_file(),
    reason="GPT-2 vocabulary not cached (run `python -m evaluation.gpt2_vocab` once; it downloads "
    "the openai-whisper sdist from PyPI)",
)
def test_rebuilt_gpt2_vocabulary_encodes_like_gpt2():
    tokenizer = gpt2_vocab.load_gpt2_tokenizer(download=False)
    assert len(tokenizer) == 50257
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"] == [
        464,
        2068,
        7586,
        21831,
        18045,
        625,
        262,
        16931,
        3290,
        13,
    ]
    assert tokenizer.decode([15496, 995]) == "Hello world"


def test_failed_vocabulary_download_fails_naming_the_step(tmp_path, monkeypatch, capsys):
    """No network (or no PyPI): `--reference gpt2` stops with exit 2 and says which step failed."""
    import subprocess

    def no_network(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(gpt2_vocab, "DEFAULT_CACHE_DIR", tmp_path / "vocab")
    from course_transformer.core import io

    monkeypatch.setattr(io.subprocess, "run", no_network)  # the one sdist downloader, used by gpt2_vocab
    assert parity.main(["--reference", "gpt2", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "step 'gpt2 vocabulary'" in err and "step 'download'" in err and "openai-whisper==20250625" in err
    assert not (tmp_path / "vocab" / "gpt2.tiktoken").exists()
