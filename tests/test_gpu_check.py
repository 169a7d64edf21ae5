"""scripts/gpu_check.sh --dry-run: the GPU check's steps (environment, GPU tests, benchmark, accelerate training run)
run on CPU at tiny sizes, so that the one-call script prepared for a GPU slot does not rot (issue 15)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("make-data", "environment", "gpu-tests", "benchmark", "train")
KEYS = {"exit_code", "seconds", "time_box_s", "timed_out", "ok", "log", "numbers"}


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
def test_gpu_check_dry_run_writes_a_summary_per_step(tmp_path):
    out = tmp_path / "gpu-check"
    env = {**os.environ, "PYTHON": sys.executable}
    # ~30 s on 2 busy cores; the generous limit only keeps a hung step from hanging the suite
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out), "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    assert list(summary["steps"]) == list(STEPS)
    for name, step in summary["steps"].items():
        assert set(step) >= KEYS, name
        assert step["ok"], (name, (out / step["log"]).read_text()[-3000:])
    assert summary["all_ok"] is True
    assert summary["steps"]["environment"]["numbers"]["torch"]
    assert summary["steps"]["benchmark"]["numbers"]["gpu_rows"] == 0  # no CUDA: the GPU rows skip
    train = summary["steps"]["train"]["numbers"]
    assert train["steps"] == 3 and train["tokens_per_s_median"] > 0
    assert (out / "summary.md").read_text().startswith("# GPU check (dry run, CPU)")
