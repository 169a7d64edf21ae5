"""Generate from a trained folder (`<run_dir>/final`) through the Auto classes and the pipelines.

    course-transformer generate runs/demo/final "And God said" "In the beginning"
    course-transformer generate runs/demo/final "And God said" --sample --temperature 0.8 --seed 1
    course-transformer generate runs/enfr-cpu/final "In the beginning God created the heaven and the earth."
    course-transformer generate runs/bert-base-mlm/final "The LORD is my [MASK]."

The task follows the folder's architecture: a decoder uses `text-generation`, an encoder-decoder the folder's
own `text2text-generation` pipeline (transformers 5 dropped the built-in one; the folder carries it as remote
code), an encoder `fill-mask`. Greedy decoding unless `--sample`.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
    from transformers import AutoConfig, pipeline

    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    architecture = getattr(config, "architecture", "decoder")
    if architecture == "encoder":
        filler = pipeline("fill-mask", model=folder, tokenizer=folder, trust_remote_code=True, top_k=1)
        outputs = []
        for prompt in prompts:
            result = filler(prompt)
            outputs.append(result[0]["sequence"] if result and isinstance(result[0], dict) else str(result))
        return outputs
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": sample}
    if sample:
        kwargs.update(temperature=temperature, top_k=top_k)
    if architecture == "encoder-decoder":
        translator = pipeline("text2text-generation", model=folder, tokenizer=folder, trust_remote_code=True)
        return [translator(prompt, **kwargs)[0]["generated_text"] for prompt in prompts]
    generator = pipeline("text-generation", model=folder, tokenizer=folder, trust_remote_code=True)
    return [generator(prompt, **kwargs)[0]["generated_text"] for prompt in prompts]


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    for prompt, output in zip(args.prompts, outputs):
        print(f"{prompt!r} -> {output!r}")
    return outputs


if __name__ == "__main__":
    main()
