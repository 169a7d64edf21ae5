"""`enable_fast_decoding`: linear layers that read a oneDNN-packed copy of their weight (modeling, `PackedLinear`).

The packed path changes only the summation order of each matrix product, so logits agree with the plain path to
fp32 rounding (atol 1e-5 on logits of size ~1: each output sums 32-128 products of fp32 values, whose reordering
moves it by a few ulp) and greedy tokens are identical, to the plain model and to HF GPT-2 with the same weights.
Everything else must be untouched: parameters, state_dict, tying, save/load, autograd, head masks, attention
weights, peft's LoRA."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import padded, tiny_model
from torch import nn
from transformers import BartForConditionalGeneration, GPT2LMHeadModel

import modeling
from course_transformer.core.conversion import from_bart, from_gpt2
from evaluation.parity import randomize_
from evaluation.tiny import tiny_bart_config, tiny_gpt2_config
from modeling.modeling_course_transformer import PackedLinear, fast_decoding_unavailable

# "packed" needs oneDNN (every CPU wheel of torch has it); "transposed" runs anywhere.
LAYOUTS = ["transposed", pytest.param("packed", marks=pytest.mark.skipif(
    fast_decoding_unavailable() is not None, reason=str(fast_decoding_unavailable())))]  # fmt: skip

ATOL = 1e-5


def _pair(architecture: str = "decoder", backend: str = "sdpa", seed: int = 0, layout: str = "transposed"):
    """(plain, fast): the same seeded weights (std 0.05 so that greedy choices are decisive), one packed."""
    plain = tiny_model(architecture, seed=seed, attn_implementation=backend)
    torch.manual_seed(seed)
    randomize_(plain)
    fast = copy.deepcopy(plain).enable_fast_decoding(layout)
    return plain, fast


def _generate(model, ids, mask, **kwargs) -> torch.Tensor:
    kwargs = {"pad_token_id": 0, **kwargs}
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, **kwargs)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_linear_is_packed_and_unpacked(layout):
    plain, fast = _pair(layout=layout)
    linears = [m for m in plain.modules() if isinstance(m, nn.Linear)]
    packed = [m for m in fast.modules() if isinstance(m, PackedLinear)]
    assert fast.fast_decoding_enabled and not plain.fast_decoding_enabled
    assert len(packed) == len(linears) > 0 and {m._layout for m in packed} == {layout}
    assert set(fast.fast_decoding_layouts.values()) == {layout}
    fast.disable_fast_decoding()
    assert not fast.fast_decoding_enabled
    remaining = [m for m in fast.modules() if isinstance(m, nn.Linear)]
    assert all(type(m) is nn.Linear and "_packed" not in m.__dict__ for m in remaining)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("architecture", ["decoder", "encoder-decoder"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_fast_logits_and_tokens_equal_plain_with_padding(architecture, backend, layout):
    plain, fast = _pair(architecture, backend, layout=layout)
    ids, mask = padded([6, 3, 5], side="left" if architecture == "decoder" else "right")
    with torch.inference_mode():
        inputs = {"input_ids": ids, "attention_mask": mask}
        if architecture == "encoder-decoder":
            inputs["decoder_input_ids"] = torch.tensor([[1, 5, 9]]).expand(3, -1)
        a, b = plain(**inputs).logits, fast(**inputs).logits
    assert (a - b).abs().max().item() <= ATOL
    assert torch.equal(_generate(plain, ids, mask), _generate(fast, ids, mask))
    assert torch.equal(_generate(plain, ids[:1], mask[:1]), _generate(fast, ids[:1], mask[:1]))  # batch 1


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fast_static_cache_tokens_equal_plain(layout):
    plain, fast = _pair(layout=layout)
    ids, mask = padded([6, 4])
    static = _generate(fast, ids, mask, cache_implementation="static")
    assert torch.equal(_generate(plain, ids, mask), static)


@pytest.mark.parametrize("layout", ["auto", *LAYOUTS])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_fast_tokens_equal_hf_gpt2(backend, layout):
    torch.manual_seed(0)
    config = tiny_gpt2_config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config._attn_implementation = backend
    reference = randomize_(GPT2LMHeadModel(config).eval())
    fast = from_gpt2(reference, attn_implementation=backend).eval().enable_fast_decoding(layout)
    ids, mask = padded([7, 4, 6])
    eos = config.eos_token_id
    theirs = _generate(reference, ids, mask, eos_token_id=eos)
    assert torch.equal(_generate(fast, ids, mask, eos_token_id=eos), theirs)


@pytest.mark.parametrize("layout", ["auto", *LAYOUTS])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_fast_tokens_equal_hf_bart_on_a_padded_source(backend, layout):
    config = tiny_bart_config(vocab_size=96, forced_eos_token_id=None)  # real ids + 3 stay below 96
    config._attn_implementation = backend
    torch.manual_seed(0)
    reference = randomize_(BartForConditionalGeneration(config).eval())
    fast = from_bart(reference, attn_implementation=backend).eval().enable_fast_decoding(layout)
    ids, mask = padded([7, 3, 5], side="right")
    ids = ids.masked_fill(mask == 0, config.pad_token_id) + (ids > 0) * 3  # real tokens avoid the special ids
    # No end of sequence, so that every row decodes all 8 tokens (random weights would stop some rows at once).
    kwargs = {"pad_token_id": 1, "eos_token_id": None, "decoder_start_token_id": 2}
    assert torch.equal(_generate(fast, ids, mask, **kwargs), _generate(reference, ids, mask, **kwargs))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_attentions_and_head_mask_on_the_fast_path(layout):
    plain, fast = _pair(backend="sdpa", layout=layout)
    ids, mask = padded([6, 4])
    head_mask = torch.ones(2, 4)
    head_mask[1, 2] = 0.0
    with torch.inference_mode():
        a = plain(input_ids=ids, attention_mask=mask, head_mask=head_mask, output_attentions=True)
        b = fast(input_ids=ids, attention_mask=mask, head_mask=head_mask, output_attentions=True)
    assert (a.logits - b.logits).abs().max().item() <= ATOL
    for wa, wb in zip(a.attentions, b.attentions, strict=True):
        assert (wa - wb).abs().max().item() <= 1e-6  # probabilities in [0, 1]
    assert b.attentions[1][:, 2].abs().max().item() == 0.0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_save_while_fast_writes_the_plain_weights(tmp_path, layout):
    plain, fast = _pair(layout=layout)
    fast.save_pretrained(tmp_path / "fast")
    plain.save_pretrained(tmp_path / "plain")
    files = [tmp_path / name / "model.safetensors" for name in ("fast", "plain")]
    assert files[0].read_bytes() == files[1].read_bytes()
    reloaded = modeling.CourseTransformerForCausalLM.from_pretrained(tmp_path / "fast").eval()
    assert not reloaded.fast_decoding_enabled  # a saved folder holds weights, never the packed cache
    ids, mask = padded([5, 3])
    assert torch.equal(_generate(reloaded, ids, mask), _generate(fast, ids, mask))


def test_tied_head_stays_tied_and_state_dict_is_unchanged():
    plain, fast = _pair()
    assert fast.lm_head.weight is fast.model.decoder.embeddings.word_embeddings.weight
    assert list(fast.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(), plain.state_dict().values(), strict=True))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_falls_back_and_changed_weights_are_never_stale(layout):
    plain, fast = _pair(layout=layout)
    ids, mask = padded([6, 5])
    for model in (plain, fast):
        model.train()
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    for (name, a), b in zip(plain.named_parameters(), fast.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=0), name  # autograd took nn.Linear's own path
    for model in (plain, fast):
        torch.optim.SGD(model.parameters(), lr=0.5).step()  # in place: bumps every weight's version
        model.eval()
    with torch.inference_mode():
        a, b = plain(input_ids=ids).logits, fast(input_ids=ids).logits
    assert (a - b).abs().max().item() <= ATOL  # the packed copy of the old weights is not used
    fast.enable_fast_decoding(layout)  # re-packing picks up the new weights
    with torch.inference_mode():
        assert (plain(input_ids=ids).logits - fast(input_ids=ids).logits).abs().max().item() <= ATOL


@pytest.mark.parametrize("layout", LAYOUTS)
def test_lora_through_peft_on_the_fast_path(layout):
    peft = pytest.importorskip("peft")  # a dev dependency: make install provides it
    plain, fast = _pair(layout=layout)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    plain_lora = peft.get_peft_model(plain, lora)
    torch.manual_seed(1)
    fast_lora = peft.get_peft_model(fast, copy.deepcopy(lora))
    ids, mask = padded([6, 4])
    with torch.inference_mode():
        a = plain_lora(input_ids=ids, attention_mask=mask).logits
        b = fast_lora(input_ids=ids, attention_mask=mask).logits
    assert (a - b).abs().max().item() <= ATOL
    assert any(isinstance(m, PackedLinear) for m in fast_lora.modules())
    # peft merges with `weight.data += delta`: a write through `.data` bumps no version counter, so the packed
    # copies cannot see it (the documented limit of enable_fast_decoding); packing again picks the merge up.
    merged = fast_lora.merge_and_unload().enable_fast_decoding(layout)
    with torch.inference_mode():
        c = merged(input_ids=ids, attention_mask=mask).logits
    assert (a - c).abs().max().item() <= ATOL


def test_refuses_a_model_with_nothing_to_pack():
    model = tiny_model().to(torch.float64)
    with pytest.raises(ValueError, match=r"enable_fast_decoding: needs float32 weights on the CPU.*float64"):
        model.enable_fast_decoding()
    assert not model.fast_decoding_enabled


def test_auto_times_each_weight_shape_once_and_keeps_a_known_layout():
    plain, fast = _pair(layout="auto")
    shapes = {f"{m.out_features} x {m.in_features}" for m in plain.modules() if isinstance(m, nn.Linear)}
    assert set(fast.fast_decoding_layouts) == shapes
    assert set(fast.fast_decoding_layouts.values()) <= {"plain", "transposed", "packed"}
    for module in fast.modules():
        if isinstance(module, nn.Linear):
            chosen = fast.fast_decoding_layouts[f"{module.out_features} x {module.in_features}"]
            assert (module._layout if isinstance(module, PackedLinear) else "plain") == chosen


def test_refuses_an_unknown_layout():
    with pytest.raises(ValueError, match=r"layout='fused'; allowed: auto, plain, transposed, packed"):
        tiny_model().enable_fast_decoding("fused")


def test_compiled_static_cache_decoding_on_the_fast_path():
    """The path `benchmark --mode decode` times: generate(cache_implementation="static", compile_config=...) on a
    fast model compiles (the storage/version guard is not traced) and gives the plain model's tokens."""
    from transformers import CompileConfig

    plain, fast = _pair(layout="transposed")
    compile_config = CompileConfig()
    compile_config._compile_all_devices = True  # transformers compiles only on CUDA unless told otherwise
    ids, mask = padded([6, 4])
    compiled = _generate(fast, ids, mask, cache_implementation="static", compile_config=compile_config)
    assert hasattr(fast, "_compiled_call")  # transformers did compile the decoding step
    assert torch.equal(compiled, _generate(plain, ids, mask))
    assert torch.equal(
        _generate(fast, ids, mask, cache_implementation="static", compile_config=compile_config), compiled
    )  # fmt: skip  (the second call reuses the compiled step)
