"""What transformers' GenerationTesterMixin checks, for the two generative heads of the course Transformer.

The mixin lives in transformers' tests/generation/test_utils.py, which the 5.23.0 sdist does not ship, so its checks
are restated here against seeded tiny models (fp32, eval mode, the library's default sdpa backend): the structure and
shapes of `return_dict_in_generate` outputs, cached == uncached, seeded sampling, beam search, assisted and
prompt-lookup decoding == greedy, static == dynamic cache, generation from `inputs_embeds`, continuation from a
returned cache, and the stopping criteria. Prompts are padded as real batches are: left padding for the decoder,
padded sources for the encoder-decoder. Checks the mixin does not make but this project promises are added where they
are cheap: attention weights returned under sdpa are exact probabilities (zero on padding and on future tokens), the
raw `logits` of every step equal an uncached forward, beam scores are the length-normalised log-probabilities.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, padded, tiny_model
from transformers.cache_utils import DynamicCache, EncoderDecoderCache, StaticCache
from transformers.generation import (
    GenerateBeamDecoderOnlyOutput,
    GenerateBeamEncoderDecoderOutput,
    GenerateDecoderOnlyOutput,
    GenerateEncoderDecoderOutput,
)

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS, HEADS, HIDDEN = 2, 4, 32  # conftest.tiny_config
HEAD_DIM = HIDDEN // HEADS
LENGTHS = [6, 3, 5]  # one full row and two padded ones
NEW = 5

# With tied input and output embeddings a freshly initialised model predicts the token it has just read, so greedy
# decoding repeats one token forever (the encoder-decoder repeats its start token) and every "A equals B" check below
# would hold trivially; at the default initializer_range (0.02) the encoder-decoder also barely reads its source (every
# row generates the same tokens). Untied and at 0.08, the tiny models produce a different token at almost every step
# and different rows from different sources, with top-1/top-2 logit margins of at least 4e-4 (measured), thousands of
# times fp32 noise (~1e-7).
VARIED = dict(tie_word_embeddings=False, initializer_range=0.08)

CASES = [
    pytest.param("decoder", "learned", id="decoder-learned"),
    pytest.param("decoder", "rope", id="decoder-rope"),
    pytest.param("encoder-decoder", "learned", id="seq2seq-learned"),
]
CASES_AND_ALIBI = [*CASES, pytest.param("decoder", "alibi", id="decoder-alibi")]
DECODER_ENCODINGS = ["learned", "rope"]

NO_EOS = dict(eos_token_id=None, pad_token_id=0)  # generate exactly max_new_tokens
GREEDY = dict(do_sample=False, num_beams=1, max_new_tokens=NEW, **NO_EOS)
BEAM = dict(do_sample=False, num_beams=3, num_return_sequences=2, length_penalty=2.0, early_stopping=False)
DICT = dict(return_dict_in_generate=True, output_scores=True, output_logits=True)
EVERYTHING = dict(DICT, output_attentions=True, output_hidden_states=True)


def build(arch: str, encoding: str = "learned", seed: int = 0, backend: str = "sdpa"):
    return tiny_model(arch, seed=seed, attn_implementation=backend, position_encoding=encoding, **VARIED)


def batch(arch: str, seed: int = 0) -> dict:
    """Prompts of 6, 3 and 5 tokens: left-padded for the decoder, right-padded sources for the encoder-decoder."""
    ids, mask = padded(LENGTHS, "left" if arch == "decoder" else "right", seed)
    return {"input_ids": ids, "attention_mask": mask}


def is_seq2seq(model) -> bool:
    return model.config.is_encoder_decoder


def prompt_length(model, inputs: dict) -> int:
    """Tokens in `sequences` before the first generated one: the prompt, or the decoder start token."""
    return 1 if is_seq2seq(model) else inputs["input_ids"].shape[1]


def assert_same_generation(a, b, atol: float = 1e-5) -> None:
    """transformers' `has_similar_generate_outputs`: the same tokens, and scores/logits equal to fp32 noise."""
    sequences_a = a if isinstance(a, torch.Tensor) else a.sequences
    sequences_b = b if isinstance(b, torch.Tensor) else b.sequences
    assert sequences_a.tolist() == sequences_b.tolist()
    for field in ("scores", "logits"):
        steps_a, steps_b = getattr(a, field, None), getattr(b, field, None)
        if steps_a is None or steps_b is None:
            continue
        assert len(steps_a) == len(steps_b)
        for x, y in zip(steps_a, steps_b):
            torch.testing.assert_close(x, y, atol=atol, rtol=0)
    for field in ("sequences_scores",):
        if getattr(a, field, None) is not None and getattr(b, field, None) is not None:
            torch.testing.assert_close(getattr(a, field), getattr(b, field), atol=atol, rtol=0)


def assert_caches_equal(a, b) -> None:
    if isinstance(a, EncoderDecoderCache):
        assert isinstance(b, EncoderDecoderCache)
        assert_caches_equal(a.self_attention_cache, b.self_attention_cache)
        assert_caches_equal(a.cross_attention_cache, b.cross_attention_cache)
        return
    assert len(a.layers) == len(b.layers) == LAYERS
    for x, y in zip(a.layers, b.layers):
        torch.testing.assert_close(x.keys, y.keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(x.values, y.values, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# The mixin's `_check_generate_outputs`
# --------------------------------------------------------------------------------------------------------------


def check_cache(cache, batch_size: int, length: int | None, source_length: int | None = None) -> None:
    """(batch, heads, length, head_dim) per layer; the cross-attention cache of an encoder-decoder spans the source."""
    if isinstance(cache, EncoderDecoderCache):
        check_cache(cache.self_attention_cache, batch_size, length)
        check_cache(cache.cross_attention_cache, batch_size, source_length)
        return
    assert isinstance(cache, (DynamicCache, StaticCache))
    assert len(cache.layers) == LAYERS
    for layer in cache.layers:
        assert layer.keys.shape == layer.values.shape == (batch_size, HEADS, length, HEAD_DIM)


def check_outputs(out, model, inputs: dict, use_cache: bool, num_return_sequences: int = 1, num_beams: int = 1):
    """Types, lengths and shapes of every field of a `return_dict_in_generate` output (transformers'
    `_check_generate_outputs` and the `_check_*_for_generate` helpers it calls)."""
    seq2seq = is_seq2seq(model)
    input_batch, source_length = inputs["input_ids"].shape
    rows = input_batch * num_beams if num_beams > 1 else input_batch * num_return_sequences  # inside generate
    prompt = prompt_length(model, inputs)
    if num_beams > 1:
        expected_type = GenerateBeamEncoderDecoderOutput if seq2seq else GenerateBeamDecoderOnlyOutput
    else:
        expected_type = GenerateEncoderDecoderOutput if seq2seq else GenerateDecoderOnlyOutput
    assert type(out) is expected_type
    assert out.sequences.shape == (input_batch * num_return_sequences, prompt + NEW)

    for steps in (out.scores, out.logits):  # one (rows, V) tensor per new token
        assert isinstance(steps, tuple) and [s.shape for s in steps] == [(rows, VOCAB)] * NEW

    attentions = out.decoder_attentions if seq2seq else out.attentions
    hidden_states = out.decoder_hidden_states if seq2seq else out.hidden_states
    for name, steps in (("attentions", attentions), ("hidden_states", hidden_states)):
        if steps is None:
            continue
        assert isinstance(steps, tuple) and len(steps) == NEW, name
        for step, per_layer in enumerate(steps):
            # The first forward reads the whole prompt; with a cache each later one reads the newest token only.
            query_length = 1 if use_cache and step > 0 else prompt + step
            key_length = prompt + step
            assert isinstance(per_layer, tuple)
            if name == "attentions":
                assert [a.shape for a in per_layer] == [(rows, HEADS, query_length, key_length)] * LAYERS
            else:  # the embeddings, then every layer
                assert [h.shape for h in per_layer] == [(rows, query_length, HIDDEN)] * (LAYERS + 1)
    if seq2seq and attentions is not None:
        assert len(out.cross_attentions) == NEW
        for step, per_layer in enumerate(out.cross_attentions):
            query_length = 1 if use_cache and step > 0 else prompt + step
            assert [a.shape for a in per_layer] == [(rows, HEADS, query_length, source_length)] * LAYERS
        # The encoder runs once, before the batch is expanded for beams or return sequences.
        assert [a.shape for a in out.encoder_attentions] == [
            (input_batch, HEADS, source_length, source_length)
        ] * LAYERS
    if seq2seq and hidden_states is not None:
        assert [h.shape for h in out.encoder_hidden_states] == [(input_batch, source_length, HIDDEN)] * (LAYERS + 1)

    if use_cache:  # everything but the last token, which was never fed back
        check_cache(out.past_key_values, rows, out.sequences.shape[1] - 1, source_length)
    else:
        assert out.past_key_values is None


def check_attention_values(out, model, inputs: dict, use_cache: bool) -> None:
    """The returned weights are softmax probabilities: each real query's row sums to 1 and puts exactly 0 on padding
    and on future tokens (greedy, so output row b is input row b)."""
    mask = inputs["attention_mask"].bool()  # (B, S)

    def check(weights: torch.Tensor, key_mask: torch.Tensor, query_real: torch.Tensor, causal: bool) -> None:
        # weights (B, H, T, S); key_mask (B, S); query_real (B, T): the queries whose rows mean something
        queries, keys = weights.shape[-2:]
        allowed = key_mask[:, None, :].expand(-1, queries, -1)  # (B, T, S)
        if causal:
            positions = torch.arange(keys - queries, keys)[:, None]  # absolute index of each query
            allowed = allowed & (torch.arange(keys)[None, :] <= positions)
        rows = weights.permute(0, 2, 1, 3)[query_real]  # (N, H, S)
        torch.testing.assert_close(rows.sum(-1), torch.ones(rows.shape[:2]), atol=1e-5, rtol=0)
        assert rows.masked_fill(allowed[query_real][:, None, :], 0.0).abs().sum().item() == 0.0

    if not is_seq2seq(model):
        for step, per_layer in enumerate(out.attentions):
            key_mask = torch.cat([mask, torch.ones(mask.shape[0], step, dtype=torch.bool)], 1)
            query_real = key_mask[:, -per_layer[0].shape[2] :]  # pad queries attend to nothing: no meaning
            for weights in per_layer:
                check(weights, key_mask, query_real, causal=True)
        return
    for weights in out.encoder_attentions:
        check(weights, mask, mask, causal=False)
    for self_layers, cross_layers in zip(out.decoder_attentions, out.cross_attentions):
        queries, keys = self_layers[0].shape[-2:]
        every = torch.ones(mask.shape[0], queries, dtype=torch.bool)
        for weights in self_layers:
            check(weights, torch.ones(mask.shape[0], keys, dtype=torch.bool), every, causal=True)
        for weights in cross_layers:
            check(weights, mask, every, causal=False)


def uncached_next_logits(model, inputs: dict, sequences: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """The next-token logits of a plain forward over each prefix: what generate's raw `logits` must be."""
    prompt = prompt_length(model, inputs)
    batch_size = sequences.shape[0]
    logits = []
    with torch.no_grad():
        for step in range(steps):
            prefix = sequences[:, : prompt + step]
            if is_seq2seq(model):
                out = model(**inputs, decoder_input_ids=prefix, use_cache=False)
            else:
                mask = torch.cat([inputs["attention_mask"], torch.ones(batch_size, step, dtype=torch.long)], 1)
                out = model(prefix, attention_mask=mask, use_cache=False)
            logits.append(out.logits[:, -1])
    return logits


# --------------------------------------------------------------------------------------------------------------
# Greedy search
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize("arch,encoding", CASES)
def test_greedy_dict_outputs(arch, encoding, use_cache):
    """test_greedy_generate_dict_outputs(_use_cache), under the default sdpa backend (transformers' own models need
    eager for attentions; this one returns exact weights from every backend), with the mixin's logits processors."""
    model = build(arch, encoding)
    assert model.config._attn_implementation == "sdpa"
    inputs = batch(arch)
    out = model.generate(**inputs, **GREEDY, **EVERYTHING, use_cache=use_cache, repetition_penalty=1.2)
    check_outputs(out, model, inputs, use_cache)
    check_attention_values(out, model, inputs, use_cache)
    new = out.sequences[:, prompt_length(model, inputs) :]
    # `scores` are processed (the repetition penalty changed them), `logits` are the model's own; greedy takes the
    # arg-max of the processed scores.
    assert not all(torch.equal(s, raw) for s, raw in zip(out.scores, out.logits))
    assert torch.equal(torch.stack([s.argmax(-1) for s in out.scores], 1), new)
    for raw, want in zip(out.logits, uncached_next_logits(model, inputs, out.sequences, NEW)):
        torch.testing.assert_close(raw, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch,encoding", CASES)
def test_sdpa_attentions_equal_eager_attentions(arch, encoding):
    """The weights returned under sdpa are the eager backend's, and asking for them does not change the tokens."""
    inputs = batch(arch)
    sdpa, eager = build(arch, encoding, backend="sdpa"), build(arch, encoding, backend="eager")
    got = sdpa.generate(**inputs, **GREEDY, **EVERYTHING)
    want = eager.generate(**inputs, **GREEDY, **EVERYTHING)
    assert_same_generation(got, want)
    names = ("encoder_attentions", "decoder_attentions", "cross_attentions") if arch != "decoder" else ("attentions",)
    for name in names:
        got_steps, want_steps = getattr(got, name), getattr(want, name)
        if name == "encoder_attentions":
            got_steps, want_steps = (got_steps,), (want_steps,)
        for got_layers, want_layers in zip(got_steps, want_steps):
            for x, y in zip(got_layers, want_layers):
                torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    assert_same_generation(sdpa.generate(**inputs, **GREEDY, **DICT), got)


@pytest.mark.parametrize("arch,encoding", CASES_AND_ALIBI)
def test_greedy_with_cache_equals_without(arch, encoding):
    model = build(arch, encoding)
    inputs = batch(arch)
    cached = model.generate(**inputs, **GREEDY, **DICT, use_cache=True)
    uncached = model.generate(**inputs, **GREEDY, **DICT, use_cache=False)
    assert_same_generation(cached, uncached)
    new = cached.sequences[:, -NEW:]
    assert len(set(new[0].tolist())) > 1  # not one repeated token: the check has teeth
    assert len({tuple(row) for row in new.tolist()}) > 1  # each row's prompt or source matters


@pytest.mark.parametrize("arch", ["decoder", "encoder-decoder"])
def test_generate_without_inputs_starts_from_bos(arch):
    """test_generate_without_input_ids: no prompt at all; generate starts from BOS (for the encoder-decoder, a BOS
    source and the decoder start token)."""
    model = build(arch)
    out = model.generate(**GREEDY)
    assert out.shape == (1, 1 + NEW)
    assert out[0, 0].item() == (
        model.config.decoder_start_token_id if arch != "decoder" else model.config.bos_token_id
    )


@pytest.mark.parametrize("arch,encoding", CASES)
def test_logits_to_keep_zero_generates_the_same(arch, encoding):
    """test_generate_methods_with_logits_to_keep: generate asks for the last position only by default; keeping all
    logits gives the same tokens."""
    model = build(arch, encoding)
    inputs = batch(arch)
    assert_same_generation(model.generate(**inputs, **GREEDY, logits_to_keep=0), model.generate(**inputs, **GREEDY))


@pytest.mark.parametrize("encoding", DECODER_ENCODINGS)
def test_explicit_position_ids_generate_like_derived_ones(encoding):
    """test_generate_with_and_without_position_ids: the positions generate derives from the mask, given explicitly
    (pads at 1, as the mixin writes them), and continued by generate step by step."""
    model = build("decoder", encoding)
    inputs = batch("decoder")
    mask = inputs["attention_mask"]
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    assert_same_generation(
        model.generate(**inputs, position_ids=positions, **GREEDY, **DICT), model.generate(**inputs, **GREEDY, **DICT)
    )


@pytest.mark.parametrize("encoding", [*DECODER_ENCODINGS, "alibi"])
def test_left_padding_leaves_next_token_logits_unchanged(encoding):
    """test_left_padding_compatibility: 32 pads in front of a prompt change nothing (to fp32 noise)."""
    model = build("decoder", encoding)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    pads = torch.zeros(2, 32, dtype=torch.long)
    padded_ids, padded_mask = torch.cat([pads, ids], 1), torch.cat([pads, torch.ones_like(ids)], 1)
    with torch.no_grad():
        want = model(ids, attention_mask=torch.ones_like(ids)).logits[:, -1]
        got = model(padded_ids, attention_mask=padded_mask).logits[:, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("encoding", ["learned", "rope"])
def test_padded_sources_generate_like_each_source_alone(encoding):
    """The encoder-decoder's counterpart of left-padding compatibility: a right-padded source in a batch gives the
    tokens and scores of that source alone (padding is masked in the encoder and in cross-attention)."""
    model = build("encoder-decoder", encoding)
    inputs = batch("encoder-decoder")
    together = model.generate(**inputs, **GREEDY, **DICT)
    for row, length in enumerate(LENGTHS):
        alone = model.generate(inputs["input_ids"][row : row + 1, :length], **GREEDY, **DICT)
        assert together.sequences[row].tolist() == alone.sequences[0].tolist()
        for step in range(NEW):
            torch.testing.assert_close(together.scores[step][row], alone.scores[step][0], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------------

SAMPLE = dict(
    do_sample=True, top_k=10, top_p=0.7, temperature=0.7, num_return_sequences=2, max_new_tokens=NEW, **NO_EOS
)


@pytest.mark.parametrize("arch,encoding", CASES)
def test_sampling_with_a_seed_is_reproducible(arch, encoding):
    """test_sample_generate(_dict_output): num_return_sequences=2 and the mixin's warpers; the same seed gives the
    same tokens and scores, and every sampled token survived top-k/top-p (a finite processed score)."""
    model = build(arch, encoding)
    inputs = batch(arch)
    torch.manual_seed(0)
    first = model.generate(**inputs, **SAMPLE, **EVERYTHING, use_cache=False)
    torch.manual_seed(0)
    second = model.generate(**inputs, **SAMPLE, **EVERYTHING, use_cache=False)
    assert_same_generation(first, second)
    check_outputs(first, model, inputs, use_cache=False, num_return_sequences=2)
    new = first.sequences[:, prompt_length(model, inputs) :]
    for step, scores in enumerate(first.scores):
        kept = torch.isfinite(scores)
        assert kept.gather(1, new[:, step : step + 1]).all()
        assert (kept.sum(-1) <= 10).all()  # top_k
    greedy = model.generate(**inputs, **GREEDY).repeat_interleave(2, 0)
    assert not torch.equal(first.sequences, greedy)  # it did sample
    # Cached sampling draws the same tokens: the distributions match, and so do the random draws.
    torch.manual_seed(0)
    assert_same_generation(model.generate(**inputs, **SAMPLE, **DICT, use_cache=True), first)


@pytest.mark.parametrize("setting", [dict(top_k=1), dict(temperature=1e-4)], ids=["top_k=1", "temperature=1e-4"])
@pytest.mark.parametrize("arch,encoding", CASES)
def test_degenerate_sampling_equals_greedy(arch, encoding, setting):
    model = build(arch, encoding)
    inputs = batch(arch)
    greedy = model.generate(**inputs, **GREEDY)
    torch.manual_seed(0)
    sampled = model.generate(**inputs, do_sample=True, max_new_tokens=NEW, **NO_EOS, **setting)
    assert sampled.tolist() == greedy.tolist()


@pytest.mark.parametrize("arch,encoding", CASES)
def test_beam_sampling_with_a_seed_is_reproducible(arch, encoding):
    """test_beam_sample_generate(_dict_output)."""
    model = build(arch, encoding)
    inputs = batch(arch)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(model.generate(**inputs, **dict(BEAM, do_sample=True), max_new_tokens=NEW, **NO_EOS, **DICT))
    assert_same_generation(*runs)
    check_outputs(runs[0], model, inputs, use_cache=True, num_return_sequences=2, num_beams=3)


# --------------------------------------------------------------------------------------------------------------
# Beam search
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize("arch,encoding", CASES)
def test_beam_search_dict_outputs(arch, encoding, use_cache):
    """test_beam_search_generate_dict_output(s_use_cache), plus what the beam fields mean: `beam_indices` points to
    beams of the row's own prompt, and `sequences_scores` is the sum of the chosen tokens' log-probabilities divided
    by length ** length_penalty (no processors, so recomputable from an uncached forward)."""
    model = build(arch, encoding)
    inputs = batch(arch)
    out = model.generate(**inputs, **BEAM, max_new_tokens=NEW, **NO_EOS, **EVERYTHING, use_cache=use_cache)
    check_outputs(out, model, inputs, use_cache, num_return_sequences=2, num_beams=3)
    rows = len(LENGTHS) * 2
    assert out.sequences_scores.shape == (rows,)
    assert out.beam_indices.shape == (rows, NEW)
    owner = torch.arange(rows)[:, None] // 2  # output rows 2i, 2i+1 belong to prompt i
    assert torch.equal(out.beam_indices // 3, owner.expand(-1, NEW))
    assert (out.sequences_scores[0::2] >= out.sequences_scores[1::2]).all()  # best first

    prompt = prompt_length(model, inputs)
    expanded = {k: v.repeat_interleave(2, 0) for k, v in inputs.items()}
    with torch.no_grad():
        if is_seq2seq(model):
            logits = model(**expanded, decoder_input_ids=out.sequences, use_cache=False).logits
        else:
            mask = torch.cat([expanded["attention_mask"], torch.ones(rows, NEW, dtype=torch.long)], 1)
            logits = model(out.sequences, attention_mask=mask, use_cache=False).logits
    log_probs = F.log_softmax(logits[:, prompt - 1 : -1], -1).gather(-1, out.sequences[:, prompt:, None])[..., 0]
    torch.testing.assert_close(
        out.sequences_scores, log_probs.sum(-1) / NEW ** BEAM["length_penalty"], atol=1e-5, rtol=0
    )
    transition = model.compute_transition_scores(out.sequences, out.scores, out.beam_indices, normalize_logits=False)
    torch.testing.assert_close(transition, log_probs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch,encoding", CASES_AND_ALIBI)
def test_beam_search_with_cache_equals_without(arch, encoding):
    model = build(arch, encoding)
    inputs = batch(arch)
    kwargs = dict(BEAM, max_new_tokens=NEW, **NO_EOS, **DICT)
    assert_same_generation(
        model.generate(**inputs, **kwargs, use_cache=True), model.generate(**inputs, **kwargs, use_cache=False)
    )


# --------------------------------------------------------------------------------------------------------------
# Assisted and prompt-lookup decoding
# --------------------------------------------------------------------------------------------------------------


class ForwardLog:
    """Records the input length of every forward of a model (the decoder's, for an encoder-decoder)."""

    def __init__(self, model):
        self.lengths: list[int] = []
        key = "decoder_input_ids" if is_seq2seq(model) else "input_ids"

        def hook(module, args, kwargs):
            self.lengths.append(kwargs[key].shape[1])

        self.handle = model.register_forward_pre_hook(hook, with_kwargs=True)

    def verified_candidates(self, greedy: ForwardLog) -> bool:
        """Some forward read more tokens than greedy decoding reads at that point (the prompt, then one token):
        candidates are verified with the prefill already, and in later cached forwards."""
        return self.lengths[0] > greedy.lengths[0] or max(self.lengths[1:], default=1) > 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def single_prompt(arch: str) -> dict:
    """One row (assisted decoding takes batch 1) whose last token occurred before, followed by two others, so that
    prompt lookup has a candidate to propose; the decoder's row is left-padded, the source right-padded."""
    tokens = torch.tensor([[7, 11, 13, 17, 19, 7]])
    if arch == "decoder":
        ids = torch.cat([torch.zeros(1, 2, dtype=torch.long), tokens], 1)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}
    ids = torch.cat([torch.tensor([[23, 29, 31]]), torch.zeros(1, 2, dtype=torch.long)], 1)
    return {
        "input_ids": ids,
        "attention_mask": (ids != 0).long(),
        "decoder_input_ids": torch.cat([torch.ones(1, 1, dtype=torch.long), tokens], 1),
    }


def assisted_outputs_check(out, model, inputs) -> None:
    """check_outputs for the single-row prompt of the assisted tests (prompt length from the inputs given)."""
    prompt = inputs.get("decoder_input_ids", inputs["input_ids"]).shape[1]
    assert out.sequences.shape == (1, prompt + NEW)
    assert [s.shape for s in out.scores] == [(1, VOCAB)] * NEW
    assert [s.shape for s in out.logits] == [(1, VOCAB)] * NEW
    assert len(out.attentions if not is_seq2seq(model) else out.decoder_attentions) == NEW


@pytest.mark.parametrize("assistant", ["same weights", "other weights"])
@pytest.mark.parametrize("arch,encoding", CASES)
def test_assisted_decoding_equals_greedy(arch, encoding, assistant):
    """test_assisted_decoding_matches_greedy_search: an assistant with the main model's weights has every candidate
    accepted, one with other weights (same vocabulary) almost none; either way the output is the main model's greedy
    output. Two candidates per call, so the main model verifies several tokens in one cached forward and rolls the
    cache back on a rejection."""
    model = build(arch, encoding)
    helper = build(arch, encoding, seed=0 if assistant == "same weights" else 1)
    helper.generation_config.num_assistant_tokens = 2
    helper.generation_config.num_assistant_tokens_schedule = "constant"
    inputs = single_prompt(arch)
    kwargs = dict(GREEDY, **EVERYTHING, use_cache=True)
    with ForwardLog(model) as plain:
        greedy = model.generate(**inputs, **kwargs)
    with ForwardLog(model) as log:
        assisted = model.generate(**inputs, **kwargs, assistant_model=helper)
    assert_same_generation(assisted, greedy)
    for out in (greedy, assisted):
        assisted_outputs_check(out, model, inputs)
    assert log.verified_candidates(plain), "the main model never verified candidates"
    if assistant == "same weights":
        assert len(log.lengths) < NEW, "the assistant's candidates were not accepted"


@pytest.mark.parametrize("arch,encoding", CASES)
def test_prompt_lookup_decoding_equals_greedy(arch, encoding):
    """test_prompt_lookup_decoding_matches_greedy_search, with a prompt that gives the lookup a candidate."""
    model = build(arch, encoding)
    inputs = single_prompt(arch)
    kwargs = dict(GREEDY, **EVERYTHING, use_cache=True)
    with ForwardLog(model) as plain:
        greedy = model.generate(**inputs, **kwargs)
    with ForwardLog(model) as log:
        lookup = model.generate(**inputs, **kwargs, prompt_lookup_num_tokens=2)
    assert_same_generation(lookup, greedy)
    assisted_outputs_check(lookup, model, inputs)
    assert log.verified_candidates(plain), "prompt lookup never proposed a candidate"


@pytest.mark.parametrize("arch,encoding", CASES)
def test_assisted_sampling_runs_and_is_reproducible(arch, encoding):
    """test_assisted_decoding_sample: sampled assisted decoding need not equal plain sampling, but it is seeded."""
    model = build(arch, encoding)
    helper = build(arch, encoding, seed=1)
    inputs = single_prompt(arch)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(
            model.generate(
                **inputs, do_sample=True, max_new_tokens=NEW, **NO_EOS, **EVERYTHING, assistant_model=helper
            )
        )
    assert_same_generation(*runs)
    assisted_outputs_check(runs[0], model, inputs)


# --------------------------------------------------------------------------------------------------------------
# Static cache (uncompiled: compilation is tested in test_native.py)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("search", ["greedy", "beam"])
@pytest.mark.parametrize("arch,encoding", CASES_AND_ALIBI)
def test_static_cache_generates_like_the_dynamic_cache(arch, encoding, search):
    """test_generate_with_static_cache: the same tokens and scores, and a StaticCache sized for the whole generation
    (prompt + new tokens - 1, the last token never being fed back)."""
    model = build(arch, encoding)
    inputs = batch(arch)
    kwargs = dict(GREEDY if search == "greedy" else dict(BEAM, max_new_tokens=NEW, **NO_EOS), **DICT)
    static = model.generate(**inputs, **kwargs, cache_implementation="static")
    dynamic = model.generate(**inputs, **kwargs)
    assert_same_generation(static, dynamic)
    rows = len(LENGTHS) * (3 if search == "beam" else 1)
    cache = static.past_key_values
    self_cache = cache.self_attention_cache if is_seq2seq(model) else cache
    assert isinstance(self_cache, StaticCache)
    check_cache(cache, rows, prompt_length(model, inputs) + NEW - 1, inputs["input_ids"].shape[1])


# --------------------------------------------------------------------------------------------------------------
# inputs_embeds, continuing from a cache
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("encoding", DECODER_ENCODINGS)
def test_generate_from_inputs_embeds(encoding, num_beams):
    """test_generate_from_inputs_embeds and test_generate_from_random_inputs_embeds: the embeddings of the prompt
    generate what its ids generate (with input_ids too, the prompt is kept in `sequences`; without, only the new
    tokens are returned), and other embeddings give other scores."""
    model = build("decoder", encoding)
    inputs = batch("decoder")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    kwargs = dict(do_sample=False, num_beams=num_beams, max_new_tokens=NEW, **NO_EOS, return_dict_in_generate=True)
    kwargs["output_scores"] = True
    embeds = model.get_input_embeddings()(ids).detach()
    from_ids = model.generate(ids, attention_mask=mask, **kwargs)
    from_both = model.generate(ids, inputs_embeds=embeds, attention_mask=mask, **kwargs)
    from_embeds = model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
    assert_same_generation(from_both, from_ids)
    assert from_embeds.sequences.shape == (len(LENGTHS), NEW)
    from_both.sequences = from_both.sequences[:, ids.shape[1] :]
    assert_same_generation(from_embeds, from_both)
    random_embeds = torch.rand(embeds.shape, generator=torch.Generator().manual_seed(5))
    other = model.generate(inputs_embeds=random_embeds, attention_mask=mask, **kwargs)
    assert not any(torch.allclose(a, b) for a, b in zip(other.scores, from_embeds.scores))


@pytest.mark.parametrize("arch,encoding", CASES)
def test_continue_from_returned_past_key_values(arch, encoding):
    """test_generate_continue_from_past_key_values: generate 3 tokens, then 2 more from the returned cache and the
    extended ids, is one generate of 5: the same tokens, scores and final cache.

    The continuation gets the full ids and a mask as long as them: that is how generate's prefill tells which ids the
    cache already holds. The encoder-decoder needs its decoder_attention_mask for this; without it generate 5.23 feeds
    the whole decoder prefix again on top of the cache, for BART as for this model (a decoder-only model's prompt mask
    length is recorded by generate itself)."""
    model = build(arch, encoding)
    inputs = batch(arch)
    kwargs = dict(do_sample=False, **NO_EOS, use_cache=True, return_dict_in_generate=True, output_scores=True)
    whole = model.generate(**inputs, **kwargs, max_new_tokens=NEW)
    first = model.generate(**inputs, **kwargs, max_new_tokens=3)
    sequences = first.sequences
    if is_seq2seq(model):
        more = dict(inputs, decoder_input_ids=sequences, decoder_attention_mask=torch.ones_like(sequences))
    else:
        extended_mask = F.pad(
            inputs["attention_mask"], (0, sequences.shape[1] - inputs["input_ids"].shape[1]), value=1
        )
        more = dict(input_ids=sequences, attention_mask=extended_mask)
    rest = model.generate(**more, **kwargs, max_new_tokens=NEW - 3, past_key_values=first.past_key_values)
    rest.scores = first.scores + rest.scores
    assert_same_generation(rest, whole)
    assert_caches_equal(rest.past_key_values, whole.past_key_values)


@pytest.mark.parametrize("encoding", DECODER_ENCODINGS)
def test_continue_from_inputs_embeds_and_past_key_values(encoding):
    """test_generate_continue_from_inputs_embeds: the prompt's embeddings plus those of the 3 tokens generated from
    them, with the returned cache, give the next 2 tokens of a 5-token generation."""
    model = build("decoder", encoding)
    inputs = batch("decoder")
    mask = inputs["attention_mask"]
    embed = model.get_input_embeddings()
    kwargs = dict(do_sample=False, **NO_EOS, use_cache=True, return_dict_in_generate=True)
    with torch.no_grad():
        embeds = embed(inputs["input_ids"])
        whole = model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs, max_new_tokens=NEW)
        first = model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs, max_new_tokens=3)
        more_embeds = torch.cat([embeds, embed(first.sequences)], 1)
        more_mask = F.pad(mask, (0, 3), value=1)
        rest = model.generate(
            inputs_embeds=more_embeds,
            attention_mask=more_mask,
            **kwargs,
            max_new_tokens=NEW - 3,
            past_key_values=first.past_key_values,
        )
    assert torch.cat([first.sequences, rest.sequences], 1).tolist() == whole.sequences.tolist()
    assert_caches_equal(rest.past_key_values, whole.past_key_values)


# --------------------------------------------------------------------------------------------------------------
# Stopping
# --------------------------------------------------------------------------------------------------------------

FILL = VOCAB - 1  # a pad id other than the config's, so that filled positions prove the argument was used


def cut_at_eos(new: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, int]:
    """What generate must return given the unstopped greedy tokens: each row up to its first EOS, then FILL, as long
    as the longest row (the full length when some row never stops)."""
    rows, length = new.shape
    finished = torch.isin(new, torch.tensor(eos_ids))
    expected = new.clone()
    ends = []
    for row in range(rows):
        hits = finished[row].nonzero()
        end = hits[0].item() + 1 if len(hits) else length
        expected[row, end:] = FILL
        ends.append(end)
    return expected[:, : max(ends)], max(ends)


@pytest.mark.parametrize("arch,encoding", CASES)
def test_eos_stops_each_row_and_pad_fills_it(arch, encoding):
    model = build(arch, encoding)
    inputs = batch(arch)
    prompt = prompt_length(model, inputs)
    free = model.generate(**inputs, **dict(GREEDY, max_new_tokens=8))[:, prompt:]
    single = [free[0, 2].item()]  # row 0 stops after its 3rd token; the others wherever that token comes up
    pair = [free[0, 2].item(), free[1, 1].item()]
    for eos in (single, pair):
        out = model.generate(**inputs, do_sample=False, max_new_tokens=8, eos_token_id=eos, pad_token_id=FILL)
        expected, length = cut_at_eos(free, eos)
        assert out.shape[1] == prompt + length
        assert out[:, prompt:].tolist() == expected.tolist()
        if arch == "decoder":
            assert torch.equal(out[:, :prompt], inputs["input_ids"])
        else:
            assert (out[:, 0] == model.config.decoder_start_token_id).all()


@pytest.mark.parametrize("arch,encoding", CASES)
def test_min_new_tokens_holds_eos_back(arch, encoding):
    """min_new_tokens: EOS is impossible (score -inf) for that many steps even where it is the model's first choice,
    and allowed afterwards; max_new_tokens bounds the length."""
    model = build(arch, encoding)
    inputs = batch(arch)
    prompt = prompt_length(model, inputs)
    eos = model.generate(**inputs, **GREEDY)[0, prompt].item()  # row 0's first choice
    out = model.generate(
        **inputs,
        do_sample=False,
        max_new_tokens=NEW,
        min_new_tokens=3,
        eos_token_id=eos,
        pad_token_id=FILL,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    new = out.sequences[:, prompt:]
    assert 3 <= new.shape[1] <= NEW
    assert (new[:, :3] != eos).all()
    for step, (scores, logits) in enumerate(zip(out.scores, out.logits)):
        held_back = torch.isneginf(scores[:, eos])
        assert held_back.all() if step < 3 else not held_back.any()
        assert torch.isfinite(logits[:, eos]).all()
    # Row 0 starts with its second choice.
    assert new[0, 0].item() == out.logits[0][0].topk(2).indices[1].item()
