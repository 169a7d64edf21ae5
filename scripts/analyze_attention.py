"""What the attention heads of a model look at: per-head measures, Clark et al. (2019) table, induction heads.

python scripts/analyze_attention.py --model bert-minilm --output outputs/attention/bert-minilm
python scripts/analyze_attention.py --model smollm2 --output outputs/attention/smollm2
python scripts/analyze_attention.py --model ours-tiny --output outputs/attention/ours-tiny
python scripts/analyze_attention.py --model bert-minilm --compare ours-minilm --output outputs/attention/minilm-vs-ours
python scripts/analyze_attention.py --model path/to/saved/folder --output outputs/attention/mine

Writes report.json, report.md, PNG figures (and head_view.html when bertviz is installed) into --output, atomically.
See docs/attention_analysis.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Runnable from a checkout whose editable install predates the `evaluation` package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluation import analysis  # noqa: E402

logger = logging.getLogger("analyze_attention")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = ", ".join(analysis.MODEL_NAMES)
    parser.add_argument("--model", required=True, help=f"one of {names}, or a saved model folder")
    parser.add_argument("--output", required=True, type=Path, help="folder to write (atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--compare", metavar="MODEL", help="second model: head agreement (JS divergence, matching)")
    parser.add_argument("--texts", type=Path, help="text file, one text per line (default: the built-in sentences)")
    parser.add_argument("--max-texts", type=int, default=None, help="use at most this many texts")
    parser.add_argument("--single", action="store_true", help="single texts, not [CLS] A [SEP] B [SEP] pairs")
    parser.add_argument("--induction-period", type=int, default=40, help="length n of the repeated random block")
    parser.add_argument("--induction-sequences", type=int, default=8, help="number of repeated random sequences")
    parser.add_argument("--no-induction", action="store_true", help="skip the induction score")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser


def read_texts(path: Path | None, limit: int | None) -> list[str]:
    texts = analysis.SENTENCES if path is None else [t.strip() for t in path.read_text().splitlines() if t.strip()]
    return list(texts[:limit] if limit else texts)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    torch.set_num_threads(args.threads)
    if args.output.exists() and not args.overwrite:
        print(f"error: {args.output} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    try:
        texts = read_texts(args.texts, args.max_texts)
        model, tokenizer, label = analysis.load_named_model(args.model)
        other = analysis.load_named_model(args.compare) if args.compare else None
    except (FileNotFoundError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not texts:
        print("error: no texts", file=sys.stderr)
        return 2

    logger.info("analysing %s over %d texts", label, len(texts))
    report = analysis.analyze_model(
        model,
        tokenizer,
        label=label,
        texts=texts,
        pairs=False if args.single else None,
        induction=False if args.no_induction else None,
        induction_period=args.induction_period,
        induction_sequences=args.induction_sequences,
    )
    if other is not None:
        other_model, other_tokenizer, other_label = other
        logger.info("head agreement with %s", other_label)
        records_a = analysis.collect_attentions(model, tokenizer, texts)
        records_b = analysis.collect_attentions(other_model, other_tokenizer, texts)
        report["agreement"] = {"other": other_label, **analysis.head_agreement(records_a, records_b)}

    extra = {}
    example = report["example"]
    html = analysis.bertviz_html(analysis.as_output_attentions(example["attention"]), example["tokens"])
    if html is not None:
        extra["head_view.html"] = html
    analysis.write_report(report, args.output, overwrite=args.overwrite, extra_files=extra)
    print((args.output / "report.md").read_text())
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
