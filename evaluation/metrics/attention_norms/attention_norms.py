"""Norm-based attention (Kobayashi et al. 2020, "Attention is Not Only a Weight: Analyzing Transformers with Vector
Norms"): a head's output is Σ_j α_ij f(x_j), with f(x) the value vector after the head's slice of W_O, so what key j
contributes to query i is ‖α_ij f(x_j)‖ = α_ij ‖f(x_j)‖, not α_ij alone. This module compares, per layer, the share
of attention that a class of keys (e.g. [CLS]/[SEP]) receives by weights and by norms.

Self-contained: `evaluate.load` copies this file alone, so nothing here imports the project. The value norms come
from a model run: `evaluation.attention_flow.capture_attention_values` records them for our models (every
backend) and BERT-type HF models (eager).

Notation: L layers, H heads, T positions of one text (padding removed).
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Per layer, the mean over queries and heads of the share of a query's attention that goes to the
keys marked by `key_class`: by weights (Σ α over the class) and by norms (Σ α‖f‖ over the class divided by Σ α‖f‖
over all keys, per head), averaged over texts; and the mean ‖f(x)‖ of the class's keys and of the other keys."""

_KWARGS_DESCRIPTION = """
Args:
    attentions: one (L, H, T, T) array per text (rows are queries, columns keys).
    value_norms: one (L, H, T) array per text: ‖f_h(x_j)‖, key j's value vector after head h's slice of W_O.
    attention_mask: one (T,) 0/1 array per text; padding (0) is removed as queries and as keys.
    key_class: one (T,) 0/1 array per text marking the keys of the class (e.g. special tokens).
Returns:
    by_weights, by_norms: (L,) shares of the class, mean over texts.
    class_norm, other_norm: (L,) mean ‖f(x)‖ over the class's keys and over the other keys (mean over heads).
Example:
    >>> metric = evaluate.load("evaluation/metrics/attention_norms")
    >>> a = np.array([[[[0.5, 0.5], [0.5, 0.5]]]])  # L=1, H=1: each query splits its weight evenly
    >>> f = np.array([[[1.0, 3.0]]])  # token 0's value vector is three times shorter
    >>> out = metric.compute(attentions=[a], value_norms=[f], attention_mask=[[1, 1]], key_class=[[1, 0]])
    >>> out["by_weights"], out["by_norms"]
    ([0.5], [0.25])
"""

_CITATION = """@inproceedings{kobayashi2020attention, title={Attention is Not Only a Weight: Analyzing Transformers
with Vector Norms}, author={Kobayashi, Goro and Kuribayashi, Tatsuki and Yokoi, Sho and Inui, Kentaro},
booktitle={EMNLP}, pages={7057--7075}, year={2020}}"""


def trim(attention, norms, mask, key_class) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(L, H, T, T), (L, H, T), (T,), (T,) -> the same over the real tokens; shapes checked."""
    a, f = np.asarray(attention, dtype=np.float64), np.asarray(norms, dtype=np.float64)
    if a.ndim != 4 or a.shape[-1] != a.shape[-2] or f.shape != a.shape[:3]:
        raise ValueError(f"attentions {a.shape} and value_norms {f.shape}: allowed are (L, H, T, T) and (L, H, T)")
    keep = np.flatnonzero(np.asarray(mask) != 0)
    cls = np.asarray(key_class, dtype=bool)[keep]
    return a[:, :, keep][:, :, :, keep], f[:, :, keep], cls


def class_shares(attention: np.ndarray, norms: np.ndarray, cls: np.ndarray) -> dict[str, np.ndarray]:
    """(L, H, n, n), (L, H, n), (n,) -> (L,) shares by weights and by norms, class and other mean norms."""
    weighted = attention * norms[:, :, None, :]  # (L, H, n, n): α_ij ‖f(x_j)‖
    totals = weighted.sum(-1, keepdims=True)  # (L, H, n, 1)
    by_norms = np.divide(weighted, totals, out=np.zeros_like(weighted), where=totals > 0)
    nan = np.full(norms.shape[:2], np.nan)
    return {
        "by_weights": attention[..., cls].sum(-1).mean(axis=(1, 2)),  # (L,)
        "by_norms": by_norms[..., cls].sum(-1).mean(axis=(1, 2)),
        "class_norm": (norms[..., cls].mean(-1) if cls.any() else nan).mean(1),
        "other_norm": (norms[..., ~cls].mean(-1) if (~cls).any() else nan).mean(1),
    }


class AttentionNorms(evaluate.Metric):
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
                    "value_norms": datasets.Sequence(datasets.Sequence(datasets.Sequence(datasets.Value("float32")))),
                    "attention_mask": datasets.Sequence(datasets.Value("int32")),
                    "key_class": datasets.Sequence(datasets.Value("int32")),
                }
            ),
        )

    def _compute(self, attentions, value_norms, attention_mask, key_class):
        rows = zip(attentions, value_norms, attention_mask, key_class)
        per_text = [class_shares(*trim(a, f, m, c)) for a, f, m, c in rows]
        return {key: np.nanmean([t[key] for t in per_text], axis=0).tolist() for key in per_text[0]}
