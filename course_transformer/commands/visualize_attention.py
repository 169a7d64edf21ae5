"""Attention heatmaps of one sentence: one head, or every head of a layer.

course-transformer visualize --model bert-minilm --text "the pizza came out of the oven and it tasted good" \
    --layer 3 --head 8 --query it --output docs/figures/pizza_minilm.png
course-transformer visualize --model bert-minilm --text "..." --query it --key pizza --output it.png
course-transformer visualize --model ours-tiny --text "..." --layer 1 --output layer1.png

Layers and heads count from 1, as in the reports. With --query, the figure adds that token's attention row as bars and
the top keys of every head are printed; with --query and --key but no --layer/--head, the head where the query
attends most to the key is chosen.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

from course_transformer.core.io import atomic_write_bytes
from evaluation import analysis


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help=f"one of {', '.join(analysis.MODEL_NAMES)}, or a folder")
    parser.add_argument("--text", required=True, help="the sentence")
    parser.add_argument("--layer", type=int, help="layer, from 1 (default: chosen by --key, else 1)")
    parser.add_argument("--head", type=int, help="head, from 1 (default: every head of the layer)")
    parser.add_argument("--query", help="a token of the sentence whose attention row is shown (first match)")
    parser.add_argument("--key", help="with --query: pick the head where the query attends most to this token")
    parser.add_argument("--output", required=True, type=Path, help="PNG file to write")
    return parser


def find_token(tokens: list[str], word: str, what: str) -> int:
    bare = [analysis.metric_module("attention_targets").bare(t).lower() for t in tokens]
    if word.lower() not in bare:
        raise ValueError(f"{what} {word!r} is not a token of the sentence: {tokens}")
    return bare.index(word.lower())


def render(attention, tokens, layer: int, heads: list[int], query: int | None, path: Path, title: str) -> None:
    """Heatmaps of `heads` of `layer` (0-based); with `query`, the query's row as a bar chart under each."""
    plt = analysis._plt()
    n = len(tokens)
    columns = min(len(heads), 4)
    rows = -(-len(heads) // columns)
    size = max(3.2, 0.28 * n + 1.6)
    height = size + (1.6 if query is not None else 0)
    fig = plt.figure(figsize=(size * columns, height * rows))
    grid = fig.add_gridspec(rows * (2 if query is not None else 1), columns, height_ratios=None)
    for index, head in enumerate(heads):
        r, c = divmod(index, columns)
        ax = fig.add_subplot(grid[r * (2 if query is not None else 1), c])
        ax.imshow(attention[layer, head], cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(n), tokens, rotation=90, fontsize=7)
        ax.set_yticks(range(n), tokens, fontsize=7)
        ax.set_title(f"layer {layer + 1}, head {head + 1}", fontsize=9)
        if query is not None:
            ax.axhline(query, color="tab:red", linewidth=0.8, alpha=0.6)
            bars = fig.add_subplot(grid[r * 2 + 1, c])
            row = attention[layer, head, query]
            bars.bar(range(n), row, color=["tab:red" if v == row.max() else "tab:blue" for v in row])
            bars.set_xticks(range(n), tokens, rotation=90, fontsize=7)
            bars.set_ylim(0, 1)
            bars.set_ylabel(f"from '{tokens[query]}'", fontsize=8)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path, dpi=100)


def save_figure(fig, path: Path, dpi: int = 100) -> Path:
    """Lay out, write `path` atomically (a reader never sees half a PNG) and close the figure."""
    plt = analysis._plt()
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format=path.suffix.lstrip(".").lower() or "png", dpi=dpi)
    plt.close(fig)
    return atomic_write_bytes(path, image.getvalue())


def load_model(name: str):
    """(model, tokenizer, label) of a named model or a folder; a folder of ours has every weight checked against
    its config first, and a path that does not exist is reported as such."""
    from course_transformer.commands.generate import check_if_ours, existing_folder

    if name not in analysis.MODEL_NAMES:
        try:
            check_if_ours(existing_folder(name))
        except FileNotFoundError:
            names = ", ".join(analysis.MODEL_NAMES)
            raise FileNotFoundError(f"--model {name}: no such folder (nor one of the names {names})") from None
    return analysis.load_named_model(name)


def sentence_attention(args: argparse.Namespace):
    """(attention (L, H, n, n), tokens, label, query index, key index) of the sentence."""
    model, tokenizer, label = load_model(args.model)
    record = analysis.collect_attentions(model, tokenizer, [args.text])[0]
    query = find_token(record.tokens, args.query, "--query") if args.query else None
    key = find_token(record.tokens, args.key, "--key") if args.key else None
    return record.attention, record.tokens, label, query, key


def choose_head(attention, tokens, layer: int | None, head: int | None, query: int | None, key: int | None):
    """(layer, head), 0-based: with a query and a key but no full choice, where the query attends most to the key;
    else layer 0 by default and head None (every head)."""
    if query is not None and key is not None and (layer is None or head is None):
        scores = attention[:, :, query, key]  # (L, H)
        if layer is not None:
            scores = np.where(np.arange(scores.shape[0])[:, None] == layer, scores, -1)
        layer, head = (int(i) for i in np.unravel_index(int(np.argmax(scores)), scores.shape))
        print(
            f"'{tokens[query]}' attends most to '{tokens[key]}' in layer {layer + 1}, head {head + 1}: "
            f"{attention[layer, head, query, key]:.2f}"
        )
    return (0 if layer is None else layer), head


def print_top_keys(attention, tokens, layer: int, query: int) -> None:
    print(f"top keys of '{tokens[query]}' in layer {layer + 1}:")
    for h in range(attention.shape[1]):
        row = attention[layer, h, query]
        top = np.argsort(row)[::-1][:3]
        print(f"  head {h + 1:2d}: " + ", ".join(f"{tokens[k]} {row[k]:.2f}" for k in top))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        attention, tokens, label, query, key = sentence_attention(args)
    except (FileNotFoundError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    num_layers, num_heads = attention.shape[:2]
    first = (args.layer - 1 if args.layer else None), (args.head - 1 if args.head else None)
    layer, head = choose_head(attention, tokens, *first, query, key)
    if not (0 <= layer < num_layers) or (head is not None and not 0 <= head < num_heads):
        print(f"error: the model has {num_layers} layers x {num_heads} heads (counted from 1)", file=sys.stderr)
        return 2
    if query is not None:
        print_top_keys(attention, tokens, layer, query)
    heads = [head] if head is not None else list(range(num_heads))
    render(attention, tokens, layer, heads, query, args.output, f"{label}\n{args.text}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
