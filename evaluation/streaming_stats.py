"""Attention statistics at long context without the T×S weight matrix.

Per layer and head: entropy (nats), mean attention distance E|i − j| (tokens), attention received per key position
(column sums of the weights), mass on the first token (attention sinks, Xiao et al. 2023, "Efficient Streaming
Language Models with Attention Sinks") and mass on special tokens. Each query's statistics are means over the
non-padding queries of each sequence, as in `evaluation/metrics/attention_entropy` and `attention_distance`.

How: forward pre-hooks on the attention modules read each layer's input (hidden states, and RoPE's cos/sin where
the model passes them), recompute Q and K with the module's own projections, and compute the weights one block of
queries at a time: memory O(block · S) per head instead of O(T · S), for any backend the model runs under (the
model's own forward never has to return weights). Nothing is stored between layers but the (L, B, H) sums and the
(L, B, H, S) column sums.

Supported attention modules (`adapter_for`):
* ours, `CourseTransformerAttention`: self-attention of encoders and decoders (learned, sinusoidal, RoPE, ALiBi
  positions) and cross-attention;
* Llama-type HF modules (`q_proj`, `k_proj`, `head_dim`, RoPE through `position_embeddings`; grouped-query K/V
  repeated per query head): Llama, SmolLM2, Mistral, Qwen2 (q/k norms are not applied: models with `q_norm` are
  refused);
* GPT-2 (`GPT2Attention`, fused `c_attn`; self-attention only, `scale_attn_by_inverse_layer_idx` honoured).
Masks: causal (decoders), key padding from `attention_mask` (B, S) 0/1; no packed sequences, custom 4D masks,
sliding windows or KV caches (one uncached forward).

Notation: L layers, B batch, H heads, T queries, S keys, D head dim, b query block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "AttentionStats",
    "adapter_for",
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
    received: torch.Tensor  # column sums: Σ_i P_ij over the queries i of each sequence

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
# Adapters: Q and K of one attention module from the inputs of its forward
# --------------------------------------------------------------------------------------------------------------

# An adapter maps (module, args, kwargs) of a forward call to (Q (B, H, T, D), K (B, Hk, S, D), scaling, causal,
# ALiBi slopes or None), or None when the call is not one to measure.
Adapter = Callable[[nn.Module, tuple, dict], tuple | None]


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.view(x.shape[0], x.shape[1], -1, head_dim).transpose(1, 2)  # (B, H, T, D)


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _ours(module: nn.Module, args: tuple, kwargs: dict, slopes: torch.Tensor | None):
    from modeling.modeling_course_transformer import apply_rope

    hidden = _hidden(args, kwargs)  # (B, T, C)
    query = _heads(module.q_proj(hidden), module.head_dim)
    if module.is_cross_attention:
        key = _heads(module.k_proj(kwargs["key_value_states"]), module.head_dim)  # (B, H, S, D)
        return query, key, module.scaling, False, None
    key = _heads(module.k_proj(hidden), module.head_dim)
    if kwargs.get("position_embeddings") is not None:
        cos, sin = kwargs["position_embeddings"]
        query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
    return query, key, module.scaling, module.is_causal, slopes


def _llama(module: nn.Module, args: tuple, kwargs: dict):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    hidden = _hidden(args, kwargs)  # (B, T, C)
    query, key = _heads(module.q_proj(hidden), module.head_dim), _heads(module.k_proj(hidden), module.head_dim)
    embeddings = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
    if embeddings is not None:
        query, key = apply_rotary_pos_emb(query, key, *embeddings)  # cos, sin (B, T, D)
    return query, key, module.scaling, getattr(module, "is_causal", True), None


def _gpt2(module: nn.Module, args: tuple, kwargs: dict):
    if kwargs.get("encoder_hidden_states") is not None:
        return None
    hidden = _hidden(args, kwargs)  # (B, T, C)
    query, key, _ = module.c_attn(hidden).split(module.split_size, dim=2)  # 3 x (B, T, C)
    scaling = module.head_dim**-0.5 if module.scale_attn_weights else 1.0
    if module.scale_attn_by_inverse_layer_idx:
        scaling /= float(module.layer_idx + 1)
    return _heads(query, module.head_dim), _heads(key, module.head_dim), scaling, True, None


def adapter_for(module: nn.Module, slopes: torch.Tensor | None = None) -> Adapter | None:
    """The adapter of a supported attention module (see the module docstring), or None for any other module."""
    name = type(module).__name__
    if name == "CourseTransformerAttention":
        return lambda m, a, k: _ours(m, a, k, slopes)
    if name == "GPT2Attention":
        return _gpt2
    if name.endswith("Attention") and all(hasattr(module, n) for n in ("q_proj", "k_proj", "head_dim", "scaling")):
        if hasattr(module, "q_norm") or getattr(module, "sliding_window", None):
            return None
        return _llama
    return None


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module, Adapter]]:
    """(name, module, adapter) of every supported attention module, in forward order."""
    found = []
    for name, module in model.named_modules():
        slopes = None
        if type(module).__name__ == "CourseTransformerAttention" and model.config.position_encoding == "alibi":
            from modeling.modeling_course_transformer import alibi_slopes

            # Slopes belong to the original heads: a pruned module keeps its heads' own slopes, as the model does.
            slopes = alibi_slopes(model.config.num_attention_heads)[module.kept_heads]  # (H_kept,)
        adapter = adapter_for(module, slopes)
        if adapter is not None:
            found.append((name, module, adapter))
    return found


# --------------------------------------------------------------------------------------------------------------
# The whole model
# --------------------------------------------------------------------------------------------------------------


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
    """Run the model once (its base model, without the LM head; use_cache off) and return the statistics of every
    supported attention module.

    `inputs` holds `input_ids` (and `attention_mask`, decoder inputs for a seq2seq model); `attention_mask` and
    `special_mask` (B, S) describe `input_ids`, the keys of self-attention and of cross-attention (the encoder's
    tokens); a seq2seq decoder's self-attention reads `decoder_attention_mask`. `layers` picks attention modules by
    index in forward order (negative allowed). Example:

        >>> stats = streaming_attention_stats(model, tokenizer("...", return_tensors="pt"), block_size=512)
        >>> stats.layer_means()["first_token_mass"]  # one value per layer
    """
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no supported attention module (ours, Llama-type or GPT-2; "
            "see evaluation.streaming_stats)"
        )
    if layers is not None:
        bad = [i for i in layers if not -len(modules) <= i < len(modules)]
        if bad:
            raise ValueError(f"layers {bad} out of range: the model has {len(modules)} attention modules")
        modules = [modules[i % len(modules)] for i in sorted({i % len(modules) for i in layers})]
    results: dict[str, dict[str, torch.Tensor]] = {}
    bar = _progress(len(modules), progress)

    def hook_for(name: str, adapter: Adapter):
        def hook(module, args, kwargs):
            captured = adapter(module, args, kwargs)
            if captured is None:
                return
            query, key, scaling, causal, slopes = captured
            key_mask, special = _masks_for(model, module, inputs, special_mask)
            stats = block_stats(
                query,
                key,
                scaling,
                causal=causal,
                attention_mask=key_mask,
                special_mask=special,
                alibi_slopes=slopes,
                block_size=block_size,
                cross=bool(getattr(module, "is_cross_attention", False)),
            )
            results[name] = _in_original_heads(module, stats)
            bar.update(1)

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n, a), with_kwargs=True) for n, m, a in modules]
    # The base model (no LM head): the hooks see every attention module all the same, and a long input does not
    # pay for T × vocabulary logits (16k tokens x 50k words in fp32: 3.3 GB).
    body = getattr(model, "base_model", model)
    try:
        body(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        bar.close()
    names = [n for n, _, _ in modules if n in results]

    def stack(key: str) -> torch.Tensor:
        return torch.stack([results[n][key].cpu() for n in names])

    return AttentionStats(
        layer_names=names,
        entropy=stack("entropy"),
        distance=stack("distance"),
        first_token_mass=stack("first_token_mass"),
        special_mass=stack("special_mass") if all("special_mass" in results[n] for n in names) else None,
        received=stack("received"),
    )


def _masks_for(
    model: nn.Module, module: nn.Module, inputs: dict[str, torch.Tensor], special_mask: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The key padding mask (B, S) and special-token mask of one module's keys. `attention_mask` and
    `special_mask` describe `input_ids`: the keys of encoder and decoder-only self-attention and of cross-attention
    (the encoder's tokens); the decoder self-attention of a seq2seq model reads `decoder_attention_mask`."""
    seq2seq_decoder = (
        getattr(model.config, "is_encoder_decoder", False)
        and getattr(module, "is_causal", False)
        and not getattr(module, "is_cross_attention", False)
    )
    if seq2seq_decoder:
        return inputs.get("decoder_attention_mask"), None
    return inputs.get("attention_mask"), special_mask


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
