"""How much attention each head gives to particular tokens and positions (Clark et al. 2019, Sections 3.1-3.2).

Self-contained: `evaluate.load` copies this file alone. `evaluation/analysis.py` imports `target_sums` from it.
Notation: L layers, H heads, n tokens of one text after padding is removed.
"""

from __future__ import annotations

import string

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Average attention weight, per head, that a query token puts on:
- first: the first (non-padding) token, e.g. [CLS] or a decoder's BOS / "attention sink";
- cls, sep: tokens equal to `cls_token` / `sep_token` (all of them: pairs have two [SEP]);
- period, comma, punctuation: keys whose text (after the word-piece markers "##", "Ġ", "▁" are stripped) is ".",
  "," or made only of punctuation;
- self, previous, next: the key at offset 0, -1, +1 (previous is averaged over queries that have one, next likewise);
- sep_to_sep: from [SEP] queries to [SEP] keys (Clark et al. find [SEP] heads attend >90% to [SEP]).
Token-type targets are averaged over all queries of all texts, as in Clark et al.'s Figure 2 (they average per text
first; we weight by tokens)."""

_KWARGS_DESCRIPTION = """
Args:
    attentions: one (L, H, T, T) array per text.
    attention_mask: one (T,) 0/1 array per text; padding (0) is removed as queries and as keys.
    tokens: one list of T token strings per text (the tokenizer's `convert_ids_to_tokens`).
    cls_token, sep_token: the special tokens to look for (default "[CLS]", "[SEP]"; None to skip).
Returns:
    for each target: {"scores": (L, H), "layer_mean": (L,), "best": {"layer", "head", "score"}, "num_queries"}
    (targets with no query, e.g. sep_to_sep without [SEP], are None).
Example:
    >>> metric = evaluate.load("evaluation/metrics/attention_targets")
    >>> prev = np.eye(3, k=-1)[None, None]; prev[0, 0, 0, 0] = 1.0
    >>> metric.compute(attentions=[prev], attention_mask=[[1, 1, 1]], tokens=[["a", "b", "c"]])["previous"]["best"]
    {'layer': 0, 'head': 0, 'score': 1.0}
"""

_CITATION = """@inproceedings{clark2019what, title={What Does BERT Look At? An Analysis of BERT's Attention},
author={Clark, Kevin and Khandelwal, Urvashi and Levy, Omer and Manning, Christopher D.}, booktitle={BlackboxNLP},
year={2019}}"""

TARGETS = ("first", "cls", "sep", "period", "comma", "punctuation", "self", "previous", "next", "sep_to_sep")
_MARKERS = ("##", "Ġ", "▁", "Ċ")


def trim_padding(attention: np.ndarray, attention_mask=None) -> np.ndarray:
    """(L, H, T, T) -> (L, H, n, n): drop padding positions as queries and as keys (left or right padding)."""
    attention = np.asarray(attention, dtype=np.float64)
    if attention_mask is None:
        return attention
    keep = np.asarray(attention_mask).astype(bool)  # (T,)
    return attention[:, :, keep][:, :, :, keep]


def bare(token: str) -> str:
    """A token's text without word-piece / byte-level markers: "Ġ." -> ".", "##s" -> "s"."""
    for marker in _MARKERS:
        token = token.replace(marker, "")
    return token.strip()


def target_sums(
    attention, tokens, attention_mask=None, cls_token: str | None = "[CLS]", sep_token: str | None = "[SEP]"
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Per target, the sum over queries of the attention it receives (L, H), and the number of queries counted."""
    a = trim_padding(attention, attention_mask)  # (L, H, n, n)
    if attention_mask is not None:
        tokens = [t for t, m in zip(tokens, attention_mask) if m]
    n = a.shape[-1]
    if len(tokens) != n:
        raise ValueError(f"{len(tokens)} tokens for attention over {n} positions")
    texts = [bare(t) for t in tokens]
    is_cls = np.array([cls_token is not None and t == cls_token for t in tokens])  # (n,)
    is_sep = np.array([sep_token is not None and t == sep_token for t in tokens])
    keys = {
        "first": np.arange(n) == 0,
        "cls": is_cls,
        "sep": is_sep,
        "period": np.array([t == "." for t in texts]),
        "comma": np.array([t == "," for t in texts]),
        "punctuation": np.array([bool(t) and all(c in string.punctuation for c in t) for t in texts]),
    }
    sums = {name: a[..., mask].sum(-1).sum(-1) for name, mask in keys.items()}  # (L, H) each
    counts = dict.fromkeys(keys, n)
    diagonal = np.diagonal(a, axis1=-2, axis2=-1)  # (L, H, n): a[q, q]
    sums["self"], counts["self"] = diagonal.sum(-1), n
    sums["previous"], counts["previous"] = np.diagonal(a, offset=-1, axis1=-2, axis2=-1).sum(-1), n - 1
    sums["next"], counts["next"] = np.diagonal(a, offset=1, axis1=-2, axis2=-1).sum(-1), n - 1
    sums["sep_to_sep"] = a[:, :, is_sep][..., is_sep].sum(-1).sum(-1)  # from [SEP] rows to [SEP] columns
    counts["sep_to_sep"] = int(is_sep.sum())
    return sums, counts


def summarize(scores: np.ndarray, count: int) -> dict | None:
    """Scores (L, H) -> a JSON-ready summary with the best head."""
    if count == 0:
        return None
    layer, head = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return {
        "scores": scores.tolist(),
        "layer_mean": scores.mean(-1).tolist(),
        "best": {"layer": int(layer), "head": int(head), "score": float(scores[layer, head])},
        "num_queries": int(count),
    }


def combine(per_text: list[tuple[dict, dict]]) -> dict[str, dict | None]:
    """Token-weighted means over texts of `target_sums` results."""
    totals, counts = {}, {}
    for sums, numbers in per_text:
        for name in TARGETS:
            totals[name] = totals.get(name, 0.0) + sums[name]
            counts[name] = counts.get(name, 0) + numbers[name]
    return {name: summarize(totals[name] / max(counts[name], 1), counts[name]) for name in TARGETS}


class AttentionTargets(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "attentions": datasets.Sequence(
                        datasets.Sequence(datasets.Sequence(datasets.Sequence(datasets.Value("float32"))))
                    ),
                    "attention_mask": datasets.Sequence(datasets.Value("int32")),
                    "tokens": datasets.Sequence(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, attentions, attention_mask, tokens, cls_token="[CLS]", sep_token="[SEP]"):
        return combine(
            [
                target_sums(attention, toks, mask, cls_token=cls_token, sep_token=sep_token)
                for attention, mask, toks in zip(attentions, attention_mask, tokens)
            ]
        )
