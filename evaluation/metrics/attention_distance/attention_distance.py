"""Mean attention distance of each head: sum_k a[q, k] |q - k|, averaged over query tokens.

Self-contained: `evaluate.load` copies this file alone. `evaluation/analysis.py` imports `distance_sums` from it.
Notation: L layers, H heads, T query positions, S key positions (T = S for self-attention).
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Expected distance |q - k| (in tokens) between a query and the keys it attends to, per head, averaged
over all non-padding query tokens of all texts. A pure previous-token head has distance 1, a diagonal head 0;
heads with long-range or broad attention have large distances. Distances are counted after padding is removed, so
left and right padding give the same numbers."""

_KWARGS_DESCRIPTION = """
Args:
    attentions: one (L, H, T, T) array per text.
    attention_mask: one (T,) 0/1 array per text; padding (0) is removed as queries and as keys.
Returns:
    distance: (L, H) mean distance per head; layer_mean: (L,); mean: float; num_queries: int.
Example:
    >>> metric = evaluate.load("evaluation/metrics/attention_distance")
    >>> prev = np.eye(4, k=-1)[None, None]; prev[0, 0, 0, 0] = 1.0
    >>> metric.compute(attentions=[prev], attention_mask=[[1, 1, 1, 1]])["mean"]  # 3 queries at 1, 1 at 0
    0.75
"""

_CITATION = """@article{vig2019analyzing, title={Analyzing the Structure of Attention in a Transformer Language Model},
author={Vig, Jesse and Belinkov, Yonatan}, journal={BlackboxNLP}, year={2019}}"""


def trim_padding(attention: np.ndarray, attention_mask=None) -> np.ndarray:
    """(L, H, T, T) -> (L, H, n, n): drop padding positions as queries and as keys (left or right padding)."""
    attention = np.asarray(attention, dtype=np.float64)
    if attention_mask is None:
        return attention
    keep = np.asarray(attention_mask).astype(bool)  # (T,)
    return attention[:, :, keep][:, :, :, keep]


def distance_sums(attention, attention_mask=None) -> tuple[np.ndarray, int]:
    """Sum over query tokens of each head's expected distance |q - k|, and the number of queries."""
    a = trim_padding(attention, attention_mask)  # (L, H, n, n)
    n = a.shape[-1]
    positions = np.arange(n)
    offsets = np.abs(positions[:, None] - positions[None, :])  # (n, n): |q - k|
    return (a * offsets).sum(-1).sum(-1), n  # (L, H), int


class AttentionDistance(evaluate.Metric):
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
                }
            ),
        )

    def _compute(self, attentions, attention_mask):
        total, count = 0.0, 0
        for attention, mask in zip(attentions, attention_mask):
            sums, n = distance_sums(attention, mask)
            total, count = total + sums, count + n
        distance = total / max(count, 1)  # (L, H)
        return {
            "distance": distance.tolist(),
            "layer_mean": distance.mean(-1).tolist(),
            "mean": float(distance.mean()),
            "num_queries": count,
        }
