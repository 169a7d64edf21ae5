"""Evaluate a saved model: language-model quality (bits per byte) beside reference models, the attention report,
and parity after export to GPT-2 / BERT; writes report.json (for `publish --results`) and report.md.

    course-transformer evaluate runs/demo/final --split test --max-texts 200 --reference smollm2 --output outputs/eval
    course-transformer evaluate runs/demo/final --texts my_texts.txt --no-parity --output outputs/eval-mine
    course-transformer evaluate runs/demo/final --reference path/to/gpt2-folder --context-length 128 --stride 128

The texts are the test split of the prepared corpus (`course-transformer prepare-data` writes data/bible/english),
or one text per line of --texts FILE. Exit status: 0 when everything ran, 1 when a section failed (recorded in the
report) or parity failed, 2 for a bad input (nothing written). See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import codecs
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_parser() -> argparse.ArgumentParser:
    from evaluation.harness import DEFAULT_DATASET
    from evaluation.lm_quality import MLM_METHODS, REFERENCE_NAMES

    parser = argparse.ArgumentParser(
        prog="course-transformer evaluate",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=lambda prog: argparse.ArgumentDefaultsHelpFormatter(prog, width=119),
    )
    parser.add_argument("model", help="saved model folder (config.json, weights and tokenizer), e.g. runs/demo/final")
    parser.add_argument("--output", default="outputs/eval", help="report folder, written atomically")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    data = parser.add_argument_group("texts")
    data.add_argument(
        "--dataset",
        default=DEFAULT_DATASET,
        help="DatasetDict folder written by course_transformer.commands.prepare_data",
    )
    data.add_argument("--split", default="test", help="split of --dataset")
    data.add_argument("--text-column", default="text", help="column of --dataset holding the texts")
    data.add_argument("--texts", default=None, metavar="FILE", help="one text per line instead of --dataset")
    data.add_argument("--max-texts", type=int, default=None, help="evaluate the first N texts (default: all)")
    quality = parser.add_argument_group("language-model quality")
    quality.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="NAME|PATH",
        help=f"reference model measured on the same texts ({', '.join(REFERENCE_NAMES)}, or a saved causal / "
        "masked LM folder); repeat for several",
    )
    quality.add_argument(
        "--context-length",
        type=int,
        default=None,
        help="tokens of context per window (default: the model's maximum positions, at most 1024; the references "
        "get the same, capped at theirs)",
    )
    quality.add_argument("--stride", type=int, default=None, help="window step (default: half the context)")
    quality.add_argument(
        "--separator",
        default="auto",
        help="context put before each text, never scored; backslash escapes are decoded ('\\n'); auto: EOS for "
        "models of ours, a newline for others",
    )
    quality.add_argument("--batch-size", type=int, default=8, help="windows (or masked rows) per forward pass")
    quality.add_argument(
        "--mlm-method",
        choices=MLM_METHODS,
        default="masked",
        help="masked LMs: 15%% of tokens masked (seeded) or the pseudo-likelihood (small text sets)",
    )
    quality.add_argument("--seed", type=int, default=0, help="seed of the MLM masks")
    sections = parser.add_argument_group("other sections")
    sections.add_argument("--no-attention", action="store_true", help="skip the attention report")
    sections.add_argument("--no-parity", action="store_true", help="skip the export + parity check")
    run = parser.add_argument_group("run")
    run.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    run.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def decode_escapes(text: str) -> str:
    """'\\n' typed on a command line -> a newline (other characters, non-ASCII included, unchanged)."""
    return codecs.decode(text.encode("latin-1", "backslashreplace"), "unicode_escape")


def summary(report: dict) -> str:
    lines = []
    for q in report["lm_quality"]:
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in q["metrics"].items())
        lines.append(f"{q['model']}: {metrics} ({q['tokens']:,} tokens, {q['bytes']:,} bytes, {q['seconds']:.0f} s)")
    parity = report["parity"]
    if "passed" in parity:
        lines.append(f"parity after export ({parity['family']}): {'PASS' if parity['passed'] else 'FAIL'}")
    lines += [f"error in {e['section']}: {e['error']}" for e in report["errors"]]
    lines.append(f"report: {report['output']}/report.md")
    return "\n".join(lines)


def check_models(args: argparse.Namespace) -> None:
    """The model and the reference folders of ours, every weight checked against the config before anything is
    loaded or written (`CheckpointError` names the file and the keys); the harness checks the rest."""
    from course_transformer.commands.generate import check_if_ours

    for folder in (args.model, *args.reference):
        if os.path.isdir(folder):
            check_if_ours(folder)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from course_transformer.core.checkpoint import CheckpointError
    from evaluation.harness import HarnessInputError, run_harness

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        check_models(args)
        report = run_harness(
            args.model,
            args.output,
            texts_file=args.texts,
            dataset=args.dataset,
            split=args.split,
            text_column=args.text_column,
            max_texts=args.max_texts,
            references=args.reference,
            context_length=args.context_length,
            stride=args.stride,
            separator=decode_escapes(args.separator),
            batch_size=args.batch_size,
            mlm_method=args.mlm_method,
            seed=args.seed,
            attention=not args.no_attention,
            parity=not args.no_parity,
            overwrite=args.overwrite,
            device=args.device,
            progress=not args.no_progress,
        )
    except (HarnessInputError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary(report), flush=True)
    failed = bool(report["errors"]) or report["parity"].get("passed") is False
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
