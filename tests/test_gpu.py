"""GPU checks (CUDA only; skipped without it): every backend against eager in bf16 and fp32, flex with padding and
ALiBi, static-cache compiled decoding, exact weights from fused backends. `scripts/gpu_check.sh` runs them with
`pytest -m gpu`. Tolerances: fp32 1e-4 on logits (GPU kernels reorder sums: TF32 is off, but reductions differ);
bf16 5e-2 relative to the logit scale (8 mantissa bits: ~4e-3 per op, accumulated over 2 layers)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import padded, tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

BACKENDS = ["sdpa", "flex_attention"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])


def _pair(arch: str, backend: str, dtype: torch.dtype, **overrides):
    eager = tiny_model(arch, attn_implementation="eager", **overrides).to("cuda", dtype)
    fast = tiny_model(arch, attn_implementation="eager", **overrides).to("cuda", dtype)
    fast.set_attn_implementation(backend)
    return eager, fast


def _inputs(model, padding: bool) -> dict:
    ids, mask = padded([7, 5] if padding else [7, 7], "right")
    inputs = {"input_ids": ids.cuda(), "attention_mask": mask.cuda()}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = torch.tensor([[1, 5, 9], [1, 6, 7]], device="cuda")
    return inputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["decoder", "encoder", "encoder-decoder"])
def test_backend_agrees_with_eager(arch, backend, dtype):
    if backend == "flash_attention_2" and dtype == torch.float32:
        pytest.skip("flash attention kernels take fp16/bf16 only")
    eager, fast = _pair(arch, backend, dtype)
    inputs = _inputs(eager, padding=True)
    with torch.no_grad():
        reference, logits = eager(**inputs).logits.float(), fast(**inputs).logits.float()
    rows = inputs["attention_mask"].bool() if not eager.config.is_encoder_decoder else slice(None)
    scale = reference.abs().max().clamp(min=1.0)
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2 * scale
    assert (logits - reference)[rows].abs().max() <= tolerance


@pytest.mark.parametrize("backend", ["sdpa", "flex_attention"])
def test_alibi_under_fast_backends(backend):
    eager, fast = _pair("decoder", backend, torch.float32, position_encoding="alibi")
    inputs = _inputs(eager, padding=True)
    with torch.no_grad():
        difference = (fast(**inputs).logits - eager(**inputs).logits)[inputs["attention_mask"].bool()]
    assert difference.abs().max() <= 1e-4


@pytest.mark.parametrize("backend", ["sdpa", "flex_attention"])  # fp32: flash has no fp32 kernel
def test_weights_from_fast_backends_are_the_eager_weights(backend):
    eager, fast = _pair("decoder", backend, torch.float32)
    inputs = _inputs(eager, padding=False)
    with torch.no_grad():
        expected = eager(**inputs, output_attentions=True).attentions
        got = fast(**inputs, output_attentions=True, attention_layers=[-1]).attentions
    assert len(got) == 1
    torch.testing.assert_close(got[0], expected[-1], atol=1e-4, rtol=0)


def test_static_cache_compiled_decoding_equals_dynamic():
    model = tiny_model("decoder", attn_implementation="sdpa").cuda()
    ids, mask = padded([6, 4], "left")
    ids, mask = ids.cuda(), mask.cuda()
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    dynamic = model.generate(ids, **kwargs)
    model.forward = torch.compile(model.forward, fullgraph=True)
    static = model.generate(ids, cache_implementation="static", **kwargs)
    assert torch.equal(dynamic, static)
