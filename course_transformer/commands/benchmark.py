"""Benchmark the course Transformer against the Hugging Face reference models (GPT-2, BERT, BART).

    course-transformer benchmark --mode quick --output outputs/bench
    course-transformer benchmark --mode full --output outputs/bench-full   # bigger machines / GPU
    course-transformer benchmark --mode decode --output outputs/bench-decode   # greedy decoding vs HF, ~10 min
    course-transformer benchmark --mode lens   # the attention lens on SmolLM2-135M, into outputs/lens-bench

Writes bench.json, bench.md and PNG plots into --output. See evaluation/benchmark.py for the method (decode:
evaluation/decode_bench.py; lens: evaluation/lens_bench.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from course_transformer.core.io import atomic_write_bytes
from evaluation.benchmark import BenchSettings, profile_forward, run_benchmark
from evaluation.decode_bench import DecodeSettings, run_decode_benchmark
from evaluation.lens_bench import LensSettings, run_lens_benchmark


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="course-transformer benchmark", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mode",
        choices=("quick", "full", "tiny", "decode", "decode-tiny", "lens", "lens-tiny"),
        default="quick",
        help="quick: reduced shapes, ~3 min on 2 CPU cores; full: GPT-2/BERT/BART-base depth; "
        "tiny: seconds, for smoke tests; decode: greedy decoding of the GPT-2-124M and BART-base shapes against "
        "HF default and HF static cache + compile, with the memory-bandwidth limit (~10 min on 2 cores); "
        "decode-tiny: the same on tiny shapes without compile, for smoke tests; lens: the attention lens's time "
        "and memory on SmolLM2-135M against sdpa and eager (~20-30 min on 2 cores); lens-tiny: the same in seconds",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="folder for bench.json, bench.md and the plots (lens: default outputs/lens-bench)",
    )
    parser.add_argument("--long", action="store_true", help="lens: also the statistics at T=16,384 (~20-30 min more)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all CPUs)")
    parser.add_argument("--repeats", type=int, default=None, help="override the forward repetitions")
    parser.add_argument("--families", nargs="+", choices=("decoder", "encoder", "encoder-decoder"), default=None)
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--profile",
        choices=("decoder", "encoder", "encoder-decoder"),
        default=None,
        help="instead of the benchmark, write torch.profiler tables of ours vs HF for this family "
        "(forward and training step) into OUTPUT/profile_<family>.txt",
    )
    return parser


def write_profile(settings: BenchSettings, family: str, output: str) -> Path:
    """torch.profiler tables of ours vs HF (forward and training step, sdpa and eager), written atomically."""
    torch.set_num_threads(settings.threads or os.cpu_count() or 1)
    text = "\n\n".join(
        profile_forward(settings, family, backend, task)
        for task in ("forward", "train")
        for backend in ("sdpa", "eager")
    )
    return atomic_write_bytes(Path(output) / f"profile_{family.replace('-', '_')}.txt", text.encode())


def run_decode(args: argparse.Namespace) -> int:
    if args.families and "encoder" in args.families:
        message = "--families for --mode decode: 'encoder' does not decode; allowed: decoder, encoder-decoder"
        print(f"error: {message}", file=sys.stderr)
        return 2
    overrides = {"threads": args.threads, "plots": not args.no_plots}
    if args.repeats is not None:
        overrides["repeats"] = args.repeats
    if args.families:
        overrides["families"] = tuple(args.families)
    settings = DecodeSettings.smoke(**overrides) if args.mode == "decode-tiny" else DecodeSettings(**overrides)
    report = run_decode_benchmark(settings, args.output)
    print(f"{report['wall_seconds']:.1f} s; report: {os.path.join(args.output, 'bench.md')}")
    return 0


def run_lens(args: argparse.Namespace) -> int:
    overrides = {"threads": args.threads, "plots": not args.no_plots, "long_length": 16384 if args.long else None}
    if args.repeats is not None:
        overrides["repeats"] = args.repeats
    settings = LensSettings.tiny(**overrides) if args.mode == "lens-tiny" else LensSettings(**overrides)
    report = run_lens_benchmark(settings, args.output or "outputs/lens-bench")
    print(f"{report['wall_seconds']:.1f} s; report: {os.path.join(args.output or 'outputs/lens-bench', 'bench.md')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.mode.startswith("lens"):
        return run_lens(args)
    if args.output is None:
        parser.error("the following arguments are required: --output")
    if args.mode.startswith("decode"):
        return run_decode(args)
    overrides = {"threads": args.threads, "plots": not args.no_plots}
    if args.repeats is not None:
        overrides["repeats"] = args.repeats
    if args.families:
        overrides["families"] = tuple(args.families)
    settings = BenchSettings.preset(args.mode, **overrides)
    if args.profile:
        print(f"profile: {write_profile(settings, args.profile, args.output)}")
        return 0
    report = run_benchmark(settings, args.output)
    summary = report["summary"]
    print(
        f"{report['wall_seconds']:.1f} s; targets met {summary['met']}/{summary['with_target']}; "
        f"report: {os.path.join(args.output, 'bench.md')}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
