"""Forward time of a model before and after `prune_heads` on one benchmark shape (CPU, fp32, eval, no grad).

    python -m scripts.prune_speed --preset vaswani-base --share 0.5 --batch 8 --length 128 --threads 1 --repeats 15

Prunes the same share of heads in every attention module (the lowest indices: speed does not depend on which),
checks the pruned output against head-mask ablation, and times both models. Timing on a shared machine is noisy, so:
torch's and OpenMP's thread counts are fixed (`--threads`), the two models are timed alternately (a burst of load
hits both, not one), and the report gives the best of N (the least disturbed run, the usual benchmark figure) with
the median and the spread beside it. `--json` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import modeling
from course_transformer.core.io import atomic_write_text
from modeling.modeling_course_transformer import CourseTransformerAttention


def interleaved_times(fns: list, repeats: int) -> list[list[float]]:
    """Seconds per call of each fn, `repeats` rounds of one call each in turn, after one warm-up call each."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return times


def summary(times: list[float]) -> dict[str, float]:
    """Best, median and worst time in ms."""
    return {
        "best_ms": 1e3 * min(times),
        "median_ms": 1e3 * statistics.median(times),
        "worst_ms": 1e3 * max(times),
    }


def ablation_masks(config, removed: list[int]) -> dict[str, torch.Tensor]:
    """Head masks (L, H) that zero `removed` in every attention module, under the forward's argument names."""
    heads = config.num_attention_heads

    def mask(layers: int) -> torch.Tensor:
        out = torch.ones(layers, heads)
        out[:, removed] = 0.0
        return out

    if not config.is_encoder_decoder:
        return {"head_mask": mask(config.num_hidden_layers)}
    layers = config.num_decoder_layers
    return {
        "head_mask": mask(config.num_encoder_layers),
        "decoder_head_mask": mask(layers),
        "cross_attn_head_mask": mask(layers),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vaswani-base")
    parser.add_argument("--share", type=float, default=0.5, help="share of heads removed in every module")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per model (alternating)")
    parser.add_argument("--threads", type=int, default=1, help="torch and OpenMP threads")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    if not 0.0 <= args.share <= 1.0:
        parser.error(f"--share {args.share} must lie in [0, 1]")
    if args.repeats < 1 or args.threads < 1:
        parser.error(f"--repeats {args.repeats} and --threads {args.threads} must be positive")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for any pool started after this point
    torch.set_num_threads(args.threads)

    config = modeling.load_preset(args.preset, hidden_dropout_prob=0.0, attention_dropout_prob=0.0)
    torch.manual_seed(0)
    model = modeling.CourseTransformerModel(config).eval()
    heads = config.num_attention_heads
    removed = list(range(round(args.share * heads)))
    ids = torch.randint(3, config.vocab_size, (args.batch, args.length))
    inputs = {"input_ids": ids}
    if config.is_encoder_decoder:
        inputs["decoder_input_ids"] = ids
    with torch.no_grad():
        masked = model(**inputs, **ablation_masks(config, removed)).last_hidden_state
        pruned = modeling.CourseTransformerModel(config).eval()
        pruned.load_state_dict(model.state_dict())
        keys = [m.module_key for m in pruned.modules() if isinstance(m, CourseTransformerAttention)]
        pruned.prune_heads({key: removed for key in keys})
        diff = (pruned(**inputs).last_hidden_state - masked).abs().max().item()
        before, after = interleaved_times([lambda: model(**inputs), lambda: pruned(**inputs)], args.repeats)
    result = {
        "preset": args.preset,
        "heads_removed_per_module": len(removed),
        "heads_per_module": heads,
        "attention_modules": len(keys),
        "parameters_before": model.num_parameters(),
        "parameters_after": pruned.num_parameters(),
        "max_abs_diff_pruned_vs_masked": diff,
        "batch": args.batch,
        "length": args.length,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "load_average_1min": os.getloadavg()[0],
        "before": summary(before),
        "after": summary(after),
    }
    result["speedup_best"] = min(before) / min(after)
    result["speedup_median"] = statistics.median(before) / statistics.median(after)
    b, a = result["before"], result["after"]
    print(
        f"{args.preset}: {len(removed)}/{heads} heads removed in each of {len(keys)} attention modules; parameters "
        f"{result['parameters_before']:,} -> {result['parameters_after']:,}; pruned vs masked max |diff| {diff:.2e}\n"
        f"forward B={args.batch} T={args.length}, {result['threads']} thread(s), {args.repeats} alternating runs, "
        f"load average {result['load_average_1min']:.2f}:\n"
        f"  before: best {b['best_ms']:.1f} ms, median {b['median_ms']:.1f}, worst {b['worst_ms']:.1f}\n"
        f"  after:  best {a['best_ms']:.1f} ms, median {a['median_ms']:.1f}, worst {a['worst_ms']:.1f}\n"
        f"  speed-up: {result['speedup_best']:.2f}x (best), {result['speedup_median']:.2f}x (median)"
    )
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
