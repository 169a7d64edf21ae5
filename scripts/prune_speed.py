"""Forward time of a model before and after `prune_heads` on one benchmark shape (CPU, fp32, eval, no grad).

    python -m scripts.prune_speed --preset vaswani-base --share 0.5 --batch 8 --length 128

Prunes the same share of heads in every attention module (the lowest indices: speed does not depend on which),
checks the pruned output against head-mask ablation, and prints parameters, max difference and median times.
"""

from __future__ import annotations

import argparse
import time

import torch

import modeling
from modeling.modeling_course_transformer import CourseTransformerAttention


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vaswani-base")
    parser.add_argument("--share", type=float, default=0.5, help="share of heads removed in every module")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if not 0.0 <= args.share <= 1.0:
        parser.error(f"--share {args.share} must lie in [0, 1]")
    config = modeling.load_preset(args.preset, hidden_dropout_prob=0.0, attention_dropout_prob=0.0)
    torch.manual_seed(0)
    model = modeling.CourseTransformerModel(config).eval()
    heads = config.num_attention_heads
    removed = list(range(round(args.share * heads)))
    ids = torch.randint(3, config.vocab_size, (args.batch, args.length))
    inputs = {"input_ids": ids}
    if config.is_encoder_decoder:
        inputs["decoder_input_ids"] = ids
    masks = {}
    mask = torch.ones(config.num_hidden_layers, heads)
    mask[:, removed] = 0.0
    for name, present in (("head_mask", config.has_encoder or not config.is_encoder_decoder),):
        if present:
            masks[name] = mask[: config.num_encoder_layers] if config.has_encoder else mask
    if config.is_encoder_decoder:
        masks.update(decoder_head_mask=mask, cross_attn_head_mask=mask)
    with torch.no_grad():
        before_params = model.num_parameters()
        masked = model(**inputs, **masks).last_hidden_state
        before = median_time(lambda: model(**inputs), args.repeats)
        keys = [m.module_key for m in model.modules() if isinstance(m, CourseTransformerAttention)]
        model.prune_heads({key: removed for key in keys})
        diff = (model(**inputs).last_hidden_state - masked).abs().max().item()
        after = median_time(lambda: model(**inputs), args.repeats)
    print(
        f"{args.preset}: {len(removed)}/{heads} heads removed in each of {len(keys)} attention modules; "
        f"parameters {before_params:,} -> {model.num_parameters():,}; pruned vs masked max |diff| {diff:.2e}; "
        f"forward (B={args.batch}, T={args.length}, {torch.get_num_threads()} threads) median of {args.repeats}: "
        f"{before * 1e3:.1f} ms -> {after * 1e3:.1f} ms ({before / after:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
