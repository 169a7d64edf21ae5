"""Train a course Transformer from scratch: one straight loop on `accelerate.Accelerator`.

    course-transformer train --config configs/train/demo-cpu.yaml                 # CPU, a few minutes
    course-transformer train --config configs/train/demo-cpu.yaml --resume        # continue from the last checkpoint
    course-transformer train --config configs/train/demo-cpu.yaml --set max_steps=50 --set learning_rate=3e-4
    accelerate launch --config_file configs/accelerate/single-gpu.yaml -m course_transformer.commands.train \
        --config configs/train/gpt2-124m.yaml

The run folder (`run_dir`) receives: `train_config.yaml` (the resolved config), `metrics.jsonl` (one JSON object
per log/eval), `loss.png`, `checkpoints/step-NNNNNNN` (`accelerator.save_state` + `progress.json`, written to a
temp folder and renamed, the last `keep_last` kept) and `final/` (the unwrapped model's `save_pretrained` +
tokenizer + generation config + README.md model card), loadable with
`AutoModelFor*.from_pretrained(final, trust_remote_code=True)`.

The loop reads as its steps: `set_up` (data, tokenizer, model, optimizer and scheduler through
`accelerator.prepare`, then the resume), `training_step`, `log_step`, `run_evaluation`, `checkpoint`, `finish`.

Resuming is exact on CPU: the model, optimizer, scheduler, RNG states and the position in the data (`Progress`)
are restored, reading only safetensors, JSON and `torch.load(weights_only=True)`; the data order depends only on
(seed, epoch); each optimizer step reseeds dropout and MLM masking from (seed, step, process), so the losses after
a resume equal those of an uninterrupted run. A run killed at any moment (SIGKILL included) resumes from its last
complete checkpoint.

A NaN or infinite loss or gradient norm stops the run before the update is applied, with the step and the value,
and exit status 3; no checkpoint or final folder of that state is written.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from course_transformer.commands.training_lib import (
    Batcher,
    NonFiniteError,
    Progress,
    TrainConfig,
    TrainData,
    append_metrics,
    check_finite,
    check_finite_parameters,
    checkpoint_dirs,
    corpus_bleu,
    load_checkpoint,
    load_config,
    lr_lambda,
    model_card,
    model_class,
    model_config,
    plot_losses,
    read_metrics,
    remove_checkpoints,
    remove_partial_checkpoints,
    remove_partial_writes,
    save_checkpoint,
    save_config,
    special_token_ids,
    text_columns,
    token_byte_lengths,
    token_losses,
    truncate_metrics,
)
from course_transformer.core.io import atomic_write_dir

NON_FINITE_EXIT_CODE = 3  # the loss or the gradients became NaN/inf (a usage error exits 2, as argparse does)


def resolve_mixed_precision(setting: str) -> str:
    """`auto`: bf16 on a GPU that has it, else fp16 on GPU; `no` on CPU (CPU autocast gains nothing here)."""
    if setting != "auto":
        if setting != "no" and not torch.cuda.is_available():
            raise ValueError(f"TrainConfig.mixed_precision={setting!r} is invalid: it needs a GPU; use 'no' on CPU")
        return setting
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def mfu_terms(model, config: TrainConfig, accelerator) -> tuple[int | None, float | None]:
    """(training FLOPs per token, the device's peak FLOP/s) for the MFU in the training log (`evaluation.flops`).

    FLOPs per token = 6 N + 12 L C T for the causal and masked LMs (one stack, context `block_size`); None for
    seq2seq, whose encoder, decoder and cross-attention the formula does not describe. The peak is the dense bf16
    peak of a known GPU and is used only when training in bf16: an fp32 run against a bf16 peak would say little."""
    from evaluation.flops import matmul_parameters, peak_bf16_flops, transformer_flops_per_token

    mc = model.config
    flops_per_token = None
    if config.objective != "seq2seq":
        layers = mc.num_decoder_layers if mc.architecture == "decoder" else mc.num_encoder_layers
        flops_per_token = transformer_flops_per_token(
            matmul_parameters(model), layers, mc.hidden_size, config.block_size
        )
    peak = None
    if accelerator.device.type == "cuda" and accelerator.mixed_precision == "bf16":
        peak = peak_bf16_flops(torch.cuda.get_device_name(accelerator.device))
    return flops_per_token, peak


# ---------------------------------------------------------------------------------------- data, tokenizer, model


def load_splits(config: TrainConfig):
    """The train and validation splits (limited to `max_*_examples`), refused in one line naming the split's folder
    when a split is missing or empty, lacks a text column or holds only blank text."""
    from course_transformer.commands.prepare_data import load_split

    splits = []
    for split, limit in (("train", config.max_train_examples), ("validation", config.max_eval_examples)):
        rows = load_split(config.dataset, split)
        rows = rows if limit is None else rows.select(range(min(limit, len(rows))))
        where = f"{Path(config.dataset) / split}: split {split!r}"
        for column in text_columns(config):
            if column not in rows.column_names:
                raise ValueError(f"{where} has no column {column!r} (it has {', '.join(rows.column_names)})")
            if not any(isinstance(text, str) and text.strip() for text in rows[column]):
                raise ValueError(f"{where} has {len(rows)} rows, every text in column {column!r} is blank")
        splits.append(rows)
    return tuple(splits)


def get_tokenizer(config: TrainConfig, train_rows, accelerator):
    """The configured tokenizer folder, or one trained on the train split (once, by the main process)."""
    from transformers import PreTrainedTokenizerFast

    from course_transformer.commands.train_tokenizer import train_tokenizer

    folder = Path(config.tokenizer) if config.tokenizer else Path(config.run_dir) / "tokenizer"
    if not config.tokenizer and accelerator.is_main_process and not (folder / "tokenizer.json").is_file():
        texts = [text for column in text_columns(config) for text in train_rows[column]]
        tokenizer = train_tokenizer(config.tokenizer_kind, texts, config.vocab_size)
        # a killed run leaves no half-written tokenizer behind
        atomic_write_dir(folder, lambda tmp: tokenizer.save_pretrained(str(tmp)), overwrite=True)
    accelerator.wait_for_everyone()
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def generation_config_for(config: TrainConfig, mc):
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=False,
        max_new_tokens=config.block_size if config.objective == "seq2seq" else (config.sample_max_new_tokens or 64),
        bos_token_id=mc.bos_token_id,
        eos_token_id=mc.eos_token_id,
        pad_token_id=mc.pad_token_id,
        decoder_start_token_id=mc.decoder_start_token_id if config.objective == "seq2seq" else None,
    )


def build_model(config: TrainConfig, tokenizer):
    """A freshly initialised head of the objective; the weights depend only on the seed."""
    mc = model_config(config, len(tokenizer), special_token_ids(tokenizer))
    torch.manual_seed(config.seed)
    model = model_class(config.objective)(mc)
    model.generation_config = generation_config_for(config, mc)
    return model


def learning_rate(config: TrainConfig) -> Callable[[int], float]:
    """The learning rate at optimizer step `step` (0-based): the configured peak times the schedule's multiplier."""
    multiplier = lr_lambda(config)
    return lambda step: config.learning_rate * multiplier(step)


def build_optimizer(model, config: TrainConfig):
    """AdamW with weight decay on matrices only (GPT-2/nanoGPT: not on biases and LayerNorm gains), and its schedule.

    The scheduler multiplies a base rate of 1.0 by `learning_rate(config)`, so its saved state is its step count and
    nothing of the config: what a checkpoint brings back is where the run is in the schedule, never an old peak."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    betas = (config.adam_beta1, config.adam_beta2)
    optimizer = torch.optim.AdamW(groups, lr=1.0, betas=betas, eps=config.adam_epsilon)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate(config))


def model_inputs(batch: dict, objective: str) -> dict:
    """The model's keyword arguments: seq2seq models take `labels` (to shift them into decoder inputs), LMs not."""
    return batch if objective == "seq2seq" else {k: v for k, v in batch.items() if k != "labels"}


# ------------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate(model, data: TrainData, config: TrainConfig, accelerator, byte_lengths: torch.Tensor) -> dict:
    """Validation loss (nats/token), perplexity, bits per byte (causal LM), BLEU (seq2seq) and samples."""
    model.eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    n = data.num_eval()
    batches = math.ceil(n / (config.batch_size * world))
    if config.eval_batches is not None:
        batches = min(batches, config.eval_batches)
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # nats, tokens, bytes
    for b in range(batches):
        start = (b * world + rank) * config.batch_size
        idx = list(range(start, min(start + config.batch_size, n)))
        if not idx:
            continue
        # Fixed masks (seed = batch number): every evaluation of a masked LM scores the same positions.
        batch = {k: v.to(accelerator.device) for k, v in data.batch(idx, "eval", mask_seed=b).items()}
        with accelerator.autocast():
            logits = model(**model_inputs(batch, config.objective)).logits
        _, nats, count, targets = token_losses(config.objective, logits, batch["labels"])
        valid = targets != -100
        nbytes = byte_lengths.to(targets.device)[targets.clamp(min=0)][valid].sum()
        totals += torch.stack([nats.double(), count.double(), nbytes.double()])
    nats, count, nbytes = accelerator.reduce(totals, reduction="sum").tolist()
    metrics = {"eval_loss": nats / max(count, 1), "eval_tokens": int(count)}
    metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    if config.objective == "causal_lm":
        # Bits per byte = total nats / ln 2 / UTF-8 bytes of the evaluated text: comparable across tokenizers.
        metrics["bits_per_byte"] = nats / math.log(2) / max(nbytes, 1)
    if accelerator.is_main_process:
        metrics.update(samples_and_bleu(accelerator.unwrap_model(model), data, config, accelerator))
    model.train()
    return metrics


def samples_and_bleu(model, data: TrainData, config: TrainConfig, accelerator) -> dict:
    """Greedy samples (causal LM), top-1 mask filling (masked LM), translations and BLEU (seq2seq)."""
    tok, device = data.tokenizer, accelerator.device
    with accelerator.autocast():
        if config.objective == "causal_lm" and config.sample_max_new_tokens:
            return {"samples": [greedy_sample(model, tok, prompt, config, device) for prompt in config.sample_prompts]}
        if config.objective == "masked_lm":
            return {"samples": [fill_masks(model, tok, prompt, device) for prompt in config.sample_prompts]}
        if config.objective == "seq2seq" and config.bleu_examples:
            return translations_and_bleu(model, data, config, device)
    return {}


def greedy_sample(model, tokenizer, prompt: str, config: TrainConfig, device) -> str:
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    ids = model.generate(**enc, max_new_tokens=config.sample_max_new_tokens, do_sample=False)
    return tokenizer.decode(ids[0], skip_special_tokens=True)


def fill_masks(model, tokenizer, prompt: str, device) -> str:
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    ids = enc["input_ids"].clone()
    where = ids == tokenizer.mask_token_id
    if where.any():
        ids[where] = model(**enc).logits.argmax(-1)[where]
    return tokenizer.decode(ids[0], skip_special_tokens=True)


def translations_and_bleu(model, data: TrainData, config: TrainConfig, device) -> dict:
    """Greedy translations of the first `bleu_examples` validation sources, their corpus BLEU and three samples."""
    tok = data.tokenizer
    sources = list(data.eval_rows[config.source_column][: config.bleu_examples])
    references = list(data.eval_rows[config.target_column][: config.bleu_examples])
    hypotheses = []
    for i in range(0, len(sources), config.batch_size):
        chunk = sources[i : i + config.batch_size]
        enc = tok(chunk, return_tensors="pt", padding=True, truncation=True, max_length=config.block_size).to(device)
        ids = model.generate(**enc, max_new_tokens=config.block_size, do_sample=False, num_beams=1)
        hypotheses += tok.batch_decode(ids, skip_special_tokens=True)
    samples = [f"{s} => {h}" for s, h in zip(sources[:3], hypotheses[:3])]
    bleu = corpus_bleu(hypotheses, references)
    return {"samples": samples} if bleu is None else {"bleu": bleu, "samples": samples}


def save_final(model, tokenizer, config: TrainConfig, accelerator) -> Path:
    """Unwrapped model (safetensors + code for remote loading) + tokenizer + model card, renamed into place."""
    final = Path(config.run_dir) / "final"
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # collective: gathers full tensors under FSDP
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)

        def write(tmp: Path) -> None:
            unwrapped.save_pretrained(str(tmp), state_dict=state_dict)
            tokenizer.save_pretrained(str(tmp))
            num_parameters = sum(p.numel() for p in unwrapped.parameters())
            metrics = read_metrics(Path(config.run_dir) / "metrics.jsonl")
            (tmp / "README.md").write_text(model_card(config, unwrapped.config, metrics, num_parameters, final))

        atomic_write_dir(final, write, overwrite=True)
    accelerator.wait_for_everyone()
    return final


# --------------------------------------------------------------------------------- the run: set-up, step, log


@dataclass
class Run:
    """What the steps of one run share: the prepared objects, the position in training, where it all goes."""

    config: TrainConfig
    accelerator: Any
    tokenizer: Any
    data: TrainData
    batcher: Batcher
    model: Any
    optimizer: Any
    scheduler: Any
    flops_per_token: int | None  # for the MFU (see `mfu_terms`)
    peak_flops: float | None
    byte_lengths: torch.Tensor  # UTF-8 bytes per token id, for bits per byte
    progress: Progress = field(default_factory=Progress)
    started: float = field(default_factory=time.time)

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def log(self, message: str) -> None:
        if self.accelerator.is_main_process:
            tqdm.write(message)

    def record(self, entry: dict) -> None:
        if self.accelerator.is_main_process:
            append_metrics(self.metrics_path, entry)


def start_accelerator(config: TrainConfig):
    """The `Accelerator`, the global seed, and the run folder with the resolved config in it."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # `step_scheduler_with_optimizer=False`: one scheduler step per optimizer step (accelerate would otherwise step
    # it once per process).
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(config.mixed_precision), step_scheduler_with_optimizer=False
    )
    set_seed(config.seed)
    if accelerator.is_main_process:
        Path(config.run_dir).mkdir(parents=True, exist_ok=True)
        save_config(config, Path(config.run_dir) / "train_config.yaml")
    return accelerator


def set_up(config: TrainConfig, resume: bool) -> Run:
    """Data, tokenizer, model, optimizer and scheduler (through `accelerator.prepare`, so that
    `save_state`/`load_state` carry them), then the resume or a clean start."""
    train_rows, eval_rows = load_splits(config)  # a missing, empty or blank split fails before anything is written
    accelerator = start_accelerator(config)
    tokenizer = get_tokenizer(config, train_rows, accelerator)
    data = TrainData(config, tokenizer, train_rows, eval_rows)
    model = build_model(config, tokenizer)
    optimizer, scheduler = build_optimizer(model, config)
    # before prepare, which wraps the model (and under FSDP flattens and shards the parameters)
    flops_per_token, peak_flops = mfu_terms(model, config, accelerator)
    num_parameters = sum(p.numel() for p in model.parameters())
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    world, rank = accelerator.num_processes, accelerator.process_index
    run = Run(
        config=config,
        accelerator=accelerator,
        tokenizer=tokenizer,
        data=data,
        batcher=Batcher(len(data), config.batch_size, config.seed, rank, world),
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        flops_per_token=flops_per_token,
        peak_flops=peak_flops,
        byte_lengths=token_byte_lengths(tokenizer),
    )
    run.log(
        f"{config.objective}: {num_parameters / 1e6:.2f} M parameters, {len(data)} training sequences, "
        f"{data.num_eval()} validation sequences, vocabulary {len(tokenizer)}, {world} process(es) on "
        f"{accelerator.device}, mixed precision {accelerator.mixed_precision}"
    )
    resume_or_start(run, resume)
    return run


def resume_or_start(run: Run, resume: bool) -> None:
    """Continue from the newest complete checkpoint (`--resume`), or start clean: no old checkpoints or metrics."""
    accelerator, run_dir = run.accelerator, run.run_dir
    if accelerator.is_main_process:
        remove_partial_writes(run_dir)
        for partial in remove_partial_checkpoints(run_dir):
            run.log(f"removed the incomplete checkpoint {partial} (an interrupted write)")
    accelerator.wait_for_everyone()
    checkpoints = checkpoint_dirs(run_dir)
    if resume and checkpoints:
        run.progress = load_checkpoint(accelerator, checkpoints[-1])
        run.log(f"resumed from {checkpoints[-1]} at step {run.progress.step}")
        use_the_configs_learning_rate(run)
        if accelerator.is_main_process:  # drop what the interrupted run logged after its last checkpoint
            truncate_metrics(run.metrics_path, run.progress.step)
        return
    if resume:
        run.log(f"--resume: no checkpoint in {run_dir / 'checkpoints'}, starting from scratch")
    if accelerator.is_main_process:
        run.metrics_path.unlink(missing_ok=True)
        remove_checkpoints(run_dir, keep_last=0)


def use_the_configs_learning_rate(run: Run) -> None:
    """The config is the source of truth for the learning rate (e.g. lowered after a non-finite loss). The scheduler
    state holds only the step, but the optimizer state brings back the rate that the checkpointed run had set for
    its next step: that step's rate is taken from the config's schedule instead."""
    rate = learning_rate(run.config)(run.progress.step)
    saved = run.optimizer.param_groups[0]["lr"]
    if saved != rate:
        run.log(f"learning rate {saved:.4g} in the checkpoint -> {rate:.4g} from the config")
    for group in run.optimizer.param_groups:
        group["lr"] = rate


@dataclass
class Step:
    """What one optimizer step reports."""

    loss: float  # mean over the micro-batches and the processes
    grad_norm: float | None  # before clipping; None without clipping
    positions: int  # input positions of this process
    seconds: float


def training_step(run: Run) -> Step:
    """One optimizer step over `gradient_accumulation_steps` micro-batches; refused before the update when the loss
    or the gradient norm is not finite, so that no checkpoint can contain it."""
    config, accelerator, progress = run.config, run.accelerator, run.progress
    # Dropout and MLM masks depend only on (seed, step, process): a resumed run draws the same ones.
    step_seed = config.seed * 1_000_003 + progress.step * 1009 + accelerator.process_index
    torch.manual_seed(step_seed)
    started = time.perf_counter()
    step_loss, positions = torch.zeros((), device=accelerator.device), 0
    for micro in range(config.gradient_accumulation_steps):
        last = micro == config.gradient_accumulation_steps - 1
        loss, micro_positions = micro_step(run, step_seed * 31 + micro, last)
        step_loss += loss / config.gradient_accumulation_steps
        positions += micro_positions
    grad_norm = None
    if config.max_grad_norm > 0:
        grad_norm = float(accelerator.clip_grad_norm_(run.model.parameters(), config.max_grad_norm))
    step_loss = accelerator.reduce(step_loss, reduction="mean").item()
    check_finite(progress.step + 1, step_loss, grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    progress.step += 1
    return Step(step_loss, grad_norm, positions, time.perf_counter() - started)


def micro_step(run: Run, mask_seed: int, last: bool) -> tuple[torch.Tensor, int]:
    """Forward and backward of the next micro-batch; returns its (detached) loss and its number of input positions."""
    config, accelerator, progress = run.config, run.accelerator, run.progress
    batch = run.data.batch(run.batcher.indices(progress.micro_step), "train", mask_seed=mask_seed)
    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
    inputs = model_inputs(batch, config.objective)
    # Gradients are all-reduced once per optimizer step, on the last micro-batch.
    with contextlib.nullcontext() if last else accelerator.no_sync(run.model):
        with accelerator.autocast():
            logits = run.model(**inputs).logits
        loss, _, count, _ = token_losses(config.objective, logits, batch["labels"], config.label_smoothing)
        accelerator.backward(loss / config.gradient_accumulation_steps)
    progress.micro_step += 1
    progress.tokens += int(count) * accelerator.num_processes
    return loss.detach(), sum(v.numel() for k, v in inputs.items() if k.endswith("input_ids"))


@dataclass
class Window:
    """The steps since the last "train" entry of metrics.jsonl. Throughput counts the input positions of every
    process per second spent in training steps (not in evaluations and checkpoints; the loss's .item()
    synchronises each step on GPU)."""

    loss: float = 0.0  # summed over the steps
    steps: int = 0
    positions: int = 0  # of this process
    seconds: float = 0.0
    shown: dict = field(default_factory=dict)  # the throughput in the progress bar, until the next window closes

    def add(self, step: Step) -> None:
        self.loss, self.steps = self.loss + step.loss, self.steps + 1
        self.positions, self.seconds = self.positions + step.positions, self.seconds + step.seconds

    def throughput(self, run: Run) -> tuple[float, float | None]:
        """(tokens/s of all processes, MFU per device or None): the FLOP/s of all processes over the peak of one
        device times their number."""
        world = run.accelerator.num_processes
        tokens_per_s = self.positions * world / max(self.seconds, 1e-9)
        mfu = None
        if run.peak_flops and run.flops_per_token:
            mfu = run.flops_per_token * tokens_per_s / (run.peak_flops * world)
        self.shown = {"tok_s": f"{tokens_per_s:.0f}", **({"mfu": f"{mfu:.1%}"} if mfu is not None else {})}
        return tokens_per_s, mfu


def log_step(run: Run, window: Window, bar, step: Step) -> None:
    """The progress bar after every step; every `log_every` steps (and at the last), one "train" entry."""
    config, progress = run.config, run.progress
    window.add(step)
    closing = progress.step % max(config.log_every, 1) == 0 or progress.step == config.max_steps
    tokens_per_s, mfu = window.throughput(run) if closing else (None, None)
    lr = run.scheduler.get_last_lr()[0]
    bar.update(1)
    bar.set_postfix(loss=f"{step.loss:.3f}", lr=f"{lr:.2e}", **window.shown)
    if not closing:
        return
    run.record(
        {
            "kind": "train",
            "step": progress.step,
            "loss": window.loss / window.steps,
            "step_loss": step.loss,
            "lr": lr,
            "grad_norm": step.grad_norm,
            "epoch": run.batcher.epoch_of(progress.micro_step - 1),
            "tokens": progress.tokens,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu,
            "elapsed_s": round(time.time() - run.started, 2),
        }
    )
    window.loss, window.steps, window.positions, window.seconds = 0.0, 0, 0, 0.0


# ----------------------------------------------------------------------------------- evaluation, checkpoint, end


def run_evaluation(run: Run) -> dict:
    """`evaluate`, one "eval" entry of metrics.jsonl, and the figures and samples in the log."""
    metrics = evaluate(run.model, run.data, run.config, run.accelerator, run.byte_lengths)
    entry = {"kind": "eval", "step": run.progress.step, **metrics}
    run.record(entry)
    shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
    run.log(f"step {run.progress.step}: {shown}")
    for sample in metrics.get("samples", []):
        run.log(f"  sample: {sample!r}")
    return entry


def checkpoint(run: Run) -> None:
    """A resumable checkpoint of the current step, written only when every parameter is finite."""
    check_finite_parameters(run.model, run.progress.step, run.accelerator)
    save_checkpoint(run.accelerator, run.run_dir, run.progress, run.config.keep_last)


def stopped(run: Run, error: NonFiniteError) -> NonFiniteError:
    """The error that ends a run on a non-finite value: the step, the value and the last good checkpoint."""
    good = checkpoint_dirs(run.run_dir)
    last = f"the last good checkpoint is {good[-1]}" if good else "there is no checkpoint yet"
    run.accelerator.end_training()
    return NonFiniteError(
        f"training stopped: {error}. Nothing was saved from this state; {last}. Lower learning_rate (or look at the "
        f"data of that step) and --resume, or start again."
    )


def finish(run: Run) -> dict:
    """The final folder and the loss plot; returns the paths, the first and last evaluation and the throughput."""
    final = save_final(run.model, run.tokenizer, run.config, run.accelerator)
    metrics = read_metrics(run.metrics_path) if run.accelerator.is_main_process else []
    if run.accelerator.is_main_process:
        plot_losses(metrics, run.run_dir / "loss.png")
    evals = [m for m in metrics if m.get("kind") == "eval"]
    train_entries = [m for m in metrics if m.get("kind") == "train"]
    windows = [m["tokens_per_s"] for m in train_entries if m.get("tokens_per_s")]
    # The median over logging windows: the first window carries the warm-up (allocator, kernel selection, compile).
    tokens_per_s = statistics.median(windows) if windows else None
    mfus = [m["mfu"] for m in train_entries if m.get("mfu") is not None]
    if tokens_per_s:
        mfu = f", MFU {statistics.median(mfus):.1%}" if mfus else ""
        run.log(f"throughput: {tokens_per_s:,.0f} tokens/s (median of {len(windows)} logging windows){mfu}")
    run.log(f"final model: {final}  metrics: {run.metrics_path}  loss curve: {run.run_dir / 'loss.png'}")
    run.accelerator.end_training()
    return {
        "run_dir": run.run_dir,
        "final": final,
        "metrics": run.metrics_path,
        "first_eval": evals[0] if evals else None,
        "last_eval": evals[-1] if evals else None,
        "train_losses": [m["step_loss"] for m in train_entries],
        "tokens_per_s": tokens_per_s,
        "mfu": statistics.median(mfus) if mfus else None,
        "elapsed_s": time.time() - run.started,
    }


def every(interval: int, step: int) -> bool:
    return bool(interval) and step % interval == 0


def train(config: TrainConfig, resume: bool = False) -> dict:
    """Run (or continue) training; returns the paths and the first and last evaluation."""
    config.validate()  # also for configs built in Python: fail before any data or model is touched
    run = set_up(config, resume)
    if run.progress.step == 0 and config.eval_at_start:
        run_evaluation(run)
    stop = min(config.max_steps, config.stop_at_step or config.max_steps)
    quiet = not run.accelerator.is_local_main_process
    bar = tqdm(total=config.max_steps, initial=run.progress.step, disable=quiet, desc="train")
    window = Window()
    run.model.train()
    try:
        while run.progress.step < stop:
            log_step(run, window, bar, training_step(run))
            if every(config.eval_every, run.progress.step) or run.progress.step == stop:
                run_evaluation(run)
            if every(config.save_every, run.progress.step) or run.progress.step == stop:
                checkpoint(run)
        bar.close()
        check_finite_parameters(run.model, run.progress.step, run.accelerator)  # nothing non-finite is saved
    except NonFiniteError as error:
        raise stopped(run, error) from None
    finally:
        bar.close()
    return finish(run)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file of TrainConfig fields (configs/train/*.yaml)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a field (repeatable)"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint of run_dir")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.set)  # fails fast, before any data or model is built
    try:
        return train(config, resume=args.resume)
    except NonFiniteError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(NON_FINITE_EXIT_CODE) from None


if __name__ == "__main__":
    main()
