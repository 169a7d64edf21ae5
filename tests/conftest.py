"""Tiny models and a word-level tokenizer shared by the tests; the tiny configs (hidden 32, 2 layers, 4 heads)
are `evaluation.tiny`'s, shared with the harness and the benchmark."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import modeling  # noqa: E402
from evaluation.tiny import VOCAB_SIZE as VOCAB  # noqa: E402
from evaluation.tiny import tiny_config  # noqa: E402, F401 - the tests import it from here

WORDS = [
    "the",
    "pizza",
    "came",
    "out",
    "of",
    "the",
    "oven",
    "and",
    "it",
    "tasted",
    "good",
    ".",
    "a",
    "cat",
    "sat",
    "on",
    "mat",
    "dog",
    "ran",
    "to",
    "park",
    "le",
    "chat",
    "est",
    "sur",
    "tapis",
    "chien",
    "court",
    "au",
    "parc",
]


HEAD_FOR_ARCH = {
    "decoder": modeling.CourseTransformerForCausalLM,
    "encoder": modeling.CourseTransformerForMaskedLM,
    "encoder-decoder": modeling.CourseTransformerForSeq2SeqLM,
}


def tiny_model(architecture: str = "decoder", seed: int = 0, attn_implementation: str = "eager", **overrides):
    """A seeded tiny model with the LM head of its architecture, in eval mode."""
    config = tiny_config(architecture, **overrides)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return HEAD_FOR_ARCH[architecture](config).eval()


def model_inputs(model, ids: torch.Tensor, mask: torch.Tensor | None = None, **kwargs) -> dict:
    """Forward kwargs for any architecture; the encoder-decoder gets a fixed decoder prefix."""
    inputs = {"input_ids": ids, "attention_mask": mask, **kwargs}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = torch.tensor([[1, 5, 9, 13]]).expand(ids.shape[0], -1)
    return inputs


def padded(lengths: list[int], side: str = "left", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded token ids of the given lengths padded with 0 on one side, and their 0/1 attention mask."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        span = slice(width - n, width) if side == "left" else slice(0, n)
        ids[i, span] = torch.randint(3, VOCAB, (n,), generator=gen)
        mask[i, span] = 1
    return ids, mask


def build_tokenizer():
    """A word-level fast tokenizer over WORDS, with the special tokens every objective needs."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "<s>", "</s>", "[UNK]", "[MASK]", "[CLS]", "[SEP]"]
    vocab = {token: i for i, token in enumerate(specials + sorted(set(WORDS)))}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="[UNK]",
        mask_token="[MASK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from threads and lose much on shared cores (about 20x measured on 2 busy cores);
    one thread also leaves a core free. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory, tokenizer):
    """A seeded tiny transformers Llama (grouped-query attention) saved with the test tokenizer: a model that is not
    ours, for the harness, the commands and the explorer under the attention lens."""
    from transformers import LlamaForCausalLM

    from evaluation.tiny import tiny_llama_config

    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def lse_calls(monkeypatch) -> list[int]:
    """Counts calls of the CPU kernel that returns the log-sum-exp, so a test knows the lens's lse path ran (the
    weights came from the kernel, not from eager math)."""
    from modeling import attention_lens

    calls: list[int] = []
    real = attention_lens._CPU_LSE_KERNEL

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_lens, "_CPU_LSE_KERNEL", spy)
    return calls
