"""Language-model quality of any causal or masked LM, each with its own tokenizer, on the same raw texts.

Causal LMs (ours, a converted GPT-2, Llama-architecture models such as SmolLM2) are scored by next-token
prediction over the texts joined into one token stream:

    stream = s d_1 s d_2 ... s d_N        s = the separator token(s), d_i = the tokens of text i

Every token of every d_i is predicted once; the separators are context only (never scored), so every model
predicts exactly the same characters whatever its end-of-document convention. `separator="auto"` is the EOS
token for models of ours (how course_transformer/commands/train.py joins texts) and a newline for other models
(`separator_ids`).
The totals are

    nats   = -sum_t ln p(x_t | x_<t)                over the scored tokens (natural log, summed in float64)
    loss   = nats / tokens                          mean nats per token of *this* tokenizer
    perplexity    = exp(loss)                       per token: depends on the tokenizer
    bits_per_byte = nats / ln 2 / bytes             bytes = UTF-8 bytes of the texts themselves

Only bits per byte compares models with different tokenizers: it is the code length of the same bytes. The
bytes are counted on the raw texts (not from the tokens), so the figure is exact for any tokenizer; the report
states the fraction of texts the tokenizer decodes back exactly (`round_trip`), because a lossy tokenizer (one
that lowercases, or maps characters to [UNK]) encodes a simpler text than the bytes counted.

Context. The stream is cut into windows of at most `context_length` tokens that start every `stride` tokens
(the sliding window of the Hugging Face perplexity guide). Window k reads x[kS : kS + L] and scores the targets
that no earlier window scored, so each target is predicted exactly once, with at least L - S + 1 tokens of
context once the stream is longer than L. stride = context_length is the blocked evaluation: no overlap, and
the first token of each block is *not* dropped: it is the target of the previous block's last position (the
input stops one token before the block's last target), so it is predicted with L tokens of context, while the
second token of a block has one. No text token is left out.

Masked LMs have no left-to-right likelihood. Two measures, chosen by `method`:

* `"masked"` (default): in each text, round(15%) of the non-special tokens (at least one), chosen by a
  `torch.Generator` seeded with `seed`, are all replaced by the mask token and predicted; reported as
  `mlm_loss` (nats per masked token) and `mlm_perplexity`. Cheap (one forward pass per text) and
  reproducible, but not a likelihood of the text: no bits per byte.
* `"pseudo"`: the pseudo-log-likelihood of Salazar et al. (2020): every non-special token is masked in turn,
  one forward pass per token, summed: `pseudo_loss`, `pseudo_perplexity`, `pseudo_bits_per_byte`. Refused above
  `max_pseudo_tokens` scored tokens (default 4,096): it is meant for small text sets.

Texts longer than the context of a masked LM are truncated (their count is reported; pseudo bits per byte is then
omitted, since not all bytes were scored).

>>> from evaluation.lm_quality import load_lm, lm_quality
>>> model, tokenizer, label = load_lm("runs/demo/final")
>>> lm_quality(model, tokenizer, ["In the beginning God created the heaven and the earth."])["metrics"]
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

LN2 = math.log(2)
REFERENCE_NAMES = ("smollm2",)  # named models loadable without a folder (see evaluation.analysis.load_named_model)
MLM_METHODS = ("masked", "pseudo")
DEFAULT_CONTEXT = 1024  # when the model states no maximum (or a larger one)
MAX_PSEUDO_TOKENS = 4096


# --------------------------------------------------------------------------------------------------------------
# The bits-per-byte primitive (shared with training: one implementation)
# --------------------------------------------------------------------------------------------------------------


def utf8_bytes(texts: Iterable[str]) -> int:
    """Total UTF-8 bytes of `texts`: the denominator of bits per byte, independent of any tokenizer."""
    return sum(len(text.encode("utf-8")) for text in texts)


def bits_per_byte(nats: float, num_bytes: int) -> float:
    """Code length in bits per UTF-8 byte: total nats / ln 2 / bytes (`nan` when there are no bytes)."""
    return nats / LN2 / num_bytes if num_bytes > 0 else math.nan


def _perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # exp overflows float64 above ~709.8


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


def lm_kind(model) -> str:
    """ "causal" or "masked" from the model class (ours and Hugging Face's follow the same naming)."""
    name = type(model).__name__
    if "CausalLM" in name or "LMHead" in name:
        return "causal"
    if "MaskedLM" in name:
        return "masked"
    raise ValueError(f"model class {name} has no language-model head: allowed are causal LMs and masked LMs")


def folder_lm_kind(folder: str | Path) -> str | None:
    """ "causal", "masked" or None (no LM head, or not a model) from a saved folder's config.json alone."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(config, dict):
        return None
    architectures = config.get("architectures") or []
    if any("CausalLM" in a or "LMHead" in a for a in architectures):
        return "causal"
    if any("MaskedLM" in a for a in architectures):
        return "masked"
    return None


def load_lm(name: str):
    """(model, tokenizer, label) for a name in REFERENCE_NAMES or a saved causal / masked LM folder, eval mode.

    Named models and causal folders go through `evaluation.analysis.load_named_model` (ours with its own classes,
    SmolLM2 from its GGUF file, other folders with `AutoModelForCausalLM`); masked-LM folders not of ours load with
    `AutoModelForMaskedLM` (the analysis loader gives their bare encoder, which has no head to score with)."""
    import modeling  # noqa: F401  (registers course_transformer with the Auto classes: no remote-code prompt)
    from evaluation.analysis import load_named_model

    if name in REFERENCE_NAMES:
        return load_named_model(name)
    folder = Path(name)
    config = json.loads((folder / "config.json").read_text())
    if folder_lm_kind(folder) == "masked" and config.get("model_type") != "course_transformer":
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        model = AutoModelForMaskedLM.from_pretrained(folder, attn_implementation="eager").eval()
        return model, AutoTokenizer.from_pretrained(folder), str(name)
    model, tokenizer, _ = load_named_model(str(folder))
    return model, tokenizer, str(name)


def max_context(model) -> int | None:
    """The longest input the model accepts by its config (learned positions), or None when it states none."""
    value = getattr(model.config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def resolve_context(model, context_length: int | None) -> int:
    """`context_length`, or the model's maximum (at most DEFAULT_CONTEXT) when None; refused above the maximum."""
    limit = max_context(model)
    if context_length is None:
        return min(limit or DEFAULT_CONTEXT, DEFAULT_CONTEXT)
    if context_length < 2:
        raise ValueError(f"context_length={context_length} is invalid: at least 2 tokens")
    if limit is not None and context_length > limit:
        raise ValueError(
            f"context_length={context_length} is invalid: {type(model).__name__} accepts at most {limit} positions"
        )
    return context_length


def _num_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def round_trip(tokenizer, texts: Sequence[str], ids: Sequence[Sequence[int]]) -> float:
    """Fraction of texts that the tokenizer decodes back to exactly the same string."""
    same = sum(tokenizer.decode(list(i), clean_up_tokenization_spaces=False) == t for t, i in zip(texts, ids))
    return same / max(len(texts), 1)


# --------------------------------------------------------------------------------------------------------------
# Causal LMs: the token stream and its windows
# --------------------------------------------------------------------------------------------------------------


def separator_ids(model, tokenizer, separator: str = "auto") -> tuple[list[int], str]:
    """The token ids put before every text (context only, never scored) and the string they stand for.

    "auto": for models of ours, the EOS token, which is what the train command puts between texts (`lm_blocks`);
    for any other model a newline, so that the texts read as the lines of one document, the form pretrained LMs
    saw most (their own end-of-document token tells them to drop the context: SmolLM2 loses 0.17 bits per byte
    with `<|endoftext|>` between verses, docs/evaluation.md). Any other string is encoded as text, special
    tokens included (e.g. "<|endoftext|>")."""
    if separator == "auto":
        if getattr(model.config, "model_type", None) == "course_transformer":
            token = tokenizer.eos_token or tokenizer.bos_token
            if token is None:
                raise ValueError(
                    "separator='auto' is invalid for this model: its tokenizer has no EOS or BOS token; "
                    "pass a separator string such as '\\n'"
                )
            return [tokenizer.convert_tokens_to_ids(token)], token
        separator = "\n"
    ids = tokenizer(separator, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"separator={separator!r} is invalid: the tokenizer encodes it as no token")
    return list(ids), separator


def document_stream(
    model, tokenizer, texts: Sequence[str], separator: str = "auto"
) -> tuple[list[int], list[bool], dict]:
    """(ids, scored, info): `s d_1 s d_2 ... s d_N` and, per position, whether it is a scored text token."""
    sep, sep_text = separator_ids(model, tokenizer, separator)
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    scored: list[bool] = []
    for doc in encoded:
        ids += sep + list(doc)
        scored += [False] * len(sep) + [True] * len(doc)
    info = {"separator": sep_text, "separator_ids": sep, "round_trip": round_trip(tokenizer, texts, encoded)}
    return ids, scored, info


@dataclass(frozen=True)
class Window:
    begin: int  # input = stream[begin:end], targets = stream[begin + 1 : end + 1]
    end: int
    first: int  # the first target position this window scores (the earlier ones were scored before)


def sliding_windows(length: int, context_length: int, stride: int) -> list[Window]:
    """Windows over a stream of `length` tokens that predict every position 1..length-1 exactly once.

    Window k reads positions [kS, min(kS + L, length - 1)) and scores targets first..end (inclusive of the
    last input position's prediction, target index `end`); targets up to the previous window's end are skipped.
    """
    if not 1 <= stride <= context_length:
        raise ValueError(f"stride={stride} is invalid: allowed 1 <= stride <= context_length={context_length}")
    windows, covered, begin = [], 0, 0  # `covered`: targets 1..covered are scored
    while covered < length - 1:
        end = min(begin + context_length, length - 1)
        windows.append(Window(begin, end, covered + 1))
        covered, begin = end, begin + stride
    return windows


@torch.no_grad()
def causal_lm_quality(
    model,
    tokenizer,
    texts: Sequence[str],
    context_length: int | None = None,
    stride: int | None = None,
    separator: str = "auto",
    batch_size: int = 8,
    progress: bool = True,
    label: str = "model",
) -> dict:
    """Nats, tokens, bytes -> loss, perplexity and bits per byte of a causal LM (module docstring)."""
    started = time.perf_counter()
    context_length = resolve_context(model, context_length)
    stride = context_length // 2 if stride is None else stride
    ids, scored, info = document_stream(model, tokenizer, texts, separator)
    windows = sliding_windows(len(ids), context_length, stride)
    stream = torch.tensor(ids, dtype=torch.long)
    is_scored = torch.tensor(scored, dtype=torch.bool)
    device = next(model.parameters()).device
    nats = torch.zeros((), dtype=torch.float64)
    tokens = 0
    bar = tqdm(total=len(windows), desc=f"{label}: windows", unit="win", disable=not progress, leave=False)
    # Consecutive windows of one length share a batch (all are full-length but the last few).
    start = 0
    while start < len(windows):
        size = windows[start].end - windows[start].begin
        group = [windows[start]]
        while len(group) < batch_size and start + len(group) < len(windows):
            nxt = windows[start + len(group)]
            if nxt.end - nxt.begin != size:
                break
            group.append(nxt)
        inputs = torch.stack([stream[w.begin : w.end] for w in group]).to(device)  # (B, T)
        targets = torch.stack([stream[w.begin + 1 : w.end + 1] for w in group])  # (B, T)
        positions = torch.stack([torch.arange(w.begin + 1, w.end + 1) for w in group])  # (B, T) target indices
        first = torch.tensor([w.first for w in group])[:, None]  # (B, 1)
        keep = (positions >= first) & is_scored[positions]  # (B, T): new, text (not separator) targets
        logits = model(input_ids=inputs).logits  # (B, T, V)
        losses = F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten(), reduction="none").view_as(
            targets
        )  # (B, T) nats
        nats += losses.cpu().double()[keep].sum()
        tokens += int(keep.sum())
        start += len(group)
        bar.update(len(group))
    bar.close()
    num_bytes = utf8_bytes(texts)
    total = float(nats)
    loss = total / max(tokens, 1)
    return {
        "model": label,
        "model_class": type(model).__name__,
        "num_parameters": _num_parameters(model),
        "objective": "causal_lm",
        "method": f"sliding window: context {context_length}, stride {stride}",
        "context_length": context_length,
        "stride": stride,
        "windows": len(windows),
        "num_texts": len(texts),
        "nats": total,
        "tokens": tokens,
        "bytes": num_bytes,
        "bytes_per_token": num_bytes / max(tokens, 1),
        "separator": info["separator"],
        "round_trip": info["round_trip"],
        "metrics": {"loss": loss, "perplexity": _perplexity(loss), "bits_per_byte": bits_per_byte(total, num_bytes)},
        "seconds": time.perf_counter() - started,
    }


# --------------------------------------------------------------------------------------------------------------
# Masked LMs
# --------------------------------------------------------------------------------------------------------------


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def _masked_nats(model, rows: list[list[int]], targets: list[list[int]], pad_id: int, device) -> torch.Tensor:
    """Summed nats of predicting `targets` (-100 = not scored) from `rows` (same lengths), padded into one batch."""
    ids, mask = _pad(rows, pad_id)
    labels, _ = _pad(targets, -100)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
    return F.cross_entropy(
        logits.float().flatten(0, 1), labels.to(device).flatten(), ignore_index=-100, reduction="sum"
    ).double()


@torch.no_grad()
def masked_lm_quality(
    model,
    tokenizer,
    texts: Sequence[str],
    method: str = "masked",
    mask_probability: float = 0.15,
    seed: int = 0,
    context_length: int | None = None,
    batch_size: int = 8,
    max_pseudo_tokens: int = MAX_PSEUDO_TOKENS,
    progress: bool = True,
    label: str = "model",
) -> dict:
    """Masked-token loss at `mask_probability` (method "masked") or the pseudo-likelihood ("pseudo")."""
    if method not in MLM_METHODS:
        raise ValueError(f"method={method!r} is invalid: allowed values are {', '.join(MLM_METHODS)}")
    if not 0.0 < mask_probability < 1.0:
        raise ValueError(f"mask_probability={mask_probability} is invalid: allowed 0 < p < 1")
    if tokenizer.mask_token_id is None:
        raise ValueError(f"{label}: the tokenizer has no mask token, so a masked LM cannot be scored")
    started = time.perf_counter()
    context_length = resolve_context(model, context_length)
    encoded = tokenizer(
        list(texts), truncation=True, max_length=context_length, return_special_tokens_mask=True
    )  # `[CLS] text [SEP]` (the tokenizer's template), cut at the context
    full = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    truncated = sum(len(f) > len(e) for f, e in zip(full, encoded["input_ids"]))
    plain = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    mask_id = tokenizer.mask_token_id
    candidates = [
        [i for i, special in enumerate(sm) if not special] for sm in encoded["special_tokens_mask"]
    ]  # scorable positions of each text
    rows, targets = [], []  # one model input per row, its labels (-100 = not scored)
    if method == "masked":
        generator = torch.Generator().manual_seed(seed)
        for ids, positions in zip(encoded["input_ids"], candidates):
            if not positions:
                continue
            k = max(1, round(mask_probability * len(positions)))
            chosen = [positions[int(i)] for i in torch.randperm(len(positions), generator=generator)[:k]]
            row, label_row = list(ids), [-100] * len(ids)
            for p in chosen:
                row[p], label_row[p] = mask_id, ids[p]
            rows.append(row)
            targets.append(label_row)
    else:
        count = sum(len(p) for p in candidates)
        if count > max_pseudo_tokens:
            raise ValueError(
                f"method='pseudo' needs one forward pass per token: {count} tokens > max_pseudo_tokens="
                f"{max_pseudo_tokens}; use method='masked' or fewer texts"
            )
        for ids, positions in zip(encoded["input_ids"], candidates):
            for p in positions:  # one copy per token, that token masked
                row, label_row = list(ids), [-100] * len(ids)
                row[p], label_row[p] = mask_id, ids[p]
                rows.append(row)
                targets.append(label_row)
    nats = torch.zeros((), dtype=torch.float64)
    bar = tqdm(total=len(rows), desc=f"{label}: {method}", unit="row", disable=not progress, leave=False)
    for start in range(0, len(rows), batch_size):
        chunk = slice(start, start + batch_size)
        nats += _masked_nats(model, rows[chunk], targets[chunk], pad_id, device).cpu()
        bar.update(len(rows[chunk]))
    bar.close()
    tokens = sum(sum(t != -100 for t in row) for row in targets)
    total = float(nats)
    loss = total / max(tokens, 1)
    num_bytes = utf8_bytes(texts)
    if method == "masked":
        metrics = {"mlm_loss": loss, "mlm_perplexity": _perplexity(loss)}
        described = f"{mask_probability:.0%} of the tokens of each text masked (seed {seed}), all predicted at once"
    else:
        metrics = {"pseudo_loss": loss, "pseudo_perplexity": _perplexity(loss)}
        if truncated == 0:
            metrics["pseudo_bits_per_byte"] = bits_per_byte(total, num_bytes)
        described = "pseudo-log-likelihood: each token masked in turn (Salazar et al. 2020)"
    return {
        "model": label,
        "model_class": type(model).__name__,
        "num_parameters": _num_parameters(model),
        "objective": "masked_lm",
        "method": described,
        "context_length": context_length,
        "num_texts": len(texts),
        "truncated_texts": truncated,
        "nats": total,
        "tokens": tokens,
        "bytes": num_bytes,
        "round_trip": round_trip(tokenizer, texts, plain),
        "metrics": metrics,
        "seconds": time.perf_counter() - started,
    }


def lm_quality(model, tokenizer, texts: Sequence[str], mlm_method: str = "masked", seed: int = 0, **kwargs) -> dict:
    """`causal_lm_quality` or `masked_lm_quality`, by the model's head. Keyword arguments go to the one chosen
    (`separator` and `stride` only apply to causal LMs)."""
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("texts is invalid: no non-empty text to evaluate")
    if lm_kind(model) == "causal":
        return causal_lm_quality(model, tokenizer, texts, **kwargs)
    kwargs.pop("separator", None)
    kwargs.pop("stride", None)
    return masked_lm_quality(model, tokenizer, texts, method=mlm_method, seed=seed, **kwargs)


__all__ = [
    "LN2",
    "MLM_METHODS",
    "REFERENCE_NAMES",
    "Window",
    "bits_per_byte",
    "causal_lm_quality",
    "document_stream",
    "folder_lm_kind",
    "lm_kind",
    "lm_quality",
    "load_lm",
    "masked_lm_quality",
    "max_context",
    "resolve_context",
    "separator_ids",
    "sliding_windows",
    "utf8_bytes",
]
