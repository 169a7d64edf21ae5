"""Induction-head score (Olsson et al. 2022): on a random token sequence repeated twice, [x_1..x_n, x_1..x_n], how much
attention each head puts, from the second occurrence of x_i, on the token that followed its first occurrence.

Self-contained: `evaluate.load` copies this file alone. `evaluation/analysis.py` imports `induction_sums` from it.
Notation: L layers, H heads, T = offset + 2n positions (offset = tokens before the first repeat, e.g. a BOS token).
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Score per head = mean over i of a[offset + n + i, offset + i + 1]: the query is the second copy of
x_{i+1} (0-based x[i]) and the key is the token right after its first copy. An ideal induction head scores 1.
`chance` is the same mean for uniform causal attention, 1 / (number of visible keys): a random-weight model scores
about that; trained models grow induction heads (Olsson et al. 2022, "In-context Learning and Induction Heads")."""

_KWARGS_DESCRIPTION = """
Args:
    attentions: one (L, H, T, T) array per repeated sequence (no padding).
    period: n, the length of the repeated block.
    offset: number of tokens before the first block (1 when a BOS token is prepended).
Returns:
    scores: (L, H); layer_mean: (L,); best: {"layer", "head", "score"}; chance: float; num_queries: int.
"""

_CITATION = """@article{olsson2022context, title={In-context Learning and Induction Heads}, author={Olsson, Catherine
and others}, journal={Transformer Circuits Thread}, year={2022}}"""


def induction_sums(attention, period: int, offset: int = 0) -> tuple[np.ndarray, int, float]:
    """Sum over the second block's queries of the attention to "the token after my previous occurrence" (L, H),
    the number of queries, and the sum of the uniform-attention chance level."""
    a = np.asarray(attention, dtype=np.float64)  # (L, H, T, T)
    if a.shape[-1] < offset + 2 * period:
        raise ValueError(f"attention over {a.shape[-1]} positions is shorter than offset + 2 * period")
    queries = offset + period + np.arange(period)  # (n,) second copies of x[0..n-1]
    keys = offset + np.arange(period) + 1  # (n,) tokens after the first copies
    chance = float((1.0 / (queries + 1)).sum())  # uniform causal attention over queries + 1 visible keys
    return a[:, :, queries, keys].sum(-1), period, chance


class InductionScore(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "attentions": datasets.Sequence(
                        datasets.Sequence(datasets.Sequence(datasets.Sequence(datasets.Value("float32"))))
                    )
                }
            ),
        )

    def _compute(self, attentions, period: int, offset: int = 0):
        total, count, chance = 0.0, 0, 0.0
        for attention in attentions:
            sums, n, chance_sum = induction_sums(attention, period, offset)
            total, count, chance = total + sums, count + n, chance + chance_sum
        scores = total / max(count, 1)  # (L, H)
        layer, head = np.unravel_index(int(np.argmax(scores)), scores.shape)
        return {
            "scores": scores.tolist(),
            "layer_mean": scores.mean(-1).tolist(),
            "best": {"layer": int(layer), "head": int(head), "score": float(scores[layer, head])},
            "chance": chance / max(count, 1),
            "num_queries": count,
        }
