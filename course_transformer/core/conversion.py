"""Conversion between Hugging Face BERT / GPT-2 / BART and the course Transformer, in both directions.

BERT, GPT-2 and BART are three settings of the same config, so a conversion is a config translation plus a
renaming of weights (nothing is re-initialised or approximated):

=====================  =============================================  ==========================================
field                  BERT (`BertModel`, `BertForMaskedLM`)          GPT-2 (`GPT2Model`, `GPT2LMHeadModel`)
=====================  =============================================  ==========================================
architecture           encoder                                        decoder
norm_placement         post (LN(x + sublayer(x)))                     pre (x + sublayer(LN(x))) + final LN
position_encoding      learned                                        learned
embedding_layer_norm   True                                           False
type_vocab_size        from the checkpoint (2)                        0
hidden_act             "gelu" -> gelu (erf)                           "gelu_new" -> gelu_tanh (same function,
                                                                      float rounding differs by ~1 ulp)
weights                nn.Linear (out, in): copied                    Conv1D (in, out): transposed; fused
                                                                      c_attn (C, 3C) split into q, k, v
head                   transform (dense, act, LN) + lm_head, tied     lm_head without bias, tied
=====================  =============================================  ==========================================

BART (`BartModel` -> `CourseTransformerModel`, `BartForConditionalGeneration` -> `CourseTransformerForSeq2SeqLM`)
is the encoder-decoder with learned positions, post-norm, an embedding LayerNorm on both stacks
("layernorm_embedding"), no final LayerNorm, biases everywhere, "gelu" (erf), LayerNorm eps 1e-5 (fixed in BART's
code) and one token embedding ("shared") tied to both stacks and the LM head. Its weights are nn.Linear and copied;
the names differ (out_proj -> o_proj, encoder_attn -> cross_attn, fc1/fc2 -> ffn.up_proj/down_proj,
final_layer_norm -> ffn_norm).
Three things need a decision:

- Positions: `BartLearnedPositionalEmbedding` has `max_position_embeddings + 2` rows and looks up position p at row
  p + 2 (a fairseq leftover); rows 0 and 1 are never read. Import keeps rows 2: ; export writes zeros in rows 0-1.
  So course -> BART -> course is bitwise exact, and BART -> course -> BART is bitwise exact in every tensor BART's
  forward reads, with rows 0-1 of the two position tables zeroed (exact too when they were zero).
- `final_logits_bias` (a buffer added to the logits): our head has no bias, so a non-zero one is refused; export
  writes zeros (what BART checkpoints hold).
- Generation settings (`forced_eos_token_id`, beams, lengths) live in the model's `GenerationConfig`, which is
  copied across in both directions, so `generate` behaves the same. `BartConfig.forced_eos_token_id` is left None.

BART's config allows what ours cannot hold (different head counts or feed-forward widths per stack): refused.
`activation_dropout` and layer drop only change training and are dropped with a warning. A left-padded source is
numbered from the first pad by BART and from the first real token by us (pass `position_ids` to get BART's).

Every rule below is a bijection on tensors (copies, transposes, slices and concatenations; BART's two unread
position rows aside), so export followed by import gives bitwise-identical weights. A config the target cannot
express raises `ValueError` naming the field, its value and what the target allows.

    >>> from transformers import BertForMaskedLM
    >>> from course_transformer.core.conversion import from_bert, to_bert
    >>> ours = from_bert(BertForMaskedLM.from_pretrained(folder))   # CourseTransformerForMaskedLM
    >>> native = to_bert(ours)                                       # BertForMaskedLM again

Command line (writes to a temporary folder next to `--output`, then renames it into place). Everything the files
decide is checked before a weight is read: the source exists and has config.json, `--output` does not exist
(unless `--overwrite`), the target can express the config, a course folder's weights match it (the safe loader of
`course_transformer.core.checkpoint`), and the source has a tokenizer that encodes text (`--no-tokenizer`
converts the weights alone). A refusal is one `error:` line on stderr, exit 2, nothing written:

    python -m course_transformer.core.conversion --from-bert PATH --output DIR      # HF BERT folder -> course
    Transformer folder
    python -m course_transformer.core.conversion --from-gpt2 PATH --output DIR
    python -m course_transformer.core.conversion --to-bert PATH --output DIR        # course Transformer folder -> HF
    BERT folder
    python -m course_transformer.core.conversion --to-gpt2 PATH --output DIR
    python -m course_transformer.core.conversion --from-bart PATH --output DIR      # and --to-bart

This module is imported by tools, never by the modeling code, so saved model folders do not depend on it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BartModel,
    BertConfig,
    BertForMaskedLM,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    PreTrainedModel,
)

from course_transformer.core.checkpoint import (
    load_pretrained_safely,
    model_class_for,
    read_config,
    validate_checkpoint_folder,
)
from course_transformer.core.io import atomic_write_dir
from modeling.configuration_course_transformer import CourseTransformerConfig
from modeling.modeling_course_transformer import (
    CourseTransformerForCausalLM,
    CourseTransformerForMaskedLM,
    CourseTransformerForSeq2SeqLM,
    CourseTransformerModel,
)

logger = logging.getLogger(__name__)

# Hugging Face activation names -> ours. Only functions that are the same math are mapped: "gelu_new" and
# "gelu_pytorch_tanh" are both the tanh approximation (they differ only by float rounding).
IMPORT_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}
# Ours -> Hugging Face: the names the original checkpoints use (BERT "gelu", GPT-2 "gelu_new").
EXPORT_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}


def _refuse(target: str, field: str, value, allowed: str) -> None:
    raise ValueError(f"cannot express {field}={value!r} in {target}: {allowed}")


def _import_activation(source: str, field: str, name) -> str:
    if name not in IMPORT_ACTIVATIONS:
        raise ValueError(
            f"{source}.{field}={name!r} has no equivalent in CourseTransformerConfig.hidden_act; "
            f"supported: {', '.join(sorted(IMPORT_ACTIVATIONS))}"
        )
    return IMPORT_ACTIVATIONS[name]


def _single_token_id(source: str, field: str, value) -> int | None:
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError(f"{source}.{field}={value!r}: the course Transformer takes a single token id")
        value = value[0]
    return value


# --------------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------------


def bert_config_to_course(config: BertConfig, add_pooling_layer: bool = True) -> CourseTransformerConfig:
    """The course config of a BERT checkpoint: a post-norm encoder with learned positions, token types,
    an embedding LayerNorm and, for `BertModel`, the pooler."""
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        _refuse(
            "CourseTransformerConfig",
            "BertConfig.position_embedding_type",
            config.position_embedding_type,
            "only 'absolute' (learned) positions convert",
        )
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        _refuse("CourseTransformerConfig", "BertConfig.is_decoder", True, "only the bidirectional encoder converts")
    return CourseTransformerConfig(
        architecture="encoder",
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_encoder_layers=config.num_hidden_layers,
        num_decoder_layers=0,
        intermediate_size=config.intermediate_size,
        hidden_act=_import_activation("BertConfig", "hidden_act", config.hidden_act),
        hidden_dropout_prob=float(config.hidden_dropout_prob),
        attention_dropout_prob=float(config.attention_probs_dropout_prob),
        max_position_embeddings=config.max_position_embeddings,
        position_encoding="learned",
        norm_placement="post",
        layer_norm_eps=config.layer_norm_eps,
        embedding_layer_norm=True,
        type_vocab_size=config.type_vocab_size,
        use_bias=True,
        scale_embeddings=False,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
        add_pooling_layer=add_pooling_layer,
        classifier_dropout=getattr(config, "classifier_dropout", None),
        initializer_range=config.initializer_range,
        use_cache=False,
        pad_token_id=config.pad_token_id,
        bos_token_id=_single_token_id("BertConfig", "bos_token_id", getattr(config, "bos_token_id", None)),
        eos_token_id=_single_token_id("BertConfig", "eos_token_id", getattr(config, "eos_token_id", None)),
    )


def gpt2_config_to_course(config: GPT2Config) -> CourseTransformerConfig:
    """The course config of a GPT-2 checkpoint: a pre-norm decoder with learned positions and a final LayerNorm."""
    if not config.scale_attn_weights:
        _refuse(
            "CourseTransformerConfig",
            "GPT2Config.scale_attn_weights",
            False,
            "the course attention always divides scores by sqrt(head_dim)",
        )
    if config.scale_attn_by_inverse_layer_idx:
        _refuse(
            "CourseTransformerConfig",
            "GPT2Config.scale_attn_by_inverse_layer_idx",
            True,
            "the course attention uses the same 1/sqrt(head_dim) scale in every layer",
        )
    if config.add_cross_attention:
        _refuse(
            "CourseTransformerConfig", "GPT2Config.add_cross_attention", True, "only the decoder-only GPT-2 converts"
        )
    # reorder_and_upcast_attn only changes the float order of the same math (it upcasts to fp32); it converts.
    if config.embd_pdrop != config.resid_pdrop:
        logger.warning(
            "GPT2Config.embd_pdrop=%s differs from resid_pdrop=%s; the course Transformer uses one "
            "hidden_dropout_prob (resid_pdrop). Inference is unaffected.",
            config.embd_pdrop,
            config.resid_pdrop,
        )
    return CourseTransformerConfig(
        architecture="decoder",
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        num_attention_heads=config.n_head,
        num_encoder_layers=0,
        num_decoder_layers=config.n_layer,
        intermediate_size=config.n_inner if config.n_inner is not None else 4 * config.n_embd,
        hidden_act=_import_activation("GPT2Config", "activation_function", config.activation_function),
        hidden_dropout_prob=float(config.resid_pdrop),
        attention_dropout_prob=float(config.attn_pdrop),
        max_position_embeddings=config.n_positions,
        position_encoding="learned",
        norm_placement="pre",
        layer_norm_eps=config.layer_norm_epsilon,
        embedding_layer_norm=False,
        type_vocab_size=0,
        use_bias=True,
        scale_embeddings=False,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
        add_pooling_layer=False,
        initializer_range=config.initializer_range,
        use_cache=bool(config.use_cache),
        pad_token_id=_single_token_id("GPT2Config", "pad_token_id", config.pad_token_id),
        bos_token_id=_single_token_id("GPT2Config", "bos_token_id", config.bos_token_id),
        eos_token_id=_single_token_id("GPT2Config", "eos_token_id", config.eos_token_id),
    )


# BART's LayerNorms are built with nn.LayerNorm's default eps; BartConfig has no field for it.
BART_LAYER_NORM_EPS = 1e-5


def _same_in_both_stacks(config: BartConfig, encoder_field: str, decoder_field: str, course_field: str) -> int:
    encoder_value, decoder_value = getattr(config, encoder_field), getattr(config, decoder_field)
    if encoder_value != decoder_value:
        _refuse(
            "CourseTransformerConfig",
            f"BartConfig.{decoder_field}",
            decoder_value,
            f"the course Transformer has one {course_field} for both stacks, so it must equal "
            f"{encoder_field}={encoder_value!r}",
        )
    return encoder_value


def bart_config_to_course(config: BartConfig) -> CourseTransformerConfig:
    """The course config of a BART checkpoint: a post-norm encoder-decoder with learned positions, an embedding
    LayerNorm on both stacks and one token embedding shared by the stacks (and, tied, the LM head)."""
    for field, convertible in (("is_encoder_decoder", True), ("is_decoder", False)):
        if bool(getattr(config, field)) != convertible:
            _refuse(
                "CourseTransformerConfig",
                f"BartConfig.{field}",
                getattr(config, field),
                "only the encoder-decoder BART (BartModel, BartForConditionalGeneration) converts",
            )
    heads = _same_in_both_stacks(config, "encoder_attention_heads", "decoder_attention_heads", "num_attention_heads")
    ffn = _same_in_both_stacks(config, "encoder_ffn_dim", "decoder_ffn_dim", "intermediate_size")
    # Neither changes the function the model computes at inference, so they do not block a conversion.
    for field in ("activation_dropout", "encoder_layerdrop", "decoder_layerdrop"):
        if getattr(config, field):
            logger.warning(
                "BartConfig.%s=%s has no course Transformer equivalent and is dropped; training with the converted "
                "model differs, inference is unaffected.",
                field,
                getattr(config, field),
            )
    return CourseTransformerConfig(
        architecture="encoder-decoder",
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        num_attention_heads=heads,
        num_encoder_layers=config.encoder_layers,
        num_decoder_layers=config.decoder_layers,
        intermediate_size=ffn,
        hidden_act=_import_activation("BartConfig", "activation_function", config.activation_function),
        hidden_dropout_prob=float(config.dropout),
        attention_dropout_prob=float(config.attention_dropout),
        max_position_embeddings=config.max_position_embeddings,
        position_encoding="learned",
        norm_placement="post",
        layer_norm_eps=BART_LAYER_NORM_EPS,
        embedding_layer_norm=True,
        type_vocab_size=0,
        use_bias=True,
        scale_embeddings=bool(config.scale_embedding),
        tie_word_embeddings=bool(config.tie_word_embeddings),
        add_pooling_layer=False,
        classifier_dropout=config.classifier_dropout,
        initializer_range=config.init_std,
        use_cache=bool(config.use_cache),
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=_single_token_id("BartConfig", "eos_token_id", config.eos_token_id),
        decoder_start_token_id=config.decoder_start_token_id,
    )


def _require(config: CourseTransformerConfig, target: str, required: dict[str, tuple]) -> None:
    """Refuse, naming the first field whose value `target` cannot express."""
    for field, allowed in required.items():
        value = getattr(config, field)
        if value not in allowed:
            _refuse(target, field, value, f"{target} needs {field} in {allowed!r}")


def _export_activation(config: CourseTransformerConfig, target: str) -> str:
    if config.hidden_act not in EXPORT_ACTIVATIONS:
        _refuse(target, "hidden_act", config.hidden_act, f"allowed: {', '.join(EXPORT_ACTIVATIONS)}")
    return EXPORT_ACTIVATIONS[config.hidden_act]


def course_config_to_bert(config: CourseTransformerConfig) -> BertConfig:
    """The `BertConfig` of a BERT-shaped course config; `ValueError` for any field BERT cannot express."""
    target = "BERT"
    _require(
        config,
        target,
        {
            "architecture": ("encoder",),
            "norm_placement": ("post",),
            "position_encoding": ("learned",),
            "embedding_layer_norm": (True,),
            "use_bias": (True,),
            "scale_embeddings": (False,),
        },
    )
    if config.type_vocab_size < 1:
        _refuse(target, "type_vocab_size", config.type_vocab_size, "BERT always adds token-type embeddings (>= 1)")
    return BertConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_encoder_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        hidden_act=_export_activation(config, target),
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_dropout_prob,
        max_position_embeddings=config.max_position_embeddings,
        type_vocab_size=config.type_vocab_size,
        initializer_range=config.initializer_range,
        layer_norm_eps=config.layer_norm_eps,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        classifier_dropout=config.classifier_dropout,
        tie_word_embeddings=config.tie_word_embeddings,
    )


def course_config_to_gpt2(config: CourseTransformerConfig) -> GPT2Config:
    """The `GPT2Config` of a GPT-2-shaped course config; `ValueError` for any field GPT-2 cannot express."""
    target = "GPT-2"
    _require(
        config,
        target,
        {
            "architecture": ("decoder",),
            "norm_placement": ("pre",),
            "position_encoding": ("learned",),
            "embedding_layer_norm": (False,),
            "type_vocab_size": (0,),
            "use_bias": (True,),
            "scale_embeddings": (False,),
        },
    )
    return GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.max_position_embeddings,
        n_embd=config.hidden_size,
        n_layer=config.num_decoder_layers,
        n_head=config.num_attention_heads,
        n_inner=config.intermediate_size,
        activation_function=_export_activation(config, target),
        resid_pdrop=config.hidden_dropout_prob,
        embd_pdrop=config.hidden_dropout_prob,
        attn_pdrop=config.attention_dropout_prob,
        layer_norm_epsilon=config.layer_norm_eps,
        initializer_range=config.initializer_range,
        use_cache=config.use_cache,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
    )


def course_config_to_bart(config: CourseTransformerConfig) -> BartConfig:
    """The `BartConfig` of a BART-shaped course config; `ValueError` for any field BART cannot express.
    `forced_eos_token_id` is None: generation settings travel in the model's `GenerationConfig` (see `to_bart`)."""
    target = "BART"
    _require(
        config,
        target,
        {
            "architecture": ("encoder-decoder",),
            "norm_placement": ("post",),
            "position_encoding": ("learned",),
            "embedding_layer_norm": (True,),
            "type_vocab_size": (0,),
            "use_bias": (True,),
            "layer_norm_eps": (BART_LAYER_NORM_EPS,),
        },
    )
    if config.pruned_heads:
        _refuse(target, "pruned_heads", config.pruned_heads, "BART has no pruned heads; export an unpruned model")
    return BartConfig(
        vocab_size=config.vocab_size,
        max_position_embeddings=config.max_position_embeddings,
        d_model=config.hidden_size,
        encoder_layers=config.num_encoder_layers,
        decoder_layers=config.num_decoder_layers,
        encoder_attention_heads=config.num_attention_heads,
        decoder_attention_heads=config.num_attention_heads,
        encoder_ffn_dim=config.intermediate_size,
        decoder_ffn_dim=config.intermediate_size,
        activation_function=_export_activation(config, target),
        dropout=config.hidden_dropout_prob,
        attention_dropout=config.attention_dropout_prob,
        activation_dropout=0.0,
        init_std=config.initializer_range,
        classifier_dropout=config.classifier_dropout,
        scale_embedding=config.scale_embeddings,
        use_cache=config.use_cache,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        decoder_start_token_id=config.decoder_start_token_id,
        forced_eos_token_id=None,
        tie_word_embeddings=config.tie_word_embeddings,
    )


# --------------------------------------------------------------------------------------------------------------
# Weight rules: (their names, our names, theirs -> ours, ours -> theirs); each pair of functions is a bijection
# --------------------------------------------------------------------------------------------------------------

Tensors = list[torch.Tensor]


def _same(tensors: Tensors) -> Tensors:
    return [tensors[0]]


def _transpose(tensors: Tensors) -> Tensors:
    # Conv1D stores (in, out) and computes x @ W; nn.Linear stores (out, in) and computes x @ W^T.
    return [tensors[0].t().contiguous()]


def _split_qkv_weight(tensors: Tensors) -> Tensors:
    # c_attn: (C, 3C) with output columns [q | k | v] -> three (C, C) Linear weights.
    return [part.t().contiguous() for part in tensors[0].chunk(3, dim=1)]


def _fuse_qkv_weight(tensors: Tensors) -> Tensors:
    return [torch.cat([w.t() for w in tensors], dim=1).contiguous()]  # 3 x (C, C) -> (C, 3C)


def _split_qkv_bias(tensors: Tensors) -> Tensors:
    return [part.contiguous() for part in tensors[0].chunk(3, dim=0)]  # (3C,) -> 3 x (C,)


def _fuse_qkv_bias(tensors: Tensors) -> Tensors:
    return [torch.cat(tensors, dim=0)]


@dataclass(frozen=True)
class Rule:
    theirs: tuple[str, ...]
    ours: tuple[str, ...]
    to_ours: Callable[[Tensors], Tensors] = _same
    to_theirs: Callable[[Tensors], Tensors] = _same


def _pairs(theirs: str, ours: str, suffixes=("weight", "bias"), to_ours=_same, to_theirs=_same) -> list[Rule]:
    return [Rule((f"{theirs}.{s}",), (f"{ours}.{s}",), to_ours, to_theirs) for s in suffixes]


def bert_rules(config: CourseTransformerConfig, pooler: bool, mlm_head: bool) -> list[Rule]:
    """Names relative to `BertModel` / our `CourseTransformerModel`; the MLM head relative to the head models."""
    rules = [
        *_pairs("embeddings.word_embeddings", "encoder.embeddings.word_embeddings", ("weight",)),
        *_pairs("embeddings.position_embeddings", "encoder.embeddings.position_embeddings", ("weight",)),
        *_pairs("embeddings.token_type_embeddings", "encoder.embeddings.token_type_embeddings", ("weight",)),
        *_pairs("embeddings.LayerNorm", "encoder.embeddings.layer_norm"),
    ]
    for i in range(config.num_encoder_layers):
        theirs, ours = f"encoder.layer.{i}", f"encoder.layers.{i}"
        rules += [
            *_pairs(f"{theirs}.attention.self.query", f"{ours}.self_attn.q_proj"),
            *_pairs(f"{theirs}.attention.self.key", f"{ours}.self_attn.k_proj"),
            *_pairs(f"{theirs}.attention.self.value", f"{ours}.self_attn.v_proj"),
            *_pairs(f"{theirs}.attention.output.dense", f"{ours}.self_attn.o_proj"),
            *_pairs(f"{theirs}.attention.output.LayerNorm", f"{ours}.self_attn_norm"),
            *_pairs(f"{theirs}.intermediate.dense", f"{ours}.ffn.up_proj"),
            *_pairs(f"{theirs}.output.dense", f"{ours}.ffn.down_proj"),
            *_pairs(f"{theirs}.output.LayerNorm", f"{ours}.ffn_norm"),
        ]
    if pooler:
        rules += _pairs("pooler.dense", "pooler.dense")
    if mlm_head:
        head = [
            *_pairs("cls.predictions.transform.dense", "transform.dense"),
            *_pairs("cls.predictions.transform.LayerNorm", "transform.layer_norm"),
            # BERT keeps the output bias twice (`decoder.bias`, used in forward, and `bias`, tied to it on load).
            Rule(
                ("cls.predictions.decoder.bias", "cls.predictions.bias"),
                ("lm_head.bias",),
                _same,
                lambda tensors: [tensors[0], tensors[0]],
            ),
        ]
        if not config.tie_word_embeddings:
            head += _pairs("cls.predictions.decoder", "lm_head", ("weight",))
        rules = [
            Rule(tuple(f"bert.{n}" for n in r.theirs), tuple(f"model.{n}" for n in r.ours), r.to_ours, r.to_theirs)
            for r in rules
        ]
        rules += head
    return rules


def gpt2_rules(config: CourseTransformerConfig, lm_head: bool) -> list[Rule]:
    """Names relative to `GPT2Model` / our `CourseTransformerModel`, prefixed for the LM head models."""
    rules = [
        *_pairs("wte", "decoder.embeddings.word_embeddings", ("weight",)),
        *_pairs("wpe", "decoder.embeddings.position_embeddings", ("weight",)),
    ]
    for i in range(config.num_decoder_layers):
        theirs, ours = f"h.{i}", f"decoder.layers.{i}"
        attn = f"{ours}.self_attn"
        rules += [
            *_pairs(f"{theirs}.ln_1", f"{ours}.self_attn_norm"),
            Rule(
                (f"{theirs}.attn.c_attn.weight",),
                (f"{attn}.q_proj.weight", f"{attn}.k_proj.weight", f"{attn}.v_proj.weight"),
                _split_qkv_weight,
                _fuse_qkv_weight,
            ),
            Rule(
                (f"{theirs}.attn.c_attn.bias",),
                (f"{attn}.q_proj.bias", f"{attn}.k_proj.bias", f"{attn}.v_proj.bias"),
                _split_qkv_bias,
                _fuse_qkv_bias,
            ),
            *_pairs(f"{theirs}.attn.c_proj", f"{attn}.o_proj", ("weight",), _transpose, _transpose),
            *_pairs(f"{theirs}.attn.c_proj", f"{attn}.o_proj", ("bias",)),
            *_pairs(f"{theirs}.ln_2", f"{ours}.ffn_norm"),
            *_pairs(f"{theirs}.mlp.c_fc", f"{ours}.ffn.up_proj", ("weight",), _transpose, _transpose),
            *_pairs(f"{theirs}.mlp.c_fc", f"{ours}.ffn.up_proj", ("bias",)),
            *_pairs(f"{theirs}.mlp.c_proj", f"{ours}.ffn.down_proj", ("weight",), _transpose, _transpose),
            *_pairs(f"{theirs}.mlp.c_proj", f"{ours}.ffn.down_proj", ("bias",)),
        ]
    rules += _pairs("ln_f", "decoder.final_norm")
    if lm_head:
        rules = [
            Rule(
                tuple(f"transformer.{n}" for n in r.theirs),
                tuple(f"model.{n}" for n in r.ours),
                r.to_ours,
                r.to_theirs,
            )
            for r in rules
        ]
        if not config.tie_word_embeddings:
            rules += _pairs("lm_head", "lm_head", ("weight",))
    return rules


# BartLearnedPositionalEmbedding looks up position p at row p + 2; rows 0 and 1 are never read.
BART_POSITION_OFFSET = 2


def _drop_position_offset(tensors: Tensors) -> Tensors:
    return [tensors[0][BART_POSITION_OFFSET:].contiguous()]  # (P + 2, C) -> (P, C)


def _add_position_offset(tensors: Tensors) -> Tensors:
    # The two unread rows come back as zeros: BART's forward never reads them, so the function is unchanged.
    unread = tensors[0].new_zeros(BART_POSITION_OFFSET, tensors[0].shape[1])  # (2, C)
    return [torch.cat([unread, tensors[0]], dim=0)]  # (P, C) -> (P + 2, C)


def _encoder_tokens(tensors: Tensors) -> Tensors:
    # Untied BART keeps `shared` beside the stacks' own embeddings but never reads it in forward; from_bart checks
    # that it equals encoder.embed_tokens (as `set_input_embeddings` leaves it) and to_bart writes that copy back.
    return [tensors[1]]


def _shared_and_encoder_tokens(tensors: Tensors) -> Tensors:
    return [tensors[0], tensors[0]]


def _bart_layer_rules(theirs: str, ours: str, cross_attention: bool) -> list[Rule]:
    attentions = [("self_attn", "self_attn")] + ([("encoder_attn", "cross_attn")] if cross_attention else [])
    rules = []
    for their_attn, our_attn in attentions:
        for projection in ("q_proj", "k_proj", "v_proj"):
            rules += _pairs(f"{theirs}.{their_attn}.{projection}", f"{ours}.{our_attn}.{projection}")
        rules += [
            *_pairs(f"{theirs}.{their_attn}.out_proj", f"{ours}.{our_attn}.o_proj"),
            *_pairs(f"{theirs}.{their_attn}_layer_norm", f"{ours}.{our_attn}_norm"),
        ]
    return rules + [
        *_pairs(f"{theirs}.fc1", f"{ours}.ffn.up_proj"),
        *_pairs(f"{theirs}.fc2", f"{ours}.ffn.down_proj"),
        *_pairs(f"{theirs}.final_layer_norm", f"{ours}.ffn_norm"),  # post-norm: after the FFN's residual sum
    ]


def bart_rules(config: CourseTransformerConfig, lm_head: bool) -> list[Rule]:
    """Names relative to `BartModel` / our `CourseTransformerModel`, prefixed `model.` for the seq2seq LM."""
    if config.tie_word_embeddings:
        # One tensor in both: BART's encoder/decoder embed_tokens and our decoder's embedding are aliases of it.
        rules = _pairs("shared", "encoder.embeddings.word_embeddings", ("weight",))
    else:
        rules = [
            Rule(
                ("shared.weight", "encoder.embed_tokens.weight"),
                ("encoder.embeddings.word_embeddings.weight",),
                _encoder_tokens,
                _shared_and_encoder_tokens,
            ),
            *_pairs("decoder.embed_tokens", "decoder.embeddings.word_embeddings", ("weight",)),
        ]
    for stack, num_layers in (("encoder", config.num_encoder_layers), ("decoder", config.num_decoder_layers)):
        rules += [
            *_pairs(
                f"{stack}.embed_positions",
                f"{stack}.embeddings.position_embeddings",
                ("weight",),
                _drop_position_offset,
                _add_position_offset,
            ),
            *_pairs(f"{stack}.layernorm_embedding", f"{stack}.embeddings.layer_norm"),
        ]
        for i in range(num_layers):
            layer = f"{stack}.layers.{i}"  # the same path in both models
            rules += _bart_layer_rules(layer, layer, cross_attention=stack == "decoder")
    if lm_head:
        rules = [
            Rule(tuple(f"model.{n}" for n in r.theirs), tuple(f"model.{n}" for n in r.ours), r.to_ours, r.to_theirs)
            for r in rules
        ]
        if not config.tie_word_embeddings:
            rules += _pairs("lm_head", "lm_head", ("weight",))
    return rules


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """{name: first name} for every parameter that is the same tensor as an earlier one (tied weights)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


@torch.no_grad()
def _transfer(source: nn.Module, target: nn.Module, rules: list[Rule], to_target: Callable[[Rule], tuple]) -> None:
    """Copy every parameter of `target` from `source` through `rules`; fail on anything left unmapped."""
    source_params = dict(source.named_parameters(remove_duplicate=False))
    target_params = dict(target.named_parameters(remove_duplicate=False))
    written: set[str] = set()
    for rule in rules:
        source_names, target_names, fn = to_target(rule)
        missing = [n for n in source_names if n not in source_params]
        if missing:
            raise KeyError(f"source model has no parameter {missing[0]!r} (rule {rule.theirs} <-> {rule.ours})")
        values = fn([source_params[n].detach() for n in source_names])
        for name, value in zip(target_names, values, strict=True):
            if name not in target_params:
                raise KeyError(f"target model has no parameter {name!r}")
            param = target_params[name]
            if param.shape != value.shape:
                raise ValueError(f"{name}: shape {tuple(value.shape)} from the source, {tuple(param.shape)} expected")
            param.copy_(value)
            written.add(name)
    aliases = _tied_aliases(target)
    unset = [n for n in target_params if n not in written and aliases.get(n) not in written]
    if unset:
        raise KeyError(f"no conversion rule sets these parameters of {type(target).__name__}: {unset}")


def _new_model(
    cls: type[PreTrainedModel], config, like: nn.Module, attn_implementation: str | None, **kwargs
) -> PreTrainedModel:
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    model = cls(config, **kwargs)
    dtype = next(like.parameters()).dtype
    return model.to(dtype=dtype, device=next(like.parameters()).device).train(like.training)


# --------------------------------------------------------------------------------------------------------------
# Hugging Face -> course Transformer
# --------------------------------------------------------------------------------------------------------------


def from_bert(
    model: BertModel | BertForMaskedLM, attn_implementation: str | None = "eager"
) -> CourseTransformerModel | CourseTransformerForMaskedLM:
    """Convert `BertModel` (-> `CourseTransformerModel` with the pooler when it has one) or `BertForMaskedLM`
    (-> `CourseTransformerForMaskedLM`). Weights are copied exactly; dtype, device and train/eval mode follow."""
    if isinstance(model, BertForMaskedLM):
        config = bert_config_to_course(model.config, add_pooling_layer=False)
        ours = _new_model(CourseTransformerForMaskedLM, config, model, attn_implementation)
        rules = bert_rules(config, pooler=False, mlm_head=True)
    elif isinstance(model, BertModel):
        config = bert_config_to_course(model.config, add_pooling_layer=model.pooler is not None)
        ours = _new_model(CourseTransformerModel, config, model, attn_implementation)
        rules = bert_rules(config, pooler=model.pooler is not None, mlm_head=False)
    else:
        raise TypeError(f"from_bert takes BertModel or BertForMaskedLM, got {type(model).__name__}")
    _transfer(model, ours, rules, lambda r: (r.theirs, r.ours, r.to_ours))
    return ours


def from_gpt2(
    model: GPT2Model | GPT2LMHeadModel, attn_implementation: str | None = "eager"
) -> CourseTransformerModel | CourseTransformerForCausalLM:
    """Convert `GPT2Model` (-> `CourseTransformerModel`) or `GPT2LMHeadModel` (-> `CourseTransformerForCausalLM`)."""
    if isinstance(model, GPT2LMHeadModel):
        config = gpt2_config_to_course(model.config)
        ours = _new_model(CourseTransformerForCausalLM, config, model, attn_implementation)
        rules = gpt2_rules(config, lm_head=True)
    elif isinstance(model, GPT2Model):
        config = gpt2_config_to_course(model.config)
        ours = _new_model(CourseTransformerModel, config, model, attn_implementation)
        rules = gpt2_rules(config, lm_head=False)
    else:
        raise TypeError(f"from_gpt2 takes GPT2Model or GPT2LMHeadModel, got {type(model).__name__}")
    _transfer(model, ours, rules, lambda r: (r.theirs, r.ours, r.to_ours))
    return ours


def _check_bart_weights(model: BartModel | BartForConditionalGeneration) -> None:
    """Refuse, before anything is built, the BART tensors that our model has no place for."""
    bias = getattr(model, "final_logits_bias", None)
    if bias is not None and bool(bias.any()):
        _refuse(
            "CourseTransformerForSeq2SeqLM",
            "BartForConditionalGeneration.final_logits_bias",
            f"<non-zero, max |b| = {bias.abs().max().item():.3g}>",
            "the course LM head has no bias; only an all-zero final_logits_bias (as BART checkpoints hold) converts",
        )
    base = model.model if isinstance(model, BartForConditionalGeneration) else model
    if not model.config.tie_word_embeddings and not torch.equal(base.shared.weight, base.encoder.embed_tokens.weight):
        _refuse(
            "CourseTransformerConfig",
            "BartModel.shared.weight",
            "<differs from encoder.embed_tokens.weight>",
            "untied BART never reads `shared` in forward; the course model keeps only the stacks' own embeddings, "
            "so `shared` must equal encoder.embed_tokens",
        )


def from_bart(
    model: BartModel | BartForConditionalGeneration, attn_implementation: str | None = "eager"
) -> CourseTransformerModel | CourseTransformerForSeq2SeqLM:
    """Convert `BartModel` (-> encoder-decoder `CourseTransformerModel`) or `BartForConditionalGeneration`
    (-> `CourseTransformerForSeq2SeqLM`, with a copy of its `GenerationConfig`). See the module docstring for the
    position offset and `final_logits_bias`."""
    if not isinstance(model, (BartModel, BartForConditionalGeneration)):
        raise TypeError(f"from_bart takes BartModel or BartForConditionalGeneration, got {type(model).__name__}")
    config = bart_config_to_course(model.config)
    _check_bart_weights(model)
    lm_head = isinstance(model, BartForConditionalGeneration)
    cls = CourseTransformerForSeq2SeqLM if lm_head else CourseTransformerModel
    ours = _new_model(cls, config, model, attn_implementation)
    _transfer(model, ours, bart_rules(config, lm_head=lm_head), lambda r: (r.theirs, r.ours, r.to_ours))
    if lm_head:
        # forced_eos_token_id, beams, length limits: what `generate` does belongs to the generation config.
        ours.generation_config = copy.deepcopy(model.generation_config)
    return ours


# --------------------------------------------------------------------------------------------------------------
# Course Transformer -> Hugging Face
# --------------------------------------------------------------------------------------------------------------


def to_bert(
    model: CourseTransformerModel | CourseTransformerForMaskedLM, attn_implementation: str | None = "eager"
) -> BertModel | BertForMaskedLM:
    """Export a BERT-shaped model: `CourseTransformerForMaskedLM` -> `BertForMaskedLM`, the bare
    `CourseTransformerModel` -> `BertModel` (with the pooler iff ours has one)."""
    config = model.config
    bert_config = course_config_to_bert(config)
    if isinstance(model, CourseTransformerForMaskedLM):  # like BertForMaskedLM, it has no pooler
        native = _new_model(BertForMaskedLM, bert_config, model, attn_implementation)
        rules = bert_rules(config, pooler=False, mlm_head=True)
    elif isinstance(model, CourseTransformerModel):
        native = _new_model(
            BertModel, bert_config, model, attn_implementation, add_pooling_layer=model.pooler is not None
        )
        rules = bert_rules(config, pooler=model.pooler is not None, mlm_head=False)
    else:
        raise TypeError(
            f"to_bert takes CourseTransformerModel or CourseTransformerForMaskedLM, got {type(model).__name__}"
        )
    _transfer(model, native, rules, lambda r: (r.ours, r.theirs, r.to_theirs))
    return native


def to_gpt2(
    model: CourseTransformerModel | CourseTransformerForCausalLM, attn_implementation: str | None = "eager"
) -> GPT2Model | GPT2LMHeadModel:
    """Export a GPT-2-shaped model: `CourseTransformerForCausalLM` -> `GPT2LMHeadModel`, the bare model ->
    `GPT2Model`."""
    config = model.config
    gpt2_config = course_config_to_gpt2(config)
    if isinstance(model, CourseTransformerForCausalLM):
        native = _new_model(GPT2LMHeadModel, gpt2_config, model, attn_implementation)
        rules = gpt2_rules(config, lm_head=True)
    elif isinstance(model, CourseTransformerModel):
        native = _new_model(GPT2Model, gpt2_config, model, attn_implementation)
        rules = gpt2_rules(config, lm_head=False)
    else:
        raise TypeError(
            f"to_gpt2 takes CourseTransformerModel or CourseTransformerForCausalLM, got {type(model).__name__}"
        )
    _transfer(model, native, rules, lambda r: (r.ours, r.theirs, r.to_theirs))
    return native


def to_bart(
    model: CourseTransformerModel | CourseTransformerForSeq2SeqLM, attn_implementation: str | None = "eager"
) -> BartModel | BartForConditionalGeneration:
    """Export a BART-shaped encoder-decoder: `CourseTransformerForSeq2SeqLM` -> `BartForConditionalGeneration`
    (with a copy of our `GenerationConfig` and a zero `final_logits_bias`), the bare model -> `BartModel`."""
    if not isinstance(model, (CourseTransformerModel, CourseTransformerForSeq2SeqLM)):
        raise TypeError(
            f"to_bart takes CourseTransformerModel or CourseTransformerForSeq2SeqLM, got {type(model).__name__}"
        )
    config = model.config
    bart_config = course_config_to_bart(config)
    lm_head = isinstance(model, CourseTransformerForSeq2SeqLM)
    cls = BartForConditionalGeneration if lm_head else BartModel
    native = _new_model(cls, bart_config, model, attn_implementation)
    _transfer(model, native, bart_rules(config, lm_head=lm_head), lambda r: (r.ours, r.theirs, r.to_theirs))
    if lm_head:
        with torch.no_grad():
            native.final_logits_bias.zero_()  # our head has no bias; BART adds this buffer to its logits
        native.generation_config = copy.deepcopy(model.generation_config)
    return native


# --------------------------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------------------------


def _architecture(path: Path) -> tuple[str | None, list[str]]:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a saved model folder")
    data = json.loads(config_file.read_text())
    return data.get("model_type"), list(data.get("architectures") or [])


def load_bert(path: str | Path, attn_implementation: str = "eager", **kwargs) -> BertModel | BertForMaskedLM:
    """Load a BERT folder as `BertForMaskedLM` when it was saved with the MLM head, else as `BertModel` (with the
    pooler only when the checkpoint has its weights)."""
    model_type, architectures = _architecture(Path(path))
    if model_type != "bert":
        raise ValueError(f"{path}: model_type={model_type!r}, expected 'bert'")
    if any(a in ("BertForMaskedLM", "BertForPreTraining") for a in architectures):
        model, info = BertForMaskedLM.from_pretrained(
            path, attn_implementation=attn_implementation, output_loading_info=True, **kwargs
        )
    else:
        model, info = BertModel.from_pretrained(
            path, attn_implementation=attn_implementation, output_loading_info=True, **kwargs
        )
        if any(k.startswith("pooler.") for k in info["missing_keys"]):
            model, info = BertModel.from_pretrained(
                path,
                attn_implementation=attn_implementation,
                add_pooling_layer=False,
                output_loading_info=True,
                **kwargs,
            )
    if info["missing_keys"]:
        raise ValueError(f"{path}: the checkpoint lacks weights {sorted(info['missing_keys'])[:5]}")
    return model.eval()


def load_gpt2(path: str | Path, attn_implementation: str = "eager", **kwargs) -> GPT2Model | GPT2LMHeadModel:
    """Load a GPT-2 folder as `GPT2LMHeadModel` (GPT-2 folders without a head load as `GPT2Model`)."""
    model_type, architectures = _architecture(Path(path))
    if model_type != "gpt2":
        raise ValueError(f"{path}: model_type={model_type!r}, expected 'gpt2'")
    cls = GPT2Model if architectures == ["GPT2Model"] else GPT2LMHeadModel
    model, info = cls.from_pretrained(
        path, attn_implementation=attn_implementation, output_loading_info=True, **kwargs
    )
    if info["missing_keys"]:
        raise ValueError(f"{path}: the checkpoint lacks weights {sorted(info['missing_keys'])[:5]}")
    return model.eval()


def load_bart(
    path: str | Path, attn_implementation: str = "eager", **kwargs
) -> BartModel | BartForConditionalGeneration:
    """Load a BART folder as `BartForConditionalGeneration`, or as `BartModel` when it was saved without the head."""
    model_type, architectures = _architecture(Path(path))
    if model_type != "bart":
        raise ValueError(f"{path}: model_type={model_type!r}, expected 'bart'")
    cls = BartModel if architectures == ["BartModel"] else BartForConditionalGeneration
    model, info = cls.from_pretrained(
        path, attn_implementation=attn_implementation, output_loading_info=True, **kwargs
    )
    # final_logits_bias is a buffer BART recreates as zeros when a folder lacks it; every other key must be there.
    missing = [k for k in info["missing_keys"] if k != "final_logits_bias"]
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks weights {sorted(missing)[:5]}")
    return model.eval()


def load_course(path: str | Path, attn_implementation: str = "eager", **kwargs) -> PreTrainedModel:
    """Load a course Transformer folder with the class named in its config (`architectures`), through the safe
    loader: missing, unexpected or mis-shaped weights raise `CheckpointError` instead of loading at random."""
    import modeling

    model_type, architectures = _architecture(Path(path))
    if model_type != CourseTransformerConfig.model_type:
        raise ValueError(f"{path}: model_type={model_type!r}, expected {CourseTransformerConfig.model_type!r}")
    name = architectures[0] if architectures else "CourseTransformerModel"
    cls = getattr(modeling, name, None)
    if cls is None:
        raise ValueError(f"{path}: unknown architecture {name!r}")
    return load_pretrained_safely(path, cls, attn_implementation=attn_implementation, **kwargs).eval()


def save_converted(
    model: PreTrainedModel,
    output: str | Path,
    tokenizer_source: str | Path | None = None,
    overwrite: bool = False,
    tokenizer=None,
) -> Path:
    """`save_pretrained` into `output` atomically, with `tokenizer`, or else the tokenizer of `tokenizer_source`
    when it has one (a warning when it has none; the command line refuses that case with `source_tokenizer`)."""

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        elif tokenizer_source is not None:
            try:
                from transformers import AutoTokenizer

                AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(folder)
            except (OSError, ValueError, TypeError) as error:
                logger.warning("no tokenizer copied from %s: %s", tokenizer_source, error)

    return atomic_write_dir(output, write, overwrite=overwrite)


@torch.no_grad()
def max_output_difference(a: nn.Module, b: nn.Module, seed: int = 0, length: int = 12) -> float:
    """Max |a - b| over the main output (logits, else last hidden state) of a random padded batch (an
    encoder-decoder's decoder reads the same tokens as its encoder)."""
    config = a.config
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (2, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, length // 2 :] = 0  # right padding in the second row
    inputs = {"input_ids": ids, "attention_mask": mask}
    if config.is_encoder_decoder:
        inputs.update(decoder_input_ids=ids, decoder_attention_mask=mask)

    def main_output(model):
        out = model(**inputs)
        return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state

    return (main_output(a).float() - main_output(b).float()).abs().max().item()


# --------------------------------------------------------------------------------------------------------------
# Command line: every check that the files allow runs before a weight is read, and nothing is written on failure
# --------------------------------------------------------------------------------------------------------------

# Files one of which a tokenizer folder has; without any, transformers builds an empty GPT-2 tokenizer silently.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model")
# The course classes each export takes (`to_bert` / `to_gpt2` / `to_bart` raise TypeError for the others).
EXPORTABLE = {
    "to_bert": ("CourseTransformerModel", "CourseTransformerForMaskedLM"),
    "to_gpt2": ("CourseTransformerModel", "CourseTransformerForCausalLM"),
    "to_bart": ("CourseTransformerModel", "CourseTransformerForSeq2SeqLM"),
}
# Each export's config translation (checked before any weight is read) and model conversion.
EXPORTS = {
    "to_bert": (course_config_to_bert, to_bert),
    "to_gpt2": (course_config_to_gpt2, to_gpt2),
    "to_bart": (course_config_to_bart, to_bart),
}
DIRECTIONS = ("from_bert", "from_gpt2", "from_bart", "to_bert", "to_gpt2", "to_bart")


def check_source_folder(source: Path) -> None:
    """A missing path is reported as missing, a file as not a folder, a folder without config.json as such."""
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or folder")
    if not source.is_dir():
        raise NotADirectoryError(f"{source}: not a folder (a saved model folder holds config.json and the weights)")
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source}: no config.json, so not a saved model folder")


def check_convertible(direction: str, source: Path) -> int:
    """What config.json alone decides, before any weight is read: the model type, whether the target can express
    the config, and (course folders) that the weights match it. Returns the vocabulary size."""
    try:
        return _check_export(direction, source) if direction in EXPORTABLE else _check_import(direction, source)
    except ValueError as error:
        if str(source) in str(error):
            raise
        raise ValueError(f"{source}: {error}") from None  # name the folder whose config cannot be converted


def _check_export(direction: str, source: Path) -> int:
    config = read_config(source)
    EXPORTS[direction][0](config)
    cls = model_class_for(config)
    if cls.__name__ not in EXPORTABLE[direction]:
        allowed = " or ".join(EXPORTABLE[direction])
        raise TypeError(f"{source}: {direction} exports {allowed}, not {cls.__name__}")
    validate_checkpoint_folder(source, cls)  # missing, unexpected or mis-shaped weights
    return config.vocab_size


def _check_import(direction: str, source: Path) -> int:
    family = direction.removeprefix("from_")
    model_type, _ = _architecture(source)
    if model_type != family:
        raise ValueError(f"{source / 'config.json'}: model_type={model_type!r}, expected {family!r}")
    if family == "bert":
        config = BertConfig.from_pretrained(source)
        bert_config_to_course(config)
    elif family == "bart":
        config = BartConfig.from_pretrained(source)
        bart_config_to_course(config)
    else:
        config = GPT2Config.from_pretrained(source)
        gpt2_config_to_course(config)
    return config.vocab_size


def source_tokenizer(source: Path, vocab_size: int):
    """The source folder's tokenizer, refused when it has no tokenizer files, does not load, encodes text as
    nothing, or yields ids the model has no embedding for."""
    from transformers import AutoTokenizer

    if not any((source / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{source}: no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); add the tokenizer to the folder, "
            "or pass --no-tokenizer to convert the weights alone"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"{source}: the tokenizer does not load: {error}") from None
    ids = tokenizer("Hello world")["input_ids"]
    if not ids:
        raise ValueError(f"{source}: the tokenizer ({len(tokenizer)} tokens) encodes 'Hello world' as []")
    if len(tokenizer) > vocab_size:
        raise ValueError(f"{source}: the tokenizer has {len(tokenizer)} tokens but config.json has {vocab_size=}")
    return tokenizer


def load_and_convert(direction: str, source: Path) -> tuple[PreTrainedModel, PreTrainedModel]:
    """(source model, converted model); course folders are read by the safe loader."""
    if direction == "from_bert":
        model = load_bert(source)
        return model, from_bert(model)
    if direction == "from_gpt2":
        model = load_gpt2(source)
        return model, from_gpt2(model)
    if direction == "from_bart":
        model = load_bart(source)
        return model, from_bart(model)
    model = load_course(source)
    return model, EXPORTS[direction][1](model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m course_transformer.core.conversion",
        description="Convert between Hugging Face BERT/GPT-2/BART and the course Transformer.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--from-bert", metavar="PATH", type=Path, help="Hugging Face BERT folder -> course Transformer"
    )
    source.add_argument(
        "--from-gpt2", metavar="PATH", type=Path, help="Hugging Face GPT-2 folder -> course Transformer"
    )
    source.add_argument(
        "--from-bart", metavar="PATH", type=Path, help="Hugging Face BART folder -> course Transformer"
    )
    source.add_argument("--to-bert", metavar="PATH", type=Path, help="course Transformer folder -> Hugging Face BERT")
    source.add_argument("--to-gpt2", metavar="PATH", type=Path, help="course Transformer folder -> Hugging Face GPT-2")
    source.add_argument("--to-bart", metavar="PATH", type=Path, help="course Transformer folder -> Hugging Face BART")
    parser.add_argument("--output", required=True, type=Path, help="folder to write (atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument(
        "--no-tokenizer", action="store_true", help="convert the weights alone (the source has no tokenizer)"
    )
    return parser


def _one_line(error: BaseException) -> str:
    text = error.args[0] if isinstance(error, KeyError) and error.args else error  # KeyError's str() adds quotes
    return " ".join(str(text).split())


def convert_folder(direction: str, source: Path, output: Path, overwrite: bool, with_tokenizer: bool) -> str:
    """Check everything the files allow, then load, convert and write `output` atomically; returns a summary."""
    check_source_folder(source)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
    vocab_size = check_convertible(direction, source)
    tokenizer = source_tokenizer(source, vocab_size) if with_tokenizer else None
    source_model, converted = load_and_convert(direction, source)
    difference = max_output_difference(source_model, converted)
    save_converted(converted, output, overwrite=overwrite, tokenizer=tokenizer)
    return (
        f"{type(source_model).__name__} ({source}) -> {type(converted).__name__} ({output}); "
        f"max |output difference| on a random padded batch: {difference:.3g}"
    )


@contextlib.contextmanager
def _quiet_transformers():
    """No loading bars or load reports on stderr: the command's refusal is its one line (missing weights are
    refused by `load_bert` / `load_gpt2` / `load_bart` with the keys the report would list)."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    direction = next(name for name in DIRECTIONS if getattr(args, name))
    source, with_tokenizer = getattr(args, direction), not args.no_tokenizer
    try:
        with _quiet_transformers():
            summary = convert_folder(direction, source, args.output, args.overwrite, with_tokenizer)
    except (ValueError, TypeError, KeyError, OSError) as error:  # CheckpointError is a ValueError
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
