"""Where attention really takes information from: rollout, flow and norm-based attention.

- Attention rollout and attention flow (Abnar & Zuidema 2020): how much of each input token reaches a position of a
  higher layer, through every layer in between. The math lives in the `evaluate` metric module
  `evaluation/metrics/attention_rollout/attention_rollout.py` and is re-exported here.
- Norm-based attention (Kobayashi et al. 2020, "Attention is Not Only a Weight"): head h of a layer adds
  Σ_j α^h_ij f_h(x_j) to position i, where f_h(x) = (x W_V^h + b_V^h) W_O^h is the value vector of x after the
  head's slice of the output projection. A weight α_ij is only half of what token j contributes; the size of the
  contribution is ‖α^h_ij f_h(x_j)‖ per head, and ‖Σ_h α^h_ij f_h(x_j)‖ for the whole layer. (W_O's bias is added
  once per position, not per token, so it belongs to no j and is left out, as in the paper.)
- `capture_attention_values` runs a model with hooks that record every self-attention layer's weights and value
  vectors f_h(x_j): our CourseTransformer models under every attention backend (the weights of a fast backend are
  exact, see `modeling`), and BERT-like Hugging Face models (BertModel and its relatives) under the attention lens
  (`attn_implementation="lens"`: exact weights from the fused kernel) or eager.
- `ablation_importance`: the reference the attention-based scores are compared with, the change of the model's
  output when one input token is replaced by [MASK] (Abnar & Zuidema's blank-out, on a sentence encoder).

Notation: B batch, L layers, H heads, D head dim, C hidden size, T query positions, S key positions,
n tokens of one text (padding removed).

>>> from evaluation.analysis import load_named_model
>>> from evaluation.attention_flow import collect_flow_records, rollout
>>> model, tokenizer, _ = load_named_model("ours-minilm")
>>> record = collect_flow_records(model, tokenizer, ["In the beginning God created the heavens and the earth."])[0]
>>> rollout(record.attention)[-1, 0]  # how much of each input token reaches [CLS] after the last layer
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from evaluation.analysis import metric_module, prepare_tokenizer
from modeling.modeling_course_transformer import CourseTransformerAttention

_rollout = metric_module("attention_rollout")
# The one copy of the rollout and flow math (see the metric module's docstring).
layer_matrices = _rollout.layer_matrices
residual_attention = _rollout.residual_attention
rollout = _rollout.rollout
flow_graph = _rollout.flow_graph
attention_flow = _rollout.attention_flow
spearman = _rollout.spearman

__all__ = [
    "FlowRecord",
    "SelfAttentionSite",
    "ablation_importance",
    "attention_flow",
    "capture_attention_values",
    "collect_flow_records",
    "flow_graph",
    "head_value_vectors",
    "importance_correlations",
    "layer_matrices",
    "norm_attention",
    "normalize_rows",
    "residual_attention",
    "rollout",
    "self_attention_sites",
    "spearman",
    "token_class_shares",
]

# --------------------------------------------------------------------------------------------------------------
# Norm-based attention: pure tensor functions
# --------------------------------------------------------------------------------------------------------------


def head_value_vectors(values: torch.Tensor, output_weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """f_h(x_j) for every head and key: (..., S, H*D) values (x W_V + b_V) and W_O's weight (C, H*D) ->
    (..., H, S, C).

    nn.Linear stores W_O as (out, in) = (C, H*D); head h reads input features h*D .. (h+1)*D - 1, the same
    head-major order in which the heads' outputs are concatenated before W_O."""
    *lead, length, inner = values.shape
    if inner % num_heads or output_weight.shape[-1] != inner:
        raise ValueError(
            f"values (..., {length}, {inner}) and W_O {tuple(output_weight.shape)} do not fit num_heads={num_heads}: "
            "allowed are H*D value features and a (C, H*D) output weight"
        )
    dim = inner // num_heads
    per_head = values.reshape(*lead, length, num_heads, dim)  # (..., S, H, D)
    w = output_weight.reshape(output_weight.shape[0], num_heads, dim)  # (C, H, D)
    return torch.einsum("...shd,chd->...hsc", per_head, w)  # (..., H, S, C): each head's slice of W_O


def norm_attention(attention: torch.Tensor, head_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., H, T, S) weights and (..., H, S, C) vectors f_h(x_j) -> per head ‖α^h_ij f_h(x_j)‖ (..., H, T, S) and
    per layer ‖Σ_h α^h_ij f_h(x_j)‖ (..., T, S).

    α ≥ 0 is a scalar, so the per-head norm is α^h_ij ‖f_h(x_j)‖; the layer norm needs the vectors, because heads
    can point the same token's contributions in different directions and partly cancel."""
    if attention.shape[:-2] != head_values.shape[:-2] or attention.shape[-1] != head_values.shape[-2]:
        raise ValueError(
            f"attention {tuple(attention.shape)} and head values {tuple(head_values.shape)} do not match: allowed "
            "are (..., H, T, S) and (..., H, S, C)"
        )
    per_head = attention * head_values.norm(dim=-1).unsqueeze(
        -2
    )  # (..., H, T, S) = α (..., H, T, S) ‖f‖ (..., H, 1, S)
    summed = torch.einsum("...hts,...hsc->...tsc", attention, head_values)  # (..., T, S, C): Σ_h α^h_ij f_h(x_j)
    return per_head, summed.norm(dim=-1)  # (..., T, S)


def normalize_rows(matrices) -> np.ndarray:
    """Each row divided by its sum (rows of zeros stay zero): norm-based matrices -> shares of one query's total."""
    m = np.asarray(matrices, dtype=np.float64)
    sums = m.sum(axis=-1, keepdims=True)
    return np.divide(m, sums, out=np.zeros_like(m), where=sums > 0)


# --------------------------------------------------------------------------------------------------------------
# Hooks: weights and value vectors of every self-attention layer
# --------------------------------------------------------------------------------------------------------------


@dataclass
class SelfAttentionSite:
    """Where one self-attention layer's pieces live in a model."""

    name: str
    module: nn.Module  # its forward returns (output, weights)
    value: nn.Linear  # V = X W_V + b_V: (B, S, H_kept*D)
    output: nn.Linear  # W_O: (H_kept*D) -> C
    heads: list[int]  # the original index of each head the projections hold (pruned heads are not built)
    num_heads: int  # H, pruned heads included: the weights keep the original indices


def _course_sites(model: nn.Module, stack: str | None) -> list[SelfAttentionSite]:
    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, CourseTransformerAttention)]
    self_attn = [(n, m) for n, m in modules if not m.is_cross_attention]
    stacks = sorted({m.module_key.split(".")[0] for _, m in self_attn})
    chosen = stack or ("encoder" if "encoder" in stacks else stacks[0] if stacks else None)
    if chosen not in stacks:
        raise ValueError(f"stack={stack!r}: this model's self-attention stacks are {stacks}")
    return [
        SelfAttentionSite(n, m, m.v_proj, m.o_proj, list(m.kept_heads), m.config.num_attention_heads)
        for n, m in self_attn
        if m.module_key.startswith(chosen + ".")
    ]


def _bert_sites(model: nn.Module) -> list[SelfAttentionSite]:
    """BertAttention-like modules: `.self` (query/key/value, returns (output, weights)) and `.output.dense` (W_O)."""
    sites = []
    for name, module in model.named_modules():
        inner, out = getattr(module, "self", None), getattr(module, "output", None)
        if "crossattention" in name or not isinstance(getattr(inner, "value", None), nn.Linear):
            continue
        if not isinstance(getattr(out, "dense", None), nn.Linear):
            continue
        # Heads and weights both count the heads the module holds (a pruned BERT returns weights of kept heads).
        heads = int(inner.num_attention_heads)
        sites.append(SelfAttentionSite(name, inner, inner.value, out.dense, list(range(heads)), heads))
    return sites


def self_attention_sites(model: nn.Module, stack: str | None = None) -> list[SelfAttentionSite]:
    """The self-attention layers of `model` in order: ours (one stack: `stack` = "encoder" or "decoder", default
    the encoder where there is one) or BERT-like ones. Raises for other models, naming what was looked for."""
    sites = (
        _course_sites(model, stack) if any(isinstance(m, CourseTransformerAttention) for m in model.modules()) else []
    )
    if not sites:
        sites = _bert_sites(model)
    if not sites:
        raise ValueError(
            f"{type(model).__name__}: no self-attention layers found; supported are CourseTransformer models and "
            "BERT-like models (attention modules with .self.value and .output.dense)"
        )
    return sites


def _weights_of(output, site: SelfAttentionSite) -> torch.Tensor:
    weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
    if weights is None or weights.dim() != 4:
        raise RuntimeError(
            f"{site.name} returned no attention weights: load the model with attn_implementation='lens' or "
            "attn_implementation='eager' (transformers' sdpa and flash kernels return none)"
        )
    return weights


@contextlib.contextmanager
def _recording(sites: Sequence[SelfAttentionSite]) -> Iterator[list[dict]]:
    """Forward hooks that store each site's weights (B, H, T, S) and values (B, S, H_kept*D); removed on exit."""
    records: list[dict] = [{} for _ in sites]
    handles = []
    for record, site in zip(records, sites):

        def keep_weights(module, args, output, record=record, site=site):
            record["weights"] = _weights_of(output, site)

        def keep_values(module, args, output, record=record):
            record["values"] = output

        handles.append(site.module.register_forward_hook(keep_weights))
        handles.append(site.value.register_forward_hook(keep_values))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def _full_heads(site: SelfAttentionSite, values: torch.Tensor) -> torch.Tensor:
    """f_h(x_j) of the kept heads -> (B, H, S, C) in the original head indices, zeros for pruned heads (whose
    weights the model also returns as zeros)."""
    kept = head_value_vectors(values.float(), site.output.weight.float(), len(site.heads))  # (B, H_kept, S, C)
    if len(site.heads) == site.num_heads:
        return kept
    full = kept.new_zeros(kept.shape[0], site.num_heads, *kept.shape[2:])  # (B, H, S, C)
    full[:, site.heads] = kept
    return full


@torch.no_grad()
def capture_attention_values(
    model: nn.Module, inputs: dict, stack: str | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run `model(**inputs)` once and return, per self-attention layer, the weights (B, H, T, S) and the vectors
    f_h(x_j) = (x_j W_V + b_V) W_O^h (B, H, S, C), in float32.

    Works under every backend of our models (weights requested from a fused kernel come from its log-sum-exp or the
    eager math, exactly); a Hugging Face model must run the attention lens (or eager) to return weights."""
    sites = self_attention_sites(model, stack)
    kwargs = dict(inputs, output_attentions=True)
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False  # the values of this forward only, not of an earlier cache
    with _recording(sites) as records:
        model(**kwargs)
    out = []
    for record, site in zip(records, sites):
        if "weights" not in record or "values" not in record:
            raise RuntimeError(f"{site.name} did not run in this forward (a different stack was chosen?)")
        out.append((record["weights"].float(), _full_heads(site, record["values"])))
    return out


# --------------------------------------------------------------------------------------------------------------
# Records over texts
# --------------------------------------------------------------------------------------------------------------


@dataclass
class FlowRecord:
    """One text's weights and norm-based matrices, padding removed (float32 arrays)."""

    tokens: list[str]
    special: np.ndarray  # (n,) bool: special tokens ([CLS], [SEP], ...)
    attention: np.ndarray  # (L, H, n, n) weights α
    head_norms: np.ndarray  # (L, H, n, n) ‖α^h_ij f_h(x_j)‖
    layer_norms: np.ndarray  # (L, n, n) ‖Σ_h α^h_ij f_h(x_j)‖
    value_norms: np.ndarray  # (L, H, n) ‖f_h(x_j)‖


def _encode(tokenizer, texts: list[str], pairs: bool):
    if pairs:
        firsts, seconds = texts[0::2], texts[1::2]
        return tokenizer(
            firsts[: len(seconds)], seconds, padding=True, return_tensors="pt", return_special_tokens_mask=True
        )
    return tokenizer(texts, padding=True, return_tensors="pt", return_special_tokens_mask=True)


def _model_inputs(model: nn.Module, encoded) -> dict:
    inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    if "token_type_ids" in encoded and getattr(model.config, "type_vocab_size", 0):  # BERT segments A/B
        inputs["token_type_ids"] = encoded["token_type_ids"]
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in inputs.items()}


def collect_flow_records(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    pairs: bool = False,
    batch_size: int = 8,
    stack: str | None = None,
    progress: bool = False,
) -> list[FlowRecord]:
    """Weights, per-head and per-layer norm-based matrices of `texts` (or consecutive pairs of them as A/B)."""
    from tqdm.auto import tqdm

    prepare_tokenizer(tokenizer)
    texts = list(texts)
    step = 2 * batch_size if pairs else batch_size
    records = []
    for start in tqdm(range(0, len(texts), step), desc="norm-based attention", disable=not progress):
        encoded = _encode(tokenizer, texts[start : start + step], pairs)
        layers = capture_attention_values(model, _model_inputs(model, encoded), stack)
        attention = torch.stack([w for w, _ in layers], dim=1)  # (B, L, H, T, S)
        values = torch.stack([v for _, v in layers], dim=1)  # (B, L, H, S, C)
        head_norms, layer_norms = norm_attention(attention, values)  # (B, L, H, T, S), (B, L, T, S)
        value_norms = values.norm(dim=-1)  # (B, L, H, S)
        attention, head_norms, layer_norms, value_norms = (
            x.cpu() for x in (attention, head_norms, layer_norms, value_norms)
        )
        for row in range(attention.shape[0]):
            keep = encoded["attention_mask"][row].bool()  # (T,)
            idx = keep.nonzero()[:, 0]  # (n,) non-padding positions
            records.append(
                FlowRecord(
                    tokens=tokenizer.convert_ids_to_tokens(encoded["input_ids"][row][keep].tolist()),
                    special=encoded["special_tokens_mask"][row][keep].bool().numpy(),
                    attention=_select(attention[row], idx, (-2, -1)),  # (L, H, n, n)
                    head_norms=_select(head_norms[row], idx, (-2, -1)),
                    layer_norms=_select(layer_norms[row], idx, (-2, -1)),  # (L, n, n)
                    value_norms=_select(value_norms[row], idx, (-1,)),  # (L, H, n)
                )
            )
    return records


def _select(x: torch.Tensor, idx: torch.Tensor, dims: tuple[int, ...]) -> np.ndarray:
    """Keep positions `idx` along each of `dims` (padding removal), as a float32 array."""
    for dim in dims:
        x = x.index_select(dim, idx)
    return x.float().numpy()


# --------------------------------------------------------------------------------------------------------------
# Measures
# --------------------------------------------------------------------------------------------------------------

PUNCTUATION = frozenset(".,;:!?")  # a token made only of these is punctuation


def token_classes(record: FlowRecord, cls_token: str | None, sep_token: str | None) -> dict[str, np.ndarray]:
    """(n,) bool masks of the token classes compared by Kobayashi et al.: [CLS], [SEP], punctuation, the rest."""
    tokens = np.asarray(record.tokens)
    classes = {
        "cls": tokens == cls_token if cls_token else np.zeros(len(tokens), bool),
        "sep": tokens == sep_token if sep_token else np.zeros(len(tokens), bool),
        "punctuation": np.asarray([bool(t) and all(c in PUNCTUATION for c in t) for t in tokens]) & ~record.special,
    }
    classes["other"] = ~(classes["cls"] | classes["sep"] | classes["punctuation"])
    return classes


def token_class_shares(records: list[FlowRecord], cls_token: str | None, sep_token: str | None) -> dict:
    """Per layer and token class, the mean share of one query's attention that goes to that class, by
    - weights: Σ_{j in class} α_ij, averaged over heads and queries (the weight-based view, Clark et al. 2019);
    - head norms: Σ_{j in class} ‖α_ij f(x_j)‖ / Σ_j ‖α_ij f(x_j)‖, averaged over heads and queries;
    - layer norms: the same share of ‖Σ_h α^h_ij f_h(x_j)‖ (whole layer), averaged over queries;
    and the mean ‖f_h(x_j)‖ of the class's tokens (averaged over heads), which explains the difference.
    Query-weighted over all texts: every query token of every text counts once."""
    num_layers = records[0].attention.shape[0]
    names = ("cls", "sep", "punctuation", "other")
    sums = {view: np.zeros((num_layers, len(names))) for view in ("weights", "head_norms", "layer_norms")}
    fx_sum, fx_count = np.zeros((num_layers, len(names))), np.zeros(len(names))
    queries = 0
    for record in records:
        classes = token_classes(record, cls_token, sep_token)
        head_shares = normalize_rows(record.head_norms)  # (L, H, n, n)
        layer_shares = normalize_rows(record.layer_norms)  # (L, n, n)
        for c, name in enumerate(names):
            mask = classes[name]  # (n,)
            sums["weights"][:, c] += record.attention[..., mask].sum(-1).mean(1).sum(-1)  # (L,): Σ_queries mean_h
            sums["head_norms"][:, c] += head_shares[..., mask].sum(-1).mean(1).sum(-1)
            sums["layer_norms"][:, c] += layer_shares[..., mask].sum(-1).sum(-1)
            fx_sum[:, c] += record.value_norms.mean(1)[:, mask].sum(-1)  # (L,): Σ_tokens mean_h ‖f_h(x_j)‖
            fx_count[c] += mask.sum()
        queries += len(record.tokens)
    layers = []
    for layer in range(num_layers):
        row = {"layer": layer + 1}
        for view, total in sums.items():
            row[view] = {name: float(total[layer, c] / queries) for c, name in enumerate(names)}
        row["value_norm"] = {
            name: (float(fx_sum[layer, c] / fx_count[c]) if fx_count[c] else None) for c, name in enumerate(names)
        }
        layers.append(row)
    return {"layers": layers, "num_texts": len(records), "num_queries": queries}


@torch.no_grad()
def ablation_importance(model: nn.Module, tokenizer, text: str, replacement: str = "mask") -> dict[str, np.ndarray]:
    """How much each input token matters to the model's output, by blanking it out (Abnar & Zuidema's reference):
    token j is replaced by [MASK] (`replacement="mask"`) or [UNK] ("unk") and the output compared with the
    original by cosine distance 1 - cos, for two outputs: the final [CLS] (first) state ("cls") and the mean-pooled
    sentence embedding over all tokens, as sentence-transformers pools all-MiniLM-L6-v2 ("mean").

    Returns {"cls": (n,), "mean": (n,)} with NaN at special tokens (not ablated)."""
    token = {"mask": tokenizer.mask_token_id, "unk": tokenizer.unk_token_id}
    if replacement not in token or token[replacement] is None:
        allowed = [k for k, v in token.items() if v is not None]
        raise ValueError(f"replacement={replacement!r}: allowed for this tokenizer are {allowed}")
    encoded = tokenizer([text], return_tensors="pt", return_special_tokens_mask=True)
    ids = encoded["input_ids"][0]  # (n,)
    scored = (~encoded["special_tokens_mask"][0].bool()).nonzero()[:, 0]  # (m,) positions to ablate
    batch = ids.repeat(len(scored) + 1, 1)  # (m + 1, n): row 0 is the original
    batch[torch.arange(1, len(scored) + 1), scored] = token[replacement]
    inputs = {"input_ids": batch, "attention_mask": torch.ones_like(batch)}
    if "token_type_ids" in encoded and getattr(model.config, "type_vocab_size", 0):
        inputs["token_type_ids"] = encoded["token_type_ids"].repeat(len(scored) + 1, 1)
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) for k, v in inputs.items()}, output_hidden_states=True)
    hidden = getattr(out, "last_hidden_state", None)
    hidden = (hidden if hidden is not None else out.hidden_states[-1]).double().cpu()  # (m + 1, n, C)
    result = {}
    for name, vectors in (("cls", hidden[:, 0]), ("mean", hidden.mean(dim=1))):  # (m + 1, C) each
        distance = 1.0 - torch.nn.functional.cosine_similarity(vectors[1:], vectors[:1], dim=-1)  # (m,)
        scores = np.full(len(ids), np.nan)
        scores[scored.numpy()] = distance.numpy()
        result[name] = scores
    return result


def method_scores(record: FlowRecord, target: str, residual: float = 0.5, flow: bool = True) -> dict[str, np.ndarray]:
    """(L, n) scores of every input token after each layer, for the [CLS] output ("cls", position 0) or the mean
    over output positions ("mean"): raw attention, rollout, flow (cls only), the norm-based layer matrix (rows as
    shares) and its rollout (norm-based matrices in Abnar & Zuidema's rollout: our combination, not a paper's)."""
    position = 0 if target == "cls" else "mean"
    scores = _rollout.text_scores(record.attention, position, residual, flow=flow and target == "cls")
    norms = normalize_rows(record.layer_norms)  # (L, n, n), rows sum to 1
    scores["norm"] = norms[:, 0] if target == "cls" else norms.mean(axis=1)
    norm_rollout = rollout(norms, residual)  # (L, n, n)
    scores["norm_rollout"] = norm_rollout[:, 0] if target == "cls" else norm_rollout.mean(axis=1)
    return scores


def importance_correlations(
    records: list[FlowRecord],
    importances: list[dict[str, np.ndarray]],
    residual: float = 0.5,
    flow: bool = True,
    progress: bool = False,
) -> dict:
    """Per target ("cls", "mean") and method, the Spearman correlation of the method's scores with the ablation
    importance after each layer, averaged over texts: {target: {"spearman": {method: (L,)}, "num_texts": int,
    "num_defined": {method: (L,)}}} (see the metric module's `mean_correlations`)."""
    from tqdm.auto import tqdm

    result = {}
    for target in ("cls", "mean"):
        scores = [
            method_scores(r, target, residual, flow)
            for r in tqdm(records, desc=f"rollout/flow ({target})", disable=not progress)
        ]
        result[target] = _rollout.mean_correlations(scores, [imp[target] for imp in importances])
    return result
