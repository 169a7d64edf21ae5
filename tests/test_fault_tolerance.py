"""Fault tolerance of `course_transformer/commands/train.py`, in real processes (CPU, fixed seed, a tiny decoder with
dropout).

- Kill trials: one uninterrupted reference run, then runs killed with SIGKILL at seeded-random moments and one
  killed deterministically in the middle of writing a checkpoint (this file, run as a script, is the train command
  with `accelerate.Accelerator.save_state` wrapped to stop the writer after accelerate's files, before
  `progress.json` and the rename: the fault is injected here, not in the training code). Each is resumed with
  `--resume` to the end; the final safetensors must equal the reference's bit for bit, the resume must start from
  the newest complete checkpoint, and a half-written one must never be picked up.
- A non-finite loss: `learning_rate=1e6` makes the gradients overflow at step 2; the process exits with status 3
  and a message naming the step and the value, and the last good checkpoint loads.

The trial table is printed with the test output (`pytest -s` not needed) and recorded in docs/training.md.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from course_transformer.commands.training_lib import checkpoint_dirs, read_metrics

REPO = Path(__file__).resolve().parent.parent
SEED = 20240611  # of the kill moments
MAX_STEPS, SAVE_EVERY, PAUSED_CHECKPOINT = 24, 4, 12
TIMEOUT = 240  # seconds for one process, far above the ~10 s it takes


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> Path:
    """A tiny corpus, its tokenizer and a YAML config of a 24-step run checkpointed every 4 steps."""
    from test_training import corpus_on_disk

    root = tmp_path_factory.mktemp("faults")
    corpus_on_disk(root)
    config = {
        "dataset": str(root / "data"),
        "tokenizer": str(root / "bpe"),
        "model_preset": "tiny-decoder",
        "model_overrides": {
            "hidden_size": 32,
            "num_attention_heads": 4,
            "num_decoder_layers": 2,
            "num_encoder_layers": 0,
            "intermediate_size": 64,
            "max_position_embeddings": 64,
            "hidden_dropout_prob": 0.1,  # dropout on: the RNG must come back too
            "attention_dropout_prob": 0.1,
        },
        "block_size": 32,
        "batch_size": 8,
        "max_steps": MAX_STEPS,
        "learning_rate": 3e-3,
        "warmup_steps": 3,
        "eval_every": 0,
        "eval_at_start": False,
        "eval_batches": 1,
        "log_every": 1,
        "sample_max_new_tokens": 0,
        "save_every": SAVE_EVERY,
        "keep_last": 2,
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def launch(config: Path, run_dir: Path, *args: str, pause_in_checkpoint: int | None = None) -> subprocess.Popen:
    """`course-transformer train` in the background; stdout and stderr go to `<run_dir>.log` (appended). With
    `pause_in_checkpoint=STEP`, the same command with the writer of checkpoint STEP stopped mid-write (see
    `pause_in_checkpoint` below)."""
    command = [sys.executable, "-m", "course_transformer.commands.train"]
    if pause_in_checkpoint is not None:
        command = [sys.executable, __file__, "--pause-in-checkpoint", str(pause_in_checkpoint)]
    command += ["--config", str(config), "--set", f"run_dir={run_dir}", *args]
    environment = dict(os.environ)
    environment.update(
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",  # the same in every process: bitwise equal results need the same reductions
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),  # for the script
    )
    log = open(f"{run_dir}.log", "a")  # noqa: SIM115 (closed when the process has ended)
    process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT)
    process.log = log
    return process


def finish(process: subprocess.Popen, run_dir: Path) -> str:
    """Wait for the process; fail with its log unless it exited 0. Returns the whole log."""
    code = process.wait(timeout=TIMEOUT)
    process.log.close()
    output = Path(f"{run_dir}.log").read_text()
    assert code == 0, f"exit status {code}:\n{output[-4000:]}"
    return output


def wait_until(condition, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert process.poll() is None, f"the run ended (status {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=TIMEOUT)
    process.log.close()
    assert process.returncode == -signal.SIGKILL, f"not killed: exit status {process.returncode}"


def last_step(run_dir: Path) -> int:
    return max((m["step"] for m in read_metrics(run_dir / "metrics.jsonl") if m["kind"] == "train"), default=0)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "final" / "model.safetensors")


def where_killed(run_dir: Path) -> str:
    """What the killed process was doing, read from what it left on disk."""
    root = run_dir / "checkpoints"
    partial = sorted(p.name for p in root.iterdir() if p.name.startswith(".")) if root.is_dir() else []
    if partial:
        return f"writing checkpoint ({', '.join(partial)} left)"
    if list(run_dir.glob(".final.tmp-*")):  # course_transformer.core.io.atomic_write_dir's temporary folder
        return "writing final/"
    return "between checkpoints" if last_step(run_dir) < MAX_STEPS else "after the last step"


def test_sigkill_at_random_moments_then_resume_gives_bit_identical_weights(config_path, tmp_path, capsys):
    reference = tmp_path / "reference"
    finish(launch(config_path, reference), reference)
    expected = final_weights(reference)

    rng = random.Random(SEED)
    trials = [("random", rng.randint(1, MAX_STEPS - 3), rng.uniform(0.0, 0.3)) for _ in range(3)]
    trials.append(("mid-checkpoint", PAUSED_CHECKPOINT, None))
    rows, failures = [], []
    for number, (kind, target, delay) in enumerate(trials, 1):
        run = tmp_path / f"trial{number}"
        if kind == "random":
            process = launch(config_path, run)
            wait_until(lambda run=run, target=target: last_step(run) >= target, process, f"step {target}")
            time.sleep(delay)
            moment = f"step {target} logged + {delay * 1000:.0f} ms"
        else:  # the writer of checkpoint 12 stops after accelerate's files, before progress.json and the rename
            process = launch(config_path, run, pause_in_checkpoint=target)
            log = Path(f"{run}.log")
            wait_until(lambda log=log: "[test hook] pausing" in log.read_text(), process, "the paused checkpoint")
            moment = f"inside checkpoint {target}"
        kill(process)
        doing = where_killed(run)
        killed_at = last_step(run)
        complete = checkpoint_dirs(run)
        for folder in complete:  # every complete checkpoint is whole: its weights load, its step is its name
            from safetensors.torch import load_file

            assert json.loads((folder / "progress.json").read_text())["step"] == int(folder.name[5:])
            assert load_file(folder / "model.safetensors")
        if kind == "mid-checkpoint":
            partial = run / "checkpoints" / f".tmp-step-{target:07d}"
            assert {"model.safetensors", "optimizer.bin"} <= {p.name for p in partial.iterdir()}
            assert not (partial / "progress.json").exists() and not (run / "checkpoints" / partial.name[5:]).exists()
            assert [p.name for p in complete] == ["step-0000004", "step-0000008"]  # the previous one is the newest

        output = finish(launch(config_path, run, "--resume"), run)
        resumed = next((line for line in output.splitlines() if line.startswith("resumed from")), None)
        if complete:
            assert resumed == f"resumed from {complete[-1]} at step {int(complete[-1].name[5:])}", output[-3000:]
        else:
            assert resumed is None and "no checkpoint in" in output
        if doing.startswith("writing checkpoint"):
            assert "removed the incomplete checkpoint" in output
        assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # nothing partial left
        weights = final_weights(run)
        diff = max((weights[k] - expected[k]).abs().max().item() for k in expected)
        identical = weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)
        rows.append(
            f"| {number} | {kind} | {moment} | {killed_at} | {doing} | "
            f"{complete[-1].name if complete else '(none: from scratch)'} | {diff:.1e} | {identical} |"
        )
        if not identical:
            failures.append(f"trial {number}: final weights differ from the uninterrupted run (max {diff:.3g})")

    table = [
        f"\nkill-and-resume trials ({MAX_STEPS} steps, checkpoint every {SAVE_EVERY}, seed {SEED}):",
        "| trial | kill | moment | last step logged | killed while | resumed from | max abs weight diff | bitwise |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    with capsys.disabled():
        print("\n".join(table))
    assert not failures, failures


def test_non_finite_loss_exits_3_naming_the_step_and_keeps_the_last_good_checkpoint(config_path, tmp_path):
    from safetensors.torch import load_file

    from course_transformer.commands.train import train
    from course_transformer.commands.training_lib import load_config

    run = tmp_path / "nan"
    overrides = ["learning_rate=1e6", "save_every=1"]
    process = launch(config_path, run, *[x for o in overrides for x in ("--set", o)])
    code = process.wait(timeout=TIMEOUT)
    process.log.close()
    output = Path(f"{run}.log").read_text()
    assert code == 3, output[-3000:]
    good = run / "checkpoints" / "step-0000001"
    stop = re.search(
        r"error: training stopped: the gradient norm is nan at optimizer step 2 \(loss ([0-9.e+]+)\)", output
    )
    assert stop and float(stop.group(1)) > 1e9 and f"the last good checkpoint is {good}" in output, output[-3000:]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000001"]
    assert not (run / "final").exists()
    # The last good checkpoint loads through the real resume path: resumed and saved at its own step, the final
    # weights are the checkpoint's.
    config = load_config(config_path, [f"run_dir={run}", *overrides, "stop_at_step=1"])
    result = train(config, resume=True)
    saved, checkpoint = load_file(result["final"] / "model.safetensors"), load_file(good / "model.safetensors")
    assert all(torch.equal(saved[k], checkpoint[k]) for k in checkpoint) and saved.keys() == checkpoint.keys()


def pause_in_checkpoint(step: int, seconds: float = 600.0) -> None:
    """Make the main process of the train command stop for `seconds` in the middle of writing checkpoint `step`:
    after accelerate's files, before `progress.json` and the rename, so that a SIGKILL lands mid-write."""
    from accelerate import Accelerator

    save_state = Accelerator.save_state

    def save_state_then_pause(self, output_dir=None, **kwargs):
        saved = save_state(self, output_dir, **kwargs)
        folder = Path(output_dir)
        if self.is_main_process and folder.name == f".tmp-step-{step:07d}":
            written = ", ".join(sorted(p.name for p in folder.iterdir()))
            message = f"[test hook] pausing {seconds:g} s inside checkpoint step {step}: {folder} holds {written}"
            print(message, flush=True)
            time.sleep(seconds)
        return saved

    Accelerator.save_state = save_state_then_pause


if __name__ == "__main__":  # python tests/test_fault_tolerance.py --pause-in-checkpoint STEP TRAIN-ARGUMENTS...
    import argparse

    from course_transformer.commands.train import main

    parser = argparse.ArgumentParser(description="the train command, paused inside one checkpoint")
    parser.add_argument("--pause-in-checkpoint", type=int, required=True, metavar="STEP")
    known, train_arguments = parser.parse_known_args()
    pause_in_checkpoint(known.pause_in_checkpoint)
    main(train_arguments)
