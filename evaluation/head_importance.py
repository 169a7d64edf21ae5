"""Which attention heads matter: gradient importance, single-head ablation and greedy pruning curves.

Michel, Levy & Neubig 2019 ("Are Sixteen Heads Really Better than One?", section 4.1) put a gate ξ_h on each head's
output, MHAtt(x) = Σ_h ξ_h Att_h(x), and score a head by how much the loss reacts to its gate at ξ = 1:

    I_h = E_x | ∂L(x) / ∂ξ_h |

then divide the scores of each layer by their L2 norm before ranking all heads of the model together (their code's
`--normalize-by-layer`). The course model's head masks are exactly those gates: `head_mask` (L, H) multiplies each
head's output before W_O, so a float mask with `requires_grad` gives ∂L/∂ξ by autograd (no extra hooks), and a 0 in
it is the ablation that `prune_heads` makes permanent.

Any other transformers model (BERT/MiniLM, GPT-2, Llama/SmolLM2, BART, ...) takes the same gates through the
attention lens (`evaluation.head_gates`: `AttentionLens(scale=...)` multiplies each head's output alike), but as
plain numbers: ablation, the ablation deltas and the pruning curves work for every model; the gradient importance is
ours only, and `ablation_scores` (the loss increase when a head alone is ablated) ranks the heads of the others.
transformers 5 has no `prune_heads`, so `pruned_copy` and the curves' pruned check are ours only too.

Three groups of gates, each (L, H) and passed to the forward under its own name:
    "encoder.self"  -> head_mask              (encoder self-attention)
    "decoder.self"  -> decoder_head_mask      (decoder masked self-attention; `head_mask` in a decoder-only model)
    "decoder.cross" -> cross_attn_head_mask   (decoder over the encoder states)
A head is (group, layer, head) with the original head index; `pruning_keys` turns a set of heads into the keys of
`prune_heads` / `config.pruned_heads` ("encoder.0.self", "decoder.1.cross").

The expectation is taken over batches, as in Michel et al.'s code: |∂L_b/∂ξ| of each batch's mean token loss,
weighted by its number of target tokens. With batches of one example it is E_x over examples exactly; with larger
batches the absolute value is taken after averaging inside the batch (cheaper, slightly smaller scores).

Notation: L layers of a stack, H heads per layer, B batch, T tokens.

>>> scores = head_importance(model, batches)                      # doctest: +SKIP
>>> order = rank_heads(scores)                                     # least important first  # doctest: +SKIP
>>> curve = pruning_curve(model, loss_metric(batches), lambda removed: head_importance(model, batches, removed),
...                       counts=[0, 2, 4, 6], check_at=[6])      # doctest: +SKIP
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from evaluation.head_gates import GROUPS, applied, forward_masks, head_groups, is_ours, model_kind

__all__ = [
    "GROUPS",
    "Head",
    "Metric",
    "ablation_deltas",
    "ablation_scores",
    "bleu_metric",
    "forward_masks",
    "gate_gradient",
    "gates",
    "head_groups",
    "head_importance",
    "lm_loss",
    "loss_metric",
    "normalize_by_layer",
    "paraphrase_loss",
    "pruned_copy",
    "pruned_vs_masked",
    "pruning_curve",
    "pruning_keys",
    "random_scores",
    "rank_heads",
    "retrieval_metric",
    "sentence_embeddings",
    "translate",
]

Head = tuple[str, int, int]  # (group, layer, original head index)
Batch = dict[str, torch.Tensor]  # forward keyword arguments with `labels`
Scores = dict[str, torch.Tensor]  # group -> (L, H)
# A metric of a model under head masks: metric(model, masks) with masks as forward keyword arguments ({} = none).
Metric = Callable[[nn.Module, dict[str, torch.Tensor]], float]
LossFn = Callable[[nn.Module, Batch, dict[str, torch.Tensor]], tuple[torch.Tensor, int]]


# ------------------------------------------------------------------------------------------------ gates, masks


def _check_groups(model: nn.Module, groups: Sequence[str] | None) -> list[str]:
    available = head_groups(model)
    if groups is None:
        return list(available)
    for group in groups:
        if group not in available:
            raise ValueError(f"groups contains {group!r}; this model's groups are {', '.join(available)}")
    return list(groups)


def gates(
    model: nn.Module,
    removed: Iterable[Head] = (),
    groups: Sequence[str] | None = None,
    requires_grad: bool = False,
) -> Scores:
    """Gate tensors ξ (L, H) per group: 1 everywhere but 0 at `removed`, in the dtype of the model's parameters."""
    dtype = next(model.parameters()).dtype
    shapes = head_groups(model)
    out = {group: torch.ones(shapes[group], dtype=dtype) for group in _check_groups(model, groups)}
    for group, layer, head in removed:
        if group in out:
            out[group][layer, head] = 0.0
    return {group: gate.requires_grad_(requires_grad) for group, gate in out.items()}


def pruning_keys(removed: Iterable[Head]) -> dict[str, list[int]]:
    """Heads -> the argument of `prune_heads`: {"encoder.0.self": [1, 3], "decoder.2.cross": [0]}."""
    keys: dict[str, list[int]] = {}
    for group, layer, head in removed:
        stack, kind = group.split(".")
        keys.setdefault(f"{stack}.{layer}.{kind}", []).append(head)
    return {key: sorted(heads) for key, heads in sorted(keys.items())}


def pruned_copy(model: nn.Module, removed: Iterable[Head]) -> nn.Module:
    """A deep copy of `model` with `removed` physically pruned (`prune_heads`); the original is untouched. Ours
    only: transformers 5 removed `prune_heads` from its models (huggingface/transformers#41417)."""
    if not is_ours(model):
        raise ValueError(f"{type(model).__name__}: prune_heads is ours only (transformers 5 removed it); mask instead")
    clone = copy.deepcopy(model)
    clone.prune_heads(pruning_keys(removed))
    return clone.eval()


# ------------------------------------------------------------------------------------------------ importance


def lm_loss(model: nn.Module, batch: Batch, masks: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(mean token cross-entropy, number of target tokens) of a batch with `labels` (-100 = ignored).

    Computed here from the logits, in their dtype: the model's own `loss` is upcast to fp32 by transformers, which
    would hide the fp64 precision a finite-difference check needs. A causal LM predicts token t+1 at position t."""
    with applied(model, masks) as kwargs:
        logits = model(**batch, **kwargs, use_cache=False).logits  # (B, T, V); seq2seq: labels give decoder inputs
    labels = batch["labels"]
    if _is_causal_lm(model):
        logits, labels = logits[:, :-1], labels[:, 1:]
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    return loss, int((labels != -100).sum())


def _is_causal_lm(model: nn.Module) -> bool:
    return model_kind(model) == "decoder"


def gate_gradient(model: nn.Module, batch: Batch, gate_tensors: Scores, loss_fn: LossFn = lm_loss) -> Scores:
    """∂L/∂ξ (signed) of one batch's loss at the given gates; the model's parameters receive no gradient."""
    return _gradient_and_count(model, batch, gate_tensors, loss_fn)[0]


def _gradient_and_count(model: nn.Module, batch: Batch, gate_tensors: Scores, loss_fn: LossFn) -> tuple[Scores, int]:
    leaves = {group: gate.detach().clone().requires_grad_(True) for group, gate in gate_tensors.items()}
    loss, count = loss_fn(model, batch, forward_masks(model, leaves))
    grads = torch.autograd.grad(loss, list(leaves.values()))  # only the gates' paths are differentiated
    return dict(zip(leaves, grads, strict=True)), count


def normalize_by_layer(scores: Scores) -> Scores:
    """Each layer's row divided by its L2 norm (Michel et al.'s `--normalize-by-layer`); an all-zero row stays 0."""
    out = {}
    for group, score in scores.items():
        norm = score.norm(p=2, dim=-1, keepdim=True)  # (L, 1)
        out[group] = torch.where(norm > 0, score / norm.clamp_min(torch.finfo(score.dtype).tiny), score)  # (L, H)
    return out


def head_importance(
    model: nn.Module,
    batches: Iterable[Batch],
    removed: Iterable[Head] = (),
    groups: Sequence[str] | None = None,
    loss_fn: LossFn = lm_loss,
    normalize: bool = True,
    progress: bool = False,
) -> Scores:
    """I_h = E |∂L/∂ξ_h| per group (L, H), at ξ = 1 except 0 at `removed` (Michel et al. recompute it that way
    after each pruning step); removed heads score 0. Token-weighted over batches; normalised per layer by L2.
    Ours only (its head masks carry the gradient); `ablation_scores` ranks the heads of any other model."""
    if not is_ours(model):
        raise ValueError(
            f"{type(model).__name__}: gradient importance needs differentiable head gates, which only our models "
            "have (head_mask); use ablation_scores (the loss increase when each head alone is ablated) instead"
        )
    removed = list(removed)
    at = gates(model, removed, groups)
    total = {group: torch.zeros_like(gate) for group, gate in at.items()}
    tokens = 0
    was_training = model.training
    model.eval()  # no dropout: the importance of the model as it is used
    for batch in tqdm(list(batches), desc="importance", leave=False, disable=not progress):
        grads, count = _gradient_and_count(model, batch, at, loss_fn)  # count: the weight of this batch's mean
        for group, grad in grads.items():
            total[group] += count * grad.abs()  # (L, H)
        tokens += count
    model.train(was_training)
    if tokens == 0:
        raise ValueError("head_importance: the batches hold nothing to score (no target tokens, no pairs)")
    scores = {group: value / tokens for group, value in total.items()}
    for group, layer, head in removed:
        if group in scores:
            scores[group][layer, head] = 0.0
    return normalize_by_layer(scores) if normalize else scores


def ablation_scores(
    model: nn.Module,
    batches: Sequence[Batch],
    removed: Iterable[Head] = (),
    groups: Sequence[str] | None = None,
    loss_fn: LossFn = lm_loss,
    normalize: bool = True,
    progress: bool = False,
) -> Scores:
    """The importance of each head as the increase of the token-weighted mean loss over `batches` when that head
    alone is ablated on top of `removed` (removed heads score 0): the gradient importance's ablation counterpart
    (Michel et al. 2019, section 3), for any model, ours or one the attention lens reaches. One forward pass over
    the batches per head; normalised per layer by L2 like `head_importance`."""
    removed = list(removed)
    metric = loss_metric(batches, loss_fn)
    chosen = _check_groups(model, groups)
    shapes = head_groups(model)
    was_training = model.training
    model.eval()
    base = metric(model, forward_masks(model, gates(model, removed, chosen)))
    scores = {group: torch.zeros(shapes[group], dtype=torch.float64) for group in chosen}
    heads = [(g, layer, h) for g in chosen for layer, h in np.ndindex(shapes[g]) if (g, layer, h) not in removed]
    for head in tqdm(heads, desc="ablation importance", leave=False, disable=not progress):
        group, layer, index = head
        masks = forward_masks(model, gates(model, [*removed, head], chosen))
        scores[group][layer, index] = metric(model, masks) - base
    model.train(was_training)
    return normalize_by_layer(scores) if normalize else scores


def random_scores(model: nn.Module, seed: int = 0, groups: Sequence[str] | None = None) -> Scores:
    """Seeded uniform scores per head: a random pruning order, the baseline a useful importance must beat."""
    generator = torch.Generator().manual_seed(seed)
    shapes = head_groups(model)
    return {group: torch.rand(shapes[group], generator=generator) for group in _check_groups(model, groups)}


def rank_heads(scores: Scores, removed: Iterable[Head] = ()) -> list[Head]:
    """All heads but `removed`, least important first, ranked across layers and groups together (Michel et al.);
    ties go to the earlier group, layer, head so the order is reproducible."""
    skip = set(removed)
    order = list(scores)
    heads = [
        (float(score[layer, head]), order.index(group), layer, head)
        for group, score in scores.items()
        for layer in range(score.shape[0])
        for head in range(score.shape[1])
        if (group, layer, head) not in skip
    ]
    return [(order[g], layer, head) for _, g, layer, head in sorted(heads)]


# ------------------------------------------------------------------------------------------------ metrics


def loss_metric(batches: Sequence[Batch], loss_fn: LossFn = lm_loss) -> Metric:
    """metric(model, masks) = token-weighted mean loss over `batches` (lower is better)."""

    @torch.no_grad()
    def metric(model: nn.Module, masks: dict[str, torch.Tensor]) -> float:
        total, tokens = 0.0, 0
        for batch in batches:
            loss, count = loss_fn(model, batch, masks)
            total += float(loss) * count
            tokens += count
        return total / max(tokens, 1)

    return metric


@torch.no_grad()
def translate(
    model: nn.Module,
    tokenizer,
    sources: Sequence[str],
    masks: dict[str, torch.Tensor] | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 128,
) -> list[str]:
    """Greedy translations under head masks (generate passes them to every step), batched by source length."""
    room = min(max_new_tokens, getattr(model.config, "max_position_embeddings", max_new_tokens + 1) - 1)
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    out = [""] * len(sources)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        enc = tokenizer([sources[i] for i in chunk], return_tensors="pt", padding=True)
        with applied(model, masks) as kwargs:
            ids = model.generate(**enc, **kwargs, max_new_tokens=room, do_sample=False, num_beams=1)
        for i, text in zip(chunk, tokenizer.batch_decode(ids, skip_special_tokens=True), strict=True):
            out[i] = text.strip()
    return out


def bleu_metric(
    tokenizer, sources: Sequence[str], references: Sequence[str], batch_size: int = 32, max_new_tokens: int = 128
) -> Metric:
    """metric(model, masks) = sacreBLEU corpus BLEU of greedy translations of `sources` (higher is better)."""
    import sacrebleu

    if len(sources) != len(references) or not sources:
        raise ValueError(f"bleu_metric needs as many sources as references (>0): {len(sources)} vs {len(references)}")

    def metric(model: nn.Module, masks: dict[str, torch.Tensor]) -> float:
        hypotheses = translate(model, tokenizer, sources, masks, batch_size, max_new_tokens)
        return float(sacrebleu.corpus_bleu(hypotheses, [list(references)]).score)

    return metric


def sentence_embeddings(model: nn.Module, inputs: Batch, masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean of the last hidden states over real tokens, L2-normalised (all-MiniLM-L6-v2's pooling): (B, C)."""
    with applied(model, masks) as kwargs:
        hidden = model(**inputs, **kwargs).last_hidden_state  # (B, T, C)
    keep = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    pooled = (hidden * keep).sum(1) / keep.sum(1).clamp_min(1.0)  # (B, C)
    return nn.functional.normalize(pooled, dim=-1)


def paraphrase_loss(scale: float = 20.0) -> LossFn:
    """In-batch contrastive loss of pair batches {"a": inputs, "b": inputs}: row i of a must pick row i of b among
    the batch by scaled cosine (sentence-transformers' MultipleNegativesRankingLoss, scale 20), both directions.
    Returns (mean loss, number of pairs)."""

    def loss_fn(model: nn.Module, batch: Batch, masks: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        a = sentence_embeddings(model, batch["a"], masks)  # (B, C)
        b = sentence_embeddings(model, batch["b"], masks)  # (B, C)
        scores = scale * a @ b.T  # (B, B): cosine of every a with every b
        target = torch.arange(len(a))
        loss = 0.5 * (nn.functional.cross_entropy(scores, target) + nn.functional.cross_entropy(scores.T, target))
        return loss, len(a)

    return loss_fn


def retrieval_metric(batches: Sequence[Batch]) -> Metric:
    """metric(model, masks) = share of a-sentences whose nearest b-sentence (cosine, over all pairs of every batch)
    is their own pair: accuracy@1 of paraphrase retrieval (higher is better)."""

    @torch.no_grad()
    def metric(model: nn.Module, masks: dict[str, torch.Tensor]) -> float:
        a = torch.cat([sentence_embeddings(model, batch["a"], masks) for batch in batches])  # (N, C)
        b = torch.cat([sentence_embeddings(model, batch["b"], masks) for batch in batches])  # (N, C)
        hits = (a @ b.T).argmax(dim=-1) == torch.arange(len(a))  # (N,)
        return float(hits.double().mean())

    return metric


# ------------------------------------------------------------------------------------------------ experiments


def ablation_deltas(
    model: nn.Module, metric: Metric, groups: Sequence[str] | None = None, progress: bool = False
) -> tuple[float, Scores]:
    """(metric of the full model, per group (L, H) metric with that one head masked minus the full metric)."""
    base = metric(model, {})
    deltas: Scores = {}
    heads = [(g, layer, h) for g in _check_groups(model, groups) for layer, h in np.ndindex(head_groups(model)[g])]
    for group, layer, head in tqdm(heads, desc="ablation", leave=False, disable=not progress):
        value = metric(model, forward_masks(model, gates(model, [(group, layer, head)], groups=[group])))
        deltas.setdefault(group, torch.zeros(head_groups(model)[group], dtype=torch.float64))[layer, head] = (
            value - base
        )
    return base, deltas


@torch.no_grad()
def pruned_vs_masked(model: nn.Module, removed: Sequence[Head], batch: Batch) -> tuple[nn.Module, float]:
    """(the pruned copy, max |output(pruned) - output(masked)|) on one batch (logits, or the last hidden state of a
    bare model): `prune_heads` must equal masking."""
    pruned = pruned_copy(model, removed)
    masked = _main_output(_call(model, batch, forward_masks(model, gates(model, removed))))
    return pruned, float((_main_output(_call(pruned, batch, {})) - masked).abs().max())


def _call(model: nn.Module, batch: Batch, masks: dict[str, torch.Tensor]):
    """The forward on a batch; a pair batch ({"a": inputs, "b": inputs}) runs on its first side."""
    inputs = batch.get("a", batch)
    with applied(model, masks) as kwargs:
        return model(**inputs, **kwargs, **({"use_cache": False} if model_kind(model) != "encoder" else {}))


def _main_output(out) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state  # (B, T, V) or (B, T, C)


def pruning_curve(
    model: nn.Module,
    metric: Metric,
    score_fn: Callable[[list[Head]], Scores],
    counts: Sequence[int],
    recompute: bool = False,
    check_at: Iterable[int] = (),
    check_batch: Batch | None = None,
    progress: bool = False,
) -> list[dict]:
    """Greedy pruning: remove the least important heads until `counts[i]` are gone, and measure `metric` there.

    `score_fn(removed)` gives the scores (e.g. `head_importance` at the current mask, or `random_scores`); it is
    called once, or before every step when `recompute` (Michel et al.'s iterative variant: remove a share of the
    heads, recompute the importance at the new mask, repeat). At the counts in
    `check_at` the heads are also removed for real (`prune_heads` on a copy): the point records the pruned model's
    metric, parameter count and, with `check_batch`, the largest logit difference from masking.
    """
    counts = list(counts)
    if counts != sorted(counts) or len(set(counts)) != len(counts):
        raise ValueError(f"counts must be strictly increasing, got {counts}")
    scores = score_fn([])
    groups = list(scores)
    total = sum(s.numel() for s in scores.values())
    if counts and not (counts[0] >= 0 and counts[-1] <= total):
        raise ValueError(f"counts must lie in [0, {total}] (the heads of groups {', '.join(groups)}), got {counts}")
    check_at, removed, points = set(check_at), [], []
    order = rank_heads(scores)
    for count in tqdm(counts, desc="pruning curve", leave=False, disable=not progress):
        if recompute and removed and count > len(removed):
            order = rank_heads(score_fn(removed), removed)  # the gradients at the current mask
        step = count - len(removed)
        removed.extend(order[:step])
        order = order[step:]
        point = {
            "removed": count,
            "share": count / total,
            "heads": [list(h) for h in removed],
            "metric": metric(model, forward_masks(model, gates(model, removed, groups))),
        }
        if count in check_at:
            if check_batch is not None:
                pruned, point["max_abs_logit_diff"] = pruned_vs_masked(model, removed, check_batch)
            else:
                pruned = pruned_copy(model, removed)
            point["pruned_metric"] = metric(pruned, {})
            point["pruned_parameters"] = pruned.num_parameters()
        points.append(point)
    return points
