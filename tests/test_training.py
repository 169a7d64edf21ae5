"""Training: config validation, schedules, batching, loss going down for the three objectives, exact resume,
and a final folder that reloads through the Auto classes and the pipeline. Tiny in-memory corpora only."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from scripts.train import train
from scripts.train_tokenizer import train_bpe
from scripts.training_lib import Batcher, TrainConfig, load_config, lr_lambda

NOUNS = ["king", "people", "land", "city", "house", "servant", "prophet", "son", "river", "mountain"]
VERBS = ["saw", "built", "blessed", "left", "found", "called", "loved", "kept"]
FR_NOUNS = ["roi", "peuple", "pays", "ville", "maison", "serviteur", "prophète", "fils", "fleuve", "montagne"]
FR_VERBS = ["vit", "bâtit", "bénit", "quitta", "trouva", "appela", "aima", "garda"]
FR = dict(zip(NOUNS + VERBS, FR_NOUNS + FR_VERBS))


def sentence(rng: random.Random) -> tuple[str, str]:
    a, v, b = rng.choice(NOUNS), rng.choice(VERBS), rng.choice(NOUNS)
    return f"And the {a} {v} the {b}.", f"Et le {FR[a]} {FR[v]} le {FR[b]}."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tiny DatasetDict on disk (train: books 1-4, validation: book 5) and a byte-level BPE beside it."""
    from datasets import Dataset, DatasetDict

    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    splits = {}
    for name, books, n in (("train", (1, 2, 3, 4), 600), ("validation", (5,), 80), ("test", (6,), 20)):
        rows = []
        for i in range(n):
            en, fr = sentence(rng)
            rows.append({"text": en, "en": en, "fr": fr, "book": books[i % len(books)], "chapter": 1, "verse": i})
        splits[name] = Dataset.from_list(rows)
    DatasetDict(splits).save_to_disk(str(root / "data"))
    train_bpe(splits["train"]["text"], vocab_size=300).save_pretrained(str(root / "bpe"))
    return root


def tiny(corpus, run_dir, model: dict | None = None, **fields) -> TrainConfig:
    overrides = dict(
        run_dir=str(run_dir),
        dataset=str(corpus / "data"),
        tokenizer=str(corpus / "bpe"),
        model_preset="tiny-decoder",
        model_overrides=dict(
            hidden_size=32,
            num_attention_heads=4,
            num_decoder_layers=2,
            num_encoder_layers=0,
            intermediate_size=64,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_dropout_prob=0.0,
        ),
        block_size=32,
        batch_size=8,
        max_steps=30,
        learning_rate=3e-3,
        warmup_steps=3,
        eval_every=0,
        eval_batches=4,
        log_every=1,
        save_every=0,
        sample_prompts=["And the king"],
        sample_max_new_tokens=4,
        bleu_examples=8,
    )
    overrides["model_overrides"].update(model or {})
    overrides.update(fields)
    config = TrainConfig(**overrides)
    config.validate()
    return config


def train_losses(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [m["step_loss"] for m in map(json.loads, lines) if m["kind"] == "train"]


def test_causal_lm_loss_goes_down_and_final_folder_reloads(corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    result = train(tiny(corpus, tmp_path / "run"))
    before, after = result["first_eval"], result["last_eval"]
    assert after["eval_loss"] < before["eval_loss"] - 1.0
    assert 0 < after["bits_per_byte"] < before["bits_per_byte"]
    assert after["perplexity"] == pytest.approx(math.exp(after["eval_loss"]))
    losses = result["train_losses"]
    assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5])

    run = tmp_path / "run"
    for name in ("train_config.yaml", "metrics.jsonl", "loss.png", "checkpoints/step-0000030"):
        assert (run / name).exists(), name
    assert load_config(run / "train_config.yaml") == tiny(corpus, run)  # the resolved config reproduces the run
    final = result["final"]
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"):
        assert (final / name).is_file(), name
    assert "bits_per_byte" in (final / "README.md").read_text()

    model = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert model.config.vocab_size == len(tokenizer) and model.config.eos_token_id == tokenizer.eos_token_id
    batch = tokenizer(["And the king saw the city."], return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss
    assert loss.item() < before["eval_loss"]  # the trained weights came back, not a fresh initialisation
    generator = pipeline("text-generation", model=str(final), trust_remote_code=True)
    text = generator("And the", do_sample=False, max_new_tokens=6)[0]["generated_text"]
    assert text.startswith("And the") and len(text) > len("And the")


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(corpus, tmp_path):
    # Dropout on and an accumulation of 2: every source of randomness and every piece of state must come back.
    fields = dict(max_steps=8, save_every=4, gradient_accumulation_steps=2, eval_at_start=False)
    dropout = dict(hidden_dropout_prob=0.1, attention_dropout_prob=0.1)
    train(tiny(corpus, tmp_path / "full", model=dropout, **fields))
    interrupted = tiny(corpus, tmp_path / "resumed", model=dropout, stop_at_step=4, **fields)
    train(interrupted)
    assert len(train_losses(tmp_path / "resumed")) == 4
    interrupted.stop_at_step = None
    result = train(interrupted, resume=True)
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "full")
    assert (
        result["last_eval"]["eval_loss"]
        == json.loads((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[-1])["eval_loss"]
    )
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["step-0000004", "step-0000008"]


def test_masked_lm_and_seq2seq_learn(corpus, tmp_path):
    common = dict(max_steps=25, tokenizer=None, vocab_size=300)
    mlm = tiny(
        corpus,
        tmp_path / "mlm",
        objective="masked_lm",
        model_preset="tiny-encoder",
        tokenizer_kind="wordpiece",
        sample_prompts=["And the [MASK] saw the city."],
        model=dict(num_encoder_layers=2, num_decoder_layers=0),
        **common,
    )
    result = train(mlm)
    assert result["last_eval"]["eval_loss"] < result["first_eval"]["eval_loss"] - 1.0
    assert (tmp_path / "mlm" / "final" / "tokenizer.json").is_file()

    s2s = tiny(
        corpus,
        tmp_path / "s2s",
        objective="seq2seq",
        model_preset="tiny-encoder-decoder",
        tokenizer_kind="shared",
        label_smoothing=0.1,
        model=dict(num_encoder_layers=2, num_decoder_layers=2, position_encoding="sinusoidal"),
        **common,
    )
    result = train(s2s)
    assert result["last_eval"]["eval_loss"] < result["first_eval"]["eval_loss"] - 1.0
    pytest.importorskip("sacrebleu")
    assert 0 <= result["last_eval"]["bleu"] <= 100


@pytest.mark.parametrize(
    "override, field",
    [
        ("objective=translate", "objective"),
        ("learning_rate=-1", "learning_rate"),
        ("max_steps=ten", "max_steps"),
        ("lr_schedule=linear", "lr_schedule"),
        ("model_overrides.hidden_size=30", "hidden_size"),  # not divisible by 4 heads: the model config says so
        ("model_preset=tiny-encoder", "model_preset"),  # an encoder cannot be a causal LM
        ("dataset=/nonexistent", "dataset"),
        ("no_such_field=1", "no_such_field"),
    ],
)
def test_bad_config_values_fail_fast_naming_the_field(override, field):
    with pytest.raises(ValueError, match=field):
        load_config("configs/train/demo-cpu.yaml", ["dataset=.", override] if field != "dataset" else [override])


def test_shipped_recipes_load():
    for name in ("demo-cpu", "gpt2-124m", "bert-base-mlm", "vaswani-base-enfr"):
        config = load_config(f"configs/train/{name}.yaml", ["dataset=."])
        assert config.max_steps > 0


def test_schedules():
    cosine = lr_lambda(TrainConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.1))
    assert cosine(0) == pytest.approx(0.1) and cosine(9) == pytest.approx(1.0)
    assert cosine(99) == pytest.approx(0.1) and cosine(50) < cosine(20)
    inv = lr_lambda(TrainConfig(max_steps=100, warmup_steps=16, lr_schedule="inverse_sqrt"))
    assert inv(15) == pytest.approx(1.0) and inv(63) == pytest.approx(0.5) and inv(3) == pytest.approx(0.25)


def test_batcher_is_deterministic_and_shards_disjointly():
    ranks = [Batcher(50, batch_size=4, seed=3, rank=r, world_size=2) for r in range(2)]
    epoch = torch.cat([torch.cat([b.indices(step) for b in ranks]) for step in range(6)])
    assert len(set(epoch.tolist())) == 48  # 6 global batches of 8 without repeats within an epoch
    again = Batcher(50, batch_size=4, seed=3, rank=1, world_size=2)
    assert torch.equal(again.indices(7), ranks[1].indices(7))  # step 7 is in epoch 1, recomputed identically
    assert not torch.equal(ranks[0].indices(0), ranks[0].indices(6))  # a new order each epoch


@pytest.mark.slow
def test_two_process_data_parallel_on_cpu_matches_one_process(corpus, tmp_path):
    """`accelerate launch` with 2 gloo processes x batch 4 takes the same steps as 1 process x batch 8."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from scripts.training_lib import save_config

    fields = dict(max_steps=4, eval_at_start=False, sample_max_new_tokens=0)
    train(tiny(corpus, tmp_path / "one", batch_size=8, **fields))
    save_config(tiny(corpus, tmp_path / "two", batch_size=4, **fields), tmp_path / "two.yaml")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_cpu_threads_per_process", "1", "--main_process_port", port, "--mixed_precision", "no"]
    command += [
        "--num_machines",
        "1",
        "--dynamo_backend",
        "no",
        "-m",
        "scripts.train",
        "--config",
        str(tmp_path / "two.yaml"),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1"}  # without it: 2 unrelated runs
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout + done.stderr
    assert train_losses(tmp_path / "two") == pytest.approx(train_losses(tmp_path / "one"), rel=1e-5)
    assert (tmp_path / "two" / "final" / "model.safetensors").is_file()
