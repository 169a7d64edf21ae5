"""Attention statistics at long context without the T×S weight matrix.

Per layer and head: entropy (nats), mean attention distance E|i − j| (tokens), attention received per key position
(column sums of the weights), mass on the first token (attention sinks, Xiao et al. 2023, "Efficient Streaming
Language Models with Attention Sinks") and mass on special tokens. Each query's statistics are means over the
non-padding queries of each sequence, as in `evaluation/metrics/attention_entropy` and `attention_distance`.

How: the model runs once under the attention lens (`modeling.attention_lens.AttentionLens(statistics=...)`): every
attention module that goes through transformers' attention interface (ours, Llama/SmolLM2, Mistral with its sliding
window, Qwen2/3 and OLMo2 with their q/k norms, GPT-2, BERT, BART, T5, ...) gets its output from the fused kernel,
and the statistics come from that kernel's log-sum-exp, one block of queries at a time: memory O(block · S) per
head instead of O(T · S), the model's own Q and K (after its projections, norms and rotary), the model's own mask.
Nothing is stored between layers but the (L, B, H) sums and the (L, B, H, S) column sums.

Masks: whatever the model builds from `attention_mask` (padding, causality, sliding windows); which queries count
and which keys are special is decided per module (`_plan`): `attention_mask` / `special_mask` describe `input_ids`,
a seq2seq decoder's self-attention reads `decoder_attention_mask`. One uncached forward.

`block_stats` (from Q and K) and `stats_from_weights` (from a full weight matrix) are the same statistics written
directly: the references the lens must equal (tests/test_streaming_stats.py).

Notation: L layers, B batch, H heads, T queries, S keys, D head dim, b query block.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from evaluation.head_gates import in_decoder, is_cross_attention
from modeling.attention_lens import AttentionLens, attention_modules

__all__ = [
    "AttentionStats",
    "block_stats",
    "stats_from_weights",
    "streaming_attention_stats",
]


@dataclasses.dataclass
class AttentionStats:
    """Per-sequence means over non-padding queries. Shapes: (L, B, H) except `received` (L, B, H, S)."""

    layer_names: list[str]
    entropy: torch.Tensor
    distance: torch.Tensor
    first_token_mass: torch.Tensor
    special_mass: torch.Tensor | None
    received: torch.Tensor  # column sums Σ_i P_ij over the queries i; S the longest keys, shorter ones padded with 0

    def layer_means(self) -> dict[str, list[float]]:
        """Each statistic averaged over batch and heads, one value per layer."""
        result = {
            "entropy": _nanmean(self.entropy, (1, 2)),
            "distance": _nanmean(self.distance, (1, 2)),
            "first_token_mass": _nanmean(self.first_token_mass, (1, 2)),
        }
        if self.special_mass is not None:
            result["special_mass"] = _nanmean(self.special_mass, (1, 2))
        return result

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: per-layer-and-head means over the batch, and the layer means (no column sums)."""
        heads = {
            "entropy": _nanmean(self.entropy, 1),
            "distance": _nanmean(self.distance, 1),
            "first_token_mass": _nanmean(self.first_token_mass, 1),
        }
        if self.special_mass is not None:
            heads["special_mass"] = _nanmean(self.special_mass, 1)
        return {"layers": self.layer_names, "per_head": heads, "per_layer": self.layer_means()}


def _nanmean(values: torch.Tensor, dims: int | tuple[int, ...]) -> list:
    """Mean over `dims` ignoring pruned heads (NaN), as nested lists with None where nothing was left (JSON has
    no NaN)."""
    mean = values.nanmean(dims)
    return _none_for_nan(mean.tolist())


def _none_for_nan(value):
    if isinstance(value, list):
        return [_none_for_nan(v) for v in value]
    return None if value != value else value


# --------------------------------------------------------------------------------------------------------------
# The math, one query block at a time
# --------------------------------------------------------------------------------------------------------------


def _block_weights(
    query: torch.Tensor,
    key_t: torch.Tensor,
    scaling: float,
    rows: torch.Tensor,
    causal: bool,
    key_mask: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None,
) -> torch.Tensor:
    """P for the queries `rows` from Q (B, H, b, D) and Kᵀ (B, H, D, S) in fp32: (B, H, b, S), masked entries 0."""
    scores = torch.matmul(query.float() * scaling, key_t)  # (B, H, b, S); scaled on Q: b·D values, not b·S
    cols = torch.arange(key_t.shape[-1], device=key_t.device)  # (S,)
    if alibi_slopes is not None:
        distance = (rows[:, None] - cols[None, :]).abs().float()  # (b, S)
        scores -= alibi_slopes.float()[None, :, None, None] * distance  # (1, H, b, S)
    if causal:
        scores.masked_fill_(cols[None, :] > rows[:, None], float("-inf"))  # (b, S) broadcast
    if key_mask is not None:
        scores.masked_fill_(~key_mask[:, None, None, :], float("-inf"))  # (B, 1, 1, S)
        # A query that sees no key (a padding query under left padding and causality) would be NaN; it is dropped
        # from the means anyway, so give it uniform weights. (Causality alone always leaves query i its own key.)
        dead = torch.isinf(scores).all(-1, keepdim=True)  # (B, H, b, 1)
        scores.masked_fill_(dead, 0.0)
    return torch.softmax(scores, dim=-1)


def block_stats(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    *,
    causal: bool,
    attention_mask: torch.Tensor | None = None,
    special_mask: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    block_size: int = 256,
    cross: bool = False,
) -> dict[str, torch.Tensor]:
    """The statistics of one layer from Q (B, H, T, D) and K (B, H|Hk, S, D), in query blocks of `block_size`.

    `attention_mask` (B, S) 0/1 marks real tokens (queries and keys of self-attention, T = S; with `cross` it
    masks the keys only, and every query counts); `special_mask` (B, S) bool marks special tokens. Returns (B, H)
    tensors `entropy`, `distance`, `first_token_mass`, `special_mass` (when given) and `received` (B, H, S)."""
    batch, heads, length, _ = query.shape
    if key.shape[1] != heads:  # grouped-query attention: each K head serves heads / Hk query heads
        key = key.repeat_interleave(heads // key.shape[1], dim=1)  # (B, H, S, D)
    keys = key.shape[2]
    key_mask = attention_mask.bool() if attention_mask is not None else None  # (B, S)
    query_mask = key_mask if key_mask is not None and not cross else None  # (B, T)
    # The first real token of each sequence (left padding moves it): the sink position.
    first = key_mask.float().argmax(-1) if key_mask is not None else torch.zeros(batch, dtype=torch.long)  # (B,)
    first = first.to(query.device)
    # Distances count real tokens only: index gaps equal position gaps inside one padded row.
    key_pos = torch.arange(keys, device=query.device)  # (S,)
    sums = {name: torch.zeros(batch, heads, device=query.device) for name in ("entropy", "distance", "first")}
    special = torch.zeros(batch, heads, device=query.device) if special_mask is not None else None
    received = torch.zeros(batch, heads, keys, device=query.device)
    key_t = key.float().transpose(-1, -2)  # (B, H, D, S), once for all blocks
    # One GEMM per block gives three row sums: Σ_j P_ij, Σ_j P_ij·j and Σ_j P_ij·special_j (the basis's columns).
    basis = [torch.ones(batch, keys, device=query.device), key_pos.float().expand(batch, -1)]  # 2 x (B, S)
    if special is not None:
        basis.append(special_mask.to(query.device).float())
    basis = torch.stack(basis, -1)[:, None]  # (B, 1, S, 2|3)
    causal = causal and not cross
    for start in range(0, length, block_size):
        rows = torch.arange(start, min(start + block_size, length), device=query.device)  # (b,)
        # Causal queries start..end-1 see keys 0..end-1 only: the rest of the row is 0, so it is not computed
        # (half the work over a whole sequence). Below, S stands for this visible width.
        seen = int(rows[-1]) + 1 if causal else keys
        p = _block_weights(
            query[:, :, rows],
            key_t[..., :seen],
            scaling,
            rows,
            causal,
            key_mask[:, :seen] if key_mask is not None else None,
            alibi_slopes,
        )  # (B, H, b, S)
        valid = query_mask[:, rows] if query_mask is not None else torch.ones(batch, len(rows), dtype=torch.bool)
        valid = valid.to(query.device).float()[:, None, :]  # (B, 1, b)
        entropy = torch.special.entr(p).sum(-1)  # (B, H, b): −Σ p log p with 0 log 0 = 0
        moments = torch.matmul(p, basis[:, :, :seen])  # (B, H, b, 2|3)
        if causal:  # j ≤ i: Σ_j P_ij |i − j| = i·Σ_j P_ij − Σ_j P_ij·j, no (b, S) gap tensor
            distance = rows.float() * moments[..., 0] - moments[..., 1]  # (B, H, b)
        else:
            distance = (p * (rows[:, None] - key_pos[None, :seen]).abs().float()).sum(-1)  # (B, H, b)
        # A first token beyond the visible keys means every query of the block is padding (weight 0 below).
        index = first.clamp(max=seen - 1).view(batch, 1, 1, 1).expand(-1, heads, len(rows), 1)  # (B, H, b, 1)
        sink = p.gather(-1, index).squeeze(-1)  # (B, H, b)
        sums["entropy"] += (entropy * valid).sum(-1)
        sums["distance"] += (distance * valid).sum(-1)
        sums["first"] += (sink * valid).sum(-1)
        if special is not None:
            special += (moments[..., 2] * valid).sum(-1)  # (B, H)
        received[..., :seen] += torch.matmul(valid[:, :, None, :], p).squeeze(2)  # (B, 1, 1, b) @ (B, H, b, S)
    count = (query_mask.sum(-1) if query_mask is not None else torch.full((batch,), length)).float()  # (B,)
    count = count.clamp(min=1).to(query.device)[:, None]  # (B, 1)
    result = {
        "entropy": sums["entropy"] / count,
        "distance": sums["distance"] / count,
        "first_token_mass": sums["first"] / count,
        "received": received,
    }
    if special is not None:
        result["special_mass"] = special / count
    return result


def stats_from_weights(
    weights: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    special_mask: torch.Tensor | None = None,
    cross: bool = False,
) -> dict[str, torch.Tensor]:
    """The same statistics from a full weight matrix (B, H, T, S): the reference the streaming path must equal."""
    batch, heads, length, keys = weights.shape
    p = weights.float()
    query_mask = attention_mask.bool() if attention_mask is not None and not cross else None
    valid = query_mask.float() if query_mask is not None else torch.ones(batch, length)  # (B, T)
    count = valid.sum(-1).clamp(min=1)[:, None]  # (B, 1)
    first = attention_mask.float().argmax(-1) if attention_mask is not None else torch.zeros(batch, dtype=torch.long)
    gap = (torch.arange(length)[:, None] - torch.arange(keys)[None, :]).abs().float()  # (T, S)
    entropy = torch.special.entr(p).sum(-1)  # (B, H, T): −Σ p log p with 0 log 0 = 0
    result = {
        "entropy": (entropy * valid[:, None]).sum(-1) / count,
        "distance": ((p * gap).sum(-1) * valid[:, None]).sum(-1) / count,
        "first_token_mass": (p[torch.arange(batch), :, :, first] * valid[:, None]).sum(-1) / count,
        "received": (p * valid[:, None, :, None]).sum(2),  # (B, H, S)
    }
    if special_mask is not None:
        on_special = (p * special_mask[:, None, None, :].float()).sum(-1)  # (B, H, T)
        result["special_mass"] = (on_special * valid[:, None]).sum(-1) / count
    return result


# --------------------------------------------------------------------------------------------------------------
# The whole model, under the attention lens
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Site:
    """One measured attention module: its index among the lens's layers, and what its keys and queries are."""

    index: int
    name: str
    module: nn.Module
    cross: bool  # keys are the encoder's tokens
    seq2seq_decoder: bool  # self-attention of a seq2seq decoder: keys and queries are the decoder's tokens


def _sites(model: nn.Module, layers: Sequence[int] | None) -> list[_Site]:
    found = attention_modules(model)
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no attention module that goes through transformers' attention interface "
            "(ALL_ATTENTION_FUNCTIONS), so the attention lens cannot measure it (see evaluation.streaming_stats)"
        )
    chosen = range(len(found))
    if layers is not None:
        bad = [i for i in layers if not -len(found) <= i < len(found)]
        if bad:
            raise ValueError(f"layers {bad} out of range: the model has {len(found)} attention modules")
        chosen = sorted({i % len(found) for i in layers})
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    sites = []
    for index in chosen:
        name, module, _ = found[index]
        cross = is_cross_attention(name, module)
        decoder = seq2seq and not cross and in_decoder(name, module)
        sites.append(_Site(index, name, module, cross, decoder))
    return sites


def _keys_of(site: _Site, inputs: dict, special_mask: torch.Tensor | None):
    """(key padding mask (B, S), special mask) of one module, as `_masks_for` always did: `attention_mask` and
    `special_mask` describe `input_ids`, the keys of encoder and decoder-only self-attention and of cross-attention;
    a seq2seq decoder's self-attention reads `decoder_attention_mask` and has no special mask."""
    if site.seq2seq_decoder:
        return inputs.get("decoder_attention_mask"), None
    return inputs.get("attention_mask"), special_mask


def _plan(sites: list[_Site], inputs: dict, special_mask: torch.Tensor | None) -> dict[str, Any]:
    """The lens's arguments: statistics of every measured layer, with their special masks, and as query masks the
    padding of self-attention's own tokens (cross-attention counts every query)."""
    plan: dict[str, Any] = {"statistics": [s.index for s in sites], "special_mask": {}, "query_mask": {}}
    for site in sites:
        keys, special = _keys_of(site, inputs, special_mask)
        if special is not None:
            plan["special_mask"][site.index] = special.bool()
        if keys is not None and not site.cross:  # self-attention: a query counts when its own token is real
            plan["query_mask"][site.index] = keys.bool()
    return plan


@torch.no_grad()
def streaming_attention_stats(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    *,
    special_mask: torch.Tensor | None = None,
    block_size: int = 256,
    layers: Sequence[int] | None = None,
    progress: bool = False,
) -> AttentionStats:
    """Run the model once under the attention lens (its base model, without the LM head; use_cache off) and return
    the statistics of every attention module.

    `inputs` holds `input_ids` (and `attention_mask`, decoder inputs for a seq2seq model); `attention_mask` and
    `special_mask` (B, S) describe `input_ids`, the keys of self-attention and of cross-attention (the encoder's
    tokens); a seq2seq decoder's self-attention reads `decoder_attention_mask`. `layers` picks attention modules by
    index in forward order (negative allowed; `AttentionLens(model).layer_names` lists them). The model's attention
    implementation is restored afterwards. Example:

        >>> stats = streaming_attention_stats(model, tokenizer("...", return_tensors="pt"), block_size=512)
        >>> stats.layer_means()["first_token_mass"]  # one value per layer
    """
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    sites = _sites(model, layers)
    plan = _plan(sites, inputs, special_mask)
    # The base model (no LM head): every attention module runs all the same, and a long input does not pay for
    # T × vocabulary logits (16k tokens x 50k words in fp32: 3.3 GB).
    body = getattr(model, "base_model", model)
    kwargs = dict(inputs)
    if "use_cache" in inspect.signature(body.forward).parameters:
        kwargs["use_cache"] = False
    bar = _progress(len(sites), progress)

    def tick(*_) -> None:  # a forward hook's return value would replace the module's output
        bar.update(1)

    handles = [site.module.register_forward_hook(tick) for site in sites]
    try:
        with AttentionLens(model, block_size=block_size, **plan) as lens:
            body(**kwargs)
    finally:
        for handle in handles:
            handle.remove()
        bar.close()
    results = _results(sites, lens, inputs, special_mask)
    return _stacked({site.name: results[site.name] for site in sites if site.name in results})


def _stacked(results: dict[str, dict[str, torch.Tensor]]) -> AttentionStats:
    """Per-module statistics -> (L, B, H) tensors; `received` padded on the right to the longest keys (a seq2seq's
    encoder and decoder differ in length)."""
    names = list(results)

    def stack(key: str) -> torch.Tensor:
        values = [results[n][key].cpu() for n in names]
        width = max(v.shape[-1] for v in values)
        return torch.stack([F.pad(v, (0, width - v.shape[-1])) if key == "received" else v for v in values])

    return AttentionStats(
        layer_names=names,
        entropy=stack("entropy"),
        distance=stack("distance"),
        first_token_mass=stack("first_token_mass"),
        special_mass=stack("special_mass") if all("special_mass" in results[n] for n in names) else None,
        received=stack("received"),
    )


def _results(sites: list[_Site], lens: AttentionLens, inputs: dict, special_mask) -> dict[str, dict]:
    """Per module name: its statistics in the original head indices. A module that did not run is left out; one
    whose heads are all pruned (it never calls its attention function) is all NaN."""
    measured = lens.statistics()
    results = {}
    for site in sites:
        if site.index in measured:
            stats = {k: v.float().cpu() for k, v in measured[site.index].items()}
        elif getattr(site.module, "kept_heads", None) == []:
            stats = _no_heads(site, inputs, special_mask)
        else:
            continue
        results[site.name] = _in_original_heads(site.module, stats)
    return results


def _no_heads(site: _Site, inputs: dict, special_mask) -> dict[str, torch.Tensor]:
    """The statistics of a module without heads: (B, 0) and (B, 0, S), which `_in_original_heads` fills with NaN."""
    keys = inputs["decoder_input_ids" if site.seq2seq_decoder else "input_ids"].shape[1]  # S of this module
    batch = inputs["input_ids"].shape[0]
    stats = {n: torch.zeros(batch, 0) for n in ("entropy", "distance", "first_token_mass")}
    if _keys_of(site, inputs, special_mask)[1] is not None:
        stats["special_mass"] = torch.zeros(batch, 0)
    stats["received"] = torch.zeros(batch, 0, keys)
    return stats


def _in_original_heads(module: nn.Module, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Heads removed by `prune_heads` come back as NaN at their original index, so that layers stack to (L, B, H)
    and head h means the same head before and after pruning (our modules only; others have no `kept_heads`)."""
    kept = getattr(module, "kept_heads", None)
    total = getattr(getattr(module, "config", None), "num_attention_heads", None)
    if kept is None or total is None or len(kept) == total:
        return stats
    full = {}
    for name, value in stats.items():  # (B, H_kept) or (B, H_kept, S)
        grown = value.new_full((value.shape[0], total, *value.shape[2:]), float("nan"))  # (B, H, ...)
        grown[:, kept] = value
        full[name] = grown
    return full


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="attention layers", unit="layer", disable=not enabled)
