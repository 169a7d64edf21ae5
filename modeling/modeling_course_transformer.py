"""The course Transformer (Vaswani et al. 2017, "Attention Is All You Need") as a Hugging Face model family.

One attention module serves self-attention (encoder), masked self-attention (decoder) and cross-attention
(decoder over encoder states). Its eager path is the course math in one short function
(`eager_attention_forward`); the fast kernels (sdpa, flash, flex) plug in through transformers' attention
interface, and a layer whose weights or head mask are requested goes through the attention lens
(`attention_lens.py`, which serves any transformers model the same way): the fused kernel's output and the exact
softmax weights from its log-sum-exp, under every backend.

What transformers 5 provides is used as it is: masks from `masking_utils` (padding, causal, packed sequences
through restarting `position_ids`, custom 4D masks, static caches, flex block masks), hidden states and attentions
recorded by `capture_outputs` hooks, tuple outputs by `can_return_tuple`, losses by `self.loss_function` (which
honours `shift_labels` and Trainer's `num_items_in_batch`). What the course model adds on top: exact weights from
chosen layers (`attention_layers`) under fast backends, head ablation (`head_mask`, `cross_attn_head_mask`), ALiBi
as a per-head bias, and input checks that name the argument, the value and what is allowed.

The file reads top to bottom in dependency order: positions -> input checks -> attention -> feed-forward -> layer
-> embeddings -> stack -> pretrained base -> heads.

Notation used in shape comments:
    B batch, T query length, S key length (cached + current; a static cache's full length), P cached length,
    H heads, D head dim, C hidden size (d_model), F feed-forward size, V vocabulary size, L layers.
"""

import copy
import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPastAndCrossAttentions,
    BaseModelOutputWithPoolingAndCrossAttentions,
    CausalLMOutputWithCrossAttentions,
    MaskedLMOutput,
    Seq2SeqLMOutput,
    Seq2SeqModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .attention_lens import LENS, LayerRequest, intervene, lens_attention_forward
from .configuration_course_transformer import CourseTransformerConfig

logger = logging.get_logger(__name__)

# --------------------------------------------------------------------------------------------------------------
# Positional encodings
# --------------------------------------------------------------------------------------------------------------


def sinusoidal_table(num_positions: int, dim: int) -> torch.Tensor:
    """PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d)) (Vaswani et al. 2017, 3.5)."""
    position = torch.arange(num_positions, dtype=torch.float32)[:, None]  # (N, 1)
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))  # (C/2,)
    table = torch.zeros(num_positions, dim)  # (N, C)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table


def rope_inverse_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """theta^(-2i/D) for i < D/2: one rotation speed per pair of channels (Su et al. 2021)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # (D/2,)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    angles = position_ids[..., None].float() * inv_freq  # (B, T, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (B, T, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)  # 2 x (..., D/2)
    return torch.cat((-second, first), dim=-1)  # (..., D)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair of x (B, H, T, D) by its position's angle; q·k then depends on distance only."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]  # (B, H, T, D)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Per-head slopes of ALiBi (Press et al. 2022): a geometric sequence 2^(-8/n), 2^(-16/n), ... for n heads,
    with the paper's interleaving when n is not a power of two."""

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two_slopes(closest)
    if closest < num_heads:
        slopes += power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)  # (H,)


# --------------------------------------------------------------------------------------------------------------
# Input checks: clear errors before any work, and nothing on the hot path
# --------------------------------------------------------------------------------------------------------------
# Shape, type and argument checks read host metadata only: they are free and trace without graph breaks, so they
# always run. Checks of tensor *values* (ids in range, a 0/1 mask, labels) must read the device, which is a
# synchronisation on an accelerator and a graph break under torch.compile. They therefore run only in eager mode
# and only on forwards without cached tokens (training, evaluation, the prefill of generation), all values of a
# call in one host read. A decoding step feeds back a token the model produced itself, so it pays nothing.

INTEGER_DTYPES = (torch.long, torch.int, torch.int16, torch.int8, torch.uint8)
IGNORE_INDEX = -100


def _format(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


class _ValueChecks:
    """Collects value checks and runs them with one device-to-host read."""

    def __init__(self) -> None:
        self.scalars: list[torch.Tensor] = []
        self.reports: list[Callable[[list[float]], None]] = []

    def id_range(self, name: str, ids: torch.Tensor | None, limit: int, field: str, ignore: int | None = None):
        """`ids` in [0, limit); `ignore` (the loss's ignore index) is allowed too."""
        if ids is None or ids.numel() == 0:
            return
        if ignore is not None:
            ids = ids.masked_fill(ids == ignore, 0)
        allowed = f"[0, {limit}) allowed by config.{field}={limit}"
        if ignore is not None:
            allowed = f"{ignore} (ignored) or {allowed}"

        def report(values: list[float]) -> None:
            low, high = values
            if low < 0 or high >= limit:
                raise ValueError(f"{name} contains {_format(low if low < 0 else high)}, outside {allowed}")

        self._add([ids.min(), ids.max()], report)

    def zero_one(self, name: str, mask: torch.Tensor | None) -> None:
        if mask is None or mask.dtype == torch.bool or mask.numel() == 0:
            return
        bad = ((mask != 0) & (mask != 1)).flatten()  # (N,)
        first_bad = mask.flatten()[bad.int().argmax()]

        def report(values: list[float]) -> None:
            if values[0]:
                raise ValueError(
                    f"{name} contains {_format(values[1])}; allowed values are 1 (attend) and 0 (padding). For an "
                    "additive bias or a custom pattern, pass a 4D mask of shape (batch, 1, query length, key length)"
                )

        self._add([bad.any(), first_bad], report)

    def _add(self, scalars: list[torch.Tensor], report: Callable[[list[float]], None]) -> None:
        self.scalars.extend(scalars)
        self.reports.append(report)

    def run(self) -> None:
        if not self.scalars:
            return
        values = torch.stack([s.float() for s in self.scalars]).tolist()  # the one host read
        offset = 0
        for report in self.reports:
            count = 2  # every check contributes two scalars
            report(values[offset : offset + count])
            offset += count


def _checking_values() -> bool:
    return not torch.compiler.is_compiling()


def _check_token_input(name: str, ids: torch.Tensor | None, embeds: torch.Tensor | None, hidden: int) -> None:
    if (ids is None) == (embeds is None):
        raise ValueError(f"pass exactly one of {name} and inputs_embeds")
    if ids is not None:
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of token ids of shape (batch, length), got {type(ids)}")
        if ids.dtype not in INTEGER_DTYPES:
            raise TypeError(f"{name} must be an integer tensor (torch.long), got dtype {ids.dtype}")
        if ids.dim() != 2:
            raise ValueError(f"{name} must have shape (batch, length), got {tuple(ids.shape)}")
    elif not isinstance(embeds, torch.Tensor) or embeds.dim() != 3 or embeds.shape[-1] != hidden:
        shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds)
        raise ValueError(f"inputs_embeds must have shape (batch, length, config.hidden_size={hidden}), got {shape}")
    shape = tuple((ids if ids is not None else embeds).shape)
    if shape[0] == 0 or shape[1] == 0:
        source = name if ids is not None else "inputs_embeds"
        raise ValueError(f"{source} has shape {shape}: at least one sequence of at least one token is needed")


def _check_attention_mask(mask: torch.Tensor | None, batch: int, length: int, past_length) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        if type(mask).__name__ == "BlockMask":  # a prepared flex mask, passed through as a custom mask
            return
        raise TypeError(f"attention_mask must be a torch.Tensor of shape (batch, length), got {type(mask)}")
    if mask.dim() == 4:  # a custom mask, (B, 1, T, S): boolean (True = attend) or additive
        if mask.shape[0] not in (1, batch) or mask.shape[2] != length:
            raise ValueError(
                f"a 4D attention_mask must have shape (batch or 1, 1, query length, key length) = "
                f"({batch} or 1, 1, {length}, S), got {tuple(mask.shape)}"
            )
        return
    known = isinstance(past_length, int)  # a static cache keeps its length on the device: no free comparison
    if mask.dim() != 2 or mask.shape[0] != batch or (known and mask.shape[1] != past_length + length):
        expected = (batch, past_length + length) if known else (batch, "cached + new length")
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)}, expected (batch, cached + new length) = {expected} "
            "or a 4D mask (batch, 1, query length, key length)"
        )


def _check_positions(config, position_ids: torch.Tensor | None, batch: int, length: int, past_length) -> None:
    absolute = config.position_encoding in ("learned", "sinusoidal")
    if position_ids is None:
        # Default positions continue from the cache; only a known length can be checked for free.
        if absolute and isinstance(past_length, int) and past_length + length > config.max_position_embeddings:
            raise ValueError(
                f"sequence of {past_length + length} positions (cached {past_length} + new {length}) exceeds "
                f"config.max_position_embeddings={config.max_position_embeddings} allowed by "
                f"position_encoding='{config.position_encoding}'"
            )
        return
    if position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != length:
        raise ValueError(
            f"position_ids must have shape (batch or 1, length) = ({batch} or 1, {length}), "
            f"got {tuple(position_ids.shape)}"
        )


def _check_head_mask(name: str, mask: torch.Tensor | None, num_layers: int, num_heads: int):
    """(H,) or (L, H) -> (L, H); the error reports the shape that was given."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) not in ((num_heads,), (num_layers, num_heads)):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask)
        raise ValueError(f"{name} has shape {shape}, expected ({num_heads},) or ({num_layers}, {num_heads})")
    return mask.expand(num_layers, -1) if mask.dim() == 1 else mask  # (L, H)


def _check_attention_layers(attention_layers: Sequence[int] | None, num_layers: int, stack: str) -> None:
    if attention_layers is None:
        return
    if isinstance(attention_layers, (str, bytes)) or not isinstance(attention_layers, Sequence):
        raise ValueError(
            f"attention_layers must be a list of layer indices (the {stack} has {num_layers} layers), "
            f"got {attention_layers!r}"
        )
    for index in attention_layers:
        if isinstance(index, bool) or not isinstance(index, int) or not -num_layers <= index < num_layers:
            raise ValueError(
                f"attention_layers contains {index!r}; the {stack} has {num_layers} layers, so allowed indices "
                f"are {-num_layers} .. {num_layers - 1}"
            )


def _check_cache(past_key_values, has_cross_attention: bool) -> None:
    if past_key_values is None or isinstance(past_key_values, Cache):
        return
    kinds = "EncoderDecoderCache (or another Cache)" if has_cross_attention else "a transformers Cache"
    raise TypeError(
        f"past_key_values must be {kinds}, e.g. DynamicCache or StaticCache from transformers.cache_utils, "
        f"got {type(past_key_values).__name__}"
    )


def _check_encoder_states(states: torch.Tensor | None, batch: int, hidden: int, source: str) -> None:
    if states is None:
        raise ValueError("the decoder of an encoder-decoder needs encoder_hidden_states")
    if not isinstance(states, torch.Tensor) or states.dim() != 3 or states.shape[-1] != hidden:
        shape = tuple(states.shape) if isinstance(states, torch.Tensor) else type(states)
        raise ValueError(f"{source} must have shape (batch, source length, config.hidden_size={hidden}), got {shape}")
    if states.shape[0] != batch:
        raise ValueError(f"{source} has batch {states.shape[0]}, but the decoder inputs have batch {batch}")


def _check_token_labels(labels: torch.Tensor | None, inputs: torch.Tensor | None, limit: int, field: str) -> None:
    """Per-token labels line up with the tokens and are ids or -100, checked before the forward: a mismatch
    would otherwise surface as an opaque error after all the work (or, worse, broadcast silently)."""
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.long, torch.int):
        kind = labels.dtype if isinstance(labels, torch.Tensor) else type(labels)
        raise TypeError(f"labels must be an integer tensor (torch.long; -100 = ignored), got {kind}")
    if inputs is not None and tuple(labels.shape) != tuple(inputs.shape[:2]):
        raise ValueError(f"labels has shape {tuple(labels.shape)}, expected the inputs' {tuple(inputs.shape[:2])}")
    if _checking_values():
        checks = _ValueChecks()
        checks.id_range("labels", labels, limit, field, ignore=IGNORE_INDEX)
        checks.run()


# --------------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------------


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q Kᵀ / sqrt(d_k) + bias + mask) V, with Q (B, H, T, D) and K, V (B, H, S, D).

    `attention_mask` is what transformers' masking utilities give: an additive float mask (eager), a boolean one
    (True = attend, sdpa), or None, which means "causal only" for a causal module as sdpa's `is_causal` does
    (query i sees keys 0..i: exact for an uncached or static-cache prefill; a single query sees every key).
    Returns the output in (B, T, H, D) layout, as transformers' kernels do, and the weights (B, H, T, S)."""
    # The scores tensor is fresh, so scaling and masking run in place: fewer (B, H, T, S) allocations, the same
    # operations in the same order as the textbook formula, and autograd is unaffected (matmul's backward needs its
    # inputs, not its output).
    scores = torch.matmul(query, key.transpose(-1, -2)).mul_(scaling)  # (B, H, T, S)
    if position_bias is not None:
        scores = scores + position_bias  # ALiBi, (1|B, H, T, S); out of place: the bias may broadcast the batch
    if attention_mask is None:
        if module.is_causal and query.shape[2] > 1:
            future = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).triu(1)
            scores.masked_fill_(future, torch.finfo(scores.dtype).min)  # (T, S) broadcast
    elif attention_mask.dtype == torch.bool:
        scores.masked_fill_(~attention_mask, torch.finfo(scores.dtype).min)  # (B|1, 1, T, S), True = attend
    else:
        scores.add_(attention_mask)  # additive: 0 or finfo.min, broadcast from (B|1, 1, T, S)
    # Softmax in fp32 so that bf16/fp16 runs return probabilities that sum to 1.
    # At least fp32 for the normalisation (half precision would lose the small weights); fp64 stays fp64.
    softmax_dtype = torch.promote_types(query.dtype, torch.float32)
    weights = F.softmax(scores, dim=-1, dtype=softmax_dtype).to(query.dtype)  # (B, H, T, S)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value)  # (B, H, T, D)
    return output.transpose(1, 2).contiguous(), weights  # (B, T, H, D), (B, H, T, S)


# --------------------------------------------------------------------------------------------------------------
# Fast decoding: linear layers that read their weight in the layout this CPU streams fastest
# --------------------------------------------------------------------------------------------------------------

# Decoding one token at a time multiplies each weight matrix by one vector (a GEMV), so its speed is how fast the
# weights stream from memory, and that depends on the kernel and the layout, differently per CPU: on one 2-core
# EPYC, `F.linear` over nn.Linear's (out, in) layout streamed 10 GB/s, x @ Wᵀ over a contiguous (in, out) copy
# 16 GB/s and oneDNN's packed layout 21 GB/s; on a 2-core Xeon the first two streamed 26-33 GB/s and oneDNN's less.
# So `enable_fast_decoding` times the candidates on the model's own weight shapes and keeps the fastest per shape.
# The decode copy is a cache beside the weight, not a replacement: parameters, state_dict, tying, save/load and
# autograd see plain nn.Linear weights throughout.
_PACK_LINEAR_WEIGHT = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
_PACKED_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
DECODE_LAYOUTS = ("auto", "plain", "transposed", "packed")


def fast_decoding_unavailable(layout: str = "packed") -> str | None:
    """Why this torch cannot give linear weights `layout` (None when it can)."""
    if layout != "packed":
        return None
    if _PACK_LINEAR_WEIGHT is None or _PACKED_LINEAR is None:
        return "this torch has no torch.ops.mkldnn._reorder_linear_weight / _linear_pointwise"
    if not torch.backends.mkldnn.is_available():
        return "this torch was built without oneDNN (torch.backends.mkldnn.is_available() is False)"
    return None


def _decode_copy(weight: torch.Tensor, layout: str) -> torch.Tensor:
    with torch.no_grad():
        if layout == "packed":
            return _PACK_LINEAR_WEIGHT(weight.detach(), 1)  # (out, in) in oneDNN's blocked layout; batch-1 hint
        return weight.detach().t().contiguous()  # (in, out): each output column streams contiguously


class PackedLinear(nn.Linear):
    """An nn.Linear that, outside autograd, multiplies by a decode copy of its fp32 CPU weight: Wᵀ contiguous
    ("transposed", through addmm) or oneDNN's blocked layout ("packed").

    Made from an existing nn.Linear by `pack_linear` (its class is swapped, nothing is copied but the weight's
    decode copy) and turned back by `unpack_linear`. The copy is used only while it provably matches the weight:
    same storage and same version counter (any in-place update, `load_state_dict` or optimizer step bumps it),
    input on the CPU in fp32, and no gradient to track; otherwise the forward is nn.Linear's own."""

    _packed: torch.Tensor
    _packed_key: tuple[int, int]
    _layout: str

    def _packed_matches(self, x: torch.Tensor) -> bool:
        weight = self.weight
        if torch.compiler.is_compiling():
            # data_ptr() does not trace: a compiled graph uses the copy made at enable time (re-enable after
            # changing the weights, as after a `.data` write).
            return x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled()
        if (weight.data_ptr(), weight._version) != self._packed_key or x.dtype != torch.float32:
            return False
        if x.device.type != "cpu":
            return False
        return not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._packed_matches(x):
            return F.linear(x, self.weight, self.bias)
        if self._layout == "packed":
            return _PACKED_LINEAR(x, self._packed, self.bias, "none", [], "")  # (..., in) -> (..., out)
        rows = x.reshape(-1, x.shape[-1])  # (N, in)
        out = torch.mm(rows, self._packed) if self.bias is None else torch.addmm(self.bias, rows, self._packed)
        return out.view(*x.shape[:-1], out.shape[-1])  # (..., out)

    # oneDNN's packed tensor has no storage to pickle: deepcopy and torch.save carry the weight, and the copy makes
    # its own decode copy.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_packed", "_packed_key")}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__class__ = nn.Linear
        pack_linear(self, state["_layout"])


def packable(linear: nn.Module) -> bool:
    """A plain nn.Linear (no subclass with its own forward) with an fp32 CPU weight."""
    weight = getattr(linear, "weight", None)
    return type(linear) in (nn.Linear, PackedLinear) and weight.device.type == "cpu" and weight.dtype == torch.float32


def pack_linear(linear: nn.Linear, layout: str = "packed") -> bool:
    """Give `linear` a decode copy of its weight in `layout` ("transposed" or "packed") and make it a
    PackedLinear; False if it cannot be packed (see `packable`), leaving it unchanged."""
    if not packable(linear):
        return False
    weight = linear.weight
    copy_ = _decode_copy(weight, layout)
    linear.__class__ = PackedLinear
    linear._packed, linear._packed_key, linear._layout = copy_, (weight.data_ptr(), weight._version), layout
    return True


def unpack_linear(linear: nn.Linear) -> None:
    """Undo `pack_linear`: drop the decode copy and make `linear` a plain nn.Linear again."""
    if isinstance(linear, PackedLinear):
        del linear._packed, linear._packed_key, linear._layout
        linear.__class__ = nn.Linear


def _sweep_seconds(fn: Callable[[], None], repeats: int = 3) -> float:
    fn()  # first touch
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def fastest_layout(linears: Sequence[nn.Linear], candidates: Sequence[str]) -> str:
    """The candidate layout whose one-row products over all of `linears` (one weight shape) take the least time,
    timed on the weights themselves (best of 3 sweeps): the choice is this machine's, not a rule."""
    in_features = linears[0].in_features
    x = torch.randn(1, 1, in_features)
    times = {}
    with torch.inference_mode():
        for layout in candidates:
            copies = [m.weight if layout == "plain" else _decode_copy(m.weight, layout) for m in linears]
            if layout == "plain":
                fn = lambda c=copies: [F.linear(x, w) for w in c]  # noqa: E731
            elif layout == "packed":
                fn = lambda c=copies: [_PACKED_LINEAR(x, w, None, "none", [], "") for w in c]  # noqa: E731
            else:
                fn = lambda c=copies: [torch.mm(x[0], w) for w in c]  # noqa: E731
            times[layout] = _sweep_seconds(fn)
    return min(times, key=times.get)


def _sliced_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A copy of `linear` keeping the output features (dim 0) or input features (dim 1) at `index`."""
    weight = linear.weight.index_select(dim, index).clone()  # (out', in) or (out, in')
    bias = linear.bias
    if bias is not None and dim == 0:
        bias = bias.index_select(0, index)
    # Built on the meta device (no initialisation of weights about to be replaced), then given the kept slices.
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    new.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.clone(), requires_grad=linear.bias.requires_grad)
    return new


def _no_heads_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, *args, **kwargs):
    """The attention of a module whose heads are all pruned: no output, no weights (B, T, 0, D), (B, 0, T, S)."""
    batch, _, length, dim = query.shape  # (B, 0, T, D)
    return query.new_zeros(batch, length, 0, dim), query.new_zeros(batch, 0, length, key.shape[2])


class CourseTransformerAttention(nn.Module):
    """Multi-head attention: self (encoder), masked self (decoder, `is_causal`) or cross (`is_cross_attention`).

    Q = X W_Q, K = Y W_K, V = Y W_V with Y = X for self-attention and Y = the encoder output for
    cross-attention; the heads' outputs are concatenated and projected by W_O. Returns (output, weights): the
    weights only when `output_attentions` is set for this layer (transformers' output recording reads index 1)."""

    def __init__(self, config: CourseTransformerConfig, layer_idx: int, is_causal: bool, is_cross_attention: bool):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        # Read by transformers' sdpa wrapper when no mask is given; encoders and cross-attention must say False.
        self.is_causal = is_causal
        self.is_cross_attention = is_cross_attention
        # Heads removed by `prune_heads` (config.pruned_heads) are not built: the projections hold the kept heads
        # only, in their original order. `head_mask` and the returned weights keep the original head indices (a
        # pruned head reads as an ablated one, zero weights), so a mask or a plot means the same after pruning.
        self.pruned_heads: set[int] = set((config.pruned_heads or {}).get(self.module_key, ()))
        self.kept_heads = [h for h in range(config.num_attention_heads) if h not in self.pruned_heads]
        self.num_heads = len(self.kept_heads)
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout_prob
        width, inner, bias = config.hidden_size, self.num_heads * config.head_dim, config.use_bias
        self.q_proj = nn.Linear(width, inner, bias=bias)
        self.k_proj = nn.Linear(width, inner, bias=bias)
        self.v_proj = nn.Linear(width, inner, bias=bias)
        self.o_proj = nn.Linear(inner, width, bias=bias)

    @property
    def module_key(self) -> str:
        """This module's key in `config.pruned_heads`: "encoder.0.self", "decoder.2.self", "decoder.2.cross"."""
        stack = "decoder" if self.is_causal or self.is_cross_attention else "encoder"
        return f"{stack}.{self.layer_idx}.{'cross' if self.is_cross_attention else 'self'}"

    @torch.no_grad()
    def prune(self, heads: Sequence[int]) -> None:
        """Remove `heads` (original indices) from W_Q, W_K, W_V (their output rows) and W_O (its input columns).

        The kept heads' weights are copied unchanged, so the output equals that of masking the removed heads."""
        remove = set(heads) - self.pruned_heads
        if not remove:
            return
        keep = [i for i, h in enumerate(self.kept_heads) if h not in remove]  # positions among the current heads
        rows = torch.tensor(keep, dtype=torch.long)[:, None] * self.head_dim + torch.arange(self.head_dim)  # (K, D)
        rows = rows.flatten().to(self.q_proj.weight.device)  # (H_kept * D,)
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(self, name, _sliced_linear(getattr(self, name), rows, dim=0))
        self.o_proj = _sliced_linear(self.o_proj, rows, dim=1)
        self.pruned_heads |= remove
        self.kept_heads = [h for h in self.kept_heads if h not in remove]
        self.num_heads = len(self.kept_heads)

    def _with_pruned_heads(self, weights: torch.Tensor) -> torch.Tensor:
        """(B, H_kept, T, S) -> (B, H, T, S) with zeros at pruned heads, as head-mask ablation returns them."""
        full = weights.new_zeros(weights.shape[0], self.config.num_attention_heads, *weights.shape[2:])
        full[:, self.kept_heads] = weights
        return full

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, *, D)

    def _keys_values(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None,
        past_key_values: Cache | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Project K and V and go through the cache: appended for self-attention, computed once for cross."""
        cache = past_key_values
        if isinstance(past_key_values, EncoderDecoderCache):
            cache = (
                past_key_values.cross_attention_cache
                if self.is_cross_attention
                else past_key_values.self_attention_cache
            )
        if not self.is_cross_attention:
            key = self._split_heads(self.k_proj(hidden_states))  # (B, H, T, D)
            value = self._split_heads(self.v_proj(hidden_states))
            return key, value
        # The encoder output does not change while decoding: project it once, then reuse the cache.
        if isinstance(past_key_values, EncoderDecoderCache) and past_key_values.is_updated.get(self.layer_idx):
            return cache.layers[self.layer_idx].keys, cache.layers[self.layer_idx].values  # (B, H, S, D)
        key = self._split_heads(self.k_proj(key_value_states))  # (B, H, S, D)
        value = self._split_heads(self.v_proj(key_value_states))
        if isinstance(past_key_values, EncoderDecoderCache):
            key, value = cache.update(key, value, self.layer_idx)
            past_key_values.is_updated[self.layer_idx] = True
        return key, value

    def _attend(self, query, key, value, attention_mask, position_bias, head_mask, output_attentions, **kwargs):
        """Q (B, H, T, D), K and V (B, H, S, D) -> output (B, T, H, D) and weights (B, H, T, S) or None.

        Eager runs the course math above, any other backend its kernel; a head mask scales the heads' outputs. When
        this layer's weights are asked for under a fast backend (or the backend is "lens"), the attention lens
        (attention_lens.py) gives the fused kernel's output and the exact weights from its log-sum-exp, as it does
        for any transformers model."""
        implementation = self.config._attn_implementation or "eager"
        if position_bias is not None:  # ALiBi's bias belongs to the original heads
            kwargs["position_bias"] = position_bias[:, self.kept_heads] if self.pruned_heads else position_bias
        if head_mask is not None:
            head_mask = head_mask[self.kept_heads] if self.pruned_heads else head_mask  # (H,) -> (H_kept,)
        dropout = self.attention_dropout if self.training else 0.0
        if self.num_heads == 0:  # every head pruned: the sub-layer adds W_O's bias only
            return _no_heads_attention(self, query, key)
        if output_attentions and implementation != "eager" or implementation == LENS:
            request = LayerRequest(weights=output_attentions, head_scale=head_mask)
            return lens_attention_forward(
                self, query, key, value, attention_mask, self.scaling, dropout, request=request, **kwargs
            )
        attention_fn = eager_attention_forward
        if implementation != "eager":
            attention_fn = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        output, weights = attention_fn(
            self, query, key, value, attention_mask, scaling=self.scaling, dropout=dropout, **kwargs
        )  # (B, T, H, D), and (B, H, T, S) from eager
        if implementation != "eager":
            weights = None  # none were asked for (flex returns its log-sum-exp in this place, sdpa None)
        # Zeroing a head's output equals zeroing its weights (output = weights @ V): ablation under every kernel.
        return intervene(output, weights, LayerRequest(head_scale=head_mask))

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        key_value_states: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_values: Cache | None = None,
        head_mask: torch.Tensor | None = None,
        position_bias: torch.Tensor | None = None,
        output_attentions: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, width = hidden_states.shape  # (B, T, C)
        query = self._split_heads(self.q_proj(hidden_states))  # (B, H, T, D)
        key, value = self._keys_values(hidden_states, key_value_states, past_key_values)
        if self.num_heads == 0 and not self.is_cross_attention:
            # Every head pruned: an empty (B, 0, T, D) cache layer reads as length 0 to transformers
            # (DynamicLayer.get_seq_length), so cached decoding would restart positions at every step. One zero
            # head keeps the cache counting; `_no_heads_attention` never reads it.
            key = value = hidden_states.new_zeros(batch, 1, length, self.head_dim)  # (B, 1, T, D)
        if not self.is_cross_attention:
            if position_embeddings is not None:  # rotary positions act on queries and keys only
                cos, sin = position_embeddings
                query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
            if past_key_values is not None:
                cache = past_key_values
                if isinstance(past_key_values, EncoderDecoderCache):
                    cache = past_key_values.self_attention_cache
                key, value = cache.update(key, value, self.layer_idx)  # (B, H, S, D): S = P + T, or the static size

        output, weights = self._attend(
            query, key, value, attention_mask, position_bias, head_mask, output_attentions, **kwargs
        )  # (B, T, H_kept, D), (B, H_kept, T, S) or None
        if output_attentions and self.pruned_heads:
            weights = self._with_pruned_heads(weights)  # (B, H, T, S) in the original head indices
        output = output.reshape(batch, length, self.num_heads * self.head_dim)  # (B, T, H_kept * D): concat heads
        output = self.o_proj(output)  # (B, T, C): project by W_O
        return output, (weights if output_attentions else None)


# --------------------------------------------------------------------------------------------------------------
# Feed-forward, layer, embeddings
# --------------------------------------------------------------------------------------------------------------

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
}


class CourseTransformerFeedForward(nn.Module):
    """FFN(x) = act(x W_1 + b_1) W_2 + b_2, applied to each position independently."""

    def __init__(self, config: CourseTransformerConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.use_bias)
        self.act = ACTIVATIONS[config.hidden_act]()
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.use_bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(hidden_states)))  # (B, T, C) -> (B, T, F) -> (B, T, C)


class CourseTransformerLayer(GradientCheckpointingLayer):
    """Self-attention, optional cross-attention, feed-forward; each sub-layer wrapped in a residual connection
    with LayerNorm after the sum (`post`, 2017/BERT) or before the sub-layer (`pre`, GPT-2).

    Every tensor argument is positional so that re-entrant gradient checkpointing sees it (keyword tensors
    bypass its autograd function: the encoder states of an encoder-decoder would lose their gradient)."""

    def __init__(self, config: CourseTransformerConfig, layer_idx: int, is_decoder: bool, has_cross_attention: bool):
        super().__init__()
        self.pre_norm = config.norm_placement == "pre"
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.self_attn = CourseTransformerAttention(config, layer_idx, is_causal=is_decoder, is_cross_attention=False)
        self.self_attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.cross_attn = self.cross_attn_norm = None
        if has_cross_attention:
            self.cross_attn = CourseTransformerAttention(config, layer_idx, is_causal=False, is_cross_attention=True)
            self.cross_attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = CourseTransformerFeedForward(config)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def _residual(self, norm: nn.Module, sublayer: Callable, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            return hidden_states + self.dropout(sublayer(norm(hidden_states)))
        return norm(hidden_states + self.dropout(sublayer(hidden_states)))

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        position_bias: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        cross_attn_head_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        output_attentions: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        def self_attention(x: torch.Tensor) -> torch.Tensor:
            return self.self_attn(
                x,
                attention_mask,
                position_embeddings=position_embeddings,
                past_key_values=past_key_values,
                head_mask=head_mask,
                position_bias=position_bias,
                output_attentions=output_attentions,
                **kwargs,
            )[0]

        def cross_attention(x: torch.Tensor) -> torch.Tensor:
            return self.cross_attn(
                x,
                encoder_attention_mask,
                key_value_states=encoder_hidden_states,
                past_key_values=past_key_values,
                head_mask=cross_attn_head_mask,
                output_attentions=output_attentions,
                **kwargs,
            )[0]

        hidden_states = self._residual(self.self_attn_norm, self_attention, hidden_states)
        if self.cross_attn is not None:
            hidden_states = self._residual(self.cross_attn_norm, cross_attention, hidden_states)
        return self._residual(self.ffn_norm, self.ffn, hidden_states)  # (B, T, C)


class CourseTransformerWordEmbedding(nn.Embedding):
    """The token embedding; its own class so that initialisation can tell it from the position embeddings."""


class CourseTransformerEmbeddings(nn.Module):
    """Token embedding (x sqrt(d_model) when `scale_embeddings`) + absolute positions (sinusoidal or learned)
    + token types, then the optional LayerNorm (BERT) and dropout. RoPE and ALiBi act inside attention."""

    def __init__(self, config: CourseTransformerConfig):
        super().__init__()
        self.config = config
        self.word_embeddings = CourseTransformerWordEmbedding(config.vocab_size, config.hidden_size)
        self.scale = math.sqrt(config.hidden_size) if config.scale_embeddings else 1.0
        self.position_embeddings = None
        if config.position_encoding == "learned":
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        elif config.position_encoding == "sinusoidal":
            # Not a parameter and not saved: it is refilled by `_init_weights` after `from_pretrained`, which
            # recreates non-persistent buffers as uninitialised memory.
            table = sinusoidal_table(config.max_position_embeddings, config.hidden_size)
            self.register_buffer("sinusoidal_table", table, persistent=False)
        self.token_type_embeddings = None
        if config.type_vocab_size > 0:
            self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.layer_norm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.embedding_layer_norm else None
        )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)  # (B, T, C)
        embeddings = inputs_embeds * self.scale if self.scale != 1.0 else inputs_embeds
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros(embeddings.shape[:2], dtype=torch.long, device=embeddings.device)
            embeddings = embeddings + self.token_type_embeddings(token_type_ids)
        if self.position_embeddings is not None:
            embeddings = embeddings + self.position_embeddings(position_ids)  # (B or 1, T, C) broadcast
        elif self.config.position_encoding == "sinusoidal":
            embeddings = embeddings + self.sinusoidal_table[position_ids].to(embeddings.dtype)
        if self.layer_norm is not None:
            embeddings = self.layer_norm(embeddings)
        return self.dropout(embeddings)


# --------------------------------------------------------------------------------------------------------------
# Pretrained base, stack
# --------------------------------------------------------------------------------------------------------------


# Every Auto class that fits an architecture. transformers writes only the saved class into a folder's `auto_map`;
# ours writes all of these, so that a folder of any head loads through every fitting Auto class with remote code.
AUTO_CLASSES_FOR_ARCHITECTURE: dict[str, dict[str, str]] = {
    "decoder": {
        "AutoModel": "CourseTransformerModel",
        "AutoModelForCausalLM": "CourseTransformerForCausalLM",
        "AutoModelForSequenceClassification": "CourseTransformerForSequenceClassification",
        "AutoModelForTokenClassification": "CourseTransformerForTokenClassification",
    },
    "encoder": {
        "AutoModel": "CourseTransformerModel",
        "AutoModelForMaskedLM": "CourseTransformerForMaskedLM",
        "AutoModelForSequenceClassification": "CourseTransformerForSequenceClassification",
        "AutoModelForTokenClassification": "CourseTransformerForTokenClassification",
    },
    "encoder-decoder": {
        "AutoModel": "CourseTransformerModel",
        "AutoModelForSeq2SeqLM": "CourseTransformerForSeq2SeqLM",
    },
}


class CourseTransformerPreTrainedModel(PreTrainedModel):
    config_class = CourseTransformerConfig
    config: CourseTransformerConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CourseTransformerLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # No value is read back to the host inside a compiled forward (see the input checks above), and the masks,
    # positions and caches are transformers' own, which trace with static caches.
    _can_compile_fullgraph = True

    def save_pretrained(self, save_directory, *args, **kwargs):
        if self._auto_class is not None:  # registered for remote code (importing `modeling` does it)
            module = type(self).__module__.rsplit(".", 1)[-1]
            fitting = AUTO_CLASSES_FOR_ARCHITECTURE[self.config.architecture]
            auto_map = {auto: f"{module}.{cls}" for auto, cls in fitting.items()}
            self.config.auto_map = {**auto_map, **(getattr(self.config, "auto_map", None) or {})}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def prune_heads(self, heads_to_prune: dict[str | int, Sequence[int]]) -> None:
        """Remove attention heads from the projections (transformers 5 dropped `PreTrainedModel.prune_heads`).

        Keys name attention modules as `config.pruned_heads` does ("encoder.0.self", "decoder.1.self",
        "decoder.1.cross"); an int key is the self-attention of that layer of a one-stack model (transformers 4's
        form). Head indices are the original ones; heads already pruned are ignored. The model's outputs equal those
        of `head_mask` ablation of the same heads; `config.pruned_heads` records them, so `save_pretrained` and
        `from_pretrained` rebuild the smaller projections.

        >>> model.prune_heads({"encoder.0.self": [0, 2], "decoder.1.cross": [3]})  # doctest: +SKIP
        """
        modules = {m.module_key: m for m in self.modules() if isinstance(m, CourseTransformerAttention)}
        resolved: dict[str, list[int]] = {}
        for key, heads in heads_to_prune.items():
            if isinstance(key, int) and not self.config.is_encoder_decoder:
                key = f"{'encoder' if self.config.has_encoder else 'decoder'}.{key}.self"
            if key not in modules:
                raise ValueError(f"prune_heads: no attention module {key!r}; allowed keys are {', '.join(modules)}")
            heads = [int(h) for h in heads]
            if any(not 0 <= h < self.config.num_attention_heads for h in heads):
                raise ValueError(
                    f"prune_heads: heads {heads} of {key!r} must lie in [0, {self.config.num_attention_heads})"
                )
            resolved[key] = heads
        pruned = dict(self.config.pruned_heads or {})
        for key, heads in resolved.items():
            modules[key].prune(heads)
            pruned[key] = sorted(modules[key].pruned_heads)
        self.config.pruned_heads = {key: pruned[key] for key in sorted(pruned) if pruned[key]}

    def enable_fast_decoding(self, layout: str = "auto") -> "CourseTransformerPreTrainedModel":
        """Make every fp32 CPU nn.Linear multiply by a decode copy of its weight outside autograd (`PackedLinear`).

        For batch-1 and small-batch decoding on the CPU, which streams every weight once per token. `layout`:
        "transposed" (Wᵀ contiguous, addmm), "packed" (oneDNN's blocked layout), "plain" (nn.Linear as it is), or
        "auto" (default): per weight shape, whichever of the three streams fastest on this machine, timed once here
        on the model's own weights (`fast_decoding_layouts` says what was chosen). Outputs equal the plain model's
        up to fp32 summation order; parameters, state_dict, tied weights, `save_pretrained`, head masks and
        `output_attentions` are unchanged, and training or any changed weight falls back to nn.Linear. Costs one
        extra copy of the linear weights in memory. Undo with `disable_fast_decoding`. A write through `.data`
        (peft's `merge_and_unload` does one) bumps no version counter and so is invisible to the decode copies:
        call `enable_fast_decoding()` again after it, which copies the current weights. It composes with
        transformers' compiled decoding, `generate(..., cache_implementation="static", compile_config=...)`, whose
        graph uses the copies made here.

        >>> model.enable_fast_decoding().generate(input_ids, max_new_tokens=32)  # doctest: +SKIP
        """
        if layout not in DECODE_LAYOUTS:
            raise ValueError(f"enable_fast_decoding: layout={layout!r}; allowed: {', '.join(DECODE_LAYOUTS)}")
        reason = fast_decoding_unavailable(layout)
        if reason is not None:
            raise RuntimeError(f"enable_fast_decoding: layout={layout!r}: {reason}")
        linears = [m for m in self.modules() if isinstance(m, nn.Linear)]
        groups: dict[tuple[int, int], list[nn.Linear]] = {}
        for module in filter(packable, linears):
            groups.setdefault(tuple(module.weight.shape), []).append(module)
        if not groups:
            found = sorted({f"{m.weight.dtype} on {m.weight.device}" for m in linears})
            raise ValueError(f"enable_fast_decoding: needs float32 weights on the CPU; the model has {found}")
        candidates = ["plain", "transposed"] + ([] if fast_decoding_unavailable("packed") else ["packed"])
        chosen = {}
        for shape, group in groups.items():
            chosen[shape] = fastest_layout(group, candidates) if layout == "auto" else layout
            for module in group:
                unpack_linear(module)
                if chosen[shape] != "plain":
                    pack_linear(module, chosen[shape])
        self._decode_layouts = {f"{out} x {in_}": name for (out, in_), name in chosen.items()}
        return self

    def disable_fast_decoding(self) -> "CourseTransformerPreTrainedModel":
        """Undo `enable_fast_decoding`: every PackedLinear becomes a plain nn.Linear, the decode copies are freed."""
        for module in self.modules():
            unpack_linear(module)
        self.__dict__.pop("_decode_layouts", None)
        return self

    @property
    def fast_decoding_layouts(self) -> dict[str, str]:
        """Weight shape "out x in" -> the layout `enable_fast_decoding` gave it (empty when not enabled)."""
        return dict(self.__dict__.get("_decode_layouts", {}))

    @property
    def fast_decoding_enabled(self) -> bool:
        """Whether `enable_fast_decoding` is in effect (even where "auto" kept every shape plain)."""
        return "_decode_layouts" in self.__dict__

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers' `init` helpers skip tensors that were loaded from a checkpoint; raw in-place fills would not.
        if isinstance(module, CourseTransformerWordEmbedding) and self.config.scale_embeddings:
            # Embeddings multiplied by sqrt(d) start at std d^-1/2, so that the scaled tokens have unit scale like
            # the sinusoids they are added to (Vaswani et al. 2017, 3.4; fairseq's initialisation). At std 0.02
            # the positions drown the tokens of a small model and learning starts slowly.
            init.normal_(module.weight, mean=0.0, std=self.config.hidden_size**-0.5)
            return
        super()._init_weights(module)
        # Deterministic buffers are recomputed here: `from_pretrained` recreates them as empty memory.
        if isinstance(module, CourseTransformerEmbeddings) and hasattr(module, "sinusoidal_table"):
            init.copy_(module.sinusoidal_table, sinusoidal_table(*module.sinusoidal_table.shape))
        if isinstance(module, CourseTransformerStack):
            if hasattr(module, "rope_inv_freq"):
                init.copy_(
                    module.rope_inv_freq, rope_inverse_frequencies(self.config.head_dim, self.config.rope_theta)
                )
            if hasattr(module, "alibi_slopes"):
                init.copy_(module.alibi_slopes, alibi_slopes(self.config.num_attention_heads))
        if isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


def default_position_ids(attention_mask: torch.Tensor | None, past_length, length: int, device) -> torch.Tensor:
    """Positions past .. past+T-1, shifted left by the number of leading pads so that a left-padded row gets
    the same positions as the row run alone (right padding keeps plain 0, 1, 2, ...). `past_length` may be a
    tensor (a static cache): only tensor arithmetic here, no host read."""
    positions = torch.arange(length, device=device)[None] + past_length  # (1, T)
    if attention_mask is not None and attention_mask.dim() == 2:
        leading_pads = (attention_mask.cumsum(-1) == 0).sum(-1, keepdim=True)  # (B, 1)
        positions = (positions - leading_pads).clamp(min=0)  # (B, T)
    return positions


def _layer_selected(layer_idx: int, attention_layers: Sequence[int] | None, num_layers: int) -> bool:
    if attention_layers is None:
        return True
    return any(layer_idx == (i % num_layers) for i in attention_layers)


def _dense_mask_config(config: CourseTransformerConfig) -> CourseTransformerConfig:
    """A view of the config whose masks come out dense (sdpa's boolean form): the eager math of a recorded layer
    cannot read flex's block mask. Only built when weights are recorded under flex."""
    view = copy.copy(config)
    view._attn_implementation_internal = "sdpa"
    return view


class CourseTransformerStack(CourseTransformerPreTrainedModel):
    """The encoder (bidirectional self-attention) or the decoder (masked self-attention, and cross-attention when
    the model is an encoder-decoder): embeddings, L layers and, with pre-norm, a final LayerNorm.

    A pretrained submodel of its own, as BART's encoder and decoder are, so that transformers' output recording
    gives each stack its own hidden states and attentions (encoder_* and decoder_* in the seq2seq output)."""

    _can_record_outputs = {
        "hidden_states": CourseTransformerLayer,
        "attentions": OutputRecorder(CourseTransformerAttention, index=1, layer_name="self_attn"),
        "cross_attentions": OutputRecorder(CourseTransformerAttention, index=1, layer_name="cross_attn"),
    }

    def __init__(self, config: CourseTransformerConfig, is_decoder: bool):
        super().__init__(config)
        self.is_decoder = is_decoder
        self.has_cross_attention = is_decoder and config.is_encoder_decoder
        num_layers = config.num_decoder_layers if is_decoder else config.num_encoder_layers
        self.embeddings = CourseTransformerEmbeddings(config)
        self.layers = nn.ModuleList(
            CourseTransformerLayer(config, i, is_decoder, self.has_cross_attention) for i in range(num_layers)
        )
        self.final_norm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.norm_placement == "pre" else None
        )
        if config.position_encoding == "rope":
            self.register_buffer(
                "rope_inv_freq", rope_inverse_frequencies(config.head_dim, config.rope_theta), persistent=False
            )
        elif config.position_encoding == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(config.num_attention_heads), persistent=False)
        self.gradient_checkpointing = False
        self.post_init()

    @property
    def input_name(self) -> str:
        return "decoder_input_ids" if self.is_decoder and self.config.is_encoder_decoder else "input_ids"

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids, past_length):
        """Every check that reads metadata only, then (fresh forwards in eager mode) the value checks."""
        config, name = self.config, self.input_name
        _check_token_input(name, input_ids, inputs_embeds, config.hidden_size)
        batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        _check_attention_mask(attention_mask, batch, length, past_length)
        if token_type_ids is not None and config.type_vocab_size == 0:
            raise ValueError("token_type_ids given, but config.type_vocab_size=0 (the model has no token types)")
        _check_positions(config, position_ids, batch, length, past_length)
        if config.position_encoding == "alibi" and (config._attn_implementation or "").startswith("flash"):
            raise ValueError(
                f"attn_implementation={config._attn_implementation!r} takes no additive bias, so it cannot run "
                "position_encoding='alibi'; use 'sdpa', 'flex_attention' or 'eager'"
            )
        if not (isinstance(past_length, int) and past_length == 0 and _checking_values()):
            return
        checks = _ValueChecks()
        checks.id_range(name, input_ids, config.vocab_size, "vocab_size")
        checks.id_range("token_type_ids", token_type_ids, config.type_vocab_size, "type_vocab_size")
        two_d = isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
        checks.zero_one("attention_mask", attention_mask if two_d else None)
        if config.position_encoding in ("learned", "sinusoidal"):
            checks.id_range("position_ids", position_ids, config.max_position_embeddings, "max_position_embeddings")
        checks.run()

    def _masks(self, config, embeds, attention_mask, cache, position_ids, encoder_hidden_states, encoder_mask):
        """Self- and cross-attention masks from transformers' masking utilities, in the form the backend wants."""
        if self.is_decoder:
            self_mask = create_causal_mask(
                config=config,
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                past_key_values=cache,
                position_ids=position_ids,
            )
        else:
            self_mask = create_bidirectional_mask(config=config, inputs_embeds=embeds, attention_mask=attention_mask)
        cross_mask = None
        if self.has_cross_attention:
            cross_mask = create_bidirectional_mask(
                config=config,
                inputs_embeds=embeds,
                attention_mask=encoder_mask,
                encoder_hidden_states=encoder_hidden_states,
            )
        return self_mask, cross_mask

    def _alibi_bias(self, cache: Cache | None, batch: int, length: int, embeds: torch.Tensor) -> torch.Tensor:
        """-m_h |i - j| over absolute query and key indices (Press et al. 2022), (1|B, H, T, S). Inside one sequence
        of a padded or packed row these differ from the positions by a constant, which softmax ignores."""
        q_offset, kv_length, kv_offset = 0, length, 0
        if cache is not None:
            q_offset = cache.get_query_offset(0)  # a tensor for a static cache: no host read
            kv_length, kv_offset = cache.get_mask_sizes(length, 0)
        q_idx = torch.arange(length, device=embeds.device)[:, None] + q_offset  # (T, 1)
        k_idx = torch.arange(kv_length, device=embeds.device)[None, :] + kv_offset  # (1, S)
        distance = (q_idx - k_idx).abs().to(embeds.dtype)  # (T, S)
        bias = -self.alibi_slopes.to(embeds.dtype)[None, :, None, None] * distance  # (1, H, T, S)
        if self.config._attn_implementation == "flex_attention":
            bias = bias.expand(batch, -1, -1, -1)  # flex's score_mod indexes the bias by batch
        return bias

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        attention_layers: Sequence[int] | None = None,
        head_mask: torch.Tensor | None = None,
        cross_attn_head_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        config, num_layers = self.config, len(self.layers)
        record = kwargs.pop("output_attentions", None)
        record = bool(config.output_attentions if record is None else record)
        kwargs.pop("output_hidden_states", None)  # recorded by hooks, not by the layers
        _check_cache(past_key_values, self.has_cross_attention)
        _check_attention_layers(attention_layers, num_layers, "decoder" if self.is_decoder else "encoder")
        heads = config.num_attention_heads
        head_mask = _check_head_mask("head_mask", head_mask, num_layers, heads)
        cross_attn_head_mask = _check_head_mask("cross_attn_head_mask", cross_attn_head_mask, num_layers, heads)

        use_cache = bool(use_cache) and self.is_decoder
        past_key_values, self_cache, past_length = self._prepare_cache(past_key_values, use_cache)
        self._check_inputs(input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids, past_length)
        if self.has_cross_attention:
            batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
            _check_encoder_states(encoder_hidden_states, batch, config.hidden_size, "encoder_hidden_states")

        given_positions = position_ids
        if position_ids is None:
            position_ids = default_position_ids(
                attention_mask, past_length, *self._length_and_device(input_ids, inputs_embeds)
            )
        hidden_states = self.embeddings(input_ids, position_ids, token_type_ids, inputs_embeds)  # (B, T, C)

        # An empty dynamic cache sizes the masks like no cache at all; passing none lets a packed batch (restarting
        # position_ids) be detected even when use_cache is on. A static cache must be passed: it sets the key length.
        mask_cache = self_cache
        if isinstance(self_cache, DynamicCache) and isinstance(past_length, int) and past_length == 0:
            mask_cache = None
        mask_args = (hidden_states, attention_mask, mask_cache, given_positions, encoder_hidden_states)
        fast_masks, dense_masks = self._all_masks(mask_args, encoder_attention_mask, record)
        position_embeddings, position_bias = self._position_terms(position_ids, mask_cache, hidden_states)

        for idx, layer in enumerate(self.layers):
            recorded = record and _layer_selected(idx, attention_layers, num_layers)
            self_mask, cross_mask = dense_masks if recorded else fast_masks
            hidden_states = layer(
                hidden_states,
                self_mask,
                encoder_hidden_states,
                cross_mask,
                position_embeddings,
                position_bias,
                head_mask[idx] if head_mask is not None else None,
                cross_attn_head_mask[idx] if cross_attn_head_mask is not None else None,
                past_key_values=past_key_values,
                output_attentions=recorded,
                **kwargs,
            )  # (B, T, C)
        if self.final_norm is not None:
            hidden_states = self.final_norm(hidden_states)
        return BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=hidden_states, past_key_values=past_key_values if use_cache else None
        )

    def _prepare_cache(self, past_key_values: Cache | None, use_cache: bool):
        """The cache to write (a new dynamic one when caching starts here), its self-attention part and its length
        (an int, or a device tensor for a static cache)."""
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
            if self.has_cross_attention:
                past_key_values = EncoderDecoderCache(past_key_values, DynamicCache(config=self.config))
        self_cache = past_key_values
        if isinstance(past_key_values, EncoderDecoderCache):
            self_cache = past_key_values.self_attention_cache
        past_length = self_cache.get_seq_length() if self_cache is not None else 0
        return past_key_values, self_cache, past_length

    def _all_masks(self, mask_args: tuple, encoder_attention_mask, record: bool):
        """The masks of the backend, and the dense ones that recorded layers' eager math reads (the same masks
        except under flex, whose block masks eager cannot read)."""
        fast_masks = self._masks(self.config, *mask_args, encoder_attention_mask)
        if record and self.config._attn_implementation == "flex_attention":
            return fast_masks, self._masks(_dense_mask_config(self.config), *mask_args, encoder_attention_mask)
        return fast_masks, fast_masks

    def _position_terms(self, position_ids: torch.Tensor, cache: Cache | None, hidden_states: torch.Tensor):
        """RoPE's (cos, sin) or ALiBi's bias, whichever the config uses (absolute positions are in the embeddings)."""
        encoding = self.config.position_encoding
        if encoding == "rope":
            return rope_cos_sin(position_ids, self.rope_inv_freq, hidden_states.dtype), None  # 2 x (B, T, D)
        if encoding == "alibi":
            return None, self._alibi_bias(cache, *hidden_states.shape[:2], hidden_states)  # (1|B, H, T, S)
        return None, None

    @staticmethod
    def _length_and_device(input_ids, inputs_embeds) -> tuple[int, torch.device]:
        source = input_ids if input_ids is not None else inputs_embeds
        return source.shape[1], source.device


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


def _word_embedding_key(config: CourseTransformerConfig) -> str:
    stack = "encoder" if config.has_encoder else "decoder"
    return f"{stack}.embeddings.word_embeddings.weight"


class CourseTransformerPooler(nn.Module):
    """BERT's pooler: tanh(W h_first + b), a sentence summary trained by next-sentence prediction."""

    def __init__(self, config: CourseTransformerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden_states[:, 0]))  # (B, C)


class CourseTransformerModel(CourseTransformerPreTrainedModel):
    """The bare Transformer: an encoder, a decoder, or both, as `config.architecture` says.

    Returns `BaseModelOutputWithPoolingAndCrossAttentions` (encoder), `BaseModelOutputWithPastAndCrossAttentions`
    (decoder) or `Seq2SeqModelOutput` (encoder-decoder). `output_attentions=True` returns the softmax weights of
    every layer under every backend; `attention_layers=[i, ...]` restricts that to chosen layers (negative indices
    count from the end) so the other layers keep the fast kernel. `head_mask` (H,) or (L, H) multiplies each head's
    output: 0 ablates a head. `add_pooling_layer` overrides the config (heads that never pool build no pooler)."""

    def __init__(self, config: CourseTransformerConfig, add_pooling_layer: bool | None = None):
        super().__init__(config)
        self.encoder = CourseTransformerStack(config, is_decoder=False) if config.has_encoder else None
        self.decoder = CourseTransformerStack(config, is_decoder=True) if config.has_decoder else None
        add_pooling_layer = config.add_pooling_layer if add_pooling_layer is None else add_pooling_layer
        self.pooler = CourseTransformerPooler(config) if add_pooling_layer else None
        # The encoder-decoder shares one token embedding between its stacks (Vaswani et al. 2017, 3.4).
        self._tied_weights_keys = (
            {"decoder.embeddings.word_embeddings.weight": "encoder.embeddings.word_embeddings.weight"}
            if config.is_encoder_decoder
            else {}
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return (self.encoder or self.decoder).embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        for stack in (self.encoder, self.decoder):
            if stack is not None:
                stack.embeddings.word_embeddings = value

    def get_encoder(self, modality: str | None = None) -> nn.Module:
        return self.encoder if self.encoder is not None else self

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        decoder_position_ids: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        attention_layers: Sequence[int] | None = None,
        head_mask: torch.Tensor | None = None,
        decoder_head_mask: torch.Tensor | None = None,
        cross_attn_head_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPoolingAndCrossAttentions | BaseModelOutputWithPastAndCrossAttentions | Seq2SeqModelOutput:
        inputs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            attention_layers=attention_layers,
            head_mask=head_mask,
            return_dict=True,
        )
        if self.config.architecture == "encoder":
            out = self.encoder(**inputs, **kwargs)
            return BaseModelOutputWithPoolingAndCrossAttentions(
                last_hidden_state=out.last_hidden_state,
                pooler_output=self.pooler(out.last_hidden_state) if self.pooler is not None else None,
                hidden_states=out.hidden_states,
                attentions=out.attentions,
            )
        if self.config.architecture == "decoder":
            return self.decoder(**inputs, past_key_values=past_key_values, use_cache=use_cache, **kwargs)

        decoder_inputs = dict(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            position_ids=decoder_position_ids,
            inputs_embeds=decoder_inputs_embeds,
            encoder_attention_mask=attention_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
            attention_layers=attention_layers,
            head_mask=decoder_head_mask,
            cross_attn_head_mask=cross_attn_head_mask,
            return_dict=True,
        )
        return self._encode_decode(encoder_outputs, inputs, decoder_inputs, kwargs)

    def _encode_decode(self, encoder_outputs, inputs: dict, decoder_inputs: dict, kwargs: dict) -> Seq2SeqModelOutput:
        """The encoder-decoder: decoder-side checks (free) before the encoder runs, then both stacks."""
        if decoder_inputs["input_ids"] is None and decoder_inputs["inputs_embeds"] is None:
            raise ValueError(
                "the encoder-decoder needs decoder_input_ids (or decoder_inputs_embeds); "
                "CourseTransformerForSeq2SeqLM also derives them from labels"
            )
        layers, heads = self.config.num_decoder_layers, self.config.num_attention_heads
        _check_head_mask("decoder_head_mask", decoder_inputs["head_mask"], layers, heads)
        _check_head_mask("cross_attn_head_mask", decoder_inputs["cross_attn_head_mask"], layers, heads)
        if decoder_inputs["input_ids"] is not None:
            _check_token_input("decoder_input_ids", decoder_inputs["input_ids"], None, self.config.hidden_size)
        encoder_outputs = self._encode(encoder_outputs, inputs, kwargs)
        decoder_out = self.decoder(**decoder_inputs, encoder_hidden_states=encoder_outputs.last_hidden_state, **kwargs)
        return Seq2SeqModelOutput(
            last_hidden_state=decoder_out.last_hidden_state,
            past_key_values=decoder_out.past_key_values,
            decoder_hidden_states=decoder_out.hidden_states,
            decoder_attentions=decoder_out.attentions,
            cross_attentions=decoder_out.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
        )

    def _encode(self, encoder_outputs, inputs: dict, kwargs: dict) -> BaseModelOutput:
        """Run the encoder, or take its outputs as given (generation encodes once), checked for width."""
        if encoder_outputs is None:
            return self.encoder(**inputs, **kwargs)
        if isinstance(encoder_outputs, (tuple, list)):
            encoder_outputs = BaseModelOutput(*encoder_outputs)
        states = getattr(encoder_outputs, "last_hidden_state", None)  # any ModelOutput of an encoder
        batch_source = inputs["input_ids"] if inputs["input_ids"] is not None else states
        batch = batch_source.shape[0] if isinstance(batch_source, torch.Tensor) else 0
        _check_encoder_states(states, batch, self.config.hidden_size, "encoder_outputs[0] (last_hidden_state)")
        return encoder_outputs


def _require_architecture(model_class: str, config: CourseTransformerConfig, allowed: tuple[str, ...]) -> None:
    if config.architecture not in allowed:
        raise ValueError(
            f"{model_class} needs config.architecture in {allowed}, got architecture={config.architecture!r}"
        )


def _keep_last(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """Generation needs the last position's logits only; an int keeps the last n (0 = all), a tensor indexes."""
    keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    return hidden_states[:, keep]


def _inputs_of(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor | None:
    return input_ids if isinstance(input_ids, torch.Tensor) else inputs_embeds


class CourseTransformerForCausalLM(CourseTransformerPreTrainedModel, GenerationMixin):
    """Decoder-only language model (GPT): next-token logits, KV-cached generation (dynamic or static cache)."""

    def __init__(self, config: CourseTransformerConfig):
        super().__init__(config)
        _require_architecture(type(self).__name__, config, ("decoder",))
        self.model = CourseTransformerModel(config, add_pooling_layer=False)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._tied_weights_keys = {"lm_head.weight": "model.decoder.embeddings.word_embeddings.weight"}
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        attention_layers: Sequence[int] | None = None,
        head_mask: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithCrossAttentions:
        _check_token_labels(labels, _inputs_of(input_ids, inputs_embeds), self.config.vocab_size, "vocab_size")
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            past_key_values=past_key_values,
            use_cache=use_cache,
            attention_layers=attention_layers,
            head_mask=head_mask,
            return_dict=True,
            **kwargs,
        )
        logits = self.lm_head(_keep_last(out.last_hidden_state, logits_to_keep))  # (B, T, V)
        loss = None
        if labels is not None:  # position t predicts token t+1 (or `shift_labels` when given); -100 is ignored
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithCrossAttentions(
            loss=loss,
            logits=logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )


def shift_tokens_right(labels: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """Teacher forcing: the decoder reads <start> y_1 ... y_{n-1} and predicts y_1 ... y_n."""
    shifted = labels.new_full(labels.shape, pad_token_id)  # (B, T)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad_token_id)


class CourseTransformerForSeq2SeqLM(CourseTransformerPreTrainedModel, GenerationMixin):
    """Encoder-decoder (the 2017 translation model): the decoder attends to its past (masked self-attention) and
    to the encoder output (cross-attention, keys/values computed once per generation)."""

    def __init__(self, config: CourseTransformerConfig):
        super().__init__(config)
        _require_architecture(type(self).__name__, config, ("encoder-decoder",))
        self.model = CourseTransformerModel(config, add_pooling_layer=False)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._tied_weights_keys = {"lm_head.weight": "model.encoder.embeddings.word_embeddings.weight"}
        # The labels are already aligned with the decoder's logits (its inputs are the labels shifted right), so
        # the loss is the unshifted token cross-entropy that transformers calls the masked-LM loss.
        self.loss_type = "ForMaskedLM"
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def get_encoder(self, modality: str | None = None) -> nn.Module:
        return self.model.encoder

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        decoder_position_ids: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        past_key_values: Cache | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        attention_layers: Sequence[int] | None = None,
        head_mask: torch.Tensor | None = None,
        decoder_head_mask: torch.Tensor | None = None,
        cross_attn_head_mask: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> Seq2SeqLMOutput:
        _check_token_labels(
            labels, _inputs_of(decoder_input_ids, decoder_inputs_embeds), self.config.vocab_size, "vocab_size"
        )
        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = shift_tokens_right(
                labels, self.config.pad_token_id or 0, self.config.decoder_start_token_id
            )
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            decoder_position_ids=decoder_position_ids,
            decoder_inputs_embeds=decoder_inputs_embeds,
            encoder_outputs=encoder_outputs,
            past_key_values=past_key_values,
            use_cache=use_cache,
            attention_layers=attention_layers,
            head_mask=head_mask,
            decoder_head_mask=decoder_head_mask,
            cross_attn_head_mask=cross_attn_head_mask,
            return_dict=True,
            **kwargs,
        )
        logits = self.lm_head(_keep_last(out.last_hidden_state, logits_to_keep))  # (B, T, V)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=out.past_key_values,
            decoder_hidden_states=out.decoder_hidden_states,
            decoder_attentions=out.decoder_attentions,
            cross_attentions=out.cross_attentions,
            encoder_last_hidden_state=out.encoder_last_hidden_state,
            encoder_hidden_states=out.encoder_hidden_states,
            encoder_attentions=out.encoder_attentions,
        )


class CourseTransformerMaskedLMHead(nn.Module):
    """BERT's prediction head transform: dense -> activation -> LayerNorm (the decoder is the tied `lm_head`)."""

    def __init__(self, config: CourseTransformerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]()
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(self.act(self.dense(hidden_states)))  # (B, T, C)


# The encoder-only heads run one stack; on an encoder-decoder config the other stack would be dead weight (no
# gradients, DDP's unused-parameter error), so they take a single-stack architecture.
SINGLE_STACK = ("encoder", "decoder")


class CourseTransformerForMaskedLM(CourseTransformerPreTrainedModel):
    """Masked language model (BERT): predicts the tokens hidden behind [MASK] from both sides."""

    def __init__(self, config: CourseTransformerConfig):
        super().__init__(config)
        _require_architecture(type(self).__name__, config, ("encoder",))
        self.model = CourseTransformerModel(config, add_pooling_layer=False)
        self.transform = CourseTransformerMaskedLMHead(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self._tied_weights_keys = {"lm_head.weight": f"model.{_word_embedding_key(config)}"}
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        attention_layers: Sequence[int] | None = None,
        head_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MaskedLMOutput:
        _check_token_labels(labels, _inputs_of(input_ids, inputs_embeds), self.config.vocab_size, "vocab_size")
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            attention_layers=attention_layers,
            head_mask=head_mask,
            return_dict=True,
            **kwargs,
        )
        logits = self.lm_head(self.transform(out.last_hidden_state))  # (B, T, V)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


def _resolve_pooling(config: CourseTransformerConfig) -> str:
    """`auto`: BERT's pooler when the config has one, the last token for a causal decoder, else the first."""
    if config.classifier_pooling != "auto":
        return config.classifier_pooling
    if config.add_pooling_layer:
        return "pooler"
    return "last" if config.architecture == "decoder" else "first"


class CourseTransformerForSequenceClassification(CourseTransformerPreTrainedModel):
    """A sequence summarised by `config.classifier_pooling` (BERT's pooler, the first token such as [CLS], the
    last non-padding token as in GPT, or the mean over tokens), then a linear classifier.

    Not transformers' `GenericForSequenceClassification`: that one pools the last token only and names its layer
    `score`; the course model offers BERT's pooler, first-token and mean pooling, and keeps BERT's `classifier`."""

    def __init__(self, config: CourseTransformerConfig):
        super().__init__(config)
        _require_architecture(type(self).__name__, config, SINGLE_STACK)
        self.num_labels = config.num_labels
        self.pooling = _resolve_pooling(config)
        self.model = CourseTransformerModel(config, add_pooling_layer=self.pooling == "pooler")
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def _pool(self, out, attention_mask: torch.Tensor | None) -> torch.Tensor:
        hidden_states = out.last_hidden_state  # (B, T, C)
        if self.pooling == "pooler":
            pooled = getattr(out, "pooler_output", None)
            return pooled if pooled is not None else self.model.pooler(hidden_states)  # (B, C)
        if self.pooling == "first":
            return hidden_states[:, 0]
        if attention_mask is None or attention_mask.dim() != 2:
            attention_mask = torch.ones(hidden_states.shape[:2], dtype=torch.long, device=hidden_states.device)
        if self.pooling == "last":
            positions = torch.arange(hidden_states.shape[1], device=hidden_states.device)  # (T,)
            last = (positions * attention_mask).argmax(-1)  # (B,) index of the last real token, any padding side
            return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last]
        weights = attention_mask.to(hidden_states.dtype)[..., None]  # (B, T, 1)
        return (hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, C)

    def _check_labels(self, labels: torch.Tensor | None) -> None:
        config = self.config
        if labels is None or not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.long, torch.int):
            return
        single_label = config.num_labels > 1 and config.problem_type in (None, "single_label_classification")
        if single_label and _checking_values():
            checks = _ValueChecks()
            checks.id_range("labels", labels, config.num_labels, "num_labels")
            checks.run()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        attention_layers: Sequence[int] | None = None,
        head_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutput:
        self._check_labels(labels)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            attention_layers=attention_layers,
            head_mask=head_mask,
            return_dict=True,
            **kwargs,
        )
        logits = self.classifier(self.dropout(self._pool(out, attention_mask)))  # (B, num_labels)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, **kwargs)
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )


class CourseTransformerForTokenClassification(CourseTransformerPreTrainedModel):
    """A label for every token (tagging, named entities). Like transformers' generic token classifier, but with
    BERT's `classifier` name and the config's dropout, so converted BERT taggers keep their keys."""

    def __init__(self, config: CourseTransformerConfig):
        super().__init__(config)
        _require_architecture(type(self).__name__, config, SINGLE_STACK)
        self.num_labels = config.num_labels
        self.model = CourseTransformerModel(config, add_pooling_layer=False)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        attention_layers: Sequence[int] | None = None,
        head_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> TokenClassifierOutput:
        _check_token_labels(labels, _inputs_of(input_ids, inputs_embeds), self.config.num_labels, "num_labels")
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            attention_layers=attention_layers,
            head_mask=head_mask,
            return_dict=True,
            **kwargs,
        )
        logits = self.classifier(self.dropout(out.last_hidden_state))  # (B, T, num_labels)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config, **kwargs)
        return TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )


# Saved folders carry this file; importing the pipeline here makes `save_pretrained` copy its file too, so that
# `pipeline("text2text-generation", model=folder, trust_remote_code=True)` finds it.
from .pipeline_course_transformer import CourseTransformerText2TextPipeline  # noqa: E402, F401

__all__ = [
    "CourseTransformerPreTrainedModel",
    "CourseTransformerModel",
    "CourseTransformerForCausalLM",
    "CourseTransformerForSeq2SeqLM",
    "CourseTransformerForMaskedLM",
    "CourseTransformerForSequenceClassification",
    "CourseTransformerForTokenClassification",
    "eager_attention_forward",
]
