"""Load a saved model folder the way the Hub will: in a fresh interpreter where this project cannot be imported.

    python -m course_transformer.commands.validate runs/demo/final-hub --task text-generation \
        --auto-class AutoModelForCausalLM

`course_transformer.commands.publish` runs it on every folder before upload. The folder's config is loaded first
(a broken config fails before torch is imported), then the model through its Auto class with
`trust_remote_code=True` (no weight may be missing or unexpected), one forward pass (finite outputs), the
folder's pipeline on a sample input and, given `--snippet`, the model card's usage example. One JSON report is
printed as the last line of stdout; a failure exits non-zero with the reason as the last line of stderr.

The guarantee is that nothing of this project stands in for the folder's own code. The checks run in an isolated
interpreter (`python -I`: no PYTHONPATH, no user site, no working directory or script folder on `sys.path`) that
runs this file by its path, and an import hook refuses `modeling`, `evaluation`, `scripts` and
`course_transformer` even where they are installed. When `main` is called where one of them is already imported
(`python -m`, or from Python), it starts that interpreter itself. This file imports only the standard library
before the checks, and only torch and transformers in them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.abc
import io
import json
import subprocess
import sys
from pathlib import Path

BLOCKED = ("modeling", "evaluation", "scripts", "course_transformer")
PIPELINE_ARGUMENTS = {
    "text-generation": {"do_sample": False, "max_new_tokens": 8},
    "text2text-generation": {"max_new_tokens": 8},
    "fill-mask": {"top_k": 3},
}


class Refused(Exception):
    """The folder does not load or run as the Hub would run it; the message says what failed."""


class _Blocker(importlib.abc.MetaPathFinder):
    def __init__(self, names: tuple[str, ...]):
        self.names = names

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ImportError(f"blocked: {name}")


def isolated_command(argv: list[str]) -> list[str]:
    """The command line that runs this file by path in an isolated interpreter with `argv`."""
    return [sys.executable, "-I", str(Path(__file__).resolve()), *argv]


def block_imports(names: tuple[str, ...]) -> None:
    """Make the packages `names` unimportable in this process (even where they are installed)."""
    loaded = sorted(name for name in names if name in sys.modules)
    if loaded:
        raise Refused(f"package {', '.join(loaded)} is already imported: validation would prove nothing")
    sys.meta_path.insert(0, _Blocker(names))


def load(folder: str, auto_class: str):
    """(config, model in eval mode, tokenizer) of `folder`, loaded with `trust_remote_code=True`."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)  # before torch: a bad config fails fast
    import transformers
    from transformers import AutoTokenizer

    model, info = getattr(transformers, auto_class).from_pretrained(
        folder, trust_remote_code=True, output_loading_info=True
    )
    problems = {k: sorted(map(str, v)) for k, v in info.items() if v}
    if problems:
        raise Refused("loading reported " + json.dumps(problems))
    return config, model.eval(), AutoTokenizer.from_pretrained(folder, trust_remote_code=True)


def forward(config, model, tokenizer, text: str):
    """The logits (or last hidden state) of one forward pass on `text`, refused when not finite."""
    import torch

    enc = tokenizer(text, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if config.is_encoder_decoder:
        inputs["decoder_input_ids"] = torch.tensor([[config.decoder_start_token_id]])
    with torch.no_grad():
        out = model(**inputs)
    main = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    if not torch.isfinite(main).all():
        raise Refused("the forward pass gave non-finite outputs")
    return main


def run_snippet(snippet: str) -> None:
    """The model card's usage example, pointed at the folder, must run as printed."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            exec(snippet, {})
    except Exception as error:
        raise Refused(f"the model card's usage snippet fails: {type(error).__name__}: {error}") from None


def validate(folder: str, task: str, auto_class: str, sample: str, snippet: str = "") -> dict:
    """Load and run `folder` (see the module docstring); the report of what ran."""
    from transformers import pipeline

    config, model, tokenizer = load(folder, auto_class)
    text = sample
    if task == "fill-mask":
        if tokenizer.mask_token is None:
            raise Refused("fill-mask needs a tokenizer with a mask token; this tokenizer has none")
        text = f"{sample} {tokenizer.mask_token}"
    main = forward(config, model, tokenizer, text)
    result = pipeline(task, model=folder, trust_remote_code=True)(text, **PIPELINE_ARGUMENTS.get(task, {}))
    if snippet:
        run_snippet(snippet)
    return {
        "model_class": type(model).__name__,
        "module": type(model).__module__,
        "output_shape": list(main.shape),
        "task": task,
        "input": text,
        "output": json.loads(json.dumps(result, default=str)),
        "snippet_ran": bool(snippet),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m course_transformer.commands.validate",
        description="Load and run a model folder with trust_remote_code=True in a fresh isolated interpreter "
        "in which this project cannot be imported; print a JSON report.",
    )
    parser.add_argument("folder", help="the folder to validate (config, weights, model code, tokenizer)")
    parser.add_argument("--task", required=True, help="pipeline task, e.g. text-generation")
    parser.add_argument("--auto-class", required=True, help="transformers Auto class, e.g. AutoModelForCausalLM")
    parser.add_argument("--sample", default="the", help="input text of the forward pass and the pipeline")
    parser.add_argument("--snippet", type=Path, default=None, help="Python file to run (the card's usage example)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if not sys.flags.isolated and any(name in sys.modules for name in BLOCKED):
        # run with -m or called from Python, where this project is imported: check in a clean interpreter
        return subprocess.run(isolated_command(argv), check=False).returncode
    try:
        block_imports(BLOCKED)
        snippet = args.snippet.read_text() if args.snippet else ""
        report = validate(str(Path(args.folder).resolve()), args.task, args.auto_class, args.sample, snippet)
    except Refused as error:
        print(error, file=sys.stderr)
        return 1
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
