"""The attention lens: exact weights, head interventions and streaming statistics for any transformers model.

transformers 5 sends almost every model's attention through one seam: `ALL_ATTENTION_FUNCTIONS`, called with the
module, Q (B, H, T, D), K and V (B, H_kv, S, D) after the model's own projections, norms and rotary, the mask, the
scaling and model-specific keywords. This file registers one more function there, `"lens"`, so that

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="lens")   # or set_attn_implementation

runs the fast kernel (sdpa) for every layer and, for the layers and heads asked for only:

* returns the exact softmax weights P = exp(scale·QKᵀ + bias + mask − lse), with lse the log-sum-exp the fused
  kernel computes anyway: `output_attentions=True`, `generate(output_attentions=True)` and pipelines get them;
* applies head interventions (zero or mean ablation, scaling, keeping only some heads) and query→key edge
  knock-outs (Geva et al. 2023, "Dissecting Recall of Factual Associations in Auto-Regressive Language Models");
* accumulates streaming statistics one query block at a time, never holding the T×S matrix: entropy, mean
  distance, first-token (sink) mass, special-token mass and per-key column sums (Xiao et al. 2023, "Efficient
  Streaming Language Models with Attention Sinks");
* computes value-aware attention ‖α_ij f_h(x_j)‖ per head (Kobayashi et al. 2020, "Attention is Not Only a
  Weight"), with f_h the head's value vector through its slice of the output projection.

Model-specific keywords are handled exactly or refused: `position_bias` (T5, and our ALiBi) is added to the scores,
`softcap` (Gemma 2/3) caps them with tanh (eager math: no kernel caps), `s_aux` (gpt-oss attention sinks) enters the
normaliser through the kernel's lse, `sliding_window` is already in the mask sdpa receives. Any other keyword with a
value is refused with an error naming the model, the layer and the keyword, before the forward when the model is
attached to an `AttentionLens` (read from the source of the module's call) and at the call otherwise.

The Python API is `AttentionLens`, a context manager (example in its docstring). This file imports only torch and
transformers: it travels with our saved folders as remote code, and our model's `output_attentions`,
`attention_layers` and `head_mask` run through `attend` below.

Notation: B batch, H query heads, H_kv key/value heads, T queries, S keys, D head dim, C hidden size, b query block.
"""

from __future__ import annotations

import ast
import functools
import inspect
import math
import sys
import textwrap
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.utils import logging

try:  # the context variable through which transformers' output capture collects attentions (5.x)
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover
    _active_collector = None

logger = logging.get_logger(__name__)

LENS = "lens"

# Keywords the kernels' call sites pass that do not change the attention the function must compute: bookkeeping
# (positions, cache, flags read by the model) and flash's own descriptions of what the mask already holds.
IGNORED_KEYWORDS = frozenset(
    {
        "output_attentions",
        "output_hidden_states",
        "use_cache",
        "past_key_values",
        "past_key_value",
        "cache_position",
        "position_ids",
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
        "sliding_window",  # in the mask that `sdpa_mask` builds for this name
        "layer_idx",
        "return_dict",
        "token_type_ids",
        "input_ids",
        "deterministic",  # flash attention's backward flag
    }
)
# The attention function's own parameters, which some call sites pass by name.
OWN_PARAMETERS = frozenset({"module", "query", "key", "value", "attention_mask"})
# Keywords whose math the lens reproduces exactly.
HANDLED_KEYWORDS = frozenset({"position_bias", "softcap", "s_aux", "is_causal", "scaling", "dropout"})


def _transformers_kwargs() -> frozenset[str]:
    """The bookkeeping keywords transformers forwards through every model (`TransformersKwargs`: output flags,
    packed-sequence descriptions for flash, `num_items_in_batch`, ...): none changes what the mask describes."""
    try:
        from transformers.utils import TransformersKwargs
    except ImportError:  # pragma: no cover
        return frozenset()
    names: set[str] = set()
    for cls in TransformersKwargs.__mro__:
        names |= set(getattr(cls, "__annotations__", {}))
    return frozenset(names)


KNOWN_KEYWORDS = IGNORED_KEYWORDS | HANDLED_KEYWORDS | _transformers_kwargs()
HEAD_ABLATIONS = ("zero", "mean")


# --------------------------------------------------------------------------------------------------------------
# What one layer is asked for
# --------------------------------------------------------------------------------------------------------------


@dataclass
class LayerRequest:
    """What the lens computes for one attention call beyond the output.

    `head_scale` (H,) multiplies each head's output (0 = zero ablation, 1 = unchanged); `mean_heads` are replaced by
    their mean output over the batch and the queries of this forward; `knockout` (B|1, H|1, T, S) bool marks
    query→key edges removed before the softmax; `stats` accumulates streaming statistics; `norms` asks for
    ‖α f(x)‖ with the output projection `projection`."""

    weights: bool = False
    weight_heads: tuple[int, ...] | None = None  # weights of these heads only (the lens's own results)
    head_scale: torch.Tensor | None = None
    mean_heads: tuple[int, ...] = ()
    knockout: torch.Tensor | None = None
    stats: StreamingStats | None = None
    norms: bool = False
    projection: nn.Module | None = None
    site: LensSite | None = None

    @property
    def needs_scores(self) -> bool:
        return self.weights or self.norms or self.knockout is not None or self.stats is not None


@dataclass
class LensSite:
    """One attention module of an attached model: its index among them, its name and what is asked of it."""

    index: int
    name: str
    module: nn.Module
    num_heads: int
    request: LayerRequest
    lens: AttentionLens
    intervention: LayerRequest | None = None  # head interventions applied to W_O's input (see `_route_interventions`)
    projection: nn.Module | None = None
    hook: Any = None


# --------------------------------------------------------------------------------------------------------------
# The math: mask terms, the kernel with its log-sum-exp, weights from the lse
# --------------------------------------------------------------------------------------------------------------

_CPU_LSE_KERNEL = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CUDA_LSE_KERNEL = getattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", None)
_LSE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def lse_unavailable(query: torch.Tensor, dropout: float) -> str | None:
    """Why no fused kernel can give this call's lse (None when one can): the weights then come from eager math."""
    if dropout > 0.0:
        return "attention dropout is active (training): the kernel's dropped weights are not recoverable from its lse"
    if torch.is_grad_enabled() and query.requires_grad:
        return "gradients are enabled: the kernels' lse output has no derivative, eager's softmax graph has"
    if query.dtype not in _LSE_DTYPES:
        return f"dtype {query.dtype} has no lse kernel"
    if query.device.type == "cpu":
        return None if _CPU_LSE_KERNEL is not None else "this torch has no _scaled_dot_product_flash_attention_for_cpu"
    if query.device.type == "cuda":
        if _CUDA_LSE_KERNEL is None:
            return "this torch has no _scaled_dot_product_efficient_attention"
        return "the CUDA memory-efficient kernel has no float64 path" if query.dtype == torch.float64 else None
    return f"no lse kernel is wired for device {query.device.type!r}"


def additive_mask(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    is_causal: bool,
    position_bias: torch.Tensor | None = None,
    knockout: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Everything added to scale·QKᵀ as one float tensor (B|1, H|1, T, S) in at least fp32: the mask (boolean
    True = attend, or additive), the causal triangle when the mask is None and the module is causal (top-left, as
    sdpa's `is_causal`), a position bias (T5, ALiBi) and knocked-out edges. Masked entries are -inf, as sdpa makes
    of a boolean mask, so that a row with every key masked gives sdpa's output (zeros); `dead_rows` finds them."""
    length, key_length = query.shape[2], key.shape[2]
    dtype = torch.promote_types(query.dtype, torch.float32)
    if attention_mask is None and position_bias is None and knockout is None:
        return None  # nothing, or causal only: the kernel's own causal flag, and `causal_fill` on the scores
    if attention_mask is not None and position_bias is None and knockout is None:
        return _converted(attention_mask, dtype)  # the same mask object reaches every layer: converted once
    if attention_mask is None:
        mask = torch.zeros(1, 1, length, key_length, dtype=dtype, device=query.device)  # (1, 1, T, S)
        if is_causal and length > 1:
            future = torch.ones(length, key_length, dtype=torch.bool, device=query.device).triu(1)  # (T, S)
            mask.masked_fill_(future, float("-inf"))
    else:
        mask = _converted(attention_mask, dtype)
    if position_bias is not None:
        mask = mask + position_bias.to(dtype)  # (1|B, H, T, S)
    if knockout is not None:
        try:
            mask = mask.masked_fill(knockout.to(mask.device), float("-inf"))  # (B|1, H|1, T, S)
        except RuntimeError as error:
            raise ValueError(
                f"knockout of shape {tuple(knockout.shape)} does not fit this call's scores (B, H, T, S) = "
                f"{(query.shape[0], query.shape[1], length, key_length)}: {error}"
            ) from None
    return mask


@dataclass
class _MaskCache:
    """The last bare mask converted to additive form: a weak reference to it, its (dtype, version) key, the
    converted tensor and, once scanned, its dead rows. Every layer of a forward receives the same mask object."""

    ref: Any = None
    key: tuple | None = None
    result: torch.Tensor | None = None
    dead: Any = "unscanned"  # a (B|1, H|1, T) bool tensor, None (no dead row) or "unscanned"


_MASKS = _MaskCache()


def _converted(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`additive_mask` of a bare mask, kept for the next layer: one (B, 1, T, S) float tensor per forward, not
    one per layer. Keyed by the mask object itself (a weak reference) and its version counter."""
    # Inference tensors keep no version counter; within one forward nothing writes the mask in place.
    version = -1 if attention_mask.is_inference() else attention_mask._version
    cache = _MASKS
    if cache.ref is not None and cache.ref() is attention_mask and cache.key == (dtype, version):
        return cache.result
    if attention_mask.dtype == torch.bool:
        result = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)  # (B|1, 1, T, S)
        result.masked_fill_(~attention_mask, float("-inf"))
    else:  # additive, as the model built it; its "masked" entries (finfo.min of its dtype) become -inf as sdpa's
        result = attention_mask.to(dtype)
        result = result.masked_fill(result <= torch.finfo(attention_mask.dtype).min / 2, float("-inf"))
    cache.ref, cache.key, cache.result, cache.dead = weakref.ref(attention_mask), (dtype, version), result, "unscanned"
    return result


def causal_fill(scores: torch.Tensor, row_start: int = 0) -> torch.Tensor:
    """Set the future of each query to -inf in place (top-left causal, as sdpa's `is_causal`): scores (..., b, S)
    of the queries row_start .. row_start + b − 1. Only the keys from row_start on can be in a query's future, so
    only that (b, S − row_start) corner is touched, not the whole block."""
    corner = scores[..., row_start:]  # (..., b, S − row_start): a view
    future = torch.ones(corner.shape[-2:], dtype=torch.bool, device=scores.device).triu_(1)  # j > i
    corner.masked_fill_(future, float("-inf"))
    return scores


def dead_rows(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B|1, H|1, T) True where every key of a query is masked (padding queries), or None when there are none.
    Eager's additive finfo.min masks give such a row uniform weights; sdpa gives it a zero output."""
    if mask is None:
        return None
    shared = _MASKS.result is mask  # the converted mask of this forward: scanned once, not per layer
    if shared and not isinstance(_MASKS.dead, str):
        return _MASKS.dead
    dead = torch.isneginf(mask).all(-1)
    dead = dead if bool(dead.any()) else None
    if shared:
        _MASKS.dead = dead
    return dead


def kernel_with_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel's output (B, H, T, D) and log-sum-exp (B, H, T) of scale·QKᵀ + mask (K, V with H heads).

    The kernels want one head size for Q, K and V; multi-head latent attention (DeepSeek-style: V narrower than Q
    and K) gets V padded with zero columns, and the padding is cut from the output (zeros add nothing)."""
    value_dim = value.shape[-1]
    if value_dim != query.shape[-1]:
        if value_dim > query.shape[-1]:  # zero columns in Q and K leave every score unchanged
            query, key = (F.pad(x, (0, value_dim - x.shape[-1])) for x in (query, key))
        else:
            value = F.pad(value, (0, query.shape[-1] - value_dim))
        output, lse = kernel_with_lse(query, key, value, mask, scaling, causal)
        return output[..., :value_dim], lse
    if mask is not None:
        mask = mask.to(query.dtype)
    if query.device.type == "cuda":
        bias = None if mask is None else mask.expand(query.shape[0], query.shape[1], -1, -1)  # (B, H, T, S)
        output, lse = _CUDA_LSE_KERNEL(query, key, value, bias, True, 0.0, causal, scale=scaling)[:2]
        return output, lse[..., : query.shape[2]]  # the efficient kernel pads the lse's query dimension
    # `causal` instead of a materialised triangle: the kernel skips the masked blocks (half the work over T×T).
    return _CPU_LSE_KERNEL(query, key, value, 0.0, causal, attn_mask=mask, scale=scaling)[:2]


def scores_minus_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    lse: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    causal: bool = False,
    row_start: int = 0,
) -> torch.Tensor:
    """scale·QKᵀ + mask − lse in at least fp32, (B, H, T, S): exponentiated, the exact softmax weights.

    One GEMM writes it (baddbmm scales the product and adds −lse as it stores; scaling Q first rounds differently
    from eager, 8e-6 on MiniLM's first layer), then one pass adds the mask: no max, no sum, no softmax graph."""
    batch, heads, length, dim = query.shape
    compute = torch.promote_types(query.dtype, torch.float32)
    queries = query.to(compute).reshape(batch * heads, length, dim)  # (BH, T, D)
    keys_t = key.to(compute).expand(batch, heads, -1, -1).reshape(batch * heads, key.shape[2], dim).transpose(1, 2)
    shift = lse.to(compute).neg().expand(batch, heads, length).reshape(batch * heads, length, 1)  # (BH, T, 1)
    scores = torch.baddbmm(shift, queries, keys_t, alpha=scaling).view(batch, heads, length, -1)  # (B, H, T, S)
    if mask is not None:
        scores.add_(mask)  # (B|1, H|1, T, S) broadcast; -inf entries exponentiate to 0
    elif causal:
        causal_fill(scores, row_start)
    return scores


def weights_from_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    lse: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    causal: bool = False,
) -> torch.Tensor:
    """The exact softmax weights (B, H, T, S) in at least fp32 from the kernel's lse."""
    weights = scores_minus_lse(query, key, lse, mask, scaling, causal).exp_()  # (B, H, T, S)
    return uniform_dead_rows(renormalise(weights), mask)


def renormalise(weights: torch.Tensor) -> torch.Tensor:
    """Divide each row by its sum, in place. The CPU kernel's lse is itself rounded (its vectorised exp): on one
    Xeon it was off by up to 6.4e-6 from a float64 logsumexp at MiniLM's score scale, so exp(s − lse) rows summed
    to 1 ± 6e-6. The lse still does the work that matters (no max pass, no overflow); one row-sum pass removes its
    rounding and leaves the weights within fp32 rounding of eager's softmax. All-masked rows (sum 0) are replaced
    afterwards by `uniform_dead_rows`."""
    return weights.div_(weights.sum(-1, keepdim=True).clamp_(min=torch.finfo(weights.dtype).tiny))


def uniform_dead_rows(weights: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Give the rows whose keys are all masked eager's answer, uniform weights (the kernel's are 0 or NaN)."""
    dead = dead_rows(mask)
    if dead is None:
        return weights
    return torch.where(dead.unsqueeze(-1), 1.0 / weights.shape[-1], weights)  # (B, H, T, S)


def eager_softmax(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """softmax(cap(scale·QKᵀ) + mask) in at least fp32, (B, H, T, S); `softcap` c applies c·tanh(s/c) to the scores
    before the mask, as Gemma 2 does (no fused kernel caps, so this is the exact path for capped models); `sinks`
    (H,) are one extra logit per head in the normaliser, as gpt-oss's, dropped after the softmax."""
    compute = torch.promote_types(query.dtype, torch.float32)
    scores = torch.matmul(query.to(compute), key.to(compute).transpose(-1, -2)) * scaling  # (B, H, T, S)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores + mask.clamp(min=torch.finfo(compute).min)  # finfo.min, as eager: dead rows come out uniform
    elif causal:
        scores = causal_fill(scores)
    if sinks is None:
        return torch.softmax(scores, dim=-1)
    sink = sinks.to(compute).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)  # (B, H, T, 1)
    return torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]  # (B, H, T, S)


# --------------------------------------------------------------------------------------------------------------
# Streaming statistics and value norms
# --------------------------------------------------------------------------------------------------------------


@dataclass
class StreamingStats:
    """Sums over the queries of one attention call, filled one query block at a time.

    Per (B, H): Σ entropy, Σ distance |i − j| weighted by P, Σ mass on the first real key, Σ mass on special keys;
    per (B, H, S): column sums Σ_i P_ij (attention received). Only valid queries count (`query_mask`, or the
    queries whose own key is not masked in self-attention)."""

    block_size: int = 256
    special_mask: torch.Tensor | None = None  # (B, S) bool
    query_mask: torch.Tensor | None = None  # (B, T) bool
    cross: bool | None = None
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    count: torch.Tensor | None = None  # (B,) valid queries

    def means(self) -> dict[str, torch.Tensor]:
        """Per-sequence means over valid queries: (B, H) statistics and `received` (B, H, S)."""
        count = self.count.clamp(min=1)[:, None]  # (B, 1)
        result = {name: self.sums[name] / count for name in ("entropy", "distance", "first_token_mass")}
        if "special_mass" in self.sums:
            result["special_mass"] = self.sums["special_mass"] / count
        result["received"] = self.sums["received"]
        return result


def _real_keys(mask: torch.Tensor | None, batch: int, keys: int, device) -> torch.Tensor:
    """(B, S) bool: keys some query may attend (padding keys are masked for every query)."""
    if mask is None:
        return torch.ones(batch, keys, dtype=torch.bool, device=device)
    return (mask > torch.finfo(mask.dtype).min / 2).any(-2).any(1).expand(batch, -1)  # (B, S): -inf or finfo.min


def accumulate_stats(
    stats: StreamingStats,
    block_probs: Callable[[slice], tuple[torch.Tensor, torch.Tensor | None]],
    shape: tuple[int, int, int, int],
    masking: tuple[torch.Tensor | None, bool],
    cross: bool,
    device: torch.device,
) -> None:
    """Add one call's statistics to `stats`, taking P (B, H, b, S') and its entropy (or None) from
    `block_probs(rows)` one block of `stats.block_size` queries at a time: memory O(b·S) per head, not O(T·S).
    `shape` is (B, H, T, S); S' ≤ S are the keys the block can see; `masking` is (mask, causal only)."""
    batch, heads, length, keys = shape
    mask, causal = masking
    valid, first, offset = _query_layout(stats, mask, shape, cross, device)
    key_pos = torch.arange(keys, device=device, dtype=torch.float32)  # (S,)
    basis = [torch.ones(batch, keys, device=device), key_pos.expand(batch, -1)]  # Σ P, Σ P·j
    if stats.special_mask is not None:
        basis.append(stats.special_mask.to(device).float())  # Σ P·special
    basis = torch.stack(basis, -1)[:, None]  # (B, 1, S, 2|3)
    sums = {name: torch.zeros(batch, heads, device=device) for name in ("entropy", "distance", "first", "special")}
    received = torch.zeros(batch, heads, keys, device=device)
    for start in range(0, length, stats.block_size):
        rows = slice(start, min(start + stats.block_size, length))
        p, entropy = block_probs(rows)  # (B, H, b, S'), (B, H, b) or None
        seen = p.shape[-1]
        weight = valid[:, rows].float()[:, None]  # (B, 1, b)
        moments = torch.matmul(p, basis[:, :, :seen])  # (B, H, b, 2|3)
        position = torch.arange(rows.start, rows.stop, device=device, dtype=torch.float32) + offset  # (b,)
        if causal:  # every key at or before the query: Σ_j P_ij (i − j) = i Σ_j P_ij − Σ_j P_ij j
            distance = position * moments[..., 0] - moments[..., 1]  # (B, H, b)
        else:
            distance = (p * (position[:, None] - key_pos[None, :seen]).abs()).sum(-1)  # (B, H, b)
        index = first.clamp(max=seen - 1).view(batch, 1, 1, 1).expand(-1, heads, p.shape[2], 1)  # (B, H, b, 1)
        sink = p.gather(-1, index).squeeze(-1) * (first < seen).float().view(batch, 1, 1)  # (B, H, b)
        if entropy is None:
            entropy = torch.special.entr(p).sum(-1)  # −Σ p log p, 0 log 0 = 0
        sums["entropy"] += (entropy * weight).sum(-1)
        sums["distance"] += (distance * weight).sum(-1)
        sums["first"] += (sink * weight).sum(-1)
        if stats.special_mask is not None:
            sums["special"] += (moments[..., 2] * weight).sum(-1)
        received[..., :seen] += torch.matmul(weight[:, :, None, :], p).squeeze(2)  # (B,1,1,b) @ (B,H,b,S') -> (B,H,S')
    _add_sums(stats, sums, sums["special"], received, valid.sum(-1).float())


def _query_layout(stats: StreamingStats, mask, shape, cross: bool, device):
    """Which queries count (B, T), the first real key of each row (B,) and the queries' offset among the keys."""
    batch, _, length, keys = shape
    cross = stats.cross if stats.cross is not None else cross
    real = _real_keys(mask, batch, keys, device)  # (B, S)
    # Self-attention's queries are the last T of its keys (a cache before them); cross-attention's are their own
    # sequence, compared with the encoder's key indices as they are.
    offset = 0 if cross else keys - length
    if stats.query_mask is not None:
        valid = stats.query_mask.to(device).bool()  # (B, T)
    elif cross or offset < 0:
        valid = torch.ones(batch, length, dtype=torch.bool, device=device)
    else:
        valid = real[:, offset:]  # a padding query's own key is masked for everyone
    return valid, real.float().argmax(-1), offset


def _add_sums(stats: StreamingStats, sums: dict, special: torch.Tensor, received: torch.Tensor, count) -> None:
    new = {"entropy": sums["entropy"], "distance": sums["distance"], "first_token_mass": sums["first"]}
    if stats.special_mask is not None:
        new["special_mass"] = special
    new["received"] = received
    for name, value in new.items():
        old = stats.sums.get(name)
        stats.sums[name] = value if old is None or old.shape != value.shape else old + value
    stats.count = count if stats.count is None else stats.count + count


OUTPUT_PROJECTIONS = ("o_proj", "c_proj", "out_proj", "dense", "out_lin", "o", "proj")


def find_output_projection(module: nn.Module, parent: nn.Module | None, name: str | None = None) -> nn.Module:
    """The linear map W_O that reads the concatenated heads: `name` if given, else the first of OUTPUT_PROJECTIONS
    on the module, then in its parent's other children (BERT keeps it in a sibling `output.dense`)."""
    names = (name,) if name else OUTPUT_PROJECTIONS
    places = [module] + ([m for m in parent.children() if m is not module] if parent is not None else [])
    for place in places:
        for candidate in names:
            found = getattr(place, candidate, None)
            if isinstance(found, nn.Module) and getattr(found, "weight", None) is not None:
                return found
    raise ValueError(
        f"{type(module).__name__}: no output projection named {' / '.join(names)} on the module or beside it; "
        "pass output_projection='<attribute name>'"
    )


def head_value_norms(value: torch.Tensor, projection: nn.Module, heads: int) -> torch.Tensor:
    """‖v_j^h W_O^h‖ for every head and key, (B, H, S): the size of what key j adds through head h.

    Through the Gram matrix G_h = W_O^hᵀ W_O^h (D, D): ‖v W_O^hᵀ‖² = v G_h vᵀ, no (B, H, S, C) tensor."""
    weight = projection.weight.float()
    dim = value.shape[-1]
    # nn.Linear stores (C, H·D); GPT-2's Conv1D stores (H·D, C).
    per_head = weight.T if type(projection).__name__ == "Conv1D" else weight  # (C, H·D)
    per_head = per_head.view(per_head.shape[0], heads, dim).transpose(0, 1)  # (H, C, D)
    gram = per_head.transpose(1, 2) @ per_head  # (H, D, D)
    squared = torch.einsum("bhsd,hde,bhse->bhs", value.float(), gram, value.float())  # (B, H, S)
    return squared.clamp(min=0).sqrt()


# --------------------------------------------------------------------------------------------------------------
# One attention call
# --------------------------------------------------------------------------------------------------------------


def _check_keywords(module: nn.Module, kwargs: Mapping[str, Any]) -> None:
    """At the call: a keyword with a value that is neither handled nor bookkeeping is refused (`AttentionLens`
    refuses such a model before the forward, from the call site's source)."""
    unknown = [k for k, v in kwargs.items() if v is not None and k not in KNOWN_KEYWORDS and k != "cache"]
    if unknown:
        raise ValueError(
            f"attn_implementation='lens': {type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) passes "
            f"{unknown} to its attention function, which the lens does not know how to make exact; known: "
            f"{sorted(HANDLED_KEYWORDS)} (handled) and {sorted(IGNORED_KEYWORDS)} (no effect on the weights)"
        )


def _is_causal(module: nn.Module, query: torch.Tensor, attention_mask, is_causal: bool | None) -> bool:
    """The causal flag exactly as transformers' sdpa wrapper resolves it (a None mask means causal-only)."""
    flag = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return bool(query.shape[2] > 1 and attention_mask is None and flag)


_SINK_WEIGHTS_SUM_TO_ONE: dict[type, bool] = {}


def sink_weights_sum_to_one(module: nn.Module) -> bool:
    """Which weights a sink model reports: gpt-oss's eager drops the sink's column after the softmax (rows sum to
    1 − the sink's share), Granite's scales the output by sigmoid(lse − sink) and reports the plain softmax (rows
    sum to 1). The outputs are the same; the lens reports what the model's own eager function does, read once per
    class from that function's source."""
    cls = type(module)
    if cls not in _SINK_WEIGHTS_SUM_TO_ONE:
        eager = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        try:
            source = inspect.getsource(eager) if eager is not None else ""
        except (OSError, TypeError):
            source = ""
        _SINK_WEIGHTS_SUM_TO_ONE[cls] = "sigmoid" in source
    return _SINK_WEIGHTS_SUM_TO_ONE[cls]


def sink_share(lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """gpt-oss's sinks are one extra logit per head in the softmax's normaliser. With lse over the real keys, the
    real keys keep the share e^lse / (e^lse + e^sink) = exp(lse − logaddexp(lse, sink)) of the mass, (B, H, T): the
    kernel's output and the weights without the sink are scaled by it."""
    sink = sinks.to(lse.dtype).view(1, -1, 1)  # (1, H, 1)
    return (lse - torch.logaddexp(lse, sink)).exp()  # (B, H, T)


def attend(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    request: LayerRequest | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention of one call with what `request` asks: output (B, T, H, D) and weights (B, H, T, S) or None.

    Without a request and without keywords the kernels cannot take (softcap, sinks) it is transformers' own sdpa
    call: the same output, bit for bit, at the same cost."""
    _check_keywords(module, kwargs)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
    if (request is None or not request.needs_scores) and softcap is None and sinks is None:
        passed = {k: v for k, v in kwargs.items() if k in ("position_bias", "is_causal")}
        output, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **passed)
        return intervene(output, None, request)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # (B, H, S, D): weights are per query head
    causal = _is_causal(module, query, attention_mask, kwargs.get("is_causal"))
    knockout = request.knockout if request is not None else None
    mask = additive_mask(query, key, attention_mask, causal, kwargs.get("position_bias"), knockout)
    causal = causal and mask is None  # causal only: no mask tensor, the kernel's flag and `causal_fill`
    reason = "softcap: no fused kernel caps the scores" if softcap is not None else lse_unavailable(query, dropout)
    plain = sinks is not None and sink_weights_sum_to_one(module)  # the weights to report leave the sink out
    if reason is not None:
        if softcap is None:
            _warn_once(reason)
        output, weights, lse = _eager_path(module, query, key, value, mask, causal, scaling, dropout, softcap, sinks)
        weights = renormalise(weights.clone()) if plain else weights
    else:
        output, weights, lse = _kernel_path(query, key, value, mask, causal, scaling, sinks, request, plain)
    output = output.transpose(1, 2)  # (B, T, H, D)
    share = sink_share(lse.float(), sinks) if sinks is not None and not plain and lse is not None else None
    _record(module, request, (query, key, value), lse, weights, (mask, causal), scaling, share)
    heads = request.weight_heads if request is not None else None
    if weights is not None and heads is not None and weights.shape[1] == query.shape[1]:
        weights = weights[:, list(heads)]  # the eager path and norms computed every head
    output, weights = intervene(output, weights, request)
    if request is None or not request.weights:
        weights = None
    return output.contiguous(), (weights.to(query.dtype) if weights is not None else None)


def _eager_path(module, query, key, value, mask, causal, scaling, dropout, softcap, sinks):
    """The textbook math where no kernel applies (softcap, dropout, gradients): output (B, H, T, D) with sdpa's
    zeros for queries that see no key, the weights (B, H, T, S) and no lse."""
    weights = eager_softmax(query, key, mask, scaling, softcap, sinks, causal)  # (B, H, T, S)
    weights = F.dropout(weights, p=dropout, training=module.training)
    dead = dead_rows(mask)  # sdpa's output for a query that sees no key is 0, eager's the mean of V
    probs = weights if dead is None else weights.masked_fill(dead.unsqueeze(-1), 0.0)
    return torch.matmul(probs.to(value.dtype), value), weights, None  # (B, H, T, D)


def _kernel_path(query, key, value, mask, causal, scaling, sinks, request, plain=False):
    """The fused kernel's output (B, H, T, D) and lse (B, H, T), with the weights (B, H, T, S) (or of the heads
    `request.weight_heads` only) when asked for."""
    output, lse = kernel_with_lse(query, key, value, mask, scaling, causal)  # (B, H, T, D), (B, H, T)
    share = None
    if sinks is not None:
        share = sink_share(lse.float(), sinks)  # (B, H, T)
        output = output * share.unsqueeze(-1).to(output.dtype)  # (B, H, T, D)
    if request is None or not (request.weights or request.norms):
        return output, None, lse
    heads = request.weight_heads
    index = slice(None) if heads is None or request.norms else list(heads)
    head_mask = mask if mask is None or mask.shape[1] == 1 else mask[:, index]  # (B|1, h|1, T, S)
    weights = weights_from_lse(query[:, index], key[:, index], lse[:, index], head_mask, scaling, causal)
    if share is not None and not plain:
        weights = weights * share[:, index].unsqueeze(-1)
        dead = dead_rows(head_mask)  # a query that sees no key gives all its mass to the sink: weights 0
        weights = weights if dead is None else weights.masked_fill(dead.unsqueeze(-1), 0.0)
    return output, weights, lse


_warned_reasons: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned_reasons:
        _warned_reasons.add(reason)
        logger.warning(f"attention lens: exact weights from eager math, not the fused kernel: {reason}")


def _record(module, request, qkv, lse, weights, masking, scaling, share) -> None:
    """Statistics and norms of this call into the request (before interventions: they describe the attention).
    The statistics read the weights where all of them are at hand (eager math: softcap, gradients), else each
    block is recomputed from the kernel's lse (times the sink `share` (B, H, T) where the weights leave it out)."""
    if request is None:
        return
    query, key, value = qkv
    if request.stats is not None:
        if weights is not None and weights.shape[1] == query.shape[1]:
            block_probs = lambda rows: (weights[:, :, rows].float(), None)  # noqa: E731
        else:
            block_probs = _lse_blocks(query, key, lse, masking, scaling, share)
        shape = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        cross = bool(getattr(module, "is_cross_attention", False))
        accumulate_stats(request.stats, block_probs, shape, masking, cross, query.device)
    if request.norms and weights is not None and request.site is not None:
        norms = head_value_norms(value, request.projection, query.shape[1])  # (B, H, S)
        request.site.lens.norms[request.site.index] = (weights * norms[:, :, None, :]).to(query.dtype)  # (B,H,T,S)


def _lse_blocks(query, key, lse, masking, scaling, share) -> Callable[[slice], tuple]:
    """P of one block of queries from the kernel's lse, and its entropy: (B, H, b, S') with S' the keys the block
    can see (causal only: up to its last query, half the work over a sequence), entropy (B, H, b) as
    −Σ p (s − lse) + log r (r the row sum the renormalisation divides by): no logarithm per weight."""
    mask, causal = masking

    def block(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        seen = min(key.shape[2], rows.stop) if causal else key.shape[2]
        block_mask = None if mask is None else mask[:, :, rows]
        z = scores_minus_lse(
            query[:, :, rows], key[:, :, :seen], lse[:, :, rows], block_mask, scaling, causal, rows.start
        )
        p = z.exp()  # (B, H, b, S')
        total = p.sum(-1, keepdim=True).clamp_(min=torch.finfo(p.dtype).tiny)  # (B, H, b, 1)
        p.div_(total)
        # -inf where p = 0 (0 · -inf is NaN): causal only, they lie in the corner from the block's first query on.
        (z[..., rows.start :] if causal else z).clamp_(min=torch.finfo(z.dtype).min)
        entropy = total.log().squeeze(-1) - z.mul_(p).sum(-1)  # (B, H, b): z is not needed after this
        p = uniform_dead_rows(p, block_mask)
        if share is not None:  # the reported weights keep the sink's share out: their entropy is computed as is
            return p * share[:, :, rows].unsqueeze(-1), None
        return p, entropy

    return block


def intervene(
    output: torch.Tensor, weights: torch.Tensor | None, request: LayerRequest | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Head interventions on the output (B, T, H, D): zeroing a head here equals zeroing its slice of W_O's input,
    since the heads are concatenated and projected right after. A scaled head's weights (B, H, T, S) are scaled
    alike (output = weights @ V), as a head mask reads; a mean-ablated head keeps its weights."""
    if request is None:
        return output, weights
    if request.mean_heads:
        heads = list(request.mean_heads)
        output = output.clone()
        output[:, :, heads] = output[:, :, heads].mean((0, 1), keepdim=True)  # (1, 1, h, D) broadcast
    if request.head_scale is not None:
        scale = request.head_scale.to(device=output.device, dtype=output.dtype)  # (H,)
        output = output * scale.view(1, 1, -1, 1)  # (B, T, H, D)
        if weights is not None:
            if weights.shape[1] != scale.shape[0]:  # the weights of some heads only
                scale = scale[list(request.weight_heads)]
            weights = weights * scale.to(weights.dtype).view(1, -1, 1, 1)  # (B, H, T, S)
    return output, weights


# --------------------------------------------------------------------------------------------------------------
# The registered function
# --------------------------------------------------------------------------------------------------------------


def _recording_attentions() -> bool:
    """Whether transformers' output capture is collecting attentions in this forward (`output_attentions=True`)."""
    if _active_collector is None:  # another transformers: weights when the call says output_attentions
        return False
    collected = _active_collector.get()
    return bool(collected) and any("attentions" in name for name in collected)


def lens_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    request: LayerRequest | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The function registered as "lens": sdpa's output, plus what an attached `AttentionLens` asks of this layer
    and exact weights whenever transformers records attentions (`output_attentions=True`)."""
    site: LensSite | None = getattr(module, "_lens_site", None)
    # A model that passes its own request (ours: `output_attentions` per layer through `attention_layers`) decides
    # about weights; any other model gets them whenever transformers records attentions.
    if request is None and (kwargs.get("output_attentions") or _recording_attentions()):
        request = LayerRequest(weights=True)
    request = _merged(site.request if site is not None else None, request)
    output, weights = attend(module, query, key, value, attention_mask, scaling, dropout, request, **kwargs)
    if site is not None and site.request.weights and weights is not None:
        site.lens.weights[site.index] = weights
    return output, weights


def _merged(first: LayerRequest | None, second: LayerRequest | None) -> LayerRequest | None:
    """One request asking what either asks (the lens's plan for a layer, and a model's own head mask or weights):
    weights if either wants them, head scales multiplied, the first's statistics, knock-out and norms."""
    if first is None or second is None:
        return first if second is None else second
    merged = LayerRequest(**{name: getattr(first, name) for name in first.__dataclass_fields__})
    merged.weights = first.weights or second.weights
    if second.weights and second.weight_heads is None:
        merged.weight_heads = None  # transformers' recording wants every head
    merged.mean_heads = tuple(sorted(set(first.mean_heads) | set(second.mean_heads)))
    scales = [r.head_scale for r in (first, second) if r.head_scale is not None]
    if len(scales) == 2:
        merged.head_scale = scales[0].to(scales[1].device) * scales[1]
    elif scales:
        merged.head_scale = scales[0]
    return merged


_SDPA_READY: dict[type, bool] = {}


def _model_runs_sdpa(config: Any) -> bool:
    """Whether the model of this config class supports sdpa (`_supports_sdpa`), looked up once per class through
    transformers' Auto mapping; False when it cannot be told."""
    cls = type(config)
    if cls not in _SDPA_READY:
        _SDPA_READY[cls] = bool(getattr(_model_class(config), "_supports_sdpa", False))
    return _SDPA_READY[cls]


def _model_class(config: Any) -> type | None:
    """The base model class of a config: transformers' Auto mapping by config class, then by `model_type` (text
    sub-configs of multimodal models are not always keys of the mapping)."""
    try:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_MAPPING, MODEL_MAPPING_NAMES
    except ImportError:  # pragma: no cover
        return None
    try:
        return MODEL_MAPPING[type(config)]
    except (KeyError, ValueError):
        name = MODEL_MAPPING_NAMES.get(getattr(config, "model_type", None))
        name = name[0] if isinstance(name, tuple | list) else name
        return getattr(transformers, name, None) if isinstance(name, str) else None


def lens_mask(*args, config: Any = None, allow_is_causal_skip: bool = True, **kwargs):
    """sdpa's boolean mask (a purely causal one may be skipped: None, and `module.is_causal` says causal, as sdpa
    reads it) for models that support sdpa; the eager additive mask for the others, which only ever ran eager: some
    of their decoders do not set `is_causal` (PegasusX's attended both ways under a skipped mask), and some add
    biases to the mask in its own dtype (DeepSeek-V4's compressor bias, inverted in a boolean mask)."""
    if not _model_runs_sdpa(config):
        return eager_mask(*args, config=config, **kwargs)
    return sdpa_mask(*args, config=config, allow_is_causal_skip=allow_is_causal_skip, **kwargs)


def register() -> None:
    """Register "lens" with transformers' attention and mask interfaces (sdpa's boolean masks)."""
    AttentionInterface.register(LENS, lens_attention_forward)
    AttentionMaskInterface.register(LENS, lens_mask)


register()


# --------------------------------------------------------------------------------------------------------------
# Finding the attention modules and what their calls pass
# --------------------------------------------------------------------------------------------------------------


def _forward_source(cls: type) -> str | None:
    """The source of the class's forward (inherited or not) and of its own methods (ours calls the interface from a
    helper method), dedented; None where the source cannot be read."""
    parts = []
    for obj in (cls.forward, cls):
        try:
            parts.append(textwrap.dedent(inspect.getsource(obj)))
        except (OSError, TypeError):
            continue
    return "\n".join(parts) if parts else None


@functools.cache
def interface_keywords(cls: type) -> frozenset[str] | None:
    """The keywords a module class passes to its attention function (read from its forward's source), or None
    when its forward does not call through transformers' attention interface."""
    source = _forward_source(cls)
    if source is None or "ALL_ATTENTION_FUNCTIONS" not in source:
        return None
    tree = ast.parse(source)
    names = {"attention_interface"}
    for node in ast.walk(tree):  # names bound to ALL_ATTENTION_FUNCTIONS[...] / .get_interface(...)
        if isinstance(node, ast.Assign | ast.AnnAssign) and "ALL_ATTENTION_FUNCTIONS" in ast.unparse(node.value):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    keywords: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names:
            keywords |= {k.arg for k in node.keywords if k.arg is not None}
    return frozenset(keywords)  # cached per class: building a lens reads each class's source once


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module | None]]:
    """(name, module, parent) of every module whose forward calls the attention interface, in model order."""
    found, parents = [], {}
    for name, module in model.named_modules():
        for child in module.children():
            parents.setdefault(id(child), module)
        if interface_keywords(type(module)) is not None:
            found.append((name, module, parents.get(id(module))))
    return found


def bypassing_modules(model: nn.Module) -> list[tuple[str, str]]:
    """(name, class) of modules that compute an attention softmax themselves instead of calling the interface
    (a class named *Attention* whose forward calls softmax and never ALL_ATTENTION_FUNCTIONS): under "lens" they
    would read sdpa's boolean mask as an additive one, as GIT's text attention does."""
    return [(name, type(module).__name__) for name, module in model.named_modules() if _bypasses(type(module))]


@functools.cache
def _bypasses(cls: type) -> bool:
    if "Attention" not in cls.__name__ or interface_keywords(cls) is not None:
        return False
    return "softmax" in (_forward_source(cls) or "")


def unsupported_keywords(cls: type) -> set[str]:
    keywords = interface_keywords(cls) or set()
    return keywords - KNOWN_KEYWORDS - OWN_PARAMETERS - {"cache"}


# --------------------------------------------------------------------------------------------------------------
# The Python API
# --------------------------------------------------------------------------------------------------------------

Selection = Iterable[int] | str | None  # layer indices, "all" or None


class AttentionLens:
    """Attach the lens to a model: choose layers, heads, interventions and statistics; read the results.

    Layers are the model's attention modules in order (`lens.layer_names`: self-attention and cross-attention of
    an encoder-decoder each count), by index (negative allowed) or "all"; `weights` may also be {layer: heads}, which
    computes the weights of those heads only (the kernel still runs every head). Example on SmolLM2:

        >>> with AttentionLens(model, weights=[3], ablate={5: [0, 2]}, statistics="all") as lens:
        ...     out = model(**batch)
        >>> lens.weights[3].shape          # (B, H, T, S), exact, from the kernel's log-sum-exp
        >>> lens.statistics()[10]["first_token_mass"]   # (B, H) mean over queries

    `ablate` {layer: heads} zeroes heads (`ablate_with="mean"`: their mean output over the batch and queries);
    `scale` {layer: {head: factor}}; `keep` {layer: heads} zeroes every other head; `knockout` {layer: bool tensor
    (B|1, H|1, T, S)} removes query→key edges before the softmax; `norms` lists layers for ‖α f(x)‖
    (`output_projection` names W_O where it is not one of OUTPUT_PROJECTIONS). Head interventions act on W_O's
    input split into heads (see `_route_interventions`); the weights the lens returns are the attention pattern
    itself, before any intervention. Every argument is checked when the
    lens is built, before any forward; entering switches the model to "lens" and leaving (also on an exception)
    restores its previous attention implementation and removes every trace of the lens."""

    def __init__(
        self,
        model: nn.Module,
        *,
        weights: Selection | Mapping[int, Sequence[int]] = None,
        ablate: Mapping[int, Sequence[int]] | None = None,
        ablate_with: str = "zero",
        scale: Mapping[int, Mapping[int, float]] | None = None,
        keep: Mapping[int, Sequence[int]] | None = None,
        knockout: Mapping[int, torch.Tensor] | None = None,
        statistics: Selection = None,
        special_mask: torch.Tensor | Mapping[int, torch.Tensor] | None = None,
        query_mask: Mapping[int, torch.Tensor] | None = None,
        block_size: int = 256,
        norms: Selection = None,
        output_projection: str | None = None,
    ) -> None:
        self.model = model
        self.weights: dict[int, torch.Tensor] = {}
        self.norms: dict[int, torch.Tensor] = {}
        self._stats: dict[int, StreamingStats] = {}
        self._previous: str | None = None
        self._outer_sites: list[LensSite | None] = []
        found = attention_modules(model)
        if not found:
            raise ValueError(
                f"{type(model).__name__}: no attention module calls transformers' attention interface "
                "(ALL_ATTENTION_FUNCTIONS), so attn_implementation='lens' cannot reach it"
            )
        bypassing = bypassing_modules(model)
        if bypassing:
            raise ValueError(
                f"{type(model).__name__}: {len(bypassing)} attention module(s) compute their softmax outside "
                f"transformers' attention interface (first: {bypassing[0][0]!r}, {bypassing[0][1]}); the lens cannot "
                "see them, and under attn_implementation='lens' they would get a mask in sdpa's form"
            )
        self.layer_names = [name for name, _, _ in found]
        if ablate_with not in HEAD_ABLATIONS:
            raise ValueError(f"ablate_with={ablate_with!r}: allowed {HEAD_ABLATIONS}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size={block_size!r}: must be a positive integer")
        self._refuse_unsupported(found)
        self._sites = [self._site(i, name, module) for i, (name, module, _) in enumerate(found)]
        self._plan(found, weights, ablate, ablate_with, scale, keep, knockout, statistics, norms, output_projection)
        self._plan_stats(statistics, special_mask, query_mask, block_size)
        self._route_interventions(found, output_projection)

    # -- validation -------------------------------------------------------------------------------------------

    def _refuse_unsupported(self, found) -> None:
        for name, module, _ in found:
            bad = unsupported_keywords(type(module))
            if bad:
                raise ValueError(
                    f"{type(self.model).__name__}: attention module {name!r} ({type(module).__name__}) passes "
                    f"{sorted(bad)} to its attention function; the lens cannot make that exact, so it refuses "
                    f"the model (handled keywords: {sorted(HANDLED_KEYWORDS)})"
                )

    def _site(self, index: int, name: str, module: nn.Module) -> LensSite:
        heads = _num_heads(module)
        return LensSite(index, name, module, heads, LayerRequest(), self)

    def _layer(self, layer: Any, argument: str) -> int:
        count = len(self._sites)
        if isinstance(layer, bool) or not isinstance(layer, int) or not -count <= layer < count:
            raise ValueError(
                f"{argument}: layer {layer!r} is not an attention layer of {type(self.model).__name__}; allowed "
                f"0..{count - 1} (or negative), {count} attention modules: {self.layer_names[:4]}..."
            )
        return layer % count

    def _layers(self, selection: Selection, argument: str) -> list[int]:
        if selection is None:
            return []
        if selection == "all":
            return list(range(len(self._sites)))
        if isinstance(selection, str | torch.Tensor) or not isinstance(selection, Iterable):
            raise ValueError(f"{argument}={selection!r}: allowed 'all', None or a list of layer indices")
        return sorted({self._layer(i, argument) for i in selection})

    def _heads(self, layer: int, heads: Any, argument: str) -> list[int]:
        count = self._sites[layer].num_heads
        if isinstance(heads, str | torch.Tensor) or not isinstance(heads, Iterable):
            raise ValueError(f"{argument}[{layer}]={heads!r}: allowed a list of head indices 0..{count - 1}")
        heads = list(heads)
        bad = [h for h in heads if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < count]
        if bad:
            raise ValueError(
                f"{argument}: heads {bad} of layer {layer} ({self.layer_names[layer]}) do not exist; "
                f"{type(self.model).__name__} has {count} heads there, allowed 0..{count - 1}"
            )
        return heads

    @staticmethod
    def _mapping(value: Any, argument: str, what: str) -> Mapping:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ValueError(f"{argument}={value!r}: allowed a dict {{layer: {what}}} or None")
        return value

    # -- the plan ---------------------------------------------------------------------------------------------

    def _plan(self, found, weights, ablate, ablate_with, scale, keep, knockout, statistics, norms, projection):
        if projection is not None and not isinstance(projection, str):
            raise ValueError(f"output_projection={projection!r}: allowed the attribute name of W_O, or None")
        if isinstance(weights, Mapping):  # {layer: heads}: the weights of those heads only
            for layer, heads in weights.items():
                layer = self._layer(layer, "weights")
                self._request(layer).weights = True
                self._request(layer).weight_heads = tuple(self._heads(layer, heads, "weights"))
            weights = None
        for layer in self._layers(weights, "weights"):
            self._sites[layer].request.weights = True
        self._plan_heads(ablate, ablate_with, scale, keep)
        for layer, edges in self._mapping(knockout, "knockout", "bool tensor (B|1, H|1, T, S)").items():
            layer = self._layer(layer, "knockout")
            heads = self._sites[layer].num_heads
            if not isinstance(edges, torch.Tensor) or edges.dtype != torch.bool or edges.dim() != 4:
                raise ValueError(f"knockout[{layer}] must be a bool tensor (B|1, H|1, T, S), got {_describe(edges)}")
            if edges.shape[1] not in (1, heads):
                raise ValueError(f"knockout[{layer}] has {edges.shape[1]} heads; layer {layer} has {heads} (or use 1)")
            self._request(layer).knockout = edges
        for layer in self._layers(norms, "norms"):
            _, module, parent = found[layer]
            self._request(layer).norms = True
            self._request(layer).projection = find_output_projection(module, parent, projection)

    def _plan_heads(self, ablate, ablate_with, scale, keep) -> None:
        for layer, heads in self._mapping(ablate, "ablate", "heads").items():
            layer = self._layer(layer, "ablate")
            heads = self._heads(layer, heads, "ablate")
            if ablate_with == "mean":
                self._request(layer).mean_heads = tuple(sorted(set(self._request(layer).mean_heads) | set(heads)))
            else:
                self._scale(layer)[heads] = 0.0
        for layer, factors in self._mapping(scale, "scale", "{head: factor}").items():
            layer = self._layer(layer, "scale")
            factors = self._mapping(factors, f"scale[{layer}]", "factor")
            for head in self._heads(layer, factors, "scale"):
                factor = factors[head]
                if isinstance(factor, bool) or not isinstance(factor, int | float) or not math.isfinite(factor):
                    raise ValueError(f"scale: factor {factor!r} of head {head}, layer {layer}: allowed finite numbers")
                self._scale(layer)[head] *= float(factor)
        for layer, heads in self._mapping(keep, "keep", "heads").items():
            layer = self._layer(layer, "keep")
            kept = self._heads(layer, heads, "keep")
            dropped = [h for h in range(self._sites[layer].num_heads) if h not in kept]
            self._scale(layer)[dropped] = 0.0

    def _plan_stats(self, statistics, special_mask, query_mask, block_size) -> None:
        queries = self._mapping(query_mask, "query_mask", "bool tensor (B, T)")
        for layer in self._layers(statistics, "statistics"):
            special = special_mask.get(layer) if isinstance(special_mask, Mapping) else special_mask
            for argument, value in (("special_mask", special), ("query_mask", queries.get(layer))):
                if value is not None and (not isinstance(value, torch.Tensor) or value.dim() != 2):
                    raise ValueError(f"{argument} of layer {layer}: allowed a (B, T|S) tensor; got {_describe(value)}")
            cross = True if _looks_cross(self.layer_names[layer]) else None
            stats = StreamingStats(block_size, special, queries.get(layer), cross)
            self._stats[layer] = self._request(layer).stats = stats

    def _route_interventions(self, found, projection_name: str | None) -> None:
        """Head interventions act on the input of the output projection W_O, split into heads: a head's
        contribution to the residual stream, whatever the module does between the attention function and W_O (a
        sub-norm over all heads in BitNet, the two maps of differential attention). Where no W_O of H·D inputs is
        found they act on the attention function's output, which is the same thing for every module that
        concatenates the heads straight into W_O."""
        for site, (_, module, parent) in zip(self._sites, found, strict=True):
            request = site.request
            if request.head_scale is None and not request.mean_heads:
                continue
            try:
                projection = find_output_projection(module, parent, projection_name)
            except ValueError:
                continue
            if _input_width(projection) % site.num_heads:
                continue
            site.intervention = LayerRequest(head_scale=request.head_scale, mean_heads=request.mean_heads)
            site.projection = projection
            request.head_scale, request.mean_heads = None, ()

    def _request(self, layer: int) -> LayerRequest:
        return self._sites[layer].request

    def _scale(self, layer: int) -> torch.Tensor:
        request = self._request(layer)
        if request.head_scale is None:
            request.head_scale = torch.ones(self._sites[layer].num_heads)
        return request.head_scale

    # -- attaching ----------------------------------------------------------------------------------------------

    def __enter__(self) -> AttentionLens:
        self._previous = _implementation(self.model)
        self._outer_sites = [getattr(site.module, "_lens_site", None) for site in self._sites]
        for site in self._sites:
            site.request.site = site
            site.module._lens_site = site
            if site.intervention is not None:
                site.hook = site.projection.register_forward_pre_hook(_heads_hook(site.intervention, site.num_heads))
        _set_implementation(self.model, LENS)
        return self

    def __exit__(self, *exc) -> None:
        for site, outer in zip(self._sites, self._outer_sites, strict=True):
            if getattr(site.module, "_lens_site", None) is site:
                del site.module._lens_site
                if outer is not None:  # a lens entered around this one gets its layers back
                    site.module._lens_site = outer
            if site.hook is not None:
                site.hook.remove()
                site.hook = None
        if self._previous is not None:
            _set_implementation(self.model, self._previous)

    def statistics(self) -> dict[int, dict[str, torch.Tensor]]:
        """Per layer: (B, H) means over valid queries of entropy, distance, first_token_mass (and special_mass),
        and `received` (B, H, S), summed over every forward run inside the lens."""
        return {layer: stats.means() for layer, stats in self._stats.items() if stats.count is not None}

    def reset(self) -> None:
        """Forget the results (weights, norms, statistics) of earlier forwards."""
        self.weights.clear()
        self.norms.clear()
        for stats in self._stats.values():
            stats.sums.clear()
            stats.count = None


CROSS_ATTENTION_NAMES = ("cross", "encoder_attn", "encdecattention")


def _looks_cross(name: str) -> bool:
    """Whether a module path names a cross-attention (BART/Whisper `encoder_attn`, T5 `EncDecAttention`, ours
    `cross_attn`): transformers' modules carry no common flag for it."""
    return any(part in name.lower() for part in CROSS_ATTENTION_NAMES)


def _input_width(projection: nn.Module) -> int:
    """In features of W_O: nn.Linear's weight is (out, in), GPT-2's Conv1D's (in, out)."""
    weight = projection.weight
    return weight.shape[0] if type(projection).__name__ == "Conv1D" else weight.shape[-1]


def _heads_hook(intervention: LayerRequest, heads: int):
    """A forward pre-hook on W_O applying `intervention` to its input (..., H·D) seen as (..., H, D)."""

    def hook(module: nn.Module, args: tuple):
        concatenated = args[0]  # (B, T, H·D)
        split = concatenated.view(*concatenated.shape[:-1], heads, -1)  # (B, T, H, D)
        changed, _ = intervene(split, None, intervention)
        return (changed.reshape(concatenated.shape), *args[1:])

    return hook


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return repr(value)


def _num_heads(module: nn.Module) -> int:
    for name in ("num_heads", "num_attention_heads", "n_heads", "n_head", "heads"):
        value = getattr(module, name, None)
        if isinstance(value, int):
            return value
    config = getattr(module, "config", None)
    for name in ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(
        f"{type(module).__name__}: the lens cannot tell its number of heads (no num_heads attribute, none in its "
        "config), so it refuses the model"
    )


def _implementation(model: nn.Module) -> str:
    return getattr(model.config, "_attn_implementation", None) or "eager"


def _set_implementation(model: nn.Module, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


__all__ = [
    "LENS",
    "AttentionLens",
    "LayerRequest",
    "StreamingStats",
    "attend",
    "attention_modules",
    "find_output_projection",
    "head_value_norms",
    "intervene",
    "lens_attention_forward",
    "weights_from_lse",
]
