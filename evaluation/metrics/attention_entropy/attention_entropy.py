"""Entropy of each attention head's distribution over keys (Clark et al. 2019, Section 3.3).

Self-contained: `evaluate.load` copies this file alone, so nothing here imports the project.
`evaluation/analysis.py` imports `entropy_sums` from this file, so the math lives in one place.

Notation: L layers, H heads, T query positions, S key positions (T = S for self-attention).
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Mean entropy (nats) of every head's attention distribution, averaged over all non-padding query
tokens of all texts. A head that attends uniformly over n keys has entropy log(n); one that attends to a single key
has entropy 0. `uniform_entropy` is the same average for uniform attention over the keys a query may see (all keys,
or the keys up to itself with `causal=True`), the ceiling to compare against."""

_KWARGS_DESCRIPTION = """
Args:
    attentions: one (L, H, T, T) array per text: the model's `output_attentions`, stacked over layers.
    attention_mask: one (T,) 0/1 array per text; padding positions (0) are removed as queries and as keys.
    causal: whether queries only see earlier keys (decoders); only changes `uniform_entropy`.
Returns:
    entropy: (L, H) mean entropy per head; layer_mean: (L,); mean: float; uniform_entropy: float; num_queries: int.
Example:
    >>> metric = evaluate.load("evaluation/metrics/attention_entropy")
    >>> metric.compute(attentions=[np.full((1, 1, 4, 4), 0.25)], attention_mask=[[1, 1, 1, 1]])["mean"]
    1.386...
"""

_CITATION = """@inproceedings{clark2019what, title={What Does BERT Look At? An Analysis of BERT's Attention},
author={Clark, Kevin and Khandelwal, Urvashi and Levy, Omer and Manning, Christopher D.}, booktitle={BlackboxNLP},
year={2019}}"""


def trim_padding(attention: np.ndarray, attention_mask=None) -> np.ndarray:
    """(L, H, T, T) -> (L, H, n, n): drop padding positions as queries and as keys (left or right padding)."""
    attention = np.asarray(attention, dtype=np.float64)
    if attention_mask is None:
        return attention
    keep = np.asarray(attention_mask).astype(bool)  # (T,)
    return attention[:, :, keep][:, :, :, keep]


def entropy_sums(attention, attention_mask=None, causal: bool = False) -> tuple[np.ndarray, int, float]:
    """Sum over query tokens of each head's entropy, the number of queries, and the sum of log(#visible keys).

    Sums (not means) so that several texts combine into a token-weighted mean: sum(sums) / sum(counts)."""
    a = trim_padding(attention, attention_mask)  # (L, H, n, n)
    n = a.shape[-1]
    # 0 log 0 = 0: keys a query cannot see (causal mask) carry exactly zero weight.
    plogp = np.where(a > 0, a * np.log(np.where(a > 0, a, 1.0)), 0.0)  # (L, H, n, n)
    entropy = -plogp.sum(-1)  # (L, H, n)
    visible = np.arange(1, n + 1) if causal else np.full(n, n)  # (n,) keys each query may see
    return entropy.sum(-1), n, float(np.log(visible).sum())


class AttentionEntropy(evaluate.Metric):
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

    def _compute(self, attentions, attention_mask, causal: bool = False):
        total, count, uniform = 0.0, 0, 0.0
        for attention, mask in zip(attentions, attention_mask):
            sums, n, log_visible = entropy_sums(attention, mask, causal=causal)
            total, count, uniform = total + sums, count + n, uniform + log_visible
        entropy = total / max(count, 1)  # (L, H)
        return {
            "entropy": entropy.tolist(),
            "layer_mean": entropy.mean(-1).tolist(),
            "mean": float(entropy.mean()),
            "uniform_entropy": uniform / max(count, 1),
            "num_queries": count,
        }
