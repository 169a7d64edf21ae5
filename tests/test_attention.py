"""Attention behaviour: causality, padding, backend agreement, weights that are probabilities, inspection."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import VOCAB, model_inputs, tiny_model

ARCHS = ["decoder", "encoder", "encoder-decoder"]
ENCODINGS = ["sinusoidal", "learned", "rope", "alibi"]
# fp32 tolerance: the kernels differ from the eager math only by summation order (a few ulps of O(1) values).
ATOL = 1e-5


def backends() -> list[str]:
    """sdpa everywhere; flex and flash only on CUDA (flex's CPU path in torch 2.13 aborts while compiling)."""
    names = ["sdpa"]
    if torch.cuda.is_available():
        names.append("flex_attention")
        if importlib.util.find_spec("flash_attn") is not None:
            names.append("flash_attention_2")
    return names


def _weights(out) -> list[torch.Tensor]:
    names = ("attentions", "encoder_attentions", "decoder_attentions", "cross_attentions")
    return [w for name in names for w in (getattr(out, name, None) or ())]


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_decoder_is_causal(encoding):
    """Changing tokens after position t never changes outputs or attention at positions <= t."""
    model = tiny_model("decoder", position_encoding=encoding, attn_implementation="sdpa")
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    t = 5
    changed[:, t + 1 :] = torch.randint(3, VOCAB, (2, 10 - t - 1), generator=torch.Generator().manual_seed(2))
    a = model(ids, output_attentions=True, output_hidden_states=True)
    b = model(changed, output_attentions=True, output_hidden_states=True)
    assert torch.equal(a.logits[:, : t + 1], b.logits[:, : t + 1])
    assert not torch.allclose(a.logits[:, t + 1 :], b.logits[:, t + 1 :])
    for wa, wb in zip(a.attentions, b.attentions):
        assert torch.equal(wa[:, :, : t + 1], wb[:, :, : t + 1])
        assert torch.all(wa[:, :, : t + 1, t + 1 :] == 0)  # future keys get exactly zero weight


def test_encoder_is_bidirectional():
    model = tiny_model("encoder", attn_implementation="sdpa")
    ids = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(3))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1 - 3) % (VOCAB - 3) + 3
    a, b = model(ids, output_attentions=True), model(changed, output_attentions=True)
    assert not torch.allclose(a.logits[:, 0], b.logits[:, 0])  # the first token sees the last one
    assert torch.all(a.attentions[0][:, :, 0, -1] > 0)


def test_seq2seq_decoder_is_causal_and_cross_attention_sees_all_source():
    model = tiny_model("encoder-decoder", attn_implementation="sdpa")
    src = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    dec = torch.tensor([[1, 7, 8, 9, 10]])
    dec2 = torch.tensor([[1, 7, 8, 20, 21]])
    a = model(src, decoder_input_ids=dec, output_attentions=True)
    b = model(src, decoder_input_ids=dec2, output_attentions=True)
    assert torch.equal(a.logits[:, :3], b.logits[:, :3])
    assert len(a.cross_attentions) == 2 and a.cross_attentions[0].shape == (1, 4, 5, 6)
    assert torch.all(a.cross_attentions[0] > 0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_rows_equal_single_runs(arch, encoding, side):
    """Each row of a padded batch equals the same sequence run alone (real positions compared)."""
    model = tiny_model(arch, position_encoding=encoding, attn_implementation="sdpa")
    gen = torch.Generator().manual_seed(5)
    lengths = [9, 5, 7]
    rows = [torch.randint(3, VOCAB, (n,), generator=gen) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span], mask[i, span] = row, 1
    batch = model(**model_inputs(model, ids, mask))
    for i, row in enumerate(rows):
        alone = model(**model_inputs(model, row[None]))
        if arch == "encoder-decoder":
            torch.testing.assert_close(batch.logits[i], alone.logits[0], atol=ATOL, rtol=0)
        else:
            span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
            torch.testing.assert_close(batch.logits[i, span], alone.logits[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("backend", backends())
def test_backend_agrees_with_eager(arch, encoding, backend):
    """Outputs and returned weights of every backend equal eager within 1e-5 (fp32), with padding."""
    eager = tiny_model(arch, position_encoding=encoding, attn_implementation="eager")
    fast = tiny_model(arch, position_encoding=encoding, attn_implementation=backend)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    for kwargs in ({}, {"output_attentions": True}):
        ref = eager(**model_inputs(eager, ids, mask, **kwargs))
        out = fast(**model_inputs(fast, ids, mask, **kwargs))
        assert (out.logits - ref.logits).abs().max() <= ATOL
        ref_w, out_w = _weights(ref), _weights(out)
        assert len(out_w) == len(ref_w) == (len(ref_w) if kwargs else 0)
        for a, b in zip(ref_w, out_w):
            assert (a - b).abs().max() <= ATOL
    # unpadded batch: sdpa takes its is_causal / no-mask fast path
    ref = eager(**model_inputs(eager, ids))
    out = fast(**model_inputs(fast, ids))
    assert (out.logits - ref.logits).abs().max() <= ATOL


@pytest.mark.parametrize("arch", ARCHS)
def test_weights_are_probabilities_and_masked_keys_get_zero(arch):
    model = tiny_model(arch, attn_implementation="sdpa")
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    out = model(**model_inputs(model, ids, mask, output_attentions=True))
    weights = _weights(out)
    assert len(weights) == (6 if arch == "encoder-decoder" else 2)
    for w in weights:
        assert w.shape[:2] == (2, 4)
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]), atol=1e-6, rtol=0)
        assert torch.all(w >= 0)
    # keys of padding positions get exactly zero weight from the real queries
    key_weights = out.cross_attentions if arch == "encoder-decoder" else out.attentions
    for w in key_weights:
        assert torch.all(w[0, :, :, 5:] == 0)


def test_output_attentions_from_config_under_sdpa():
    """transformers refuses config.output_attentions with sdpa; ours accepts it and returns the weights."""
    model = tiny_model("decoder", attn_implementation="sdpa")
    model.config.output_attentions = True
    out = model(torch.randint(3, VOCAB, (1, 6)))
    assert len(out.attentions) == 2 and out.attentions[0].shape == (1, 4, 6, 6)


def test_attention_layers_selects_layers_and_others_keep_fast_kernel(monkeypatch):
    from modeling import modeling_course_transformer as mct

    model = tiny_model("decoder", attn_implementation="sdpa", num_decoder_layers=3)
    ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    full = model(ids, output_attentions=True)
    calls = []
    original = mct.lens_attention_forward

    def counting(module, *args, request=None, **kwargs):
        calls.append((module.layer_idx, request.weights))
        return original(module, *args, request=request, **kwargs)

    monkeypatch.setattr(mct, "lens_attention_forward", counting)
    part = model(ids, output_attentions=True, attention_layers=[-1])
    assert calls == [(2, True)]  # only the chosen layer asked the attention lens for weights
    assert len(part.attentions) == 1
    # Layers 0-1 ran sdpa here and eager math in `full`: layer 2 reads inputs that differ by fp32 kernel rounding
    # (~1e-7), so its weights agree to that rounding, not bitwise.
    torch.testing.assert_close(part.attentions[0], full.attentions[2], atol=1e-6, rtol=0)
    torch.testing.assert_close(part.logits, full.logits, atol=ATOL, rtol=0)


def test_head_mask_ablates_heads_under_every_backend():
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(8))
    head_mask = torch.ones(2, 4)
    head_mask[0, 1] = 0
    outs = {}
    for backend in ("eager", "sdpa"):
        model = tiny_model("encoder", attn_implementation=backend)
        plain = model(ids)
        outs[backend] = model(ids, head_mask=head_mask, output_attentions=True)
        assert not torch.allclose(outs[backend].logits, plain.logits)
        assert torch.all(outs[backend].attentions[0][:, 1] == 0)
        assert torch.all(outs[backend].attentions[0][:, 0] > 0)
    torch.testing.assert_close(outs["eager"].logits, outs["sdpa"].logits, atol=ATOL, rtol=0)
    # zeroing all heads of a post-norm layer leaves only the residual path: equal to removing the sub-layer output
    model = tiny_model("encoder")
    layer = model.model.encoder.layers[0]
    x = torch.randn(1, 6, 32)
    out = layer(x, head_mask=torch.zeros(4))  # a layer returns its hidden states; hooks record the weights
    o_bias = layer.self_attn.o_proj.bias
    expected = layer.ffn_norm(layer.self_attn_norm(x + o_bias) + layer.ffn(layer.self_attn_norm(x + o_bias)))
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


def test_eager_function_is_the_course_math():
    """softmax(QKᵀ/√d + mask)·V written out by hand equals the module's eager function."""
    from modeling import eager_attention_forward

    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=gen) for _ in range(3))

    class Stub(torch.nn.Module):
        is_causal = True

    out, w = eager_attention_forward(Stub().eval(), q, k, v, None, scaling=8**-0.5)
    scores = q @ k.transpose(-1, -2) / 8**0.5
    scores = scores.masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf"))
    expected_w = scores.softmax(-1)
    torch.testing.assert_close(w, expected_w, atol=1e-6, rtol=0)
    torch.testing.assert_close(out, (expected_w @ v).transpose(1, 2), atol=1e-6, rtol=0)


def test_hidden_states_cover_embeddings_and_every_layer():
    model = tiny_model("decoder", norm_placement="pre")
    out = model(torch.randint(3, VOCAB, (1, 5)), output_hidden_states=True)
    assert len(out.hidden_states) == 3  # embeddings + 2 layers
    final = model.model(torch.randint(3, VOCAB, (1, 5)), output_hidden_states=True)
    torch.testing.assert_close(final.hidden_states[-1], final.last_hidden_state, atol=0, rtol=0)
