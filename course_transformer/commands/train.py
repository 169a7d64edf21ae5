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
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from course_transformer.commands.training_lib import (
    Batcher,
    NonFiniteError,
    Progress,
    TrainConfig,
    TrainData,
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
    remove_partial_checkpoints,
    replace_dir,
    save_checkpoint,
    save_config,
    special_token_ids,
    token_byte_lengths,
    token_losses,
)

NON_FINITE_EXIT_CODE = (
    3  # the loss or the gradients became NaN/inf (course_transformer/commands/train.py exits 2 on a usage error)
)


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


def load_splits(config: TrainConfig):
    from datasets import disable_progress_bars, load_from_disk

    disable_progress_bars()
    dsd = load_from_disk(config.dataset)
    for split in ("train", "validation"):
        if split not in dsd:
            raise ValueError(f"TrainConfig.dataset={config.dataset!r} is invalid: it has no {split!r} split")
    train, valid = dsd["train"], dsd["validation"]
    if config.max_train_examples is not None:
        train = train.select(range(min(config.max_train_examples, len(train))))
    if config.max_eval_examples is not None:
        valid = valid.select(range(min(config.max_eval_examples, len(valid))))
    columns = [config.text_column] if config.objective != "seq2seq" else [config.source_column, config.target_column]
    for column in columns:
        if column not in train.column_names:
            raise ValueError(f"column {column!r} not in {config.dataset} (columns: {', '.join(train.column_names)})")
    return train, valid


def get_tokenizer(config: TrainConfig, train_rows, accelerator):
    """The configured tokenizer folder, or one trained on the train split (once, by the main process)."""
    from transformers import PreTrainedTokenizerFast

    from course_transformer.commands.train_tokenizer import train_tokenizer

    folder = Path(config.tokenizer) if config.tokenizer else Path(config.run_dir) / "tokenizer"
    if not config.tokenizer and accelerator.is_main_process and not (folder / "tokenizer.json").is_file():
        columns = (
            [config.text_column] if config.objective != "seq2seq" else [config.source_column, config.target_column]
        )
        texts = [text for column in columns for text in train_rows[column]]
        tmp = folder.with_name(f".tmp-{folder.name}")  # a killed run leaves no half-written tokenizer behind
        shutil.rmtree(tmp, ignore_errors=True)
        train_tokenizer(config.tokenizer_kind, texts, config.vocab_size).save_pretrained(str(tmp))
        replace_dir(tmp, folder)
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
        labels = batch["labels"]
        inputs = batch if config.objective == "seq2seq" else {k: v for k, v in batch.items() if k != "labels"}
        with accelerator.autocast():
            logits = model(**inputs).logits
        _, nats, count, targets = token_losses(config.objective, logits, labels)
        valid = targets != -100
        nbytes = byte_lengths.to(targets.device)[targets.clamp(min=0)][valid].sum()
        totals += torch.stack([nats.double(), count.double(), nbytes.double()])
    totals = accelerator.reduce(totals, reduction="sum")
    nats, count, nbytes = totals.tolist()
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
    tok, device, out = data.tokenizer, accelerator.device, {}
    with accelerator.autocast():
        if config.objective == "causal_lm" and config.sample_max_new_tokens:
            samples = []
            for prompt in config.sample_prompts:
                enc = tok(prompt, return_tensors="pt").to(device)
                ids = model.generate(**enc, max_new_tokens=config.sample_max_new_tokens, do_sample=False)
                samples.append(tok.decode(ids[0], skip_special_tokens=True))
            out["samples"] = samples
        elif config.objective == "masked_lm":
            samples = []
            for prompt in config.sample_prompts:
                enc = tok(prompt, return_tensors="pt").to(device)
                ids = enc["input_ids"].clone()
                where = ids == tok.mask_token_id
                if where.any():
                    ids[where] = model(**enc).logits.argmax(-1)[where]
                samples.append(tok.decode(ids[0], skip_special_tokens=True))
            out["samples"] = samples
        elif config.objective == "seq2seq" and config.bleu_examples:
            sources = list(data.eval_rows[config.source_column][: config.bleu_examples])
            references = list(data.eval_rows[config.target_column][: config.bleu_examples])
            hypotheses = []
            for i in range(0, len(sources), config.batch_size):
                enc = tok(
                    sources[i : i + config.batch_size],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=config.block_size,
                ).to(device)
                ids = model.generate(**enc, max_new_tokens=config.block_size, do_sample=False, num_beams=1)
                hypotheses += tok.batch_decode(ids, skip_special_tokens=True)
            bleu = corpus_bleu(hypotheses, references)
            if bleu is not None:
                out["bleu"] = bleu
            out["samples"] = [f"{s} => {h}" for s, h in zip(sources[:3], hypotheses[:3])]
    return out


def save_final(model, tokenizer, config: TrainConfig, accelerator, metrics_path: Path) -> Path:
    """Unwrapped model (safetensors + code for remote loading) + tokenizer + model card, renamed into place."""
    final = Path(config.run_dir) / "final"
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # collective: gathers full tensors under FSDP
    if accelerator.is_main_process:
        tmp = Path(config.run_dir) / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(str(tmp), state_dict=state_dict)
        tokenizer.save_pretrained(str(tmp))
        num_parameters = sum(p.numel() for p in unwrapped.parameters())
        card = model_card(config, unwrapped.config, read_metrics(metrics_path), num_parameters, final)
        (tmp / "README.md").write_text(card)
        replace_dir(tmp, final)
    accelerator.wait_for_everyone()
    return final


def train(config: TrainConfig, resume: bool = False) -> dict:
    """Run (or continue) training; returns the paths and the first and last evaluation."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    config.validate()  # also for configs built in Python: fail before any data or model is touched
    # The scheduler goes through `prepare` so that `save_state`/`load_state` handle it (as a state dict of numbers,
    # read back with weights_only=True); `step_scheduler_with_optimizer=False` keeps it at one step per optimizer
    # step (accelerate would otherwise step it once per process).
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(config.mixed_precision), step_scheduler_with_optimizer=False
    )
    set_seed(config.seed)
    run_dir = Path(config.run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "train_config.yaml")

    def log(message: str) -> None:
        if accelerator.is_main_process:
            tqdm.write(message)

    def record(entry: dict) -> None:
        if accelerator.is_main_process:
            with metrics_path.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    train_rows, eval_rows = load_splits(config)
    tokenizer = get_tokenizer(config, train_rows, accelerator)
    data = TrainData(config, tokenizer, train_rows, eval_rows)
    mc = model_config(config, len(tokenizer), special_token_ids(tokenizer))
    torch.manual_seed(config.seed)
    model = model_class(config.objective)(mc)
    model.generation_config = generation_config_for(config, mc)
    num_parameters = sum(p.numel() for p in model.parameters())
    log(
        f"{config.objective}: {num_parameters / 1e6:.2f} M parameters, {len(data)} training sequences, "
        f"{data.num_eval()} validation sequences, vocabulary {len(tokenizer)}, "
        f"{accelerator.num_processes} process(es) on {accelerator.device}, "
        f"mixed precision {accelerator.mixed_precision}"
    )

    # Weight decay on matrices only (GPT-2/nanoGPT): not on biases and LayerNorm gains.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(
        groups, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    flops_per_token, peak = mfu_terms(model, config, accelerator)  # before prepare: FSDP flattens the parameters
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    progress = Progress()

    if accelerator.is_main_process:
        for partial in remove_partial_checkpoints(run_dir):
            log(f"removed the incomplete checkpoint {partial} (an interrupted write)")
    accelerator.wait_for_everyone()
    checkpoints = checkpoint_dirs(run_dir)
    if resume and checkpoints:
        progress = load_checkpoint(accelerator, checkpoints[-1])
        log(f"resumed from {checkpoints[-1]} at step {progress.step}")
        base_lrs = scheduler.scheduler.base_lrs
        if any(lr != config.learning_rate for lr in base_lrs):
            # The config is the source of truth: e.g. a lower learning rate after a non-finite loss. The loaded
            # scheduler state would otherwise bring the old peak back.
            log(f"learning_rate {base_lrs[0]} in the checkpoint -> {config.learning_rate} from the config")
            scheduler.scheduler.base_lrs = [config.learning_rate] * len(base_lrs)
            factor = lr_lambda(config)(scheduler.scheduler.last_epoch)
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate * factor
        if accelerator.is_main_process:  # drop what the interrupted run logged after its last checkpoint
            kept = [m for m in read_metrics(metrics_path) if m["step"] <= progress.step]
            metrics_path.write_text("".join(json.dumps(m) + "\n" for m in kept))
    else:
        if resume:
            log(f"--resume: no checkpoint in {run_dir / 'checkpoints'}, starting from scratch")
        if accelerator.is_main_process:
            metrics_path.unlink(missing_ok=True)
            for old in checkpoints:
                shutil.rmtree(old)

    batcher = Batcher(len(data), config.batch_size, config.seed, accelerator.process_index, accelerator.num_processes)
    byte_lengths = token_byte_lengths(tokenizer)
    smoothing = config.label_smoothing
    start_time = time.time()

    def run_eval() -> dict:
        metrics = evaluate(model, data, config, accelerator, byte_lengths)
        entry = {"kind": "eval", "step": progress.step, **metrics}
        record(entry)
        shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
        log(f"step {progress.step}: {shown}")
        for sample in metrics.get("samples", []):
            log(f"  sample: {sample!r}")
        return entry

    def stop_if_not_finite(check, *args) -> None:
        """Run `check(*args)`; on a non-finite value stop the run, naming the step, the value, the last checkpoint."""
        try:
            check(*args)
        except NonFiniteError as error:
            bar.close()
            good = checkpoint_dirs(run_dir)
            last = f"the last good checkpoint is {good[-1]}" if good else "there is no checkpoint yet"
            message = (
                f"training stopped: {error}. Nothing was saved from this state; {last}. Lower learning_rate (or "
                f"look at the data of that step) and --resume, or start again."
            )
            accelerator.end_training()
            raise NonFiniteError(message) from None

    if progress.step == 0 and config.eval_at_start:
        run_eval()

    model.train()
    bar = tqdm(
        total=config.max_steps, initial=progress.step, disable=not accelerator.is_local_main_process, desc="train"
    )
    window_loss, window_steps = 0.0, 0
    # Throughput over each logging window: input positions of every process per second spent in training steps
    # (evaluations and checkpoints are not counted; the loss's .item() synchronises each step on GPU).
    window_positions, window_time, throughput = 0, 0.0, {}
    stop = min(config.max_steps, config.stop_at_step or config.max_steps)
    while progress.step < stop:
        # Dropout and MLM masks depend only on (seed, step, process): a resumed run draws the same ones.
        step_seed = config.seed * 1_000_003 + progress.step * 1009 + accelerator.process_index
        torch.manual_seed(step_seed)
        step_started = time.perf_counter()
        step_loss = torch.zeros((), device=accelerator.device)
        for micro in range(config.gradient_accumulation_steps):
            indices = batcher.indices(progress.micro_step)
            batch = data.batch(indices, "train", mask_seed=step_seed * 31 + micro)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            labels = batch["labels"]
            inputs = batch if config.objective == "seq2seq" else {k: v for k, v in batch.items() if k != "labels"}
            last = micro == config.gradient_accumulation_steps - 1
            # Gradients are all-reduced once per optimizer step, on the last micro-batch.
            sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
            with sync:
                with accelerator.autocast():
                    logits = model(**inputs).logits
                loss, _, count, _ = token_losses(config.objective, logits, labels, smoothing)
                accelerator.backward(loss / config.gradient_accumulation_steps)
            step_loss += loss.detach() / config.gradient_accumulation_steps
            window_positions += sum(v.numel() for k, v in inputs.items() if k.endswith("input_ids"))
            progress.micro_step += 1
            progress.tokens += int(count) * accelerator.num_processes
        grad_norm = None
        if config.max_grad_norm > 0:
            grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm))
        step_loss = accelerator.reduce(step_loss, reduction="mean").item()
        # Before the update: a NaN/inf loss or gradient is never applied, so no checkpoint can contain it.
        stop_if_not_finite(check_finite, progress.step + 1, step_loss, grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.step += 1
        window_time += time.perf_counter() - step_started

        window_loss, window_steps = window_loss + step_loss, window_steps + 1
        logging_step = progress.step % max(config.log_every, 1) == 0 or progress.step == config.max_steps
        if logging_step:
            tokens_per_s = window_positions * accelerator.num_processes / max(window_time, 1e-9)
            mfu = None  # per device: the FLOP/s of all processes over the peak of one device times their number
            if peak and flops_per_token:
                mfu = flops_per_token * tokens_per_s / (peak * accelerator.num_processes)
            throughput = {"tok_s": f"{tokens_per_s:.0f}", **({"mfu": f"{mfu:.1%}"} if mfu is not None else {})}
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", **throughput)
        if logging_step:
            record(
                {
                    "kind": "train",
                    "step": progress.step,
                    "loss": window_loss / window_steps,
                    "step_loss": step_loss,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "epoch": batcher.epoch_of(progress.micro_step - 1),
                    "tokens": progress.tokens,
                    "tokens_per_s": tokens_per_s,
                    "mfu": mfu,
                    "elapsed_s": round(time.time() - start_time, 2),
                }
            )
            window_loss, window_steps = 0.0, 0
            window_positions, window_time = 0, 0.0
        done = progress.step == stop
        if (config.eval_every and progress.step % config.eval_every == 0) or done:
            run_eval()
        if (config.save_every and progress.step % config.save_every == 0) or done:
            stop_if_not_finite(check_finite_parameters, model, progress.step, accelerator)
            save_checkpoint(accelerator, run_dir, progress, config.keep_last)
    bar.close()

    stop_if_not_finite(check_finite_parameters, model, progress.step, accelerator)
    final = save_final(model, tokenizer, config, accelerator, metrics_path)
    metrics = read_metrics(metrics_path) if accelerator.is_main_process else []
    if accelerator.is_main_process:
        plot_losses(metrics, run_dir / "loss.png")
    evals = [m for m in metrics if m.get("kind") == "eval"]
    windows = [m["tokens_per_s"] for m in metrics if m.get("kind") == "train" and m.get("tokens_per_s")]
    # The median over logging windows: the first window carries the warm-up (allocator, kernel selection, compile).
    tokens_per_s = statistics.median(windows) if windows else None
    mfus = [m["mfu"] for m in metrics if m.get("kind") == "train" and m.get("mfu") is not None]
    if tokens_per_s:
        log(
            f"throughput: {tokens_per_s:,.0f} tokens/s (median of {len(windows)} logging windows)"
            + (f", MFU {statistics.median(mfus):.1%}" if mfus else "")
        )
    log(f"final model: {final}  metrics: {metrics_path}  loss curve: {run_dir / 'loss.png'}")
    accelerator.end_training()
    return {
        "run_dir": run_dir,
        "final": final,
        "metrics": metrics_path,
        "first_eval": evals[0] if evals else None,
        "last_eval": evals[-1] if evals else None,
        "train_losses": [m["step_loss"] for m in metrics if m.get("kind") == "train"],
        "tokens_per_s": tokens_per_s,
        "mfu": statistics.median(mfus) if mfus else None,
        "elapsed_s": time.time() - start_time,
    }


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
