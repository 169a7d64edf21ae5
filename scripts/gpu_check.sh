#!/usr/bin/env bash
# The GPU path measured in one call (issue 15): environment, GPU-marked tests, the benchmark's GPU rows at the
# GPT-2-124M shape, and a short GPT-2-124M bf16 training run with `accelerate launch`. Everything lands in OUT_DIR:
#   env.json, logs/<step>.log, tests.xml (junit), bench/ (bench.json, bench.md), train-run/ (metrics.jsonl ...),
#   summary.json + summary.md (per step: exit code, seconds, the key numbers found in its outputs).
#
#   bash scripts/gpu_check.sh OUT_DIR                     # on the GPU machine (target: <= 8 min on one H200)
#   bash scripts/gpu_check.sh OUT_DIR --bundle BUNDLE     # ... using the wheels and data made by gpu_check_bundle.sh
#   bash scripts/gpu_check.sh OUT_DIR --dry-run           # CPU, tiny sizes, ~30 s: tests/test_gpu_check.py runs it
#
# Each step runs under `timeout`; a failed or timed-out step is recorded (its exit code; 124 = timed out) and the
# script goes on. The script itself exits 0 once the summary is written, 1 if it could not be.
#
# Sizing on one H200 (worst case = the sum of the time boxes, ~8 min; each can be changed by environment variable):
#   tests      GPU_CHECK_TIMEOUT_TESTS=90    pytest -m gpu: collection of the suite is ~15 s, the GPU tests seconds.
#   benchmark  GPU_CHECK_TIMEOUT_BENCH=210   `--mode full` restricted to the decoder family (the GPT-2-124M shape:
#              12 layers, width 768, vocabulary 50257) and GPU_CHECK_BENCH_REPEATS=5 repetitions instead of 10;
#              the encoder and encoder-decoder families are left out to stay in the slot (GPU_CHECK_FAMILIES).
#   training   GPU_CHECK_TIMEOUT_TRAIN=150   GPU_CHECK_TRAIN_STEPS=150 optimizer steps of the gpt2-124m recipe
#              (16 x 4 x 1024 = 65 k tokens per step): at 30-45% MFU on an H200 a step takes ~0.15-0.3 s, so
#              ~25-45 s of steps plus start-up, data tokenization and the final save; no checkpoints, no
#              periodic evaluation. With a tokenizer in the bundle the 50257-entry BPE is not retrained there.
set -u -o pipefail

usage() { echo "usage: $0 OUT_DIR [--dry-run] [--bundle BUNDLE_DIR]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1
shift
DRY=0
BUNDLE=""
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --bundle) [ $# -ge 2 ] || usage; BUNDLE=$2; shift ;;
        *) usage ;;
    esac
    shift
done

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 1
mkdir -p "$OUT/logs" || exit 1
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The repository is used in place (no `pip install -e .`: that would need setuptools from the internet, and the
# project's torch==2.13.0 pin would fight the GPU machine's torch 2.11); the bundle's wheels, unpacked into
# OUT/site, come first on the path so that its transformers 5.23 wins over the machine's 5.17.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
STEPS_TSV=$OUT/steps.tsv
: >"$STEPS_TSV"

# run_step NAME SECONDS COMMAND...: the command under `timeout`, its output in logs/NAME.log, one line in steps.tsv.
run_step() {
    local name=$1 limit=$2 start end rc
    shift 2
    echo "== $name (time box ${limit}s): $*"
    start=$(date +%s.%N)
    timeout --kill-after=15 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
    rc=$?
    end=$(date +%s.%N)
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(awk -v a="$start" -v b="$end" 'BEGIN{printf "%.1f", b-a}')" "$limit" \
        >>"$STEPS_TSV"
    echo "   rc=$rc ($(tail -n 1 "$STEPS_TSV" | cut -f3) s)"
}

if [ $DRY = 1 ]; then
    # CPU, tiny: the same steps, sized so that the whole dry run takes seconds.
    TESTS_PATHS=${GPU_CHECK_TESTS:-tests/test_flops.py}  # one small file: collecting the whole suite is ~15 s
    T_TESTS=${GPU_CHECK_TIMEOUT_TESTS:-60}
    T_BENCH=${GPU_CHECK_TIMEOUT_BENCH:-90}
    T_TRAIN=${GPU_CHECK_TIMEOUT_TRAIN:-90}
    BENCH_ARGS=(--mode tiny --families "${GPU_CHECK_FAMILIES:-decoder}" --repeats 1 --threads 1 --no-plots)
    STEPS=${GPU_CHECK_TRAIN_STEPS:-3}
    LAUNCH_EXTRA=(--cpu --mixed_precision no --num_processes 1)
    TRAIN_SIZE=(--set model_preset=tiny-decoder
        --set 'model_overrides={hidden_size: 32, num_attention_heads: 4, num_decoder_layers: 2, intermediate_size: 64, max_position_embeddings: 64}'
        --set block_size=32 --set batch_size=4 --set gradient_accumulation_steps=1 --set vocab_size=300
        --set mixed_precision=auto --set sample_max_new_tokens=2 --set eval_batches=1 --set log_every=1)
else
    TESTS_PATHS=${GPU_CHECK_TESTS:-tests}
    T_TESTS=${GPU_CHECK_TIMEOUT_TESTS:-90}
    T_BENCH=${GPU_CHECK_TIMEOUT_BENCH:-210}
    T_TRAIN=${GPU_CHECK_TIMEOUT_TRAIN:-150}
    # shellcheck disable=SC2206  # GPU_CHECK_FAMILIES is a space-separated list on purpose
    BENCH_ARGS=(--mode full --families ${GPU_CHECK_FAMILIES:-decoder} --repeats "${GPU_CHECK_BENCH_REPEATS:-5}" --no-plots)
    STEPS=${GPU_CHECK_TRAIN_STEPS:-150}
    LAUNCH_EXTRA=()
    TRAIN_SIZE=(--set mixed_precision=bf16 --set eval_batches=10 --set log_every=10)
fi

# ---------------------------------------------------------------------------------------------- data and wheels
if [ -n "$BUNDLE" ]; then
    # The wheels the GPU machine lacks (see gpu_check_bundle.sh), unpacked next to the results, no index, no deps.
    if ls "$BUNDLE"/wheels/*.whl >/dev/null 2>&1; then
        run_step install-wheels 120 "$PY" -m pip install --quiet --no-index --no-deps --target "$OUT/site" \
            "$BUNDLE"/wheels/*.whl
        export PYTHONPATH="$OUT/site:$PYTHONPATH"
    fi
    DATA=${GPU_CHECK_DATA:-$BUNDLE/data/english}
    [ -d "$BUNDLE/tokenizer" ] && TOKENIZER=${GPU_CHECK_TOKENIZER:-$BUNDLE/tokenizer}
fi
if [ $DRY = 1 ]; then
    # A tiny synthetic DatasetDict (train / validation / test, column `text`), as tests/test_training.py builds it:
    # no corpus package and no network needed.
    DATA=$OUT/data
    run_step make-data 60 "$PY" - "$DATA" <<'EOF'
import random, sys
from datasets import Dataset, DatasetDict, disable_progress_bars
disable_progress_bars()
rng = random.Random(0)
nouns, verbs = ["king", "people", "land", "city", "house", "son"], ["saw", "built", "blessed", "left", "found"]
def rows(n, book):
    return [{"text": f"And the {rng.choice(nouns)} {rng.choice(verbs)} the {rng.choice(nouns)}.", "book": book,
             "chapter": 1, "verse": i} for i in range(n)]
DatasetDict({"train": Dataset.from_list(rows(200, 1)), "validation": Dataset.from_list(rows(20, 5)),
             "test": Dataset.from_list(rows(20, 10))}).save_to_disk(sys.argv[1])
EOF
fi
DATA=${DATA:-${GPU_CHECK_DATA:-data/bible/english}}  # the recipe's folder: `course-transformer prepare-data`
TOKENIZER=${TOKENIZER:-${GPU_CHECK_TOKENIZER:-}}

# ---------------------------------------------------------------------------------------------- (a) environment
run_step environment 60 "$PY" - "$OUT/env.json" <<'EOF'
import json, platform, shutil, subprocess, sys
from importlib import metadata
env = {"python": sys.version.split()[0], "platform": platform.platform(), "packages": {}}
for name in ("torch", "transformers", "accelerate", "datasets", "evaluate", "tokenizers", "safetensors",
             "huggingface_hub", "pyarrow", "pandas", "sacrebleu", "flash-attn", "numpy"):
    try:
        env["packages"][name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        env["packages"][name] = None
import torch
env["cuda_available"] = torch.cuda.is_available()
env["torch_cuda"] = torch.version.cuda
if torch.cuda.is_available():
    env["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    env["bf16_supported"] = torch.cuda.is_bf16_supported()
import transformers
env["transformers_imported_from"] = transformers.__file__
if shutil.which("nvidia-smi"):
    env["nvidia_smi"] = subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(json.dumps({k: v for k, v in env.items() if k != "nvidia_smi"}, indent=2))
print(env.get("nvidia_smi", "nvidia-smi: not found"))
EOF

# ---------------------------------------------------------------------------------------------- (b) GPU tests
# shellcheck disable=SC2086  # TESTS_PATHS may name several paths
run_step gpu-tests "$T_TESTS" "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml "$OUT/tests.xml" $TESTS_PATHS

# ---------------------------------------------------------------------------------------------- (c) benchmark
run_step benchmark "$T_BENCH" "$PY" -m course_transformer.cli benchmark --output "$OUT/bench" "${BENCH_ARGS[@]}"

# ---------------------------------------------------------------------------------------------- (d) training
TRAIN_ARGS=(--config configs/train/gpt2-124m.yaml --set "max_steps=$STEPS" --set "run_dir=$OUT/train-run"
    --set "dataset=$DATA" --set warmup_steps=2 --set eval_every=0 --set save_every=0 "${TRAIN_SIZE[@]}")
[ -n "$TOKENIZER" ] && TRAIN_ARGS+=(--set "tokenizer=$TOKENIZER")
run_step train "$T_TRAIN" "$PY" -m accelerate.commands.launch --config_file configs/accelerate/single-gpu.yaml \
    "${LAUNCH_EXTRA[@]}" -m course_transformer.commands.train "${TRAIN_ARGS[@]}"

# ---------------------------------------------------------------------------------------------- summary
"$PY" - "$OUT" "$DRY" <<'EOF'
import json, statistics, sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, dry = Path(sys.argv[1]), sys.argv[2] == "1"
steps = {}
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, seconds, limit = line.split("\t")
    steps[name] = {"exit_code": int(rc), "seconds": float(seconds), "time_box_s": int(limit),
                   "timed_out": int(rc) in (124, 137), "log": f"logs/{name}.log", "numbers": {}}
    # pytest exits 5 when every test is deselected: no GPU test there is not a failure of the check
    steps[name]["ok"] = int(rc) == 0 or (name == "gpu-tests" and int(rc) == 5)

def safe(fn):
    try:
        return fn()
    except Exception as error:  # a missing or partial output is a number not found, not a crash
        return {"error": f"{type(error).__name__}: {error}"}

def env_numbers():
    env = json.loads((out / "env.json").read_text())
    return {"cuda_available": env["cuda_available"], "devices": env.get("devices"), **env["packages"]}

def test_numbers():
    suite = ET.parse(out / "tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}

def bench_numbers():
    report = json.loads((out / "bench" / "bench.json").read_text())
    return {"wall_seconds": report.get("wall_seconds"), "targets": report.get("summary"),
            "gpu_rows": len(report.get("gpu") or []), "gpu": report.get("gpu") or []}

def train_numbers():
    entries = [json.loads(line) for line in (out / "train-run" / "metrics.jsonl").read_text().splitlines() if line]
    train = [e for e in entries if e.get("kind") == "train"]
    tps = [e["tokens_per_s"] for e in train[1:] or train if e.get("tokens_per_s")]  # the first window warms up
    mfu = [e["mfu"] for e in train[1:] or train if e.get("mfu") is not None]
    return {"steps": train[-1]["step"] if train else 0, "last_loss": train[-1]["loss"] if train else None,
            "tokens_per_s_median": statistics.median(tps) if tps else None,
            "mfu_median": statistics.median(mfu) if mfu else None}

for name, fn in (("environment", env_numbers), ("gpu-tests", test_numbers), ("benchmark", bench_numbers),
                 ("train", train_numbers)):
    if name in steps:
        steps[name]["numbers"] = safe(fn)

summary = {"dry_run": dry, "all_ok": all(s["ok"] for s in steps.values()),
           "total_seconds": round(sum(s["seconds"] for s in steps.values()), 1), "steps": steps}
(out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))

lines = [f"# GPU check{' (dry run, CPU)' if dry else ''}", "",
         f"All steps ok: {summary['all_ok']}; {summary['total_seconds']} s in all.", "",
         "| step | exit | seconds | time box | key numbers |", "|---|---|---|---|---|"]
for name, s in steps.items():
    shown = {k: v for k, v in s["numbers"].items() if k != "gpu"}
    lines.append(f"| {name} | {s['exit_code']}{' (timed out)' if s['timed_out'] else ''} | {s['seconds']} "
                 f"| {s['time_box_s']} | {json.dumps(shown, default=str)[:400]} |")
gpu_rows = steps.get("benchmark", {}).get("numbers", {}).get("gpu") or []
if gpu_rows:
    lines += ["", "## Benchmark GPU rows", "", "See bench/bench.md for the full tables.", ""]
    lines += [f"- {json.dumps(row, default=str)[:300]}" for row in gpu_rows]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
