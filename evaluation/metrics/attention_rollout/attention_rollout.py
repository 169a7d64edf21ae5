"""Attention rollout and attention flow (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers").

Both trace how much of each INPUT token reaches a position of a higher layer, through all the layers in between,
from the attention weights alone. Each layer's weights are averaged over heads and the residual connection is
modelled as attention to oneself: Ã = (1 - r)·A + r·I with r = 0.5, rows renormalised to sum to 1.

- rollout: the product of those matrices, R_l = Ã_l Ã_(l-1) ... Ã_1 ("joint attention": attention times attention
  along every path, summed over paths).
- flow: the layered graph with one node per (layer, position), an edge (l-1, j) -> (l, i) of capacity Ã_l[i, j];
  the flow of input j to position i of layer l is the maximum flow from node (0, j) to node (l, i) (networkx).
  Normalised, as in the authors' code, so that the flows into one output position sum to 1.

Self-contained: `evaluate.load` copies this file alone, so nothing here imports the project.
`evaluation/attention_flow.py` imports these functions, so the math lives in one place.

Notation: L layers, H heads, n tokens of one text (padding removed).
"""

from __future__ import annotations

import datasets
import evaluate
import networkx as nx
import numpy as np
from networkx.algorithms.flow import build_residual_network, preflow_push
from scipy import stats

_DESCRIPTION = """Attention rollout and attention flow of every text, read at one output position (default 0, the
[CLS] token of BERT-style inputs) or averaged over all output positions ("mean", rollout and raw attention only),
after each layer. With `importance` (one score per input token, NaN where a token is not scored, e.g. an ablation
importance), also the Spearman rank correlation of raw attention, rollout and flow with it, per layer, averaged over
texts (the comparison of Abnar & Zuidema 2020, Tables 1-2)."""

_KWARGS_DESCRIPTION = """
Args:
    attentions: one (L, H, T, T) array per text: the model's `output_attentions`, stacked over layers.
    attention_mask: one (T,) 0/1 array per text; padding positions (0) are removed as queries and as keys.
    importance: optional, one (n,) array per text over the non-padding tokens; NaN entries are left out.
    output_position: index (after padding is removed) of the output token, or "mean" (no flow then).
    residual: weight r of the identity in (1 - r) A + r I; 0.5 in the paper.
    flow: whether to compute attention flow (one max-flow per input token and layer: slower).
Returns:
    raw, rollout, flow: per text, an (L, n) list: the score of every input token after each layer ("raw" is the
    head-averaged attention of that layer alone); flow is absent without `flow`.
    spearman: with `importance`, {method: (L,) mean over texts}; num_texts: texts whose importance has >= 3 scored,
    not all equal tokens; num_defined: {method: (L,) texts where the method's scores were not constant}.
Example:
    >>> metric = evaluate.load("evaluation/metrics/attention_rollout")
    >>> a = np.array([[[[1.0, 0.0], [1.0, 0.0]]]])  # L=1, H=1: both tokens attend to token 0
    >>> metric.compute(attentions=[a], attention_mask=[[1, 1]], output_position=1)["rollout"][0]
    [[0.5, 0.5]]
"""

_CITATION = """@inproceedings{abnar2020quantifying, title={Quantifying Attention Flow in Transformers},
author={Abnar, Samira and Zuidema, Willem}, booktitle={Proceedings of ACL}, pages={4190--4197}, year={2020}}"""


# --------------------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------------------


def check_residual(residual: float) -> float:
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual={residual!r}: allowed is a weight in [0, 1] (the paper uses 0.5)")
    return float(residual)


def layer_matrices(attention) -> np.ndarray:
    """(L, H, n, n) per-head weights or (L, n, n) matrices -> (L, n, n), averaged over heads (float64)."""
    a = np.asarray(attention, dtype=np.float64)
    if a.ndim == 4:
        a = a.mean(axis=1)  # (L, n, n): the paper averages the heads of a layer
    if a.ndim != 3 or a.shape[1] != a.shape[2]:
        raise ValueError(f"attention of shape {a.shape}: allowed are (L, H, n, n) or (L, n, n) square maps")
    if np.any(a < 0) or not np.all(np.isfinite(a)):
        raise ValueError("attention has negative or non-finite entries: allowed are non-negative weights")
    return a


def residual_attention(attention, residual: float = 0.5) -> np.ndarray:
    """Ã = (1 - r) A + r I per layer, each row renormalised to sum to 1: (L, n, n).

    Renormalising makes the rows probabilities again when A's rows do not sum to exactly 1 (pruned or masked heads
    leave zero rows; norm-based matrices are not normalised at all)."""
    r = check_residual(residual)
    a = layer_matrices(attention)  # (L, n, n)
    mixed = (1.0 - r) * a + r * np.eye(a.shape[-1])  # (L, n, n), identity broadcast over layers
    sums = mixed.sum(axis=-1, keepdims=True)  # (L, n, 1)
    if np.any(sums <= 0):
        layer, row = np.argwhere(sums[..., 0] <= 0)[0]
        raise ValueError(f"layer {layer} row {row} has no weight and residual=0: nothing to renormalise")
    return mixed / sums


# --------------------------------------------------------------------------------------------------------------
# Rollout and flow
# --------------------------------------------------------------------------------------------------------------


def rollout(attention, residual: float = 0.5) -> np.ndarray:
    """(L, n, n): R_l = Ã_l ... Ã_1, row i of R_l = how much of each input token reaches position i of layer l."""
    a = residual_attention(attention, residual)  # (L, n, n)
    out = np.empty_like(a)
    out[0] = a[0]
    for layer in range(1, len(a)):
        out[layer] = a[layer] @ out[layer - 1]  # (n, n) @ (n, n): one more layer of mixing on the left
    return out


def flow_graph(matrices: np.ndarray) -> nx.DiGraph:
    """The layered graph of (L, n, n) residual-adjusted matrices: nodes (layer, position), layer 0 = the inputs,
    edges (l-1, j) -> (l, i) with capacity matrices[l-1][i, j] (zero capacities are left out)."""
    graph = nx.DiGraph()
    num_layers, n, _ = matrices.shape
    graph.add_nodes_from((layer, i) for layer in range(num_layers + 1) for i in range(n))
    for layer in range(num_layers):
        rows, cols = np.nonzero(matrices[layer])  # output i, input j
        graph.add_edges_from(
            ((layer, j), (layer + 1, i), {"capacity": float(matrices[layer][i, j])}) for i, j in zip(rows, cols)
        )
    return graph


def attention_flow(
    attention,
    output_positions=(0,),
    layers=None,
    residual: float = 0.5,
    normalize: bool = True,
) -> np.ndarray:
    """(len(layers), len(output_positions), n): the maximum flow from every input token to each output position
    after each of `layers` (1-based, default all), through the graph of `flow_graph`.

    With `normalize`, the flows into one output position are divided by their sum (the authors' code does so),
    making them comparable with rollout rows, which sum to 1."""
    matrices = residual_attention(attention, residual)  # (L, n, n)
    num_layers, n, _ = matrices.shape
    layers = list(range(1, num_layers + 1)) if layers is None else [int(layer) for layer in layers]
    positions = [int(p) for p in output_positions]
    for layer in layers:
        if not 1 <= layer <= num_layers:
            raise ValueError(f"layers: {layer} is not a layer; allowed are 1..{num_layers}")
    for p in positions:
        if not 0 <= p < n:
            raise ValueError(f"output_positions: {p} is not a position; allowed are 0..{n - 1}")
    out = np.zeros((len(layers), len(positions), n))
    for a, layer in enumerate(layers):
        # Only layers up to `layer` can carry flow into it: a smaller graph, the same value, faster.
        graph = flow_graph(matrices[:layer])
        # One residual network for all the (source, sink) pairs of this graph: preflow-push resets its flows on
        # every call, and building it is a third of the time of a call.
        residual_net = build_residual_network(graph, "capacity")
        for b, p in enumerate(positions):
            for j in range(n):
                out[a, b, j] = nx.maximum_flow_value(
                    graph, (0, j), (layer, p), capacity="capacity", flow_func=preflow_push, residual=residual_net
                )
    if normalize:
        out = out / out.sum(axis=-1, keepdims=True)  # every input reaches by its own residual path: sum > 0
    return out


def raw_rows(attention, output_position) -> np.ndarray:
    """(L, n): the head-averaged attention of each layer alone, at one output position or averaged over all."""
    a = layer_matrices(attention)  # (L, n, n)
    return a.mean(axis=1) if output_position == "mean" else a[:, output_position]


def rollout_rows(attention, output_position, residual: float = 0.5) -> np.ndarray:
    """(L, n): rollout after each layer at one output position or averaged over all output positions."""
    r = rollout(attention, residual)  # (L, n, n)
    return r.mean(axis=1) if output_position == "mean" else r[:, output_position]


def spearman(scores, importance) -> float:
    """Spearman rank correlation over the tokens where `importance` is finite; NaN with fewer than 3 such tokens
    or when either side is constant (no ranking to compare)."""
    scores, importance = np.asarray(scores, dtype=np.float64), np.asarray(importance, dtype=np.float64)
    keep = np.isfinite(importance)
    if keep.sum() < 3 or np.ptp(scores[keep]) == 0 or np.ptp(importance[keep]) == 0:
        return float("nan")
    return float(stats.spearmanr(scores[keep], importance[keep]).statistic)


def trim_padding(attention, attention_mask=None) -> np.ndarray:
    """(L, H, T, T) -> (L, H, n, n): drop padding positions as queries and as keys."""
    attention = np.asarray(attention, dtype=np.float64)
    if attention_mask is None:
        return attention
    keep = np.asarray(attention_mask).astype(bool)  # (T,)
    return attention[:, :, keep][:, :, :, keep]


def text_scores(attention, output_position=0, residual: float = 0.5, flow: bool = True) -> dict[str, np.ndarray]:
    """{"raw", "rollout"(, "flow")}: (L, n) scores of every input token after each layer for one text."""
    n = np.asarray(attention).shape[-1]
    if output_position != "mean" and not 0 <= int(output_position) < n:
        raise ValueError(f"output_position={output_position!r}: allowed are 0..{n - 1} or 'mean'")
    if output_position == "mean" and flow:
        raise ValueError("output_position='mean' with flow=True: flow is computed for one output position only")
    scores = {
        "raw": raw_rows(attention, output_position),
        "rollout": rollout_rows(attention, output_position, residual),
    }
    if flow:
        scores["flow"] = attention_flow(attention, (int(output_position),), residual=residual)[:, 0]  # (L, n)
    return scores


def rankable(importance) -> bool:
    """Whether an importance vector can be correlated at all: >= 3 finite entries that are not all equal."""
    imp = np.asarray(importance, dtype=np.float64)
    finite = imp[np.isfinite(imp)]
    return len(finite) >= 3 and np.ptp(finite) > 0


def mean_correlations(scores: list[dict[str, np.ndarray]], importance: list) -> dict:
    """{"spearman": {method: (L,) mean over texts}, "num_texts": texts with a rankable importance,
    "num_defined": {method: (L,) texts where the method's scores were not constant}}.

    A method whose scores are constant over the scored tokens (e.g. a causal model's first position, which sees only
    itself) has no ranking: that (text, layer) is left out of the mean, and `num_defined` says how often."""
    used = [i for i, imp in enumerate(importance) if rankable(imp)]
    methods = list(scores[0]) if scores else []
    out = {"spearman": {}, "num_texts": len(used), "num_defined": {}}
    for m in methods:
        num_layers = len(scores[0][m])
        values = np.asarray([[spearman(row, importance[i]) for row in scores[i][m]] for i in used], dtype=np.float64)
        values = values.reshape(len(used), num_layers)  # (texts, L), also when no text is usable
        defined = np.isfinite(values).sum(axis=0)  # (L,)
        sums = np.where(np.isfinite(values), values, 0.0).sum(axis=0)
        out["spearman"][m] = [float(s / d) if d else float("nan") for s, d in zip(sums, defined)]
        out["num_defined"][m] = defined.tolist()
    return out


class AttentionRollout(evaluate.Metric):
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

    def _compute(
        self,
        attentions,
        attention_mask,
        importance=None,
        output_position=0,
        residual: float = 0.5,
        flow: bool = True,
    ):
        texts = [trim_padding(a, m) for a, m in zip(attentions, attention_mask)]  # (L, H, n, n) each
        per_text = [text_scores(a, output_position, residual, flow) for a in texts]
        result = {method: [s[method].tolist() for s in per_text] for method in (per_text[0] if per_text else [])}
        if importance is not None:
            result.update(mean_correlations(per_text, importance))
        return result
