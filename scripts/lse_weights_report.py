"""What exact weights from the fused kernel's log-sum-exp cost and how exact they are; prints Markdown.

    python -m scripts.lse_weights_report            # exactness cases + T=1024 cost (quick benchmark's decoder)
    python -m scripts.lse_weights_report --repeats 5 --json out.json

Part 1, exactness: the same seeded tiny models as tests/test_lse_weights.py, eager vs sdpa (lse path), max |Δ| over
every recorded weight. Part 2, cost: the quick benchmark's `attention_output_cost` decoder (GPT-2 width, 4 layers,
T=1024, batch 1, sdpa) timed interleaved: the fast forward, `output_attentions=True` on all layers through the lse
path ("after") and through eager math ("before", the previous behaviour, by routing the recorded layers to
`eager_attention_forward`), with the benchmark's peak-memory measure (tensor bytes above what existed before).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from contextlib import contextmanager

import torch

from evaluation.benchmark import (
    BenchSettings,
    _inputs,
    _ours_config,
    collect_environment,
    interleaved,
    peak_memory_bytes,
)
from modeling import modeling_course_transformer as mct

EXACTNESS_CASES = {
    "causal": dict(architecture="decoder", lengths=[7, 7]),
    "padded": dict(architecture="decoder", lengths=[7, 4]),
    "alibi": dict(architecture="decoder", lengths=[7, 5], position_encoding="alibi"),
    "rope": dict(architecture="decoder", lengths=[7, 5], position_encoding="rope"),
    "encoder": dict(architecture="encoder", lengths=[7, 3]),
    "cross-attention": dict(architecture="encoder-decoder", lengths=[7, 5]),
}


@contextmanager
def eager_recorded_layers():
    """Recorded layers run the eager math, as before the lse path existed."""
    saved = mct.lse_attention_forward
    mct.lse_attention_forward = mct.eager_attention_forward
    try:
        yield
    finally:
        mct.lse_attention_forward = saved


@torch.no_grad()
def exactness() -> dict[str, float]:
    """Max |lse − eager| over every recorded weight tensor, per case."""
    from tests.conftest import model_inputs, padded, tiny_model

    result = {}
    for name, case in EXACTNESS_CASES.items():
        fields = {k: v for k, v in case.items() if k != "lengths"}
        eager, fast = tiny_model(**fields), tiny_model(attn_implementation="sdpa", **fields)
        ids, mask = padded(case["lengths"], side="left")
        inputs = model_inputs(eager, ids, mask, output_attentions=True)
        a, b = eager(**inputs), fast(**inputs)
        names = ("attentions", "encoder_attentions", "decoder_attentions", "cross_attentions")
        pairs = [(x, y) for n in names for x, y in zip(getattr(a, n, None) or (), getattr(b, n, None) or ())]
        result[name] = max((x - y).abs().max().item() for x, y in pairs)
    return result


def cost(repeats: int) -> dict:
    """Seconds and peak bytes of the fast forward and of output_attentions on all layers, lse and eager."""
    import modeling

    s = BenchSettings.preset("quick")
    device = torch.device("cpu")
    torch.set_num_threads(s.threads or torch.get_num_threads())
    config = _ours_config(s, "decoder", "sdpa", num_decoder_layers=s.attn_cost_layers, max_position_embeddings=1024)
    torch.manual_seed(s.seed)
    model = modeling.CourseTransformerModel(config).eval()
    ids = _inputs(s, 1, s.attn_cost_seq_len, device)

    def run(**kwargs):
        def call():
            with torch.inference_mode():
                return model(input_ids=ids, use_cache=False, **kwargs)

        return call

    fast, lse = run(), run(output_attentions=True)

    def eager():
        with eager_recorded_layers():
            return lse()

    samples = interleaved([fast, lse, eager], 1, repeats, device)
    times = dict(zip(("fast", "lse", "eager"), samples, strict=True))
    row = {"seq_len": s.attn_cost_seq_len, "layers": s.attn_cost_layers, "width": s.hidden_size, "repeats": repeats}
    for name in ("fast", "lse", "eager"):
        row[f"{name}_s"] = statistics.median(times[name])
        row[f"{name}_peak_bytes"] = peak_memory_bytes({"fast": fast, "lse": lse, "eager": eager}[name], device)
    for name in ("lse", "eager"):
        row[f"{name}_ratio"] = statistics.median(a / b for a, b in zip(times[name], times["fast"], strict=True))
    return row


def markdown(env: dict, exact: dict[str, float], row: dict) -> str:
    mib = 2**20
    lines = [
        f"{env['date_utc']}, commit {env['commit'][:10]}{' (dirty)' if env['dirty'] else ''}, {env['cpu_model']}, "
        f"{env['torch_num_threads']} threads, torch {env['torch']}, load average at start {env['load_average_start']}",
        "",
        "| case | max abs diff, lse vs eager (fp32) |",
        "|---|---|",
        *(f"| {k} | {v:.1e} |" for k, v in exact.items()),
        "",
        f"T={row['seq_len']}, {row['layers']} layers, width {row['width']}, batch 1, median of {row['repeats']}:",
        "",
        "| forward | seconds | × fast forward | peak tensor memory |",
        "|---|---|---|---|",
        f"| fast (sdpa, no weights) | {row['fast_s']:.3f} | 1.00 | {row['fast_peak_bytes'] / mib:.0f} MiB |",
        f"| output_attentions, all layers, eager math (before) | {row['eager_s']:.3f} | {row['eager_ratio']:.2f} "
        f"| {row['eager_peak_bytes'] / mib:.0f} MiB |",
        f"| output_attentions, all layers, lse path (after) | {row['lse_s']:.3f} | {row['lse_ratio']:.2f} "
        f"| {row['lse_peak_bytes'] / mib:.0f} MiB |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (default 5)")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    env = collect_environment(torch.device("cpu"))
    exact, row = exactness(), cost(args.repeats)
    print(markdown(env, exact, row))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"environment": env, "exactness": exact, "cost": row}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
