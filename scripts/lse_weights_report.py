"""What exact weights from the fused kernel's log-sum-exp cost and how exact they are; prints Markdown.

    python -m scripts.lse_weights_report            # exactness cases + T=1024 cost (quick benchmark's decoder)
    python -m scripts.lse_weights_report --repeats 5 --json out.json

Part 1, exactness: seeded tiny models like those of tests/test_lse_weights.py, eager vs sdpa (lse path), max |Δ| over
every recorded weight. Part 2, cost: the quick benchmark's `attention_output_cost` decoder (GPT-2 width, 4 layers,
T=1024, batch 1, sdpa) timed interleaved: the fast forward, `output_attentions=True` on all layers through the lse
path ("after") and through eager math ("before", the previous behaviour, by routing the recorded layers to
`eager_attention_forward`), with the benchmark's peak-memory measure (tensor bytes above what existed before, from
torch.profiler) and, unless --no-rss, the peak resident set each variant's forward adds in a fresh process.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
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

EXACTNESS_CASES = {
    "causal": dict(architecture="decoder", lengths=[7, 7]),
    "padded": dict(architecture="decoder", lengths=[7, 4]),
    "alibi": dict(architecture="decoder", lengths=[7, 5], position_encoding="alibi"),
    "rope": dict(architecture="decoder", lengths=[7, 5], position_encoding="rope"),
    "sinusoidal": dict(architecture="decoder", lengths=[7, 6], position_encoding="sinusoidal"),
    "encoder": dict(architecture="encoder", lengths=[7, 3]),
    "encoder-alibi": dict(architecture="encoder", lengths=[7, 3], position_encoding="alibi"),
    "cross-attention": dict(architecture="encoder-decoder", lengths=[7, 5]),
}


@contextmanager
def eager_recorded_layers():
    """Recorded layers run the eager math, as before the lse path existed: the lens is told no kernel applies."""
    from modeling import attention_lens

    saved = attention_lens.lse_unavailable
    attention_lens.lse_unavailable = lambda query, dropout: "the report's eager baseline"
    try:
        yield
    finally:
        attention_lens.lse_unavailable = saved


def _tiny_model(architecture: str, backend: str, **fields):
    """The tests' seeded tiny model (evaluation.tiny's config, seed 0) with its architecture's LM head."""
    import modeling
    from evaluation.tiny import tiny_config

    heads = {
        "decoder": modeling.CourseTransformerForCausalLM,
        "encoder": modeling.CourseTransformerForMaskedLM,
        "encoder-decoder": modeling.CourseTransformerForSeq2SeqLM,
    }
    config = tiny_config(architecture, **fields)
    config._attn_implementation = backend
    torch.manual_seed(0)
    return heads[architecture](config).eval()


def _left_padded(lengths: list[int], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded token ids (B, T) left-padded with 0, and their 0/1 mask."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, ids.shape[1] - n :] = torch.randint(3, vocab, (n,), generator=generator)
        mask[row, ids.shape[1] - n :] = 1
    return ids, mask


@torch.no_grad()
def exactness() -> dict[str, float]:
    """Max |lse − eager| over every recorded weight tensor, per case."""
    result = {}
    for name, case in EXACTNESS_CASES.items():
        fields = {k: v for k, v in case.items() if k not in ("lengths", "architecture")}
        eager = _tiny_model(case["architecture"], "eager", **fields)
        fast = _tiny_model(case["architecture"], "sdpa", **fields)
        ids, mask = _left_padded(case["lengths"], eager.config.vocab_size)
        inputs = {"input_ids": ids, "attention_mask": mask, "output_attentions": True}
        if eager.config.is_encoder_decoder:
            inputs["decoder_input_ids"] = torch.tensor([[1, 5, 9, 13]]).expand(ids.shape[0], -1)
        a, b = eager(**inputs), fast(**inputs)
        names = ("attentions", "encoder_attentions", "decoder_attentions", "cross_attentions")
        pairs = [(x, y) for n in names for x, y in zip(getattr(a, n, None) or (), getattr(b, n, None) or ())]
        result[name] = max((x - y).abs().max().item() for x, y in pairs)
    return result


VARIANTS = ("fast", "lse", "eager")


def _variants() -> tuple[BenchSettings, dict[str, Callable[[], object]]]:
    """The quick benchmark's `attention_output_cost` decoder and one zero-argument forward per variant."""
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

    return s, {"fast": fast, "lse": lse, "eager": eager}


def _status_bytes(field: str) -> int:
    """A `/proc/self/status` size field (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_of_variant(name: str) -> dict[str, int]:
    """In this (fresh) process: the peak resident set one forward of `name` adds above the resident set before it,
    every allocator included (torch's tensors, the kernels' scratch, the returned weights held until it returns).
    Building the model peaks higher than its resting size, so the peak is reset first (Linux: `5` into
    /proc/self/clear_refs resets VmHWM); where that is refused, ru_maxrss, which may hide the forward."""
    _, variants = _variants()
    variants["fast"]()  # one warm call: lazily created kernels and thread pools are not the variant's cost
    gc.collect()
    before = _status_bytes("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        source = "VmHWM after reset"
    except OSError:
        source = "ru_maxrss (peak not reset)"
    out = variants[name]()
    if source.startswith("VmHWM"):
        peak = _status_bytes("VmHWM")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    del out
    return {"rss_before_bytes": before, "peak_rss_bytes": peak, "forward_rss_bytes": peak - before, "source": source}


def rss_in_fresh_processes() -> dict[str, dict]:
    """`rss_of_variant` of each variant, each in its own interpreter (the peak RSS of a process never goes down)."""
    result = {}
    for name in VARIANTS:
        command = [sys.executable, "-m", "scripts.lse_weights_report", "--rss-variant", name]
        proc = subprocess.run(command, capture_output=True, text=True, check=True, timeout=600)
        result[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def cost(repeats: int) -> dict:
    """Seconds and peak bytes of the fast forward and of output_attentions on all layers, lse and eager."""
    s, variants = _variants()
    device = torch.device("cpu")
    samples = interleaved([variants[n] for n in VARIANTS], 1, repeats, device)
    times = dict(zip(VARIANTS, samples, strict=True))
    row = {
        "seq_len": s.attn_cost_seq_len,
        "layers": s.attn_cost_layers,
        "width": s.hidden_size,
        "heads": s.num_heads,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }
    for name in VARIANTS:
        row[f"{name}_s"] = statistics.median(times[name])
        row[f"{name}_samples_s"] = times[name]
        row[f"{name}_peak_bytes"] = peak_memory_bytes(variants[name], device)
    for name in ("lse", "eager"):
        row[f"{name}_ratio"] = statistics.median(a / b for a, b in zip(times[name], times["fast"], strict=True))
    row["lse_vs_eager"] = statistics.median(a / b for a, b in zip(times["lse"], times["eager"], strict=True))
    return row


def markdown(env: dict, exact: dict[str, float], row: dict, rss: dict[str, dict]) -> str:
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
        "| forward | seconds | × fast forward | peak tensor memory (profiler) | peak RSS added (fresh process) |",
        "|---|---|---|---|---|",
    ]
    labels = {
        "fast": "fast (sdpa, no weights)",
        "eager": "output_attentions, all layers, eager math (before)",
        "lse": "output_attentions, all layers, lse path (after)",
    }
    for name in ("fast", "eager", "lse"):
        ratio = 1.0 if name == "fast" else row[f"{name}_ratio"]
        added = rss.get(name, {}).get("forward_rss_bytes")
        lines.append(
            f"| {labels[name]} | {row[f'{name}_s']:.3f} | {ratio:.2f} | {row[f'{name}_peak_bytes'] / mib:.0f} MiB "
            f"| {'n/a' if added is None else f'{added / mib:.0f} MiB'} |"
        )
    lines += ["", f"lse path / eager path, median of paired rounds: {row['lse_vs_eager']:.2f}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (default 5)")
    parser.add_argument("--json", help="also write the numbers to this JSON file (atomically)")
    parser.add_argument("--no-rss", action="store_true", help="skip the three fresh processes measuring peak RSS")
    parser.add_argument("--rss-variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child of --rss
    args = parser.parse_args(argv)
    if args.rss_variant:
        print(json.dumps(rss_of_variant(args.rss_variant)))
        return 0
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    env = collect_environment(torch.device("cpu"))
    exact, row = exactness(), cost(args.repeats)
    rss = {} if args.no_rss else rss_in_fresh_processes()
    print(markdown(env, exact, row, rss))
    if args.json:
        _write_json(args.json, {"environment": env, "exactness": exact, "cost": row, "rss": rss})
    return 0


def _write_json(path: str, data: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as fh:
        json.dump(data, fh, indent=2)
    os.chmod(fh.name, 0o644)  # NamedTemporaryFile creates 0600; the report is meant to be read by others
    os.replace(fh.name, path)


if __name__ == "__main__":
    sys.exit(main())
