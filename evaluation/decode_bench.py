"""Greedy decoding against Hugging Face on the CPU, measured against the memory-bandwidth limit of the same run.

    course-transformer benchmark --mode decode --output outputs/bench-decode

Decoding one token reads every weight matrix once, so a step cannot be faster than (bytes of the weights one step
reads) / (read bandwidth). This mode measures that bandwidth first (a sum over a 1 GiB fp32 tensor, best of 5, the
same threads as the decoding), the GEMV kernels' own streaming rate per weight shape (`F.linear` on nn.Linear's
layout vs the oneDNN-packed weight of `enable_fast_decoding`), then, per family (GPT-2-124M and BART-base shapes,
fp32, seeded weights converted to ours so that tokens can be compared) and batch:

- HF default: `generate` with the dynamic cache;
- HF static + compile: `generate(cache_implementation="static", compile_config=...)`, HF's own compiled decoding
  (compile time = first call minus a steady call; batch 1 only by default), and ours fast through the same call;
- ours plain and ours fast (`model.enable_fast_decoding()`), dynamic cache;

timed round-robin (HF, ours, ours fast, ...) after a warm-up, tokens/s = batch x new tokens / wall time (prefill
included). Every variant's tokens must equal HF default's. A torch.profiler table of one generate per variant
says where the time goes. Writes bench.json (every sample), bench.md and decode.png.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from course_transformer.core.conversion import from_bart, from_gpt2
from course_transformer.core.io import atomic_write_bytes
from evaluation.benchmark import collect_environment, interleaved, summarize

SCHEMA_VERSION = 1
FAMILIES = ("decoder", "encoder-decoder")
REFERENCE = {
    "decoder": "GPT2LMHeadModel (GPT-2-124M shape)",
    "encoder-decoder": "BartForConditionalGeneration (BART-base shape)",
}


@dataclass(frozen=True)
class DecodeSettings:
    threads: int = 0  # 0: all CPUs
    families: tuple[str, ...] = FAMILIES
    batches: tuple[int, ...] = (1, 8)
    compile_batches: tuple[int, ...] = (1,)  # HF static cache + torch.compile rows (a compile per shape)
    prompt_len: int = 16
    new_tokens: int = 32
    warmup: int = 1
    repeats: int = 3
    bandwidth_mib: int = 1024
    tiny: bool = False  # seconds-long shapes for the smoke test
    layouts: tuple[str, ...] = ("transposed", "packed")  # extra rows with one layout forced on every weight
    profile: bool = True
    plots: bool = True
    seed: int = 0

    @classmethod
    def smoke(cls, **overrides: Any) -> DecodeSettings:
        fields = dict(tiny=True, batches=(1, 2), compile_batches=(), new_tokens=4, repeats=1, bandwidth_mib=64)
        fields["layouts"] = ("transposed",)
        return cls(**{**fields, **overrides})


# --------------------------------------------------------------------------------------------------------------
# The memory-bandwidth limit
# --------------------------------------------------------------------------------------------------------------


def read_bandwidth(mib: int, repeats: int = 5) -> float:
    """Bytes per second of the fastest of `repeats` sums over an fp32 tensor of `mib` MiB (far beyond the caches)."""
    data = torch.ones(mib * 2**20 // 4)
    data.sum()  # fault the pages in
    best = min(_seconds(data.sum) for _ in range(repeats))
    return data.nbytes / best


def _seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def gemv_rates(shapes: list[tuple[int, int]], budget_mib: int = 256, repeats: int = 3) -> list[dict[str, Any]]:
    """Streaming rate (bytes/s) of one-row products with (out, in) weights, cycled through enough copies to leave
    the caches: `F.linear` on nn.Linear's layout vs the oneDNN-packed weight of `enable_fast_decoding`."""
    from modeling.modeling_course_transformer import _PACK_LINEAR_WEIGHT, _PACKED_LINEAR

    rows = []
    for out_features, in_features in shapes:
        copies = max(2, budget_mib * 2**20 // (out_features * in_features * 4))
        weights = [torch.randn(out_features, in_features) for _ in range(copies)]
        packed = [_PACK_LINEAR_WEIGHT(w, 1) for w in weights]
        transposed = [w.t().contiguous() for w in weights]  # (in, out)
        x = torch.randn(1, 1, in_features)
        kernels = {
            "F.linear": lambda i, x=x, w=weights: F.linear(x, w[i]),
            "x @ Wt": lambda i, x=x, w=transposed: torch.mm(x[0], w[i]),
            "oneDNN packed": lambda i, x=x, p=packed: _PACKED_LINEAR(x, p[i], None, "none", [], ""),
        }
        total = copies * weights[0].nbytes
        row: dict[str, Any] = {"shape": [out_features, in_features], "copies": copies}
        with torch.inference_mode():
            for name, kernel in kernels.items():

                def sweep(kernel=kernel, copies=copies) -> None:
                    for i in range(copies):
                        kernel(i)

                sweep()
                row[name] = total / min(_seconds(sweep) for _ in range(repeats))
        rows.append(row)
    return rows


def bytes_per_step(model: nn.Module) -> int:
    """Weight bytes one decoding step reads: every linear layer of the decoder and the LM head. The encoder runs
    once per generate, and cross-attention keys and values are projected once from its output."""
    total = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or ".encoder." in f".{name}.":
            continue
        if ".cross_attn." in name and name.rsplit(".", 1)[-1] in ("k_proj", "v_proj"):
            continue
        total += sum(p.nbytes for p in module.parameters(recurse=False))
    return total


# --------------------------------------------------------------------------------------------------------------
# Models and runs
# --------------------------------------------------------------------------------------------------------------


# (width, heads, layers per stack, vocabulary): GPT-2-124M, facebook/bart-base, and a tiny shape for smoke tests.
SHAPES = {
    ("decoder", False): (768, 12, 12, 50257),
    ("encoder-decoder", False): (768, 12, 6, 50265),
    ("decoder", True): (64, 4, 2, 512),
    ("encoder-decoder", True): (64, 4, 2, 512),
}


def reference_model(family: str, tiny: bool, seed: int) -> nn.Module:
    """HF's model of `family` at its base shape (or tiny), seeded, fp32, sdpa, eval."""
    from transformers import BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel

    width, heads, layers, vocab = SHAPES[family, tiny]
    torch.manual_seed(seed)
    if family == "decoder":
        config = GPT2Config(
            vocab_size=vocab, n_embd=width, n_head=heads, n_layer=layers, bos_token_id=0, eos_token_id=0,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        model_class = GPT2LMHeadModel
    else:
        config = BartConfig(
            vocab_size=vocab, d_model=width, encoder_layers=layers, decoder_layers=layers,
            encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=4 * width,
            decoder_ffn_dim=4 * width, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
            pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
        )  # fmt: skip
        model_class = BartForConditionalGeneration
    config._attn_implementation = "sdpa"
    return model_class(config).eval()


def ours_from(reference: nn.Module) -> nn.Module:
    """Our model with the reference's weights (`course_transformer.core.conversion`), sdpa, eval."""
    convert = from_gpt2 if reference.config.model_type == "gpt2" else from_bart
    return convert(reference, attn_implementation="sdpa").eval()


def _generation_config(family: str, new_tokens: int, **extra: Any):
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=1 if family == "encoder-decoder" else 0,
        eos_token_id=None,
        forced_eos_token_id=None,
        forced_bos_token_id=None,
        decoder_start_token_id=2 if family == "encoder-decoder" else None,
        **extra,
    )


def _generate_fn(model: nn.Module, prompt: torch.Tensor, config) -> Callable[[], torch.Tensor]:
    model.generation_config.eos_token_id = None  # every row decodes exactly `new_tokens`
    model.generation_config.forced_eos_token_id = None

    def call() -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config)

    return call


def _static_compile_config(family: str, new_tokens: int):
    from transformers import CompileConfig

    compile_config = CompileConfig()
    compile_config._compile_all_devices = True  # HF compiles only on CUDA unless told otherwise
    return _generation_config(family, new_tokens, cache_implementation="static", compile_config=compile_config)


def _top_ops(fn: Callable[[], Any], rows: int = 8) -> list[dict[str, Any]]:
    """The operators with the most self CPU time in one call of `fn` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    return [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in events]


def _prompt(settings: DecodeSettings, batch: int, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(settings.seed + batch)
    return torch.randint(3, vocab, (batch, settings.prompt_len), generator=generator)  # (B, T): no special ids


def _rates(seconds: list[float], work: int) -> dict[str, Any]:
    return {"seconds": summarize(seconds), "tokens_per_s": summarize([work / s for s in seconds])}


def _static_compile(reference: nn.Module, family: str, prompt: torch.Tensor, settings: DecodeSettings):
    """HF's own compiled decoding: (row, tokens), or (row with the error, None) where it does not run."""
    fn = _generate_fn(reference, prompt, _static_compile_config(family, settings.new_tokens))
    try:
        start = time.perf_counter()
        tokens = fn()
        first = time.perf_counter() - start
        seconds = [_seconds(fn) for _ in range(settings.repeats)]
    except Exception as error:  # reported in the table, not fatal: the other rows stand on their own
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}, None
    row = _rates(seconds, prompt.shape[0] * settings.new_tokens)
    row["first_call_s"] = first
    row["compile_s"] = first - statistics.median(seconds)
    return row, tokens


def _prefill(settings: DecodeSettings, models: dict[str, nn.Module], prompt: torch.Tensor) -> dict[str, Any]:
    """One forward over the prompt (the encoder-decoder: the source and the start token), every variant
    round-robin; seconds and the ratio to HF's."""

    def forward_fn(model: nn.Module) -> Callable[[], Any]:
        inputs = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
        if model.config.is_encoder_decoder:
            inputs["decoder_input_ids"] = torch.full((prompt.shape[0], 1), 2)

        def call() -> Any:
            with torch.inference_mode():
                return model(**inputs)

        return call

    fns = [forward_fn(model) for model in models.values()]
    samples = interleaved(fns, settings.warmup, 3 * settings.repeats, torch.device("cpu"))
    hf = statistics.median(samples[0])
    return {
        name: {"seconds": summarize(seconds), "vs_hf": statistics.median(seconds) / hf}
        for name, seconds in zip(models, samples, strict=True)
    }


def measure_batch(
    settings: DecodeSettings, family: str, models: dict[str, nn.Module], batch: int, limit_steps: float
) -> dict[str, Any]:
    """Every variant of one (family, batch): timed round-robin, tokens compared with HF default's."""
    prompt = _prompt(settings, batch, models["hf"].config.vocab_size)
    config = _generation_config(family, settings.new_tokens)
    fns = {name: _generate_fn(model, prompt, config) for name, model in models.items()}
    tokens = {name: fn() for name, fn in fns.items()}
    samples = interleaved(list(fns.values()), settings.warmup, settings.repeats, torch.device("cpu"))
    work = batch * settings.new_tokens
    variants = {name: _rates(seconds, work) for name, seconds in zip(fns, samples, strict=True)}
    if batch in settings.compile_batches:
        for name in ("hf", "ours_fast"):  # HF's compiled decoding, and ours through the same API
            key = f"{name}_static_compile"
            variants[key], tokens[key] = _static_compile(models[name], family, prompt, settings)
    limit = limit_steps * batch  # tokens/s if each step only streamed the weights once
    hf = variants["hf"]["tokens_per_s"]["median"]
    compiled = variants.get("hf_static_compile", {}).get("tokens_per_s", {}).get("median")
    for name, row in variants.items():
        if "error" in row:
            continue
        rate = row["tokens_per_s"]["median"]
        row["vs_hf_default"] = rate / hf
        row["vs_hf_static_compile"] = rate / compiled if compiled else None
        row["share_of_limit"] = rate / limit
        row["tokens_equal_hf"] = tokens[name] is not None and torch.equal(tokens[name], tokens["hf"])
    row = {"batch": batch, "limit_tokens_per_s": limit, "variants": variants}
    row["prefill"] = _prefill(settings, models, prompt)
    if settings.profile:
        row["profile"] = {name: _top_ops(fns[name]) for name in ("hf", "ours_fast")}
    return row


def measure_family(settings: DecodeSettings, family: str, bandwidth: float) -> dict[str, Any]:
    reference = reference_model(family, settings.tiny, settings.seed)
    ours = ours_from(reference)
    fast = copy.deepcopy(ours).enable_fast_decoding()  # "auto": the layout per weight shape timed here
    models = {"hf": reference, "ours": ours, "ours_fast": fast}
    for layout in settings.layouts:  # each forced layout: what it buys alone
        models[f"ours_{layout}"] = copy.deepcopy(ours).enable_fast_decoding(layout)
    step_bytes = bytes_per_step(ours)
    batches = []
    for batch in settings.batches:
        print(f"decode: {family} batch {batch}", flush=True)
        batches.append(measure_batch(settings, family, models, batch, bandwidth / step_bytes))
    return {
        "family": family,
        "reference": REFERENCE[family],
        "parameters": sum(p.numel() for p in ours.parameters()),
        "bytes_per_step": step_bytes,
        "fast_decoding_layouts": fast.fast_decoding_layouts,
        "batches": batches,
    }


def _gemv_shapes(settings: DecodeSettings) -> list[tuple[int, int]]:
    width, _, _, vocab = SHAPES["decoder", settings.tiny]
    return [(width, width), (4 * width, width), (width, 4 * width), (vocab, width)]


def run_decode_benchmark(settings: DecodeSettings, output_dir: str | os.PathLike) -> dict[str, Any]:
    """Bandwidth, GEMV rates, then every family; writes bench.json, bench.md (and decode.png) atomically."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    threads = settings.threads or os.cpu_count() or 1
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    settings = dataclasses.replace(settings, threads=threads)
    started = time.perf_counter()
    environment = collect_environment(torch.device("cpu"))
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    try:
        hf_logging.set_verbosity_error()
        bandwidth = read_bandwidth(settings.bandwidth_mib)
        gemv = gemv_rates(_gemv_shapes(settings), budget_mib=min(256, settings.bandwidth_mib))
        families = [measure_family(settings, family, bandwidth) for family in settings.families]
    finally:
        hf_logging.set_verbosity(verbosity)
        torch.set_num_threads(previous)
    environment["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    report = {
        "schema_version": SCHEMA_VERSION,
        "mode": "decode",
        "environment": environment,
        "settings": dataclasses.asdict(settings),
        "read_bandwidth_bytes_per_s": bandwidth,
        "gemv": gemv,
        "families": families,
        "wall_seconds": time.perf_counter() - started,
    }
    report["files"] = ["bench.json", "bench.md"] + (["decode.png"] if settings.plots else [])
    if settings.plots:
        render_plot(report, output_dir / "decode.png")
    atomic_write_bytes(output_dir / "bench.md", render_markdown(report).encode())
    atomic_write_bytes(output_dir / "bench.json", (json.dumps(report, indent=2) + "\n").encode())
    return report


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------

VARIANT_NAMES = {
    "hf": "HF default",
    "hf_static_compile": "HF static + compile",
    "ours": "ours",
    "ours_fast": "ours, enable_fast_decoding()",
    "ours_transposed": 'ours, enable_fast_decoding("transposed")',
    "ours_packed": 'ours, enable_fast_decoding("packed")',
    "ours_fast_static_compile": "ours, enable_fast_decoding() + static + compile",
}


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _variant_line(family: str, batch: int, name: str, row: dict[str, Any]) -> str:
    label = VARIANT_NAMES[name]
    if "error" in row:
        return f"| {family} | {batch} | {label} | did not run: {row['error']} | | | | |"
    rate = row["tokens_per_s"]
    spread = f"{rate['median']:.1f} ({rate['min']:.1f}–{rate['max']:.1f})"
    compiled = f" (compile {row['compile_s']:.0f} s)" if "compile_s" in row else ""
    equal = "yes" if row["tokens_equal_hf"] else "**NO**"
    return (
        f"| {family} | {batch} | {label}{compiled} | {spread} | {_ratio(row['vs_hf_default'])} | "
        f"{_ratio(row['vs_hf_static_compile'])} | {100 * row['share_of_limit']:.0f}% | {equal} |"
    )


def render_markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    gb = report["read_bandwidth_bytes_per_s"] / 1e9
    lines = [
        "# Decoding benchmark (greedy, fp32, CPU)",
        "",
        f"{env['date_utc']}, commit {env['commit'][:10]}{' (dirty)' if env.get('dirty') else ''}, "
        f"{env['cpu_model']}, {env['torch_num_threads']} threads, torch {env['torch']}, "
        f"transformers {env['transformers']}; load average {env['load_average_start']} -> "
        f"{env['load_average_end']}; {report['wall_seconds']:.0f} s.",
        "",
        f"Read bandwidth (sum over {report['settings']['bandwidth_mib']} MiB, best of 5): **{gb:.1f} GB/s**. "
        "Limit = bandwidth / weight bytes per decoding step x batch.",
        "",
        "| family | batch | variant | tokens/s median (min–max) | × HF default | × HF static+compile | "
        "share of limit | tokens = HF |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for family in report["families"]:
        for batch in family["batches"]:
            for name, row in batch["variants"].items():
                lines.append(_variant_line(family["family"], batch["batch"], name, row))
    lines += ["", "Prefill (one forward over the prompt), seconds median and ours / HF (time: ≤ 1 is not slower):", ""]
    names = list(report["families"][0]["batches"][0]["prefill"])
    lines += ["| family | batch | " + " | ".join(VARIANT_NAMES[n] for n in names) + " |"]
    lines += ["|---|---|" + "---|" * len(names)]
    for family in report["families"]:
        for batch in family["batches"]:
            cells = [
                f"{row['seconds']['median'] * 1e3:.1f} ms" + ("" if name == "hf" else f" ({row['vs_hf']:.2f})")
                for name, row in batch["prefill"].items()
            ]
            lines.append(f"| {family['family']} | {batch['batch']} | " + " | ".join(cells) + " |")
    lines += ["", "Weights read per step and limits:", ""]
    for family in report["families"]:
        limits = ", ".join(f"batch {b['batch']}: {b['limit_tokens_per_s']:.1f} tokens/s" for b in family["batches"])
        lines.append(
            f"- {family['family']} ({family['reference']}, {family['parameters'] / 1e6:.1f} M parameters): "
            f"{family['bytes_per_step'] / 1e6:.0f} MB per step; limit {limits}; layouts chosen by "
            f"enable_fast_decoding(): {family['fast_decoding_layouts']}"
        )
    lines += ["", "GEMV streaming rate (one row times an out-of-cache weight, GB/s):", ""]
    lines += ["| weight (out, in) | F.linear (plain) | x @ Wᵀ (transposed) | oneDNN packed |", "|---|---|---|---|"]
    for row in report["gemv"]:
        shape = f"{row['shape'][0]} × {row['shape'][1]}"
        rates = " | ".join(f"{row[k] / 1e9:.1f}" for k in ("F.linear", "x @ Wt", "oneDNN packed"))
        lines.append(f"| {shape} | {rates} |")
    lines += _profile_lines(report)
    return "\n".join(lines) + "\n"


def _profile_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for family in report["families"]:
        for batch in family["batches"]:
            for name, ops in batch.get("profile", {}).items():
                lines += ["", f"Where one generate's time goes: {family['family']}, batch {batch['batch']}, "
                          f"{VARIANT_NAMES[name]} (torch.profiler, self CPU time)", ""]  # fmt: skip
                lines += ["| op | self s | calls |", "|---|---|---|"]
                lines += [f"| {op['op']} | {op['self_s']:.3f} | {op['calls']} |" for op in ops]
    return lines


# variant -> (short label, colour): HF grey, ours blue shades, the auto choice red.
PLOT_STYLE = {
    "hf": ("HF default", "#999999"),
    "hf_static_compile": ("HF static+compile", "#555555"),
    "ours": ("ours", "#9ecae1"),
    "ours_transposed": ("ours transposed", "#4292c6"),
    "ours_packed": ("ours packed", "#08519c"),
    "ours_fast": ("ours fast (auto)", "#d62728"),
    "ours_fast_static_compile": ("ours fast static+compile", "#67000d"),
}


def render_plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(f["family"], b) for f in report["families"] for b in f["batches"]]
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.6), squeeze=False)
    for ax, (family, batch) in zip(axes[0], groups, strict=True):
        names = [n for n, row in batch["variants"].items() if "error" not in row]
        rates = [batch["variants"][n]["tokens_per_s"]["median"] for n in names]
        colors = [PLOT_STYLE[n][1] for n in names]
        ax.bar(range(len(names)), rates, color=colors)
        ax.axhline(batch["limit_tokens_per_s"], color="black", linestyle="--", linewidth=1, label="bandwidth limit")
        ax.set_xticks(range(len(names)), [PLOT_STYLE[n][0] for n in names], rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{family}, batch {batch['batch']}", fontsize=9)
        ax.set_ylabel("tokens/s")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
