"""The attention lens's conformance matrix: every transformers architecture that calls its attention through
`ALL_ATTENTION_FUNCTIONS`, built tiny and checked against eager and the model's own fast kernel.

    python -m scripts.lens_conformance                          # all, writes docs/attention_lens.md and .json
    python -m scripts.lens_conformance --only llama,t5,bert     # a few, same files unless --out names others

For each architecture (a `models/*/modeling_*.py` file of the installed transformers that mentions
`ALL_ATTENTION_FUNCTIONS`) the script builds a tiny randomly initialised model from a shrunken default config
(hidden 32, 2 layers, 4 heads, 2 key/value heads where the config has them, small vocabulary, sliding window 4,
seeded). transformers' per-model testers would give better tiny configs, but the 5.23 sdist ships only the
top-level `tests/*.py` files, not `tests/models/`, so the shrinking is generic. Multimodal folders are tried text
part first (text model types such as `gemma3_text`), then the whole model; models whose base class takes pixel
values, waveforms or mel features get random ones of the shrunken size (no padding).

On a padded batch (batch 2, 7 tokens, left padding where the attention is causal, right padding otherwise), fp32,
eval mode, no gradients, it measures

* weights: `attn_implementation="lens"` + `output_attentions=True` against eager's weights, max |Δ| over real
  (non-padding) query rows of every recorded attention;
* output: the lens's outputs with and without weights requested against the model's own fast kernel (sdpa where the
  model supports it, else eager) at real positions; without any request the lens must be bit-identical to sdpa;
* ablation: `AttentionLens(model, ablate={i: [h]})` against zeroing head h's slice of the output projection's input
  with a forward pre-hook (last attention module that runs, last head), under the fast kernel.

Statuses: exact (all three ≤ 1e-5; whether the lens without a request is bit-identical to sdpa is reported beside
it), refused (the lens's ValueError, at
construction or at the call), mismatch (a number above the tolerance), not buildable (no tiny model or no inputs we
can make: the reason), error (anything else the lens raised). Each model runs in a worker process with a timeout;
one failure never stops the run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import multiprocessing
import os
import re
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from tqdm import tqdm
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.auto import configuration_auto, modeling_auto

from modeling.attention_lens import (
    LENS,
    AttentionLens,
    attention_modules,
    find_output_projection,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "attention_lens.md"
TOLERANCE = 1e-5
BATCH, LENGTH, PADDING = 2, 7, 3  # the second sequence has PADDING pad tokens
SEED = 0
PROBE = "lens_conformance_probe"

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 32, 2, 4, 2, 8, 64, 99
# Config fields set when the default config has them (hidden sizes, depths, widths, mixture-of-experts sizes,
# vision and audio front ends). Lists whose length is the depth are cut to the new depth (see `shrink_dict`).
SHRINK = {
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "embed_dim", "dim", "model_dim", "n_embed"), HIDDEN),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers"), LAYERS),
    **dict.fromkeys(("decoder_layers", "num_decoder_layers", "depth", "num_encoder_layers"), LAYERS),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads"), HEADS),
    **dict.fromkeys(("decoder_attention_heads", "num_decoder_attention_heads", "attention_heads"), HEADS),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "d_ff", "n_inner"), FFN),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size"), FFN),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_k", "top_k", "num_selected_experts"), 2),
    "head_dim": HEAD_DIM,
    "d_kv": HEAD_DIM,
    "kv_channels": HEAD_DIM,
    "vocab_size": VOCAB,
    "sliding_window": 4,
    "image_size": 32,
    "patch_size": 8,
    "num_channels": 3,
    "max_source_positions": 16,
    "qk_nope_head_dim": HEAD_DIM,
    "qk_rope_head_dim": 4,
    "v_head_dim": HEAD_DIM,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "mamba_n_heads": 4,
    "mamba_d_head": 16,
    "attn_layer_period": 2,
    "attn_layer_offset": 1,
    "expert_layer_period": 2,
    "expert_layer_offset": 1,
}
MAXIMA = ("num_experts_per_tok", "moe_k", "top_k", "num_selected_experts", "num_experts", "num_local_experts")
NONE_FILLED = ("head_dim", "vocab_size", "moe_intermediate_size")
DEPTH_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers", "decoder_layers")
# W_O names beyond the lens's OUTPUT_PROJECTIONS, passed as its `output_projection` (ModernBERT's Wo, ...).
EXTRA_PROJECTIONS = ("Wo", "wo", "out", "output_proj", "linear_out", "o_proj_layer", "attn_out", "out_dense")
IMAGE, WAVEFORM, FEATURES = "pixel_values", "input_values", "input_features"


class NotBuildable(Exception):
    """No tiny model or no inputs we can make: the message says why."""


# --------------------------------------------------------------------------------------------------------------
# Which architectures
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Architecture:
    """One modeling file that calls attention through the interface, with its candidate model types, best first."""

    name: str  # the file's stem without "modeling_": llama, data2vec_text, ...
    module: str  # transformers.models.<folder>.modeling_<name>
    model_types: list[str]


def _package_dir() -> Path:
    return Path(transformers.__file__).parent


def discover() -> list[Architecture]:
    """Every `models/*/modeling_*.py` mentioning ALL_ATTENTION_FUNCTIONS, with the model types whose base class
    (MODEL_MAPPING_NAMES) it defines: a text type first (`gemma3_text`, `clip_text_model`: the text part of a
    multimodal model), then the folder's own type, then the others."""
    found = []
    for path in sorted((_package_dir() / "models").glob("*/modeling_*.py")):
        source = path.read_text(encoding="utf-8")
        if "ALL_ATTENTION_FUNCTIONS" not in source:
            continue
        classes = set(re.findall(r"^class (\w+)\(", source, flags=re.M))
        folder, name = path.parent.name, path.stem.removeprefix("modeling_")
        types = [t for t, cls in modeling_auto.MODEL_MAPPING_NAMES.items() if _first(cls) in classes]
        types.sort(key=lambda t: ("text" not in t, t.replace("-", "_") not in (folder, name), t))
        found.append(Architecture(name, f"transformers.models.{folder}.{path.stem}", types))
    return found


def _first(names: str | tuple[str, ...]) -> str:
    return names[0] if isinstance(names, tuple) else names


# --------------------------------------------------------------------------------------------------------------
# A tiny model and its inputs
# --------------------------------------------------------------------------------------------------------------


def shrink_dict(values: dict[str, Any], grouped: bool = True) -> dict[str, Any]:
    """A config's `to_dict()` made tiny: SHRINK's fields, depth-long lists and per-layer dicts cut to the first layer
    of each distinct kind (so a [sliding, …, full] pattern keeps both and a hybrid keeps an attention layer),
    sub-configs likewise, rotary sections scaled to the new head size. `grouped`: KV_HEADS key/value heads (GQA)
    where the config has the field, else as many as query heads."""
    values = dict(values)
    depth = next((values[f] for f in DEPTH_FIELDS if isinstance(values.get(f), int)), None)
    keep = _kept_layers(values, depth)
    for name, value in list(values.items()):
        if isinstance(value, dict) and ("model_type" in value or name.endswith("_config")):
            values[name] = shrink_dict(value, grouped) if name != "per_layer_config" else _per_layer(value, keep)
        elif isinstance(value, list) and depth and len(value) == depth and depth > 1:
            values[name] = [value[i] for i in keep]
        elif name in SHRINK and isinstance(value, int) and not isinstance(value, bool) and value > 0:
            values[name] = SHRINK[name] if name not in DEPTH_FIELDS else len(keep) if depth else LAYERS
            if name in MAXIMA:  # never more experts chosen than the default (a validator may insist on 1)
                values[name] = min(value, SHRINK[name])
        elif name in NONE_FILLED and value is None:  # computed by the model, but from full-size fields
            values[name] = SHRINK[name]
    _shrink_heads(values, grouped and "kv_lora_rank" not in values)  # latent attention: one key head per head
    for name in ("out_features", "out_indices"):  # backbone stages named after the full depth
        if name in values:
            values[name] = None
    if values.get("sliding_window", 0) is None and "sliding_attention" in (values.get("layer_types") or []):
        values["sliding_window"] = SHRINK["sliding_window"]
    _fix_rotary_sections(values)
    _fix_ids(values)
    return values


def _per_layer(per_layer: dict, keep: list[int]) -> dict:
    """A {layer index: overrides} dict renumbered to the kept layers."""
    return {new: per_layer[key] for new, old in enumerate(keep) for key in per_layer if str(key) == str(old)}


def _shrink_heads(values: dict[str, Any], grouped: bool) -> None:
    """KV_HEADS key/value heads when `grouped` (GQA, also where the default has as many as query heads: the
    feature is what we test), HEADS otherwise; multi-query stays multi-query."""
    for name in ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num"):
        if name in values and (isinstance(values[name], int) or name == "num_key_value_heads"):
            values[name] = 1 if values[name] == 1 else KV_HEADS if grouped else HEADS


def _fix_rotary_sections(values: dict[str, Any]) -> None:
    """M-RoPE's `mrope_section` must sum to half the rotated dims: scale it (largest remainders) to the new size."""
    heads = values.get("num_attention_heads") or HEADS
    head_dim = values.get("head_dim") or (values.get("hidden_size") or HIDDEN) // heads
    for rope in (values.get("rope_parameters"), values.get("rope_scaling")):
        if not isinstance(rope, dict):
            continue
        for params in [rope, *[v for v in rope.values() if isinstance(v, dict)]]:
            sections = params.get("mrope_section")
            if isinstance(sections, list) and sections:
                rotated = int(head_dim * params.get("partial_rotary_factor", values.get("partial_rotary_factor") or 1))
                params["mrope_section"] = _scale_sections(sections, rotated // 2)


def _scale_sections(sections: list[int], total: int) -> list[int]:
    exact = [s * total / sum(sections) for s in sections]
    scaled = [int(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: scaled[i] - exact[i])[: total - sum(scaled)]:
        scaled[i] += 1
    return scaled


def _kept_layers(values: dict[str, Any], depth: int | None) -> list[int]:
    """Indices of the layers kept: the first of each distinct kind in `layer_types` (or any depth-long list of
    strings), at least LAYERS of them."""
    if not depth:
        return list(range(LAYERS))
    kinds = values.get("layer_types")
    if not (isinstance(kinds, list) and len(kinds) == depth):
        kinds = next((v for v in values.values() if isinstance(v, list) and len(v) == depth and v and
                      isinstance(v[0], str)), None)  # fmt: skip
    keep: list[int] = []
    if kinds:
        seen: set = set()
        for i, kind in enumerate(kinds):
            if repr(kind) not in seen:
                seen.add(repr(kind))
                keep.append(i)
    for i in range(depth):
        if len(keep) >= LAYERS:
            break
        if i not in keep:
            keep.append(i)
    return sorted(keep)


def _fix_ids(values: dict[str, Any]) -> None:
    """Special token ids must fit the small vocabulary: the vocabulary grows to hold them."""
    if not isinstance(values.get("vocab_size"), int):
        return
    ids = [v for k, v in values.items() if k.endswith("token_id") and isinstance(v, int) and v >= 0]
    if ids and max(ids) >= values["vocab_size"] and max(ids) < 300_000:
        values["vocab_size"] = max(ids) + 1


def tiny_config(model_type: str, grouped: bool = True):
    """The model type's default config made tiny, attention dropout off."""
    config_class = configuration_auto.CONFIG_MAPPING[model_type]
    values = shrink_dict(config_class().to_dict(), grouped)
    for name in ("model_type", "transformers_version", "architectures"):
        values.pop(name, None)
    try:
        config = config_class(**values)
    except Exception as error:
        raise NotBuildable(f"config: {type(error).__name__}: {_short(error)}") from None
    for sub in [config, *[getattr(config, k) for k in getattr(config, "sub_configs", {}) or {}]]:
        for name in ("attention_dropout", "attention_probs_dropout_prob", "attn_pdrop", "dropout", "hidden_dropout"):
            if isinstance(getattr(sub, name, None), float):
                setattr(sub, name, 0.0)
    return config


@dataclass
class Built:
    """A tiny model, its inputs and which query rows are real (None: all)."""

    model_type: str
    model: nn.Module
    inputs: dict[str, torch.Tensor]
    input_kind: str
    row_mask: torch.Tensor | None  # (B, T) bool for the encoder / decoder-only sequence
    causal: bool


def build(arch: Architecture) -> Built:
    """The first of the architecture's model types that builds tiny and runs eagerly; NotBuildable with every
    type's reason otherwise."""
    if not arch.model_types:
        raise NotBuildable("no base model class in MODEL_MAPPING_NAMES is defined in this file")
    reasons = []
    for model_type in arch.model_types:
        try:
            return build_type(model_type)
        except Exception:  # some validate (or assume) as many key/value heads as query heads
            pass
        try:
            return build_type(model_type, grouped=False)
        except NotBuildable as error:
            reasons.append(f"{model_type}: {error}")
        except Exception as error:  # a model that cannot be built is not the lens's failure
            reasons.append(f"{model_type}: {type(error).__name__}: {_short(error)}")
    raise NotBuildable("; ".join(reasons))


def build_type(model_type: str, grouped: bool = True) -> Built:
    config = tiny_config(model_type, grouped)
    model_class = getattr(transformers, _first(modeling_auto.MODEL_MAPPING_NAMES[model_type]))
    torch.manual_seed(SEED)
    try:
        model = model_class(config).float().eval()
    except Exception as error:
        raise NotBuildable(f"init: {type(error).__name__}: {_short(error)}") from None
    found = attention_modules(model)
    if not found:
        raise NotBuildable(f"{type(model).__name__} has no attention module that calls the interface")
    causal = any(getattr(m, "is_causal", False) for _, m, _ in found)
    causal = causal and not getattr(config, "is_encoder_decoder", False)  # an encoder's input pads on the right
    inputs, kind, rows = make_inputs(model, config, causal)
    built = Built(model_type, model, inputs, kind, rows, causal)
    try:
        forward(built, "eager")
    except Exception as error:
        raise NotBuildable(f"eager forward on {kind} inputs: {type(error).__name__}: {_short(error)}") from None
    return built


def make_inputs(model: nn.Module, config, causal: bool) -> tuple[dict[str, torch.Tensor], str, torch.Tensor | None]:
    """Inputs by the forward's signature: padded token ids, else random pixels / waveform / mel features."""
    params = inspect.signature(model.forward).parameters
    generator = torch.Generator().manual_seed(SEED)
    rows = None
    if "input_ids" in params:
        inputs, rows = text_inputs(config, causal, generator)
        kind = "text"
    elif IMAGE in params:
        size = _get(config, "image_size", 32)
        size = size[0] if isinstance(size, list | tuple) else size
        channels = _get(config, "num_channels", 3)
        inputs, kind = {IMAGE: torch.randn(BATCH, channels, size, size, generator=generator)}, "image"
    elif WAVEFORM in params:
        inputs, kind = {WAVEFORM: torch.randn(BATCH, 3200, generator=generator)}, "audio"
    elif FEATURES in params:
        frames, bins = 2 * _get(config, "max_source_positions", 16), _get(config, "num_mel_bins", 80)
        inputs, kind = {FEATURES: torch.randn(BATCH, bins, frames, generator=generator)}, "audio features"
    else:
        raise NotBuildable(f"forward takes none of input_ids / {IMAGE} / {WAVEFORM} / {FEATURES}")
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        inputs["decoder_input_ids"] = _token_ids(config, generator)[:, : LENGTH - 2]  # (B, T_dec): cross is T≠S
    if "use_cache" in params:
        inputs["use_cache"] = False  # no cache bookkeeping: hybrids whose kept layers hold no attention cache
    empty, positional = inspect.Parameter.empty, inspect.Parameter.POSITIONAL_OR_KEYWORD
    missing = [n for n, p in params.items() if p.default is empty and p.kind == positional and n not in inputs]
    if missing:
        raise NotBuildable(f"forward requires {missing}")
    return inputs, kind, rows


def _get(config, name: str, default):
    for place in (config, getattr(config, "vision_config", None), getattr(config, "audio_config", None)):
        value = getattr(place, name, None) if place is not None else None
        if value is not None:
            return value
    return default


def _specials(config) -> set[int]:
    names = [n for n in dir(config) if n.endswith("token_id")]
    return {v for n in names if isinstance(v := getattr(config, n, None), int)}


def _token_ids(config, generator: torch.Generator) -> torch.Tensor:
    vocab = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", VOCAB)
    specials = _specials(config) | _specials(getattr(config, "text_config", config))
    allowed = torch.tensor([i for i in range(min(vocab, 1000)) if i not in specials and i > 2])
    return allowed[torch.randint(len(allowed), (BATCH, LENGTH), generator=generator)]  # (B, T)


def text_inputs(config, causal: bool, generator: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Token ids (B, T) with the second row padded (left for causal attention, right otherwise) and its mask."""
    ids = _token_ids(config, generator)
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)  # (B, T)
    pad = slice(0, PADDING) if causal else slice(LENGTH - PADDING, LENGTH)
    mask[1, pad] = 0
    pad_id = getattr(config, "pad_token_id", None)
    if not isinstance(pad_id, int):
        pad_id = getattr(getattr(config, "text_config", None), "pad_token_id", None)
    ids[1, pad] = pad_id if isinstance(pad_id, int) else 0
    return {"input_ids": ids, "attention_mask": mask}, mask.bool()


# --------------------------------------------------------------------------------------------------------------
# Running and comparing
# --------------------------------------------------------------------------------------------------------------


def fast_kernel(built: Built) -> str:
    """sdpa where the model claims it and it runs (Gemma 2's softcap refuses it at the call), else eager."""
    if getattr(built.model, "_supports_sdpa", False):
        with contextlib.suppress(Exception):
            forward(built, "sdpa")
            return "sdpa"
    return "eager"


def forward(built: Built, name: str | None, weights: bool = False):
    """One forward under attention implementation `name` (None: as the model is set), reseeded first (ViT-MAE draws
    its patch masking at random)."""
    if name is not None:
        built.model.set_attn_implementation(name)
    torch.manual_seed(SEED)
    with torch.no_grad():
        return built.model(**built.inputs, output_attentions=weights or None)


def output_tensors(built: Built, out) -> dict[str, torch.Tensor]:
    """The floating outputs (hidden states, logits) at real positions; encoder-side rows of an encoder-decoder and
    every row of a decoder-only or encoder model are masked by the padding."""
    encoder_decoder = "decoder_input_ids" in built.inputs
    found = {}
    for key, value in out.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        if "attentions" in key or ("hidden_states" in key and "last" not in key):
            continue
        padded = built.row_mask is not None and value.dim() >= 2 and value.shape[:2] == built.row_mask.shape
        if padded and (key.startswith("encoder") or not encoder_decoder):
            value = value[built.row_mask]  # (real positions, ...)
        found[key] = value
    return found


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        raise RuntimeError(f"different outputs: {sorted(a)} vs {sorted(b)}")
    if not a:
        raise RuntimeError("the model returned no floating output to compare")
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


def attention_maps(built: Built, out) -> dict[str, torch.Tensor]:
    """Every recorded attention (B, H, T, S), restricted to real query rows: the padding mask applies to the
    decoder-only / encoder self-attention (`attentions`, `encoder_attentions`), not to a decoder's rows."""
    maps = {}
    for key, value in out.items():
        if "attentions" not in key or value is None:
            continue
        for i, weights in enumerate(value):
            if not isinstance(weights, torch.Tensor):
                continue
            rows = built.row_mask if key in ("attentions", "encoder_attentions") else None
            if rows is not None and weights.dim() == 4 and weights.shape[0] == BATCH and weights.shape[2] == LENGTH:
                weights = weights.permute(0, 2, 1, 3)[rows]  # (real rows, H, S)
            maps[f"{key}[{i}]"] = weights
    return maps


@dataclass
class Probe:
    """What the attention calls passed in one sdpa forward: per module name, shapes and non-None keywords."""

    calls: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, module, query, key, value, attention_mask, *args, **kwargs):
        passed = {k: v for k, v in kwargs.items() if v is not None and v is not False}
        kwargs.pop("softcap", None)  # sdpa refuses it; this output is not compared, only the calls recorded
        self.calls.append(
            {
                "module": module,
                "query_heads": query.shape[1],
                "key_heads": key.shape[1],
                "cross": bool(getattr(module, "is_cross_attention", False)) or query.shape[2] != key.shape[2],
                "value_dim_differs": value.shape[-1] != query.shape[-1],
                "causal": bool(getattr(module, "is_causal", False)),
                "keywords": sorted(passed),
            }
        )
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


def probe(built: Built) -> Probe:
    recorder = Probe()
    AttentionInterface.register(PROBE, recorder)
    AttentionMaskInterface.register(PROBE, sdpa_mask)
    forward(built, PROBE)
    return recorder


def features(built: Built, calls: list[dict[str, Any]]) -> list[str]:
    """What the architecture exercises, from the probed calls and the config."""
    found = [built.input_kind] if built.input_kind != "text" else []
    if getattr(built.model.config, "is_encoder_decoder", False):
        found.append("encoder-decoder")
    found.append("causal" if any(c["causal"] for c in calls) else "bidirectional")
    if any(c["key_heads"] == 1 < c["query_heads"] for c in calls):
        found.append("MQA")
    elif any(c["key_heads"] < c["query_heads"] for c in calls):
        found.append("GQA")
    if any(c["cross"] for c in calls):
        found.append("cross-attention")
    if any(c["value_dim_differs"] for c in calls):
        found.append("V dim ≠ QK dim")
    labels = {"sliding_window": "sliding window", "softcap": "softcap", "s_aux": "sinks"}
    labels["position_bias"] = "position_bias"
    keywords = sorted({k for c in calls for k in c["keywords"]})
    found += [labels[k] for k in keywords if k in labels]
    ignored = {"dropout", "scaling", "position_ids", "cache_position", "is_causal", "output_attentions", "use_cache"}
    found += [k for k in keywords if k not in labels and k not in ignored]
    return found


def ablation_site(built: Built, lens: AttentionLens, calls: list[dict[str, Any]]) -> tuple[int, int, nn.Module]:
    """(layer, head, W_O) for the ablation check: the last attention module that ran whose W_O is found."""
    ran = {id(c["module"]) for c in calls}
    found = attention_modules(built.model)
    for index in reversed(range(len(found))):
        name, module, parent = found[index]
        if id(module) not in ran:
            continue
        for name in (None, *EXTRA_PROJECTIONS):
            with contextlib.suppress(ValueError):
                return index, lens._sites[index].num_heads - 1, find_output_projection(module, parent, name)
    raise NotBuildable(
        "weights and outputs checked, but no ablation reference: no attention module that ran has an output "
        "projection find_output_projection knows"
    )


def zero_head_hook(projection: nn.Module, head: int, heads: int) -> Callable:
    """A forward pre-hook zeroing head `head`'s slice of the projection's input (B, T, H·D)."""
    width = projection.weight.shape[0] if type(projection).__name__ == "Conv1D" else projection.weight.shape[1]
    dim = width // heads

    def hook(_module, args):
        x = args[0].clone()
        x[..., head * dim : (head + 1) * dim] = 0.0
        return (x, *args[1:])

    return hook


# --------------------------------------------------------------------------------------------------------------
# One architecture
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Result:
    """One row of the matrix."""

    name: str
    status: str  # exact / refused / mismatch / not buildable / error
    model_type: str | None = None
    model_class: str | None = None
    input_kind: str | None = None
    features: list[str] = field(default_factory=list)
    fast_kernel: str | None = None
    weights_diff: float | None = None
    output_diff: float | None = None  # max of the lens with and without weights against the fast kernel
    output_diff_plain: float | None = None
    output_diff_weights: float | None = None
    bit_identical: bool | None = None  # lens without a request vs sdpa
    ablation_diff: float | None = None
    ablation_effect: float | None = None  # how much the ablation moved the reference: the check is not vacuous
    ablation_site: str | None = None
    attention_maps: int | None = None
    detail: str = ""
    seconds: float = 0.0


def check(arch: Architecture) -> Result:
    """Build the architecture tiny and run the three checks; never raises."""
    start = time.perf_counter()
    result = Result(arch.name, "error")
    try:
        built = build(arch)
        result.model_type, result.model_class = built.model_type, type(built.model).__name__
        result.input_kind, result.fast_kernel = built.input_kind, fast_kernel(built)
        run_checks(built, result)
    except NotBuildable as error:
        result.status, result.detail = "not buildable", str(error)
    except Exception as error:
        result.status = "refused" if _is_refusal(error) else "error"
        result.detail = f"{type(error).__name__}: {_short(error, 600)}"
        if result.status == "error":
            result.detail += " @ " + _where(error)
    result.seconds = round(time.perf_counter() - start, 2)
    return result


def run_checks(built: Built, result: Result) -> None:
    calls = probe(built).calls
    result.features = features(built, calls)
    lens = AttentionLens(built.model)  # refuses here (ValueError) what it cannot make exact
    reference = output_tensors(built, forward(built, result.fast_kernel))
    eager = forward(built, "eager", weights=True)
    eager_maps = attention_maps(built, eager)
    plain = forward(built, LENS)
    with_weights = forward(built, LENS, weights=True)
    lens_maps = attention_maps(built, with_weights)
    if not eager_maps or eager_maps.keys() != lens_maps.keys():
        raise RuntimeError(f"attentions recorded: eager {len(eager_maps)}, lens {len(lens_maps)}")
    result.attention_maps = len(lens_maps)
    result.weights_diff = max(float((eager_maps[k] - lens_maps[k]).abs().max()) for k in lens_maps)
    result.output_diff_plain = max_diff(output_tensors(built, plain), reference)
    result.output_diff_weights = max_diff(output_tensors(built, with_weights), reference)
    result.output_diff = max(result.output_diff_plain, result.output_diff_weights)
    if result.fast_kernel == "sdpa":
        sdpa, lens_plain = output_tensors(built, forward(built, "sdpa")), output_tensors(built, plain)
        result.bit_identical = all(torch.equal(sdpa[k], lens_plain[k]) for k in sdpa)
    try:
        check_ablation(built, lens, calls, reference, result)
    except NotBuildable as error:  # no ablation reference; a wrong weight or output is still a mismatch
        result.detail = str(error)
    numbers = (result.weights_diff, result.output_diff, result.ablation_diff)
    if result.bit_identical is False and not result.detail:
        result.detail = DIAGNOSES.get(result.name, "within 1e-5 of sdpa, not bit-identical without a request")
    if any(n is not None and n > TOLERANCE for n in numbers):
        result.status = "mismatch"
    else:
        result.status = "exact" if result.ablation_diff is not None else "not buildable"


def check_ablation(built: Built, lens: AttentionLens, calls, reference, result: Result) -> None:
    layer, head, projection = ablation_site(built, lens, calls)
    result.ablation_site = f"layer {layer} ({lens.layer_names[layer]}), head {head}"
    handle = projection.register_forward_pre_hook(zero_head_hook(projection, head, lens._sites[layer].num_heads))
    try:
        expected = output_tensors(built, forward(built, result.fast_kernel))
    finally:
        handle.remove()
    built.model.set_attn_implementation(result.fast_kernel)  # what the lens restores on leaving
    with AttentionLens(built.model, ablate={layer: [head]}):
        ablated = output_tensors(built, forward(built, None))
    result.ablation_diff = max_diff(ablated, expected)
    result.ablation_effect = max_diff(expected, reference)


def _is_refusal(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, ValueError) and ("the lens" in text or "attn_implementation='lens'" in text)


def _short(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _where(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"


# --------------------------------------------------------------------------------------------------------------
# Workers: one process per job, a timeout per model, a crash costs one row
# --------------------------------------------------------------------------------------------------------------


def _worker(connection, threads: int) -> None:
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    by_name = {a.name: a for a in discover()}
    while True:
        name = connection.recv()
        if name is None:
            return
        connection.send(dataclasses.asdict(check(by_name[name])))


class Worker:
    """A forked process that checks one architecture at a time; replaced after a timeout or a crash."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.name: str | None = None
        self.started = 0.0
        self._start()

    def _start(self) -> None:
        context = multiprocessing.get_context("fork")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child, self.threads), daemon=True)
        self.process.start()

    def submit(self, name: str) -> None:
        self.name, self.started = name, time.perf_counter()
        self.connection.send(name)

    def collect(self) -> Result:
        try:
            row = self.connection.recv()
        except (EOFError, OSError):
            row = dataclasses.asdict(Result(self.name, "error", detail=f"worker died ({self.process.exitcode})"))
            self.restart()
        self.name = None
        return Result(**row)

    def timed_out(self, timeout: float) -> bool:
        return self.name is not None and time.perf_counter() - self.started > timeout

    def restart(self) -> None:
        self.process.kill()
        self.process.join()
        self._start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.send(None)
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()


def run_all(names: list[str], jobs: int = 1, timeout: float = 180.0) -> list[Result]:
    """Check `names` in `jobs` worker processes, one torch thread each, with a per-model timeout."""
    workers = [Worker(threads=1) for _ in range(max(1, jobs))]
    pending, results = list(names), []
    with tqdm(total=len(names), desc="lens conformance", unit="model") as bar:
        while pending or any(w.name for w in workers):
            for worker in workers:
                if worker.name is None and pending:
                    worker.submit(pending.pop(0))
            busy = {w.connection: w for w in workers if w.name}
            for connection in wait(list(busy), timeout=1.0):
                results.append(busy[connection].collect())
                bar.set_postfix_str(f"{results[-1].name}: {results[-1].status}")
                bar.update()
            for worker in workers:
                if worker.timed_out(timeout):
                    results.append(Result(worker.name, "error", detail=f"timed out after {timeout:.0f} s"))
                    worker.name = None
                    worker.restart()
                    bar.update()
    for worker in workers:
        worker.close()
    return sorted(results, key=lambda r: r.name)


# --------------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------------

STATUSES = ("exact", "refused", "mismatch", "not buildable", "error")

# What we found behind rows that are not exact (transformers 5.23, the lens of this commit), shown only while an
# architecture's status is not exact; rows the lens refuses carry its own message. Checked by hand.
DIAGNOSES = {
    **dict.fromkeys(
        ("axk2", "deepseek_v32", "glm_moe_dsa", "hy_v4", "mistral_large4", "minimax_m3_vl"),
        "sparse attention (`indices` / `block_indices` select the keys each query reads): a correct refusal",
    ),
    "inkling2": "sinks passed under another name (`sinks`, not `s_aux`): refused until that keyword is mapped",
    "glm5_next": "exact within 1e-5, not bit-identical to sdpa without a request: its top-k mask builder returns "
    "a boolean mask only when the implementation is named 'sdpa' and an additive one otherwise, and sdpa rounds the "
    "two differently (1.2e-7)",
    "deepseek_v4": "weights and outputs exact; no output projection that `find_output_projection` knows, so no "
    "ablation reference (its attention output goes through a grouped projection)",
}


def counts(results: list[Result]) -> dict[str, int]:
    return {status: sum(r.status == status for r in results) for status in STATUSES}


def _number(value: float | None) -> str:
    return "n/a" if value is None else "0" if value == 0 else f"{value:.1e}"


def findings(results: list[Result]) -> list[str]:
    """One line per built architecture that is not exact: status, the numbers and what we found behind it."""
    lines = ["## Not exact: what is behind each", ""]
    for r in results:
        if r.status in ("exact", "not buildable"):
            continue
        numbers = f" (Δ weights {_number(r.weights_diff)}, Δ output {_number(r.output_diff)}, Δ ablation " \
            f"{_number(r.ablation_diff)})" if r.status == "mismatch" else ""  # fmt: skip
        lines.append(f"* **{r.name}**, {r.status}{numbers}: {DIAGNOSES.get(r.name, _short(Exception(r.detail), 200))}")
    return [*lines, ""]


def render_markdown(results: list[Result], seconds: float) -> str:
    total = counts(results)
    built = total["exact"] + total["refused"] + total["mismatch"] + total["error"]
    lines = [
        "# The attention lens across transformers' architectures",
        "",
        "Generated by `python -m scripts.lens_conformance` (transformers "
        f"{transformers.__version__}, torch {torch.__version__}, CPU, {seconds:.0f} s). "
        "Do not edit by hand: rerun the script.",
        "",
        "## Counts",
        "",
        f"{len(results)} architectures (modeling files that call `ALL_ATTENTION_FUNCTIONS`); {built} built tiny, "
        f"of which {total['exact']} ({100 * total['exact'] / max(built, 1):.0f}%) are exact.",
        "",
        "| status | count |",
        "| --- | --- |",
        *[f"| {status} | {n} |" for status, n in total.items()],
        "",
        *findings(results),
        METHOD,
        "## The matrix",
        "",
        "Δ weights: lens vs eager weights over real query rows; Δ output: lens (with and without weights requested) "
        "vs the fast kernel at real positions, `=` when the lens without a request is bit-identical to sdpa; "
        "Δ ablation: `AttentionLens(ablate=...)` vs zeroing the head's slice of W_O's input.",
        "",
        "| architecture | model | features | Δ weights | Δ output | Δ ablation | status | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        same = " =" if r.bit_identical else ""
        note = r.detail.replace("|", "\\|").replace("\n", " ")[:300]
        if r.status != "exact" and r.name in DIAGNOSES:
            note = f"**{DIAGNOSES[r.name]}.** {note}"
        lines.append(
            f"| {r.name} | {r.model_class or ''} | {', '.join(r.features)} | {_number(r.weights_diff)} | "
            f"{_number(r.output_diff)}{same} | {_number(r.ablation_diff)} | {r.status} | {note} |"
        )
    return "\n".join(lines) + "\n"


METHOD = """## Method

Each architecture is a `models/*/modeling_*.py` file of the installed transformers that mentions
`ALL_ATTENTION_FUNCTIONS`. Its default config is shrunk (hidden 32, 2 layers, or one of each kind listed in
`layer_types`, 4 heads, 2 key/value heads where the config has them, head dim 8, feed-forward 64, vocabulary 99,
sliding window 4, images 32×32 in 8×8 patches) and its base model class (`MODEL_MAPPING_NAMES`; a text type such as
`gemma3_text` or `clip_text_model` first in a multimodal folder) is built with seed 0, fp32, eval mode.
transformers' own per-model testers would give hand-made tiny configs, but the 5.23 sdist ships only the top-level
`tests/*.py`, not `tests/models/`.
Inputs: 2 sequences of 7 token ids, the second with 3 pad tokens on the left when the attention is causal and on
the right otherwise (encoder-decoders: unpadded decoder ids); image, waveform and mel-feature models get random
inputs without padding. A probe implementation records what each attention call passes (the features column).

* **exact**: weights within 1e-5 of eager's over real query rows, the lens's outputs (with and without
  `output_attentions`) within 1e-5 of the fast kernel (sdpa, or eager where the model has no sdpa) at real
  positions (without a request also bit-identical to sdpa, marked `=`, wherever the model builds the same mask for
  "lens" as for "sdpa"), and the head ablation within 1e-5 of zeroing that head's
  slice of the output projection's input (W_O found by `find_output_projection`; last attention module that ran,
  last head).
* **refused**: the lens raised its ValueError (at `AttentionLens` construction, or at the call for a keyword it
  does not know): it declines what it cannot make exact. The note is its message.
* **mismatch**: it ran but a number is above 1e-5: silently wrong.
* **not buildable**: no tiny model or no inputs we can make (the reason: config, init, inputs or the eager forward
  failing, for each model type tried).
* **error**: the lens (or a check) raised something else, or the model timed out; the note says where.

"""


def write_reports(results: list[Result], out: Path, seconds: float) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_markdown(results, seconds), encoding="utf-8")
    payload = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tolerance": TOLERANCE,
        "seconds": round(seconds, 1),
        "counts": counts(results),
        "results": [dataclasses.asdict(r) for r in results],
    }
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.lens_conformance", description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated architecture names (modeling file stems without modeling_)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown report; the JSON goes beside it")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (one torch thread each)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per architecture")
    args = parser.parse_args(argv)
    names = [a.name for a in discover()]
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            parser.error(f"--only: unknown architectures {unknown}")
        names = wanted
    start = time.perf_counter()
    results = run_all(names, args.jobs, args.timeout)
    seconds = time.perf_counter() - start
    write_reports(results, args.out, seconds)
    print(json.dumps(counts(results)), f"{seconds:.0f} s ->", args.out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
