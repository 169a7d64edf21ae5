"""Streaming attention statistics: known answers on hand-built patterns, and equality with the full matrix."""

from __future__ import annotations

import math

import pytest
import torch

from evaluation.streaming_stats import block_stats, stats_from_weights, streaming_attention_stats
from tests.conftest import padded, tiny_model


def test_uniform_causal_attention_known_answers():
    """Q = 0: query i attends uniformly to keys 0..i, so entropy log(i+1), distance i/2, first-token mass 1/(i+1)."""
    length = 6
    query, key = torch.zeros(1, 1, length, 4), torch.randn(1, 1, length, 4)
    stats = block_stats(query, key, 1.0, causal=True, block_size=4)
    i = torch.arange(length, dtype=torch.float64)
    assert stats["entropy"].item() == pytest.approx(torch.log(i + 1).mean().item(), abs=1e-6)
    assert stats["distance"].item() == pytest.approx((i / 2).mean().item(), abs=1e-6)
    assert stats["first_token_mass"].item() == pytest.approx((1 / (i + 1)).mean().item(), abs=1e-6)
    expected_received = torch.tensor([sum(1 / (q + 1) for q in range(j, length)) for j in range(length)])
    torch.testing.assert_close(stats["received"][0, 0], expected_received.float(), atol=1e-6, rtol=0)


def test_sink_pattern_puts_all_mass_on_the_first_token():
    query = torch.tensor([[1.0, 0.0]]).repeat(5, 1)[None, None]  # (1, 1, 5, 2)
    key = torch.zeros(1, 1, 5, 2)
    key[0, 0, 0, 0] = 100.0  # only the first key matches every query
    special = torch.tensor([[True, False, False, False, True]])
    stats = block_stats(query, key, 1.0, causal=False, special_mask=special, block_size=2)
    assert stats["first_token_mass"].item() == pytest.approx(1.0, abs=1e-6)
    assert stats["entropy"].item() == pytest.approx(0.0, abs=1e-6)
    assert stats["special_mass"].item() == pytest.approx(1.0, abs=1e-6)
    assert stats["distance"].item() == pytest.approx(sum(range(5)) / 5, abs=1e-6)


@pytest.mark.parametrize("position_encoding", ["learned", "rope", "alibi"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@torch.no_grad()
def test_streaming_equals_full_matrix(position_encoding, backend):
    model = tiny_model(position_encoding=position_encoding, attn_implementation=backend)
    ids, mask = padded([9, 6], side="left")
    special = ids == ids[0, 0]
    stats = streaming_attention_stats(
        model, {"input_ids": ids, "attention_mask": mask}, special_mask=special, block_size=4
    )
    weights = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    assert len(stats.layer_names) == len(weights)
    for layer, w in enumerate(weights):
        ref = stats_from_weights(w, mask, special)
        for name in ("entropy", "distance", "first_token_mass", "special_mass", "received"):
            torch.testing.assert_close(getattr(stats, name)[layer], ref[name], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_encoder_and_layer_choice_and_errors():
    model = tiny_model("encoder")
    ids, mask = padded([7, 4], side="right")
    stats = streaming_attention_stats(model, {"input_ids": ids, "attention_mask": mask}, layers=[-1])
    weights = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions[-1]
    torch.testing.assert_close(stats.entropy[0], stats_from_weights(weights, mask)["entropy"], atol=1e-5, rtol=0)
    assert stats.entropy[0, 1].max() <= math.log(4) + 1e-6  # 4 real keys at most
    with pytest.raises(ValueError, match="out of range"):
        streaming_attention_stats(model, {"input_ids": ids}, layers=[5])
    with pytest.raises(ValueError, match="block_size"):
        streaming_attention_stats(model, {"input_ids": ids}, block_size=0)
