"""The attention lens on transformers' own architectures: a representative slice of the conformance matrix.

`scripts/lens_conformance.py` builds every architecture that calls `ALL_ATTENTION_FUNCTIONS` tiny and checks the
lens against eager and the model's fast kernel (docs/attention_lens.md). Here the same builder and checks run on
architectures chosen so that every feature the lens handles is exercised at least once: GQA (llama, mistral,
qwen2, qwen3 with its q/k norms), sliding windows (mistral, gemma2, gemma3), soft-capping (gemma2), attention
sinks (gpt-oss), T5's position_bias, encoders (bert, roberta, distilbert, albert, electra, xlm-roberta), decoders
(gpt2, gpt-neox, phi3, olmo2, smollm3), encoder-decoders with cross-attention (bart, t5, whisper), and the cases
that were once silently wrong (Granite's sinks, BitNet, DiffLlama, NLLB-MoE, MiniCPM3); GIT, PegasusX and DeepSeek-V3.2
must be refused. Each case
asserts the numbers (tolerance 1e-5), that the features it is here for were really exercised, and that the
ablation moved the output (so the ablation check is not vacuous).
"""

from __future__ import annotations

import pytest
import torch
import transformers

import modeling.attention_lens as lens_module
from scripts.lens_conformance import TOLERANCE, check, discover

ARCHITECTURES = {arch.name: arch for arch in discover()}

# architecture -> features the case must exercise (from the probed attention calls; see `features`).
EXACT = {
    "llama": ["causal", "GQA"],
    "mistral": ["GQA", "sliding window"],
    "qwen2": ["GQA"],
    "qwen3": ["GQA"],
    "gemma": ["causal"],
    "gemma2": ["softcap", "sliding window", "GQA"],
    "gemma3": ["sliding window", "GQA"],
    "gpt_oss": ["sinks", "sliding window"],
    "phi3": ["causal"],
    "olmo2": ["causal"],
    "smollm3": ["causal"],
    "gpt2": ["causal"],
    "gpt_neox": ["causal"],
    "opt": ["causal"],
    "bert": ["bidirectional"],
    "roberta": ["bidirectional"],
    "distilbert": ["bidirectional"],
    "albert": ["bidirectional"],
    "electra": ["bidirectional"],
    "xlm_roberta": ["bidirectional"],
    "vit": ["image", "bidirectional"],
    "bart": ["encoder-decoder", "cross-attention"],
    "t5": ["encoder-decoder", "cross-attention", "position_bias"],
    "whisper": ["audio features", "encoder-decoder", "cross-attention"],
    "m2m_100": ["encoder-decoder", "cross-attention"],
    # Cases that were silently wrong before the lens learned them: Granite's sink convention (plain softmax,
    # output scaled), BitNet's sub-norm and differential attention between the heads and W_O, a decoder without
    # `is_causal` in a model without sdpa (NLLB-MoE: eager masks), latent attention (V narrower than Q and K).
    "granite_swa": ["sinks", "sliding window"],
    "bitnet": ["causal"],
    "diffllama": ["causal"],
    "nllb_moe": ["encoder-decoder", "cross-attention"],
    "minicpm3": ["V dim ≠ QK dim"],
}
# Architectures the lens must refuse, with what its message names.
REFUSED = {
    "git": "outside transformers' attention interface",  # its text attention computes its own softmax
    "pegasus_x": "outside transformers' attention interface",  # its encoder's global-local attention
    "deepseek_v32": "['indices']",  # sparse attention: keys selected by index
}
# Architectures the lens may decline, but never get silently wrong: exact within tolerance, or refused.
EXACT_OR_REFUSED = ["modernbert"]


@pytest.fixture(autouse=True)
def _quiet_single_thread():
    """Tiny models gain nothing from threads, and on shared cores two threads per forward cost more than they give."""
    verbosity, threads = transformers.logging.get_verbosity(), torch.get_num_threads()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity(verbosity)


def _numbers(result) -> str:
    return (
        f"{result.name}: {result.status}; weights {result.weights_diff}, output {result.output_diff} "
        f"(bit-identical to sdpa: {result.bit_identical}), ablation {result.ablation_diff} at {result.ablation_site}; "
        f"{result.detail}"
    )


@pytest.mark.parametrize("name", sorted(EXACT))
def test_lens_matches_eager_and_the_fast_kernel(name):
    result = check(ARCHITECTURES[name])
    assert result.status == "exact", _numbers(result)
    assert result.weights_diff <= TOLERANCE, _numbers(result)
    assert result.output_diff_plain <= TOLERANCE and result.output_diff_weights <= TOLERANCE, _numbers(result)
    assert result.ablation_diff <= TOLERANCE, _numbers(result)
    if result.fast_kernel == "sdpa":
        assert result.bit_identical, _numbers(result)
    assert result.attention_maps >= 2, _numbers(result)
    assert result.ablation_effect > 1e-4, f"the ablated head did not change the output: {_numbers(result)}"
    missing = [feature for feature in EXACT[name] if feature not in result.features]
    assert not missing, f"{name} no longer exercises {missing}: {result.features}"


@pytest.mark.parametrize("name", EXACT_OR_REFUSED)
def test_lens_is_exact_or_refuses(name):
    result = check(ARCHITECTURES[name])
    assert result.status in ("exact", "refused"), _numbers(result)
    if result.status == "refused":
        assert "the lens cannot make that exact" in result.detail, result.detail
    else:
        assert max(result.weights_diff, result.output_diff, result.ablation_diff) <= TOLERANCE, _numbers(result)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_lens_refuses_what_it_cannot_make_exact(name):
    result = check(ARCHITECTURES[name])
    assert result.status == "refused", _numbers(result)
    assert REFUSED[name] in result.detail, result.detail


def test_the_matrix_catches_a_lens_that_drops_the_position_bias(monkeypatch):
    """The checks can fail: a lens that forgets T5's relative bias is reported as a mismatch, with numbers."""
    additive_mask = lens_module.additive_mask

    def without_bias(query, key, attention_mask, is_causal, position_bias=None, knockout=None):
        return additive_mask(query, key, attention_mask, is_causal, None, knockout)

    monkeypatch.setattr(lens_module, "additive_mask", without_bias)
    result = check(ARCHITECTURES["t5"])
    assert result.status == "mismatch", _numbers(result)
    assert result.weights_diff > 1e-3, _numbers(result)


def test_the_matrix_catches_an_ablation_of_the_wrong_head(monkeypatch):
    """An ablation that zeroes the neighbouring head is a mismatch, though weights and outputs stay exact."""
    intervene = lens_module.intervene

    def shifted(output, weights, request):
        if request is not None and request.head_scale is not None:
            request.head_scale = torch.roll(request.head_scale, 1)
        return intervene(output, weights, request)

    monkeypatch.setattr(lens_module, "intervene", shifted)
    result = check(ARCHITECTURES["llama"])
    assert result.status == "mismatch", _numbers(result)
    assert result.weights_diff <= TOLERANCE and result.ablation_diff > 1e-4, _numbers(result)
