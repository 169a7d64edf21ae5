"""The course Transformer (Vaswani et al. 2017, "Attention Is All You Need") as a Hugging Face model family.

One attention module serves self-attention (encoder), masked self-attention (decoder) and cross-attention
(decoder over encoder states). Its eager path is the course math in one short function
(`eager_attention_forward`); the fast kernels (sdpa, flash, flex) plug in through transformers' attention
interface, and a layer whose weights are requested always runs the eager math, so `output_attentions=True`
returns the exact softmax weights under every backend.

The file reads top to bottom in dependency order: positions -> masks -> attention -> feed-forward -> layer
-> stack -> pretrained base -> heads.

Notation used in shape comments:
    B batch, T query length, S key length (cached + current), P cached length, H heads, D head dim,
    C hidden size (d_model), F feed-forward size, V vocabulary size, L layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
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

from .configuration_course_transformer import CourseTransformerConfig

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
# Masks: one convention, boolean True = may attend, shape (B, 1, T, S), turned into an additive bias once
# --------------------------------------------------------------------------------------------------------------


def causal_mask(query_length: int, key_length: int, device: torch.device) -> torch.Tensor:
    """Query i (the (S - T + i)-th token overall) may attend to keys 0 .. S - T + i."""
    offset = key_length - query_length
    q_idx = torch.arange(query_length, device=device)[:, None] + offset  # (T, 1)
    k_idx = torch.arange(key_length, device=device)[None, :]  # (1, S)
    return (k_idx <= q_idx)[None, None]  # (1, 1, T, S)


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    return attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S)


def additive_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where attending is allowed, the most negative finite value elsewhere: exp() underflows to exactly 0,
    and a row with no allowed key stays finite (uniform) instead of NaN. Never a magic -1e9 (unsafe in fp16)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def default_position_ids(
    attention_mask: torch.Tensor | None, past_length: int, length: int, device: torch.device
) -> torch.Tensor:
    """Positions past .. past+T-1, shifted left by the number of leading pads so that a left-padded row gets
    the same positions as the row run alone (right padding keeps plain 0, 1, 2, ...)."""
    positions = torch.arange(past_length, past_length + length, device=device)[None]  # (1, T)
    if attention_mask is not None:
        leading_pads = (attention_mask.cumsum(-1) == 0).sum(-1, keepdim=True)  # (B, 1)
        positions = (positions - leading_pads).clamp(min=0)  # (B, T)
    return positions


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
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q Kᵀ / sqrt(d_k) + mask) V, with Q (B, H, T, D) and K, V (B, H, S, D).

    Returns the output in (B, T, H, D) layout, as transformers' kernels do, and the weights (B, H, T, S)."""
    # The scores tensor is fresh, so scaling and masking run in place: two fewer (B, H, T, S) allocations, and
    # the same operations in the same order as the textbook formula (bit-identical results; autograd is
    # unaffected because matmul's backward needs its inputs, not its output).
    scores = torch.matmul(query, key.transpose(-1, -2)).mul_(scaling)  # (B, H, T, S)
    if attention_mask is not None:
        scores.add_(attention_mask)  # additive bias: 0 or finfo.min (+ ALiBi), broadcast from (B|1, H|1, T, S)
    elif module.is_causal and query.shape[2] > 1:
        # No explicit mask means "causal only": the kernels use is_causal=True, so eager must too.
        allowed = causal_mask(query.shape[2], key.shape[2], query.device)  # (1, 1, T, S)
        scores.masked_fill_(~allowed, torch.finfo(scores.dtype).min)
    # Softmax in fp32 so that bf16/fp16 runs return probabilities that sum to 1.
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)  # (B, H, T, S)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value)  # (B, H, T, D)
    return output.transpose(1, 2).contiguous(), weights  # (B, T, H, D), (B, H, T, S)


class CourseTransformerAttention(nn.Module):
    """Multi-head attention: self (encoder), masked self (decoder, `is_causal`) or cross (`is_cross_attention`).

    Q = X W_Q, K = Y W_K, V = Y W_V with Y = X for self-attention and Y = the encoder output for
    cross-attention; the heads' outputs are concatenated and projected by W_O."""

    def __init__(self, config: CourseTransformerConfig, layer_idx: int, is_causal: bool, is_cross_attention: bool):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        # Read by transformers' sdpa wrapper when no mask is given; encoders and cross-attention must say False.
        self.is_causal = is_causal
        self.is_cross_attention = is_cross_attention
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout_prob
        width, bias = config.hidden_size, config.use_bias
        self.q_proj = nn.Linear(width, width, bias=bias)
        self.k_proj = nn.Linear(width, width, bias=bias)
        self.v_proj = nn.Linear(width, width, bias=bias)
        self.o_proj = nn.Linear(width, width, bias=bias)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, *, D)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        key_value_states: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_values: Cache | None = None,
        output_attentions: bool = False,
        head_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, width = hidden_states.shape  # (B, T, C)
        query = self._split_heads(self.q_proj(hidden_states))  # (B, H, T, D)

        cache = past_key_values
        if isinstance(past_key_values, EncoderDecoderCache):
            cache = (
                past_key_values.cross_attention_cache
                if self.is_cross_attention
                else past_key_values.self_attention_cache
            )

        if self.is_cross_attention:
            # The encoder output does not change while decoding: project it once, then reuse the cache.
            if isinstance(past_key_values, EncoderDecoderCache) and past_key_values.is_updated.get(self.layer_idx):
                key = cache.layers[self.layer_idx].keys  # (B, H, S, D)
                value = cache.layers[self.layer_idx].values
            else:
                key = self._split_heads(self.k_proj(key_value_states))  # (B, H, S, D)
                value = self._split_heads(self.v_proj(key_value_states))
                if isinstance(past_key_values, EncoderDecoderCache):
                    key, value = cache.update(key, value, self.layer_idx)
                    past_key_values.is_updated[self.layer_idx] = True
        else:
            key = self._split_heads(self.k_proj(hidden_states))  # (B, H, T, D)
            value = self._split_heads(self.v_proj(hidden_states))
            if position_embeddings is not None:  # rotary positions act on queries and keys only
                cos, sin = position_embeddings
                query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
            if cache is not None:
                key, value = cache.update(key, value, self.layer_idx)  # (B, H, S, D) with S = P + T

        implementation = self.config._attn_implementation or "eager"
        if output_attentions or implementation == "eager":
            # Weights were asked for: run the reference math, which returns them exactly.
            attention_fn: Callable = eager_attention_forward
        else:
            attention_fn = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        extra = {}
        if (
            attention_fn is not eager_attention_forward
            and implementation == "flex_attention"
            and attention_mask is not None
            and attention_mask.shape[1] > 1
        ):
            # transformers' flex wrapper reads head 0 of a mask; a per-head bias (ALiBi) goes in `position_bias`.
            extra["position_bias"], attention_mask = attention_mask, None
        output, weights = attention_fn(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scaling,
            dropout=self.attention_dropout if self.training else 0.0,
            is_causal=self.is_causal,
            **extra,
        )  # (B, T, H, D), (B, H, T, S) or None

        if head_mask is not None:
            # Zeroing a head's output equals zeroing its attention weights (output = weights @ V), so ablation
            # works with every kernel, fused ones included.
            head_mask = head_mask.to(output.dtype)
            output = output * head_mask.view(1, 1, self.num_heads, 1)  # (B, T, H, D)
            if weights is not None:
                weights = weights * head_mask.view(1, self.num_heads, 1, 1)
        output = self.o_proj(output.reshape(batch, length, width))  # (B, T, C): concat heads, project by W_O
        return output, (weights if output_attentions else None)


# --------------------------------------------------------------------------------------------------------------
# Feed-forward, layer, stack
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
    with LayerNorm after the sum (`post`, 2017/BERT) or before the sub-layer (`pre`, GPT-2)."""

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

    def _residual(self, norm: nn.Module, sublayer: Callable, hidden_states: torch.Tensor):
        if self.pre_norm:
            output, weights = sublayer(norm(hidden_states))
            return hidden_states + self.dropout(output), weights
        output, weights = sublayer(hidden_states)
        return norm(hidden_states + self.dropout(output)), weights

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_values: Cache | None = None,
        output_attentions: bool = False,
        head_mask: torch.Tensor | None = None,
        cross_attn_head_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        hidden_states, self_weights = self._residual(
            self.self_attn_norm,
            lambda x: self.self_attn(
                x, attention_mask, None, position_embeddings, past_key_values, output_attentions, head_mask
            ),
            hidden_states,
        )
        cross_weights = None
        if self.cross_attn is not None:
            hidden_states, cross_weights = self._residual(
                self.cross_attn_norm,
                lambda x: self.cross_attn(
                    x,
                    encoder_attention_mask,
                    encoder_hidden_states,
                    None,
                    past_key_values,
                    output_attentions,
                    cross_attn_head_mask,
                ),
                hidden_states,
            )
        hidden_states, _ = self._residual(self.ffn_norm, lambda x: (self.ffn(x), None), hidden_states)
        return hidden_states, self_weights, cross_weights  # (B, T, C), (B, H, T, S) | None, (B, H, T, S_enc) | None


class CourseTransformerEmbeddings(nn.Module):
    """Token embedding (x sqrt(d_model) when `scale_embeddings`) + absolute positions (sinusoidal or learned)
    + token types, then the optional LayerNorm (BERT) and dropout. RoPE and ALiBi act inside attention."""

    def __init__(self, config: CourseTransformerConfig):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
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


def _check_ids(name: str, ids: torch.Tensor, limit: int, field: str) -> None:
    """Fail with a clear message before an embedding lookup would fail with an opaque index error."""
    if ids.dtype not in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor (torch.long), got dtype {ids.dtype}")
    if ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= limit:
        bad = low if low < 0 else high
        raise ValueError(f"{name} contains {bad}, outside [0, {limit}) allowed by config.{field}={limit}")


def _check_token_labels(labels: torch.Tensor | None, inputs: torch.Tensor | None, name: str = "input_ids") -> None:
    """Per-token labels must line up with the tokens: a mismatch would otherwise surface as an opaque error deep
    in the loss (or, worse, broadcast silently)."""
    if labels is None or inputs is None:
        return
    expected = tuple(inputs.shape[:2])
    if tuple(labels.shape) != expected:
        raise ValueError(f"labels has shape {tuple(labels.shape)}, expected the shape of {name} {expected}")
    if labels.dtype not in (torch.long, torch.int):
        raise TypeError(f"labels must be an integer tensor (torch.long; -100 = ignored), got {labels.dtype}")


def _check_attention_layers(attention_layers: Sequence[int] | None, num_layers: int, stack: str) -> None:
    if attention_layers is None:
        return
    for index in attention_layers:
        if isinstance(index, bool) or not isinstance(index, int) or not -num_layers <= index < num_layers:
            raise ValueError(
                f"attention_layers contains {index!r}; the {stack} has {num_layers} layers, so allowed indices "
                f"are {-num_layers} .. {num_layers - 1}"
            )


def _layer_selected(layer_idx: int, attention_layers: Sequence[int] | None, num_layers: int) -> bool:
    if attention_layers is None:
        return True
    return any(layer_idx == (i % num_layers) for i in attention_layers)


class CourseTransformerStack(nn.Module):
    """The encoder (bidirectional self-attention) or the decoder (masked self-attention, and cross-attention when
    the model is an encoder-decoder): embeddings, L layers and, with pre-norm, a final LayerNorm."""

    def __init__(self, config: CourseTransformerConfig, is_decoder: bool):
        super().__init__()
        self.config = config
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

    def _self_attention_bias(
        self,
        attention_mask: torch.Tensor | None,
        length: int,
        past_length: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> torch.Tensor | None:
        """Additive bias (B|1, H|1, T, S) for self-attention, or None when the kernel's own `is_causal` (decoder)
        or no mask at all (encoder) is exact: that keeps the fastest sdpa path."""
        key_length = past_length + length
        has_padding = attention_mask is not None and not bool(attention_mask.all())
        alibi = self.config.position_encoding == "alibi"
        if not has_padding and not alibi and (not self.is_decoder or past_length == 0 or length == 1):
            return None
        allowed = torch.ones(1, 1, length, key_length, dtype=torch.bool, device=device)  # (1, 1, T, S)
        if self.is_decoder:
            allowed = allowed & causal_mask(length, key_length, device)
        if has_padding:
            allowed = allowed & padding_mask(attention_mask)  # (B, 1, T, S)
        bias = additive_bias(allowed, dtype)
        if alibi:
            q_idx = torch.arange(past_length, key_length, device=device)[:, None]  # (T, 1)
            k_idx = torch.arange(key_length, device=device)[None, :]  # (1, S)
            distance = (q_idx - k_idx).abs().to(dtype)  # (T, S)
            bias = bias - self.alibi_slopes.to(dtype)[:, None, None] * distance  # (B|1, H, T, S)
        return bias

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
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        attention_layers: Sequence[int] | None = None,
        head_mask: torch.Tensor | None = None,
        cross_attn_head_mask: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        name = "decoder_input_ids" if self.is_decoder and config.is_encoder_decoder else "input_ids"

        # ---- validate inputs before any heavy work
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(f"pass exactly one of {name} and inputs_embeds")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"{name} must have shape (batch, length), got {tuple(input_ids.shape)}")
            _check_ids(name, input_ids, config.vocab_size, "vocab_size")
        if inputs_embeds is not None and (inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size):
            raise ValueError(
                f"inputs_embeds must have shape (batch, length, config.hidden_size={config.hidden_size}), "
                f"got {tuple(inputs_embeds.shape)}"
            )
        batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        device = (input_ids if input_ids is not None else inputs_embeds).device
        stack = "decoder" if self.is_decoder else "encoder"
        _check_attention_layers(attention_layers, len(self.layers), stack)

        use_cache = use_cache if use_cache is not None else (config.use_cache and self.is_decoder)
        if not self.is_decoder:
            use_cache = False
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=config)
            if self.has_cross_attention:
                past_key_values = EncoderDecoderCache(past_key_values, DynamicCache(config=config))
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, past_length + length):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected (batch, cached + new length) = "
                f"{(batch, past_length + length)}"
            )
        if (
            attention_mask is not None
            and attention_mask.dtype != torch.bool
            and bool(((attention_mask != 0) & (attention_mask != 1)).any())
        ):
            bad = attention_mask[(attention_mask != 0) & (attention_mask != 1)][0].item()
            raise ValueError(
                f"attention_mask contains {bad}; allowed values are 1 (attend) and 0 (padding). For an additive "
                "bias or a custom pattern, mask the scores instead"
            )
        if token_type_ids is not None:
            if config.type_vocab_size == 0:
                raise ValueError("token_type_ids given, but config.type_vocab_size=0 (the model has no token types)")
            _check_ids("token_type_ids", token_type_ids, config.type_vocab_size, "type_vocab_size")
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, past_length, length, device)
        else:
            if position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != length:
                raise ValueError(
                    f"position_ids must have shape (batch or 1, length) = ({batch} or 1, {length}), "
                    f"got {tuple(position_ids.shape)}"
                )
            if config.position_encoding in ("learned", "sinusoidal"):
                _check_ids("position_ids", position_ids, config.max_position_embeddings, "max_position_embeddings")
        if (
            config.position_encoding in ("learned", "sinusoidal")
            and past_length + length > config.max_position_embeddings
        ):
            raise ValueError(
                f"sequence of {past_length + length} positions (cached {past_length} + new {length}) exceeds "
                f"config.max_position_embeddings={config.max_position_embeddings} allowed by "
                f"position_encoding='{config.position_encoding}'"
            )
        if self.has_cross_attention and encoder_hidden_states is None:
            raise ValueError("the decoder of an encoder-decoder needs encoder_hidden_states")
        num_layers = len(self.layers)
        if head_mask is not None:
            head_mask = head_mask.expand(num_layers, -1) if head_mask.dim() == 1 else head_mask  # (L, H)
            if tuple(head_mask.shape) != (num_layers, config.num_attention_heads):
                raise ValueError(
                    f"head_mask has shape {tuple(head_mask.shape)}, expected ({config.num_attention_heads},) or "
                    f"({num_layers}, {config.num_attention_heads})"
                )
        if cross_attn_head_mask is not None and cross_attn_head_mask.dim() == 1:
            cross_attn_head_mask = cross_attn_head_mask.expand(num_layers, -1)

        implementation = config._attn_implementation or "eager"
        if implementation.startswith("flash") and (
            config.position_encoding == "alibi"
            or (attention_mask is not None and not bool(attention_mask.all()))
            or (encoder_attention_mask is not None and not bool(encoder_attention_mask.all()))
        ):
            # The flash kernels take no additive bias: padded batches and ALiBi need sdpa, flex or eager.
            raise ValueError(
                f"attn_implementation={implementation!r} supports unpadded batches without ALiBi only; "
                "use 'sdpa' for padded batches or position_encoding='alibi'"
            )

        # ---- embeddings and masks
        hidden_states = self.embeddings(input_ids, position_ids, token_type_ids, inputs_embeds)  # (B, T, C)
        dtype = hidden_states.dtype
        self_bias = self._self_attention_bias(attention_mask, length, past_length, dtype, device)
        cross_bias = None
        if self.has_cross_attention and encoder_attention_mask is not None and not bool(encoder_attention_mask.all()):
            cross_bias = additive_bias(padding_mask(encoder_attention_mask), dtype)  # (B, 1, 1, S_enc)
        position_embeddings = None
        if config.position_encoding == "rope":
            position_embeddings = rope_cos_sin(position_ids, self.rope_inv_freq, dtype)  # 2 x (B, T, D)

        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        all_cross_attentions = () if output_attentions and self.has_cross_attention else None
        for idx, layer in enumerate(self.layers):
            record = bool(output_attentions) and _layer_selected(idx, attention_layers, num_layers)
            hidden_states, self_weights, cross_weights = layer(
                hidden_states,
                attention_mask=self_bias,
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=cross_bias,
                position_embeddings=position_embeddings,
                past_key_values=past_key_values,
                output_attentions=record,
                head_mask=head_mask[idx] if head_mask is not None else None,
                cross_attn_head_mask=cross_attn_head_mask[idx] if cross_attn_head_mask is not None else None,
            )
            if record:
                all_attentions += (self_weights,)
                if all_cross_attentions is not None:
                    all_cross_attentions += (cross_weights,)
            if output_hidden_states and idx < num_layers - 1:
                all_hidden_states += (hidden_states,)
        if self.final_norm is not None:
            hidden_states = self.final_norm(hidden_states)
        if output_hidden_states and num_layers > 0:
            # The last entry is the stack's output (after the final norm), so hidden_states[-1] == last_hidden_state.
            all_hidden_states += (hidden_states,)

        return BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            cross_attentions=all_cross_attentions,
        )


# --------------------------------------------------------------------------------------------------------------
# Pretrained base and models
# --------------------------------------------------------------------------------------------------------------


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

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers' `init` helpers skip tensors that were loaded from a checkpoint; raw in-place fills would not.
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
    output: 0 ablates a head."""

    def __init__(self, config: CourseTransformerConfig):
        super().__init__(config)
        self.encoder = CourseTransformerStack(config, is_decoder=False) if config.has_encoder else None
        self.decoder = CourseTransformerStack(config, is_decoder=True) if config.has_decoder else None
        self.pooler = CourseTransformerPooler(config) if config.add_pooling_layer else None
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
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        attention_layers: Sequence[int] | None = None,
        head_mask: torch.Tensor | None = None,
        decoder_head_mask: torch.Tensor | None = None,
        cross_attn_head_mask: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPoolingAndCrossAttentions | BaseModelOutputWithPastAndCrossAttentions | Seq2SeqModelOutput:
        shared = dict(
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            attention_layers=attention_layers,
        )
        if self.config.architecture == "encoder":
            out = self.encoder(
                input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, head_mask=head_mask, **shared
            )
            return BaseModelOutputWithPoolingAndCrossAttentions(
                last_hidden_state=out.last_hidden_state,
                pooler_output=self.pooler(out.last_hidden_state) if self.pooler is not None else None,
                hidden_states=out.hidden_states,
                attentions=out.attentions,
            )
        if self.config.architecture == "decoder":
            return self.decoder(
                input_ids,
                attention_mask,
                token_type_ids,
                position_ids,
                inputs_embeds,
                past_key_values=past_key_values,
                use_cache=use_cache,
                head_mask=head_mask,
                **shared,
            )

        if decoder_input_ids is None and decoder_inputs_embeds is None:
            raise ValueError(
                "the encoder-decoder needs decoder_input_ids (or decoder_inputs_embeds); "
                "CourseTransformerForSeq2SeqLM also derives them from labels"
            )
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, head_mask=head_mask, **shared
            )
        elif isinstance(encoder_outputs, tuple):
            encoder_outputs = BaseModelOutput(*encoder_outputs)
        decoder_out = self.decoder(
            decoder_input_ids,
            decoder_attention_mask,
            None,
            decoder_position_ids,
            decoder_inputs_embeds,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=attention_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
            head_mask=decoder_head_mask,
            cross_attn_head_mask=cross_attn_head_mask,
            **shared,
        )
        return Seq2SeqModelOutput(
            last_hidden_state=decoder_out.last_hidden_state,
            past_key_values=decoder_out.past_key_values,
            decoder_hidden_states=decoder_out.hidden_states,
            decoder_attentions=decoder_out.attentions,
            cross_attentions=decoder_out.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=getattr(encoder_outputs, "hidden_states", None),
            encoder_attentions=getattr(encoder_outputs, "attentions", None),
        )


def _require_architecture(model_class: str, config: CourseTransformerConfig, allowed: tuple[str, ...]) -> None:
    if config.architecture not in allowed:
        raise ValueError(
            f"{model_class} needs config.architecture in {allowed}, got architecture={config.architecture!r}"
        )


def _encoder_like(model: CourseTransformerModel, **kwargs) -> BaseModelOutputWithPastAndCrossAttentions:
    """Run the stack that reads a whole sequence: the encoder when there is one, else the decoder."""
    stack = model.encoder if model.encoder is not None else model.decoder
    return stack(**kwargs)


class CourseTransformerForCausalLM(CourseTransformerPreTrainedModel, GenerationMixin):
    """Decoder-only language model (GPT): next-token logits, KV-cached generation."""

    def __init__(self, config: CourseTransformerConfig):
        super().__init__(config)
        _require_architecture(type(self).__name__, config, ("decoder",))
        self.model = CourseTransformerModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._tied_weights_keys = {"lm_head.weight": "model.decoder.embeddings.word_embeddings.weight"}
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

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
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        attention_layers: Sequence[int] | None = None,
        head_mask: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithCrossAttentions:
        _check_token_labels(labels, input_ids if input_ids is not None else inputs_embeds)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            attention_layers=attention_layers,
            head_mask=head_mask,
        )
        hidden_states = out.last_hidden_state
        if logits_to_keep:  # generation only needs the last position's logits
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)  # (B, T, V)
        loss = None
        if labels is not None:
            # Position t predicts token t+1; -100 marks positions without a target (padding).
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
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
    return shifted.masked_fill(shifted == -100, pad_token_id)


class CourseTransformerForSeq2SeqLM(CourseTransformerPreTrainedModel, GenerationMixin):
    """Encoder-decoder (the 2017 translation model): the decoder attends to its past (masked self-attention) and
    to the encoder output (cross-attention, keys/values computed once per generation)."""

    def __init__(self, config: CourseTransformerConfig):
        super().__init__(config)
        _require_architecture(type(self).__name__, config, ("encoder-decoder",))
        self.model = CourseTransformerModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._tied_weights_keys = {"lm_head.weight": "model.encoder.embeddings.word_embeddings.weight"}
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def get_encoder(self, modality: str | None = None) -> nn.Module:
        return self.model.encoder

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
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        attention_layers: Sequence[int] | None = None,
        head_mask: torch.Tensor | None = None,
        decoder_head_mask: torch.Tensor | None = None,
        cross_attn_head_mask: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        **kwargs,
    ) -> Seq2SeqLMOutput:
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
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            attention_layers=attention_layers,
            head_mask=head_mask,
            decoder_head_mask=decoder_head_mask,
            cross_attn_head_mask=cross_attn_head_mask,
        )
        hidden_states = out.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
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


class CourseTransformerForMaskedLM(CourseTransformerPreTrainedModel):
    """Masked language model (BERT): predicts the tokens hidden behind [MASK] from both sides."""

    def __init__(self, config: CourseTransformerConfig):
        super().__init__(config)
        _require_architecture(type(self).__name__, config, ("encoder", "encoder-decoder"))
        self.model = CourseTransformerModel(config)
        self.transform = CourseTransformerMaskedLMHead(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self._tied_weights_keys = {"lm_head.weight": f"model.{_word_embedding_key(config)}"}
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        attention_layers: Sequence[int] | None = None,
        head_mask: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MaskedLMOutput:
        _check_token_labels(labels, input_ids if input_ids is not None else inputs_embeds)
        out = _encoder_like(
            self.model,
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            attention_layers=attention_layers,
            head_mask=head_mask,
        )
        logits = self.lm_head(self.transform(out.last_hidden_state))  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


class CourseTransformerForSequenceClassification(CourseTransformerPreTrainedModel):
    """A sequence summarised by `config.classifier_pooling` (BERT's pooler, the first token such as [CLS], the
    last non-padding token as in GPT, or the mean over tokens), then a linear classifier."""

    def __init__(self, config: CourseTransformerConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = CourseTransformerModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def _pool(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        pooling = self.config.classifier_pooling
        if pooling == "auto":  # BERT's pooler when present, the last token for a causal decoder, else the first
            pooling = (
                "pooler"
                if self.model.pooler is not None
                else ("last" if self.config.architecture == "decoder" else "first")
            )
        if pooling == "pooler":
            return self.model.pooler(hidden_states)  # (B, C)
        if pooling == "first":
            return hidden_states[:, 0]
        if attention_mask is None:
            attention_mask = torch.ones(hidden_states.shape[:2], dtype=torch.long, device=hidden_states.device)
        if pooling == "last":
            positions = torch.arange(hidden_states.shape[1], device=hidden_states.device)  # (T,)
            last = (positions * attention_mask).argmax(-1)  # (B,) index of the last real token, any padding side
            return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last]
        weights = attention_mask.to(hidden_states.dtype)[..., None]  # (B, T, 1)
        return (hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, C)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        attention_layers: Sequence[int] | None = None,
        head_mask: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        out = _encoder_like(
            self.model,
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            attention_layers=attention_layers,
            head_mask=head_mask,
        )
        logits = self.classifier(self.dropout(self._pool(out.last_hidden_state, attention_mask)))  # (B, num_labels)
        loss = None
        if labels is not None:
            loss = _classification_loss(self.config, logits, labels)
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )


def _classification_loss(config: CourseTransformerConfig, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    problem = config.problem_type
    if problem is None:
        if config.num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
        config.problem_type = problem
    if problem == "regression":
        return F.mse_loss(logits.squeeze(-1).float(), labels.float().view(-1))
    if problem == "single_label_classification":
        return F.cross_entropy(logits.float().view(-1, config.num_labels), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


class CourseTransformerForTokenClassification(CourseTransformerPreTrainedModel):
    """A label for every token (tagging, named entities)."""

    def __init__(self, config: CourseTransformerConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = CourseTransformerModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        attention_layers: Sequence[int] | None = None,
        head_mask: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> TokenClassifierOutput:
        _check_token_labels(labels, input_ids if input_ids is not None else inputs_embeds)
        out = _encoder_like(
            self.model,
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            attention_layers=attention_layers,
            head_mask=head_mask,
        )
        logits = self.classifier(self.dropout(out.last_hidden_state))  # (B, T, num_labels)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, self.num_labels).float(), labels.reshape(-1), ignore_index=-100)
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
