"""The course Transformer as a Hugging Face model family.

Importing this package registers the attention lens (`attn_implementation="lens"`, for any transformers model; see
attention_lens.py) and `course_transformer` with the Auto classes, and marks every class for remote
code, so that `save_pretrained` writes `auto_map` and copies the model code into the saved folder: the folder
then loads with `trust_remote_code=True` in a process where this package is not installed.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .attention_lens import LENS, AttentionLens
from .configuration_course_transformer import CourseTransformerConfig
from .modeling_course_transformer import (
    CourseTransformerForCausalLM,
    CourseTransformerForMaskedLM,
    CourseTransformerForSeq2SeqLM,
    CourseTransformerForSequenceClassification,
    CourseTransformerForTokenClassification,
    CourseTransformerModel,
    CourseTransformerPreTrainedModel,
    eager_attention_forward,
)
from .pipeline_course_transformer import CourseTransformerText2TextPipeline
from .presets import list_presets, load_preset

AUTO_CLASSES = {
    AutoModel: CourseTransformerModel,
    AutoModelForCausalLM: CourseTransformerForCausalLM,
    AutoModelForMaskedLM: CourseTransformerForMaskedLM,
    AutoModelForSeq2SeqLM: CourseTransformerForSeq2SeqLM,
    AutoModelForSequenceClassification: CourseTransformerForSequenceClassification,
    AutoModelForTokenClassification: CourseTransformerForTokenClassification,
}

AutoConfig.register(CourseTransformerConfig.model_type, CourseTransformerConfig, exist_ok=True)
CourseTransformerConfig.register_for_auto_class()
for _auto_class, _model_class in AUTO_CLASSES.items():
    _auto_class.register(CourseTransformerConfig, _model_class, exist_ok=True)
    _model_class.register_for_auto_class(_auto_class.__name__)

__all__ = [
    "LENS",
    "AttentionLens",
    "CourseTransformerConfig",
    "CourseTransformerPreTrainedModel",
    "CourseTransformerModel",
    "CourseTransformerForCausalLM",
    "CourseTransformerForSeq2SeqLM",
    "CourseTransformerForMaskedLM",
    "CourseTransformerForSequenceClassification",
    "CourseTransformerForTokenClassification",
    "CourseTransformerText2TextPipeline",
    "eager_attention_forward",
    "list_presets",
    "load_preset",
]
