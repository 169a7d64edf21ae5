"""Command-line scripts: data preparation, tokenizer and model training, generation and the CPU demo.

Run them as modules from the repository root, e.g. `course-transformer train --config configs/train/demo-cpu.yaml`.
"""
