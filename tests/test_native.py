"""What a model native to transformers 5 must do: the specification of the rewrite of modeling/.

Each test names a contract transformers' own machinery relies on (Trainer's gradient accumulation, packed sequences,
custom 4D masks, static caches and compiled decoding, flex attention, tuple outputs, the standard losses, activation
checkpointing, remote code). Many fail on the pre-rewrite code; that is their purpose. Tolerances are fp32: 1e-5 on
logits, 1e-6 relative where two computations of the same sums are compared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, model_inputs, padded, tiny_config, tiny_model
from transformers import CompileConfig, EncoderDecoderCache, StaticCache, Trainer, TrainingArguments
from transformers.cache_utils import Cache

import modeling as M

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ["decoder", "encoder", "encoder-decoder"]
NUM_LABELS = 5
SeqCls, TokCls = M.CourseTransformerForSequenceClassification, M.CourseTransformerForTokenClassification
# The head classes that fit each architecture, and the Auto class each one is loaded through.
HEADS = {
    "decoder": [M.CourseTransformerForCausalLM, SeqCls, TokCls],
    "encoder": [M.CourseTransformerForMaskedLM, SeqCls, TokCls],
    "encoder-decoder": [M.CourseTransformerForSeq2SeqLM],
}
AUTO_NAME = {
    M.CourseTransformerModel: "AutoModel",
    M.CourseTransformerForCausalLM: "AutoModelForCausalLM",
    M.CourseTransformerForMaskedLM: "AutoModelForMaskedLM",
    M.CourseTransformerForSeq2SeqLM: "AutoModelForSeq2SeqLM",
    SeqCls: "AutoModelForSequenceClassification",
    TokCls: "AutoModelForTokenClassification",
}
HEAD_CASES = [pytest.param(cls, arch, id=f"{arch}-{cls.__name__[17:]}") for arch in ARCHS for cls in HEADS[arch]]
LM_HEAD = {arch: heads[0] for arch, heads in HEADS.items()}


def build(cls, arch: str, seed: int = 0, attn: str = "eager", **overrides):
    config = tiny_config(arch, num_labels=NUM_LABELS, **overrides)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return cls(config).eval()


def labelled_inputs(model, seed: int = 0) -> dict:
    """A right-padded batch of 2 (lengths 6 and 4) with the labels the head trains on; -100 marks no target."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 6), generator=gen)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    ids = ids.masked_fill(mask == 0, 0)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if isinstance(model, M.CourseTransformerForSeq2SeqLM):
        inputs["labels"] = torch.tensor([[7, 8, 9, 10, 2], [11, 12, 2, -100, -100]])
    elif isinstance(model, SeqCls):
        inputs["labels"] = torch.tensor([1, 3])
    elif isinstance(model, TokCls):
        inputs["labels"] = torch.randint(0, NUM_LABELS, (2, 6), generator=gen).masked_fill(mask == 0, -100)
    elif isinstance(model, M.CourseTransformerModel):
        if model.config.is_encoder_decoder:
            inputs["decoder_input_ids"] = torch.tensor([[1, 5, 9, 13]] * 2)
    else:  # causal and masked LM: the tokens themselves
        inputs["labels"] = ids.masked_fill(mask == 0, -100)
    return inputs


def tail(stderr: str) -> str:
    """The end of a child's traceback, each line cut short (transformers lists every known config in one line)."""
    return "\n".join(line[:400] for line in stderr.strip().splitlines()[-25:])


def assert_same(a, b, path: str = "output") -> None:
    """Exact equality of nested outputs: tensors, tuples, caches (compared by their key/value tensors)."""
    if isinstance(a, Cache) or isinstance(b, Cache):
        assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
        if isinstance(a, EncoderDecoderCache):
            assert_same(a.self_attention_cache, b.self_attention_cache, path + ".self")
            assert_same(a.cross_attention_cache, b.cross_attention_cache, path + ".cross")
            return
        a, b = [(la.keys, la.values) for la in a.layers], [(lb.keys, lb.values) for lb in b.layers]
    if isinstance(a, (tuple, list)):
        assert isinstance(b, (tuple, list)) and len(a) == len(b), f"{path}: {type(b).__name__} of another length"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{path} differs"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


# --------------------------------------------------------------------------------------------------------------
# 1. Trainer with gradient accumulation: 4 rows at once == 4 micro-batches of 1
# --------------------------------------------------------------------------------------------------------------


def trainer_rows(arch: str) -> list[dict]:
    """8 rows with different numbers of label tokens: a per-micro-batch mean would weight tokens unequally."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in (3, 10, 5, 7, 2, 9, 4, 8):
        mask = (torch.arange(10) < n).long()
        ids = torch.randint(3, VOCAB, (10,), generator=gen).masked_fill(mask == 0, 0)
        labels = ids.masked_fill(mask == 0, -100)
        if arch == "encoder":  # masked LM: targets at every other real position only
            labels[1::2] = -100
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return rows


def hand_loss(model, rows: list[dict]) -> torch.Tensor:
    """Mean cross-entropy over all label tokens of the rows (shifted for the causal LM), computed by hand."""
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    labels = batch.pop("labels")
    with torch.no_grad():  # labels too: the seq2seq head derives its decoder inputs from them
        logits = model(**batch, labels=labels).logits.float()
    if isinstance(model, M.CourseTransformerForCausalLM):
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)


def train(arch: str, batch: int, accumulation: int, out: Path):
    """Two optimizer steps through Trainer; returns the loss logs, the initial and the final parameters, and the
    hand-computed loss of the first step."""
    model = build(LM_HEAD[arch], arch)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = trainer_rows(arch)
    reference = hand_loss(model, rows[:4]).item()
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=0,
        # SGD, not Adam: Adam's first step is lr * sign(grad), blind to a wrongly scaled loss; no clipping either.
        optim="sgd",
        learning_rate=0.1,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",  # both runs see rows 0-3, then 4-7, in the same order
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    return logs, initial, {n: p.detach() for n, p in model.named_parameters()}, reference


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_accumulation_matches_the_full_batch(arch, tmp_path):
    """Trainer passes `num_items_in_batch` to a forward taking **kwargs and then stops dividing the loss by the
    accumulation steps, so the head must normalise by it. Both runs sum the same per-token terms, grouped
    differently; measured with a head that does: at most 1.2e-7 relative on the loss and 7e-8 on the grad norm,
    so the required 1e-6 holds in fp32."""
    logs_a, initial, params_a, reference = train(arch, 4, 1, tmp_path / "a")
    logs_b, _, params_b, _ = train(arch, 1, 4, tmp_path / "b")
    # the full-batch run itself is right: its first logged loss is the token mean over rows 0-3
    assert logs_a[0]["loss"] == pytest.approx(reference, rel=1e-6)
    for step, (a, b) in enumerate(zip(logs_a, logs_b), start=1):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), f"loss at step {step}"
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-6), f"grad_norm at step {step}"
    moved = max((params_a[n] - initial[n]).abs().max().item() for n in initial)
    assert moved > 1e-3  # training really changed the weights, so equal weights mean equal updates
    for name, a in params_a.items():
        # Relative to each tensor's norm (measured worst 2.2e-7 with a correct head). Elementwise is not achievable:
        # ~1e-9 of summation-order noise on entries near 0 gave up to 2.6e-3 relative. The floor serves tensors that
        # stay ~0: the key bias has an exactly zero gradient in exact arithmetic, ~1e-14 of noise in fp32.
        assert (params_b[name] - a).norm() <= 1e-6 * max(a.norm().item(), 1e-3), name


# --------------------------------------------------------------------------------------------------------------
# 2-3. Packed sequences and custom 4D masks
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("encoding", ["learned", "rope", "alibi"])
def test_packed_sequences_match_separate_runs(encoding, backend):
    """Padding-free training packs sequences in one row with restarting position_ids and no attention_mask (as in
    transformers' own packing test); the boundaries must come from the position_ids."""
    model = tiny_model("decoder", position_encoding=encoding, attn_implementation=backend)
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, VOCAB, (n,), generator=gen) for n in (5, 3, 6)]
    packed, positions = torch.cat(seqs)[None], torch.cat([torch.arange(len(s)) for s in seqs])[None]
    with torch.no_grad():
        apart = torch.cat([model(s[None], use_cache=False).logits[0] for s in seqs])
        logits = model(packed, position_ids=positions, use_cache=False).logits[0]
        weighed = model(packed, position_ids=positions, use_cache=False, output_attentions=True)
    torch.testing.assert_close(logits, apart, atol=1e-5, rtol=0)
    torch.testing.assert_close(weighed.logits[0], apart, atol=1e-5, rtol=0)
    doc = torch.repeat_interleave(torch.arange(3), torch.tensor([len(s) for s in seqs]))  # (14,) sequence index
    allowed = (doc[:, None] == doc[None, :]) & torch.ones(14, 14, dtype=torch.bool).tril()  # block-diagonal causal
    assert len(weighed.attentions) == model.config.num_decoder_layers
    for weights in weighed.attentions:  # (1, H, 14, 14)
        assert torch.all(weights[0][:, ~allowed] == 0), "attention crosses a sequence boundary or looks ahead"
        assert torch.all(weights[0][:, allowed] > 0)


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("encoding", ["learned", "alibi"])
def test_4d_mask_equals_the_2d_mask(encoding, backend, kind):
    """A (B, 1, T, S) mask, boolean (True = attend) or additive float (0 / finfo.min), is used as given."""
    model = tiny_model("decoder", position_encoding=encoding, attn_implementation=backend)
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    # right padding, and a hole before real tokens: the mask must change real positions, not only padded ones
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 1, 1, 1]])
    positions = torch.arange(7)[None].expand(2, -1)  # given to both: a 4D mask says nothing about positions
    allowed = torch.ones(7, 7, dtype=torch.bool).tril()[None, None] & mask.bool()[:, None, None, :]  # (2, 1, 7, 7)
    mask_4d = allowed if kind == "bool" else torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo().min)
    with torch.no_grad():
        want = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        got = model(ids, attention_mask=mask_4d, position_ids=positions, use_cache=False).logits
        unmasked = model(ids, position_ids=positions, use_cache=False).logits
    assert (want[1, 4:] - unmasked[1, 4:]).abs().max() > 1e-3  # the hole matters, so the check below can fail
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# 4-5. Static cache, compiled decoding, no graph breaks
# --------------------------------------------------------------------------------------------------------------

GREEDY = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
STATIC_CASES = [("decoder", "learned"), ("decoder", "rope"), ("encoder-decoder", "learned")]


@pytest.mark.parametrize("cls", [M.CourseTransformerForCausalLM, M.CourseTransformerForSeq2SeqLM])
def test_generation_heads_declare_fullgraph_compile(cls):
    arch = "decoder" if cls is M.CourseTransformerForCausalLM else "encoder-decoder"
    assert build(cls, arch)._can_compile_fullgraph is True  # gates transformers' static-cache and compile tests


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("arch,encoding", STATIC_CASES)
def test_static_cache_generates_like_the_dynamic_cache(arch, encoding, backend):
    """generate builds a 4D mask over the whole static cache and a left-padded batch gets position_ids."""
    model = tiny_model(arch, position_encoding=encoding, attn_implementation=backend)
    ids, mask = padded([6, 3, 5])
    dynamic = model.generate(ids, attention_mask=mask, **GREEDY)
    static = model.generate(ids, attention_mask=mask, cache_implementation="static", **GREEDY)
    assert torch.equal(static, dynamic)


COMPILE_CASES = [
    pytest.param(arch, encoding, "aot_eager", id=f"{arch}-{encoding}-aot_eager") for arch, encoding in STATIC_CASES
] + [pytest.param("decoder", "rope", "inductor", id="decoder-rope-inductor", marks=pytest.mark.slow)]


@pytest.mark.parametrize("arch,encoding,compile_backend", COMPILE_CASES)
def test_compiled_static_decoding_generates_the_same_tokens(arch, encoding, compile_backend):
    """transformers compiles the decoding forward itself when the cache is static (`get_compiled_call`), but only on
    accelerators: on CPU a CompileConfig must carry `_compile_all_devices` (its documented testing hook).
    fullgraph=True turns any graph break into an error. aot_eager traces what inductor would (dynamo +
    AOTAutograd) in ~1.5 s; inductor's C++ code generation costs ~24 s per model on 2 cores (measured on an
    equally tiny LlamaForCausalLM), so only one case pays it (marked slow)."""
    torch._dynamo.reset()  # a fresh budget of recompilations: earlier tests compiled the same code objects
    model = tiny_model(arch, position_encoding=encoding, attn_implementation="sdpa")
    ids, mask = padded([6, 3, 5])
    dynamic = model.generate(ids, attention_mask=mask, **GREEDY)
    config = CompileConfig(fullgraph=True, backend=compile_backend, mode="default")
    config._compile_all_devices = True
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = model.generate(ids, attention_mask=mask, cache_implementation="static", compile_config=config, **GREEDY)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs, "the decoding steps were not compiled"
    assert torch.equal(compiled, dynamic)


def decoding_step(model, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """The inputs of the first decoding step, made by the model's own `prepare_inputs_for_generation` as generate
    makes them: a StaticCache filled by the prefill, one new token, a 4D mask over the cache, position_ids."""
    if model.config.is_encoder_decoder:
        enc = model.get_encoder()(input_ids=ids, attention_mask=mask)
        self_cache = StaticCache(config=model.config, max_cache_len=6)
        cache = EncoderDecoderCache(self_cache, StaticCache(config=model.config, max_cache_len=ids.shape[1]))
        seq, extra = torch.full((ids.shape[0], 1), model.config.decoder_start_token_id), {"encoder_outputs": enc}
    else:
        cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 6)
        seq, extra = ids, {"position_ids": (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)}
    common = dict(past_key_values=cache, attention_mask=mask, use_cache=True, **extra)
    with torch.no_grad():
        prefill = model(**model.prepare_inputs_for_generation(seq, is_first_iteration=True, **common))
    token = prefill.logits[:, -1:].argmax(-1)
    seq = torch.cat([seq, token], 1)
    if not model.config.is_encoder_decoder:  # generate extends the mask and the positions by one
        common["attention_mask"] = torch.cat([mask, torch.ones_like(token)], 1)
        common["position_ids"] = torch.cat([extra["position_ids"], extra["position_ids"][:, -1:] + 1], 1)
    return model.prepare_inputs_for_generation(seq, next_sequence_length=1, **common)


@pytest.mark.parametrize(
    "arch,encoding,backend",
    [("decoder", e, "sdpa") for e in ("learned", "rope", "alibi")]
    + [("decoder", "rope", "eager"), ("encoder-decoder", "learned", "sdpa"), ("encoder-decoder", "learned", "eager")],
)
def test_a_decoding_step_has_no_graph_break(arch, encoding, backend):
    torch._dynamo.reset()
    model = tiny_model(arch, position_encoding=encoding, attn_implementation=backend)
    ids, mask = padded([5, 3])
    step = decoding_step(model, ids, mask)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(**step)
    reasons = [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_count >= 1
    assert explained.graph_break_count == 0, reasons


# --------------------------------------------------------------------------------------------------------------
# 6. flex_attention on CPU: the right numbers or a clear refusal, never a crash
# --------------------------------------------------------------------------------------------------------------

FLEX_CASES = {
    "decoder-padded": ("decoder", "learned"),
    "encoder-padded": ("encoder", "learned"),
    "decoder-alibi-padded": ("decoder", "alibi"),
    "encoder-decoder-padded-source": ("encoder-decoder", "learned"),
}
# One interpreter imports torch once (~6 s); each case runs in a forked child, so a crash (the pre-rewrite code
# aborted with `free(): invalid next size` / `double free`, exit 134, or segfaulted) takes down its case only.
FLEX_SCRIPT = """
import json, os, sys, traceback
sys.path[:0] = [{tests!r}, {root!r}]
import torch
from conftest import VOCAB, model_inputs, tiny_model

def compare(arch, encoding):
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    ids = ids.masked_fill(mask == 0, 0)
    eager = tiny_model(arch, position_encoding=encoding)
    try:
        flex = tiny_model(arch, position_encoding=encoding, attn_implementation="flex_attention")
        flex.load_state_dict(eager.state_dict())
        with torch.no_grad():
            got = flex(**model_inputs(flex, ids, mask)).logits
    except ValueError as err:
        return {{"refused": str(err)}}
    with torch.no_grad():
        want = eager(**model_inputs(eager, ids, mask)).logits
    keep = torch.ones(got.shape[:2], dtype=torch.bool) if arch == "encoder-decoder" else mask.bool()
    return {{"diff": (got - want)[keep].abs().max().item()}}

def reap():
    pid, status = os.wait()
    print("EXIT", running.pop(pid), os.waitstatus_to_exitcode(status), flush=True)

running = {{}}
for name, (arch, encoding) in json.loads({cases!r}).items():
    if len(running) == 2:  # two children at a time: flex compiles with inductor, ~20 s a case on a cold cache
        reap()
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        torch.set_num_threads(1)
        try:
            print("RESULT", name, json.dumps(compare(arch, encoding)), flush=True)
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
    running[pid] = name
while running:
    reap()
"""


@pytest.fixture(scope="module")
def flex_results() -> dict:
    script = FLEX_SCRIPT.format(tests=str(ROOT / "tests"), root=str(ROOT), cases=json.dumps(FLEX_CASES))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    results = {name: {"stderr": proc.stderr} for name in FLEX_CASES}
    for line in proc.stdout.splitlines():
        tag, _, rest = line.partition(" ")
        if tag in ("RESULT", "EXIT"):
            name, _, value = rest.partition(" ")
            results[name][tag] = json.loads(value)
    return results


@pytest.mark.parametrize("case", list(FLEX_CASES))
def test_flex_attention_on_cpu_is_right_or_refused(flex_results, case):
    result = flex_results[case]
    exit_code = result.get("EXIT")
    # the children share one stderr, so the tail may show another case's messages too
    assert exit_code == 0, f"the flex_attention child exited with {exit_code} (-N: signal N)\n{tail(result['stderr'])}"
    outcome = result["RESULT"]
    if "refused" in outcome:  # a clear refusal names the setting, raised before any kernel runs
        assert "flex_attention" in outcome["refused"] or "attn_implementation" in outcome["refused"], outcome
    else:
        assert outcome["diff"] <= 1e-5, outcome


# --------------------------------------------------------------------------------------------------------------
# 7-9. Tuple outputs, the standard losses, no dead parameters
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls,arch", [pytest.param(M.CourseTransformerModel, a, id=f"{a}-Model") for a in ARCHS] + HEAD_CASES
)
def test_return_dict_false_returns_the_output_as_a_tuple(cls, arch):
    model = build(cls, arch)
    inputs = {**labelled_inputs(model), "output_hidden_states": True, "output_attentions": True}
    with torch.no_grad():
        out = model(**inputs)
        tup = model(**inputs, return_dict=False)
    assert type(tup) is tuple, type(tup).__name__
    assert_same(tup, out.to_tuple())
    if "labels" in inputs:  # the loss comes first, as Trainer's `outputs[0]` expects
        assert out.loss is not None and torch.equal(tup[0], out.loss)


LOSS_CASES = [
    pytest.param(M.CourseTransformerForCausalLM, "decoder", id="causal"),
    pytest.param(M.CourseTransformerForMaskedLM, "encoder", id="masked"),
    pytest.param(M.CourseTransformerForSeq2SeqLM, "encoder-decoder", id="seq2seq"),
    pytest.param(TokCls, "encoder", id="token-classification"),
]


def token_loss(logits: torch.Tensor, targets: torch.Tensor, num_items: int | None) -> torch.Tensor:
    """Sum of per-token cross-entropies over targets != -100, divided by num_items or by their count."""
    total = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return total / (num_items if num_items is not None else (targets != -100).sum())


@pytest.mark.parametrize("num_items", [None, 17])
@pytest.mark.parametrize("cls,arch", LOSS_CASES)
def test_loss_is_the_standard_token_loss(cls, arch, num_items):
    """`num_items_in_batch` (from Trainer) turns the mean into sum / N; ignore_index is -100."""
    model = build(cls, arch)
    inputs = labelled_inputs(model)
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    with torch.no_grad():
        out = model(**inputs, **extra)
    logits, targets = out.logits, inputs["labels"]
    if cls is M.CourseTransformerForCausalLM:  # position t predicts token t + 1
        logits, targets = logits[:, :-1], targets[:, 1:]
    assert num_items != (targets != -100).sum().item()  # so that sum / N differs from the mean
    torch.testing.assert_close(out.loss, token_loss(logits, targets, num_items), rtol=1e-5, atol=0)


@pytest.mark.parametrize("num_items", [None, 17])
def test_causal_lm_honours_shift_labels(num_items):
    """Padding-free collators pass `shift_labels` (already aligned with the logits); it replaces labels[:, 1:]."""
    model = build(M.CourseTransformerForCausalLM, "decoder")
    inputs = labelled_inputs(model)
    shift = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    shift[0, 2], shift[1, 3:] = -100, -100
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    with torch.no_grad():
        out = model(**inputs, shift_labels=shift, **extra)
    want = token_loss(out.logits, shift, num_items)
    from_labels = token_loss(out.logits[:, :-1], inputs["labels"][:, 1:], num_items)
    assert (want - from_labels).abs() > 1e-3  # 100x the tolerance: the two targets give different losses
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=0)


DEAD_CASES = [pytest.param(*case.values, {}, id=case.id) for case in HEAD_CASES] + [
    pytest.param(cls, "encoder", {"add_pooling_layer": True}, id=f"encoder-with-pooler-{cls.__name__[17:]}")
    for cls in (M.CourseTransformerForMaskedLM, SeqCls, TokCls)
]


@pytest.mark.parametrize("cls,arch,overrides", DEAD_CASES)
def test_every_parameter_gets_a_gradient(cls, arch, overrides):
    """A parameter without a gradient is dead weight, and DDP then demands find_unused_parameters=True. A head that
    never pools must not build the pooler that `add_pooling_layer` asks of the base model."""
    model = build(cls, arch, **overrides).train()
    model(**labelled_inputs(model)).loss.backward()
    dead = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert dead == []


# --------------------------------------------------------------------------------------------------------------
# 10. Activation checkpointing, reentrant or not
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(arch, reentrant):
    runs = []
    for checkpointing in (False, True):
        model = build(LM_HEAD[arch], arch).train()  # dropout 0: the recomputation sees the same activations
        if checkpointing:
            with warnings.catch_warnings():  # gradient_checkpointing_enable is deprecated (still the usual call)
                warnings.simplefilter("ignore", FutureWarning)
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
            assert layers, "no module has checkpointing switched on"
        loss = model(**labelled_inputs(model)).loss
        loss.backward()
        runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = runs
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=0)
    missing = [n for n in grads_a if (grads_a[n] is None) != (grads_b[n] is None)]
    assert missing == [], "gradients present in one run only"
    for name, a in grads_a.items():
        if a is not None:  # relative to the tensor's norm; the floor serves the key bias, whose gradient is ~0
            assert (grads_b[name] - a).norm() <= 1e-6 * max(a.norm().item(), 1e-3), name


# --------------------------------------------------------------------------------------------------------------
# 11. auto_map and remote code in a fresh process
# --------------------------------------------------------------------------------------------------------------

AUTO_EXPECTED = {arch: {"AutoConfig", "AutoModel", *(AUTO_NAME[c] for c in HEADS[arch])} for arch in ARCHS}


def save_head(arch: str, folder: Path):
    model = build(LM_HEAD[arch], arch, attn="sdpa")
    model.save_pretrained(folder)
    return model, json.loads((folder / "config.json").read_text()).get("auto_map", {})


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_auto_map_names_every_fitting_auto_class(arch, tmp_path):
    _, auto_map = save_head(arch, tmp_path)
    assert AUTO_EXPECTED[arch] - set(auto_map) == set()
    for auto, cls in AUTO_NAME.items():
        if cls in auto_map:
            assert auto_map[cls].endswith("." + auto.__name__), (cls, auto_map[cls])
    assert auto_map["AutoConfig"].endswith(".CourseTransformerConfig")


# The package must not be importable: the folder's own code has to do everything (as in test_save_load.py).
FRESH_SCRIPT = """
import importlib.abc, json, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("modeling", "evaluation", "course_transformer", "scripts"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, _Block())
try:
    import modeling
    raise SystemExit("the package is importable: the test would prove nothing")
except ImportError:
    pass
import torch, transformers
torch.set_num_threads(1)
out = {{}}
for arch, names in json.loads({expected!r}).items():
    model = transformers.AutoModel.from_pretrained(arch, trust_remote_code=True).eval()
    inputs = {{"input_ids": torch.tensor({ids!r})}}
    if arch == "encoder-decoder":
        inputs["decoder_input_ids"] = torch.tensor({dec!r})
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
    loaded = {{n: type(getattr(transformers, n).from_pretrained(arch, trust_remote_code=True)).__name__
              for n in names if n not in ("AutoConfig", "AutoModel")}}
    # The attention lens travels in the folder (attention_lens.py) and registers itself when the code loads.
    lensed = transformers.AutoModel.from_pretrained(arch, trust_remote_code=True, attn_implementation="lens").eval()
    with torch.no_grad():
        seen = lensed(**inputs, output_attentions=True)
    lens = {{"diff": (seen.last_hidden_state - hidden).abs().max().item(),
             "weights": sum(len(getattr(seen, k, None) or ()) for k in ("attentions", "encoder_attentions"))}}
    out[arch] = {{"hidden": hidden.tolist(), "module": type(model).__module__, "loaded": loaded, "lens": lens}}
print(json.dumps(out))
"""


def test_remote_code_loads_with_automodel_in_a_fresh_process(tmp_path):
    ids, dec = [[5, 9, 13, 17, 21, 25]], [[1, 5, 9, 13]]
    expected = {}
    for arch in ARCHS:
        model, _ = save_head(arch, tmp_path / arch)
        inputs = model_inputs(model, torch.tensor(ids))
        with torch.no_grad():
            expected[arch] = model.model(**inputs).last_hidden_state  # the base model inside the head
    names = {arch: sorted(AUTO_EXPECTED[arch]) for arch in ARCHS}
    script = FRESH_SCRIPT.format(expected=json.dumps(names), ids=ids, dec=dec)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    command = [sys.executable, "-c", textwrap.dedent(script)]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, tail(proc.stderr)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for arch in ARCHS:
        assert result[arch]["module"].startswith("transformers_modules"), result[arch]["module"]
        torch.testing.assert_close(torch.tensor(result[arch]["hidden"]), expected[arch], atol=1e-5, rtol=0)
        heads = {AUTO_NAME[c]: c.__name__ for c in HEADS[arch]}
        assert result[arch]["loaded"] == heads
        assert result[arch]["lens"]["diff"] <= 1e-5 and result[arch]["lens"]["weights"] > 0, result[arch]["lens"]
