"""Head gates for any model: ours through its `head_mask` arguments, any transformers model through the attention lens.

A gate ξ multiplies one head's output before W_O (Michel et al. 2019): 0 ablates the head, 1 leaves it. Gates come
in groups of (L, H), one group per kind of attention:

    "encoder.self"  -> head_mask              (encoder self-attention)
    "decoder.self"  -> decoder_head_mask      (decoder masked self-attention; `head_mask` in a decoder-only model)
    "decoder.cross" -> cross_attn_head_mask   (decoder over the encoder states)

Our model takes them as forward arguments, as differentiable tensors. transformers 5 removed `head_mask` from its
models (huggingface/transformers#41076), so any other model gets them through `AttentionLens(scale=...)`: the same
multiplication of each head's output, in every attention module that goes through transformers' attention interface
(BERT/MiniLM, GPT-2, Llama/SmolLM2, Qwen, BART, T5, ...). The lens takes plain numbers, so there the gates carry no
gradient: gradient importance (∂L/∂ξ) is ours only, ablation works for every model.

    >>> masks = forward_masks(model, {"decoder.self": gate})          # any model      # doctest: +SKIP
    >>> with applied(model, masks) as kwargs:                                            # doctest: +SKIP
    ...     logits = model(**batch, **kwargs).logits

Notation: L layers of a stack, H heads per layer.
"""

from __future__ import annotations

import collections
import contextlib
import re
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from modeling.attention_lens import AttentionLens, attention_modules

__all__ = [
    "GROUPS",
    "applied",
    "forward_masks",
    "head_groups",
    "in_decoder",
    "is_cross_attention",
    "is_ours",
    "lens_layers",
    "model_kind",
]

GROUPS = ("encoder.self", "decoder.self", "decoder.cross")
# group -> forward argument of an encoder-decoder (a one-stack model takes its only mask as `head_mask`)
ARGUMENT = {"encoder.self": "head_mask", "decoder.self": "decoder_head_mask", "decoder.cross": "cross_attn_head_mask"}
KINDS = ("encoder", "decoder", "encoder-decoder")
LENS_CACHE = 1024  # lenses kept per model (a few kB each): every single-head mask of a 30 x 9-head SmolLM2, and more
# transformers' cross-attention modules carry no flag saying so: BART/Whisper `encoder_attn`, BERT/GPT-2
# `crossattention`, T5 `EncDecAttention` (ours sets `is_cross_attention`).
_CROSS_NAME = re.compile(r"(^|\.)(encoder_attn|crossattention|EncDecAttention|cross_attn)$", re.IGNORECASE)


def is_ours(model: nn.Module) -> bool:
    """A course Transformer (it takes head masks as forward arguments)."""
    return getattr(model.config, "model_type", None) == "course_transformer"


def model_kind(model: nn.Module) -> str:
    """ "encoder", "decoder" or "encoder-decoder": ours from its config, others from theirs and their class."""
    config = model.config
    if is_ours(model):
        return config.architecture
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    names = [type(model).__name__, *(getattr(config, "architectures", None) or [])]
    causal = getattr(config, "is_decoder", False) or any("CausalLM" in n or "LMHead" in n for n in names)
    return "decoder" if causal else "encoder"


def is_cross_attention(name: str, module: nn.Module) -> bool:
    """Whether an attention module attends from a decoder to an encoder's states."""
    flag = getattr(module, "is_cross_attention", None)
    return bool(flag) if flag is not None else bool(_CROSS_NAME.search(name))


def in_decoder(name: str, module: nn.Module) -> bool:
    """Whether a self-attention module of an encoder-decoder belongs to its decoder (by name, or causal)."""
    return ".decoder." in f".{name}" or bool(getattr(module, "is_causal", False))


# model -> its lens layers: finding the attention modules reads each module class's source, and a metric asks at
# every batch. Weak keys: a model that goes away takes its entry with it.
_LAYERS: weakref.WeakKeyDictionary[nn.Module, dict[str, list[int]]] = weakref.WeakKeyDictionary()


def lens_layers(model: nn.Module) -> dict[str, list[int]]:
    """group -> the attention lens's layer indices of that group, in order (layer l of the group is the l-th)."""
    if model not in _LAYERS:
        _LAYERS[model] = _find_lens_layers(model)
    return {group: list(indices) for group, indices in _LAYERS[model].items()}


def _find_lens_layers(model: nn.Module) -> dict[str, list[int]]:
    kind = model_kind(model)
    groups: dict[str, list[int]] = {}
    for index, (name, module, _) in enumerate(attention_modules(model)):
        if is_cross_attention(name, module):
            group = "decoder.cross"
        elif kind == "encoder-decoder":
            group = "decoder.self" if in_decoder(name, module) else "encoder.self"
        else:
            group = "decoder.self" if kind == "decoder" else "encoder.self"
        groups.setdefault(group, []).append(index)
    return {group: groups[group] for group in GROUPS if group in groups}


def head_groups(model: nn.Module) -> dict[str, tuple[int, int]]:
    """group -> (layers, heads) of the attention groups `model` has (ours of any architecture, or any model the
    attention lens reaches)."""
    config = model.config
    if is_ours(model):
        heads = config.num_attention_heads
        layers = {"encoder.self": config.num_encoder_layers, "decoder.self": config.num_decoder_layers}
        layers["decoder.cross"] = config.num_decoder_layers
        wanted = {"encoder": GROUPS[:1], "decoder": GROUPS[1:2], "encoder-decoder": GROUPS}.get(config.architecture)
        if wanted is None:
            raise ValueError(f"config.architecture={config.architecture!r}: allowed {', '.join(KINDS)}")
        return {group: (layers[group], heads) for group in wanted}
    found = lens_layers(model)
    if not found:
        raise ValueError(
            f"{type(model).__name__}: no attention module goes through transformers' attention interface, so its "
            "heads cannot be gated (the attention lens cannot reach them)"
        )
    heads = _heads(model)
    return {group: (len(indices), heads) for group, indices in found.items()}


def _heads(model: nn.Module) -> int:
    config = getattr(model.config, "get_text_config", lambda: model.config)()
    for name in ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"{type(model).__name__}: its config states no number of attention heads")


def forward_masks(model: nn.Module, gate_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gates under the forward's argument names; a one-stack model takes its only mask as `head_mask`. For a model
    other than ours the names are the same, and `applied` turns them into a lens."""
    if model_kind(model) != "encoder-decoder":
        return {"head_mask": gate} if (gate := next(iter(gate_tensors.values()), None)) is not None else {}
    return {ARGUMENT[group]: gate for group, gate in gate_tensors.items()}


def lens_scale(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[int, dict[int, float]]:
    """`forward_masks` arguments -> the lens's `scale` {layer: {head: factor}} (heads whose gate is not 1)."""
    layers = lens_layers(model)
    if model_kind(model) != "encoder-decoder":
        groups = {"head_mask": next(iter(layers), None)}
    else:
        groups = {argument: group for group, argument in ARGUMENT.items()}
    scale: dict[int, dict[int, float]] = {}
    for argument, gate in masks.items():
        group = groups.get(argument)
        if group not in layers:
            raise ValueError(f"{argument}: {type(model).__name__} has no {group or argument} attention to gate")
        if gate.requires_grad:
            raise ValueError(
                f"{type(model).__name__}: gates that need a gradient work on our models only (head_mask); the "
                "attention lens scales heads by plain numbers. Use ablation importance for this model."
            )
        if gate.shape != (len(layers[group]), _heads(model)):
            expected = (len(layers[group]), _heads(model))
            raise ValueError(f"{argument}: shape {tuple(gate.shape)}, expected {expected} (layers, heads)")
        for layer, head in (gate != 1).nonzero().tolist():
            scale.setdefault(layers[group][layer], {})[head] = float(gate[layer, head])
    return scale


@contextlib.contextmanager
def applied(model: nn.Module, masks: dict[str, torch.Tensor] | None) -> Iterator[dict[str, torch.Tensor]]:
    """The forward keyword arguments that apply `masks` (from `forward_masks`) inside this block: ours takes them
    as they are; any other model gets none and runs inside an `AttentionLens` that ablates the heads gated 0
    (`ablate`) and scales the others gated neither 0 nor 1 (`scale`)."""
    if not masks or is_ours(model):
        yield dict(masks or {})
        return
    scale = lens_scale(model, masks)
    if not scale:
        yield {}
        return
    # Building a lens reads every module class's source; a metric applies the same masks batch after batch, and an
    # analysis the same single-head masks sweep after sweep, so the model keeps the lenses it was given (a lens can
    # be entered again), the most recent LENS_CACHE of them.
    key = tuple(sorted((layer, tuple(sorted(heads.items()))) for layer, heads in scale.items()))
    cache = model.__dict__.setdefault("_head_gates_lenses", collections.OrderedDict())
    lens = cache.pop(key, None) or _lens(model, scale)
    cache[key] = lens
    while len(cache) > LENS_CACHE:
        cache.popitem(last=False)
    with lens:
        yield {}


def _lens(model: nn.Module, scale: dict[int, dict[int, float]]) -> AttentionLens:
    """A lens that zeroes the heads gated 0 (`ablate`) and multiplies the others by their gate (`scale`)."""
    ablate = {layer: [h for h, f in heads.items() if f == 0.0] for layer, heads in scale.items()}
    factors = {layer: {h: f for h, f in heads.items() if f != 0.0} for layer, heads in scale.items()}
    return AttentionLens(
        model, ablate={k: v for k, v in ablate.items() if v}, scale={k: v for k, v in factors.items() if v}
    )
