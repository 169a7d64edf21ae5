"""Cross-attention of a trained translation model: which English tokens each French token reads.

    python -m scripts.plot_cross_attention runs/enfr-cpu/final                      # first short test verse
    python -m scripts.plot_cross_attention runs/enfr-cpu/final --index 12 --mode reference
    python -m scripts.plot_cross_attention runs/enfr-cpu/final --source "And God said" --target "Et Dieu dit"
    python -m scripts.plot_cross_attention runs/enfr-cpu/final --bleu-examples all  # + BLEU on the test verses

For one verse pair the decoder runs teacher-forced on the reference French (`reference`) and/or on the model's
own greedy translation (`greedy`), with `output_attentions=True`. Row t of a map is decoder position t, labelled
with the token it predicts (y_t); its columns are the encoder tokens, and the row is a softmax over them (sums
to 1). The figure has, per mode, one panel per decoder layer (mean over heads) and one for the best-aligned head.

Alignment measure (no gold alignments exist for these Bibles): a small lexicon of unambiguous word pairs
(God -> Dieu, earth -> terre, ...). In each of `--align-examples` test verses (teacher-forced on the reference)
where both words occur exactly once, a map scores a hit when the first token of the French word attends most
(argmax) to a token of the English word. Two baselines are printed beside it: chance (the English word's share
of the source tokens) and the diagonal (the source token at the same relative position). The best-aligned head
is the one with the highest hit rate.

Outputs, in `--output-dir` (default: the run folder, the parent of `final/`): `cross_attention.png`,
`cross_attention.json` (the pair, its tokens, the alignment scores); with `--bleu-examples`, `<split>_bleu.json`
(sacreBLEU score and signature) and `<split>_translations.jsonl` (source, reference, greedy hypothesis).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

from course_transformer.core.io import atomic_write_text

# Unambiguous English -> French word pairs of the KJV and Segond (Segond writes "l'Éternel" for "the LORD").
LEXICON: tuple[tuple[str, str], ...] = (
    ("God", "Dieu"),
    ("LORD", "Éternel"),
    ("earth", "terre"),
    ("heaven", "ciel"),
    ("king", "roi"),
    ("son", "fils"),
    ("father", "père"),
    ("people", "peuple"),
    ("house", "maison"),
    ("land", "pays"),
    ("day", "jour"),
    ("children", "enfants"),
    ("Israel", "Israël"),
    ("Jerusalem", "Jérusalem"),
    ("David", "David"),
    ("Moses", "Moïse"),
    ("hand", "main"),
    ("word", "parole"),
    ("priest", "sacrificateur"),
    ("city", "ville"),
    ("water", "eau"),
    ("fire", "feu"),
    ("man", "homme"),
    ("woman", "femme"),
    ("sword", "épée"),
)
MODES = ("reference", "greedy")


@dataclass
class CrossAttention:
    """The cross-attention of one verse pair, padding-free."""

    mode: str  # "reference" (teacher-forced on the given target) or "greedy" (on the model's own translation)
    source: str
    target: str
    source_tokens: list[str]  # (S,) encoder tokens
    target_tokens: list[str]  # (T,) the token predicted at each decoder position (ends with </s>)
    attention: np.ndarray  # (L, H, T, S) float32: softmax over the S source tokens, every row sums to 1
    source_words: np.ndarray  # (S,) index of the whitespace word each token starts in, -1 for special tokens
    target_words: np.ndarray  # (T,)


# --------------------------------------------------------------------------------------------------- model


def require_encoder_decoder(model) -> None:
    """Cross-attention exists only in an encoder-decoder; say so, naming the field, before anything runs."""
    architecture = getattr(model.config, "architecture", None)
    if architecture is None:  # a foreign model: fall back on the Hugging Face flag
        architecture = "encoder-decoder" if getattr(model.config, "is_encoder_decoder", False) else "?"
    if architecture != "encoder-decoder":
        raise ValueError(
            f"config.architecture={architecture!r} is invalid for a cross-attention plot: allowed values are "
            f"'encoder-decoder' (a decoder or an encoder alone has no cross-attention)"
        )


def load_translation_model(folder: str | Path):
    """(model, tokenizer) of a saved course encoder-decoder, eager attention, eval mode."""
    from transformers import AutoTokenizer

    from course_transformer.core.conversion import load_course

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a saved model folder (no config.json)")
    model = load_course(folder)  # eager attention: the weights are the exact softmax
    require_encoder_decoder(model)
    return model, AutoTokenizer.from_pretrained(folder)


def _room(model, max_new_tokens: int) -> int:
    """New tokens that fit the decoder's position table (the start token takes one position)."""
    return min(max_new_tokens, getattr(model.config, "max_position_embeddings", max_new_tokens + 1) - 1)


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    """Readable token labels: byte-level BPE pieces decoded one by one, a leading space shown as nothing."""
    return [tokenizer.decode([i]).strip() or "␣" for i in ids]


def decoded_offsets(tokenizer, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """Text of `ids` and each token's (start, end) in it, from the lengths of the growing decoded prefix."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    offsets, previous = [], 0
    for k in range(len(ids)):
        end = len(tokenizer.decode(ids[: k + 1], skip_special_tokens=True))
        offsets.append((previous, end))
        previous = end
    return text, offsets


def word_ids(text: str, offsets, special) -> np.ndarray:
    from evaluation.analysis import whitespace_word_ids

    return whitespace_word_ids(text, offsets, special)


@torch.no_grad()
def cross_attention(
    model, tokenizer, source: str, target: str | None = None, max_new_tokens: int = 128
) -> CrossAttention:
    """Cross-attention maps of one pair; `target=None` uses the model's greedy translation of `source`.

    >>> record = cross_attention(model, tokenizer, "And God said", "Et Dieu dit")
    >>> record.attention.shape  # (layers, heads, French tokens, English tokens)
    (3, 4, 4, 4)
    """
    require_encoder_decoder(model)
    enc = tokenizer(source, return_tensors="pt", return_offsets_mapping=True, return_special_tokens_mask=True)
    src_ids = enc["input_ids"]  # (1, S), ends with </s>
    start = model.config.decoder_start_token_id
    if start is None:
        start = model.config.bos_token_id
    if target is None:
        generated = model.generate(
            input_ids=src_ids,
            attention_mask=enc["attention_mask"],
            do_sample=False,
            num_beams=1,
            max_new_tokens=_room(model, max_new_tokens),
        )
        tgt_ids = generated[0, 1:].tolist()  # drop the start token; ends with </s> unless cut by max_new_tokens
        target, tgt_offsets = decoded_offsets(tokenizer, tgt_ids)
        tgt_special = [int(i in tokenizer.all_special_ids) for i in tgt_ids]
        mode = "greedy"
    else:
        tgt = tokenizer(target, return_offsets_mapping=True, return_special_tokens_mask=True)
        tgt_ids, tgt_offsets, tgt_special = tgt["input_ids"], tgt["offset_mapping"], tgt["special_tokens_mask"]
        mode = "reference"
    # Teacher forcing: the decoder reads <s> y_1 .. y_{T-1}; position t predicts y_t (the row's label).
    decoder_input_ids = torch.tensor([[start, *tgt_ids[:-1]]])  # (1, T)
    out = model(
        input_ids=src_ids,
        attention_mask=enc["attention_mask"],
        decoder_input_ids=decoder_input_ids,
        output_attentions=True,
        use_cache=False,
    )
    if not out.cross_attentions or out.cross_attentions[0] is None:
        raise RuntimeError(f"{type(model).__name__} returned no cross-attention weights")
    attention = torch.stack(out.cross_attentions, dim=1)[0].float().numpy()  # L x (1, H, T, S) -> (L, H, T, S)
    src_list = src_ids[0].tolist()
    return CrossAttention(
        mode=mode,
        source=source,
        target=target,
        source_tokens=token_labels(tokenizer, src_list),
        target_tokens=token_labels(tokenizer, tgt_ids),
        attention=attention,
        source_words=word_ids(source, enc["offset_mapping"][0].tolist(), enc["special_tokens_mask"][0].tolist()),
        target_words=word_ids(target, tgt_offsets, tgt_special),
    )


@torch.no_grad()
def translate(model, tokenizer, sources: list[str], batch_size: int = 32, max_new_tokens: int = 128) -> list[str]:
    """Greedy translations, batched by source length (less padding), returned in the input order."""
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    hypotheses: list[str] = [""] * len(sources)
    for i in range(0, len(order), batch_size):
        chunk = order[i : i + batch_size]
        enc = tokenizer([sources[j] for j in chunk], return_tensors="pt", padding=True)
        ids = model.generate(**enc, max_new_tokens=_room(model, max_new_tokens), do_sample=False, num_beams=1)
        for j, text in zip(chunk, tokenizer.batch_decode(ids, skip_special_tokens=True)):
            hypotheses[j] = text.strip()
    return hypotheses


# ----------------------------------------------------------------------------------------------- alignment


def _word_parts(text: str) -> list[set[str]]:
    """Per whitespace word, its casefolded letter runs: "l'Éternel," -> {"l", "éternel"}."""
    return [{part.casefold() for part in re.findall(r"\w+", word)} for word in text.split()]


def _starts(word: str, token: str) -> bool:
    letters = re.sub(r"\W", "", token).casefold()
    return bool(letters) and word.casefold().startswith(letters)


def anchor_cells(record: CrossAttention, lexicon=LEXICON) -> list[tuple[str, str, int, list[int]]]:
    """(english, french, target row, source columns) for each lexicon pair whose two words occur exactly once.

    The row is the first token of the French word; the columns are the tokens of the English word."""
    src_parts, tgt_parts = _word_parts(record.source), _word_parts(record.target)
    cells = []
    for english, french in lexicon:
        src_hits = [w for w, parts in enumerate(src_parts) if english.casefold() in parts]
        tgt_hits = [w for w, parts in enumerate(tgt_parts) if french.casefold() in parts]
        if len(src_hits) != 1 or len(tgt_hits) != 1:
            continue
        # The French word's first token, after an elided article ("l'Éternel": the row of "Éternel", not "l").
        rows = [
            int(r)
            for r in np.flatnonzero(record.target_words == tgt_hits[0])
            if _starts(french, record.target_tokens[r])
        ] or np.flatnonzero(record.target_words == tgt_hits[0])
        # The English word's tokens, not its punctuation ("son:" -> "son").
        cols = [
            int(c)
            for c in np.flatnonzero(record.source_words == src_hits[0])
            if re.search(r"\w", record.source_tokens[c])
        ]
        if len(rows) and cols:
            cells.append((english, french, int(rows[0]), cols))
    return cells


def alignment_scores(records: list[CrossAttention], lexicon=LEXICON) -> dict:
    """Hit rates (argmax on the English word) per layer (mean of heads) and per head, with two baselines."""
    num_layers, num_heads = records[0].attention.shape[:2]
    layer_hits, head_hits = np.zeros(num_layers), np.zeros((num_layers, num_heads))
    chance = diagonal = 0.0
    pairs: dict[str, int] = {}
    pair_hits: dict[str, np.ndarray] = {}  # per pair, hits of each layer's mean
    count = 0
    for record in records:
        mean = record.attention.mean(axis=1)  # (L, T, S)
        T, S = record.attention.shape[2:]
        for english, french, row, cols in anchor_cells(record, lexicon):
            count += 1
            name = f"{english}->{french}"
            pairs[name] = pairs.get(name, 0) + 1
            hits = np.isin(mean[:, row].argmax(-1), cols)  # (L,)
            pair_hits[name] = pair_hits.get(name, 0) + hits
            layer_hits += hits
            head_hits += np.isin(record.attention[:, :, row].argmax(-1), cols)
            chance += len(cols) / S
            diagonal += int(round(row * (S - 1) / max(T - 1, 1))) in cols
    if count == 0:
        return {"pairs": 0}
    best = np.unravel_index(int(head_hits.argmax()), head_hits.shape)
    # Words spelled alike in both languages (David) could be matched by copying the token: scored apart too.
    translated = [name for name in pairs if name.split("->")[0].casefold() != name.split("->")[1].casefold()]
    n_translated = sum(pairs[name] for name in translated)
    hits_translated = sum((pair_hits[name] for name in translated), np.zeros(num_layers))
    return {
        "pairs": count,
        "verses": len(records),
        "pair_counts": dict(sorted(pairs.items(), key=lambda kv: -kv[1])),
        "layer_mean_hit_rate": (layer_hits / count).round(4).tolist(),
        "layer_mean_hit_rate_by_pair": {
            name: (pair_hits[name] / pairs[name]).round(3).tolist() for name in sorted(pairs, key=lambda n: -pairs[n])
        },
        "layer_mean_hit_rate_spelled_differently": {
            "pairs": n_translated,
            "hit_rate": (hits_translated / max(n_translated, 1)).round(4).tolist(),
        },
        "head_hit_rate": (head_hits / count).round(4).tolist(),
        "best_head": {
            "layer": int(best[0]) + 1,
            "head": int(best[1]) + 1,
            "hit_rate": round(head_hits.max() / count, 4),
        },
        "chance": round(chance / count, 4),
        "diagonal": round(diagonal / count, 4),
    }


def sharpest_head(record: CrossAttention) -> tuple[int, int]:
    """(layer, head), 0-based, of lowest mean row entropy: the fallback when no lexicon pair is available."""
    p = np.clip(record.attention, 1e-12, 1.0)
    entropy = -(p * np.log(p)).sum(-1).mean(-1)  # (L, H)
    return tuple(int(i) for i in np.unravel_index(int(entropy.argmin()), entropy.shape))


# ------------------------------------------------------------------------------------------------- figure


def render(records: list[CrossAttention], best: tuple[int, int], best_caption: str, path: Path, title: str) -> int:
    """Per record (one row of panels): every layer's mean over heads, then head `best` (0-based). Returns the
    number of heatmap panels. Red squares mark the lexicon cells (French word's row, English word's tokens)."""
    from course_transformer.commands.visualize_attention import save_figure
    from evaluation.analysis import _plt

    plt = _plt()
    num_layers, num_heads = records[0].attention.shape[:2]
    columns = num_layers + 1
    S = max(len(r.source_tokens) for r in records)
    T = max(len(r.target_tokens) for r in records)
    width, height = max(3.0, 0.19 * S + 1.4), max(2.6, 0.19 * T + 1.4)
    fig, axes = plt.subplots(
        len(records), columns, figsize=(width * columns, height * len(records) + 0.6), squeeze=False
    )
    panels = 0
    for axes_row, record in zip(axes, records):
        maps = [
            (record.attention[layer].mean(0), f"layer {layer + 1}: mean of {num_heads} heads")
            for layer in range(num_layers)
        ]
        maps.append((record.attention[best[0], best[1]], f"layer {best[0] + 1} head {best[1] + 1}: {best_caption}"))
        cells = anchor_cells(record)
        for ax, (grid, caption) in zip(axes_row, maps):
            # Each panel on its own scale (head means are flatter than single heads); the colour bar says how far.
            image = ax.imshow(grid, cmap="Blues", vmin=0, vmax=max(float(grid.max()), 1e-6), aspect="auto")  # (T, S)
            fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
            ax.set_xticks(range(len(record.source_tokens)), record.source_tokens, rotation=90, fontsize=6)
            ax.set_yticks(range(len(record.target_tokens)), record.target_tokens, fontsize=6)
            for _, _, row, cols in cells:
                for col in cols:
                    ax.add_patch(plt.Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="tab:red", lw=1))
            ax.set_title(f"{record.mode}: {caption}", fontsize=8)
            ax.set_xlabel("English (encoder) token", fontsize=7)
            panels += 1
        axes_row[0].set_ylabel("French token predicted", fontsize=7)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path, dpi=110)
    return panels


# ----------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a saved encoder-decoder folder (runs/<run>/final)")
    parser.add_argument("--dataset", help="en-fr DatasetDict (default: the run's train_config.yaml dataset)")
    parser.add_argument("--split", default="test", help="held-out split of the verse pairs (default: test)")
    parser.add_argument("--index", type=int, help="row of the split to plot (default: first short verse with 2 pairs)")
    parser.add_argument("--source", help="English text to plot instead of a dataset row")
    parser.add_argument("--target", help="with --source: the reference French (else only greedy mode)")
    parser.add_argument("--mode", choices=(*MODES, "both"), default="both", help="teacher-forced on which French")
    parser.add_argument("--max-source-tokens", type=int, default=24, help="length limit of the default verse")
    parser.add_argument("--align-examples", type=int, default=300, help="test verses for the alignment measure")
    parser.add_argument("--bleu-examples", default="0", help="greedy BLEU on this many split rows ('all'; 0: skip)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--output-dir", type=Path, help="default: the parent of the model folder (the run folder)")
    parser.add_argument("--output", type=Path, help="the PNG (default: <output-dir>/cross_attention.png)")
    return parser


def _dataset_of(model_folder: Path, explicit: str | None) -> tuple[str, str, str]:
    """(dataset, source column, target column): explicit, or the run's resolved training config."""
    run_config = model_folder.parent / "train_config.yaml"
    dataset, source, target = "data/bible-full/en-fr", "en", "fr"
    if run_config.is_file():
        import yaml

        values = yaml.safe_load(run_config.read_text()) or {}
        dataset = values.get("dataset", dataset)
        source, target = values.get("source_column", source), values.get("target_column", target)
    return explicit or dataset, source, target


def _default_row(tokenizer, rows, source: str, target: str, max_tokens: int) -> int:
    """The first row whose source is at most `max_tokens` tokens long and holds two lexicon pairs (else one)."""
    fallback = None
    for i, (en, fr) in enumerate(zip(rows[source], rows[target])):
        if len(tokenizer(en)["input_ids"]) > max_tokens:
            continue
        parts_en, parts_fr = _word_parts(en), _word_parts(fr)
        found = sum(
            any(e.casefold() in p for p in parts_en) and any(f.casefold() in p for p in parts_fr) for e, f in LEXICON
        )
        if found >= 2:
            return i
        if found == 1 and fallback is None:
            fallback = i
    if fallback is None:
        raise ValueError(f"no row of at most {max_tokens} source tokens holds a lexicon pair; pass --index")
    return fallback


class _InputError(ValueError):
    """A bad argument or data file: one line on stderr, exit 2."""


def _load_rows(args, summary: dict):
    """The split's rows and its source/target columns, when the pair, the alignment or BLEU needs them."""
    if args.source is not None and not args.align_examples and args.bleu_examples == "0":
        return None, None, None
    from datasets import load_from_disk

    dataset, src_col, tgt_col = _dataset_of(args.model, args.dataset)
    try:
        rows = load_from_disk(dataset)[args.split]
    except (FileNotFoundError, KeyError) as error:
        raise _InputError(f"split {args.split!r} of {dataset}: {error}") from None
    summary.update(dataset=dataset, split=args.split)
    return rows, src_col, tgt_col


def _pick_pair(args, tokenizer, rows, src_col, tgt_col, summary: dict) -> tuple[str, str | None]:
    """The pair to plot: given on the command line, or a row of the split (by --index or the first fitting one)."""
    if args.source is not None:
        summary["pair"] = {"source": args.source, "target": args.target}
        return args.source, args.target
    index = args.index
    if index is None:
        index = _default_row(tokenizer, rows, src_col, tgt_col, args.max_source_tokens)
    if not 0 <= index < len(rows):
        raise _InputError(f"--index {index} is outside the {len(rows)} rows of {args.split}")
    row = rows[index]
    summary["pair"] = {"index": index, "source": row[src_col], "target": row[tgt_col]}
    summary["pair"].update({k: row[k] for k in ("book", "chapter", "verse") if k in row})
    return row[src_col], row[tgt_col]


def _choose_head(args, model, tokenizer, rows, src_col, tgt_col, records, summary: dict):
    """The head to plot: the best aligned over held-out verses (teacher-forced on their references) when asked,
    else the sharpest head of the plotted pair. Returns ((layer, head), caption, alignment scores)."""
    scores = {"pairs": 0}
    if rows is not None and args.align_examples:
        n = min(args.align_examples, len(rows))
        sample = [cross_attention(model, tokenizer, rows[i][src_col], rows[i][tgt_col]) for i in range(n)]
        scores = alignment_scores(sample)
        summary["alignment"] = scores
    if scores["pairs"]:
        best = (scores["best_head"]["layer"] - 1, scores["best_head"]["head"] - 1)
        caption = f"best aligned ({scores['best_head']['hit_rate']:.0%} of {scores['pairs']} lexicon pairs)"
    else:
        best, caption = sharpest_head(records[0]), "sharpest (lowest entropy)"
    summary["plotted_head"] = {"layer": best[0] + 1, "head": best[1] + 1, "why": caption}
    return best, caption, scores


def _print_pair(args, source: str, target: str | None, summary: dict, scores: dict, best) -> None:
    print(f"source:    {source}")
    if target is not None:
        print(f"reference: {target}")
    if summary["greedy_translation"] is not None:
        print(f"greedy:    {summary['greedy_translation']}")
    if scores["pairs"]:
        print(
            f"alignment on {scores['pairs']} lexicon pairs in {scores['verses']} {args.split} verses "
            f"(argmax on the English word): layer means {scores['layer_mean_hit_rate']}, best head layer "
            f"{best[0] + 1} head {best[1] + 1} {scores['best_head']['hit_rate']:.3f}; chance {scores['chance']:.3f}, "
            f"diagonal {scores['diagonal']:.3f}"
        )


def _bleu(args, model, tokenizer, rows, src_col, tgt_col, out_dir: Path, summary: dict) -> None:
    """Corpus BLEU of greedy translations of the first N rows (or all), with the translations beside it."""
    import sacrebleu

    n = len(rows) if args.bleu_examples == "all" else min(int(args.bleu_examples), len(rows))
    sources, references = list(rows[src_col][:n]), list(rows[tgt_col][:n])
    hypotheses = translate(model, tokenizer, sources, args.batch_size, args.max_new_tokens)
    bleu = sacrebleu.BLEU()
    score = bleu.corpus_score(hypotheses, [references])
    summary["bleu"] = {"score": round(score.score, 2), "verses": n, "signature": str(bleu.get_signature())}
    atomic_write_text(out_dir / f"{args.split}_bleu.json", json.dumps(summary["bleu"], indent=2) + "\n")
    lines = [
        json.dumps({"source": s, "reference": r, "hypothesis": h}, ensure_ascii=False) + "\n"
        for s, r, h in zip(sources, references, hypotheses)
    ]
    atomic_write_text(out_dir / f"{args.split}_translations.jsonl", "".join(lines))
    print(f"BLEU {score.score:.2f} on {n} {args.split} verses ({score}); {bleu.get_signature()}")


def run(args) -> int:
    model, tokenizer = load_translation_model(args.model)
    out_dir = args.output_dir or args.model.resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"model": str(args.model)}
    rows, src_col, tgt_col = _load_rows(args, summary)
    source, target = _pick_pair(args, tokenizer, rows, src_col, tgt_col, summary)
    modes = ("greedy",) if target is None else (MODES if args.mode == "both" else (args.mode,))
    records = [
        cross_attention(model, tokenizer, source, target if mode == "reference" else None, args.max_new_tokens)
        for mode in modes
    ]
    best, caption, scores = _choose_head(args, model, tokenizer, rows, src_col, tgt_col, records, summary)
    summary["greedy_translation"] = next((r.target for r in records if r.mode == "greedy"), None)
    summary["plotted"] = [
        {"mode": r.mode, "source_tokens": r.source_tokens, "target_tokens": r.target_tokens} for r in records
    ]
    png = args.output or out_dir / "cross_attention.png"
    title = f"{args.model}: cross-attention\nEN: {source}\nFR: {target or records[-1].target}"
    panels = render(records, best, caption, png, title)
    summary["figure"] = {"path": str(png), "panels": panels}
    _print_pair(args, source, target, summary, scores, best)
    if args.bleu_examples != "0":
        _bleu(args, model, tokenizer, rows, src_col, tgt_col, out_dir, summary)
    atomic_write_text(out_dir / "cross_attention.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {png} ({panels} panels) and {out_dir / 'cross_attention.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.target and not args.source:
        print("error: --target needs --source", file=sys.stderr)
        return 2
    try:
        return run(args)
    except (_InputError, FileNotFoundError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
