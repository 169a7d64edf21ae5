#!/usr/bin/env bash
# Prepare, on the CPU side (with internet), what the GPU machine lacks for scripts/gpu_check.sh:
#   BUNDLE/wheels/     the wheels that differ from its stack, downloaded with --no-deps
#   BUNDLE/data/       the prepared KJV/WEB/BBE corpus (`course-transformer prepare-data`, English only)
#   BUNDLE/tokenizer/  the recipe's 50257-entry byte-level BPE, trained here so the GPU slot does not spend on it
#
#   bash scripts/gpu_check_bundle.sh outputs/gpu-bundle            # then, on the GPU machine (carry outputs/gpu-bundle):
#   bash scripts/gpu_check.sh outputs/gpu-check --bundle outputs/gpu-bundle
#   bash scripts/gpu_check_bundle.sh outputs/gpu-bundle --print    # only print the commands
#
# The GPU machine (issue 15): torch 2.11 + CUDA, transformers 5.17, accelerate; no datasets, no evaluate; no
# internet. torch and accelerate are used as they are there. The wheels below are the ones our code imports that
# it lacks or has at another version: transformers 5.23 (and the huggingface_hub / tokenizers / safetensors it
# needs), datasets (the corpus is a DatasetDict on disk) with its own imports, evaluate and sacrebleu (the metric
# modules). Binary wheels (pyarrow, pandas, xxhash, tokenizers, safetensors) are fetched for the GPU machine's
# Python (GPU_PYTHON_VERSION, default 3.11) and platform; the env.json of a first gpu_check run says what is already
# there: drop those from GPU_WHEELS (the device tool carries at most 64 MiB: pyarrow alone is ~40 MiB).
# Nothing here runs in the test suite (tests/test_gpu_check.py runs gpu_check.sh --dry-run only).
set -eu -o pipefail

[ $# -ge 1 ] || { echo "usage: $0 BUNDLE_DIR [--print]" >&2; exit 2; }
BUNDLE=$1
PRINT=${2:-}
PY=${PYTHON:-python}
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"

# Pins from pyproject.toml (and the versions installed with them), space-separated; override to trim.
GPU_WHEELS=${GPU_WHEELS:-"transformers==5.23.0 huggingface_hub==2.4.0 tokenizers==0.23.3 safetensors==0.8.0 \
datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 fsspec==2026.9.0 pyarrow==26.0.1 pandas==3.1.1 \
evaluate==0.4.6 sacrebleu==2.6.0 portalocker==4.4.2 tabulate==0.10.0 colorama==0.4.6 typer==0.29.2"}
GPU_PYTHON_VERSION=${GPU_PYTHON_VERSION:-3.11}
GPU_PLATFORM=${GPU_PLATFORM:-manylinux_2_28_x86_64}

run() {
    echo "+ $*"
    [ "$PRINT" = "--print" ] || "$@"
}

mkdir -p "$BUNDLE/wheels"
# shellcheck disable=SC2086  # GPU_WHEELS is a list
run "$PY" -m pip download --no-deps --only-binary=:all: --python-version "$GPU_PYTHON_VERSION" \
    --platform "$GPU_PLATFORM" --platform manylinux2014_x86_64 --platform any -d "$BUNDLE/wheels" $GPU_WHEELS
run "$PY" -m course_transformer.cli prepare-data --out "$BUNDLE/data" --no-pairs
run "$PY" -m course_transformer.cli train-tokenizer --kind bpe --dataset "$BUNDLE/data/english" --vocab-size 50257 \
    --out "$BUNDLE/tokenizer"
[ "$PRINT" = "--print" ] || du -sh "$BUNDLE"/* || true
