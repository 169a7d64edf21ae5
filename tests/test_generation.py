"""KV-cached generation equals generation without the cache; left padding; cross-attention computed once."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, padded, tiny_model
from transformers import DynamicCache, EncoderDecoderCache

ENCODINGS = ["sinusoidal", "learned", "rope", "alibi"]


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_decoder_cached_equals_uncached(encoding, num_beams, backend):
    model = tiny_model("decoder", position_encoding=encoding, attn_implementation=backend)
    ids, mask = padded([6, 3, 5])
    kwargs = dict(max_new_tokens=8, do_sample=False, num_beams=num_beams, pad_token_id=0, eos_token_id=None)
    cached = model.generate(ids, attention_mask=mask, use_cache=True, **kwargs)
    uncached = model.generate(ids, attention_mask=mask, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    assert cached.shape == (3, 6 + 8)


@pytest.mark.parametrize("encoding", ["sinusoidal", "learned", "rope", "alibi"])
def test_left_padded_batch_generates_like_single_rows(encoding):
    model = tiny_model("decoder", position_encoding=encoding, attn_implementation="sdpa")
    ids, mask = padded([6, 3, 5], seed=1)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    batch = model.generate(ids, attention_mask=mask, **kwargs)
    for i in range(3):
        row = ids[i][mask[i].bool()][None]
        alone = model.generate(row, **kwargs)
        assert torch.equal(batch[i, -6:], alone[0, -6:])


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("num_beams", [1, 3])
def test_seq2seq_cached_equals_uncached(encoding, num_beams):
    model = tiny_model("encoder-decoder", position_encoding=encoding, attn_implementation="sdpa")
    src, mask = padded([7, 4], seed=2)
    kwargs = dict(max_new_tokens=7, do_sample=False, num_beams=num_beams, pad_token_id=0, eos_token_id=None)
    cached = model.generate(src, attention_mask=mask, use_cache=True, **kwargs)
    uncached = model.generate(src, attention_mask=mask, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    assert cached[0, 0].item() == model.config.decoder_start_token_id


def test_incremental_forward_matches_full_forward():
    """Logits of a token fed one at a time with the cache equal the logits of the full forward (fp32, 1e-5)."""
    for arch in ("decoder", "encoder-decoder"):
        model = tiny_model(arch, position_encoding="rope", attn_implementation="sdpa")
        seq = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
        if arch == "decoder":
            full = model(seq).logits
            cache = DynamicCache(config=model.config)
            steps = [model(seq[:, :3], past_key_values=cache, use_cache=True).logits]
            for t in range(3, 8):
                steps.append(model(seq[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
        else:
            src = seq[:, :5]
            full = model(src, decoder_input_ids=seq).logits
            cache = EncoderDecoderCache(DynamicCache(config=model.config), DynamicCache(config=model.config))
            enc = model.get_encoder()(input_ids=src)
            steps = [model(encoder_outputs=enc, decoder_input_ids=seq[:, :3], past_key_values=cache).logits]
            for t in range(3, 8):
                steps.append(
                    model(encoder_outputs=enc, decoder_input_ids=seq[:, t : t + 1], past_key_values=cache).logits
                )
            assert all(cache.is_updated.values())
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


def test_cross_attention_keys_are_projected_once(monkeypatch):
    model = tiny_model("encoder-decoder", attn_implementation="sdpa")
    calls = []
    k_proj = model.model.decoder.layers[0].cross_attn.k_proj
    k_proj.register_forward_hook(lambda *a: calls.append(1))
    src = torch.randint(3, VOCAB, (1, 5))
    model.generate(src, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert len(calls) == 1


def test_sampling_is_seeded_and_respects_vocab():
    model = tiny_model("decoder", attn_implementation="sdpa")
    ids = torch.randint(3, VOCAB, (2, 4))
    torch.manual_seed(0)
    a = model.generate(ids, do_sample=True, top_k=10, max_new_tokens=5, pad_token_id=0)
    torch.manual_seed(0)
    b = model.generate(ids, do_sample=True, top_k=10, max_new_tokens=5, pad_token_id=0)
    assert torch.equal(a, b) and a.max() < VOCAB


def test_generate_returns_attentions_under_sdpa():
    model = tiny_model("encoder-decoder", attn_implementation="sdpa")
    out = model.generate(
        torch.randint(3, VOCAB, (1, 5)),
        max_new_tokens=3,
        do_sample=False,
        output_attentions=True,
        return_dict_in_generate=True,
        eos_token_id=None,
    )
    assert len(out.cross_attentions) == 3  # one entry per generated token
    assert out.cross_attentions[-1][0].shape == (1, 4, 1, 5)
    assert len(out.encoder_attentions) == 2
