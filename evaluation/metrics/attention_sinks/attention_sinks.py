"""Attention sinks (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks"): the share of each
query's attention that lands on the first `sink_tokens` key positions, per layer and head, beside the share that
uniform causal attention would give there.

Self-contained: `evaluate.load` copies this file alone, so nothing here imports the project. For contexts too long
for the T×T weights, `course-transformer analyze sinks` computes the same mass in query blocks
(evaluation/streaming_stats.py), and tests/test_attention_sinks_metric.py checks the two agree.

Notation: L layers, H heads, T positions of one text (padding removed), k sink tokens.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Mean over queries of the attention mass on the first `sink_tokens` real tokens, per layer and head,
averaged over texts; and the level uniform causal attention would give (query i spreads 1 / (i + 1) over the keys
it sees). Mass far above that level is an attention sink."""

_KWARGS_DESCRIPTION = """
Args:
    attentions: one (L, H, T, T) array per text (rows are queries, columns keys), e.g. `output_attentions` stacked.
    attention_mask: one (T,) 0/1 array per text; padding positions (0) are removed as queries and as keys.
    sink_tokens: k, how many leading real tokens count as the sink (1: the first token; StreamingLLM keeps 4).
    skip_queries: leave out the first queries (default k: those queries can attend to nothing else).
Returns:
    sink_mass: (L, H) list, mean over texts of the mean over queries of the mass on the first k tokens.
    sink_mass_per_layer: (L,) the mean over heads.
    uniform_level: the same mean for uniform causal attention, averaged over texts.
Example:
    >>> metric = evaluate.load("evaluation/metrics/attention_sinks")
    >>> a = np.array([[[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.25, 0.25]]]])  # L=1, H=1
    >>> metric.compute(attentions=[a], attention_mask=[[1, 1, 1]])["sink_mass"]  # queries 1, 2: (1.0 + 0.5) / 2
    [[0.75]]
"""

_CITATION = """@inproceedings{xiao2024streamingllm, title={Efficient Streaming Language Models with Attention Sinks},
author={Xiao, Guangxuan and Tian, Yuandong and Chen, Beidi and Han, Song and Lewis, Mike}, booktitle={ICLR},
year={2024}}"""


def trim(attention, mask) -> np.ndarray:
    """(L, H, T, T) -> (L, H, n, n) over the real tokens."""
    a = np.asarray(attention, dtype=np.float64)
    if a.ndim != 4 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"attentions of shape {a.shape}: allowed is (L, H, T, T) per text")
    keep = np.flatnonzero(np.asarray(mask) != 0)
    return a[:, :, keep][:, :, :, keep]


def sink_mass(attention: np.ndarray, sink_tokens: int, skip_queries: int) -> np.ndarray:
    """(L, H, n, n) -> (L, H): mean over queries >= skip_queries of the mass on keys [0, sink_tokens)."""
    if attention.shape[-1] <= skip_queries:
        raise ValueError(f"a text of {attention.shape[-1]} tokens has no query after skip_queries={skip_queries}")
    mass = attention[:, :, skip_queries:, :sink_tokens].sum(axis=-1)  # (L, H, n - skip)
    return mass.mean(axis=-1)


def uniform_level(length: int, sink_tokens: int, skip_queries: int) -> float:
    """Uniform causal attention's mass on the first k keys, averaged over queries i >= skip: min(k, i+1) / (i+1)."""
    i = np.arange(skip_queries, length)
    return float(np.mean(np.minimum(sink_tokens, i + 1) / (i + 1)))


class AttentionSinks(evaluate.Metric):
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

    def _compute(self, attentions, attention_mask, sink_tokens: int = 1, skip_queries: int | None = None):
        if int(sink_tokens) < 1:
            raise ValueError(f"sink_tokens={sink_tokens!r}: allowed is a count >= 1")
        k = int(sink_tokens)
        skip = k if skip_queries is None else int(skip_queries)
        texts = [trim(a, m) for a, m in zip(attentions, attention_mask)]
        masses = np.stack([sink_mass(a, k, skip) for a in texts])  # (texts, L, H)
        mean = masses.mean(axis=0)  # (L, H)
        return {
            "sink_mass": mean.tolist(),
            "sink_mass_per_layer": mean.mean(axis=1).tolist(),
            "uniform_level": float(np.mean([uniform_level(a.shape[-1], k, skip) for a in texts])),
        }
