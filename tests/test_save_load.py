"""save_pretrained -> from_pretrained round trips, tying, Auto classes, and remote code in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, model_inputs, tiny_model
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    GenerationConfig,
)

import modeling

ARCHS = ["decoder", "encoder", "encoder-decoder"]
ENCODINGS = ["sinusoidal", "learned", "rope", "alibi"]
AUTO_FOR_ARCH = {
    "decoder": AutoModelForCausalLM,
    "encoder": AutoModelForMaskedLM,
    "encoder-decoder": AutoModelForSeq2SeqLM,
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_round_trip_is_bit_identical(tmp_path, arch, encoding):
    """The sinusoidal table, RoPE frequencies and ALiBi slopes are non-persistent buffers that from_pretrained
    recreates as empty memory; they must be recomputed, and the logits must match bit for bit."""
    model = tiny_model(arch, position_encoding=encoding, norm_placement="pre", attn_implementation="sdpa")
    with torch.no_grad():  # move every parameter (LayerNorms and biases too) away from its initial value
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    before = model(**model_inputs(model, ids)).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    loaded = AUTO_FOR_ARCH[arch].from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    after = loaded(**model_inputs(loaded, ids)).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("arch", ARCHS)
def test_tied_weights_stay_one_tensor(tmp_path, arch):
    model = tiny_model(arch)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys  # only the source of a tie is stored
    loaded = AUTO_FOR_ARCH[arch].from_pretrained(tmp_path)
    emb = loaded.get_input_embeddings().weight
    assert loaded.lm_head.weight.data_ptr() == emb.data_ptr()
    if arch == "encoder-decoder":
        assert loaded.model.decoder.embeddings.word_embeddings.weight.data_ptr() == emb.data_ptr()
    with torch.no_grad():
        emb[5] += 1.0
    assert torch.equal(loaded.lm_head.weight[5], emb[5])


def test_untied_weights_are_saved_separately(tmp_path):
    model = tiny_model("decoder", tie_word_embeddings=False)
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_every_auto_class_resolves(tmp_path):
    enc = tiny_model("encoder", add_pooling_layer=True)
    enc.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), modeling.CourseTransformerConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path), modeling.CourseTransformerModel)
    seq = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    tok = AutoModelForTokenClassification.from_pretrained(tmp_path, num_labels=5)
    assert seq.classifier.out_features == 3 and tok.classifier.out_features == 5
    # the base weights came from the masked-LM checkpoint (base_model_prefix lets heads share them)
    assert torch.equal(
        seq.model.encoder.layers[0].self_attn.q_proj.weight, enc.model.encoder.layers[0].self_attn.q_proj.weight
    )


def test_saved_folder_carries_code_auto_map_and_generation_config(tmp_path):
    model = tiny_model("encoder-decoder")
    model.generation_config = GenerationConfig(
        decoder_start_token_id=1, pad_token_id=0, eos_token_id=2, num_beams=2, max_new_tokens=20
    )
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSeq2SeqLM"].endswith(".CourseTransformerForSeq2SeqLM")
    assert config["auto_map"]["AutoConfig"].endswith(".CourseTransformerConfig")
    assert "text2text-generation" in config["custom_pipelines"]
    for name in (
        "modeling_course_transformer.py",
        "configuration_course_transformer.py",
        "pipeline_course_transformer.py",
    ):
        assert (tmp_path / name).is_file(), name
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["num_beams"] == 2


# A fresh interpreter in which `modeling` cannot be imported: the folder's own code must do everything.
FRESH_PRELUDE = textwrap.dedent(
    """
    import importlib.abc, json, sys, os
    os.environ["HF_HUB_OFFLINE"] = "1"
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("modeling", "evaluation"):
                raise ImportError("blocked: " + name)
    sys.meta_path.insert(0, _Block())
    try:
        import modeling
        raise SystemExit("the package is importable: the test would prove nothing")
    except ImportError:
        pass
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers import pipeline
    """
)


def _run_fresh(script: str, cwd: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_PRELUDE + textwrap.dedent(script)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_remote_code_in_fresh_process_reproduces_logits_and_pipelines(tmp_path, tokenizer):
    from transformers import pipeline

    ids = torch.randint(3, 30, (1, 6), generator=torch.Generator().manual_seed(1))
    expected = {}
    for arch, encoding in (("decoder", "rope"), ("encoder", "learned"), ("encoder-decoder", "sinusoidal")):
        folder = tmp_path / arch
        model = tiny_model(arch, position_encoding=encoding, attn_implementation="sdpa")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        expected[arch] = model(**model_inputs(model, ids)).logits
    text = "the pizza came out of the oven and it"
    gen = pipeline("text-generation", model=str(tmp_path / "decoder"), tokenizer=tokenizer)
    exp_gen = gen(text, do_sample=False, max_new_tokens=4)[0]["generated_text"]
    fill = pipeline("fill-mask", model=str(tmp_path / "encoder"), tokenizer=tokenizer)
    exp_fill = [r["token"] for r in fill("the pizza [MASK] good", top_k=3)]
    t2t = pipeline("text2text-generation", model=str(tmp_path / "encoder-decoder"), trust_remote_code=True)
    exp_t2t = t2t("le chat est sur tapis", max_new_tokens=5)[0]["generated_text"]

    result = _run_fresh(
        f"""
        ids = torch.tensor({ids.tolist()})
        dec = torch.tensor([[1, 5, 9, 13]])
        out = {{}}
        m = AutoModelForCausalLM.from_pretrained("decoder", trust_remote_code=True).eval()
        out["decoder"] = m(ids).logits.tolist()
        out["module"] = type(m).__module__
        m = AutoModelForMaskedLM.from_pretrained("encoder", trust_remote_code=True).eval()
        out["encoder"] = m(ids).logits.tolist()
        m = AutoModelForSeq2SeqLM.from_pretrained("encoder-decoder", trust_remote_code=True).eval()
        out["encoder-decoder"] = m(ids, decoder_input_ids=dec).logits.tolist()
        gen = pipeline("text-generation", model="decoder", trust_remote_code=True)
        out["gen"] = gen({text!r}, do_sample=False, max_new_tokens=4)[0]["generated_text"]
        fill = pipeline("fill-mask", model="encoder", trust_remote_code=True)
        out["fill"] = [r["token"] for r in fill("the pizza [MASK] good", top_k=3)]
        t2t = pipeline("text2text-generation", model="encoder-decoder", trust_remote_code=True)
        out["t2t"] = t2t("le chat est sur tapis", max_new_tokens=5)[0]["generated_text"]
        print(json.dumps(out))
        """,
        cwd=tmp_path,
    )
    assert result["module"].startswith("transformers_modules")
    for arch, logits in expected.items():
        assert torch.equal(torch.tensor(result[arch]), logits), arch
    assert result["gen"] == exp_gen and result["fill"] == exp_fill and result["t2t"] == exp_t2t
