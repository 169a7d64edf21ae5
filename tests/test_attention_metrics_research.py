"""The `evaluate` modules of the attention research measures: attention_sinks (Xiao et al. 2023) and attention_norms
(Kobayashi et al. 2020). Known answers by hand, and agreement with the project's own computations of the same
quantity (streaming statistics; norm-based attention from captured value vectors), fp32 inputs, tolerance 1e-6
(sums of a few fp32 probabilities)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import padded, tiny_model

from evaluation.analysis import load_metric
from evaluation.attention_flow import capture_attention_values, norm_attention
from evaluation.streaming_stats import streaming_attention_stats


@pytest.fixture(scope="module")
def sinks():
    return load_metric("attention_sinks")


@pytest.fixture(scope="module")
def norms():
    return load_metric("attention_norms")


def test_sink_mass_by_hand(sinks):
    # L=1, H=2, T=3. Head 0: every query on token 0; head 1: uniform causal.
    a = np.zeros((1, 2, 3, 3))
    a[0, 0, :, 0] = 1.0
    a[0, 1] = np.tril(np.ones((3, 3))) / np.arange(1, 4)[:, None]
    out = sinks.compute(attentions=[a], attention_mask=[[1, 1, 1]])
    assert out["sink_mass"][0] == pytest.approx([1.0, (1 / 2 + 1 / 3) / 2], abs=1e-7)  # queries 1 and 2
    assert out["uniform_level"] == pytest.approx((1 / 2 + 1 / 3) / 2, abs=1e-12)  # head 1 sits exactly there
    two = sinks.compute(attentions=[a], attention_mask=[[1, 1, 1]], sink_tokens=2)  # only query 2 is left
    assert two["sink_mass"][0] == pytest.approx([1.0, 2 / 3], abs=1e-7)
    padded_text = np.zeros((1, 2, 4, 4))
    padded_text[:, :, 1:, 1:] = a  # a left pad: the sink is the first REAL token
    assert sinks.compute(attentions=[padded_text], attention_mask=[[0, 1, 1, 1]])["sink_mass"] == out["sink_mass"]


def test_sink_mass_equals_the_streaming_statistics(sinks):
    model = tiny_model(attn_implementation="eager")
    ids, mask = padded([9])
    with torch.no_grad():
        attentions = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    stacked = torch.stack(attentions)[:, 0].numpy()  # (L, H, T, T)
    ours = sinks.compute(attentions=[stacked], attention_mask=mask.tolist(), skip_queries=0)["sink_mass"]
    stream = streaming_attention_stats(model, {"input_ids": ids, "attention_mask": mask}, block_size=4)
    assert np.abs(np.array(ours) - stream.first_token_mass[:, 0].numpy()).max() <= 1e-6


def test_sinks_refuse_bad_arguments(sinks):
    a = np.full((1, 1, 2, 2), 0.5)
    with pytest.raises(ValueError, match=r"sink_tokens=0: allowed is a count >= 1"):
        sinks.compute(attentions=[a], attention_mask=[[1, 1]], sink_tokens=0)
    with pytest.raises(ValueError, match=r"no query after skip_queries=2"):
        sinks.compute(attentions=[a], attention_mask=[[1, 1]], sink_tokens=2)


def test_norm_shares_by_hand(norms):
    # L=1, H=1, T=3: query rows (0.5, 0.25, 0.25); ‖f‖ = (1, 2, 2); class = token 0.
    a = np.tile(np.array([0.5, 0.25, 0.25]), (1, 1, 3, 1))
    f = np.array([[[1.0, 2.0, 2.0]]])
    out = norms.compute(attentions=[a], value_norms=[f], attention_mask=[[1, 1, 1]], key_class=[[1, 0, 0]])
    assert out["by_weights"] == pytest.approx([0.5])
    assert out["by_norms"] == pytest.approx([0.5 / (0.5 + 0.5 + 0.5)])  # α‖f‖ = (0.5, 0.5, 0.5)
    assert out["class_norm"] == pytest.approx([1.0]) and out["other_norm"] == pytest.approx([2.0])


def test_norm_shares_equal_a_direct_computation_on_a_model(norms):
    model = tiny_model("encoder", attn_implementation="sdpa")
    ids, mask = padded([8])
    key_class = torch.zeros_like(ids)
    key_class[0, [0, 7]] = 1  # mark two keys, as [CLS] and [SEP] would be
    with torch.no_grad():
        layers = capture_attention_values(model, {"input_ids": ids, "attention_mask": mask})
    attentions = np.stack([w[0].numpy() for w, _ in layers])  # (L, H, T, T)
    value_norms = np.stack([v[0].norm(dim=-1).numpy() for _, v in layers])  # (L, H, T)
    out = norms.compute(
        attentions=[attentions], value_norms=[value_norms], attention_mask=mask.tolist(), key_class=key_class.tolist()
    )
    cls = key_class[0].bool()
    for layer, (weights, values) in enumerate(layers):
        per_head, _ = norm_attention(weights[0], values[0])  # (H, T, S): α‖f‖
        direct = (per_head[..., cls].sum(-1) / per_head.sum(-1)).mean().item()
        assert abs(out["by_norms"][layer] - direct) <= 1e-6
        assert abs(out["by_weights"][layer] - weights[0][..., cls].sum(-1).mean().item()) <= 1e-6
