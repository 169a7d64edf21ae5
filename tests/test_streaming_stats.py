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
    # Blocks of 2: the first block of the left-padded row ends before its first real token (position 3).
    stats = streaming_attention_stats(
        model, {"input_ids": ids, "attention_mask": mask}, special_mask=special, block_size=2
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


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@torch.no_grad()
def test_seq2seq_self_and_cross_attention_equal_full_matrix(backend):
    """Encoder, decoder and cross-attention (keys: the padded source) equal the statistics of the returned weights;
    a source length equal to the target length must not turn the encoder mask into a query mask."""
    model = tiny_model("encoder-decoder", attn_implementation=backend)
    ids, mask = padded([6, 3], side="right")
    decoder_ids = torch.tensor([[1, 5, 9, 13, 7, 4]]).expand(2, -1)  # T = S = 6 on purpose
    inputs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_ids}
    special = ids == 0
    stats = streaming_attention_stats(model, inputs, special_mask=special, block_size=4)
    out = model(**inputs, output_attentions=True)
    layers = model.config.num_encoder_layers
    expected = [stats_from_weights(w, mask, special) for w in out.encoder_attentions]
    for self_w, cross_w in zip(out.decoder_attentions, out.cross_attentions, strict=True):
        expected += [stats_from_weights(self_w), stats_from_weights(cross_w, mask, special, cross=True)]
    assert stats.layer_names[layers].endswith("self_attn") and stats.layer_names[layers + 1].endswith("cross_attn")
    assert stats.special_mass is None  # the seq2seq decoder's self-attention has no special mask
    for index, ref in enumerate(expected):
        for name in ("entropy", "distance", "first_token_mass", "received"):
            torch.testing.assert_close(getattr(stats, name)[index], ref[name], atol=1e-5, rtol=1e-5)
    assert stats.received[layers + 1, 1, :, 3:].abs().max() == 0  # cross-attention never reaches source padding


@pytest.mark.parametrize("position_encoding", ["learned", "alibi"])
@torch.no_grad()
def test_pruned_heads_keep_their_index_and_their_alibi_slope(position_encoding):
    model = tiny_model(position_encoding=position_encoding, attn_implementation="sdpa")
    model.prune_heads({"decoder.0.self": [1], "decoder.1.self": [0, 3]})
    ids, mask = padded([8, 5], side="left")
    stats = streaming_attention_stats(model, {"input_ids": ids, "attention_mask": mask}, block_size=3)
    weights = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions  # zeros at pruned heads
    pruned = {0: [1], 1: [0, 3]}
    for layer, w in enumerate(weights):
        kept = [h for h in range(4) if h not in pruned[layer]]
        ref = stats_from_weights(w, mask)
        assert stats.entropy[layer][:, pruned[layer]].isnan().all()
        for name in ("entropy", "distance", "first_token_mass"):
            torch.testing.assert_close(getattr(stats, name)[layer][:, kept], ref[name][:, kept], atol=1e-5, rtol=0)
    per_head = stats.to_dict()["per_head"]["entropy"]
    assert per_head[1][0] is None and per_head[1][1] is not None  # JSON-ready: None, not NaN


def _hugging_face(family: str):
    """Tiny seeded transformers models the old Q/K-recomputing hooks refused: q/k norms (Qwen3), a sliding window
    shorter than the input (Mistral), grouped-query attention (both)."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from evaluation.tiny import tiny_llama_config

    fields = tiny_llama_config().to_dict()
    fields = {k: fields[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size")}
    fields.update(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    if family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**fields, head_dim=8))
        for layer in model.model.layers:  # norms that are not the identity: the lens must see Q and K after them
            torch.nn.init.uniform_(layer.self_attn.q_norm.weight, 0.5, 2.0)
            torch.nn.init.uniform_(layer.self_attn.k_norm.weight, 0.5, 2.0)
    else:
        model = MistralForCausalLM(MistralConfig(**fields, sliding_window=3))
    model.set_attn_implementation("eager")
    return model.eval()


@pytest.mark.parametrize("family", ["qwen3", "mistral-window"])
@torch.no_grad()
def test_q_k_norms_and_sliding_windows_equal_the_eager_weights(family):
    model = _hugging_face(family)
    ids, mask = padded([9, 6], side="left")
    special = ids == ids[0, 0]
    inputs = {"input_ids": ids, "attention_mask": mask}
    stats = streaming_attention_stats(model, inputs, special_mask=special, block_size=2)
    assert model.config._attn_implementation == "eager"  # the lens restores the model's own backend
    weights = model(**inputs, output_attentions=True).attentions
    if family == "mistral-window":
        assert weights[0][0, :, -1, :-3].abs().max() == 0  # the window shapes the weights compared against
    assert stats.layer_names == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    for layer, w in enumerate(weights):
        ref = stats_from_weights(w, mask, special)
        for name in ("entropy", "distance", "first_token_mass", "special_mass", "received"):
            torch.testing.assert_close(getattr(stats, name)[layer], ref[name], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_bart_with_a_target_shorter_than_the_source():
    """transformers' BART: encoder, decoder and cross-attention (T = 4 queries, S = 9 keys) equal the statistics of
    its eager weights; `received` pads the decoder's 4 keys to the encoder's 9."""
    from transformers import BartModel

    from evaluation.tiny import tiny_bart_config

    torch.manual_seed(0)
    model = BartModel(tiny_bart_config(encoder_layers=1, decoder_layers=1)).eval()
    model.set_attn_implementation("eager")
    ids, mask = padded([9, 6], side="right")
    inputs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": torch.tensor([[2, 5, 9, 13]] * 2)}
    stats = streaming_attention_stats(model, inputs, block_size=3)
    out = model(**inputs, output_attentions=True)
    expected = [stats_from_weights(out.encoder_attentions[0], mask), stats_from_weights(out.decoder_attentions[0])]
    expected.append(stats_from_weights(out.cross_attentions[0], mask, cross=True))
    assert stats.layer_names[2] == "decoder.layers.0.encoder_attn" and stats.received.shape == (3, 2, 4, 9)
    for index, ref in enumerate(expected):
        for name in ("entropy", "distance", "first_token_mass", "received"):
            value = getattr(stats, name)[index][..., : ref[name].shape[-1]]
            torch.testing.assert_close(value, ref[name], atol=1e-5, rtol=1e-5)
    assert stats.received[1, :, :, 4:].abs().max() == 0
