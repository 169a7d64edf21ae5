"""What the explorer shows, as functions of a model and its inputs: attention maps, the harness's per-head
measures, predictions under head ablation, step-by-step generation.

Head ablation is one (L, H) mask of 0/1 for every model: ours takes it as `head_mask` (and `decoder_head_mask`);
any other model runs inside `AttentionLens(ablate=...)` (`evaluation.head_gates.applied`), which zeroes the same
heads' outputs: transformers 5 models take no head mask.

Notation: L layers, H heads, T query tokens, S key tokens (S = T for self-attention), V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from course_transformer.explorer.loading import Loaded, labels
from evaluation import analysis
from evaluation.head_gates import applied


@dataclass
class Maps:
    """Attention maps of one input, float32 numpy, batch dimension removed."""

    self_attention: np.ndarray  # (L, H, T, T): encoder (or decoder-only) self-attention
    cross: np.ndarray | None  # (L, H, T_dec, S): decoder -> encoder, seq2seq only
    decoder_self: np.ndarray | None  # (L, H, T_dec, T_dec), seq2seq only


def _stack(attentions) -> np.ndarray:
    return torch.stack([a[0].float() for a in attentions]).cpu().numpy()  # L x (H, T, S) -> (L, H, T, S)


def start_ids(loaded: Loaded) -> torch.Tensor:
    config = loaded.model.config  # transformers 5 configs lack the fields their model does not use: getattr
    start = getattr(config, "decoder_start_token_id", None)
    start = start if start is not None else getattr(config, "bos_token_id", None)
    return torch.tensor([[start or 0]])  # (1, 1)


def ablation_masks(loaded: Loaded, head_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The (L, H) mask under the forward's argument names: `head_mask`, and `decoder_head_mask` for seq2seq."""
    if head_mask is None:
        return {}
    masks = {"head_mask": head_mask}
    if loaded.kind == "seq2seq":
        masks["decoder_head_mask"] = head_mask
    return masks


@torch.no_grad()
def forward(loaded: Loaded, batch: dict, head_mask: torch.Tensor | None = None, decoder_ids=None):
    """One forward with attention weights; `head_mask` (L, H) of 0/1 ablates heads (the decoder's too)."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    if "token_type_ids" in batch and getattr(loaded.model.config, "type_vocab_size", 0):  # BERT's A/B segments
        inputs["token_type_ids"] = batch["token_type_ids"]
    if loaded.kind == "seq2seq":
        inputs["decoder_input_ids"] = decoder_ids if decoder_ids is not None else start_ids(loaded)
    with applied(loaded.model, ablation_masks(loaded, head_mask)) as masks:
        return loaded.model(**inputs, **masks, output_attentions=True)


def attention_maps(out) -> Maps:
    if getattr(out, "encoder_attentions", None):
        return Maps(_stack(out.encoder_attentions), _stack(out.cross_attentions), _stack(out.decoder_attentions))
    return Maps(_stack(out.attentions), None, None)


def warm_up(loaded: Loaded) -> None:
    """Pay the one-time costs while loading, not in the first view: the metric modules' imports (evaluate,
    datasets) and the first forward's allocations."""
    for name in ("attention_entropy", "attention_distance", "attention_targets"):
        analysis.metric_module(name)
    ids = torch.tensor([[loaded.tokenizer.pad_token_id or 0] * 4])  # (1, 4)
    forward(loaded, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})


def head_mask(ablated: list[str], num_layers: int, num_heads: int) -> torch.Tensor | None:
    """["2-3", ...] (layer-head, from 1) -> a (L, H) mask with those heads at 0; None when nothing is ablated."""
    if not ablated:
        return None
    mask = torch.ones(num_layers, num_heads)  # (L, H)
    for name in ablated:
        layer, head = (int(x) - 1 for x in name.split("-"))
        mask[layer, head] = 0.0
    return mask


def head_table(
    attention: np.ndarray, tokens: list[str], tokenizer, induction: dict | None = None
) -> list[list[object]]:
    """One row per head: the harness's measures (evaluation.analysis.head_measures) on this input."""
    record = analysis.AttentionRecord(tokens=tokens, attention=attention, word_ids=None)
    measures = analysis.head_measures([record], cls_token=tokenizer.cls_token, sep_token=tokenizer.sep_token)
    num_layers, num_heads = attention.shape[:2]
    targets = measures["targets"]

    def score(block, layer, head):
        return None if not block else round(float(np.asarray(block["scores"])[layer, head]), 3)

    rows = []
    for layer in range(num_layers):
        for head in range(num_heads):
            rows.append(
                [
                    f"{layer + 1}-{head + 1}",
                    score(measures["entropy"], layer, head),
                    score(measures["distance"], layer, head),
                    *(score(targets.get(k), layer, head) for k in TARGET_COLUMNS),
                    score(induction, layer, head),
                ]
            )
    return rows


TARGET_COLUMNS = ("first", "cls", "sep", "period", "comma", "self", "previous", "next")
TABLE_HEADERS = ["head", "entropy", "distance", *TARGET_COLUMNS, "induction"]


@dataclass
class Prediction:
    rows: list[list[object]]  # (token, probability) of the top k
    loss: float | None
    what: str  # which position is predicted


def masked_position(batch: dict, tokenizer) -> int:
    """The [MASK] in the text, else the middle ordinary token (replaced by [MASK])."""
    ids = batch["input_ids"][0]  # (T,)
    if tokenizer.mask_token_id is not None and (ids == tokenizer.mask_token_id).any():
        return int((ids == tokenizer.mask_token_id).nonzero()[0])
    ordinary = [i for i, t in enumerate(ids.tolist()) if t not in tokenizer.all_special_ids]
    return ordinary[len(ordinary) // 2] if ordinary else 0


@torch.no_grad()
def predict(loaded: Loaded, batch: dict, mask: torch.Tensor | None, target_ids=None, k: int = 5) -> Prediction:
    """Top-k predictions and the loss with heads ablated by `mask` (next token, masked token or target token)."""
    tok = loaded.tokenizer
    if loaded.kind == "masked":
        pos = masked_position(batch, tok)
        true_id = int(batch["input_ids"][0, pos])
        masked = dict(batch, input_ids=batch["input_ids"].clone())
        masked["input_ids"][0, pos] = tok.mask_token_id if tok.mask_token_id is not None else true_id
        logits = forward(loaded, masked, mask).logits[0, pos]  # (V,)
        what = f"masked token {pos}: {tok.convert_ids_to_tokens(true_id)!r}"
        loss = float(torch.nn.functional.cross_entropy(logits[None], torch.tensor([true_id])))
    elif loaded.kind == "causal":
        out = forward_labels(loaded, batch, mask)
        logits, loss, what = out.logits[0, -1], float(out.loss), "next token after the text"
    elif loaded.kind == "seq2seq":
        decoder = start_ids(loaded) if target_ids is None else target_ids
        logits = forward(loaded, batch, mask, decoder).logits[0, -1]  # (V,)
        loss, what = None, "next target token"
    else:  # no LM head (e.g. MiniLM): how far the mean-pooled sentence embedding moves
        base = forward(loaded, batch, None).last_hidden_state[0].mean(0)  # (D,)
        moved = forward(loaded, batch, mask).last_hidden_state[0].mean(0)
        cosine = float(torch.nn.functional.cosine_similarity(base, moved, dim=0))
        return Prediction([["(no LM head) embedding cosine to unablated", round(cosine, 4)]], None, "embedding")
    probs = logits.float().softmax(-1)  # (V,)
    top = probs.topk(k)
    rows = [[tok.convert_ids_to_tokens(int(i)), round(float(p), 4)] for p, i in zip(top.values, top.indices)]
    return Prediction(rows, loss, what)


def forward_labels(loaded: Loaded, batch: dict, mask):
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    with applied(loaded.model, ablation_masks(loaded, mask)) as masks:
        return loaded.model(**inputs, labels=batch["input_ids"], **masks)


@dataclass
class Steps:
    tokens: list[str]  # the generated tokens, in order
    keys: list[str]  # what they attend to (context tokens; the source for seq2seq)
    rows: np.ndarray  # (L, H, N, S_max): the attention row of each new token, zero-padded on the right


@torch.no_grad()
def generate_steps(loaded: Loaded, batch: dict, steps: int = 8) -> Steps:
    """Greedy decoding one token at a time, keeping each new token's attention (self for a decoder, cross for
    an encoder-decoder). A full forward per step: simple and exact, and N is small."""
    ids = batch["input_ids"]  # (1, T)
    decoder = start_ids(loaded)
    tokens, rows = [], []
    for _ in range(steps):
        if loaded.kind == "seq2seq":
            out = forward(loaded, batch, None, decoder)
            row = _stack(out.cross_attentions)[:, :, -1]  # (L, H, S)
        else:
            out = forward(loaded, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
            row = _stack(out.attentions)[:, :, -1]  # (L, H, T + step)
        next_id = out.logits[0, -1].argmax().view(1, 1)  # (1, 1)
        tokens.append(labels(loaded.tokenizer, [int(next_id)])[0])
        rows.append(row)
        if loaded.kind == "seq2seq":
            decoder = torch.cat([decoder, next_id], dim=1)
        else:
            ids = torch.cat([ids, next_id], dim=1)
        if int(next_id) == loaded.model.config.eos_token_id:
            break
    keys = labels(loaded.tokenizer, (ids[0] if loaded.kind != "seq2seq" else batch["input_ids"][0]).tolist())
    width = max(r.shape[-1] for r in rows)
    padded = np.stack([np.pad(r, ((0, 0), (0, 0), (0, width - r.shape[-1]))) for r in rows], axis=2)  # (L,H,N,S)
    return Steps(tokens, keys[:width], padded)


def held_out_pair(index: int = 0, dataset: str = "data/bible-full/en-fr", split: str = "test") -> tuple[str, str]:
    """A verse pair of the translation test split (books never seen in training)."""
    from datasets import load_from_disk

    row = load_from_disk(dataset)[split][index]
    return row["en"], row["fr"]
