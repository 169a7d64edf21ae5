"""Publish a trained course Transformer to the Hugging Face Hub: build, validate in a fresh process, upload.

    python -m course_transformer.commands.publish outputs/tiny-decoder --repo-id user/tiny-decoder --dry-run
    python -m course_transformer.commands.publish outputs/tiny-decoder --repo-id user/tiny-decoder --results
    outputs/eval.json

1. **Build** the repository folder from a folder written by `save_pretrained` (plus the tokenizer): the
   safetensors weights (checked by `course_transformer.core.checkpoint`: never a pickle, complete, keys and shapes
   matching
   the config), `config.json` with `auto_map`, the model code, the tokenizer, `generation_config.json` and a
   model card (`README.md`, YAML metadata from `huggingface_hub.ModelCardData`). Everything is written into a
   temporary folder beside `--output`, which replaces `--output` by one rename only after validation passed:
   a failure leaves no half-written folder.
2. **Validate** (`course_transformer.commands.validate`, run by its path in an isolated interpreter): a fresh
   Python process in which this package cannot be imported loads the folder with `trust_remote_code=True`
   through the Auto class of its head, checks no weight was missing, runs one forward pass (finite outputs), the
   folder's pipeline on a sample input and the model card's usage snippet. A folder that only loads because the
   package is installed here would fail on the Hub; this catches it.
3. **Upload** (not with `--dry-run`): `HfApi.create_repo(exist_ok=True)` then `HfApi.upload_folder`, with the
   token from `HF_TOKEN` or `hf auth login`. Nothing is reported as uploaded unless the Hub answered.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import modeling
from course_transformer.commands.validate import isolated_command
from course_transformer.core.checkpoint import CheckpointError, read_config, validate_checkpoint_folder, weight_files
from course_transformer.core.io import atomic_write_dir
from modeling.modeling_course_transformer import AUTO_CLASSES_FOR_ARCHITECTURE

logger = logging.getLogger(__name__)

CODE_FILES = (
    "attention_lens.py",
    "configuration_course_transformer.py",
    "modeling_course_transformer.py",
    "pipeline_course_transformer.py",
)
# head class -> (pipeline tag, Auto class that loads it)
TASKS = {
    "CourseTransformerForCausalLM": ("text-generation", "AutoModelForCausalLM"),
    "CourseTransformerForMaskedLM": ("fill-mask", "AutoModelForMaskedLM"),
    "CourseTransformerForSeq2SeqLM": ("text2text-generation", "AutoModelForSeq2SeqLM"),
    "CourseTransformerForSequenceClassification": ("text-classification", "AutoModelForSequenceClassification"),
    "CourseTransformerForTokenClassification": ("token-classification", "AutoModelForTokenClassification"),
    "CourseTransformerModel": ("feature-extraction", "AutoModel"),
}
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
LICENSE = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")
DEFAULT_SAMPLE = "the"


class PublishError(RuntimeError):
    """A folder that cannot be published as it is; the message says what is wrong and where."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


@dataclass
class BuildResult:
    folder: Path
    repo_id: str
    pipeline_tag: str
    files: dict[str, int]  # relative path -> size in bytes
    validation: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Inputs: repo id, harness results
# ---------------------------------------------------------------------------------------------------------------


def check_repo_id(repo_id: str) -> str:
    if not isinstance(repo_id, str) or not REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id:
        raise PublishError(f"--repo-id {repo_id!r} is not a Hub repository id of the form 'user/name'")
    return repo_id


def read_results(path: str | Path, default_dataset: str | None = None) -> list[dict[str, Any]]:
    """Metrics from a harness report JSON, as rows {metric, value, dataset, split, config}.

    Accepted shapes: `{"results": [{"metric": "perplexity", "value": 12.3, "dataset": "...", "split": "test"}]}`,
    `{"metrics": {"perplexity": 12.3}, "dataset": "..." | {"name": ..., "split": ...}}`, or a flat
    `{"perplexity": 12.3, ...}`; or a training log `metrics.jsonl` (course_transformer/commands/train.py), whose last
    evaluation is read by the training side's own reader. Non-numeric entries of the flat forms are skipped; no
    metric is an error.
    """
    path = Path(path)
    report = _read_report(path)
    if not isinstance(report, dict):
        raise PublishError(f"--results {path}: expected a JSON object, got {type(report).__name__}")
    rows = _result_rows(report, path)
    if not rows:
        raise PublishError(f"--results {path}: no numeric metric found")
    for row in rows:
        row["dataset"] = row.get("dataset") or default_dataset or "custom"
    return rows


def _read_report(path: Path) -> Any:
    """The parsed report, or the metrics of the last evaluation of a training log."""
    from course_transformer.commands.training_lib import last_evaluation

    try:
        if path.suffix != ".jsonl":
            return json.loads(path.read_text())
        if not path.is_file():
            raise FileNotFoundError(path)
        report = last_evaluation(path)
    except FileNotFoundError:
        raise PublishError(f"--results {path}: no such file") from None
    except json.JSONDecodeError as error:
        raise PublishError(f"--results {path}: invalid JSON ({error})") from None
    if report is None:
        raise PublishError(f'--results {path}: no evaluation entry ({{"kind": "eval", ...}}) in this log')
    return report


def _dataset_fields(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return {"dataset": value.get("name") or value.get("type"), **{k: value.get(k) for k in ("split", "config")}}
    return {"dataset": value}


def _number(path: Path, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PublishError(f"--results {path}: metric {name!r} has value {value!r}, expected a finite number")
    return value


def _result_rows(report: dict, path: Path) -> list[dict[str, Any]]:
    """One row per metric of the report's shape (see `read_results`)."""
    top = _dataset_fields(report.get("dataset"))
    if "results" in report:
        if not isinstance(report["results"], list):
            raise PublishError(f"--results {path}: 'results' must be a list of {{metric, value}} objects")
        rows = []
        for i, entry in enumerate(report["results"]):
            if not isinstance(entry, dict) or "metric" not in entry or "value" not in entry:
                raise PublishError(f"--results {path}: results[{i}] needs 'metric' and 'value', got {entry!r}")
            ds = {**top, **{k: v for k, v in _dataset_fields(entry.get("dataset")).items() if v}}
            row = {"metric": str(entry["metric"]), "value": _number(path, entry["metric"], entry["value"]), **ds}
            rows.append(row | {k: entry[k] for k in ("split", "config") if entry.get(k)})
        return rows
    if "metrics" in report:
        if not isinstance(report["metrics"], dict):
            raise PublishError(f"--results {path}: 'metrics' must be an object of metric name -> number")
        return [{"metric": k, "value": _number(path, k, v), **top} for k, v in report["metrics"].items()]
    numbers = {k: v for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return [{"metric": k, "value": v, **top} for k, v in numbers.items() if math.isfinite(v)]


# ---------------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------------


def usage_snippet(repo_id: str, pipeline_tag: str, auto_class: str) -> str:
    call = {
        "text-generation": 'pipe("The cat", do_sample=False, max_new_tokens=20)[0]["generated_text"]',
        "fill-mask": 'pipe(f"The cat sat on the {pipe.tokenizer.mask_token}.")',
        "text2text-generation": 'pipe("The cat sat on the mat.", max_new_tokens=40)[0]["generated_text"]',
    }.get(pipeline_tag, 'pipe("The cat sat on the mat.")')
    decoder_inputs = ""
    if pipeline_tag == "text2text-generation":  # the decoder starts from its start token
        decoder_inputs = ", decoder_input_ids=torch.tensor([[model.config.decoder_start_token_id]])"
    return textwrap.dedent(
        f"""\
        ```python
        import torch
        from transformers import {auto_class}, AutoTokenizer, pipeline

        # the model code ships in this repository: trust_remote_code=True runs it
        pipe = pipeline("{pipeline_tag}", model="{repo_id}", trust_remote_code=True)
        print({call})

        model = {auto_class}.from_pretrained("{repo_id}", trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained("{repo_id}", trust_remote_code=True)
        # every attention weight is returned, under every backend
        out = model(**tokenizer("The cat sat", return_tensors="pt"){decoder_inputs}, output_attentions=True)
        ```
        """
    )


def training_notes(source: Path) -> tuple[str, list[str]]:
    """The body and tags of a model card already in `source` (the train command writes one): its title and
    usage sections are dropped (the published card has its own), its other headings move one level down."""
    from huggingface_hub import ModelCard

    path = source / "README.md"
    if not path.is_file():
        return "", []
    try:
        card = ModelCard.load(path)
        text, tags = card.text, list(card.data.tags or [])
    except Exception:  # a README without valid YAML metadata: keep its text
        text, tags = path.read_text(), []
    kept, skipping, in_code = [], False, False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        heading = None if in_code else re.match(r"^(#+)\s*(.*)$", line)
        if heading and len(heading.group(1)) == 1:
            skipping = False
            continue  # the title
        if heading:
            skipping = re.match(r"(use|usage|how to use)\b", heading.group(2), re.IGNORECASE) is not None
            if not skipping:
                kept.append("#" + line)
            continue
        if not skipping:
            kept.append(line)
    return "\n".join(kept).strip(), [str(t) for t in tags]


CARD_BODY = """\
# {name}

A course Transformer ({architecture}, `{model_class}`): the classic Transformer of "Attention Is All
You Need" (Vaswani et al. 2017) as a Hugging Face model whose every attention weight can be inspected.
{layers}, d_model {hidden}, {heads} heads, d_ff {ff}, {positions} positions, {norm}-norm,
{params:,} parameters, vocabulary of {vocab} tokens.

## Usage

{usage}
{results}{training}
## Files

- `model.safetensors`: the weights (safetensors, no pickle)
- `config.json`: the architecture, with `auto_map` pointing at the code below
- `{code}`: the model code, run by `trust_remote_code=True`
- the tokenizer files and `generation_config.json`

Before upload this folder was loaded, and its pipeline run, in a fresh Python process in which the
course-transformer package could not be imported.
"""


def build_model_card(
    config,
    model_class: str,
    num_parameters: int,
    repo_id: str,
    license: str,
    datasets: list[str],
    tags: list[str],
    results: list[dict[str, Any]],
    training_notes: str = "",
):
    """A `huggingface_hub.ModelCard` with YAML metadata (license, library, pipeline tag, tags, results), and the
    training run's own notes (see `training_notes`) as a Training section."""
    from huggingface_hub import ModelCard

    pipeline_tag, auto_class = TASKS[model_class]
    name = repo_id.split("/")[-1]
    card_data = _card_data(config, pipeline_tag, name, license, datasets, tags, results)
    body = CARD_BODY.format(
        name=name,
        architecture=config.architecture,
        model_class=model_class,
        layers=_layers(config),
        hidden=config.hidden_size,
        heads=config.num_attention_heads,
        ff=config.intermediate_size,
        positions=config.position_encoding,
        norm=config.norm_placement,
        params=num_parameters,
        vocab=config.vocab_size,
        usage=usage_snippet(repo_id, pipeline_tag, auto_class),
        results=_results_table(results),
        training=f"## Training\n\n{training_notes.strip()}\n" if training_notes.strip() else "",
        code="`, `".join(CODE_FILES),
    )
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")


def _card_data(config, pipeline_tag: str, name: str, license: str, datasets, tags, results):
    """The card's YAML metadata; `results` become its `model-index` evaluation results."""
    from huggingface_hub import EvalResult, ModelCardData

    eval_results = [
        EvalResult(
            task_type=pipeline_tag,
            dataset_type=row["dataset"],
            dataset_name=row["dataset"],
            dataset_split=row.get("split"),
            dataset_config=row.get("config"),
            metric_type=row["metric"],
            metric_value=row["value"],
        )
        for row in results
    ]
    all_tags = ["course-transformer", "custom_code", config.architecture, f"{config.position_encoding}-positions"]
    return ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=list(dict.fromkeys(all_tags + list(tags))),
        datasets=list(datasets) or None,
        model_name=name,
        eval_results=eval_results or None,
    )


def _layers(config) -> str:
    return {
        "encoder": f"{config.num_encoder_layers} encoder layers",
        "decoder": f"{config.num_decoder_layers} decoder layers",
        "encoder-decoder": f"{config.num_encoder_layers} encoder + {config.num_decoder_layers} decoder layers",
    }[config.architecture]


def _results_table(results: list[dict[str, Any]]) -> str:
    if not results:
        return ""
    lines = ["| dataset | split | metric | value |", "|---|---|---|---|"]
    lines += [f"| {r['dataset']} | {r.get('split') or ''} | {r['metric']} | {r['value']:.6g} |" for r in results]
    return "## Evaluation\n\n" + "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------------------------


def _write_config(source: Path, target: Path, architecture: str) -> None:
    """Copy config.json, adding the `auto_map` entries (and the seq2seq pipeline) that remote code needs."""
    fields = json.loads((source / "config.json").read_text())
    auto_map = dict(fields.get("auto_map") or {})
    auto_map.setdefault("AutoConfig", "configuration_course_transformer.CourseTransformerConfig")
    for auto_name, class_name in AUTO_CLASSES_FOR_ARCHITECTURE[architecture].items():
        auto_map.setdefault(auto_name, f"modeling_course_transformer.{class_name}")
    fields["auto_map"] = auto_map
    if architecture == "encoder-decoder" and not fields.get("custom_pipelines"):
        fields["custom_pipelines"] = modeling.CourseTransformerConfig(architecture="encoder-decoder").custom_pipelines
    (target / "config.json").write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")


def _copy_code(source: Path, target: Path) -> str:
    """The model code saved with the weights when it is all there, else the installed package's."""
    if all((source / name).is_file() for name in CODE_FILES):
        origin = source
    else:
        origin = Path(modeling.__file__).resolve().parent
        logger.warning("%s lacks the model code; copying it from the installed package (%s)", source, origin)
    for name in CODE_FILES:
        shutil.copy2(origin / name, target / name)
    return str(origin)


def _write_tokenizer(tokenizer_source: Path, target: Path, vocab_size: int) -> None:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    except Exception as error:  # transformers raises OSError, ValueError or JSON errors for broken tokenizers
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PublishError(
            f"{tokenizer_source}: no loadable tokenizer ({type(error).__name__}: {first}); "
            "save one there with tokenizer.save_pretrained(folder) or pass --tokenizer PATH"
        ) from None
    if len(tokenizer) > vocab_size:
        raise PublishError(
            f"{tokenizer_source}: the tokenizer has {len(tokenizer)} tokens but config.json has "
            f"vocab_size={vocab_size}: ids beyond the embedding table would fail"
        )
    tokenizer.save_pretrained(target)


def _write_generation_config(source: Path, target: Path, config) -> None:
    from transformers import GenerationConfig

    path = source / "generation_config.json"
    if path.is_file():
        try:
            json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise PublishError(f"{path}: invalid JSON ({error})") from None
        shutil.copy2(path, target / path.name)
    else:
        GenerationConfig.from_model_config(config).save_pretrained(target)


def list_files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def build_repo_folder(
    source: str | Path,
    output: str | Path,
    repo_id: str,
    *,
    license: str = "apache-2.0",
    datasets: list[str] = (),
    tags: list[str] = (),
    results_file: str | Path | None = None,
    tokenizer: str | Path | None = None,
    sample_text: str | None = None,
    overwrite: bool = False,
    validate: bool = True,
    timeout: float = 300,
) -> BuildResult:
    """Build the Hub repository folder of `source` into `output` (atomically) and validate it; see the module doc."""
    source, output = Path(source), Path(output)
    _check_request(source, output, repo_id, license, overwrite)
    summary = validate_checkpoint_folder(source)  # config + weights, before anything is written
    config = read_config(source)
    if summary.model_class not in TASKS:
        raise PublishError(f"{source}/config.json: no pipeline for architecture {summary.model_class}")
    results = read_results(results_file, (list(datasets) or [None])[0]) if results_file else []
    validation: dict[str, Any] = {}

    def write(tmp: Path) -> None:  # into a temporary folder beside `output`: renamed only once validated
        _copy_model(source, tmp, config, Path(tokenizer) if tokenizer else source)
        notes, source_tags = training_notes(source)
        card = build_model_card(
            config,
            summary.model_class,
            summary.num_parameters,
            repo_id,
            license,
            list(datasets),
            list(tags) + source_tags,
            results,
            training_notes=notes,
        )
        card.save(tmp / "README.md")
        if validate:
            validation.update(validate_in_fresh_process(tmp, sample_text, timeout, repo_id))

    atomic_write_dir(output, write, overwrite=overwrite)
    return BuildResult(output, repo_id, TASKS[summary.model_class][0], list_files(output), validation)


def _check_request(source: Path, output: Path, repo_id: str, license: str, overwrite: bool) -> None:
    """What can be refused before anything is read or written."""
    check_repo_id(repo_id)
    if not LICENSE.match(license):
        raise PublishError(f"--license {license!r} is not a license identifier such as 'apache-2.0' or 'mit'")
    if not source.is_dir():
        raise PublishError(f"{source}: not a folder")
    if output.resolve() == source.resolve():
        raise PublishError(f"--output {output} is the source folder; choose another folder")
    if output.exists() and not overwrite:
        raise PublishError(f"--output {output} exists; pass --overwrite to replace it")


def _copy_model(source: Path, target: Path, config, tokenizer_source: Path) -> None:
    """The weights (shards and index too), config.json with `auto_map`, the code, generation config, tokenizer."""
    files, weight_map = weight_files(source)
    for path in files:
        shutil.copy2(path, target / path.name)
    if weight_map is not None:
        shutil.copy2(source / "model.safetensors.index.json", target / "model.safetensors.index.json")
    _write_config(source, target, config.architecture)
    _copy_code(source, target)
    _write_generation_config(source, target, config)
    _write_tokenizer(tokenizer_source, target, config.vocab_size)


# ---------------------------------------------------------------------------------------------------------------
# Validation in a fresh process
# ---------------------------------------------------------------------------------------------------------------


def card_snippet(folder: Path, repo_id: str) -> str:
    """The first Python block of the folder's model card, with the repository id replaced by the folder."""
    readme = folder / "README.md"
    match = re.search(r"```python\n(.*?)```", readme.read_text(), re.DOTALL) if readme.is_file() else None
    return match.group(1).replace(f'"{repo_id}"', repr(str(folder))) if match else ""


def validate_in_fresh_process(
    folder: str | Path, sample_text: str | None = None, timeout: float = 300, repo_id: str | None = None
) -> dict:
    """Load `folder` with `trust_remote_code=True` in a new isolated interpreter where this package cannot be
    imported (`course_transformer.commands.validate`, run by its path with `python -I`), run a forward pass, its
    pipeline and (given `repo_id`) the model card's usage snippet; return its report, or raise `PublishError` with
    its last error."""
    folder = Path(folder).resolve()
    config = read_config(folder)
    class_name = (config.architectures or [None])[0]
    if class_name not in TASKS:
        raise PublishError(f"{folder}/config.json: architectures={config.architectures!r} names no known head")
    task, auto_class = TASKS[class_name]
    argv = [str(folder), f"--task={task}", f"--auto-class={auto_class}", f"--sample={sample_text or DEFAULT_SAMPLE}"]
    with tempfile.TemporaryDirectory(prefix="course-transformer-validate-") as scratch:
        snippet = card_snippet(folder, repo_id) if repo_id else ""
        if snippet:
            (Path(scratch) / "snippet.py").write_text(snippet)
            argv.append(f"--snippet={Path(scratch) / 'snippet.py'}")
        proc = _run_isolated(isolated_command(argv), Path(scratch), timeout, folder)
    return _validation_report(proc, folder)


def _run_isolated(command: list[str], scratch: Path, timeout: float, folder: Path) -> subprocess.CompletedProcess:
    """`command` offline, in `scratch`, with a private remote-code cache: code cached by an earlier run must not
    stand in for this folder's."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", HF_MODULES_CACHE=str(scratch / "m"))
    env.setdefault("OMP_NUM_THREADS", "1")  # a tiny forward pass; do not compete for every core
    try:
        return subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise PublishError(f"validation of {folder} timed out after {timeout:.0f} s in a fresh process") from None


def _validation_report(proc: subprocess.CompletedProcess, folder: Path) -> dict:
    """The JSON report the validator printed last, or `PublishError` with the last line of its stderr."""
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        raise PublishError(
            f"validation failed: {folder} does not load and run with trust_remote_code=True in a fresh process "
            f"without the course-transformer package: {last}",
            details=proc.stderr,
        )
    try:
        report = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise PublishError(f"validation of {folder} printed no report: {proc.stdout[-500:]!r}") from None
    if not report["module"].startswith("transformers_modules"):
        raise PublishError(f"validation loaded {report['module']}, not the folder's own code")
    return report


# ---------------------------------------------------------------------------------------------------------------
# Upload
# ---------------------------------------------------------------------------------------------------------------


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def upload(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload course Transformer",
    api: Any = None,
) -> str:
    """`create_repo(exist_ok=True)` then `upload_folder` with `huggingface_hub.HfApi` (or the `api` given, for
    tests); returns the commit URL the Hub answered with."""
    check_repo_id(repo_id)
    if api is None:
        if _offline():
            raise PublishError("HF_HUB_OFFLINE is set: cannot upload (unset it, or use --dry-run)")
        from huggingface_hub import HfApi, get_token

        token = token or os.environ.get("HF_TOKEN") or get_token()
        if not token:
            raise PublishError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (or use --dry-run)")
        api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message=commit_message
    )
    return str(getattr(commit, "commit_url", None) or getattr(repo_url, "url", None) or commit)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="course-transformer publish",
        description="Build the Hub repository folder of a trained model, validate it in a fresh process "
        "without this package, then upload it (unless --dry-run).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("folder", type=Path, help="folder written by save_pretrained (with the tokenizer)")
    parser.add_argument("--repo-id", required=True, help="Hub repository, 'user/name'")
    parser.add_argument(
        "--output", type=Path, default=None, help="where to build the repository folder (default: FOLDER-hub)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--dry-run", action="store_true", help="build and validate, list the files, upload nothing")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--license", default="apache-2.0", help="license identifier for the model card")
    parser.add_argument("--results", type=Path, default=None, help="harness report JSON with evaluation metrics")
    parser.add_argument("--dataset", action="append", default=[], help="training dataset id (repeatable)")
    parser.add_argument("--tag", action="append", default=[], help="extra model-card tag (repeatable)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder (default: FOLDER)")
    parser.add_argument("--sample-text", default=DEFAULT_SAMPLE, help="input for the validation pipeline run")
    parser.add_argument("--timeout", type=float, default=300, help="seconds allowed for the fresh-process check")
    parser.add_argument("--commit-message", default="Upload course Transformer", help="Hub commit message")
    parser.add_argument(
        "--space",
        type=Path,
        default=None,
        help="also build a gradio Space folder with the attention explorer here, validated by starting it",
    )
    return parser


def main(argv: list[str] | None = None, api: Any = None) -> int:
    args = build_parser().parse_args(argv)
    output = args.output or args.folder.with_name(f"{args.folder.name}-hub")
    try:
        check_repo_id(args.repo_id)
        result = build_repo_folder(
            args.folder,
            output,
            args.repo_id,
            license=args.license,
            datasets=args.dataset,
            tags=args.tag,
            results_file=args.results,
            tokenizer=args.tokenizer,
            sample_text=args.sample_text,
            overwrite=args.overwrite,
            timeout=args.timeout,
        )
        v = result.validation
        print(f"built {result.folder} ({result.pipeline_tag}); validated in a fresh process without the package:")
        origin = v["module"].split(".")[0]
        snippet = "; the card's usage snippet ran" if v.get("snippet_ran") else ""
        print(f"  {v['model_class']} loaded from the folder's code ({origin}.*){snippet}")
        print(f"  pipeline({v['task']!r})({v['input']!r}) -> {json.dumps(v['output'])}"[:300])
        if args.space is not None:
            from course_transformer.commands.space import build_space_folder, validate_space

            build_space_folder(args.space, args.repo_id, overwrite=args.overwrite)
            port = validate_space(args.space, result.folder, timeout=args.timeout)
            print(f"built Space folder {args.space} (sdk: gradio); its app answered on port {port} in a fresh process")
        if args.dry_run:
            for name, size in result.files.items():
                print(f"  {size:>12,d}  {name}")
            print(f"  {sum(result.files.values()):>12,d}  total ({_size(sum(result.files.values()))})")
            print(f"dry run: nothing uploaded to {args.repo_id}")
            return 0
        url = upload(result.folder, args.repo_id, private=args.private, commit_message=args.commit_message, api=api)
        print(f"uploaded {len(result.files)} files to {args.repo_id}: {url}")
    except (PublishError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
