"""`prune_heads`: heads physically removed from W_Q, W_K, W_V and W_O give the outputs of head-mask ablation of the
same heads (self and cross attention, every architecture and CPU backend, padding, ALiBi, RoPE, the KV cache and
generate), fewer parameters, and a pruned model that saves and loads (here and in a fresh process through
remote code). Masks and returned weights keep the original head indices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import modeling
from tests.conftest import model_inputs, padded, tiny_model

TOL = 1e-5  # fp32: pruning only drops rows and columns, so the kept heads' sums differ by rounding alone

# Original head indices removed per module; the masks below ablate the same heads.
PRUNE = {
    "encoder": {"encoder.0.self": [1, 3], "encoder.1.self": [0]},
    "decoder": {"decoder.0.self": [2], "decoder.1.self": [0, 1, 3]},
    "encoder-decoder": {
        "encoder.0.self": [0, 2],
        "decoder.0.self": [1],
        "decoder.1.cross": [0, 3],
        "decoder.0.cross": [2],
    },
}


def masks_for(pruned: dict[str, list[int]], layers: int = 2, heads: int = 4) -> dict[str, torch.Tensor]:
    """The head_mask / decoder_head_mask / cross_attn_head_mask tensors (L, H) that ablate `pruned`."""
    names = {"encoder.self": "head_mask", "decoder.self": "decoder_head_mask", "decoder.cross": "cross_attn_head_mask"}
    masks: dict[str, torch.Tensor] = {}
    for key, removed in pruned.items():
        stack, layer, kind = key.split(".")
        name = names[f"{stack}.{kind}"]
        masks.setdefault(name, torch.ones(layers, heads))[int(layer), removed] = 0.0
    return masks


def forward_masks(model, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Masks under the forward's argument names: a decoder-only model takes its self mask as `head_mask`."""
    if model.config.architecture == "decoder" and "decoder_head_mask" in masks:
        return {"head_mask": masks["decoder_head_mask"]}
    return masks


def pruned_copy(model, pruned: dict[str, list[int]]):
    config = type(model.config).from_dict(model.config.to_dict())
    config._attn_implementation = model.config._attn_implementation
    clone = type(model)(config).eval()
    clone.load_state_dict(model.state_dict())
    clone.prune_heads(pruned)
    return clone


@pytest.mark.parametrize("architecture", ["encoder", "decoder", "encoder-decoder"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_pruned_equals_masked(architecture, backend):
    model = tiny_model(architecture, attn_implementation=backend)
    pruned = pruned_copy(model, PRUNE[architecture])
    ids, mask = padded([7, 5, 3], side="right")
    masks = forward_masks(model, masks_for(PRUNE[architecture]))
    expected = model(**model_inputs(model, ids, mask, **masks), output_attentions=True)
    got = pruned(**model_inputs(pruned, ids, mask), output_attentions=True)
    assert (got.logits - expected.logits).abs().max() < TOL
    # weights come back in the original head indices: the pruned heads are zero, as under the mask
    for name in ("attentions", "encoder_attentions", "decoder_attentions", "cross_attentions"):
        for a, b in zip(getattr(expected, name, None) or (), getattr(got, name, None) or ()):
            assert a.shape == b.shape and (a - b).abs().max() < TOL
    assert pruned.num_parameters() < model.num_parameters()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention runs on CUDA only (its CPU path aborts)")
@pytest.mark.parametrize("architecture", ["encoder", "decoder", "encoder-decoder"])
def test_pruned_equals_masked_flex_on_gpu(architecture):
    model = tiny_model(architecture, attn_implementation="flex_attention").cuda()
    pruned = pruned_copy(model, PRUNE[architecture]).cuda()
    ids, mask = padded([7, 5, 3], side="right")
    masks = forward_masks(model, masks_for(PRUNE[architecture]))
    on_gpu = {k: v.cuda() for k, v in model_inputs(model, ids, mask, **masks).items()}
    with torch.no_grad():
        expected = model(**on_gpu).logits
        got = pruned(**{k: v for k, v in on_gpu.items() if "head_mask" not in k}).logits
    assert (got - expected).abs().max() < 1e-4  # GPU kernels reorder sums (see tests/test_gpu.py)


def test_parameter_count_and_shapes():
    model = tiny_model("encoder-decoder")
    pruned = pruned_copy(model, PRUNE["encoder-decoder"])
    attn = pruned.model.encoder.layers[0].self_attn
    assert attn.kept_heads == [1, 3] and attn.num_heads == 2
    assert tuple(attn.q_proj.weight.shape) == (16, 32) and tuple(attn.o_proj.weight.shape) == (32, 16)
    removed_heads = sum(len(v) for v in PRUNE["encoder-decoder"].values())  # 7 heads of width 8
    per_head = 4 * 8 * 32 + 3 * 8  # W_Q, W_K, W_V rows, W_O columns; q, k, v bias entries
    assert model.num_parameters() - pruned.num_parameters() == removed_heads * per_head
    assert pruned.config.pruned_heads == {k: sorted(v) for k, v in sorted(PRUNE["encoder-decoder"].items())}


def test_masks_index_original_heads_after_pruning():
    """A head_mask on a pruned model still names original heads; its entries at pruned heads are ignored."""
    model = tiny_model("decoder")
    pruned = pruned_copy(model, {"decoder.0.self": [2]})
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    extra = torch.ones(2, 4)
    extra[0, 0] = 0.0
    extra[1, 3] = 0.0
    both = extra.clone()
    both[0, 2] = 0.0
    expected = model(ids, head_mask=both).logits
    assert (pruned(ids, head_mask=extra).logits - expected).abs().max() < TOL
    assert (pruned(ids, head_mask=both).logits - expected).abs().max() < TOL


def test_pruning_twice_and_every_head():
    """Pruning composes (original indices throughout); a module with every head pruned adds W_O's bias only."""
    model = tiny_model("decoder", attn_implementation="sdpa")
    pruned = pruned_copy(model, {0: [1]})
    pruned.prune_heads({0: [1, 3], "decoder.1.self": [0, 1, 2, 3]})
    assert pruned.config.pruned_heads == {"decoder.0.self": [1, 3], "decoder.1.self": [0, 1, 2, 3]}
    masks = torch.ones(2, 4)
    masks[0, [1, 3]] = 0.0
    masks[1] = 0.0
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    out = pruned(ids, output_attentions=True)
    assert (out.logits - model(ids, head_mask=masks).logits).abs().max() < TOL
    assert out.attentions[1].shape == (2, 4, 6, 6) and out.attentions[1].abs().max() == 0
    greedy = pruned.generate(ids, max_new_tokens=4, do_sample=False)
    assert greedy.shape == (2, 10)


def test_bad_keys_and_heads_are_refused():
    model = tiny_model("encoder-decoder")
    with pytest.raises(ValueError, match="no attention module 'encoder.0.cross'"):
        model.prune_heads({"encoder.0.cross": [0]})
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        model.prune_heads({"decoder.1.self": [4]})
    with pytest.raises(ValueError, match="no attention module 0"):
        model.prune_heads({0: [1]})  # an int key is ambiguous in an encoder-decoder
    with pytest.raises(ValueError, match="pruned_heads"):
        modeling.CourseTransformerConfig(architecture="decoder", pruned_heads={"encoder.0.self": [0]})


@pytest.mark.parametrize("position_encoding", ["alibi", "rope"])
def test_pruned_cached_generation_equals_masked(position_encoding):
    """Greedy generation with the KV cache: the pruned model gives the masked model's tokens and logits."""
    model = tiny_model("decoder", attn_implementation="sdpa", position_encoding=position_encoding)
    pruned = pruned_copy(model, PRUNE["decoder"])
    masks = forward_masks(model, masks_for(PRUNE["decoder"]))
    ids, mask = padded([6, 4], side="left", seed=3)
    kwargs = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    expected = model.generate(ids, attention_mask=mask, **masks, **kwargs)
    got = pruned.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    assert max((a - b).abs().max() for a, b in zip(got.scores, expected.scores)) < 1e-4
    static = pruned.generate(ids, attention_mask=mask, cache_implementation="static", **kwargs)
    assert torch.equal(static.sequences, expected.sequences)


def test_pruned_seq2seq_generation_equals_masked():
    model = tiny_model("encoder-decoder", attn_implementation="sdpa")
    pruned = pruned_copy(model, PRUNE["encoder-decoder"])
    ids, mask = padded([7, 4], side="right", seed=4)
    masks = masks_for(PRUNE["encoder-decoder"])
    kwargs = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    expected = model.generate(ids, attention_mask=mask, **masks, **kwargs)
    got = pruned.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    assert max((a - b).abs().max() for a, b in zip(got.scores, expected.scores)) < 1e-4


def test_pruned_model_saves_and_loads(tmp_path):
    model = tiny_model("encoder-decoder")
    pruned = pruned_copy(model, PRUNE["encoder-decoder"])
    pruned.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["pruned_heads"] == {k: sorted(v) for k, v in PRUNE["encoder-decoder"].items()}
    loaded = modeling.CourseTransformerForSeq2SeqLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert loaded.num_parameters() == pruned.num_parameters()
    ids, mask = padded([5, 3], side="right")
    expected = pruned(**model_inputs(pruned, ids, mask)).logits
    assert (loaded(**model_inputs(loaded, ids, mask)).logits - expected).abs().max() == 0


def test_pruned_model_loads_in_a_fresh_process_with_remote_code(tmp_path):
    """Only the folder's own code (trust_remote_code): the package `modeling` is blocked from importing."""
    model = tiny_model("decoder")
    pruned = pruned_copy(model, PRUNE["decoder"])
    pruned.save_pretrained(tmp_path / "model")
    ids = torch.tensor([[5, 9, 13, 17, 21]])
    expected = pruned(ids).logits[0, -1, :5].tolist()
    script = textwrap.dedent(
        f"""
        import sys, json
        sys.modules["modeling"] = None  # the package is not importable: only the folder's code may run
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        logits = model(torch.tensor([[5, 9, 13, 17, 21]])).logits[0, -1, :5].tolist()
        print(json.dumps([model.num_parameters(), logits]))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    count, logits = json.loads(result.stdout.strip().splitlines()[-1])
    assert count == pruned.num_parameters()
    assert max(abs(a - b) for a, b in zip(logits, expected)) < TOL
