"""The FLOPs-per-token estimate behind every MFU figure (benchmark and training log), checked by hand."""

from __future__ import annotations

import pytest

import modeling
from evaluation.flops import matmul_parameters, peak_bf16_flops, transformer_flops_per_token


def test_gpt2_124m_flops_per_token_by_hand():
    model = modeling.CourseTransformerForCausalLM(modeling.load_preset("gpt2-124m"))
    params = matmul_parameters(model)
    # 124,439,808 parameters (the released GPT-2 small) less the 1024 x 768 position table; the tied head once.
    assert params == 124_439_808 - 1024 * 768
    flops = transformer_flops_per_token(params, num_layers=12, hidden_size=768, seq_len=1024)
    assert flops == 6 * 123_653_376 + 12 * 12 * 768 * 1024 == 855_166_464


def test_sinusoidal_models_have_no_position_parameters_to_subtract():
    model = modeling.CourseTransformerForCausalLM(modeling.load_preset("tiny-decoder", position_encoding="sinusoidal"))
    assert matmul_parameters(model) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name, peak",
    [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-40GB", 312e12), ("cpu", None)],
)
def test_peak_by_device_name(name, peak):
    assert peak_bf16_flops(name) == peak


@pytest.mark.parametrize(
    "field, value", [("num_params", 0), ("seq_len", -1), ("num_layers", 2.5), ("hidden_size", True)]
)
def test_bad_sizes_are_named(field, value):
    sizes = dict(num_params=10, num_layers=1, hidden_size=8, seq_len=4) | {field: value}
    with pytest.raises(ValueError, match=f"{field}="):
        transformer_flops_per_token(**sizes)
