"""Configuration of the course Transformer: one config for the encoder (BERT-like), the decoder (GPT-like)
and the encoder-decoder (the 2017 translation model).

The config is the single source of truth: every architectural choice is a typed field here, validated at
construction, and the modules read it instead of taking loose keyword arguments. Named architectures
(BERT-base, GPT-2 124M, the Transformer base of Vaswani et al. 2017) are reproduced by field values alone;
see `modeling/presets/*.json`.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

ARCHITECTURES = ("encoder", "decoder", "encoder-decoder")
POSITION_ENCODINGS = ("sinusoidal", "learned", "rope", "alibi")
NORM_PLACEMENTS = ("post", "pre")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh")
CLASSIFIER_POOLINGS = ("auto", "pooler", "first", "last", "mean")


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"CourseTransformerConfig.{field}={value!r} is invalid: {allowed}")


class CourseTransformerConfig(PretrainedConfig):
    r"""Configuration of a [`CourseTransformerModel`].

    Args:
        architecture: `"encoder"` (bidirectional self-attention, BERT), `"decoder"` (masked self-attention, GPT)
            or `"encoder-decoder"` (encoder, then a decoder with masked self-attention and cross-attention).
        vocab_size: number of token ids V; source and target share it in the encoder-decoder.
        hidden_size: model width d_model (C in shape comments).
        num_attention_heads: heads H; the head width is D = hidden_size / H.
        num_encoder_layers / num_decoder_layers: depth of each stack (ignored for a stack the architecture lacks).
        intermediate_size: width of the position-wise feed-forward network (d_ff).
        hidden_act: `"relu"` (2017), `"gelu"` (BERT) or `"gelu_tanh"` (GPT-2's tanh approximation).
        hidden_dropout_prob: dropout on embeddings and on every sub-layer output before the residual sum.
        attention_dropout_prob: dropout on the attention weights.
        max_position_embeddings: longest sequence; a hard limit for `learned` positions, the size of the
            precomputed table for `sinusoidal`.
        position_encoding: `"sinusoidal"` (added, fixed), `"learned"` (added, trained), `"rope"` (rotary, applied
            to queries and keys) or `"alibi"` (a per-head linear distance penalty on the scores).
        rope_theta: base of the rotary frequencies.
        norm_placement: `"post"` (LayerNorm after the residual sum: 2017, BERT) or `"pre"` (before each
            sub-layer, plus a final LayerNorm: GPT-2).
        layer_norm_eps: epsilon of every LayerNorm.
        embedding_layer_norm: LayerNorm on the summed embeddings (BERT).
        type_vocab_size: number of token types (segments); 0 disables token-type embeddings.
        use_bias: biases in the attention and feed-forward projections.
        scale_embeddings: multiply token embeddings by sqrt(d_model) (Vaswani et al. 2017, section 3.4).
        tie_word_embeddings: share the token embedding with the output projection (and, in the
            encoder-decoder, between encoder and decoder).
        add_pooling_layer: add BERT's pooler (dense + tanh on the first token) to the base model.
        classifier_pooling: how sequence classification summarises a sequence: `"auto"` (the pooler when there
            is one, the last token for a decoder, else the first), `"pooler"` (BERT's pooler),
            `"first"` (the first token, e.g. [CLS]), `"last"` (last non-padding token, GPT style) or `"mean"`.
        classifier_dropout: dropout before classification heads (defaults to `hidden_dropout_prob`).
        initializer_range: std of the normal initialisation of weights.
        use_cache: return key/value caches for fast generation.
        pruned_heads: heads removed from the projections by `prune_heads`, keyed by attention module
            (`"encoder.0.self"`, `"decoder.2.self"`, `"decoder.2.cross"`), each a sorted list of original head
            indices; `from_pretrained` builds the smaller projections from it. Empty for an unpruned model.
        pad_token_id / bos_token_id / eos_token_id / decoder_start_token_id / sep_token_id / mask_token_id:
            special token ids.

    Example:
        >>> from modeling import CourseTransformerConfig, CourseTransformerForCausalLM
        >>> config = CourseTransformerConfig(architecture="decoder", vocab_size=100, hidden_size=32,
        ...                                  num_attention_heads=4, num_decoder_layers=2, intermediate_size=64)
        >>> model = CourseTransformerForCausalLM(config)
    """

    model_type = "course_transformer"
    attribute_map = {"d_model": "hidden_size", "n_head": "num_attention_heads"}
    keys_to_ignore_at_inference = ["past_key_values"]

    architecture: str = "encoder-decoder"
    vocab_size: int = 32000
    hidden_size: int = 512
    num_attention_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    intermediate_size: int = 2048
    hidden_act: str = "relu"
    hidden_dropout_prob: float = 0.1
    attention_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    position_encoding: str = "sinusoidal"
    rope_theta: float = 10000.0
    norm_placement: str = "post"
    layer_norm_eps: float = 1e-5
    embedding_layer_norm: bool = False
    type_vocab_size: int = 0
    use_bias: bool = True
    scale_embeddings: bool = True
    tie_word_embeddings: bool = True
    add_pooling_layer: bool = False
    classifier_pooling: str = "auto"
    classifier_dropout: float | None = None
    initializer_range: float = 0.02
    use_cache: bool = True
    pruned_heads: dict[str, list[int]] | None = None
    is_decoder: bool = False
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    decoder_start_token_id: int | None = None
    sep_token_id: int | None = None
    mask_token_id: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        # Derived flags are set after the base class so that nothing resets them (see shared notes:
        # `is_encoder_decoder` set before the base initialisation is silently lost).
        self.is_encoder_decoder = self.architecture == "encoder-decoder"
        self.is_decoder = self.architecture == "decoder"
        if self.is_encoder_decoder and self.decoder_start_token_id is None:
            self.decoder_start_token_id = self.bos_token_id
        if self.is_encoder_decoder and not getattr(self, "custom_pipelines", None):
            # transformers 5 dropped text2text-generation; saved folders carry our pipeline and name it here.
            self.custom_pipelines = {
                "text2text-generation": {
                    "impl": "pipeline_course_transformer.CourseTransformerText2TextPipeline",
                    "pt": ["AutoModelForSeq2SeqLM"],
                    "type": "text",
                }
            }
        # JSON gives the lists back as they were written; a dict from Python may hold tuples or sets.
        self.pruned_heads = {str(k): sorted(int(h) for h in v) for k, v in (self.pruned_heads or {}).items() if v}
        self.validate()

    # `PretrainedConfig` refuses `output_attentions=True` unless the backend is eager, because its own models
    # cannot return weights from fused kernels. Ours can (the layers that must return weights run the eager
    # math, the others keep the fast kernel), so the flag is accepted with every backend.
    @property
    def output_attentions(self) -> bool:
        return bool(self._output_attentions)

    @output_attentions.setter
    def output_attentions(self, value: bool) -> None:
        self._output_attentions = value

    def validate_output_attentions(self) -> None:
        return None

    @property
    def num_hidden_layers(self) -> int:
        """Depth of the stack that a key/value cache covers (the decoder when there is one)."""
        return self.num_decoder_layers if self.has_decoder else self.num_encoder_layers

    @property
    def has_encoder(self) -> bool:
        return self.architecture in ("encoder", "encoder-decoder")

    @property
    def has_decoder(self) -> bool:
        return self.architecture in ("decoder", "encoder-decoder")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        """Raise `ValueError` naming the field, the value and what is allowed, for any invalid setting."""
        self._validate_choices()
        self._validate_numbers()
        self._validate_shapes()
        self._validate_token_ids()
        self._validate_pruned_heads()

    def _validate_choices(self) -> None:
        choices = {
            "architecture": ARCHITECTURES,
            "position_encoding": POSITION_ENCODINGS,
            "norm_placement": NORM_PLACEMENTS,
            "hidden_act": ACTIVATIONS,
            "classifier_pooling": CLASSIFIER_POOLINGS,
        }
        for field, allowed in choices.items():
            value = getattr(self, field)
            if value not in allowed:
                _fail(field, value, f"allowed values are {', '.join(allowed)}")

    def _validate_numbers(self) -> None:
        positive = ["vocab_size", "hidden_size", "num_attention_heads", "intermediate_size", "max_position_embeddings"]
        if self.has_encoder:
            positive.append("num_encoder_layers")
        if self.has_decoder:
            positive.append("num_decoder_layers")
        for field in positive:
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                _fail(field, value, "must be a positive integer")
        for field in ("num_encoder_layers", "num_decoder_layers", "type_vocab_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                _fail(field, value, "must be a non-negative integer")

        for field in ("hidden_dropout_prob", "attention_dropout_prob", "classifier_dropout"):
            value = getattr(self, field)
            if value is None and field == "classifier_dropout":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                _fail(field, value, "must be a probability in [0, 1)")
        for field in ("layer_norm_eps", "initializer_range", "rope_theta"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                _fail(field, value, "must be a positive number")

    def _validate_shapes(self) -> None:
        if self.hidden_size % self.num_attention_heads != 0:
            _fail(
                "hidden_size",
                self.hidden_size,
                f"must be divisible by num_attention_heads={self.num_attention_heads}",
            )
        if self.position_encoding == "rope" and self.head_dim % 2 != 0:
            _fail(
                "position_encoding",
                "rope",
                f"rotary encoding needs an even head dim, but hidden_size/num_attention_heads = {self.head_dim}",
            )
        if self.position_encoding == "sinusoidal" and self.hidden_size % 2 != 0:
            _fail("hidden_size", self.hidden_size, "sinusoidal encoding needs an even hidden_size")
        if self.classifier_pooling == "pooler" and not self.add_pooling_layer:
            _fail("classifier_pooling", "pooler", "needs add_pooling_layer=True")

    def _validate_token_ids(self) -> None:
        for field in (
            "pad_token_id",
            "bos_token_id",
            "eos_token_id",
            "decoder_start_token_id",
            "sep_token_id",
            "mask_token_id",
        ):
            value = getattr(self, field)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size
            ):
                _fail(field, value, f"must be None or a token id in [0, {self.vocab_size})")

    def _validate_pruned_heads(self) -> None:
        stacks = {"encoder": self.num_encoder_layers if self.has_encoder else 0}
        stacks["decoder"] = self.num_decoder_layers if self.has_decoder else 0
        for key, heads in self.pruned_heads.items():
            stack, _, rest = key.partition(".")
            layer, _, kind = rest.partition(".")
            kinds = ("self", "cross") if stack == "decoder" and self.is_encoder_decoder else ("self",)
            if not (layer.isdigit() and int(layer) < stacks.get(stack, 0) and kind in kinds):
                _fail("pruned_heads", key, "keys are '<encoder|decoder>.<layer>.<self|cross>' of existing modules")
            if any(not 0 <= h < self.num_attention_heads for h in heads):
                _fail("pruned_heads", {key: heads}, f"head indices must lie in [0, {self.num_attention_heads})")


__all__ = ["CourseTransformerConfig"]
