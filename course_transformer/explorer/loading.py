"""Models and inputs for the explorer: a preset (random weights), a name evaluation.analysis knows, or a folder
(ours, or any folder transformers loads: BERT/MiniLM, GPT-2, Llama/SmolLM2, BART, ...).

Every model is loaded under the attention lens (modeling/attention_lens.py): the fused kernel computes each layer,
and the weights shown are the exact softmax, from its log-sum-exp (eager's within ~1e-6). Heads are ablated through
our `head_mask` or, for any other model, through `AttentionLens(ablate=...)` (see `compute.forward`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from modeling.attention_lens import LENS

MAX_TOKENS = 64  # longer inputs are truncated (with a note): the figures stay readable and the view fast


class ExplorerError(ValueError):
    """A bad model or input; the message is shown in the page."""


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    label: str
    kind: str  # "causal" | "masked" | "seq2seq" | "base"


def model_kind(model) -> str:
    name = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False):
        return "seq2seq"
    if "CausalLM" in name or "LMHead" in name:
        return "causal"
    return "masked" if "MaskedLM" in name else "base"


def _preset_tokenizer():
    """A tokenizer for random-weight presets: MiniLM's WordPiece when installed, else the GPT-2 vocabulary."""
    from transformers import AutoTokenizer

    from evaluation.analysis import minilm_folder, prepare_tokenizer

    folder = minilm_folder()
    if folder is not None:
        return AutoTokenizer.from_pretrained(folder)
    from evaluation.gpt2_vocab import load_gpt2_tokenizer

    return prepare_tokenizer(load_gpt2_tokenizer())


def load_preset_model(name: str, seed: int = 0) -> Loaded:
    """A preset of ours with seeded random weights, sized to the preset tokenizer, with its LM head."""
    import modeling

    tokenizer = _preset_tokenizer()
    specials = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.cls_token_id or 0}
    specials["eos_token_id"] = tokenizer.sep_token_id or tokenizer.eos_token_id or 0
    config = modeling.load_preset(name, vocab_size=len(tokenizer), **specials)
    if config.architecture == "encoder-decoder":
        config.decoder_start_token_id = specials["bos_token_id"]
    heads = {
        "decoder": modeling.CourseTransformerForCausalLM,
        "encoder": modeling.CourseTransformerForMaskedLM,
        "encoder-decoder": modeling.CourseTransformerForSeq2SeqLM,
    }
    torch.manual_seed(seed)
    model = heads[config.architecture](config).eval()
    model.set_attn_implementation(LENS)
    return Loaded(model, tokenizer, f"{name} (random weights, seed {seed})", model_kind(model))


def load_model(name: str) -> Loaded:
    """The model named `name`; `ExplorerError` (one readable line) when it does not load."""
    import modeling
    from evaluation.analysis import MODEL_NAMES, load_named_model

    name = str(name).strip()
    try:
        name = _hub_snapshot(name)
        if name in modeling.list_presets():
            return load_preset_model(name)
        folder = Path(name)
        if name not in MODEL_NAMES and not (folder / "config.json").is_file() and not list(folder.glob("*.gguf")):
            raise ExplorerError(
                f"{name!r} is not a model folder (no config.json), a preset ({', '.join(modeling.list_presets())}) "
                f"or one of {', '.join(MODEL_NAMES)}"
            )
        model, tokenizer, label = load_named_model(name, attn_implementation=LENS)
    except ExplorerError:
        raise
    except Exception as error:  # a broken folder: the page says why instead of a traceback
        raise ExplorerError(f"{name} does not load: {type(error).__name__}: {' '.join(str(error).split())}") from None
    return Loaded(model.eval(), tokenizer, label, model_kind(model))


def _hub_snapshot(name: str) -> str:
    """A Hub id ("user/model", as a Space passes it) -> its downloaded folder; anything else unchanged."""
    if Path(name).exists() or name.count("/") != 1 or name.startswith((".", "/")):
        return name
    from huggingface_hub import snapshot_download

    return snapshot_download(name)


@dataclass
class Encoded:
    batch: dict  # input_ids, attention_mask (1, T) [, token_type_ids]
    tokens: list[str]  # the tokenizer's own pieces ("Ġthe", "##s"): what the measures match on
    labels: list[str]  # readable labels for the page: byte-level pieces decoded ("the", "Après")
    note: str  # "" or the truncation note shown in the page


def encode(tokenizer, text: str, pair: str | None = None, max_tokens: int = MAX_TOKENS) -> Encoded:
    """Tokenize one text (or an A/B pair), truncated to `max_tokens` with a note; `ExplorerError` when empty."""
    if not text or not text.strip():
        raise ExplorerError("the text is empty: type a sentence")
    pair = pair if pair and pair.strip() else None
    full = tokenizer(text, pair)["input_ids"]
    batch = tokenizer(text, pair, truncation=True, max_length=max_tokens, return_tensors="pt")
    note = ""
    if len(full) > max_tokens:
        note = f"Input truncated: {len(full)} tokens, the first {max_tokens} are shown."
    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    return Encoded(dict(batch), tokens, labels(tokenizer, batch["input_ids"][0].tolist()), note)


def labels(tokenizer, ids: list[int]) -> list[str]:
    """One readable label per token: decoded one by one (byte-level BPE pieces are bytes, not text)."""
    return [tokenizer.decode([i]).strip() or "␣" for i in ids]
