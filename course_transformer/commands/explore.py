"""`course-transformer explore MODEL`: the attention explorer in the browser (course_transformer.explorer).

    course-transformer explore bert-minilm
    course-transformer explore runs/enfr-cpu/final --port 7861
    course-transformer explore bert-base          # a preset with random weights

Needs the `explorer` extra (gradio): pip install -e ".[explorer]".
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline tool: no telemetry calls


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="course-transformer explore", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a saved model folder, a preset name, or bert-minilm / ours-minilm / ...")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on")
    parser.add_argument("--max-tokens", type=int, default=64, help="longer inputs are truncated, with a note")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from course_transformer.explorer.app import build_app

    build_app(args.model, max_tokens=args.max_tokens).launch(server_name=args.host, server_port=args.port)
    return 0
