"""A Hugging Face Space folder running the attention explorer over a published model (`publish --space`).

The folder holds `app.py` (the explorer on the model repository), `requirements.txt` (exact pins of what this
checkout runs) and `README.md` with the Space metadata (`sdk: gradio`). It is validated by starting `app.py` in a
fresh process on a free local port, pointed at the built model folder, and waiting for the page to answer.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from importlib.metadata import version
from pathlib import Path

from course_transformer.core.io import atomic_write_dir

APP = '''"""The attention explorer (course-transformer) over {repo_id}."""

import os

from course_transformer.explorer.app import build_app

MODEL = os.environ.get("EXPLORER_MODEL", "{repo_id}")
build_app(MODEL).launch(server_name="0.0.0.0", server_port=int(os.environ.get("PORT", "7860")))
'''
README = """---
title: {title}
sdk: gradio
sdk_version: {gradio}
app_file: app.py
pinned: false
license: apache-2.0
models:
- {repo_id}
---

# Attention explorer: {repo_id}

Every attention head of [{repo_id}](https://huggingface.co/{repo_id}): heatmaps, head view, per-head measures
and head ablation, by `course-transformer explore`.
"""
PINNED = ("gradio", "torch", "transformers", "huggingface_hub", "safetensors", "tokenizers", "numpy", "matplotlib")


def requirements() -> str:
    """Exact pins of what this checkout runs, and the project itself (its explorer and model code)."""
    lines = [f"{name}=={version(name)}" for name in PINNED]
    return "\n".join([*lines, f"course-transformer=={version('course-transformer')}"]) + "\n"


def build_space_folder(output: str | Path, repo_id: str, overwrite: bool = False) -> Path:
    """Write the Space folder (atomically)."""
    title = repo_id.split("/")[-1][:30]

    def write(folder: Path) -> None:
        (folder / "app.py").write_text(APP.format(repo_id=repo_id))
        (folder / "requirements.txt").write_text(requirements())
        (folder / "README.md").write_text(README.format(title=title, repo_id=repo_id, gradio=version("gradio")))

    return atomic_write_dir(output, write, overwrite=overwrite)


def validate_space(folder: str | Path, model: str | Path, timeout: float = 120) -> int:
    """Start `app.py` in a fresh process on `model` (a local folder: the Hub is not reached) and wait until the
    page answers HTTP 200; returns the port. Raises RuntimeError with the app's last output when it does not."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, EXPLORER_MODEL=str(model), PORT=str(port), HF_HUB_OFFLINE="1")
    env["GRADIO_ANALYTICS_ENABLED"] = "False"
    proc = subprocess.Popen(
        [sys.executable, "app.py"], cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                    if response.status == 200:
                        return port
            except OSError:
                time.sleep(0.5)
        proc.kill()
        output = proc.communicate()[0][-2000:]
        raise RuntimeError(f"the Space app in {folder} did not answer on port {port}: {output}")
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)
