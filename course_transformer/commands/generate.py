"""Generate from a trained folder (`<run_dir>/final`), loaded with the safe loader, through the pipelines.

    course-transformer generate runs/demo/final "And God said" "In the beginning"
    course-transformer generate runs/demo/final "And God said" --sample --temperature 0.8 --seed 1
    course-transformer generate runs/enfr-cpu/final "In the beginning God created the heaven and the earth."
    course-transformer generate runs/bert-base-mlm/final "The LORD is my [MASK]."

The folder is checked before any weight is used (`course_transformer.core.checkpoint.load_pretrained_safely`): a
missing, unexpected or mis-shaped weight is an error naming the file and the key, never a randomly initialised
tensor. The task follows the folder's architecture: a decoder uses `text-generation`, an encoder-decoder our
`text2text-generation` pipeline (transformers 5 dropped the built-in one), an encoder `fill-mask`. Greedy
decoding unless `--sample`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# architecture -> the head that generates (or fills masks) and the pipeline task that drives it
HEADS = {
    "decoder": ("CourseTransformerForCausalLM", "text-generation"),
    "encoder": ("CourseTransformerForMaskedLM", "fill-mask"),
    "encoder-decoder": ("CourseTransformerForSeq2SeqLM", "text2text-generation"),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def existing_folder(folder: str | Path) -> Path:
    """`folder` as a Path; a path that does not exist, or is not a folder, is refused as such."""
    path = Path(folder)
    if not path.exists():
        raise FileNotFoundError(f"{folder}: no such folder (expected a saved model folder, e.g. runs/demo/final)")
    if not path.is_dir():
        raise NotADirectoryError(f"{folder}: not a folder (expected a saved model folder, e.g. runs/demo/final)")
    return path


def check_if_ours(folder: str | Path) -> None:
    """Check every weight of a course Transformer folder against its config (`validate_checkpoint_folder`: missing,
    unexpected and mis-shaped keys raise `CheckpointError`); other folders and names are left to their loader."""
    import json

    from course_transformer.core.checkpoint import CONFIG_NAME, validate_checkpoint_folder
    from modeling import CourseTransformerConfig

    config = Path(folder) / CONFIG_NAME
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return  # not a model folder of ours: the loader reports what is wrong with it
    if model_type == CourseTransformerConfig.model_type:
        validate_checkpoint_folder(folder)


def load_folder(folder: str | Path):
    """(model, tokenizer, task) of a saved course Transformer folder, every weight checked against its config.

    Raises `FileNotFoundError` for a path that does not exist or a folder without tokenizer files, and
    `CheckpointError` (one line naming the file and the keys) for weights that do not match the config.
    """
    path = existing_folder(folder)  # before the heavy imports: a typo is reported at once
    from transformers import AutoTokenizer

    from course_transformer.core.checkpoint import load_pretrained_safely, read_config

    head, task = HEADS[read_config(path).architecture]
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{folder}: no tokenizer beside the model ({' or '.join(TOKENIZER_FILES)})")
    model = load_pretrained_safely(path, head).eval()
    return model, AutoTokenizer.from_pretrained(path), task


def make_pipeline(model, tokenizer, task: str):
    from transformers import pipeline

    if task == "text2text-generation":
        from modeling import CourseTransformerText2TextPipeline

        return CourseTransformerText2TextPipeline(model=model, tokenizer=tokenizer)
    return pipeline(task, model=model, tokenizer=tokenizer, **({"top_k": 1} if task == "fill-mask" else {}))


def generate(
    folder: str,
    prompts: list[str],
    max_new_tokens: int = 40,
    sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 50,
    seed: int = 0,
) -> list[str]:
    """One output string per prompt."""
    import torch

    model, tokenizer, task = load_folder(folder)
    runner = make_pipeline(model, tokenizer, task)
    torch.manual_seed(seed)
    if task == "fill-mask":
        return [_filled(runner(prompt)) for prompt in prompts]
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": sample}
    if sample:
        kwargs.update(temperature=temperature, top_k=top_k)
    return [runner(prompt, **kwargs)[0]["generated_text"] for prompt in prompts]


def _filled(result) -> str:
    return result[0]["sequence"] if result and isinstance(result[0], dict) else str(result)


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(
        prog="course-transformer generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("folder", help="a saved model folder, e.g. runs/demo/final")
    parser.add_argument("prompts", nargs="+")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    outputs = generate(
        args.folder, args.prompts, args.max_new_tokens, args.sample, args.temperature, args.top_k, args.seed
    )
    for prompt, output in zip(args.prompts, outputs, strict=True):
        print(f"{prompt!r} -> {output!r}")
    return outputs


if __name__ == "__main__":
    main()
