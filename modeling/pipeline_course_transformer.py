"""`text2text-generation` for the course Transformer's encoder-decoder.

transformers 5 removed the text2text, translation and summarization pipelines. An encoder-decoder config
names this class in `custom_pipelines`, and saved folders carry this file, so
`pipeline("text2text-generation", model=folder, trust_remote_code=True)` works again for our models.
"""

from __future__ import annotations

from typing import Any

from transformers import GenerationConfig, Pipeline


class CourseTransformerText2TextPipeline(Pipeline):
    """Source text -> encoder -> decoder generation -> target text, as `[{"generated_text": ...}]` per input.

    Generation is greedy with at most 64 new tokens unless the call or the model's generation config says otherwise.
    """

    _pipeline_calls_generate = True
    _load_tokenizer = True
    _default_generation_config = GenerationConfig(max_new_tokens=64)

    def _sanitize_parameters(
        self,
        truncation: bool | None = None,
        max_source_length: int | None = None,
        skip_special_tokens: bool = True,
        **generate_kwargs: Any,
    ):
        preprocess = {}
        if truncation is not None:
            preprocess["truncation"] = truncation
        if max_source_length is not None:
            preprocess["max_length"] = max_source_length
        return preprocess, generate_kwargs, {"skip_special_tokens": skip_special_tokens}

    def preprocess(self, text: str, truncation: bool = True, max_length: int | None = None) -> dict:
        if not isinstance(text, str):
            raise TypeError(f"text2text-generation expects a string, got {type(text).__name__}")
        if max_length is None:
            max_length = self.model.config.max_position_embeddings
        return self.tokenizer(text, return_tensors="pt", truncation=truncation, max_length=max_length)

    def _forward(self, model_inputs: dict, **generate_kwargs: Any) -> dict:
        generate_kwargs = self._prepare_generate_kwargs(generate_kwargs)
        inputs = {k: v for k, v in model_inputs.items() if k in ("input_ids", "attention_mask")}
        return {"output_ids": self.model.generate(**inputs, **generate_kwargs)}

    def postprocess(self, model_outputs: dict, skip_special_tokens: bool = True) -> list[dict[str, str]]:
        return [
            {"generated_text": self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)}
            for ids in model_outputs["output_ids"]
        ]


__all__ = ["CourseTransformerText2TextPipeline"]
