"""Training: config validation, schedules, batching, loss going down for the three objectives, exact resume,
and a final folder that reloads through the Auto classes and the pipeline. Tiny in-memory corpora only."""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path

import pytest
import torch

from course_transformer.commands.train import train
from course_transformer.commands.train_tokenizer import train_bpe
from course_transformer.commands.training_lib import Batcher, TrainConfig, load_config, lr_lambda

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
    return corpus_on_disk(tmp_path_factory.mktemp("corpus"))


def corpus_on_disk(root: Path) -> Path:
    """A tiny DatasetDict in `root/data` (train: books 1-4, validation: book 5) and a byte-level BPE in `root/bpe`."""
    from datasets import Dataset, DatasetDict, disable_progress_bars

    disable_progress_bars()
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
    # Throughput per logging window (every step here): 8 x 32 input positions per step; no MFU on a CPU.
    windows = [m for m in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())]
    rates = [m["tokens_per_s"] for m in windows if m["kind"] == "train"]
    assert len(rates) == 30 and all(r > 0 for r in rates) and result["tokens_per_s"] == statistics.median(rates)
    assert all(m["mfu"] is None for m in windows if m["kind"] == "train") and result["mfu"] is None

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
    checkpoint = tmp_path / "resumed" / "checkpoints" / "step-0000004"
    assert json.loads((checkpoint / "progress.json").read_text()) == {"step": 4, "micro_step": 8, "tokens": 8 * 8 * 31}
    assert not list(checkpoint.glob("custom_checkpoint_*"))  # nothing that accelerate unpickles unsafely

    # Every torch.load of the resume must be weights_only=True (accelerate's register_for_checkpointing objects
    # are loaded with weights_only=False); the rest is safetensors and JSON.
    loads = []
    real_load = torch.load

    def recording_load(f, *args, **kwargs):
        loads.append((Path(f).name, kwargs.get("weights_only")))
        return real_load(f, *args, **kwargs)

    interrupted.stop_at_step = None
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "load", recording_load)
        result = train(interrupted, resume=True)
    assert sorted(loads) == [("optimizer.bin", True), ("random_states_0.pkl", True), ("scheduler.bin", True)]
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "full")
    assert (
        result["last_eval"]["eval_loss"]
        == json.loads((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[-1])["eval_loss"]
    )
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["step-0000004", "step-0000008"]


@pytest.mark.parametrize(
    "clip, save_every, logged, good_steps, what",
    [
        # lr 1e6 x weight decay 0.1 scales the matrices by -1e5 per step: step 2's gradients overflow.
        (1.0, 1, [1], [1], "the gradient norm is nan at optimizer step 2 (loss 1.1"),
        # without clipping no norm is computed: step 2 is applied (finite loss, NaN update), and caught before its
        # checkpoint is written ...
        (0.0, 1, [1, 2], [1], "holds nan after optimizer step 2"),
        # ... or, with no checkpoint due, by the loss of step 3
        (0.0, 0, [1, 2], [], "the training loss is nan at optimizer step 3"),
    ],
)
def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    corpus, tmp_path, clip, save_every, logged, good_steps, what
):
    from safetensors.torch import load_file

    from course_transformer.commands.training_lib import NonFiniteError, checkpoint_dirs

    fields = dict(learning_rate=1e6, max_grad_norm=clip, save_every=save_every, max_steps=10, eval_at_start=False)
    config = tiny(corpus, tmp_path / "run", **fields)
    with pytest.raises(NonFiniteError, match="training stopped: ") as stopped:
        train(config)
    message = str(stopped.value)
    assert what in message and "Nothing was saved from this state" in message
    assert all(math.isfinite(x) for x in train_losses(tmp_path / "run"))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == logged
    assert not (tmp_path / "run" / "final").exists()
    good = checkpoint_dirs(tmp_path / "run")
    assert [p.name for p in good] == [f"step-{s:07d}" for s in good_steps]
    if good:
        assert f"the last good checkpoint is {good[-1]}" in message
        weights = load_file(good[-1] / "model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values())
        assert json.loads((good[-1] / "progress.json").read_text())["step"] == good_steps[-1]
    else:
        assert good == [] and "there is no checkpoint yet" in message


def test_the_configs_learning_rate_wins_on_resume_and_a_failed_attempt_leaves_no_trace(corpus, tmp_path):
    """Resume with lr 1e6 (the config wins over the scheduler state saved in the checkpoint): it stops on a
    non-finite value; resumed again with the original lr, the run equals an uninterrupted one."""
    from course_transformer.commands.training_lib import NonFiniteError

    fields = dict(max_steps=6, save_every=2, eval_at_start=False)
    train(tiny(corpus, tmp_path / "full", **fields))
    config = tiny(corpus, tmp_path / "run", stop_at_step=2, **fields)
    train(config)
    config.stop_at_step, config.learning_rate = None, 1e6
    with pytest.raises(NonFiniteError, match="at optimizer step [34]"):
        train(config, resume=True)
    config.learning_rate = 3e-3
    train(config, resume=True)
    assert train_losses(tmp_path / "run") == train_losses(tmp_path / "full")


def test_metrics_log_cut_short_by_a_kill_is_read_without_its_last_line(tmp_path):
    from course_transformer.commands.training_lib import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1}\n{"kind": "train", "step": 2}\n{"kind": "tr')
    assert read_metrics(path) == [{"kind": "train", "step": 1}, {"kind": "train", "step": 2}]
    path.write_text('{"kind": "tr\n{"kind": "train", "step": 2}\n')
    with pytest.raises(json.JSONDecodeError):  # damage anywhere else is not silently skipped
        read_metrics(path)


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
    # The model cards take their task from course_transformer.commands.publish: transformers 5 has no "translation"
    # pipeline.
    from huggingface_hub import ModelCard

    for run, task in (("mlm", "fill-mask"), ("s2s", "text2text-generation")):
        card = ModelCard.load(tmp_path / run / "final" / "README.md")
        assert card.data.pipeline_tag == task and run in card.text
        assert f'pipeline("{task}", model="{tmp_path / run / "final"}", trust_remote_code=True)' in card.text
    pytest.importorskip("sacrebleu")
    assert 0 <= result["last_eval"]["bleu"] <= 100


def test_demo_evaluation_harness_on_a_tiny_trained_model(corpus, tmp_path):
    """`make demo`'s harness: parity reports (a failing reference is reported, not swallowed), then
    evaluation.harness on the saved model: test-split quality, attention report with an induction score sized to
    its 64 positions, and the parity of its export to GPT-2."""
    from scripts.demo import run_evaluation_harness

    final = train(tiny(corpus, tmp_path / "run", max_steps=2, eval_at_start=False))["final"]
    out = tmp_path / "evaluation"
    results = run_evaluation_harness(
        final, out, references=["gpt2-tiny", str(tmp_path / "no-such-model")], dataset=corpus / "data", max_texts=20
    )

    gpt2 = results["parity"]["gpt2-tiny"]
    assert gpt2["passed"] and gpt2["round_trip_exact"] and gpt2["attention_max_abs_diff"] < 1e-5
    assert {"parity.json", "parity.md", "parity.png"} <= {p.name for p in (out / "parity" / "gpt2-tiny").iterdir()}
    missing = results["parity"][str(tmp_path / "no-such-model")]
    assert missing["exit_code"] == 2 and not missing["passed"] and not results["passed"]

    model = results["model"]
    report = json.loads((out / "model" / "report.json").read_text())
    assert report["dataset"]["split"] == "test" and report["dataset"]["num_texts"] == model["texts"]["num_texts"]
    assert 0 < model["lm_quality"]["bits_per_byte"] == report["lm_quality"][0]["metrics"]["bits_per_byte"]
    attention = json.loads((out / "model" / "attention" / "report.json").read_text())
    assert attention["num_layers"] == 2 and attention["num_heads"] == 4 and attention["causal"]
    assert attention["induction"]["period"] == 31
    assert model["induction_score"] == max(map(max, attention["induction"]["scores"]))
    assert (out / "model" / "attention" / "grid_induction.png").is_file()
    # The tiny recipe is GPT-2-shaped (learned positions, pre-norm, GELU-tanh, tied head): its export is checked.
    assert model["export_parity"]["passed"] and results["parity"]["gpt2 export"]["passed"]
    assert json.loads((out / "harness.json").read_text())["passed"] is False


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


@pytest.mark.parametrize(
    "split, texts, what",
    [
        ("train", [], "is empty (0 rows)"),
        ("validation", ["  ", "", "\n"], "has 3 rows, every text in column 'text' is blank"),
    ],
)
def test_an_empty_or_blank_split_is_refused_in_one_line_naming_the_split_and_the_file(
    tmp_path, capsys, split, texts, what
):
    """It used to die with `IndexError: list index out of range`; now: one line, exit 1, nothing written."""
    from datasets import Dataset, DatasetDict, Features, Value

    from course_transformer import cli

    text = Features({"text": Value("string")})
    good = Dataset.from_dict({"text": ["And the king saw the city."] * 40}, features=text)
    splits = {"train": good, "validation": good, split: Dataset.from_dict({"text": texts}, features=text)}
    DatasetDict(splits).save_to_disk(str(tmp_path / "data"))
    capsys.readouterr()  # drop save_to_disk's progress bars
    run = tmp_path / "run"
    argv = ["train", "--config", "configs/train/demo-cpu.yaml", "--set", f"dataset={tmp_path / 'data'}"]
    assert cli.main([*argv, "--set", f"run_dir={run}"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"course-transformer train: error: {tmp_path / 'data' / split}: split {split!r} {what}"), err
    assert not run.exists()


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

    from course_transformer.commands.training_lib import save_config

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
        "course_transformer.commands.train",
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
