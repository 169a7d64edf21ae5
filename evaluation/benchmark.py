"""Benchmark harness: the course Transformer against the Hugging Face reference models at identical shapes.

Pairs compared (same width, heads, depth, FFN, vocabulary, positions, dropout 0):

* decoder: `CourseTransformerForCausalLM` (GPT-2 preset) vs `GPT2LMHeadModel`. GPT-2 fuses Q, K, V into one
  `Conv1D` (one addmm of C x 3C); ours has three `nn.Linear` projections.
* encoder: `CourseTransformerModel` (BERT preset, with pooler) vs `BertModel` for the forward pass,
  `CourseTransformerForMaskedLM` vs `BertForMaskedLM` for the training step.
* encoder-decoder: `CourseTransformerForSeq2SeqLM` configured like BART (learned positions, GELU, embedding
  LayerNorm, post-norm, tied embeddings) vs `BartForConditionalGeneration`. Remaining differences: BART's learned
  position table has 2 extra rows (offset 2) and BART adds a `final_logits_bias` (V,) to the logits.

Method: fixed seeds and thread count; warm-up calls; interleaved repetitions (ours, ref, ours, ref, ...);
medians with min-max; the ratio ours/ref is computed pair by pair and its median reported (the ratio of the
medians is stored too). Time is wall-clock `time.perf_counter` around the call (with `torch.cuda.synchronize`
on GPU). Peak memory is, on GPU, `torch.cuda.max_memory_allocated` minus the memory allocated before the call;
on CPU, the peak of the running sum of tensor allocations and frees recorded by `torch.profiler`
(`profile_memory=True`) during one call: tensor bytes allocated by the call above what existed before it
(weights and inputs excluded), not the process RSS.

`run_benchmark(settings, output_dir)` writes `bench.json`, `bench.md` and PNG plots atomically and returns the
report dict. `course_transformer/commands/benchmark.py` is the command line.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import io
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from course_transformer.core.io import atomic_write_bytes
from evaluation import tiny
from evaluation.flops import matmul_parameters, peak_bf16_flops, transformer_flops_per_token

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
FAMILIES = ("decoder", "encoder", "encoder-decoder")
REFERENCE_NAMES = {
    "decoder": "GPT2LMHeadModel",
    "encoder": "BertModel",
    "encoder-decoder": "BartForConditionalGeneration",
}
# Targets on ours/HF: lower is better for times, higher for throughputs.
TARGETS = {
    "forward_latency_s": ("<=", 1.0),
    "train_step_s": ("<=", 1.0),
    "generate_tokens_per_s": (">=", 1.0),
}
ATTENTION_OUTPUT_TARGET = 1.3  # cost of output_attentions on one layer, relative to the fast forward


# --------------------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BenchSettings:
    """Shapes and repetition counts of one benchmark run. Presets: `BenchSettings.preset("quick"|"full"|"tiny")`."""

    mode: str = "quick"
    threads: int = 0  # 0: os.cpu_count()
    seed: int = 0
    # Quick-mode counts: a run takes about 90 s on 2 quiet cores (87 s measured on 2026-12-01). With 3 training
    # steps per model (the earlier count) the medians moved by 20-30% from one run to the next.
    warmup: int = 2
    repeats: int = 7
    families: tuple[str, ...] = FAMILIES
    backends: tuple[str, ...] = ("eager", "sdpa", "flash_attention_2", "flex_attention")
    # model width (GPT-2 / BERT base), depth per stack, vocabulary
    hidden_size: int = 768
    num_heads: int = 12
    intermediate_size: int = 3072
    num_layers: int = 2
    vocab_size: int = 8192
    # forward latency and training step
    batch: int = 2
    seq_len: int = 128
    train_batch: int = 1
    train_seq_len: int = 128
    train_repeats: int = 7
    # KV-cached greedy generation
    gen_batches: tuple[int, ...] = (1, 8)
    gen_prompt_len: int = 16
    gen_new_tokens: int = 16
    gen_repeats: int = 5
    gen_families: tuple[str, ...] = ("decoder", "encoder-decoder")
    # cost of output_attentions (decoder base model, sdpa) at this length and depth
    attn_cost_seq_len: int = 1024
    attn_cost_layers: int = 4
    attn_cost_repeats: int = 3
    # scaling curves (decoder base models): time and memory per backend over sequence lengths
    scaling_seq_lens: tuple[int, ...] = (128, 256, 512, 1024)
    scaling_layers: int = 1
    scaling_repeats: int = 2
    scaling_memory_fraction: float = 0.5  # skip a length whose eager attention would exceed this share of free RAM
    measure_memory: bool = True
    gpu_extras: bool = True  # bf16, torch.compile, static cache, MFU (CUDA only)
    mfu_batch: int = 8
    mfu_seq_len: int = 1024
    plots: bool = True

    @classmethod
    def preset(cls, mode: str, **overrides: Any) -> BenchSettings:
        if mode == "quick":
            settings = cls(mode="quick")
        elif mode == "full":
            settings = cls(
                mode="full",
                warmup=2,
                repeats=10,
                num_layers=12,
                vocab_size=50257,
                batch=8,
                seq_len=512,
                train_batch=8,
                train_seq_len=512,
                train_repeats=8,
                gen_prompt_len=64,
                gen_new_tokens=128,
                gen_repeats=6,
                attn_cost_layers=12,
                attn_cost_repeats=8,
                scaling_seq_lens=(128, 256, 512, 1024, 2048, 4096),
                scaling_layers=12,
                scaling_repeats=5,
            )
        elif mode == "tiny":  # the smoke test: seconds, structure only
            settings = cls(
                mode="tiny",
                threads=1,  # tiny ops: OpenMP hand-offs between threads would dominate, badly on a busy machine
                warmup=1,
                repeats=2,
                hidden_size=tiny.HIDDEN_SIZE,
                num_heads=tiny.NUM_HEADS,
                intermediate_size=tiny.INTERMEDIATE_SIZE,
                num_layers=1,  # half the tiny depth: the smoke test runs every backend and family
                vocab_size=128,
                batch=2,
                seq_len=16,
                train_batch=2,
                train_seq_len=16,
                train_repeats=2,
                gen_batches=(1, 2),
                gen_prompt_len=4,
                gen_new_tokens=4,
                gen_repeats=2,
                attn_cost_seq_len=32,
                attn_cost_layers=2,
                attn_cost_repeats=2,
                scaling_seq_lens=(16, 32),
                scaling_layers=1,
                scaling_repeats=1,
                gpu_extras=False,
                mfu_batch=1,
                mfu_seq_len=32,
            )
        else:
            raise ValueError(f"unknown benchmark mode {mode!r}: use quick, full or tiny")
        return dataclasses.replace(settings, **overrides)


# --------------------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        return {"commit": commit, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def collect_environment(device: torch.device) -> dict[str, Any]:
    import transformers

    env: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        **_git_commit(),
    }
    try:
        import psutil

        env["memory_total_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return env


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


def _ours_config(settings: BenchSettings, family: str, backend: str, **overrides: Any):
    import modeling

    common = dict(
        vocab_size=settings.vocab_size,
        hidden_size=settings.hidden_size,
        num_attention_heads=settings.num_heads,
        intermediate_size=settings.intermediate_size,
        hidden_dropout_prob=0.0,
        attention_dropout_prob=0.0,
    )
    if family == "decoder":
        preset, fields = "gpt2-124m", dict(num_decoder_layers=settings.num_layers, bos_token_id=0, eos_token_id=0)
    elif family == "encoder":
        preset, fields = "bert-base", dict(num_encoder_layers=settings.num_layers)
    else:
        # The 2017 preset reshaped into BART: learned positions, GELU, embedding LayerNorm, no sqrt(d) scaling.
        preset = "vaswani-base"
        fields = dict(
            architecture="encoder-decoder",
            num_encoder_layers=settings.num_layers,
            num_decoder_layers=settings.num_layers,
            hidden_act="gelu",
            max_position_embeddings=1024,
            position_encoding="learned",
            norm_placement="post",
            layer_norm_eps=1e-5,
            embedding_layer_norm=True,
            type_vocab_size=0,
            scale_embeddings=False,
            tie_word_embeddings=True,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
        )
    config = modeling.load_preset(preset, **{**fields, **common, **overrides})
    config._attn_implementation = backend
    return config


def _ref_config(settings: BenchSettings, family: str, backend: str, max_positions: int | None = None):
    from transformers import BartConfig, BertConfig, GPT2Config

    width, heads, ffn, layers = (
        settings.hidden_size,
        settings.num_heads,
        settings.intermediate_size,
        settings.num_layers,
    )
    if family == "decoder":
        config = GPT2Config(
            vocab_size=settings.vocab_size,
            n_positions=max_positions or 1024,
            n_embd=width,
            n_layer=layers,
            n_head=heads,
            n_inner=ffn,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
    elif family == "encoder":
        config = BertConfig(
            vocab_size=settings.vocab_size,
            hidden_size=width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=ffn,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            max_position_embeddings=512,
        )
    else:
        config = BartConfig(
            vocab_size=settings.vocab_size,
            d_model=width,
            encoder_layers=layers,
            decoder_layers=layers,
            encoder_attention_heads=heads,
            decoder_attention_heads=heads,
            encoder_ffn_dim=ffn,
            decoder_ffn_dim=ffn,
            activation_function="gelu",
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            max_position_embeddings=1024,
            scale_embedding=False,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
            forced_eos_token_id=None,
        )
    config._attn_implementation = backend
    return config


def build_pair(
    settings: BenchSettings, family: str, backend: str, task: str, device: torch.device
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, ref) for `task` in "forward" | "train" | "generate" | "base" (decoder stacks without a head)."""
    import transformers

    import modeling

    torch.manual_seed(settings.seed)
    if family == "decoder":
        ours_cls = modeling.CourseTransformerModel if task == "base" else modeling.CourseTransformerForCausalLM
        ref_cls = transformers.GPT2Model if task == "base" else transformers.GPT2LMHeadModel
        ours_cfg = _ours_config(settings, family, backend)
    elif family == "encoder":
        mlm = task == "train"
        ours_cls = modeling.CourseTransformerForMaskedLM if mlm else modeling.CourseTransformerModel
        ref_cls = transformers.BertForMaskedLM if mlm else transformers.BertModel
        ours_cfg = _ours_config(settings, family, backend, add_pooling_layer=not mlm)
    else:
        ours_cls, ref_cls = modeling.CourseTransformerForSeq2SeqLM, transformers.BartForConditionalGeneration
        ours_cfg = _ours_config(settings, family, backend)
    ours = ours_cls(ours_cfg)
    torch.manual_seed(settings.seed)
    ref = ref_cls(_ref_config(settings, family, backend))
    for model in (ours, ref):
        if model.config._attn_implementation != backend:
            raise RuntimeError(
                f"{type(model).__name__} ran with {model.config._attn_implementation!r}, not {backend!r}"
            )
        model.to(device)
        model.train(task == "train")
    return ours, ref


def _inputs(settings: BenchSettings, batch: int, length: int, device: torch.device, offset: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(settings.seed + batch * 7919 + length)
    return torch.randint(offset, settings.vocab_size, (batch, length), generator=generator).to(device)


# --------------------------------------------------------------------------------------------------------------
# Timing primitives
# --------------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def interleaved(
    fns: Sequence[Callable[[], Any]], warmup: int, repeats: int, device: torch.device
) -> list[list[float]]:
    """Seconds per call of each function, measured round-robin (a, b, a, b, ...) after `warmup` rounds."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            samples[i].append(_timed(fn, device))
    return samples


def summarize(values: Sequence[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "samples": list(values),
    }


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated by one call of `fn` above what was allocated before it (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return int(peak)


def compare(
    name: str,
    metric: str,
    family: str,
    backend: str,
    shape: dict[str, Any],
    ours_seconds: Sequence[float],
    ref_seconds: Sequence[float],
    work: float = 1.0,
    note: str = "",
) -> dict[str, Any]:
    """A comparison row. For a throughput metric the samples are `work / seconds` (e.g. tokens/s)."""
    throughput = metric.endswith("_per_s")
    ours = [work / s for s in ours_seconds] if throughput else list(ours_seconds)
    ref = [work / s for s in ref_seconds] if throughput else list(ref_seconds)
    pairs = [a / b for a, b in zip(ours, ref, strict=True)]
    op, value = TARGETS.get(metric, (None, None))
    ratio = statistics.median(pairs)
    row: dict[str, Any] = {
        "name": name,
        "metric": metric,
        "family": family,
        "reference": REFERENCE_NAMES[family],
        "backend": backend,
        "shape": shape,
        "ours": summarize(ours),
        "ref": summarize(ref),
        "ratio": {**summarize(pairs), "ratio_of_medians": statistics.median(ours) / statistics.median(ref)},
        "note": note,
    }
    if op is not None:
        met = ratio <= value if op == "<=" else ratio >= value
        # Positive margin: how far the ratio is on the good side of the target, as a fraction of the target.
        margin = (value - ratio) / value if op == "<=" else (ratio - value) / value
        straddles = min(pairs) <= value <= max(pairs)
        row["target"] = {"op": op, "value": value, "met": met, "margin": margin, "inconclusive": straddles}
    return row


# --------------------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------------------


class Benchmark:
    def __init__(self, settings: BenchSettings, device: torch.device):
        self.settings = settings
        self.device = device
        self.comparisons: list[dict[str, Any]] = []
        self.memory: list[dict[str, Any]] = []
        self.attention_cost: list[dict[str, Any]] = []
        self.scaling: list[dict[str, Any]] = []
        self.gpu: list[dict[str, Any]] = []
        self.skipped: list[dict[str, str]] = []

    # -- helpers
    def _skip(self, what: str, reason: str) -> None:
        logger.info("skip %s: %s", what, reason)
        self.skipped.append({"what": what, "reason": reason})

    def available_backends(self) -> list[str]:
        from transformers.utils import is_flash_attn_2_available

        usable = []
        for backend in self.settings.backends:
            if backend in ("eager", "sdpa"):
                usable.append(backend)
            elif backend == "flash_attention_2":
                if self.device.type == "cuda" and is_flash_attn_2_available():
                    usable.append(backend)
                else:
                    self._skip("backend flash_attention_2", "needs CUDA and the flash-attn package")
            elif backend == "flex_attention":
                if self.device.type == "cuda" and importlib.util.find_spec("torch.nn.attention.flex_attention"):
                    usable.append(backend)
                else:
                    self._skip("backend flex_attention", "measured on CUDA only (compiled kernel)")
            else:
                self._skip(f"backend {backend}", "unknown backend")
        return usable

    def _memory_row(self, name, family, backend, shape, ours_fn, ref_fn) -> None:
        if not self.settings.measure_memory:
            return
        ours_bytes, ref_bytes = peak_memory_bytes(ours_fn, self.device), peak_memory_bytes(ref_fn, self.device)
        self.memory.append(
            {
                "name": name,
                "family": family,
                "reference": REFERENCE_NAMES[family],
                "backend": backend,
                "shape": shape,
                "ours_bytes": ours_bytes,
                "ref_bytes": ref_bytes,
                "ratio": ours_bytes / ref_bytes if ref_bytes else None,
                "method": "cuda.max_memory_allocated" if self.device.type == "cuda" else "torch.profiler",
            }
        )

    # -- forward latency
    def forward(self, family: str, backend: str) -> None:
        s = self.settings
        ours, ref = build_pair(s, family, backend, "forward", self.device)
        ids = _inputs(s, s.batch, s.seq_len, self.device)

        def run(model):
            def call():
                with torch.inference_mode():
                    if family == "encoder-decoder":
                        return model(input_ids=ids, decoder_input_ids=ids, use_cache=False)
                    if family == "decoder":
                        return model(input_ids=ids, use_cache=False)
                    return model(input_ids=ids)

            return call

        shape = {
            "batch": s.batch,
            "seq_len": s.seq_len,
            "layers": s.num_layers,
            "width": s.hidden_size,
            "vocab": s.vocab_size,
        }
        a, b = interleaved([run(ours), run(ref)], s.warmup, s.repeats, self.device)
        self.comparisons.append(compare("forward", "forward_latency_s", family, backend, shape, a, b))
        self._memory_row("forward", family, backend, shape, run(ours), run(ref))

    # -- training step
    def train_step(self, family: str, backend: str) -> None:
        s = self.settings
        ours, ref = build_pair(s, family, backend, "train", self.device)
        ids = _inputs(s, s.train_batch, s.train_seq_len, self.device)

        def step_fn(model):
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

            def step():
                if family in ("decoder", "encoder-decoder"):
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                else:
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            return step

        shape = {
            "batch": s.train_batch,
            "seq_len": s.train_seq_len,
            "layers": s.num_layers,
            "width": s.hidden_size,
            "vocab": s.vocab_size,
        }
        tokens = s.train_batch * s.train_seq_len  # target tokens (the encoder-decoder reads as many source tokens)
        ours_step, ref_step = step_fn(ours), step_fn(ref)
        a, b = interleaved([ours_step, ref_step], s.warmup, s.train_repeats, self.device)
        note = "loss on all positions; encoder: masked-LM heads (BertForMaskedLM); AdamW"
        self.comparisons.append(compare("train step", "train_step_s", family, backend, shape, a, b, note=note))
        self.comparisons.append(
            compare("train step", "train_tokens_per_s", family, backend, shape, a, b, work=tokens, note=note)
        )
        self._memory_row("train step", family, backend, shape, ours_step, ref_step)

    # -- generation
    def generate(self, family: str, backend: str, batch: int) -> None:
        from transformers import GenerationConfig

        s = self.settings
        ours, ref = build_pair(s, family, backend, "generate", self.device)
        prompt = _inputs(s, batch, s.gen_prompt_len, self.device)
        mask = torch.ones_like(prompt)
        pad = 1 if family == "encoder-decoder" else 0
        config = GenerationConfig(
            max_new_tokens=s.gen_new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            pad_token_id=pad,
            eos_token_id=None,
            forced_eos_token_id=None,
            forced_bos_token_id=None,
            decoder_start_token_id=2 if family == "encoder-decoder" else None,
        )
        expected = (s.gen_prompt_len if family == "decoder" else 1) + s.gen_new_tokens
        for model in (ours, ref):
            # No end-of-sequence: every row generates exactly `gen_new_tokens` (a None in `config` would be
            # filled from the model's defaults).
            model.generation_config.eos_token_id = None
            model.generation_config.forced_eos_token_id = None

        def run(model):
            def call():
                with torch.inference_mode():
                    out = model.generate(input_ids=prompt, attention_mask=mask, generation_config=config)
                if out.shape != (batch, expected):
                    raise RuntimeError(f"{type(model).__name__}.generate returned {tuple(out.shape)}")
                return out

            return call

        shape = {
            "batch": batch,
            "prompt_len": s.gen_prompt_len,
            "new_tokens": s.gen_new_tokens,
            "layers": s.num_layers,
            "width": s.hidden_size,
            "vocab": s.vocab_size,
        }
        a, b = interleaved([run(ours), run(ref)], s.warmup, s.gen_repeats, self.device)
        note = "greedy, DynamicCache, new tokens / wall time (prefill included)"
        self.comparisons.append(
            compare(
                f"generate b{batch}",
                "generate_tokens_per_s",
                family,
                backend,
                shape,
                a,
                b,
                work=batch * s.gen_new_tokens,
                note=note,
            )
        )

    # -- cost of output_attentions
    def attention_output_cost(self) -> None:
        """Our decoder base model (sdpa) at `attn_cost_seq_len`: the fast forward vs output_attentions on every
        layer vs on one chosen layer (`attention_layers=[L // 2]`), interleaved."""
        import modeling

        s = self.settings
        length, layers = s.attn_cost_seq_len, s.attn_cost_layers
        config = _ours_config(
            s, "decoder", "sdpa", num_decoder_layers=layers, max_position_embeddings=max(1024, length)
        )
        torch.manual_seed(s.seed)
        model = modeling.CourseTransformerModel(config).to(self.device).eval()
        ids = _inputs(s, 1, length, self.device)
        chosen = layers // 2

        def run(**kwargs):
            def call():
                with torch.inference_mode():
                    return model(input_ids=ids, use_cache=False, **kwargs)

            return call

        variants = {
            "fast": run(),
            "all_layers": run(output_attentions=True),
            "one_layer": run(output_attentions=True, attention_layers=[chosen]),
        }
        samples = interleaved(list(variants.values()), 1, s.attn_cost_repeats, self.device)
        times = dict(zip(variants, samples, strict=True))
        shape = {"batch": 1, "seq_len": length, "layers": layers, "width": s.hidden_size, "chosen_layer": chosen}
        for name in ("all_layers", "one_layer"):
            pairs = [a / b for a, b in zip(times[name], times["fast"], strict=True)]
            ratio = statistics.median(pairs)
            row = {
                "variant": name,
                "backend": "sdpa (weights from the fused kernel's log-sum-exp on the recorded layers)",
                "shape": shape,
                "seconds": summarize(times[name]),
                "fast_seconds": summarize(times["fast"]),
                "ratio": summarize(pairs),
            }
            if name == "one_layer":
                row["target"] = {
                    "op": "<=",
                    "value": ATTENTION_OUTPUT_TARGET,
                    "met": ratio <= ATTENTION_OUTPUT_TARGET,
                    "margin": (ATTENTION_OUTPUT_TARGET - ratio) / ATTENTION_OUTPUT_TARGET,
                }
            if s.measure_memory:
                row["peak_bytes"] = peak_memory_bytes(variants[name], self.device)
                row["fast_peak_bytes"] = peak_memory_bytes(variants["fast"], self.device)
            self.attention_cost.append(row)

    # -- scaling over sequence length
    def _fits(self, length: int, layers: int) -> bool:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
        else:
            try:
                import psutil

                free = psutil.virtual_memory().available
            except ImportError:
                return True
        # eager keeps scores + weights (fp32) per layer alive for backward-free inference: ~3 (H, T, T) buffers
        need = 3 * self.settings.num_heads * length * length * 4
        return need < self.settings.scaling_memory_fraction * free

    def scaling_curves(self, backends: Sequence[str]) -> None:
        """Decoder base models (ours vs GPT2Model), batch 1, per backend: forward time and peak memory vs T."""
        import transformers

        import modeling

        s = self.settings
        max_len = max(s.scaling_seq_lens)
        for backend in backends:
            torch.manual_seed(s.seed)
            ours = (
                modeling.CourseTransformerModel(
                    _ours_config(
                        s,
                        "decoder",
                        backend,
                        num_decoder_layers=s.scaling_layers,
                        max_position_embeddings=max(1024, max_len),
                    )
                )
                .to(self.device)
                .eval()
            )
            ref_cfg = _ref_config(
                dataclasses.replace(s, num_layers=s.scaling_layers),
                "decoder",
                backend,
                max_positions=max(1024, max_len),
            )
            torch.manual_seed(s.seed)
            ref = transformers.GPT2Model(ref_cfg).to(self.device).eval()
            for length in s.scaling_seq_lens:
                if not self._fits(length, s.scaling_layers):
                    self._skip(f"scaling {backend} T={length}", "attention matrices would not fit in memory")
                    continue
                ids = _inputs(s, 1, length, self.device)

                def run(model, ids=ids):
                    def call():
                        with torch.inference_mode():
                            return model(input_ids=ids, use_cache=False)

                    return call

                try:
                    a, b = interleaved([run(ours), run(ref)], 1, s.scaling_repeats, self.device)
                    ours_mem = peak_memory_bytes(run(ours), self.device) if s.measure_memory else None
                    ref_mem = peak_memory_bytes(run(ref), self.device) if s.measure_memory else None
                except torch.OutOfMemoryError:
                    self._skip(f"scaling {backend} T={length}", "out of memory")
                    continue
                self.scaling.append(
                    {
                        "backend": backend,
                        "seq_len": length,
                        "batch": 1,
                        "layers": s.scaling_layers,
                        "ours_seconds": summarize(a),
                        "ref_seconds": summarize(b),
                        "ratio": summarize([x / y for x, y in zip(a, b, strict=True)]),
                        "ours_peak_bytes": ours_mem,
                        "ref_peak_bytes": ref_mem,
                    }
                )
            del ours, ref

    # -- GPU-only measurements
    def gpu_extras(self) -> None:
        if self.device.type != "cuda":
            self._skip("gpu extras (bf16, torch.compile, static cache, MFU)", "no CUDA device")
            return
        for name, fn in (
            ("bf16 forward", self._gpu_bf16),
            ("torch.compile forward", self._gpu_compile),
            ("static-cache generation", self._gpu_static_cache),
            ("MFU GPT-2-124M train step", self._gpu_mfu),
        ):
            try:
                fn()
            except Exception as error:  # a GPU extra that fails must not lose the rest of the report
                logger.exception("gpu extra %s failed", name)
                self.gpu.append({"name": name, "error": f"{type(error).__name__}: {error}"})

    def _gpu_bf16(self) -> None:
        s = self.settings
        for family in s.families:
            ours, ref = build_pair(s, family, "sdpa", "forward", self.device)
            ours.to(torch.bfloat16)
            ref.to(torch.bfloat16)
            ids = _inputs(s, s.batch, s.seq_len, self.device)
            kwargs = {"decoder_input_ids": ids} if family == "encoder-decoder" else {}

            def run(model, kwargs=kwargs, ids=ids):
                def call():
                    with torch.inference_mode():
                        return model(input_ids=ids, **kwargs)

                return call

            a, b = interleaved([run(ours), run(ref)], s.warmup, s.repeats, self.device)
            shape = {"batch": s.batch, "seq_len": s.seq_len, "layers": s.num_layers, "dtype": "bfloat16"}
            self.gpu.append(compare("bf16 forward", "forward_latency_s", family, "sdpa", shape, a, b))

    def _gpu_compile(self) -> None:
        s = self.settings
        ours, ref = build_pair(s, "decoder", "sdpa", "forward", self.device)
        ids = _inputs(s, s.batch, s.seq_len, self.device)
        compiled = [torch.compile(m) for m in (ours, ref)]

        def run(model):
            def call():
                with torch.inference_mode():
                    return model(input_ids=ids, use_cache=False)

            return call

        a, b = interleaved([run(compiled[0]), run(compiled[1])], max(3, s.warmup), s.repeats, self.device)
        shape = {"batch": s.batch, "seq_len": s.seq_len, "layers": s.num_layers, "compile": "default"}
        self.gpu.append(compare("torch.compile forward", "forward_latency_s", "decoder", "sdpa", shape, a, b))

    def _gpu_static_cache(self) -> None:
        from transformers import GenerationConfig

        s = self.settings
        ours, ref = build_pair(s, "decoder", "sdpa", "generate", self.device)
        batch = max(s.gen_batches)
        prompt = _inputs(s, batch, s.gen_prompt_len, self.device)
        config = GenerationConfig(
            max_new_tokens=s.gen_new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
            cache_implementation="static",
        )
        for model in (ours, ref):
            model.generation_config.eos_token_id = None

        def run(model):
            def call():
                with torch.inference_mode():
                    return model.generate(
                        input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config
                    )

            return call

        a, b = interleaved([run(ours), run(ref)], s.warmup, s.gen_repeats, self.device)
        shape = {"batch": batch, "prompt_len": s.gen_prompt_len, "new_tokens": s.gen_new_tokens, "cache": "static"}
        self.gpu.append(
            compare(
                "static-cache generate",
                "generate_tokens_per_s",
                "decoder",
                "sdpa",
                shape,
                a,
                b,
                work=batch * s.gen_new_tokens,
            )
        )

    def _gpu_mfu(self) -> None:
        """GPT-2-124M (12 layers, full vocabulary) training step under bf16 autocast; MFU = achieved FLOP/s over
        the device's dense bf16 peak, with FLOPs per token = 6 N + 12 L C T (nanoGPT's estimate, PaLM appendix B)."""
        s = dataclasses.replace(
            self.settings, num_layers=12, vocab_size=50257, hidden_size=768, num_heads=12, intermediate_size=3072
        )
        ours, ref = build_pair(s, "decoder", "sdpa", "train", self.device)
        ids = _inputs(s, s.mfu_batch, s.mfu_seq_len, self.device)

        def step_fn(model):
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            return step

        a, b = interleaved([step_fn(ours), step_fn(ref)], max(2, s.warmup), s.train_repeats, self.device)
        tokens = s.mfu_batch * s.mfu_seq_len
        flops_per_token = transformer_flops_per_token(matmul_parameters(ours), 12, 768, s.mfu_seq_len)
        peak = peak_bf16_flops(torch.cuda.get_device_name(self.device))
        shape = {
            "batch": s.mfu_batch,
            "seq_len": s.mfu_seq_len,
            "layers": 12,
            "vocab": 50257,
            "dtype": "bf16 autocast",
        }
        row = compare("GPT-2-124M train step", "train_tokens_per_s", "decoder", "sdpa", shape, a, b, work=tokens)
        row["flops_per_token"] = flops_per_token
        row["peak_flops"] = peak
        if peak:
            row["mfu_ours"] = flops_per_token * row["ours"]["median"] / peak
            row["mfu_ref"] = flops_per_token * row["ref"]["median"] / peak
        self.gpu.append(row)

    # -- everything
    def run_all(self) -> None:
        s = self.settings
        backends = self.available_backends()
        families = [f for f in s.families if f in FAMILIES]
        for family in families:
            for backend in backends:
                logger.info("forward / train: %s %s", family, backend)
                self._guard(f"forward {family} {backend}", self.forward, family, backend)
                self._guard(f"train {family} {backend}", self.train_step, family, backend)
        for family in [f for f in s.gen_families if f in families]:
            for backend in backends:
                for batch in s.gen_batches:
                    logger.info("generate: %s %s b%d", family, backend, batch)
                    self._guard(f"generate {family} {backend} b{batch}", self.generate, family, backend, batch)
        logger.info("output_attentions cost")
        self._guard("output_attentions cost", self.attention_output_cost)
        logger.info("scaling curves")
        self._guard("scaling", self.scaling_curves, [b for b in backends if b in ("eager", "sdpa")])
        if s.gpu_extras:
            self.gpu_extras()
        else:
            self._skip("gpu extras (bf16, torch.compile, static cache, MFU)", "disabled in these settings")

    def _guard(self, what: str, fn: Callable, *args) -> None:
        """Run one measurement; a backend or model that cannot run is recorded as skipped, not fatal."""
        try:
            fn(*args)
        except (RuntimeError, ValueError, NotImplementedError, ImportError) as error:
            logger.warning("%s failed: %s", what, error)
            self._skip(what, f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}")


def profile_forward(
    settings: BenchSettings, family: str = "decoder", backend: str = "sdpa", task: str = "forward", row_limit: int = 20
) -> str:
    """torch.profiler tables (self CPU/CUDA time per op) of one forward (or training step, `task="train"`) of ours
    and of the reference at the settings' shapes: where the time goes when a ratio misses its target."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ours, ref = build_pair(settings, family, backend, task, device)
    batch, length = (
        (settings.train_batch, settings.train_seq_len) if task == "train" else (settings.batch, settings.seq_len)
    )
    ids = _inputs(settings, batch, length, device)
    kwargs: dict[str, Any] = {"input_ids": ids}
    if family == "encoder-decoder":
        kwargs["decoder_input_ids"] = ids
    if family != "encoder":
        kwargs["use_cache"] = False
    if task == "train":
        kwargs["labels"] = ids
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    sections = []
    for name, model in (("ours", ours), (REFERENCE_NAMES[family], ref)):

        def call(model=model):
            if task == "train":
                model(**kwargs).loss.backward()
                return
            with torch.inference_mode():
                model(**kwargs)

        for _ in range(max(1, settings.warmup)):
            call()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with profile(activities=activities) as prof:
                for _ in range(max(1, settings.repeats)):
                    call()
                _sync(device)
        table = prof.key_averages().table(sort_by=sort_key, row_limit=row_limit)
        sections.append(
            f"## {name}: {family} {task}, {backend}, B={batch} T={length}, {settings.repeats} calls\n\n{table}"
        )
    return "\n\n".join(sections)


# --------------------------------------------------------------------------------------------------------------
# Report: JSON, Markdown, plots, all written atomically
# --------------------------------------------------------------------------------------------------------------


def _fmt_value(metric: str, value: float) -> str:
    if metric.endswith("_per_s"):
        return f"{value:,.1f}"
    if value < 1e-2:
        return f"{value * 1e3:.2f} ms"
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.3f} s"


def _fmt_shape(shape: dict[str, Any]) -> str:
    short = {
        "batch": "B",
        "seq_len": "T",
        "layers": "L",
        "width": "C",
        "vocab": "V",
        "prompt_len": "P",
        "new_tokens": "N",
    }
    return " ".join(f"{short.get(k, k)}={v}" for k, v in shape.items())


def _status(target: dict[str, Any] | None) -> str:
    if not target:
        return "-"
    pct = abs(target["margin"]) * 100
    word = "met" if target["met"] else "missed"
    text = f"{word} by {pct:.1f}%"
    if target.get("inconclusive"):
        text += " (min-max straddles target)"
    return text


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def render_markdown(report: dict[str, Any]) -> str:
    env, settings = report["environment"], report["settings"]
    lines = [
        f"# Benchmark: course Transformer vs Hugging Face reference ({settings['mode']} mode)",
        "",
        f"- date: {env['date_utc']}; commit {env['commit'][:10]}{' (dirty tree)' if env.get('dirty') else ''}",
        f"- hardware: {env['cpu_model']}, {env['cpu_count']} CPUs, torch threads {env['torch_num_threads']}, "
        f"device {env['device']}{' (' + env['cuda_device'] + ')' if env.get('cuda_device') else ''}",
        f"- software: python {env['python']}, torch {env['torch']}, transformers {env['transformers']}",
        f"- load average at start/end: {env.get('load_average_start')} / {env.get('load_average_end')}",
        f"- wall time of the run: {report['wall_seconds']:.1f} s",
        "- method: warm-up, interleaved repetitions (ours, ref, ours, ref, ...), median (min-max); ratio = "
        "median of per-pair ours/HF ratios; fixed seeds and thread count; dropout 0.",
        "",
        "**Targets:** ours/HF <= 1.00 for forward latency and train step time; >= 1.00 for generation tokens/s; "
        f"output_attentions on one layer <= {ATTENTION_OUTPUT_TARGET:.2f}x the fast forward "
        f"(T={settings['attn_cost_seq_len']}).",
        "",
        "## Ours vs HF",
        "",
        "| measurement | family (HF model) | backend | shape | ours median (min-max) | HF median (min-max) "
        "| ours/HF median (min-max) | target | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["comparisons"]:
        metric = row["metric"]
        o, r, q = row["ours"], row["ref"], row["ratio"]
        target = row.get("target")
        lines.append(
            f"| {row['name']} ({metric}) | {row['family']} ({row['reference']}) | {row['backend']} "
            f"| {_fmt_shape(row['shape'])} "
            f"| {_fmt_value(metric, o['median'])} ({_fmt_value(metric, o['min'])}-{_fmt_value(metric, o['max'])}) "
            f"| {_fmt_value(metric, r['median'])} ({_fmt_value(metric, r['min'])}-{_fmt_value(metric, r['max'])}) "
            f"| {q['median']:.3f} ({q['min']:.3f}-{q['max']:.3f}) "
            f"| {target['op'] + ' ' + format(target['value'], '.2f') if target else '-'} | {_status(target)} |"
        )
    summary = report["summary"]
    lines += [
        "",
        f"Targets met: {summary['met']} of {summary['with_target']} ({summary['inconclusive']} with a min-max "
        "range straddling the target, i.e. within noise).",
        "",
    ]
    if report["memory"]:
        method = report["memory"][0]["method"]
        lines += [
            f"## Peak memory ({method}: bytes allocated by one call above the memory held before it)",
            "",
            "| measurement | family | backend | shape | ours MiB | HF MiB | ours/HF |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in report["memory"]:
            ratio = f"{row['ratio']:.3f}" if row["ratio"] else "-"
            lines.append(
                f"| {row['name']} | {row['family']} | {row['backend']} | {_fmt_shape(row['shape'])} "
                f"| {_mib(row['ours_bytes'])} | {_mib(row['ref_bytes'])} | {ratio} |"
            )
        lines.append("")
    if report["attention_cost"]:
        lines += [
            "## Cost of `output_attentions=True` (ours, decoder base model, sdpa elsewhere)",
            "",
            "| variant | shape | seconds median (min-max) | fast forward median | ratio median (min-max) "
            "| peak MiB (fast) | status |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in report["attention_cost"]:
            sec, fast, q = row["seconds"], row["fast_seconds"], row["ratio"]
            target = row.get("target")
            status = (f"target <= {target['value']:.2f}: " + _status(target)) if target else "-"
            lines.append(
                f"| {row['variant']} | {_fmt_shape(row['shape'])} | {sec['median']:.3f} ({sec['min']:.3f}-"
                f"{sec['max']:.3f}) | {fast['median']:.3f} | {q['median']:.3f} ({q['min']:.3f}-{q['max']:.3f}) "
                f"| {_mib(row.get('peak_bytes'))} ({_mib(row.get('fast_peak_bytes'))}) | {status} |"
            )
        lines.append("")
    if report["scaling"]:
        lines += [
            "## Scaling with sequence length (decoder base models, batch 1, ours vs GPT2Model)",
            "",
            "| backend | T | ours s | HF s | ours/HF | ours peak MiB | HF peak MiB |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in report["scaling"]:
            lines.append(
                f"| {row['backend']} | {row['seq_len']} | {row['ours_seconds']['median']:.4f} "
                f"| {row['ref_seconds']['median']:.4f} | {row['ratio']['median']:.3f} "
                f"| {_mib(row['ours_peak_bytes'])} | {_mib(row['ref_peak_bytes'])} |"
            )
        lines.append("")
    lines += ["## GPU-only measurements", ""]
    if report["gpu"]:
        for row in report["gpu"]:
            if "error" in row:
                lines.append(f"- {row['name']}: failed ({row['error']})")
                continue
            extra = ""
            if row.get("mfu_ours") is not None:
                extra = f"; MFU ours {row['mfu_ours']:.1%}, HF {row['mfu_ref']:.1%}"
            lines.append(
                f"- {row['name']} ({row['metric']}, {_fmt_shape(row['shape'])}): ours/HF "
                f"{row['ratio']['median']:.3f} ({row['ratio']['min']:.3f}-{row['ratio']['max']:.3f}){extra}"
            )
    else:
        lines.append("- not run: no CUDA device (bf16, torch.compile, static cache and MFU need one)")
    lines.append("")
    if report["skipped"]:
        lines += ["## Skipped", ""] + [f"- {item['what']}: {item['reason']}" for item in report["skipped"]] + [""]
    lines += ["## Files", ""] + [f"- `{name}`" for name in report["files"]] + [""]
    return "\n".join(lines)


def _save_figure(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def render_plots(report: dict[str, Any], output_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rows = [r for r in report["comparisons"] if "target" in r]
    if rows:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(rows) + 2), 4.5))
        labels = [f"{r['name']} {r['family']} {r['backend']}" for r in rows]
        medians = [r["ratio"]["median"] for r in rows]
        low = [r["ratio"]["median"] - r["ratio"]["min"] for r in rows]
        high = [r["ratio"]["max"] - r["ratio"]["median"] for r in rows]
        colors = ["tab:green" if r["target"]["met"] else "tab:red" for r in rows]
        ax.bar(range(len(rows)), medians, yerr=[low, high], color=colors, capsize=3)
        ax.axhline(1.0, color="black", linewidth=1, linestyle="--")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("ours / HF (median, min-max)")
        ax.set_title("Ratios ours/HF (time: lower is better; tokens/s: higher is better)")
        _save_figure(fig, output_dir / "ratios.png")
        plt.close(fig)
        written.append("ratios.png")
    if report["scaling"]:
        for key, label, filename in (
            ("seconds", "forward time (s)", "scaling_time.png"),
            ("peak_bytes", "peak memory (MiB)", "scaling_memory.png"),
        ):
            fig, ax = plt.subplots(figsize=(6.5, 4.5))
            plotted = False
            for backend in sorted({r["backend"] for r in report["scaling"]}):
                points = [r for r in report["scaling"] if r["backend"] == backend]
                for who, style in (("ours", "-o"), ("ref", "--s")):
                    field = f"{who}_{key}"
                    values = [(r[field]["median"] if key == "seconds" else (r[field] or 0) / 2**20) for r in points]
                    if key == "peak_bytes" and not any(values):
                        continue
                    name = "ours" if who == "ours" else "GPT2Model"
                    ax.plot([r["seq_len"] for r in points], values, style, label=f"{name} {backend}")
                    plotted = True
            if not plotted:
                plt.close(fig)
                continue
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length T")
            ax.set_ylabel(label)
            ax.set_title(f"Scaling, decoder base model, batch 1 ({report['settings']['scaling_layers']} layers)")
            ax.legend()
            ax.grid(True, which="both", alpha=0.3)
            _save_figure(fig, output_dir / filename)
            plt.close(fig)
            written.append(filename)
    return written


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    targeted = [r for r in report["comparisons"] if "target" in r]
    targeted += [r for r in report["attention_cost"] if "target" in r]
    return {
        "with_target": len(targeted),
        "met": sum(r["target"]["met"] for r in targeted),
        "missed": sum(not r["target"]["met"] for r in targeted),
        "inconclusive": sum(bool(r["target"].get("inconclusive")) for r in targeted),
    }


def run_benchmark(settings: BenchSettings, output_dir: str | os.PathLike) -> dict[str, Any]:
    """Run every measurement of `settings`, write `bench.json`, `bench.md` and the plots into `output_dir`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    threads = settings.threads or os.cpu_count() or 1
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    settings = dataclasses.replace(settings, threads=threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(settings.seed)
    started = time.perf_counter()
    environment = collect_environment(device)
    bench = Benchmark(settings, device)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    try:
        hf_logging.set_verbosity_error()  # GPT-2's config warnings on reduced vocabularies are noise here
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bench.run_all()
    finally:
        hf_logging.set_verbosity(verbosity)
        torch.set_num_threads(previous_threads)
    environment["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "mode": settings.mode,
        "environment": environment,
        "settings": json.loads(json.dumps(dataclasses.asdict(settings))),
        "targets": {
            **{metric: {"op": op, "value": value} for metric, (op, value) in TARGETS.items()},
            "attention_output_one_layer": {"op": "<=", "value": ATTENTION_OUTPUT_TARGET},
        },
        "comparisons": bench.comparisons,
        "memory": bench.memory,
        "attention_cost": bench.attention_cost,
        "scaling": bench.scaling,
        "gpu": bench.gpu,
        "skipped": bench.skipped,
        "wall_seconds": time.perf_counter() - started,
    }
    report["summary"] = _summary(report)
    plots = render_plots(report, output_dir) if settings.plots else []
    report["files"] = ["bench.json", "bench.md", *plots]
    atomic_write_bytes(output_dir / "bench.md", render_markdown(report).encode())
    atomic_write_bytes(
        output_dir / "bench.json", (json.dumps(report, indent=2, default=_json_default) + "\n").encode()
    )
    return report


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, tuple | set):
        return list(value)
    return str(value)
