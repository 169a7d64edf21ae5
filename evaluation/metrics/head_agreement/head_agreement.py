"""Agreement between the attention heads of two models: Jensen-Shannon divergence and a one-to-one head matching.

Word level, so that models with different tokenizers compare (Clark et al. 2019, Section 4.1): the attention *to* a
word is the sum over its tokens, the attention *from* a word the mean over its tokens; tokens outside every word
(special tokens, padding: word id -1) are dropped and each row is renormalised to sum to 1.

Self-contained: `evaluate.load` copies this file alone. `evaluation/analysis.py` imports its functions.
Notation: L layers, H heads, N = L * H heads in all, T tokens, W words.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """For every pair (head i of model A, head j of model B), the Jensen-Shannon divergence (natural log,
between 0 and ln 2 = 0.693) of their word-level attention distributions, averaged over all query words of all texts.
Then the one-to-one matching of heads with the smallest total divergence (Hungarian algorithm,
scipy.optimize.linear_sum_assignment, or a greedy matching when scipy is missing). Identical heads have divergence 0;
a converted copy of a model matches itself head for head."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one (L1, H1, T1, T1) array per text: model A's attentions.
    references: one (L2, H2, T2, T2) array per text: model B's attentions, same texts.
    prediction_word_ids, reference_word_ids: one (T,) array per text: the word each token belongs to (0..W-1), -1 for
        tokens in no word (special tokens, padding). Both models must see the same W words.
Returns:
    js: (N1, N2) mean divergence; matching: [{"a": [layer, head], "b": [layer, head], "js": float}];
    mean_matched_js, mean_js: float; shape_a, shape_b: [L, H]; matcher: "hungarian" or "greedy".
"""

_CITATION = """@inproceedings{clark2019what, title={What Does BERT Look At? An Analysis of BERT's Attention},
author={Clark, Kevin and Khandelwal, Urvashi and Levy, Omer and Manning, Christopher D.}, booktitle={BlackboxNLP},
year={2019}}"""


def word_attention(attention, word_ids) -> np.ndarray:
    """(L, H, T, T) token attention -> (L, H, W, W) word attention: sum over key tokens of a word, mean over its
    query tokens, tokens with word id -1 dropped and rows renormalised."""
    a = np.asarray(attention, dtype=np.float64)  # (L, H, T, T)
    ids = np.asarray(word_ids)  # (T,)
    num_words = int(ids.max()) + 1 if (ids >= 0).any() else 0
    membership = (ids[:, None] == np.arange(num_words)[None, :]).astype(np.float64)  # (T, W)
    to_words = a @ membership  # (L, H, T, W): sum over the key tokens of each word
    query_mean = membership / np.maximum(membership.sum(0, keepdims=True), 1.0)  # (T, W): 1/|word| on its tokens
    words = np.einsum("tw,lhtv->lhwv", query_mean, to_words)  # (L, H, W, W): mean over query tokens
    return words / np.maximum(words.sum(-1, keepdims=True), 1e-12)


def _xlogy(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x * np.log(np.where(x > 0, y, 1.0)), 0.0)


def js_sums(words_a: np.ndarray, words_b: np.ndarray, chunk: int = 16) -> tuple[np.ndarray, int]:
    """Sum over query words of JS(head i of A, head j of B): (N1, N2), and the number of query words.

    words_a (L1, H1, W, W), words_b (L2, H2, W, W). Exact (no smoothing): 0 log 0 = 0, and m > 0 wherever p > 0."""
    p = words_a.reshape(-1, *words_a.shape[-2:])  # (N1, W, W)
    q = words_b.reshape(-1, *words_b.shape[-2:])  # (N2, W, W)
    if p.shape[-1] != q.shape[-1]:
        raise ValueError(f"the two models see {p.shape[-1]} and {q.shape[-1]} words: word ids must agree")
    out = np.empty((p.shape[0], q.shape[0]))
    q_entropy = _xlogy(q, q).sum(-1)  # (N2, W): sum q log q
    p_entropy = _xlogy(p, p).sum(-1)  # (N1, W)
    for start in range(0, p.shape[0], chunk):  # chunks keep (chunk, N2, W, W) small for 30-layer models
        pc = p[start : start + chunk, None]  # (c, 1, W, W)
        m = (pc + q[None]) / 2  # (c, N2, W, W)
        kl_p = p_entropy[start : start + chunk, None] - _xlogy(pc, m).sum(-1)  # (c, N2, W)
        kl_q = q_entropy[None] - _xlogy(np.broadcast_to(q[None], m.shape), m).sum(-1)
        out[start : start + chunk] = (0.5 * (kl_p + kl_q)).sum(-1)
    return out, p.shape[1]


def match_heads(cost: np.ndarray) -> tuple[list[tuple[int, int]], str]:
    """One-to-one matching minimising the total cost: Hungarian when scipy is installed, else greedy."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        pairs, used_rows, used_cols = [], set(), set()
        for flat in np.argsort(cost, axis=None, kind="stable"):  # cheapest pair first
            i, j = np.unravel_index(flat, cost.shape)
            if i not in used_rows and j not in used_cols:
                pairs.append((int(i), int(j)))
                used_rows.add(i)
                used_cols.add(j)
        return sorted(pairs), "greedy"
    rows, cols = linear_sum_assignment(cost)
    return [(int(i), int(j)) for i, j in zip(rows, cols)], "hungarian"


def agreement(js: np.ndarray, shape_a: tuple[int, int], shape_b: tuple[int, int]) -> dict:
    """Matching and summary of a (N1, N2) mean divergence matrix."""
    pairs, matcher = match_heads(js)
    heads_b = shape_b[1]
    heads_a = shape_a[1]
    matching = [
        {"a": [i // heads_a, i % heads_a], "b": [j // heads_b, j % heads_b], "js": float(js[i, j])} for i, j in pairs
    ]
    return {
        "js": js.tolist(),
        "matching": matching,
        "mean_matched_js": float(np.mean([m["js"] for m in matching])) if matching else float("nan"),
        "mean_js": float(js.mean()),
        "shape_a": list(shape_a),
        "shape_b": list(shape_b),
        "matcher": matcher,
    }


class HeadAgreement(evaluate.Metric):
    def _info(self):
        attention = datasets.Sequence(
            datasets.Sequence(datasets.Sequence(datasets.Sequence(datasets.Value("float32"))))
        )
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": attention,
                    "references": attention,
                    "prediction_word_ids": datasets.Sequence(datasets.Value("int32")),
                    "reference_word_ids": datasets.Sequence(datasets.Value("int32")),
                }
            ),
        )

    def _compute(self, predictions, references, prediction_word_ids, reference_word_ids):
        total, count, shape_a, shape_b = 0.0, 0, None, None
        for attn_a, attn_b, ids_a, ids_b in zip(predictions, references, prediction_word_ids, reference_word_ids):
            words_a, words_b = word_attention(attn_a, ids_a), word_attention(attn_b, ids_b)
            sums, n = js_sums(words_a, words_b)
            total, count = total + sums, count + n
            shape_a, shape_b = words_a.shape[:2], words_b.shape[:2]
        return agreement(total / max(count, 1), shape_a, shape_b)
