"""The "lens" attention implementation (`modeling/attention_lens.py`) on tiny Hugging Face models.

Every model is built here from a seeded tiny config (hidden 32, 2 layers, 4 heads, fp32). Each test compares the
lens with an independent reference: transformers' own eager or sdpa implementation, a forward pre-hook on the output
projection W_O, eager attention recomputed by hand, `evaluation.streaming_stats.stats_from_weights`, or norms
computed from captured value vectors.

Initialisation std 0.2 (not the default 0.02) so that attention is far from uniform: with near-uniform weights a
missed mask, bias or cap would move the weights by less than the tolerance and go unseen.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    AttentionInterface,
    BertModel,
    DebertaV2Config,
    DebertaV2Model,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2LMHeadModel,
    GptOssConfig,
    GptOssForCausalLM,
    GptOssModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
    pipeline,
)
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb

from evaluation.streaming_stats import stats_from_weights
from evaluation.tiny import (
    HIDDEN_SIZE,
    INTERMEDIATE_SIZE,
    MAX_POSITIONS,
    NUM_HEADS,
    NUM_LAYERS,
    VOCAB_SIZE,
    tiny_bert_config,
    tiny_gpt2_config,
    tiny_llama_config,
)
from modeling import attention_lens as al
from modeling.attention_lens import AttentionLens
from tests.conftest import build_tokenizer, padded

pytestmark = pytest.mark.usefixtures("one_thread")

# fp32 throughout. The lse path and eager differ only in rounding (baddbmm vs matmul-then-scale, the kernel's blocked
# sums): 6e-8 measured on these models. 1e-5 leaves room for that rounding to pass through two layers, and is still
# a thousand times below what a real error does (a missed mask, bias, cap or sink moves weights by 1e-2 to 1e-1).
TOL = 1e-5
INIT = 0.2
HEAD_DIM = HIDDEN_SIZE // NUM_HEADS
LENGTHS = [9, 6]  # a padded batch: the second sequence has 3 pad tokens


# --------------------------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------------------------


def _seeded(cls, config, implementation: str):
    config._attn_implementation = implementation
    torch.manual_seed(0)
    return cls(config).eval()


def tiny_llama(implementation: str = "sdpa") -> LlamaForCausalLM:
    """A tiny Llama with grouped-query attention (4 query heads share 2 K/V heads)."""
    config = tiny_llama_config(initializer_range=INIT, bos_token_id=1, eos_token_id=2)
    return _seeded(LlamaForCausalLM, config, implementation)


def tiny_bert(implementation: str = "sdpa") -> BertModel:
    return _seeded(BertModel, tiny_bert_config(initializer_range=INIT, hidden_dropout_prob=0.0), implementation)


def tiny_gpt2(implementation: str = "sdpa") -> GPT2LMHeadModel:
    config = tiny_gpt2_config(initializer_range=INIT, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return _seeded(GPT2LMHeadModel, config, implementation)


def tiny_gemma2(implementation: str = "eager") -> Gemma2ForCausalLM:
    """Soft-capped scores (cap 1.0, hit hard with std-0.2 weights) and a sliding window of 4 in layer 0."""
    config = Gemma2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        query_pre_attn_scalar=HEAD_DIM,
        sliding_window=4,
        attn_logit_softcapping=1.0,
        final_logit_softcapping=None,
        max_position_embeddings=MAX_POSITIONS,
        initializer_range=INIT,
    )
    return _seeded(Gemma2ForCausalLM, config, implementation)


def tiny_gpt_oss_config() -> GptOssConfig:
    return GptOssConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=HIDDEN_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        num_local_experts=2,
        num_experts_per_tok=1,
        sliding_window=4,
        max_position_embeddings=MAX_POSITIONS,
        initializer_range=INIT,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


def _with_sinks(model, layers):
    """gpt-oss initialises its sinks to 0; sinks of ±1 make the sink term matter."""
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in layers:
            layer.self_attn.sinks.normal_()
    return model


def tiny_gpt_oss(implementation: str = "eager") -> GptOssModel:
    model = _seeded(GptOssModel, tiny_gpt_oss_config(), implementation)
    return _with_sinks(model, model.layers)


def tiny_t5(implementation: str = "sdpa") -> T5ForConditionalGeneration:
    config = T5Config(
        vocab_size=VOCAB_SIZE,
        d_model=HIDDEN_SIZE,
        d_kv=HEAD_DIM,
        d_ff=INTERMEDIATE_SIZE,
        num_layers=NUM_LAYERS,
        num_heads=NUM_HEADS,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        # T5's default init already gives peaked attention (entropy 1.6 nats of log 9 = 2.2), since T5 does not
        # scale QKᵀ by 1/√D. Larger factors give scores in the hundreds, where fp32 rounds every score by
        # ~|score|·6e-8 in eager as in the lens (factor 3: scores up to 289, eager vs lens 1.6e-4).
        initializer_factor=1.0,
    )
    return _seeded(T5ForConditionalGeneration, config, implementation)


FAMILIES = {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}
PADDING_SIDE = {"llama": "left", "bert": "right", "gpt2": "left", "t5": "right"}


def batch(family: str) -> dict:
    """A padded batch of 2 (lengths 9 and 6), left-padded for decoders, right-padded for encoders."""
    ids, mask = padded(LENGTHS, side=PADDING_SIDE.get(family, "left"))
    inputs = {"input_ids": ids, "attention_mask": mask}
    if family == "t5":
        inputs["decoder_input_ids"] = ids[:, :5]
    return inputs


def model_output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def attention_sites(model) -> list[nn.Module]:
    return [module for _, module, _ in al.attention_modules(model)]


def real_positions(inputs: dict) -> torch.Tensor:
    """(B, T, 1): 1 at real tokens. Pad positions of the output differ by design (sdpa gives a query that sees no key
    a zero output, eager the mean of V); nothing downstream reads them."""
    return inputs["attention_mask"][..., None].float()


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    worst = (got.float() - want.float()).abs().max().item()
    assert worst <= TOL, f"{what}: max |difference| = {worst:.3e} > {TOL:.0e}"


# --------------------------------------------------------------------------------------------------------------
# Registration: from_pretrained, set_attn_implementation, output_attentions, generate, pipelines
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_from_pretrained_and_set_attn_implementation_select_the_lens(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="lens").eval()
    reference = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert loaded.config._attn_implementation == "lens"
    inputs = batch("llama")
    want = reference(**inputs).logits
    assert torch.equal(loaded(**inputs).logits, want)
    reference.set_attn_implementation("lens")
    assert reference.config._attn_implementation == "lens"
    assert torch.equal(reference(**inputs).logits, want)


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2", "t5"])
@torch.no_grad()
def test_without_a_request_the_output_is_sdpa_bit_for_bit(family, lse_calls):
    build = tiny_t5 if family == "t5" else FAMILIES[family]
    inputs = batch(family)
    sdpa, lens = build("sdpa"), build("lens")
    assert torch.equal(model_output(lens(**inputs)), model_output(sdpa(**inputs)))
    assert not lse_calls, "no weights were asked for, yet the lse kernel ran"


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
@torch.no_grad()
def test_output_attentions_equal_eager(family, lse_calls):
    """Causal with left padding and GQA (Llama), causal (GPT-2), bidirectional with right padding (BERT)."""
    inputs = batch(family)
    eager = FAMILIES[family]("eager")(**inputs, output_attentions=True)
    lens = FAMILIES[family]("lens")(**inputs, output_attentions=True)
    assert lse_calls, "the weights came from eager math, not from the kernel's lse"
    assert len(lens.attentions) == NUM_LAYERS
    for layer, (got, want) in enumerate(zip(lens.attentions, eager.attentions, strict=True)):
        assert got.shape == (2, NUM_HEADS, 9, 9)
        assert_close(got, want, f"{family} layer {layer} weights")
    assert_close(model_output(lens) * real_positions(inputs), model_output(eager) * real_positions(inputs), family)


@torch.no_grad()
def test_generate_with_output_attentions_equals_eager():
    ids, mask = padded(LENGTHS, side="left")
    settings = dict(
        attention_mask=mask,
        max_new_tokens=4,
        do_sample=False,
        output_attentions=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    want = tiny_llama("eager").generate(ids, **settings)
    got = tiny_llama("lens").generate(ids, **settings)
    assert torch.equal(got.sequences, want.sequences)
    assert len(got.attentions) == len(want.attentions) == 4  # one entry per generated token
    for step, (got_step, want_step) in enumerate(zip(got.attentions, want.attentions, strict=True)):
        for layer, (g, w) in enumerate(zip(got_step, want_step, strict=True)):
            assert g.shape == w.shape  # (B, H, T, S): the prompt at step 0, then one query over a growing cache
            assert_close(g, w, f"step {step} layer {layer}")


@torch.no_grad()
def test_feature_extraction_pipeline_runs_under_the_lens():
    tokenizer = build_tokenizer()
    text = "the cat sat on the mat and the dog ran to the park ."
    want = pipeline("feature-extraction", model=tiny_bert("sdpa"), tokenizer=tokenizer)(text)
    model = tiny_bert("sdpa")
    extractor = pipeline("feature-extraction", model=model, tokenizer=tokenizer)
    with AttentionLens(model, weights="all") as lens:
        got = extractor(text)
    assert_close(torch.tensor(got), torch.tensor(want), "pipeline features")
    inputs = tokenizer(text, return_tensors="pt")
    eager = tiny_bert("eager")(**inputs, output_attentions=True).attentions
    for layer in range(NUM_LAYERS):
        assert_close(lens.weights[layer], eager[layer], f"pipeline layer {layer} weights")


@torch.no_grad()
def test_text_generation_pipeline_under_the_lens_equals_sdpa():
    tokenizer = build_tokenizer()
    settings = dict(max_new_tokens=5, do_sample=False, return_full_text=False)
    want = pipeline("text-generation", model=tiny_llama("sdpa"), tokenizer=tokenizer)("the cat sat", **settings)
    model = tiny_llama("sdpa")
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    with AttentionLens(model, weights=[1], statistics="all") as lens:
        got = generator("the cat sat", **settings)
    assert got == want
    assert lens.weights[1].shape[:2] == (1, NUM_HEADS)  # the last step's weights: one query over the cache
    assert set(lens.statistics()) == {0, 1}


@pytest.mark.parametrize(
    "grad, extra",
    [
        (False, {}),
        pytest.param(True, {}, id="grad"),
        pytest.param(False, {"norms": [0]}, id="with-norms"),
    ],
)
def test_weights_of_chosen_heads_equal_eager(grad, extra, lse_calls):
    inputs = batch("llama")
    with torch.no_grad():
        eager = tiny_llama("eager")(**inputs, output_attentions=True).attentions
    model = tiny_llama()
    with torch.set_grad_enabled(grad), AttentionLens(model, weights={0: [1, 3], -1: [2]}, **extra) as lens:
        model(**inputs)
    assert bool(lse_calls) != grad
    assert set(lens.weights) == {0, 1}
    assert lens.weights[0].shape == (2, 2, 9, 9) and lens.weights[1].shape == (2, 1, 9, 9)
    assert_close(lens.weights[0].detach(), eager[0][:, [1, 3]], "layer 0 heads 1 and 3")
    assert_close(lens.weights[1].detach(), eager[1][:, [2]], "layer 1 head 2")


# --------------------------------------------------------------------------------------------------------------
# Head interventions against a forward pre-hook on W_O's input (the concatenated heads)
# --------------------------------------------------------------------------------------------------------------


def output_projection(family: str, model, layer: int) -> nn.Module:
    """W_O of one layer: Llama's o_proj, BERT's sibling attention.output.dense, GPT-2's Conv1D c_proj."""
    if family == "llama":
        return model.model.layers[layer].self_attn.o_proj
    if family == "bert":
        return model.encoder.layer[layer].attention.output.dense
    return model.transformer.h[layer].attn.c_proj


def edit_heads(model, family: str, edits: dict[int, dict[int, callable]]) -> list:
    """Forward pre-hooks replacing head h's slice [h·D, (h+1)·D) of W_O's input by edit(slice)."""

    def hook_for(per_head):
        def hook(module, args):
            heads = args[0].clone()  # (B, T, H·D)
            for head, edit in per_head.items():
                part = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
                heads[..., part] = edit(heads[..., part])
            return (heads, *args[1:])

        return hook

    return [
        output_projection(family, model, layer).register_forward_pre_hook(hook_for(per_head))
        for layer, per_head in edits.items()
    ]


def zero(x):
    return torch.zeros_like(x)


def mean(x):
    return x.mean((0, 1), keepdim=True).expand_as(x)  # over batch and positions


def times(factor):
    return lambda x: x * factor


INTERVENTIONS = {
    "zero": (dict(ablate={0: [1], -1: [0, 3]}), {0: {1: zero}, 1: {0: zero, 3: zero}}),
    "mean": (dict(ablate={0: [2], 1: [1]}, ablate_with="mean"), {0: {2: mean}, 1: {1: mean}}),
    "scale": (dict(scale={0: {1: 0.5, 2: 3.0}, 1: {3: -1.0}}), {0: {1: times(0.5), 2: times(3.0)}, 1: {3: times(-1)}}),
    "keep": (dict(keep={1: [2]}), {1: {0: zero, 1: zero, 3: zero}}),
}


@pytest.mark.parametrize("with_weights", [False, True], ids=["sdpa-path", "lse-path"])
@pytest.mark.parametrize("intervention", list(INTERVENTIONS))
@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_head_intervention_equals_editing_w_o_input(family, intervention, with_weights):
    """Unpadded batch: the mean is over every position of every sequence, padding or not, so padding would make
    the reference ambiguous."""
    ids = padded([9, 9])[0]
    arguments, edits = INTERVENTIONS[intervention]
    reference = FAMILIES[family]("sdpa")
    hooks = edit_heads(reference, family, edits)
    want = model_output(reference(ids))
    for hook in hooks:
        hook.remove()
    unchanged = model_output(reference(ids))
    model = FAMILIES[family]("sdpa")
    with AttentionLens(model, weights="all" if with_weights else None, **arguments):
        got = model_output(model(ids))
    assert (want - unchanged).abs().max() > 1e-2, "the intervention changed nothing: the test would prove nothing"
    assert_close(got, want, f"{family} {intervention}")


# --------------------------------------------------------------------------------------------------------------
# Edge knock-out against eager attention recomputed by hand
# --------------------------------------------------------------------------------------------------------------

REFERENCE = "knockout_reference"
_KNOCKOUT: dict[nn.Module, torch.Tensor] = {}


def knockout_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention written out: softmax(scale·QKᵀ + mask, with knocked-out edges at -inf)·V."""
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # (B, H, S, D)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (B, H, T, S)
    if attention_mask is not None:
        scores = scores + attention_mask  # eager_mask: additive, finfo.min where masked
    if module in _KNOCKOUT:
        scores = scores.masked_fill(_KNOCKOUT[module], float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights  # (B, T, H, D), (B, H, T, S)


AttentionInterface.register(REFERENCE, knockout_reference)
AttentionMaskInterface.register(REFERENCE, eager_mask)


def knockout_edges(family: str) -> dict[int, torch.Tensor]:
    """Layer 0: the same edges in every sequence and head (1, 1, T, S); layer 1: per sequence and head (B, H, T, S).
    Every query keeps at least one key; the edges include the first token (a sink) and the diagonal."""
    gen = torch.Generator().manual_seed(3)
    shared = torch.zeros(1, 1, 9, 9, dtype=torch.bool)
    shared[..., 4:, 0] = True  # queries 4.. cannot see the first token
    shared[..., 5, 5] = True
    per_head = torch.rand(2, NUM_HEADS, 9, 9, generator=gen) < 0.3
    keep = torch.arange(9)
    if family == "bert":  # right padding: every query keeps key 0, a real token
        per_head[..., 0] = False
    else:  # causal and left padding: every query keeps its own key
        per_head[..., keep, keep] = False
    return {0: shared, 1: per_head}


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_knockout_equals_eager_with_those_scores_at_minus_infinity(family, lse_calls):
    inputs = batch(family)
    edges = knockout_edges(family)
    reference = FAMILIES[family](REFERENCE)
    _KNOCKOUT.clear()
    _KNOCKOUT.update({attention_sites(reference)[layer]: e for layer, e in edges.items()})
    try:
        want = reference(**inputs, output_attentions=True)
    finally:
        _KNOCKOUT.clear()
    model = FAMILIES[family]("sdpa")
    with AttentionLens(model, weights="all", knockout=edges) as lens:
        got = model_output(model(**inputs))
    assert lse_calls
    for layer in range(NUM_LAYERS):
        real = inputs["attention_mask"][:, None, :, None].bool()  # (B, 1, T, 1): pad queries differ by design
        assert_close(lens.weights[layer] * real, want.attentions[layer] * real, f"{family} layer {layer} weights")
        assert not lens.weights[layer][edges[layer].expand(2, NUM_HEADS, 9, 9) & real].any()
    assert_close(got * real_positions(inputs), model_output(want) * real_positions(inputs), f"{family} output")


# --------------------------------------------------------------------------------------------------------------
# Gradients: eager math when grad is on, the lse kernel when off, the same numbers
# --------------------------------------------------------------------------------------------------------------


def _run_everything(family: str, grad: bool) -> tuple[torch.Tensor, AttentionLens]:
    inputs = batch(family)
    model = FAMILIES[family]("sdpa")
    special = inputs["input_ids"] < 20
    lens = AttentionLens(
        model,
        weights="all",
        ablate={0: [1]},
        scale={1: {2: 0.5}},
        knockout={1: knockout_edges(family)[1]},
        statistics="all",
        special_mask=special,
        block_size=4,
        norms="all",
    )
    with torch.set_grad_enabled(grad), lens:
        out = model_output(model(**inputs))
        if grad:
            out.sum().backward()
            assert output_projection(family, model, 0).weight.grad is not None
    return out.detach(), lens


@pytest.mark.parametrize("family", list(FAMILIES))
def test_results_are_the_same_with_and_without_gradients(family, lse_calls):
    out_grad, with_grad = _run_everything(family, grad=True)
    assert not lse_calls, "gradients were enabled, yet the lse kernel (no derivative) ran"
    out, without = _run_everything(family, grad=False)
    assert lse_calls
    assert_close(out_grad, out, f"{family} output")
    for layer in range(NUM_LAYERS):
        assert_close(with_grad.weights[layer].detach(), without.weights[layer], f"{family} {layer} weights")
        assert_close(with_grad.norms[layer].detach(), without.norms[layer], f"{family} {layer} norms")
        for name, value in without.statistics()[layer].items():
            assert_close(with_grad.statistics()[layer][name].detach(), value, f"{family} {layer} {name}")


# --------------------------------------------------------------------------------------------------------------
# Streaming statistics against the full weight matrix
# --------------------------------------------------------------------------------------------------------------


STATISTICS = {"entropy", "distance", "first_token_mass", "special_mass", "received"}


@pytest.mark.parametrize("block_size", [2, 4])
@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_streaming_statistics_equal_those_of_eager_weights(family, block_size):
    inputs = batch(family)
    special = (inputs["input_ids"] % 3 == 0) & inputs["attention_mask"].bool()  # (B, S)
    eager = FAMILIES[family]("eager")(**inputs, output_attentions=True).attentions
    model = FAMILIES[family]("sdpa")
    with AttentionLens(model, statistics="all", special_mask=special, block_size=block_size) as lens:
        model(**inputs)
    assert lens.weights == {}, "statistics alone must not keep the (B, H, T, S) weights"
    statistics = lens.statistics()
    for layer in range(NUM_LAYERS):
        want = stats_from_weights(eager[layer], inputs["attention_mask"], special)
        assert set(statistics[layer]) == set(want) == STATISTICS
        for name, value in want.items():
            assert statistics[layer][name].shape == value.shape
            assert_close(statistics[layer][name], value, f"{family} layer {layer} {name}")


@torch.no_grad()
def test_statistics_of_two_forwards_are_their_running_means():
    inputs = batch("llama")
    model = tiny_llama()
    with AttentionLens(model, statistics=[0], block_size=3) as lens:
        model(**inputs)
        once = {k: v.clone() for k, v in lens.statistics()[0].items()}
        model(**inputs)
    twice = lens.statistics()[0]
    for name in ("entropy", "distance", "first_token_mass"):
        assert_close(twice[name], once[name], name)
    assert_close(twice["received"], 2 * once["received"], "received (column sums)")


# --------------------------------------------------------------------------------------------------------------
# Value-weighted norms ‖α_ij v_j W_O^h‖ against captured value vectors
# --------------------------------------------------------------------------------------------------------------


def capture_values(family: str, model) -> tuple[dict[int, torch.Tensor], list]:
    """Forward hooks storing each layer's value vectors (B, H, S, D), K/V heads repeated for GQA."""
    values: dict[int, torch.Tensor] = {}

    def store(layer, split):
        def hook(module, args, output):
            v = split(output).view(output.shape[0], output.shape[1], -1, HEAD_DIM).transpose(1, 2)  # (B, H_kv, S, D)
            values[layer] = v.repeat_interleave(NUM_HEADS // v.shape[1], dim=1)  # (B, H, S, D)

        return hook

    hooks = []
    for layer in range(NUM_LAYERS):
        if family == "llama":
            module, split = model.model.layers[layer].self_attn.v_proj, lambda x: x
        elif family == "bert":
            module, split = model.encoder.layer[layer].attention.self.value, lambda x: x
        else:  # GPT-2's fused c_attn: [Q | K | V] along the last dimension
            module, split = model.transformer.h[layer].attn.c_attn, lambda x: x[..., 2 * HIDDEN_SIZE :]
        hooks.append(module.register_forward_hook(store(layer, split)))
    return values, hooks


def per_head_projection(family: str, projection: nn.Module, head: int) -> torch.Tensor:
    """W_O^h as (D, C), so that v_j^h W_O^h is what head h adds to the residual stream for key j."""
    part = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
    if family == "gpt2":  # Conv1D stores (H·D, C)
        return projection.weight[part, :]
    return projection.weight[:, part].T  # nn.Linear stores (C, H·D)


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_norms_equal_weights_times_projected_value_norms(family):
    """Values are captured from the lens's own forward: at pad positions from layer 1 on they differ from eager's
    (sdpa gives a query that sees no key a zero output, eager the mean of V), and eager's pad queries spread uniform
    weight over them."""
    inputs = batch(family)
    eager = FAMILIES[family]("eager")(**inputs, output_attentions=True).attentions
    model = FAMILIES[family]("sdpa")
    values, hooks = capture_values(family, model)
    with AttentionLens(model, norms="all") as lens:
        model(**inputs)
    for hook in hooks:
        hook.remove()
    assert lens.weights == {}, "norms alone must not keep the weights"
    for layer in range(NUM_LAYERS):
        projection = output_projection(family, model, layer)
        heads = [values[layer][:, h] @ per_head_projection(family, projection, h) for h in range(NUM_HEADS)]
        size = torch.stack(heads, dim=1).norm(dim=-1)  # (B, H, S, C) -> (B, H, S)
        want = eager[layer] * size[:, :, None, :]  # (B, H, T, S)
        assert lens.norms[layer].shape == want.shape
        assert_close(lens.norms[layer], want, f"{family} layer {layer} norms")


# --------------------------------------------------------------------------------------------------------------
# Model-specific keywords: softcap (Gemma 2), sinks (gpt-oss), position_bias (T5)
# --------------------------------------------------------------------------------------------------------------


def _compare_recorded(eager_out, lens_out, names, real=None) -> None:
    for name in names:
        for layer, (got, want) in enumerate(zip(getattr(lens_out, name), getattr(eager_out, name), strict=True)):
            if real is not None:
                got, want = got * real, want * real
            assert_close(got, want, f"{name} {layer}")


@torch.no_grad()
def test_gemma2_softcap_and_sliding_window_weights_equal_eager():
    inputs = batch("llama")
    want = tiny_gemma2("eager")(**inputs, output_attentions=True)
    got = tiny_gemma2("lens")(**inputs, output_attentions=True)
    _compare_recorded(want, got, ["attentions"])
    assert_close(got.logits * real_positions(inputs), want.logits * real_positions(inputs), "logits")
    assert (want.attentions[0][0, :, 8, :4] == 0).all(), "layer 0's sliding window of 4 was not applied"


@torch.no_grad()
def test_gemma2_statistics_equal_those_of_eager_weights():
    inputs = batch("llama")
    eager = tiny_gemma2("eager")(**inputs, output_attentions=True).attentions
    model = tiny_gemma2("eager")
    with AttentionLens(model, statistics="all", block_size=4) as lens:
        model(**inputs)
    for layer in range(NUM_LAYERS):
        for name, value in stats_from_weights(eager[layer], inputs["attention_mask"]).items():
            assert_close(lens.statistics()[layer][name], value, f"layer {layer} {name}")


@torch.no_grad()
def test_gpt_oss_sink_weights_equal_eager(lse_calls):
    """On real queries. Sinks take mass from the keys: rows sum to less than 1."""
    inputs = batch("llama")
    want = tiny_gpt_oss("eager")(**inputs, output_attentions=True)
    got = tiny_gpt_oss("lens")(**inputs, output_attentions=True)
    assert lse_calls
    real = inputs["attention_mask"][:, None, :, None].float()  # (B, 1, T, 1)
    _compare_recorded(want, got, ["attentions"], real)
    assert_close(got.last_hidden_state * real_positions(inputs), want.last_hidden_state * real_positions(inputs), "h")
    assert (want.attentions[1].sum(-1)[0] < 0.99).any(), "the sinks took no mass: the test would prove nothing"


@torch.no_grad()
def test_gpt_oss_sink_weights_equal_eager_on_padding_queries_too():
    inputs = batch("llama")
    want = tiny_gpt_oss("eager")(**inputs, output_attentions=True)
    got = tiny_gpt_oss("lens")(**inputs, output_attentions=True)
    _compare_recorded(want, got, ["attentions"])


@torch.no_grad()
def test_gpt_oss_for_causal_lm_runs_under_the_lens():
    """GptOssForCausalLM passes `output_router_logits` through to the attention function (found at 229a2b4: the lens
    refused it at every call; fixed in 044785a)."""
    model = _seeded(GptOssForCausalLM, tiny_gpt_oss_config(), "eager")
    _with_sinks(model, model.model.layers)
    inputs = batch("llama")
    want = model(**inputs, output_attentions=True)
    model.set_attn_implementation("lens")
    got = model(**inputs, output_attentions=True)
    assert_close(got.logits * real_positions(inputs), want.logits * real_positions(inputs), "logits")
    real = inputs["attention_mask"][:, None, :, None].float()
    _compare_recorded(want, got, ["attentions"], real)


def test_gpt_oss_with_gradients_equals_eager():
    """With gradients on the lens takes eager math, sinks included (at 229a2b4 it raised 'attention sinks (s_aux)
    need the lse path' on every forward; fixed in 044785a). Weights, output and gradients equal eager's."""
    inputs = batch("llama")
    eager, model = tiny_gpt_oss("eager"), tiny_gpt_oss("eager")
    want = eager(**inputs, output_attentions=True)
    with AttentionLens(model, weights="all", statistics="all", block_size=4) as lens:
        got = model(**inputs)
    real = real_positions(inputs)
    assert_close(got.last_hidden_state.detach() * real, want.last_hidden_state.detach() * real, "hidden states")
    (want.last_hidden_state * real).sum().backward()
    (got.last_hidden_state * real).sum().backward()
    for (name, a), b in zip(eager.named_parameters(), model.parameters(), strict=True):
        # Gradients reach 20 in size (sums over tokens): TOL relative as well as absolute.
        torch.testing.assert_close(b.grad, a.grad, atol=TOL, rtol=TOL, msg=lambda m, name=name: f"{name}: {m}")
    rows = inputs["attention_mask"][:, None, :, None].float()  # pad queries
    for layer in range(NUM_LAYERS):
        assert_close(lens.weights[layer].detach() * rows, want.attentions[layer].detach() * rows, f"{layer} weights")
        for name, value in stats_from_weights(want.attentions[layer].detach(), inputs["attention_mask"]).items():
            assert_close(lens.statistics()[layer][name], value, f"layer {layer} {name}")


@torch.no_grad()
def test_gpt_oss_statistics_equal_those_of_eager_weights():
    """On the lse path the sinks' share of the mass is taken out of every row, as eager's weights have it."""
    inputs = batch("llama")
    eager = tiny_gpt_oss("eager")(**inputs, output_attentions=True).attentions
    model = tiny_gpt_oss("eager")
    with AttentionLens(model, statistics="all", block_size=4) as lens:
        model(**inputs)
    for layer in range(NUM_LAYERS):
        for name, value in stats_from_weights(eager[layer], inputs["attention_mask"]).items():
            assert_close(lens.statistics()[layer][name], value, f"layer {layer} {name}")


@pytest.mark.parametrize("masked", [True, False], ids=["padded", "no-mask"])
@torch.no_grad()
def test_t5_position_bias_weights_equal_eager(masked, lse_calls):
    """Encoder self-attention, decoder self-attention and cross-attention, each with T5's relative bias."""
    inputs = batch("t5")
    if not masked:
        del inputs["attention_mask"]
    want = tiny_t5("eager")(**inputs, output_attentions=True)
    got = tiny_t5("lens")(**inputs, output_attentions=True)
    assert lse_calls
    _compare_recorded(want, got, ["encoder_attentions", "decoder_attentions", "cross_attentions"])
    assert_close(got.logits, want.logits, "logits")


def _t5_reference_statistics(inputs: dict, name: str, eager) -> dict[str, torch.Tensor]:
    """stats_from_weights of the eager weights of a T5 attention module named `name` (its layer's block number)."""
    block = int(name.split(".")[2])
    if name.startswith("encoder"):
        return stats_from_weights(eager.encoder_attentions[block], inputs["attention_mask"])
    if "EncDecAttention" in name:  # queries: the 5 decoder tokens; keys: the 9 encoder tokens, padding masked
        return stats_from_weights(eager.cross_attentions[block], inputs["attention_mask"], cross=True)
    return stats_from_weights(eager.decoder_attentions[block], None)


@pytest.mark.parametrize("kind", ["encoder", "decoder", "cross"])
@torch.no_grad()
def test_t5_statistics_equal_those_of_eager_weights(kind):
    inputs = batch("t5")
    eager = tiny_t5("eager")(**inputs, output_attentions=True)
    model = tiny_t5("sdpa")
    with AttentionLens(model, statistics="all", block_size=2) as lens:
        model(**inputs)
    pattern = {"encoder": "encoder.", "decoder": "layer.0.SelfAttention", "cross": "EncDecAttention"}[kind]
    layers = [i for i, name in enumerate(lens.layer_names) if pattern in name]
    if kind == "decoder":
        layers = [i for i in layers if lens.layer_names[i].startswith("decoder")]
    assert len(layers) == NUM_LAYERS
    for layer in layers:
        name = lens.layer_names[layer]
        for statistic, value in _t5_reference_statistics(inputs, name, eager).items():
            assert_close(lens.statistics()[layer][statistic], value, f"{name} {statistic}")


# --------------------------------------------------------------------------------------------------------------
# Bad arguments: a ValueError naming argument and value, before any forward
# --------------------------------------------------------------------------------------------------------------


def _knockout(*shape, dtype=torch.bool):
    return torch.zeros(*shape, dtype=dtype)


BAD_ARGUMENTS = {
    "unknown layer": (dict(weights=[2]), ["weights", "layer 2", "0..1"]),
    "negative layer out of range": (dict(statistics=[-3]), ["statistics", "layer -3"]),
    "norms layer": (dict(norms=[7]), ["norms", "layer 7"]),
    "layer given as bool": (dict(weights=[True]), ["weights", "True"]),
    "selection string": (dict(weights="first"), ["weights", "'first'", "'all'"]),
    "ablate layer": (dict(ablate={5: [0]}), ["ablate", "layer 5"]),
    "head too large": (dict(ablate={0: [4]}), ["ablate", "[4]", "0..3"]),
    "negative head": (dict(keep={1: [-1]}), ["keep", "[-1]", "0..3"]),
    "scale head": (dict(scale={0: {9: 2.0}}), ["scale", "[9]"]),
    "knockout layer": (dict(knockout={2: _knockout(1, 1, 9, 9)}), ["knockout", "layer 2"]),
    "knockout dtype": (dict(knockout={0: _knockout(1, 1, 9, 9, dtype=torch.float32)}), ["knockout", "float32"]),
    "knockout shape": (dict(knockout={0: _knockout(9, 9)}), ["knockout", "(9, 9)", "(B|1, H|1, T, S)"]),
    "knockout not a tensor": (dict(knockout={0: [[True]]}), ["knockout", "[[True]]"]),
    "ablate_with": (dict(ablate={0: [1]}, ablate_with="median"), ["ablate_with", "'median'", "'zero'", "'mean'"]),
    "block_size zero": (dict(statistics=[0], block_size=0), ["block_size", "0", "positive integer"]),
    "block_size float": (dict(statistics=[0], block_size=2.5), ["block_size", "2.5"]),
    "block_size string": (dict(statistics=[0], block_size="8"), ["block_size", "'8'"]),
    "scale nan": (dict(scale={0: {1: float("nan")}}), ["scale", "nan", "finite"]),
    "scale inf": (dict(scale={1: {0: float("inf")}}), ["scale", "inf", "finite"]),
    "scale not a number": (dict(scale={1: {0: "2"}}), ["scale", "'2'"]),
    "output projection": (dict(norms=[0], output_projection="w_out"), ["w_out", "output_projection"]),
}


BAD_TYPES = {
    "weights as an int": (dict(weights=0), "weights"),
    "ablate heads as an int": (dict(ablate={0: 1}), "ablate"),
    "ablate as a list": (dict(ablate=[0, 1]), "ablate"),
    "scale heads as a list": (dict(scale={0: [1, 2]}), "scale"),
    "knockout as a list": (dict(knockout=[_knockout(1, 1, 9, 9)]), "knockout"),
    "query_mask as a list": (dict(statistics=[0], query_mask=[torch.ones(2, 9)]), "query_mask"),
    "output_projection as an int": (dict(norms=[0], output_projection=3), "output_projection"),
}


@pytest.mark.parametrize("case", list(BAD_TYPES))
def test_arguments_of_the_wrong_type_raise_value_error(case):
    arguments, name = BAD_TYPES[case]
    model = tiny_llama()
    with pytest.raises(ValueError, match=name):
        AttentionLens(model, **arguments)


class ForwardCounter:
    """Counts forwards of a model and checks nothing of the lens stayed on it."""

    def __init__(self, model):
        self.model, self.calls = model, 0
        self.implementation = model.config._attn_implementation
        model.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1

    def assert_untouched(self):
        assert self.calls == 0, "a forward ran before the arguments were checked"
        assert self.model.config._attn_implementation == self.implementation
        assert not any(hasattr(m, "_lens_site") for m in self.model.modules())


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_raise_before_any_forward(case):
    arguments, words = BAD_ARGUMENTS[case]
    model = tiny_llama()
    counter = ForwardCounter(model)
    with pytest.raises(ValueError) as error:
        AttentionLens(model, **arguments)
    for word in words:
        assert word in str(error.value), f"{case}: {word!r} not in {str(error.value)!r}"
    counter.assert_untouched()


def test_knockout_with_the_wrong_head_count_is_refused_at_construction():
    model = tiny_llama()
    counter = ForwardCounter(model)
    with pytest.raises(ValueError, match="knockout"):
        AttentionLens(model, knockout={0: _knockout(1, 3, 9, 9)})
    counter.assert_untouched()


class Wrapper(nn.Module):
    """A model with attention that does not go through transformers' interface."""

    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(HIDDEN_SIZE, NUM_HEADS, batch_first=True)
        self.config = LlamaConfig()


def tiny_deberta() -> DebertaV2Model:
    config = DebertaV2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
    )
    return _seeded(DebertaV2Model, config, "eager")


@pytest.mark.parametrize("build", [Wrapper, tiny_deberta], ids=["plain-module", "deberta-v2"])
def test_a_model_without_interface_attention_is_refused(build):
    model = build()
    counter = ForwardCounter(model)
    with pytest.raises(ValueError, match=rf"{type(model).__name__}: no attention module .*ALL_ATTENTION_FUNCTIONS"):
        AttentionLens(model, weights="all")
    counter.assert_untouched()


class TemperatureAttention(LlamaAttention):
    """Llama's attention passing one keyword the lens does not know (`temperature`) to the attention function."""

    temperature = 2.0

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, None)
        output, weights = attention_interface(
            self, query, key, value, attention_mask, scaling=self.scaling, temperature=self.temperature, **kwargs
        )
        return self.o_proj(output.reshape(*hidden_states.shape[:-1], -1)), weights


def test_an_attention_passing_an_unknown_keyword_is_refused():
    model = tiny_llama()
    model.model.layers[1].self_attn.__class__ = TemperatureAttention
    counter = ForwardCounter(model)
    with pytest.raises(ValueError) as error:
        AttentionLens(model, weights=[0])
    for word in ("model.layers.1.self_attn", "TemperatureAttention", "temperature"):
        assert word in str(error.value)
    counter.assert_untouched()
    # Without an AttentionLens the refusal comes at the call, still a ValueError naming the keyword.
    model.set_attn_implementation("lens")
    with torch.no_grad(), pytest.raises(ValueError, match="temperature"):
        model(**batch("llama"))


# --------------------------------------------------------------------------------------------------------------
# Leaving the lens restores the model
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raised", [None, RuntimeError, KeyboardInterrupt], ids=["normal-exit", "error", "interrupt"])
@pytest.mark.parametrize("previous", ["sdpa", "eager"])
@torch.no_grad()
def test_leaving_the_lens_restores_the_model(previous, raised):
    """KeyboardInterrupt is no Exception: a lens that restored only on `except Exception` would fail it."""
    inputs = batch("llama")
    model = tiny_llama(previous)
    before = model(**inputs).logits
    lens = AttentionLens(
        model, weights="all", ablate={0: [1]}, knockout={1: _knockout(1, 1, 9, 9)}, statistics="all", norms=[1]
    )
    try:
        with lens:
            assert model.config._attn_implementation == "lens"
            assert sum(hasattr(m, "_lens_site") for m in model.modules()) == NUM_LAYERS
            changed = model(**inputs).logits
            if raised is not None:
                raise raised("inside the lens")
    except (RuntimeError, KeyboardInterrupt) as error:
        assert raised is not None and isinstance(error, raised)
    assert not torch.equal(changed, before), "the ablation changed nothing: the test would prove nothing"
    assert model.config._attn_implementation == previous
    assert all(layer.self_attn.config._attn_implementation == previous for layer in model.model.layers)
    assert not any(hasattr(m, "_lens_site") for m in model.modules())
    assert torch.equal(model(**inputs).logits, before)
    assert set(lens.weights) == {0, 1}  # the results outlive the context
